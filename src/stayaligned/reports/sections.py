"""The report's v2 sections: the headline table and recommendation (first on the page), the
study described in words, per-template comparisons (PTST like-for-like), judge agreement and
the dose curves. Each returns document blocks; a study without the axis gets no section."""

from __future__ import annotations

import math

from stayaligned.reports import plots
from stayaligned.reports.document import Block, Cell, Heading, Image, Paragraph, Table
from stayaligned.reports.headline import (
    Headline,
    benchmark_roles,
    groups,
    headline_rows,
    judges,
    kept,
    kept_vs,
    pct,
    recommendation,
    task_loss,
    template_rows,
    templates,
)
from stayaligned.reports.study_files import Study

# ---------------------------------------------------------------- headline


def _loss_delta(row: Headline, reference: str) -> str:
    if row.cell == reference:
        return "reference" if row.task_loss is None else f"{row.task_loss:.3f} (reference)"
    if row.task_loss is None or row.task_loss_vs_sft is None:
        return "—"
    return f"{row.task_loss:.3f} ({100 * row.task_loss_vs_sft:+.1f}%)"


def _accuracy_delta(row: Headline, reference: str) -> str:
    if row.task_accuracy is None:
        return "—"
    value = f"{100 * row.task_accuracy.value:.0f}%"
    if row.cell == reference:
        return f"{value} (reference)"
    return f"{value} ({pct(row.task_accuracy_vs_sft, signed=True)})" \
        if row.task_accuracy_vs_sft is not None else value


def _seed_counts(rows: list[Headline]) -> str:
    """How many seeds each row pools, in words.

    >>> from types import SimpleNamespace as S
    >>> _seed_counts([S(cell="a", seeds=[0, 1, 2], runs=[1, 2, 3]), S(cell="b", seeds=[0, 2],
    ...               runs=[1, 2, 3])])
    '3 seed(s) (b: 2 of 3)'
    """
    placed = [r for r in rows if r.seeds]
    if not placed:
        return "the evaluated seeds"
    most = max(len(r.seeds) for r in placed)
    fewer = [f"{r.cell}: {len(r.seeds)} of {len(r.runs)}" for r in placed
             if len(r.seeds) < len(r.runs) or len(r.seeds) < most]
    return f"{most} seed(s)" + (f" ({'; '.join(fewer)})" if fewer else "")


def cost_source(study: Study, overhead: dict | None) -> str:
    """Where the cost column's numbers come from, in words."""
    meta = (overhead or {}).get("meta") or {}
    if not overhead:
        return "from this study's training times (cells may have shared the machine)"
    what = f"{meta.get('model', 'the overhead bench')}, `{meta.get('command', 'bench/overhead.py')}`"
    if meta.get("study") == study.name:
        return f"measured for this study's cells as it trains them ({what})"
    return (f"from the overhead bench ({what}; matched by method, not by cell), else this "
            "study's training times")


def headline_blocks(study: Study, overhead: dict | None = None) -> list[Block]:
    rows = headline_rows(study, overhead)
    if not rows:
        return [Paragraph("No fine-tune cell in this study: nothing to compare yet.")]
    judge_list, ref = judges(study), study.reference_name
    k = next((r.prefill_k for r in rows if r.prefill_k), None)
    other = judge_list[1] if len(judge_list) > 1 else None
    accuracy = any(r.task_accuracy is not None for r in rows)
    header = ("Method", "Tested with", f"Kept share [95% CI] ({judge_list[0] if judge_list else '—'})",
              *((f"Kept ({other})",) if other else ()), f"Kept − {ref} [95% CI]",
              f"Prefill k={k} refusal" if k else "Prefill refusal",
              f"Over-refusal Δ vs {ref}", f"Task loss (Δ vs {ref})",
              *((f"Task accuracy (Δ vs {ref} [95% CI])",) if accuracy else ()),
              "Cost per step (× sft)")
    table_rows = []
    for r in rows:
        diff = Cell("reference") if r.cell == ref else Cell(
            pct(r.kept_vs_sft, signed=True),
            strong=r.kept_vs_sft is not None and (r.kept_vs_sft.low > 0 or r.kept_vs_sft.high < 0))
        over = "reference" if r.cell == ref else pct(r.over_refusal_vs_sft, signed=True)
        table_rows.append((r.cell, r.template or "—", pct(r.kept),
                           *((pct(r.kept_other_judge),) if other else ()), diff, pct(r.prefill),
                           over, _loss_delta(r, ref),
                           *((_accuracy_delta(r, ref),) if accuracy else ()), r.cost))
    note = (f"Kept share: the cell's refusal rate on {benchmark_roles(study)['harmful']} over the "
            "aligned seed's, both under the template in 'Tested with' and the same judge. "
            f"Pooled over {_seed_counts(rows)}: mean over seeds and items; 95% intervals from a "
            "two-way cluster bootstrap resampling seeds and items (prompts) independently "
            "(2,000 replicates, percentile; differences paired on seeds and items). Bold: the "
            "interval of the difference excludes 0. Kept − sft and the Δ columns compare with "
            "sft's runs of the same seeds under the row's template. Task loss: mean held-out NLL "
            "per reference token, mean over seeds. "
            + (f"Task accuracy: exact match on {benchmark_roles(study)['task']}, pooled and "
               "compared like the rates. " if accuracy else "")
            + "Cost: median wall time per optimiser step "
            "relative to sft's (seconds per step, not a token-throughput ratio), "
            f"{cost_source(study, overhead)}; a repair adds its one-time wall seconds (mean "
            "over seeds, its validation sweep included"
            + ("; wall time on a machine the study shared between "
               f"{study.config.get('workers')} workers, so CPU seconds are shown beside it "
               "where progress.json recorded them" if (study.config.get("workers") or 1) > 1
               else "") + ").")
    extra = [n for r in rows for n in (*r.seed_notes, *r.cost_notes)]
    if extra:
        note += " " + "; ".join(extra) + "."
    blocks: list[Block] = [Table(header, tuple(table_rows), note),
                           Paragraph(recommendation(rows, ref))]
    problems = [f"{r.cell}: {'; '.join(r.why)}" for r in rows if r.why]
    if problems:
        blocks.append(Paragraph("Not computed (never across templates): " + " | ".join(problems)))
    return blocks


# ---------------------------------------------------------------- the study in words


def _words(options: dict) -> str:
    """Method options in words.

    >>> _words({"lookahead": {"mode": "real", "m": 6}, "sap": {}})
    'lookahead with mode real and m 6'
    """
    parts = []
    for method, block in options.items():
        if isinstance(block, dict) and block:
            inner = " and ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in block.items())
            parts.append(f"{method} with {inner}")
    return "; ".join(parts)


def _value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_value, v))
    return str(v)


def _repair_words(spec: dict) -> str:
    """A repair cell's spec in words: what it repairs and how its strength is chosen.

    >>> _repair_words({"method": "resta", "of": "sft", "strengths": [0, 0.5, 1],
    ...                "target_kept": 0.95, "on_miss": "best", "reference": "base",
    ...                "task_holdout": 100})
    'resta repair of sft (reference base): the weakest of strengths 0, 0.5, 1 keeping >= 95% of the aligned refusal rate on validation data, else the best; task hold-out 100'
    >>> _repair_words({"method": "merge", "of": "sft", "target_refusal": 0.9, "validation": {
    ...     "benchmarks": [{"name": "v", "source": "demo-harmful", "split": "align"}]}})
    "merge repair of sft: the weakest of the method's default strengths refusing >= 90% on validation data (demo-harmful, split align)"
    """
    method = spec.get("method", "merge")
    head = f"{method} repair of {spec.get('of')}"
    if method == "resta":
        head += f" (reference {spec.get('reference', 'base')}" + (
            f", DARE p {spec['dare_p']}" if spec.get("dare_p") else "") + ")"
    sweep = (f"strengths {_value(spec['strengths'])}" if spec.get("strengths")
             else "the method's default strengths")
    benches = (spec.get("validation") or {}).get("benchmarks") or []
    data = "validation data" + (" (" + "; ".join(
        f"{b.get('source') or b.get('name')}" + (f", split {b['split']}" if b.get("split") else "")
        for b in benches) + ")" if benches else "")
    if spec.get("target_kept") is not None:
        rule = (f"the weakest of {sweep} keeping >= {spec['target_kept']:.0%} of the aligned "
                f"refusal rate on {data}")
    elif spec.get("target_refusal") is not None:
        rule = f"the weakest of {sweep} refusing >= {spec['target_refusal']:.0%} on {data}"
    else:
        rule = f"strength {spec.get('strength', 'the default')}"
    if rule.startswith("the weakest") and spec.get("on_miss") == "best":
        rule += ", else the best"
    tail = f"; task hold-out {spec['task_holdout']}" if spec.get("task_holdout") else ""
    return f"{head}: {rule}{tail}"


def _cell_words(cell: dict) -> str:
    if cell.get("model_of"):
        return (f"{cell.get('name')} ({cell['model_of']}'s model read under "
                f"{cell.get('read_under')}: no training or evaluation of its own)")
    if cell.get("repair"):
        extra = (f"; evaluated under {', '.join(cell['eval_templates'])} only"
                 if cell.get("eval_templates") else "")
        return f"{cell.get('name')} ({_repair_words(cell['repair'])}{extra})"
    methods = " + ".join(cell.get("methods") or ["sft"])
    extra = [w for w in (_words(cell.get("options") or {}),
                         _value(cell.get("train")) if cell.get("train") else "") if w]
    if cell.get("eval_templates"):
        extra.append(f"evaluated under {', '.join(cell['eval_templates'])} only")
    return f"{cell.get('name')} ({methods}{': ' + '; '.join(extra) if extra else ''})"


def _budget_words(train: dict) -> str:
    optim, lora = train.get("optim") or {}, train.get("lora") or {}
    data = ", ".join(f"{d.get('source')} {d.get('split', 'train')}"
                     f"{' (' + str(d['limit']) + ' examples)' if d.get('limit') else ''}"
                     for d in train.get("data") or [] if isinstance(d, dict))
    steps = (f"{optim['max_steps']} steps" if (optim.get("max_steps") or -1) > 0
             else f"{optim.get('epochs', 1)} epoch(s)")
    tuning = ("full fine-tuning" if lora.get("enabled") is False else
              f"LoRA r {lora.get('r', 8)} on {', '.join(lora.get('target_modules') or ['q_proj', 'v_proj'])}")
    return (f"{tuning} on {data or 'the default data'}, learning rate {optim.get('lr', '1e-4')}, "
            f"{steps}, batch {optim.get('batch_size', 8)}, Adam β1 {optim.get('adam_beta1', 0.9)}, "
            f"{optim.get('warmup_steps', 0)} warm-up steps")


def study_words(study: Study) -> list[Block]:
    """The study's design as sentences (the full config stays in the Configuration section)."""
    c = study.config
    cells = [x for x in c.get("cells") or [] if isinstance(x, dict)]
    seeds = c.get("seeds") or [0]
    align = c.get("align")
    seed_text = (f"{(c.get('model') or {}).get('name', 'the seed')}"
                 + (" aligned first by the study (" + ", ".join(
                     f"{k} {_value(v)}" for k, v in align.items() if k != "save_steps") + ")"
                    if align else ""))
    text = [f"Study {study.name}: {seed_text} is fine-tuned in {len(cells)} cell(s), "
            f"each with {len(seeds)} training seed(s) ({', '.join(map(str, seeds))}): "
            + "; ".join(_cell_words(x) for x in cells) + "."]
    if c.get("train"):
        text.append(f"Shared budget: {_budget_words(c['train'])}.")
    ts, js = templates(study), judges(study)
    if len(c.get("eval_templates") or []) > 1:
        narrowed = [x["name"] for x in cells if x.get("eval_templates")]
        text.append(f"Every model is evaluated under {len(ts)} template(s) ({', '.join(ts)})"
                    + (f", except {', '.join(narrowed)} (under their own subset, above)"
                       if narrowed else "")
                    + f", and judged by {', '.join(js)}; kept shares and differences compare "
                    f"models under one template and one judge, against the "
                    f"{study.reference_name} cell.")
    elif ts:
        text.append(f"Each model is evaluated once, under its run's own eval template "
                    f"({', '.join(ts)}), judged by {', '.join(js)}; a kept share is only computed "
                    "where the aligned seed was evaluated under the same template.")
    dose = c.get("dose")
    if dose and dose.get("values"):
        text.append(f"Dose axis: {', '.join(dose.get('cells') or [])} trained once (seed "
                    f"{dose.get('seed', 0)}) at {dose.get('key')} = "
                    f"{', '.join(map(str, dose['values']))}.")
    depth = c.get("depth") or {}
    if depth.get("enabled", True):
        text.append(f"Depth: per-token KL on {depth.get('limit', 64)} prompts of "
                    f"{depth.get('source', 'demo-safety')} (split {depth.get('split', 'train')})"
                    + (", checked disjoint from STR's and SAP's prompts." if depth.get("disjoint")
                       else ", not checked for overlap with the methods' own prompts."))
    return [Paragraph(" ".join(text))]


# ---------------------------------------------------------------- retrained models


def retrain_notes(study: Study) -> list[str]:
    """One sentence per model that the study retrained because its weights were not in the
    checkout and whose logged losses differ from the archived run's (`archived_rerun` in its
    run.json): the models and evaluations made from the archived weights before the retrain
    are named, since their numbers and the retrained model's come from different weights."""
    notes = []
    for model in study.models:
        rerun = (model.run or {}).get("archived_rerun")
        if not rerun or rerun.get("same_losses"):
            continue
        when = str(((model.run or {}).get("provenance") or {}).get("date") or "")
        older = [m.label + ("" if m is not model else " (its own evaluation)")
                 for m in _made_from(study, model) if when and (_made_on(m) or when) < when]
        first = rerun.get("first_differing_step")
        text = (f"{model.label} was retrained in this checkout (its weights were not here) and "
                f"its logged losses differ from the archived run's"
                + (f" from step {first}" if first is not None else "")
                + f" (archived run of {rerun.get('date_of_archived_run') or 'unknown date'}).")
        if older:
            text += (" Made from the archived weights, before the retrain: "
                     f"{', '.join(older)}; their numbers and the retrained model's come from "
                     "different weights (delete those directories and run the study again to "
                     "remake them).")
        else:
            text += " Every model and evaluation read here was made after the retrain."
        notes.append(text)
    return notes


def _made_from(study: Study, model) -> list:
    """`model` and the models made from it: every cell for the aligned seed; a cell's repairs
    (same seed) for a cell."""
    if model.key == "aligned":
        return [model, *(m for m in study.models if m.cell is not None)]
    name = str((model.cell or {}).get("name"))
    return [model, *(m for m in study.models if m.seed == model.seed
                     and m.repair_spec.get("of") == name)]


def _made_on(model) -> str | None:
    """The earliest date this model's files carry (training run, evaluations): when it was
    made, or at the latest first evaluated."""
    run = model.run or {}
    # a retrained run's own date is the retrain: only its evaluations can be older
    made = None if run.get("archived_rerun") else (run.get("provenance") or {}).get("date")
    dates = [str(d) for d in (made, *((v.metrics or {}).get("date") for v in model.views)) if d]
    return min(dates) if dates else None


# ---------------------------------------------------------------- templates


def template_blocks(study: Study) -> list[Block]:
    ts, js = templates(study), judges(study)
    if len(study.config.get("eval_templates") or []) < 2 or len(ts) < 2 or not js:
        return []
    roles, judge, ref = benchmark_roles(study), js[0], study.reference_name
    aligned = next((m for m in study.models if m.label == "aligned"), None)
    blocks: list[Block] = [Heading("Templates"), Paragraph(
        f"Each model under each template ({judge} judge); kept share and Δ only within a "
        "template.")]
    for t in ts:
        rows = tuple(
            (r.name, pct(r.refusal), "100%" if r.name == "aligned" else pct(r.kept),
             "—" if r.name == "aligned" else "reference" if r.name == ref
             else pct(r.kept_vs_ref, signed=True),
             pct(r.over_refusal), _fmt(r.task_loss))
            for r in template_rows(study, t, judge))
        blocks += [Heading(f"Under {t}", 3), Table(
            ("Model", "Refusal", "Kept share", f"Kept − {ref}", "Over-refusal", "Task loss"),
            rows)]
    blocks += _ptst_blocks(study, groups(study, readings=True), aligned, roles, judge)
    return blocks


def _fmt(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _ptst_blocks(study, cells, aligned, roles, judge) -> list[Block]:
    """PTST as the paper reads it: (ptst, safe template) against (sft, safe template) and the
    same-template cell sft-safe (trained and tested with the safety prompt). A ptst that is a
    reading of sft's model (`model_of`) is sft tested under the safe template: its difference
    from sft there is zero by construction, and said so."""
    ptst = cells.get("ptst")
    if not ptst or aligned is None:
        return []
    t = next((m.read_template for m in ptst if m.read_template), None)
    if t not in templates(study):
        return []
    lines = []
    of = ptst[0].reading_of
    for other in (study.reference_name, "sft-safe"):
        if other == of:
            lines.append(f"ptst − {other}: 0 by construction (the same model)")
        elif other in cells:
            d = kept_vs(ptst, cells[other], aligned, t, judge, roles["harmful"])
            lines.append(f"ptst − {other}: {pct(d, signed=True)}")
    k = kept(ptst, aligned, t, judge, roles["harmful"])
    trained = next((((m.run or {}).get("templates") or {}).get("train") for m in ptst), None)
    what = (f"ptst is {of}'s fine-tune (trained under {trained or 'its recorded template'}) "
            f"tested under {t}: a `model_of` reading, with no training of its own. " if of else "")
    return [Heading("PTST like for like", 3), Paragraph(
        f"{what}Under {t} (PTST's test template), ptst keeps {pct(k)} of the aligned seed's "
        f"refusal under the same template; kept-share differences: "
        f"{'; '.join(lines) or 'no comparison cell'}.")]


# ---------------------------------------------------------------- judges


def judge_agreement(study: Study) -> list[dict]:
    """Per (first judge, other judge, safety benchmark): Cohen's kappa per model x template
    view (`kappa_per_view`: median, range and count of the views where it is defined), and
    the items judged by both pooled over every view: their number, agreement, `kappa_pooled`
    (NaN when undefined) and both refusal rates. Pooling views whose refusal rates run from a
    few percent to nearly all inflates kappa (the between-model spread counts as agreement),
    so the per-view figures are the ones to read; the pooled one is labelled as such."""
    import statistics

    from stayaligned.evaluation.judges.compare import cohen_kappa

    js = judges(study)
    out = []
    for other in js[1:]:
        pairs: dict[str, list[tuple[bool, bool]]] = {}
        views: dict[str, list[float]] = {}
        for m in study.models:
            for t in templates(study):
                a, b = m.view(t, js[0]), m.view(t, other)
                if not a or not b:
                    continue
                for bench, verdicts in a.verdicts.items():
                    theirs = b.verdicts.get(bench) or {}
                    mine = [(v, theirs[i]) for i, v in verdicts.items() if i in theirs]
                    pairs.setdefault(bench, []).extend(mine)
                    if mine:
                        views.setdefault(bench, []).append(
                            cohen_kappa([p for p, _ in mine], [q for _, q in mine]))
        for bench, items in pairs.items():
            if items:
                x, y = [p for p, _ in items], [q for _, q in items]
                defined = [k for k in views.get(bench, []) if not math.isnan(k)]
                out.append({"judges": [js[0], other], "benchmark": bench, "n": len(items),
                            "agreement": sum(p == q for p, q in items) / len(items),
                            "kappa_per_view": {
                                "median": statistics.median(defined) if defined else None,
                                "min": min(defined) if defined else None,
                                "max": max(defined) if defined else None,
                                "views": len(defined),
                                "undefined": len(views.get(bench, [])) - len(defined)},
                            "kappa_pooled": cohen_kappa(x, y), "refusal_rates": [
                                sum(x) / len(x), sum(y) / len(y)]})
    return out


def judge_blocks(study: Study) -> list[Block]:
    def per_view(a: dict) -> str:
        v = a["kappa_per_view"]
        if v["median"] is None:
            return "undefined"
        return f"{v['median']:.2f} ({v['min']:.2f} to {v['max']:.2f}, {v['views']} views)"

    rows = tuple((" vs ".join(a["judges"]), a["benchmark"], str(a["n"]),
                  f"{100 * a['agreement']:.1f}%", per_view(a),
                  "undefined" if math.isnan(a["kappa_pooled"]) else f"{a['kappa_pooled']:.2f}",
                  f"{100 * a['refusal_rates'][0]:.1f}% / {100 * a['refusal_rates'][1]:.1f}%")
                 for a in judge_agreement(study))
    if len(judges(study)) < 2:
        return []
    return [Heading("Judges"), Table(
        ("Judges", "Benchmark", "Items (all models, templates)", "Agreement",
         "Cohen's κ per model × template: median (range, views)",
         "Cohen's κ pooled over models and templates", "Refusal rate (first / second)"), rows,
        "The headline uses the first judge; the second is shown beside it. κ per view: one "
        "model under one template (the judges' agreement on the same answers); pooled: every "
        "view's items together, which counts the spread of refusal rates between models as "
        "agreement and so runs higher than the per-view figures.")]


# ---------------------------------------------------------------- dose


def dose_data(study: Study) -> dict | None:
    """The dose axis measured: per cell, per value, the run, kept share (Pooled), task loss and
    task-loss gain over the aligned seed, under the first template and the headline judge."""
    dose = study.config.get("dose") or {}
    if not dose.get("values"):
        return None
    roles, js, ts = benchmark_roles(study), judges(study), templates(study)
    aligned = next((m for m in study.models if m.label == "aligned"), None)
    out = {"key": dose.get("key"), "values": dose["values"], "seed": dose.get("seed", 0),
           "template": ts[0] if ts else None, "judge": js[0] if js else None, "cells": {}}
    if aligned is None or not js or not ts:
        return out
    t, judge = ts[0], js[0]
    base_loss = task_loss([aligned], t, judge, roles["task"])
    runs = [m for m in study.cells if m.dose is not None]
    own = {m.group: m for m in study.cells if m.dose is None and m.seed == out["seed"]}
    for cell in dose.get("cells") or []:
        for value in dose["values"]:
            run = next((m for m in runs if m.dose == (cell, value)), None)
            run = run or (own.get(cell) if _is_own(study, cell, value) else None)
            if run is None:
                continue
            loss = task_loss([run], t, judge, roles["task"])
            out["cells"].setdefault(cell, []).append({
                "value": value, "run": run.label,
                "kept": kept([run], aligned, t, judge, roles["harmful"]), "task_loss": loss,
                "task_loss_gain": None if loss is None or base_loss is None else base_loss - loss})
    return out


def _is_own(study: Study, cell: str, value) -> bool:
    """Whether `value` is the cell's own value of the dose key (its seed run is the point)."""
    from stayaligned.grid import _lookup, _same

    config, key = study.config, (study.config.get("dose") or {}).get("key", "")
    entry = next((c for c in config.get("cells") or [] if c.get("name") == cell), {})
    own = _lookup(entry.get("train") or {}, key)
    own = own if own is not None else _lookup(config.get("train") or {}, key)
    return own is not None and _same(own, value)


def dose_blocks(study: Study, colours: dict[str, str]) -> list[Block]:
    data = dose_data(study)
    if data is None:
        return []
    blocks: list[Block] = [Heading("Dose")]
    if not data["cells"]:
        return [*blocks, Paragraph("No dose run evaluated yet (needs the aligned seed's "
                                   "evaluation and the dose cells').")]
    lines = {cell: [(p["value"], p["task_loss_gain"], p["kept"]) for p in pts
                    if p["kept"] is not None and p["task_loss_gain"] is not None]
             for cell, pts in data["cells"].items()}
    png = plots.dose_curves(lines, colours, data["key"])
    if png is not None:
        blocks.append(Image("dose.png", png, f"Kept share against task-loss gain (aligned seed's "
                            f"loss minus the fine-tune's) at each {data['key']}, under "
                            f"{data['template']}; a method helps where its curve lies above sft's"))
    rows = tuple((cell, str(p["value"]), p["run"], pct(p["kept"]), _fmt(p["task_loss"]),
                  _fmt(p["task_loss_gain"])) for cell, pts in data["cells"].items() for p in pts)
    blocks.append(Table(("Cell", data["key"], "Run", "Kept share", "Task loss", "Task-loss gain"),
                        rows))
    return blocks


# ---------------------------------------------------------------- repairs


def _validation(point: dict | None, key: str, percent: bool) -> str:
    v = (point or {}).get(key) or {}
    if v.get("value") is None:
        return "—"
    if percent:  # one decimal: a target such as 95% x 90% = 85.5% is read against it
        return f"{100 * v['value']:.1f}% [{100 * v['low']:.0f}, {100 * v['high']:.0f}]"
    return f"{v['value']:.3f}"


def _repair_time(m) -> str:
    """A repair run's wall seconds (with earlier attempts when recorded), its CPU seconds from
    progress.json when timed in one attempt, or a mark when only its last attempt was timed.

    >>> from types import SimpleNamespace as S
    >>> _repair_time(S(repair={"seconds": 365.0}, progress={"repair": {"cpu_seconds": 343.0}},
    ...                sweep_seconds={"0": {"seconds": 0.0}, "1": {"seconds": 227.0}}))
    '365 s (last attempt only: 1 of 2 validation evaluations reused)'
    >>> _repair_time(S(repair={"seconds": 900.0}, progress={"repair": {"cpu_seconds": 741.0}},
    ...                sweep_seconds={}))
    '900 s (CPU 741 s)'
    """
    r = m.repair or {}
    total, this = r.get("seconds_total"), r.get("seconds")
    if total is None and this is None:
        return "—"
    reused = [n for n, t in m.sweep_seconds.items()
              if isinstance(t.get("seconds"), (int, float)) and t["seconds"] <= 0]
    if total is not None:
        return f"{total:.0f} s" + (f" ({this:.0f} s in its last attempt)"
                                   if this is not None and total > this + 1 else "")
    if reused:
        return (f"{this:.0f} s (last attempt only: {len(reused)} of {len(m.sweep_seconds)} "
                "validation evaluations reused)")
    cpu = (m.progress.get("repair") or {}).get("cpu_seconds")
    return f"{this:.0f} s" + (f" (CPU {cpu:.0f} s)" if isinstance(cpu, (int, float)) else "")


def repair_blocks(study: Study) -> list[Block]:
    """Each repair run's choice on validation data: the strength it kept, the validation
    refusal and task loss there against the target, and its cost (repair/repair.json)."""
    runs = [m for m in study.cells if m.maker == "repair"]
    if not runs:
        return []
    rows = []
    for m in runs:
        r = m.repair
        if r is None:
            rows.append((m.label, m.missing("repair"), "—", "—", "—", "—", "—"))
            continue
        chosen = next((p for p in r.get("curve") or [] if p.get("strength") == r.get("strength")),
                      None)
        target = (r.get("target") or {}).get("refusal")
        met = {True: "met", False: "missed: the best one kept"}.get(r.get("target_met"), "—")
        chosen_text = f"{r.get('knob', 'strength')} = {r.get('strength', '—')}" + (
            " (the aligned model itself)" if r.get("reverted") else "")
        rows.append((m.label, Cell(chosen_text, strong=bool(r.get("reverted"))),
                     _validation(chosen, "refusal_rate", True),
                     Cell("—" if target is None else f"{100 * target:.1f}% ({met})",
                          strong=r.get("target_met") is False),
                     _validation(chosen, "task_loss", False),
                     _validation(r.get("aligned"), "refusal_rate", True),
                     _repair_time(m)))
    return [Heading("Repairs"), Table(
        ("Run", "Chosen", "Validation refusal", "Target", "Validation task loss",
         "Aligned seed's validation refusal", "Repair time"), tuple(rows),
        "Each repair sweeps its knob on validation data only (the repair's own validation "
        "set and task hold-out, never the evaluation sets) and keeps the weakest strength that "
        "meets the target; the evaluation sections above test the kept model.")]
