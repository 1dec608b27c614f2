"""`gradient_checkpointing: true` recomputes the decoder layers in the backward pass (each layer
runs twice per step) and trains to the same losses as without it, under LoRA and with a method
that runs extra reference passes (STR, adapters disabled)."""

from __future__ import annotations

import json

import pytest
from test_training import config

import stayaligned.training.run as run_module
from stayaligned.training.run import train


def _train_counting_layer_calls(tmp_path, model_dir, monkeypatch, *extra):
    """(losses logged per step, forward calls of decoder layer 0 during training)."""
    calls = []
    original = run_module.add_lora

    def add_lora_and_count(model, lora):
        model = original(model, lora)
        # transformers checkpoints a layer's `forward` (not its __call__, whose hooks stay
        # outside), and the recomputation stops early once the saved tensors are back: count
        # calls of the layer's first submodule, by a pre-hook
        attention = model.get_base_model().model.layers[0].self_attn
        attention.register_forward_pre_hook(
            lambda *args: calls.append(1) if attention.training else None)
        return model

    monkeypatch.setattr(run_module, "add_lora", add_lora_and_count)
    out = train(config(tmp_path, model_dir, "optim.max_steps=3", *extra))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], len(calls)


@pytest.mark.parametrize("methods", ["[sft]", "[str]"])
def test_checkpointing_recomputes_layers_and_keeps_the_losses(tmp_path, tiny_model_dir,
                                                              monkeypatch, methods):
    extra = [f"methods={methods}", "logging_steps=1",
             "lora.target_modules=[q_proj,v_proj,down_proj]"]
    if methods == "[str]":
        extra.append("options={str: {n_prompts: 4, max_new_tokens: 4, min_refusal_share: 0}}")
    plain, plain_calls = _train_counting_layer_calls(
        tmp_path / "plain", tiny_model_dir, monkeypatch, *extra)
    ckpt, ckpt_calls = _train_counting_layer_calls(
        tmp_path / "ckpt", tiny_model_dir, monkeypatch, *extra, "gradient_checkpointing=true")
    assert plain_calls == 3  # one training forward per step (reference passes run in eval mode)
    assert ckpt_calls == 2 * plain_calls  # the forward again in each backward pass
    assert len(plain) == len(ckpt) == 3
    assert ckpt == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert plain[-1] < plain[0]  # it trained
    manifest = json.loads((tmp_path / "ckpt" / "run" / "run.json").read_text())
    assert manifest["config"]["gradient_checkpointing"] is True


def test_default_is_off_and_old_run_configs_stay_valid():
    from stayaligned.config import TrainConfig, from_dict, to_dict

    old = to_dict(TrainConfig())
    del old["gradient_checkpointing"]  # a run.json written before the key existed
    assert from_dict(TrainConfig, old).gradient_checkpointing is False
    assert run_module._checkpointing_args(TrainConfig()) == {}
