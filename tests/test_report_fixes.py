"""The review's report findings (cost per step, a resumed repair's time, missing seeds, the
recommendation's loss axis, pooled kappa, redo stages in the estimate, the loss SEM and the
stage counts), each on the synthetic study of tests/study_factory.py."""

from __future__ import annotations

import json
import shutil

import pytest
from study_factory import N_HARM, REFUSAL, make_study

from stayaligned.reports import pooling
from stayaligned.reports.headline import Headline, headline_rows, recommendation
from stayaligned.reports.study_files import load_study


def _rows(root, overhead=None):
    return {r.cell: r for r in headline_rows(load_study(root), overhead)}


# ---------------------------------------------------------------- 1. cost per step


def test_cost_per_step_is_seconds_per_step_not_the_throughput_ratio(tmp_path):
    """An overhead bench without `step_ratio` (the committed one) gives the step seconds over
    sft's, not `time_ratio` (sft's tokens/s over the method's); an entry with neither is not
    shown as a per-step cost."""
    root = make_study(tmp_path / "study")
    overhead = {"sft": {"time_ratio": 1.0, "step_s_median": 2.0},
                "str": {"time_ratio": 0.8, "step_s_median": 3.0},
                "ptst": {"time_ratio": 0.9}, "meta": {}}
    rows = _rows(root, overhead)
    assert rows["str"].cost == "×1.50 (3.0 s, bench)"
    assert rows["ptst"].cost == "×1.00 (1.0 s)"  # this study's own times, not ×0.90
    from stayaligned.reports.report import write_report

    write_report(root, overhead=None)
    assert "not a token-throughput ratio" in (root / "report.md").read_text()


# ---------------------------------------------------------------- 2. a resumed repair


def _sweep(root, seed: int, seconds: dict) -> None:
    for name, value in seconds.items():
        folder = root / "cells" / f"sft+merge-seed{seed}" / "repair" / "sweep" / name / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"seconds": value}))


def test_a_repair_timed_on_its_last_attempt_only_is_left_out_of_the_mean(tmp_path):
    """Seed 2's repair resumed and reused validation evaluations (their seconds 0.0): its
    300 s is the last attempt, so the mean is seeds 0 and 1's, and the note says why."""
    root = make_study(tmp_path / "study", repair=True)
    for seed in (0, 1):
        _sweep(root, seed, {"aligned": 50.0, "0.5": 40.0})
    _sweep(root, 2, {"aligned": 0.0, "0.5": 0.0, "1": 30.0})
    row = _rows(root)["sft+merge"]
    assert row.cost.endswith("+ merge 150 s once (2 of 3 seeds)")
    assert row.cost_notes == ["sft+merge: seed 2's repair was resumed and timed its last "
                              "attempt only (300 s; 2 of 3 validation evaluations reused from "
                              "an earlier attempt): left out of the mean"]
    from stayaligned.reports.report import write_report

    write_report(root)
    markdown = (root / "report.md").read_text()
    assert "left out of the mean" in markdown.split("\n## ", 1)[0]
    assert "300 s (last attempt only: 2 of 3 validation evaluations reused)" in markdown


def test_a_recorded_total_and_cpu_seconds_are_used(tmp_path):
    """repair.json's seconds_total (with earlier attempts) counts in full; CPU seconds from
    progress.json stand beside the wall time, and the note says the wall time was shared."""
    root = make_study(tmp_path / "study", repair=True)
    _sweep(root, 2, {"aligned": 0.0})
    path = root / "cells" / "sft+merge-seed2" / "repair" / "repair.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "seconds_total": 900.0}))
    (root / "progress.json").write_text(json.dumps({
        f"cells/sft+merge-seed{s}/repair": {"kind": "repair", "status": "done",
                                           "seconds": 100.0 * (s + 1), "cpu_seconds": 50.0}
        for s in (0, 1, 2)}))
    study = json.loads((root / "study.json").read_text())
    study["config"]["workers"] = 2
    (root / "study.json").write_text(json.dumps(study))
    row = _rows(root)["sft+merge"]
    # (100 + 200 + 900) / 3; CPU only for the seeds timed in one attempt: 0 and 1 of 3
    assert row.cost.endswith("+ merge 400 s once") and not row.cost_notes
    path.write_text(json.dumps({**json.loads(path.read_text()), "seconds_total": 300.0}))
    assert _rows(root)["sft+merge"].cost.endswith("+ merge 200 s once (CPU 50 s)")
    from stayaligned.reports.report import write_report

    write_report(root)
    assert "shared between 2 workers" in (root / "report.md").read_text()


# ---------------------------------------------------------------- 3. missing seeds


def test_a_cell_is_compared_with_sfts_runs_of_the_same_seeds(tmp_path):
    """sft's seed 2 not evaluated: str (seeds 0, 1, 2) is compared with sft's seeds 0 and 1,
    paired seed by seed, for the kept share, over-refusal and task loss; sft pools 2 seeds."""
    from stayaligned.reports.headline import matrices, per_seed

    root = make_study(tmp_path / "study")
    for folder in (root / "cells" / "sft-seed2").glob("eval*"):
        shutil.rmtree(folder)
    study = load_study(root)
    rows = {r.cell: r for r in headline_rows(study)}
    aligned = round(REFUSAL["aligned"]["native"] * N_HARM)
    str_01 = [round((REFUSAL["str"]["native"] + o) * N_HARM) for o in (-0.05, 0.0)]
    sft_01 = [round((REFUSAL["sft"]["native"] + o) * N_HARM) for o in (-0.05, 0.0)]
    row = rows["str"]
    assert row.kept_vs_sft.value == pytest.approx((sum(str_01) - sum(sft_01)) / 2 / aligned)
    assert row.kept_vs_sft.seeds == 2 and row.over_refusal_vs_sft.seeds == 2
    assert row.task_loss_vs_sft == pytest.approx((0.75 - 0.0025) / (0.70 - 0.0025) - 1)
    # the interval: the bootstrap of the same-seed matrices, paired seed by seed
    runs = {g: [m for m in study.cells if m.group == g] for g in ("str", "sft")}
    al = next(m for m in study.models if m.label == "aligned")
    ids = sorted(per_seed([al], "native", "classifier", "harm")[al.label])
    mats = [matrices(runs[g], "native", "classifier", "harm", ids, [0, 1])[0]
            for g in ("str", "sft")]
    same = pooling.kept_difference(*mats, matrices([al], "native", "classifier", "harm", ids)[0])
    assert (row.kept_vs_sft.low, row.kept_vs_sft.high) == (same.low, same.high)
    assert rows["sft"].seeds == [0, 1] and rows["str"].seeds == [0, 1, 2]
    assert any("seed(s) 0, 1 only" in n for n in row.seed_notes)
    assert any("pooled over 2 of 3 seeds (seed 2" in n for n in rows["sft"].seed_notes)


def test_effect_v2_reports_the_seeds_pooled(tmp_path):
    from test_bench_effect_v2 import load_effect_v2

    root = make_study(tmp_path / "study")
    for folder in (root / "cells" / "sft-seed2").glob("eval*"):
        shutil.rmtree(folder)
    data = load_effect_v2().summarise(str(root))
    assert data["sft"]["seeds"] == 2 and data["sft"]["seeds_configured"] == 3
    assert data["str"]["seeds"] == 3 and data["str"]["notes"]
    from stayaligned.reports.report import write_report

    write_report(root)
    assert "Pooled over 3 seed(s) (sft: 2 of 3" in (root / "report.md").read_text()


# ---------------------------------------------------------------- 4. the recommendation's front


def test_the_front_uses_the_task_loss_relative_to_sft_under_the_same_template():
    """ptst (read under native:safe, where sft's loss is higher) has the same kept share as X
    and a smaller loss than X relative to sft, but a higher raw loss: ptst is on the front."""
    def kept(v):
        return pooling.Pooled(v, v - 0.05, v + 0.05, 3, 200)

    rows = [Headline("sft", "native", "keyword", [], kept=kept(0.61), task_loss=0.70484,
                     aligned_task_loss=1.28),
            Headline("X", "native", "keyword", [], kept=kept(0.90), task_loss=0.70484 * 1.0017,
                     task_loss_vs_sft=0.0017, aligned_task_loss=1.28),
            Headline("ptst", "native:safe", "keyword", [], kept=kept(0.90),
                     task_loss=0.70627 * 1.0005, task_loss_vs_sft=0.0005,
                     aligned_task_loss=1.31)]
    front = recommendation(rows).split(" are ", 1)[1].split(". ", 1)[0]
    assert front.startswith("ptst (") and "X (" not in front


# ---------------------------------------------------------------- 5. kappa


def test_kappa_is_given_per_model_and_template_and_the_pooled_one_is_labelled(tmp_path):
    from stayaligned.evaluation.judges.compare import cohen_kappa
    from stayaligned.reports.report import write_report
    from stayaligned.reports.sections import judge_agreement

    root = make_study(tmp_path / "study")
    study = load_study(root)
    harm = next(a for a in judge_agreement(study) if a["benchmark"] == "harm")
    kappas = []
    for m in study.models:
        for t in ("native", "native:safe"):
            a, b = m.view(t, "classifier"), m.view(t, "keyword")
            if a and b:
                ids = sorted(a.verdicts["harm"])
                kappas.append(cohen_kappa([a.verdicts["harm"][i] for i in ids],
                                          [b.verdicts["harm"][i] for i in ids]))
    import statistics

    assert harm["kappa_per_view"]["median"] == pytest.approx(statistics.median(kappas))
    assert harm["kappa_per_view"]["views"] == len(kappas)
    assert (harm["kappa_per_view"]["min"], harm["kappa_per_view"]["max"]) == (
        pytest.approx(min(kappas)), pytest.approx(max(kappas)))
    assert "kappa" not in harm and "kappa_pooled" in harm
    write_report(root)
    markdown = (root / "report.md").read_text()
    assert "Cohen's κ pooled over models and templates" in markdown
    assert "Cohen's κ per model × template: median (range, views)" in markdown


# ---------------------------------------------------------------- 6. the estimate


def test_a_stage_to_redo_is_time_left_not_measured():
    from types import SimpleNamespace as S

    from test_bench_effect_v2 import load_effect_v2

    from stayaligned.config import StudyConfig

    effect = load_effect_v2()
    cfg = StudyConfig(eval_templates=("native",))
    stages = [S(key="cells/sft-seed0/eval", kind="eval", cell="sft-seed0")]
    v1 = {"stage_seconds": {"cells/ptst/eval": 600.0, "cells/ptst/train": 700.0},
          "config": {"eval": {"benchmarks": [{"name": "advbench", "limit": 100}]}}}
    for status, measured in (("done", True), ("redo", False), ("failed", False)):
        state = {"cells/sft-seed0/eval": {"kind": "eval", "status": status, "seconds": 555.0}}
        (_, _, seconds, basis), = effect.estimate(cfg, stages, state, v1)
        assert basis.startswith("measured") is measured and seconds == 555.0, status


# ---------------------------------------------------------------- 7. cosmetic


def test_the_pooled_loss_sem_is_named_between_seeds(tmp_path):
    from stayaligned.reports.groups import group_loss

    study = load_study(make_study(tmp_path / "study"))
    runs = [m for m in study.cells if m.group == "str"]
    pooled = group_loss(runs, "arith")
    assert "per_example_sem" not in pooled and pooled["between_seed_sem"] > 0
    assert group_loss(runs[:1], "arith")["per_example_sem"] == 0.01  # one run: as evaluated


def test_stage_counts_bucket_redo_and_started_stages(tmp_path):
    from stayaligned.reports.report import _stage_counts

    root = make_study(tmp_path / "study", repair=True)
    manifest = json.loads((root / "study.json").read_text())
    manifest["stages"] = ["cells/sft-seed0/eval", "cells/sft-seed1/eval",
                          "cells/sft+merge-seed0/repair", "cells/nope/train"]
    (root / "study.json").write_text(json.dumps(manifest))
    (root / "progress.json").write_text(json.dumps({
        "cells/sft-seed0/eval": {"status": "done"}, "cells/sft-seed1/eval": {"status": "redo"}}))
    assert _stage_counts(load_study(root)) == (
        "1 of 4 stages done; 1 to run again (redo); started, not finished: "
        "cells/sft+merge-seed0/repair; 1 not run.")


def test_the_safety_utility_front_names_its_template(tmp_path):
    from stayaligned.reports.report import write_report

    root = make_study(tmp_path / "study")
    write_report(root)
    text = (root / "report.md").read_text()
    assert ("Every cell is read here under native (each model's eval/), while the headline's "
            "recommendation reads each cell under its own test template (ptst under "
            "native:safe, sft-safe under native:safe)") in text
