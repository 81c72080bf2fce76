"""The statistics the benchmarks report (bagnet_fast.timing.median_interval, paired_ratio)."""

from __future__ import annotations

import math
import random

import pytest

from bagnet_fast import timing


def test_median_interval_order_statistics():
    values = list(range(1, 22))  # n = 21: P(X <= 5) = 0.0133, P(X <= 6) = 0.0392 for binomial(21, 1/2)
    random.Random(0).shuffle(values)
    out = timing.median_interval(values)
    assert out["median"] == 11 and (out["low"], out["high"]) == (6, 16)
    assert out["coverage"] == pytest.approx(1 - 2 * sum(math.comb(21, i) for i in range(6)) / 2 ** 21)
    assert out["coverage"] >= 0.95
    assert timing.median_interval([1.0, 2.0, 3.0, 4.0])["median"] == 2.5
    assert timing.median_interval([3.0, 1.0, 2.0, 5.0, 4.0])["low"] is None  # n = 5: no 95 % interval
    six = timing.median_interval([float(i) for i in range(6)])  # n = 6: the extremes, coverage 0.969
    assert (six["low"], six["high"]) == (0.0, 5.0) and six["coverage"] == pytest.approx(1 - 2 / 64)
    with pytest.raises(ValueError):
        timing.median_interval([])


def test_median_interval_covers_the_true_median():
    rng = random.Random(1)
    hits = 0
    for _ in range(2000):  # skewed noise like the VM's: exponential, true median ln 2
        out = timing.median_interval([rng.expovariate(1.0) for _ in range(15)])
        hits += out["low"] <= math.log(2) <= out["high"]
    assert 0.95 <= hits / 2000 <= 0.995  # coverage for n = 15 is 0.965


def test_paired_ratio_cancels_shared_slow_rounds():
    ours = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.5]
    theirs = [1.1 * t for t in ours]  # 10 % slower in every round, whatever the round's noise
    out = timing.paired_ratio(theirs, ours)
    assert out["median"] == pytest.approx(1.1) and out["low"] == pytest.approx(1.1) and out["high"] == pytest.approx(1.1)
    with pytest.raises(ValueError):
        timing.paired_ratio([1.0], [1.0, 2.0])
