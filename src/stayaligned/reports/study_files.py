"""Read a study directory (layout in stayaligned/study.py) into one `Study` object.

Every file is optional except study.json: a cell that did not finish, or failed, still gets a
`ModelRun` whose missing parts are None, and `ModelRun.missing(stage)` says why they are
missing ("not run", "started, not finished", or "failed: <error>" from progress.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from stayaligned.runfiles import read_json, read_jsonl


@dataclass
class View:
    """One evaluation of a model under one template, judged by one judge."""

    folder: str  # e.g. eval, eval-native-safe, eval/judge-keyword
    template: str
    judge: str
    metrics: dict
    verdicts: dict[str, dict[str, bool]]  # benchmark -> item id -> refused (safety benchmarks)
    # task benchmark scored by exact match (GSM8K) -> item id -> answered correctly
    correct: dict[str, dict[str, bool]] = field(default_factory=dict)


STAGES = ("train", "repair", "eval", "depth")  # a cell run's stage directories


@dataclass
class ModelRun:
    """One row of the report: the seed, the aligned seed, or one cell (x seed)."""

    label: str  # "seed", "aligned" or the cell's run id
    key: str  # its directory under the study: seed, aligned, cells/<run id>
    cell: dict | None = None  # the study config's cell entry (None for seed and aligned)
    seed: int | None = None
    metrics: dict | None = None  # eval/metrics.json
    run: dict | None = None  # train/run.json
    repair: dict | None = None  # repair/repair.json (a repair cell)
    # a repair's validation evaluations: name (aligned, or a strength) -> the `seconds` and
    # `seconds_total` of repair/sweep/<name>/eval/metrics.json (a reused one took 0 s)
    sweep_seconds: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)  # train/train_log.jsonl
    depth: dict | None = None  # depth/depth.json
    progress: dict = field(default_factory=dict)  # stage (train|repair|eval|depth) -> entry
    started: set = field(default_factory=set)  # stages whose directory exists
    # every evaluation view: eval/, eval-<template>/ and their judge-<name>/ re-judgments
    views: list[View] = field(default_factory=list)
    dose: tuple[str, object] | None = None  # (the cell, the value) of a dose run
    # the view `metrics` was read from: eval/, or its judge-<headline_judge>/ re-judgment
    primary: str = "eval"

    @property
    def group(self) -> str:
        """The cell a run pools with over seeds: its cell name (a dose run is its own)."""
        if self.cell is None or self.dose is not None:
            return self.label
        return str(self.cell.get("name", self.label))

    def view(self, template: str, judge: str) -> View | None:
        return next((v for v in self.views if v.template == template and v.judge == judge), None)

    @property
    def reading_of(self) -> str | None:
        """A `model_of` cell's other cell (whose model and evaluations this run reads)."""
        return (self.cell or {}).get("model_of")

    @property
    def read_template(self) -> str | None:
        """The template the run is read under: a reading's `read_under`, else its training
        run's recorded eval template (None when neither)."""
        return ((self.cell or {}).get("read_under")
                or ((self.run or {}).get("templates") or {}).get("eval"))

    @property
    def repair_spec(self) -> dict:
        """The cell's `repair:` spec (method, of, ...); {} for a trained cell or a reference."""
        return (self.cell or {}).get("repair") or {}

    @property
    def maker(self) -> str:
        """The stage that makes this run's model: repair for a repair cell, else train."""
        return "repair" if self.repair_spec else "train"

    def status(self, stage: str) -> str:
        """"done" when the stage's output is here (progress.json may not say so: a study
        copied or committed without it), else why not (`missing`)."""
        output = {"train": (self.run or {}).get("status") == "complete",
                  "repair": self.repair is not None, "eval": self.metrics is not None,
                  "depth": self.depth is not None}
        return "done" if output.get(stage) else self.missing(stage)

    def missing(self, stage: str) -> str:
        """Why `stage`'s output is absent: "failed: <error>" (its first 200 characters), or
        "not run" (saying so when a failed training is the reason)."""
        entry = self.progress.get(stage, {})
        if entry.get("status") == "failed":
            error = str(entry.get("error") or "no error recorded")
            return f"failed: {error[:200]}{'…' if len(error) > 200 else ''}"
        maker = self.maker
        if stage != maker and self.progress.get(maker, {}).get("status") == "failed":
            return f"not run ({'training' if maker == 'train' else 'the repair'} failed)"
        if stage in self.started:
            return "started, not finished"
        return "not run"

    def benchmark(self, name: str) -> dict | None:
        return (self.metrics or {}).get("benchmarks", {}).get(name)


@dataclass
class Study:
    root: Path
    manifest: dict  # study.json
    progress: dict  # progress.json
    models: list[ModelRun]  # the seed, the aligned seed, each cell and dose run
    unreadable: list[str]  # files that exist but are not valid JSON
    # the `model_of` cells: another cell's model and evaluations, read under another template
    # (the headline and the PTST reading show them; the per-model tables do not repeat them)
    readings: list[ModelRun] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.root.name)

    @property
    def reference_name(self) -> str:
        return str(self.config.get("reference") or "sft")

    @property
    def cells(self) -> list[ModelRun]:
        return [m for m in self.models if m.cell is not None]

    def reference_for(self, model: ModelRun) -> ModelRun | None:
        """The reference cell's run with the same seed as `model` (the first one for the
        seed and aligned rows), or None if the study has no such cell."""
        runs = [m for m in self.cells if m.cell.get("name") == self.reference_name]
        same_seed = [m for m in runs if model.seed is not None and m.seed == model.seed]
        return (same_seed or runs or [None])[0]


def load_study(study_dir: str | Path) -> Study:
    """Everything the report needs from `study_dir`; raises FileNotFoundError without study.json."""
    root = Path(study_dir)
    unreadable: list[str] = []
    manifest = _read(root / "study.json", unreadable)
    if manifest is None:
        raise FileNotFoundError(f"{root / 'study.json'}: not found; give the output directory of "
                                "`stayaligned study` (the one holding study.json)")
    progress = _read(root / "progress.json", unreadable) or {}
    runs = _model_runs(root, manifest)
    loaded = {m.key: _load_model(root, m, progress, unreadable) for m in runs if not m.reading_of}
    # a reading's files are its other cell's, read once: that run under the reading's name
    runs = [loaded[m.key] if not m.reading_of
            else replace(loaded[m.key], label=m.label, cell=m.cell, seed=m.seed) if m.key in loaded
            else _load_model(root, m, progress, unreadable) for m in runs]
    headline = (manifest.get("config") or {}).get("headline_judge")
    if headline:  # the tables read model.metrics: that judge's verdicts, first template
        for model in runs:
            first = next((v for v in model.views if v.folder == "eval"), None)
            mine = next((v for v in model.views if first and v.judge == headline
                         and v.template == first.template), None)
            if mine is not None:
                model.metrics, model.primary = mine.metrics, mine.folder
    models = [m for m in runs if not m.reading_of]
    return Study(root, manifest, progress, models, unreadable, [m for m in runs if m.reading_of])


def _model_runs(root: Path, manifest: dict) -> list[ModelRun]:
    """The rows in report order: seed, aligned, then each cell x seed as the study ran them."""
    config = manifest.get("config") or {}
    runs = []
    if config.get("evaluate_seed", True) or (root / "seed").is_dir():
        runs.append(ModelRun("seed", "seed"))
    if config.get("align") is not None or (root / "aligned").is_dir():
        runs.append(ModelRun("aligned", "aligned"))
    cells = config.get("cells") or []
    seeds = config.get("seeds") or [0]
    by_id = {}
    for cell in cells:
        for seed in seeds:
            run_id = f"{cell.get('name')}-seed{seed}" if len(seeds) > 1 else str(cell.get("name"))
            by_id[run_id] = (cell, seed)
    doses = {p.run_id: p for p in _dose_points(config, root) if p.extra}
    ids = manifest.get("cells") or list(by_id)
    for run_id in ids:
        cell, seed = by_id.get(run_id, ({"name": run_id}, None))
        of = cell.get("model_of")  # a reading: the other cell's directory (same seed)
        key = f"cells/{of}-seed{seed}" if of and len(seeds) > 1 else f"cells/{of or run_id}"
        model = ModelRun(run_id, key, cell=cell, seed=seed)
        if run_id in doses:
            point = doses[run_id]
            model.cell, model.seed = {**cell, "name": run_id}, (config.get("dose") or {}).get("seed")
            model.dose = (point.cell, point.value)
        runs.append(model)
    return runs


def _dose_points(config: dict, root: Path | None = None) -> list:
    """The dose axis of a study config (empty for studies without one). A dose block that
    cannot be read is an error: its runs would otherwise be reported as ordinary cells and
    enter the headline and the recommendation."""
    if not config.get("dose"):
        return []
    from stayaligned.config import ConfigError, StudyConfig, TrainConfig, from_dict, to_dict
    from stayaligned.grid import dose_points

    try:
        return dose_points(from_dict(StudyConfig, config), to_dict(TrainConfig()))
    except (ConfigError, TypeError) as err:
        where = Path(root) / "study.json" if root is not None else "the study's config"
        raise ConfigError(f"{where}: its dose block cannot be read ({err}); without it the dose "
                          "runs would be reported as cells. Fix the config's dose block (key, "
                          "values, cells, seed) or report with the version of stayaligned that "
                          "ran the study") from None


def _load_views(base: Path, unreadable: list[str]) -> list[View]:
    """eval/ and eval-*/ of one model, each with its judge-*/ re-judgments."""
    folders = sorted((p for p in base.glob("eval*") if p.is_dir()),
                     key=lambda p: (p.name != "eval", p.name))
    folders = [f for d in folders for f in (d, *sorted(d.glob("judge-*"))) if f.is_dir()]
    views = []
    for folder in folders:
        metrics = _read(folder / "metrics.json", unreadable)
        if not metrics:
            continue
        try:
            rows = read_jsonl(folder / "judgments.jsonl")
        except ValueError:
            unreadable.append(str(folder / "judgments.jsonl"))
            rows = []
        verdicts: dict[str, dict[str, bool]] = {}
        correct: dict[str, dict[str, bool]] = {}
        for row in rows:
            if isinstance(row.get("correct"), bool):
                correct.setdefault(row["benchmark"], {})[str(row["id"])] = row["correct"]
            safe = row.get("refusal")
            if safe is None and row.get("harmful") is not None:
                safe = not row["harmful"]
            if safe is not None:
                verdicts.setdefault(row["benchmark"], {})[str(row["id"])] = bool(safe)
        views.append(View(folder.relative_to(base).as_posix(), str(metrics.get("template")),
                          str(metrics.get("judge")), metrics, verdicts, correct))
    return views


def _load_model(root: Path, model: ModelRun, progress: dict, unreadable: list[str]) -> ModelRun:
    base = root / model.key
    model.started = {stage for stage in STAGES if (base / stage).is_dir()}
    model.metrics = _read(base / "eval" / "metrics.json", unreadable)
    model.run = _read(base / "train" / "run.json", unreadable)
    model.repair = _read(base / "repair" / "repair.json", unreadable)
    model.depth = _read(base / "depth" / "depth.json", unreadable)
    for folder in sorted((base / "repair" / "sweep").glob("*/eval")):
        metrics = _read(folder / "metrics.json", unreadable) or {}
        if "seconds" in metrics:
            model.sweep_seconds[folder.parent.name] = {
                "seconds": metrics["seconds"], "seconds_total": metrics.get("seconds_total")}
    model.views = _load_views(base, unreadable)
    try:
        model.log = read_jsonl(base / "train" / "train_log.jsonl")
    except ValueError:
        unreadable.append(str(base / "train" / "train_log.jsonl"))
    entries = {stage: progress.get(f"{model.key}/{stage}") for stage in STAGES}
    model.progress = {stage: entry for stage, entry in entries.items() if isinstance(entry, dict)}
    return model


def _read(path: Path, unreadable: list[str]) -> dict | None:
    """The JSON object in `path`; None (and the path noted) when missing or not valid JSON."""
    try:
        data = read_json(path)
    except (ValueError, OSError):
        unreadable.append(str(path))
        return None
    if data is not None and not isinstance(data, dict):
        unreadable.append(str(path))
        return None
    return data

