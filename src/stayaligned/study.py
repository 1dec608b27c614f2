"""`stayaligned study CONFIG`: a grid of fine-tunes from one config, resumable at every stage.

A study is a list of stages, each writing into its own directory under the study directory:

  study.json               the resolved config, package versions, the stage list
  progress.json            per stage: status (done / failed), seconds, error
  seed/eval/               the seed as given (if evaluate_seed)
  aligned/train/           `align` of the seed (if align), its merged weights the base model
  aligned/eval/
  cells/<cell>/train/      one fine-tune per cell (and per seed: <cell>-seed<k> with several)
  cells/<cell>/eval/       generations, judgments, task_loss, metrics
  cells/<cell>/depth/      per-token KL against the base model
  cells/<cell>/repair/     a repair cell's repaired model (`repair: {of: CELL, method: ...}`)

Further axes (stayaligned/grid.py; absent keys keep the layout above): `eval_templates`
evaluates every model under each template (eval/ for the first, eval-<template>/ for the
others), `judges` re-judges each evaluation's generations with every further judge into
eval*/judge-<name>/, and `dose` adds one-seed cells/<cell>-<key><value>/ runs at each value of
a train key (evaluated under the first template). With `depth.disjoint: true` the plan fails
when the depth prompts overlap STR's mining prompts or SAP's pairs.

A stage whose output is complete is skipped, so running the same command again after a kill
finishes the study without redoing finished training, generation or judging (an interrupted
training resumes from its last checkpoint, an interrupted evaluation from its last batch). A
failing cell is recorded with its error and the others go on; the command exits non-zero.

Parallelism: sequential by default. With `--devices 0,1,...` the shared stages run first, then
each cell runs in its own worker process pinned to one GPU through CUDA_VISIBLE_DEVICES (a
simple per-device worker pool, not accelerate: cells are independent jobs, and each fits on one
device). With `workers: N` (CPU) the shared stages run first, then N worker processes take the
cells in turn, each with cores // N torch threads and its output in logs/<cell>.log. Workers
run `stayaligned study workers.json --cells ID` on the resolved config the parent wrote, and
record their stages in the same progress.json under a file lock. Workers run under their
parent's lock of the study directory (and stop when it dies); any other run, `--cells` too,
takes that lock, so two runs never work on one study directory at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from stayaligned.config import (
    AlignConfig,
    CellConfig,
    ConfigError,
    EvalConfig,
    StudyConfig,
    TrainConfig,
    build,
    load,
    to_dict,
)
from stayaligned.runfiles import (WEIGHT_PATTERNS, atomic_write, has_weights, machine_info,
                                  package_versions, read_json, write_json)


@dataclass
class Stage:
    key: str  # its directory under the study, e.g. cells/sft/train
    kind: str  # eval | align | train | depth
    title: str
    cell: str | None  # the cell run id, None for shared stages
    run: Callable[[], object]
    done: Callable[[], bool]
    config: object = None  # its TrainConfig / EvalConfig, checked before the study starts
    makes: str | None = None  # the model directory it writes (align, train, repair stages)
    uses: tuple[str, ...] = ()  # the model directories it reads


def cell_ids(cfg: StudyConfig) -> list[tuple[str, object, int]]:
    """(run id, cell, seed) for every cell x seed; ids are unique and safe as directory names."""
    names = [c.name for c in cfg.cells]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise ConfigError(f"cells: the name {duplicate[0]!r} is used twice; cell names must be unique")
    for name in names:
        if not name or "/" in name or name.startswith(".") or name in ("seed", "aligned"):
            raise ConfigError(f"cells: {name!r} cannot be a cell name (a directory name that is "
                              "not 'seed' or 'aligned', without '/')")
    many = len(cfg.seeds) > 1
    ids = [(f"{c.name}-seed{s}" if many else c.name, c, s) for c in cfg.cells for s in cfg.seeds]
    dose = [(p.run_id, p.config, cfg.dose.seed) for p in _dose_points(cfg) if p.extra]
    dose_ids = [i for i, _, _ in dose]
    twice = sorted({i for i in dose_ids if dose_ids.count(i) > 1})
    if twice:
        raise ConfigError(f"dose.values: two values make the one run {twice[0]!r} (values equal, "
                          "or equal to 6 significant digits); list each dose once")
    clash = sorted({i for i, _, _ in dose} & {i for i, _, _ in ids})
    if clash:
        raise ConfigError(f"dose: the dose run {clash[0]!r} has the name of a cell run; rename "
                          "that cell")
    return ids + dose


def _dose_points(cfg: StudyConfig):
    from stayaligned.grid import dose_points

    return dose_points(cfg, to_dict(TrainConfig()))


# ---------------------------------------------------------------- configs of the stages


def align_config(cfg: StudyConfig, out: Path) -> AlignConfig:
    block = dict(cfg.align or {})
    base = block.pop("config", None)
    layers = []
    if base:
        loaded = load(AlignConfig, base)
        layers.append(to_dict(loaded))
    layers.append(block)
    layers.append({"model": to_dict(cfg.model), "data_dir": cfg.data_dir,
                   "output_dir": str(out / "aligned" / "train")})
    return build(AlignConfig, *layers, where="align")


def base_model(cfg: StudyConfig, out: Path) -> str:
    """What every cell fine-tunes: the aligned seed when the study aligns, else the seed."""
    return str(out / "aligned" / "train") if cfg.align is not None else cfg.model.name


def cell_train_config(cfg: StudyConfig, out: Path, run_id: str, cell, seed: int) -> TrainConfig:
    model = {**to_dict(cfg.model), "name": base_model(cfg, out)}
    return build(TrainConfig, cfg.train,
                 {"methods": list(cell.methods), "options": cell.options}, cell.train,
                 {"model": model, "data_dir": cfg.data_dir, "seed": seed,
                  "output_dir": str(out / "cells" / run_id / "train")},
                 where=f"cells.{cell.name}")


def eval_config(cfg: StudyConfig, model: str, target: Path, template: str | None = None,
                judge: str | None = None) -> EvalConfig:
    """`template` / `judge`: set by eval_templates / judges (None keeps the eval block's)."""
    chosen = {k: v for k, v in (("template", template), ("judge", judge)) if v is not None}
    return build(EvalConfig, cfg.eval,
                 {"model": {**to_dict(cfg.model), "name": model}, "data_dir": cfg.data_dir,
                  "output_dir": str(target)}, chosen, where="eval")


# ---------------------------------------------------------------- the stages


def _eval_done(cfg: EvalConfig) -> bool:
    """Finished, with every item scored, by this config (keys added since count as unchanged
    at their defaults); a changed config reruns it, and the stage files' fingerprint decides
    what of them is reused."""
    from stayaligned.fingerprint import differences

    metrics = read_json(Path(cfg.output_dir) / "metrics.json")
    if not metrics or metrics.get("unscored"):
        return False
    if differences(metrics.get("config", {}), to_dict(cfg), to_dict(EvalConfig())):
        return False
    from stayaligned.evaluation.run import eval_needs_rejoin

    if eval_needs_rejoin(cfg.output_dir):  # prefilled rows from before the join fix
        return False
    return not _made_from_changed(cfg)


MADE_FROM = "made_from.json"  # the record (run.json / repair.json) of the model evaluated


def _made_from_changed(cfg: EvalConfig) -> bool:
    """True when this evaluation's outputs were made from another version of its model
    (evaluations from before made_from.json count as unchanged)."""
    from stayaligned.fingerprint import run_record

    stored = read_json(Path(cfg.output_dir) / MADE_FROM)
    return stored is not None and stored.get("record") != run_record(cfg.model.name)


def _run_eval(cfg: EvalConfig):
    from stayaligned.evaluation.run import evaluate
    from stayaligned.evaluation.stage_prints import clear_stage_files
    from stayaligned.fingerprint import run_record

    out = Path(cfg.output_dir)
    if _made_from_changed(cfg):  # generations of another version of the model: start over
        clear_stage_files(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MADE_FROM, {"model": cfg.model.name, "record": run_record(cfg.model.name)})
    metrics = evaluate(cfg)
    if metrics.get("unscored"):
        raise RuntimeError(f"{metrics['unscored']} item(s) could not be judged (errors in "
                           f"{cfg.output_dir}/judgments.jsonl); fix the judge and rerun")
    return metrics


def _run_train(cfg: TrainConfig):
    from stayaligned.training.run import train

    _same_config(cfg)
    return train(cfg, resume=(Path(cfg.output_dir) / "run.json").exists())


def _same_config(cfg: TrainConfig) -> None:
    """A run directory holds one configuration: after an edit of the study config, a stale
    run (finished or not) is an error, not silently reused or resumed with other settings
    (the one fingerprint check of training/run.py)."""
    from stayaligned.training.run import check_same_run

    check_same_run(cfg, "delete that directory to retrain it, or restore the study config")


def _train_done(cfg: TrainConfig) -> bool:
    from stayaligned.training.run import check_same_data, check_same_run, is_complete

    if not is_complete(Path(cfg.output_dir)):
        return False
    # an archived run (its weights not in this checkout) is checked by its config alone: the
    # identity of the base it was trained from cannot be taken once that base is archived or
    # retrained in another checkout, nor its data once generated again (recovery triplets)
    own = has_weights(Path(cfg.output_dir))
    check_same_run(cfg, "delete that directory to retrain it, or restore the study config",
                   model=own and _present(cfg.model.name))
    if own:
        check_same_data(cfg, "so this finished run was made from other data; restore the data "
                             "files it was trained on, or delete that directory to retrain it")
    return True


def _run_depth(cfg: StudyConfig, base: str, model: str, target: Path):
    from stayaligned.config import ModelConfig
    from stayaligned.data.sources import load_source
    from stayaligned.evaluation.depth import depth_kl, write_depth
    from stayaligned.models import load_pair

    d = cfg.depth
    examples = load_source(d.source, split=d.split, limit=d.limit, data_dir=cfg.data_dir)
    base_cfg = ModelConfig(**{**to_dict(cfg.model), "name": base})
    tuned_cfg = ModelConfig(**{**to_dict(cfg.model), "name": model})
    reference, tuned, tokenizer = load_pair(base_cfg, tuned_cfg)  # LoRA: one copy
    result = depth_kl(reference, tuned, tokenizer, examples, d.template, n_tokens=d.tokens)
    result.update(source=d.source, split=d.split, reference=base, model=model)
    result["fingerprint"] = _depth_fingerprint(cfg, base, model)
    write_depth(target / "depth.json", result)
    return result


def _depth_fingerprint(cfg: StudyConfig, base: str, model: str) -> dict:
    from stayaligned.fingerprint import model_identity, run_record

    return {"depth": to_dict(cfg.depth), "reference": model_identity(base),
            "model": model_identity(model),
            "records": {"reference": run_record(base), "model": run_record(model)}}


def _depth_done(cfg: StudyConfig, base: str, model: str, target: Path) -> bool:
    """depth.json exists and was made from these two models with these settings (a file
    from before fingerprints is accepted); either model remade since (another run.json or
    repair.json: a large weights file's identity is its size and header only) reruns it, like
    an evaluation; another setup is a StaleError."""
    from stayaligned.fingerprint import check_same

    stored = read_json(target / "depth.json")
    if stored is None:
        return False
    if not all(_present(m) for m in (base, model)):
        return True  # archived: computed when the weights were here (they are not hashable now)
    if "fingerprint" in stored:
        now = _depth_fingerprint(cfg, base, model)
        records = stored["fingerprint"].get("records")  # absent in files from before them
        if records is not None and records != now["records"]:
            return False
        check_same(str(target / "depth.json"),
                   {k: v for k, v in stored["fingerprint"].items() if k != "records"},
                   {k: v for k, v in now.items() if k != "records"},
                   {"depth": to_dict(type(cfg.depth)())},
                   "delete it to recompute, or restore the study config")
    return True


# ---------------------------------------------------------------- studies kept in git

# What a study directory keeps out of git (written as OUT/.gitignore): weights, checkpoints and
# the tokenizer copies that only serve them. The rest (configs, run records, training logs,
# generations, judgments, metrics, repair curves) is small and can be committed, and a
# checkout without the weights resumes the study: see _archive_aware.
GITIGNORE = "\n".join([
    "# written by `stayaligned study`: weights and checkpoints stay out of git. Everything else",
    "# (configs, run.json, training logs, generations, judgments, metrics) can be committed; in a",
    "# checkout without the weights the study reuses every finished cell and retrains a model only",
    "# when a stage that still has to run needs its weights.",
    *WEIGHT_PATTERNS, "checkpoints/", "tokenizer.json", ".stayaligned.lock", ".progress.lock", ""])


def _present(model: str) -> bool:
    """A model name whose weights are here: anything that is not a study run directory (a Hub
    id, the embedded model, a file) counts as present; a run directory needs its weights."""
    path = Path(model)
    if not path.is_dir() or not ((path / "run.json").is_file() or (path / "repair.json").is_file()):
        return True
    return has_weights(path)


def _archive_aware(stages: list[Stage]) -> list[Stage]:
    """A stage that makes a model (align, train, repair) and finished, but whose weights are not
    in this checkout (the study directory was committed without them), counts as done while
    every stage that reads that model is done; otherwise it runs again from scratch (the
    weights are needed), and a training run records whether it reproduced the archived run's
    logged losses. A consumer that itself makes a model counts as done in that same sense: a
    fine-tune that runs again needs the weights of the model it is trained from."""
    wrapped: dict[int, Stage] = {}
    for stage in reversed(stages):  # consumers come after the stage that makes their model
        if stage.makes is None:
            wrapped[id(stage)] = stage
            continue
        consumers = [wrapped[id(s)] for s in stages if stage.makes in s.uses]

        def done(stage=stage, consumers=consumers) -> bool:
            if not stage.done():
                return False
            if has_weights(Path(stage.makes)):
                return True
            return all(c.done() for c in consumers)

        def run(stage=stage):
            if stage.done() and not has_weights(Path(stage.makes)):
                return _rerun_archived(stage)
            return stage.run()

        wrapped[id(stage)] = Stage(stage.key, stage.kind, stage.title, stage.cell, run, done,
                                   stage.config, stage.makes, stage.uses)
    return [wrapped[id(stage)] for stage in stages]


def _rerun_archived(stage: Stage):
    """Run a finished stage again whose weights are missing, from scratch; a training run's
    run.json gains `archived_rerun`: whether its logged losses equal the archived run's (the
    cells that used the archived weights were made from the same model exactly when they do)."""
    from stayaligned.runlock import clear_dir

    target = Path(stage.makes)
    old_log = _logged_losses(target)
    old_run = read_json(target / "run.json") or {}
    clear_dir(target)
    result = stage.run()
    if stage.kind in ("align", "train"):
        new_log = _logged_losses(target)
        steps = sorted(set(old_log) & set(new_log))
        differs = [s for s in steps if old_log[s] != new_log[s]]
        note = {"date_of_archived_run": (old_run.get("provenance") or {}).get("date"),
                "logged_steps_compared": len(steps), "same_losses": bool(steps) and not differs,
                "first_differing_step": differs[0] if differs else None}
        manifest = read_json(target / "run.json") or {}
        write_json(target / "run.json", {**manifest, "archived_rerun": note})
        if not note["same_losses"]:
            print(f"{stage.key}: retrained because its weights were not in this checkout, and its "
                  f"logged losses differ from the archived run's (first at step "
                  f"{note['first_differing_step']}): cells made before and after used "
                  "different weights")
    return result


def _logged_losses(run_dir: Path) -> dict:
    import json

    path = run_dir / "train_log.jsonl"
    losses = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row and "step" in row:
                losses[row["step"]] = row["loss"]
    return losses


def plan(cfg: StudyConfig) -> list[Stage]:
    """Every stage of the study, in order."""
    out = Path(cfg.output_dir)
    stages: list[Stage] = []

    from stayaligned.grid import cell_views, eval_views, judge_names

    judges = judge_names(cfg.judges, cfg.eval)
    dose_runs = {p.run_id for p in _dose_points(cfg) if p.extra}
    check_readings(cfg)
    check_ptst_twins(cfg)
    if cfg.depth.enabled and cfg.depth.disjoint:
        from stayaligned.grid import check_depth_disjoint

        trained = {run_id: cell_train_config(cfg, out, run_id, cell, seed)
                   for run_id, cell, seed in cell_ids(cfg)
                   if cell.repair is None and cell.model_of is None}
        check_depth_disjoint(cfg, {k: (list(t.methods), t.options) for k, t in trained.items()})

    def add_eval(key, title, model, cell=None, views=None):  # key: the model's directory
        views = views or eval_views(cfg.eval_templates)
        for template, folder in views[:1] if cell in dose_runs else views:
            ecfg = eval_config(cfg, model, out / key / folder, template,
                               judges[0] if cfg.judges else None)
            where = f" ({template})" if len(views) > 1 else ""
            stages.append(Stage(f"{key}/{folder}", "eval", title + where, cell,
                                lambda ecfg=ecfg: _run_eval(ecfg),
                                lambda ecfg=ecfg: _eval_done(ecfg), ecfg, uses=(model,)))
            for judge in judges[1:]:
                stages.append(_judge_stage(out, f"{key}/{folder}", judge, title + where, cell))

    if cfg.evaluate_seed:
        add_eval("seed", "evaluate the seed", cfg.model.name)
    if cfg.align is not None:
        acfg = align_config(cfg, out)
        stages.append(Stage("aligned/train", "align", "align the seed", None,
                            lambda: _run_train(acfg), lambda: _train_done(acfg), acfg,
                            makes=acfg.output_dir))
        add_eval("aligned", "evaluate the aligned seed", str(out / "aligned" / "train"))
    base = base_model(cfg, out)
    for run_id, cell, seed in cell_ids(cfg):
        if cell.model_of is not None:  # a reading of another cell's model: nothing to run
            continue
        if cell.repair is not None:
            trained = _add_repair(cfg, out, stages, run_id, cell, seed)
        else:
            tcfg = cell_train_config(cfg, out, run_id, cell, seed)
            trained = str(out / "cells" / run_id / "train")
            stages.append(Stage(f"cells/{run_id}/train", "train",
                                f"{run_id}: fine-tune ({' + '.join(cell.methods)})", run_id,
                                lambda tcfg=tcfg: _run_train(tcfg),
                                lambda tcfg=tcfg: _train_done(tcfg),
                                tcfg, makes=tcfg.output_dir, uses=(tcfg.model.name,)))
        add_eval(f"cells/{run_id}", f"{run_id}: evaluate", trained, cell=run_id,
                 views=cell_views(cfg, cell))
        if cfg.depth.enabled:
            target = out / "cells" / run_id / "depth"
            stages.append(Stage(
                f"cells/{run_id}/depth", "depth", f"{run_id}: per-token KL against the base",
                run_id, lambda target=target, trained=trained: _run_depth(cfg, base, trained, target),
                lambda target=target, trained=trained: _depth_done(cfg, base, trained, target),
                uses=(base, trained)))
    return _archive_aware(stages)


def check_readings(cfg: StudyConfig) -> None:
    """A cell with `model_of` has no stages: the report reads the named cell's model and
    evaluations under `read_under`. Anything else it sets would be ignored, so it is an error,
    as are a `read_under` without `model_of` and a template the named cell is not evaluated
    under."""
    from stayaligned.grid import cell_views

    names = [c.name for c in cfg.cells]
    for cell in cfg.cells:
        key = f"cells.{cell.name}"
        if cell.model_of is None:
            if cell.read_under is not None:
                raise ConfigError(f"{key}.read_under: only a cell with `model_of` (a reading of "
                                  "another cell's model) has one; a trained cell is read under "
                                  "its run's recorded eval template (train.eval_template)")
            continue
        of = cell.model_of
        if of not in names[:names.index(cell.name)]:
            raise ConfigError(f"{key}.model_of: {of!r} must name a cell listed before it "
                              f"({', '.join(names[:names.index(cell.name)]) or 'none'})")
        other = cfg.cells[names.index(of)]
        if other.model_of is not None:
            raise ConfigError(f"{key}.model_of: {of!r} is itself a reading of "
                              f"{other.model_of!r}; name {other.model_of!r}")
        ignored = [k for k, v in (("methods", cell.methods != CellConfig().methods),
                                  ("options", cell.options), ("train", cell.train),
                                  ("repair", cell.repair),
                                  ("eval_templates", cell.eval_templates)) if v]
        if ignored:
            raise ConfigError(f"{key}: {', '.join(ignored)} would be ignored: a `model_of` cell "
                              f"trains and evaluates nothing (it reads {of}'s model); remove "
                              "them, or make it a cell of its own")
        views = [t for t, _ in cell_views(cfg, other) if t is not None]
        if cell.read_under not in views:
            under = ", ".join(views) or "none: set the study's eval_templates"
            raise ConfigError(f"{key}.read_under: {cell.read_under!r} is not a template {of} is "
                              f"evaluated under ({under}); name one of them")


def check_ptst_twins(cfg: StudyConfig) -> None:
    """A ptst cell whose train template is the one an sft cell of the study trains with, on
    the same data and budget, would make that cell's model bit for bit (PTST changes only the
    templates) and repeat its evaluations: a ConfigError that names the reading to use."""
    from dataclasses import replace

    from stayaligned.methods.ptst import PtstOptions

    out = Path(cfg.output_dir)
    seed = cfg.seeds[0] if cfg.seeds else 0

    def bare(cell, template):
        t = cell_train_config(cfg, out, "twin", cell, seed)
        return t.template == template, replace(t, methods=(), options={}, template="",
                                               eval_template="")

    plain = [c for c in cfg.cells if tuple(c.methods) == ("sft",) and c.repair is None
             and c.model_of is None]
    for cell in cfg.cells:
        if tuple(cell.methods) != ("ptst",) or cell.repair is not None or cell.model_of:
            continue
        ptst = {**vars(PtstOptions()), **((cell.options or {}).get("ptst") or {})}
        _, mine = bare(cell, None)
        for other in plain:
            same_template, theirs = bare(other, ptst["train_template"])
            if same_template and mine == theirs:
                raise ConfigError(
                    f"cells.{cell.name}: trains with {ptst['train_template']}, the template "
                    f"cells.{other.name} trains with, on the same data and budget: its model "
                    f"would be {other.name}'s bit for bit. Make it a reading of that model: "
                    f"{{name: {cell.name}, model_of: {other.name}, read_under: "
                    f"\"{ptst['eval_template']}\"}}")


def repair_config(cfg: StudyConfig, out: Path, run_id: str, cell, seed: int):
    """The RepairConfig of a repair cell: the `of` cell's fine-tune (same seed), the study's
    aligned seed, and the seed as the pre-alignment base when the study aligns it."""
    from stayaligned.config import RepairConfig

    names = [c.name for c in cfg.cells]
    of = cell.repair.of
    trained = [n for n, c in zip(names, cfg.cells) if c.repair is None and c.model_of is None]
    if of not in trained or of == cell.name:
        raise ConfigError(f"cells.{cell.name}.repair.of: {of!r} must name an earlier training "
                          f"cell of this study ({', '.join(trained)})")
    if names.index(of) > names.index(cell.name):
        raise ConfigError(f"cells.{cell.name}: list it after the cell it repairs ({of})")
    of_id = f"{of}-seed{seed}" if len(cfg.seeds) > 1 else of
    pre_aligned = cfg.model.name if cfg.align is not None else None
    return build(RepairConfig, to_dict(cell.repair), {
        "model": str(out / "cells" / of_id / "train"), "aligned": base_model(cfg, out),
        "base": cell.repair.base or pre_aligned, "data_dir": cfg.data_dir, "seed": seed,
        "output_dir": str(out / "cells" / run_id / "repair")}, where=f"cells.{cell.name}.repair")


def _add_repair(cfg: StudyConfig, out: Path, stages: list, run_id: str, cell, seed: int) -> str:
    rcfg = repair_config(cfg, out, run_id, cell, seed)

    def run():
        from stayaligned.repair.run import run_repair
        from stayaligned.training.run import is_complete

        if not is_complete(Path(rcfg.model)):
            raise ConfigError(f"{rcfg.model} is not a finished fine-tune; run the cell "
                              f"{cell.repair.of} first")
        return run_repair(rcfg)

    def done():
        record = read_json(Path(rcfg.output_dir) / "repair.json") or {}
        if "strength" not in record or not _same_repair_setup(record, rcfg):
            return False
        # archived (its weights not in this checkout): made from the inputs as they were then,
        # like an archived fine-tune whose base was retrained since (see _train_done)
        if has_weights(Path(rcfg.output_dir)):
            _same_repair_inputs(record, rcfg.output_dir)
        return True

    stages.append(Stage(f"cells/{run_id}/repair", "repair",
                        f"{run_id}: repair {cell.repair.of} ({cell.repair.method})", run_id, run, done,
                        makes=rcfg.output_dir, uses=(rcfg.model, rcfg.aligned)))
    return rcfg.output_dir


def _same_repair_setup(record: dict, rcfg) -> bool:
    """repair.json was made with this repair config. Its validation counts as the benchmarks it
    resolved to (repair.json's `validation`, the task hold-out aside), compared with what the
    config resolves to now: a config that pins what an older default gave is the same setup,
    and one relying on a default that changed since (the demo requests' align split until
    0.x) is not; the block's other settings compare as written."""
    from stayaligned.config import BenchmarkConfig
    from stayaligned.fingerprint import differences
    from stayaligned.repair.sweep import validation_config

    old, new = dict(record.get("config", {})), to_dict(rcfg)
    if "validation" in record:
        resolved = to_dict(validation_config(rcfg, rcfg.aligned, Path(rcfg.output_dir), None))
        now = resolved["benchmarks"]
        then = [b for b in record["validation"] if b.get("name") != "task-holdout"]
        defaults = to_dict(BenchmarkConfig())
        if len(now) != len(then) or any(differences(a, b, defaults) for a, b in zip(then, now)):
            return False
        old["validation"] = {k: v for k, v in (old.get("validation") or {}).items()
                             if k != "benchmarks"}
        new["validation"] = {k: v for k, v in new["validation"].items() if k != "benchmarks"}
    return not differences(old, new, to_dict(type(rcfg)()))


def _same_repair_inputs(record: dict, where: str) -> None:
    """A repair made from other weights than the fine-tune and aligned model now in place (the
    `of` cell retrained after an edit, say) is a StaleError, not silently reused; inputs whose
    weights are absent (an archived study) cannot be checked and pass."""
    from stayaligned.fingerprint import StaleError

    for role in ("finetune", "aligned"):
        for path, digest in ((record.get("inputs") or {}).get(role, {}).get("sha256") or {}).items():
            if Path(path).is_file() and _cached_sha256(Path(path)) != digest:
                raise StaleError(f"{where}/repair.json was made from other {role} weights "
                                 f"({path} has changed since); delete {where} to repair again")


_SHA256: dict = {}


def _cached_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) for this process (done() is asked often)."""
    from stayaligned.runfiles import file_sha256

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def _judge_stage(out: Path, eval_key: str, judge: str, title: str, cell: str | None) -> Stage:
    """Re-judge the generations of one eval stage with another judge (no regeneration)."""
    from stayaligned.evaluation.rejudge import rejudge, rejudge_done
    from stayaligned.grid import judge_dir

    source, target = out / eval_key, out / eval_key / judge_dir(judge)
    return Stage(f"{eval_key}/{judge_dir(judge)}", "judge", f"{title}: re-judge ({judge})", cell,
                 lambda: rejudge(source, judge, None, target),
                 lambda: rejudge_done(source, judge, target))


# ---------------------------------------------------------------- running


class Progress:
    """progress.json plus the console line: stages done, current stage, time left."""

    def __init__(self, out: Path, stages: list[Stage], console: Console):
        self.path, self.stages, self.console = out / "progress.json", stages, console
        self.state = read_json(self.path) or {}
        self.lock = threading.Lock()

    def reconcile(self) -> list[str]:
        """Stages progress.json records as done whose outputs are gone or no longer match
        (a cell deleted to be made again, a model retrained): recorded as `redo`, so that the
        count of stages done and the time left are right; their seconds still inform the
        estimate. Returns their keys."""
        from stayaligned.runlock import file_mutex

        redo = [s.key for s in self.stages
                if self.state.get(s.key, {}).get("status") == "done" and not _quietly_done(s)]
        if redo:
            with self.lock, file_mutex(self.path.with_name(".progress.lock")):
                self.state = read_json(self.path) or {}
                for key in redo:
                    self.state[key] = {**self.state[key], "status": "redo"}
                write_json(self.path, self.state)
        return redo

    def record(self, stage: Stage, **fields) -> None:
        from stayaligned.runlock import file_mutex

        # worker processes (--devices, workers) share progress.json: read-modify-write locked
        with self.lock, file_mutex(self.path.with_name(".progress.lock")):
            self.state = {**(read_json(self.path) or {}), stage.key: {"kind": stage.kind, **fields}}
            write_json(self.path, self.state)

    def eta(self, remaining: list[Stage], parallel: int = 1) -> str:
        """Time left from the mean measured seconds of each kind of stage; with `parallel`
        workers the wall time is the stage time shared among them.

        >>> from types import SimpleNamespace as S
        >>> p = Progress.__new__(Progress)
        >>> p.state = {"a": {"kind": "eval", "status": "done", "seconds": 600.0}}
        >>> p.eta([S(kind="eval")] * 3), p.eta([S(kind="eval")] * 30, parallel=2)
        ('about 30 min left', 'about 2.5 h left (5.0 h of stages, 2 at a time)')
        >>> p.eta([S(kind="train")])
        'time left unknown until each kind of stage has run once (1 stage(s) left)'
        >>> p.state["j"] = {"kind": "judge", "status": "done", "seconds": 0.0}  # a cached re-judge
        >>> p.eta([S(kind="judge"), S(kind="eval")])
        'about 10 min left'
        """
        timed: dict[str, list[float]] = {}
        for entry in self.state.values():
            if entry.get("status") in ("done", "redo") and entry.get("seconds") is not None:
                timed.setdefault(entry["kind"], []).append(entry["seconds"])  # 0.0 counts
        if any(s.kind not in timed for s in remaining):
            return ("time left unknown until each kind of stage has run once "
                    f"({len(remaining)} stage(s) left)")
        left = sum(sum(timed[s.kind]) / len(timed[s.kind]) for s in remaining)

        def span(seconds: float) -> str:
            return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"

        if parallel > 1 and left:
            return f"about {span(left / parallel)} left ({span(left)} of stages, {parallel} at a time)"
        return f"about {span(left)} left"

    def not_done(self) -> list[Stage]:
        """The study's stages progress.json does not record as done (any cell, any worker)."""
        return [s for s in self.stages if self.state.get(s.key, {}).get("status") != "done"]

    def announce(self, index: int, stage: Stage, remaining: list[Stage], parallel: int = 1) -> None:
        done = sum(1 for s in self.stages if self.state.get(s.key, {}).get("status") == "done")
        self.console.rule(f"[bold][{index}/{len(self.stages)}] {stage.title}[/bold]")
        self.console.print(f"[dim]{done} of {len(self.stages)} stages done; "
                           f"{self.eta(remaining, parallel)}[/dim]")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children: unlike the wall
    clock, it does not count time the stage waited for a shared CPU or was stopped (SIGSTOP)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_stage(stage: Stage, progress: Progress) -> bool:
    """Run one stage unless finished; True when it is (or already was) complete. Records its
    wall-clock `seconds` and its `cpu_seconds` (all threads: up to threads x seconds)."""
    started, cpu_started = time.time(), cpu_seconds()
    try:
        if stage.done():
            before = progress.state.get(stage.key, {})
            if before.get("status") != "done":  # a `redo` found done keeps its measured time
                kept = {k: before[k] for k in ("seconds", "cpu_seconds") if k in before}
                progress.record(stage, status="done", **{"seconds": None, **kept}, reused=True)
            return True
        stage.run()
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - recorded, reported, and the study goes on
        release_memory()
        progress.record(stage, status="failed", error=f"{type(err).__name__}: {err}",
                        traceback=traceback.format_exc(limit=8))
        progress.console.print(f"[red]{stage.key} failed: {type(err).__name__}: {err}[/red]")
        return False
    seconds = round(time.time() - started, 1)
    cpu = round(cpu_seconds() - cpu_started, 1)
    release_memory()
    progress.record(stage, status="done", seconds=seconds, cpu_seconds=cpu, **memory_mb())
    return True


def release_memory() -> None:
    """Between stages: drop the finished stage's objects and hand freed memory back to the OS.
    One process runs many stages (an align, then each cell's training and evaluation), and
    glibc keeps freed arenas unless asked to return them; a v1 study process was killed by the
    OOM killer at 13.4 GB resident during its fifth stage (progress.json now records each
    stage's rss_mb and peak_rss_mb, to see where memory goes)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def memory_mb() -> dict:
    """The process's resident size now and its peak so far, in MB (Linux; {} elsewhere)."""
    try:
        import resource

        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return {"rss_mb": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    except (OSError, ValueError, ImportError):
        return {}


def describe(cfg: StudyConfig, console: Console | None = None,
             only: list[str] | None = None) -> list[tuple[str, str]]:
    """The stages and whether each is done, without running anything (`--dry-run`); with
    `only` (`--cells`), the shared stages and those cells' stages, as such a run would see."""
    from rich.table import Table

    console = console or Console()
    _check_cells(cfg, only)
    state = read_json(Path(cfg.output_dir) / "progress.json") or {}
    rows = []
    before = {"failed": "to do (failed before)", "done": "to do again (its outputs are gone "
              "or were made from other inputs)", "redo": "to do again (its outputs are gone "
              "or were made from other inputs)"}
    for stage in plan(cfg):
        if only is not None and stage.cell is not None and stage.cell not in only:
            continue
        try:  # progress.json only says why a stage still to do is to do
            status = "done" if stage.done() else before.get(
                state.get(stage.key, {}).get("status"), "to do")
        except ConfigError as err:
            status = f"stale: {err}"
        rows.append((stage.key, status))
    table = Table(title=f"study {cfg.name}: {cfg.output_dir}")
    for column in ("stage", "status"):
        table.add_column(column)
    for key, status in rows:
        table.add_row(key, status)
    console.print(table)
    return rows


def run_study(cfg: StudyConfig, *, only: list[str] | None = None, devices: list[str] | None = None,
              argv: list[str] | None = None, console: Console | None = None) -> dict:
    """Run (or resume) the study; returns {"failed": [stage keys], "output_dir": ...}."""
    console = console or Console()
    out = Path(cfg.output_dir)
    stages = plan(cfg)
    check_stages(cfg, stages)
    from stayaligned.runlock import holder, run_lock

    if only is not None and holder(out) == os.getppid():  # a worker, under its parent's lock
        die_with_parent()
        return _run_study(cfg, stages, only, devices, argv, console)
    # any other run (a whole study, a `--cells` run of a person or a bench script) holds the
    # lock: two of them would run the same cells at once
    with run_lock(out):
        return _run_study(cfg, stages, only, devices, argv, console)


PARENT_ENV = "STAYALIGNED_STUDY_PARENT"  # set by the cell pool: the PID of the study process


def die_with_parent() -> None:
    """A worker started by a study's cell pool stops when that study process dies, killed
    included (Linux; elsewhere nothing changes): an orphan would go on with its cell beside
    the worker a rerun of the study starts on the same cell (both writing its log, one failing
    on the other's lock, twice the memory)."""
    import signal

    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc
        return
    if os.getppid() != int(parent):  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def check_stages(cfg: StudyConfig, stages: list[Stage]) -> None:
    """Every stage's config, checked before the first stage runs (models made by earlier
    stages do not exist yet: only the study's own model is checked)."""
    from stayaligned.validate import check_eval, check_model, check_train

    if not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise ConfigError(f"workers: {cfg.workers!r} is not a number of worker processes; use 1 "
                          "(cells one after another) or more")
    from stayaligned.grid import judge_names

    names = judge_names(cfg.judges, cfg.eval)
    if cfg.headline_judge is not None and cfg.headline_judge not in names:
        raise ConfigError(f"headline_judge: {cfg.headline_judge!r} is not one of this study's "
                          f"judges ({', '.join(names)}); add it to `judges` or pick one of them")
    check_model(cfg.model)
    for stage in stages:
        where = f"{stage.key}: "
        try:
            if isinstance(stage.config, TrainConfig):
                check_train(stage.config, model=False)
            elif isinstance(stage.config, EvalConfig):
                check_eval(stage.config, model=False)
        except ConfigError as err:
            raise ConfigError(where + str(err)) from None


def _check_cells(cfg: StudyConfig, only: list[str] | None) -> list[str]:
    """The study's cell ids; a ConfigError naming an id of `only` (`--cells`) that is not one."""
    ids = [run_id for run_id, _, _ in cell_ids(cfg)]
    unknown = [c for c in only or [] if c not in ids]
    if unknown:
        raise ConfigError(f"--cells: {unknown[0]!r} is not a cell of this study ({', '.join(ids)})")
    return ids


def _run_study(cfg: StudyConfig, stages: list[Stage], only, devices, argv, console) -> dict:
    out = Path(cfg.output_dir)
    ids = _check_cells(cfg, only)
    if not (out / ".gitignore").exists():  # atomic: a torn one would be kept, weights committed
        atomic_write(out / ".gitignore", GITIGNORE)
    if only is None:
        write_json(out / "study.json", {"config": to_dict(cfg), "versions": package_versions(),
                                        "machine": machine_info(),
                                        "cells": ids, "stages": [s.key for s in stages]})
    progress = Progress(out, stages, console)
    if only is None and (redo := progress.reconcile()):
        console.print(f"[dim]{len(redo)} stage(s) recorded as done will run again (their outputs "
                      f"are gone or were made from other inputs): {', '.join(redo[:6])}"
                      + (", ..." if len(redo) > 6 else "") + "[/dim]")
    shared = [s for s in stages if s.cell is None]
    mine = [s for s in stages if s.cell is not None and (only is None or s.cell in only)]
    failed: list[str] = []
    # every cell needs the shared stages (seed, aligned seed); a worker (--cells) finds them done
    # by its parent, a direct `--cells` or bench run on a fresh directory runs them first
    parallel = len(devices) if devices else max(1, cfg.workers)
    failed += _run_sequence(shared, stages, progress, parallel)
    if failed:
        return _finish(failed, out, console)
    if devices and only is None:
        failed += _run_on_devices(cfg, ids, devices, argv or [], console, progress)
        progress.state = read_json(progress.path) or {}
    elif cfg.workers > 1 and only is None and len(pending := [
            run_id for run_id in ids
            if any(s.cell == run_id and not _quietly_done(s) for s in stages)]) > 1:
        failed += _run_on_workers(cfg, pending, console, progress)
        progress.state = read_json(progress.path) or {}
        # each finished cell's stages, seen from here (a no-op: they are done)
        failed += _run_sequence([s for s in mine if s.cell not in pending], stages, progress,
                                parallel)
    else:
        failed += _run_sequence(mine, stages, progress, parallel)
    return _finish(failed, out, console)


def _run_sequence(todo: list[Stage], stages: list[Stage], progress: Progress,
                  parallel: int = 1) -> list[str]:
    failed, broken_cells = [], set()
    for i, stage in enumerate(todo):
        if stage.cell in broken_cells:  # a cell's eval needs its training
            continue
        # this sequence's stages still to run, and every other stage of the study not yet
        # done (the cells after the shared stages, other workers' cells)
        mine = set(map(id, todo))
        remaining = ([s for s in todo[i:] if not _quietly_done(s)]
                     + [s for s in progress.not_done() if id(s) not in mine])
        progress.announce(stages.index(stage) + 1, stage, remaining, parallel)
        if not run_stage(stage, progress):
            failed.append(stage.key)
            broken_cells.add(stage.cell)
            if stage.cell is None:
                break
    return failed


def _quietly_done(stage: Stage) -> bool:
    try:
        return stage.done()
    except ConfigError:
        return False


def cell_dependencies(cfg: StudyConfig) -> dict[str, set[str]]:
    """The cell runs each cell run needs finished first: a repair cell's `of` cell (same seed)."""
    many = len(cfg.seeds) > 1
    return {run_id: {f"{cell.repair.of}-seed{seed}" if many else cell.repair.of}
            for run_id, cell, seed in cell_ids(cfg) if cell.repair is not None}


def _run_on_devices(cfg: StudyConfig, ids: list[str], devices: list[str], argv: list[str],
                    console: Console, progress: Progress | None = None) -> list[str]:
    """One worker per device, each running `stayaligned study ... --cells ID` for the next
    cell with CUDA_VISIBLE_DEVICES set to its device."""
    return _cell_pool(ids, argv, console,
                      [(f"device {d}", {"CUDA_VISIBLE_DEVICES": d}) for d in devices],
                      after=cell_dependencies(cfg), progress=progress)


def _run_on_workers(cfg: StudyConfig, ids: list[str], console: Console,
                    progress: Progress | None = None) -> list[str]:
    """`cfg.workers` worker processes on the CPU, each running `stayaligned study
    OUT/workers.json --cells ID` for the next cell with cores // workers torch threads, its
    output in OUT/logs/ID.log; returns the cells that failed."""
    import json

    out = Path(cfg.output_dir)
    config = out / "workers.json"  # JSON is YAML: the resolved config, paths as given (cwd)
    atomic_write(config, json.dumps(to_dict(cfg), indent=1) + "\n")
    threads = str(max(1, (os.cpu_count() or 1) // cfg.workers))
    slot = (f"{threads} thread(s)", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    return _cell_pool(ids, [str(config)], console, [slot] * cfg.workers, logs=out / "logs",
                      after=cell_dependencies(cfg), progress=progress)


class _Queue:
    """The cells still to run, handed out in order, a cell only once every cell it needs
    (`after`) among them has finished; a cell whose prerequisite failed is not run (failed)."""

    def __init__(self, ids: list[str], after: dict[str, set[str]]):
        self.pending, self.ids = list(ids), set(ids)
        self.after = {i: set(after.get(i, ())) & self.ids for i in ids}
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.cond = threading.Condition()

    def take(self) -> str | None:
        with self.cond:
            while self.pending:
                for run_id in list(self.pending):
                    needs = self.after[run_id]
                    if needs & {f.removeprefix("cells/") for f in self.failed}:
                        self.pending.remove(run_id)
                        self.failed.append(f"cells/{run_id}")
                    elif needs <= self.done:
                        self.pending.remove(run_id)
                        return run_id
                if self.pending:
                    self.cond.wait()
            return None

    def finish(self, run_id: str, ok: bool) -> None:
        with self.cond:
            if ok:
                self.done.add(run_id)
            else:
                self.failed.append(f"cells/{run_id}")
            self.cond.notify_all()


def _cell_pool(ids: list[str], argv: list[str], console: Console, slots: list[tuple[str, dict]],
               logs: Path | None = None, after: dict[str, set[str]] | None = None,
               progress: Progress | None = None) -> list[str]:
    """One thread per slot (label, extra environment), each running `stayaligned study ARGV
    --cells ID` for the next cell until none is left, a cell only after the cells it needs
    (`after`: a repair after its fine-tune); with `logs`, each cell's output goes to
    LOGS/ID.log instead of the console; with `progress`, a line of stages done and time left
    after each cell. Returns the cells that failed. A cell whose worker process could not be
    started (an OSError: no memory to fork, its log not writable) counts as failed, and the
    pool goes on: a thread that died there left the cell neither done nor failed, the study
    reporting success without it, and the cells after it waiting for good."""
    jobs = _Queue(ids, after or {})
    if logs is not None:
        logs.mkdir(exist_ok=True)

    def run_cell(run_id: str, label: str, env: dict) -> int:
        cmd = [sys.executable, "-m", "stayaligned", "study", *argv, "--cells", run_id]
        if logs is None:
            console.print(f"[bold]{label}[/bold]: cell {run_id}")
            return subprocess.call(cmd, env=env)
        log = logs / f"{run_id}.log"
        console.print(f"[bold]cell {run_id}[/bold]: started ({label}; output in {log})")
        started = time.time()
        with open(log, "w") as handle:
            code = subprocess.call(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        seconds = time.time() - started
        console.print(f"[red]cell {run_id}: failed after {seconds:.0f} s; see {log}[/red]"
                      if code != 0 else f"cell {run_id}: done in {seconds:.0f} s")
        return code

    def worker(label: str, extra_env: dict) -> None:
        env = {**os.environ, **extra_env, PARENT_ENV: str(os.getpid())}
        while (run_id := jobs.take()) is not None:
            code = 1
            try:
                code = run_cell(run_id, label, env)
            except Exception as err:  # noqa: BLE001 - the cell failed; the pool goes on
                console.print(f"[red]cell {run_id}: could not be run ({type(err).__name__}: "
                              f"{err}); run the same command again to retry it[/red]")
            finally:
                jobs.finish(run_id, code == 0)
            if progress is not None:
                try:
                    with progress.lock:
                        progress.state = read_json(progress.path) or {}
                        left = progress.not_done()
                    console.print(f"[dim]{len(progress.stages) - len(left)} of "
                                  f"{len(progress.stages)} stages done; "
                                  f"{progress.eta(left, len(slots))}[/dim]")
                except Exception as err:  # noqa: BLE001 - a progress line is not worth a cell
                    console.print(f"[dim]progress unknown ({err})[/dim]")

    pool = [threading.Thread(target=worker, args=slot) for slot in slots[:max(1, len(ids))]]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return jobs.failed


def _finish(failed: list[str], out: Path, console: Console) -> dict:
    if failed:
        console.print(f"[red]{len(failed)} stage(s) failed: {', '.join(failed)}; errors in "
                      f"{out / 'progress.json'}; run the same command again to retry them[/red]")
    else:
        console.print(f"study complete in [bold]{out}[/bold]; "
                      f"`stayaligned report {out}` writes report.md and report.html")
    return {"failed": failed, "output_dir": str(out)}
