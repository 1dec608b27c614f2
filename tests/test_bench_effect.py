"""bench/effect.py: effect.json has the issue's keys as fractions and checks the targets."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


def load_effect():
    return load_bench("effect")


def test_effect_json_from_a_finished_study(tiny_study, tmp_path):
    effect = load_effect()
    out = tmp_path / "effect.json"
    assert effect.main([str(tiny_study), "--output", str(out), "--report", str(tmp_path / "r")]) == 0
    data = json.loads(out.read_text())
    assert {"seed", "aligned", "sft", "ptst", "meta", "targets"} <= set(data)
    metrics = json.loads((tiny_study / "cells/sft/eval/metrics.json").read_text())["benchmarks"]
    assert data["sft"]["refusal_rate"] == metrics["harm"]["refusal_rate"]["value"]
    assert data["sft"]["task_loss"] == metrics["arith"]["task_loss"]["loss"]
    for name in ("seed", "aligned", "sft", "ptst"):
        row = data[name]
        low, high = row["refusal_ci"]
        assert 0 <= low <= row["refusal_rate"] <= high <= 1
        assert 0 <= row["over_refusal_rate"] <= 1 and 0 <= row["task_accuracy"] <= 1
    assert data["meta"]["budget"]["optim"]["max_steps"] == 6
    assert (tmp_path / "r" / "report.md").is_file()


def test_targets_on_hand_made_rows():
    effect = load_effect()
    rows = {"aligned": {"refusal_rate": 0.9}, "sft": {"refusal_rate": 0.45, "task_loss": 1.0,
                                                     "task_accuracy": 0.1},
            "ptst": {"refusal_rate": 0.8, "task_loss": 1.04, "task_accuracy": 0.09},
            "str": {"refusal_rate": 0.7, "task_loss": 1.0, "task_accuracy": 0.1},
            "stack": {"refusal_rate": 0.85, "task_loss": 1.02, "task_accuracy": 0.1}}
    got = effect.targets(rows)
    assert got["sft keeps < 60% of the aligned refusal rate"]["passed"] is True
    ptst = next(v for k, v in got.items() if k.startswith("ptst"))
    strv = next(v for k, v in got.items() if k.startswith("str"))
    assert ptst["passed"] is True and strv["passed"] is False and strv["safety"] is False
    stack = next(v for k, v in got.items() if k.startswith("stack"))
    assert stack["beaten_by"] == ["str"] and stack["passed"] is False  # str has the lower loss
    rows["safety_mix"] = {"refusal_rate": 0.95, "task_loss": 1.1}
    rows["str"]["task_loss"] = 1.03
    stack = next(v for k, v in effect.targets(rows).items() if k.startswith("stack"))
    assert stack == {"beaten_by": [], "baselines_better_on_an_axis": ["safety_mix"],
                     "passed": True}


def test_headline_table_rows():
    effect = load_effect()
    table = effect.headline({
        "aligned": {"refusal_rate": 0.9, "refusal_ci": [0.8, 0.95], "task_loss": 1.3},
        "sft": {"refusal_rate": 0.45, "refusal_ci": [0.35, 0.55], "prefill_refusal_rate": 0.1,
                "over_refusal_rate": 0.2, "task_accuracy": 0.06, "task_loss": 0.8},
        "str": {"refusal_rate": 0.81, "refusal_ci": [0.7, 0.9], "task_loss": 0.88},
        "meta": {}, "targets": {}})
    lines = table.splitlines()
    assert len(lines) == 5
    assert lines[3] == "| sft | 45% [35, 55] | 50% | 10% | 20% | 6% | 0.800 |"
    assert lines[4] == "| str | 81% [70, 90] | 90% | — | — | — | 0.880 (+10.0%) |"
