"""Interpolation ("merge", WiSE-FT style), as studied for safety by Farn et al., "Safeguard
Fine-Tuned LLMs Through Pre- and Post-Tuning Model Merging" (arXiv 2412.19512).

The repaired weights are a straight line between the fine-tune and the aligned model it came
from: θ = (1 − λ)·θ_f + λ·θ_a, tensor by tensor, with no data. λ = 0 is the fine-tune and λ = 1
the aligned model, so sweeping λ traces the whole safety/utility trade between the two.
Tensors are streamed shard by shard (safetensors lazy loading) in float32 and stored in the
aligned model's dtype. Departures: none (the paper's merge is this formula; the knob's name
follows methods.md 9.1).
"""

from __future__ import annotations

from stayaligned.repair.base import Repair, RepairInputs, Weights, full_weights


def interpolate(finetuned, aligned, lam: float):
    """(1 − λ)·θ_f + λ·θ_a in float32; exact at λ = 0 and λ = 1 for finite weights."""
    f, a = finetuned.float(), aligned.float()
    if lam == 0:
        return f
    if lam == 1:
        return a
    return (f * (1.0 - lam)).add_(a, alpha=lam)


class Merge(Repair):
    name = "merge"
    knob = "lambda"
    stronger = 1
    defaults = (0.0, 0.25, 0.5, 0.75, 1.0)
    default = 0.5
    reverts_at = 1.0

    def prepare(self, inputs: RepairInputs) -> dict:
        return {"inputs": inputs}

    def apply(self, state: dict, strength: float) -> Weights:
        inputs: RepairInputs = state["inputs"]
        ft, al = inputs.finetune.source, inputs.aligned.source
        return full_weights(inputs, lambda n: interpolate(ft.get(n), al.get(n), strength),
                            info={"method": self.name, "strength": strength})
