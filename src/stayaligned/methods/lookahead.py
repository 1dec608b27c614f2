"""lookahead: "LookAhead Tuning: Safer Language Models via Partial Answer Previews"
(Liu et al., arXiv 2503.19041; code zjunlp/LookAheadTuning).

Fine-tuning mostly changes the distribution of a model's first answer tokens, and that is
where shallow safety alignment lives. LookAhead Tuning previews the start of the answer in the
instruction, so the first answer tokens become easy to predict and the training loss, and with
it the change to the model, stays small there. The *real* mode copies the first m tokens of
the answer into the prompt; the *virtual* mode puts a fixed prefix P in the prompt and also
makes the answer start with it (methods.md 1.2).

Hooks: `attach` (keeps the model's tokenizer, to count m tokens as the model does) and
`transform_example` (training data only; evaluation prompts never pass through it, as in the
paper, where inference data is unchanged). Loss masking needs no hook: in real mode the preview
sits in the user turn and gets no loss, in virtual mode P is part of the assistant turn and
does (methods.md 1.4).

Multi-turn data (`options.lookahead.turns`): the paper's data is single-turn (the code reads a
JSON `input`/`output` pair). With ``turns: every`` (default) each assistant turn O_i is
previewed in the user message just before it, so every trained answer starts easy to predict
(the loss is on every assistant turn unless ``loss_on: last_turn``); ``first`` previews only the
first assistant turn, ``last`` only the final one (train with ``loss_on: last_turn`` then). A
system message and the turns not previewed are kept unchanged. Single-turn data is the same
under all three.

Recommended optimiser settings: the paper fine-tunes with AdamW, beta1 = 0.5 and
beta2 = 0.999 (`optim.adam_beta1: 0.5`), learning rate 2e-5 (full fine-tuning of 7B models);
stayaligned's defaults are beta1 0.9 and lr 1e-4 (LoRA); set them to follow the paper.

Departures from the paper and its code:
- I is the content of a user message and O the assistant message that answers it.
- The preview is `tokenizer.convert_tokens_to_string(tokenizer.tokenize(O)[:m])` with the
  fine-tuned model's own tokenizer, as in the code. The paper used Llama-2's sentencepiece
  tokenizer, whose pieces start with "▁" for a space; byte-level BPE tokenizers (SmolLM2,
  GPT-2 style) use "Ġ" and split digits one by one, so the same m previews a different amount
  of text. `convert_tokens_to_string` turns both kinds of piece back into text. A cut inside a
  multi-byte character gives the replacement character, as the reference code would.
- P defaults to the code's ``"Let's solve this problem. "``; the README example's variant with
  a leading space (``" Let's solve this problem. "``) is `options.lookahead.prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stayaligned.config import ConfigError
from stayaligned.data.types import DataError, Example
from stayaligned.methods.base import Method

MODES = ("real", "virtual")
TURNS = ("every", "first", "last")


@dataclass(frozen=True)
class LookAheadOptions:
    """`mode` real | virtual; `m` previewed tokens (real); `prefix` P (virtual); `connector` C;
    `turns` every | first | last: which assistant turns of a conversation are previewed."""

    mode: str = "real"
    m: int = 6
    prefix: str = "Let's solve this problem. "
    connector: str = " The answer begins with: "
    turns: str = "every"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"options.lookahead.mode: {self.mode!r} is not a mode; choose real or virtual"
            )
        if self.turns not in TURNS:
            raise ConfigError(f"options.lookahead.turns: {self.turns!r}: choose every, first "
                              "or last")
        if self.m < 1:
            raise ConfigError(
                f"options.lookahead.m: {self.m} previews no token; set m to 1 or more "
                "(the paper uses 6)"
            )


def real_preview(
    instruction: str, output: str, tokenizer, m: int, connector: str
) -> tuple[str, str]:
    """Real answer preview: (I + C + first m tokens of O, O).

    >>> class Words:  # a stand-in tokenizer whose tokens are whitespace-separated words
    ...     def tokenize(self, text): return text.split()
    ...     def convert_tokens_to_string(self, tokens): return " ".join(tokens)
    >>> real_preview("What is 2 + 3?", "2 + 3 = 5.", Words(), 3, " The answer begins with: ")
    ('What is 2 + 3? The answer begins with: 2 + 3', '2 + 3 = 5.')
    """
    preview = tokenizer.convert_tokens_to_string(tokenizer.tokenize(output)[:m])
    return instruction + connector + preview, output


def virtual_preview(instruction: str, output: str, prefix: str, connector: str) -> tuple[str, str]:
    """Virtual answer preview: (I + C + P, P + O).

    >>> instruction, output = virtual_preview(
    ...     "What is 2 + 3?", "2 + 3 = 5.",
    ...     prefix="Let's solve this problem. ", connector=" The answer begins with: ")
    >>> instruction
    "What is 2 + 3? The answer begins with: Let's solve this problem. "
    >>> output
    "Let's solve this problem. 2 + 3 = 5."
    """
    return instruction + connector + prefix, prefix + output


class LookAhead(Method):
    name = "lookahead"
    options_cls = LookAheadOptions

    def __init__(self, options: LookAheadOptions, seed: int = 0):
        super().__init__(options, seed)
        self._tokenizer = None

    def attach(self, tokenizer, config) -> None:
        self._tokenizer = tokenizer

    def transform_example(self, example: Example) -> Example:
        messages = example.messages
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{example.id}: lookahead needs an assistant answer to preview, but the last "
                "message is not an assistant turn; drop prompt-only records from the training "
                "data or map the answer field (data.*.fields.assistant)"
            )
        pairs = [(i - 1, i) for i, msg in enumerate(messages)
                 if msg["role"] == "assistant" and i > 0 and messages[i - 1]["role"] == "user"]
        if not pairs:
            raise DataError(
                f"{example.id}: lookahead puts the preview in the user message before an answer, "
                "but the example has none; map the prompt field (data.*.fields.user)"
            )
        chosen = {"every": pairs, "first": pairs[:1], "last": pairs[-1:]}[self.options.turns]
        new = list(messages)
        for user, answer in chosen:
            instruction, output = self._preview(messages[user]["content"],
                                                messages[answer]["content"])
            new[user] = {**messages[user], "content": instruction}
            new[answer] = {**messages[answer], "content": output}
        return replace(example, messages=tuple(new))

    def _preview(self, instruction: str, output: str) -> tuple[str, str]:
        o = self.options
        if o.mode == "virtual":
            return virtual_preview(instruction, output, o.prefix, o.connector)
        if self._tokenizer is None:
            raise RuntimeError(
                "lookahead in real mode counts tokens with the model's tokenizer: call "
                "attach(tokenizer, config) before transforming data"
            )
        return real_preview(instruction, output, self._tokenizer, o.m, o.connector)
