"""`stayaligned report`: the report of a finished tiny study (tables with every model and the
difference column, values from metrics.json, a self-contained HTML page), a study with a
failed and a missing stage, the summary rows, the Pareto front, and the page in a real
headless browser."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stayaligned.cli import main
from stayaligned.evaluation.metrics import Rate, difference_interval, rate
from stayaligned.reports.report import summary_rows, write_report
from stayaligned.reports.study_files import ModelRun, Study
from stayaligned.reports.tables import fmt_difference, fmt_rate, pareto_front, results_table

MODELS = ("seed", "aligned", "sft", "ptst")
SECTIONS = ("Results", "Safety and utility", "Prefilling attack",
            "Depth of alignment (per-token KL)", "Over-refusal", "Training", "Cells",
            "Configuration")


def _metrics(study: Path, model: str) -> dict:
    key = model if model in ("seed", "aligned") else f"cells/{model}"
    return json.loads((study / key / "eval" / "metrics.json").read_text())["benchmarks"]


def _row(markdown: str, heading: str, model: str) -> str:
    """The table row of `model` under the first heading of report.md starting `### heading`."""
    section = markdown.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {model} |"))


def _as_rate(d: dict) -> Rate:
    return Rate(**{k: d[k] for k in ("k", "n", "value", "low", "high")})


@pytest.fixture(scope="module")
def report_dir(tiny_study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(tiny_study), "--output", str(out)]) == 0
    return out


def test_markdown_has_every_section_model_row_and_difference(tiny_study, report_dir):
    markdown = (report_dir / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert headings == list(SECTIONS)
    for bench in ("harm", "harm [prefill k=1]", "harm [prefill k=3]", "xstest-safe", "arith"):
        assert "| Model | n |" in markdown.split(f"### {bench} (", 1)[1].split("\n### ", 1)[0]
        for model in MODELS:
            _row(markdown, f"{bench} (", model)
    assert "Δ vs sft [95% CI]" in markdown
    assert _row(markdown, "harm (", "sft").endswith("| reference |")
    for model in ("seed", "ptst"):  # rate and Newcombe difference straight from metrics.json
        mine, ref = _metrics(tiny_study, model)["harm"], _metrics(tiny_study, "sft")["harm"]
        mine_rate, ref_rate = _as_rate(mine["refusal_rate"]), _as_rate(ref["refusal_rate"])
        expected = f"| {model} | {mine['n']} | {fmt_rate(mine_rate)} | "
        expected += fmt_difference(*difference_interval(mine_rate, ref_rate))
        assert _row(markdown, "harm (", model).startswith(expected)
    loss = _metrics(tiny_study, "ptst")["arith"]["task_loss"]
    shown = f"{loss['loss']:.3f} ± {loss['per_example_sem']:.3f}"
    assert shown in _row(markdown, "arith (", "ptst")
    assert "Δ vs sft" in _row(markdown, "arith (", "Model")
    ptst = json.loads((tiny_study / "cells/ptst/train/run.json").read_text())
    assert ptst["eval_prompt_example"] in markdown  # the exact rendered prompt, verbatim
    for name in ("safety_utility", "prefill", "depth", "over_refusal", "training_loss"):
        assert f"](plots/{name}.png)" in markdown
        assert (report_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_self_contained_and_escaped(report_dir):
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "url(" not in page and "@import" not in page and "<script" not in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(list((report_dir / "plots").glob("*.png"))) == 5
    assert all(base64.b64decode(data)[:4] == b"\x89PNG" for data in images)
    assert "&lt;|im_start|&gt;" in page and "<|im_start|>" not in page
    assert page.count("<table>") >= 8 and "reference</td>" in page


def test_failed_and_missing_stages_are_marked_not_crashed(tiny_study, tmp_path):
    study = tmp_path / "study"
    weights = shutil.ignore_patterns("*.safetensors", "checkpoint-*")
    shutil.copytree(tiny_study, study, ignore=weights)
    shutil.rmtree(study / "cells/ptst/eval")
    shutil.rmtree(study / "cells/sft/depth")
    shutil.rmtree(study / "aligned/eval")
    (study / "cells/sft/depth").mkdir()  # as if killed before depth.json was written
    progress = json.loads((study / "progress.json").read_text())
    progress["cells/ptst/eval"] = {"kind": "eval", "status": "failed",
                                   "error": "RuntimeError: CUDA out of <memory>"}
    del progress["cells/sft/depth"], progress["aligned/eval"]
    (study / "progress.json").write_text(json.dumps(progress))

    paths = write_report(study, tmp_path / "out", utility="auto")
    markdown = paths[0].read_text()
    assert "failed: RuntimeError: CUDA out of <memory>" in _row(markdown, "harm (", "ptst")
    assert "| aligned | — | not run |" in _row(markdown, "harm (", "aligned")
    assert "No depth result for: sft (started, not finished)" in markdown
    assert "CUDA out of &lt;memory&gt;" in paths[1].read_text()
    rows = summary_rows(study)
    assert rows["ptst"]["refusal_rate"] is None and rows["ptst"]["status"].startswith("failed")
    assert rows["sft"]["status"] == "done" and rows["sft"]["refusal_rate"] is not None
    with pytest.raises(ValueError, match="utility"):
        write_report(study, tmp_path / "x", utility="speed")


def test_findings_notes_go_after_the_overview_in_both_formats(tiny_study, tmp_path):
    notes = tmp_path / "findings.md"
    notes.write_text("## Findings\n\nSTR keeps <most> refusals\nof the aligned seed.\n\n"
                     "- depth: first token\n  moves most\n- ptst: template only\n")
    assert main(["report", str(tiny_study), "--output", str(tmp_path / "out"),
                 "--notes", str(notes)]) == 0
    markdown = (tmp_path / "out/report.md").read_text()
    assert markdown.index("## Findings") < markdown.index("## Results")
    assert "STR keeps <most> refusals of the aligned seed." in markdown
    assert "- depth: first token moves most\n- ptst: template only" in markdown
    page = (tmp_path / "out/report.html").read_text()
    assert "<li>depth: first token moves most</li>" in page
    assert "STR keeps &lt;most&gt; refusals" in page
    assert page.index("Findings</a>") < page.index("Results</a>")  # in the contents too
    with pytest.raises(FileNotFoundError, match="nothere.md"):
        write_report(tiny_study, tmp_path / "x", notes=tmp_path / "nothere.md")
    notes.write_text("  an indented paragraph\n  on two lines\n\n- item\nplain line\n")
    write_report(tiny_study, tmp_path / "indented", notes=notes)
    markdown = (tmp_path / "indented/report.md").read_text()
    assert "an indented paragraph on two lines\n\n- item plain line\n" in markdown
    notes.write_text("##### too deep\n")
    with pytest.raises(ValueError, match=r"findings.md:1: heading level 5"):
        write_report(tiny_study, tmp_path / "x", notes=notes)


def test_summary_rows_are_the_metrics_numbers(tiny_study):
    rows = summary_rows(tiny_study)
    assert list(rows) == list(MODELS)
    for model, row in rows.items():
        m = _metrics(tiny_study, model)
        assert row["refusal_rate"] == m["harm"]["refusal_rate"]["value"]
        refusal = m["harm"]["refusal_rate"]
        assert row["refusal_ci"] == [refusal["low"], refusal["high"]]
        assert row["prefill_refusal_rate"] == m["harm [prefill k=3]"]["refusal_rate"]["value"]
        assert row["prefill_k"] == 3
        assert row["over_refusal_rate"] == m["xstest-safe"]["refusal_rate"]["value"]
        assert row["task_accuracy"] == m["arith"]["accuracy"]["value"]
        assert row["task_loss"] == m["arith"]["task_loss"]["loss"]
        assert row["benchmarks"] == {"refusal": "harm", "prefill": "harm [prefill k=3]",
                                     "over_refusal": "xstest-safe", "task": "arith"}


def test_pareto_front_on_hand_made_points():
    points = [(0.9, 0.2), (0.5, 0.6), (0.4, 0.5), (0.9, 0.1), (0.2, 0.6), (0.1, 0.9)]
    # (0.4, 0.5) is beaten by (0.5, 0.6); (0.9, 0.1) by (0.9, 0.2); (0.2, 0.6) by (0.5, 0.6)
    assert pareto_front(points) == [0, 1, 5]
    # utility as a loss (lower is better): (0.9, 0.1) now beats (0.9, 0.2)
    assert pareto_front(points, maximize=(True, False)) == [3]
    assert pareto_front([(0.5, 0.5), (0.5, 0.5), (0.1, 0.1)]) == [0, 1]  # ties share the front
    assert pareto_front([(math.nan, 1.0), (0.2, 0.2)]) == [1]
    assert pareto_front([]) == []


def test_a_difference_whose_interval_excludes_zero_is_marked(tmp_path):
    def model(label, refusals, n=40):
        flags = [True] * refusals + [False] * (n - refusals)
        metrics = {"benchmarks": {"adv": {"kind": "harmful", "n": n,
                                          "refusal_rate": rate(flags).to_dict()}}}
        return ModelRun(label, f"cells/{label}", cell={"name": label}, seed=0, metrics=metrics)

    study = Study(tmp_path, {"config": {"reference": "sft"}}, {},
                  [model("sft", 10), model("big-drop", 36), model("noise", 13)], [])
    rows = {row[0]: row for row in results_table(study, "adv", "harmful").rows}
    assert rows["big-drop"][3].strong and rows["big-drop"][3].text.startswith("+65.0 pts")
    assert not rows["noise"][3].strong and rows["sft"][3].text == "reference"


def test_rubric_and_rouge_benchmarks_show_their_means(tmp_path):
    def mean(n, value, low, high):
        return {"n": n, "value": value, "low": low, "high": high}

    def model(label, asr, harm, rouge):
        attacks = rate([True] * asr + [False] * (20 - asr)).to_dict()
        metrics = {"benchmarks": {
            "adv": {"kind": "harmful", "n": 20, "attack_success_rate": attacks,
                    "mean_score": harm[0], "harmfulness": mean(20, *harm)},
            "samsum": {"kind": "task", "metric": "rouge", "n": 30,
                       **{k: mean(30, *rouge) for k in ("rouge1", "rouge2", "rougeL")}}}}
        return ModelRun(label, f"cells/{label}", cell={"name": label}, seed=0, metrics=metrics)

    study = Study(tmp_path, {"config": {"reference": "sft"}}, {},
                  [model("sft", 12, (3.9, 3.5, 4.3), (0.30, 0.27, 0.33)),
                   model("str", 2, (1.4, 1.1, 1.8), (0.31, 0.28, 0.34))], [])
    adv = results_table(study, "adv", "harmful")
    assert adv.header[2:5] == ("ASR [95% CI]", "Δ vs sft [95% CI]", "Mean harmfulness (1-5)")
    assert adv.rows[1][3].strong and adv.rows[1][4] == "1.40 [1.10, 1.80]"
    samsum = results_table(study, "samsum", "task")
    assert samsum.header[2] == "ROUGE-L F1 ×100 [95% CI]" and "ROUGE-2 ×100" in samsum.header
    assert samsum.rows[1][2] == "31.0 [28.0, 34.0]"
    # MOVER: 1 +- hypot(3, 3) points
    assert samsum.rows[1][3].text == "+1.0 pts [-3.2, +5.2]" and not samsum.rows[1][3].strong


def test_with_several_seeds_each_cell_is_compared_with_the_same_seed(tmp_path):
    runs = [ModelRun("seed", "seed")] + [
        ModelRun(f"{name}-seed{s}", f"cells/{name}-seed{s}", cell={"name": name}, seed=s)
        for name in ("sft", "str") for s in (0, 1)]
    study = Study(tmp_path, {"config": {"reference": "sft"}}, {}, runs, [])
    assert study.reference_for(runs[4]).label == "sft-seed1"
    assert study.reference_for(runs[3]).label == "sft-seed0"
    assert study.reference_for(runs[0]).label == "sft-seed0"


# ---------------------------------------------------------------- a real browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("no headless browser (chromium, chromium-browser or google-chrome) on PATH; "
                    "install one with `apt-get install -y chromium` to run this test")
    return found


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    browser = _browser()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (report_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   capture_output=True, timeout=60, check=True)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "<th>Refusal rate [95% CI]</th>" in dom and "<td>ptst</td>" in dom
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 5
    first_table = dom.split("<table", 1)[1].split("</table>", 1)[0]
    assert "<th>Method</th>" in first_table and "Kept share" in first_table  # headline first
    assert dom.index("<table") < dom.index("<h2")
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page
