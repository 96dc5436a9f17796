"""Log-space weights and resampling schemes (docs/algorithms.md 0, 6.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.errors import ConfigError, DegenerateWeightsError
from ttscale.particles.logspace import ess, log_mean_exp, log_normalize, logsumexp
from ttscale.particles.resampling import (
    inverse_cdf,
    multinomial,
    multinomial_from_uniforms,
    resample,
    residual,
    residual_from_uniforms,
    stratified,
    stratified_from_uniforms,
    systematic,
    systematic_from_uniform,
)

LOGW = np.array([-1.2, -0.3, -2.5, -0.3])
W = np.array([0.161506, 0.397240, 0.044015, 0.397240])


def test_normalisation_vector() -> None:
    nw = log_normalize(LOGW)
    np.testing.assert_allclose(nw.weights, W, atol=1e-6)
    assert nw.weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert not nw.degenerate
    np.testing.assert_allclose(nw.log_weights, np.log(nw.weights), rtol=1e-12)
    assert ess(LOGW) == pytest.approx(2.910192, abs=1e-6)
    assert ess(LOGW) / 4 == pytest.approx(0.727548, abs=1e-6)
    assert log_mean_exp(LOGW) == pytest.approx(-0.763079, abs=1e-6)
    assert nw.log_total - math.log(4) == pytest.approx(-0.763079, abs=1e-6)


def test_shift_invariance_and_large_values() -> None:
    big = LOGW + 1e4
    np.testing.assert_allclose(log_normalize(big).weights, log_normalize(LOGW).weights, rtol=1e-9)
    assert ess(big) == pytest.approx(ess(LOGW), rel=1e-9)
    assert logsumexp([1000.0, 1000.0]) == pytest.approx(1000.0 + math.log(2))


def test_ess_bounds() -> None:
    assert ess(np.zeros(7)) == pytest.approx(7.0)
    assert ess([0.0, -np.inf, -np.inf]) == pytest.approx(1.0)
    assert ess([-np.inf, -np.inf]) == 0.0


def test_nan_becomes_minus_inf_and_degenerate_fallback() -> None:
    nw = log_normalize([0.0, np.nan, 0.0])
    np.testing.assert_allclose(nw.weights, [0.5, 0.0, 0.5])
    dead = log_normalize([-np.inf, np.nan, -np.inf])
    assert dead.degenerate
    np.testing.assert_allclose(dead.weights, [1 / 3] * 3)
    assert dead.log_total == -math.inf
    with pytest.raises(DegenerateWeightsError):
        log_normalize([-np.inf, -np.inf], on_degenerate="raise")
    with pytest.raises(DegenerateWeightsError):
        log_normalize([0.0, np.inf])
    with pytest.raises(ConfigError):
        log_normalize([])
    with pytest.raises(ConfigError):
        log_normalize(np.zeros((2, 2)))


def test_logsumexp_axis_and_all_minus_inf() -> None:
    x = np.array([[0.0, -np.inf], [-np.inf, -np.inf]])
    np.testing.assert_array_equal(logsumexp(x, axis=1), [0.0, -np.inf])
    np.testing.assert_allclose(log_mean_exp(x, axis=1), [-math.log(2), -np.inf])
    assert logsumexp([-np.inf]) == -math.inf


# --- resampling ----------------------------------------------------------------------------


def test_resampling_vectors() -> None:
    assert multinomial_from_uniforms(W, [0.05, 0.62, 0.33, 0.97]).tolist() == [0, 3, 1, 3]
    assert systematic_from_uniform(W, 0.37).tolist() == [0, 1, 2, 3]
    assert stratified_from_uniforms(W, [0.37, 0.81, 0.12, 0.55]).tolist() == [0, 1, 1, 3]
    assert residual_from_uniforms(W, [0.5, 0.9]).tolist() == [1, 3, 1, 3]


def test_float_trap_zero_weight_particles_never_picked() -> None:
    # cumsum ends at 0.9999999 and the last particle has zero weight: u close to 1 must not pick it
    # (a) weights passed as "normalised" but summing to 0.9999999, last one zero
    w = np.array([0.3, 0.3, 0.3999999, 0.0])
    u = np.array([0.0, 0.99999995, np.nextafter(1.0, 0)])
    assert inverse_cdf(w, u).tolist() == [0, 2, 2]  # never 3
    # (b) even after dividing by the sum, cumsum(w / w.sum()) ends at 1 - 2.2e-16 before the zero:
    # protecting only CDF[-1] = 1.0 would hand u = 1 - 1.1e-16 to the zero-weight particle 4.
    w = np.array([0.93, 0.44, 0.95, 0.5, 0.0])
    assert np.cumsum(w / w.sum())[-2] < np.nextafter(1.0, 0)
    assert inverse_cdf(w, [np.nextafter(1.0, 0)]).tolist() == [3]
    w2 = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    pts = np.array([0.0, 0.5, np.nextafter(0.5, 0), np.nextafter(1.0, 0)])
    assert inverse_cdf(w2, pts).tolist() == [1, 3, 1, 3]
    for scheme in ("multinomial", "stratified", "systematic", "residual"):
        a = resample(scheme, 0, w2, 1000)
        assert set(a.tolist()) <= {1, 3}


def test_unnormalised_sum_drift_is_protected() -> None:
    # weights summing to slightly less than 1 with a trailing zero: the end of the CDF is 1.0
    w = np.array([0.1] * 9 + [0.0])  # float sum 0.9999999999999999
    assert inverse_cdf(w, [np.nextafter(1.0, 0)]).tolist() == [8]


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic", "residual"])
def test_schemes_are_unbiased(scheme: str) -> None:
    rng = np.random.default_rng(123)
    n, reps = 4, 5000
    counts = np.zeros(n)
    for _ in range(reps):
        counts += np.bincount(resample(scheme, rng, W, n), minlength=n)
    # E[#copies of i] = N·W_i; tolerance ~5 standard errors of a multinomial count mean
    se = np.sqrt(n * W * (1 - W) / reps)
    np.testing.assert_allclose(counts / reps, n * W, atol=5 * se.max() + 1e-9)


def test_low_variance_schemes_bound_copies() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        c = np.bincount(systematic(rng, W, 4), minlength=4)
        assert np.all((c >= np.floor(4 * W)) & (c <= np.ceil(4 * W)))
        r = np.bincount(residual(rng, W, 4), minlength=4)
        assert np.all(r >= np.floor(4 * W))  # the deterministic copies are always there


def test_seeded_and_num() -> None:
    for fn in (multinomial, stratified, systematic, residual):
        a = fn(5, W, 10)
        assert a.dtype == np.int64 and a.shape == (10,)
        np.testing.assert_array_equal(a, fn(5, W, 10))
        assert fn(0, W, None).shape == (4,)
        assert fn(0, W, 0).shape == (0,)


def test_resampling_bad_input() -> None:
    with pytest.raises(DegenerateWeightsError):
        multinomial(0, [0.0, 0.0])
    with pytest.raises(ConfigError):
        multinomial(0, [0.5, np.nan])
    with pytest.raises(ConfigError):
        multinomial(0, [0.5, -0.1])
    with pytest.raises(ConfigError):
        multinomial_from_uniforms(W, [1.0])
    with pytest.raises(ConfigError):
        residual_from_uniforms(W, [0.5])  # needs 2
    with pytest.raises(ConfigError):
        resample("gumbel", 0, W)
    with pytest.raises(ConfigError):
        systematic(0, W, -1)


# --- properties ----------------------------------------------------------------------------


_finite_or_dead = st.one_of(st.floats(-50, 50), st.just(-np.inf), st.just(np.nan))


@settings(max_examples=100, deadline=None)
@given(st.lists(_finite_or_dead, min_size=1, max_size=12))
def test_property_normalisation_and_ess_bounds(logw: list[float]) -> None:
    nw = log_normalize(logw)
    assert nw.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(nw.weights >= 0)
    e = ess(logw)
    if nw.degenerate:
        assert e == 0.0
    else:
        assert 1.0 - 1e-9 <= e <= len(logw) + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1e-12, 1.0)), min_size=1, max_size=10).filter(
        lambda w: sum(w) > 0
    ),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["multinomial", "stratified", "systematic", "residual"]),
)
def test_property_zero_weight_never_resampled(w: list[float], seed: int, scheme: str) -> None:
    a = resample(scheme, seed, w, 3 * len(w))
    assert a.shape == (3 * len(w),)
    assert np.all(np.asarray(w)[a] > 0)
