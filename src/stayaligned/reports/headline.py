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

from stayaligned.reports import groups as grouping
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
    task_accuracy: Pooled | None = None  # exact-match tasks (GSM8K): pooled like a rate
    task_accuracy_vs_sft: Pooled | None = None  # difference in accuracy (fraction)
    aligned_task_loss: float | None = None  # the aligned seed's, under the same template
    cost: str = "—"
    cost_notes: list[str] = field(default_factory=list)  # e.g. a repair left out of the mean
    why: list[str] = field(default_factory=list)
    seeds: list = field(default_factory=list)  # the seeds pooled (evaluated under template)
    seed_notes: list[str] = field(default_factory=list)  # missing seeds, narrower comparisons


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


def groups(study: Study, readings: bool = False) -> dict[str, list[ModelRun]]:
    """Fine-tune cell -> its seed runs (dose runs are not headline rows); with `readings`,
    the `model_of` cells too, in the study's cell order."""
    return {name: runs for name, runs in grouping.groups(study, readings).items()
            if runs[0].cell is not None and runs[0].dose is None}


def own_template(runs: list[ModelRun], available: list[str]) -> str | None:
    """The template a cell is read under: its runs' recorded eval template when evaluated
    under it, else the first available one."""
    recorded = next((m.read_template for m in runs if m.read_template), None)
    if recorded in available:
        return recorded
    return available[0] if available else None


# ---------------------------------------------------------------- pooled numbers


def seed_of(m: ModelRun):
    """A run's key in per-seed matrices: its training seed (the label for the seed and
    aligned rows, which have none)."""
    return m.seed if m.seed is not None else m.label


def _items(view, bench: str) -> dict[str, bool] | None:
    """item id -> verdict on `bench`: refused on a safety benchmark, answered correctly on a
    task benchmark scored by exact match (its accuracy)."""
    return view.verdicts.get(bench) or view.correct.get(bench)


def per_seed(runs: list[ModelRun], template: str, judge: str, bench: str | None) -> dict:
    """seed -> item verdicts of `runs` on `bench` under (template, judge), in run order; a
    seed not evaluated there is absent."""
    if not bench:
        return {}
    return {seed_of(m): items for m in runs
            if (v := m.view(template, judge)) and (items := _items(v, bench))}


def shared_seeds(*groups: list[ModelRun], template: str, judge: str, bench: str | None) -> list:
    """The seeds every group has verdicts for, in the first group's order: a comparison of
    two cells pools only the seeds both were evaluated with (never one cell's seeds 0 and 2
    against the other's 0, 1 and 2)."""
    sets = [per_seed(g, template, judge, bench) for g in groups]
    return [k for k in sets[0] if all(k in other for other in sets[1:])] if sets else []


def matrices(runs: list[ModelRun], template: str, judge: str, bench: str | None,
             ids: list[str] | None = None, seeds: list | None = None):
    """(seeds x items verdicts, item ids) of `runs` on `bench` under (template, judge); rows
    keyed by seed id: `seeds` (in that order) when given, else every seed evaluated there."""
    found = per_seed(runs, template, judge, bench)
    order = [k for k in seeds if k in found] if seeds is not None else list(found)
    rows = [found[k] for k in order]
    if not bench or not rows:
        return None, []
    ids = ids or pooling.shared_items([rows])
    return pooling.verdict_matrix(rows, ids), ids


def _pair(a_runs, b_runs, template, judge, bench):
    """Verdict matrices of two groups on their shared seeds (rows in the same seed order,
    so the bootstrap pairs them seed by seed) and shared items (None when either is
    missing)."""
    seeds = shared_seeds(a_runs, b_runs, template=template, judge=judge, bench=bench)
    if not seeds:
        return None, None
    ids = pooling.shared_items([
        [per_seed(runs, template, judge, bench)[k] for k in seeds] for runs in (a_runs, b_runs)])
    if not ids:
        return None, None
    return matrices(a_runs, template, judge, bench, ids, seeds)[0], \
        matrices(b_runs, template, judge, bench, ids, seeds)[0]


def kept(runs, aligned, template, judge, bench) -> Pooled | None:
    """The cell's pooled refusal rate (every seed evaluated there) over the aligned seed's,
    on the items both have."""
    mine, ref = (list(per_seed(rs, template, judge, bench).values()) for rs in (runs, [aligned]))
    ids = pooling.shared_items([mine, ref]) if mine and ref else []
    if not ids:
        return None
    cell, ref = (pooling.verdict_matrix(rows, ids) for rows in (mine, ref))
    if not np.nanmean(ref):
        return None
    return pooling.kept_share(cell, ref)


def kept_vs(runs, other, aligned, template, judge, bench) -> Pooled | None:
    """Kept share of `runs` minus `other`'s, over the seeds both have (paired by seed)."""
    seeds = shared_seeds(runs, other, template=template, judge=judge, bench=bench)
    if not seeds or not per_seed([aligned], template, judge, bench):
        return None
    ids = pooling.shared_items([
        [per_seed(rs, template, judge, bench)[k] for k in seeds] for rs in (runs, other)]
        + [list(per_seed([aligned], template, judge, bench).values())])
    if not ids:
        return None
    mats = [matrices(rs, template, judge, bench, ids, seeds)[0] for rs in (runs, other)]
    mats.append(matrices([aligned], template, judge, bench, ids)[0])
    if any(m is None for m in mats) or not np.nanmean(mats[2]):
        return None
    return pooling.kept_difference(*mats)


def rate(runs, template, judge, bench) -> Pooled | None:
    m, _ = matrices(runs, template, judge, bench)
    return None if m is None else pooling.pooled_rate(m)


def rate_vs(runs, other, template, judge, bench) -> Pooled | None:
    a, b = _pair(runs, other, template, judge, bench)
    return None if a is None else pooling.rate_difference(a, b)


def task_losses(runs: list[ModelRun], template: str, judge: str, task: str | None) -> dict:
    """seed -> the task benchmark's held-out loss under `template` (seeds without one absent)."""
    out = {}
    for m in runs:
        v = m.view(template, judge)
        loss = (((v.metrics.get("benchmarks") or {}).get(task) or {}).get("task_loss") or {}) \
            if v and task else {}
        if isinstance(loss.get("loss"), (int, float)) and math.isfinite(loss["loss"]):
            out[seed_of(m)] = loss["loss"]
    return out


def task_loss(runs: list[ModelRun], template: str, judge: str, task: str | None) -> float | None:
    """Mean over seeds of the task benchmark's held-out loss under `template`."""
    values = list(task_losses(runs, template, judge, task).values())
    return sum(values) / len(values) if values else None


def task_loss_vs(runs, other, template, judge, task) -> float | None:
    """Relative task loss of `runs` against `other` (mean loss / other's - 1) over the seeds
    both have a loss for."""
    mine, ref = (task_losses(rs, template, judge, task) for rs in (runs, other))
    seeds = [k for k in mine if k in ref]
    if not seeds:
        return None
    a, b = (sum(d[k] for k in seeds) / len(seeds) for d in (mine, ref))
    return a / b - 1 if b else None


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
    task_accuracy: Pooled | None = None  # exact-match tasks (GSM8K)


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
                           task_loss(runs, template, judge, roles["task"]),
                           task_accuracy=rate(runs, template, judge, roles["task"]), **pooled)

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


def step_ratio(entry: dict | None, sft: dict | None) -> float | None:
    """An overhead-bench entry's time per optimiser step over sft's: its `step_ratio`, else
    its `step_s_median` over sft's (older benches recorded only `time_ratio`, a token
    throughput ratio, which is not a per-step cost and is never shown as one).

    >>> step_ratio({"time_ratio": 0.88, "step_s_median": 3.18}, {"step_s_median": 3.2})
    0.99375
    >>> step_ratio({"time_ratio": 0.88}, {"step_s_median": 3.2}) is None
    True
    """
    if not isinstance(entry, dict):
        return None
    if entry.get("step_ratio") is not None:
        return float(entry["step_ratio"])
    mine, base = entry.get("step_s_median"), (sft or {}).get("step_s_median")
    if isinstance(mine, (int, float)) and isinstance(base, (int, float)) and base > 0:
        return mine / base
    return None


def cost_per_step(cell: dict, runs: list[ModelRun], sft_runs: list[ModelRun],
                  overhead: dict | None, study_name: str | None = None) -> str:
    """× sft per training step: from the overhead bench when given and it has the cell (by
    cell name only when the bench measured this very study, `overhead.py --study`; else by
    the methods joined, or the single method), its seconds per step over sft's (`step_ratio`),
    else measured in this study (train seconds / steps, on a machine the cells may have
    shared)."""
    if overhead:
        methods = list(cell.get("methods") or ["sft"])
        mine = (overhead.get("meta") or {}).get("study") == study_name
        keys = (cell.get("name"),) if mine else (
            "+".join(methods), methods[0] if len(methods) == 1 else None)
        for key in keys:
            entry = overhead.get(key) if key else None
            ratio = step_ratio(entry, overhead.get("sft")) if isinstance(entry, dict) else None
            if ratio is not None:
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
    cells = groups(study, readings=True)
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
            row.cost_notes += [f"{row.cell}: {why}" for why in repair_timing(row.runs)[2]]
    return rows


def repair_timing(runs: list[ModelRun]) -> tuple[list[float], list[float], list[str]]:
    """(wall seconds per seed, CPU seconds per seed, why a seed was left out) of a repair
    cell's one-time cost, its validation sweep included. Each seed's repair.json
    `seconds_total` (with what earlier attempts spent on the evaluations a resumed repair
    reused) when recorded; else its `seconds`, unless that times only a resumed attempt: a
    validation evaluation in its sweep that took 0 s was reused from an earlier attempt, so
    that seed is left out (and said), never averaged in as if it were the whole repair. CPU
    seconds from progress.json, for seeds timed in one attempt."""
    wall, cpu, left_out = [], [], []
    for m in runs:
        record = m.repair or {}
        total, this = record.get("seconds_total"), record.get("seconds")
        reused = [name for name, t in m.sweep_seconds.items()
                  if isinstance(t.get("seconds"), (int, float)) and t["seconds"] <= 0]
        if isinstance(total, (int, float)) and total > 0:
            wall.append(float(total))
            resumed = total > (this or 0) + 1
        elif not isinstance(this, (int, float)) or this <= 0:
            continue
        elif reused:
            left_out.append(f"seed {m.seed}'s repair was resumed and timed its last attempt "
                            f"only ({this:.0f} s; {len(reused)} of {len(m.sweep_seconds)} "
                            "validation evaluations reused from an earlier attempt): left "
                            "out of the mean")
            continue
        else:
            wall.append(float(this))
            resumed = False
        spent = (m.progress.get("repair") or {}).get("cpu_seconds")
        if isinstance(spent, (int, float)) and not resumed:
            cpu.append(float(spent))
    return wall, cpu, left_out


def repair_cost(finetune: str, runs: list[ModelRun], spec: dict) -> str:
    """A repair cell's cost: its fine-tune's per step plus the repair's one-time wall seconds
    (mean over the seeds timed in full, `repair_timing`; the validation sweep included), with
    the CPU seconds beside them when every one of those seeds has them.

    >>> from types import SimpleNamespace as S
    >>> repair_cost("×1.00 (3.2 s, bench)", [S(repair={"seconds": 300}, sweep_seconds={},
    ...             progress={}, seed=0), S(repair={"seconds": 500}, sweep_seconds={},
    ...             progress={}, seed=1)], {"of": "sft", "method": "resta"})
    '×1.00 (3.2 s, bench) + resta 400 s once'
    """
    wall, cpu, left_out = repair_timing(runs)
    if wall:
        once = f"{sum(wall) / len(wall):.0f} s once"
        if cpu and len(cpu) == len(wall):
            once += f" (CPU {sum(cpu) / len(cpu):.0f} s)"
        if left_out:
            once += f" ({len(wall)} of {len(wall) + len(left_out)} seeds)"
    else:
        once = "time not recorded" + (" in full" if left_out else "")
    return f"{finetune} + {spec.get('method', 'repair')} {once}"


def _fill(row: Headline, runs, sft, aligned, roles, judge_list) -> None:
    t, j, harmful = row.template, row.judge, roles["harmful"]
    row.seeds = [seed_of(m) for m in runs if m.view(t, j)]
    if row.seeds and len(row.seeds) < len(runs):
        missing = [str(seed_of(m)) for m in runs if not m.view(t, j)]
        row.seed_notes.append(f"{row.cell}: pooled over {len(row.seeds)} of {len(runs)} seeds "
                              f"(seed {', '.join(missing)} not evaluated under {t})")
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
    row.task_accuracy = rate(runs, t, j, roles["task"])
    if aligned is not None:
        row.aligned_task_loss = task_loss([aligned], t, j, roles["task"])
    if sft and runs is not sft:
        if not any(m.view(t, j) for m in sft):
            row.why.append(f"sft was not evaluated under {t}: no Δ vs sft")
            return
        row.over_refusal_vs_sft = rate_vs(runs, sft, t, j, roles["benign"])
        row.task_accuracy_vs_sft = rate_vs(runs, sft, t, j, roles["task"])
        if row.task_loss is not None:
            row.task_loss_vs_sft = task_loss_vs(runs, sft, t, j, roles["task"])
        shared = shared_seeds(runs, sft, template=t, judge=j, bench=harmful)
        if shared and shared != row.seeds:
            row.seed_notes.append(
                f"{row.cell}: compared with {sft[0].group}'s runs of seed(s) "
                f"{', '.join(map(str, shared))} only (the seeds both were evaluated with)")


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
    relative to sft's under the same template down; sft at 0), each with what it trades, and the safest one within 5% of sft's task loss. A
    fine-tune whose task loss is no lower than the aligned seed's gained nothing from its
    fine-tuning (a repair that gave back the aligned model, say): named, not a choice."""
    placed = [r for r in rows if r.kept is not None and r.task_loss is not None]
    no_gain = [r for r in placed if r.aligned_task_loss is not None
               and r.task_loss >= r.aligned_task_loss]
    placed = [r for r in placed if r not in no_gain]
    if not placed:
        return ("Recommendation: not computable yet (needs the kept share and task loss of "
                "the fine-tunes under one template).")
    # the loss axis is each fine-tune's task loss relative to sft under its own template (sft
    # at 0): raw losses read under different templates (PTST under native:safe) differ by the
    # template as well as by the fine-tune
    unplaced = [r for r in placed if r.cell != reference and r.task_loss_vs_sft is None]
    placed = [r for r in placed if r not in unplaced]
    if not placed:
        return ("Recommendation: not computable yet (needs the kept share and the task loss "
                f"against {reference}'s of the fine-tunes under one template).")
    front = [placed[i] for i in pareto_front(
        [(r.kept.value, 0.0 if r.cell == reference else r.task_loss_vs_sft) for r in placed],
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
        if r.task_accuracy_vs_sft is not None:
            parts.append(f"task accuracy {100 * r.task_accuracy_vs_sft.value:+.0f} pts")
        return f"{r.cell} ({', '.join(parts)}; tested with {r.template})"

    text = ("Recommendation (computed from the table): the Pareto-optimal fine-tunes on kept "
            f"share against task loss relative to {reference}'s under the same template are "
            f"{'; '.join(trade(r) for r in front)}.")
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
    if unplaced:
        text += (f" Not placed (no task loss against {reference}'s under the same template): "
                 + ", ".join(r.cell for r in unplaced) + ".")
    if no_gain:
        text += (" Not a choice (task loss no lower than the aligned seed's, so nothing gained "
                 "from fine-tuning): " + ", ".join(r.cell for r in no_gain) + ".")
    return text
