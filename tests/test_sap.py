"""SAP (methods/sap.py): the losses and the perturbation on known values, exact restoration,
the current-batch probe of paper mode against an independent computation, the one-step lag and
shared backward of reference mode, the probe's removal, training and resume through `train`,
and the pairs data (data/pairs.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stayaligned.config import TrainConfig, load
from stayaligned.data.pairs import build_pairs, load_pairs, write_pairs
from stayaligned.data.types import DataError, Example
from stayaligned.methods.base import StepContext
from stayaligned.methods.sap_data import contrastive_loss, prompt_only, sequence_logprobs
from stayaligned.methods.sap_probe import ascent_step, decoder_layers, perturbed

PAIRS = [{"prompt": f"How do I make poison number {i}?",
          "llama3_output": f"No, I will not explain poison {i}.",
          "response": f"Sure, I will explain poison {i}."} for i in range(4)]


def write_data(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.",
                                        "output": f"{i} + {i + 1} = {2 * i + 1}."}) + "\n"
                            for i in range(8)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return task, pairs


def sap_config(tmp_path, model_dir, mode, *extra, source=None, rho=2e-5, limit=48):
    task, pairs = write_data(tmp_path)
    return load(TrainConfig, None, [
        f"model.name={model_dir}", f"data=[{{source: {task}}}]", "optim.batch_size=4",
        "optim.lr=1e-2", "optim.max_steps=3", "logging_steps=1", "max_length=64",
        f"output_dir={tmp_path / 'run'}", "methods=[sap]",
        f"options={{sap: {{mode: {mode}, probe_layers: [0, 1], rho: {rho}, "
        f"pairs_source: '{source or pairs}', pairs_batch_size: 2, pairs_limit: {limit}}}}}",
        *extra])


def built(tmp_path, model_dir, mode, rho=2e-5, *extra):
    """(trainer, method, model, a task batch) set up as `train` does, without training."""
    from stayaligned.models import add_lora, load_model
    from stayaligned.precision import resolve
    from stayaligned.training.collate import PadCollator, RenderedDataset
    from stayaligned.training.run import _training_args, prepare
    from stayaligned.training.trainer import StayTrainer

    cfg = sap_config(tmp_path, model_dir, mode, *extra, rho=rho)
    model, tokenizer = load_model(cfg.model)
    prep = prepare(cfg, tokenizer)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    collate = PadCollator(tokenizer.pad_token_id)
    trainer = StayTrainer(model=model, args=_training_args(cfg, tmp_path / "run"),
                          train_dataset=RenderedDataset(prep["items"]), data_collator=collate,
                          methods=prep["methods"],
                          precision=resolve(cfg.model.precision, cfg.model.dtype))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    method = prep["methods"][0]
    method.setup({"model": model, "tokenizer": tokenizer, "config": cfg,
                  "output_dir": tmp_path / "run", "train_examples": prep["examples"],
                  "trainer": trainer})
    batch = collate([{"input_ids": it.input_ids, "labels": it.labels} for it in prep["items"][:4]])
    return trainer, method, model, batch


# ---------------------------------------------------------------- losses and perturbation


def test_contrastive_loss_equals_hand_computed_value():
    logits = torch.zeros(2, 3, 3)  # uniform: every token has log-prob log(1/3)
    chosen_labels = torch.tensor([[-100, 1, 2]])  # two answer tokens
    rejected_labels = torch.tensor([[-100, -100, 1]])  # one
    s = sequence_logprobs(logits, torch.cat([chosen_labels, rejected_labels]), shift=True)
    torch.testing.assert_close(s, torch.tensor([2 * math.log(1 / 3), math.log(1 / 3)]))
    # −log σ(s+ − s−) = −log σ(−log 3) = log(1 + 3)
    torch.testing.assert_close(contrastive_loss(s[:1], s[1:], tau=1.0), torch.tensor(math.log(4)))
    torch.testing.assert_close(contrastive_loss(s[:1], s[1:], tau=2.0),
                               torch.tensor(math.log(1 + math.sqrt(3))))
    # shifted: position 0 predicts label 1; unshifted (the reference code): position 1 does
    peaked = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])  # p(1) = 3/4 at 0, 1/2 at 1
    labels = torch.tensor([[-100, 1]])
    torch.testing.assert_close(sequence_logprobs(peaked, labels, shift=True),
                               torch.tensor([math.log(3 / 4)]))
    torch.testing.assert_close(sequence_logprobs(peaked, labels, shift=False),
                               torch.tensor([math.log(1 / 2)]))


def test_delta_has_norm_rho_theta_along_g_and_restores_exactly():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    deltas, g_norm = ascent_step(params, grads, rho=2e-5)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    torch.testing.assert_close(flat(deltas).norm(), 2e-5 * flat(params).norm())
    torch.testing.assert_close(g_norm, flat(grads).norm())
    assert F.cosine_similarity(flat(deltas), flat(grads), dim=0) > 1 - 1e-6
    before = [p.clone() for p in params]
    big = [d * 1e4 for d in deltas]  # large enough that θ + δ − δ rounds differently
    with perturbed(params, big, exact=True):
        assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with perturbed(params, big, exact=False):  # the reference code's θ − δ
        pass
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_prompt_only_reproduces_the_reference_inputs(tokenizer):
    pad = tokenizer.pad_token_id
    batch = {"input_ids": torch.tensor([[7, 8, 9, 10, pad], [7, 8, 9, pad, pad]]),
             "labels": torch.tensor([[-100, -100, 9, 10, -100], [-100, 8, pad, -100, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    out = prompt_only(batch, pad)
    assert out["input_ids"].tolist() == [[7, 8, pad, pad, pad], [7, pad, pad, pad, pad]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 9, 10, -100], [-100, 8, -100, -100, -100]]


# ---------------------------------------------------------------- one step, by hand


def independent_probe(model, method, batch, rho, v_lr):
    """v_k recomputed without the method's code: g on pair batch 0, δ, a and b as gradients of
    the model's own loss w.r.t. zero vectors hooked onto the probe layers, one Adam step."""
    params = method.params
    pairs, _ = method.batches.batch(0)
    logp = torch.log_softmax(model(input_ids=pairs["input_ids"],
                                   attention_mask=pairs["attention_mask"]).logits[:, :-1], -1)
    target = pairs["labels"][:, 1:]
    tok = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    s = tok.sum(-1)
    n = len(s) // 2
    g = torch.autograd.grad(-F.logsigmoid(s[:n] - s[n:]).mean(), params)
    scale = rho * torch.cat([p.detach().reshape(-1) for p in params]).norm() / (
        torch.cat([x.reshape(-1) for x in g]).norm() + 1e-8)
    zeros = [torch.zeros(model.config.hidden_size, requires_grad=True) for _ in (0, 1)]
    layers = decoder_layers(model)
    hooks = [layers[i].register_forward_hook(lambda m, a, out, z=z: out + z)
             for i, z in enumerate(zeros)]
    saved = [p.detach().clone() for p in params]

    def grad_v():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        return torch.autograd.grad(loss, zeros)

    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(x * scale)
    a = grad_v()
    with torch.no_grad():
        for p, s0 in zip(params, saved):
            p.copy_(s0)
    b = grad_v()
    for h in hooks:
        h.remove()
    # the first AdamW step from 0: m̂ = d, v̂ = d², so the step is lr · d / (|d| + eps)
    return [-v_lr * (bi - ai) / ((bi - ai).abs() + 1e-8) for ai, bi in zip(a, b)]


def spy_theta_step(monkeypatch, method, record):
    """Record θ and the probe when the trainer's standard step (the θ step) runs."""
    from transformers import Trainer

    original = Trainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        record.append({"theta": [p.detach().clone() for p in method.params],
                       "probe": [v.detach().clone() for v in method.probe.vectors],
                       "active": method.probe.active})
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(Trainer, "training_step", spy)


def test_paper_step_uses_this_batch_probe_and_restores_theta_bit_for_bit(
        tmp_path, tiny_model_dir, monkeypatch):
    trainer, method, model, batch = built(tmp_path, tiny_model_dir, "paper", rho=1e-2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after some training: B ≠ 0, so δ moves A and B (θ+δ−δ ≠ θ)
        for p in method.params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    expected = independent_probe(model, method, batch, rho=1e-2, v_lr=0.05)
    theta = [p.detach().clone() for p in method.params]
    record = []
    spy_theta_step(monkeypatch, method, record)
    trainer.training_step(model, dict(batch))
    [at_step] = record
    assert all(torch.equal(p, q) for p, q in zip(at_step["theta"], theta))  # bit for bit
    assert at_step["active"]
    for got, want in zip(at_step["probe"], expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert all(v.abs().max() > 0.04 for v in at_step["probe"])
    # outside the step the probe adds nothing: the model equals the model without it
    assert not method.probe.active
    with torch.no_grad():
        during = model(input_ids=batch["input_ids"]).logits
        method.probe.remove()
        assert all(not layer._forward_hooks for layer in decoder_layers(model))
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, during,
                                   rtol=0, atol=0)


def test_paper_probe_passes_share_dropout_masks(tmp_path, tiny_model_dir):
    """With ρ = 0 (δ = 0) a and b are the same gradient only if both passes draw the same
    dropout masks; then b − a = 0 and the probe stays exactly 0."""
    trainer, method, model, batch = built(tmp_path, tiny_model_dir, "paper", 0.0,
                                          "lora.dropout=0.5")
    with torch.no_grad():  # B ≠ 0, so LoRA dropout changes the output
        for p in method.params:
            p.add_(0.1)
    trainer.training_step(model, dict(batch))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in method.probe.vectors)


def test_reference_step_lags_one_step_and_shares_b_with_the_task_backward(
        tmp_path, tiny_model_dir, monkeypatch):
    trainer, method, model, batch = built(tmp_path, tiny_model_dir, "reference")
    n_items = (batch["labels"][:, 1:] != -100).sum()
    record, grads = [], []
    spy_theta_step(monkeypatch, method, record)
    update = method.update_probe
    monkeypatch.setattr(method, "update_probe",
                        lambda tr, b, a: (grads.append([x.clone() for x in b]), update(tr, b, a)))
    trainer.training_step(model, dict(batch), n_items)
    after_first = [v.detach().clone() for v in method.probe.vectors]
    trainer.training_step(model, dict(batch), n_items)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in record[0]["probe"])  # v_0 = 0
    assert all(torch.equal(v, w) for v, w in zip(record[1]["probe"], after_first))  # v_{k-1}
    assert method.probe.active  # left in place between steps, as the code does
    # b from the task step's backward equals ∇v L_u(θ, v_1) computed on its own
    with torch.no_grad():
        for v, w in zip(method.probe.vectors, after_first):
            v.copy_(w)
    method.probe.trainable(True)
    explicit = method.probe_gradient(StepContext(trainer, model, batch, n_items, None), model,
                                     prompt_only(batch, method.pad_id), None)
    for got, want in zip(grads[1], explicit):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- training through train()


def train_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode, source", [("paper", None), ("reference", None), ("paper", "demo")])
def test_both_modes_train_and_save_no_probe(tmp_path, tiny_model_dir, mode, source):
    from stayaligned.training.run import is_complete, train

    out = train(sap_config(tmp_path, tiny_model_dir, mode, source=source, limit=4))
    assert is_complete(out)
    steps = [r for r in train_log(out) if "loss" in r]
    assert len(steps) == 3
    assert all(math.isfinite(r["loss/sap_contrastive"]) for r in steps)
    if source is None:  # (the demo pairs' scores are too far apart in a random tiny model)
        assert all(r["loss/sap_probe_norm"] > 0 and r["loss/sap_grad_norm"] > 0 for r in steps)
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    if source == "demo":
        pairs = [json.loads(line) for line in (out / "sap_pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == 4 and all(p["rejected"].startswith("Sure, here is") for p in pairs)


def test_paper_mode_resume_restores_the_probe_state(tmp_path, tiny_model_dir, monkeypatch):
    from stayaligned.training.run import train
    from stayaligned.training.trainer import StayTrainer

    full = train(sap_config(tmp_path / "a", tiny_model_dir, "paper", "save_steps=2"))
    cfg = sap_config(tmp_path / "b", tiny_model_dir, "paper", "save_steps=2")
    original = StayTrainer.training_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(StayTrainer, "training_step", crash_at_step_3)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    assert (tmp_path / "b" / "run" / "checkpoints" / "checkpoint-2" / "sap_probe.pt").is_file()
    resumed = train(cfg, resume=True)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert train_log(full)[2]["loss/sap_probe_norm"] == pytest.approx(
        train_log(resumed)[-2]["loss/sap_probe_norm"], rel=1e-5)


# both DDP tests rendezvous on torchrun's default port: one xdist worker runs them in turn
@pytest.mark.xdist_group("ddp-port")
def test_data_parallel_matches_one_process(tmp_path, tiny_model_dir):
    """Two gloo processes, each with half the task batch and one pair of each contrastive
    batch, log the single process's L_c and ‖g‖ and reach its adapter (δ and v synced)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    task, pairs = write_data(tmp_path)
    config = tmp_path / "sap.yaml"
    config.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: [{{source: {task}}}]\n"
        "optim: {lr: 1.0e-2, max_steps: 3}\nmax_length: 64\nlogging_steps: 1\n"
        f"methods: [sap]\noptions: {{sap: {{probe_layers: [0, 1], pairs_source: {pairs}, "
        "pairs_batch_size: 2}}\n")
    launch = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp_cpu.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "stayaligned.cli", "train", str(config)]
    subprocess.run([sys.executable, *cli, "optim.batch_size=4",
                    f"output_dir={tmp_path / 'one'}"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(launch), *cli, "optim.batch_size=2", f"output_dir={tmp_path / 'ddp'}"],
                   check=True, env=env)
    logs = [[r for r in train_log(tmp_path / run) if "loss" in r] for run in ("one", "ddp")]
    for one, ddp in zip(*logs):
        for key in ("loss/sap_contrastive", "loss/sap_grad_norm", "loss"):
            assert ddp[key] == pytest.approx(one[key], rel=1e-4), key
    a, b = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors"))
            for run in ("one", "ddp"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=1e-3)


# ---------------------------------------------------------------- pairs data


def test_load_pairs_reads_fields_and_names_a_missing_one(tmp_path):
    _, path = write_data(tmp_path)
    pairs = load_pairs(path)
    assert pairs[1].messages == ({"role": "user", "content": "How do I make poison number 1?"},)
    assert pairs[1].meta == {"chosen": PAIRS[1]["llama3_output"], "rejected": PAIRS[1]["response"]}
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "p", "llama3_output": "no"}) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1: field 'response' is missing"):
        load_pairs(broken)
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"q": "p", "good": "no", "bad": "yes"}) + "\n")
    assert load_pairs(renamed, fields={"prompt": "q", "chosen": "good", "rejected": "bad"}
                      )[0].meta == {"chosen": "no", "rejected": "yes"}
    with pytest.raises(DataError, match=r"renamed\.jsonl:1: field 'good' .*empty"):
        renamed.write_text(json.dumps({"q": "p", "good": " ", "bad": "yes"}) + "\n")
        load_pairs(renamed, fields={"prompt": "q", "chosen": "good", "rejected": "bad"})


def test_build_pairs_keeps_the_prefill_and_round_trips(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [Example("h:1", ({"role": "user", "content": "Tell me something bad."},)),
               Example("h:2", ({"role": "user", "content": "Another bad thing?"},
                               {"role": "assistant", "content": "I won't do that."}))]
    refusals = ["No.", "I can't help with that.", "Sorry, no."]
    pairs = build_pairs(model, tokenizer, prompts, refusals, prefill="Sure, here is",
                        max_new_tokens=6, batch_size=2, seed=3)
    again = build_pairs(model, tokenizer, prompts, refusals, prefill="Sure, here is",
                        max_new_tokens=6, batch_size=2, seed=3)
    assert pairs == again  # greedy, seeded choice of refusal
    assert all(p["rejected"].startswith("Sure, here is") and len(p["rejected"]) > 13
               for p in pairs)
    assert pairs[0]["chosen"] in refusals and pairs[1]["chosen"] == "I won't do that."
    loaded = load_pairs(write_pairs(tmp_path / "pairs.jsonl", pairs))
    assert [p.meta["rejected"] for p in loaded] == [p["rejected"] for p in pairs]


def test_pairs_command_writes_a_pairs_file(tmp_path, tiny_model_dir):
    from stayaligned.data.pairs import pairs_command

    refusals = tmp_path / "refusals.txt"
    refusals.write_text("No.\nI won't help with that.\n")
    out = pairs_command(str(tiny_model_dir), "demo-harmful", str(refusals),
                        str(tmp_path / "out.jsonl"), "Sure, here is", 3, None, max_new_tokens=4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"].split(":")[0] for r in rows] == ["harmful_requests.json"] * 3
    pairs = load_pairs(out)
    assert all(p.meta["chosen"] in ("No.", "I won't help with that.") for p in pairs)
    assert all(p.meta["rejected"].startswith("Sure, here is") for p in pairs)


def test_demo_pairs_are_reused_only_with_the_settings_that_made_them(tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    # a killed run leaves sap_pairs.jsonl but no run.json: a new run of another config in that
    # directory must not train on the old pairs
    from types import SimpleNamespace

    import stayaligned.data.pairs as pairs_module
    from stayaligned.config import from_dict
    from stayaligned.methods.sap import PAIRS_FILE, SafetyAwareProbing, SapOptions
    from stayaligned.models import load_model

    cfg = sap_config(tmp_path, tiny_model_dir, "paper", source="demo")
    model, tok = load_model(cfg.model)
    trainer = SimpleNamespace(is_world_process_zero=lambda: True,
                              accelerator=SimpleNamespace(wait_for_everyone=lambda: None))
    built_counts = []
    real = pairs_module.build_pairs

    def counting(*args, **kwargs):
        built_counts.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pairs_module, "build_pairs", counting)
    ctx = {"model": model, "tokenizer": tok, "config": cfg, "output_dir": tmp_path,
           "trainer": trainer}

    def pairs(limit):
        options = from_dict(SapOptions, {"pairs_limit": limit}, "options.sap")
        return SafetyAwareProbing(options)._pairs(ctx, "native")

    assert len(pairs(2)) == 2 and built_counts == [2]
    assert len(pairs(2)) == 2 and built_counts == [2]  # same settings: reused
    assert len(pairs(3)) == 3 and built_counts == [2, 3]  # another pairs_limit: made again
    (tmp_path / "sap_pairs.key.json").unlink()  # an older run recorded no key
    assert len(pairs(3)) == 3 and built_counts == [2, 3, 3]
    assert (tmp_path / PAIRS_FILE).is_file()
