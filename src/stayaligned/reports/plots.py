"""The report's figures as PNG bytes. matplotlib through `Figure` + `FigureCanvasAgg`, never
pyplot, so no global state and no display are involved. Each function takes plain data and
returns None when there is nothing to draw.

The depth plot follows evaluation/depth.py's `plot_depth` (same axes and error bars) but is
drawn here because that module imports torch, which a report never needs.
"""

from __future__ import annotations

import io
import math

from stayaligned.evaluation.metrics import Rate
from stayaligned.reports.tables import Mean, pareto_front

DPI = 100


def _figure(n_panels: int = 1, width: float = 6.4, height: float = 4.2, columns: int = 2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(columns, n_panels)
    rows = math.ceil(n_panels / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return figure, axes


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _error(rate: Rate | Mean) -> list[float]:
    """Distances from the value to the interval ends (never negative), in percent."""
    return [max(0.0, 100 * (rate.value - rate.low)), max(0.0, 100 * (rate.high - rate.value))]


# ---------------------------------------------------------------- safety and utility


def _utility(point: dict, panel: str) -> tuple[float, list[float]] | None:
    """(x, [left error, right error]) of one point on the score or the loss panel."""
    if panel == "score":
        score = point.get("score")
        return None if score is None else (100 * score.value, _error(score))
    loss = point.get("loss") or {}
    if loss.get("loss") is None:
        return None
    # a cell pooled over seeds: the SEM between its seeds; one run: the per-example SEM
    half = 1.96 * (loss.get("between_seed_sem", loss.get("per_example_sem")) or 0.0)
    return loss["loss"], [half, half]


def _safety_panel(axes, points: list[dict], panel: str, labels: tuple[str, str]) -> None:
    """Points in their model's colour, named in a legend (labels never overlap); reference
    points (the seeds) drawn as stars and left out of the Pareto front of the fine-tunes."""
    placed = [(i, p, _utility(p, panel)) for i, p in enumerate(points) if p.get("safety")]
    placed = [(i, p, u) for i, p, u in placed if u is not None]
    for index, point, (x, xerr) in placed:
        y = 100 * point["safety"].value
        axes.errorbar([x], [y], xerr=[[xerr[0]], [xerr[1]]],
                      yerr=[[e] for e in _error(point["safety"])],
                      marker="*" if point.get("reference") else "o",
                      markersize=12 if point.get("reference") else 6, capsize=3,
                      linestyle="none", color=point.get("colour") or f"C{index % 10}",
                      label=point["label"] + (" (reference)" if point.get("reference") else ""))
    tuned = [(p, u) for _, p, u in placed if not p.get("reference")]
    coords = [(100 * p["safety"].value, u[0]) for p, u in tuned]
    front = pareto_front(coords, maximize=(True, panel == "score"))
    if front:
        ordered = sorted((coords[i][1], coords[i][0]) for i in front)
        axes.plot([x for x, _ in ordered], [y for _, y in ordered], linestyle="--", color="grey",
                  marker="o", markersize=14, markerfacecolor="none",
                  label="Pareto front (fine-tunes)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if panel == "score":
        axes.set_xlabel(f"{labels[1]} → better")
    else:
        axes.set_xlabel("task loss (nats/token, ±1.96 SEM; pooled cells: SEM between seeds) "
                        "→ better")
        axes.invert_xaxis()
    axes.set_ylabel(f"{labels[0]} (%) ↑ safer")
    axes.set_ylim(-5, 105)
    axes.grid(alpha=0.3)


def safety_utility(points: list[dict], panels: list[str], labels: tuple[str, str],
                   title: str) -> bytes | None:
    """One labelled point per model (`points`: label, safety Rate, score Rate or Mean, loss
    dict) per panel ("score": accuracy or ROUGE, "loss"), 95% interval bars, the Pareto front
    circled and joined; `labels`: the safety and the score axis names."""
    panels = [p for p in panels if any(_utility(q, p) and q.get("safety") for q in points)]
    if not panels:
        return None
    figure, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        _safety_panel(ax, points, panel, labels)
    figure.suptitle(title)
    return _png(figure)


# ---------------------------------------------------------------- prefilling attack


def prefill_curves(curves: dict[str, dict[str, list[tuple[int, Rate]]]],
                   colours: dict[str, str] | None = None) -> bytes | None:
    """Refusal rate against the number of prefilled tokens k, one line per model, one panel
    per attacked benchmark (`curves`: benchmark -> model -> [(k, Rate)]); `colours` keeps a
    model's colour the same across plots."""
    curves = {b: {m: pts for m, pts in lines.items() if pts} for b, lines in curves.items()}
    curves = {b: lines for b, lines in curves.items() if lines}
    if not curves:
        return None
    figure, axes = _figure(len(curves))
    for ax, (bench, lines) in zip(axes, curves.items()):
        for i, (label, pts) in enumerate(lines.items()):
            dodge = 0.06 * (i - (len(lines) - 1) / 2)  # keep equal points' bars apart
            ks = [k + dodge for k, _ in pts]
            errors = list(zip(*(_error(r) for _, r in pts)))
            ax.errorbar(ks, [100 * r.value for _, r in pts], yerr=errors, marker="o", capsize=3,
                        label=label, color=(colours or {}).get(label))
        ax.set_xticks(sorted({k for pts in lines.values() for k, _ in pts}))
        ax.set_xlabel("prefilled harmful tokens k (0 = no attack)")
        ax.set_ylabel("refusal rate (%)")
        ax.set_ylim(-5, 105)
        ax.set_title(bench)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return _png(figure)


# ---------------------------------------------------------------- depth, over-refusal, training


def depth_curves(results: dict[str, dict], colours: dict[str, str] | None = None) -> bytes | None:
    """Per-token KL against the base model, one line per cell, ±1 SEM bars."""
    results = {label: r for label, r in results.items() if r.get("positions")}
    if not results:
        return None
    figure, (axes,) = _figure(1)
    for label, result in results.items():
        means = [math.nan if m is None else m for m in result["kl_mean"]]
        sems = [0.0 if s is None else s for s in result.get("kl_sem") or [None] * len(means)]
        axes.errorbar(result["positions"], means, yerr=sems, label=label, marker="o", capsize=3,
                      color=(colours or {}).get(label))
    directions = sorted({str(r.get("direction", "ft||seed")) for r in results.values()})
    axes.set_xticks(sorted({p for r in results.values() for p in r["positions"]}))
    axes.set_xlabel("response token position")
    axes.set_ylabel(f"KL({' / '.join(directions)}) per token (nats)")
    axes.set_title("Per-token KL against the base model")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=9)
    return _png(figure)


def over_refusal_bars(rows: list[tuple[str, Rate | None, Rate | None]], harmful: str,
                      benign: str, colours: dict[str, str] | None = None) -> bytes | None:
    """Refusal on the harmful benchmark (y, higher is safer) against over-refusal on the benign
    one (x, lower is better), one point per model in its colour, named in a legend."""
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    if not rows:
        return None
    figure, (axes,) = _figure(1, width=7.6)
    for i, (label, refusal, over) in enumerate(rows):
        axes.errorbar([100 * over.value], [100 * refusal.value],
                      xerr=[[e] for e in _error(over)], yerr=[[e] for e in _error(refusal)],
                      marker="o", capsize=3, linestyle="none", label=label,
                      color=(colours or {}).get(label, f"C{i % 10}"))
    axes.set_xlabel(f"over-refusal on {benign} (% of benign prompts refused) ← better")
    axes.set_ylabel(f"refusal on {harmful} (%) ↑ safer")
    axes.set_xlim(-5, 105)
    axes.set_ylim(-5, 105)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _png(figure)


def dose_curves(lines: dict[str, list[tuple[object, float, Rate | Mean]]],
                colours: dict[str, str] | None, key: str) -> bytes | None:
    """Kept share (%) against task-loss gain per method across doses: `lines` maps a method to
    [(dose value, gain, kept share with interval)]; each point is marked with its dose."""
    lines = {m: sorted(pts, key=lambda p: p[1]) for m, pts in lines.items() if pts}
    if not lines:
        return None
    figure, (axes,) = _figure(1, width=7.6)
    for i, (method, pts) in enumerate(lines.items()):
        colour = (colours or {}).get(method, f"C{i % 10}")
        axes.errorbar([g for _, g, _ in pts], [100 * k.value for _, _, k in pts],
                      yerr=list(zip(*(_error(k) for _, _, k in pts))), marker="o", capsize=3,
                      color=colour, label=method)
        for j, (value, gain, k) in enumerate(pts):
            axes.annotate(f"{value:g}" if isinstance(value, float) else str(value),
                          (gain, 100 * k.value), textcoords="offset points", fontsize=7,
                          xytext=(5, 6 if (i + j) % 2 else -11), color=colour)
    axes.set_xlabel("task-loss gain over the aligned seed (nats/token) → more task learning")
    axes.set_ylabel("kept share of the aligned refusal rate (%) ↑ safer")
    axes.set_title(f"dose: {key}")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _png(figure)


def _is_norm(key: str) -> bool:
    return "norm" in key.rsplit("/", 1)[-1]


def training_norms(logs: dict[str, list[dict]]) -> bytes | None:
    """Gradient and probe norms a method logs (e.g. SAP's), kept out of the loss panels."""
    keys = sorted({k for log in logs.values() for row in log for k in row
                   if k.startswith("loss/") and _is_norm(k)})
    if not keys:
        return None
    figure, axes = _figure(len(keys), width=5.2, height=3.4)
    for ax, key in zip(axes, keys):
        for label, log in logs.items():
            pts = [(row["step"], row[key]) for row in log
                   if isinstance(row.get(key), (int, float)) and "step" in row]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], label=label)
        ax.set_title(key.split("/", 1)[-1])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(figure)


def _loss_keys(log: list[dict]) -> list[str]:
    keys = {k for row in log for k in row
            if k == "loss" or (k.startswith("loss/") and not _is_norm(k))}
    return sorted(keys, key=lambda k: (k != "loss", k))


def training_losses(logs: dict[str, list[dict]]) -> bytes | None:
    """One panel per training run: the logged loss and each named loss term against the step."""
    from matplotlib.ticker import MaxNLocator

    logs = {label: log for label, log in logs.items() if _loss_keys(log)}
    if not logs:
        return None
    figure, axes = _figure(len(logs), width=5.2, height=3.4)
    for ax, (label, log) in zip(axes, logs.items()):
        for key in _loss_keys(log):
            pts = [(row["step"], row[key]) for row in log
                   if isinstance(row.get(key), (int, float)) and "step" in row]
            total = key == "loss"  # the summed loss solid, its named terms dashed over it
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if total else None,
                    linewidth=2.2 if total else 1.2, linestyle="-" if total else "--", label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(figure)
