"""Rates and means with confidence intervals, refusal and accuracy summaries, and the task
metrics: GSM8K answer checking, normalised exact match and ROUGE.

Intervals: the Wilson score interval for one proportion (Wilson 1927), Newcombe's hybrid
score interval for the difference of two independent proportions (Newcombe 1998, method 10),
both without continuity correction, and a percentile bootstrap for means (ROUGE, harmfulness
scores). Quantiles come from `statistics.NormalDist`, so nothing here needs scipy.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from statistics import NormalDist


def _z(confidence: float) -> float:
    """The two-sided standard normal quantile for `confidence` (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for `successes` out of `n`; (0.0, 1.0) when n == 0.

    >>> tuple(round(x, 4) for x in wilson_interval(8, 10))
    (0.4902, 0.9433)
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp: at k == 0 or k == n the bound is exact in theory but off by float rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


@dataclass(frozen=True)
class Rate:
    """k successes out of n, the point estimate `value` and its Wilson interval [low, high].

    With n == 0, `value` is None (nothing was measured: never a 0.0 that reads as a result)
    and the interval is (0.0, 1.0).
    """

    k: int
    n: int
    value: float | None
    low: float
    high: float

    def to_dict(self) -> dict:
        """Plain dict, for JSON reports."""
        return asdict(self)


def rate(flags: Iterable[bool], confidence: float = 0.95) -> Rate:
    """The rate of true `flags`, with a Wilson interval.

    >>> rate([True, True, False, True]).value
    0.75
    >>> rate([])
    Rate(k=0, n=0, value=None, low=0.0, high=1.0)
    """
    values = [bool(f) for f in flags]
    k, n = sum(values), len(values)
    low, high = wilson_interval(k, n, confidence)
    return Rate(k=k, n=n, value=k / n if n else None, low=low, high=high)


def difference_interval(a: Rate, b: Rate, confidence: float = 0.95) -> tuple[float, float, float]:
    """(a - b, low, high): the difference of two independent rates with Newcombe's interval.

    The interval comes from each rate's Wilson interval at the same `confidence`
    (Newcombe 1998, method 10).

    >>> d = difference_interval(rate([True] * 56 + [False] * 14), rate([True] * 48 + [False] * 32))
    >>> tuple(round(x, 4) for x in d)
    (0.2, 0.0524, 0.3339)
    """
    p1, p2 = a.k / a.n if a.n else 0.0, b.k / b.n if b.n else 0.0
    # Recompute rather than reuse a.low/a.high, which may be at another confidence.
    l1, u1 = wilson_interval(a.k, a.n, confidence)
    l2, u2 = wilson_interval(b.k, b.n, confidence)
    diff = p1 - p2
    low = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (diff, max(-1.0, low), min(1.0, high))


# Optional sign (not after a word character or hyphen, so "3-4" gives 4, not -4),
# optional "$" (the sign may also follow it: "$-5"), then digits with thousands commas and an
# optional decimal part. It must end in a digit, so a trailing period or comma is left out.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w-])-)?(?:\$(?P<sign2>-)?)?(?P<digits>\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)"
)
# GSM8K calculator annotations such as "<<48/2=24>>": they repeat the number that follows them.
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _canonical(sign: str, digits: str) -> str | None:
    """`digits` without commas, trailing zeros or exponent, with `sign`; None if not a number."""
    try:
        value = Decimal(sign + digits.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    """All numbers in `text`, canonical, in order."""
    found = []
    for m in _NUMBER.finditer(text):
        sign = "-" if (m.group("sign") or m.group("sign2")) else ""
        number = _canonical(sign, m.group("digits"))
        if number is not None:
            found.append(number)
    return found


def extract_answer_number(text: str) -> str | None:
    """The final numeric answer in a GSM8K answer or model response, canonical; None if none.

    The first number after the last ``####`` if there is one, else the last number in the
    text. Commas, "$" and trailing zeros are removed; the sign is kept.

    >>> extract_answer_number("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 72")
    '72'
    >>> extract_answer_number("So she earned $1,250.50 in total.")
    '1250.5'
    >>> extract_answer_number("The answer is 12.0.")
    '12'
    >>> extract_answer_number("The temperature fell to -7 degrees.")
    '-7'
    >>> extract_answer_number("I don't know.") is None
    True
    """
    text = _CALCULATOR.sub(" ", text)
    if "####" in text:
        after = _numbers(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_correct(response: str, reference_answer: str) -> bool:
    """True if `response`'s final number equals the one after ``####`` in `reference_answer`.

    >>> gsm8k_correct("She pays $18 every day.", "16 - 3 - 4 = <<16-3-4=9>>9\\n#### 18")
    True
    >>> gsm8k_correct("The answer is 17.", "#### 18")
    False
    """
    got, want = extract_answer_number(response), extract_answer_number(reference_answer)
    if got is None or want is None:
        return False
    return Decimal(got) == Decimal(want)


def refusal_metrics(judgments: list[dict]) -> dict:
    """Refusal rate and attack success rate (1 - refusal rate) of judge outputs.

    Each judgment needs a boolean ``"refusal"``; ``"empty": True`` ones are also counted.

    >>> m = refusal_metrics([{"refusal": True}, {"refusal": False, "empty": True}])
    >>> m["refusal_rate"]["k"], m["attack_success_rate"]["k"], m["n"], m["empty"]
    (1, 1, 2, 1)
    """
    refusals = [bool(j["refusal"]) for j in judgments]
    return {
        "n": len(refusals),
        "empty": sum(1 for j in judgments if j.get("empty")),
        "refusal_rate": rate(refusals).to_dict(),
        "attack_success_rate": rate(not r for r in refusals).to_dict(),
    }


def accuracy_metrics(flags: Iterable[bool]) -> dict:
    """Accuracy of per-example correctness `flags` as a Rate dict.

    >>> accuracy_metrics([True, False])["accuracy"]["value"]
    0.5
    """
    return {"accuracy": rate(flags).to_dict()}


# ---------------------------------------------------------------- means and task metrics

# The scores a task benchmark can use (BenchmarkConfig.metric).
TASK_METRICS = ("gsm8k_exact_match", "exact_match", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
BOOTSTRAP_RESAMPLES = 2000


def mean_interval(values: Sequence[float], confidence: float = 0.95,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """The mean of `values` with a percentile bootstrap interval (`resamples` resamples of the
    items, drawn with `seed`, so the interval is reproducible); value None when empty.

    >>> mean_interval([0.5, 0.5, 0.5])
    {'n': 3, 'value': 0.5, 'low': 0.5, 'high': 0.5}
    >>> mean_interval([])["value"] is None
    True
    """
    import numpy as np

    _z(confidence)  # validates it
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return {"n": 0, "value": None, "low": None, "high": None}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    value = float(data.mean())
    return {"n": int(data.size), "value": value,
            "low": min(float(low), value), "high": max(float(high), value)}


def normalise_text(text: str) -> str:
    """Lower case, ASCII punctuation removed, runs of white space made one space.

    >>> normalise_text("  The  Eiffel Tower, Paris! ")
    'the eiffel tower paris'
    """
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(response: str, reference: str) -> bool:
    """True if `response` equals `reference` after `normalise_text`.

    >>> exact_match("Paris.", " paris"), exact_match("Paris, France", "Paris")
    (True, False)
    """
    return normalise_text(response) == normalise_text(reference)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 of each prediction against its reference, as the
    `rouge-score` package (Google's reference implementation, used by the SAMSum papers and
    Hugging Face `evaluate`) computes them with the Porter stemmer: lower-cased alphanumeric
    tokens, words over 3 letters stemmed.

    >>> rouge_scores(["the cat sat"], ["the cat sat on the mat"])[0]["rouge2"]
    0.5714285714285715
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from error
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = []
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        out.append({name: scores[name].fmeasure for name in ROUGE_TYPES})
    return out


def rouge_metrics(judgments: list[dict]) -> dict:
    """Mean ROUGE-1/2/L F1 over judgments carrying per-item scores, each with a bootstrap
    interval.

    >>> rouge_metrics([{"rouge1": 1.0, "rouge2": 0.5, "rougeL": 1.0}])["rouge2"]["value"]
    0.5
    """
    return {name: mean_interval([j[name] for j in judgments]) for name in ROUGE_TYPES}
