"""One thin trainer for every method: transformers' Trainer plus the method hooks.

The cross-entropy term comes from the model's own loss (token mean over the global batch,
which transformers computes consistently under gradient accumulation and data parallelism).
Extra terms from `Method.extra_losses` are per-micro-batch means, scaled by 1 / the number of
accumulation steps so that they too are means over the optimiser step: divided here when
transformers' `training_step` does not divide the loss itself (it does when the model takes no
loss kwargs, e.g. Gemma-4 or Qwen-VL conditional-generation classes), never twice. A method that
replaces the task loss gets the step's loss-token count (`num_items_in_batch`) and returns its
token sum over that count, so that it is a token mean over the whole optimiser step (all
micro-batches, all processes) like the cross-entropy it replaces. Every term is logged by
name. A non-finite loss stops training with the step number; the last checkpoint written
before it is kept.

Checkpoints are finite and atomic: the trainable parameters are checked before every save (a
non-finite one stops the run naming the step and the parameter, and nothing is written), and
a checkpoint is written under ``checkpoints/.staging/`` and renamed into place only when
complete, so a kill during the write never leaves a ``checkpoint-N`` that resume would pick.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import defaultdict

import torch
from transformers import Trainer

from stayaligned.methods.base import Method, StepContext
from stayaligned.precision import Precision, autocast, fp32_gemms
from stayaligned.training.collate import AUX


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteWeightsError(RuntimeError):
    """A parameter became NaN or infinite; nothing was saved from that step."""


STAGING = ".staging"


def check_finite(model, step: int, what: str) -> None:
    """Raise `NonFiniteWeightsError` if a trainable parameter (all parameters when none is
    trainable) holds a NaN or an infinity."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] or \
        list(model.named_parameters())
    for name, param in named:
        if not torch.isfinite(param.detach()).all():
            raise NonFiniteWeightsError(
                f"parameter {name} is not finite after step {step}, so the {what} was not "
                "saved; every checkpoint kept is finite. Lower optim.lr (or check the data) "
                "and start again with --overwrite, or --resume from the last checkpoint")


class StayTrainer(Trainer):
    def __init__(self, *args, methods: list[Method], precision: Precision | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.methods = methods
        self.precision = precision  # None: no autocast (the weights' own dtype)
        self.step_owner = next((m for m in methods if m.owns_training_step), None)
        self.loss_owner = next((m for m in methods if m.owns_task_loss), None)
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_counts: dict[str, int] = defaultdict(int)

    # -- loss ---------------------------------------------------------------------------

    def compute_loss_context_manager(self):
        """transformers' context plus this run's autocast (bf16 precision: float32 weights,
        bf16 matrix products; the backward follows the casts the forward recorded)."""
        stack = contextlib.ExitStack()
        stack.enter_context(super().compute_loss_context_manager())
        stack.enter_context(autocast(self.precision))
        return stack

    def _scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether transformers' `training_step` leaves the loss undivided by the accumulation
        steps (it takes the loss as already scaled): the same test `training_step` makes."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return fixed
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {k: v for k, v in inputs.items() if not k.startswith(AUX)}
        scaled = self._scaled_for_ga(num_items_in_batch)
        if self.loss_owner is not None:
            loss, outputs = self._owned_task_loss(model, inputs, model_inputs,
                                                  num_items_in_batch if scaled else None)
        else:
            loss, outputs = self._cross_entropy(model, model_inputs, num_items_in_batch)
        for method in self.methods:
            for name, term in method.extra_losses(model, inputs, outputs).items():
                self._record(name, term)
                # training_step divides an unscaled loss by the accumulation steps itself
                loss = loss + (term / self.current_gradient_accumulation_steps if scaled else term)
        return (loss, outputs) if return_outputs else loss

    def _owned_task_loss(self, model, inputs, model_inputs, num_items_in_batch):
        """A method's replacement for cross-entropy; the model runs without labels so that its
        own cross-entropy (a full-vocabulary log-softmax) is not computed for nothing.

        With `num_items_in_batch` (the step's loss tokens) the method returns its token sum
        over that count: this micro-batch's share of the step's token mean, times the process
        count under `average_tokens_across_devices` as transformers does for cross-entropy
        (data parallel averages it away). Without it, a micro-batch mean, which
        `training_step` divides by the accumulation steps."""
        outputs = model(**{k: v for k, v in model_inputs.items() if k != "labels"})
        if num_items_in_batch is None:
            result = self.loss_owner.task_loss(model, inputs, outputs)
        else:
            result = self.loss_owner.task_loss(model, inputs, outputs,
                                               num_items_in_batch=num_items_in_batch)
        task, logged = result if isinstance(result, tuple) else (result, {})
        scale = 1.0  # logged values are means
        if num_items_in_batch is not None:
            scale = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                task = task * self.accelerator.num_processes
        self._record(self.loss_owner.name, task * scale)
        for name, value in logged.items():
            self._record(name, value * scale)
        return task, outputs

    def _cross_entropy(self, model, model_inputs, num_items_in_batch):
        ce, outputs = super().compute_loss(
            model, model_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        scale = 1.0
        if num_items_in_batch is not None:
            # ce is this micro-batch's share of the step's token mean (transformers already
            # multiplies it by the process count that data parallel averages away); rescale so
            # that the logged value is a mean.
            scale = self.current_gradient_accumulation_steps
        self._record("ce", ce * scale)
        return ce, outputs

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._term_sums[name] += float(value.detach())
        self._term_counts[name] += 1

    # -- step -----------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        def default_step():
            return super(StayTrainer, self).training_step(model, inputs, num_items_in_batch)

        # the backward's bf16 products too, on a CPU without native bf16 (precision.Fp32Gemms)
        with fp32_gemms(self.precision is not None and self.precision.fp32_gemm):
            if self.step_owner is not None:
                ctx = StepContext(self, model, inputs, num_items_in_batch, default_step)
                loss = self.step_owner.training_step(ctx)
            else:
                loss = default_step()
        if not math.isfinite(float(loss.detach())):
            step = self.state.global_step + 1
            raise NonFiniteLossError(
                f"training loss is {float(loss)} at step {step}; stopped before the update. "
                "The last checkpoint written before this step is kept; lower optim.lr or "
                "check the data."
            )
        return loss

    # -- checkpoints ------------------------------------------------------------------------

    _staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Check the weights, write the checkpoint under .staging/, then rename it into place."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        check_finite(self.model, self.state.global_step, f"checkpoint at step {self.state.global_step}")
        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        # data parallel: every rank writes its own files (rng_state_<rank>.pth) into staging,
        # so none may start before the main process has cleared it, nor the main process rename
        # it before all have finished (transformers puts no barrier here)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(os.path.join(staging, name), final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    # -- logging --------------------------------------------------------------------------

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for name, total in self._term_sums.items():
                logs[f"loss/{name}"] = round(total / max(self._term_counts[name], 1), 6)
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, *args, **kwargs)
