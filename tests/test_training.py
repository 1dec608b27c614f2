"""Training on a tiny random Llama: parameters change, the loss falls, resume is exact,
non-finite losses stop with the step, and the outputs load back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from stayaligned.config import ModelConfig, TrainConfig, load
from stayaligned.training.run import is_complete, train
from stayaligned.training.trainer import NonFiniteLossError


def write_pairs(path, n=8):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}."}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config(tmp_path, model_dir, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_pairs(tmp_path / "pairs.jsonl")
    return load(TrainConfig, None, [
        f"model.name={model_dir}", f"data=[{{source: {data}}}]", "optim.batch_size=4",
        "optim.lr=1e-2", "optim.max_steps=6", "logging_steps=1", "max_length=64",
        f"output_dir={tmp_path / 'run'}", *extra,
    ])


def adapter_weights(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_lora_training_changes_adapter_and_lowers_loss(tmp_path, tiny_model_dir):
    out = train(config(tmp_path, tiny_model_dir, "optim.max_steps=30", "merge=true", "optim.lr=3e-2",
                       "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"))
    assert is_complete(out)
    weights = adapter_weights(out)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
    losses = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["global_step"] == 30
    assert manifest["versions"]["torch"] and manifest["data"][0]["files_sha256"]
    # what a rerun elsewhere needs to explain a difference: the GGUF reader and the CPU
    assert "gguf" in manifest["versions"] and "tokenizers" in manifest["versions"]
    assert manifest["machine"]["cpu_count"] >= 1 and manifest["machine"]["torch_threads"] >= 1
    first = manifest["rendered_examples"][0]
    assert "⟦0 + 1 = 1.<|im_end|>\n⟧" in first["masked"] and first["n_loss_tokens"] > 0
    # the adapter loads with PEFT, the merged model with plain transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-4)


def test_full_finetuning_changes_base_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from stayaligned.models import chat_template_kwargs

    out = train(config(tmp_path, tiny_model_dir, "lora.enabled=false", "optim.lr=1e-3",
                       "model.chat_template_kwargs={enable_thinking: false}"))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("embed_tokens" in k for k in changed)
    # the run records its chat_template_kwargs; loading it as a model reads them back
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["templates"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat_template_kwargs(ModelConfig(name=str(out))) == {"enable_thinking": False}


def test_resume_after_stop_matches_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    from stayaligned.training.trainer import StayTrainer

    full = train(config(tmp_path / "a", tiny_model_dir, "save_steps=3"))
    original = StayTrainer.training_step

    def crash_at_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    cfg = config(tmp_path / "b", tiny_model_dir, "save_steps=3")
    with monkeypatch.context() as patch:
        patch.setattr(StayTrainer, "training_step", crash_at_step_5)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    assert not is_complete(tmp_path / "b" / "run")
    resumed = train(cfg, resume=True)
    run = json.loads((resumed / "run.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-3")
    # train_seconds timed only the steps after the checkpoint: the report divides by these
    assert run["timed_steps"] == run["global_step"] - 3 > 0
    assert json.loads((full / "run.json").read_text())["timed_steps"] == run["global_step"]
    a, b = adapter_weights(full), adapter_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_existing_run_is_not_overwritten_silently(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, "optim.max_steps=1")
    train(cfg)
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from stayaligned.training.trainer import StayTrainer

    original = StayTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(StayTrainer, "compute_loss", poisoned)
    cfg = config(tmp_path, tiny_model_dir, "save_steps=2")
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "adapter").exists()
