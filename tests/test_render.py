"""The loss mask covers exactly the assistant tokens, for several templates."""

from __future__ import annotations

import pytest

from stayaligned.data.types import DataError, Example
from stayaligned.templates.library import get_template
from stayaligned.templates.render import (
    IGNORE_INDEX,
    prompt_text,
    render_dataset,
    render_for_training,
    show_mask,
)

LLAMA2_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)

EX = Example("ex:1", ({"role": "user", "content": "What is 2 + 3?"},
                      {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}))


def trained_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t, l in zip(item.input_ids, item.labels) if l != IGNORE_INDEX])


def test_native_mask_is_exactly_the_assistant_turn(tokenizer):
    item = render_for_training(tokenizer, EX, get_template("native"))
    assert trained_text(tokenizer, item) == "2 + 3 = 5.\n#### 5<|im_end|>\n"
    # everything before the answer, including the generation prompt, has no loss
    prompt_ids = tokenizer(prompt_text(tokenizer, EX, get_template("native")),
                           add_special_tokens=False)["input_ids"]
    assert item.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(l == IGNORE_INDEX for l in item.labels[: len(prompt_ids)])
    assert all(l != IGNORE_INDEX for l in item.labels[len(prompt_ids):])


def test_native_multi_turn_trains_every_assistant_turn(tokenizer):
    ex = Example("mt", ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}))
    item = render_for_training(tokenizer, ex, get_template("native"))
    assert trained_text(tokenizer, item) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"


def test_other_chat_template_mask(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = LLAMA2_JINJA
    ex = Example("s", ({"role": "system", "content": "Be safe."}, *EX.messages))
    item = render_for_training(tok, ex, get_template("native"))
    assert item.text == "<<SYS>>Be safe.<</SYS>>[INST] What is 2 + 3? [/INST] 2 + 3 = 5.\n#### 5<|im_end|>"
    assert trained_text(tok, item).strip() == "2 + 3 = 5.\n#### 5<|im_end|>"
    # native:nosys drops the system message, native:safe replaces it
    assert "Be safe" not in render_for_training(tok, ex, get_template("native:nosys")).text
    safe = render_for_training(tok, ex, get_template("native:safe")).text
    assert "Be safe" not in safe and "respectful and honest" in safe


@pytest.mark.parametrize("name", ["chat:llama", "chat:vanilla", "text:alpaca", "text:vanilla"])
def test_string_template_mask(tokenizer, name):
    template = get_template(name)
    item = render_for_training(tokenizer, EX, template)
    # the separator after the prompt is trained too: at test time the model must produce it
    assert trained_text(tokenizer, item) == template.separator + "2 + 3 = 5.\n#### 5<|im_end|>"
    assert item.text.startswith(prompt_text(tokenizer, EX, template))
    if name == "chat:llama":
        assert "[INST] <<SYS>>\nYou are a helpful, respectful" in item.text


def test_prefill_starts_the_assistant_turn(tokenizer):
    text = prompt_text(tokenizer, EX, get_template("native"), prefill="Sure, here")
    assert text.endswith("<|im_start|>assistant\nSure, here")


def test_empty_and_overlong_examples_are_reported_not_dropped_silently(tokenizer):
    prompt_only = Example("p:1", ({"role": "user", "content": "No answer here"},))
    long = Example("long:1", ({"role": "user", "content": "word " * 300},
                              {"role": "assistant", "content": "ok"}))
    items, report = render_dataset(tokenizer, [EX, prompt_only, long], get_template("native"), 100)
    assert [i.example_id for i in items] == ["ex:1"]
    assert report.empty_mask == ["p:1"] and report.too_long == ["long:1"]
    assert any("long:1" in line for line in report.summary())
    items, report = render_dataset(tokenizer, [long], get_template("native"), 100, "truncate")
    assert report.truncated == ["long:1"] and report.empty_mask == ["long:1"]  # answer cut off
    with pytest.raises(DataError, match="long:1.*max_length=100"):
        render_dataset(tokenizer, [long], get_template("native"), 100, "error")


def test_examples_whose_own_system_message_the_template_drops_are_reported(tokenizer):
    """native keeps an example's system message; native:safe writes its own and string
    templates write theirs or none: the example's is not rendered, and the report says so."""
    own = Example("sys:1", ({"role": "system", "content": "You summarise dialogs."},
                            *EX.messages))
    for name, dropped in (("native", []), ("native:safe", ["sys:1"]),
                          ("native:nosys", ["sys:1"]), ("text:vanilla", ["sys:1"])):
        items, report = render_dataset(tokenizer, [EX, own], get_template(name), 512)
        assert report.system_replaced == dropped, name
        assert ("You summarise dialogs." in items[1].text) == (not dropped), name
        assert any("sys:1" in line and "system message" in line
                   for line in report.summary()) == bool(dropped), name


def test_show_mask_marks_trained_span(tokenizer):
    shown = show_mask(tokenizer, render_for_training(tokenizer, EX, get_template("native")))
    assert "assistant\n⟦2 + 3 = 5.\n#### 5<|im_end|>\n⟧" in shown


def test_unknown_template_lists_known():
    with pytest.raises(KeyError, match="known templates: .*chat:llama"):
        get_template("chat:nope")


# Reduced from the models' own templates: Qwen3 (an empty thinking block on the answer after the
# last user turn, none on earlier answers), Gemma (no system role) and Mistral v0.3 (the system
# prompt only in a conversation that ends with a user turn).
QWEN3_JINJA = (
    "{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}"
    "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' and loop.index0 > ns.last -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- if enable_thinking is defined and enable_thinking "
    "is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
GEMMA_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
    "else m['role'] %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL3_JINJA = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set rest = messages[1:] -%}{%- else -%}{%- set rest = messages -%}{%- endif -%}"
    "{{- bos_token -}}{%- for m in rest -%}{%- if m['role'] == 'user' -%}"
    "{%- if loop.last and system is defined -%}{{- '[INST] ' + system + '\\n\\n' + m['content'] "
    "+ '[/INST]' -}}{%- else -%}{{- '[INST] ' + m['content'] + '[/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- ' ' + m['content'] | trim + eos_token -}}{%- endif -%}{%- endfor -%}"
)
TWO_TURNS = Example("mt", ({"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Goodbye."}))


def _with_template(tokenizer, jinja):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = jinja
    return tok


def test_a_template_that_rewrites_earlier_turns_is_an_error_not_a_shifted_mask(tokenizer):
    """Qwen3 renders an answer with an empty thinking block while it is the last turn and
    without it once the conversation goes on: the spans of earlier turns, measured on the
    conversation cut after them, would land on the wrong characters of the whole (here: the
    next user turn). The old code trained on '<|im_start|>user\\nBye'."""
    tok = _with_template(tokenizer, QWEN3_JINJA)
    with pytest.raises(DataError, match=r"mt: .*turn 1 differently.*loss_on: each_turn"):
        render_for_training(tok, TWO_TURNS, get_template("native"))
    last = render_for_training(tok, TWO_TURNS, get_template("native"), loss_on="last_turn")
    assert trained_text(tok, last) == "<think>\n\n</think>\n\nGoodbye.<|im_end|>\n"
    single = render_for_training(tok, EX, get_template("native"))
    assert trained_text(tok, single) == "<think>\n\n</think>\n\n2 + 3 = 5.\n#### 5<|im_end|>\n"


def test_a_template_without_a_system_role_names_the_example_and_the_fix(tokenizer):
    tok = _with_template(tokenizer, GEMMA_JINJA)
    item = render_for_training(tok, EX, get_template("native"))
    assert trained_text(tok, item) == "2 + 3 = 5.\n#### 5<end_of_turn>\n"
    for render in (lambda t: render_for_training(tok, EX, t),
                   lambda t: prompt_text(tok, EX, t)):
        with pytest.raises(DataError, match=r"ex:1: .*refused the conversation "
                                            r"\(system/user.*System role not supported"
                                            r".*native:safe@user.*native:nosys"):
            render(get_template("native:safe"))
    # @user writes the safety prompt at the start of the first user turn (Gemma 3's own way)
    safe = render_for_training(tok, EX, get_template("native:safe@user"))
    assert safe.text.startswith("<start_of_turn>user\nYou are a helpful, respectful and honest")
    assert "answer.\n\nWhat is 2 + 3?<end_of_turn>" in safe.text.replace(
        "don't share false information.", "answer.")
    assert trained_text(tok, safe) == "2 + 3 = 5.\n#### 5<end_of_turn>\n"
    prompt = prompt_text(tok, EX, get_template("native:safe@user"))
    assert safe.text.startswith(prompt) and prompt.endswith("<start_of_turn>model\n")
    own = Example("own", ({"role": "system", "content": "Be brief."}, *EX.messages))
    assert prompt_text(tok, own, get_template("native@user")).startswith(
        "<start_of_turn>user\nBe brief.\n\nWhat is 2 + 3?")


def test_in_user_applies_to_native_templates_only():
    assert get_template("native:safe@user").has_safety_prompt
    for bad, match in (("chat:llama@user", "chat:llama is a string template"),
                       ("nope@user", "unknown template 'nope'"),
                       ("native:safe@user@user", "native:safe@user is a native template")):
        with pytest.raises(KeyError, match=match):
            get_template(bad)


def test_a_template_that_moves_the_system_prompt_is_an_error(tokenizer):
    """Mistral v0.3 writes the system prompt only when the conversation ends with a user turn:
    a training text would silently lose it (PTST's safety prompt, say) while prompts keep it."""
    tok = _with_template(tokenizer, MISTRAL3_JINJA)
    for loss_on in ("all_assistant_turns", "last_turn"):
        with pytest.raises(DataError, match=r"ex:1: .*prefix of the turn.*native:safe@user"):
            render_for_training(tok, EX, get_template("native:safe"), loss_on=loss_on)
    # @user: the safety prompt in the first user turn, in training texts and prompts alike
    safe = render_for_training(tok, EX, get_template("native:safe@user"))
    assert safe.text.startswith(tok.bos_token + "[INST] You are a helpful, respectful and honest")
    assert "honest assistant." in prompt_text(tok, EX, get_template("native:safe@user"))
    item = render_for_training(tok, TWO_TURNS, get_template("native"))
    assert trained_text(tok, item) == " Hello!<|im_end|> Goodbye.<|im_end|>"


def test_chat_template_kwargs_reach_prompts_and_training_texts_alike(tokenizer):
    """model.chat_template_kwargs (here Qwen3's enable_thinking: false, set on the tokenizer by
    models.load_tokenizer) go into every rendering: the empty thinking block is then part of
    the prompt the model is asked, and only the answer is trained."""
    tok = _with_template(tokenizer, QWEN3_JINJA)
    tok.stayaligned_chat_kwargs = {"enable_thinking": False}
    prompt = prompt_text(tok, EX, get_template("native"))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    item = render_for_training(tok, EX, get_template("native"))
    assert item.text.startswith(prompt)
    assert trained_text(tok, item) == "2 + 3 = 5.\n#### 5<|im_end|>\n"
    tok.stayaligned_chat_kwargs = {}
    assert prompt_text(tok, EX, get_template("native")).endswith("<|im_start|>assistant\n")


def test_a_python_tokenizer_is_an_error_naming_the_fix(tokenizer, monkeypatch):
    """Offsets (and so exact masks) need a fast tokenizer: a slow one is a named error, not a
    NotImplementedError from deep inside transformers."""
    tok = _with_template(tokenizer, tokenizer.chat_template)
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    with pytest.raises(DataError, match=r"ex:1: .*fast \(Rust\) tokenizer.*tokenizer.json"):
        render_for_training(tok, EX, get_template("native"))


# Llama 3.1's date handling (its system header), cut down
DATED_JINJA = (
    "{%- if not date_string is defined -%}{%- if strftime_now is defined -%}"
    "{%- set date_string = strftime_now('%d %b %Y') -%}{%- else -%}"
    "{%- set date_string = '26 Jul 2024' -%}{%- endif -%}{%- endif -%}"
    "{{- 'Today Date: ' + date_string + '\\n' -}}"
    "{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


def test_a_template_that_writes_todays_date_renders_the_fixed_date(tokenizer, monkeypatch):
    """Llama 3.x templates write today's date through transformers' strftime_now: rendered as
    is, a model trained on one day would be evaluated on another prompt the next. Every
    rendering uses TEMPLATE_DATE, whatever the clock says; a date_string still wins."""
    import datetime as dt

    from stayaligned.templates.render import TEMPLATE_DATE, template_date

    tok = _with_template(tokenizer, DATED_JINJA)
    tok.stayaligned_chat_kwargs = {}
    real = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert f"Today Date: {dt.datetime.now().strftime('%d %b %Y')}" in real  # what HF renders
    prompt = prompt_text(tok, EX, get_template("native"))
    assert prompt.startswith("Today Date: 26 Jul 2024\n") and prompt.endswith("assistant: ")
    item = render_for_training(tok, EX, get_template("native"))
    assert item.text.startswith(prompt) and "26 Jul 2024" not in trained_text(tok, item)
    assert template_date(tok) == TEMPLATE_DATE.isoformat() == "2024-07-26"
    assert template_date(tokenizer) is None  # SmolLM2's template has no date
    tok.stayaligned_chat_kwargs = {"date_string": "01 Jan 2025"}
    assert prompt_text(tok, EX, get_template("native")).startswith("Today Date: 01 Jan 2025\n")


def test_the_guard_judge_prompt_has_the_fixed_date_too(tokenizer):
    from stayaligned.config import ModelConfig
    from stayaligned.evaluation.judges.guard import GuardJudge

    tok = _with_template(tokenizer, DATED_JINJA)
    judge = GuardJudge.__new__(GuardJudge)
    judge.model_config = ModelConfig(name="guard")
    assert judge.classifier_prompt(tok, "Hi", "Hello").startswith("Today Date: 26 Jul 2024\n")
