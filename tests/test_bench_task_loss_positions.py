"""bench/task_loss_positions.py: the task loss split by answer position reproduces the study's
own task loss on a finished tiny study, and its pieces add up; a virtual-mode LookAhead run is
recognised from its run.json."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench


def test_summarise_by_hand():
    bench = load_bench("task_loss_positions")
    got = bench.summarise([[1.0, 2.0, 3.0], [5.0]], first=2)
    assert [p["nll"] for p in got["positions"]] == [3.0, 2.0]
    assert [p["n"] for p in got["positions"]] == [2, 1]
    assert got["first"] == {"tokens": 2, "nll": 8.0 / 3, "n": 3}
    assert got["rest"] == {"nll": 3.0, "n": 1}
    assert got["total"] == {"nll": 11.0 / 4, "n": 4}


def test_virtual_prefix_read_from_run_json(tmp_path):
    bench = load_bench("task_loss_positions")
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"config": {"methods": ["lookahead"],
                                          "options": {"lookahead": {"mode": "virtual"}}}}))
    assert bench.virtual_prefix(str(tmp_path)) == "Let's solve this problem. "
    run.write_text(json.dumps({"config": {"methods": ["lookahead"], "options": {
        "lookahead": {"mode": "virtual", "prefix": "Sure. "}}}}))
    assert bench.virtual_prefix(str(tmp_path)) == "Sure. "
    run.write_text(json.dumps({"config": {"methods": ["lookahead"],
                                          "options": {"lookahead": {"mode": "real"}}}}))
    assert bench.virtual_prefix(str(tmp_path)) is None


def test_positions_reproduce_the_studys_task_loss(tmp_path, tiny_study):
    bench = load_bench("task_loss_positions")
    out = tmp_path / "positions.json"
    assert bench.main([str(tiny_study), "--cells", "sft", "--first", "2",
                       "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"aligned", "sft"}
    for label, entry in data["models"].items():
        recorded = json.loads((tiny_study / ("aligned" if label == "aligned" else
                                             f"cells/{label}") / "eval" / "task_loss.json"
                               ).read_text())["arith"]["result"]
        assert entry["total"]["nll"] == pytest.approx(recorded["loss"], rel=1e-6)
        assert entry["total"]["n"] == recorded["tokens"]
        first, rest = entry["first"], entry["rest"]
        assert first["n"] + rest["n"] == entry["total"]["n"]
        assert (first["nll"] * first["n"] + rest["nll"] * rest["n"]) / entry["total"]["n"] == \
            pytest.approx(entry["total"]["nll"])
        assert "after_prefix" not in entry
