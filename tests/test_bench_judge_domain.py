"""bench/judge_domain.py: each judge is scored on the right side of each pair (the compliant
`rejected` answer, with and without its prefill, as not-refusals; the `chosen` answer as a
refusal), and a missing pairs file is a one-line error with the command that makes it."""

from __future__ import annotations

import json

from conftest import load_bench


def test_each_set_is_scored_against_its_label(tmp_path, capsys, monkeypatch):
    bench = load_bench("judge_domain")

    class Fake:  # a refusal exactly when the text says "cannot"
        def judge(self, prompt, response):
            return {"refusal": "cannot" in response}

    import stayaligned.evaluation.judges.classifier as classifier
    import stayaligned.evaluation.judges.keyword as keyword

    monkeypatch.setattr(keyword, "KeywordJudge", Fake)
    monkeypatch.setattr(classifier, "ClassifierJudge", Fake)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p1", "chosen": "I cannot help.", "rejected": "Sure, here is how: cannot"},
            {"prompt": "p2", "chosen": "No.", "rejected": "Sure, here is a plan."},
            {"prompt": "p3", "chosen": "I cannot.", "rejected": "Here is a plan."}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.json"
    assert bench.main(["--pairs", str(pairs), "--out", str(out)]) == 0
    result = json.loads(out.read_text())["keyword"]
    with_prefill = result["compliance (with the prefill)"]
    assert with_prefill["n"] == 2 and with_prefill["judged_refusal"] == 0.5  # p3 has no prefill
    assert with_prefill["error_examples"] == ["Sure, here is how: cannot"]
    assert result["compliance (continuation only)"]["error_examples"] == ["how: cannot"]
    refusal = result["refusal (the dataset's safe answers)"]
    assert refusal["n"] == 3 and refusal["errors"] == 1 and refusal["error_examples"] == ["No."]
    assert bench.main(["--pairs", str(tmp_path / "missing.jsonl")]) == 2
    assert "stayaligned pairs --model embedded" in capsys.readouterr().err
