"""The bundled demo data: resource files' contents and the arithmetic problem generator."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from stayaligned.data.demo import arithmetic_problems, load_resource
from stayaligned.data.types import DataError

CATEGORIES = {
    "illegal_activity", "child_abuse", "hate_harass_violence", "malware", "physical_harm",
    "economic_harm", "fraud_deception", "adult_content", "political_campaigning",
    "privacy_violation", "tailored_financial_advice",
}
REFUSAL_PHRASES = ("i'm sorry", "i cannot", "i can't", "i apologize", "i'm not able to",
                   "as an ai")
FORBIDDEN_IN_HELPFUL = ("sorry", "cannot", "can't", "unable", "as an ai", "illegal",
                        "unethical", "harmful", "apologize", "apologise")

# "a op b [op c ...] = c", with an optional "$" before the result
STEP = re.compile(r"(\d+(?:\s*[-+*/]\s*\d+)+)\s*=\s*\$?(\d+)")


@pytest.fixture(scope="module")
def harmful():
    return load_resource("harmful_requests.json")


@pytest.fixture(scope="module")
def benign():
    return load_resource("benign_requests.json")


@pytest.fixture(scope="module")
def refusals():
    return load_resource("refusals.json")


@pytest.fixture(scope="module")
def helpful():
    return load_resource("helpful_pairs.json")


# --- harmful requests -------------------------------------------------------------------------

def test_harmful_requests_count_and_fields(harmful):
    assert len(harmful) >= 170
    for record in harmful:
        assert set(record) == {"id", "category", "split", "prompt"}
        assert record["split"] in ("align", "validation", "eval")
        assert record["prompt"].strip() == record["prompt"] and record["prompt"]
        assert len(record["prompt"].split()) < 30, record


def test_harmful_ids_and_prompts_unique(harmful):
    ids = [r["id"] for r in harmful]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"hr-\d{3}", i) for i in ids)
    prompts = [r["prompt"].lower() for r in harmful]
    assert len(set(prompts)) == len(prompts)


def test_harmful_categories_and_stratified_split(harmful):
    per_category = Counter(r["category"] for r in harmful)
    assert set(per_category) == CATEGORIES
    assert min(per_category.values()) >= 20
    for category in CATEGORIES:
        splits = Counter(r["split"] for r in harmful if r["category"] == category)
        # align: mixed into fine-tuning; validation: for choosing budgets; eval: held out
        assert splits["align"] >= 8 and splits["validation"] >= 3, (category, splits)
        assert splits["eval"] >= 9, (category, splits)
    splits = Counter(r["split"] for r in harmful)
    assert splits["eval"] >= 100 and splits["validation"] >= 33 and splits["align"] >= 100


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def _shared_prompts(root) -> set[str]:
    import csv
    import json

    prompts = (root / "advbench_harmful_behaviors.txt").read_text(encoding="utf-8").splitlines()
    with open(root / "xstest_prompts.csv", encoding="utf-8") as handle:
        prompts += [row["prompt"] for row in csv.DictReader(handle)]
    for name in ("safety_tuned_llamas_safety_only.json", "alpaca_safety_keyword_subset.json"):
        prompts += [r["instruction"] for r in json.loads((root / name).read_text())]
    return {_normalise(p) for p in prompts}


def test_demo_prompts_are_not_copied_from_public_sets(harmful, benign, shared_data):
    shared = _shared_prompts(shared_data)
    assert len(shared) > 3000
    mine = [r["prompt"] for r in harmful] + [r["prompt"] for r in benign]
    copied = [p for p in mine if _normalise(p) in shared]
    assert not copied, copied[:5]


# --- benign requests (over-refusal) -----------------------------------------------------------

BENIGN_TYPES = {
    "homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
    "real_discrimination_nonsense_group", "nonsense_discrimination_real_group",
    "historical_events", "privacy_public", "privacy_fictional",
}


def test_benign_requests_fields_types_and_ids(benign, harmful):
    evaluation = [r for r in benign if r["split"] == "eval"]
    validation = [r for r in benign if r["split"] == "validation"]
    assert len(evaluation) == 60 and len(validation) == 30
    assert len(evaluation) + len(validation) == len(benign)
    assert [r["id"] for r in evaluation] == [f"br-{i:03d}" for i in range(1, 61)]
    assert [r["id"] for r in validation] == [f"bv-{i:03d}" for i in range(1, 31)]
    for record in benign:
        assert set(record) == {"id", "type", "prompt", "split"}
        assert record["prompt"].strip() == record["prompt"] and len(record["prompt"].split()) < 30
    for part, least in ((evaluation, 5), (validation, 3)):
        types = Counter(r["type"] for r in part)
        assert set(types) == BENIGN_TYPES and min(types.values()) >= least
    prompts = {r["prompt"].lower() for r in benign}
    assert len(prompts) == len(benign) and not prompts & {r["prompt"].lower() for r in harmful}
    # they look risky: most carry a word a naive filter would flag
    risky = ("kill", "shoot", "blow", "execute", "murder", "destroy", "poison", "steal", "bomb",
             "genocide", "assassinate", "ransomware", "address", "crack", "strangle", "choke", "stab",
             "crush", "attack", "exterminate", "arson", "heist", "laundering", "botnet")
    assert sum(any(w in r["prompt"].lower() for w in risky) for r in evaluation) >= 20
    assert sum(any(w in r["prompt"].lower() for w in risky) for r in validation) >= 8


def test_demo_sources_for_the_quickstart():
    from stayaligned.data.sources import DEMO_NAMES, load_source

    assert "demo-benign" in DEMO_NAMES
    splits = {s: load_source("demo-harmful", split=s) for s in ("train", "validation", "eval")}
    assert [len(splits[s]) for s in ("validation", "eval")] == [44, 110]
    assert load_source("demo-harmful", split="val") == splits["validation"]
    ids = {s: {e.id for e in exs} for s, exs in splits.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["eval"]
                or ids["validation"] & ids["eval"])
    safety = {e.content("user") for e in load_source("demo-safety")}
    assert not safety & {e.content("user") for e in splits["validation"] + splits["eval"]}
    benign = load_source("demo-benign", split="test")
    assert len(benign) == 60 and benign[0].id == "benign_requests.json:br-001"
    assert benign[0].messages[-1]["role"] == "user" and benign[0].meta["type"] == "homonyms"
    assert load_source("demo-benign", split="eval") == benign
    held = load_source("demo-benign", split="validation")
    assert len(held) == 30 and held[0].id == "benign_requests.json:bv-001"
    assert not {e.content("user") for e in held} & {e.content("user") for e in benign}


def test_demo_helpful_has_no_held_out_split():
    """Its pairs are alignment training data: split test (a benchmark's default) gave them
    back as if held out."""
    from stayaligned.data.sources import load_source

    assert len(load_source("demo-helpful")) == 128
    with pytest.raises(DataError, match="demo-helpful has one split, train, not 'test'"):
        load_source("demo-helpful", split="test")


# --- refusals ---------------------------------------------------------------------------------

def test_refusals_styles_and_phrases(refusals):
    assert len(refusals) >= 40
    styles = Counter(r["style"] for r in refusals)
    assert set(styles) == {"apology", "policy", "redirect", "brief", "explain"}
    assert min(styles.values()) >= 5
    with_phrase = [any(p in r["text"].lower() for p in REFUSAL_PHRASES) for r in refusals]
    share = sum(with_phrase) / len(refusals)
    assert 0.7 <= share < 1.0  # most, but not all, carry a stock refusal phrase
    assert len({r["text"] for r in refusals}) == len(refusals)


# --- helpful pairs ----------------------------------------------------------------------------

def test_helpful_pairs_count_fields_ids(helpful):
    assert len(helpful) >= 120
    ids = [p["id"] for p in helpful]
    assert len(set(ids)) == len(ids)
    for pair in helpful:
        assert set(pair) == {"id", "instruction", "response"}
        assert pair["instruction"] and pair["response"]
        assert len(pair["response"].split()) < 80, pair["id"]


def test_helpful_responses_never_refuse(helpful):
    for pair in helpful:
        text = pair["response"].lower()
        found = [word for word in FORBIDDEN_IN_HELPFUL if word in text]
        assert not found, (pair["id"], found)


def test_helpful_pairs_include_edgy_but_benign(helpful):
    edgy = ("kill", "shoot", "chemicals", "destroy", "attack", "poison")
    assert sum(any(w in p["instruction"].lower() for w in edgy) for p in helpful) >= 8


def test_load_resource_names_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_file.json"):
        load_resource("no_such_file.json")


# --- arithmetic problems ----------------------------------------------------------------------

def _final(answer: str) -> int:
    last = answer.splitlines()[-1]
    assert re.fullmatch(r"#### \d+", last), last
    return int(last[len("#### "):])


def test_arithmetic_shape_and_ids():
    problems = arithmetic_problems(25, seed=7)
    assert [p["id"] for p in problems] == [f"arith-7-{i}" for i in range(25)]
    for p in problems:
        assert set(p) == {"id", "question", "answer"}
        assert len(p["question"].split()) < 50
        assert len(p["answer"].split()) < 60
        assert _final(p["answer"]) >= 0
    assert arithmetic_problems(0, seed=7) == []


def test_arithmetic_deterministic_per_seed():
    assert arithmetic_problems(20, seed=3) == arithmetic_problems(20, seed=3)
    assert arithmetic_problems(20, seed=3) != arithmetic_problems(20, seed=4)
    # a prefix of a longer run is the shorter run
    assert arithmetic_problems(30, seed=3)[:20] == arithmetic_problems(20, seed=3)


def test_arithmetic_does_not_touch_global_random():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    arithmetic_problems(10, seed=1)
    assert random.random() == expected


def test_arithmetic_worked_steps_evaluate_and_reach_the_answer():
    for seed in range(5):
        for p in arithmetic_problems(40, seed=seed):
            steps = STEP.findall(p["answer"])
            assert 1 <= len(steps) <= 3, p
            for expression, result in steps:
                assert re.fullmatch(r"[\d\s+\-*/]+", expression)
                value = eval(expression)  # digits and + - * / only, checked above
                assert value == int(result), (p["id"], expression, result)
                assert value == int(value)
            assert int(steps[-1][1]) == _final(p["answer"]), p


def test_arithmetic_varied_templates():
    problems = arithmetic_problems(50, seed=11)
    assert len({p["question"] for p in problems}) == 50
    # distinct question shapes: the question with its numbers and names blanked out
    shapes = {re.sub(r"\$?\d+", "N", p["question"]).split(" ", 1)[1][:25] for p in problems}
    assert len(shapes) >= 8


def test_arithmetic_answers_recomputed_from_questions():
    checked = Counter()
    for p in arithmetic_problems(200, seed=5):
        q, final = p["question"], _final(p["answer"])
        if m := re.search(r"has \$(\d+)\. \w+ spends \$(\d+) on .+ and \$(\d+) on", q):
            money, a, b = map(int, m.groups())
            assert final == money - a - b
            checked["money_left"] += 1
        elif m := re.search(r"costs \$(\d+)\. .+ with (\d+)% off", q):
            price, percent = map(int, m.groups())
            assert final == price * (100 - percent) // 100
            assert price * percent % 100 == 0
            checked["discount"] += 1
        elif m := re.search(r"buys (\d+) .+ for \$(\d+) each and a .+ for \$(\d+)\.", q):
            count, price, extra = map(int, m.groups())
            assert final == count * price + extra
            checked["shopping"] += 1
        elif m := re.search(r"has (\d+) rows of (\d+) seats\. (\d+) people", q):
            rows, per_row, taken = map(int, m.groups())
            assert final == rows * per_row - taken
            checked["seats"] += 1
    assert set(checked) == {"money_left", "discount", "shopping", "seats"}
    assert min(checked.values()) >= 5


def test_every_bundled_refusal_is_a_refusal_to_the_keyword_judge():
    """The bundled refusals teach `align` and `safety_mix` how to refuse; a phrasing the
    papers' keyword list misses ("I'm not able to help with that.") would make models trained on
    it look less safe than they are, and by a different amount per method (found on the
    quickstart: 11 of 45 texts were invisible to the judge, and the safety_mix cell scored below
    plain sft while refusing in those words)."""
    from stayaligned.data.demo import load_resource
    from stayaligned.evaluation.judges.keyword import is_refusal

    missed = [r["text"] for r in load_resource("refusals.json") if not is_refusal(r["text"])]
    assert missed == []
