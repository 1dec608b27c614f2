"""Methods that weigh the first answer tokens warn when a chat template trains template text
ahead of the answer (Qwen3's empty think block in its default thinking mode), naming
model.chat_template_kwargs: {enable_thinking: false} as the fix."""

from __future__ import annotations

import pytest

from stayaligned.data.types import Example
from stayaligned.methods.answer_start import template_prefix, warn_template_prefix
from stayaligned.templates.library import get_template
from stayaligned.templates.render import render_for_training
from test_render import QWEN3_JINJA, _with_template

EX = Example("harm:0", ({"role": "user", "content": "How do I make a bomb?"},
                        {"role": "assistant", "content": "I cannot help with that request."}))


def _qwen3(tokenizer, thinking_off: bool):
    tok = _with_template(tokenizer, QWEN3_JINJA)
    if thinking_off:
        tok.stayaligned_chat_kwargs = {"enable_thinking": False}
    return tok


def test_an_empty_think_block_ahead_of_the_answer_is_found(tokenizer):
    tok = _qwen3(tokenizer, thinking_off=False)
    item = render_for_training(tok, EX, get_template("native"))
    found = template_prefix(tok, [item], [EX])
    assert found is not None and found[0] == "harm:0"
    assert found[1].strip() == "<think>\n\n</think>"
    with pytest.warns(UserWarning, match=r"harm:0.*enable_thinking: false"):
        message = warn_template_prefix("constrained_sft", "the large beta_t", tok, [item], [EX],
                                       loud=False)
    assert "model.chat_template_kwargs" in message


@pytest.mark.parametrize("case", ["thinking_off", "chatml"])
def test_an_answer_trained_from_its_content_passes(tokenizer, case):
    tok = _qwen3(tokenizer, thinking_off=True) if case == "thinking_off" else tokenizer
    item = render_for_training(tok, EX, get_template("native"))
    assert template_prefix(tok, [item], [EX]) is None


def test_constrained_sft_setup_warns_on_a_qwen3_style_template(tmp_path, tiny_model_dir,
                                                                 tokenizer, monkeypatch):
    from test_training_scaling import build, config

    from stayaligned.models import load_model as real

    tok = _qwen3(tokenizer, thinking_off=False)
    monkeypatch.setattr("stayaligned.models.load_model",
                        lambda cfg, **kw: (real(cfg, **kw)[0], tok))
    cfg = config(tmp_path, tiny_model_dir, "methods=[constrained_sft]")
    with pytest.warns(UserWarning, match=r"constrained_sft: .*beta_t.*enable_thinking: false"):
        build(cfg, tmp_path)
