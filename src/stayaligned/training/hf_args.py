"""The Hugging Face names users reach for, mapped onto stayaligned's config: CLI aliases,
the `trainer_args` pass-through to `TrainingArguments`, QLoRA's 4-bit base, and the
`push_to_hub` pre-flight check.

`trainer_args: {KEY: VALUE}` passes any `TrainingArguments` field that stayaligned does not
wrap (e.g. ``optim: adamw_torch_fused``, ``dataloader_num_workers: 4``, ``tf32: true``). A key
stayaligned sets from its own config is refused with the config key to use, so that the run's
recorded config says what ran.
"""

from __future__ import annotations

import dataclasses
import os

from stayaligned.config import ConfigError

# Hugging Face name -> stayaligned config key, where they map one to one
HF_ALIASES = {
    "learning_rate": "optim.lr",
    "num_train_epochs": "optim.epochs",
    "max_steps": "optim.max_steps",
    "per_device_train_batch_size": "optim.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "lr_scheduler_type": "optim.scheduler",
    "warmup_ratio": "optim.warmup_ratio",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.adam_beta1",
    "adam_beta2": "optim.adam_beta2",
    "max_grad_norm": "optim.max_grad_norm",
    "lora_alpha": "lora.alpha",
    "lora_r": "lora.r",
    "lora_dropout": "lora.dropout",
    "model_name_or_path": "model.name",
    "attn_implementation": "model.attn_implementation",
}

# TrainingArguments fields stayaligned sets itself (-> the config key that controls them)
WRAPPED = {
    **{hf: key for hf, key in HF_ALIASES.items() if key.startswith("optim.")},
    "output_dir": "output_dir", "seed": "seed", "data_seed": "seed",
    "save_strategy": "save_steps", "save_steps": "save_steps",
    "save_total_limit": "save_total_limit", "logging_steps": "logging_steps",
    "report_to": "report_to", "run_name": "run_name", "torch_compile": "torch_compile",
    "push_to_hub": "push_to_hub", "hub_model_id": "hub_model_id",
    "remove_unused_columns": None, "use_cpu": None,
    "adam_beta1": "optim.adam_beta1", "adam_beta2": "optim.adam_beta2",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    # non-reentrant checkpointing: methods run extra forward passes inside one step
    "gradient_checkpointing_kwargs": None, "activation_checkpointing_kwargs": None,
    # it halves the batch on an out-of-memory error without raising gradient accumulation: the
    # run would train at another batch size than run.json records
    "auto_find_batch_size": "optim.batch_size (smaller) and optim.grad_accum (larger)",
    # precision is model.precision's (stayaligned applies its autocast itself): the Trainer's
    # own bf16/fp16 would autocast (and loss-scale) on top of it, unrecorded
    **{name: "model.precision" for name in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")},
}

TRACKERS = ("none", "all", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml",
            "clearml", "dvclive", "neptune", "swanlab", "azure_ml")


def alias_help() -> str:
    """The alias table for `--help`."""
    return "Hugging Face names accepted as overrides (key=value or --key value):\n" + "\n".join(
        f"  {hf} -> {key}" for hf, key in HF_ALIASES.items())


def resolve_aliases(overrides: list[str]) -> list[str]:
    """`learning_rate=1e-4` -> `optim.lr=1e-4`; other overrides unchanged.

    >>> resolve_aliases(["learning_rate=1e-4", "lora_alpha=32", "optim.lr=2"])
    ['optim.lr=1e-4', 'lora.alpha=32', 'optim.lr=2']
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{HF_ALIASES[key.strip()]}={value}" if sep and key.strip() in HF_ALIASES
                   else item)
    return out


def trainer_arg_overrides(cfg) -> dict:
    """`cfg.trainer_args`, checked against TrainingArguments' fields and the wrapped keys."""
    from transformers import TrainingArguments

    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in cfg.trainer_args:
        if key in WRAPPED:
            use = WRAPPED[key]
            fix = f"set {use} instead" if use else "stayaligned must control it; remove it"
            raise ConfigError(f"trainer_args.{key}: stayaligned sets this TrainingArguments "
                              f"field from its config; {fix}")
        if key not in valid:
            raise ConfigError(f"trainer_args.{key}: not a field of transformers "
                              f"TrainingArguments (transformers {_version()}); check the name")
    return dict(cfg.trainer_args)


def check_training_options(cfg) -> None:
    """Up-front checks of loss_on, report_to, warm-up, QLoRA and push_to_hub (before any model
    is loaded, so a typo costs nothing)."""
    from stayaligned.templates.render import LOSS_ON

    if cfg.loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on={cfg.loss_on!r}: choose {' or '.join(LOSS_ON)}")
    bad = [name for name in cfg.report_to if name not in TRACKERS]
    if bad:
        raise ConfigError(f"report_to: {bad[0]!r} is not a tracker transformers knows; use "
                          f"one of {', '.join(TRACKERS)}")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio={cfg.optim.warmup_ratio}: must be in [0, 1)")
    trainer_arg_overrides(cfg)
    check_label_smoothing(cfg)
    check_quantize(cfg)
    check_launcher_precision(cfg)
    if cfg.push_to_hub:
        check_push(cfg)


def check_label_smoothing(cfg) -> None:
    """The Trainer smooths labels inside its own cross-entropy; a method that replaces the task
    loss (constrained SFT) computes its own and would ignore the setting."""
    if not cfg.trainer_args.get("label_smoothing_factor"):
        return
    from stayaligned.methods import METHODS

    owners = [name for name in cfg.methods if name in METHODS
              and getattr(METHODS[name], "owns_task_loss", False)]
    if owners:
        raise ConfigError(f"trainer_args.label_smoothing_factor: method {owners[0]} computes its "
                          "own task loss, without label smoothing; remove the setting or the "
                          "method")


def check_launcher_precision(cfg) -> None:
    """`accelerate launch` passes its config's `mixed_precision` in ACCELERATE_MIXED_PRECISION,
    which the Trainer applies (its autocast, DeepSpeed's or FSDP's bf16 engine) on top of
    model.precision, the autocast stayaligned applies itself. One that computes in a lower
    precision than model.precision resolves to would train in it while run.json and the
    evaluations say otherwise: an error naming both. `no` leaves model.precision alone; `bf16`
    agrees with model.precision bf16 (and pure_bf16); fp16 and fp8 are not offered."""
    import os

    from stayaligned.precision import resolve

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched == "no":
        return
    prec = resolve(cfg.model.precision, cfg.model.dtype)
    where = (f"accelerate's mixed_precision {launched} (ACCELERATE_MIXED_PRECISION, set by "
             "`accelerate launch` from its config file or --mixed_precision)")
    if launched != "bf16":
        raise ConfigError(f"{where}: stayaligned computes in model.precision (fp32, bf16 or "
                          f"pure_bf16), not {launched}; set mixed_precision: no (or bf16 on a "
                          "GPU with native bf16) in the accelerate config")
    if prec.name not in ("bf16", "pure_bf16"):
        raise ConfigError(f"{where} would compute in bf16 while model.precision resolves to "
                          f"{prec.name} on this machine (and run.json would say {prec.name}): "
                          "set model.precision=bf16, or mixed_precision: no in the accelerate "
                          "config (stayaligned applies model.precision's autocast itself)")


def check_quantize(cfg) -> None:
    quantize = cfg.lora.quantize
    if quantize is None:
        return
    if quantize != "4bit":
        raise ConfigError(f"lora.quantize={quantize!r}: the only setting is 4bit (QLoRA)")
    if not cfg.lora.enabled:
        raise ConfigError("lora.quantize=4bit trains LoRA adapters on a 4-bit base; set "
                          "lora.enabled=true or remove lora.quantize")
    if cfg.merge:
        raise ConfigError("lora.quantize=4bit with merge=true: an adapter cannot be merged into "
                          "4-bit weights; set merge=false (load the adapter on a bf16 base)")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("lora.quantize=4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit "
                          "kernels); this machine has none: remove lora.quantize to train in "
                          "full precision")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError("lora.quantize=4bit needs bitsandbytes: pip install "
                          "'stayaligned[qlora]'") from err


def quantization_config(lora, precision=None):
    """transformers' BitsAndBytesConfig for QLoRA (NF4, double quantisation), as in Dettmers et
    al.; computing in bf16 where `precision` (stayaligned.precision.Precision; default: what
    `auto` resolves to here) computes in bf16, else in float32 (a GPU without native bf16).
    None without lora.quantize."""
    if lora.quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    from stayaligned.precision import compute_dtype, resolve

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(precision or resolve()))


def check_push(cfg) -> None:
    """push_to_hub needs a repository name, the network and a token; say which is missing."""
    if not cfg.hub_model_id:
        raise ConfigError("push_to_hub=true needs hub_model_id (e.g. your-name/model-safe-sft)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError("push_to_hub=true but HF_HUB_OFFLINE is set: the Hub cannot be "
                          "reached; unset HF_HUB_OFFLINE or set push_to_hub=false and upload "
                          "the output directory later (huggingface-cli upload)")
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError("push_to_hub=true but no Hugging Face token is set: run `hf auth "
                          "login` or set HF_TOKEN, or set push_to_hub=false")


def push(out, cfg) -> str:
    """Upload the run's weights directory and model card to `hub_model_id`; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(cfg.hub_model_id, exist_ok=True, private=True)
    folder = out / ("merged" if cfg.merge and cfg.lora.enabled else
                    "adapter" if cfg.lora.enabled else "model")
    api.upload_folder(repo_id=cfg.hub_model_id, folder_path=str(folder),
                      commit_message="stayaligned: weights")
    api.upload_file(path_or_fileobj=str(out / "README.md"), path_in_repo="README.md",
                    repo_id=cfg.hub_model_id, commit_message="stayaligned: model card")
    return f"https://huggingface.co/{cfg.hub_model_id}"


def _version() -> str:
    import transformers

    return transformers.__version__
