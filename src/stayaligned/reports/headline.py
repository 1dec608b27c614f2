"""The report's headline: per fine-tune (pooled over seeds) the kept share of the aligned seed's
refusal rate with its interval, prefilled refusal, over-refusal and task loss against sft, and
the cost per step; plus a recommendation computed from those numbers.

Every quantity compares models under one template and one judge: a cell is read under its own
eval template when the study evaluated that template (PTST and sft-safe under native:safe),
else under the first; the aligned seed and sft are then taken under that same template. When
the study has no evaluation of them under that template the entry is "—" with the reason, never
a ratio of rates measured under different templates. Pooling: reports/pooling.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from stayaligned.reports import pooling
from stayaligned.reports.pooling import Pooled
from stayaligned.reports.study_files import ModelRun, Study
from stayaligned.reports.tables import pareto_front, prefill_parts
from stayaligned.runfiles import timed_steps

REFERENCE_LABELS = ("seed", "aligned")


@dataclass
class Headline:
    """One fine-tune's headline numbers (fractions; None where not measurable)."""

    cell: str
    template: str | None
    judge: str | None
    runs: list[ModelRun]
    kept: Pooled | None = None
    kept_vs_sft: Pooled | None = None
    kept_other_judge: Pooled | None = None
    refusal: Pooled | None = None
    prefill: Pooled | None = None
    prefill_k: int | None = None
    over_refusal: Pooled | None = None
    over_refusal_vs_sft: Pooled | None = None
    task_loss: float | None = None
    task_loss_vs_sft: float | None = None  # relative: loss / sft's - 1
    aligned_task_loss: float | None = None  # the aligned seed's, under the same template
    cost: str = "—"
    why: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- roles


def judges(study: Study) -> list[str]:
    """The study's judges, headline judge first: the study's `headline_judge` when set, else
    the classifier judge when there is one (higher human agreement than keyword on XSTest,
    bench/results/judges.json), else the first."""
    found = list(dict.fromkeys(v.judge for m in study.models for v in m.views))
    chosen = study.config.get("headline_judge")
    return sorted(found, key=lambda j: (j != chosen, j != "classifier"))


def templates(study: Study) -> list[str]:
    """Templates in the order of the eval folders (eval/ first)."""
    return list(dict.fromkeys(v.template for m in study.models for v in
                              sorted(m.views, key=lambda v: (v.folder != "eval", v.folder))))


def benchmark_roles(study: Study) -> dict[str, str | None]:
    """The main harmful, its prefilled variant (k = 3 if run, else the smallest k), benign and
    task benchmark names."""
    kinds: dict[str, str] = {}
    for m in study.models:
        for v in m.views:
            for name, entry in (v.metrics.get("benchmarks") or {}).items():
                kinds.setdefault(name, str(entry.get("kind", "task")))
    plain = [n for n, k in kinds.items() if k == "harmful" and prefill_parts(n)[1] == 0]
    harmful = plain[0] if plain else None
    attacked = {prefill_parts(n)[1]: n for n, k in kinds.items() if k == "harmful"
                and prefill_parts(n)[1] > 0 and prefill_parts(n)[0] == harmful}
    prefill = attacked.get(3) or (attacked[min(attacked)] if attacked else None)
    return {"harmful": harmful, "prefill": prefill,
            "benign": next((n for n, k in kinds.items() if k == "benign"), None),
            "task": next((n for n, k in kinds.items() if k == "task"), None)}


def groups(study: Study) -> dict[str, list[ModelRun]]:
    """Fine-tune cell -> its seed runs (dose runs are not headline rows)."""
    out: dict[str, list[ModelRun]] = {}
    for m in study.cells:
        if m.dose is None:
            out.setdefault(m.group, []).append(m)
    return out


def own_template(runs: list[ModelRun], available: list[str]) -> str | None:
    """The template a cell is read under: its runs' recorded eval template when evaluated
    under it, else the first available one."""
    recorded = next((((m.run or {}).get("templates") or {}).get("eval") for m in runs
                     if (m.run or {}).get("templates")), None)
    if recorded in available:
        return recorded
    return available[0] if available else None


# ---------------------------------------------------------------- pooled numbers


def matrices(runs: list[ModelRun], template: str, judge: str, bench: str | None,
             ids: list[str] | None = None):
    """(seeds x items verdicts, item ids) of `runs` on `bench` under (template, judge)."""
    per_seed = [v.verdicts.get(bench) for m in runs if (v := m.view(template, judge))]
    per_seed = [p for p in per_seed if p]
    if not bench or not per_seed:
        return None, []
    ids = ids or pooling.shared_items([per_seed])
    return pooling.verdict_matrix(per_seed, ids), ids


def _pair(a_runs, b_runs, template, judge, bench):
    """Verdict matrices of two groups on their shared items (None when either is missing)."""
    a, _ = matrices(a_runs, template, judge, bench)
    b, _ = matrices(b_runs, template, judge, bench)
    if a is None or b is None:
        return None, None
    ids = pooling.shared_items([
        [v.verdicts[bench] for m in runs if (v := m.view(template, judge)) and bench in v.verdicts]
        for runs in (a_runs, b_runs)])
    if not ids:
        return None, None
    return matrices(a_runs, template, judge, bench, ids)[0], \
        matrices(b_runs, template, judge, bench, ids)[0]


def kept(runs, aligned, template, judge, bench) -> Pooled | None:
    cell, ref = _pair(runs, [aligned], template, judge, bench)
    if cell is None or not np.nanmean(ref):
        return None
    return pooling.kept_share(cell, ref)


def kept_vs(runs, other, aligned, template, judge, bench) -> Pooled | None:
    ids = pooling.shared_items([
        [v.verdicts[bench] for m in rs if (v := m.view(template, judge)) and bench in v.verdicts]
        for rs in (runs, other, [aligned])]) if bench else []
    if not ids:
        return None
    mats = [matrices(rs, template, judge, bench, ids)[0] for rs in (runs, other, [aligned])]
    if any(m is None for m in mats) or not np.nanmean(mats[2]):
        return None
    return pooling.kept_difference(*mats)


def rate(runs, template, judge, bench) -> Pooled | None:
    m, _ = matrices(runs, template, judge, bench)
    return None if m is None else pooling.pooled_rate(m)


def rate_vs(runs, other, template, judge, bench) -> Pooled | None:
    a, b = _pair(runs, other, template, judge, bench)
    return None if a is None else pooling.rate_difference(a, b)


def task_loss(runs: list[ModelRun], template: str, judge: str, task: str | None) -> float | None:
    """Mean over seeds of the task benchmark's held-out loss under `template`."""
    values = []
    for m in runs:
        v = m.view(template, judge)
        loss = (((v.metrics.get("benchmarks") or {}).get(task) or {}).get("task_loss") or {}) \
            if v and task else {}
        if isinstance(loss.get("loss"), (int, float)) and math.isfinite(loss["loss"]):
            values.append(loss["loss"])
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- rows


@dataclass
class TemplateRow:
    """One model's numbers under one template and judge (the per-template tables)."""

    name: str
    refusal: Pooled | None
    prefill: Pooled | None
    over_refusal: Pooled | None
    task_loss: float | None
    kept: Pooled | None = None  # None for the aligned seed: it is the reference
    kept_vs_ref: Pooled | None = None  # None for the reference cell itself


def template_rows(study: Study, template: str, judge: str) -> list[TemplateRow]:
    """The aligned seed (first, when the study has one) and every fine-tune cell evaluated under
    `template`, pooled over seeds; kept shares and their differences from the study's reference
    cell (sft) only within `template`. A cell evaluated under fewer templates
    (cells[].eval_templates) has no row under the others."""
    roles, ref = benchmark_roles(study), study.reference_name
    aligned = next((m for m in study.models if m.label == "aligned"), None)
    cells = groups(study)

    def row(name, runs, **pooled) -> TemplateRow:
        return TemplateRow(name, rate(runs, template, judge, roles["harmful"]),
                           rate(runs, template, judge, roles["prefill"]),
                           rate(runs, template, judge, roles["benign"]),
                           task_loss(runs, template, judge, roles["task"]), **pooled)

    rows = [row("aligned", [aligned])] if aligned is not None else []
    for name, runs in cells.items():
        if not any(m.view(template, judge) for m in runs):
            continue
        rows.append(row(
            name, runs,
            kept=kept(runs, aligned, template, judge, roles["harmful"]) if aligned else None,
            kept_vs_ref=kept_vs(runs, cells[ref], aligned, template, judge, roles["harmful"])
            if aligned and name != ref and cells.get(ref) else None))
    return rows


def cost_per_step(cell: dict, runs: list[ModelRun], sft_runs: list[ModelRun],
                  overhead: dict | None, study_name: str | None = None) -> str:
    """× sft per training step: from the overhead bench when given and it has the cell (by
    cell name only when the bench measured this very study, `overhead.py --study`; else by
    the methods joined, or the single method), else measured in this study (train seconds /
    steps, on a machine the cells may have shared)."""
    if overhead:
        methods = list(cell.get("methods") or ["sft"])
        mine = (overhead.get("meta") or {}).get("study") == study_name
        keys = (cell.get("name"),) if mine else (
            "+".join(methods), methods[0] if len(methods) == 1 else None)
        for key in keys:
            entry = overhead.get(key) if key else None
            if isinstance(entry, dict) and entry.get("time_ratio") is not None:
                ratio = entry.get("step_ratio", entry["time_ratio"])
                where = "this study's regime" if mine else "bench"
                return f"×{ratio:.2f} ({entry.get('step_s_median', 0):.1f} s, {where})"

    def per_step(rs):
        xs = [m.run["train_seconds"] / timed_steps(m.run) for m in rs  # a resumed run timed
              if m.run and m.run.get("train_seconds") and timed_steps(m.run)]  # fewer steps
        return sum(xs) / len(xs) if xs else None

    mine, sft = per_step(runs), per_step(sft_runs)
    if mine is None:
        return "—"
    return f"×{mine / sft:.2f} ({mine:.1f} s)" if sft else f"{mine:.1f} s"


def headline_rows(study: Study, overhead: dict | None = None) -> list[Headline]:
    """One Headline per fine-tune cell (pooled over seeds), in the study's cell order."""
    judge_list, available = judges(study), templates(study)
    roles = benchmark_roles(study)
    aligned = next((m for m in study.models if m.label == "aligned"), None)
    cells = groups(study)
    sft = cells.get(study.reference_name, [])
    rows = []
    for name, runs in cells.items():
        template = own_template(runs, available)
        judge = judge_list[0] if judge_list else None
        row = Headline(name, template, judge, runs)
        rows.append(row)
        if template is None or judge is None:
            row.why.append("not evaluated")
            continue
        _fill(row, runs, sft, aligned, roles, judge_list)
        row.cost = cost_per_step(runs[0].cell or {}, runs, sft, overhead, study.name)
    costs = {r.cell: r.cost for r in rows}
    for row in rows:  # a repair: the fine-tune it repairs, plus the repair once
        spec = row.runs[0].repair_spec
        if spec:
            row.cost = repair_cost(costs.get(spec.get("of"), "—"), row.runs, spec)
    return rows


def repair_cost(finetune: str, runs: list[ModelRun], spec: dict) -> str:
    """A repair cell's cost: its fine-tune's per step plus the repair's one-time seconds
    (mean over seeds, the validation sweep included).

    >>> from types import SimpleNamespace as S
    >>> repair_cost("×1.00 (3.2 s, bench)", [S(repair={"seconds": 300}), S(repair={"seconds": 500})],
    ...             {"of": "sft", "method": "resta"})
    '×1.00 (3.2 s, bench) + resta 400 s once'
    """
    seconds = [m.repair["seconds"] for m in runs if m.repair and m.repair.get("seconds")]
    once = f"{sum(seconds) / len(seconds):.0f} s once" if seconds else "time not recorded"
    return f"{finetune} + {spec.get('method', 'repair')} {once}"


def _fill(row: Headline, runs, sft, aligned, roles, judge_list) -> None:
    t, j, harmful = row.template, row.judge, roles["harmful"]
    if aligned is None or aligned.view(t, j) is None:
        row.why.append(f"the aligned seed was not evaluated under {t}: no kept share")
    else:
        row.kept = kept(runs, aligned, t, j, harmful)
        if len(judge_list) > 1:
            row.kept_other_judge = kept(runs, aligned, t, judge_list[1], harmful)
        if sft and runs is not sft and any(m.view(t, j) for m in sft):
            row.kept_vs_sft = kept_vs(runs, sft, aligned, t, j, harmful)
    row.refusal = rate(runs, t, j, harmful)
    row.prefill = rate(runs, t, j, roles["prefill"])
    row.prefill_k = prefill_parts(roles["prefill"])[1] if roles["prefill"] else None
    row.over_refusal = rate(runs, t, j, roles["benign"])
    row.task_loss = task_loss(runs, t, j, roles["task"])
    if aligned is not None:
        row.aligned_task_loss = task_loss([aligned], t, j, roles["task"])
    if sft and runs is not sft:
        if not any(m.view(t, j) for m in sft):
            row.why.append(f"sft was not evaluated under {t}: no Δ vs sft")
            return
        row.over_refusal_vs_sft = rate_vs(runs, sft, t, j, roles["benign"])
        reference = task_loss(sft, t, j, roles["task"])
        if row.task_loss is not None and reference:
            row.task_loss_vs_sft = row.task_loss / reference - 1


# ---------------------------------------------------------------- text


def pct(p: Pooled | None, signed: bool = False) -> str:
    """A pooled fraction in percent with its interval.

    >>> pct(Pooled(0.5, 0.4, 0.61, 3, 200)), pct(Pooled(0.1, -0.02, 0.2, 3, 200), signed=True)
    ('50% [40, 61]', '+10 pts [-2, +20]')
    """
    if p is None or not math.isfinite(p.value):
        return "—"
    if signed:
        return f"{100 * p.value:+.0f} pts [{100 * p.low:+.0f}, {100 * p.high:+.0f}]"
    return f"{100 * p.value:.0f}% [{100 * p.low:.0f}, {100 * p.high:.0f}]"


def recommendation(rows: list[Headline], reference: str = "sft") -> str:
    """One line from the numbers: the Pareto-optimal fine-tunes on (kept share up, task loss
    down), each with what it trades, and the safest one within 5% of sft's task loss. A
    fine-tune whose task loss is no lower than the aligned seed's gained nothing from its
    fine-tuning (a repair that gave back the aligned model, say): named, not a choice."""
    placed = [r for r in rows if r.kept is not None and r.task_loss is not None]
    no_gain = [r for r in placed if r.aligned_task_loss is not None
               and r.task_loss >= r.aligned_task_loss]
    placed = [r for r in placed if r not in no_gain]
    if not placed:
        return ("Recommendation: not computable yet (needs the kept share and task loss of "
                "the fine-tunes under one template).")
    front = [placed[i] for i in pareto_front([(r.kept.value, r.task_loss) for r in placed],
                                             maximize=(True, False))]
    front.sort(key=lambda r: -r.kept.value)

    def trade(r: Headline) -> str:
        parts = [f"keeps {100 * r.kept.value:.0f}%"]
        if r.cell == reference:
            parts.append("the reference task loss")
        elif r.task_loss_vs_sft is not None:
            parts.append(f"task loss {100 * r.task_loss_vs_sft:+.1f}% vs {reference}")
        if r.over_refusal_vs_sft is not None:
            parts.append(f"over-refusal {100 * r.over_refusal_vs_sft.value:+.0f} pts")
        return f"{r.cell} ({', '.join(parts)}; tested with {r.template})"

    text = ("Recommendation (computed from the table): the Pareto-optimal fine-tunes on kept "
            f"share against task loss are {'; '.join(trade(r) for r in front)}.")
    near = [r for r in placed if r.cell != reference and r.task_loss_vs_sft is not None
            and r.task_loss_vs_sft <= 0.05]
    if near:
        best = max(near, key=lambda r: r.kept.value)
        sure = best.kept_vs_sft is not None and best.kept_vs_sft.low > 0
        verdict = ("the pooled interval of its gain over " + reference + " excludes zero"
                   if sure else "but the pooled interval of its difference from " + reference
                   + " includes zero")
        text += (f" Within 5% of {reference}'s task loss the safest is {best.cell}, keeping "
                 f"{100 * best.kept.value:.0f}% ({verdict}).")
    if no_gain:
        text += (" Not a choice (task loss no lower than the aligned seed's, so nothing gained "
                 "from fine-tuning): " + ", ".join(r.cell for r in no_gain) + ".")
    return text
