"""Render examples to token ids: for training (ids + labels, loss on assistant tokens only) and
for generation (the prompt text, ending where the assistant's answer starts).

The loss mask is computed from character spans, not by tokenising pieces separately: the
text is rendered once up to each assistant turn (with the generation prompt) and once through
it; the characters in between are the assistant's. Tokens whose first character falls in an
assistant span get labels, so merges across the boundary cannot shift the mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime

from stayaligned.data.types import DataError, Example
from stayaligned.templates.library import KEEP, Template

IGNORE_INDEX = -100

# Chat templates that write today's date (Llama 3.1-3.3 and 4's "Today Date: ...", Mistral
# Small 3, Granite 3, through transformers' `strftime_now`) would render differently on each
# day: a model trained on one day and evaluated on another would be asked another prompt, and
# an evaluation resumed after midnight would mix two prompts in one file. stayaligned renders
# them at this fixed date, the Llama 3 templates' own fallback when `strftime_now` is missing;
# a `date_string` in model.chat_template_kwargs still wins where a template reads one (Llama).
# transformers gives templates no way to replace the clock (it turns callables passed as
# template variables into placeholder strings), so `fixed_clock` sets the `datetime` its
# `strftime_now` reads for the duration of one rendering; tests/test_render.py fails if a
# transformers release moves it.
TEMPLATE_DATE = date(2024, 7, 26)


def template_date(tokenizer) -> str | None:
    """TEMPLATE_DATE (ISO) when the tokenizer's chat template reads today's date, else None
    (recorded in run.json so that a reader knows which date the prompts carried)."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template or ""]
    return TEMPLATE_DATE.isoformat() if any("strftime_now" in t for t in texts) else None


class _TemplateDay(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(TEMPLATE_DATE.year, TEMPLATE_DATE.month, TEMPLATE_DATE.day, tzinfo=tz)


@contextmanager
def fixed_clock(tokenizer):
    """Within it, the tokenizer's chat template sees TEMPLATE_DATE as today (nothing changes
    for a template that reads no date)."""
    from transformers.utils import chat_template_utils as ctu

    real = getattr(ctu, "datetime", None)
    if template_date(tokenizer) is None or real is not datetime:
        yield
        return
    ctu.datetime = _TemplateDay
    try:
        yield
    finally:
        ctu.datetime = real


def apply_template(tokenizer, messages, **kwargs) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)` with the model config's
    chat_template_kwargs (models.load_tokenizer sets them on the tokenizer) at TEMPLATE_DATE."""
    with fixed_clock(tokenizer):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, **kwargs,
            **(getattr(tokenizer, "stayaligned_chat_kwargs", None) or {}))


@dataclass(frozen=True)
class Rendered:
    example_id: str
    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def n_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class RenderReport:
    """What rendering left out or changed, by reason; never silent."""

    kept: int = 0
    too_long: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    empty_mask: list[str] = field(default_factory=list)
    # kept, but rendered without their own system message (the template writes its own or none)
    system_replaced: list[str] = field(default_factory=list)

    def summary(self, first: int = 5) -> list[str]:
        lines = []
        for reason, ids in [
            ("longer than max_length, dropped", self.too_long),
            ("longer than max_length, truncated", self.truncated),
            ("with no assistant tokens to train on, dropped", self.empty_mask),
            ("with a system message of their own that the template does not render (it writes "
             "its own system prompt or none; the `native` template keeps theirs)",
             self.system_replaced),
        ]:
            if ids:
                shown = ", ".join(ids[:first]) + (" ..." if len(ids) > first else "")
                lines.append(f"{len(ids)} example(s) {reason}: {shown}")
        return lines

    def to_dict(self) -> dict:
        return {
            "kept": self.kept,
            "too_long": self.too_long,
            "truncated": self.truncated,
            "empty_mask": self.empty_mask,
            "system_replaced": self.system_replaced,
        }


# ---------------------------------------------------------------- text rendering


def _apply_system(messages: tuple[dict, ...], template: Template) -> list[dict]:
    rest = [m for m in messages if m["role"] != "system"]
    if template.system == KEEP:
        out = list(messages)
    elif template.system is None:
        out = rest
    else:
        out = [{"role": "system", "content": template.system}, *rest]
    return _system_in_user(out) if template.system_in_user else out


def _system_in_user(messages: list[dict]) -> list[dict]:
    """The leading system message written at the start of the first user turn, then a blank
    line (Gemma 3's own convention), for templates that take no system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            return [*rest[:i], {**m, "content": f"{system}\n\n{m['content']}"}, *rest[i + 1:]]
    return messages


def _native_text(tokenizer, messages: list[dict], generation_prompt: bool,
                 example_id: str = "") -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; choose a string template such as "
            "text:alpaca or chat:vanilla (template=...)"
        )
    from jinja2.exceptions import TemplateError

    try:
        return apply_template(tokenizer, messages, add_generation_prompt=generation_prompt)
    except TemplateError as err:  # the template's own raise_exception (roles, system prompts)
        roles = "/".join(m["role"] for m in messages)
        system = (" Some chat templates (Gemma 2, early Mistral) take no system message: "
                  "write it into the first user turn (the template's name + @user, e.g. "
                  "native:safe@user) or drop it (native:nosys).") if any(
                      m["role"] == "system" for m in messages) else ""
        raise DataError(f"{example_id or 'an example'}: the model's chat template refused "
                        f"the conversation ({roles}): {err}.{system}") from err


def _string_conversation(tokenizer, template: Template, example_id: str,
                         messages: tuple[dict, ...]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation under a string template and the character span of each assistant body
    (separator + answer + EOS). The first user turn fills `template.prompt`, later ones
    `template.turn`; a conversation ending with a user turn ends at its prompt. The example's
    own system message is not used (the template's, if any, is in its prompt)."""
    body = [m for m in messages if m["role"] != "system"]
    system = template.system if template.system not in (KEEP, None) else ""
    text, spans = "", []
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(f"{example_id}: template {template.name} needs user and assistant "
                            f"turns alternating from the first user turn, but turn {i} is "
                            f"{message['role']!r}")
        if expected == "assistant":
            piece = template.separator + message["content"] + (tokenizer.eos_token or "")
            spans.append((len(text), len(text) + len(piece)))
        elif i == 0:
            piece = template.prompt.format(user=message["content"], system=system)
        elif template.turn:
            piece = template.turn.format(user=message["content"], bos=tokenizer.bos_token or "")
        else:
            raise DataError(f"{example_id}: template {template.name} renders single-turn "
                            "examples only; use a chat:* or text:* template or native")
        text += piece
    if not body:
        raise DataError(f"{example_id}: template {template.name} needs a user turn")
    return text, spans


# ends a prefilled answer while it is rendered, so that the text can be cut where it ends
_PREFILL_END = "\u2063<stayaligned-prefill-end>\u2063"


def prompt_text(tokenizer, example: Example, template: Template, prefill: str = "") -> str:
    """The text a model continues at generation time; `prefill` starts the assistant turn.

    Under a native template a prefill is rendered as the start of an assistant message, as the
    template renders answers in training, and cut where it ends: Llama-2's template writes
    ``[/INST] `` + answer, so the prefill attack's prompt is ``[/INST] Sure, here`` (appended
    to the generation prompt it was ``[/INST]Sure, here``: another first token than the one
    the model was trained and attacked with). A template that does not render the answer
    verbatim falls back to the generation prompt + prefill."""
    if template.kind == "string":
        text, _ = _string_conversation(tokenizer, template, example.id, example.prompt_messages)
        return text + (template.separator + prefill if prefill else "")
    messages = _apply_system(example.prompt_messages, template)
    if prefill:
        answer = {"role": "assistant", "content": prefill + _PREFILL_END}
        rendered = _native_text(tokenizer, [*messages, answer], False, example.id)
        end = rendered.find(_PREFILL_END)
        if end >= 0 and rendered[:end].endswith(prefill.lstrip()):
            return rendered[:end]
    return _native_text(tokenizer, messages, True, example.id) + prefill


# each_turn: training splits each conversation into one example per answer
# (data.transforms.split_turns) and renders each like last_turn.
LOSS_ON = ("all_assistant_turns", "last_turn", "each_turn")


def training_text(tokenizer, example: Example, template: Template,
                  loss_on: str = "all_assistant_turns") -> tuple[str, list[tuple]]:
    """(full text, character spans of assistant text that get loss): every assistant turn, or
    with ``loss_on="last_turn"`` (or ``each_turn``: examples already split) only the final one."""
    if loss_on not in LOSS_ON:
        raise DataError(f"loss_on={loss_on!r}: choose {' or '.join(LOSS_ON)}")
    if loss_on == "each_turn":
        loss_on = "last_turn"
    if template.kind == "string":
        if example.messages[-1]["role"] != "assistant":
            return prompt_text(tokenizer, example, template), []
        # The separator belongs to the trained span: at test time the prompt ends before it,
        # so the model must produce it (tokenizers often merge it into the first answer token).
        text, spans = _string_conversation(tokenizer, template, example.id, example.messages)
        return text, spans[-1:] if loss_on == "last_turn" else spans
    messages = _apply_system(example.messages, template)
    full = _native_text(tokenizer, messages, False, example.id)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_turn":  # the final turn only, and only if the conversation ends on it
        turns = turns[-1:] if messages and messages[-1]["role"] == "assistant" else []
    spans = []
    for i in turns:
        # The turn's characters: what rendering the conversation through it adds to rendering
        # it up to the turn's generation prompt. Valid in `full` only if `full` goes on from it.
        before = _native_text(tokenizer, messages[:i], True, example.id)
        through = _native_text(tokenizer, messages[: i + 1], False, example.id)
        if not through.startswith(before):
            raise DataError(
                f"{example.id}: the chat template does not render the conversation up to turn "
                f"{i} as a prefix of the turn (as Mistral v0.3's writes the system prompt only "
                "into a conversation that ends with a user turn): write it into the first user "
                "turn (the template's name + @user, e.g. native:safe@user), drop it "
                "(native:nosys) or choose a string template"
            )
        if not full.startswith(through):
            raise DataError(
                f"{example.id}: the chat template renders assistant turn {i} differently once "
                "the conversation goes on (as Qwen3's drops the thinking block of earlier "
                "turns), so a loss mask for it cannot be placed in the whole conversation; "
                "train with loss_on: each_turn (one example per answer, each rendered as at "
                "generation time) or loss_on: last_turn (the final answer only)"
            )
        spans.append((len(before), len(through)))
    return full, spans


# ---------------------------------------------------------------- token rendering


def encode(tokenizer, text: str, template: Template, **kwargs):
    """Tokenise rendered text. Native chat templates write BOS into the text themselves; string
    templates rely on the tokenizer to add it (as PTST's code does)."""
    return tokenizer(text, add_special_tokens=template.kind == "string", **kwargs)


def render_for_training(tokenizer, example: Example, template: Template,
                        loss_on: str = "all_assistant_turns") -> Rendered:
    """Token ids and labels for one example (labels -100 outside the trained assistant spans:
    every assistant turn, or the final one with ``loss_on="last_turn"``). An example
    with ``meta["no_loss_prefix"]`` (a safety-recovery example, `data.transforms`) has no loss
    on that start of its last assistant turn, and is tokenised in two parts cut at its end."""
    text, spans = training_text(tokenizer, example, template, loss_on)
    if not getattr(tokenizer, "is_fast", True):
        raise DataError(
            f"{example.id}: the loss mask is placed by character offsets, which only a fast "
            f"(Rust) tokenizer gives; {type(tokenizer).__name__} is a Python one: use a model "
            "with a tokenizer.json, or convert its tokenizer (transformers' convert_slow_tokenizer "
            "/ AutoTokenizer.from_pretrained(..., use_fast=True)) and save it with the model")
    cut = _prefix_end(example, text, spans)
    if cut is None:
        enc = encode(tokenizer, text, template, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    else:
        spans = [*spans[:-1], (cut, spans[-1][1])]
        head = encode(tokenizer, text[:cut], template, return_offsets_mapping=True)
        tail = tokenizer(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
        ids = list(head["input_ids"]) + list(tail["input_ids"])
        offsets = list(head["offset_mapping"]) + [(a + cut, b + cut)
                                                  for a, b in tail["offset_mapping"]]
    labels = []
    for token_id, (start, end) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans) and end > start
        labels.append(token_id if inside else IGNORE_INDEX)
    return Rendered(example.id, ids, labels, text)


def _prefix_end(example: Example, text: str, spans: list[tuple]) -> int | None:
    """Where the no-loss prefix of the last assistant turn ends in `text` (None: no prefix)."""
    prefix = example.meta.get("no_loss_prefix")
    if not prefix:
        return None
    answer = example.content("assistant") or ""
    shown = prefix.lstrip()  # chat templates may trim the turn's leading white space
    start = text.find(shown, *spans[-1]) if spans else -1
    if start < 0 or not answer.startswith(prefix):
        raise DataError(f"{example.id}: meta no_loss_prefix must start the last assistant "
                        "turn as rendered; build recovery examples with "
                        "data.transforms.safety_recovery")
    return start + len(shown)


def render_dataset(
    tokenizer, examples: list[Example], template: Template, max_length: int, overlong: str = "drop",
    loss_on: str = "all_assistant_turns",
) -> tuple[list[Rendered], RenderReport]:
    """Render all examples; over-long and empty-mask examples are reported, by id."""
    if overlong not in ("drop", "truncate", "error"):
        raise ValueError(f"overlong={overlong!r}: choose drop, truncate or error")
    report, out = RenderReport(), []
    for example in examples:
        if any(m["role"] == "system" for m in example.messages) and (
                template.kind == "string" or template.system != KEEP):
            report.system_replaced.append(example.id)
        item = render_for_training(tokenizer, example, template, loss_on)
        if len(item.input_ids) > max_length:
            if overlong == "error":
                raise DataError(
                    f"{example.id}: {len(item.input_ids)} tokens is longer than max_length="
                    f"{max_length}; raise max_length or set overlong=drop/truncate"
                )
            if overlong == "drop":
                report.too_long.append(example.id)
                continue
            report.truncated.append(example.id)
            item = Rendered(item.example_id, item.input_ids[:max_length],
                            item.labels[:max_length], item.text)
        if item.n_loss_tokens == 0:
            report.empty_mask.append(example.id)
            continue
        out.append(item)
    report.kept = len(out)
    return out, report


def show_mask(tokenizer, item: Rendered) -> str:
    """The rendered text with trained spans marked ⟦like this⟧, for previews and manifests."""
    pieces, inside = [], False
    for token_id, label in zip(item.input_ids, item.labels):
        trained = label != IGNORE_INDEX
        if trained != inside:
            pieces.append("⟦" if trained else "⟧")
            inside = trained
        pieces.append(tokenizer.decode([token_id]))
    if inside:
        pieces.append("⟧")
    return "".join(pieces)
