"""Where the trained span of an answer starts, for the methods that weigh the first answer
tokens (constrained SFT's large beta_t, STR's first positions and its last prompt position).

A chat template may render template text at the start of the assistant turn that its
generation prompt does not end with: Qwen3's template, in its default thinking mode, writes an
empty ``<think>\\n\\n</think>\\n\\n`` before the final answer, while the generation prompt ends at
``assistant\\n``. The trained span then starts on that block, and a method that protects "the
first response tokens" protects template tokens instead of the refusal-carrying ones.
`template_prefix` finds such an example; the methods warn in `setup`.
"""

from __future__ import annotations

import warnings

from stayaligned.templates.render import IGNORE_INDEX

N_CHECKED = 32  # rendered items looked at: a template renders every answer alike
FIX = ("set model.chat_template_kwargs: {enable_thinking: false} (Qwen3-style templates: the "
       "generation prompt then ends with the empty think block, so the answer's first trained "
       "token is its content), or use a template whose assistant turn starts with the content")


def first_trained_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The text of the first contiguous run of labelled tokens (the first trained answer)."""
    run: list[int] = []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            break
    return tokenizer.decode(run, skip_special_tokens=False)


def template_prefix(tokenizer, items, examples, limit: int = N_CHECKED) -> tuple[str, str] | None:
    """(example id, text) for the first of the first `limit` rendered items whose first
    trained answer starts with non-whitespace text ahead of the assistant message's content;
    None when every checked answer's trained span starts with its content."""
    by_id = {ex.id: ex for ex in examples}
    for item in items[:limit]:
        example = by_id.get(item.example_id)
        if example is None:
            continue
        text = first_trained_text(tokenizer, item.input_ids, item.labels)
        starts = [text.find(head) for head in
                  (m["content"].strip()[:20] for m in example.messages
                   if m.get("role") == "assistant" and isinstance(m.get("content"), str))
                  if head]
        starts = [s for s in starts if s >= 0]
        if starts and text[:min(starts)].strip():
            return item.example_id, text[:min(starts)]
    return None


def warn_template_prefix(method: str, what: str, tokenizer, items, examples,
                         loud: bool = True) -> str | None:
    """Warn when the trained answers start with template text (see `template_prefix`);
    returns the warning text, or None."""
    found = template_prefix(tokenizer, items, examples)
    if found is None:
        return None
    example_id, prefix = found
    message = (f"{method}: the trained answer of example {example_id} starts with template "
               f"text {prefix!r} before the answer's content, so {what} land(s) on those "
               f"template tokens, not on the answer's first tokens; {FIX}")
    warnings.warn(message, stacklevel=2)
    if loud:
        print("=" * 78 + f"\n[{method}] WARNING: {message}\n" + "=" * 78)
    return message
