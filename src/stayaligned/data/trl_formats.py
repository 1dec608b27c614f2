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
every part is text. Standard language-modeling records (``{"text": ...}``) have no
prompt/answer boundary to put the loss on, and preference records (``chosen``/``rejected``)
belong to preference trainers; both are refused with what to do instead.

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


def to_messages(record_id: str, record: dict, fmt: str) -> list[dict]:
    """The record's conversation as a list of {"role", "content"} messages."""
    if fmt == "conversational":
        return _message_list(record_id, record["messages"], "messages")
    prompt = _part(record_id, record["prompt"], "prompt", "user")
    if fmt == "prompt_only":
        return prompt
    return prompt + _part(record_id, record["completion"], "completion", "assistant")


def unsupported_hint(record: dict) -> str:
    """Why a record with TRL's other keys cannot be trained on here ('' if no such key)."""
    if "chosen" in record or "rejected" in record:
        return (" It looks like TRL preference data (chosen/rejected); SFT needs one answer per "
                "prompt: keep 'chosen' as the answer (fields: {user: prompt, assistant: chosen}).")
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
            raise DataError(f"{where}: role {message['role']!r} is not one of "
                            f"{', '.join(ROLES)}; rename it (e.g. 'human' -> 'user').")
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
