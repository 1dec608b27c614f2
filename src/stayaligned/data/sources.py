"""One entry point for every data source a config can name.

- ``demo-*``: the bundled demo sets (written for this project, in `resources/`), always
  offline: `demo-arithmetic` (generated word problems, `train`/`test` splits),
  `demo-safety` (align-split harmful requests -> refusals; split `eval` or `test`: the held-out
  requests -> refusals, e.g. an out-of-sample depth set), `demo-helpful` (benign pairs, split
  `train` only),
  `demo-harmful` (prompt-only harmful requests; split `align`, `validation` (for choosing a
  budget) or `eval`, `test` = `eval`), `demo-benign` (safe prompts that only sound risky, for
  over-refusal; split `validation` (30 prompts, for choosing a recipe) or `eval`, any other
  name = `eval` (60 prompts)).
- a registry name (`stayaligned data list`): a local copy under `data_dir` first, else the Hub;
  ``NAME:PATH`` (e.g. ``hex-phi:/data/HEx-PHI``) reads that dataset from a copy at PATH;
- a file path (JSON, JSONL, CSV, TXT, Parquet) or a Hub dataset id, with `fields` mapping.
"""

from __future__ import annotations

import random
from pathlib import Path

from stayaligned.data.demo import arithmetic_problems, load_resource
from stayaligned.data.loading import Fields, load_examples, subset, to_example, with_overrides
from stayaligned.data.registry import DATASETS, resolve
from stayaligned.data.types import DataError, Example

ARITHMETIC_POOL = {"train": 2000, "test": 500}
ARITHMETIC_SEED = {"train": 1, "test": 2}
DEMO_NAMES = ("demo-arithmetic", "demo-safety", "demo-helpful", "demo-harmful", "demo-benign")


def load_source(
    source: str,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    fields: dict | None = None,
    data_dir: str | Path | None = None,
) -> list[Example]:
    """Examples from a demo set, a registry name (optionally ``NAME:PATH``), a file, or a Hub id."""
    if source.startswith("demo-"):
        examples = _demo(source, split)
        return subset(examples, limit, seed)
    name, path = registry_name(source)
    if name is not None:
        return resolve(name, split=split, data_dir=data_dir, path=path, limit=limit, seed=seed,
                       fields=fields)
    mapping = with_overrides(Fields(), fields, source)
    return load_examples(source, mapping, split=split, limit=limit, seed=seed, data_dir=data_dir)


def registry_name(source: str) -> tuple[str | None, str | None]:
    """(registry name, path or None) if `source` names a registered dataset, else (None, None).

    >>> registry_name("HEx_PHI:/data/HEx-PHI"), registry_name("gsm8k"), registry_name("a.csv")
    (('hex-phi', '/data/HEx-PHI'), ('gsm8k', None), (None, None))
    """
    head, sep, path = source.partition(":")
    key = head.strip().lower().replace("_", "-")
    if key not in DATASETS:
        return None, None
    return key, path or None


# ---------------------------------------------------------------- demo sets


def _demo(name: str, split: str) -> list[Example]:
    if name == "demo-arithmetic":
        return _arithmetic(split)
    if name == "demo-safety":
        return _safety("eval" if split in ("eval", "test") else "align")
    if name == "demo-helpful":
        if split not in (None, "train"):  # one set of pairs: another split would be the same
            raise DataError(f"demo-helpful has one split, train, not {split!r}: it is "
                            "alignment training data (configs/align), so a benchmark on it "
                            "would measure training data; for a held-out task use "
                            "demo-arithmetic with split test")
        fields = Fields(user=("instruction",), assistant="response")
        return [to_example(f"helpful_pairs.json:{r['id']}", r, fields)
                for r in load_resource("helpful_pairs.json")]
    if name == "demo-harmful":
        part = {"eval": "eval", "test": "eval", "validation": "validation",
                "val": "validation"}.get(split, "align")
        fields = Fields(user=("prompt",), assistant=None, meta=("category",))
        return [to_example(f"harmful_requests.json:{r['id']}", r, fields)
                for r in load_resource("harmful_requests.json") if r["split"] == part]
    if name == "demo-benign":
        fields = Fields(user=("prompt",), assistant=None, meta=("type",))
        part = "validation" if split in ("validation", "val") else "eval"
        return [to_example(f"benign_requests.json:{r['id']}", r, fields)
                for r in load_resource("benign_requests.json") if r["split"] == part]
    raise DataError(f"unknown demo set {name!r}; demo sets are: {', '.join(DEMO_NAMES)}")


def _arithmetic(split: str) -> list[Example]:
    if split not in ARITHMETIC_POOL:
        raise DataError(f"demo-arithmetic has splits train and test, not {split!r}")
    problems = arithmetic_problems(ARITHMETIC_POOL[split], seed=ARITHMETIC_SEED[split])
    if split == "test":  # held out: no question that also appears in the train pool
        train = {p["question"] for p in arithmetic_problems(ARITHMETIC_POOL["train"], seed=1)}
        problems = [p for p in problems if p["question"] not in train]
    fields = Fields(user=("question",), assistant="answer", meta=("answer",))
    return [to_example(p["id"], p, fields) for p in problems]


def _safety(part: str = "align") -> list[Example]:
    """Harmful requests of one part (align: any split but eval/test, as before; eval: the
    held-out requests, e.g. an out-of-sample depth set), each paired with a refusal chosen by a
    fixed rule so that every style appears (the pairing is part of the data, not of a run's
    seed)."""
    refusals = load_resource("refusals.json")
    requests = [r for r in load_resource("harmful_requests.json") if r["split"] == part]
    rng = random.Random(1234)
    out = []
    for record in requests:
        refusal = refusals[rng.randrange(len(refusals))]["text"]
        out.append(Example(
            id=f"harmful_requests.json:{record['id']}",
            messages=({"role": "user", "content": record["prompt"]},
                      {"role": "assistant", "content": refusal}),
            meta={"category": record["category"]},
        ))
    return out
