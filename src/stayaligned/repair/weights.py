"""Where a repair's tensors come from and where they go: lazy safetensors reading, one tensor at
a time, so that a repair holds one output shard plus a few input tensors in memory, never a
whole model.

A model input is one of: a stayaligned run directory (merged/, model/ or adapter/ inside; its
run.json must say complete; a LoRA run's adapter/ is read before its merged/ copy), a PEFT adapter directory (its weights are the aligned model's plus
scale * B @ A on each adapted layer, in float32, and scale * lora_B.bias on the bias with
lora_bias, as PEFT merges; its module names are matched to the checkpoint's tensor names
through repair.names where transformers saves them otherwise, as for Gemma 3), a directory of full weights, ``embedded``, or a Hub id (downloaded
with huggingface_hub).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stayaligned.runfiles import file_sha256, read_json, write_json

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                "merges.txt", "added_tokens.json")
PREFIX = "base_model.model."


class RepairError(ValueError):
    """A repair input problem; the message names the file or tensor and the fix."""


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class TensorSource:
    """The tensors of a safetensors model directory (one file or an indexed set of shards),
    read lazily by name with plain file reads (not a memory map, so tensors already used do
    not stay resident)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = read_json(self.path / "model.safetensors.index.json")
        if index:
            files = sorted(set(index["weight_map"].values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise RepairError(f"{self.path}: no model.safetensors (or index): repairs read "
                              "safetensors weights only; re-save the model with safe_serialization")
        self.headers = {}
        for f in files:
            try:
                self.headers[f] = read_header(self.path / f)
            except (OSError, ValueError) as err:
                raise RepairError(f"{self.path / f}: not a readable safetensors file ({err})") from None
        self.shards = [(f, sorted(h, key=lambda n, h=h: h[n]["data_offsets"][0]))
                       for f, (_, h) in self.headers.items()]
        self.where = {name: f for f, names in self.shards for name in names}

    @property
    def names(self) -> list[str]:
        return [name for _, names in self.shards for name in names]

    def entry(self, name: str) -> dict:
        return self.headers[self.where[name]][1][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entry(name)["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        filename = self.where[name]
        start, header = self.headers[filename]
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with open(self.path / filename, "rb") as handle:
            handle.seek(start + begin)
            buffer = bytearray(handle.read(end - begin))
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def files(self) -> list[Path]:
        return [self.path / f for f in self.headers]


class LoraSource:
    """A fine-tune given as a LoRA adapter over `base`: each adapted weight is
    base + scale * B @ A, kept in float32 (the repair math starts from the exact sum, not from
    its rounding to the base dtype; the output is stored in the aligned dtype when written);
    with `lora_bias`, each adapted layer's bias is base + scale * lora_B.bias, as PEFT merges
    it; every other tensor is the base's."""

    def __init__(self, base: TensorSource, adapter_dir: Path):
        from safetensors import safe_open

        self.base, self.adapter_dir = base, Path(adapter_dir)
        self.config = adapter_config(self.adapter_dir)
        handle = safe_open(str(self.adapter_dir / "adapter_model.safetensors"), framework="pt")
        self.lora = {k: handle.get_tensor(k) for k in handle.keys()}
        self.modules, self.biases = lora_modules(self.lora, self.adapter_dir,
                                                 bool(self.config.get("lora_bias")))
        self.peft_names = self._checkpoint_modules(base)
        missing = [m for m in self.modules if f"{m}.weight" not in base.where]
        if missing:
            raise RepairError(f"{self.adapter_dir}: adapted layer {missing[0]} has no weight "
                              f"{missing[0]}.weight in {base.path}; the adapter belongs to another "
                              "architecture than the aligned model")
        no_bias = [m for m in self.biases if f"{m}.bias" not in base.where]
        if no_bias:
            raise RepairError(f"{self.adapter_dir}: {self.biases[no_bias[0]]} (lora_bias) adapts "
                              f"the bias of {no_bias[0]}, but {base.path} has no tensor "
                              f"{no_bias[0]}.bias; the adapter belongs to another model")
        self.shards, self.where, self.path = base.shards, base.where, self.adapter_dir

    def _checkpoint_modules(self, base: TensorSource) -> dict[str, str]:
        """Key the adapted modules by their names in `base`'s checkpoint (where transformers
        saves a weight under another name than its module's, see repair.names); returns
        {checkpoint module name -> PEFT's module name} (PEFT's patterns match the latter)."""
        from stayaligned.repair.names import saved_names

        unknown = [f"{m}.weight" for m in self.modules if f"{m}.weight" not in base.where]
        saved = saved_names(base.path, unknown) if unknown else {}
        renamed = {w[: -len(".weight")]: s[: -len(".weight")] for w, s in saved.items()
                   if s in base.where and s.endswith(".weight")}
        peft_names = {renamed.get(m, m): m for m in self.modules}
        self.modules = {renamed.get(m, m): keys for m, keys in self.modules.items()}
        self.biases = {renamed.get(m, m): key for m, key in self.biases.items()}
        return peft_names

    @property
    def names(self) -> list[str]:
        return self.base.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def scale(self, module: str) -> float:
        """alpha / r (alpha / √r with rsLoRA), as PEFT computes it: r is the layer's own rank
        (lora_A's rows, which follow rank_pattern), alpha comes from alpha_pattern matched with
        PEFT's own regex rule (a key matches a module name ending in it, or a full-name regex)."""
        from peft.utils.other import get_pattern_key

        cfg = self.config
        r = self.lora[self.modules[module][0]].shape[0]
        pattern = cfg.get("alpha_pattern") or {}
        peft_name = self.peft_names.get(module, module)
        alpha = pattern.get(get_pattern_key(list(pattern), peft_name), cfg["lora_alpha"])
        return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.lora_pair(module)
        return self.scale(module) * (b.float() @ a.float())

    def lora_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.modules[module]
        return self.lora[keys[0]], self.lora[keys[1]]

    def get(self, name: str) -> torch.Tensor:
        base = self.base.get(name)
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module in self.modules:
            return base.float() + self.delta(module)
        if kind == "bias" and module in self.biases:
            return base.float() + self.scale(module) * self.lora[self.biases[module]].float()
        return base

    def files(self) -> list[Path]:
        return [self.adapter_dir / "adapter_model.safetensors", self.adapter_dir / "adapter_config.json"]


def adapter_config(adapter_dir: Path) -> dict:
    cfg = read_json(Path(adapter_dir) / "adapter_config.json")
    if cfg is None:
        raise RepairError(f"{adapter_dir}: no adapter_config.json")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if cfg.get(key):
            raise RepairError(f"{adapter_dir}/adapter_config.json: {what} is not supported by "
                              "repairs; merge the adapter into full weights first")
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise RepairError(f"{adapter_dir}: no adapter_model.safetensors (repairs read safetensors)")
    return cfg


LORA_KEYS = (".lora_A.weight", ".lora_B.weight")


def lora_modules(lora: dict, where: Path, lora_bias: bool = False
                 ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """({module name (as in the model's state dict) -> (lora_A key, lora_B key)},
    {module name -> lora_B bias key}); any other adapter tensor is an error."""
    modules: dict[str, tuple[str, str]] = {}
    biases: dict[str, str] = {}
    for key in lora:
        if lora_bias and key.endswith(".lora_B.bias"):
            biases[_module_of(key, ".lora_B.bias")] = key
            continue
        if key.endswith(LORA_KEYS[1]):
            continue
        if not key.endswith(LORA_KEYS[0]):
            hint = (" (set lora_bias: true in adapter_config.json if it was trained with it)"
                    if key.endswith(".lora_B.bias") else
                    " (modules_to_save, embedding LoRA and other extras are not supported; "
                    "merge the adapter into full weights first)")
            raise RepairError(f"{where}/adapter_model.safetensors: adapter tensor {key} is not a "
                              f"lora_A or lora_B weight{hint}")
        b_key = key[: -len(LORA_KEYS[0])] + LORA_KEYS[1]
        if b_key not in lora:
            raise RepairError(f"{where}: {key} has no matching lora_B tensor")
        modules[_module_of(key, LORA_KEYS[0])] = (key, b_key)
    orphan = [k for k in biases if k not in modules]
    if orphan:
        raise RepairError(f"{where}: {biases[orphan[0]]} has no matching lora_A/lora_B weights")
    return modules, biases


def _module_of(key: str, suffix: str) -> str:
    module = key[: -len(suffix)]
    return module[len(PREFIX):] if module.startswith(PREFIX) else module


# ---------------------------------------------------------------- resolving inputs


@dataclass
class ModelInput:
    """One resolved model: its tensors, the directory its config and tokenizer come from, and
    what it was given as."""

    name: str
    kind: str  # full | lora
    source: object  # TensorSource or LoraSource
    config_dir: Path
    adapter_dir: Path | None = None
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    def describe(self, hashes: bool = True) -> dict:
        entry = {"name": self.name, "kind": self.kind, "path": str(self.source.path)}
        if hashes:
            entry["sha256"] = {str(p): file_sha256(p) for p in self.source.files() if p.is_file()}
        return entry


def model_dir(name: str) -> Path:
    """A local directory for `name`: embedded, a path, or a Hub id (downloaded)."""
    if name == "embedded":
        from stayaligned.config import ModelConfig
        from stayaligned.models import embedded_dir

        return embedded_dir(ModelConfig())
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise RepairError(f"model {name!r}: no such directory, and not a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json", "*.jinja",
                                                            "tokenizer*", "*.txt", "*.model"]))
    except Exception as err:  # noqa: BLE001 - any download failure becomes one line
        raise RepairError(f"model {name!r}: not a local directory and the Hub download failed "
                          f"({type(err).__name__}); pass a local path") from None


def open_model(name: str, aligned: TensorSource | None = None) -> ModelInput:
    """Resolve `name` into its tensors; a LoRA adapter is read over `aligned`."""
    path = model_dir(name)
    run_dir = path if (path / "run.json").is_file() else None
    status = (read_json(path / "run.json") or {}).get("status") if run_dir else None
    if status not in (None, "complete"):
        raise RepairError(f"{path / 'run.json'}: status {status!r}, not a finished run (still "
                          "training, killed or failed); let it finish (rerun its command to "
                          "resume), or pass the weights directory inside it if you mean those")
    adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    # a LoRA run that also wrote merged/ (train.merge) is read as its adapter over `aligned`:
    # the float32 update itself (SafeLoRA projects its B, as the paper does), not a merged
    # copy rounded to the weights' dtype, where any difference between the run's base and
    # `aligned` would pass for fine-tuning
    lora_first = aligned is not None and (adapter / "adapter_config.json").is_file()
    for sub in () if lora_first else ("merged", "model"):
        if (path / sub / "config.json").is_file():
            return ModelInput(name, "full", TensorSource(path / sub), path / sub, run_dir=run_dir)
    if (adapter / "adapter_config.json").is_file():
        if aligned is None:
            raise RepairError(f"{name} is a LoRA adapter: it can only be read over the aligned "
                              "model (pass --aligned)")
        return ModelInput(name, "lora", LoraSource(aligned, adapter), aligned.path,
                          adapter_dir=adapter, run_dir=run_dir)
    if (path / "config.json").is_file():
        return ModelInput(name, "full", TensorSource(path), path, run_dir=run_dir)
    raise RepairError(f"{path} holds no model: expected config.json with safetensors, an "
                      "adapter_config.json, or a stayaligned run directory")


def check_compatible(reference: ModelInput, other: ModelInput, label: str, ref_label: str) -> None:
    """Same architecture and the same tensor names and shapes; the error names the first
    mismatching tensor."""
    a, b = read_json(reference.config_dir / "config.json") or {}, read_json(other.config_dir / "config.json") or {}
    for key in ("model_type", "architectures"):
        if a.get(key) != b.get(key):
            raise RepairError(f"{label} ({other.name}) is a {b.get(key)} but the {ref_label} "
                              f"({reference.name}) is a {a.get(key)} (config.json {key}); a "
                              "repair needs models of one architecture")
    ours, theirs = reference.source, other.source
    for name in ours.names:
        if name not in theirs.where:
            raise RepairError(f"{label} ({other.name}) has no tensor {name}, which the "
                              f"{ref_label} ({reference.name}) has; a repair needs the same "
                              "architecture")
        if ours.shape(name) != theirs.shape(name):
            raise RepairError(f"tensor {name}: shape {list(theirs.shape(name))} in the {label} "
                              f"({other.name}) but {list(ours.shape(name))} in the {ref_label} "
                              f"({reference.name}); a repair needs the same architecture")
    extra = [n for n in theirs.names if n not in ours.where]
    if extra:
        raise RepairError(f"{label} ({other.name}) has tensor {extra[0]}, which the {ref_label} "
                          f"({reference.name}) lacks; a repair needs the same architecture")


# ---------------------------------------------------------------- writing outputs


class Streamed:
    """One output shard computed tensor by tensor: its names, safetensors dtypes and shapes are
    known up front, so the file is written as each tensor is computed."""

    def __init__(self, entries: list[tuple[str, str, tuple]], compute):
        self.entries, self.compute = entries, compute

    def items(self):
        for name, _, _ in self.entries:
            yield name, self.compute(name)


def write_streamed(path: Path, shard: Streamed) -> None:
    """A safetensors file written tensor by tensor (header first: 8-byte length, JSON padded
    to 8 bytes, then the data in order), atomically."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, code, shape in shard.entries:
        size = DTYPES[code].itemsize * int(torch.tensor(shape).prod()) if shape else DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for (name, code, shape), (_, tensor) in zip(shard.entries, shard.items()):
            tensor = tensor.to(DTYPES[code]).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise RepairError(f"tensor {name}: computed shape {list(tensor.shape)}, "
                                  f"expected {list(shape)}")
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy())  # no extra copy
    tmp.replace(path)


def save_shards(shards, out: Path) -> None:
    """Write (file name, tensors) pairs as safetensors, each atomically: a Streamed shard tensor
    by tensor, a dict in one go."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for filename, tensors in shards:
        if isinstance(tensors, Streamed):
            write_streamed(out / filename, tensors)
            continue
        tmp = out / f".{filename}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / filename)


def copy_side_files(source_dirs: list[Path], out: Path, names=COPIED_FILES) -> None:
    """Config files: each from the first directory that has it."""
    for name in names:
        for directory in source_dirs:
            if directory is not None and (Path(directory) / name).is_file():
                shutil.copyfile(Path(directory) / name, out / name)
                break


def copy_tokenizer(source_dirs: list[Path], out: Path, names) -> None:
    """The tokenizer files as one set, from the first directory that has tokenizer_config.json
    (mixing directories could pair one model's tokenizer_config.json with another's
    chat_template.jinja, which wins on load); file by file only when none has one."""
    dirs = [Path(d) for d in source_dirs if d is not None]
    home = next((d for d in dirs if (d / "tokenizer_config.json").is_file()), None)
    copy_side_files([home] if home else dirs, out, names)


def write_index(like: TensorSource, out: Path) -> None:
    index = read_json(like.path / "model.safetensors.index.json")
    if index:
        write_json(out / "model.safetensors.index.json", index)


def adapter_files_config(cfg: dict, base: str) -> str:
    return json.dumps({**cfg, "base_model_name_or_path": base}, indent=2) + "\n"
