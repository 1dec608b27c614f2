"""SafeLoRA: Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning
Large Language Models" (NeurIPS 2024, arXiv 2405.16833; code IBM/SafeLoRA, Apache-2.0, and
PEFT's `peft.utils.safelora`, PR #2201).

For each LoRA-adapted layer, the alignment matrix V = W_a − W_b (aligned minus pre-alignment
base) defines a projection C = V Vᵀ / ‖V‖_F onto the directions alignment moved. The layer's
update ΔW = B A is compared with its projection C ΔW by cosine similarity; layers whose
similarity is below a threshold τ (the update leaves the alignment subspace) are replaced by
the projection, B ← C B, the others are left untouched.

Knob: τ (`select: threshold`, larger projects more layers) or K, the number of
lowest-similarity layers projected (`select: number`). Departures and choices:
- C is the reference code's V Vᵀ / ‖V‖_F (the paper's exact projector V(VᵀV)⁻¹Vᵀ is replaced
  by it there "for efficiency"); it is applied as V (Vᵀ B) / ‖V‖_F, never formed.
- A layer is projected when its similarity is < τ (the paper); the code uses <=.
- `number` mode ranks all layers once; the reference code's first pass mutates the weights
  it then re-reads (IBM/SafeLoRA issue #2), which this does not copy.
- Layers are matched by name, not by position (PEFT zips two sorted name lists).
- Everything is computed in float32, layer by layer, reading tensors lazily.
- Full fine-tunes are accepted too (the same projection of ΔW = W_f − W_a on every 2-D
  weight outside the embeddings); the output is then full weights, not an adapter.
- V = 0 for a layer (the base and aligned weights equal) is an error, as in PEFT.
- An adapter trained with `lora_bias` keeps its lora_B bias unprojected (the paper projects
  the weight update only; full fine-tunes likewise keep their bias deltas).
"""

from __future__ import annotations

import torch

from stayaligned.repair.base import Repair, RepairInputs, Weights, full_weights, side_dirs, templates
from stayaligned.repair.weights import LoraSource, RepairError


def project(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """C m with C = V Vᵀ / ‖V‖_F, computed as V (Vᵀ m) / ‖V‖_F in float32."""
    v, m = v.float(), m.float()
    return v @ (v.t() @ m) / torch.linalg.norm(v)


def similarity(delta: torch.Tensor, projected: torch.Tensor) -> float:
    """⟨ΔW, C ΔW⟩_F / (‖ΔW‖_F ‖C ΔW‖_F); 1.0 when either is zero (nothing to project)."""
    num = float((delta * projected).sum())
    den = float(torch.linalg.norm(delta) * torch.linalg.norm(projected))
    return num / den if den > 0 else 1.0


def lora_similarity(a: torch.Tensor, b: torch.Tensor, cb: torch.Tensor) -> float:
    """`similarity(B A, C B A)` through r x r products only: with G = A Aᵀ,
    ⟨BA, CBA⟩ = tr(Bᵀ C B G), ‖BA‖² = tr(Bᵀ B G), ‖CBA‖² = tr((CB)ᵀ CB G)."""
    a, b, cb = a.float(), b.float(), cb.float()
    g = a @ a.t()
    num = float(torch.trace(b.t() @ cb @ g))
    den = float(torch.trace(b.t() @ b @ g).clamp(min=0).sqrt() *
                torch.trace(cb.t() @ cb @ g).clamp(min=0).sqrt())
    return num / den if den > 0 else 1.0


def chosen_layers(sims: dict[str, float], mode: str, strength: float) -> list[str]:
    """The layers projected: similarity < τ, or the K lowest (ties: the earlier layer)."""
    if mode == "threshold":
        return [m for m, s in sims.items() if s < strength]
    k = int(strength)
    if k != strength or k < 0:
        raise RepairError(f"safelora select: number needs whole layer counts, got {strength}")
    ranked = sorted(sims, key=lambda m: (sims[m], list(sims).index(m)))
    return ranked[:k]


class SafeLora(Repair):
    name = "safelora"
    knob = "tau"
    stronger = 1
    defaults = (0.0, 0.25, 0.5, 0.75, 1.0)
    default = 0.5

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.select not in ("threshold", "number"):
            raise RepairError(f"select={cfg.select!r}: use threshold (knob tau) or number (knob K)")
        if cfg.select == "number":
            self.knob, self.defaults, self.default = "K", (0, 4, 16, 64, 256), 10

    def prepare(self, inputs: RepairInputs) -> dict:
        if inputs.base is None:
            raise RepairError("safelora needs the pre-alignment base model (pass --base): its "
                              "projection is built from aligned − base weights")
        ft = inputs.finetune.source
        modules = list(ft.modules) if isinstance(ft, LoraSource) else full_modules(inputs)
        sims = {}
        for module in modules:
            v = self._v(inputs, module)
            if isinstance(ft, LoraSource):  # C (B A) = (C B) A: never form the full update
                a, b = ft.lora_pair(module)
                sims[module] = lora_similarity(a, b, project(v, b))
            else:
                delta = self._delta(inputs, module)
                sims[module] = similarity(delta, project(v, delta))
        return {"inputs": inputs, "similarity": sims}

    def _v(self, inputs: RepairInputs, module: str) -> torch.Tensor:
        name = f"{module}.weight"
        v = inputs.aligned.source.get(name).float() - inputs.base.source.get(name).float()
        if not torch.any(v):
            raise RepairError(f"tensor {name}: the base and aligned weights are identical, so "
                              "SafeLoRA has no alignment direction there; pass the model the "
                              "aligned one was trained from as --base")
        return v

    def _delta(self, inputs: RepairInputs, module: str) -> torch.Tensor:
        ft = inputs.finetune.source
        if isinstance(ft, LoraSource):
            return ft.delta(module)
        name = f"{module}.weight"
        return ft.get(name).float() - inputs.aligned.source.get(name).float()

    def apply(self, state: dict, strength: float) -> Weights:
        inputs: RepairInputs = state["inputs"]
        chosen = set(chosen_layers(state["similarity"], self.cfg.select, strength))
        info = {"method": self.name, "strength": strength, "select": self.cfg.select,
                "projected": sorted(chosen)}
        ft = inputs.finetune.source
        if isinstance(ft, LoraSource):
            return self._adapter(inputs, ft, chosen, info)

        def tensor(name):
            module = name[: -len(".weight")]
            if module not in chosen:
                return ft.get(name).float()
            delta = self._delta(inputs, module)
            return inputs.aligned.source.get(name).float() + project(self._v(inputs, module), delta)

        return full_weights(inputs, tensor, info=info)

    def _adapter(self, inputs, ft: LoraSource, chosen: set, info: dict) -> Weights:
        def shards():
            out = {}
            b_keys = {ft.modules[m][1]: m for m in ft.modules}
            for key, value in ft.lora.items():
                module = b_keys.get(key)
                if module in chosen:
                    value = project(self._v(inputs, module), value).to(value.dtype)
                out[key] = value
            yield "adapter_model.safetensors", out

        return Weights("adapter", shards, inputs.aligned.source, side_dirs(inputs),
                       templates(inputs), adapter_config=ft.config, info=info)


def full_modules(inputs: RepairInputs) -> list[str]:
    """Full fine-tunes: every 2-D weight outside the embeddings and the output head."""
    src = inputs.aligned.source
    return [n[: -len(".weight")] for n in src.names
            if n.endswith(".weight") and len(src.shape(n)) == 2
            and "embed" not in n and "lm_head" not in n]
