"""The v2 report on a synthetic finished study (tests/study_factory.py): the headline table is
the first table, kept shares are computed within one template (PTST under its safe template,
against the aligned seed and sft under that same template), never across templates, seeds are
pooled, the two judges' agreement is reported, and the dose curves are drawn."""

from __future__ import annotations

import re

import pytest
from study_factory import N_HARM, REFUSAL, SAFE, make_study

from stayaligned.reports.headline import headline_rows, recommendation
from stayaligned.reports.report import write_report
from stayaligned.reports.study_files import load_study


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    root = make_study(tmp_path_factory.mktemp("v2") / "study")
    write_report(root)
    return root


def _rows(root):
    return {r.cell: r for r in headline_rows(load_study(root))}


def test_headline_table_is_first_and_has_every_fine_tune(v2):
    markdown = (v2 / "report.md").read_text()
    first_table = markdown.split("\n\n| ", 1)[1]
    assert first_table.startswith("Method | Tested with | Kept share [95% CI] (classifier) | "
                                  "Kept (keyword) | Kept − sft [95% CI] | Prefill k=3 refusal")
    assert markdown.index("| Method |") < markdown.index("\n## ")
    body = markdown.split("| Method |", 1)[1].split("\n\n", 1)[0]
    assert [line.split(" | ")[0].lstrip("| ") for line in body.splitlines()[2:]] == [
        "sft", "sft-safe", "ptst", "str"]
    assert "Recommendation (computed from the table)" in markdown.split("\n## ", 1)[0]
    html = (v2 / "report.html").read_text()
    assert "<th>Method</th>" in html.split("<table", 2)[1]


def test_kept_share_is_within_one_template_and_pooled_over_seeds(v2):
    rows = _rows(v2)
    # PTST is read under its own test template: ptst, the aligned seed and sft all under it
    ptst = rows["ptst"]
    assert ptst.template == SAFE and rows["sft"].template == "native"
    seeds = [round((REFUSAL["ptst"][SAFE] + o) * N_HARM) for o in (-0.05, 0.0, 0.05)]
    aligned = round(REFUSAL["aligned"][SAFE] * N_HARM)
    assert ptst.kept.value == pytest.approx(sum(seeds) / 3 / aligned)  # mean over seeds / aligned
    sft_safe = [round((REFUSAL["sft"][SAFE] + o) * N_HARM) for o in (-0.05, 0.0, 0.05)]
    assert ptst.kept_vs_sft.value == pytest.approx((sum(seeds) - sum(sft_safe)) / 3 / aligned)
    assert ptst.kept_vs_sft.low > 0 and ptst.kept.seeds == 3 and ptst.kept.items == N_HARM
    sft = rows["sft"]
    sft_native = [round((REFUSAL["sft"]["native"] + o) * N_HARM) for o in (-0.05, 0.0, 0.05)]
    assert sft.kept.value == pytest.approx(sum(sft_native) / 3 / round(0.9 * N_HARM))
    assert rows["str"].task_loss_vs_sft == pytest.approx(0.75 / 0.70 - 1)


def test_task_accuracy_is_pooled_from_the_items_and_compared_with_sft(v2):
    """GSM8K-like exact match: the per-item `correct` of judgments.jsonl, pooled over seeds
    like a rate, in the headline table beside the task loss."""
    rows = _rows(v2)
    assert rows["sft"].task_accuracy.value == pytest.approx(0.2)
    assert rows["str"].task_accuracy.value == pytest.approx(0.4)
    assert rows["str"].task_accuracy.items == 10 and rows["str"].task_accuracy.seeds == 3
    assert rows["str"].task_accuracy_vs_sft.value == pytest.approx(0.2)
    assert rows["sft"].task_accuracy_vs_sft is None  # the reference
    markdown = (v2 / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method |"))
    assert "Task accuracy (Δ vs sft [95% CI])" in header
    column = header.split(" | ").index("Task accuracy (Δ vs sft [95% CI])")
    line = next(line for line in markdown.splitlines() if line.startswith("| str |"))
    assert line.split(" | ")[column].startswith("40% (+20 pts")


def test_no_ratio_across_templates_when_the_aligned_seed_lacks_one(tmp_path):
    root = make_study(tmp_path / "study", drop=("aligned/eval-native-safe",))
    rows = _rows(root)
    assert rows["ptst"].kept is None and rows["sft-safe"].kept is None
    assert "aligned seed was not evaluated under native:safe" in rows["ptst"].why[0]
    assert rows["str"].kept is not None  # native: both evaluated
    markdown = write_report(root, tmp_path / "out")[0].read_text()
    assert "Not computed (never across templates): sft-safe" in markdown
    ptst_line = next(line for line in markdown.splitlines() if line.startswith("| ptst |"))
    assert ptst_line.split(" | ")[2] == "—"


def test_a_cell_evaluated_under_fewer_templates_is_read_under_those(tmp_path):
    """A cell with its own `eval_templates: [native]` has no native:safe views: its headline
    row is read under native as before, its native:safe entries are absent (never filled from
    another template), and the study's description says which cells were narrowed."""
    import json

    from stayaligned.reports.sections import study_words, template_blocks

    root = make_study(tmp_path / "study", drop=tuple(
        f"cells/str-seed{s}/eval-native-safe" for s in (0, 1, 2)))
    manifest = json.loads((root / "study.json").read_text())
    for cell in manifest["config"]["cells"]:
        if cell["name"] == "str":
            cell["eval_templates"] = ["native"]
    (root / "study.json").write_text(json.dumps(manifest))
    study = load_study(root)
    row = {r.cell: r for r in headline_rows(study)}["str"]
    assert row.template == "native" and row.kept.value == pytest.approx(
        REFUSAL["str"]["native"] * N_HARM / round(REFUSAL["aligned"]["native"] * N_HARM))
    tables = [b for b in template_blocks(study) if hasattr(b, "rows")][:2]  # native, safe
    assert [[r[0] for r in t.rows] for t in tables] == [
        ["aligned", "sft", "sft-safe", "ptst", "str"], ["aligned", "sft", "sft-safe", "ptst"]]
    words = study_words(study)[0].text
    assert "str (str: str with lam 0.1; evaluated under native only)" in words
    assert "except str (under their own subset" in words


def test_recommendation_names_the_pareto_fine_tunes(v2):
    text = recommendation(list(_rows(v2).values()))
    front = text.split("under the same template are ", 1)[1].split(". ", 1)[0]
    assert front.startswith("ptst (keeps 84%") and "sft (keeps" in front
    assert "over-refusal +0 pts, task accuracy +0 pts; tested with native:safe)" in front
    assert "str (" not in front  # str: less kept and more task loss than ptst
    assert "the safest is ptst" in text


def test_a_fine_tune_with_no_task_gain_over_the_aligned_seed_is_not_recommended(v2):
    """A repair that gave back the aligned model keeps 100% at the aligned seed's task loss: on
    kept share against task loss it would top the Pareto front, but it is the aligned seed, a
    reference point, not a fine-tune to choose."""
    import dataclasses

    from stayaligned.reports.pooling import Pooled

    rows = _rows(v2)
    assert rows["str"].aligned_task_loss == pytest.approx(1.3)
    reverted = dataclasses.replace(rows["str"], cell="sft+merge", task_loss=1.3,
                                   kept=Pooled(1.0, 0.95, 1.0, 3, N_HARM))
    text = recommendation([*rows.values(), reverted])
    front = text.split("under the same template are ", 1)[1].split(". ", 1)[0]
    assert "sft+merge" not in front and front.startswith("ptst (keeps 84%")
    assert text.endswith("nothing gained from fine-tuning): sft+merge.")
    assert "Not a choice" not in recommendation(list(rows.values()))


def test_judges_plots_and_sections(v2):
    markdown = (v2 / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert headings == ["Results", "Templates", "Safety and utility", "Prefilling attack",
                        "Dose", "Depth of alignment (per-token KL)", "Over-refusal", "Judges",
                        "Training", "Cells", "Configuration"]
    judges = markdown.split("## Judges", 1)[1].split("\n## ", 1)[0]
    # keyword flips 2 of 40 harm items in each view: (2 + 12) models x 2 templates + 2 dose runs
    harm = next(line for line in judges.splitlines() if "| harm |" in line)
    assert "| 1200 | 95.0% |" in harm
    assert "ptst − sft: +" in markdown and "ptst − sft-safe: +" in markdown
    plots = {p.name for p in (v2 / "plots").glob("*.png")}
    assert {"dose.png", "training_norms.png", "prefill.png", "over_refusal.png"} <= plots
    description = next(p for p in markdown.split("\n\n") if p.startswith("Study fake-v2:"))
    assert "{" not in description and "sft-safe (sft: template native:safe" in description
    assert "str with lam 0.1" in markdown


def test_a_repair_cell_is_reported_with_its_choice_and_its_cost(tmp_path):
    """A repair cell has no training: its headline cost is its fine-tune's per step plus the
    repair once (mean seconds over seeds), the Repairs section shows each seed's kept strength
    and whether the validation target was met, and Training lists no repair rows."""
    from study_factory import REPAIRS

    root = make_study(tmp_path / "study", repair=True)
    write_report(root)
    rows = _rows(root)
    mean = sum(seconds for _, _, seconds in REPAIRS.values()) / len(REPAIRS)
    assert rows["sft+merge"].cost == f"{rows['sft'].cost} + merge {mean:.0f} s once"
    assert rows["sft+merge"].kept is not None and rows["sft+merge"].kept_vs_sft.low > 0
    markdown = (root / "report.md").read_text()
    repairs = markdown.split("\n## Repairs\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in repairs.splitlines() if line.startswith("| sft+merge-seed")]
    assert len(lines) == 3
    assert lines[0].startswith("| sft+merge-seed0 | alpha = 0.5 | 75.0% [65, 85] | 90.0% (met) | 0.750 |")
    assert "**90.0% (missed: the best one kept)**" in lines[2] and "300 s" in lines[2]
    assert "**alpha = 1.0 (the aligned model itself)**" in lines[2]
    assert "aligned model itself" not in lines[0] + lines[1]
    training = markdown.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    assert "sft+merge" not in training and "| sft-seed0 |" in training
    # per-seed rows are compared with the same seed's sft run, and the tables say so
    assert "Δ: points (x 100) against the same seed's sft run" in markdown
    # the study's description says what the cell is: a repair of sft, not a training of sft
    assert ("sft+merge (merge repair of sft: the weakest of the method's default strengths "
            "keeping >= 95% of the aligned refusal rate on validation data)") in markdown
    cell = markdown.split("\n### sft+merge-seed2\n", 1)[1].split("\n### ", 1)[0]
    assert "| chosen alpha | 1 |" in cell and "| target met | no (the best strength kept" in cell
    assert "| repair stage | done |" in cell and "| eval stage | done |" in cell


def test_cost_is_matched_by_methods_unless_the_bench_measured_this_study(v2):
    """The generic overhead bench keys its entries by method (its "stack" is its own stack):
    a cell is matched by its methods there, by name only in a bench run for this very study
    (`overhead.py --study`), and per step (step_ratio) when the bench has it; a cell the bench
    lacks falls back to this study's own training times."""
    study = load_study(v2)
    entry = {"sft": (1.0, 2.0), "str": (1.5, 3.0), "sft-safe": (9.0, 18.0)}
    overhead = {name: {"time_ratio": 1.0, "step_ratio": r, "step_s_median": s}
                for name, (r, s) in entry.items()}
    overhead["meta"] = {"model": "LoRA bench", "command": "python bench/overhead.py"}
    rows = {r.cell: r for r in headline_rows(study, overhead)}
    assert rows["sft-safe"].cost == "×1.00 (2.0 s, bench)"  # methods [sft], not the name
    assert rows["str"].cost == "×1.50 (3.0 s, bench)"
    assert rows["ptst"].cost == "×1.00 (1.0 s)"  # not in the bench: this study's 40 s / 40 steps
    mine = {**overhead, "meta": {**overhead["meta"], "study": study.name}}
    rows = {r.cell: r for r in headline_rows(study, mine)}
    assert rows["sft-safe"].cost == "×9.00 (18.0 s, this study's regime)"
    markdown = (v2 / "report.md").read_text()
    assert "from this study's training times" in markdown.split("\n## ", 1)[0]


def test_cost_of_a_resumed_run_divides_by_the_steps_it_timed(tmp_path):
    """A run resumed from checkpoint-N times only the steps after N: its cost per step is
    train_seconds over those steps (recorded as timed_steps, or read off resumed_from in older
    records), not over global_step, which made a resumed cell look cheaper."""
    import json

    root = make_study(tmp_path / "study")
    for seed in (0, 1, 2):  # ptst ran 40 s for 40 steps; now: resumed at 30, 10 steps in 40 s
        path = root / "cells" / f"ptst-seed{seed}" / "train" / "run.json"
        run = json.loads(path.read_text())
        run["resumed_from"] = f"{path.parent}/checkpoints/checkpoint-30"
        if seed == 0:
            run["timed_steps"] = 10
        path.write_text(json.dumps(run))
    rows = _rows(root)
    assert rows["ptst"].cost == "×4.00 (4.0 s)"
    from stayaligned.reports.report import _cell_fields

    ptst = next(m for m in load_study(root).cells if m.label == "ptst-seed1")
    assert ("train time", "40.0 s (steps 31-40: resumed)") in _cell_fields(ptst).rows


def test_the_headline_judge_can_be_chosen_for_the_whole_report(tmp_path):
    """`headline_judge: keyword` (a study whose classifier misjudges its domain,
    bench/results/judges_harmful_domain.json): the headline, its "other judge" column and the
    per-benchmark tables all read the keyword verdicts; no stage depends on the key."""
    import json

    root = make_study(tmp_path / "study")
    manifest = json.loads((root / "study.json").read_text())
    classifier = _rows(root)["sft"]
    manifest["config"]["headline_judge"] = "keyword"
    (root / "study.json").write_text(json.dumps(manifest))
    study = load_study(root)
    keyword = {r.cell: r for r in headline_rows(study)}["sft"]
    assert keyword.judge == "keyword" and classifier.judge == "classifier"
    assert keyword.kept.value == pytest.approx(classifier.kept_other_judge.value)
    assert keyword.kept_other_judge.value == pytest.approx(classifier.kept.value)
    sft0 = next(m for m in study.models if m.label == "sft-seed0")
    assert sft0.metrics["judge"] == "keyword"
    # the plots' pooled rates (prefill curves, safety against utility) read the same judge as
    # the single-run tables: they read the classifier's eval/ for pooled cells before
    from stayaligned.reports.groups import group_rate, groups
    from stayaligned.reports.headline import rate

    sft = groups(study)["sft"]
    for bench in ("harm", "harm [prefill k=3]"):
        assert group_rate(sft, bench).value == pytest.approx(
            rate(sft, "native", "keyword", bench).value)
        assert group_rate(sft, bench).value != pytest.approx(
            rate(sft, "native", "classifier", bench).value)
    write_report(root)
    assert "| Kept share [95% CI] (keyword) | Kept (classifier) |" in (root / "report.md").read_text()


def test_a_headline_judge_outside_the_study_judges_is_an_error(tmp_path, tiny_model_dir):
    from test_study import study_config

    from stayaligned.config import ConfigError
    from stayaligned.study import run_study

    cfg = study_config(tmp_path, tiny_model_dir, "study", "judges=[keyword]",
                       "headline_judge=classifier")
    with pytest.raises(ConfigError, match="headline_judge: 'classifier' is not one of"):
        run_study(cfg)


def _set_date(folder, date):
    import json

    for path in folder.rglob("metrics.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "date": date}))


def test_a_retrained_seed_whose_losses_differ_names_what_was_made_from_the_archived_one(tmp_path):
    import json

    root = make_study(tmp_path / "study", repair=True)
    retrain = "2026-12-06T10:00:00+00:00"
    # every evaluation before the retrain, then the aligned seed and sft seed 1 made again after
    _set_date(root, "2026-12-05T10:00:00+00:00")
    _set_date(root / "aligned", "2026-12-06T11:00:00+00:00")
    for key in ("cells/sft-seed1", "cells/sft+merge-seed1"):
        _set_date(root / key, "2026-12-06T12:00:00+00:00")
    run = {"status": "complete", "provenance": {"date": retrain},
           "archived_rerun": {"date_of_archived_run": "2026-12-01T00:00:00+00:00",
                              "logged_steps_compared": 3, "same_losses": False,
                              "first_differing_step": 1}}
    (root / "aligned" / "train").mkdir(parents=True)
    (root / "aligned" / "train" / "run.json").write_text(json.dumps(run))
    sft1 = json.loads((root / "cells/sft-seed1/train/run.json").read_text())
    (root / "cells/sft-seed1/train/run.json").write_text(json.dumps(
        {**sft1, "provenance": {"date": "2026-12-06T11:30:00+00:00"}}))
    write_report(root)
    markdown = (root / "report.md").read_text()
    note = next(line for line in markdown.splitlines() if line.startswith("Retrained: aligned"))
    assert "from step 1 (archived run of 2026-12-01" in note
    named = note.split("before the retrain: ", 1)[1].split(";", 1)[0].split(", ")
    assert "sft-seed0" in named and "sft+merge-seed2" in named and "ptst-seed0" in named
    assert "sft-seed1" not in named and "sft+merge-seed1" not in named
    assert not any(n.startswith("aligned") for n in named)
    _set_date(root / "aligned", "2026-12-05T10:00:00+00:00")  # its evaluation kept from before
    write_report(root)
    assert "aligned (its own evaluation)" in (root / "report.md").read_text()
    # the same retrain with identical losses, or nothing retrained: no note
    (root / "aligned" / "train" / "run.json").write_text(json.dumps(
        {**run, "archived_rerun": {**run["archived_rerun"], "same_losses": True}}))
    write_report(root)
    assert "Retrained:" not in (root / "report.md").read_text()
    plain = make_study(tmp_path / "plain")
    write_report(plain)
    assert "Retrained:" not in (plain / "report.md").read_text()


def test_an_unreadable_dose_block_is_an_error_not_cells_in_the_headline(tmp_path):
    """A dose block the report could not read made its runs ordinary cells, silently: they
    entered the headline and the recommendation."""
    import pytest

    from stayaligned.config import ConfigError
    from stayaligned.reports.study_files import _model_runs

    config = {"cells": [{"name": "sft", "methods": ["sft"]}], "seeds": [0],
              "dose": {"key": "optim.lr", "values": [1e-4], "cells": ["sft"], "step": 2}}
    with pytest.raises(ConfigError, match="study.json: its dose block cannot be read"):
        _model_runs(tmp_path, {"config": config})
    assert [r.label for r in _model_runs(tmp_path, {"config": {**config, "dose": None}})] == \
        ["seed", "sft"]


def test_a_model_of_reading_is_a_headline_row_and_counted_once(tmp_path):
    """ptst as a reading of sft's model (`model_of: sft, read_under: native:safe`, what PTST
    is when its training template is sft's): a headline row read under the safe template with
    exactly sft's numbers there, the PTST paragraph saying the difference from sft is zero by
    construction, and no model counted twice (judge agreement, per-model tables)."""
    from stayaligned.reports.headline import template_rows

    root = make_study(tmp_path / "study", reading=True)
    write_report(root)
    study = load_study(root)
    assert [m.label for m in study.readings] == ["ptst-seed0", "ptst-seed1", "ptst-seed2"]
    assert [m.key for m in study.readings] == ["cells/sft-seed0", "cells/sft-seed1",
                                               "cells/sft-seed2"]
    rows = _rows(root)
    assert list(rows) == ["sft", "sft-safe", "ptst", "str"]  # the config's cell order
    under_safe = {r.name: r for r in template_rows(study, SAFE, "classifier")}
    assert "ptst" not in under_safe  # a template table lists models, not readings
    assert rows["ptst"].template == SAFE and rows["sft"].template == "native"
    assert rows["ptst"].kept.value == pytest.approx(under_safe["sft"].kept.value)
    assert rows["ptst"].kept.value != pytest.approx(rows["sft"].kept.value)
    markdown = (root / "report.md").read_text()
    assert "ptst − sft: 0 by construction (the same model)" in markdown
    assert "ptst − sft-safe: +" in markdown
    assert "ptst (sft's model read under native:safe: no training" in markdown
    harm = next(line for line in markdown.split("## Judges", 1)[1].splitlines()
                if "| harm |" in line)
    assert "| 960 |" in harm  # (2 + 9) models x 2 templates x 40 + 2 dose runs x 40
    assert "ptst-seed" not in markdown  # no per-model row repeats sft's
