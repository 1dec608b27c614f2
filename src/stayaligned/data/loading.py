"""Read raw records from local files or the Hugging Face Hub and turn them into `Example`s.

Supported local formats, chosen by file extension:

* ``.json``    a list of objects; record ids are ``"name[i]"`` (0-based list index)
* ``.jsonl``   one object per line; ids are ``"name:line"`` (1-based line number)
* ``.csv``     header row plus data rows; ids are ``"name:line"`` (line where the row starts)
* ``.txt``     one prompt per line, blank lines skipped; each becomes ``{"prompt": line}``
* ``.parquet`` a table; ids are ``"name[i]"`` (0-based row index)

Records in TRL's dataset formats (``messages``; ``prompt``/``completion`` as text or as message
lists) are read as such when they lack the mapped fields (data/trl_formats.py), so no
``fields:`` mapping is needed for them. Hub rows get ids ``"owner/dataset:split[i]"``. `read_category_csv` reads the other layout some
benchmarks ship in (HEx-PHI): one header-less CSV per category, one prompt a row.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from stayaligned.data import trl_formats
from stayaligned.data.types import DataError, Example

SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet")


@dataclass(frozen=True)
class Fields:
    """How to map a raw record's fields to chat messages.

    `user` names one or more fields joined with a blank line (empty ones skipped), e.g. Alpaca's
    ``("instruction", "input")``. `assistant` is None for prompt-only sets. `system` names a
    field holding a per-record system message; `system_prompt` is a fixed one, used when the
    record has no system text of its own. `meta` fields are copied into `Example.meta`;
    `category` names the field copied into ``meta["category"]``, which evaluation breaks its
    metrics down by (e.g. XSTest's ``type``, CatQA's ``Category``).
    """

    user: tuple[str, ...] = ("instruction",)
    assistant: str | None = "output"
    system: str | None = None
    system_prompt: str | None = None
    user_prefix: str = ""
    meta: tuple[str, ...] = ()
    category: str | None = None

    def __post_init__(self) -> None:
        # A bare string is the commonest slip (Fields(user="prompt")); accept it rather than
        # iterating over its characters.
        if isinstance(self.user, str):
            object.__setattr__(self, "user", (self.user,))
        if isinstance(self.meta, str):
            object.__setattr__(self, "meta", (self.meta,))
        if not self.user:
            raise DataError("Fields.user is empty: name at least one field holding the prompt.")


def with_overrides(base: Fields, overrides: dict | None, where: str) -> Fields:
    """`base` with the keys of a config's ``fields:`` mapping replaced (lists become tuples)."""
    overrides = dict(overrides or {})
    for key in ("user", "meta"):
        if isinstance(overrides.get(key), str):
            overrides[key] = (overrides[key],)
        elif key in overrides:
            overrides[key] = tuple(overrides[key])
    try:
        return replace(base, **overrides)
    except TypeError:
        valid = ", ".join(base.__dataclass_fields__)
        raise DataError(f"{where}: fields {sorted(overrides)}: valid field keys are {valid}")


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """Read a local file into ``(record_id, record)`` pairs, choosing the format by extension."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the path (relative paths are resolved "
                        f"from {Path.cwd()}).")
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv,
               ".txt": _read_txt, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'. Use one of "
                        f"{', '.join(SUFFIXES)}.")
    try:
        return reader(path)
    except UnicodeDecodeError:
        raise DataError(_encoding_error(path)) from None


def _encoding_error(path: Path) -> str:
    """Where a file stops being UTF-8: its line and byte (a reader's own offset is relative
    to a buffer, not the file)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        hint = " It looks like UTF-16;" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        return (f"{path}:{line}: not valid UTF-8 ({error.reason} at byte {error.start}).{hint} "
                "Re-save the file as UTF-8.")
    return f"{path}: not valid UTF-8 text. Re-save the file as UTF-8."


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column "
                        f"{error.colno}). Fix the file or convert it to JSONL.") from error
    if isinstance(data, dict):
        keys = ", ".join(repr(key) for key in list(data)[:10])
        raise DataError(f"{path}: the top level is an object with keys {keys}, but a list of "
                        "records is expected. Save the list itself (e.g. the value under "
                        "'data' or 'train') as the file's content, or convert it to JSONL.")
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level is a {type(data).__name__}; expected a list of "
                        "records (JSON objects).")
    records = []
    for index, record in enumerate(data):
        _check_object(record, f"{path.name}[{index}]", path)
        records.append((f"{path.name}[{index}]", record))
    return records


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                # without its line ending, so an error at the end of the line is not
                # reported at column 1 of a next line
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg} at column "
                                f"{error.pos + 1}). Each line of a .jsonl file must be one "
                                "complete JSON object.") from error
            _check_object(record, f"{path.name}:{line_number}", path)
            records.append((f"{path.name}:{line_number}", record))
    return records


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:  # reading the header now makes line_num point past it
            return []
        row_start = reader.line_num + 1
        for row in reader:
            # line_num counts physical lines, so quoted multi-line cells are handled: a row
            # starts just after the line where the previous one ended.
            record_id = f"{path.name}:{row_start}"
            if None in row:
                raise DataError(f"{path}:{row_start}: the row has more cells than the header "
                                f"({len(reader.fieldnames)} columns). Quote cells that "
                                "contain commas.")
            records.append((record_id, row))
            row_start = reader.line_num + 1
    return records


def _read_txt(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if text:
                records.append((f"{path.name}:{line_number}", {"prompt": text}))
    return records


def read_category_csv(path: Path, category: str,
                      field: str = "instruction") -> list[tuple[str, dict]]:
    """Records ``{field: prompt, "category": category}`` from a header-less CSV of prompts.

    Each row is one prompt; a row that CSV splits at unquoted commas is joined back with ",",
    so a prompt containing commas survives with or without quotes. Ids are ``"name:line"``.
    """
    records = []
    with Path(path).open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        row_start = 1
        for row in reader:
            text = ",".join(row).strip()
            if text:
                record = {field: text, "category": category}
                records.append((f"{Path(path).name}:{row_start}", record))
            row_start = reader.line_num + 1
    return records


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            rows = pq.read_table(path).to_pylist()
        else:
            import datasets

            rows = list(datasets.Dataset.from_parquet(str(path)))
    except ImportError as error:
        raise DataError(f"{path}: reading Parquet needs pyarrow or datasets; install one "
                        "(pip install pyarrow).") from error
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
    return [(f"{path.name}[{index}]", row) for index, row in enumerate(rows)]


def _check_object(record: object, record_id: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{record_id}: expected a JSON object, got {type(record).__name__} "
                        f"({_preview(record)}). Every record in {path.name} must be an object "
                        "with named fields.")


def to_example(record_id: str, record: dict, fields: Fields) -> Example:
    """Build an `Example` from one raw record according to `fields`, or from its TRL format
    (``messages``, ``prompt``/``completion``) when it has none of the mapped user fields."""
    fmt = None if any(name in record for name in fields.user) else trl_formats.detect(record)
    if fmt is not None:
        return _trl_example(record_id, record, fields, fmt)
    messages = []
    system = _system_text(record_id, record, fields)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": fields.user_prefix + _user_text(
        record_id, record, fields)})
    if fields.assistant is not None:
        answer = _field(record_id, record, fields.assistant, "assistant")
        _require_text(record_id, fields.assistant, answer, "assistant")
        messages.append({"role": "assistant", "content": answer})
    meta = {name: _field(record_id, record, name, "meta") for name in fields.meta}
    if fields.category is not None:
        meta["category"] = _field(record_id, record, fields.category, "category")
    return Example(id=record_id, messages=tuple(messages), meta=meta)


def _trl_example(record_id: str, record: dict, fields: Fields, fmt: str) -> Example:
    messages = trl_formats.to_messages(record_id, record, fmt)
    trl_formats.check_order(record_id, messages)
    if messages[0]["role"] != "system" and fields.system_prompt:
        messages.insert(0, {"role": "system", "content": fields.system_prompt})
    if fields.user_prefix:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {**messages[first],
                           "content": fields.user_prefix + messages[first]["content"]}
    meta = {name: _field(record_id, record, name, "meta") for name in fields.meta}
    if fields.category is not None:
        meta["category"] = _field(record_id, record, fields.category, "category")
    return Example(id=record_id, messages=tuple(messages), meta=meta)


def _user_text(record_id: str, record: dict, fields: Fields) -> str:
    parts = []
    for name in fields.user:
        value = _field(record_id, record, name, "user")
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            _require_text(record_id, name, value, "user")
        if value.strip():
            parts.append(value)
    if not parts:
        names = " and ".join(f"'{name}'" for name in fields.user)
        raise DataError(f"{record_id}: the user message is empty (field {names} holds no "
                        "text). Remove the record or set fields.user to the prompt field.")
    return "\n\n".join(parts)


def _system_text(record_id: str, record: dict, fields: Fields) -> str | None:
    if fields.system is not None:
        value = _field(record_id, record, fields.system, "system")
        if value not in (None, ""):
            _require_text(record_id, fields.system, value, "system")
            return value
    return fields.system_prompt


def _field(record_id: str, record: dict, name: str, attribute: str) -> object:
    if name not in record:
        available = ", ".join(str(key) for key in record) or "(none)"
        raise DataError(f"{record_id}: field '{name}' is missing; the record has fields: "
                        f"{available}. Set fields.{attribute} to one of them"
                        + (_TRL_HINT + trl_formats.unsupported_hint(record)
                           if attribute == "user" else "."))
    return record[name]


_TRL_HINT = ", or use TRL's 'messages' or 'prompt'/'completion' keys."


def _require_text(record_id: str, name: str, value: object, attribute: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{record_id}: field '{name}' must be text, got "
                        f"{type(value).__name__} ({_preview(value)}). Set fields.{attribute} "
                        "to a text field.")
    if not value.strip():
        raise DataError(f"{record_id}: field '{name}' is empty. Remove the record or fill in "
                        "the field.")


def _preview(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def load_examples(source: str | Path, fields: Fields, *, split: str = "train",
                  limit: int | None = None, seed: int = 0, hub_config: str | None = None,
                  data_dir: str | Path | None = None) -> list[Example]:
    """Load `Example`s from a local file or, when no such file exists, a Hugging Face Hub id.

    A relative `source` is also looked up under `data_dir`. `limit` keeps a deterministic
    random subset (by `seed`) in the original order.
    """
    path = local_path(source, data_dir)
    if path is not None:
        records = read_records(path)
        where = str(path)
    elif Path(str(source)).suffix.lower() in SUFFIXES:
        # A file name that does not exist is a typo or a missing download, not a Hub id.
        searched = f" or {Path(data_dir) / str(source)}" if data_dir is not None else ""
        raise DataError(f"{source}{searched}: file not found. Check the path, or pass data_dir "
                        "pointing at the folder that holds it.")
    else:
        records = _hub_records(str(source), hub_config, split, data_dir)
        where = f"{source} (split {split})"
    return examples_from_records(records, fields, where, limit=limit, seed=seed)


def examples_from_records(records: list[tuple[str, dict]], fields: Fields, where: str, *,
                          limit: int | None = None, seed: int = 0) -> list[Example]:
    """`Example`s from ``(record_id, record)`` pairs read from `where`, subsampled by `limit`."""
    if not records:
        raise DataError(f"{where}: no records found. Check that this is the intended file or "
                        "split.")
    records = subset(records, limit, seed)
    return [to_example(record_id, record, fields) for record_id, record in records]


def local_path(source: str | Path, data_dir: str | Path | None) -> Path | None:
    """The local file `source` names, as given or under `data_dir` (relative names), or None."""
    candidates = [Path(source)]
    if data_dir is not None and not Path(source).is_absolute():
        candidates.append(Path(data_dir) / source)
    return next((path for path in candidates if path.is_file()), None)


def _hub_records(source: str, config: str | None, split: str,
                 data_dir: str | Path | None) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"{source}: not a local file, and loading it from the Hugging Face Hub "
                        "needs the 'datasets' package (pip install datasets).") from error
    try:
        table = datasets.load_dataset(source, config, split=split)
        rows = [dict(row) for row in table]
    except Exception as error:  # network, auth, missing config/split: all surface the same way
        local = f" or put a copy in data_dir ({data_dir})" if data_dir is not None else \
            " or pass data_dir pointing at a folder with a local copy"
        raise DataError(
            f"{source}: not a local file, and the Hugging Face Hub could not provide it "
            f"(config {config!r}, split {split!r}): {type(error).__name__}: {error}. "
            f"If you are offline or the dataset is gated, download it and pass a local file "
            f"path{local}.") from error
    return [(f"{source}:{split}[{index}]", row) for index, row in enumerate(rows)]


def subset(records: list, limit: int | None, seed: int) -> list:
    """A deterministic random subset of `limit` items (by `seed`), in the original order."""
    if limit is None:
        return records
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"limit={limit!r}: must be a non-negative integer or None.")
    if limit >= len(records):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[index] for index in chosen]
