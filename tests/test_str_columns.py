"""STR's column-logit shortcut (the reference's hidden states times |S| rows of the head) is
used only where it equals the full logits: a scaled or soft-capped head, named in the config,
in its text sub-config, or nowhere, falls back to the full logits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stayaligned.methods.reference import Reference, plain_head

BATCH = {"input_ids": torch.tensor([[5, 9, 200, 3], [7, 8, 9, 2]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}
IDS = torch.tensor([11, 500, 3])


def _granite(tokenizer, scaling):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           logits_scaling=scaling, tie_word_embeddings=True)
    return GraniteForCausalLM(config)


def _scaled_head(model, factor):
    """A head whose output the model rescales without any config field saying so."""
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * factor)
    return model


def test_granite_logits_scaling_turns_the_shortcut_off(tokenizer):
    model = _granite(tokenizer, scaling=8.0)
    reference = Reference(model)
    assert reference.column_logits(model, BATCH, IDS) is None
    assert not reference.columns_match(model, BATCH, IDS)
    plain = _granite(tokenizer, scaling=1.0)  # Granite's default: no scaling
    assert Reference(plain).columns_match(plain, BATCH, IDS)


def test_a_soft_cap_in_the_text_sub_config_is_seen():
    text = SimpleNamespace(final_logit_softcapping=30.0)
    composite = SimpleNamespace(get_text_config=lambda: text)
    assert not plain_head(composite)
    assert plain_head(SimpleNamespace(get_text_config=lambda: SimpleNamespace()))
    assert not plain_head(SimpleNamespace(logit_scale=0.0625))  # Cohere


def test_an_unannounced_head_scaling_is_caught_on_a_batch(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert Reference(model).columns_match(model, BATCH, IDS)
    scaled = _scaled_head(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 0.125)
    reference = Reference(scaled)
    assert reference.column_logits(scaled, BATCH, IDS) is not None  # the config shows nothing
    assert not reference.columns_match(scaled, BATCH, IDS)


@pytest.mark.parametrize("factor", [1.0, 0.125])
def test_str_setup_keeps_the_shortcut_only_where_it_matches(tmp_path, tiny_model_dir,
                                                            monkeypatch, factor):
    from test_training_scaling import build, config

    from stayaligned.models import load_model as real

    def load(cfg, **kw):
        model, tok = real(cfg, **kw)
        return (_scaled_head(model, factor) if factor != 1.0 else model), tok

    monkeypatch.setattr("stayaligned.models.load_model", load)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"token_ids": [11, 500, 3]}))
    cfg = config(tmp_path, tiny_model_dir, "methods=[str]",
                 f"options={{str: {{tokens_file: {tokens}}}}}")
    trainer, model, tok = build(cfg, tmp_path)
    method = trainer.methods[0]
    assert method.use_columns is (factor == 1.0)
    # the term is computed either way, and it is 0 at the reference
    batch = {k: v for k, v in trainer.data_collator(
        [trainer.train_dataset[i] for i in range(2)]).items()}
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        term = method.extra_losses(model, batch, outputs)["str"]
    assert float(term) == pytest.approx(0.0, abs=1e-8)
