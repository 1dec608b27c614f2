"""Where a fine-tune's held-out task loss sits in the answer: per answer-token position.

    python bench/task_loss_positions.py bench/studies/embedded_gsm8k_v2 \\
        --cells sft lookahead-real lookahead-virtual \\
        --output bench/results/embedded_gsm8k_v2/task_loss_positions.json

The study's task loss (evaluation.task_loss) is the token-weighted NLL of the reference
answers over every answer token. LookAhead Tuning changes how the first answer tokens are
trained: the real mode shows them in the prompt (they become easy to predict, so little is
learnt about producing them), the virtual mode trains every answer to open with its prefix P.
Scored without any preview, as the study scores every cell, both can lose on the first tokens
alone. This splits each model's task loss into the first `--first` answer tokens (one entry
per position) and the rest, on the same examples, template, precision and batches as the
study's evaluation (`total` is checked against its task_loss.json, to 1e-4 relative). For a
virtual-mode cell it also scores the reference with P in front (`after_prefix`: the loss on
the reference's tokens only, P's tokens skipped), i.e. the answer as that model begins it.

Models: the aligned seed and the named cells' runs (every seed found), read from the study's
output directory; nothing is written there.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from stayaligned.config import StudyConfig, build, load
from stayaligned.evaluation.run import eval_template_name, expand_benchmarks, reference_answer
from stayaligned.evaluation.task_loss import nll_passes, with_reference
from stayaligned.models import load_model
from stayaligned.runfiles import read_json, write_json
from stayaligned.study import cell_ids, eval_config
from stayaligned.templates.library import get_template
from stayaligned.templates.render import render_for_training


def position_nll(model, tokenizer, examples, template, batch_size: int, skip: int = 0) -> list:
    """Per example, the NLL of each answer token in order (the first `skip` answer tokens
    left out), from the forward passes `task_loss.reference_nll` sums (`nll_passes`: the same
    batches, so the same bf16 rounding)."""
    items = [render_for_training(tokenizer, ex, template) for ex in examples]
    out: list = [None] * len(items)
    for rows, nll, keep in nll_passes(model, tokenizer, items, batch_size):
        for k, i in enumerate(rows):
            out[i] = nll[k][keep[k]].tolist()[skip:]
    return out


def summarise(per_example: list[list[float]], first: int) -> dict:
    """Token-weighted mean NLL per position < `first`, over the rest, and over all tokens."""
    def mean(values):
        return sum(values) / len(values) if values else None

    positions = [[row[t] for row in per_example if len(row) > t] for t in range(first)]
    rest = [x for row in per_example for x in row[first:]]
    every = [x for row in per_example for x in row]
    return {"positions": [{"position": t + 1, "nll": mean(v), "n": len(v)}
                          for t, v in enumerate(positions)],
            "first": {"tokens": first, "nll": mean([x for v in positions for x in v]),
                      "n": sum(len(v) for v in positions)},
            "rest": {"nll": mean(rest), "n": len(rest)},
            "total": {"nll": mean(every), "n": len(every)}}


def runs(cfg: StudyConfig, out: Path, cells: list[str]) -> list[tuple[str, str, dict | None]]:
    """(label, model directory, cell entry) for the aligned seed and the named cells' seed runs
    finished (dose runs left out)."""
    found = [("aligned", str(out / "aligned" / "train"), None)]
    for run_id, cell, seed in cell_ids(cfg):
        seed_run = run_id in (cell.name, f"{cell.name}-seed{seed}")
        record = read_json(out / "cells" / run_id / "train" / "run.json") or {}
        if cell.name in cells and seed_run and record.get("status") == "complete":
            found.append((run_id, str(out / "cells" / run_id / "train"), cell))
    return found


def virtual_prefix(model_dir: str) -> str | None:
    """P for a run trained with lookahead's virtual mode, else None (read from its run.json)."""
    record = read_json(Path(model_dir) / "run.json") or {}
    config = record.get("config") or {}
    options = ((config.get("options") or {}).get("lookahead") or {})
    if "lookahead" not in (config.get("methods") or []) or options.get("mode") != "virtual":
        return None
    from stayaligned.methods.lookahead import LookAheadOptions

    return options.get("prefix", LookAheadOptions.prefix)


def study_config(where: str) -> tuple[StudyConfig, Path]:
    """The study's config and output directory, from its output directory (study.json) or
    its config file."""
    if (Path(where) / "study.json").is_file():
        return build(StudyConfig, read_json(Path(where) / "study.json")["config"]), Path(where)
    cfg = load(StudyConfig, where)
    return cfg, Path(cfg.output_dir)


def measure(where: str, cells: list[str], first: int) -> dict:
    cfg, out = study_config(where)
    result: dict = {"study": where, "first": first, "models": {}}
    for label, model_dir, _cell in runs(cfg, out, cells):
        ecfg = eval_config(cfg, model_dir, out / "unused")
        benches = expand_benchmarks(ecfg)
        name, (bench, examples, _) = next((n, b) for n, b in benches.items()
                                          if b[0].kind == "task" and b[2] is None
                                          and b[0].task_loss)
        template = get_template(bench.template or eval_template_name(ecfg))
        refs = [with_reference(ex, reference_answer(ex)) for ex in examples]
        model, tokenizer = load_model(ecfg.model, inference=True)
        size = ecfg.generation.batch_size
        entry = summarise(position_nll(model, tokenizer, refs, template, size), first)
        eval_dir = Path(model_dir).parent / "eval"
        recorded = ((read_json(eval_dir / "task_loss.json") or {}).get(name) or {}).get("result")
        entry["recorded_total"] = recorded and recorded.get("loss")
        if recorded and not math.isclose(entry["total"]["nll"], recorded["loss"], rel_tol=1e-4):
            raise SystemExit(f"{label}: total NLL {entry['total']['nll']:.5f} differs from "
                             f"{eval_dir / 'task_loss.json'} ({recorded['loss']:.5f}): not the "
                             "study's computation")
        if (prefix := virtual_prefix(model_dir)) is not None:
            skip = len(tokenizer.tokenize(prefix.rstrip()))
            with_p = [replace(ex, messages=(*ex.messages[:-1], {
                "role": "assistant", "content": prefix + ex.messages[-1]["content"]}))
                for ex in refs]
            entry["after_prefix"] = {"prefix": prefix, "skipped_tokens": skip, **summarise(
                position_nll(model, tokenizer, with_p, template, size, skip), first)}
        entry["benchmark"], entry["template"] = name, template.name
        result["models"][label] = entry
        del model
        print(f"{label:28s} first {first}: {entry['first']['nll']:.3f}  rest "
              f"{entry['rest']['nll']:.3f}  total {entry['total']['nll']:.4f}"
              + (f"  after P: total {entry['after_prefix']['total']['nll']:.4f}"
                 if "after_prefix" in entry else ""), file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="the study's output directory (or its config file)")
    parser.add_argument("--cells", nargs="+", required=True, help="cell names to read")
    parser.add_argument("--first", type=int, default=8, help="answer positions listed one by one")
    parser.add_argument("--output", help="write the JSON here (default: print a summary only)")
    args = parser.parse_args(argv)
    data = measure(args.study, args.cells, args.first)
    data["command"] = "python bench/task_loss_positions.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.output:
        write_json(Path(args.output), data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
