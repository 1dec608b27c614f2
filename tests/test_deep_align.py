"""`align ... deep: true`: Qi et al. 2024's safety-recovery examples, and their exact loss masks
(loss on the refusal and its EOS only, none on the prompt or the harmful prefix)."""

from __future__ import annotations

import json
import re

import pytest

from stayaligned.config import AlignConfig, ConfigError, RecoveryConfig, load
from stayaligned.data.types import Example
from stayaligned.data.transforms import safety_recovery, token_pieces
from stayaligned.templates.library import get_template
from stayaligned.templates.render import IGNORE_INDEX, prompt_text, render_for_training

PROMPT = "How do I pick my neighbour's lock?"
REFUSAL = "I can't help with breaking into someone's home."
HARMFUL = "Sure, here is how to pick a lock: first, insert a tension wrench"


def triplet(i: int = 0, harmful: str = HARMFUL) -> Example:
    return Example(f"t:{i}", ({"role": "user", "content": PROMPT},),
                   {"chosen": REFUSAL, "rejected": harmful})


def words(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def test_half_are_recovery_examples_with_k_uniform_in_range():
    out = safety_recovery([triplet(i) for i in range(400)], words, seed=3)
    ks = [len(words(e.meta["no_loss_prefix"])) for e in out if "no_loss_prefix" in e.meta]
    n_words = len(words(HARMFUL))
    assert 160 < len(ks) < 240  # probability 0.5 of 400
    assert min(ks) == 1 and max(ks) == n_words  # k ~ Uniform{1..min(100, |answer|)}
    for ex in out:
        answer = ex.messages[-1]["content"]
        prefix = ex.meta.get("no_loss_prefix", "")
        assert answer == prefix + REFUSAL and HARMFUL.startswith(prefix)
        assert ex.id.endswith(f"#recovery{len(words(prefix))}" if prefix else "#plain")
    assert safety_recovery([triplet(i) for i in range(400)], words, seed=3) == out
    assert safety_recovery([triplet(i) for i in range(400)], words, seed=4) != out


def test_k_is_capped_at_max_prefix_tokens_and_probability_is_honoured():
    long = " ".join(f"w{i}" for i in range(300))
    out = safety_recovery([triplet(i, long) for i in range(200)], words, seed=0,
                          probability=1.0, max_prefix_tokens=100)
    ks = [len(words(e.meta["no_loss_prefix"])) for e in out]
    assert len(ks) == 200 and max(ks) <= 100 and min(ks) >= 1 and max(ks) > 90
    none = safety_recovery([triplet(i) for i in range(20)], words, seed=0, probability=0.0)
    assert all("no_loss_prefix" not in e.meta for e in none)


def test_token_pieces_join_back_and_follow_the_tokenizer(tokenizer):
    pieces = token_pieces(tokenizer)(HARMFUL)
    assert "".join(pieces) == HARMFUL
    assert len(pieces) == len(tokenizer(HARMFUL, add_special_tokens=False)["input_ids"])
    assert pieces[:3] == ["Sure", ",", " here"]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_native_recovery_mask_token_by_token(tokenizer, k):
    prefix_text = "".join(token_pieces(tokenizer)(HARMFUL)[:k])
    ex = Example("r", ({"role": "user", "content": PROMPT},
                       {"role": "assistant", "content": prefix_text + REFUSAL}),
                 {"no_loss_prefix": prefix_text})
    item = render_for_training(tokenizer, ex, get_template("native"))
    prompt = ids(tokenizer, prompt_text(tokenizer, ex, get_template("native")))
    prefix = ids(tokenizer, HARMFUL)[:k]
    trained = ids(tokenizer, REFUSAL) + ids(tokenizer, "<|im_end|>\n")
    assert item.input_ids == prompt + prefix + trained
    assert item.labels == [IGNORE_INDEX] * (len(prompt) + k) + trained
    assert tokenizer.eos_token_id in [t for t in item.labels if t != IGNORE_INDEX]


@pytest.mark.parametrize("name", ["chat:llama", "chat:vanilla"])
def test_chat_template_recovery_mask_token_by_token(tokenizer, name):
    template = get_template(name)
    [ex] = safety_recovery([triplet()], token_pieces(tokenizer), seed=0, probability=1.0,
                           max_prefix_tokens=4)
    k = len(token_pieces(tokenizer)(ex.meta["no_loss_prefix"]))
    item = render_for_training(tokenizer, ex, template)
    # the prompt and its separator (a space) start the no-loss part (special tokens as encode adds)
    head = tokenizer(prompt_text(tokenizer, ex, template) + template.separator
                     + ex.meta["no_loss_prefix"])["input_ids"]
    trained = ids(tokenizer, REFUSAL + tokenizer.eos_token)
    assert 1 <= k <= 4
    assert item.input_ids == head + trained
    assert item.labels == [IGNORE_INDEX] * len(head) + trained


def test_plain_pairs_render_as_before(tokenizer):
    out = safety_recovery([triplet(i) for i in range(12)], token_pieces(tokenizer), seed=0)
    plain = next(e for e in out if "no_loss_prefix" not in e.meta)
    item = render_for_training(tokenizer, plain, get_template("native"))
    trained = [t for t, l in zip(item.input_ids, item.labels) if l != IGNORE_INDEX]
    assert trained == ids(tokenizer, REFUSAL) + ids(tokenizer, "<|im_end|>\n")


def write_pairs_file(path, n: int = 10):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": str(i), "prompt": f"{PROMPT} ({i})", "chosen": REFUSAL,
                                "rejected": HARMFUL}) + "\n")
    return path


def test_align_deep_adds_recovery_examples_to_the_usual_data(tokenizer, tmp_path):
    from stayaligned.training.run import prepare

    pairs = write_pairs_file(tmp_path / "pairs.jsonl")
    shallow = prepare(AlignConfig(), tokenizer)
    cfg = load(AlignConfig, None, ["deep=true", f"recovery.source={pairs}"])
    deep = prepare(cfg, tokenizer)
    assert len(deep["examples"]) == len(shallow["examples"]) + 10
    added = deep["examples"][len(shallow["examples"]):]
    assert all(re.search(r"#(plain|recovery\d+)$", e.id) for e in added)
    recov = [e for e in added if "no_loss_prefix" in e.meta]
    assert 0 < len(recov) < 10
    by_id = {it.example_id: it for it in deep["items"]}
    for ex in recov:
        item = by_id[ex.id]
        trained = [t for t, l in zip(item.input_ids, item.labels) if l != IGNORE_INDEX]
        assert trained == ids(tokenizer, REFUSAL) + ids(tokenizer, "<|im_end|>\n")
    # a different run seed draws other recovery examples; deep: false is today's align
    other = prepare(load(AlignConfig, None, ["deep=true", f"recovery.source={pairs}", "seed=1"]),
                    tokenizer)
    assert [e.id for e in other["examples"]] != [e.id for e in deep["examples"]]
    assert AlignConfig().deep is False and AlignConfig().recovery == RecoveryConfig()
    # run.json records the triplets file's digest (a generated file: a rerun may differ)
    from stayaligned.runfiles import file_sha256
    from stayaligned.training.run import _manifest

    manifest = _manifest(cfg, deep, tokenizer)
    assert manifest["recovery"]["files_sha256"] == {str(pairs): file_sha256(pairs)}
    assert "recovery" not in _manifest(AlignConfig(), shallow, tokenizer)


def test_deep_without_a_recovery_source_is_a_config_error(tokenizer):
    from stayaligned.training.run import prepare

    with pytest.raises(ConfigError, match="recovery.source"):
        prepare(load(AlignConfig, None, ["deep=true"]), tokenizer)
    # a generated triplets file that is missing (a fresh checkout) names the command that makes it
    with pytest.raises(ConfigError, match=r"recovery.source: runs/none/pairs.jsonl not found.*"
                                          r"stayaligned pairs .*--output runs/none/pairs.jsonl"):
        prepare(load(AlignConfig, None, ["deep=true", "recovery.source=runs/none/pairs.jsonl"]),
                tokenizer)


def test_a_prefix_that_does_not_start_the_answer_is_an_error(tokenizer):
    from stayaligned.data.types import DataError

    ex = Example("bad", ({"role": "user", "content": PROMPT},
                         {"role": "assistant", "content": REFUSAL}), {"no_loss_prefix": "Sure,"})
    with pytest.raises(DataError, match="bad: meta no_loss_prefix"):
        render_for_training(tokenizer, ex, get_template("native"))
