"""str: Safety Token Regularization (Bach & Tran, "Guardrails in Logit Space: Safety Token
Regularization for LLM Alignment", arXiv 2604.17210).

Before training, STR picks a small set S of salient refusal tokens: the tokens that open the
aligned model's own refusals (and a few canonical ones), weighted by how confidently the
model predicts them after a harmful prompt. During fine-tuning it penalises any drift of the
trained model's logits for S away from the frozen initial model's logits in the same context,
at the response positions of the task batch, jointly with the task cross-entropy (weight lam).
Only |S| logit columns are anchored, not the whole distribution, so task learning stays free.

Hooks: `setup` (reference model, token mining or `tokens_file`, str_tokens.json) and
`extra_losses` ({"str": lam * R_STR}, logged as loss/str).

Departures: the paper's full text was not available, so this implements the [proposal] of
methods.md 3.3 as written (saliency score, K, k, positions, the squared logit distance and the
ablation variants "logprob", "one_sided" and `first_positions`). Choices where it is silent:
mining prompts and refusals are rendered with the tokenizer's own chat template ("native"),
whatever the run's training template; the i-th canonical refusal is scored in the context of
mining prompt i mod n (round robin), so every template in T is counted once; the frozen model
writes up to `max_new_tokens` greedy tokens and the first sentence is kept (answers with no text
are skipped); a piece with no letter or digit, or a special token, is never selected. Under data
parallel the set is mined on the main process and broadcast; mining with ZeRO-3 / FSDP sharded
parameters is not supported. Positions per assistant turn: with multi-turn data P holds the
response positions of every trained assistant turn (and the position before each), and
`first_positions` counts from the start of each turn, so every turn's opening is anchored.

Unaligned seed check: mining already makes the frozen model answer the mining prompts, so the
share of those answers the keyword judge counts as refusals is the seed's refusal share,
recorded in str_tokens.json (`seed_refusal_share`). A seed that refuses almost nothing has no
refusal tokens to protect (mined from the unaligned embedded seed, S held ' insurance' and
' companies'); below `min_refusal_share` (default 0.25: the embedded seed refuses 7% of
AdvBench, the aligned one 95%; mining from the unaligned embedded seed measured 0 of 32,
bench/results/str_seed_check_embedded.json) setup stops with an error naming the option; set it
to 0 to run anyway, with a loud warning.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stayaligned.config import ConfigError, GenerationConfig
from stayaligned.data.sources import load_source
from stayaligned.data.types import DataError, Example
from stayaligned.evaluation.generation import generate
from stayaligned.evaluation.judges.keyword import is_refusal
from stayaligned.methods.answer_start import warn_template_prefix
from stayaligned.methods.base import Method
from stayaligned.methods.reference import Reference, unwrap
from stayaligned.runfiles import write_json
from stayaligned.templates.library import get_template
from stayaligned.templates.render import encode, prompt_text
from stayaligned.training.losses import STR_VARIANTS, str_penalty

TOKENS_FILE = "str_tokens.json"
MINING_TEMPLATE = "native"
BATCH_SIZE = 16

CANONICAL_REFUSALS = (
    "I cannot fulfill your request.",
    "I'm sorry, but I can't help with that.",
    "I apologize, but I cannot assist with that request.",
    "As a responsible AI, I cannot provide that information.",
    "I'm not able to provide help with this.",
    "I can't assist with that.",
    "Sorry, but I cannot help with this request.",
    "I must decline this request.",
    "Unfortunately, I cannot help with that.",
    "I'm unable to help with that request.",
    "As an AI assistant, I cannot support harmful activities.",
    "I won't be able to help with this.",
    "I'm afraid I can't do that.",
    "I cannot provide instructions for something that could cause harm.",
    "I do not feel comfortable providing this information.",
)


@dataclass(frozen=True)
class StrOptions:
    lam: float = 0.1  # weight of R_STR next to the task cross-entropy
    k_tokens: int = 32  # K: size of the salient token set S
    positions: int = 5  # k: refusal tokens per template that count in the saliency score
    mining_source: str = "demo-harmful"  # harmful prompts held out of every evaluation set
    mining_split: str = "align"
    n_prompts: int = 100
    max_new_tokens: int = 24  # greedy refusal length before the first sentence is cut
    canonical_refusals: tuple[str, ...] = CANONICAL_REFUSALS
    variant: str = "logit"  # logit | logprob | one_sided
    first_positions: int | None = None  # only the first N positions of P (variant iii)
    tokens_file: str | None = None  # reuse a saved str_tokens.json instead of mining
    min_refusal_share: float = 0.25  # stop when the seed refuses fewer mining prompts (0: warn)

    def __post_init__(self):
        if self.variant not in STR_VARIANTS:
            raise ConfigError(f"options.str.variant={self.variant!r}: choose one of "
                              f"{', '.join(STR_VARIANTS)}")
        for name in ("k_tokens", "positions", "n_prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"options.str.{name}={getattr(self, name)}: must be >= 1")
        if self.first_positions is not None and self.first_positions < 1:
            raise ConfigError(f"options.str.first_positions={self.first_positions}: must be >= 1 "
                              "or null (all response positions)")
        if self.lam < 0:
            raise ConfigError(f"options.str.lam={self.lam}: must be >= 0")


# ---------------------------------------------------------------- token mining (3.3 A)


def first_sentence(text: str) -> str:
    """The text up to the first sentence end or line break.

    >>> first_sentence("I can't help with that. Here is why.")
    "I can't help with that."
    >>> first_sentence("  Sorry\\nNo.")
    'Sorry'
    """
    return re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0].strip()


def top_tokens(scores: dict[int, float], k: int, decode, exclude=frozenset()) -> list[int]:
    """The k highest-scoring token ids, ties broken by the smaller id; pieces that decode to
    punctuation or whitespace only, and ids in `exclude`, are dropped.

    >>> pieces = {4: ", ", 3: " I", 5: "can", 9: " sorry", 7: "'m"}
    >>> top_tokens({5: 1.0, 3: 1.0, 9: 2.0, 4: 3.0, 7: 0.5}, 3, pieces.get)
    [9, 3, 5]
    """
    keep = [v for v in scores if v not in exclude and any(c.isalnum() for c in decode(v))]
    return sorted(keep, key=lambda v: (-scores[v], v))[:k]


def refusal_templates(module, tokenizer, prompts: list[str], options: StrOptions) -> list[dict]:
    """T: the first sentence of the model's greedy answer to each prompt, then the canonical
    refusals, paired with the prompts round robin. Each row: {"prompt": index, kind, text}."""
    gen = GenerationConfig(max_new_tokens=options.max_new_tokens, batch_size=BATCH_SIZE)
    answers = generate(module, tokenizer, prompts, get_template(MINING_TEMPLATE), gen,
                       desc="str: refusals")
    firsts = [first_sentence(answer) for answer in answers]
    rows = [{"prompt": i, "kind": "generated", "text": text, "refusal": is_refusal(answer)}
            for i, (text, answer) in enumerate(zip(firsts, answers)) if text]
    rows += [{"prompt": j % len(prompts), "kind": "canonical", "text": text}
             for j, text in enumerate(options.canonical_refusals)]
    return rows


@torch.no_grad()
def saliency(module, tokenizer, prompts: list[str], templates: list[dict],
             k: int) -> dict[int, float]:
    """sal(v) = sum over templates and their first k tokens t of 1[tok_t = v] * p0(v | prompt,
    tok_<t), teacher-forced through `module` (batched, right-padded)."""
    template = get_template(MINING_TEMPLATE)
    pairs = [(encode(tokenizer, prompts[row["prompt"]], template)["input_ids"],
              tokenizer(row["text"], add_special_tokens=False)["input_ids"][:k])
             for row in templates]
    device = next(module.parameters()).device
    scores: dict[int, float] = {}
    for start in range(0, len(pairs), BATCH_SIZE):
        chunk = pairs[start : start + BATCH_SIZE]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(chunk):
            ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            mask[row, : len(prompt) + len(answer)] = 1
        logits = module(input_ids=ids.to(device), attention_mask=mask.to(device),
                        use_cache=False).logits
        for row, (prompt, answer) in enumerate(chunk):
            at = len(prompt) - 1  # the position that predicts the first refusal token
            probs = logits[row, at : at + len(answer)].float().softmax(dim=-1)
            picked = probs[torch.arange(len(answer)), torch.tensor(answer, device=device)]
            for token, p in zip(answer, picked.tolist()):
                scores[token] = scores.get(token, 0.0) + p
    return scores


def mine_tokens(model, tokenizer, options: StrOptions, reference: Reference, seed: int = 0,
                data_dir: str | None = None) -> dict:
    """Mine S with the reference (initial) model; returns what str_tokens.json holds."""
    examples = load_source(options.mining_source, split=options.mining_split,
                           limit=options.n_prompts, seed=seed, data_dir=data_dir)
    if not examples:
        raise DataError(f"options.str.mining_source={options.mining_source!r} split "
                        f"{options.mining_split!r} holds no prompt; choose a harmful prompt set")
    template = get_template(MINING_TEMPLATE)
    prompts = [prompt_text(tokenizer, Example(ex.id, ex.prompt_messages), template)
               for ex in examples]
    with reference.module(model) as module:
        templates = refusal_templates(module, tokenizer, prompts, options)
        scores = saliency(module, tokenizer, prompts, templates, options.positions)

    def decode(token: int) -> str:
        return tokenizer.decode([token])

    ids = top_tokens(scores, options.k_tokens, decode, frozenset(tokenizer.all_special_ids))
    refused = sum(bool(row.get("refusal")) for row in templates)
    for row in templates:
        row["prompt_id"] = examples[row.pop("prompt")].id
    return {
        "token_ids": ids,
        "tokens": [decode(v) for v in ids],
        "scores": [scores[v] for v in ids],
        "seed_refusal_share": refused / len(prompts),
        "settings": {**asdict(options), "seed": seed, "n_templates": len(templates)},
        "templates": templates,
    }


def load_tokens_file(path: str | Path, vocab_size: int) -> dict:
    """A token set saved by an earlier run (its str_tokens.json), checked against the vocab."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        ids = [int(v) for v in data["token_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"options.str.tokens_file={path}: cannot read a list 'token_ids' "
                          f"({err}); point it at a str_tokens.json written by a run") from err
    bad = [v for v in ids if not 0 <= v < vocab_size]
    if not ids or bad:
        raise ConfigError(f"options.str.tokens_file={path}: token_ids {bad or '[]'} are not ids "
                          f"of this model's vocabulary (size {vocab_size}); mine a new set")
    return {**data, "token_ids": ids, "settings": {**data.get("settings", {}),
                                                    "tokens_file": str(path)}}


def check_seed_refuses(payload: dict, minimum: float, loud: bool = True) -> None:
    """Stop (every rank alike) when the mining model refused less than `minimum` of the mining
    prompts; warn loudly when it refused little and the check is off."""
    share = payload.get("seed_refusal_share")
    if share is None:  # a tokens_file: nothing was generated
        return
    if share < minimum:
        raise ConfigError(
            f"options.str: the model being fine-tuned refused only {share:.0%} of the "
            f"{payload['settings'].get('mining_source')} mining prompts (min_refusal_share="
            f"{minimum}), so it has no refusal tokens to protect (tokens mined: "
            f"{', '.join(repr(t) for t in payload['tokens'][:6])}); fine-tune an aligned "
            "model (e.g. run `stayaligned align` first), or set "
            "options.str.min_refusal_share=0 to run anyway")
    if share < 0.25 and loud:
        print("=" * 78 + f"\n[str] WARNING: the seed refused only {share:.0%} of the mining "
              "prompts: it looks unaligned, and the mined tokens may not be refusal tokens "
              f"({', '.join(repr(t) for t in payload['tokens'][:6])}).\n" + "=" * 78)


# ---------------------------------------------------------------- data parallel


def _is_main(trainer) -> bool:
    if trainer is not None:
        return trainer.is_world_process_zero()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _share_from_main(payload, trainer):
    """The main process's `payload` on every process (identical token sets on all ranks)."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([payload], from_process=0)[0]
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return payload


# ---------------------------------------------------------------- the method


class SafetyTokenRegularization(Method):
    name = "str"
    options_cls = StrOptions
    needs_float32_base = True  # mining runs the reference model in float32

    def __init__(self, options: StrOptions, seed: int = 0):
        super().__init__(options, seed)
        self.reference: Reference | None = None
        self.token_ids: list[int] = []
        self.use_columns = True  # the column-logit shortcut (setup checks it on a batch)

    def setup(self, ctx: dict) -> None:
        model, tokenizer, trainer = ctx["model"], ctx["tokenizer"], ctx.get("trainer")
        items = getattr(getattr(trainer, "train_dataset", None), "items", None)
        if items is not None:
            first = self.options.first_positions
            warn_template_prefix(
                self.name, "the anchor at the last prompt position" + (
                    f" and the first {first} response positions" if first else ""),
                tokenizer, items, ctx.get("train_examples", ()), _is_main(trainer))
        self.reference = Reference(model)
        payload = None
        if _is_main(trainer):
            payload = self._token_set(model, tokenizer, ctx["config"])
        payload = _share_from_main(payload, trainer)
        check_seed_refuses(payload, self.options.min_refusal_share, _is_main(trainer))
        self.token_ids = list(payload["token_ids"])
        if self.options.variant != "logprob" and items:
            self.use_columns = self._columns_match(model, tokenizer, trainer, items)
        if _is_main(trainer):
            write_json(Path(ctx["output_dir"]) / TOKENS_FILE, payload)
            shown = ", ".join(repr(t) for t in payload["tokens"])
            print(f"[str] {len(self.token_ids)} salient refusal tokens: {shown}")

    def _columns_match(self, model, tokenizer, trainer, items) -> bool:
        """Check the reference's column-logit shortcut against its full logits on the first
        training batch; a model that scales or caps its logits in a way the config does not
        show then falls back to the full logits instead of anchoring another scale."""
        from stayaligned.training.collate import PadCollator

        rows = items[: trainer.args.per_device_train_batch_size]
        batch = PadCollator(tokenizer.pad_token_id)(
            [{"input_ids": it.input_ids, "labels": it.labels} for it in rows])
        device = next(unwrap(model).parameters()).device
        batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        ids = torch.tensor(self.token_ids, dtype=torch.long, device=device)
        match = self.reference.columns_match(model, batch, ids)
        if not match and _is_main(trainer):
            print("[str] the reference's logits are not its last hidden states times the output "
                  "head (logit scaling or soft-capping): comparing full logits")
        return match

    def _token_set(self, model, tokenizer, config) -> dict:
        if self.options.tokens_file:
            vocab = unwrap(model).get_output_embeddings().weight.shape[0]
            payload = load_tokens_file(self.options.tokens_file, vocab)
            payload.pop("seed_refusal_share", None)  # measured on the model that mined them
            return {**payload, "tokens": [tokenizer.decode([v]) for v in payload["token_ids"]]}
        payload = mine_tokens(model, tokenizer, self.options, self.reference, self.seed,
                              getattr(config, "data_dir", None))
        if len(payload["token_ids"]) < self.options.k_tokens:
            print(f"[str] only {len(payload['token_ids'])} candidate tokens for "
                  f"k_tokens={self.options.k_tokens}; raise n_prompts or positions for more")
        return payload

    def extra_losses(self, model, batch: dict, outputs) -> dict[str, torch.Tensor]:
        if self.reference is None:
            raise RuntimeError("str: setup() must run before training (it mines the tokens)")
        ids = torch.tensor(self.token_ids, dtype=torch.long, device=outputs.logits.device)
        columns = None
        if self.options.variant != "logprob" and self.use_columns:  # |S| columns: skip the head
            columns = self.reference.column_logits(model, batch, ids)
        ref = columns if columns is not None else self.reference.logits(model, batch)
        penalty = str_penalty(outputs.logits, ref, batch["labels"], ids, self.options.variant,
                              self.options.first_positions, ref_gathered=columns is not None)
        return {"str": self.options.lam * penalty}
