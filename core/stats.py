"""Paired differences and percentile-bootstrap confidence intervals (numpy only, Flower-free).

Personalization is judged client by client: each client's personal model against a reference
(start, global, local-only) on the *same* test images, so the spread between clients cancels
and only the paired difference is averaged. Clients are few and their test splits tiny, so the
interval comes from resampling clients (a percentile bootstrap of the mean), not from a normal
approximation. At hundreds of clients a mean hides who was hurt, so the spread itself is summarised
too: percentiles of the per-client differences, each with the same kind of interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from edgemri.core.errors import EdgemriError

K = TypeVar("K", bound=Hashable)

# Bootstrap means computed per block, so memory stays near this many numbers whatever n is.
_BLOCK_ELEMENTS = 2_000_000


class StatsError(EdgemriError):
    """A statistic was asked for with impossible settings or values (the message names which)."""


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval; ``low``/``high`` are NaN when n < 2 (one value has no spread)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Percentile:
    """The ``q``-th percentile (0-100) of a sample with its confidence interval; NaN bounds when n < 2."""

    q: float
    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_differences(a: Mapping[K, float], b: Mapping[K, float]) -> dict[K, float]:
    """``a[k] - b[k]`` for every key both hold, in ``a``'s order; a pair with a NaN on either side is dropped.

    Keys only one side holds are ignored: a client that failed (or a seed one method lacks) has no pair.
    """
    pairs = {k: float(a[k]) - float(b[k]) for k in a if k in b}
    return {k: v for k, v in pairs.items() if not math.isnan(v)}


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean of ``values``: deterministic for a given seed."""
    return bootstrap_ci_clustered({0: values}, level=level, resamples=resamples, seed=seed)


def bootstrap_ci_clustered(values_by_group: Mapping[Hashable, Sequence[float]], *, level: float = 0.95,
                           resamples: int = 10_000, seed: int = 0) -> Interval:
    """Percentile bootstrap of the pooled mean, resampling values *within* each group (e.g. clients within seeds).

    Each group keeps its size in every resample, so a seed with more clients does not gain or lose
    weight by chance; with one group this is the plain bootstrap. n < 2 gives NaN bounds.
    """
    _check_settings(level, resamples)
    groups = [group for name, values in values_by_group.items() if (group := _finite(values, f"group {name!r}")).size]
    n = sum(g.size for g in groups)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    mean = float(np.concatenate(groups).mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, level)
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for g in groups:
        block = max(1, _BLOCK_ELEMENTS // g.size)
        for start in range(0, resamples, block):
            stop = min(resamples, start + block)
            totals[start:stop] += g[rng.integers(0, g.size, size=(stop - start, g.size))].sum(axis=1)
    low, high = np.quantile(totals / n, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(low), float(high), n, level)


def bootstrap_percentiles(values: Sequence[float], percentiles: Sequence[float], *, level: float = 0.95,
                          resamples: int = 10_000, seed: int = 0) -> list[Percentile]:
    """Each percentile of ``values`` (numpy's default linear interpolation) with a percentile-bootstrap interval.

    All percentiles share one set of resamples (deterministic for a given seed). An extreme percentile of a
    few values cannot leave the range observed: its interval is then the clients' range, not a guarantee.
    """
    _check_settings(level, resamples)
    qs = np.asarray(percentiles, dtype=float).ravel()
    if qs.size == 0 or not ((qs >= 0) & (qs <= 100)).all():
        raise StatsError(f"percentiles are {list(percentiles)!r}; allowed: one or more numbers from 0 to 100")
    sample = _finite(values, "the sample")
    n = sample.size
    if n == 0:
        return [Percentile(float(q), math.nan, math.nan, math.nan, 0, level) for q in qs]
    points = np.percentile(sample, qs)
    if n == 1:
        return [Percentile(float(q), float(v), math.nan, math.nan, 1, level) for q, v in zip(qs, points, strict=True)]
    rng = np.random.default_rng(seed)
    estimates = np.empty((qs.size, resamples))
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        estimates[:, start:stop] = np.percentile(sample[rng.integers(0, n, size=(stop - start, n))], qs, axis=1)
    lows, highs = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return [Percentile(float(q), float(v), float(lo), float(hi), n, level)
            for q, v, lo, hi in zip(qs, points, lows, highs, strict=True)]


def _check_settings(level: float, resamples: int) -> None:
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise StatsError(f"confidence level is {level!r}; allowed: a number strictly between 0 and 1")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise StatsError(f"resamples is {resamples!r}; allowed: an integer >= 1")


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    sample = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(sample).all():
        raise StatsError(f"{what} holds a non-finite value; drop NaNs first (paired_differences does)")
    return sample
