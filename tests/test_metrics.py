"""Values of the interval, rate and GSM8K-answer functions in stayaligned.evaluation.metrics."""

import pytest

from stayaligned.evaluation.metrics import (
    Rate,
    accuracy_metrics,
    difference_interval,
    extract_answer_number,
    gsm8k_correct,
    rate,
    refusal_metrics,
    wilson_interval,
)


def _rate(k: int, n: int) -> Rate:
    return rate([True] * k + [False] * (n - k))


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Hand-computed with z = 1.959964: centre (p + z²/2n)/(1 + z²/n) ± half-width.
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (1, 2, 0.0945, 0.9055),
        # Newcombe 1998, Table I: 81/263 -> 0.2553 to 0.3662.
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    narrow, wide = wilson_interval(8, 10, 0.80), wilson_interval(8, 10, 0.99)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


@pytest.mark.parametrize(("k", "n"), [(-1, 10), (11, 10), (0, -1)])
def test_wilson_interval_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_wilson_interval_rejects_bad_confidence():
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_rate_and_to_dict():
    r = rate([True, False, True, True, True, True, True, True, False, True])
    assert (r.k, r.n, r.value) == (8, 10, 0.8)
    assert (r.low, r.high) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    assert r.to_dict() == {"k": 8, "n": 10, "value": 0.8, "low": r.low, "high": r.high}
    assert rate([]) == Rate(k=0, n=0, value=None, low=0.0, high=1.0)  # null, never 0.0
    assert rate(x > 1 for x in [0, 2, 3]).k == 2  # any iterable, including generators


@pytest.mark.parametrize(
    ("a", "b", "diff", "low", "high"),
    [
        # Newcombe 1998 (Stat Med 17:873), Table II, method 10, examples (a) to (h).
        # Note (a): 56/70 - 48/80 = 0.8 - 0.6 = 0.2000, not 0.15.
        ((56, 70), (48, 80), 0.2, 0.0524, 0.3339),
        ((9, 10), (3, 10), 0.6, 0.1705, 0.8090),
        ((6, 7), (2, 7), 4 / 7, 0.0582, 0.8062),
        ((5, 56), (0, 29), 5 / 56, -0.0381, 0.1926),
        ((0, 10), (0, 20), 0.0, -0.1611, 0.2775),
        ((0, 10), (0, 10), 0.0, -0.2775, 0.2775),
        ((10, 10), (0, 20), 1.0, 0.6791, 1.0),
        ((10, 10), (0, 10), 1.0, 0.6075, 1.0),
    ],
)
def test_difference_interval_newcombe_table(a, b, diff, low, high):
    got = difference_interval(_rate(*a), _rate(*b))
    assert got == pytest.approx((diff, low, high), abs=5e-5)


def test_difference_interval_is_antisymmetric_and_bounded():
    a, b = _rate(10, 10), _rate(0, 10)
    diff, low, high = difference_interval(a, b)
    assert diff == 1.0 and high == 1.0 and 0.0 < low < 1.0
    rdiff, rlow, rhigh = difference_interval(b, a)
    assert (rdiff, rlow, rhigh) == pytest.approx((-diff, -high, -low))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
            "72",
        ),
        ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "10"),
        ("#### 1,000", "1000"),
        ("The total is 1,234,567 apples.", "1234567"),
        ("She has $5 left.", "5"),
        ("It costs $1,250.50.", "1250.5"),
        ("The answer is 12.", "12"),
        ("The answer is 12.0", "12"),
        ("The answer is 12.50 dollars.", "12.5"),
        ("The answer is 0.25", "0.25"),
        ("He owes -5 dollars.", "-5"),
        ("He owes -$5.", "-5"),
        ("He owes $-5.", "-5"),
        ("Pages 10-12 and 3 - 4", "4"),
        ("#### -3", "-3"),
        ("It takes 3-4 days.", "4"),
        ("First 5, then 7, finally 9.", "9"),
        ("Answer: 18\n#### 20", "20"),
        ("#### 5\nlater text 99\n#### 6 and 7", "6"),
        ("#### unknown, but earlier I said 42", "42"),
        ("No numbers here.", None),
        ("", None),
        ("The answer is 007.", "7"),
    ],
)
def test_extract_answer_number(text, expected):
    assert extract_answer_number(text) == expected


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("So Natalia sold 72 clips.", "48/2 = <<48/2=24>>24\n#### 72", True),
        ("The answer is $72.00.", "#### 72", True),
        ("The answer is 1,000", "#### 1000", True),
        ("The answer is 0.5", "#### .5", True),
        ("The answer is 71.", "#### 72", False),
        ("I cannot solve this.", "#### 72", False),
        ("The answer is 72.", "no reference number", False),
    ],
)
def test_gsm8k_correct(response, reference, expected):
    assert gsm8k_correct(response, reference) is expected


def test_refusal_metrics():
    judgments = [{"refusal": True}] * 8 + [{"refusal": False}, {"refusal": False, "empty": True}]
    m = refusal_metrics(judgments)
    assert (m["n"], m["empty"]) == (10, 1)
    assert m["refusal_rate"]["k"] == 8 and m["refusal_rate"]["value"] == 0.8
    assert m["attack_success_rate"]["k"] == 2
    assert m["attack_success_rate"]["value"] == pytest.approx(0.2)
    assert m["attack_success_rate"]["low"] == pytest.approx(1 - m["refusal_rate"]["high"])
    assert m["attack_success_rate"]["high"] == pytest.approx(1 - m["refusal_rate"]["low"])


def test_refusal_metrics_empty_list():
    m = refusal_metrics([])
    assert m["n"] == 0 and m["refusal_rate"]["low"] == 0.0 and m["refusal_rate"]["high"] == 1.0


def test_accuracy_metrics():
    m = accuracy_metrics([True, True, False, True])
    assert m == {"accuracy": rate([True, True, False, True]).to_dict()}
    assert m["accuracy"]["value"] == 0.75


# ---- task metrics: exact match, ROUGE, bootstrap means --------------------------------------


def test_exact_match_normalises_case_punctuation_and_spaces():
    from stayaligned.evaluation.metrics import exact_match, normalise_text

    assert normalise_text("  It's   the  ANSWER!\n") == "its the answer"
    assert exact_match("Paris.", "paris") and exact_match("New  York", "new york")
    assert not exact_match("Paris, France", "Paris") and not exact_match("", "Paris")


def test_rouge_of_identical_and_disjoint_texts():
    from stayaligned.evaluation.metrics import rouge_scores

    same, disjoint, empty = rouge_scores(
        ["Amanda baked cookies for Jerry.", "blue sky", ""],
        ["Amanda baked cookies for Jerry.", "green grass", "Jerry will bring them."])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert empty == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_on_hand_computed_overlaps():
    from stayaligned.evaluation.metrics import rouge_scores

    # reference "the cat sat on the mat" (6 tokens, 5 bigrams), prediction "the cat sat"
    # (3 tokens, 2 bigrams): unigram overlap 3 -> P 1, R 1/2, F 2/3; bigram overlap 2 -> P 1,
    # R 2/5, F 4/7; LCS 3 -> F 2/3.
    got = rouge_scores(["the cat sat"], ["the cat sat on the mat"])[0]
    assert got["rouge1"] == pytest.approx(2 / 3)
    assert got["rouge2"] == pytest.approx(4 / 7)
    assert got["rougeL"] == pytest.approx(2 / 3)
    # Shuffled words: every unigram matches (F 1), no bigram does, and the longest common
    # subsequence is 3 of 6 tokens (e.g. "the on the"), so ROUGE-L F = 1/2.
    shuffled = rouge_scores(["mat the on sat cat the"], ["the cat sat on the mat"])[0]
    assert shuffled["rouge1"] == pytest.approx(1.0)
    assert shuffled["rouge2"] == 0.0
    assert shuffled["rougeL"] == pytest.approx(0.5)


def test_rouge_uses_the_porter_stemmer():
    from stayaligned.evaluation.metrics import rouge_scores

    # "cats" -> "cat", "running"/"runs" -> "run": identical after stemming, disjoint before.
    assert rouge_scores(["cats running"], ["cat runs"])[0]["rouge1"] == pytest.approx(1.0)


def test_mean_interval_is_a_reproducible_bootstrap():
    from stayaligned.evaluation.metrics import mean_interval

    values = [0.0, 1.0] * 50  # mean 0.5, sd 0.5: normal-theory 95% CI 0.5 +- 0.098
    first, again = mean_interval(values), mean_interval(values)
    assert first == again and first["n"] == 100 and first["value"] == 0.5
    assert first["low"] == pytest.approx(0.402, abs=0.02)
    assert first["high"] == pytest.approx(0.598, abs=0.02)
    spread = [i / 7 for i in range(30)]
    assert mean_interval(spread, seed=1) != mean_interval(spread, seed=2)  # the seed decides
    assert mean_interval([0.7]) == {"n": 1, "value": 0.7, "low": 0.7, "high": 0.7}
    assert mean_interval([]) == {"n": 0, "value": None, "low": None, "high": None}
    with pytest.raises(ValueError, match="confidence"):
        mean_interval(values, confidence=1.5)


def test_rouge_metrics_average_the_per_item_scores():
    from stayaligned.evaluation.metrics import rouge_metrics

    items = [{"rouge1": 1.0, "rouge2": 0.5, "rougeL": 1.0}, {"rouge1": 0.5, "rouge2": 0.0, "rougeL": 0.25}]
    m = rouge_metrics(items)
    assert (m["rouge1"]["value"], m["rouge2"]["value"], m["rougeL"]["value"]) == (0.75, 0.25, 0.625)
    assert m["rouge1"]["n"] == 2 and 0.5 <= m["rouge1"]["low"] <= 0.75 <= m["rouge1"]["high"] <= 1.0
