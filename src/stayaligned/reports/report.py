"""`stayaligned report STUDY_DIR`: report.md, a self-contained report.html and plots/*.png from
a study's stage files. Nothing here loads a model; a stage that did not run or failed shows as
"not run" / "failed: <error>" and the rest of the report is still written.

Sections: summary; results per benchmark (rate, 95% interval, difference from the reference
cell); safety against utility with the Pareto front; prefilling-attack curves; per-token depth
(KL); over-refusal next to refusal; training loss curves; per cell the exact rendered prompts;
configuration, package versions and stage times.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from stayaligned.reports import groups as grouping
from stayaligned.reports import plots, sections
from stayaligned.reports.document import (
    Block,
    Code,
    Heading,
    Image,
    Paragraph,
    Table,
    from_text,
    to_html,
    to_markdown,
)
from stayaligned.reports.study_files import ModelRun, Study, load_study
from stayaligned.reports.tables import (
    benchmarks,
    fmt_rate,
    main_benchmark,
    over_refusal_table,
    pareto_front,
    prefill_groups,
    results_table,
    safety_metric,
    safety_rate,
    summary,
    task_metric,
    task_score,
)
from stayaligned.runfiles import atomic_write, train_time, write_bytes

UTILITY = ("both", "accuracy", "loss", "auto")


def summary_rows(study_dir: str | Path) -> dict[str, dict]:
    """Per model (seed, aligned, each cell): refusal_rate, refusal_ci, prefill_refusal_rate,
    over_refusal_rate, task_accuracy, task_loss and their sources; fractions, None if absent."""
    return summary(load_study(study_dir))


def write_report(study_dir: str | Path, output: str | Path | None = None,
                 utility: str = "both", notes: str | Path | None = None,
                 overhead: str | Path | None = None) -> list[Path]:
    """Write report.md, report.html and plots/*.png into `output` (default: the study
    directory); returns the written paths. `utility` picks the safety-utility panels:
    both (the task's score and its loss), accuracy (the score: accuracy, or ROUGE-L for a
    ROUGE task), loss, or auto (loss when every score is ~0). `notes`: a Markdown file of a
    person's findings (headings, paragraphs, bullet lists), placed after the overview.
    `overhead`: bench/overhead.py's JSON, for the headline's cost per step (default: the
    study's own train seconds per step)."""
    if utility not in UTILITY:
        raise ValueError(f"utility={utility!r}: choose one of {', '.join(UTILITY)}")
    findings: list[Block] = []
    if notes is not None:
        path = Path(notes)
        if not path.is_file():
            raise FileNotFoundError(f"notes file {path} does not exist")
        findings = from_text(path.read_text(encoding="utf-8"), str(path))
    study = load_study(study_dir)
    out = Path(output) if output else study.root
    cost = None
    if overhead is not None:
        if not Path(overhead).is_file():
            raise FileNotFoundError(f"overhead file {overhead} does not exist; run "
                                    "bench/overhead.py or leave --overhead out")
        cost = json.loads(Path(overhead).read_text(encoding="utf-8"))
    blocks = build_report(study, utility, cost)
    if findings:
        first_section = next((i for i, b in enumerate(blocks)
                              if isinstance(b, Heading) and b.level == 2), len(blocks))
        blocks[first_section:first_section] = findings
    written = []
    for image in (b for b in blocks if isinstance(b, Image)):
        write_bytes(out / "plots" / image.name, image.png)
        written.append(out / "plots" / image.name)
    atomic_write(out / "report.md", to_markdown(blocks))
    atomic_write(out / "report.html", to_html(blocks, f"stayaligned report: {study.name}"))
    return [out / "report.md", out / "report.html", *written]


def build_report(study: Study, utility: str = "both", overhead: dict | None = None) -> list[Block]:
    """The headline table and recommendation first, then the study in words, then the
    detailed sections."""
    colours = grouping.colours(study)
    return [Heading(f"Study report: {study.name}", 1), *sections.headline_blocks(study, overhead),
            *_overview(study), *_results(study), *sections.template_blocks(study),
            *_safety_utility(study, utility), *_prefill(study), *sections.dose_blocks(study, colours),
            *sections.repair_blocks(study), *_depth(study), *_over_refusal(study),
            *sections.judge_blocks(study), *_training(study), *_cells(study), *_configuration(study)]


def _judge(study: Study) -> str:
    configured = study.config.get("headline_judge") or (study.config.get("eval") or {}).get("judge")
    found = next((m.metrics.get("judge") for m in study.models if m.metrics), None)
    return str(configured or found or "keyword")


def _stage_counts(study: Study) -> str:
    """Stages done, failed, to run again (`redo`: recorded done, its output gone or made from
    other inputs), started and not finished (its directory exists, progress.json has no entry
    yet: a stage is recorded when it ends), and not run.

    >>> from types import SimpleNamespace as S
    >>> from pathlib import Path
    >>> _stage_counts(S(manifest={"stages": ["a", "b", "c"]}, root=Path("/nonexistent"),
    ...                 progress={"a": {"status": "done"}, "b": {"status": "redo"}}))
    '1 of 3 stages done; 1 to run again (redo); 1 not run.'
    """
    stages = study.manifest.get("stages") or list(study.progress)

    def status(stage: str) -> str:
        recorded = (study.progress.get(stage) or {}).get("status")
        if recorded:
            return recorded
        return "started" if (study.root / stage).is_dir() else "not run"

    found = [status(s) for s in stages]
    text = f"{found.count('done')} of {len(stages)} stages done"
    if found.count("failed"):
        failed = [s for s, st in zip(stages, found) if st == "failed"]
        text += f"; failed: {', '.join(failed)}"
    if found.count("redo"):
        text += f"; {found.count('redo')} to run again (redo)"
    if found.count("started"):
        started = [s for s, st in zip(stages, found) if st == "started"]
        text += f"; started, not finished: {', '.join(started)}"
    other = len(found) - sum(found.count(k) for k in ("done", "failed", "redo", "started",
                                                       "not run"))
    if other:
        text += f"; {other} in another state"
    if found.count("not run"):
        text += f"; {found.count('not run')} not run"
    return text + "."


def _overview(study: Study) -> list[Block]:
    kinds = list(benchmarks(study).values())
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("harmful", "benign", "task") if k in kinds)
    text = (f"Every model is evaluated on {len(kinds)} benchmark(s) "
            f"({counts or 'none scored yet'}) with the {_judge(study)} judge, and differences "
            f"are taken against the {study.reference_name} cell.")
    blocks = [*sections.study_words(study), Paragraph(text), Paragraph(_stage_counts(study))]
    blocks += [Paragraph("Retrained: " + note) for note in sections.retrain_notes(study)]
    if study.unreadable:
        blocks.append(Paragraph("Unreadable files (not valid JSON, left out): "
                                + ", ".join(study.unreadable)))
    return blocks


# ---------------------------------------------------------------- 2. results


def _results(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Results")]
    found = benchmarks(study)
    if not found:
        return [*blocks, Paragraph("No model has been evaluated yet.")]
    for name, kind in found.items():
        blocks += [Heading(f"{name} ({kind})", 3), results_table(study, name, kind)]
    return blocks


# ---------------------------------------------------------------- 3. safety against utility


def _panels(study: Study, task: str, utility: str) -> list[str]:
    """The safety-utility panels: "score" (accuracy, or ROUGE-L) and/or "loss"."""
    if utility == "both":
        return ["score", "loss"]
    if utility != "auto":
        return ["score" if utility == "accuracy" else "loss"]
    metric = task_metric(study, task)
    scores = [s.value for m in study.models if (s := task_score(m, task, metric))]
    return ["score"] if any(v > 0.01 for v in scores) else ["loss"]


def _utility(point: dict, panel: str) -> float | None:
    if panel == "score":
        return point["score"].value if point["score"] else None
    return point["loss"].get("loss")


def _front_text(points: list[dict], panel: str) -> str | None:
    """The fine-tunes on the Pareto front of one panel, named (the seeds are references)."""
    placed = [(p["label"], p["safety"].value, _utility(p, panel)) for p in points
              if p["safety"] and _utility(p, panel) is not None and not p.get("reference")]
    if not placed:
        return None
    front = pareto_front([(s, u) for _, s, u in placed], maximize=(True, panel == "score"))
    return f"on the {panel} panel: {', '.join(placed[i][0] for i in front)}"


def _safety_utility(study: Study, utility: str) -> list[Block]:
    blocks: list[Block] = [Heading("Safety and utility")]
    harmful, task = main_benchmark(study, "harmful"), main_benchmark(study, "task")
    if harmful is None or task is None:
        return [*blocks, Paragraph("Needs a harmful and a task benchmark; this study has "
                                   f"{'no harmful' if harmful is None else 'no task'} benchmark.")]
    label = "refusal rate" if safety_metric(study, harmful) == "refusal_rate" else "1 - ASR"
    metric = task_metric(study, task)
    colours = grouping.colours(study)
    points = [{"label": group, "safety": grouping.group_rate(runs, harmful),
               "score": grouping.group_score(runs, task, metric),
               "loss": grouping.group_loss(runs, task),
               "colour": colours.get(runs[0].label), "reference": runs[0].cell is None}
              for group, runs in grouping.groups(study).items() if not runs[0].dose]
    panels = _panels(study, task, utility)
    axis = "task accuracy (%)" if metric == "accuracy" else "ROUGE-L F1 (x 100)"
    png = plots.safety_utility(points, panels, (f"{label} on {harmful}", axis),
                               f"{harmful} vs {task}")
    if png is None:
        return [*blocks, Paragraph("No model has both a safety and a utility result yet.")]
    fronts = [t for t in (_front_text(points, p) for p in panels) if t]
    return [*blocks, Image("safety_utility.png", png, f"{label} on {harmful} against utility "
                           f"on {task}; bars: 95% intervals"),
            Paragraph("Pareto front of the fine-tunes (no other fine-tune is both at least as "
                      "safe and at least as useful, and better in one; the seed and the aligned "
                      "seed are reference points, not choices): " + "; ".join(fronts) + "."
                      + _front_template(study))]


def _front_template(study: Study) -> str:
    """Which template this section's front reads every cell under (each model's eval/), and
    how that differs from the headline's recommendation when a cell is tested otherwise."""
    from stayaligned.reports.headline import groups as cells
    from stayaligned.reports.headline import own_template, templates

    available = templates(study)
    first = next((v.template for m in study.models for v in m.views if v.folder == "eval"), None)
    if first is None:
        return ""
    own = sorted({f"{name} under {t}" for name, runs in cells(study).items()
                  if (t := own_template(runs, available)) and t != first})
    text = f" Every cell is read here under {first} (each model's eval/)"
    if own:
        text += (", while the headline's recommendation reads each cell under its own test "
                 f"template ({', '.join(own)}), so the two fronts can differ")
    return text + "."


# ---------------------------------------------------------------- 4. prefilling attack


def _prefill(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Prefilling attack")]
    groups = prefill_groups(study)
    if not groups:
        return [*blocks, Paragraph("No prefilling-attack benchmark in this study (set prefill_k "
                                   "on a harmful benchmark).")]
    curves = {base: {g: [(k, r) for k, name in ks.items() if (r := grouping.group_rate(runs, name))]
                     for g, runs in grouping.groups(study).items() if not runs[0].dose}
              for base, ks in groups.items()}
    png = plots.prefill_curves(curves, grouping.colours(study))
    if png is not None:
        blocks.append(Image("prefill.png", png, "Refusal rate against the number of prefilled "
                            "harmful tokens k (k = 0: the plain benchmark); bars: 95% intervals"))
    for base, ks in groups.items():
        header = ("Model", *(f"k={k}" for k in ks))
        rows = tuple((m.label, *(fmt_rate(safety_rate(m, n)) if m.metrics else m.missing("eval")
                                 for n in ks.values())) for m in study.models)
        blocks += [Heading(f"{base}: refusal rate by k", 3), Table(header, rows)]
    return blocks


# ---------------------------------------------------------------- 5. depth


def _depth(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Depth of alignment (per-token KL)")]
    if not (study.config.get("depth") or {}).get("enabled", True):
        return [*blocks, Paragraph("Depth is disabled in this study's config (depth.enabled).")]
    results = {g: grouping.pooled_depth([m.depth for m in runs if m.depth])
               for g, runs in grouping.groups(study).items()
               if runs[0].cell is not None and not runs[0].dose}
    results = {g: r for g, r in results.items() if r}
    png = plots.depth_curves(results, grouping.colours(study))
    if png is not None:
        any_result = next(iter(results.values()))
        blocks.append(Image("depth.png", png, "KL between each fine-tune and the base model at "
                            f"the first response tokens of {any_result.get('n_examples', '?')} "
                            f"examples of {any_result.get('source', '?')}; bars: ±1 SEM"))
    missing = [f"{m.label} ({m.missing('depth')})" for m in study.cells if not m.depth]
    if missing:
        blocks.append(Paragraph("No depth result for: " + "; ".join(missing)))
    return blocks


# ---------------------------------------------------------------- 6. over-refusal


def _over_refusal(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Over-refusal")]
    table = over_refusal_table(study)
    if table is None:
        return [*blocks, Paragraph("No benign benchmark in this study: add one with kind: benign "
                                   "(e.g. XSTest's safe prompts) to measure over-refusal.")]
    harmful, benign = main_benchmark(study, "harmful"), main_benchmark(study, "benign")
    rows = [(g, grouping.group_rate(runs, harmful), grouping.group_rate(runs, benign))
            for g, runs in grouping.groups(study).items() if not runs[0].dose]
    png = plots.over_refusal_bars(rows, harmful or "-", benign, grouping.colours(study))
    blocks.append(table)
    if png is not None:
        blocks.append(Image("over_refusal.png", png, f"Refusal on {harmful} (should be high) and "
                            f"on {benign} (should be low); bars: 95% intervals"))
    return blocks


# ---------------------------------------------------------------- 7. training


def _training_row(model: ModelRun) -> tuple[str, ...]:
    if model.run is None:
        return (model.label, model.missing("train"), "—", "—", "—")
    losses = [row["loss"] for row in model.log if isinstance(row.get("loss"), (int, float))]
    return (model.label, str(model.run.get("status", "—")),
            str(model.run.get("global_step", "—")), f"{losses[-1]:.4f}" if losses else "—",
            train_time(model.run))


def _training(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Training")]
    trained = [m for m in study.models if m.label != "seed" and m.maker == "train"]
    first = {g: runs[0] for g, runs in grouping.groups(study).items() if runs[0].label != "seed"}
    logs = {m.label: m.log for m in first.values() if m.log}
    png = plots.training_losses(logs)
    if png is not None:
        blocks.append(Image("training_loss.png", png, "Training loss and each named loss term "
                            "(loss/...) per logged step, the first seed of each cell; norms are "
                            "in the next plot"))
    norms = plots.training_norms(logs)
    if norms is not None:
        blocks.append(Image("training_norms.png", norms, "Gradient and probe norms the methods "
                            "log (not losses)"))
    rows = tuple(_training_row(m) for m in trained)
    blocks.append(Table(("Run", "Status", "Steps", "Last logged loss", "Train time"), rows))
    return blocks


# ---------------------------------------------------------------- 8. cells


def _repair_fields(model: ModelRun) -> Table:
    spec, record = model.repair_spec, model.repair or {}
    knob = record.get("knob", "strength")
    target = record.get("target") or {}
    fields = [
        ("repairs", f"{spec.get('of', '—')} (same seed) with {spec.get('method', '—')}"),
        ("options", json.dumps({k: v for k, v in spec.items() if k not in ("of", "method")},
                               sort_keys=True)),
        ("seed", str(model.seed if model.seed is not None else "—")),
        (f"chosen {knob}", _fmt(record.get("strength"))),
        ("target refusal (validation)", "—" if target.get("refusal") is None
         else f"{100 * target['refusal']:.1f}%"),
        ("target met", {True: "yes", False: "no (the best strength kept, on_miss: best)"}.get(
            record.get("target_met"), "—")),
        ("repair time", f"{record['seconds']:.1f} s" if record.get("seconds") is not None else "—"),
    ]
    fields += [(f"{stage} stage", model.status(stage)) for stage in ("repair", "eval", "depth")]
    return Table(("Field", "Value"), tuple(fields))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _cell_fields(model: ModelRun) -> Table:
    if model.maker == "repair":
        return _repair_fields(model)
    cell, run = model.cell or {}, model.run or {}
    templates = run.get("templates") or {}
    fields = [
        ("methods", " + ".join(cell.get("methods") or ["sft"])),
        ("options", json.dumps(cell.get("options") or {}, sort_keys=True)),
        ("train overrides", json.dumps(cell.get("train") or {}, sort_keys=True)),
        ("seed", str(model.seed if model.seed is not None else "—")),
        ("train template", str(templates.get("train", "—"))),
        ("eval template", str(templates.get("eval", "—"))),
        ("training examples", str(run.get("n_examples", "—"))),
        ("train time", train_time(run)),
    ]
    fields += [(f"{stage} stage", model.status(stage)) for stage in ("train", "eval", "depth")]
    return Table(("Field", "Value"), tuple(fields))


def _cells(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Cells")]
    for model in study.cells:
        blocks += [Heading(model.label, 3), _cell_fields(model)]
        run = model.run or {}
        shown = [("Train prompt (first training example, exactly as rendered):",
                  run.get("train_prompt_example")),
                 ("Eval prompt (the same example as the evaluation renders it):",
                  run.get("eval_prompt_example"))]
        examples = run.get("rendered_examples") or []
        if examples and examples[0].get("masked"):
            first = examples[0]
            shown.append((f"First training example {first.get('id')} with its loss mask "
                          f"(⟦...⟧ get loss; {first.get('n_loss_tokens')} of "
                          f"{first.get('n_tokens')} tokens):", first["masked"]))
        for caption, text in shown:
            if text:
                blocks += [Paragraph(caption), Code(str(text))]
    return blocks


# ---------------------------------------------------------------- 9. configuration


def _configuration(study: Study) -> list[Block]:
    config = yaml.safe_dump(study.config, sort_keys=False, allow_unicode=True).rstrip()
    versions = tuple((k, str(v)) for k, v in (study.manifest.get("versions") or {}).items())
    stages = list(study.manifest.get("stages") or [])
    stages += [s for s in study.progress if s not in stages]
    rows = []
    for key in stages:
        entry = study.progress.get(key) or {}
        seconds, cpu = entry.get("seconds"), entry.get("cpu_seconds")
        kind = entry.get("kind") or key.rsplit("/", 1)[-1]
        rows.append((key, str(kind), str(entry.get("status", "not run"))
                     + (" (reused)" if entry.get("reused") else ""),
                     f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "—",
                     f"{cpu:.1f}" if isinstance(cpu, (int, float)) else "—",
                     str(entry.get("error") or "")))
    return [Heading("Configuration"), Paragraph("The study's resolved config (study.json):"),
            Code(config), Heading("Package versions", 3), Table(("Package", "Version"), versions),
            Heading("Stages", 3),
            Table(("Stage", "Kind", "Status", "Seconds", "CPU seconds", "Error"), tuple(rows),
                  note="Seconds: wall clock (it counts waiting for a shared CPU, or a pause); "
                       "CPU seconds: the stage's process time over all its threads.")]
