"""Held-out task loss: the mean per-token negative log-likelihood of the reference answers.

A 135M model solves almost no GSM8K problems, so exact-match accuracy cannot show what a
fine-tune taught it; the likelihood of the reference solutions can. Each task example is
rendered exactly as for training (the evaluation template, loss on the assistant span only),
and the loss is token-weighted over all answer tokens of the benchmark (the quantity a
training loss curve reports), with a per-example standard error for scale.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from stayaligned.data.types import DataError, Example
from stayaligned.precision import autocast_for
from stayaligned.templates.library import Template
from stayaligned.templates.render import IGNORE_INDEX, render_for_training

# Logits held by one forward pass, in floats (1 GiB in float32): a 150k-token vocabulary at
# batch 32 x 300 tokens would need 5.8 GiB, and the log-softmax as much again.
MAX_LOGITS = 2**28


def with_reference(example: Example, reference: str | None) -> Example:
    """The example with its reference answer as the final assistant turn."""
    if not reference:
        raise DataError(f"{example.id}: task loss needs a reference answer (field 'answer' or "
                        "an assistant turn); the record has none")
    return replace(example, messages=(*example.prompt_messages,
                                      {"role": "assistant", "content": reference}))


@torch.no_grad()
def reference_nll(model, tokenizer, examples: list[Example], template: Template,
                  batch_size: int = 8) -> dict:
    """{"loss": token-weighted mean NLL, "tokens", "n", "per_example_sem"}."""
    items = [render_for_training(tokenizer, ex, template) for ex in examples]
    limit = getattr(model.config, "max_position_embeddings", None)
    for ex, item in zip(examples, items):
        if limit and len(item.input_ids) > limit:
            raise DataError(f"{ex.id}: {len(item.input_ids)} tokens exceed the model's context "
                            f"of {limit}; task loss cannot be computed")
    total, tokens, per_example = 0.0, 0, []
    for rows, nll, keep in nll_passes(model, tokenizer, items, batch_size):
        for k in range(len(rows)):
            count = int(keep[k].sum())
            if count:
                row = float(nll[k][keep[k]].sum())
                total, tokens = total + row, tokens + count
                per_example.append(row / count)
    mean = sum(per_example) / len(per_example) if per_example else float("nan")
    var = (sum((x - mean) ** 2 for x in per_example) / (len(per_example) - 1)
           if len(per_example) > 1 else float("nan"))
    return {"loss": total / tokens if tokens else float("nan"), "tokens": tokens,
            "n": len(per_example), "per_example_mean": mean,
            "per_example_sem": math.sqrt(var / len(per_example)) if len(per_example) > 1 else None}


@torch.no_grad()
def nll_passes(model, tokenizer, items: list, batch_size: int):
    """Yield (rows, nll, keep) per forward pass over rendered `items`: `rows` the indices of
    the pass's items, `nll` their per-token NLL (float32, [rows, width - 1], position t
    predicting token t + 1) and `keep` the mask of answer tokens. Items go shortest first in
    batches of `batch_size`, each split to hold at most MAX_LOGITS logits and right-padded per
    pass (in bf16 the padded width changes the sums' rounding, so every reader batches so)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    vocab = model.get_output_embeddings().weight.shape[0]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(items[i].input_ids) for i in batch)
        step = max(1, MAX_LOGITS // (width * vocab))  # rows per forward pass
        for sub in range(0, len(batch), step):
            rows = batch[sub : sub + step]
            yield (rows, *_nll_pass(model, [items[i] for i in rows], pad, device))


def _nll_pass(model, batch, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over `batch` (right-padded): (per-token NLL, answer-token mask)."""
    width = max(len(it.input_ids) for it in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for k, it in enumerate(batch):
        n = len(it.input_ids)
        ids[k, :n] = torch.tensor(it.input_ids)
        labels[k, :n] = torch.tensor(it.labels)
        mask[k, :n] = 1
    with autocast_for(model):  # the loaded model's precision (bf16: autocast)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logits = logits.float()
    target = labels[:, 1:].to(device)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, target != IGNORE_INDEX
