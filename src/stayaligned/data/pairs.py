"""Contrastive safety pairs: (prompt, chosen refusal, rejected harmful answer).

SAP's safety signal (methods.md 2.3) comes from such pairs; its code uses 48 rows of
justinphan3110/circuit_breakers_train (columns ``prompt``, ``llama3_output`` = the refusal,
``response`` = the harmful completion). A pair is an `Example` whose messages hold the user
prompt and whose meta holds ``{"chosen": ..., "rejected": ...}``.

- `load_pairs` reads pairs from any file or Hub id that `data.loading` reads.
- `build_pairs` makes pairs for harmful prompts without harmful answers: the model itself
  writes the rejected answer (greedy), optionally starting from a prefill such as
  "Sure, here is" so that an aligned model complies; the prefill is part of the rejected text.
- `write_pairs` saves them as JSONL (``id``, ``prompt``, ``chosen``, ``rejected``), which
  `load_pairs` reads back with its default fields.
- `pairs_command` is `stayaligned pairs`: harmful prompts + refusals -> a pairs file.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from stayaligned.data.loading import Fields, load_examples, local_path, read_records
from stayaligned.data.types import DataError, Example
from stayaligned.runfiles import write_jsonl

CIRCUIT_BREAKERS_FIELDS = {"prompt": "prompt", "chosen": "llama3_output", "rejected": "response"}
WRITTEN_FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
PAIR_KEYS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------- reading


def load_pairs(source: str | Path, *, fields: dict | None = None,
               data_dir: str | Path | None = None, limit: int | None = None,
               seed: int = 0) -> list[Example]:
    """Pairs from a file or Hub id. `fields` maps prompt/chosen/rejected to the record's field
    names; by default the circuit_breakers_train names (prompt / llama3_output / response), or
    prompt / chosen / rejected for a file that `write_pairs` wrote. `limit` keeps a random
    subset (by `seed`) in file order."""
    names = _pair_fields(source, fields, data_dir)
    mapping = Fields(user=(names["prompt"],), assistant=None,
                     meta=(names["chosen"], names["rejected"]))
    try:
        examples = load_examples(source, mapping, limit=limit, seed=seed, data_dir=data_dir)
    except DataError as error:
        raise DataError(f"{error} (contrastive pairs read with fields prompt={names['prompt']!r}, "
                        f"chosen={names['chosen']!r}, rejected={names['rejected']!r}; map them "
                        "with fields={'prompt': ..., 'chosen': ..., 'rejected': ...})") from None
    return [_pair(ex, names) for ex in examples]


def _pair_fields(source, fields: dict | None, data_dir) -> dict:
    if fields is not None:
        unknown = sorted(set(fields) - set(PAIR_KEYS))
        if unknown:
            raise DataError(f"pair fields {unknown}: valid keys are prompt, chosen, rejected")
        return {**CIRCUIT_BREAKERS_FIELDS, **fields}
    path = local_path(source, data_dir)
    if path is not None and path.suffix.lower() == ".jsonl":
        records = read_records(path)
        if records and set(WRITTEN_FIELDS.values()) <= set(records[0][1]) \
                and not set(CIRCUIT_BREAKERS_FIELDS.values()) <= set(records[0][1]):
            return dict(WRITTEN_FIELDS)
    return dict(CIRCUIT_BREAKERS_FIELDS)


def _pair(example: Example, names: dict) -> Example:
    meta = {}
    for key in ("chosen", "rejected"):
        value = example.meta[names[key]]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{example.id}: field '{names[key]}' (the {key} answer) must be "
                            f"non-empty text, got {value!r:.60}. Remove the record or map "
                            f"fields.{key} to a text field.")
        meta[key] = value
    return Example(example.id, example.prompt_messages, meta)


# ---------------------------------------------------------------- building with a model


def build_pairs(model, tokenizer, prompts: list[Example], refusals: list[str], *,
                prefill: str | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                seed: int = 0, template: str = "native") -> list[dict]:
    """One pair per prompt: the model's greedy answer (after `prefill`, kept in the text) is
    the rejected answer; the chosen answer is the prompt's own assistant message when it has
    one, else a refusal picked from `refusals` by a `seed`-ed generator."""
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import prompt_text

    rng = random.Random(seed)
    chosen = []
    for ex in prompts:
        own = ex.content("assistant") if ex.messages[-1]["role"] == "assistant" else None
        if own is None and not refusals:
            raise DataError(f"{ex.id}: no refusal to pair with (the refusal list is empty)")
        chosen.append(own if own is not None else refusals[rng.randrange(len(refusals))])
    tmpl = get_template(template)
    texts = [prompt_text(tokenizer, Example(ex.id, ex.prompt_messages), tmpl, prefill or "")
             for ex in prompts]
    answers = continue_texts(model, tokenizer, texts, tmpl, max_new_tokens, batch_size)
    return [{"id": ex.id, "prompt": ex.content("user"), "chosen": c,
             "rejected": (prefill or "") + a} for ex, c, a in zip(prompts, chosen, answers)]


@torch.no_grad()
def continue_texts(model, tokenizer, texts: list[str], template, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy continuations of `texts`, exactly as they follow the text (leading spaces kept,
    unlike `evaluation.generation.generate`, so that a prefill joins its continuation)."""
    from stayaligned.evaluation.generation import length_batches
    from stayaligned.templates.render import encode

    encoded = [encode(tokenizer, t, template)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [""] * len(texts)
    for batch in length_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(batch):
            out[i] = _new_text(tokenizer, encoded[i], generated[row, width:].tolist())
    model.train(was_training)
    return out


def _new_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt (decoded in context, so a SentencePiece
    word-start space survives), stopping at the first end or pad token."""
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    cut = next((k for k, t in enumerate(new_ids) if t in stops), len(new_ids))
    before = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids[:cut])
    if full.startswith(before):
        return full[len(before):]
    return tokenizer.decode(new_ids[:cut], skip_special_tokens=True)


def write_pairs(path: str | Path, pairs: list[dict]) -> Path:
    """Write pairs as JSONL (atomically); `load_pairs(path)` reads them back."""
    path = Path(path)
    write_jsonl(path, [{"id": p.get("id", str(i)), **{k: p[k] for k in PAIR_KEYS}}
                       for i, p in enumerate(pairs)])
    return path


# ---------------------------------------------------------------- the CLI command


def pairs_command(model_name: str, harmful_source: str, refusals_source: str | None,
                  output: str, prefill: str | None, limit: int, data_dir: str | None,
                  max_new_tokens: int = 64) -> Path:
    """`stayaligned pairs`: pair each harmful prompt (a demo set, a registry name, or a file /
    Hub id with a `prompt` field) with a refusal (`refusals_source`: records with a `text`
    field, a .txt file with one per line, default the bundled refusals.json) and the model's
    own answer to it; writes `output` (JSONL) and returns its path."""
    from stayaligned.config import ModelConfig
    from stayaligned.data.demo import load_resource
    from stayaligned.data.registry import DATASETS
    from stayaligned.data.sources import load_source
    from stayaligned.models import load_model

    named = harmful_source.startswith("demo-") or \
        harmful_source.replace("_", "-").lower() in DATASETS
    prompts = load_source(harmful_source, split=None if named else "train", limit=limit,
                          data_dir=data_dir,
                          fields=None if named else {"user": "prompt", "assistant": None})
    if refusals_source is None:
        refusals = [r["text"] for r in load_resource("refusals.json")]
    else:
        refusals = [_refusal_text(rid, r) for rid, r in read_records(refusals_source)]
    model, tokenizer = load_model(ModelConfig(name=model_name))
    pairs = build_pairs(model, tokenizer, prompts, refusals, prefill=prefill,
                        max_new_tokens=max_new_tokens)
    return write_pairs(output, pairs)


def _refusal_text(record_id: str, record: dict) -> str:
    text = record.get("text", record.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{record_id}: a refusal record needs a non-empty 'text' field; the "
                        f"record has fields {', '.join(map(str, record)) or '(none)'}")
    return text
