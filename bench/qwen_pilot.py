"""Pilot for the Qwen2.5-Coder study's fine-tuning budget, scored on validation data only.

    .venv/bin/python bench/qwen_pilot.py [--config configs/study/qwen_coder_gsm8k.yaml]
        [--candidate LR:STEPS ...] [--holdout 50] [--out bench/results/qwen_coder_pilot.json]

Trains the study's sft cell (its `train` block, from the study's model) once per candidate
(learning rate, steps) and evaluates the seed and every candidate on:
- the bundled demo harmful requests, split `align` (110 prompts written for this project; not
  AdvBench, not XSTest), plain and prefilled with k = 3 tokens: the refusal rate;
- a GSM8K *train* hold-out: `--holdout` problems drawn after the study's own training subset
  (same seed, so disjoint from it; never the GSM8K test split): the held-out task loss.
The chosen budget is the cheapest candidate (fewest steps, then lowest lr) whose plain or
prefilled refusal interval lies wholly below the seed's; none qualifying is reported as such.
Outputs go to runs/pilot/qwen_coder/ (resumable: finished trainings and evaluations are kept);
the summary to --out. Put the chosen lr and max_steps into the study config by hand.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stayaligned.config import EvalConfig, StudyConfig, build, load, to_dict  # noqa: E402
from stayaligned.runfiles import write_json, write_jsonl  # noqa: E402

PREFILL_K = 3
HARMFUL = "demo-harmful-align"
TASK = "gsm8k-train-holdout"


def holdout_file(cfg: StudyConfig, n: int, target: Path) -> Path:
    """The `n` GSM8K train problems that follow the study's training subset in its random draw
    (`subset` draws a prefix-consistent sample for one seed), as a JSONL file."""
    from stayaligned.data.sources import load_source

    [source] = [d for d in cfg.train["data"]]
    limit, seed = source["limit"], source.get("seed", 0)
    train_ids = {ex.id for ex in load_source("gsm8k", split="train", limit=limit, seed=seed,
                                             data_dir=cfg.data_dir)}
    wider = load_source("gsm8k", split="train", limit=limit + n, seed=seed, data_dir=cfg.data_dir)
    rows = [{"question": ex.content("user"), "answer": ex.content("assistant")}
            for ex in wider if ex.id not in train_ids]
    if len(rows) != n:
        raise SystemExit(f"the hold-out has {len(rows)} problems, expected {n}: the study's "
                         "train data must be one gsm8k source with a limit")
    write_jsonl(target, rows)
    return target


def validation_eval(cfg: StudyConfig, model: str, out: Path, holdout: Path) -> EvalConfig:
    gen = {**cfg.eval.get("generation", {}), "max_new_tokens": 48}
    return build(EvalConfig, {
        "model": {**to_dict(cfg.model), "name": model}, "data_dir": cfg.data_dir,
        "benchmarks": [
            {"name": HARMFUL, "source": "demo-harmful", "split": "align", "kind": "harmful",
             "prefill_k": [0, PREFILL_K]},
            # task loss only: one generated token (accuracy is not what the pilot reads)
            {"name": TASK, "source": str(holdout), "kind": "task", "split": "train",
             "fields": {"user": "question", "assistant": "answer"}, "max_new_tokens": 1},
        ],
        "generation": gen, "judge": cfg.eval.get("judge", "keyword"), "output_dir": str(out),
    })


def summary(metrics: dict) -> dict:
    b = metrics["benchmarks"]
    return {"refusal": b[HARMFUL]["refusal_rate"],
            "prefill_refusal": b[f"{HARMFUL} [prefill k={PREFILL_K}]"]["refusal_rate"],
            "holdout_task_loss": b[TASK]["task_loss"]["loss"]}


def apart(low: dict, high: dict) -> bool:
    """True when `low`'s interval lies wholly below `high`'s."""
    return low["high"] < high["low"]


def run(cfg: StudyConfig, candidates: list[tuple[float, int]], root: Path, n_holdout: int) -> dict:
    from stayaligned.evaluation.run import evaluate
    from stayaligned.study import cell_ids, cell_train_config
    from stayaligned.training.run import is_complete, train

    holdout = holdout_file(cfg, n_holdout, root / "gsm8k_train_holdout.jsonl")
    results = {"seed": summary(evaluate(validation_eval(cfg, cfg.model.name, root / "seed", holdout)))}
    run_id, cell, seed = next(c for c in cell_ids(cfg) if c[1].name == "sft")
    for lr, steps in candidates:
        tag = f"lr{lr:g}-steps{steps}"
        base = cell_train_config(cfg, root, run_id, cell, seed)
        tcfg = replace(base, optim=replace(base.optim, lr=lr, max_steps=steps),
                       output_dir=str(root / tag / "train"))
        if not is_complete(Path(tcfg.output_dir)):
            train(tcfg, resume=True)
        metrics = evaluate(validation_eval(cfg, tcfg.output_dir, root / tag / "eval", holdout))
        results[tag] = {"lr": lr, "max_steps": steps, **summary(metrics)}
        write_json(root / "pilot.json", results)
    return results


def choose(results: dict) -> str | None:
    seed = results["seed"]
    ok = [(r["max_steps"], r["lr"], tag) for tag, r in results.items() if tag != "seed"
          and (apart(r["refusal"], seed["refusal"])
               or apart(r["prefill_refusal"], seed["prefill_refusal"]))]
    return min(ok)[2] if ok else None


def parse_candidate(text: str) -> tuple[float, int]:
    lr, _, steps = text.partition(":")
    try:
        return float(lr), int(steps)
    except ValueError:
        raise SystemExit(f"--candidate {text!r}: expected LR:STEPS, e.g. 2e-4:20") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/study/qwen_coder_gsm8k.yaml"))
    parser.add_argument("--candidate", action="append", type=parse_candidate,
                        help="LR:STEPS, repeatable (default: 2e-4:20 and 5e-4:20)")
    parser.add_argument("--holdout", type=int, default=50)
    parser.add_argument("--runs", default="runs/pilot/qwen_coder")
    parser.add_argument("--out", default=str(ROOT / "bench/results/qwen_coder_pilot.json"))
    args = parser.parse_args(argv)
    cfg = load(StudyConfig, args.config)
    candidates = args.candidate or [(2e-4, 20), (5e-4, 20)]
    results = run(cfg, candidates, Path(args.runs), args.holdout)
    chosen = choose(results)
    results["meta"] = {
        "purpose": "choose the fine-tuning budget of the Qwen study without its evaluation sets",
        "data": f"demo-harmful split align (110 prompts; plain and prefill k={PREFILL_K}), "
                f"GSM8K train hold-out of {args.holdout} disjoint from the study's subset",
        "judge": cfg.eval.get("judge", "keyword"),
        "chosen": chosen, "rule": "fewest steps, then lowest lr, whose refusal interval "
                                  "(plain or prefilled) lies wholly below the seed's",
        "command": "python bench/qwen_pilot.py " + " ".join(
            f"--candidate {lr:g}:{steps}" for lr, steps in candidates),
    }
    write_json(Path(args.out), results)
    print(f"chosen: {chosen}")


if __name__ == "__main__":
    main()
