"""Judgment cache: a JSONL file of judge verdicts, so an expensive judge runs once per answer.

Each line is ``{"key": sha256, "judgment": {...}}``; the key hashes (benchmark, item id, prompt,
response, judge name and setup), so a changed response or a different judge never reuses a verdict. New
entries are appended and fsync'ed on `flush()`; a later line for the same key wins. A crash can
only leave a partial last line: it is ignored with a warning and cut off before the next
append. One process should write a cache at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


class CacheError(ValueError):
    """The cache file is damaged somewhere other than its last line; the message says where."""


class JudgeItem(NamedTuple):
    """One generation to judge: which benchmark and record it is, and the text pair."""

    benchmark: str
    id: str
    prompt: str
    response: str
    prefill: str = ""  # the start of `response` that a prefilling attack wrote


def judgment_key(benchmark: str, item_id: str, prompt: str, response: str, judge: str) -> str:
    """The sha256 hex digest identifying one judgment.

    The fields are hashed as a JSON list, so no two different tuples collide by concatenation.

    >>> judgment_key("b", "1", "p", "r", "j") == judgment_key("b", "1", "p", "r", "j")
    True
    >>> judgment_key("b", "1", "pr", "", "j") == judgment_key("b", "1", "p", "r", "j")
    False
    """
    fields = json.dumps([benchmark, item_id, prompt, response, judge], ensure_ascii=False)
    return hashlib.sha256(fields.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Judgments by key, loaded from and appended to the JSONL file `path` (in memory only
    when `path` is None)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        self._pending: list[str] = []
        self._valid_bytes = 0
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        for number, line in enumerate(complete, 1):
            if line.strip():
                self._read_line(line, number)
        self._valid_bytes = len(data) - len(tail)
        if tail.strip():
            log.warning(
                "%s: ignoring the unfinished last line %d (%d bytes), left by an interrupted "
                "write; its judgment will be recomputed", self.path, len(complete) + 1, len(tail),
            )

    def _read_line(self, line: bytes, number: int) -> None:
        try:
            entry = json.loads(line)
            key, value = entry["key"], entry["judgment"]
        except (ValueError, KeyError, TypeError) as err:
            raise CacheError(
                f"{self.path}, line {number}: not a cache entry ({err}); delete that line, or "
                "the whole file to recompute every judgment"
            ) from None
        self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict | None:
        """The cached judgment for `key`, or None."""
        return self._entries.get(key)

    def put(self, key: str, judgment: dict) -> None:
        """Cache `judgment` under `key`; it is written to the file on the next `flush()`."""
        self._entries[key] = judgment
        self._pending.append(
            json.dumps({"key": key, "judgment": judgment}, ensure_ascii=False, default=str) + "\n"
        )

    def flush(self) -> None:
        """Append the entries put since the last flush and fsync, cutting off a partial line."""
        if not self._pending:
            return
        if self.path is None:
            self._pending.clear()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(self._pending).encode("utf-8")
        with open(self.path, "ab") as handle:
            if handle.tell() < self._valid_bytes:
                raise CacheError(
                    f"{self.path} shrank while in use (another process?); run one writer per "
                    "cache file and rerun"
                )
            if handle.tell() > self._valid_bytes:
                handle.truncate(self._valid_bytes)  # the partial line a crash left behind
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self._valid_bytes += len(payload)
        self._pending.clear()


def _needs_judging(judgment: dict | None) -> bool:
    """True for a missing judgment or one that ended in an error (retried on every run)."""
    return judgment is None or judgment.get("error") is not None


def judge_with_cache(
    judge, items: Iterable[Sequence[str]], cache: JudgmentCache, chunk_size: int = 32
) -> list[dict]:
    """Judgments for `items` ((benchmark, id, prompt, response[, prefill]) each), in order, each with
    its benchmark and id; `judge.judge_batch` runs only on items without a good cached
    judgment, in chunks of `chunk_size`, and the cache is flushed after every chunk."""
    items = [JudgeItem(*item) for item in items]
    # a judge's `cache_name` (evaluation.judging) covers its options and model; else its name
    cache_name = getattr(judge, "cache_name", judge.name)
    # a judge that `sees_prefill` (the keyword judge) gets (prompt, response, prefill) for a
    # prefilled item, and its verdict is cached under the prefill's length too
    aware = getattr(judge, "sees_prefill", False)

    def args(it):
        return (it.prompt, it.response, it.prefill) if aware and it.prefill else \
            (it.prompt, it.response)

    keys = [judgment_key(it.benchmark, it.id, it.prompt, it.response,
                         f"{cache_name}#prefill:{len(it.prefill)}" if aware and it.prefill
                         else cache_name) for it in items]
    todo = [i for i, key in enumerate(keys) if _needs_judging(cache.get(key))]
    if todo:
        log.info("%s: judging %d of %d item(s), the rest cached", judge.name, len(todo), len(items))
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        verdicts = judge.judge_batch([args(items[i]) for i in chunk])
        for i, verdict in zip(chunk, verdicts, strict=True):
            cache.put(keys[i], verdict)
        cache.flush()
    return [
        {"benchmark": it.benchmark, "id": it.id, **cache.get(key)} for it, key in zip(items, keys)
    ]
