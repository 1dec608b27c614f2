"""Up-front checks of a configuration, run before any model is loaded or any data is read.

Each check raises a one-line `ConfigError` naming the key and the fix, with a "did you mean"
for a misspelled name (difflib). Model names that look like paths must exist; a Hub id is
only tried when the Hub can be reached (HF_HUB_OFFLINE=1, or no connection within a few
seconds, fails at once unless the model is already in the local Hub cache).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import socket
from pathlib import Path

from stayaligned.config import ConfigError, EvalConfig, ModelConfig, TrainConfig

HUB_HOST = ("huggingface.co", 443)


def suggest(name: str, known) -> str:
    """' (did you mean X?)' for the closest of `known`, else ''.

    >>> suggest("demo-harmfull-eval", ["demo-harmful-eval", "gsm8k"])
    " (did you mean 'demo-harmful-eval'?)"
    """
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(key: str, name: str, known, what: str) -> ConfigError:
    known = sorted(known)
    return ConfigError(f"{key}: unknown {what} {name!r}{suggest(name, known)}; known: "
                       f"{', '.join(known)}")


def _number(key: str, value, *, low: float | None = None, strict: bool = True,
            high: float | None = None) -> None:
    """`value` must be a finite number above `low` (or at least it, with strict=False)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{key}={value!r}: must be {'>' if strict else '>='} {low:g}")
    if high is not None and value > high:
        raise ConfigError(f"{key}={value!r}: must be <= {high:g}")


# ---------------------------------------------------------------- training


def check_train(cfg: TrainConfig, model: bool = True) -> None:
    """Every value of a training config that can be checked without a model."""
    from stayaligned.methods import METHODS
    from stayaligned.templates.library import TEMPLATES, is_template

    o = cfg.optim
    _number("optim.lr", o.lr, low=0)
    _number("optim.epochs", o.epochs)
    if o.max_steps <= 0 and o.epochs <= 0:
        raise ConfigError(f"optim.epochs={o.epochs:g} with optim.max_steps={o.max_steps}: "
                          "nothing would be trained; set epochs > 0 or max_steps > 0")
    for key, value in (("optim.batch_size", o.batch_size), ("optim.grad_accum", o.grad_accum),
                       ("max_length", cfg.max_length), ("logging_steps", cfg.logging_steps)):
        _number(key, value, low=1, strict=False)
    for key, value in (("optim.warmup_steps", o.warmup_steps), ("save_steps", cfg.save_steps),
                       ("optim.weight_decay", o.weight_decay),
                       ("optim.max_grad_norm", o.max_grad_norm)):
        _number(key, value, low=0, strict=False)
    for key, value in (("optim.adam_beta1", o.adam_beta1), ("optim.adam_beta2", o.adam_beta2)):
        _number(key, value, low=0, strict=False, high=1)
    if cfg.lora.enabled:
        _number("lora.r", cfg.lora.r, low=1, strict=False)
        _number("lora.alpha", cfg.lora.alpha, low=0)
        _number("lora.dropout", cfg.lora.dropout, low=0, strict=False, high=1)
    if cfg.overlong not in ("drop", "truncate", "error"):
        raise unknown("overlong", cfg.overlong, ("drop", "truncate", "error"), "choice")
    _scheduler(o.scheduler)
    for name in cfg.methods:
        if name not in METHODS:
            raise unknown("methods", name, METHODS, "method")
    from stayaligned.methods.base import build_methods

    build_methods(cfg.methods, cfg.options, cfg.seed, METHODS)  # options and stacking
    for key in ("template", "eval_template"):
        if not is_template(getattr(cfg, key)):
            raise unknown(key, getattr(cfg, key), TEMPLATES, "template")
    if not cfg.data:
        raise ConfigError("data: no data source given; add at least one, e.g. "
                          "data=[{source: demo-arithmetic}]")
    for i, source in enumerate(cfg.data):
        check_source(f"data.{i}.source", source.source, cfg.data_dir)
    if model:
        check_model(cfg.model)


def _scheduler(name: str) -> None:
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise unknown("optim.scheduler", name, names, "scheduler")


# ---------------------------------------------------------------- evaluation


def check_eval(cfg: EvalConfig, model: bool = True) -> None:
    """Every value of an evaluation config that can be checked without a model."""
    from stayaligned.evaluation.metrics import TASK_METRICS
    from stayaligned.templates.library import TEMPLATES, is_template

    g = cfg.generation
    _number("generation.max_new_tokens", g.max_new_tokens, low=1, strict=False)
    _number("generation.batch_size", g.batch_size, low=1, strict=False)
    _number("generation.temperature", g.temperature, low=0)
    _number("generation.top_p", g.top_p, low=0, high=1)
    if not cfg.benchmarks:
        raise ConfigError("benchmarks: none given; add at least one")
    for i, bench in enumerate(cfg.benchmarks):
        key = f"benchmarks.{i}"
        if bench.kind not in ("harmful", "benign", "task"):
            raise unknown(f"{key}.kind", bench.kind, ("harmful", "benign", "task"), "kind")
        if bench.metric is not None and bench.metric not in TASK_METRICS:
            raise unknown(f"{key}.metric", bench.metric, TASK_METRICS, "metric")
        if bench.max_new_tokens is not None:
            _number(f"{key}.max_new_tokens", bench.max_new_tokens, low=1, strict=False)
        if bench.limit is not None:
            _number(f"{key}.limit", bench.limit, low=0, strict=False)
        if any(k < 0 for k in bench.prefill_k):
            raise ConfigError(f"{key}.prefill_k={list(bench.prefill_k)}: values must be >= 0")
        for template in (bench.template, cfg.template):
            if template is not None and not is_template(template):
                raise unknown(f"{key}.template" if template == bench.template else "template",
                              template, TEMPLATES, "template")
        check_source(f"{key}.source" if bench.source else f"{key}.name",
                     bench.source or bench.name, cfg.data_dir)
    check_judge(cfg.judge, cfg.judge_options)
    if model:
        check_model(cfg.model)


def check_judge(name: str, options: dict) -> None:
    """A known judge with options its constructor accepts (nothing is loaded)."""
    from stayaligned.evaluation.judging import JUDGE_NAMES, judge_parameters

    if name not in JUDGE_NAMES:
        raise unknown("judge", name, JUDGE_NAMES, "judge")
    accepted, required = judge_parameters(name, options)
    stray = sorted(set(options) - set(accepted))
    if stray:
        raise ConfigError(f"judge_options.{stray[0]}: not an option of the {name} judge"
                          f"{suggest(stray[0], accepted)}; its options: "
                          f"{', '.join(sorted(accepted)) or 'none'}")
    missing = [k for k in required if k not in options]
    if missing:
        raise ConfigError(f"judge {name} needs judge_options.{missing[0]}")


def parameters(func, rename: dict | None = None) -> tuple[list[str], list[str]]:
    """(accepted, required) keyword names of `func` (`rename` maps a parameter to its key)."""
    rename = rename or {}
    accepted, required = [], []
    for p in inspect.signature(func).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        accepted.append(rename.get(p.name, p.name))
        if p.default is p.empty:
            required.append(rename.get(p.name, p.name))
    return accepted, required


# ---------------------------------------------------------------- names: data and models


def check_source(key: str, source: str, data_dir: str | None) -> None:
    """A data source that cannot exist is an error now, not after a model load or Hub retries."""
    from stayaligned.data.loading import SUFFIXES
    from stayaligned.data.registry import DATASETS
    from stayaligned.data.sources import DEMO_NAMES, registry_name

    known = [*DEMO_NAMES, *DATASETS]
    if source.startswith("demo-"):
        if source not in DEMO_NAMES:
            raise unknown(key, source, DEMO_NAMES, "demo set")
        return
    if registry_name(source)[0] is not None or _local(source, data_dir):
        return
    if Path(source).suffix.lower() in SUFFIXES or looks_like_path(source):
        raise ConfigError(f"{key}={source}: file not found (relative paths are resolved from "
                          f"{Path.cwd()}{' and data_dir' if data_dir else ''})")
    if "/" not in source:
        raise unknown(key, source, known, "dataset (not a file, a registry name, or an "
                      "owner/name Hub id)")
    if hub_offline():
        raise ConfigError(f"{key}={source}: not a local file, and the Hugging Face Hub is not "
                          "reachable (offline); pass a local file or a registry name with a "
                          "local copy in data_dir")


def _local(source: str, data_dir: str | None) -> bool:
    return Path(source).exists() or bool(data_dir and (Path(data_dir) / source).exists())


def looks_like_path(name: str) -> bool:
    """A name that can only be a path: absolute, ./ ../ ~, a backslash, or several slashes.

    >>> [looks_like_path(n) for n in ("/tmp/m", "./m", "org/model", "gpt2", "a/b/c")]
    [True, True, False, False, True]
    """
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name
            or name.count("/") > 1)


def check_model(model: ModelConfig, key: str = "model.name") -> None:
    """A model name that is a path must exist; a Hub id needs the Hub or the local cache."""
    name = model.name
    if name == "embedded":
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    if looks_like_path(name) or path.suffix == ".gguf":
        raise ConfigError(f"{key}={name}: not found (no such file or directory); pass an "
                          "existing model directory, run directory or .gguf file")
    if hub_offline() and not _in_hub_cache(name, model.revision):
        raise ConfigError(f"{key}={name}: not a local path, not in the Hugging Face cache, and "
                          "the Hub is not reachable (offline); pass a local directory, a .gguf "
                          "file, or 'embedded'")


def _in_hub_cache(repo: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False
    return isinstance(found, str)


def hub_offline(timeout: float = 3.0) -> bool:
    """True with HF_HUB_OFFLINE set, or when huggingface.co cannot be reached in `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError:
        return True
    return False
