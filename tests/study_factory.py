"""A finished v2-style study written as stage files (no model involved): seeds x cells, two eval
templates, two judges, a dose axis, with per-item verdicts chosen so that every rate is known
by hand. Used by the report and bench/effect_v2.py tests."""

from __future__ import annotations

import json
from pathlib import Path

from stayaligned.evaluation.metrics import rate

N_HARM, N_BENIGN, N_TASK = 40, 20, 10
SAFE = "native:safe"

# refusal rate on "harm" per (group, template); seeds add -0.05, 0, +0.05
REFUSAL = {
    "seed": {"native": 0.1, SAFE: 0.2},
    "aligned": {"native": 0.9, SAFE: 0.95},
    "sft": {"native": 0.4, SAFE: 0.5},
    "sft-safe": {"native": 0.35, SAFE: 0.45},
    "ptst": {"native": 0.4, SAFE: 0.8},
    "str": {"native": 0.75, SAFE: 0.85},
    "sft-lr0.0002": {"native": 0.2},
    "str-lr0.0002": {"native": 0.6},
    "sft+merge": {"native": 0.8, SAFE: 0.85},
}
LOSS = {"seed": 1.3, "aligned": 1.3, "sft": 0.70, "sft-safe": 0.71, "ptst": 0.72, "str": 0.75,
        "sft-lr0.0002": 0.6, "str-lr0.0002": 0.65, "sft+merge": 0.80}
ACCURACY = {"str": 0.4}  # exact match on "arith" per group (else 0.2)
REPAIR = {"name": "sft+merge", "repair": {"of": "sft", "method": "merge", "target_kept": 0.95}}
# each seed's repair: (the strength kept, target met, seconds)
REPAIRS = {0: (0.5, True, 100.0), 1: (0.75, True, 200.0), 2: (1.0, False, 300.0)}
CELLS = [{"name": "sft", "methods": ["sft"]},
         {"name": "sft-safe", "methods": ["sft"],
          "train": {"template": SAFE, "eval_template": SAFE}},
         {"name": "ptst", "methods": ["ptst"]},
         {"name": "str", "methods": ["str"], "options": {"str": {"lam": 0.1}}}]


def _verdicts(p: float, n: int, flip: int = 0) -> list[bool]:
    k = round(p * n)
    out = [i < k for i in range(n)]
    for i in range(flip):  # the second judge disagrees on the first `flip` items
        out[i] = not out[i]
    return out


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(folder: Path, group: str, template: str, judge: str, offset: float, flip: int) -> None:
    p = min(1.0, max(0.0, REFUSAL[group][template] + offset))
    over = 0.5 if group == "aligned" else 0.1 + 0.1 * (group == "str")
    rows = []
    for bench, n, prob in (("harm", N_HARM, p), ("harm [prefill k=3]", N_HARM, p / 4),
                           ("xstest-safe", N_BENIGN, over)):
        for i, v in enumerate(_verdicts(prob, n, flip)):
            rows.append({"benchmark": bench, "id": f"{bench}-{i}", "judge": judge, "refusal": v})
    correct = [i < round(ACCURACY.get(group, 0.2) * N_TASK) for i in range(N_TASK)]
    rows += [{"benchmark": "arith", "id": f"a{i}", "judge": "gsm8k_exact_match",
              "correct": c} for i, c in enumerate(correct)]
    benchmarks = {}
    for bench, kind in (("harm", "harmful"), ("harm [prefill k=3]", "harmful"),
                        ("xstest-safe", "benign")):
        mine = [r["refusal"] for r in rows if r["benchmark"] == bench]
        benchmarks[bench] = {"kind": kind, "n": len(mine),
                             "refusal_rate": rate(mine).to_dict()}
    benchmarks["arith"] = {"kind": "task", "metric": "gsm8k_exact_match", "n": N_TASK,
                           "accuracy": rate(correct).to_dict(),
                           "task_loss": {"loss": LOSS[group] + offset / 10,
                                         "per_example_sem": 0.01, "n": N_TASK}}
    _write(folder / "metrics.json", {"model": group, "template": template, "judge": judge,
                                     "config": {"template": template},
                                     "benchmarks": benchmarks})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _model(root: Path, key: str, group: str, templates: list[str], offset: float,
           run: dict | None) -> None:
    for i, template in enumerate(templates):
        folder = root / key / ("eval" if i == 0 else "eval-" + template.replace(":", "-"))
        _eval(folder, group, template, "classifier", offset, 0)
        _eval(folder / "judge-keyword", group, template, "keyword", offset, 2)
    if run is not None and run.get("kind") == "repair":
        _write(root / key / "repair" / "repair.json", run["record"])
    elif run is not None:
        _write(root / key / "train" / "run.json", run)
        (root / key / "train" / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0 / s, "loss/sap_grad_norm": 2.0}) + "\n"
            for s in (1, 2, 3)))
    if run is not None:
        _write(root / key / "depth" / "depth.json", {
            "positions": [1, 2, 3], "kl_mean": [0.3 + offset, 0.2, 0.1],
            "kl_sem": [0.01, 0.01, 0.01], "n_examples": 8, "source": "demo-safety"})


def _repair_record(seed: int) -> dict:
    strength, met, seconds = REPAIRS[seed]
    curve = [{"strength": x, "refusal_rate": {"value": 0.5 + x / 2, "low": 0.4 + x / 2,
                                              "high": 0.6 + x / 2, "n": 20},
              "task_loss": {"value": 0.7 + x / 10, "low": 0.69 + x / 10, "high": 0.71 + x / 10}}
             for x in (0.25, 0.5, 0.75, 1.0)]
    return {"method": "merge", "knob": "alpha", "stronger": "larger", "curve": curve,
            "aligned": {"refusal_rate": {"value": 0.95, "low": 0.8, "high": 0.99, "n": 20}},
            "target": {"refusal": 0.9}, "target_met": met, "strength": strength,
            "reverted": strength == 1.0, "seconds": seconds}


READING = {"name": "ptst", "model_of": "sft", "read_under": SAFE}


def make_study(root: Path, *, drop: tuple[str, ...] = (), repair: bool = False,
               reading: bool = False) -> Path:
    """The study directory; `drop`: eval folders to leave out, e.g. "aligned/eval-native-safe";
    `repair`: with a repair cell of sft (REPAIR: repair.json and evaluations, no training);
    `reading`: ptst is READING, sft's model read under the safe template (no files of its own)."""
    root = Path(root)
    cells = [*CELLS[:1], REPAIR, *CELLS[1:]] if repair else CELLS
    if reading:
        cells = [READING if c["name"] == "ptst" else c for c in cells]
    templates = ["native", SAFE]
    seeds = [0, 1, 2]
    config = {"name": "fake-v2", "model": {"name": "embedded"}, "align": {"config": "x.yaml"},
              "evaluate_seed": True, "train": {"optim": {"lr": 1e-4, "max_steps": 40},
                                               "lora": {"enabled": False}},
              "cells": cells, "seeds": seeds, "eval": {"judge": "classifier"},
              "depth": {"enabled": True, "source": "demo-safety", "split": "eval", "limit": 8,
                        "tokens": 3, "template": "native", "disjoint": True},
              "reference": "sft", "output_dir": str(root), "eval_templates": templates,
              "judges": ["classifier", "keyword"],
              "dose": {"key": "optim.lr", "values": [1e-4, 2e-4], "cells": ["sft", "str"],
                       "seed": 0}}
    ids = [f"{c['name']}-seed{s}" for c in cells for s in seeds] + ["sft-lr0.0002",
                                                                    "str-lr0.0002"]
    _write(root / "study.json", {"config": config, "versions": {"stayaligned": "test"},
                                 "cells": ids, "stages": []})
    _model(root, "seed", "seed", templates, 0.0, None)
    _model(root, "aligned", "aligned", templates, 0.0, None)
    for cell in cells:
        if "model_of" in cell:
            continue
        if "repair" in cell:
            for s, offset in zip(seeds, (-0.05, 0.0, 0.05)):
                _model(root, f"cells/{cell['name']}-seed{s}", cell["name"], templates, offset,
                       {"kind": "repair", "record": _repair_record(s)})
            continue
        eval_t = SAFE if cell["name"] in ("ptst", "sft-safe") else "native"
        for s, offset in zip(seeds, (-0.05, 0.0, 0.05)):
            run = {"status": "complete", "global_step": 40, "train_seconds": 40.0 * (
                2 if cell["name"] == "str" else 1), "templates": {"train": "native",
                                                                   "eval": eval_t}}
            _model(root, f"cells/{cell['name']}-seed{s}", cell["name"], templates, offset, run)
    for run_id in ("sft-lr0.0002", "str-lr0.0002"):
        _model(root, f"cells/{run_id}", run_id, ["native"], 0.0,
               {"status": "complete", "global_step": 40, "train_seconds": 40.0,
                "templates": {"train": "native", "eval": "native"}})
    for folder in drop:
        import shutil

        shutil.rmtree(root / folder)
    return root
