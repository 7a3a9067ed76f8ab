"""Bootstrap confidence intervals for the quickstart's per-item scores (pure functions of numpy arrays).

The quickstart evaluates on a few hundred held-out items, so a score of 35.8 % may well be 30 % or 42 % on another
draw of scenes; these intervals say how far. Scores go in per item in [0, 1] (1 = right answer; a caption's
attribute score may lie in between) and come out in percent. A percentile bootstrap with a fixed seed: the same
scores always give the same interval.

`strata` (one label per item) resamples within each stratum and reports the mean of the stratum means, the way
the held-in / held-out VQA means are defined (the mean of the family means), whatever the family sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SIGNIFICANT, NOT_SIGNIFICANT = "differs", "no significant difference"


def _boot_means(values: np.ndarray, strata: Sequence | None, n: int, seed: int) -> tuple[float, np.ndarray]:
    """(the statistic on the data, the statistic on each of n resamples); the statistic is the mean, or the mean
    of the stratum means with strata."""
    rng = np.random.default_rng(seed)
    groups = [values] if strata is None else [values[np.asarray(strata) == s] for s in dict.fromkeys(strata)]
    point = float(np.mean([g.mean() for g in groups]))
    boots = np.zeros(n)
    for g in groups:
        idx = rng.integers(0, len(g), size=(n, len(g)))  # (n, len(g)): one resample of the stratum per row
        boots += g[idx].mean(axis=1)
    return point, boots / len(groups)


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95,
                 strata: Sequence | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi) in percent of per-item scores in [0, 1]: the mean and its percentile-bootstrap interval
    over n resamples of the items."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sequence of scores, got shape {v.shape}")
    if strata is not None and len(strata) != len(v):
        raise ValueError(f"bootstrap_ci: {len(strata)} strata labels for {len(v)} scores")
    point, boots = _boot_means(v, strata, n, seed)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return 100 * point, 100 * float(lo), 100 * float(hi)


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95,
                          strata: Sequence | None = None) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi) in percentage points for two models scored on the same items (a[i] and b[i]
    are the same item): the items are resampled together, so what both models get right or wrong cancels."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_diff needs scores of the same items, got shapes {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n=n, seed=seed, level=level, strata=strata)


def verdict(lo: float, hi: float) -> str:
    """"differs" when the interval of a difference excludes 0, else "no significant difference"."""
    return SIGNIFICANT if lo > 0 or hi < 0 else NOT_SIGNIFICANT
