"""`stayaligned check`: a safety gate for CI after a fine-tune.

Evaluates the model and its baseline with the same eval config (reusing any finished
generations and judgments under OUTPUT/model and OUTPUT/baseline), then, for every harmful
benchmark, compares the refusal rate and the attack success rate. The gate fails when the
refusal rate fell by more than `max_refusal_drop` points or the ASR rose by more than
`max_asr_rise` points (point estimates; each difference is reported with its 95% Newcombe
interval so a reader can tell a real drop from noise). A rate it cannot compare (a
benchmark or metric on one side only, no scored items, items the judge could not score,
different numbers of items) fails its row. Exit code: 0 pass, 1 fail.

Both sides are tested under one template (recorded in check.json): the eval config's
`template`, else the eval template the model's run recorded (PTST's safety prompt, say), else
the model's own chat template. Each side resolving its own would compare a PTST fine-tune
tested with the safety prompt against a baseline tested without it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from stayaligned.config import EvalConfig
from stayaligned.evaluation.metrics import Rate, difference_interval
from stayaligned.runfiles import atomic_write, write_json


def _rate(d: dict) -> Rate:
    return Rate(k=d["k"], n=d["n"], value=d["value"], low=d["low"], high=d["high"])


def _error_row(name: str, metric: str, mine, base, limit: float, error: str) -> dict:
    def value(entry):
        return (entry or {}).get(metric, {}).get("value")

    return {"benchmark": name, "metric": metric, "model": value(mine), "baseline": value(base),
            "difference": None, "difference_ci": [None, None], "worse_by_points": None,
            "limit_points": limit, "passed": False, "error": error}


def _unscored_error(mine: dict, base: dict) -> str | None:
    """Why the two sides' rates are not over the same items, or None when they are: items the
    judge could not score (a rate over the rest would pass a judge that stopped answering)."""
    sides = [(role, entry.get("unscored") or 0) for role, entry in (("model", mine), ("baseline", base))]
    unscored = [f"{role} {n}" for role, n in sides if n]
    if unscored:
        return (f"items the judge could not score ({', '.join(unscored)}): the rates would be "
                "over different items; fix the judge and rerun to score them")
    return None


def compare(model_metrics: dict, baseline_metrics: dict, max_refusal_drop: float,
            max_asr_rise: float) -> list[dict]:
    """One row per (harmful benchmark, metric): values, difference with interval, verdict.
    A harmful benchmark or metric on one side only, unscored items, or rates over different
    numbers of items fail their row with an `error` (the gate never passes what it did not
    compare)."""
    rows = []
    names = list(baseline_metrics["benchmarks"])
    names += [n for n in model_metrics["benchmarks"] if n not in baseline_metrics["benchmarks"]]
    for name in names:
        base = baseline_metrics["benchmarks"].get(name)
        mine = model_metrics["benchmarks"].get(name)
        if "harmful" not in {entry["kind"] for entry in (mine, base) if entry is not None}:
            continue
        for metric, limit, sign in (("refusal_rate", max_refusal_drop, -1),
                                    ("attack_success_rate", max_asr_rise, +1)):
            present = [role for role, m in (("model", mine), ("baseline", base))
                       if m is not None and metric in m]
            if not present:
                continue
            if len(present) == 1:
                missing = "baseline" if present == ["model"] else "model"
                rows.append(_error_row(name, metric, mine, base, limit,
                                       f"only the {present[0]}'s evaluation has it (the "
                                       f"{missing}'s metrics.json lacks benchmark {name} or its "
                                       f"{metric}); evaluate both with the same config"))
                continue
            if not mine[metric]["n"] or not base[metric]["n"]:
                rows.append(_error_row(name, metric, mine, base, limit,
                                       "no scored items: nothing to compare"))
                continue
            error = _unscored_error(mine, base)
            if error is None and mine[metric]["n"] != base[metric]["n"]:
                error = (f"rates over different numbers of items (model {mine[metric]['n']}, "
                         f"baseline {base[metric]['n']}); evaluate both with the same config")
            if error:
                rows.append(_error_row(name, metric, mine, base, limit, error))
                continue
            diff, low, high = difference_interval(_rate(mine[metric]), _rate(base[metric]))
            # points in the unsafe direction, rounded as reported: 18/20 -> 17/20 is 5.0 points,
            # not 5.000000000000004 (which would fail a limit of exactly 5)
            worse_by = round(100 * diff * sign, 9)
            rows.append({
                "benchmark": name, "metric": metric, "model": mine[metric]["value"],
                "baseline": base[metric]["value"], "items": mine[metric]["n"],
                "difference": diff,
                "difference_ci": [low, high], "worse_by_points": round(worse_by, 2),
                "limit_points": limit, "passed": worse_by <= limit,
            })
    return rows


def run_check(model: str, baseline: str, eval_cfg: EvalConfig, output: Path,
              max_refusal_drop: float, max_asr_rise: float, overwrite: bool = False) -> dict:
    """Evaluate both models and compare them; `overwrite` recomputes both evaluations. An
    earlier check.json is deleted first, so an error leaves no report saying it passed."""
    from stayaligned.evaluation.run import evaluate

    (Path(output) / "check.json").unlink(missing_ok=True)
    for flag, limit in (("--max-refusal-drop", max_refusal_drop), ("--max-asr-rise", max_asr_rise)):
        if not 0 <= limit < math.inf:  # NaN failed every row, inf passed every row
            raise ValueError(f"check: {flag} {limit} must be a finite number of points >= 0 "
                             "(5 = 5 percentage points)")
    from stayaligned.evaluation.run import eval_template_name

    template = eval_template_name(replace(eval_cfg, model=replace(eval_cfg.model, name=model)))
    results = {}
    for role, name in (("model", model), ("baseline", baseline)):
        cfg = replace(eval_cfg, model=replace(eval_cfg.model, name=name), template=template,
                      output_dir=str(Path(output) / role))
        results[role] = evaluate(cfg, overwrite=overwrite)
    rows = compare(results["model"], results["baseline"], max_refusal_drop, max_asr_rise)
    if not rows:
        raise ValueError("check: the eval config has no harmful benchmark to compare")
    report = {"passed": all(r["passed"] for r in rows), "model": model, "baseline": baseline,
              "judge": eval_cfg.judge, "template": template, "limits": {"max_refusal_drop": max_refusal_drop,
                                                  "max_asr_rise": max_asr_rise},
              "rows": rows}
    write_json(Path(output) / "check.json", report)
    return report


def junit_xml(report: dict) -> str:
    """The report as a JUnit XML test suite (one test case per benchmark and metric)."""
    cases = []
    for r in report["rows"]:
        name = quoteattr(f"{r['benchmark']}: {r['metric']}")
        body = ""
        if not r["passed"] and r.get("error"):
            message = f"{r['metric']}: {r['error']}"
            body = f"<failure message={quoteattr(message)}>{escape(message)}</failure>"
        elif not r["passed"]:
            message = (f"{r['metric']} {100 * r['model']:.1f}% vs baseline "
                       f"{100 * r['baseline']:.1f}%: worse by {r['worse_by_points']} points "
                       f"(limit {r['limit_points']})")
            body = f"<failure message={quoteattr(message)}>{escape(message)}</failure>"
        cases.append(f'  <testcase classname="stayaligned.check" name={name}>{body}</testcase>')
    failures = sum(not r["passed"] for r in report["rows"])
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="stayaligned check" '
            f'tests="{len(cases)}" failures="{failures}">\n' + "\n".join(cases) + "\n</testsuite>\n")


def write_junit(path: Path, report: dict) -> None:
    atomic_write(Path(path), junit_xml(report))
