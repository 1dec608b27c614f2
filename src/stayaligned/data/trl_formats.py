"""TRL's dataset formats, read as they are: the record's keys say which one it is.

The names and keys are those of TRL's "Dataset formats and types" guide
(huggingface.co/docs/trl/dataset_formats):

| TRL type / format | record |
|---|---|
| conversational language modeling | ``{"messages": [{"role": "user", "content": ...}, ...]}`` |
| standard prompt-completion | ``{"prompt": "...", "completion": "..."}`` |
| conversational prompt-completion | ``{"prompt": [messages], "completion": [messages]}`` |
| standard prompt-only | ``{"prompt": "..."}`` |
| conversational prompt-only | ``{"prompt": [messages]}`` |

A message is ``{"role": "system" | "user" | "assistant", "content": str}``; content given as a
list of parts (``[{"type": "text", "text": ...}]``, TRL's multimodal layout) is joined when
every part is text. Keys whose loss would change what is trained (a tool call, a reasoning
trace, a per-turn ``weight`` of OpenAI's fine-tuning format, a record's ``tools``) are refused,
naming the record and message; other keys of a message are not read. Standard
language-modeling records (``{"text": ...}``) have no prompt/answer boundary to put the loss on,
and preference records (``chosen``/``rejected``) belong to preference trainers; both are refused
with what to do instead.

A record is read this way only when it lacks the fields of the configured mapping (by default
Alpaca-style ``instruction``/``output``), so every existing ``fields:`` mapping reads as before.
"""

from __future__ import annotations

from stayaligned.data.types import ROLES, DataError

FORMATS = ("conversational", "prompt_completion", "prompt_only")


def detect(record: dict) -> str | None:
    """The TRL format of `record`, or None when it is none of them.

    >>> detect({"messages": []}), detect({"prompt": "a", "completion": "b"}), detect({"x": 1})
    ('conversational', 'prompt_completion', None)
    """
    if "chosen" in record or "rejected" in record:
        return None  # preference data: refused with a hint (unsupported_hint)
    if "messages" in record:
        return "conversational"
    if "prompt" in record:
        return "prompt_completion" if "completion" in record else "prompt_only"
    return None


_TOOL_FIX = ("tool calls are not rendered, so the turn would be trained without its call; "
             "remove tool-calling conversations from the data")
_REASONING_FIX = ("the reasoning would be dropped; write it into 'content' as the model's chat "
                  "template writes it, or remove the key")
# message keys that rendering would drop, and what to do instead; an empty value (a Hub table
# fills absent keys with None) or weight 1 (trained, as every turn is) changes nothing
DROPPED_KEYS = {
    "tool_calls": _TOOL_FIX,
    "function_call": _TOOL_FIX,
    "reasoning_content": _REASONING_FIX,
    "thinking": _REASONING_FIX,
    "weight": "per-turn weights (OpenAI's fine-tuning format) are not read, so a turn with "
              "weight 0 would be trained on; remove those turns (or end the conversation "
              "before them), or remove the key",
}


def to_messages(record_id: str, record: dict, fmt: str) -> list[dict]:
    """The record's conversation as a list of {"role", "content"} messages."""
    if record.get("tools"):
        raise DataError(f"{record_id}: field 'tools' holds tool definitions, which are not "
                        "rendered, so the conversation would be trained without them; remove "
                        "tool-calling records (or the field, if no turn uses a tool).")
    if fmt == "conversational":
        return _message_list(record_id, record["messages"], "messages")
    prompt = _part(record_id, record["prompt"], "prompt", "user")
    if fmt == "prompt_only":
        return prompt
    return prompt + _part(record_id, record["completion"], "completion", "assistant")


def unsupported_hint(record: dict) -> str:
    """Why a record with TRL's other keys cannot be trained on here ('' if no such key)."""
    if "chosen" in record or "rejected" in record:
        head = " It looks like TRL preference data (chosen/rejected); SFT needs one answer per "
        if isinstance(record.get("chosen"), list):  # conversational: rename, then TRL's keys
            key = "completion" if "prompt" in record else "messages"
            return head + f"conversation: rename 'chosen' to '{key}' and drop 'rejected'."
        if "prompt" not in record:
            return head + ("prompt, but these records have no 'prompt' field (the prompt is "
                           "inside 'chosen'); split it out into 'prompt' and 'completion'.")
        return head + ("prompt: keep 'chosen' as the answer (fields: {user: prompt, "
                       "assistant: chosen}).")
    if "text" in record:
        return (" It looks like TRL language-modeling data ('text'), which has no prompt/answer "
                "boundary to put the loss on; convert it to 'messages' or 'prompt'/'completion'.")
    return ""


def _part(record_id: str, value: object, key: str, role: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{record_id}: field '{key}' is empty. Remove the record or fill in "
                            "the field.")
        return [{"role": role, "content": value}]
    return _message_list(record_id, value, key)


def _message_list(record_id: str, value: object, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{record_id}: field '{key}' must be a non-empty list of messages "
                        f"({{'role': ..., 'content': ...}}), got {_preview(value)}.")
    messages = []
    for index, message in enumerate(value):
        where = f"{record_id}: {key}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where} must be an object with 'role' and 'content', got "
                            f"{_preview(message)}.")
        if message["role"] not in ROLES:
            fix = ("tool results are not rendered; remove tool-calling conversations from the "
                   "data" if message["role"] in ("tool", "function", "ipython")
                   else "rename it (e.g. 'human' -> 'user')")
            raise DataError(f"{where}: role {message['role']!r} is not one of "
                            f"{', '.join(ROLES)}; {fix}.")
        dropped = [key for key in DROPPED_KEYS
                   if message.get(key) not in (None, "", [], {}) and
                   not (key == "weight" and message[key] == 1)]
        if dropped:
            raise DataError(f"{where}: key '{dropped[0]}' is not read: "
                            f"{DROPPED_KEYS[dropped[0]]}.")
        content = _text(message["content"], where)
        messages.append({"role": message["role"], "content": content})
    return messages


def _text(content: object, where: str) -> str:
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise DataError(f"{where}: content must be text (or a list of text parts), got "
                        f"{_preview(content)}.")
    if not content.strip():
        raise DataError(f"{where}: content is empty. Remove the message or fill it in.")
    return content


def check_order(record_id: str, messages: list[dict]) -> None:
    """System messages only first; then user and assistant turns alternating, user first."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(body)
            raise DataError(
                f"{record_id}: message {index + offset} has role {message['role']!r} where "
                f"{expected!r} is expected; a conversation is an optional system message, then "
                "user and assistant turns alternating, starting with user.")


def _preview(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
