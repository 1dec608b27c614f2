"""The Qwen2 path (Qwen2.5-Coder-1.5B-Instruct, bench/models.py) on a tiny Qwen2 model: Qwen's
chat template (a default system prompt when none is given), an untied output head, a pad token
that is not EOS, through train, eval and depth; the reference passes and the depth stage hold
one copy of the base model under LoRA. The real tokenizer is used when it has been converted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_study import study_config

from stayaligned.config import ModelConfig
from stayaligned.data.types import Example
from stayaligned.templates.library import get_template
from stayaligned.templates.render import prompt_text, render_for_training, show_mask

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's template (from the GGUF's metadata) without its tool-calling branches
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
REAL_QWEN = Path("~/.cache/stayaligned/bench-models/Qwen2.5-Coder-1.5B-Instruct").expanduser()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Qwen2 (hidden 16, 2 layers, untied head) with the real SmolLM2 tokenizer
    set up as Qwen's: its ChatML tokens, Qwen's template, bos = pad = <|endoftext|>, eos =
    <|im_end|>."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.bos_token = tokenizer.pad_token = "<|endoftext|>"
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=False, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=config.pad_token_id)
    target = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _one(prompt="What is 2 + 3?", answer="2 + 3 = 5.") -> Example:
    return Example("x:1", ({"role": "user", "content": prompt},
                           {"role": "assistant", "content": answer}))


def _check_qwen_tokenizer(tokenizer) -> None:
    assert tokenizer.pad_token == "<|endoftext|>" != tokenizer.eos_token == "<|im_end|>"
    native = prompt_text(tokenizer, _one(), get_template("native"))
    assert native.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert native.endswith("<|im_start|>assistant\n")
    safe = prompt_text(tokenizer, _one(), get_template("native:safe"))
    assert QWEN_SYSTEM not in safe and "while being safe" in safe
    item = render_for_training(tokenizer, _one(), get_template("native"))
    assert show_mask(tokenizer, item).endswith("<|im_start|>assistant\n⟦2 + 3 = 5.<|im_end|>\n⟧")
    assert item.input_ids[0] != tokenizer.bos_token_id  # Qwen's template writes no BOS


def test_qwen_template_pad_token_and_loss_mask(qwen_dir):
    from stayaligned.models import load_tokenizer

    _check_qwen_tokenizer(load_tokenizer(ModelConfig(name=str(qwen_dir))))


@pytest.mark.skipif(not (REAL_QWEN / "tokenizer.json").is_file(),
                    reason="the converted Qwen2.5-Coder model is absent (make bench-models)")
def test_the_real_qwen_tokenizer_renders_the_same_way():
    from transformers import AutoTokenizer

    _check_qwen_tokenizer(AutoTokenizer.from_pretrained(REAL_QWEN))


def test_full_finetuning_keeps_the_head_untied(tmp_path, qwen_dir):
    from test_training import config
    from transformers import AutoModelForCausalLM

    from stayaligned.training.run import train

    out = train(config(tmp_path, qwen_dir, "lora.enabled=false", "optim.lr=1e-2",
                       "optim.max_steps=2", "gradient_checkpointing=true"))
    before = load_file(str(qwen_dir / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(after)
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        assert not torch.equal(before[key], after[key])  # both trained, separately
    assert not torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(reloaded.lm_head.weight, after["lm_head.weight"])


def test_study_trains_evaluates_and_measures_depth_with_one_model_copy(tmp_path, qwen_dir,
                                                                       monkeypatch):
    import stayaligned.models as models
    from stayaligned.evaluation.depth import depth_kl
    from stayaligned.data.sources import load_source
    from stayaligned.methods import reference as reference_module
    from stayaligned.study import run_study
    from stayaligned.training import run as train_module

    loads, frozen = [], []
    original_load, original_init = models.load_model, reference_module.Reference.__init__

    def counting_load(cfg, *args, **kwargs):
        loads.append(Path(cfg.name).name)
        return original_load(cfg, *args, **kwargs)

    def recording_init(self, model):
        original_init(self, model)
        frozen.append(self.frozen)

    monkeypatch.setattr(models, "load_model", counting_load)
    monkeypatch.setattr(train_module, "load_model", counting_load)
    monkeypatch.setattr(reference_module.Reference, "__init__", recording_init)
    cfg = study_config(tmp_path, qwen_dir, "study", "align=null", "evaluate_seed=false",
                       "cells=[{name: sft, methods: [sft]}, {name: str, methods: [str], "
                       "options: {str: {n_prompts: 4, max_new_tokens: 4, min_refusal_share: 0}}}]",
                       "train.gradient_checkpointing=true")
    assert run_study(cfg)["failed"] == []
    out = tmp_path / "study"
    # per cell: train, eval, depth; one load each (depth: the tuned model, adapters off)
    assert len(loads) == 3 * 2
    assert frozen == [None]  # STR's reference is the LoRA model itself, never a copy
    for cell in ("sft", "str"):
        run = json.loads((out / "cells" / cell / "train" / "run.json").read_text())
        assert run["config"]["gradient_checkpointing"] is True and run["status"] == "complete"
        assert QWEN_SYSTEM in run["eval_prompt_example"]
        metrics = json.loads((out / "cells" / cell / "eval" / "metrics.json").read_text())
        rate = metrics["benchmarks"]["harm-plain"]["refusal_rate"]["value"]
        assert 0.0 <= rate <= 1.0
        assert math.isfinite(metrics["benchmarks"]["arith"]["task_loss"]["loss"])
    # the adapters-off reference gives the numbers two separately loaded models give
    depth = json.loads((out / "cells" / "sft" / "depth" / "depth.json").read_text())
    monkeypatch.setattr(models, "load_model", original_load)
    seed, tokenizer = original_load(ModelConfig(name=str(qwen_dir)))
    tuned, _ = original_load(ModelConfig(name=str(out / "cells" / "sft" / "train")))
    examples = load_source("demo-safety", split="train", limit=4)
    direct = depth_kl(seed, tuned, tokenizer, examples, "native", n_tokens=3)
    assert all(v > 0 for v in depth["kl_mean"])
    # (the evaluation merges the adapter into the weights, depth does not: float rounding)
    assert depth["kl_mean"] == pytest.approx(direct["kl_mean"], rel=1e-3, abs=1e-7)


def test_task_loss_splits_a_batch_whose_logits_would_not_fit(qwen_dir, monkeypatch):
    """A 150k vocabulary at batch 32 would hold GiBs of logits: the batch is split into passes
    under MAX_LOGITS, with the same result."""
    from stayaligned.evaluation import task_loss
    from stayaligned.models import load_model

    model, tok = load_model(ModelConfig(name=str(qwen_dir)))
    examples = [task_loss.with_reference(Example(f"t:{i}", ({"role": "user", "content": q},)), a)
                for i, (q, a) in enumerate([("What is 2+2?", "It is 4. #### 4"),
                                            ("Add 10 and 5.", "10 + 5 = 15 #### 15"),
                                            ("3 times 3?", "9 #### 9")])]
    whole = task_loss.reference_nll(model, tok, examples, get_template("native"), batch_size=3)
    passes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: passes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    monkeypatch.setattr(task_loss, "MAX_LOGITS", 1)  # one row per pass
    split = task_loss.reference_nll(model, tok, examples, get_template("native"), batch_size=3)
    assert passes == [1, 1, 1]
    assert split["tokens"] == whole["tokens"] and split["n"] == 3
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
