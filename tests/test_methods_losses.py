"""STR and constrained SFT: penalties, positions and weights equal hand-computed values; the
reference model is the base model; token mining is deterministic; short training runs log the
named terms (and at step 1, where the model equals its reference, their exact values)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stayaligned.config import ConfigError, LoraConfig, TrainConfig, load
from stayaligned.methods.reference import Reference
from stayaligned.methods.str import StrOptions, load_tokens_file, mine_tokens, saliency
from stayaligned.training.losses import (
    beta_schedule,
    constrained_sft_loss,
    constrained_token_weights,
    label_logprobs,
    str_penalty,
    str_positions,
    token_mean_nll,
)
from stayaligned.training.run import train

IGN = -100


# ---------------------------------------------------------------- STR penalty


@pytest.mark.parametrize("variant", ["logit", "logprob", "one_sided"])
def test_str_penalty_is_zero_at_the_reference_and_has_a_gradient_otherwise(variant):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[IGN, IGN, 3, 4, 5, IGN], [IGN, 2, 2, IGN, IGN, IGN]])
    ids = torch.tensor([1, 4, 7])
    same = ref.clone().requires_grad_()
    assert str_penalty(same, ref, labels, ids, variant).item() == 0.0
    lowered = (ref - 0.1 - torch.rand(2, 6, 11, generator=g)).requires_grad_()
    penalty = str_penalty(lowered, ref, labels, ids, variant)
    penalty.backward()
    assert penalty.item() > 0 and lowered.grad.abs().sum() > 0
    if variant != "logprob":  # raw logits: only the |S| columns at positions P get a gradient
        touched = lowered.grad != 0
        expected = str_positions(labels)[:, :, None] & torch.isin(torch.arange(11), ids)
        assert torch.equal(touched, expected)


def test_str_variants_equal_hand_computed_values():
    z = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [5.0, 5.0, 5.0]]])
    z0 = torch.tensor([[[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGN, 0, 0]])  # P = positions 0 and 1; position 2 predicts nothing
    ids = torch.tensor([0, 2])
    # (z - z0) on P x S: [1, -1], [-2, 2]
    assert str_penalty(z, z0, labels, ids, "logit").item() == pytest.approx((1 + 1 + 4 + 4) / 4)
    # relu(z0 - z): [0, 1], [2, 0]
    assert str_penalty(z, z0, labels, ids, "one_sided").item() == pytest.approx((0 + 1 + 4 + 0) / 4)

    def logprob(row, s):
        return row[s] - math.log(sum(math.exp(x) for x in row))

    rows, rows0 = z[0].tolist(), z0[0].tolist()
    gaps = [logprob(rows[t], s) - logprob(rows0[t], s) for t in (0, 1) for s in (0, 2)]
    expected = sum(d * d for d in gaps) / 4
    assert str_penalty(z, z0, labels, ids, "logprob").item() == pytest.approx(expected, rel=1e-5)


def test_str_positions_are_response_positions_plus_the_last_prompt_position():
    labels = torch.tensor([
        [IGN, IGN, IGN, 7, 8, 9, IGN],  # response at 3..5, then padding
        [IGN, IGN, 5, 6, IGN, IGN, IGN],  # shorter prompt, right padding
        [IGN, 4, IGN, IGN, 6, 7, IGN],  # two assistant turns
    ])
    assert str_positions(labels).int().tolist() == [
        [0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0, 0]]
    # first_positions counts within each assistant turn (each run of P)
    assert str_positions(labels, first_positions=2).int().tolist() == [
        [0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0, 0]]
    assert str_positions(labels, first_positions=1).int().tolist() == [
        [0, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0, 0]]
    # the penalty reads only those positions
    ref = torch.zeros(3, 7, 5)
    outside = ref.clone()
    outside[0, [0, 1, 5, 6]] = 3.0
    outside[1, [0, 3, 4, 5, 6]] = 3.0
    ids = torch.tensor([0, 3])
    assert str_penalty(outside, ref, labels, ids).item() == 0.0
    second = ref.clone()
    second[:, 3] = 2.0  # row 0's 2nd position of P, row 2's first of its second turn
    # first_positions=1 keeps 4 positions (one per turn); only row 2's second turn moved
    assert str_penalty(second, ref, labels, ids, first_positions=1).item() == pytest.approx(
        2 * 4.0 / (4 * 2))
    assert str_penalty(second, ref, labels, ids).item() == pytest.approx(2 * 2 * 4.0 / (2 * 8))


# ---------------------------------------------------------------- constrained SFT


def test_beta_schedule_matches_the_reference_code():
    assert beta_schedule(7) == pytest.approx([0.5, 2, 2, 2, 2, 0.1, 0.1])
    assert beta_schedule(3) == pytest.approx([0.5, 2, 2])
    assert beta_schedule(3, beta=1.0, bias_length=1) == pytest.approx([5.0, 1.0, 1.0])


def test_constrained_token_weights_equal_hand_computed_values():
    logp = torch.tensor([-1.0, -1.0, -3.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -2.0, -2.0, -51.0])  # Delta = 0, 1, -1, 50
    betas = torch.tensor([0.5, 2.0, 2.0, 2.0])
    w = constrained_token_weights(logp, ref, betas, min_weight=1e-3)
    def sigma(x):
        return 1 / (1 + math.exp(-x))

    expected = [2 * (1 - sigma(0.0)), 2 * (1 - sigma(2.0)), 2 * (1 - sigma(-2.0)), 1e-3]
    assert w.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected[:3] == pytest.approx([1.0, 0.238406, 1.761594], rel=1e-5)
    assert not w.requires_grad


def _toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 9, 13, generator=g)
    labels = torch.tensor([
        [IGN, IGN, 3, 4, 5, 6, 7, 8, 2],
        [IGN, IGN, IGN, IGN, 9, 1, 2, IGN, IGN],  # later start, right padding
    ])
    ref_logp = torch.where(labels != IGN, -torch.rand(2, 9, generator=g) * 4, 0.0)
    return logits, labels, ref_logp


def test_constrained_loss_is_plain_sft_as_beta_goes_to_zero():
    logits, labels, ref_logp = _toy_batch()
    logits.requires_grad_()
    for beta in (0.0, 1e-9):
        loss = constrained_sft_loss(logits, labels, ref_logp, beta=beta)
        assert loss.item() == pytest.approx(token_mean_nll(logits, labels).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(constrained_sft_loss(logits, labels, ref_logp, beta=0.0), logits)
    (plain,) = torch.autograd.grad(token_mean_nll(logits, labels), logits)
    torch.testing.assert_close(grad, plain)


def test_constrained_loss_counts_response_tokens_per_sequence():
    logits, labels, ref_logp = _toy_batch(1)
    logp_all = torch.log_softmax(logits, dim=-1)
    terms = []
    for b in range(2):  # as the reference code: each row's labelled tokens, in order
        positions = [t for t in range(1, 9) if labels[b, t] != IGN]
        betas = beta_schedule(len(positions))
        for beta_t, t in zip(betas, positions):
            lp = logp_all[b, t - 1, labels[b, t]].item()
            delta = lp - ref_logp[b, t].item()
            w = max(2 * (1 - 1 / (1 + math.exp(-beta_t * delta))), 1e-3)
            terms.append(-w * lp)
    loss = constrained_sft_loss(logits, labels, ref_logp)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_label_logprobs_are_aligned_with_the_labels():
    logits, labels, _ = _toy_batch()
    logp = label_logprobs(logits, labels)
    full = torch.log_softmax(logits, dim=-1)
    assert logp.shape == labels.shape and logp[:, 0].eq(0).all()
    for b, t in [(0, 2), (0, 8), (1, 4), (1, 6)]:
        assert logp[b, t].item() == pytest.approx(full[b, t - 1, labels[b, t]].item(), rel=1e-6)
    assert logp[labels == IGN].eq(0).all()


# ---------------------------------------------------------------- reference model


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


BATCH = {"input_ids": torch.tensor([[1, 5, 9, 14, 3], [7, 2, 8, 0, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
         "labels": torch.tensor([[IGN, IGN, 9, 14, 3], [IGN, 2, 8, IGN, IGN]])}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits


def test_reference_under_lora_is_the_base_model_with_adapters_off(tiny_model_dir):
    from stayaligned.models import add_lora

    model = _tiny(tiny_model_dir)
    base = _logits(model)
    peft = add_lora(model, LoraConfig(target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)  # the adapters now change the output
    peft.train()
    reference = Reference(peft)
    assert reference.frozen is None  # no second copy
    torch.testing.assert_close(reference.logits(peft, BATCH), base)
    assert all(m.training for m in peft.modules())  # train mode restored
    assert not torch.allclose(_logits(peft), base, atol=1e-4)  # adapters back on


def test_reference_for_full_finetuning_is_a_frozen_copy(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    before = _logits(model)
    reference = Reference(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    wrapped = torch.nn.Module()
    wrapped.module = model  # as DDP / accelerate wrap it
    torch.testing.assert_close(reference.logits(wrapped, BATCH), before)
    assert not any(p.requires_grad for p in reference.frozen.parameters())
    assert not reference.frozen.training


# ---------------------------------------------------------------- token mining


def test_saliency_sums_teacher_forced_probabilities(tiny_model_dir, tokenizer):
    model = _tiny(tiny_model_dir).eval()
    prompts = ["<|im_start|>user\nhow?<|im_end|>\n<|im_start|>assistant\n", "Hi"]
    templates = [{"prompt": 0, "text": "I cannot"}, {"prompt": 1, "text": "I won't"}]
    scores = saliency(model, tokenizer, prompts, templates, k=2)
    expected: dict[int, float] = {}
    for row in templates:  # unbatched, one forward per template
        prompt = tokenizer(prompts[row["prompt"]], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:2]
        probs = _tiny_probs(model, prompt + answer)
        for t, token in enumerate(answer):
            expected[token] = expected.get(token, 0.0) + probs[len(prompt) - 1 + t, token].item()
    assert scores.keys() == expected.keys()
    for token in expected:
        assert scores[token] == pytest.approx(expected[token], rel=1e-4)


def _tiny_probs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].softmax(dim=-1)


def test_mined_tokens_are_deterministic_and_never_punctuation(tiny_model_dir, tokenizer):
    model = _tiny(tiny_model_dir)
    options = StrOptions(n_prompts=4, max_new_tokens=8, k_tokens=8)
    reference = Reference(model)
    first = mine_tokens(model, tokenizer, options, reference)
    second = mine_tokens(model, tokenizer, options, reference)
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) == 8
    assert all(any(c.isalnum() for c in tokenizer.decode([v])) for v in first["token_ids"])
    assert first["scores"] == sorted(first["scores"], reverse=True)
    kinds = [row["kind"] for row in first["templates"]]
    assert kinds.count("canonical") == len(options.canonical_refusals)
    assert all(row["prompt_id"].startswith("harmful_requests.json:") for row in first["templates"])


# ---------------------------------------------------------------- training runs


def _config(tmp_path, model_dir, *extra):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}."}
            for i in range(8)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load(TrainConfig, None, [
        f"model.name={model_dir}", f"data=[{{source: {data}}}]", "optim.batch_size=4",
        "optim.lr=1e-2", "optim.max_steps=3", "logging_steps=1", "max_length=64",
        f"output_dir={tmp_path / 'run'}", *extra,
    ])


def _log(out):
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_str_trains_with_lora_and_writes_its_tokens(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"options.str: the model being fine-tuned refused "
                                          r"only 0% .*min_refusal_share=0.25"):
        train(_config(tmp_path / "unaligned", tiny_model_dir, "methods=[str]",
                      "options={str: {n_prompts: 4, max_new_tokens: 8, k_tokens: 8}}"))
    out = train(_config(tmp_path, tiny_model_dir, "methods=[str]",
                        "options={str: {n_prompts: 4, max_new_tokens: 8, k_tokens: 8, "
                        "min_refusal_share: 0}}"))
    saved = json.loads((out / "str_tokens.json").read_text())
    assert len(saved["token_ids"]) == 8 and saved["settings"]["k_tokens"] == 8
    assert saved["seed_refusal_share"] == 0.0  # a random tiny model refuses nothing
    log = _log(out)
    assert all("loss/str" in r for r in log)
    assert log[0]["loss/str"] == 0.0  # step 1: LoRA B = 0, the model is its reference
    assert max(r["loss/str"] for r in log) > 0
    # a later run reuses the saved set instead of mining
    again = train(_config(tmp_path / "again", tiny_model_dir, "methods=[str]", "optim.max_steps=1",
                          f"options={{str: {{tokens_file: {out / 'str_tokens.json'}}}}}"))
    reused = json.loads((again / "str_tokens.json").read_text())
    assert reused["token_ids"] == saved["token_ids"]
    assert reused["settings"]["tokens_file"] == str(out / "str_tokens.json")


def test_a_tokens_file_outside_the_vocabulary_is_refused(tmp_path):
    path = tmp_path / "str_tokens.json"
    path.write_text(json.dumps({"token_ids": [3, 70000]}))
    with pytest.raises(ConfigError, match="70000"):
        load_tokens_file(path, vocab_size=49152)


@pytest.mark.parametrize("mode", ["lora_precomputed", "full_per_step"])
def test_constrained_sft_trains_and_starts_as_plain_sft(tmp_path, tiny_model_dir, mode):
    extra = []
    if mode == "full_per_step":
        extra = ["lora.enabled=false", "optim.lr=1e-3",
                 "options={constrained_sft: {precompute: false}}"]
    out = train(_config(tmp_path, tiny_model_dir, "methods=[constrained_sft]", *extra))
    log = _log(out)
    assert all("loss/constrained_sft" in r and "loss/ce" in r for r in log)
    # step 1: the model equals the reference, every weight is 1, so the loss is the token mean CE
    assert log[0]["loss/constrained_sft"] == pytest.approx(log[0]["loss/ce"], rel=1e-4)
    assert log[-1]["loss/constrained_sft"] != pytest.approx(log[-1]["loss/ce"], rel=1e-4)


def test_reference_column_logits_equal_the_full_logits_columns(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stayaligned.methods.reference import Reference

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    batch = {"input_ids": torch.tensor([[5, 9, 200, 3], [7, 8, 9, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}
    ids = torch.tensor([11, 500, 3])
    reference = Reference(model)
    full = reference.logits(model, batch)
    columns = reference.column_logits(model, batch, ids)
    torch.testing.assert_close(columns, full[..., ids], atol=1e-5, rtol=1e-5)
