"""The frozen reference model that STR and constrained SFT compare the trained model against.

Both methods need the *initial* model's outputs on the training batch (methods.md 3.3 B and
5.1). Under LoRA (PEFT) the initial model is the same model with its adapters disabled, so no
second copy is held in memory; under full fine-tuning a frozen deep copy is taken at setup,
when the model still equals the initial one (run.py calls `setup` before any update, and before
a resumed checkpoint is loaded). Reference passes run without gradients, in eval mode, on
input_ids and attention_mask only; the caller's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / accelerate / DeepSpeed wrappers, which keep it in `.module`."""
    return getattr(model, "module", model)


def is_peft(model: torch.nn.Module) -> bool:
    """True for a PEFT-wrapped model (whose adapters can be switched off)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` in eval mode; every submodule's own train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def as_initial(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model itself as its own reference: adapters disabled for a PEFT model, eval mode.

    For a full model this is the reference only while it is still the initial model, i.e. in
    `setup`; later, use `Reference`.
    """
    inner = unwrap(model)
    with eval_mode(inner):
        if is_peft(inner):
            with inner.disable_adapter():
                yield inner
        else:
            yield inner


class Reference:
    """Reference logits for the batches of a training run.

    Create it in `setup` from the (possibly PEFT-wrapped) model: a PEFT model is its own
    reference with adapters disabled; any other model is deep-copied and frozen.
    """

    def __init__(self, model: torch.nn.Module):
        inner = unwrap(model)
        self.frozen: torch.nn.Module | None = None
        if not is_peft(inner):
            self.frozen = copy.deepcopy(inner).eval()
            self.frozen.requires_grad_(False)

    @contextmanager
    def module(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module that computes the reference function, in eval mode (for generation or
        forward passes); `model` is the model being trained."""
        if self.frozen is None:
            with as_initial(model) as inner:
                yield inner
            return
        device = next(unwrap(model).parameters()).device
        if next(self.frozen.parameters()).device != device:
            self.frozen.to(device)
        yield self.frozen

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Reference logits (batch, seq, vocab) for `batch`, without gradients."""
        with torch.no_grad(), self.module(model) as reference:
            return reference(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                use_cache=False,
            ).logits

    def column_logits(self, model: torch.nn.Module, batch: dict, ids: torch.Tensor):
        """Reference logits of the vocabulary entries `ids` only, (batch, seq, len(ids)): the
        decoder's last hidden states times those rows of the output head, skipping the
        full-vocabulary projection. None when the model's head is not a plain linear map (logit
        soft-capping or scaling, in the config or its text sub-config), so the caller falls
        back to `logits`; `columns_match` checks the shortcut on a real batch."""
        with torch.no_grad(), self.module(model) as reference:
            causal = reference.get_base_model() if hasattr(reference, "get_base_model") else reference
            head = causal.get_output_embeddings()
            if (not isinstance(head, torch.nn.Linear) or not plain_head(causal.config)
                    or not hasattr(causal, "get_decoder")):
                return None
            hidden = causal.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                use_cache=False,
            ).last_hidden_state
            bias = head.bias[ids] if head.bias is not None else None
            return torch.nn.functional.linear(hidden, head.weight[ids], bias)

    def columns_match(self, model: torch.nn.Module, batch: dict, ids: torch.Tensor,
                      rtol: float = 1e-3) -> bool:
        """Whether `column_logits` equals the full reference logits' columns `ids` on `batch`
        (up to float rounding): False when it is None or when the model post-processes its
        logits in a way the config does not show (a scaled or capped head under another name),
        so that the caller uses the full logits."""
        columns = self.column_logits(model, batch, ids)
        if columns is None:
            return False
        full = self.logits(model, batch)[..., ids.to(columns.device)].float()
        gap = float((columns.float() - full).abs().max()) if full.numel() else 0.0
        return gap <= rtol * float(full.abs().max()) + 1e-6


# Logit post-processing after the output head, by config field, and the value that means none:
# Gemma 2/3/4 soft-capping, Cohere's logit_scale (a multiplier), Granite's logits_scaling (a
# divisor, 1.0 in the default config).
HEAD_FIELDS = {"final_logit_softcapping": (None, 0, 0.0), "logit_scale": (None, 0, 0.0, 1, 1.0),
               "logits_scaling": (None, 1, 1.0)}


def plain_head(config) -> bool:
    """False when `config`, or its text sub-config (composite multimodal configs keep the
    language model's fields there), sets a logit soft-cap or scale."""
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        try:
            configs.append(text())
        except (AttributeError, ValueError, TypeError):
            pass
    return not any(getattr(c, name, None) not in neutral
                   for c in configs for name, neutral in HEAD_FIELDS.items())
