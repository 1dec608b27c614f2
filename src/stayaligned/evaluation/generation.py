"""Batched generation: prompts sorted by length (so a batch pads little), left padding, greedy
by default. Results come back in the input order.

A batch that runs out of GPU memory is split in halves and retried, and the smaller size is kept
for the batches after it (said once per halving): greedy answers do not depend on the batch
(left padding with its mask; tests/test_evaluation.py), so the rows are the ones a smaller
`generation.batch_size` gives. One prompt that does not fit is an error naming the settings."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from stayaligned.config import GenerationConfig
from stayaligned.precision import autocast_for
from stayaligned.templates.library import Template
from stayaligned.templates.render import encode


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    >>> length_batches([3, 9, 1, 7], 2)
    [[1, 3], [0, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    template: Template,
    gen: GenerationConfig,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
    desc: str = "generating",
    joined: bool = False,
) -> list[str]:
    """Continue each prompt text; `on_batch(indices, texts)` is called after every batch so a
    caller can save finished work as it goes. Texts are stripped; with `joined` they keep the
    whitespace that separates them from the prompt's end (a prefilled answer "Sure, here" +
    " is ..."), as the tokens decode in context."""
    encoded = [encode(tokenizer, p, template)["input_ids"] for p in prompts]
    results: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="response")
    queue = length_batches([len(e) for e in encoded], gen.batch_size)
    size = gen.batch_size
    while queue:
        batch = queue.pop(0)
        ids, mask = _left_pad([encoded[i] for i in batch], tokenizer.pad_token_id, device)
        try:
            with autocast_for(model):  # the loaded model's precision (bf16: autocast)
                output = _generate(model, gen, ids, mask, tokenizer.pad_token_id,
                                   stop_tokens(model, tokenizer))
        except torch.OutOfMemoryError as err:
            del ids, mask
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise torch.OutOfMemoryError(
                    f"{desc}: one prompt of {len(encoded[batch[0]])} tokens with "
                    f"generation.max_new_tokens {gen.max_new_tokens} does not fit in memory; "
                    "lower max_new_tokens, or hold the weights in bf16 "
                    "(model.precision=pure_bf16)") from err
            size = min(size, len(batch)) // 2
            print(f"[eval] {desc}: out of memory at a batch of {len(batch)}; going on with "
                  f"batches of {size} (set generation.batch_size={size} to start there)")
            rest = [i for b in [batch, *queue] for i in b]  # still longest first
            queue = [rest[i : i + size] for i in range(0, len(rest), size)]
            continue
        new = output[:, ids.shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, (i, text) in enumerate(zip(batch, texts)):
            lead = leading_space(tokenizer, encoded[i], new[row].tolist()) if joined else ""
            results[i] = lead + text.strip()
        if on_batch is not None:
            on_batch(batch, [results[i] for i in batch])
        bar.update(len(batch))
    bar.close()
    return results


def leading_space(tokenizer, prompt_ids: list[int], new_ids: list[int], window: int = 8) -> str:
    """The whitespace the new tokens start with after the prompt, decoded in context (a
    SentencePiece word-start space, a BPE "Ġ", newlines): what `strip()` of the continuation
    drops. Only the first tokens up to the first visible character are decoded."""
    before = tokenizer.decode(prompt_ids)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for j in range(1, min(len(new_ids), window) + 1):
        if new_ids[j - 1] in stops:
            return ""
        full = tokenizer.decode(prompt_ids + new_ids[:j])
        if not full.startswith(before):
            return ""
        added = full[len(before):]
        if added.strip():
            return added[: len(added) - len(added.lstrip())]
    return ""


def stop_tokens(model, tokenizer) -> int | list[int] | None:
    """The ids that end an answer: the model's generation_config's, and the tokenizer's end
    token, which a generation_config made for the base model can lack (the chat's end-of-turn
    token): generation ran past it into invented turns, which decoding hid from the judge by
    dropping the special tokens. One id stays a plain int."""
    own = model.generation_config.eos_token_id
    ids = list(own) if isinstance(own, (list, tuple)) else ([own] if own is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids[0] if len(ids) == 1 else (ids or None)


def _generate(model, gen: GenerationConfig, ids, mask, pad_token_id, eos=None) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        **({"eos_token_id": eos} if eos is not None else {}),
        max_new_tokens=gen.max_new_tokens,
        do_sample=gen.do_sample,
        temperature=gen.temperature if gen.do_sample else None,
        top_p=gen.top_p if gen.do_sample else None,
        top_k=None,
        pad_token_id=pad_token_id,
        **({"repetition_penalty": gen.repetition_penalty}
           if gen.repetition_penalty is not None else {}),
    )


def decoding(model, gen: GenerationConfig, tokenizer=None) -> dict:
    """What `generate` decodes with: the configured settings, plus what the model's own
    generation_config adds (its repetition_penalty, n-gram ban and stop tokens apply unless
    the config overrides them)."""
    own = model.generation_config
    out = {"do_sample": gen.do_sample, "max_new_tokens": gen.max_new_tokens,
           "repetition_penalty": gen.repetition_penalty if gen.repetition_penalty is not None
           else getattr(own, "repetition_penalty", 1.0),
           "no_repeat_ngram_size": getattr(own, "no_repeat_ngram_size", 0) or 0,
           "eos_token_id": stop_tokens(model, tokenizer) if tokenizer is not None
           else own.eos_token_id}
    if gen.do_sample:
        out.update(temperature=gen.temperature, top_p=gen.top_p)
    return out


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - len(row) :] = torch.tensor(row)
        mask[k, width - len(row) :] = 1
    return ids.to(device), mask.to(device)
