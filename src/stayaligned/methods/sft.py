"""sft: plain supervised fine-tuning, the baseline every other method is compared against.

Token-mean cross-entropy on the assistant tokens only (completion-only SFT, as in the shared
pipeline of Qi et al. / LookAhead, methods.md section 0). It uses no hooks: the trainer's
default step is exactly this method.

Multi-turn data: the loss covers every assistant turn of a conversation (`loss_on:
all_assistant_turns`, the default) or only the final one (`loss_on: last_turn`), or each
conversation becomes one example per answer (`loss_on: each_turn`, for chat templates that
render earlier answers differently, as Qwen3's drops their thinking blocks); system and user
turns never get loss. TRL's SFTTrainer trains every token of a `messages` record unless
`assistant_only_loss` is set; stayaligned always masks to the assistant turns.
"""

from __future__ import annotations

from stayaligned.methods.base import Method


class Sft(Method):
    name = "sft"
