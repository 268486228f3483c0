"""Paired differences and bootstrap intervals on hand-built examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgemri.core.errors import EdgemriError
from edgemri.core.stats import (
    Interval,
    Percentile,
    bootstrap_ci,
    bootstrap_ci_clustered,
    bootstrap_percentiles,
    paired_differences,
)


def test_paired_differences_use_the_shared_keys_and_drop_nans() -> None:
    a = {(0, "h1"): 0.8, (0, "p1"): math.nan, (0, "p2"): 0.5, (1, "h1"): 0.9}
    b = {(0, "h1"): 0.7, (0, "p1"): 0.6, (0, "p2"): math.nan, (1, "h1"): 0.6, (1, "p9"): 0.1}
    assert paired_differences(a, b) == {(0, "h1"): pytest.approx(0.1), (1, "h1"): pytest.approx(0.3)}
    assert list(paired_differences(a, b)) == [(0, "h1"), (1, "h1")]  # a's order
    assert paired_differences({"x": 1.0}, {"y": 1.0}) == {}


def test_a_constant_difference_gives_a_zero_width_interval_at_that_value() -> None:
    ci = bootstrap_ci([0.03] * 7)
    assert ci.n == 7 and ci.level == 0.95
    assert ci.low == ci.high == pytest.approx(0.03) and ci.mean == pytest.approx(0.03)


def test_a_symmetric_sample_gives_about_mean_plus_minus_1_96_standard_errors() -> None:
    values = np.tile([-2.0, -1.0, 0.0, 1.0, 2.0], 8) + 0.3
    half = 1.96 * values.std() / math.sqrt(values.size)
    ci = bootstrap_ci(values.tolist())
    assert ci.mean == pytest.approx(0.3) and ci.n == 40
    assert ci.low < ci.mean < ci.high
    assert ci.low == pytest.approx(0.3 - half, abs=0.1 * half)
    assert ci.high == pytest.approx(0.3 + half, abs=0.1 * half)
    assert bootstrap_ci(values, level=0.5).high - bootstrap_ci(values, level=0.5).low < ci.high - ci.low


def test_the_interval_is_deterministic_with_the_seed() -> None:
    values = [0.1, -0.2, 0.05, 0.3, 0.0, 0.12]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    # 100 resamples: another seed moves the bounds (10,000 resamples of 6 values land on the same quantiles)
    assert bootstrap_ci(values, seed=3, resamples=100) != bootstrap_ci(values, seed=4, resamples=100)


def test_fewer_than_two_values_have_no_interval() -> None:
    empty, one = bootstrap_ci([]), bootstrap_ci([0.2])
    assert empty.n == 0 and all(math.isnan(v) for v in (empty.mean, empty.low, empty.high))
    assert one.n == 1 and one.mean == 0.2 and math.isnan(one.low) and math.isnan(one.high)
    assert one.to_dict() == {"mean": 0.2, "low": one.low, "high": one.high, "n": 1, "level": 0.95}


def test_clustered_bootstrap_resamples_within_groups() -> None:
    by_seed = {0: [0.0, 0.0, 0.0], 1: [1.0]}
    ci = bootstrap_ci_clustered(by_seed)
    assert isinstance(ci, Interval) and ci.n == 4
    # every resample keeps 3 values of seed 0 and 1 of seed 1: the pooled mean cannot move
    assert ci.low == ci.high == ci.mean == 0.25
    pooled = bootstrap_ci([0.0, 0.0, 0.0, 1.0])
    assert pooled.low == 0.0 and pooled.high >= 0.5
    assert bootstrap_ci_clustered({7: [0.1, 0.4, -0.2]}, seed=1) == bootstrap_ci([0.1, 0.4, -0.2], seed=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"level": 1.0}, "confidence level is 1.0; allowed: a number strictly between 0 and 1"),
    ({"level": 95}, "confidence level is 95"),
    ({"resamples": 0}, "resamples is 0; allowed: an integer >= 1"),
])
def test_bad_settings_are_refused_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(EdgemriError, match=message):
        bootstrap_ci([0.1, 0.2], **kwargs)


def test_a_nan_value_is_refused_not_averaged() -> None:
    with pytest.raises(EdgemriError, match="group 's1' holds a non-finite value"):
        bootstrap_ci_clustered({"s0": [0.1, 0.2], "s1": [math.nan, 0.3]})


def test_percentiles_come_with_bootstrap_intervals_and_the_edge_cases_are_explicit() -> None:
    values = np.arange(100.0)  # numpy's linear percentiles of 0..99: the q-th is 0.99 q
    low, median, high = bootstrap_percentiles(values, [10, 50, 90], seed=1)
    assert isinstance(median, Percentile) and median.n == 100 and median.level == 0.95
    assert (low.value, median.value, high.value) == pytest.approx((9.9, 49.5, 89.1))
    assert all(p.low < p.value < p.high for p in (low, median, high))
    # the distribution-free 95% interval of the median of 100 values runs from the 40th to the 61st of them
    assert median.low == pytest.approx(40, abs=3) and median.high == pytest.approx(60, abs=3)
    assert bootstrap_percentiles(values, [50], seed=1) == bootstrap_percentiles(values, [50], seed=1)
    constant = bootstrap_percentiles([0.03] * 5, [25, 75])
    assert all(p.low == p.value == p.high == pytest.approx(0.03) for p in constant)
    empty, one = bootstrap_percentiles([], [50])[0], bootstrap_percentiles([0.2], [50])[0]
    assert empty.n == 0 and math.isnan(empty.value)
    assert one.value == 0.2 and math.isnan(one.low) and one.to_dict()["q"] == 50.0
    with pytest.raises(EdgemriError, match=r"percentiles are \[50, 101\]; allowed: one or more numbers from 0 to 100"):
        bootstrap_percentiles(values, [50, 101])
    with pytest.raises(EdgemriError, match="the sample holds a non-finite value"):
        bootstrap_percentiles([0.1, math.nan], [50])
