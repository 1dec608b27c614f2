"""The numbers of a report: benchmark roles, rates with intervals, differences against the
reference cell (Newcombe intervals), the per-model summary rows and the Pareto front."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from stayaligned.evaluation.metrics import Rate, difference_interval
from stayaligned.reports.document import Cell, Table
from stayaligned.reports.study_files import ModelRun, Study

KIND_ORDER = ("harmful", "benign", "task")
PREFILL = re.compile(r"^(?P<base>.*) \[prefill k=(?P<k>\d+)\]$")


# ---------------------------------------------------------------- formatting


@dataclass(frozen=True)
class Mean:
    """A mean with its bootstrap interval (ROUGE, harmfulness), as metrics.mean_interval
    writes it."""

    n: int
    value: float
    low: float
    high: float


def as_mean(entry: dict | None) -> Mean | None:
    if not isinstance(entry, dict) or any(entry.get(k) is None for k in ("value", "low", "high")):
        return None
    return Mean(n=entry.get("n", 0), value=entry["value"], low=entry["low"], high=entry["high"])


def as_rate(entry: dict | None) -> Rate | None:
    """A Rate from its dict form, or None when `entry` is not one."""
    if not isinstance(entry, dict) or not {"k", "n", "value", "low", "high"} <= set(entry):
        return None
    if entry["value"] is None or not entry["n"]:  # nothing scored: no rate to show
        return None
    return Rate(k=entry["k"], n=entry["n"], value=entry["value"], low=entry["low"],
                high=entry["high"])


def fmt_rate(rate: Rate | None) -> str:
    """A rate and its 95% interval in percent.

    >>> fmt_rate(Rate(k=56, n=66, value=56 / 66, low=0.7427, high=0.9160))
    '84.8% [74.3, 91.6]'
    """
    if rate is None:
        return "—"
    return f"{100 * rate.value:.1f}% [{100 * rate.low:.1f}, {100 * rate.high:.1f}]"


def fmt_mean(mean: Mean | None, scale: float = 100.0, digits: int = 1) -> str:
    """A mean and its interval, e.g. ROUGE F1 x 100.

    >>> fmt_mean(Mean(n=50, value=0.3124, low=0.281, high=0.3452))
    '31.2 [28.1, 34.5]'
    """
    if mean is None:
        return "—"
    v, lo, hi = (round(scale * x, digits) for x in (mean.value, mean.low, mean.high))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_difference(diff: float, low: float, high: float) -> str:
    """A difference of rates in percentage points with its interval.

    >>> fmt_difference(0.2, 0.0524, 0.3339)
    '+20.0 pts [+5.2, +33.4]'
    """
    return f"{100 * diff:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]"


def fmt_loss(loss: dict | None) -> str:
    """Task loss (nats per reference token) with the per-example standard error."""
    if not isinstance(loss, dict) or loss.get("loss") is None:
        return "—"
    sem = loss.get("per_example_sem")
    return f"{loss['loss']:.3f}" + (f" ± {sem:.3f}" if sem is not None else "")


def mover_difference(a: Mean, b: Mean) -> tuple[float, float, float]:
    """(a - b, low, high) from the two means' own intervals by the method of variance
    estimates recovery (Zou and Donner 2008), the construction Newcombe's interval uses.

    >>> tuple(round(x, 4) for x in mover_difference(Mean(9, 0.5, 0.4, 0.6), Mean(9, 0.3, 0.2, 0.4)))
    (0.2, 0.0586, 0.3414)
    """
    diff = a.value - b.value
    low = diff - math.hypot(a.value - a.low, b.high - b.value)
    high = diff + math.hypot(a.high - a.value, b.value - b.low)
    return diff, low, high


def difference_cell(mine: Rate | Mean | None, reference: Rate | Mean | None) -> Cell:
    """mine - reference with a 95% interval (Newcombe's for rates, MOVER for means); strong
    when the interval excludes 0."""
    if mine is None or reference is None or not mine.n or not reference.n:
        return Cell("—")
    if isinstance(mine, Rate) and isinstance(reference, Rate):
        diff, low, high = difference_interval(mine, reference)
    else:
        diff, low, high = mover_difference(mine, reference)
    return Cell(fmt_difference(diff, low, high), strong=low > 0 or high < 0)


# ---------------------------------------------------------------- benchmarks


def prefill_parts(name: str) -> tuple[str, int]:
    """(base benchmark, k) for a prefilling-attack benchmark; k = 0 for a plain one.

    >>> prefill_parts("advbench [prefill k=3]"), prefill_parts("advbench")
    (('advbench', 3), ('advbench', 0))
    """
    match = PREFILL.match(name)
    return (match["base"], int(match["k"])) if match else (name, 0)


def benchmarks(study: Study) -> dict[str, str]:
    """name -> kind for every benchmark any model was scored on: harmful, then benign, then
    task, each in the order first met."""
    found: dict[str, str] = {}
    for model in study.models:
        for name, entry in ((model.metrics or {}).get("benchmarks") or {}).items():
            if isinstance(entry, dict):
                found.setdefault(name, str(entry.get("kind", "task")))
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[1], len(rank))))


def main_benchmark(study: Study, kind: str) -> str | None:
    """The first benchmark of `kind` that is not a prefilling attack."""
    return next((name for name, k in benchmarks(study).items()
                 if k == kind and prefill_parts(name)[1] == 0), None)


def prefill_groups(study: Study) -> dict[str, dict[int, str]]:
    """base benchmark -> {k: benchmark name}, with k = 0 for the plain benchmark if scored;
    only bases that have at least one prefilling attack."""
    groups: dict[str, dict[int, str]] = {}
    for name, kind in benchmarks(study).items():
        if kind == "harmful":
            base, k = prefill_parts(name)
            groups.setdefault(base, {})[k] = name
    return {base: dict(sorted(ks.items())) for base, ks in groups.items() if set(ks) - {0}}


def safety_metric(study: Study, name: str) -> str:
    """refusal_rate when the judge gives it (keyword, classifier), else attack_success_rate."""
    for model in study.models:
        if "refusal_rate" in (model.benchmark(name) or {}):
            return "refusal_rate"
    return "attack_success_rate"


def model_rate(model: ModelRun, name: str | None, metric: str) -> Rate | None:
    return as_rate((model.benchmark(name) or {}).get(metric)) if name else None


def task_metric(study: Study, name: str) -> str:
    """accuracy (exact-match metrics), else rougeL when the benchmark is scored by ROUGE."""
    entries = [m.benchmark(name) or {} for m in study.models]
    if any("accuracy" in e for e in entries) or not any("rougeL" in e for e in entries):
        return "accuracy"
    return "rougeL"


def task_score(model: ModelRun, name: str | None, metric: str) -> Rate | Mean | None:
    """The task benchmark's score: accuracy as a Rate, ROUGE-L F1 as a Mean."""
    if name is None:
        return None
    entry = (model.benchmark(name) or {}).get(metric)
    return as_rate(entry) if metric == "accuracy" else as_mean(entry)


def safety_rate(model: ModelRun, name: str | None) -> Rate | None:
    """The refusal rate, or 1 - ASR for judges that score harm instead of refusal (rubric,
    guard): in both, higher is safer."""
    refusal = model_rate(model, name, "refusal_rate")
    if refusal is not None:
        return refusal
    asr = model_rate(model, name, "attack_success_rate")
    if asr is None:
        return None
    return Rate(k=asr.n - asr.k, n=asr.n, value=1 - asr.value, low=1 - asr.high, high=1 - asr.low)


# ---------------------------------------------------------------- the results tables

LABELS = {"refusal_rate": "Refusal rate [95% CI]", "attack_success_rate": "ASR [95% CI]",
          "accuracy": "Accuracy [95% CI]", "rougeL": "ROUGE-L F1 ×100 [95% CI]"}


def _score(entry: dict, metric: str) -> Rate | Mean | None:
    return as_mean(entry.get(metric)) if metric == "rougeL" else as_rate(entry.get(metric))


def _fmt_score(score: Rate | Mean | None) -> str:
    return fmt_mean(score) if isinstance(score, Mean) else fmt_rate(score)


def _fmt_harmfulness(entry: dict) -> str:
    """The rubric's mean 1-5 score, with its bootstrap interval when recorded."""
    mean = as_mean(entry.get("harmfulness"))
    if mean is not None:
        return fmt_mean(mean, scale=1.0, digits=2)
    score = entry.get("mean_score")
    return "—" if score is None else f"{score:.2f}"


def _extra_columns(study: Study, name: str) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, entry -> text) for what a benchmark's entries carry beyond their main score."""
    entries = [m.benchmark(name) or {} for m in study.models]
    columns: list[tuple[str, Callable[[dict], str]]] = []
    if any(e.get("harmfulness") or e.get("mean_score") is not None for e in entries):
        columns.append(("Mean harmfulness (1-5)", _fmt_harmfulness))
    for key, label in (("rouge1", "ROUGE-1 ×100"), ("rouge2", "ROUGE-2 ×100")):
        if any(key in e for e in entries):
            columns.append((label, lambda e, key=key: fmt_mean(as_mean(e.get(key)))))
    if any("task_loss" in e for e in entries):
        columns.append(("Task loss (nats/token)", lambda e: fmt_loss(e.get("task_loss"))))
    return columns


def results_table(study: Study, name: str, kind: str) -> Table:
    """One row per model: n, the benchmark's score with its interval and the difference from
    the reference cell, then any task loss, ROUGE-1/2 or rubric harmfulness columns."""
    metric = task_metric(study, name) if kind == "task" else safety_metric(study, name)
    extra = _extra_columns(study, name)
    header = ("Model", "n", LABELS[metric], f"Δ vs {study.reference_name} [95% CI]",
              *(h for h, _ in extra))
    rows = []
    for model in study.models:
        entry = model.benchmark(name)
        if entry is None:
            why = "not evaluated" if model.metrics is not None else model.missing("eval")
            rows.append((model.label, "—", why, *["—"] * (len(header) - 3)))
            continue
        reference = study.reference_for(model)
        mine = _score(entry, metric)
        theirs = _score(reference.benchmark(name) or {}, metric) if reference else None
        diff = Cell("reference") if reference is model else difference_cell(mine, theirs)
        rows.append((model.label, str(entry.get("n", "—")), _fmt_score(mine), diff,
                     *(show(entry) for _, show in extra)))
    seeds = {m.seed for m in study.cells if m.cell.get("name") == study.reference_name}
    against = (f"the same seed's {study.reference_name} run (the first seed's for a row without "
               "a seed of its own: the seed and the aligned model)" if len(seeds) > 1
               else f"the {study.reference_name} cell")
    note = (f"Δ: points (x 100) against {against} with a 95% interval "
            "(Newcombe's for rates, MOVER from the bootstrap intervals for means); bold where "
            "the interval excludes 0.")
    if any(h.startswith("Task loss") for h, _ in extra):
        note += " Task loss: mean NLL per reference-answer token, ± the per-example SEM."
    return Table(header, tuple(rows), note)


def over_refusal_table(study: Study) -> Table | None:
    """Refusal on the main harmful benchmark next to refusal on the main benign one."""
    harmful, benign = main_benchmark(study, "harmful"), main_benchmark(study, "benign")
    if benign is None:
        return None
    rows = []
    for model in study.models:
        if model.metrics is None:
            rows.append((model.label, model.missing("eval"), "—"))
            continue
        rows.append((model.label, fmt_rate(model_rate(model, harmful, "refusal_rate")),
                     fmt_rate(model_rate(model, benign, "refusal_rate"))))
    return Table(("Model", f"Refusal on {harmful or 'no harmful benchmark'} (higher is safer)",
                  f"Over-refusal on {benign} (lower is better)"), tuple(rows))


# ---------------------------------------------------------------- summary rows and Pareto


def _pick_prefill(study: Study, harmful: str | None) -> str | None:
    """k = 3 of the main harmful benchmark's prefilling attacks if run, else the smallest k
    (of the first attacked benchmark when the main one was not attacked)."""
    groups = prefill_groups(study)
    ks = groups.get(harmful) if harmful in groups else next(iter(groups.values()), None)
    if not ks:
        return None
    attacked = {k: name for k, name in ks.items() if k > 0}
    return attacked.get(3) or attacked[min(attacked)]


def _fraction(rate: Rate | Mean | None) -> float | None:
    return None if rate is None else rate.value


def _interval(rate: Rate | Mean | None) -> list[float] | None:
    return None if rate is None else [rate.low, rate.high]


def summary(study: Study) -> dict[str, dict]:
    """Per model: refusal_rate (+ refusal_ci), prefill_refusal_rate, over_refusal_rate,
    task_accuracy (or task_rouge_l for ROUGE-scored tasks), task_loss; fractions, None where
    not measured; with the benchmarks they come from and the evaluation status."""
    harmful, benign = main_benchmark(study, "harmful"), main_benchmark(study, "benign")
    task, prefill = main_benchmark(study, "task"), _pick_prefill(study, harmful)
    names = {"refusal": harmful, "prefill": prefill, "over_refusal": benign, "task": task}
    rows = {}
    for model in study.models:
        refusal = model_rate(model, harmful, "refusal_rate")
        attacked = model_rate(model, prefill, "refusal_rate")
        over = model_rate(model, benign, "refusal_rate")
        accuracy = model_rate(model, task, "accuracy")
        loss = ((model.benchmark(task) or {}).get("task_loss") or {}) if task else {}
        rows[model.label] = {
            "status": "done" if model.metrics is not None else model.missing("eval"),
            "refusal_rate": _fraction(refusal), "refusal_ci": _interval(refusal),
            "attack_success_rate": _fraction(model_rate(model, harmful, "attack_success_rate")),
            "prefill_refusal_rate": _fraction(attacked), "prefill_refusal_ci": _interval(attacked),
            "prefill_k": prefill_parts(prefill)[1] if prefill else None,
            "over_refusal_rate": _fraction(over), "over_refusal_ci": _interval(over),
            "task_accuracy": _fraction(accuracy), "task_accuracy_ci": _interval(accuracy),
            "task_rouge_l": _fraction(task_score(model, task, "rougeL")),
            "task_loss": loss.get("loss"), "task_loss_sem": loss.get("per_example_sem"),
            "benchmarks": names,
        }
    return rows


def pareto_front(points: list[tuple[float, float]],
                 maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the points that no other point dominates (at least as good on both axes,
    better on one); `maximize` says which direction is better on each axis. Points with a
    NaN coordinate are never on the front.

    >>> pareto_front([(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.9, 0.05)])
    [0, 1]
    >>> pareto_front([(0.9, 2.0), (0.8, 1.0), (0.7, 1.5)], maximize=(True, False))
    [0, 1]
    """
    signs = [1.0 if up else -1.0 for up in maximize]
    scaled = [(signs[0] * x, signs[1] * y) for x, y in points]
    valid = [i for i, p in enumerate(scaled) if not any(math.isnan(v) for v in p)]

    def dominated(p):
        return any(scaled[j] != p and scaled[j][0] >= p[0] and scaled[j][1] >= p[1]
                   for j in valid)

    return [i for i in valid if not dominated(scaled[i])]
