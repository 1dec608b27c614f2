"""The axes of a study beyond cells x seeds: eval templates, judges, the dose axis, and the
out-of-sample check of the depth set. Pure functions of a StudyConfig (no model, no torch),
shared by `stayaligned.study` (the stages) and `stayaligned.reports` (reading them back).

Layout they add to a study directory (v1 studies, without these keys, keep theirs):

  <model>/eval/                   the first of `eval_templates` (or the run's own template)
  <model>/eval-<template>/        each further template, ':' written as '-' (eval-native-safe)
  <model>/eval*/judge-<name>/     each further judge of `judges`, re-judging the generations
                                  of that eval directory (no regeneration)
  cells/<cell>-<key><value>/      a dose point, e.g. cells/sft-lr2e-05 (one seed; evaluated
                                  under the first template only)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from stayaligned.config import CellConfig, ConfigError, StudyConfig

# ---------------------------------------------------------------- templates and judges


def template_dir(index: int, template: str | None) -> str:
    """The eval directory of the `index`-th eval template.

    >>> template_dir(0, "native"), template_dir(1, "native:safe"), template_dir(0, None)
    ('eval', 'eval-native-safe', 'eval')
    """
    if index == 0 or template is None:
        return "eval"
    return "eval-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", template)


def eval_views(templates) -> list[tuple[str | None, str]]:
    """(template or None, eval directory) per evaluation of every model; None: the run's own
    recorded eval template (v1)."""
    return [(t, template_dir(i, t)) for i, t in enumerate(templates)] or [(None, "eval")]


def cell_views(cfg: StudyConfig, cell: CellConfig) -> list[tuple[str | None, str]]:
    """The eval views of one cell: the study's, narrowed to the cell's own `eval_templates`
    when it names some (each folder keeps the study-wide name, eval-native-safe for the second
    template whatever the cell evaluates).

    >>> cfg = StudyConfig(eval_templates=("native", "native:safe"))
    >>> cell_views(cfg, CellConfig(name="str", eval_templates=("native",)))
    [('native', 'eval')]
    >>> cell_views(cfg, CellConfig(name="ptst"))
    [('native', 'eval'), ('native:safe', 'eval-native-safe')]
    """
    views = eval_views(cfg.eval_templates)
    if not cell.eval_templates:
        return views
    key = f"cells.{cell.name}.eval_templates"
    unknown = [t for t in cell.eval_templates if t not in cfg.eval_templates]
    if unknown:
        raise ConfigError(f"{key}: {unknown[0]!r} is not one of the study's eval_templates "
                          f"({', '.join(cfg.eval_templates) or 'none set'}); a cell can only "
                          "narrow the study's list")
    if cfg.eval_templates[0] not in cell.eval_templates:
        raise ConfigError(f"{key}: include the study's first eval template "
                          f"({cfg.eval_templates[0]!r}): its eval/ folder holds every model's "
                          "main metrics")
    return [(t, folder) for t, folder in views if t in cell.eval_templates]


def judge_names(judges, eval_block: dict | None) -> list[str]:
    """The study's judges, the first being the one that judges in eval/."""
    return list(judges) or [str((eval_block or {}).get("judge", "keyword"))]


def judge_dir(judge: str) -> str:
    return f"judge-{judge}"


# ---------------------------------------------------------------- dose


@dataclass(frozen=True)
class DosePoint:
    """One (cell, dose value): `run_id` is the cell run holding it; `extra` says whether the
    point is a run of its own (False: the value is the cell's own, so its seed run is reused)."""

    cell: str
    value: object
    run_id: str
    extra: bool
    config: CellConfig


def dose_value_name(key: str, value) -> str:
    """The run-id suffix of a dose value.

    >>> dose_value_name("optim.lr", 2e-05), dose_value_name("optim.max_steps", 40)
    ('lr2e-05', 'max_steps40')
    """
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{key.rsplit('.', 1)[-1]}{text}")


def _nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _lookup(block: dict, key: str):
    node = block
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def dose_points(cfg: StudyConfig, train_defaults: dict) -> list[DosePoint]:
    """Every (cell, value) of the dose axis in order; `train_defaults` is the TrainConfig's
    default dict, to know a cell's own value of the key."""
    from stayaligned.config import _deep_merge

    dose = cfg.dose
    if dose is None or not dose.values:
        return []
    cells = {c.name: c for c in cfg.cells}
    unknown = [c for c in dose.cells if c not in cells]
    if unknown:
        raise ConfigError(f"dose.cells: {unknown[0]!r} is not a cell of this study "
                          f"({', '.join(cells)})")
    if not dose.cells:
        raise ConfigError("dose.cells: name the cells to train at each dose, e.g. [sft]")
    untrained = [c for c in dose.cells if cells[c].repair is not None or cells[c].model_of]
    if untrained:
        raise ConfigError(f"dose.cells: {untrained[0]!r} trains nothing (a repair, or a reading "
                          "of another cell's model): name cells that train")
    if _lookup(train_defaults, dose.key) is None:
        raise ConfigError(f"dose.key: {dose.key!r} is not a train config key with a value "
                          "(e.g. optim.lr, optim.max_steps)")
    many = len(cfg.seeds) > 1
    points = []
    for name in dose.cells:
        cell = cells[name]
        own = _lookup(_deep_merge(_deep_merge(train_defaults, cfg.train), cell.train), dose.key)
        for value in dose.values:
            if _same(own, value) and dose.seed in cfg.seeds:
                run_id = f"{name}-seed{dose.seed}" if many else name
                points.append(DosePoint(name, value, run_id, False, cell))
                continue
            run_id = f"{name}-{dose_value_name(dose.key, value)}"
            train = _deep_merge(dict(cell.train), _nested(dose.key, value))
            points.append(DosePoint(name, value, run_id, True,
                                    replace(cell, name=run_id, train=train)))
    return points


# ---------------------------------------------------------------- depth out of sample


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


@dataclass(frozen=True)
class PromptSet:
    """A prompt set a cell trains on: a data source, or (pairs=True) a pairs file."""

    cell: str
    what: str
    source: str
    split: str | None = None
    pairs: bool = False
    fields: dict | None = None


def in_sample_sets(cell_options: dict[str, tuple[list[str], dict]]) -> list[PromptSet]:
    """Every prompt set a cell's method trains on that the depth set must avoid: STR's mining
    prompts and SAP's contrastive pairs. `cell_options`: cell name -> (methods, options)."""
    from stayaligned.config import from_dict

    found = []
    for name, (methods, options) in cell_options.items():
        if "str" in methods:
            from stayaligned.methods.str import StrOptions

            o = from_dict(StrOptions, options.get("str"), f"cells.{name}.options.str")
            if o.tokens_file is None:
                found.append(PromptSet(name, "STR's mining prompts", o.mining_source,
                                       o.mining_split))
        if "sap" in methods:
            from stayaligned.methods.sap import SapOptions

            o = from_dict(SapOptions, options.get("sap"), f"cells.{name}.options.sap")
            if o.pairs_source == "demo":
                found.append(PromptSet(name, "SAP's pair prompts", "demo-safety"))
            else:
                found.append(PromptSet(name, "SAP's pair prompts", o.pairs_source, pairs=True,
                                       fields=o.pairs_fields))
    return found


def check_depth_disjoint(cfg: StudyConfig, cell_options: dict[str, tuple[list[str], dict]],
                         load=None) -> int:
    """Raise ConfigError when a depth prompt is also one of STR's mining prompts or SAP's pair
    prompts of any cell (whole sources are compared, so any subset a run draws is covered);
    returns the number of depth prompts checked. `load(PromptSet or None, limit)` -> prompts,
    None meaning the depth set itself."""
    load = load or _loader(cfg)
    d = cfg.depth
    depth = {_norm(p) for p in load(None)}
    for found in in_sample_sets(cell_options):
        shared = depth & {_norm(p) for p in load(found)}
        if shared:
            example = sorted(shared)[0][:60]
            raise ConfigError(
                f"depth: {len(shared)} of the {len(depth)} depth prompts ({d.source}, split "
                f"{d.split}) are also {found.what} of cell {found.cell} ({found.source}"
                f"{'' if found.split is None else f', split {found.split}'}), e.g. {example!r}; "
                "give depth.source/split a held-out set (e.g. demo-safety split eval) or set "
                "depth.disjoint: false to allow an in-sample depth set")
    return len(depth)


def _loader(cfg: StudyConfig):
    def load(found: PromptSet | None) -> list[str]:
        from stayaligned.data.sources import load_source

        if found is None:
            d = cfg.depth
            examples = load_source(d.source, split=d.split, limit=d.limit, data_dir=cfg.data_dir)
        elif found.pairs:
            from stayaligned.data.pairs import load_pairs

            examples = load_pairs(found.source, fields=found.fields, data_dir=cfg.data_dir)
        else:
            kwargs = {"split": found.split} if found.split is not None else {}
            examples = load_source(found.source, data_dir=cfg.data_dir, **kwargs)
        return [ex.content("user") for ex in examples]
    return load
