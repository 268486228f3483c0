"""Paired differences and percentile-bootstrap confidence intervals (numpy only, Flower-free).

Personalization is judged client by client: each client's personal model against a reference
(start, global, local-only) on the *same* test images, so the spread between clients cancels
and only the paired difference is averaged. Clients are few and their test splits tiny, so the
interval comes from resampling clients (a percentile bootstrap of the mean), not from a normal
approximation.
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
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise StatsError(f"confidence level is {level!r}; allowed: a number strictly between 0 and 1")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise StatsError(f"resamples is {resamples!r}; allowed: an integer >= 1")
    groups = []
    for name, values in values_by_group.items():
        group = np.asarray(values, dtype=float).ravel()
        if not np.isfinite(group).all():
            raise StatsError(f"group {name!r} holds a non-finite value; drop NaNs first (paired_differences does)")
        if group.size:
            groups.append(group)
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
