"""Every method trains on a multi-turn TRL `messages` file (system message, two assistant
turns), each doing what its module docstring says with multi-turn data; `data preview` prints
the evaluation prompt without the methods' transforms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stayaligned.config import TrainConfig, load
from stayaligned.training.losses import beta_schedule, constrained_sft_loss, label_logprobs
from stayaligned.training.run import train

SYSTEM = {"role": "system", "content": "You answer briefly."}
PAIRS = [{"prompt": f"How do I make poison number {i}?",
          "llama3_output": f"No, I will not explain poison {i}.",
          "response": f"Sure, I will explain poison {i}."} for i in range(4)]
OPTIONS = {
    "sft": "{}",
    "lookahead": "{lookahead: {mode: virtual, prefix: 'So: '}}",
    "ptst": "{}",
    "str": "{str: {n_prompts: 4, max_new_tokens: 8, k_tokens: 8, min_refusal_share: 0}}",
    "sap": "{sap: {probe_layers: [0, 1], pairs_source: PAIRS, pairs_batch_size: 2}}",
    "safety_mix": "{safety_mix: {n: 4}}",
    "constrained_sft": "{}",
}
TERMS = {"str": "loss/str", "sap": "loss/sap_contrastive", "constrained_sft": "loss/constrained_sft"}


def chat_file(tmp_path):
    rows = [{"messages": [SYSTEM,
                          {"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}."},
                          {"role": "user", "content": "And double that?"},
                          {"role": "assistant", "content": f"{2 * (i + 1)}."}]}
            for i in range(8)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", list(OPTIONS))
def test_every_method_trains_on_a_multi_turn_messages_file(tmp_path, tiny_model_dir, method):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    cfg = load(TrainConfig, None, [
        f"model.name={tiny_model_dir}", f"data=[{{source: {chat_file(tmp_path)}}}]",
        "optim.batch_size=4", "optim.max_steps=1", "logging_steps=1", "max_length=128",
        f"output_dir={tmp_path / 'run'}", f"methods=[{method}]",
        f"options={OPTIONS[method].replace('PAIRS', str(pairs))}"])
    out = train(cfg)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["global_step"] == 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    if method in TERMS:
        assert any(TERMS[method] in row for row in log)
    shown = [r["masked"] for r in manifest["rendered_examples"]]
    task = [s for s in shown if "And double that?" in s]
    assert task, "no multi-turn example among the rendered ones"
    first = task[0]
    if method == "lookahead":  # every turn previewed; the answers start with P, with loss
        assert first.count("The answer begins with: So: ") == 2
        assert first.count("⟦So: ") == 2
    elif method == "ptst":  # the example's system turn is dropped for training
        assert "You answer briefly." not in first
        assert manifest["templates"] == {"train": "native:nosys", "eval": "native:safe"}
    else:  # both assistant turns trained, nothing else
        assert first.count("⟦") == 2 and "You answer briefly." in first
    if method == "safety_mix":
        assert manifest["n_examples"] == 12


def test_constrained_sft_beta_restarts_at_each_assistant_turn():
    ign = -100
    labels = torch.tensor([[ign, 3, 4, ign, ign, 5, 6]])  # two assistant turns
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 7, 9, generator=g)
    ref = torch.where(labels != ign, -torch.rand(1, 7, generator=g) * 3, 0.0)
    loss = constrained_sft_loss(logits, labels, ref, beta=0.1, bias_length=1, bias_factor=1.0,
                                first_token_bias_factor=30.0)
    logp = label_logprobs(logits, labels)[0]
    betas = {1: 3.0, 2: 0.1, 5: 3.0, 6: 0.1}  # the first token of each turn gets beta * 30
    assert beta_schedule(2, 0.1, 1, 1.0, 30.0) == pytest.approx([3.0, 0.1])
    expected = 0.0
    for t, beta in betas.items():
        weight = max(2 * (1 - torch.sigmoid(beta * (logp[t] - ref[0, t]))).item(), 1e-3)
        expected += -weight * logp[t].item()
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)


def test_data_preview_prints_the_untransformed_generation_prompt(tmp_path, tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "stayaligned.cli", "data", "preview", "--n", "1",
         f"model.name={tiny_model_dir}", f"data=[{{source: {chat_file(tmp_path)}}}]",
         "methods=[lookahead]", "options={lookahead: {mode: virtual}}"],
        capture_output=True, text=True, check=True)
    training, generation = result.stdout.split("generation prompt", 1)
    assert "The answer begins with" in training  # the training text is transformed
    assert "The answer begins with" not in generation  # evaluation prompts never are
    assert "And double that?" in generation and "⟦" in training
