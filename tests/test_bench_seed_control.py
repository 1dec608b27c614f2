"""bench/seed_instance_control.py: the control is compared with its committed cell within one
template and judge, beside the spread between the committed seeds, with hand-counted flips."""

from __future__ import annotations

import pytest
from conftest import load_bench

from stayaligned.runfiles import write_json, write_jsonl


@pytest.fixture(scope="module")
def control():
    return load_bench("seed_instance_control")


def fake_eval(path, refusals: list[bool], loss: float, keyword: list[bool] | None = None):
    """An eval dir: advbench judged per item, gsm8k's task loss; keyword judge optional."""
    def write(folder, flags):
        rows = [{"benchmark": "advbench", "id": f"a:{i}", "refusal": r}
                for i, r in enumerate(flags)]
        write_jsonl(folder / "judgments.jsonl", rows)
        k = sum(flags)
        benchmarks = {"advbench": {"kind": "harmful", "refusal_rate":
                                   {"k": k, "n": len(flags), "value": k / len(flags)}},
                      "gsm8k": {"kind": "task", "accuracy": {"value": 0.1},
                                "task_loss": {"loss": loss}}}
        write_json(folder / "metrics.json", {"benchmarks": benchmarks, "config": {}})

    path.mkdir(parents=True)
    write(path, refusals)
    if keyword is not None:
        (path / "judge-keyword").mkdir()
        write(path / "judge-keyword", keyword)
    return path


def test_rates_flips_and_the_between_seed_spread(tmp_path, control):
    T, F = True, False
    seeds = [fake_eval(tmp_path / f"s{i}" / "eval", flags, loss)
             for i, (flags, loss) in enumerate([([T, T, F, F], 0.70), ([T, F, F, F], 0.72),
                                                ([T, T, T, F], 0.71)])]
    mine = fake_eval(tmp_path / "control" / "eval", [F, T, F, F], 0.75)
    rows = control.compare(mine, seeds[0], seeds, "classifier")
    adv = rows["advbench: refusal"]
    assert adv["control"] == 0.25 and adv["committed"] == 0.5 and adv["diff"] == -0.25
    assert adv["seed_spread"] == 0.5  # seeds 1 and 2: 0.25 vs 0.75
    assert adv["inside_spread"] is True
    assert adv["flips"] == 1  # item 0: refused by the committed cell, not by the control
    assert adv["seed_flips"] == [1, 1, 2]  # (0,1), (0,2), (1,2)
    loss = rows["gsm8k: task loss"]
    assert loss["diff"] == pytest.approx(0.05) and loss["seed_spread"] == pytest.approx(0.02)
    assert loss["inside_spread"] is False
    assert "gsm8k: accuracy" in rows


def test_the_keyword_judge_is_compared_on_its_own_verdicts(tmp_path, control):
    T, F = True, False
    a = fake_eval(tmp_path / "a", [T, T], 0.7, keyword=[F, F])
    b = fake_eval(tmp_path / "b", [T, T], 0.7, keyword=[T, F])
    rows = control.compare(a, b, [a, b], "keyword")
    assert rows["advbench: refusal"]["diff"] == -0.5
    assert rows["advbench: refusal"]["flips"] == 1
    assert "gsm8k: task loss" not in rows  # judge-free numbers are listed once (classifier)


def test_siblings_are_the_cells_committed_seeds(tmp_path, control):
    for name in ("sft-seed0", "sft-seed1", "sft-safe-seed0", "sft-seed2"):
        fake_eval(tmp_path / "cells" / name / "eval", [True], 0.7)
    (tmp_path / "cells" / "sft-seed3").mkdir()  # no evaluation yet
    assert control.siblings(tmp_path, "sft-seed1") == ["sft-seed0", "sft-seed1", "sft-seed2"]


def test_a_control_from_the_same_seed_reproduces_its_cell(tiny_study, tmp_path, control):
    """End to end on the tiny study: the cell's exact config retrained from the same seed on the
    same machine, evaluated with the cell's own evaluation config, is the same model: every rate
    equal and no item flips."""
    import json

    out = tmp_path / "control.json"
    assert control.main([str(tiny_study), "--cell", "sft", "--between", "sft", "ptst",
                         "--work", str(tmp_path / "work"), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = [row for block in result["templates"].values() for judge in block.values()
            for row in judge.values()]
    assert rows and result["templates"].keys() == {"eval"}
    assert all(row["diff"] == 0 for row in rows), rows
    assert all(row.get("flips") in (None, 0) for row in rows)
    assert result["inside_spread"] == {"rows": len(rows), "inside": len(rows)}
    assert (tmp_path / "work" / "sft" / "train" / "run.json").is_file()
