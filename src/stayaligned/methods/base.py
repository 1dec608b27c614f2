"""The hook protocol every method implements (no-op defaults), and how methods stack.

| hook | contract |
|---|---|
| `attach(tokenizer, config)` | once, before any data transform (e.g. to measure in tokens) |
| `transform_example(ex)` | pure, deterministic given the seed; training data only |
| `transform_dataset(exs)` | the whole list (default: `transform_example` on each); may add |
| `train_template()` / `eval_template()` | a template name, or None to leave it to the config |
| `setup(ctx)` | once, after the model is built and before training (e.g. mine tokens) |
| `task_loss(model, batch, outputs[, num_items_in_batch])` | replaces the cross-entropy term (`owns_task_loss = True`) |
| `extra_losses(model, batch, outputs)` | named loss terms, summed and logged by name |
| `training_step(ctx)` | only for a method with `owns_training_step = True` |

Stacking rules: data transforms run in list order; at most one method sets the train template
and at most one the eval template; at most one replaces the task loss; at most one owns the
training step; conflicts are errors naming both methods. Extra loss terms are per-micro-batch
means, which the trainer scales by 1 / the gradient-accumulation steps; a replaced task loss is a
token mean over the whole optimiser step when the trainer passes the step's token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stayaligned.config import ConfigError, from_dict
from stayaligned.data.types import Example


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass
class StepContext:
    """What a method that owns the training step gets from the trainer."""

    trainer: Any
    model: torch.nn.Module
    inputs: dict
    num_items_in_batch: Any
    default_step: Any  # callable(): the standard step (forward, losses, backward) -> loss


class Method:
    """Base class: every hook is a no-op. Subclasses set `name` and `options_cls`."""

    name = "base"
    options_cls: type = NoOptions
    owns_training_step = False
    owns_task_loss = False
    # runs the model outside the run's autocast (SAP's fp32 probe, STR's fp32 mining), so a
    # LoRA run keeps its frozen base in float32 (training.run._hold_frozen_base)
    needs_float32_base = False

    def __init__(self, options: Any, seed: int = 0):
        self.options = options
        self.seed = seed

    def attach(self, tokenizer, config) -> None:
        """Called once before the data transforms, with the tokenizer and the TrainConfig."""

    def transform_example(self, example: Example) -> Example:
        return example

    def transform_dataset(self, examples: list[Example]) -> list[Example]:
        return [self.transform_example(ex) for ex in examples]

    def train_template(self) -> str | None:
        return None

    def eval_template(self) -> str | None:
        return None

    def setup(self, ctx: dict) -> None:
        """Called once before training with {model, tokenizer, config, output_dir,
        train_examples, trainer}. `trainer.train_dataset.add_column(name, values)` attaches a
        per-item list of floats that reaches the loss hooks as batch["aux_<name>"] (padded
        with 0.0, like input_ids); the model never sees aux_ columns."""

    def task_loss(self, model, batch: dict, outputs, num_items_in_batch=None):
        """The loss that replaces cross-entropy, or (loss, {name: value}) with values to log;
        `outputs` come from a forward without labels, so the model's own cross-entropy is not
        computed. With `num_items_in_batch` (the loss tokens of the whole optimiser step, as
        transformers counts them for cross-entropy), the sum of the per-token losses divided by
        it, and the logged values likewise; without it (the trainer passes it only when
        transformers does the accumulation scaling that way), the micro-batch token mean."""
        raise NotImplementedError(f"method {self.name} does not replace the task loss")

    def extra_losses(self, model, batch: dict, outputs) -> dict[str, torch.Tensor]:
        return {}

    def training_step(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name} does not own the training step")


def build_methods(names: tuple[str, ...], options: dict, seed: int, registry: dict) -> list[Method]:
    """Instantiate the listed methods with their option blocks and check they can stack."""
    unknown = [n for n in names if n not in registry or not _importable(registry, n)]
    if unknown:
        raise ConfigError(
            f"methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(registry))}"
        )
    stray = sorted(set(options) - set(names))
    if stray:
        raise ConfigError(
            f"options: block(s) for {', '.join(stray)}, which are not in methods {list(names)}"
        )
    methods = []
    for name in names:
        cls = registry[name]
        opts = from_dict(cls.options_cls, options.get(name), f"options.{name}")
        methods.append(cls(opts, seed))
    check_compatible(methods)
    return methods


def _importable(registry, name: str) -> bool:
    try:
        registry[name]
    except (ImportError, AttributeError):
        return False
    return True


def check_compatible(methods: list[Method]) -> None:
    """Reject stacks where two methods claim the same single slot."""
    slots = {
        "owns the training step": [m for m in methods if m.owns_training_step],
        "replaces the task loss": [m for m in methods if m.owns_task_loss],
        "sets the train template": [m for m in methods if m.train_template()],
        "sets the eval template": [m for m in methods if m.eval_template()],
    }
    for what, claimants in slots.items():
        if len(claimants) > 1:
            a, b = claimants[0].name, claimants[1].name
            raise ConfigError(f"methods {a} and {b} cannot be stacked: both {what}")
    seen = set()
    for m in methods:
        if m.name in seen:
            raise ConfigError(f"methods: {m.name} is listed twice")
        seen.add(m.name)
