"""constrained_sft: token-wise constrained fine-tuning (Qi et al., "Safety Alignment Should Be
Made More Than Just a Few Tokens Deep", arXiv 2406.05946; code Unispac/shallow-vs-deep-alignment).

The objective replaces cross-entropy by -sum_t (2 / beta_t) log sigmoid(beta_t * (log pi(y_t) -
log pi_ref(y_t))), whose gradient is cross-entropy scaled per token by 2 (1 - sigmoid(beta_t
Delta_t)): once the fine-tuned model already beats the initial (aligned) model on a token, that
token's update fades. A large beta_t on the first few response tokens keeps exactly the tokens
that carry the refusal decision close to the aligned model, while later tokens train almost
like plain SFT (beta_t -> 0 gives weight 1).

Hooks: `setup` (reference log-probs, precomputed once into the `ref_logprobs` aux column, or a
`Reference` for per-step reference passes) and `task_loss` (owns_task_loss: replaces the CE
term, logged as loss/constrained_sft; plain CE is still logged as loss/ce).

As in the reference code (methods.md 5.1): per-token loss -w_t log pi(y_t) with the weight
w_t = max(2 (1 - sigmoid(beta_t Delta_t)), min_weight) detached, mean over all response tokens
of the batch (the optimiser step's: under gradient accumulation and data parallelism the token
sum is divided by the step's loss-token count, as transformers does for cross-entropy, so that
beta = 0 is exactly plain SFT), the same beta_t schedule (`beta_schedule`), and reference log-probs
precomputed with the initial model. Alignment convention of the `ref_logprobs` column: it is
aligned with the labels, i.e. the value at position t is log pi_ref(token t | tokens < t), and
0.0 where token t is not a response token.

Multi-turn data: the response index t restarts at the first token of each assistant turn (each
contiguous run of labelled tokens), so the refusal-carrying first tokens of every turn get the
large beta_t; with ``loss_on: last_turn`` only the final turn is labelled. The paper's data is
single-turn, where this is its index.

Recommended optimiser settings: the paper fine-tunes with AdamW, beta1 = 0.5, beta2 = 0.999,
learning rate 2e-5 (Llama-2-7B-chat, full fine-tuning); set `optim.adam_beta1: 0.5` to follow it
(stayaligned's default beta1 is 0.9).

Departures: the per-turn restart of t above (the reference code runs t through all labelled
tokens of a sequence, which only differs with several assistant turns); precomputation runs on every process of
a data-parallel run (each needs the column for its own items) instead of gathering; with
precompute=false the reference is recomputed each step (LoRA: adapters disabled; full
fine-tuning: a frozen copy).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from stayaligned.config import ConfigError
from stayaligned.methods.answer_start import warn_template_prefix
from stayaligned.methods.base import Method
from stayaligned.methods.reference import Reference, as_initial
from stayaligned.precision import autocast
from stayaligned.training.collate import AUX, PadCollator
from stayaligned.training.losses import constrained_sft_loss, label_logprobs

COLUMN = "ref_logprobs"


@dataclass(frozen=True)
class ConstrainedSftOptions:
    beta: float = 0.1  # beta_t for response tokens after the first bias_length
    bias_length: int = 5  # how many leading response tokens get the larger beta
    bias_factor: float = 20  # beta_2..beta_{bias_length} = beta * bias_factor
    first_token_bias_factor: float = 5  # beta_1 = beta * first_token_bias_factor
    min_weight: float = 1e-3  # floor of the per-token weight
    precompute: bool = True  # reference log-probs once in setup (no extra forward per step)

    def __post_init__(self):
        if self.beta < 0 or self.bias_factor < 0 or self.first_token_bias_factor < 0:
            raise ConfigError("options.constrained_sft: beta, bias_factor and "
                              "first_token_bias_factor must be >= 0")
        if self.bias_length < 0:
            raise ConfigError(f"options.constrained_sft.bias_length={self.bias_length}: "
                              "must be >= 0")
        if not 0 <= self.min_weight <= 2:
            raise ConfigError(f"options.constrained_sft.min_weight={self.min_weight}: the "
                              "weight lies in [0, 2]; choose a floor inside it (default 1e-3)")


@torch.no_grad()
def reference_logprobs(model, items, pad_token_id: int, batch_size: int,
                       autocast=nullcontext) -> list[list[float]]:
    """Per item, the initial model's log-prob of each label token, aligned with its input_ids
    (0.0 where not a response token). `model` must still be the initial model (as in setup)."""
    collate = PadCollator(pad_token_id)
    values: list[list[float]] = []
    with as_initial(model) as module:
        device = next(module.parameters()).device
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate([{"input_ids": it.input_ids, "labels": it.labels} for it in chunk])
            with autocast():
                logits = module(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device),
                                use_cache=False).logits
            logp = label_logprobs(logits, batch["labels"].to(device)).cpu()
            values += [logp[row, : len(it.input_ids)].tolist() for row, it in enumerate(chunk)]
    return values


class ConstrainedSft(Method):
    name = "constrained_sft"
    options_cls = ConstrainedSftOptions
    owns_task_loss = True

    def __init__(self, options: ConstrainedSftOptions, seed: int = 0):
        super().__init__(options, seed)
        self.reference: Reference | None = None
        self.ready = False

    def setup(self, ctx: dict) -> None:
        model, trainer = ctx["model"], ctx["trainer"]
        if self.options.bias_length:
            warn_template_prefix(
                self.name, f"the large beta_t of the first {self.options.bias_length} answer "
                "tokens", ctx["tokenizer"], trainer.train_dataset.items,
                ctx.get("train_examples", ()), trainer.is_world_process_zero())
        if not self.options.precompute:
            self.reference = Reference(model)
        else:
            dataset = trainer.train_dataset
            # the trainer's own autocast (model.precision), under which the trained log-probs
            # are computed: the accelerator's is a no-op (TrainingArguments(bf16=False)), and
            # float32 reference log-probs would make Delta_t != 0 and w_t != 1 at step 0
            values = reference_logprobs(
                model, dataset.items, ctx["tokenizer"].pad_token_id,
                trainer.args.per_device_train_batch_size,
                lambda: autocast(getattr(trainer, "precision", None)),
            )
            dataset.add_column(COLUMN, values)
        self.ready = True

    def task_loss(self, model, batch: dict, outputs, num_items_in_batch=None):
        if not self.ready:
            raise RuntimeError("constrained_sft: setup() must run before training (it "
                               "computes the reference log-probs)")
        labels = batch["labels"]
        if self.reference is None:
            ref_logp = batch[AUX + COLUMN]
        else:
            ref_logp = label_logprobs(self.reference.logits(model, batch), labels)
        o = self.options
        loss, nll = constrained_sft_loss(
            outputs.logits, labels, ref_logp, beta=o.beta, bias_length=o.bias_length,
            bias_factor=o.bias_factor, first_token_bias_factor=o.first_token_bias_factor,
            min_weight=o.min_weight, return_nll=True, num_items=num_items_in_batch,
        )
        return loss, {"ce": nll}
