"""TRL's dataset formats read from the record's keys, multi-turn rendering with exact masks per
assistant turn under the native template and a chat:* template, and `loss_on`."""

from __future__ import annotations

import json

import pytest

from stayaligned.data.loading import Fields, load_examples
from stayaligned.data.sources import load_source
from stayaligned.data.types import DataError, Example
from stayaligned.templates.library import get_template
from stayaligned.templates.render import IGNORE_INDEX, prompt_text, render_for_training

SYSTEM = {"role": "system", "content": "You answer briefly."}
TURNS = [{"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5."},
         {"role": "user", "content": "And times 4?"},
         {"role": "assistant", "content": "20."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_runs(tokenizer, item) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(item.input_ids, item.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("record, expected", [
    ({"messages": [SYSTEM, *TURNS]}, [SYSTEM, *TURNS]),
    ({"prompt": "The sky is", "completion": " blue."},
     [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]),
    ({"prompt": [SYSTEM, *TURNS[:3]], "completion": [TURNS[3]]}, [SYSTEM, *TURNS]),
    ({"prompt": "Tell me a joke."}, [{"role": "user", "content": "Tell me a joke."}]),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
     [{"role": "user", "content": "Hi"}]),
])
def test_trl_formats_are_read_from_the_keys(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    (example,) = load_source(str(path))
    assert list(example.messages) == expected and example.id == "d.jsonl:1"


def test_instruction_output_mapping_still_wins_when_its_fields_are_there(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "I", "output": "O", "prompt": "x"}])
    (example,) = load_source(str(path))
    assert [m["content"] for m in example.messages] == ["I", "O"]
    # an explicit mapping onto 'prompt' reads prompt-only sets as before
    (example,) = load_examples(path, Fields(user=("prompt",), assistant=None))
    assert [m["content"] for m in example.messages] == ["x"]


def test_system_prompt_is_added_only_when_the_conversation_has_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TURNS}, {"messages": [SYSTEM, *TURNS]}])
    a, b = load_source(str(path), fields={"system_prompt": "Be safe."})
    assert a.messages[0] == {"role": "system", "content": "Be safe."}
    assert b.messages[0] == SYSTEM and len(b.messages) == 5


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "human", "content": "hi"}]}, r"d.jsonl:1: messages\[0\]: role 'human'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list of messages"),
    ({"messages": [TURNS[1], TURNS[0]]}, "message 0 has role 'assistant' where 'user'"),
    ({"messages": [TURNS[0], {"role": "assistant", "content": " "}]}, r"messages\[1\]: content is empty"),
    ({"text": "The sky is blue."}, "TRL language-modeling data"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference data"),
    ({"question": "q"}, "field 'instruction' is missing.*'messages' or 'prompt'/'completion'"),
    # keys that would be dropped, changing what is trained: OpenAI's weight 0 (a turn not to
    # train on), a tool call, a reasoning trace, tool definitions
    ({"messages": [TURNS[0], {**TURNS[1], "weight": 0}, TURNS[2], {**TURNS[3], "weight": 1}]},
     r"d.jsonl:1: messages\[1\]: key 'weight' is not read.*weight 0 would be trained on"),
    ({"messages": [TURNS[0], {**TURNS[1], "tool_calls": [{"function": {"name": "calc"}}]}]},
     r"messages\[1\]: key 'tool_calls' is not read.*remove tool-calling conversations"),
    ({"prompt": [TURNS[0]], "completion": [{**TURNS[1], "reasoning_content": "2 + 3 = 5"}]},
     r"completion\[0\]: key 'reasoning_content' is not read.*write it into 'content'"),
    ({"messages": TURNS[:2], "tools": [{"type": "function", "function": {"name": "calc"}}]},
     "d.jsonl:1: field 'tools' holds tool definitions"),
    ({"messages": [TURNS[0], {"role": "tool", "content": "5"}]},
     r"messages\[1\]: role 'tool' is not one of .*tool results are not rendered"),
])
def test_bad_trl_records_name_record_and_field(tmp_path, record, match):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError, match=match):
        load_source(str(path))


def test_empty_keys_a_hub_table_fills_in_and_weight_1_are_read_as_before(tmp_path):
    """A Hub table gives every message every key of its schema (None where absent)."""
    filled = {"tool_calls": None, "reasoning_content": None, "weight": None}
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{**TURNS[0], **filled}, {**TURNS[1], **filled, "weight": 1}], "tools": None}])
    (example,) = load_source(str(path))
    assert list(example.messages) == TURNS[:2]


@pytest.mark.parametrize("record, fix", [
    ({"chosen": "c", "rejected": "r"}, "no 'prompt' field"),
    ({"chosen": TURNS[:2], "rejected": TURNS[:2]}, "rename 'chosen' to 'messages'"),
    ({"prompt": TURNS[:1], "chosen": TURNS[1:2], "rejected": TURNS[1:2]},
     "rename 'chosen' to 'completion'"),
])
def test_preference_records_get_a_hint_that_fits_their_layout(tmp_path, record, fix):
    """The {user: prompt, assistant: chosen} mapping fits only standard records with a prompt."""
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError, match="preference data") as err:
        load_source(str(path))
    assert fix in str(err.value) and "assistant: chosen" not in str(err.value)


# ---------------------------------------------------------------- rendering multi-turn

MULTI = Example("mt", (SYSTEM, *TURNS))


def test_native_multi_turn_with_system_masks_each_assistant_turn_exactly(tokenizer):
    item = render_for_training(tokenizer, MULTI, get_template("native"))
    assert trained_runs(tokenizer, item) == ["5.<|im_end|>\n", "20.<|im_end|>\n"]
    assert item.text.startswith("<|im_start|>system\nYou answer briefly.<|im_end|>\n")
    # every token before the first answer, and the second user turn, have no loss
    untrained = tokenizer.decode([t for t, l in zip(item.input_ids, item.labels)
                                  if l == IGNORE_INDEX])
    assert "And times 4?" in untrained and "What is 2 + 3?" in untrained
    last = render_for_training(tokenizer, MULTI, get_template("native"), loss_on="last_turn")
    assert trained_runs(tokenizer, last) == ["20.<|im_end|>\n"]
    assert last.input_ids == item.input_ids


def test_chat_template_multi_turn_masks_each_answer_exactly(tokenizer):
    template = get_template("chat:llama")
    item = render_for_training(tokenizer, MULTI, template)
    eos, bos = tokenizer.eos_token, tokenizer.bos_token
    assert item.text == (
        "[INST] <<SYS>>\n" + template.system + "\n<</SYS>>\n\nQuestion: What is 2 + 3? [/INST]"
        f" 5.{eos}{bos}[INST] Question: And times 4? [/INST] 20.{eos}")
    assert [run.strip() for run in trained_runs(tokenizer, item)] == [f"5.{eos}", f"20.{eos}"]
    last = render_for_training(tokenizer, MULTI, template, loss_on="last_turn")
    assert [run.strip() for run in trained_runs(tokenizer, last)] == [f"20.{eos}"]
    # the generation prompt of the conversation ends where the last answer starts
    prompt = prompt_text(tokenizer, MULTI, template)
    assert item.text.startswith(prompt) and prompt.endswith("And times 4? [/INST]")


def test_text_template_multi_turn(tokenizer):
    item = render_for_training(tokenizer, Example("mt", tuple(TURNS)), get_template("text:vanilla"))
    eos = tokenizer.eos_token
    assert item.text == f"Question: What is 2 + 3?\nAnswer: 5.{eos}\n\nQuestion: And times 4?\nAnswer: 20.{eos}"
    assert trained_runs(tokenizer, item) == [f" 5.{eos}", f" 20.{eos}"]


def test_prompt_completion_masks_only_the_completion(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [SYSTEM, TURNS[0]], "completion": [TURNS[1]]}])
    (example,) = load_source(str(path))
    for name in ("native", "chat:vanilla"):
        item = render_for_training(tokenizer, example, get_template(name))
        assert [r.strip() for r in trained_runs(tokenizer, item)] == [f"5.{tokenizer.eos_token}"]


def test_bad_loss_on_and_out_of_order_turns(tokenizer):
    with pytest.raises(DataError, match="loss_on='first'"):
        render_for_training(tokenizer, MULTI, get_template("native"), loss_on="first")
    odd = Example("odd", (TURNS[0], TURNS[0]))
    with pytest.raises(DataError, match="odd: template chat:vanilla needs user and assistant"):
        render_for_training(tokenizer, odd, get_template("chat:vanilla"))


def test_hub_rows_in_trl_formats_are_read_the_same_way():
    from stayaligned.data.loading import examples_from_records

    rows = [("org/chat:train[0]", {"prompt": "ignored id text", "prompt_id": "abc",
                                   "messages": [SYSTEM, *TURNS]}),
            ("org/chat:train[1]", {"prompt": [TURNS[0]], "completion": [TURNS[1]]})]
    first, second = examples_from_records(rows, Fields(), "org/chat (split train)")
    assert list(first.messages) == [SYSTEM, *TURNS]  # `messages` wins over a text `prompt`
    assert list(second.messages) == TURNS[:2]


def test_each_turn_trains_every_answer_as_a_final_turn(tokenizer, tmp_path):
    """`loss_on: each_turn`: a conversation with two answers becomes two training items, each cut
    after its answer and trained on it alone, rendered as at generation time; the fix for
    templates that rewrite earlier turns (Qwen3: an empty thinking block on the final answer
    only), which all_assistant_turns refuses."""
    from test_render import QWEN3_JINJA

    from stayaligned.config import TrainConfig, load
    from stayaligned.training.run import prepare

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = QWEN3_JINJA
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [SYSTEM, *TURNS]},
                                                 {"messages": TURNS[:2]}])
    cfg = load(TrainConfig, None, [f"data=[{{source: {data}}}]", "loss_on=each_turn"])
    prep = prepare(cfg, tok)
    assert [it.example_id for it in prep["items"]] == [
        f"{data.name}:1#1", f"{data.name}:1#2", f"{data.name}:2"]
    think = "<think>\n\n</think>\n\n"
    assert [trained_runs(tok, it) for it in prep["items"]] == [
        [f"{think}5.<|im_end|>\n"], [f"{think}20.<|im_end|>\n"], [f"{think}5.<|im_end|>\n"]]
    assert prep["items"][1].text.startswith("<|im_start|>system\nYou answer briefly.")
    assert "<|im_start|>assistant\n5.<|im_end|>" in prep["items"][1].text  # history as rendered
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*differently.*each_turn"):
        prepare(load(TrainConfig, None, [f"data=[{{source: {data}}}]"]), tok)


def test_training_records_without_an_answer_are_an_error_not_dropped(tokenizer, tmp_path):
    """{prompt, response} reads as TRL prompt-only: rendering dropped every record with one
    printed line, and with safety_mix the run went on, trained on the safety data alone."""
    from stayaligned.config import TrainConfig, load
    from stayaligned.training.run import prepare

    data = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "2 + 3?", "response": "5"}] * 3)
    cfg = load(TrainConfig, None, ["data=[{source: demo-helpful, limit: 2}, "
                                   f"{{source: {data}}}]", "methods=[safety_mix]",
                                   "options={safety_mix: {source: demo-safety, n: 4}}"])
    with pytest.raises(DataError, match=r"task.jsonl:1: data\[1\] .* has no answer to train on"
                                        r".*data\[1\].fields"):
        prepare(cfg, tokenizer)
    mapped = load(TrainConfig, None, [f"data=[{{source: {data}, fields: {{user: prompt, "
                                      "assistant: response}}]"])
    assert [it.n_loss_tokens > 0 for it in prepare(mapped, tokenizer)["items"]] == [True] * 3
