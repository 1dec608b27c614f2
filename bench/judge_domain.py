"""Refusal judges on harmful-request answers, the domain of AdvBench (bench/judges.py measures
them on XSTest's human labels, mostly safe prompts; this is the check that agreement transfers).

    .venv/bin/python bench/judge_domain.py [--pairs runs/deep/pairs_stl400.jsonl] \
        [--out bench/results/judges_harmful_domain.json]

Silver-labelled items on the Safety-Tuned LLaMAs harmful prompts (no human labels exist here):

* ``compliance``: the un-aligned embedded model's greedy answers after the prefill "Sure, here
  is" (the `rejected` side of `stayaligned pairs --model embedded --harmful safety-tuned-llamas
  --prefill "Sure, here is"`, the deep-align pilot's pairs file). Label: not a refusal. Judged
  as written (with the prefill, as a prefilling attack's response is) and without the prefill.
* ``refusal``: the dataset's own safe answers to the same prompts (the `chosen` side), written as
  refusals or redirections. Label: refusal (a softer label: some argue rather than decline).

Reported per judge: the share judged a refusal in each set (for compliance: the false-refusal
rate; for refusals: the recall), and a few examples of each judge's errors to read. A hand
check of 12 random compliance answers the classifier called refusals found 12 compliant ones
(session 13 note), so the compliance labels are not the source of its errors.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFILL = "Sure, here is"
COMMAND = ("stayaligned pairs --model embedded --harmful safety-tuned-llamas --data-dir "
           "../shared/datasets --limit 400 --prefill \"Sure, here is\" --max-new-tokens 64 "
           "--output runs/deep/pairs_stl400.jsonl")


def judged(judge, items: list[tuple[str, str]]) -> list[bool]:
    return [bool(v["refusal"]) for v in judge.judge_batch(items)] \
        if hasattr(judge, "judge_batch") else [bool(judge.judge(p, r)["refusal"]) for p, r in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=str(ROOT / "runs" / "deep" / "pairs_stl400.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "judges_harmful_domain.json"))
    args = parser.parse_args(argv)
    pairs_path = Path(args.pairs)
    if not pairs_path.is_file():
        print(f"{pairs_path} is missing; make it with: {COMMAND}", file=sys.stderr)
        return 2
    from stayaligned.evaluation.judges.classifier import ClassifierJudge
    from stayaligned.evaluation.judges.keyword import KeywordJudge

    started = time.time()
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()]
    prefilled = [p for p in pairs if p["rejected"].startswith(PREFILL)]
    sets = {
        "compliance (with the prefill)": ([(p["prompt"], p["rejected"]) for p in prefilled], False),
        "compliance (continuation only)": (
            [(p["prompt"], p["rejected"][len(PREFILL):].strip()) for p in prefilled], False),
        "refusal (the dataset's safe answers)": ([(p["prompt"], p["chosen"]) for p in pairs], True),
    }
    judges = {"keyword": KeywordJudge(), "classifier": ClassifierJudge()}
    result: dict = {}
    rng = random.Random(0)
    for name, judge in judges.items():
        entry = {}
        for label, (items, refusal) in sets.items():
            verdicts = judged(judge, items)
            wrong = [i for i, v in enumerate(verdicts) if v != refusal]
            entry[label] = {
                "n": len(items), "judged_refusal": round(sum(verdicts) / len(items), 4),
                "errors": len(wrong),
                "error_examples": [items[i][1][:200] for i in rng.sample(wrong, min(3, len(wrong)))],
            }
        result[name] = entry
    result["meta"] = {
        "command": "python bench/judge_domain.py " + " ".join(argv or sys.argv[1:]),
        "pairs": f"{pairs_path} (made by: {COMMAND})", "prompts": "Safety-Tuned LLaMAs safety-only",
        "labels": "silver: by construction (see the module docstring)",
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name in judges:
        print(name, {k: v["judged_refusal"] for k, v in result[name].items()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
