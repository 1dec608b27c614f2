"""The repair protocol: `prepare(inputs) -> state` once, then `apply(state, strength) ->
weights` per candidate strength, and `save(weights, out)`.

`Weights` is lazy: iterating `shards` computes one output shard at a time (or, for an adapter,
the adapter's tensors), so the sweep never holds two models. Every repair names its knob and
says which way it is stronger, so the sweep can order candidates from weakest to strongest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from stayaligned.config import RepairConfig
from stayaligned.repair.weights import (
    CODES,
    COPIED_FILES,
    ModelInput,
    RepairError,
    Streamed,
    TensorSource,
    copy_side_files,
    copy_tokenizer,
    save_shards,
    write_index,
)
from stayaligned.runfiles import atomic_write, recorded_templates, write_json


@dataclass
class RepairInputs:
    """The resolved models of one repair (base and unaligned only where the method needs them)."""

    finetune: ModelInput
    aligned: ModelInput
    base: ModelInput | None = None
    unaligned: ModelInput | None = None
    config: RepairConfig = field(default_factory=RepairConfig)
    work_dir: Path = Path("runs/repair/.work")
    warnings: list[str] = field(default_factory=list)  # said in the log and repair.json


@dataclass
class Weights:
    """A repaired model, computed lazily shard by shard.

    kind "full": `shards()` yields (file name, {tensor name: tensor}) in the aligned model's
    layout; kind "adapter": a LoRA adapter (`adapter_config` is its config)."""

    kind: str
    shards: Callable[[], Iterator[tuple[str, dict[str, torch.Tensor]]]]
    like: TensorSource
    side_dirs: list[Path]
    templates: dict | None = None
    adapter_config: dict | None = None
    info: dict = field(default_factory=dict)


class Repair:
    """Base class: a knob, its defaults, and the two steps."""

    name = "repair"
    knob = "strength"
    stronger = 1  # +1: a larger value repairs more; -1: a smaller one does
    defaults: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    default: float = 0.5
    # the knob value at which the repair gives back the aligned model itself (the fine-tune
    # discarded), None where no value does
    reverts_at: float | None = None

    def __init__(self, cfg: RepairConfig):
        self.cfg = cfg

    def prepare(self, inputs: RepairInputs) -> dict:
        return {"inputs": inputs}

    def apply(self, state: dict, strength: float) -> Weights:
        raise NotImplementedError

    def order(self, strengths) -> list[float]:
        """From the weakest repair to the strongest."""
        return sorted(set(float(s) for s in strengths), key=lambda s: self.stronger * s)


def full_weights(inputs: RepairInputs, tensor: Callable[[str], torch.Tensor], info=None) -> Weights:
    """Full weights in the aligned model's shard layout, each tensor computed by `tensor(name)`
    (in float32) and stored in the aligned model's dtype as it is computed; tensors that are
    not floating point are the fine-tune's."""
    like = inputs.aligned.source
    ft = inputs.finetune.source

    def compute(name):
        return tensor(name) if like.dtype(name).is_floating_point else ft.get(name)

    def shards():
        for filename, names in like.shards:
            entries = [(n, CODES[like.dtype(n)], like.shape(n)) for n in names]
            yield filename, Streamed(entries, compute)

    return Weights("full", shards, like, side_dirs(inputs), templates(inputs), info=info or {})


def side_dirs(inputs: RepairInputs) -> list[Path]:
    """Config from the aligned model; tokenizer from the fine-tune where it has one."""
    ft = inputs.finetune
    return [ft.adapter_dir or ft.config_dir, inputs.aligned.config_dir]


def templates(inputs: RepairInputs) -> dict | None:
    """The fine-tune's recorded train/eval templates (a stayaligned run), so that evaluating
    the repaired model uses the same eval template as evaluating the fine-tune."""
    run = inputs.finetune.run_dir
    return (recorded_templates(run) or None) if run else None


def save(weights: Weights, out: Path, aligned_path: str, made_from: dict | None = None) -> Path:
    """Write `weights` as a model directory `out`: out/model/ (full weights, config, tokenizer;
    loadable with from_pretrained) or out/adapter/ (a LoRA adapter over the aligned model),
    plus out/run.json with the fine-tune's templates and `made_from` (the inputs' hashes and
    the method's options, so that the run.json, and with it the fingerprint of anything
    evaluated from `out`, changes with the inputs even where large weight files are identified
    by size and header only). Any model/ or adapter/ already in `out` is removed first, so a
    stale one never shadows the new one. `out` is then usable as model.name."""
    import json
    import shutil

    if weights.kind not in ("full", "adapter"):
        raise RepairError(f"unknown weights kind {weights.kind!r}")
    for sub in ("model", "adapter"):
        shutil.rmtree(out / sub, ignore_errors=True)
    target = out / ("model" if weights.kind == "full" else "adapter")
    target.mkdir(parents=True, exist_ok=True)
    save_shards(weights.shards(), target)
    tokenizer_files = [n for n in COPIED_FILES if n not in ("config.json", "generation_config.json")]
    if weights.kind == "full":
        write_index(weights.like, target)
        copy_side_files([weights.side_dirs[-1]], target, ("config.json", "generation_config.json"))
    else:
        cfg = {**weights.adapter_config, "base_model_name_or_path": aligned_path}
        atomic_write(target / "adapter_config.json", json.dumps(cfg, indent=2) + "\n")
    copy_tokenizer(weights.side_dirs, target, tokenizer_files)
    write_json(out / "run.json", {"kind": "repair", "status": "complete",
                                  "templates": weights.templates or {}, **weights.info,
                                  **({"made_from": made_from} if made_from else {})})
    return out
