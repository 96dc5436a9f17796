"""Reasoning pruning: Weibull-mixture fit and pruning rule (ALGORITHMS.md 2.5, 2.7)."""

from __future__ import annotations

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.select.rpc import (
    WeibullMixture,
    fit_weibull_mixture,
    weibull_log_pdf,
    weibull_posterior,
    weibull_prune,
)

# Section 2.7 worked example: mean token log-probs of 8 paths.
LOGP = np.array([-0.05, -0.05, -0.40, -0.45, -0.50, -1.20, -2.30, -0.90])
P = np.exp(LOGP)


def test_probabilities_of_worked_example() -> None:
    np.testing.assert_allclose(
        P,
        [0.951229, 0.951229, 0.670320, 0.637628, 0.606531, 0.301194, 0.100259, 0.406570],
        atol=1e-6,
    )
    assert P.mean() == pytest.approx(0.578120, abs=1e-6)


def test_fit_matches_reference_parameters() -> None:
    mix = fit_weibull_mixture(P)
    got = np.array([mix.w1, mix.k1, mix.lam1, mix.k2, mix.lam2])
    want = np.array([0.605750, 4.618323, 0.813048, 1.687464, 0.368042])
    np.testing.assert_allclose(got, want, rtol=1e-3)
    assert mix.mean1 == pytest.approx(0.743085, rel=1e-3)
    assert mix.mean2 == pytest.approx(0.328552, rel=1e-3)
    assert mix.mean1 > mix.mean2  # relabelled
    assert mix.converged


def test_posterior_and_pruning_mask() -> None:
    mix = fit_weibull_mixture(P)
    post = weibull_posterior(P, mix)
    np.testing.assert_allclose(
        post,
        [0.969497, 0.969497, 0.866849, 0.830454, 0.786656, 0.108245, 0.002667, 0.312132],
        atol=2e-4,
    )
    mask = weibull_prune(P)
    assert mask.dtype == np.bool_
    assert mask.tolist() == [False] * 5 + [True] * 3


def test_log_pdf_matches_scipy_weibull() -> None:
    from scipy.stats import weibull_min

    x = np.array([0.05, 0.3, 0.9, 1.7])
    np.testing.assert_allclose(
        weibull_log_pdf(x, 2.3, 0.7), weibull_min.logpdf(x, 2.3, scale=0.7), rtol=1e-12
    )
    mix = WeibullMixture(0.3, 4.0, 0.8, 1.5, 0.3)
    dens = 0.3 * weibull_min.pdf(x, 4.0, scale=0.8) + 0.7 * weibull_min.pdf(x, 1.5, scale=0.3)
    np.testing.assert_allclose(mix.log_pdf(x), np.log(dens), rtol=1e-12)
    np.testing.assert_allclose(
        mix.posterior(x), 0.3 * weibull_min.pdf(x, 4.0, scale=0.8) / dens, rtol=1e-12
    )


def test_given_mixture_is_used_without_refit() -> None:
    # A mixture whose component 1 explains everything prunes nothing.
    mix = WeibullMixture(0.8, 1.0, 1.0, 1.0, 1e-3)
    assert not weibull_prune(P, mix).any()


def test_degenerate_inputs_prune_nothing() -> None:
    assert weibull_prune(np.full(6, 0.4)).tolist() == [False] * 6
    assert weibull_prune(np.array([0.7])).tolist() == [False]
    assert weibull_prune(np.array([])).tolist() == []


def test_paths_at_or_above_mean_never_pruned() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        p = np.exp(-rng.exponential(0.6, size=16))
        mask = weibull_prune(p)
        assert not mask[p >= p.mean()].any()
        assert (~mask).any()


def test_bad_input_raises() -> None:
    with pytest.raises(ConfigError):
        weibull_prune(np.array([0.5, 0.0, 0.2]))
    with pytest.raises(ConfigError):
        weibull_prune(np.array([0.5, np.nan]))
    with pytest.raises(ConfigError):
        fit_weibull_mixture(np.array([0.5]))
    with pytest.raises(ConfigError):
        fit_weibull_mixture(np.ones((2, 2)))
