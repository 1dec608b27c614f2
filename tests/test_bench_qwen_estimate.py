"""bench/qwen_estimate.py's projection from measured timings (given here, no model): one eval
stage per template a model is evaluated under, the Qwen study's cells narrowed to native
except sft and sft-safe (ptst is a reading of sft's model: no stages), each stage's seconds from the timings."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_bench

from stayaligned.config import StudyConfig, load

ROOT = Path(__file__).resolve().parents[1]
INF = {"batch_size": 32, "load_s": 10.0, "advbench_batch_s": 60.0, "advbench_new_tokens": 48,
       "gsm8k_batch_s": 100.0, "gsm8k_new_tokens": 64, "forward_batch8_s": 5.0}


def test_eval_stages_follow_each_cells_templates(tmp_path):
    estimate = load_bench("qwen_estimate")
    cfg = load(StudyConfig, str(ROOT / "configs/study/qwen_coder_gsm8k.yaml"),
               [f"output_dir={tmp_path}"])
    result = estimate.estimate(cfg, {"step_s": 100.0}, INF, load_s=10.0)
    evals = sorted(k for k in result["stages_s"] if "/eval" in k)
    assert evals == sorted(
        ["seed/eval", "seed/eval-native-safe", "cells/sft/eval", "cells/sft/eval-native-safe",
         "cells/sft-safe/eval", "cells/sft-safe/eval-native-safe"]
        + [f"cells/{c}/eval" for c in ("lookahead", "str", "safety_mix", "stack", "sft+merge",
                                       "sft+resta", "sft+safe_delta")])
    # one template: AdvBench 3 variants x ceil(100/32) batches x 60 s; XSTest 4 x 60 s; GSM8K
    # 2 batches x 100 s x 256/64 tokens + 2 loss passes of 32 = 4 x 8 at 5 s; + the load
    one = 3 * 4 * 60 + 4 * 60 + 2 * 100 * 256 / 64 + 2 * 5.0 * 32 / 8
    assert result["stages_s"]["cells/str/eval"] == pytest.approx(one + 10.0, abs=2)
    assert result["stages_s"]["seed/eval-native-safe"] == result["stages_s"]["seed/eval"]
    assert not [k for k in result["stages_s"] if k.startswith("cells/ptst")]
    # a repair cell sweeps instead of training: merge's 9 strengths + the aligned model, each
    # validation eval = the 44 demo requests of the default validation in 2 batches x 60 s,
    # the 50-item hold-out in 2 batches
    # of 8 tokens (2 x 100 x 8/64) and 2 loss passes (2 x 5 x 32/8), + a load; + 9 writes
    stages = result["stages_s"]
    assert "cells/sft+merge/train" not in stages
    per_eval = 2 * 60 + 2 * 100 * 8 / 64 + 2 * 5 * 32 / 8 + 10
    assert stages["cells/sft+merge/repair"] == pytest.approx(10 * per_eval + 9 * 10, abs=2)
    assert stages["cells/sft+safe_delta/repair"] == pytest.approx(7 * per_eval + 6 * 10, abs=2)


def test_a_measured_prompt_pass_is_not_scaled_with_the_answer_length():
    """With the prompt pass timed (the batch at one new token), a longer answer adds only
    per-token time: 60 s + (100 - 60) / 63 per token, not the whole 100 s batch scaled."""
    estimate = load_bench("qwen_estimate")
    inf = {**INF, "gsm8k_prefill_s": 60.0}
    assert estimate.batch_seconds(inf, "gsm8k", 256) == pytest.approx(60 + 40 / 63 * 255)
    assert estimate.batch_seconds(inf, "gsm8k", 64) == pytest.approx(100.0)
    assert estimate.batch_seconds(INF, "gsm8k", 256) == pytest.approx(400.0)  # older: linear
