"""safety_mix: "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models
that Follow Instructions" (Bianchi et al., arXiv 2309.07875; data vinid/safety-tuned-llamas),
as the safety-data mixing baseline of PTST (Lyu et al., arXiv 2402.18540, methods.md 4.4).

Fine-tuning on benign task data erodes a model's refusals. Mixing a modest number of
safety examples (harmful instruction paired with a safe answer) into the fine-tuning data
keeps the model refusing harmful requests like those it saw, though PTST reports that it does
not fully carry over to out-of-distribution ones (GSM-Danger). The mixed-in examples are trained
exactly like the task data, with the run's template and loss.

Hooks: `attach` loads the safety examples (any `load_source` source, with the run's data_dir)
and checks them; `transform_dataset` returns the task examples plus `n` of them, shuffled
together with `random.Random(seed)`.

Multi-turn data: the task conversations are kept whole and the safety examples (single-turn
refusals) are mixed in as examples of their own; each is rendered and masked per assistant turn
like any other example.

Departures from the papers: PTST mixes in all 2,483 examples of Bianchi et al.'s
`safety_only_data_Instructions.json` (source `safety-tuned-llamas` with data_dir, n=-1);
the default here is 100 examples of the bundled `demo-safety` set, so that a run works offline.
Which n examples are used is drawn with the same seed; how PTST ordered the mix is not known,
so the combined list is shuffled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stayaligned.config import ConfigError
from stayaligned.data.sources import load_source
from stayaligned.data.types import DataError, Example
from stayaligned.methods.base import Method


@dataclass(frozen=True)
class SafetyMixOptions:
    """`source`/`split` of the safety set; `n` examples to mix in (None or -1: all); `seed`."""

    source: str = "demo-safety"
    split: str = "train"
    n: int | None = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n is not None and (self.n == 0 or self.n < -1):
            raise ConfigError(
                f"options.safety_mix.n: {self.n} is not a number of examples; use a positive "
                "number, or -1 (or null) to mix in the whole safety set"
            )


def mix(task: list[Example], safety: list[Example], n: int | None, seed: int) -> list[Example]:
    """`task` plus `n` examples drawn from `safety` (all for None or -1), shuffled by `seed`.

    >>> task = [Example(f"task:{i}", ()) for i in range(3)]
    >>> safety = [Example(f"safe:{i}", ()) for i in range(4)]
    >>> [ex.id for ex in mix(task, safety, 2, seed=0)]
    ['safe:3', 'task:1', 'safe:1', 'task:2', 'task:0']
    """
    rng = random.Random(seed)
    if n is None or n == -1:
        chosen = list(safety)
    else:
        chosen = [safety[i] for i in sorted(rng.sample(range(len(safety)), n))]
    combined = [*task, *chosen]
    rng.shuffle(combined)
    return combined


class SafetyMix(Method):
    name = "safety_mix"
    options_cls = SafetyMixOptions

    def __init__(self, options: SafetyMixOptions, seed: int = 0):
        super().__init__(options, seed)
        self._safety: list[Example] | None = None

    def attach(self, tokenizer, config) -> None:
        o = self.options
        examples = load_source(o.source, split=o.split, data_dir=config.data_dir)
        if o.n not in (None, -1) and len(examples) < o.n:
            raise ConfigError(
                f"options.safety_mix.n: {o.n} examples asked for, but {o.source} (split "
                f"{o.split}) has only {len(examples)}; lower n or use -1 for all of them"
            )
        for example in examples:
            answer = example.content("assistant")
            if not example.messages or example.messages[-1]["role"] != "assistant" or not answer:
                raise DataError(
                    f"{example.id}: safety_mix needs safety examples with a safe assistant "
                    f"answer, but this record of {o.source} has none; use a source of "
                    "instruction -> refusal pairs (demo-safety, safety-tuned-llamas), not a "
                    "prompt-only benchmark"
                )
        self._safety = examples

    def transform_dataset(self, examples: list[Example]) -> list[Example]:
        if self._safety is None:
            raise RuntimeError(
                "safety_mix loads its safety examples in attach(tokenizer, config); call it "
                "before transforming data"
            )
        return mix(list(examples), self._safety, self.options.n, self.options.seed)
