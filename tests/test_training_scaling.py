"""How the trainer scales loss terms: extra terms and a replaced task loss are means over the
optimiser step whether or not the model takes loss kwargs (transformers then divides by the
accumulation steps itself), constrained SFT with beta = 0 is plain SFT under gradient
accumulation, and its precomputed reference runs under the run's autocast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stayaligned.config import TrainConfig, load
from stayaligned.methods.base import Method
from stayaligned.training.collate import PadCollator


def _data(path: Path, n: int = 8) -> Path:
    # answers of different lengths, so micro-batches hold different loss-token counts
    rows = [{"instruction": f"Add {i} and {i + 1}.",
             "output": "word " * (1 + 7 * (i % 2)) + f"{2 * i + 1}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, model_dir, *extra) -> TrainConfig:
    data = _data(tmp_path / "task.jsonl")
    return load(TrainConfig, None, [
        f"model.name={model_dir}", f"data=[{{source: {data}}}]", "optim.batch_size=2",
        "optim.lr=1e-2", "optim.max_steps=2", "logging_steps=1", "max_length=64",
        "lora.enabled=false", f"output_dir={tmp_path / 'run'}", *extra])


def build(cfg, tmp_path, methods=None, accepts_loss_kwargs=None):
    """A StayTrainer as run.py builds it, with the methods set up."""
    from stayaligned.models import load_model
    from stayaligned.precision import resolve
    from stayaligned.training.collate import RenderedDataset
    from stayaligned.training.run import _training_args, prepare
    from stayaligned.training.trainer import StayTrainer

    model, tok = load_model(cfg.model)
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    prep = prepare(cfg, tok)
    methods = prep["methods"] if methods is None else methods
    trainer = StayTrainer(model=model, args=_training_args(cfg, tmp_path / "run"),
                          train_dataset=RenderedDataset(prep["items"]),
                          data_collator=PadCollator(tok.pad_token_id), methods=methods,
                          precision=resolve(cfg.model.precision, cfg.model.dtype))
    for m in methods:
        m.setup({"model": model, "tokenizer": tok, "config": cfg, "output_dir": tmp_path / "run",
                 "train_examples": prep["examples"], "trainer": trainer})
    return trainer, model, tok


def step_grads(trainer, model, tok, order, ga) -> dict:
    """The gradients of one optimiser step over the items `order`, in `ga` micro-batches."""
    items = [trainer.train_dataset[i] for i in order]
    collate = PadCollator(tok.pad_token_id)
    per = len(items) // ga
    batches = [collate(items[k * per:(k + 1) * per]) for k in range(ga)]
    trainer.current_gradient_accumulation_steps = ga
    n = trainer._get_num_items_in_batch(batches, trainer.args.device)
    model.zero_grad(set_to_none=True)
    for batch in batches:
        trainer.training_step(model, batch, n)
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


class NormTerm(Method):
    """An extra term whose gradient on the final norm's weight is exactly 1 per micro-batch."""
    name = "norm_term"

    def extra_losses(self, model, batch, outputs):
        return {"norm_term": model.model.norm.weight.sum()}


class NormOwner(Method):
    """A task loss whose gradient on the final norm's weight is exactly 1 per micro-batch."""
    name = "norm_owner"
    owns_task_loss = True

    def task_loss(self, model, batch, outputs):
        return model.model.norm.weight.sum() + 0 * outputs.logits.sum()


NORM = "model.norm.weight"


@pytest.mark.parametrize("accepts", [True, False])
def test_an_extra_term_is_a_mean_over_the_step_whatever_the_model_takes(
        tmp_path, tiny_model_dir, accepts):
    # accepts_loss_kwargs=False (Gemma-4, Qwen-VL classes): transformers divides the loss by
    # the accumulation steps in training_step; the trainer must not divide the term again
    cfg = config(tmp_path, tiny_model_dir, "optim.grad_accum=2")
    trainer, model, tok = build(cfg, tmp_path, methods=[NormTerm(None)],
                                accepts_loss_kwargs=accepts)
    assert trainer.model_accepts_loss_kwargs is accepts
    with_term = step_grads(trainer, model, tok, [0, 1, 2, 3], ga=2)
    trainer.methods = []
    without = step_grads(trainer, model, tok, [0, 1, 2, 3], ga=2)
    torch.testing.assert_close(with_term[NORM] - without[NORM],
                               torch.ones_like(without[NORM]), atol=1e-5, rtol=0)


def test_a_replaced_task_loss_is_a_mean_over_the_step_without_loss_kwargs(
        tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, "optim.grad_accum=2")
    owner = NormOwner(None)
    trainer, model, tok = build(cfg, tmp_path, methods=[owner], accepts_loss_kwargs=False)
    trainer.loss_owner = owner
    grads = step_grads(trainer, model, tok, [0, 1, 2, 3], ga=2)
    torch.testing.assert_close(grads[NORM], torch.ones_like(grads[NORM]), atol=1e-6, rtol=0)


ZERO_BETA = "options={constrained_sft: {beta: 0.0, bias_factor: 0, first_token_bias_factor: 0}}"


def test_constrained_sft_with_beta_zero_is_plain_sft_under_gradient_accumulation(
        tmp_path, tiny_model_dir):
    def grads(sub, ga, *extra):
        (tmp_path / sub).mkdir()
        cfg = config(tmp_path / sub, tiny_model_dir, f"optim.grad_accum={ga}", *extra)
        trainer, model, tok = build(cfg, tmp_path / sub)
        # micro-batches: two short answers, then two long ones
        g = step_grads(trainer, model, tok, [0, 2, 1, 3], ga)
        return torch.cat([v.flatten() for v in g.values()])

    sft = grads("sft", 1)
    constrained = grads("csft", 2, "methods=[constrained_sft]", ZERO_BETA)
    rel = float((constrained - sft).norm() / sft.norm())
    assert rel < 1e-5  # before: 0.38, a mean of micro-batch means


def test_precomputed_reference_runs_under_the_runs_autocast(tmp_path, tiny_model_dir):
    # model.precision bf16: the trained log-probs are bf16-autocast ones, so the reference's
    # must be too, or the weights at step 0 (model == reference) are not 1
    from stayaligned.methods.constrained_sft import COLUMN
    from stayaligned.training.collate import AUX
    from stayaligned.training.losses import label_logprobs

    cfg = config(tmp_path, tiny_model_dir, "model.precision=bf16", "methods=[constrained_sft]")
    trainer, model, tok = build(cfg, tmp_path)
    assert trainer.precision.autocast == torch.bfloat16
    # the first per-device batch: the same rows and padding as the precomputation's first chunk
    batch = PadCollator(tok.pad_token_id)([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad(), trainer.compute_loss_context_manager():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = label_logprobs(logits, batch["labels"])
    mask = batch["labels"] != -100
    delta = (logp - batch[AUX + COLUMN])[mask]
    assert float(delta.abs().max()) == 0.0  # float32 reference: about 0.07 off
