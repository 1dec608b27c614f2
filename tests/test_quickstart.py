"""`stayaligned quickstart`: its study orchestration on a tiny model (summary.json's structure and
values, the report, a second run that reuses every stage), and the reading generated from the
numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stayaligned.quickstart import (
    ROWS,
    findings,
    reading,
    recipe_cell,
    run_quickstart,
    study_config,
)

RATES = ("refusal_rate", "prefill_refusal_rate", "over_refusal_rate", "task_accuracy")


def tiny_overrides(model_dir) -> list[str]:
    return [
        f"model.name={model_dir}",
        "align.data=[{source: demo-safety, limit: 8}]",
        "align.optim={max_steps: 2, batch_size: 4}",
        "align.lora={r: 2, alpha: 4, target_modules: [q_proj]}",
        "train.data.0.limit=12",
        "train.optim={max_steps: 3, batch_size: 4, lr: 1.0e-2}",
        "train.lora={r: 2, alpha: 4, target_modules: [q_proj]}",
        "train.save_steps=2", "train.logging_steps=1",
        "cells.1.options.safety_mix.n=4",
        "eval.benchmarks.0.limit=6", "eval.benchmarks.1.limit=5", "eval.benchmarks.2.limit=4",
        "eval.benchmarks.2.max_new_tokens=6",
        "eval.generation={max_new_tokens: 4, batch_size: 8}",
    ]


def test_the_bundled_study_config():
    cfg = study_config("runs/x")
    assert cfg.output_dir == "runs/x" and cfg.align is not None and cfg.evaluate_seed
    assert [c.name for c in cfg.cells] == ["sft", "recipe"]
    assert cfg.cells[0].methods == ("sft",)
    assert recipe_cell(cfg).methods == ("safety_mix",)
    names = [b["name"] for b in cfg.eval["benchmarks"]]
    assert names == ["harmful (held-out)", "benign (over-refusal)", "arithmetic"]
    harmful, benign, _ = cfg.eval["benchmarks"]
    assert harmful["source"] == "demo-harmful" and harmful["split"] == "eval"
    assert harmful["prefill_k"] == [0, 3] and benign["source"] == "demo-benign"


def test_quickstart_orchestration_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "quickstart"
    summary = run_quickstart(out, overrides=tiny_overrides(tiny_model_dir))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert list(on_disk["rows"]) == list(ROWS)
    sizes = {"refusal_rate": 6, "prefill_refusal_rate": 6, "over_refusal_rate": 5,
             "task_accuracy": 4}
    for name, row in on_disk["rows"].items():
        for key in RATES:
            rate = row[key]
            assert set(rate) == {"k", "n", "value", "low", "high"}, (name, key)
            assert rate["n"] == sizes[key] and 0 <= rate["k"] <= rate["n"]
            assert rate["value"] == pytest.approx(rate["k"] / rate["n"])
            assert rate["low"] <= rate["value"] <= rate["high"]
        assert row["task_loss"]["n"] == 4 and row["task_loss"]["loss"] > 0
    # the rows are the study's own stage files, not copies that could drift
    stage = {"seed": "seed/eval", "aligned": "aligned/eval", "sft": "cells/sft/eval",
             "recipe": "cells/recipe/eval"}
    for name, key in stage.items():
        bench = json.loads((out / key / "metrics.json").read_text())["benchmarks"]
        assert on_disk["rows"][name]["refusal_rate"] == bench["harmful (held-out)"]["refusal_rate"]
        assert on_disk["rows"][name]["prefill_refusal_rate"] == \
            bench["harmful (held-out) [prefill k=3]"]["refusal_rate"]
    assert on_disk["recipe"]["methods"] == ["safety_mix"]
    assert on_disk["recipe"]["options"] == {"safety_mix": {"source": "demo-safety", "n": 4}}
    manifest = json.loads((out / "cells" / "recipe" / "train" / "run.json").read_text())
    assert manifest["config"]["methods"] == ["safety_mix"]
    report = out / "report.html"
    assert on_disk["report"] == str(report) and "recipe" in report.read_text()
    assert on_disk["reading"].startswith("Alignment took refusal")
    assert f"{100 * on_disk['rows']['sft']['task_accuracy']['value']:.0f}%" in on_disk["reading"]

    # a second run reuses every stage: no training, no evaluation
    from stayaligned.evaluation import run as eval_run
    from stayaligned.training import run as train_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(eval_run, "evaluate", refuse)
    monkeypatch.setattr(train_run, "train", refuse)
    again = run_quickstart(out, overrides=tiny_overrides(tiny_model_dir))
    assert again["rows"] == summary["rows"]
    assert again["stage_seconds"] == summary["stage_seconds"]
    assert set(summary["stage_seconds"]) == {"seed/eval", "aligned/train", "aligned/eval",
                                             *(f"cells/{c}/{s}" for c in ("sft", "recipe")
                                               for s in ("train", "eval"))}


def _rate(k: int, n: int) -> dict:
    from stayaligned.evaluation.metrics import rate

    return rate([True] * k + [False] * (n - k)).to_dict()


def _rows(aligned: int, sft: int, recipe: int, sft_acc: int, recipe_acc: int,
          over: tuple = (20, 20, 20)) -> dict:
    def row(refusal, accuracy, benign=20):
        return {"refusal_rate": _rate(refusal, 110), "prefill_refusal_rate": _rate(10, 110),
                "over_refusal_rate": _rate(benign, 60), "task_accuracy": _rate(accuracy, 50),
                "task_loss": {"loss": 0.5, "tokens": 900, "n": 50, "per_example_sem": 0.02}}

    return {"seed": row(2, 1), "aligned": row(aligned, 2, over[0]),
            "sft": row(sft, sft_acc, over[1]), "recipe": row(recipe, recipe_acc, over[2])}


def test_findings_and_reading_follow_the_numbers():
    good = findings(_rows(aligned=100, sft=50, recipe=95, sft_acc=20, recipe_acc=18))
    assert good["sft_eroded"] and good["target_met"]
    assert good["recipe_kept"] == pytest.approx(0.95) and good["sft_kept"] == pytest.approx(0.5)
    summary = {"rows": _rows(100, 50, 95, 20, 18), "findings": good, "prefill_k": 3,
               "recipe": {"methods": ["safety_mix"]}}
    text = reading(summary)
    assert "91%" in text and "45%" in text and "95% of the aligned rate" in text
    assert "intervals apart" in text and "misses" not in text
    # too little kept, and accuracy below sft's interval: both said
    bad = findings(_rows(aligned=100, sft=50, recipe=80, sft_acc=20, recipe_acc=5))
    assert not bad["target_met"] and not bad["recipe_accuracy_within_sft_interval"]
    text = reading({**summary, "rows": _rows(100, 50, 80, 20, 5), "findings": bad})
    assert "misses the quickstart's target" in text and "below the sft interval" in text
    # no erosion beyond noise: said, not hidden
    mild = findings(_rows(aligned=100, sft=95, recipe=99, sft_acc=20, recipe_acc=20))
    assert not mild["sft_eroded"]
    assert "overlap" in reading({**summary, "rows": _rows(100, 95, 99, 20, 20), "findings": mild})
    # refusing everything: keeps the harmful refusals but over-refuses benign prompts far more
    # than the aligned seed (20 -> 55 of 60): not a success, and said
    rows = _rows(100, 50, 95, 20, 18, over=(20, 10, 55))
    blanket = findings(rows)
    assert blanket["recipe_over_refusal_above_aligned"] and not blanket["target_met"]
    text = reading({**summary, "rows": rows, "findings": blanket})
    assert "refusing more of everything" in text and "over-refuses more than the aligned" in text
    # more than sft but not more than the aligned seed: said, target still met
    rows = _rows(100, 50, 95, 20, 18, over=(30, 10, 30))
    between = findings(rows)
    assert between["recipe_over_refusal_above_sft"] and between["target_met"]
    assert "than plain sft" in reading({**summary, "rows": rows, "findings": between})


def test_quickstart_cli_passes_overrides_to_the_study(monkeypatch):
    """`stayaligned quickstart --output D KEY=VALUE ...` reaches run_quickstart's overrides (how
    bench/overhead.py's fp32 arm is run: `stayaligned quickstart model.precision=fp32`)."""
    import stayaligned.quickstart as qs
    from stayaligned.cli import main

    seen = {}
    monkeypatch.setattr(qs, "run_quickstart",
                        lambda output, **kw: seen.update(output=output, **kw) or {})
    assert main(["quickstart", "--output", "runs/x", "model.precision=fp32"]) == 0
    assert str(seen["output"]) == "runs/x" and list(seen["overrides"]) == ["model.precision=fp32"]
    cfg = qs.study_config(Path("runs/x"), seen["overrides"])
    assert cfg.model.precision == "fp32"
    monkeypatch.setattr(qs, "native_bf16", lambda: True)
    assert qs.study_config(Path("runs/x")).model.precision == "bf16"  # the bundled choice


def test_quickstart_runs_in_fp32_where_bf16_would_be_emulated(monkeypatch):
    """The bundled bf16 is a time lever only where the device multiplies in bf16 natively; on a
    CPU without avx512_bf16 / AMX it is 8.5-16x slower than fp32 (bench/results/
    cpu_bf16_kernels.json), so the quickstart runs in fp32 there, unless the command line asks."""
    import stayaligned.precision as precision
    import stayaligned.quickstart as qs

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None, n=native: n)
        assert qs.study_config(Path("runs/x")).model.precision == expected
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: False)
    assert qs.study_config(Path("runs/x"), ["model.precision=bf16"]).model.precision == "bf16"
    assert qs.study_config(Path("runs/x"), ["model.precision = pure_bf16"]).model.precision \
        == "pure_bf16"
