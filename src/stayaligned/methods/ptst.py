"""ptst: "Keeping LLMs Aligned After Fine-tuning: The Crucial Role of Prompt Templates"
(Lyu et al., arXiv 2402.18540, NeurIPS 2024; code vfleaking/PTST), "Pure Tuning, Safe Testing".

Fine-tuning with the same prompt template that is used at test time lets the task data wear
down the safety behaviour that the template's safety system prompt triggers. PTST fine-tunes
*without* a safety system prompt and adds one only at test time, an intended distribution
shift. The paper's main setting trains with chat:vanilla and tests with chat:llama
(the Llama-2 safety system prompt); its ablations test with chat:llama-short and chat:mpt.

Hooks: `train_template()` and `eval_template()` name the two templates; the training run
renders with the first and records the second in run.json, where `stayaligned eval` picks it
up. `attach` checks that both names exist and that only the eval template carries a safety
system prompt.

Departures from the paper:
- The defaults are model-agnostic: `native:nosys` (the model's own chat template with any
  system message removed) for training and `native:safe` (the same template with the Llama-2
  safety prompt) for testing. For Llama-2-chat, set train_template=chat:vanilla and
  eval_template=chat:llama, the paper's strings (templates/library.py, methods.md 4.2).
  A tokenizer whose chat template inserts a default system message when there is none
  (SmolLM2's) trains with that default under native:nosys.
- The safety-prompt check reads "safe" in the system prompt. chat:mpt's prompt ("helpful and
  honest") has no such wording, so testing with it, or running the same-template baseline,
  needs `options.ptst.check_safety_prompt: false`.
- PTST's Llama fine-tuning code was never released; the answer separator used in training is
  our choice (templates/library.py).

Multi-turn data: PTST sets the conversation's one system turn. The train template removes
every system message of the example (native:nosys, chat:vanilla) and the test template puts
the safety prompt in a single system turn before the first user turn (a string template
writes it into its first-turn prompt); later turns are rendered unchanged, and the loss covers
the assistant turns as `loss_on` says. The paper evaluates single-turn prompts only.
"""

from __future__ import annotations

from dataclasses import dataclass

from stayaligned.config import ConfigError
from stayaligned.methods.base import Method
from stayaligned.templates.library import Template, get_template


@dataclass(frozen=True)
class PtstOptions:
    """The train and test templates (names in templates/library.py) and the safety check."""

    train_template: str = "native:nosys"
    eval_template: str = "native:safe"
    check_safety_prompt: bool = True


class Ptst(Method):
    name = "ptst"
    options_cls = PtstOptions

    def train_template(self) -> str | None:
        return self.options.train_template

    def eval_template(self) -> str | None:
        return self.options.eval_template

    def attach(self, tokenizer, config) -> None:
        train = _lookup(self.options.train_template, "train_template")
        evaluate = _lookup(self.options.eval_template, "eval_template")
        if self.options.check_safety_prompt:
            check_pure_train_safe_test(train, evaluate)


def _lookup(name: str, field: str) -> Template:
    try:
        return get_template(name)
    except KeyError as err:
        raise ConfigError(f"options.ptst.{field}: {err.args[0]}") from None


def check_pure_train_safe_test(train: Template, evaluate: Template) -> None:
    """Raise unless `evaluate` has a safety system prompt and `train` has none."""
    problems = []
    if train.has_safety_prompt:
        problems.append(f"train_template {train.name} carries a safety system prompt")
    if not evaluate.has_safety_prompt:
        problems.append(f"eval_template {evaluate.name} carries no safety system prompt")
    if problems:
        raise ConfigError(
            f"options.ptst: PTST trains without and tests with a safety system prompt, but "
            f"{' and '.join(problems)} (train_template={train.name}, eval_template="
            f"{evaluate.name}); e.g. use chat:vanilla -> chat:llama or native:nosys -> "
            "native:safe, or set options.ptst.check_safety_prompt=false to run it anyway"
        )
