"""bench/effect_v2.py: effect_v2.json from a finished (synthetic) v2 study has the issue's keys,
per template, per seed, per judge and per dose; the dry run lists the v2 study's stages with a
compute estimate built from v1's measured seconds per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench
from study_factory import N_HARM, REFUSAL, SAFE, make_study

ROOT = Path(__file__).resolve().parents[1]


def load_effect_v2():
    return load_bench("effect_v2")


def test_effect_v2_json_has_the_issue_keys(tmp_path):
    effect = load_effect_v2()
    study = make_study(tmp_path / "study")
    out = tmp_path / "effect_v2.json"
    assert effect.main([str(study), "--output", str(out), "--report", str(tmp_path / "r")]) == 0
    data = json.loads(out.read_text())
    assert {"sft", "sft-safe", "ptst", "str", "per_template", "seeds", "judge", "dose",
            "targets", "meta"} <= set(data)
    for cell in ("sft", "sft-safe", "ptst", "str"):
        assert {"kept", "kept_ci", "kept_vs_sft_ci", "task_loss", "prefill_refusal_rate",
                "over_refusal_rate"} <= set(data[cell])
        assert data[cell]["judge"] == "classifier"
    ptst = data["ptst"]
    aligned = round(REFUSAL["aligned"][SAFE] * N_HARM)
    assert ptst["template"] == SAFE
    assert ptst["kept"] == pytest.approx(REFUSAL["ptst"][SAFE] * N_HARM / aligned)
    assert ptst["kept_ci"][0] < ptst["kept"] < ptst["kept_ci"][1]
    assert ptst["kept_vs_sft_ci"][0] > 0
    assert data["sft"]["kept_vs_sft_ci"] is None  # the reference
    assert data["str"]["task_accuracy"] == pytest.approx(0.4)
    assert data["str"]["task_accuracy_vs_sft"] == pytest.approx(0.2)
    lo, hi = data["str"]["task_accuracy_ci"]
    assert lo < 0.4 < hi and data["seeds"]["str"]["1"]["task_accuracy"] == pytest.approx(0.4)
    assert data["per_template"][SAFE]["str"]["task_accuracy"] == pytest.approx(0.4)
    assert data["per_template"][SAFE]["aligned"]["task_accuracy"] == pytest.approx(0.2)
    assert data["per_template"]["native"]["ptst"]["kept"] == pytest.approx(
        REFUSAL["ptst"]["native"] * N_HARM / round(REFUSAL["aligned"]["native"] * N_HARM))
    assert set(data["seeds"]["str"]) == {"0", "1", "2"}
    assert data["seeds"]["str"]["0"]["refusal_rate"] == pytest.approx(0.7)
    assert data["judge"]["headline"] == "classifier" and data["judge"]["others"] == ["keyword"]
    harm = next(a for a in data["judge"]["agreement"] if a["benchmark"] == "harm")
    assert harm["agreement"] == pytest.approx(0.95)
    assert [p["run"] for p in data["dose"]["cells"]["sft"]] == ["sft-seed0", "sft-lr0.0002"]
    sft_dose = data["dose"]["cells"]["sft"][1]
    assert sft_dose["task_loss_gain"] == pytest.approx(1.3 - 0.6)
    assert data["targets"]["sft keeps < 80%, its interval below the seed's 100%"]["passed"]
    assert data["meta"]["pooling"].startswith("mean over seeds and items")
    assert data["meta"]["retrained"] == []  # every model made once, from one set of weights
    assert (tmp_path / "r" / "report.md").read_text().startswith("# Study report: fake-v2\n\n| Method |")


def test_best_recipe_target_counts_repair_cells(tmp_path):
    """A repair cell is a recipe whatever its name (v2's are sft+merge, sft+resta, ...)."""
    effect = load_effect_v2()
    data = effect.summarise(str(make_study(tmp_path / "study", repair=True)))  # no report
    assert data["sft+merge"]["repair"] == "merge" and data["sft"]["repair"] is None
    best = next(v for k, v in data["targets"].items() if k.startswith("best recipe"))
    aligned = round(REFUSAL["aligned"]["native"] * N_HARM)
    assert best["best"] == "sft+merge"
    assert best["kept"] == pytest.approx(REFUSAL["sft+merge"]["native"] * N_HARM / aligned)
    # kept 84% < 95%: the target is decided (not None) and missed
    assert best["passed"] is False


def test_dry_run_lists_the_v2_stages_with_an_estimate(capsys):
    effect = load_effect_v2()
    # the deep align config comes from issue 14 part 1; the plain one stands in for the listing
    summary = effect.dry_run(str(ROOT / "configs/study/embedded_gsm8k_v2.yaml"),
                             ["align.config=configs/align/shared_safety.yaml",
                              "output_dir=/nonexistent/v2"], str(ROOT / "bench/results/effect.json"))
    printed = capsys.readouterr().out
    # (seed + aligned + 14 cells x 3 seeds) x 2 templates + 6 dose runs x 1, each with a
    # keyword re-judging; 36 trainings; 4 repairs x 3 seeds; 48 depths; one align
    assert summary["stages"] == 94 + 94 + 36 + 12 + 48 + 1
    assert "cells/sft+resta-seed1/repair" in printed
    assert "cells/ptst-seed2/eval-native-safe/judge-keyword" in printed
    assert "cells/str-lr0.0002/train" in printed and "cells/str-lr0.0001" not in printed
    meta = json.loads((ROOT / "bench/results/effect.json").read_text())["meta"]
    v1 = meta["first_run_stage_seconds"]
    ptst_train = v1["cells/ptst/train"] / 80 * 80 * effect.FULL_FT_FACTOR
    line = next(x for x in printed.splitlines() if x.startswith("cells/sft-seed0/train "))
    assert f"{ptst_train / 60:.1f} min" in line
    assert 5 < summary["hours"] < 60
