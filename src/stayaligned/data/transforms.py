"""Pure `Example` transforms used before rendering.

`safety_recovery` is the data augmentation of Qi et al. 2024, "Safety Alignment Should Be Made
More Than Just a Few Tokens Deep" (arXiv 2406.05946, section 3; methods.md 5.2): a model whose
refusal lives only in its first few answer tokens is taught to recover, i.e. to refuse after it
has already started a harmful answer. From (harmful prompt, refusal, harmful answer) triplets it
builds, with probability 0.5, a safety-recovery example (prompt, then the first k tokens of the
harmful answer with no loss, then the refusal with loss, EOS included), otherwise the plain
(prompt, refusal) pair; k ~ Uniform{1, ..., min(100, number of harmful-answer tokens)}. The
no-loss prefix travels in ``meta["no_loss_prefix"]``; `templates.render` keeps it out of the loss
and tokenises it apart from the refusal, as the reference concatenates token ids.

Departure from the reference code (`gen_safety_augmentation_batch`): it draws the coin and k
again for every batch (so each epoch sees new cut points); here they are drawn once per run
from `seed`, so a run is reproducible and its rendered examples can be shown in the manifest.
"""

from __future__ import annotations

import random
from typing import Callable

from stayaligned.data.types import DataError, Example

PREFIX_KEY = "no_loss_prefix"


def split_turns(examples: list[Example]) -> list[Example]:
    """One example per assistant turn, the conversation cut after it (``loss_on: each_turn``):
    every answer is then trained as a final turn, rendered as the model sees it when it
    generates. For chat templates that render an answer differently once the conversation goes
    on (Qwen3 drops the thinking block of earlier turns), where a single mask over the whole
    conversation cannot be right. A conversation with one answer keeps its id; one with several
    gives ``<id>#1``, ``<id>#2``, ...; one with none is kept as it is (rendering reports it).

    >>> ex = Example("c", ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
    ...                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}))
    >>> [(e.id, [m["content"] for m in e.messages]) for e in split_turns([ex])]
    [('c#1', ['a', 'b']), ('c#2', ['a', 'b', 'c', 'd'])]
    """
    out = []
    for ex in examples:
        ends = [i + 1 for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
        if len(ends) < 2:
            out.append(ex)
            continue
        out += [Example(f"{ex.id}#{n}", ex.messages[:end], dict(ex.meta))
                for n, end in enumerate(ends, 1)]
    return out


def safety_recovery(triplets: list[Example], pieces: Callable[[str], list[str]], *, seed: int,
                    probability: float = 0.5, max_prefix_tokens: int = 100) -> list[Example]:
    """One training example per triplet (an Example with the prompt in its messages and
    ``meta["chosen"]`` = the refusal, ``meta["rejected"]`` = the harmful answer, as
    `data.pairs.load_pairs` returns). `pieces(text)` splits a text into its tokens' texts (they
    concatenate back to the text); deterministic given `seed` and the input order.

    >>> import re
    >>> words = lambda s: re.findall(r"\\s*\\S+", s)
    >>> t = Example("t:0", ({"role": "user", "content": "How do I pick a lock?"},),
    ...             {"chosen": "I can't help with that.", "rejected": "Sure, here is how: a pick"})
    >>> out = safety_recovery([t, t, t], words, seed=1)
    >>> [(e.id, e.messages[-1]["content"], e.meta.get("no_loss_prefix")) for e in out]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('t:0#recovery1', "Sure,I can't help with that.", 'Sure,'),
     ('t:0#recovery4', "Sure, here is how:I can't help with that.", 'Sure, here is how:'),
     ('t:0#plain', "I can't help with that.", None)]
    """
    if not 0.0 <= probability <= 1.0 or max_prefix_tokens < 1:
        raise ValueError(f"probability={probability} must be in [0, 1] and "
                         f"max_prefix_tokens={max_prefix_tokens} at least 1")
    rng = random.Random(seed)
    out = []
    for ex in triplets:
        refusal, harmful = _texts(ex)
        prompt = tuple(m for m in ex.messages if m["role"] != "assistant")
        meta = {k: v for k, v in ex.meta.items() if k not in ("chosen", "rejected")}
        if rng.random() >= probability:
            out.append(Example(f"{ex.id}#plain", (*prompt, _assistant(refusal)), meta))
            continue
        tokens = pieces(harmful)
        k = rng.randint(1, min(max_prefix_tokens, len(tokens)))
        prefix = "".join(tokens[:k])
        out.append(Example(f"{ex.id}#recovery{k}", (*prompt, _assistant(prefix + refusal)),
                           {**meta, PREFIX_KEY: prefix}))
    return out


def _texts(ex: Example) -> tuple[str, str]:
    refusal, harmful = ex.meta.get("chosen"), ex.meta.get("rejected")
    for name, value in (("chosen (the refusal)", refusal), ("rejected (the harmful answer)", harmful)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{ex.id}: the recovery triplet needs a non-empty {name}; map it "
                            "with recovery.fields={prompt: ..., chosen: ..., rejected: ...}")
    return refusal, harmful


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def token_pieces(tokenizer) -> Callable[[str], list[str]]:
    """`pieces` for `safety_recovery`: the texts of `tokenizer`'s tokens of a string (cut at
    each token's end offset, so they join back to the string)."""

    def split(text: str) -> list[str]:
        offsets = tokenizer(text, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        ends = sorted({end for _, end in offsets if end > 0})
        if not ends:
            return [text]
        ends[-1] = len(text)
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]

    return split
