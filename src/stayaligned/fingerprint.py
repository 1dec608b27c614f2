"""Stage fingerprints: what produced a stage's files, and the one check that a rerun may reuse them.

Every stage that can be resumed or skipped (training's run.json, an evaluation's stage files,
a study's depth.json) records a fingerprint: a plain dict of what its result depends on (the
configuration, the model's identity, the benchmark items, the rendered template, the judge).
Before reusing anything, the stage compares the stored fingerprint with the one it would
write now; any difference is a `StaleError` naming the differing keys, never a silent reuse.

Compatibility: a key missing from an older fingerprint counts as unchanged when its new value
is the key's default (passed in `defaults`), so a config key added later, with a default that
reproduces the old behaviour, does not invalidate the runs made before it.

A key that older fingerprints lack and whose value cannot be known for them (a Hub model's
commit) is given `ADDED_LATER` in `defaults`: absent from the stored fingerprint, or stored as
None (not known then), it counts as unchanged whatever its new value.

The model identity is cheap by design: the resolved path or Hub id, each weight file's size,
the sha256 of the small files (configs, tokenizer, a LoRA adapter) and of each safetensors
header (tensor names, shapes, dtypes, offsets); multi-GB weights are never read in full. A Hub
model's identity carries the commit a load would use now (`hub_commit`), so a repository
updated on the Hub (new weights, a fixed chat template) is a different model, never a reuse of
files made from the old one.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from stayaligned.config import ConfigError

SMALL_FILE = 64 << 20  # files up to this size are hashed in full (configs, tokenizers, adapters)
_MISSING = object()


class _AddedLater:
    def __repr__(self) -> str:
        return "ADDED_LATER"


ADDED_LATER = _AddedLater()  # in `defaults`: a key (or dict) older fingerprints could not record


class StaleError(ConfigError):
    """Stored stage files were made by a different configuration, model or data."""


def flatten(value, prefix: str = "") -> dict:
    """Nested dicts as one dict of dotted keys (lists stay values).

    >>> flatten({"optim": {"lr": 0.1, "epochs": 1}, "seed": 0})
    {'optim.lr': 0.1, 'optim.epochs': 1, 'seed': 0}
    """
    if not isinstance(value, dict) or (prefix and not value):
        return {prefix: value}
    out: dict = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two fingerprints; a key absent from `old` whose
    new value equals its value in `defaults` is not a difference, nor is a key that `defaults`
    marks `ADDED_LATER` (itself or a dict above it) while `old` lacks it or holds None.

    >>> differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 5}, {"d": 5})
    ['b.c']
    >>> differences({"a": 1, "g": None}, {"a": 1, "e": {"f": 2}, "g": 3},
    ...             {"e": ADDED_LATER, "g": ADDED_LATER})
    []
    """
    flat_old, flat_new = flatten(old), flatten(new)
    flat_defaults = flatten(defaults or {})
    later = [k for k, v in flat_defaults.items() if v is ADDED_LATER]
    changed = []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
        if before is _MISSING and after == flat_defaults.get(key, _MISSING):
            continue
        if before in (_MISSING, None) and any(key == k or key.startswith(k + ".") for k in later):
            continue
        if _normal(before) != _normal(after):
            changed.append(key)
    return changed


def _normal(value):
    """Tuples and lists compare equal (JSON has only lists)."""
    return json.loads(json.dumps(value, default=str)) if value is not _MISSING else value


def check_same(what: str, old: dict | None, new: dict, defaults: dict | None = None,
               fix: str = "pass --overwrite to recompute it, or choose another output_dir") -> None:
    """Raise `StaleError` if `old` (None: nothing stored) differs from `new`. A Hub model's
    commit (`base.commit` of a model identity under `model` or `reference`) is checked only
    where `old` recorded it."""
    if old is None:
        return
    hub_commit_later = {"base": {"commit": ADDED_LATER}}
    defaults = {"model": hub_commit_later, "reference": hub_commit_later, **(defaults or {})}
    changed = differences(old, new, defaults)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise StaleError(f"{what} was made with a different setup (changed: {shown}); {fix}")


# ---------------------------------------------------------------- model identity


def model_identity(name: str, revision: str | None = None, gguf_file: str | None = None) -> dict:
    """{"name", "base": {"path", "files"} or {"hub", ...}, "adapter": {...}} for a model name as
    `models.resolve` understands it; cheap (see the module docstring)."""
    from stayaligned.config import ModelConfig
    from stayaligned.models import resolve

    base, gguf, adapter = resolve(ModelConfig(name=name, revision=revision, gguf_file=gguf_file))
    identity: dict = {"name": name}
    if Path(base).exists():
        identity["base"] = {"path": str(Path(base).resolve()), "files": folder_digest(Path(base), gguf)}
    else:
        identity["base"] = {"hub": base, "revision": revision, "gguf_file": gguf,
                            "commit": hub_commit(base, revision, gguf)}
    if adapter is not None:
        identity["adapter"] = {"path": str(adapter.resolve()), "files": folder_digest(adapter)}
    return identity


def hub_commit(repo: str, revision: str | None = None, filename: str | None = None) -> str | None:
    """The commit of Hub repository `repo` at `revision` (default branch: None) that loading it
    would use now: a 40-hex revision as given; else the Hub's answer, as from_pretrained asks it
    unless offline; else (offline, or the Hub did not answer) the commit of the snapshot in the
    local cache; None where neither knows (not downloaded yet, offline)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from stayaligned.validate import hub_offline

    if not hub_offline():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo, revision=revision, timeout=20).sha
        except Exception:  # noqa: BLE001 - no answer: from_pretrained falls back to the cache too
            pass
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename or "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is not in any cache
        return None
    if not isinstance(found, str):
        return None
    match = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", found)
    return match.group(1) if match else None


def run_record(name: str) -> dict | None:
    """{"file", "sha256"} of the record stayaligned wrote with a model it made (repair.json of
    a repair, run.json of a training run), or None for any other model name. A model remade in
    the same directory has another record while its weights file may keep the same size and
    safetensors header (all that `model_identity` looks at in large files)."""
    from stayaligned.runfiles import file_sha256

    for file in ("repair.json", "run.json"):
        path = Path(name) / file
        if path.is_file():
            return {"file": file, "sha256": file_sha256(path)}
    return None


def folder_digest(folder: Path, only: str | None = None) -> dict:
    """relative file name -> "sha256:..." (small files, safetensors headers) or "size:N"."""
    out = {}
    files = [folder / only] if only else sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        if path.name.startswith("."):
            continue
        size = path.stat().st_size
        if size <= SMALL_FILE:
            out[path.name] = "sha256:" + _sha256(path.read_bytes())
        elif path.suffix == ".safetensors":
            out[path.name] = f"size:{size} header:" + _sha256(_safetensors_header(path))
        else:
            out[path.name] = f"size:{size}"
    return out


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(min(length, 100 << 20))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(value) -> str:
    """sha256 of `value` as sorted JSON (what a cache or a fingerprint keys on)."""
    return _sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode())


def made_identity(name: str, revision: str | None = None, gguf_file: str | None = None) -> dict:
    """`model_identity`, plus `record` (see `run_record`) for a model that stayaligned made."""
    identity = model_identity(name, revision, gguf_file)
    record = run_record(name)  # a stayaligned run or repair remade in place differs here
    if record is not None:
        identity["record"] = record
    return identity


def items_digest(examples) -> str:
    """sha256 of a list of examples' ids, messages and meta (what a benchmark asks)."""
    return json_digest([[ex.id, list(ex.messages), ex.meta] for ex in examples])
