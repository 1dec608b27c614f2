"""Pooling over training seeds: a rate is the mean over seeds and items of the per-item verdicts
(1 = refused), and its 95% interval comes from a two-way cluster bootstrap that resamples the
seeds and the items (benchmark prompts) independently with replacement, the "pigeonhole"
bootstrap for a crossed seeds x items design (Owen 2007): every seed's model answers the same
prompts, so the items are one shared random factor and the seeds another.

Within one replicate the same item draw is applied to every model (the prompts are shared) and
the same seed draw to every cell with that many seeds, by row position: callers comparing two
cells pass only the seeds both have, in the same order (reports/headline.py keys the rows by
seed id), so a difference of kept shares is paired on both factors, seed with seed. The aligned seed is one model: only its
items are resampled. Percentile intervals of B = 2000 replicates from a fixed generator, so a
report is reproducible; replicates where a ratio's denominator is 0 are dropped.

The kept share of a cell is its pooled refusal rate divided by the aligned seed's refusal rate
on the same benchmark, template and judge (never across templates: callers pass verdicts of
one evaluation view only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
RNG_SEED = 20240601


@dataclass(frozen=True)
class Pooled:
    """A pooled estimate with its percentile interval, over `seeds` x `items`."""

    value: float
    low: float
    high: float
    seeds: int
    items: int

    def to_dict(self) -> dict:
        return {"value": self.value, "ci": [self.low, self.high], "seeds": self.seeds,
                "items": self.items}


def verdict_matrix(per_seed: list[dict[str, bool]], ids: list[str]) -> np.ndarray:
    """seeds x items array of 0/1 (NaN where a seed has no verdict for an item)."""
    return np.array([[float(v[i]) if v.get(i) is not None else np.nan for i in ids]
                     for v in per_seed], dtype=float)


def shared_items(groups: list[list[dict[str, bool]]]) -> list[str]:
    """The item ids every seed of every model has a verdict for, in a stable order."""
    sets = [set(k for k, v in seed.items() if v is not None) for g in groups for seed in g]
    return sorted(set.intersection(*sets)) if sets else []


def cluster_bootstrap(matrices: dict[str, np.ndarray],
                      statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
                      level: float = 0.95, replicates: int = REPLICATES,
                      seed: int = RNG_SEED) -> Pooled:
    """`statistic` of the models' pooled means, with its two-way cluster bootstrap interval.

    `matrices`: model -> seeds x items verdicts, the same items (columns) for all. `statistic`
    gets model -> mean (an array: shape () for the point estimate, (B,) for the replicates)."""
    items = {m.shape[1] for m in matrices.values()}
    if len(items) != 1 or not items.pop():
        raise ValueError("cluster_bootstrap: every model needs verdicts on the same, non-empty "
                         "list of items")
    n = next(iter(matrices.values())).shape[1]
    rng = np.random.default_rng(seed)
    item_counts = _counts(rng.integers(0, n, size=(replicates, n)), n)
    seed_counts: dict[int, np.ndarray] = {}
    for m in matrices.values():
        s = m.shape[0]
        if s not in seed_counts:
            seed_counts[s] = _counts(rng.integers(0, s, size=(replicates, s)), s)
    point = {k: np.asarray(np.nanmean(m)) for k, m in matrices.items()}
    boot = {k: _means(m, seed_counts[m.shape[0]], item_counts) for k, m in matrices.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(statistic(point))
        draws = np.asarray(statistic(boot), dtype=float)
    draws = draws[np.isfinite(draws)]
    tail = 100 * (1 - level) / 2
    low, high = (np.percentile(draws, [tail, 100 - tail]) if draws.size else (np.nan, np.nan))
    return Pooled(value, float(low), float(high), max(m.shape[0] for m in matrices.values()), n)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """B x n: how often each index was drawn in each replicate."""
    out = np.zeros((draws.shape[0], n))
    np.add.at(out, (np.repeat(np.arange(draws.shape[0]), draws.shape[1]), draws.ravel()), 1)
    return out


def _means(m: np.ndarray, seeds: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per replicate: the mean of m over the drawn seeds x drawn items (NaN cells skipped)."""
    present = ~np.isnan(m)
    total = np.einsum("bs,si,bi->b", seeds, np.where(present, m, 0.0), items)
    count = np.einsum("bs,si,bi->b", seeds, present.astype(float), items)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


# ---------------------------------------------------------------- the study's quantities


def pooled_rate(matrix: np.ndarray, **kwargs) -> Pooled:
    """A model's rate pooled over its seeds and items.

    >>> r = pooled_rate(np.array([[1.0, 0.0], [1.0, 1.0]]), level=0.5)
    >>> r.value, r.low, r.high
    (0.75, 0.5, 1.0)
    """
    return cluster_bootstrap({"m": matrix}, lambda d: d["m"], **kwargs)


def kept_share(cell: np.ndarray, aligned: np.ndarray, **kwargs) -> Pooled:
    """The cell's pooled refusal rate over the aligned seed's (aligned: 1 x items)."""
    return cluster_bootstrap({"cell": cell, "aligned": aligned},
                             lambda d: d["cell"] / d["aligned"], **kwargs)


def kept_difference(cell: np.ndarray, reference: np.ndarray, aligned: np.ndarray,
                    **kwargs) -> Pooled:
    """kept share of `cell` minus that of `reference` (both over the same aligned seed)."""
    return cluster_bootstrap({"cell": cell, "ref": reference, "aligned": aligned},
                             lambda d: (d["cell"] - d["ref"]) / d["aligned"], **kwargs)


def rate_difference(cell: np.ndarray, reference: np.ndarray, **kwargs) -> Pooled:
    """Pooled rate of `cell` minus `reference`'s (e.g. over-refusal against sft)."""
    return cluster_bootstrap({"cell": cell, "ref": reference},
                             lambda d: d["cell"] - d["ref"], **kwargs)
