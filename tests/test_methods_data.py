"""The data and template methods: LookAhead's previews and their loss masks, PTST's templates
(the exact strings of methods.md 4.2) and its pure-train/safe-test check, safety-data mixing,
and each of them (and all three stacked) training the tiny model."""

from __future__ import annotations

import json

import pytest

from stayaligned.config import ConfigError, TrainConfig, from_dict
from stayaligned.data.sources import load_source
from stayaligned.data.types import DataError, Example
from stayaligned.methods import METHODS
from stayaligned.methods.base import Method, NoOptions, build_methods, check_compatible
from stayaligned.methods.lookahead import LookAhead, LookAheadOptions
from stayaligned.methods.ptst import Ptst, PtstOptions
from stayaligned.methods.safety_mix import SafetyMix, SafetyMixOptions, mix
from stayaligned.templates.library import get_template
from stayaligned.templates.render import IGNORE_INDEX, prompt_text, render_for_training
from stayaligned.training.run import templates_for, train

Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to "
     "her friends in May. How many clips did Natalia sell altogether in April and May?")
A = ("Natalia sold 48/2 = 24 clips in May.\n"
     "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
GSM = Example("gsm8k_train.jsonl:1", (SYSTEM, {"role": "user", "content": Q},
                                      {"role": "assistant", "content": A}))
C = " The answer begins with: "
P = "Let's solve this problem. "
EOS = "<|im_end|>"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA2 = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as "
          "possible, while being safe. Your answers should not include any harmful, unethical, "
          "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your "
          "responses are socially unbiased and positive in nature. If a question does not make "
          "any sense, or is not factually coherent, explain why instead of answering something "
          "not correct. If you don't know the answer to a question, please don't share false "
          "information.")
LLAMA2_SHORT = ("You are a helpful, respectful and honest assistant. Always answer as helpfully "
                "as possible, while being safe.")
MPT = ("A conversation between a user and an LLM-based AI assistant. The assistant gives "
       "helpful and honest answers.")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.")


def lookahead(tokenizer, **options) -> LookAhead:
    method = LookAhead(LookAheadOptions(**options))
    method.attach(tokenizer, TrainConfig())
    return method


def trained_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t, l in zip(item.input_ids, item.labels) if l != IGNORE_INDEX])


def untrained_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t, l in zip(item.input_ids, item.labels) if l == IGNORE_INDEX])


# ---------------------------------------------------------------- LookAhead


def test_real_preview_is_the_first_m_smollm2_tokens(tokenizer):
    # SmolLM2's byte-level BPE splits digits one by one: 6 pieces reach only the "4" of "48"
    assert tokenizer.tokenize(A)[:6] == ["N", "atal", "ia", "Ġsold", "Ġ", "4"]
    out = lookahead(tokenizer).transform_example(GSM)
    assert out.messages == (SYSTEM, {"role": "user", "content": Q + C + "Natalia sold 4"},
                            {"role": "assistant", "content": A})
    assert out.id == GSM.id and out.meta == GSM.meta
    assert GSM.messages[1]["content"] == Q  # the input is not mutated
    m3 = lookahead(tokenizer, m=3).transform_example(GSM)
    assert m3.messages[1]["content"] == Q + " The answer begins with: Natalia"
    whole = lookahead(tokenizer, m=1000).transform_example(GSM)
    assert whole.messages[1]["content"] == Q + C + A


def test_real_mode_trains_exactly_the_unchanged_answer(tokenizer):
    out = lookahead(tokenizer).transform_example(GSM)
    item = render_for_training(tokenizer, out, get_template("native"))
    assert trained_text(tokenizer, item) == A + EOS + "\n"
    assert untrained_text(tokenizer, item) == (
        f"<|im_start|>system\nYou are a helpful assistant.{EOS}\n"
        f"<|im_start|>user\n{Q} The answer begins with: Natalia sold 4{EOS}\n"
        "<|im_start|>assistant\n"
    )
    # the answer gets the same labels as without LookAhead: only the prompt changed
    plain = render_for_training(tokenizer, GSM, get_template("native"))
    assert [l for l in item.labels if l != IGNORE_INDEX] == [
        l for l in plain.labels if l != IGNORE_INDEX]


def test_virtual_mode_trains_prefix_and_answer(tokenizer):
    out = lookahead(tokenizer, mode="virtual").transform_example(GSM)
    assert out.messages == (
        SYSTEM,
        {"role": "user", "content": Q + " The answer begins with: Let's solve this problem. "},
        {"role": "assistant", "content": "Let's solve this problem. " + A},
    )
    item = render_for_training(tokenizer, out, get_template("native"))
    assert trained_text(tokenizer, item) == P + A + EOS + "\n"
    assert untrained_text(tokenizer, item).endswith(
        f"{Q} The answer begins with: Let's solve this problem. {EOS}\n<|im_start|>assistant\n")
    readme = lookahead(tokenizer, mode="virtual", prefix=" Let's solve this problem. ")
    assert readme.transform_example(GSM).messages[2]["content"] == " Let's solve this problem. " + A


def test_virtual_mode_needs_no_tokenizer_but_real_mode_does():
    assert LookAhead(LookAheadOptions(mode="virtual")).transform_example(GSM).messages[2][
        "content"] == P + A
    with pytest.raises(RuntimeError, match="attach"):
        LookAhead(LookAheadOptions()).transform_example(GSM)


def test_lookahead_changes_only_the_last_user_turn(tokenizer):
    ex = Example("mt:1", ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}))
    out = lookahead(tokenizer, mode="virtual", prefix="So: ", turns="last").transform_example(ex)
    assert [m["content"] for m in out.messages] == ["Hi", "Hello!", "2+2? The answer begins with: So: ",
                                                   "So: 4"]
    out = lookahead(tokenizer, mode="virtual", prefix="So: ", turns="first").transform_example(ex)
    assert [m["content"] for m in out.messages] == ["Hi The answer begins with: So: ", "So: Hello!",
                                                   "2+2?", "4"]
    # default: every assistant turn is previewed in the user turn before it
    out = lookahead(tokenizer, mode="virtual", prefix="So: ").transform_example(ex)
    assert [m["content"] for m in out.messages] == [
        "Hi The answer begins with: So: ", "So: Hello!", "2+2? The answer begins with: So: ", "So: 4"]


def test_lookahead_errors_name_the_record_and_the_option(tokenizer):
    prompt_only = Example("harmful.json:7", ({"role": "user", "content": "Q"},))
    with pytest.raises(DataError, match=r"harmful.json:7: lookahead needs an assistant answer"):
        lookahead(tokenizer).transform_example(prompt_only)
    with pytest.raises(ConfigError, match=r"options.lookahead.mode: 'sideways'.*real or virtual"):
        build_methods(("lookahead",), {"lookahead": {"mode": "sideways"}}, 0, METHODS)
    with pytest.raises(ConfigError, match=r"options.lookahead.m: 0"):
        build_methods(("lookahead",), {"lookahead": {"m": 0}}, 0, METHODS)
    with pytest.raises(ConfigError, match=r"options.lookahead: unknown key\(s\) n"):
        build_methods(("lookahead",), {"lookahead": {"n": 3}}, 0, METHODS)


# ---------------------------------------------------------------- PTST templates

PTST_PROMPTS = {
    "text:vanilla": f"Question: {Q}\nAnswer:",
    "text:alpaca": f"{ALPACA}\n\n### Instruction:\n{Q}\n\n### Response:\n",
    "chat:vanilla": f"[INST] Question: {Q} [/INST]",
    "chat:alpaca": (f"[INST] <<SYS>>\n{ALPACA}\n<</SYS>>\n\n"
                    f"### Instruction:\n{Q}\n\n### Response:\n [/INST]"),
    "chat:llama": f"[INST] <<SYS>>\n{LLAMA2}\n<</SYS>>\n\nQuestion: {Q} [/INST]",
    "chat:llama-short": f"[INST] <<SYS>>\n{LLAMA2_SHORT}\n<</SYS>>\n\nQuestion: {Q} [/INST]",
    "chat:mpt": f"[INST] <<SYS>>\n{MPT}\n<</SYS>>\n\nQuestion: {Q} [/INST]",
}
SEPARATOR = {"text:alpaca": ""}  # every other PTST template puts one space before the answer


@pytest.mark.parametrize("name", sorted(PTST_PROMPTS))
def test_ptst_template_strings_are_exact(tokenizer, name):
    template = get_template(name)
    # the example's own system message is not used by PTST's string templates
    assert prompt_text(tokenizer, GSM, template) == PTST_PROMPTS[name]
    item = render_for_training(tokenizer, GSM, template)
    assert item.text == PTST_PROMPTS[name] + SEPARATOR.get(name, " ") + A + EOS
    assert trained_text(tokenizer, item).endswith("clips altogether in April and May.\n#### 72" + EOS)
    assert template.has_safety_prompt == (name in ("chat:llama", "chat:llama-short"))


def test_ptst_pairs_differ_exactly_by_the_safety_prompt(tokenizer):
    train, test = (prompt_text(tokenizer, GSM, get_template(n)) for n in ("chat:vanilla", "chat:llama"))
    assert test == train.replace("[INST] ", f"[INST] <<SYS>>\n{LLAMA2}\n<</SYS>>\n\n", 1)
    train, test = (prompt_text(tokenizer, GSM, get_template(n)) for n in ("native:nosys", "native:safe"))
    # SmolLM2's chat template writes its own default system message when there is none
    assert train == (f"<|im_start|>system\n{SMOL_SYSTEM}{EOS}\n<|im_start|>user\n{Q}{EOS}\n"
                     "<|im_start|>assistant\n")
    assert test == (f"<|im_start|>system\n{LLAMA2}{EOS}\n<|im_start|>user\n{Q}{EOS}\n"
                    "<|im_start|>assistant\n")
    short = prompt_text(tokenizer, GSM, get_template("native:safe-short"))
    assert short == test.replace(LLAMA2, LLAMA2_SHORT)


def test_string_templates_train_the_first_answer_token(tokenizer):
    item = render_for_training(tokenizer, GSM, get_template("chat:vanilla"))
    assert trained_text(tokenizer, item) == " " + A + EOS


def test_ptst_hooks_and_checks():
    ptst = Ptst(PtstOptions(train_template="chat:vanilla", eval_template="chat:llama"))
    ptst.attach(None, TrainConfig())
    assert (ptst.train_template(), ptst.eval_template()) == ("chat:vanilla", "chat:llama")
    assert templates_for(TrainConfig(), [ptst]) == ("chat:vanilla", "chat:llama")
    assert templates_for(TrainConfig(), [Ptst(PtstOptions())]) == ("native:nosys", "native:safe")
    with pytest.raises(ConfigError, match=r"options.ptst.train_template: unknown template 'chat:x'"):
        Ptst(PtstOptions(train_template="chat:x")).attach(None, TrainConfig())
    same = PtstOptions(train_template="chat:llama", eval_template="chat:llama")
    with pytest.raises(ConfigError, match=r"train_template chat:llama carries a safety system "
                       r"prompt.*check_safety_prompt=false"):
        Ptst(same).attach(None, TrainConfig())
    Ptst(PtstOptions("chat:llama", "chat:llama", check_safety_prompt=False)).attach(None, TrainConfig())
    with pytest.raises(ConfigError, match=r"eval_template chat:mpt carries no safety system prompt"):
        Ptst(PtstOptions("chat:vanilla", "chat:mpt")).attach(None, TrainConfig())


class TemplateSetter(Method):
    name = "dummy"

    def train_template(self) -> str | None:
        return "chat:alpaca"


def test_ptst_does_not_stack_with_another_template_setter():
    with pytest.raises(ConfigError, match="methods ptst and dummy cannot be stacked: both sets "
                       "the train template"):
        check_compatible([Ptst(PtstOptions()), TemplateSetter(NoOptions())])
    stacked = build_methods(("lookahead", "ptst", "safety_mix"), {}, 0, METHODS)
    assert [m.name for m in stacked] == ["lookahead", "ptst", "safety_mix"]


# ---------------------------------------------------------------- safety-data mixing

TASK = [Example(f"task.jsonl:{i}", ({"role": "user", "content": f"q{i}"},
                                    {"role": "assistant", "content": f"a{i}"})) for i in range(5)]


def safety_mix(**options) -> SafetyMix:
    method = SafetyMix(SafetyMixOptions(**options))
    method.attach(None, TrainConfig())
    return method


def test_safety_mix_adds_n_examples_deterministically():
    task = list(TASK)
    out = safety_mix(n=7, seed=3).transform_dataset(task)
    assert task == TASK  # input list untouched
    ids = [ex.id for ex in out]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert [ex for ex in out if ex.id.startswith("task.jsonl:")] != TASK  # interleaved
    assert sorted(ex.id for ex in out if ex.id.startswith("task.jsonl:")) == [e.id for e in TASK]
    demo = {ex.id: ex for ex in load_source("demo-safety")}
    safety = [ex for ex in out if not ex.id.startswith("task.jsonl:")]
    assert len(safety) == 7 and all(demo[ex.id] == ex for ex in safety)  # source ids and content
    assert [ex.id for ex in safety_mix(n=7, seed=3).transform_dataset(TASK)] == ids
    other = [ex.id for ex in safety_mix(n=7, seed=4).transform_dataset(TASK)]
    assert other != ids
    assert [ex.id for ex in out] == [ex.id for ex in mix(TASK, list(demo.values()), 7, 3)]


def test_safety_mix_all_and_errors():
    assert len(safety_mix(n=-1).transform_dataset(TASK)) == 5 + 110
    assert len(safety_mix(n=None).transform_dataset(TASK)) == 5 + 110
    with pytest.raises(ConfigError, match=r"1000 examples asked for, but demo-safety .* has only 110"):
        safety_mix(n=1000)
    with pytest.raises(DataError, match=r"harmful_requests.json:hr-001: safety_mix needs .* answer"):
        safety_mix(source="demo-harmful")
    with pytest.raises(ConfigError, match=r"options.safety_mix.n: 0"):
        build_methods(("safety_mix",), {"safety_mix": {"n": 0}}, 0, METHODS)
    with pytest.raises(RuntimeError, match="attach"):
        SafetyMix(SafetyMixOptions()).transform_dataset(TASK)


def test_safety_mix_reads_the_safety_tuned_llamas_set(shared_data):
    method = SafetyMix(SafetyMixOptions(source="safety-tuned-llamas", n=-1))
    method.attach(None, TrainConfig(data_dir=str(shared_data)))
    out = method.transform_dataset(TASK)
    assert len(out) == 5 + 2483  # PTST's mix: all of Bianchi et al.'s safety-only set
    assert sum(ex.id.startswith("safety_tuned_llamas_safety_only.json[") for ex in out) == 2483


# ---------------------------------------------------------------- training the tiny model


def run_config(tmp_path, model_dir, methods, options, steps=2):
    rows = [{"instruction": Q, "output": A}] + [
        {"instruction": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
         "output": f"Tom has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"}
        for i in range(3)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return from_dict(TrainConfig, {
        "model": {"name": str(model_dir)}, "data": [{"source": str(data)}],
        "methods": methods, "options": options, "max_length": 256, "logging_steps": 1,
        "optim": {"batch_size": 4, "lr": 1e-2, "max_steps": steps},
        "output_dir": str(tmp_path / "run"),
    })


def manifest_of(out) -> dict:
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["global_step"] == 2
    return manifest


def test_lookahead_trains_and_manifest_shows_the_preview(tmp_path, tiny_model_dir):
    manifest = manifest_of(train(run_config(tmp_path, tiny_model_dir, ["lookahead"], {})))
    first = manifest["rendered_examples"][0]
    assert first["masked"].endswith(
        f"<|im_start|>user\n{Q} The answer begins with: Natalia sold 4{EOS}\n"
        f"<|im_start|>assistant\n⟦{A}{EOS}\n⟧")


def test_ptst_trains_and_manifest_records_both_templates(tmp_path, tiny_model_dir):
    options = {"ptst": {"train_template": "chat:vanilla", "eval_template": "chat:llama"}}
    manifest = manifest_of(train(run_config(tmp_path, tiny_model_dir, ["ptst"], options)))
    assert manifest["templates"] == {"train": "chat:vanilla", "eval": "chat:llama"}
    assert manifest["train_prompt_example"] == PTST_PROMPTS["chat:vanilla"]
    assert manifest["eval_prompt_example"] == PTST_PROMPTS["chat:llama"]
    assert manifest["rendered_examples"][0]["masked"].startswith(PTST_PROMPTS["chat:vanilla"])
    assert manifest["rendered_examples"][0]["masked"].endswith(f"#### 72{EOS}⟧")


def test_safety_mix_trains_on_task_plus_safety_examples(tmp_path, tiny_model_dir):
    cfg = run_config(tmp_path, tiny_model_dir, ["safety_mix"], {"safety_mix": {"n": 4, "seed": 3}})
    manifest = manifest_of(train(cfg))
    task = load_source(cfg.data[0].source)
    expected = [ex.id for ex in mix(task, load_source("demo-safety"), 4, 3)]
    assert manifest["n_examples"] == 8 and manifest["render_report"]["kept"] == 8
    assert [r["id"] for r in manifest["rendered_examples"]] == expected[:3]
    assert sum(i.startswith("harmful_requests.json:") for i in expected) == 4


def test_stacked_lookahead_ptst_safety_mix_trains(tmp_path, tiny_model_dir):
    options = {"lookahead": {"mode": "virtual"}, "safety_mix": {"n": 4, "seed": 3}}
    manifest = manifest_of(train(run_config(
        tmp_path, tiny_model_dir, ["lookahead", "ptst", "safety_mix"], options)))
    assert manifest["templates"] == {"train": "native:nosys", "eval": "native:safe"}
    assert manifest["n_examples"] == 8
    kinds = [item["id"].startswith("harmful_requests.json:") for item in manifest["rendered_examples"]]
    assert kinds == [False, True, False]  # seed 3 puts a safety example second
    for item in manifest["rendered_examples"]:
        # lookahead runs first, so the mixed-in safety examples are not previewed
        is_task = not item["id"].startswith("harmful_requests.json:")
        assert (f"assistant\n⟦{P}" in item["masked"]) == is_task
        assert (f"{C}{P}{EOS}" in item["masked"]) == is_task
        assert f"system\n{SMOL_SYSTEM}{EOS}" in item["masked"]
