"""A study cell that repairs another cell: planned after it, run, evaluated and reported."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_bench
from test_study import study_config

from stayaligned.config import ConfigError
from stayaligned.study import plan, run_study

REPAIR_CELL = (
    "cells=[{name: sft, methods: [sft]}, {name: sft+resta, repair: {of: sft, method: resta, "
    "strengths: [0, 1], target_kept: 0.0, task_holdout: 2, validation: {benchmarks: "
    "[{name: val-harm, source: demo-harmful, split: align, kind: harmful, limit: 3}], "
    "generation: {max_new_tokens: 3, batch_size: 4}}}}]")


@pytest.fixture(scope="module")
def repair_study(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("repair-study")
    cfg = study_config(root, tiny_model_dir, "study", REPAIR_CELL)
    assert run_study(cfg)["failed"] == []
    return cfg, root / "study"


def test_a_repair_cell_is_planned_after_its_cell(tmp_path, tiny_model_dir):
    keys = [s.key for s in plan(study_config(tmp_path, tiny_model_dir, "s", REPAIR_CELL))]
    assert keys[keys.index("cells/sft/depth") + 1:] == [
        "cells/sft+resta/repair", "cells/sft+resta/eval", "cells/sft+resta/depth"]
    bad = REPAIR_CELL.replace("of: sft", "of: nope")
    with pytest.raises(ConfigError, match="repair.of: 'nope' must name an earlier training cell"):
        plan(study_config(tmp_path, tiny_model_dir, "s", bad))


def test_a_repair_cell_runs_and_is_evaluated(repair_study, tiny_model_dir):
    from safetensors.torch import load_file

    from stayaligned.reports.report import summary_rows, write_report

    cfg, out = repair_study
    record = json.loads((out / "cells/sft+resta/repair/repair.json").read_text())
    assert record["method"] == "resta" and record["strength"] == 0.0  # weakest meets kept >= 0
    assert [p["strength"] for p in record["curve"]] == [0.0, 1.0]
    assert record["inputs"]["finetune"]["kind"] == "lora"
    assert record["inputs"]["base"]["path"].startswith(str(tiny_model_dir))
    assert [b["name"] for b in record["validation"]] == ["val-harm", "task-holdout"]
    held_out = [json.loads(line)["question"] for line in
                (out / "cells/sft+resta/repair/sweep/task_holdout.jsonl").read_text().splitlines()]
    trained = json.loads((out / "cells/sft/train/run.json").read_text())
    assert len(held_out) == 2 and not any(q in json.dumps(trained) for q in held_out)
    # beta = 0 is the fine-tune itself: the sft adapter merged into the aligned seed
    repaired = load_file(str(out / "cells/sft+resta/repair/model/model.safetensors"))
    from stayaligned.config import ModelConfig
    from stayaligned.models import load_model

    sft, _ = load_model(ModelConfig(name=str(out / "cells/sft/train")))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(repaired[name], sft.state_dict()[name], atol=1e-5)
    metrics = json.loads((out / "cells/sft+resta/eval/metrics.json").read_text())
    assert metrics["model"] == str(out / "cells/sft+resta/repair")
    rows = summary_rows(out)
    assert rows["sft+resta"]["refusal_rate"] == metrics["benchmarks"]["harm-plain"]["refusal_rate"]["value"]
    assert (write_report(out)[0]).is_file()


def test_bench_repair_effect_collects_the_repair_cells(repair_study, tmp_path):
    import yaml

    from stayaligned.config import to_dict

    cfg, out = repair_study
    module = load_bench("repair_effect")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    target = tmp_path / "repair_effect.json"
    assert module.main([str(config), "--output", str(target)]) == 0
    data = json.loads(target.read_text())
    assert set(data) == {"resta", "target", "meta"}
    row = data["resta"]
    metrics = json.loads((out / "cells/sft+resta/eval/metrics.json").read_text())["benchmarks"]
    aligned = json.loads((out / "aligned/eval/metrics.json").read_text())["benchmarks"]
    sft = json.loads((out / "cells/sft/eval/metrics.json").read_text())["benchmarks"]
    assert row["refusal_rate"] == metrics["harm-plain"]["refusal_rate"]["value"]
    a = aligned["harm-plain"]["refusal_rate"]["value"]
    assert row["kept"] == (None if a == 0 else row["refusal_rate"] / a)
    loss, ref = metrics["arith"]["task_loss"]["loss"], sft["arith"]["task_loss"]["loss"]
    assert row["task_loss"] == loss and row["task_loss_vs_sft"] == pytest.approx(loss / ref - 1)
    assert row["strength"] == 0.0 and row["knob"] == "beta"
    assert len(row["validation"]["curve"]) == 2 and row["status"] == "done"
    assert {"refusal_ci", "prefill_refusal_rate", "over_refusal_rate"} <= set(row)
    assert data["meta"]["command"].startswith("python bench/repair_effect.py")


def test_a_repair_made_from_other_weights_is_stale_not_reused(repair_study):
    """The repaired cell's fine-tune changed after the repair (retrained after an edit): the
    repair stage says so instead of counting as done."""
    from stayaligned.fingerprint import StaleError

    cfg, out = repair_study
    stage = next(s for s in plan(cfg) if s.key == "cells/sft+resta/repair")
    assert stage.done()
    adapter = out / "cells/sft/train/adapter/adapter_config.json"
    original = adapter.read_bytes()
    try:
        adapter.write_bytes(original.replace(b"{", b"{ ", 1))
        with pytest.raises(StaleError, match="made from other finetune weights"):
            stage.done()
    finally:
        adapter.write_bytes(original)
    assert stage.done()


def test_a_repair_counts_its_validation_as_the_benchmarks_it_resolved_to(
        repair_study, tiny_model_dir, monkeypatch):
    """A config that pins what a default gave when the repair ran is the same setup (no redo);
    one that relies on a default changed since is not (no silent reuse of a strength chosen on
    other prompts); other validation settings compare as written."""
    from stayaligned.repair import sweep

    cfg, out = repair_study
    root = out.parent

    def repair_stage(cells):
        study = study_config(root, tiny_model_dir, "study", cells)
        return next(s for s in plan(study) if s.key == "cells/sft+resta/repair")

    val_harm = ("{name: val-harm, source: demo-harmful, split: align, kind: harmful, "
                "limit: 3}")
    by_default = REPAIR_CELL.replace(f"benchmarks: [{val_harm}], ", "")
    assert by_default != REPAIR_CELL
    assert not repair_stage(by_default).done()  # the default is another benchmark
    default = {**sweep.DEFAULT_VALIDATION, "benchmarks": [
        {"name": "val-harm", "source": "demo-harmful", "split": "align", "kind": "harmful",
         "limit": 3}]}
    monkeypatch.setattr(sweep, "DEFAULT_VALIDATION", default)  # ... as it once was
    assert repair_stage(by_default).done()
    assert repair_stage(REPAIR_CELL).done()
    assert not repair_stage(REPAIR_CELL.replace("limit: 3}", "limit: 2}")).done()
    assert not repair_stage(REPAIR_CELL.replace("max_new_tokens: 3", "max_new_tokens: 4")).done()


def test_an_evaluation_of_a_remade_repair_is_not_reused(repair_study):
    """The repair cell is made again (here: its record changes, as when a wider sweep picks
    another strength into the same directory): its evaluation no longer counts as done, though
    the repaired weights file keeps its size and header."""
    cfg, out = repair_study
    stage = next(s for s in plan(cfg) if s.key == "cells/sft+resta/eval")
    assert stage.done()
    assert json.loads((out / "cells/sft+resta/eval/made_from.json").read_text())["record"]
    record = out / "cells/sft+resta/repair/repair.json"
    original = record.read_bytes()
    try:
        record.write_bytes(original.replace(b'"strength": 0.0', b'"strength": 1.0', 1))
        assert not stage.done()
    finally:
        record.write_bytes(original)
    assert stage.done()


def test_an_archived_repair_is_not_stale_when_its_fine_tune_was_retrained(tmp_path):
    """In a checkout without weights, the repaired cell retrained (one of its evaluations ran
    again) gives other weights than the archived run's: the archived repair, made from the
    fine-tune as it was then, is done like an archived fine-tune whose base was retrained
    (it failed on a StaleError on every run); with its own weights here it is still checked."""
    from stayaligned.config import StudyConfig, load, to_dict
    from stayaligned.fingerprint import StaleError
    from stayaligned.study import _add_repair, repair_config

    cfg = load(StudyConfig, None, [f"output_dir={tmp_path}", "align=null", REPAIR_CELL])
    cell = cfg.cells[1]
    stages = []
    _add_repair(cfg, tmp_path, stages, cell.name, cell, 0)
    rcfg = repair_config(cfg, tmp_path, cell.name, cell, 0)
    adapter = tmp_path / "cells/sft/train/adapter/adapter_model.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"retrained here")
    record = {"strength": 0.0, "config": to_dict(rcfg),
              "inputs": {"finetune": {"sha256": {str(adapter): "0" * 64}}}}  # the archived run's
    (tmp_path / "cells/sft+resta/repair").mkdir(parents=True)
    (tmp_path / "cells/sft+resta/repair/repair.json").write_text(json.dumps(record))
    assert stages[0].done()
    (tmp_path / "cells/sft+resta/repair/model").mkdir()
    (tmp_path / "cells/sft+resta/repair/model/model.safetensors").write_bytes(b"repaired")
    with pytest.raises(StaleError, match="made from other finetune weights"):
        stages[0].done()
