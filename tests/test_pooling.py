"""Pooling over seeds: the mean over seeds and items and its two-way cluster bootstrap interval,
checked against a case whose bootstrap distribution is enumerated by hand."""

from __future__ import annotations

import numpy as np
import pytest

from stayaligned.reports.pooling import (
    kept_difference,
    kept_share,
    pooled_rate,
    rate_difference,
    shared_items,
    verdict_matrix,
)

# 2 seeds x 2 items. Each bootstrap replicate draws 2 seeds and 2 items with replacement
# (4 x 4 = 16 equally likely draws). Seed draws {0,0} (1/4): means 1, 0, .5, .5 for item draws
# 00, 11, 01, 10; {1,1} (1/4): always 1; {0,1} or {1,0} (1/2): 1, .5, .75, .75.
# So P(0) = 1/16, P(.5) = 1/8 + 1/8 = 1/4, P(.75) = 1/4, P(1) = 1/16 + 1/4 + 1/8 = 7/16:
# the 25th percentile is .5 (P(<= 0) = .0625 < .25 < P(<= .5) = .3125), the 75th is 1
# (P(<= .75) = .5625 < .75), the 2.5th is 0 (P(0) = .0625 > .025), the 97.5th is 1.
HAND = np.array([[1.0, 0.0], [1.0, 1.0]])


def test_pooled_rate_equals_the_hand_computed_bootstrap():
    half = pooled_rate(HAND, level=0.5)
    assert (half.value, half.low, half.high, half.seeds, half.items) == (0.75, 0.5, 1.0, 2, 2)
    full = pooled_rate(HAND)
    assert (full.low, full.high) == (0.0, 1.0)
    one_seed = pooled_rate(np.array([[1.0, 0.0, 1.0, 1.0]]))  # items only: 3/4
    assert one_seed.value == 0.75 and one_seed.seeds == 1
    assert pooled_rate(np.ones((3, 5))).to_dict() == {"value": 1.0, "ci": [1.0, 1.0],
                                                      "seeds": 3, "items": 5}


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(0)
    items = rng.random(200) < 0.6
    same = np.vstack([items, items, items]).astype(float)  # three identical seeds
    varied = same.copy()
    varied[0, :60], varied[2, :60] = 1.0, 0.0  # seeds disagree on 60 items
    a, b = pooled_rate(same), pooled_rate(varied)
    assert a.value == pytest.approx(items.mean())
    assert (b.high - b.low) > (a.high - a.low)


def test_kept_share_and_paired_difference():
    aligned = np.array([[1.0, 1.0, 1.0, 0.0]])  # 75%
    cell = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # 50%
    kept = kept_share(cell, aligned)
    assert kept.value == pytest.approx(0.5 / 0.75)
    assert kept.low < kept.value < kept.high
    # a cell identical to the reference: paired on seeds and items, the difference is exactly 0
    zero = kept_difference(cell, cell.copy(), aligned)
    assert (zero.value, zero.low, zero.high) == (0.0, 0.0, 0.0)
    many_cell, many_aligned = np.tile(cell, 10), np.tile(aligned, 10)  # 40 items
    better = np.ones((2, 40))
    diff = kept_difference(better, many_cell, many_aligned)
    assert diff.value == pytest.approx((1.0 - 0.5) / 0.75)
    assert 0 < diff.low < diff.value < diff.high
    assert rate_difference(better, many_cell).value == pytest.approx(0.5)


def test_matrix_from_verdicts_keeps_shared_items_only():
    seeds = [{"a": True, "b": False, "c": True}, {"a": False, "b": True}]
    ids = shared_items([seeds, [{"a": True, "b": True, "d": False}]])
    assert ids == ["a", "b"]
    assert verdict_matrix(seeds, ids).tolist() == [[1.0, 0.0], [0.0, 1.0]]
