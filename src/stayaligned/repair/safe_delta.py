"""Safe Delta: Lu et al., "Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on
Diverse Datasets" (ICML 2025, arXiv 2505.12038). Reimplemented from the paper (the authors'
code, ColinLu50/SafeDelta, has no licence and was not used).

For each linear layer the safety loss of a weight change E = W − W_a is measured on the
aligned model's inputs X from a calibration set of harmful prompts with refusals,
L = ‖E X‖² with Hessian H = 2 X Xᵀ / n. Each entry δ_ij of the fine-tune's delta is given an
estimated safety cost c_ij = δ_ij² / [U]_jj² (the optimal-brain-surgeon saliency, U the upper
Cholesky factor of H⁻¹) and a utility proxy δ_ij²; entries are kept in order of utility per
unit of cost until their summed cost reaches the budget, the rest are reverted, and a safety
compensation (the OBS update, propagated column by column as in SparseGPT/GPTQ) moves the
reverted entries so that the kept ones cost as little safety as possible.

Knob s: the budget as a share of the layer's total estimated cost Σc (s = 0 keeps no delta
entry, giving the aligned weights exactly; s ≥ 1 keeps every entry, giving the fine-tune
exactly). Choices and departures:
- The kept entries take exactly θ_f's value and the compensation lives on the reverted ones,
  so both ends of the knob are exact (W = W_a + M⊙δ + C with C zero where M is one).
- H gets 1% of its mean diagonal as damping, and 1 on the diagonal of dead inputs.
- The budget is relative (s·Σc per layer), so the knob means the same on every model size.
- Ties in utility per cost (the ratio is [U]_jj², shared by a column) go to the cheaper entry.
- Tensors outside the decoder's linear layers (embeddings, norms) take the fine-tune's values,
  except at s = 0 where the whole model is θ_a.
- Calibration statistics are gathered in one pass over the aligned model (all linear layers'
  Hessians at once, shared between layers that read the same input); each layer's factor is
  then kept on disk, and the edit streams layer by layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stayaligned.repair.base import Repair, RepairInputs, Weights, full_weights
from stayaligned.repair.weights import RepairError


def inverse_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ (float64 inside)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(hinv, upper=True).float()
    except RuntimeError as err:
        raise RepairError(f"the calibration Hessian is not positive definite ({err}); use more "
                          "calibration examples (calibration_limit)") from None


def select(delta: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """The kept entries (True): by utility per unit of safety cost, while Σ cost ≤ s·total."""
    if s >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if s <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    d2 = torch.diag(u).float() ** 2
    cost = (delta.float() ** 2 / d2).flatten()
    ratio = d2.expand_as(delta).flatten()
    by_cost = torch.argsort(cost, stable=True)
    order = by_cost[torch.argsort(-ratio[by_cost], stable=True)]
    keep_sorted = torch.cumsum(cost[order], 0) <= s * cost.sum()
    mask = torch.zeros_like(cost, dtype=torch.bool)
    mask[order[keep_sorted]] = True
    return mask.view_as(delta)


def compensate(w_a: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, mask: torch.Tensor,
               blocksize: int = 128) -> torch.Tensor:
    """Columns left to right: a kept entry is set to θ_a + δ, a reverted one keeps its current
    (compensated) value, and each change's OBS compensation -(err / U_jj)·U_j,later is pushed
    to the later columns (GPTQ's lazy-batch form). Returns the repaired weight in float32."""
    w = w_a.float().clone()
    target = w_a.float() + delta.float()
    n = w.shape[1]
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        block, err = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i]
            q = torch.where(mask[:, i1 + i], target[:, i1 + i], col)
            e = (col - q) / u1[i, i]
            block[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            block[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = block
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w


# ---------------------------------------------------------------- calibration


def calibration_hessians(inputs: RepairInputs, cfg) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """H = 2 X Xᵀ / n per distinct linear-layer input of the aligned model on the calibration
    set; returns ({group: H}, {module: group})."""
    from stayaligned.config import ModelConfig
    from stayaligned.data.sources import load_source
    from stayaligned.models import load_model
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import render_for_training

    model, tokenizer = load_model(ModelConfig(name=str(inputs.aligned.config_dir), dtype="float32"))
    model.eval()
    examples = load_source(cfg.calibration, split=cfg.calibration_split,
                           limit=cfg.calibration_limit, seed=cfg.seed, data_dir=cfg.data_dir)
    if not examples:
        raise RepairError(f"calibration={cfg.calibration!r}: no examples")
    rows = [render_for_training(tokenizer, ex, get_template("native")).input_ids for ex in examples]
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[str, torch.Tensor] = {}
    group: dict[str, str] = {}

    def hook(name):
        def accumulate(_module, args):
            x = args[0]
            if name not in group:  # layers fed the very same tensor share one Hessian
                leader = next((g for g, t in seen.items() if t is x), None)
                group[name] = leader or name
            seen[name] = x  # held for this forward, so no later input can reuse its memory
            if group[name] != name:
                return
            x = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in rows:  # one sequence at a time: no padding enters X
                seen.clear()
                model(input_ids=torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    hessians = {g: (2 * sums[g] / counts[g]).cpu() for g in sums}
    return hessians, group


class SafeDelta(Repair):
    name = "safe_delta"
    knob = "s"
    stronger = -1
    defaults = (1.0, 0.5, 0.2, 0.1, 0.05, 0.0)
    default = 0.1

    def prepare(self, inputs: RepairInputs) -> dict:
        from safetensors.torch import save_file

        hessians, group = calibration_hessians(inputs, self.cfg)
        path = Path(inputs.work_dir) / "safe_delta_factors.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        factors = {g: inverse_cholesky(h).contiguous() for g, h in hessians.items()}
        del hessians
        save_file(factors, str(path))
        return {"inputs": inputs, "factors": path, "group": group}

    def apply(self, state: dict, strength: float) -> Weights:
        from safetensors import safe_open

        inputs: RepairInputs = state["inputs"]
        ft, al = inputs.finetune.source, inputs.aligned.source
        factors = safe_open(str(state["factors"]), framework="pt")
        group = state["group"]

        def tensor(name):
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if strength <= 0:
                return al.get(name).float()
            if module not in group or strength >= 1:
                return ft.get(name).float()
            a = al.get(name).float()
            delta = ft.get(name).float() - a
            if not torch.any(delta):
                return a
            u = factors.get_tensor(group[module])
            return compensate(a, delta, u, select(delta, u, strength))

        return full_weights(inputs, tensor, info={"method": self.name, "strength": strength})
