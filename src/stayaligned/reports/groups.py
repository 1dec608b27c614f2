"""Models grouped for the report's plots: a cell's seed runs pooled (one point per cell, its
rate pooled over seeds by reports/pooling.py, its task loss and depth curve averaged over
seeds), and one colour per cell, the same in every plot."""

from __future__ import annotations

import math

from stayaligned.reports import pooling
from stayaligned.reports.study_files import ModelRun, Study, View
from stayaligned.reports.tables import safety_rate, task_score


def primary(model: ModelRun) -> View | None:
    """The view the model's tables read (`model.metrics`): eval/, or its re-judgment by the
    study's headline judge, so that pooled rates use the same judge as single-run ones."""
    return next((v for v in model.views if v.folder == model.primary), None)


def group_rate(runs: list[ModelRun], name: str | None):
    """A group's rate on `name` from each run's eval/: the run's own Rate (Wilson interval)
    for one seed, pooled over seeds (cluster bootstrap, reports/pooling.py) for several."""
    if name is None:
        return None
    if len(runs) == 1:
        return safety_rate(runs[0], name)
    per_seed = [v.verdicts.get(name) for m in runs if (v := primary(m)) and v.verdicts.get(name)]
    if not per_seed:
        return None
    ids = pooling.shared_items([per_seed])
    return pooling.pooled_rate(pooling.verdict_matrix(per_seed, ids)) if ids else None


def groups(study: Study, readings: bool = False) -> dict[str, list[ModelRun]]:
    """Model groups in row order: seed, aligned, each cell pooled over its seeds, each dose
    run; with `readings`, the `model_of` cells too, in the study's cell order."""
    runs = list(study.models)
    if readings and study.readings:
        rank = {run_id: i for i, run_id in enumerate(study.manifest.get("cells") or [])}
        runs = sorted(runs + study.readings,
                      key=lambda m: (m.cell is not None, rank.get(m.label, len(rank))))
    out: dict[str, list[ModelRun]] = {}
    for m in runs:
        out.setdefault(m.group, []).append(m)
    return out


def group_score(runs: list[ModelRun], task: str, metric: str):
    """The task score of one run, or the mean over seeds (no interval) for several."""
    scores = [s for m in runs if (s := task_score(m, task, metric))]
    if len(scores) <= 1:
        return scores[0] if scores else None
    from stayaligned.reports.tables import Mean

    value = sum(x.value for x in scores) / len(scores)
    return Mean(n=sum(x.n for x in scores), value=value, low=min(x.value for x in scores),
                high=max(x.value for x in scores))


def group_loss(runs: list[ModelRun], task: str) -> dict:
    """One run's task loss as evaluated (with its `per_example_sem`, over the benchmark's
    examples), or for several seeds the mean over seeds with `between_seed_sem`, the standard
    error of that mean across the seeds (not a per-example figure)."""
    losses = [(m.benchmark(task) or {}).get("task_loss") or {} for m in runs]
    losses = [x for x in losses if x.get("loss") is not None]
    if len(losses) <= 1:
        return losses[0] if losses else {}
    mean = sum(x["loss"] for x in losses) / len(losses)
    sd = math.sqrt(sum((x["loss"] - mean) ** 2 for x in losses) / (len(losses) - 1))
    return {"loss": mean, "between_seed_sem": sd / math.sqrt(len(losses)), "seeds": len(losses)}


def colours(study: Study) -> dict[str, str]:
    """One matplotlib colour per model (a cell's seeds and dose runs share its colour), in row
    order, the same in every plot, keyed by run label and by group name: the default cycle for
    up to 10 models, then tab20's 20 distinct colours."""
    names = list(dict.fromkeys(m.dose[0] if m.dose else m.group for m in study.models))
    if len(names) <= 10:
        palette = [f"C{i}" for i in range(10)]
    else:
        import matplotlib

        palette = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    by_name = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    out = dict(by_name)
    for m in study.models:
        out[m.label] = by_name[m.dose[0] if m.dose else m.group]
        out.setdefault(m.group, out[m.label])
    return out



def pooled_depth(results: list[dict]) -> dict | None:
    """One seed's depth result, or the mean over seeds of the per-position KL (bars: the SEM
    over seeds)."""
    if len(results) <= 1:
        return results[0] if results else None
    positions = results[0].get("positions") or []
    means, sems = [], []
    for i in range(len(positions)):
        xs = [r["kl_mean"][i] for r in results if i < len(r.get("kl_mean") or [])
              and r["kl_mean"][i] is not None]
        mean = sum(xs) / len(xs) if xs else None
        sd = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)
        means.append(mean)
        sems.append(sd / math.sqrt(len(xs)) if xs else None)
    return {**results[0], "kl_mean": means, "kl_sem": sems, "seeds": len(results)}
