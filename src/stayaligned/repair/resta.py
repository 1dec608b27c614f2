"""RESTA: Bhardwaj, Anh and Poria, "Language Models are Homer Simpson! Safety Re-Alignment of
Fine-tuned Language Models through Task Arithmetic" (ACL 2024, arXiv 2402.11746; code
declare-lab/resta).

A safety vector δ_s = θ_a − θ_u, the difference between the aligned model and an un-aligned
counterpart of it, is added back to the compromised fine-tune: θ = θ_f + β·δ_s. Optionally the
fine-tune's own delta θ_f − θ_a is first sparsified with DARE (drop each entry with
probability p, rescale the kept ones by 1/(1 − p)), which the paper finds makes the addition
more effective for parameter-efficient fine-tunes: θ = θ_a + DARE_p(θ_f − θ_a) + β·δ_s.

The paper obtains θ_u by fine-tuning θ_a on harmful question-answer pairs
(`reference: harmful_finetune`, pass that model as `unaligned`); `reference: base` uses the
pre-alignment base instead (θ_u = θ_b), the natural choice when the aligned model was made by
safety-aligning a base, as in the embedded study. Departures: β is swept (the paper uses
β = 1); DARE draws one seeded mask per tensor (seed and tensor name), so a repair is
reproducible; with p = 0 no mask is drawn and θ = θ_f + β·δ_s exactly.
"""

from __future__ import annotations

import zlib

import torch

from stayaligned.repair.base import Repair, RepairInputs, Weights, full_weights
from stayaligned.repair.weights import RepairError


def dare(delta: torch.Tensor, p: float, generator: torch.Generator | None = None,
         inplace: bool = False) -> torch.Tensor:
    """Drop And REscale (Yu et al. 2023): zero each entry with probability p, scale the rest by
    1/(1 − p); p = 0 returns `delta` unchanged."""
    if not 0 <= p < 1:
        raise RepairError(f"dare_p={p}: must be in [0, 1)")
    if p == 0:
        return delta
    drop = torch.rand(delta.shape, generator=generator) < p
    out = delta if inplace else delta.clone()
    return out.mul_(1.0 / (1.0 - p)).masked_fill_(drop, 0.0)


def resta_tensor(f, a, u, beta: float, p: float = 0.0, generator=None) -> torch.Tensor:
    """One tensor of the RESTA model, in float32. Inputs are released as soon as they are used
    (the caller passes fresh tensors), so one tensor costs a few copies of itself, not more."""
    f, a = f.float(), a.float()
    if beta == 0 and p == 0:
        return f
    out = a - u.float()
    del u
    out.mul_(beta)
    if p == 0:
        return out.add_(f)
    delta = f - a
    del f
    out.add_(a)
    del a
    return out.add_(dare(delta, p, generator, inplace=True))


class Resta(Repair):
    name = "resta"
    knob = "beta"
    stronger = 1
    defaults = (0.0, 0.25, 0.5, 0.75, 1.0)
    default = 1.0

    def prepare(self, inputs: RepairInputs) -> dict:
        ref = self.cfg.reference
        if ref not in ("base", "harmful_finetune"):
            raise RepairError(f"reference={ref!r}: use base (the pre-alignment model, --base) or "
                              "harmful_finetune (the aligned model fine-tuned on harmful pairs, "
                              "--unaligned)")
        other = inputs.base if ref == "base" else inputs.unaligned
        if other is None:
            flag = "--base" if ref == "base" else "--unaligned"
            raise RepairError(f"resta with reference: {ref} needs that model: pass {flag}")
        return {"inputs": inputs, "reference": other}

    def apply(self, state: dict, strength: float) -> Weights:
        inputs: RepairInputs = state["inputs"]
        ft, al, ref = inputs.finetune.source, inputs.aligned.source, state["reference"].source
        p, seed = self.cfg.dare_p, self.cfg.seed

        def tensor(name):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            return resta_tensor(ft.get(name), al.get(name), ref.get(name), strength, p, gen)

        return full_weights(inputs, tensor, info={"method": self.name, "strength": strength,
                                                  "reference": self.cfg.reference, "dare_p": p})
