"""Checkpoint names of a model's parameters.

transformers may save a parameter under another name than its module's: Gemma 3 chat models
(Gemma3ForConditionalGeneration) keep the module `model.language_model.layers.0.self_attn.q_proj`
and save its weight as `language_model.model.layers.0.self_attn.q_proj.weight`, the legacy
layout. A repair reads checkpoints by the saved names, while PEFT adapters and calibration hooks
name modules; the two meet here, through transformers' own conversion (reversed), never a
hand-written rule.
"""

from __future__ import annotations

from pathlib import Path

import torch


def saved_name(model, name: str, param) -> str | None:
    """The checkpoint name transformers writes parameter `name` of `model` under, or None where
    transformers cannot say (no such parameter, a conversion that is not a renaming)."""
    if param is None:
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = list(revert_weight_conversion(model, {name: param}))
    except Exception:  # noqa: BLE001 - an older or newer transformers: the caller's error follows
        return None
    return saved[0] if len(saved) == 1 else None


def saved_names(config_dir: Path, names: list[str]) -> dict[str, str]:
    """{parameter name -> checkpoint name} for those of `names` that transformers saves under
    another name, for the model that `config_dir`'s config.json describes (its `architectures`
    class, else AutoModelForCausalLM), built on the meta device: no weights are read or made.
    {} where the model cannot be built."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(config_dir)
        arch = next(iter(getattr(config, "architectures", None) or []), None)
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - unknown architecture: names are taken as they are
        return {}
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        saved = saved_name(model, name, params.get(name))
        if saved and saved != name:
            out[name] = saved
    return out
