"""Depth of alignment: per-token KL divergence between a seed model and a fine-tuned model over
the first N response tokens of harmful prompts (LookAhead Tuning, arXiv 2503.19041, Figure 3;
Qi et al. 2024, arXiv 2406.05946, Figure 1; methods.md 1.4).

Each example is a harmful prompt whose final assistant turn holds a fixed continuation: a
refusal (demo-safety, a dataset's refusal field) or a harmful answer (a pairs file's
``rejected`` field, via `with_continuation`). Prompt + continuation are teacher-forced through
both models; at response position t = 1..N the two next-token distributions
p(. | x, y_<t) are compared over the full vocabulary in float32, and the per-example values
are averaged per position (with the standard error of the mean). An example whose
continuation has fewer than t tokens does not count at position t, so `n` can fall with t.

Direction (the `direction` argument):
- ``"ft||seed"`` (default): KL(p_ft || p_seed) = E_{p_ft}[log p_ft - log p_seed]. Qi et al.'s
  Figure 1 puts the model after the training stage first and the model before it second,
  D_KL(pi_aligned || pi_base); here the fine-tuned model is the "after" model and the seed
  the reference, which is also the direction of the usual KL(pi_theta || pi_ref) penalty.
  methods.md does not state the direction of LookAhead's Figure 3; this is our reading.
- ``"seed||ft"``: KL(p_seed || p_ft), the expectation under the seed model: large where the
  fine-tuned model has lost mass on what the seed predicted (e.g. its refusal tokens).

Tokenisation follows the training renderer: the prompt and continuation are rendered and
tokenised as one text (`prompt_text` with the continuation as prefill), and a token belongs to
the response if its first character is at or after the end of the prompt. No end-of-turn token
is appended: the N positions are the continuation's own first N tokens.
"""

from __future__ import annotations

import inspect
import io
import math
import statistics
from pathlib import Path

import torch

from stayaligned.data.types import DataError, Example
from stayaligned.evaluation.generation import length_batches
from stayaligned.runfiles import write_bytes, write_json
from stayaligned.templates.library import Template, get_template
from stayaligned.templates.render import encode, prompt_text

DIRECTIONS = ("ft||seed", "seed||ft")


def with_continuation(pairs: list[Example], field: str = "rejected") -> list[Example]:
    """Contrastive pairs (meta ``chosen`` / ``rejected``) -> examples whose assistant turn is
    ``meta[field]``, ready for `depth_kl`.

    >>> pair = Example("p:1", ({"role": "user", "content": "Q?"},),
    ...                {"chosen": "I can't.", "rejected": "Sure: ..."})
    >>> with_continuation([pair], "chosen")[0].messages
    ({'role': 'user', 'content': 'Q?'}, {'role': 'assistant', 'content': "I can't."})
    """
    out = []
    for pair in pairs:
        if field not in pair.meta:
            raise DataError(f"{pair.id}: no meta field {field!r} to use as the continuation; "
                            f"it has {sorted(pair.meta)} (pairs have 'chosen' and 'rejected')")
        reply = {"role": "assistant", "content": pair.meta[field]}
        out.append(Example(pair.id, (*pair.prompt_messages, reply), pair.meta))
    return out


# ---------------------------------------------------------------- tokens


def split_tokens(tokenizer, example: Example, template: Template,
                 n_tokens: int) -> tuple[list[int], list[int]]:
    """(context ids, the first `n_tokens` continuation ids) for an example whose final turn is
    the assistant's continuation."""
    continuation = example.content("assistant")
    if example.messages[-1]["role"] != "assistant" or continuation is None:
        raise DataError(f"{example.id}: depth needs a continuation in a final assistant turn; "
                        "load a source with an assistant field or map pairs with "
                        "with_continuation(pairs, 'chosen' or 'rejected')")
    full = prompt_text(tokenizer, example, template, prefill=continuation)
    # where the continuation's text starts: after the generation prompt, and after whatever the
    # template writes before an answer (Llama-2's space, an empty think block); the first
    # response token is the first that ends past it (Llama-2's "▁I" holds the space)
    body = continuation.lstrip()
    cut = (len(full) - len(body) if body and full.endswith(body)
           else len(prompt_text(tokenizer, example, template)))
    enc = encode(tokenizer, full, template, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    first = next((i for i, (start, end) in enumerate(offsets) if end > cut and end > start),
                 len(ids))
    return ids[:first], ids[first : first + n_tokens]


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Contexts left-padded and continuations right-padded, so that response position t sits
    in the same column for every row: [pad.. context | response ..pad]."""
    ctx_width = max(len(c) for c, _ in rows)
    resp_width = max(len(r) for _, r in rows)
    ids = torch.full((len(rows), ctx_width + resp_width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, (context, response) in enumerate(rows):
        start = ctx_width - len(context)
        row = context + response
        ids[k, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[k, start : start + len(row)] = 1
    return ids, mask, resp_width


@torch.no_grad()
def _response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """float32 log-probabilities [batch, width, vocab] of response tokens 1..width."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    # Explicit positions count real tokens only: RoPE is shift-invariant and would not mind
    # the left padding, but absolute position embeddings (GPT-2, OPT) would.
    kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
    # a PEFT model (or its adapters-off view) passes keyword arguments on to its base model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
    if keep:  # only the last width + 1 columns: the last context token and the response
        kwargs["logits_to_keep"] = width + 1
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    logits = logits if keep else logits[:, -(width + 1) :]
    return logits[:, :width].float().log_softmax(-1)


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities (0 log 0 = 0).

    >>> p = torch.tensor([0.5, 0.5]).log(); q = torch.tensor([0.25, 0.75]).log()
    >>> round(token_kl(p, q).item(), 6) == round(0.5 * math.log(2) + 0.5 * math.log(2 / 3), 6)
    True
    """
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p.exp() > 0, terms, torch.zeros_like(terms)).sum(-1)


# ---------------------------------------------------------------- the measurement


def depth_kl(seed_model, ft_model, tokenizer, examples: list[Example], template: Template | str,
             n_tokens: int = 8, batch_size: int = 8, direction: str = "ft||seed") -> dict:
    """Per-position KL between `seed_model` and `ft_model` on the first `n_tokens` tokens of
    each example's continuation. Returns positions, kl_mean, kl_sem (None where n < 2),
    n (examples per position), direction, template, n_examples, n_tokens, unit."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: choose one of {', '.join(DIRECTIONS)}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens}: the number of response positions must be >= 1")
    template = get_template(template) if isinstance(template, str) else template
    rows = [split_tokens(tokenizer, ex, template, n_tokens) for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    values: list[list[float]] = [[] for _ in range(n_tokens)]
    seed_model.eval()
    ft_model.eval()
    for batch in length_batches([len(c) for c, _ in rows], batch_size):
        batch = [i for i in batch if rows[i][1]]  # an empty continuation has no positions
        if not batch:
            continue
        ids, mask, width = _pad([rows[i] for i in batch], pad_id)
        log_seed = _response_logprobs(seed_model, ids, mask, width)
        log_ft = _response_logprobs(ft_model, ids, mask, width).to(log_seed.device)
        if log_seed.shape != log_ft.shape:
            raise ValueError(f"the models' vocabularies differ ({log_seed.shape[-1]} vs "
                             f"{log_ft.shape[-1]} logits): compare a fine-tune with its own seed")
        first, second = (log_ft, log_seed) if direction == "ft||seed" else (log_seed, log_ft)
        kl = token_kl(first, second).cpu()
        for k, i in enumerate(batch):
            for t in range(len(rows[i][1])):
                values[t].append(kl[k, t].item())
    means, sems = zip(*(_mean_sem(v) for v in values))
    return {
        "positions": list(range(1, n_tokens + 1)),
        "kl_mean": list(means),
        "kl_sem": list(sems),
        "n": [len(v) for v in values],
        "direction": direction,
        "template": template.name,
        "n_examples": len(examples),
        "n_tokens": n_tokens,
        "unit": "nats",
    }


def _mean_sem(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    if len(values) < 2:
        return statistics.fmean(values), None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


# ---------------------------------------------------------------- outputs


def write_depth(path: str | Path, result: dict) -> None:
    """The result as JSON, written atomically."""
    write_json(Path(path), result)


def plot_depth(results: dict[str, dict], path: str | Path) -> None:
    """One line per model (label -> `depth_kl` result), error bars +-1 SEM, x = response token
    position, y = KL; written atomically as PNG. Uses the Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, result in results.items():
        means = [math.nan if m is None else m for m in result["kl_mean"]]
        sems = [0.0 if s is None else s for s in result["kl_sem"]]
        axes.errorbar(result["positions"], means, yerr=sems, label=label, marker="o", capsize=3)
    directions = sorted({r["direction"] for r in results.values()})
    positions = sorted({p for r in results.values() for p in r["positions"]})
    axes.set_xticks(positions)
    axes.set_xlabel("response token position")
    axes.set_ylabel(f"KL({' / '.join(directions)}) per token (nats)")
    axes.set_title("Per-token KL against the seed model")
    axes.grid(alpha=0.3)
    if results:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_bytes(Path(path), buffer.getvalue())


