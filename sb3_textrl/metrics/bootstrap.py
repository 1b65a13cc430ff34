"""Paired bootstrap confidence intervals: is system B better than system A on the same evaluation items?"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``b - a`` over paired items, with a percentile bootstrap confidence interval."""

    mean_a: float
    mean_b: float
    difference: float  # mean(b) - mean(a)
    low: float  # lower end of the confidence interval of the difference
    high: float
    confidence: float  # e.g. 0.95
    n: int  # paired items
    n_resamples: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self) | {"significant": self.significant}

    def __str__(self) -> str:
        level = f"{self.confidence:.0%}"
        return f"{self.difference:+.3f} [{level} CI {self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """
    Percentile bootstrap of the mean paired difference ``b - a`` (Efron & Tibshirani 1993; Koehn 2004 for its use
    on text metrics): resample the items with replacement, keeping each item's pair together, so that the
    interval reflects how much the difference depends on which articles were drawn, not how hard each article is.

    :param a: per-item scores of the baseline system (e.g. ROUGE-L of each held-out article)
    :param b: per-item scores of the other system, on the same items in the same order
    :param n_resamples: bootstrap resamples
    :param confidence: coverage of the interval, in (0, 1)
    :param seed: seed of the resampling
    :return: the difference of means and its confidence interval
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired scores need two 1-D sequences of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a bootstrap needs at least 2 paired items, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired scores contain NaN or infinite values: score every item, or drop it from both systems")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples} is too few for a percentile interval; use 1000 or more")
    differences = y - x
    rng = np.random.default_rng(seed)
    # (n_resamples, n) indices, in chunks so that memory stays small for many items.
    means = np.empty(n_resamples)
    chunk = max(1, 2**22 // len(x))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        draws = rng.integers(0, len(x), size=(stop - start, len(x)))
        means[start:stop] = differences[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(
        mean_a=float(x.mean()), mean_b=float(y.mean()), difference=float(differences.mean()),
        low=float(low), high=float(high), confidence=confidence, n=len(x), n_resamples=n_resamples,
    )


def mean_interval(
    values: Sequence[float], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """
    The mean of ``values`` with a percentile bootstrap confidence interval.

    :return: (mean, low, high)
    """
    zeros = [0.0] * len(values)
    result = paired_bootstrap(zeros, values, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return result.mean_b, result.low, result.high


def proportion_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """
    Wilson's score interval for a proportion (e.g. a pairwise accuracy): unlike a bootstrap it stays honest on a
    handful of trials, where every resample of one pair gives back the same accuracy.

    :param successes: the number of successes (may be fractional, e.g. ties counted half)
    :param n: the number of trials (>= 1)
    :param confidence: the interval's coverage
    :return: (low, high)
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 trials and 0 <= successes <= n, got successes={successes}, n={n}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``0.412 [0.380, 0.441]``; NaN-safe."""
    if any(math.isnan(v) for v in (mean, low, high)):
        return "n/a"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
