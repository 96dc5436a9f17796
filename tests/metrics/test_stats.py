"""Bootstrap intervals, paired comparisons, Wilson intervals and ECE (docs/algorithms.md 2.6, 2.7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.metrics.stats import (
    bootstrap_ci,
    bootstrap_counts,
    ece,
    ece_top_candidates,
    paired_difference,
    wilson_interval,
)


def test_ece_test_vector() -> None:
    assert ece([0.668065, 0.9, 0.55, 0.62], [0, 1, 0, 1]) == pytest.approx(0.23451625, abs=1e-12)


def test_ece_top_candidates_reproduces_vector_and_splits_ties() -> None:
    confs = [[0.331935, 0.668065, 0.0], [0.9, 0.1], [0.55, 0.45], [0.62, 0.38]]
    flags = [[1, 0, 0], [1, 0], [0, 1], [1, 0]]
    assert ece_top_candidates(confs, flags) == pytest.approx(0.23451625, abs=1e-12)
    # two tied top candidates, one right: weight 1/2 each -> accuracy 0.5 at confidence 0.5
    assert ece_top_candidates([[0.5, 0.5]], [[1, 0]]) == pytest.approx(0.0)
    assert ece_top_candidates([[0.5, 0.5]], [[1, 1]]) == pytest.approx(0.5)


def test_ece_bins_are_left_open_right_closed() -> None:
    # q = 0 is in no bin; q = 0.1 is in bin 0 (0, 0.1], not bin 1.
    assert math.isnan(ece([0.0], [1]))
    assert ece([0.0, 0.3], [1, 1]) == pytest.approx(0.7)
    assert ece([0.1, 0.15], [1, 0], n_bins=10) == pytest.approx((0.9 + 0.15) / 2)
    assert ece([0.1, 0.1], [1, 0], n_bins=10) == pytest.approx(0.4)


def test_ece_weights_equal_repetition() -> None:
    q = np.array([0.2, 0.7, 0.95])
    y = np.array([0, 1, 1])
    w = np.array([2.0, 1.0, 3.0])
    assert ece(q, y, weights=w) == pytest.approx(
        ece(np.repeat(q, [2, 1, 3]), np.repeat(y, [2, 1, 3]))
    )


def test_bootstrap_counts_rows_sum_to_problems() -> None:
    c = bootstrap_counts(7, 50, seed=0)
    assert c.shape == (50, 7)
    assert (c.sum(axis=1) == 7).all()
    np.testing.assert_array_equal(c, bootstrap_counts(7, 50, seed=0))


def test_bootstrap_ci_matches_explicit_resampling() -> None:
    rng = np.random.default_rng(1)
    v = rng.random((40, 3))
    ci = bootstrap_ci(v, n_boot=500, seed=5)
    counts = bootstrap_counts(40, 500, seed=5)
    reps = np.stack([np.repeat(v, row, axis=0).mean(axis=0) for row in counts])
    np.testing.assert_allclose(ci.low, np.quantile(reps, 0.025, axis=0), rtol=1e-12)
    np.testing.assert_allclose(ci.high, np.quantile(reps, 0.975, axis=0), rtol=1e-12)
    np.testing.assert_allclose(ci.mean, v.mean(axis=0))
    assert ci.mean.shape == (3,)
    one = bootstrap_ci(v[:, 0], n_boot=500, seed=5)
    assert one.mean.shape == ()
    assert float(one.low) == pytest.approx(float(ci.low[0]))


def test_bootstrap_ci_axis_and_coverage() -> None:
    rng = np.random.default_rng(2)
    v = rng.random((3, 60))
    a = bootstrap_ci(v, axis=1, n_boot=300, seed=0)
    b = bootstrap_ci(v.T, n_boot=300, seed=0)
    np.testing.assert_allclose(a.low, b.low)
    # Nominal 95% interval of a Bernoulli(0.3) mean over 200 problems covers 0.3 about 95% of the time.
    hits = 0
    for s in range(200):
        x = (np.random.default_rng(100 + s).random(200) < 0.3).astype(float)
        ci = bootstrap_ci(x, n_boot=400, seed=s)
        hits += float(ci.low) <= 0.3 <= float(ci.high)
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_difference_detects_shift_and_null() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(300)
    better = base + 0.05 + 0.02 * rng.standard_normal(300)
    res = paired_difference(better, base, seed=1)
    assert float(res.mean) == pytest.approx(float(np.mean(better - base)))
    assert float(res.low) > 0
    assert float(res.p_sign) < 1e-6
    assert float(res.p_permutation) < 0.01
    assert int(res.n_better + res.n_worse + res.n_ties) == 300
    same = paired_difference(base, base, seed=1)
    assert float(same.p_sign) == 1.0
    assert float(same.p_permutation) == 1.0
    assert int(same.n_ties) == 300


def test_sign_test_exact_value() -> None:
    # 8 better, 2 worse, 1 tie: two-sided p = 2 * P(Bin(10, 0.5) <= 2) = 112/1024
    a = np.array([1] * 8 + [0] * 2 + [1], dtype=float)
    b = np.array([0] * 8 + [1] * 2 + [1], dtype=float)
    res = paired_difference(a, b, seed=0, n_boot=50)
    assert float(res.p_sign) == pytest.approx(112 / 1024)


def test_paired_difference_vectorised_over_curves() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((50, 4))
    b = rng.random((50, 4))
    res = paired_difference(a, b, seed=2, n_boot=200)
    assert res.mean.shape == res.p_sign.shape == res.low.shape == (4,)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval([0, 5, 10], [10, 10, 10])
    # statsmodels proportion_confint(5, 10, method="wilson") = (0.236593, 0.763407)
    np.testing.assert_allclose(lo, [0.0, 0.2365931, 0.7224672], atol=1e-6)
    np.testing.assert_allclose(hi, [0.2775328, 0.7634069, 1.0], atol=1e-6)
    lo0, hi0 = wilson_interval(0, 0)
    assert (float(lo0), float(hi0)) == (0.0, 1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bootstrap_ci([], seed=0),
        lambda: bootstrap_ci([1.0, 2.0], confidence=1.0),
        lambda: bootstrap_ci([1.0, 2.0], n_boot=0),
        lambda: bootstrap_ci([1.0, 2.0], axis=2),
        lambda: paired_difference([1.0, 2.0], [1.0]),
        lambda: wilson_interval(3, 2),
        lambda: ece([0.5], [1, 0]),
        lambda: ece([0.5], [1], n_bins=0),
    ],
)
def test_bad_arguments_raise(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        call()
