"""stayaligned: fine-tune aligned chat LLMs on your task without losing their safety alignment,
and measure both sides of the trade.

Python API (mirrors the CLI)::

    import stayaligned
    cfg = stayaligned.load_config("train", "configs/train/embedded_arithmetic.yaml", ["optim.lr=2e-4"])
    out = stayaligned.train(cfg)                       # -> run directory
    metrics = stayaligned.evaluate(stayaligned.load_config("eval", None, [f"model.name={out}"]))
"""

from __future__ import annotations

__version__ = "0.1.0"

_KINDS = {"train": "TrainConfig", "align": "AlignConfig", "eval": "EvalConfig"}


def load_config(kind: str, path=None, overrides=()):
    """A TrainConfig / AlignConfig / EvalConfig from an optional YAML file and overrides."""
    from stayaligned import config

    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(_KINDS)}")
    return config.load(getattr(config, _KINDS[kind]), path, list(overrides))


def train(cfg, *, resume: bool = False, overwrite: bool = False):
    """Fine-tune (or align, given an AlignConfig); returns the run directory."""
    from stayaligned.training.run import train as _train

    return _train(cfg, resume=resume, overwrite=overwrite)


def align(cfg=None, *, resume: bool = False, overwrite: bool = False):
    """Safety-align an unaligned seed; `cfg` defaults to AlignConfig()."""
    from stayaligned.config import AlignConfig

    return train(cfg or AlignConfig(), resume=resume, overwrite=overwrite)


def evaluate(cfg, *, model=None, tokenizer=None) -> dict:
    """Generate, judge and score; returns the metrics also written to metrics.json."""
    from stayaligned.evaluation.run import evaluate as _evaluate

    return _evaluate(cfg, model=model, tokenizer=tokenizer)


def quickstart(output: str = "runs/quickstart", *, fresh: bool = False) -> dict:
    """The offline demo: align the embedded model, fine-tune it plainly and with the recommended
    recipe, evaluate all four; returns the summary (also in OUTPUT/summary.json)."""
    from pathlib import Path

    from stayaligned.quickstart import run_quickstart

    return run_quickstart(Path(output), fresh=fresh)
