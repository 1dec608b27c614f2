"""Seed-instance control: is a study's retrained aligned seed the same model for its purpose?

    PYTHONPATH=src .venv/bin/python bench/seed_instance_control.py bench/studies/embedded_gsm8k_v2 \
        [--cell sft-seed0] [--between sft-seed0 sft-seed1 sft-seed2] [--work runs/seed_control] \
        [--output bench/results/embedded_gsm8k_v2/seed_instance_control.json]

A study commits its results but not its weights, so on a fresh machine it retrains its aligned
seed (run.json `archived_rerun` says whether the logged losses reproduced). The cells committed
before were made from the archived seed; the cells trained after, from the retrained one, and
possibly on other kernels (a CPU without native bf16 runs bf16 products as float32 GEMMs). This
script measures what that mix costs, and decides nothing by itself:

1. it retrains one committed cell (`--cell`) with its exact config (its train/run.json) from the
   study's current aligned seed, outside the study directory (`--work`; resumable);
2. it evaluates that model with each of the cell's own evaluation configs (every template:
   eval/, eval-native-safe/ ...), and re-judges it with the keyword judge where the cell has one;
3. it compares, per template, judge and benchmark, the control with the committed cell: the rate
   difference and the items whose judgement flips (same prompts), beside the same two numbers
   between the committed seeds of that cell (`--between`, default: the cell's `-seedN` siblings).

`inside_spread` is true for a row when |control - committed| is no larger than the largest
difference between two committed seeds, and the report's sentence says how many rows are. The
evaluation sets are only read, never tuned on.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stayaligned.config import EvalConfig, TrainConfig, from_dict  # noqa: E402
from stayaligned.runfiles import read_json, read_jsonl, write_json  # noqa: E402

JUDGE_DIRS = {"classifier": "", "keyword": "judge-keyword"}  # top-level: the eval's own judge


def cell_evals(cell_dir: Path) -> list[Path]:
    """The cell's evaluation directories (one per template), each with a metrics.json."""
    return sorted(p for p in cell_dir.iterdir()
                  if p.is_dir() and p.name.startswith("eval") and (p / "metrics.json").is_file())


def siblings(study: Path, cell: str) -> list[str]:
    """The committed seeds of `cell` (name-seedN), with their evaluations."""
    stem = re.sub(r"-seed\d+$", "", cell)
    return sorted(p.name for p in (study / "cells").glob(f"{stem}-seed*")
                  if re.fullmatch(rf"{re.escape(stem)}-seed\d+", p.name) and cell_evals(p))


def retrain(study: Path, cell: str, work: Path) -> Path:
    """Train `cell`'s exact config from the study's current seed into `work`; the run dir."""
    from stayaligned.training.run import train

    record = read_json(study / "cells" / cell / "train" / "run.json")
    if not record or "config" not in record:
        raise SystemExit(f"{study}/cells/{cell}/train/run.json has no config: is {cell} committed?")
    data = dict(record["config"], output_dir=str(work / cell / "train"))
    return train(from_dict(TrainConfig, data, where=f"{cell}/train/run.json"), resume=True)


def evaluate_like(eval_dir: Path, model: Path, target: Path) -> None:
    """Evaluate `model` with `eval_dir`'s config into `target`, and re-judge it with the keyword
    judge where `eval_dir` has a judge-keyword/ (resumable: both reuse finished stages)."""
    from stayaligned.evaluation.rejudge import rejudge, rejudge_done
    from stayaligned.evaluation.run import evaluate

    cfg = read_json(eval_dir / "metrics.json")["config"]
    cfg = dict(cfg, model=dict(cfg["model"], name=str(model)), output_dir=str(target))
    evaluate(from_dict(EvalConfig, cfg, where=f"{eval_dir}/metrics.json config"))
    keyword = eval_dir / JUDGE_DIRS["keyword"]
    if (keyword / "metrics.json").is_file() and not rejudge_done(target, "keyword",
                                                                 target / keyword.name):
        rejudge(target, "keyword", None, target / keyword.name)


def rates(eval_dir: Path, judge: str) -> dict[str, float]:
    """benchmark -> refusal rate (and gsm8k's task loss and accuracy) under `judge`."""
    metrics = read_json(eval_dir / JUDGE_DIRS[judge] / "metrics.json") or {}
    out = {}
    for name, block in (metrics.get("benchmarks") or {}).items():
        if "refusal_rate" in block:
            out[f"{name}: refusal"] = block["refusal_rate"]["value"]
        if judge == "classifier":  # judge-free (the task metric): listed once
            if "task_loss" in block:
                out[f"{name}: task loss"] = block["task_loss"]["loss"]
            if "accuracy" in block:
                out[f"{name}: accuracy"] = block["accuracy"]["value"]
    return out


def judgements(eval_dir: Path, judge: str) -> dict[tuple[str, str], bool]:
    rows = read_jsonl(eval_dir / JUDGE_DIRS[judge] / "judgments.jsonl")
    return {(r["benchmark"], r["id"]): bool(r["refusal"]) for r in rows if "refusal" in r}


def flips(a: dict, b: dict, benchmark: str) -> int | None:
    keys = [k for k in a if k[0] == benchmark]
    if not keys or any(k not in b for k in keys):
        return None
    return sum(a[k] != b[k] for k in keys)


def compare(control: Path, committed: Path, seeds: list[Path], judge: str) -> dict:
    """Rows for one template and judge: control vs committed, beside seed vs seed."""
    mine, theirs = rates(control, judge), rates(committed, judge)
    per_seed = [rates(s, judge) for s in seeds]
    j_mine, j_theirs = judgements(control, judge), judgements(committed, judge)
    j_seeds = [judgements(s, judge) for s in seeds]
    rows = {}
    for key in sorted(theirs):
        values = [r[key] for r in per_seed if key in r]
        spread = max((abs(x - y) for x, y in itertools.combinations(values, 2)), default=None)
        diff = mine.get(key, float("nan")) - theirs[key]
        row = {"control": mine.get(key), "committed": theirs[key], "diff": diff,
               "seeds": values, "seed_spread": spread,
               "inside_spread": None if spread is None else abs(diff) <= spread}
        if key.endswith(": refusal"):
            bench = key.removesuffix(": refusal")
            row["flips"] = flips(j_mine, j_theirs, bench)
            row["seed_flips"] = [flips(x, y, bench)
                                 for x, y in itertools.combinations(j_seeds, 2)]
        rows[key] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study")
    parser.add_argument("--cell", default="sft-seed0")
    parser.add_argument("--between", nargs="*", help="the committed seeds to compare among")
    parser.add_argument("--work", default="runs/seed_control")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    study, work = Path(args.study), Path(args.work)
    output = Path(args.output or f"bench/results/{study.name}/seed_instance_control.json")
    seed = read_json(study / "aligned" / "train" / "run.json") or {}
    if seed.get("status") != "complete":
        raise SystemExit(f"{study}/aligned/train is not complete: run the study until its "
                         "aligned stage is done, then this")
    between = args.between or siblings(study, args.cell)
    model = retrain(study, args.cell, work)
    result = {"cell": args.cell, "between": between,
              "seed": {"archived_rerun": seed.get("archived_rerun"),
                       "precision": seed.get("precision"), "machine": seed.get("machine")},
              "control": {"precision": (read_json(model / "run.json") or {}).get("precision")},
              "templates": {}}
    inside = total = 0
    for eval_dir in cell_evals(study / "cells" / args.cell):
        target = work / args.cell / eval_dir.name
        evaluate_like(eval_dir, model, target)
        seeds = [study / "cells" / s / eval_dir.name for s in between
                 if (study / "cells" / s / eval_dir.name / "metrics.json").is_file()]
        block = {}
        for judge, sub in JUDGE_DIRS.items():
            if (eval_dir / sub / "metrics.json").is_file():
                block[judge] = compare(target, eval_dir, seeds, judge)
                for row in block[judge].values():
                    if row["inside_spread"] is not None:
                        total += 1
                        inside += row["inside_spread"]
        result["templates"][eval_dir.name] = block
    result["inside_spread"] = {"rows": total, "inside": inside}
    result["summary"] = (f"{inside} of {total} rates of the control lie within the largest "
                         f"difference between the committed seeds {', '.join(between)}")
    result["command"] = "python bench/seed_instance_control.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    write_json(output, result)
    print(result["summary"])
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
