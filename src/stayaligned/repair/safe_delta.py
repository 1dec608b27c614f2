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
- Tensors outside the decoder's linear layers (embeddings, norms, linear biases, an untied
  lm_head) take the fine-tune's values, except at s = 0 where the whole model is θ_a.
- Layers are matched to checkpoint tensors by name: the module's own name, else the name
  transformers saves it under (Gemma 3 keeps a legacy layout); a calibrated layer with no
  tensor is an error, never a silent no-op.
- Calibration statistics are gathered in one pass over the aligned model (all linear layers'
  Hessians at once, shared between layers that read the same input; sequences in right-padded
  batches with the padding left out of X, and without the vocabulary projection); each layer's
  factor is then kept on disk, and the edit streams layer by layer.

Computation (same results as the textbook forms, up to float rounding): U = R⁻¹ with R the
reversed Cholesky factor of H (no explicit H⁻¹); the selection sorts columns, not entries
(the ratio is per column), and sorts entries only in the column group where the budget runs
out; the compensation carries C alone, in float32, on the transposed matrix, with a fixed mask
(a kept entry's error is (C_j − δ_j)/U_jj, a reverted one's is zero).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stayaligned.repair.base import Repair, RepairInputs, Weights, full_weights
from stayaligned.repair.names import saved_name
from stayaligned.repair.weights import RepairError


def inverse_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ (float64 inside).

    Without forming H⁻¹: with J the reversal, R = J·chol(J H J)·J is upper triangular with
    H = R Rᵀ, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ (positive diagonal, hence the Cholesky factor)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    except RuntimeError as err:
        raise RepairError(f"the calibration Hessian is not positive definite ({err}); use more "
                          "calibration examples (calibration_limit)") from None
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve_triangular(r, eye, upper=True).float()


def select(delta: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """The kept entries (True): by utility per unit of safety cost, while Σ cost ≤ s·total.

    The order is utility per cost ([U]_jj², one value per column) from high to low, then cost
    from low to high, then position (row-major). Since the ratio is per column, whole columns
    come first and only the column group (equal ratio) where the running cost passes the
    budget is sorted entry by entry: O(entries) plus a sort of one group, not of the matrix.
    The running cost is summed in float64 and compared in float32, as torch's float32 cumsum
    over the whole order does."""
    if s >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if s <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    d2 = torch.diag(u).float() ** 2
    cost = delta.float() ** 2 / d2
    budget = s * cost.flatten().sum()
    cols = torch.argsort(-d2, stable=True)
    sizes = torch.unique_consecutive(d2[cols], return_counts=True)[1]
    ends = torch.cumsum(sizes, 0) - 1
    total = torch.cumsum(cost.sum(0, dtype=torch.float64)[cols], 0)[ends]  # after each group
    over = torch.nonzero(total.float() > budget)
    k = int(over[0]) if over.numel() else len(sizes)  # the group where the budget runs out
    first = int(ends[k - 1]) + 1 if k > 0 else 0
    mask = torch.zeros_like(delta, dtype=torch.bool)
    mask[:, cols[:first]] = True
    if k < len(sizes):
        group = torch.sort(cols[first: int(ends[k]) + 1]).values  # row-major inside the group
        part = cost[:, group].flatten()
        order = torch.argsort(part, stable=True)
        start = total[k - 1] if k > 0 else 0.0
        running = (start + torch.cumsum(part[order], 0, dtype=torch.float64)).float()
        kept = torch.zeros_like(part, dtype=torch.bool)
        kept[order[running <= budget]] = True
        mask[:, group] = kept.view(delta.shape[0], -1)
    return mask


def compensate(w_a: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, mask: torch.Tensor,
               blocksize: int = 32) -> torch.Tensor:
    """Columns left to right: a kept entry is set to θ_a + δ, a reverted one keeps its current
    (compensated) value, and each change's OBS compensation -(err / U_jj)·U_j,later is pushed
    to the later columns (GPTQ's lazy-batch form). Returns the repaired weight in float32.

    Only the compensation C is carried (not θ_a + C), so a reverted entry's error is zero and a
    kept entry's is e_j = (C_j − δ_j) / U_jj: per row, the kept errors solve the triangular
    system Σ_{j∈K, j≤i} e_j U_ji = −δ_i (i ∈ K). It is worked on the transposed matrix (a
    column is contiguous), three vector operations per column inside a block and one matrix
    product per block for the later columns; float32 throughout."""
    n, rows = delta.shape[1], delta.shape[0]
    u = u.float()
    d_t = delta.float().t().contiguous()
    scale = mask.t().float() / torch.diag(u).unsqueeze(1)  # 1/U_jj where kept, 0 where reverted
    comp = torch.zeros(n, rows)  # C, transposed
    err = torch.empty(blocksize, rows)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        block = comp[i1:i2]
        for i in range(i2 - i1):
            e = err[i]
            torch.sub(block[i], d_t[i1 + i], out=e)
            e.mul_(scale[i1 + i])
            if i + 1 < i2 - i1:
                block[i + 1:].addr_(u[i1 + i, i1 + i + 1:i2], e, alpha=-1)
        if i2 < n:
            comp[i2:].addmm_(u[i1:i2, i2:].t(), err[: i2 - i1], alpha=-1)
    return w_a.float() + torch.where(mask, delta.float(), comp.t())


# ---------------------------------------------------------------- calibration


CALIBRATION_BATCH_TOKENS = 1024  # padded positions per calibration forward


def calibration_examples(cfg) -> list:
    """The calibration set: harmful prompts with refusals (`calibration` options)."""
    from stayaligned.data.sources import load_source

    examples = load_source(cfg.calibration, split=cfg.calibration_split,
                           limit=cfg.calibration_limit, seed=cfg.seed, data_dir=cfg.data_dir)
    if not examples:
        raise RepairError(f"calibration={cfg.calibration!r}: no examples")
    return examples


def calibration_hessians(inputs: RepairInputs, cfg, names: dict | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """H = 2 X Xᵀ / n per distinct linear-layer input of the aligned model on the calibration
    set; returns ({group: H}, {module: group}), and fills `names` (if given) with {module:
    the checkpoint tensor name of its weight} (see `weight_names`). Sequences run in batches of similar length,
    padded on the right: with causal attention the real positions see only real positions, and
    the padded ones are left out of X; the vocabulary projection is not run."""
    from stayaligned.config import ModelConfig
    from stayaligned.models import load_model
    from stayaligned.templates.library import get_template
    from stayaligned.templates.render import render_for_training

    model, tokenizer = load_model(ModelConfig(name=str(inputs.aligned.config_dir), dtype="float32"))
    model.eval()
    examples = calibration_examples(cfg)
    rows = [render_for_training(tokenizer, ex, get_template("native")).input_ids for ex in examples]
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[str, torch.Tensor] = {}
    group: dict[str, str] = {}
    real: list[torch.Tensor] = []  # the current batch's non-padding positions (flat)

    def hook(name):
        def accumulate(_module, args):
            x = args[0]
            if name not in group:  # layers fed the very same tensor share one Hessian
                leader = next((g for g, t in seen.items() if t is x), None)
                group[name] = leader or name
            seen[name] = x  # held for this forward, so no later input can reuse its memory
            if group[name] != name:
                return
            x = x.reshape(-1, x.shape[-1])[real[0]].float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            sums[name].addmm_(x.t(), x)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.base_model  # the decoder stack without the vocabulary projection
    try:
        with torch.no_grad():
            for batch in _batches(rows, CALIBRATION_BATCH_TOKENS):
                width = max(map(len, batch))
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=device)
                att = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch],
                                   device=device)
                real[:] = [att.flatten().bool()]
                seen.clear()
                decoder(input_ids=ids, attention_mask=att)
    finally:
        for h in handles:
            h.remove()
    hessians = {g: (2 * sums[g] / counts[g]).cpu() for g in sums}
    if names is not None:
        names.update(weight_names(model, list(group), inputs.aligned.source))
    return hessians, group


def weight_names(model, modules: list[str], source) -> dict[str, str]:
    """{module: name of its weight in the checkpoint `source`}. The module's own name plus
    ".weight" where the checkpoint has it; else the name transformers saves that parameter
    under (its checkpoint conversion reversed: Gemma 3's `model.language_model.layers...` is
    stored as `language_model.model.layers...`). Every hooked layer must be found, with its
    shape: a layer left out would silently keep the fine-tune's weights."""
    params = dict(model.named_parameters())
    out = {}
    for module in modules:
        own = f"{module}.weight"
        name = own if own in source.where else (saved_name(model, own, params.get(own)) or own)
        if name not in source.where:
            tried = own if name == own else f"{own} or {name}"
            raise RepairError(f"safe_delta: linear layer {module} (calibrated on the aligned "
                              f"model) has no weight in {source.path} (no tensor {tried}); the "
                              "checkpoint's tensor names do not follow the model's: re-save the "
                              "aligned model and the fine-tune with save_pretrained")
        if own in params and source.shape(name) != tuple(params[own].shape):
            raise RepairError(f"safe_delta: tensor {name} in {source.path} has shape "
                              f"{list(source.shape(name))}, but linear layer {module} has "
                              f"{list(params[own].shape)}; the checkpoint does not match its "
                              "config.json")
        out[module] = name
    return out


def _batches(rows: list[list[int]], tokens: int) -> list[list[list[int]]]:
    """Sequences by length, packed into batches of at most `tokens` padded positions."""
    batches: list[list[list[int]]] = []
    for r in sorted(map(list, rows), key=len):
        if batches and len(r) * (len(batches[-1]) + 1) <= tokens:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


class SafeDelta(Repair):
    name = "safe_delta"
    knob = "s"
    stronger = -1
    defaults = (1.0, 0.5, 0.2, 0.1, 0.05, 0.0)
    default = 0.1
    reverts_at = 0.0

    def prepare(self, inputs: RepairInputs) -> dict:
        from safetensors.torch import save_file

        names: dict[str, str] = {}
        hessians, group = calibration_hessians(inputs, self.cfg, names)
        path = Path(inputs.work_dir) / "safe_delta_factors.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        factors = {g: inverse_cholesky(h).contiguous() for g, h in hessians.items()}
        del hessians
        save_file(factors, str(path))
        # checkpoint tensor name -> its layer's factor
        return {"inputs": inputs, "factors": path, "group": group,
                "factor_of": {names[m]: g for m, g in group.items()}}

    def apply(self, state: dict, strength: float) -> Weights:
        from safetensors import safe_open

        inputs: RepairInputs = state["inputs"]
        ft, al = inputs.finetune.source, inputs.aligned.source
        factors = safe_open(str(state["factors"]), framework="pt")
        factor_of = state["factor_of"]

        def tensor(name):
            if strength <= 0:
                return al.get(name).float()
            if name not in factor_of or strength >= 1:
                return ft.get(name).float()
            a = al.get(name).float()
            delta = ft.get(name).float() - a
            if not torch.any(delta):
                return a
            u = factors.get_tensor(factor_of[name])
            return compensate(a, delta, u, select(delta, u, strength))

        return full_weights(inputs, tensor, info={"method": self.name, "strength": strength})
