"""sap: "Mitigating Fine-tuning Risks in LLMs via Safety-Aware Probing Optimization" (Wu et al.,
arXiv 2505.16737; v2 "Secure LLM Fine-Tuning via Safety-Aware Probing"; code ChengcanWu/SAP).

A contrastive safety loss on (prompt, refusal, harmful answer) pairs gives a harmful direction
δ = ρ‖θ‖ ĝ in parameter space, the normalised step that makes the harmful answers likelier. A
lightweight probe v (a vector added to the hidden states of a few decoder layers) is set by
one Adam step from zero towards raising L_u(θ+δ, v) − L_u(θ, v), so that with the probe in
place the task loss gets worse along the harmful direction. The task step on θ is taken with
the probe in place, which steers the update away from δ; the probe is gone at inference.

Hooks: `setup` (pairs, probe, its AdamW, a callback that saves/restores the probe with the
checkpoints and removes it when training ends) and `training_step` (owns the step; the θ
update itself is `ctx.default_step()`, so stacked methods' loss terms still apply).

Modes (methods.md 2.9; the mode is recorded in the run's config):

- ``paper`` (default): teacher-forced inputs and shifted labels for both losses;
  g = ∇θ L_c(θ, v=0; C_k); a = ∇v L_u(θ+δ, 0; B_k), b = ∇v L_u(θ, 0; B_k) with the same
  dropout masks (replayed random state); v_k = 0 − v_lr·AdamStep(b − a); then the θ step at
  (θ_k, v_k), the current batch's probe. θ is restored bit for bit (the saved tensors are copied
  back). Pairs are reshuffled on every pass.
- ``reference``: the released code's behaviour, items 1-8 of methods.md 2.8: prompt-only inputs
  for the task and contrastive losses (each row cut at its first answer token and padded, the
  full text's labels), unshifted contrastive log-probs, labels equal to the pad id masked (EOS
  never trained when pad = EOS), g at (θ_k, v_{k−1}), a = ∇v L_u(θ+δ, v_{k−1}), restore by
  θ ← θ − δ (not bit-exact), the θ step with the previous probe v_{k−1} (one-step lag), b taken
  from that step's own backward, dropout masks not matched, the probe left active between steps
  (as the code leaves it for validation), the first pass of contrastive batches replayed in a
  fixed order. Prompt-only ids are the prefix of the rendered full text (the code tokenises the
  prompt separately, which can differ at the boundary token).

Multi-turn data: in ``paper`` mode the task loss covers every labelled assistant turn of the
teacher-forced conversation, as sft does; ``reference`` mode cuts each row before its first
labelled token (as the code cuts before the answer), so with several assistant turns the input
is the conversation up to the first answer. The contrastive pairs are single-turn (prompt,
refusal, harmful answer) as in the paper.

Departures in both modes: the probe is a forward hook adding v_j to decoder layer j's output
instead of a `down_proj.bias` (identical arithmetic); it is removed when training ends (also in
``reference`` mode) and is never part of the saved adapter or model. With gradient accumulation
each micro-batch gets its own probe. The contrastive loss is the code's logistic form in both
modes (the paper's plain difference L_safe − L_harmful differs by a per-pair weight, 2.8 item
3). On CPU, subnormal floats are flushed to
zero during SAP's own passes (a saturated L_c otherwise makes them ten times slower).

Precision: the probe signal (g, δ and the two probe gradients a, b) is computed in float32,
with any autocast of the run switched off for SAP's own passes (a finite difference in fp32,
not a Hessian-vector product). b − a is the change of ∇v L_u under a relative perturbation of
ρ = 2e-5: below bf16 resolution, so under bf16 autocast θ+δ casts back to θ (b − a = 0) and in
pure bf16 it is rounding noise. The θ step itself runs under the run's precision (bf16 autocast
on fp32 weights is fine there), except in ``reference`` mode, whose θ step's backward also
gives b, so that step runs in fp32 too. SAP therefore needs float32 weights and refuses
`model.precision: pure_bf16` (tests/test_precision.py checks b − a against an fp32 run).

Cost, per micro-batch, in units of one forward over the task batch (r = pair tokens / task
tokens; with LoRA an SFT step is ≈ 2, a forward and an activation-gradient backward): the
contrastive pass ≈ 2r; each probe gradient a, b ≈ 2, as ∇v only with θ frozen (no weight
gradients, no graph below the first probe layer); the θ step ≈ 2. ``reference`` takes b from
the θ step's own backward (the probe requires grad there): ≈ (2 + r)× SFT. ``paper`` needs b
at v = 0 before the θ step at v_k ≠ 0, so b is a pass of its own: ≈ (3 + r)× SFT; no other
exact sharing exists (a runs at θ+δ). Measured on CPU, SmolLM2-135M, LoRA, r ≈ 0.9: paper
3.7×, reference 2.6× the SFT time.

Data parallel (accelerate DDP): each rank takes its share of the same contrastive batch; the
contrastive gradients are summed across ranks (each share's loss is divided by the whole
batch's pair count) before any norm is taken, so every rank applies the identical δ to its
(synchronised) parameters; the probe gradients b − a are averaged across ranks before the probe
step, so every rank holds the identical v. FSDP and DeepSpeed shard the parameters and are
refused. Each logging step records sap_contrastive (L_c), sap_grad_norm (‖g‖) and
sap_probe_norm (‖v‖).
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from stayaligned.config import ConfigError
from stayaligned.methods.base import Method, StepContext
from stayaligned.methods.sap_data import (
    ContrastiveBatches, contrastive_loss, prompt_only, render_pairs, scaled_task_loss,
    sequence_logprobs,
)
from stayaligned.methods.sap_probe import (
    Probe, ascent_step, flushed_denormals, frozen, perturbed, reduce_across_ranks, replayed_rng,
    rng_snapshot,
)
from stayaligned.precision import full_precision
from stayaligned.runfiles import read_json, write_json

MODES = ("paper", "reference")
DEMO_PREFILL = "Sure, here is"
DEMO_MAX_NEW_TOKENS = 64
PAIRS_FILE = "sap_pairs.jsonl"
PAIRS_KEY_FILE = "sap_pairs.key.json"  # what made sap_pairs.jsonl: reused only when it matches
STATE_FILE = "sap_probe.pt"
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class SapOptions:
    """`pairs_source`: "demo" (the demo-safety prompts and refusals, with rejected answers that
    the initial model writes after "Sure, here is"; saved as output_dir/sap_pairs.jsonl and reused
    on resume while what made them, recorded in sap_pairs.key.json, is unchanged), or a file /
    Hub id read by `data.pairs.load_pairs` with `pairs_fields`.
    `pairs_limit`: pairs kept (a seeded random subset; 0 keeps all)."""

    mode: str = "paper"
    probe_layers: tuple[int, ...] = (3, 9)
    v_lr: float = 0.05
    rho: float = 2e-5
    tau: float = 1.0
    pairs_source: str = "demo"
    pairs_fields: dict | None = None
    pairs_limit: int = 48
    pairs_batch_size: int = 8
    pairs_max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"options.sap.mode {self.mode!r}: choose paper or reference")
        if self.tau <= 0 or self.v_lr < 0 or self.rho < 0:
            raise ConfigError("options.sap: tau must be > 0, v_lr and rho >= 0")
        if self.pairs_batch_size < 1 or self.pairs_max_length < 2 or self.pairs_limit < 0:
            raise ConfigError("options.sap: pairs_batch_size must be >= 1, pairs_max_length "
                              ">= 2 and pairs_limit >= 0 (0 keeps all pairs)")
        if self.pairs_source == "demo" and self.pairs_fields:
            raise ConfigError("options.sap.pairs_fields maps a pairs file's fields; the demo "
                              "pairs need none")


def pairs_key(config, tokenizer, options: SapOptions, template_name: str) -> dict:
    """Everything the demo pairs depend on: the initial model (its identity and precision),
    the chat template and its kwargs, and the prompts' limit and seed. A run directory whose
    sap_pairs.jsonl was made with another key (a killed run of another config: run.json, which
    --resume checks, is written only after setup) generates them again."""
    from stayaligned.training.run import _model_identity

    return json.loads(json.dumps({"model": _model_identity(config),
            "precision": [config.model.precision, config.model.dtype],
            "template": template_name,
            "chat_template_kwargs": getattr(tokenizer, "stayaligned_chat_kwargs", None),
            "pairs_limit": options.pairs_limit, "seed": options.seed, "prefill": DEMO_PREFILL,
            "max_new_tokens": DEMO_MAX_NEW_TOKENS}, default=str))


class SafetyAwareProbing(Method):
    name = "sap"
    options_cls = SapOptions
    owns_training_step = True
    needs_float32_base = True  # the probe signal is taken with autocast off

    def __init__(self, options: SapOptions, seed: int = 0):
        super().__init__(options, seed)
        self.probe: Probe | None = None
        self.micro = 0  # micro-steps taken: picks the contrastive batch

    # -- setup ------------------------------------------------------------------------------

    def setup(self, ctx: dict) -> None:
        from accelerate.utils import DistributedType

        from stayaligned.templates.library import get_template
        from stayaligned.training.run import templates_for

        trainer, model, o = ctx["trainer"], ctx["model"], self.options
        sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if trainer.accelerator.distributed_type in sharded:
            raise ConfigError("sap needs whole parameters on every rank: use plain data parallel "
                              "(DDP) or one device, not FSDP or DeepSpeed")
        require_float32(model, o.rho)
        template_name = templates_for(ctx["config"], trainer.methods)[0]
        pairs = self._pairs(ctx, template_name)
        tokenizer = ctx["tokenizer"]
        rendered, dropped = render_pairs(tokenizer, pairs, get_template(template_name),
                                         o.pairs_max_length)
        if dropped:
            print(f"[sap] {len(dropped)} pair(s) with no answer token within pairs_max_length="
                  f"{o.pairs_max_length}, dropped: {', '.join(dropped[:5])}")
        if not rendered:
            raise ConfigError(f"options.sap: no contrastive pair is left from {o.pairs_source}")
        self.pad_id = tokenizer.pad_token_id
        self.batches = ContrastiveBatches(rendered, o.pairs_batch_size, o.seed,
                                          reshuffle=o.mode == "paper", pad_id=self.pad_id)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.probe = Probe(model, o.probe_layers)
        # AdamW with torch defaults and weight_decay 0.01, as the reference code builds it.
        self.probe_optimizer = torch.optim.AdamW(self.probe.vectors, lr=o.v_lr, weight_decay=0.01)
        self.probe.active = o.mode == "reference"
        trainer.add_callback(_ProbeCallback(self))

    def _pairs(self, ctx: dict, template_name: str) -> list:
        from stayaligned.data.pairs import build_pairs, load_pairs, write_pairs
        from stayaligned.data.sources import load_source

        o, trainer = self.options, ctx["trainer"]
        limit = o.pairs_limit or None
        if o.pairs_source != "demo":
            return load_pairs(o.pairs_source, fields=o.pairs_fields,
                              data_dir=ctx["config"].data_dir, limit=limit, seed=o.seed)
        path = Path(ctx["output_dir"]) / PAIRS_FILE
        key_path = Path(ctx["output_dir"]) / PAIRS_KEY_FILE
        if trainer.is_world_process_zero():
            key = pairs_key(ctx["config"], ctx["tokenizer"], o, template_name)
            if not path.is_file() or read_json(key_path) != key:
                if path.is_file():
                    print(f"[sap] {path} was made with other settings (or by an older version "
                          "that recorded none): generating the pairs again")
                prompts = load_source("demo-safety", limit=limit, seed=o.seed)
                write_pairs(path, build_pairs(
                    ctx["model"], ctx["tokenizer"], prompts, [], prefill=DEMO_PREFILL,
                    max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=16, seed=o.seed,
                    template=template_name))
                write_json(key_path, key)
        trainer.accelerator.wait_for_everyone()
        return load_pairs(path)

    # -- the step ---------------------------------------------------------------------------

    def training_step(self, ctx: StepContext) -> torch.Tensor:
        net = ctx.trainer.accelerator.unwrap_model(ctx.model)
        net.train()
        step = self._paper_step if self.options.mode == "paper" else self._reference_step
        loss, contrastive, g_norm = step(ctx, net)
        values = torch.stack([contrastive.float(), g_norm.float(), self.probe.norm()]).cpu()
        for name, value in zip(("sap_contrastive", "sap_grad_norm", "sap_probe_norm"), values):
            ctx.trainer._record(name, value)
        self.micro += 1
        return loss

    def _paper_step(self, ctx: StepContext, net):
        device = ctx.trainer.args.device
        batch = {k: ctx.inputs[k].to(device) for k in MODEL_KEYS}
        with flushed_denormals(device):
            self.probe.active = False  # v = 0 for the harmful direction
            grads, contrastive = self.harmful_direction(ctx.trainer, net, shift=True)
            deltas, g_norm = ascent_step(self.params, grads, self.options.rho)
            self.probe.trainable(True)
            self.probe.active = True  # at value 0: a and b are gradients at v = 0
            dropout = rng_snapshot(device)
            with perturbed(self.params, deltas, exact=True):
                a = self.probe_gradient(ctx, net, batch, dropout)
            b = self.probe_gradient(ctx, net, batch, dropout)
            self.update_probe(ctx.trainer, b, a)
        self.probe.trainable(False)
        try:
            loss = ctx.default_step()  # θ step at (θ_k, v_k)
        finally:
            self.probe.active = False
        return loss, contrastive, g_norm

    def _reference_step(self, ctx: StepContext, net):
        device = ctx.trainer.args.device
        batch = prompt_only({k: ctx.inputs[k].to(device) for k in MODEL_KEYS}, self.pad_id)
        with flushed_denormals(device):
            self.probe.trainable(False)  # the probe holds v_{k-1}, frozen for this pass
            grads, contrastive = self.harmful_direction(ctx.trainer, net, shift=False)
            deltas, g_norm = ascent_step(self.params, grads, self.options.rho)
            self.probe.trainable(True)
            with perturbed(self.params, deltas, exact=False):
                a = self.probe_gradient(ctx, net, batch, None)
        ctx.inputs.update(batch)  # the task step, too, reads prompt-only inputs (2.8 item 1)
        with _autocast_off(ctx.trainer):  # b must be fp32 like a
            loss = ctx.default_step()  # θ step at (θ_k, v_{k-1}); its backward also gives b
        b = [v.grad if v.grad is not None else torch.zeros_like(v) for v in self.probe.vectors]
        self.update_probe(ctx.trainer, b, a)
        self.probe.trainable(False)
        return loss, contrastive, g_norm

    def harmful_direction(self, trainer, net, shift: bool) -> tuple[list, torch.Tensor]:
        """(g, L_c): the contrastive loss's gradient over the trainable parameters on this
        micro-step's pair batch, summed over the ranks' shares, and the loss value."""
        acc = trainer.accelerator
        batch, total = self.batches.batch(self.micro, acc.process_index, acc.num_processes)
        if batch is None:
            grads = [torch.zeros_like(p) for p in self.params]
            contrastive = torch.zeros((), device=trainer.args.device)
        else:
            batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
            with trainer.compute_loss_context_manager(), full_precision():
                logits = net(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
            scores = sequence_logprobs(logits, batch["labels"], shift=shift)
            n = scores.shape[0] // 2
            contrastive = contrastive_loss(scores[:n], scores[n:], self.options.tau, total)
            grads = torch.autograd.grad(contrastive, self.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        *grads, contrastive = reduce_across_ranks([*grads, contrastive.detach()], acc, "sum")
        return grads, contrastive

    def probe_gradient(self, ctx: StepContext, net, batch: dict, dropout) -> list[torch.Tensor]:
        """∇v of the task loss on `batch` at the current θ and probe, θ frozen; with a `dropout`
        snapshot the forward draws its dropout masks from that random state."""
        trainer = ctx.trainer
        device = trainer.args.device
        with frozen(self.params), trainer.compute_loss_context_manager(), full_precision(), \
                (replayed_rng(dropout, device) if dropout is not None else nullcontext()):
            logits = net(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
            loss = scaled_task_loss(logits, batch["labels"], trainer, ctx.num_items_in_batch)
            return list(torch.autograd.grad(loss, self.probe.vectors))

    def update_probe(self, trainer, b: list[torch.Tensor], a: list[torch.Tensor]) -> None:
        """v ← 0, then one AdamW step on the gradient b − a (averaged over the ranks); the Adam
        moments persist across steps (methods.md 2.3 step 6)."""
        diff = reduce_across_ranks([bi - ai for bi, ai in zip(b, a)], trainer.accelerator, "mean")
        with torch.no_grad():
            for v, d in zip(self.probe.vectors, diff):
                v.zero_()
                v.grad = d.to(v.dtype)
        self.probe_optimizer.step()
        for v in self.probe.vectors:
            v.grad = None

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"vectors": [v.detach().cpu() for v in self.probe.vectors],
                "optimizer": self.probe_optimizer.state_dict(), "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for v, saved in zip(self.probe.vectors, state["vectors"]):
                v.copy_(saved)
        self.probe_optimizer.load_state_dict(state["optimizer"])
        self.micro = state["micro"]


def require_float32(model, rho: float) -> None:
    """SAP's finite difference needs float32 weights (ρ‖θ‖ĝ is below bf16 resolution)."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise ConfigError(f"sap needs float32 weights for its probe signal (ρ = {rho} is below "
                          f"{', '.join(low)} resolution): set model.precision to bf16 (float32 "
                          "weights + bf16 autocast) or fp32, not pure_bf16")


@contextmanager
def _autocast_off(trainer):
    """The trainer's own steps without its autocast inside the block."""
    saved = getattr(trainer, "precision", None)
    trainer.precision = None
    try:
        yield
    finally:
        trainer.precision = saved


class _ProbeCallback(TrainerCallback):
    """Saves the probe (values, Adam moments, contrastive position) with each checkpoint,
    restores it on resume, and removes the probe when training ends."""

    def __init__(self, method: SafetyAwareProbing):
        self.method = method

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if path.is_file():
            self.method.load_state_dict(torch.load(path, map_location=args.device,
                                                   weights_only=True))
        else:
            print(f"[sap] {path} not found: the probe's Adam moments restart from zero")
            self.method.micro = state.global_step * args.gradient_accumulation_steps

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            tmp = path.with_suffix(".tmp")
            torch.save(self.method.state_dict(), tmp)
            tmp.replace(path)

    def on_train_end(self, args, state, control, **kwargs):
        self.method.probe.remove()


