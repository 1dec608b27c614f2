"""bench/budget_pilot.py: the budget pilot never reads a study's evaluation sets; its GSM8K
hold-out is disjoint from the study's training subset; the choice rule picks the cheapest
candidate whose refusal interval lies wholly below the seed's."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


def load_pilot():
    return load_bench("budget_pilot")


def study(shared_data, name="embedded_gsm8k_v2.yaml"):
    from stayaligned.config import StudyConfig, load

    return load(StudyConfig, ROOT / "configs" / "study" / name, [f"data_dir={shared_data}"])


def test_holdout_is_disjoint_from_the_training_subset(tmp_path, shared_data):
    from stayaligned.data.sources import load_source

    pilot, cfg = load_pilot(), study(shared_data)
    path = pilot.holdout_file(cfg, 30, tmp_path / "holdout.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    [source] = cfg.train["data"]
    trained = {ex.content("user") for ex in load_source(
        "gsm8k", split="train", limit=source["limit"], seed=source.get("seed", 0),
        data_dir=cfg.data_dir)}
    assert len(rows) == 30 and len({r["question"] for r in rows}) == 30
    assert not {r["question"] for r in rows} & trained
    assert all(r["answer"].split("####")[-1].strip() for r in rows)


def test_validation_never_reads_the_evaluation_sets(tmp_path, shared_data):
    pilot = load_pilot()
    for name in ("embedded_gsm8k_v2.yaml", "qwen_coder_gsm8k.yaml"):
        cfg = study(shared_data, name)
        evaluated = {(b.get("source") or b["name"], b.get("split")) for b in cfg.eval["benchmarks"]}
        ecfg = pilot.validation_eval(cfg, "m", tmp_path, tmp_path / "h.jsonl")
        read = {(b.source or b.name, b.split) for b in ecfg.benchmarks}
        assert not read & evaluated
        assert {s for s, _ in read} == {"demo-harmful", "demo-benign", str(tmp_path / "h.jsonl")}
        assert {sp for s, sp in read if s == "demo-harmful"} == {"align", "validation"}
        judges = list(cfg.judges) or [cfg.eval.get("judge", "keyword")]
        assert ecfg.judge == judges[0]


def test_choose_takes_the_cheapest_candidate_with_intervals_apart():
    pilot = load_pilot()
    seed = {"refusal": {"value": 0.9, "low": 0.8, "high": 0.95},
            "prefill_refusal": {"value": 0.6, "low": 0.5, "high": 0.7}}

    def cand(lr, steps, plain, prefill):  # (value, high) of each rate
        return {"lr": lr, "max_steps": steps,
                "refusal": {"value": plain[0], "low": 0.0, "high": plain[1]},
                "prefill_refusal": {"value": prefill[0], "low": 0.0, "high": prefill[1]}}

    results = {"seed": seed,
               "a": cand(5e-5, 80, (0.8, 0.85), (0.6, 0.75)),  # overlaps on both
               "b": cand(1e-4, 80, (0.8, 0.85), (0.4, 0.45)),  # apart on prefill, keeps 67%
               "c": cand(5e-5, 160, (0.5, 0.7), (0.8, 0.9)),  # apart on plain, more steps
               "d": cand(2e-4, 80, (0.5, 0.6), (0.3, 0.4))}  # apart, keeps 56% / 50%
    assert pilot.choose(results) == "b"  # fewest steps, then the lowest lr
    assert pilot.choose({"seed": seed, "a": results["a"]}) is None
    # --max-kept 0.6: b keeps 0.4/0.6 = 67% of the prefilled rate (and overlaps on plain): out
    assert pilot.choose(results, max_kept=0.6) == "d"  # d (80 steps) before c (160)
    assert pilot.erodes(results["c"], seed, 0.6) and not pilot.erodes(results["b"], seed, 0.6)
