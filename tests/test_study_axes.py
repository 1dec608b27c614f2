"""Study axes of the v2 effect study: eval templates (own directories, v1 layout kept), several
judges (re-judging without regenerating), the dose axis expanding into cells, and the
out-of-sample check of the depth set."""

from __future__ import annotations

import json

import pytest

from stayaligned.config import ConfigError, StudyConfig, load
from stayaligned.grid import check_depth_disjoint, dose_points, in_sample_sets
from stayaligned.config import TrainConfig, to_dict
from stayaligned.study import cell_ids, plan


def _cfg(tmp_path, *extra):
    return load(StudyConfig, None, [
        "name=axes", "model.name=embedded", f"output_dir={tmp_path / 'study'}",
        "train={optim: {lr: 1.0e-4, max_steps: 4}}",
        "cells=[{name: sft}, {name: str, methods: [str]}, {name: safety_mix, methods: [safety_mix]}]",
        "eval={benchmarks: [{name: demo-harmful}], judge: keyword}",
        "depth={source: demo-safety, split: eval, limit: 8}",
        *extra])


def test_eval_templates_get_their_own_directories_and_v1_keeps_eval(tmp_path):
    v1 = [s.key for s in plan(_cfg(tmp_path, "cells=[{name: sft}]"))]
    assert v1 == ["seed/eval", "cells/sft/train", "cells/sft/eval", "cells/sft/depth"]
    stages = plan(_cfg(tmp_path, "cells=[{name: sft}]", "eval_templates=[native, native:safe]"))
    assert [s.key for s in stages] == [
        "seed/eval", "seed/eval-native-safe", "cells/sft/train", "cells/sft/eval",
        "cells/sft/eval-native-safe", "cells/sft/depth"]


def test_a_cell_can_narrow_the_eval_templates(tmp_path):
    """`cells[].eval_templates` evaluates a cell under a subset of the study's templates (the
    Qwen study: native:safe only where PTST is read), folders keeping the study-wide names;
    a template the study lacks, or a subset without the first template, is an error naming
    the key."""
    cells = ("cells=[{name: sft}, {name: ptst, methods: [ptst]}, "
             "{name: str, methods: [str], eval_templates: [native]}]")
    stages = [s.key for s in plan(_cfg(tmp_path, cells, "eval_templates=[native, native:safe]",
                                       "depth.enabled=false"))]
    assert [k for k in stages if k.startswith("cells/") and "/eval" in k] == [
        "cells/sft/eval", "cells/sft/eval-native-safe", "cells/ptst/eval",
        "cells/ptst/eval-native-safe", "cells/str/eval"]
    for narrowed, message in (("[native:unsafe]", "'native:unsafe' is not one of the study's"),
                              ("[native:safe]", "include the study's first eval template")):
        bad = cells.replace("eval_templates: [native]", f"eval_templates: {narrowed}")
        with pytest.raises(ConfigError, match=r"cells\.str\.eval_templates: " + message):
            plan(_cfg(tmp_path, bad, "eval_templates=[native, native:safe]"))


def test_v1_eval_config_is_unchanged_by_the_new_keys(tmp_path):
    from stayaligned.study import eval_config

    cfg = _cfg(tmp_path)
    assert to_dict(eval_config(cfg, "m", tmp_path)) == to_dict(eval_config(cfg, "m", tmp_path, None, None))
    assert eval_config(cfg, "m", tmp_path).template is None  # the run's own (PTST's) template
    assert eval_config(cfg, "m", tmp_path, "native:safe", "classifier").template == "native:safe"


def test_each_further_judge_is_a_rejudge_stage_after_its_eval(tmp_path):
    cfg = _cfg(tmp_path, "cells=[{name: sft}]", "eval_templates=[native, native:safe]",
               "judges=[classifier, keyword]", "evaluate_seed=false")
    stages = plan(cfg)
    assert [(s.key, s.kind) for s in stages] == [
        ("cells/sft/train", "train"), ("cells/sft/eval", "eval"),
        ("cells/sft/eval/judge-keyword", "judge"), ("cells/sft/eval-native-safe", "eval"),
        ("cells/sft/eval-native-safe/judge-keyword", "judge"), ("cells/sft/depth", "depth")]


def test_the_dose_axis_expands_into_one_seed_cells(tmp_path):
    cfg = _cfg(tmp_path, "seeds=[0, 1, 2]", "eval_templates=[native, native:safe]",
               "dose={key: optim.lr, values: [5.0e-5, 1.0e-4, 2.0e-4], cells: [sft, str], seed: 0}")
    points = dose_points(cfg, to_dict(TrainConfig()))
    assert [(p.cell, p.value, p.run_id, p.extra) for p in points] == [
        ("sft", 5e-5, "sft-lr5e-05", True), ("sft", 1e-4, "sft-seed0", False),
        ("sft", 2e-4, "sft-lr0.0002", True), ("str", 5e-5, "str-lr5e-05", True),
        ("str", 1e-4, "str-seed0", False), ("str", 2e-4, "str-lr0.0002", True)]
    ids = cell_ids(cfg)
    assert [i for i, _, _ in ids][-4:] == ["sft-lr5e-05", "sft-lr0.0002", "str-lr5e-05", "str-lr0.0002"]
    assert len(ids) == 9 + 4
    run_id, cell, seed = ids[-1]
    assert (cell.methods, cell.train["optim"]["lr"], seed) == (("str",), 2e-4, 0)
    from stayaligned.study import cell_train_config

    tcfg = cell_train_config(cfg, tmp_path, run_id, cell, seed)
    assert (tcfg.optim.lr, tcfg.optim.max_steps, tcfg.methods) == (2e-4, 4, ("str",))
    keys = [s.key for s in plan(cfg)]
    # dose runs: trained, evaluated under the first template only, depth
    assert [k for k in keys if k.startswith("cells/str-lr0.0002")] == [
        "cells/str-lr0.0002/train", "cells/str-lr0.0002/eval", "cells/str-lr0.0002/depth"]
    with pytest.raises(ConfigError, match="dose.cells: 'sap' is not a cell"):
        cell_ids(_cfg(tmp_path, "dose={values: [1.0e-4], cells: [sap]}"))
    with pytest.raises(ConfigError, match="dose.key: 'optim.rate'"):
        cell_ids(_cfg(tmp_path, "dose={key: optim.rate, values: [1], cells: [sft]}"))


def test_two_dose_values_cannot_share_one_run(tmp_path):
    """Two values that name one run directory (equal, or equal to the 6 significant digits of
    the run id) would train into one directory: the second failed on a StaleError every run."""
    for values in ("[5.0e-5, 5.0e-5]", "[1.0e-4, 1.0000001e-4]"):
        with pytest.raises(ConfigError, match=r"dose.values: two values make the one run "
                           r"'sft-lr(5e-05|0.0001)'.*list each dose once"):
            cell_ids(_cfg(tmp_path, "train={optim: {lr: 3.0e-4}}",
                          f"dose={{key: optim.lr, values: {values}, cells: [sft], seed: 0}}"))


def test_depth_set_must_be_disjoint_from_str_and_sap_prompts(tmp_path):
    held_out = _cfg(tmp_path, "depth.disjoint=true",
                    "cells=[{name: str, methods: [str]}, {name: sap, methods: [sap]}]")
    stages = plan(held_out)  # demo-safety eval vs demo-harmful align and demo-safety (align)
    assert any(s.kind == "depth" for s in stages)
    assert check_depth_disjoint(held_out, {"str": (["str"], {}), "sap": (["sap"], {})}) == 8
    sets = in_sample_sets({"str": (["str"], {}), "sap": (["sap"], {"sap": {"mode": "paper"}})})
    assert [(p.cell, p.source, p.split) for p in sets] == [
        ("str", "demo-harmful", "align"), ("sap", "demo-safety", None)]
    in_sample = _cfg(tmp_path, "depth={source: demo-safety, split: train, limit: 8, disjoint: true}",
                     "cells=[{name: str, methods: [str]}]")
    with pytest.raises(ConfigError, match=r"depth: 8 of the 8 depth prompts .* STR's mining "
                                          r"prompts of cell str \(demo-harmful, split align\)"):
        plan(in_sample)
    sap_only = _cfg(tmp_path, "depth={source: demo-safety, limit: 8, disjoint: true}",
                    "cells=[{name: sap, methods: [sap]}]")
    with pytest.raises(ConfigError, match="SAP's pair prompts of cell sap"):
        plan(sap_only)
    # v1's in-sample depth set stays valid without disjoint
    assert plan(_cfg(tmp_path, "depth={source: demo-safety, limit: 8}"))


def test_rejudge_reads_the_generations_and_never_regenerates(tmp_path):
    from stayaligned.evaluation.rejudge import rejudge, rejudge_done
    from stayaligned.runfiles import write_jsonl

    src = tmp_path / "eval"
    src.mkdir()
    rows = [{"benchmark": "harm", "id": str(i), "user": "q", "response": text, "meta": {}}
            for i, text in enumerate(["I'm sorry, I cannot help with that.", "Sure, here is how",
                                      "As an AI, I can't", "Step 1: buy"])]
    rows.append({"benchmark": "arith", "id": "a", "user": "1+1", "response": "#### 2",
                 "reference": "#### 2", "meta": {}})
    write_jsonl(src / "generations.jsonl", rows)
    write_jsonl(src / "judgments.jsonl", [{"benchmark": r["benchmark"], "id": r["id"]}
                                          for r in rows])  # what the evaluation judged
    task = {"kind": "task", "metric": "gsm8k_exact_match", "n": 1, "task_loss": {"loss": 0.5}}
    (src / "metrics.json").write_text(json.dumps({
        "model": "m", "template": "native", "judge": "classifier", "config": {"x": 1},
        "benchmarks": {"harm": {"kind": "harmful"}, "arith": task}}))
    assert not rejudge_done(src, "keyword", src / "judge-keyword")
    result = rejudge(src, "keyword", None, src / "judge-keyword")
    assert result["benchmarks"]["harm"]["refusal_rate"]["k"] == 2
    assert result["benchmarks"]["harm"]["refusal_rate"]["n"] == 4
    assert result["benchmarks"]["arith"] == task  # carried over, not re-scored
    verdicts = [j["refusal"] for j in map(json.loads, (src / "judge-keyword/judgments.jsonl")
                                          .read_text().splitlines()) if j["benchmark"] == "harm"]
    assert verdicts == [True, False, True, False]
    assert rejudge_done(src, "keyword", src / "judge-keyword")
    (src / "metrics.json").write_text(json.dumps({"config": {"x": 2}, "benchmarks": {}}))
    assert not rejudge_done(src, "keyword", src / "judge-keyword")  # a new evaluation


def test_a_tiny_study_with_templates_judges_and_seeds_runs_and_reports(tmp_path,
                                                                             tiny_model_dir):
    from test_study import study_config

    from stayaligned.reports.headline import headline_rows
    from stayaligned.reports.report import write_report
    from stayaligned.reports.study_files import load_study
    from stayaligned.study import run_study

    cfg = study_config(tmp_path, tiny_model_dir, "axes", "evaluate_seed=false",
                       "cells=[{name: sft, methods: [sft]}]", "seeds=[0, 1]",
                       "eval_templates=[native, native:safe]", "judges=[keyword, classifier]")
    assert run_study(cfg)["failed"] == []
    out = tmp_path / "axes"
    for model in ("aligned", "cells/sft-seed0", "cells/sft-seed1"):
        for folder in ("eval", "eval-native-safe"):
            metrics = json.loads((out / model / folder / "metrics.json").read_text())
            assert metrics["template"] == folder.replace("eval-native-safe", "native:safe") \
                .replace("eval", "native") and metrics["judge"] == "keyword"
            other = json.loads((out / model / folder / "judge-classifier/metrics.json").read_text())
            assert other["judge"] == "classifier"
            assert other["benchmarks"]["arith"] == metrics["benchmarks"]["arith"]
            generated = (out / model / folder / "generations.jsonl").read_text().splitlines()
            judged = (out / model / folder / "judge-classifier/judgments.jsonl").read_text()
            assert len(judged.splitlines()) == len(generated)
    rows = {r.cell: r for r in headline_rows(load_study(out))}
    assert set(rows) == {"sft"} and rows["sft"].kept is None or rows["sft"].kept.seeds == 2
    markdown = write_report(out)[0].read_text()
    assert markdown.startswith("# Study report: tiny\n\n| Method |")
    assert "## Judges" in markdown and "## Templates" in markdown
