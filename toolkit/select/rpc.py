"""Reasoning pruning (RPC, Zhou et al. 2025): a two-component Weibull mixture over path probabilities.

Each sampled path ``i`` has a length-normalised probability ``p_i = exp(mean token log-prob)``.
A two-component Weibull mixture is fitted to ``p`` by maximum likelihood; paths that are more
likely to come from the low-probability component *and* lie below the mean probability are pruned
(ALGORITHMS.md section 2.5).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError

__all__ = [
    "WeibullMixture",
    "fit_weibull_mixture",
    "weibull_log_pdf",
    "weibull_posterior",
    "weibull_prune",
]

logger = logging.getLogger(__name__)

# Reference optimiser set-up (WNJXYK/RPC compute_rpc.py): start point and box constraints.
_INITIAL_GUESS = (0.5, 1.0, 1.0, 1.5, 2.0)
_BOUNDS = ((0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None))


def weibull_log_pdf(x: ArrayLike, k: float, lam: float) -> NDArray[np.float64]:
    """``log Wb(x; k, λ) = log k − log λ + (k − 1)·log(x/λ) − (x/λ)^k`` for ``x > 0`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.log(x) - math.log(lam)
    with np.errstate(over="ignore"):  # an overflowing (x/λ)^k is a log-density of -inf
        return math.log(k) - math.log(lam) + (k - 1.0) * z - np.exp(k * z)


def _weibull_mean(k: float, lam: float) -> float:
    return lam * math.gamma(1.0 + 1.0 / k)


@dataclass(frozen=True)
class WeibullMixture:
    """``f(p) = w1·Wb(p; k1, λ1) + (1 − w1)·Wb(p; k2, λ2)``; component 1 has the larger mean.

    ``nll`` is the negative log-likelihood at the fit and ``converged`` the optimiser's flag
    (both informational; ``nan``/``True`` when the mixture is built by hand).
    """

    w1: float
    k1: float
    lam1: float
    k2: float
    lam2: float
    nll: float = math.nan
    converged: bool = True

    @property
    def mean1(self) -> float:
        """Mean of component 1: ``λ1·Γ(1 + 1/k1)``."""
        return _weibull_mean(self.k1, self.lam1)

    @property
    def mean2(self) -> float:
        """Mean of component 2: ``λ2·Γ(1 + 1/k2)``."""
        return _weibull_mean(self.k2, self.lam2)

    def _component_log_terms(self, p: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        a = math.log(self.w1) + weibull_log_pdf(p, self.k1, self.lam1)
        b = math.log1p(-self.w1) + weibull_log_pdf(p, self.k2, self.lam2)
        return a, b

    def log_pdf(self, p: ArrayLike) -> NDArray[np.float64]:
        """Mixture log-density ``log f(p)`` (logaddexp of the weighted component log-densities)."""
        a, b = self._component_log_terms(p)
        return np.logaddexp(a, b)

    def posterior(self, p: ArrayLike) -> NDArray[np.float64]:
        """``π1(p) = w1·Wb1(p) / f(p)``: probability that ``p`` comes from component 1."""
        a, b = self._component_log_terms(p)
        return np.exp(a - np.logaddexp(a, b))


def _as_probabilities(p: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        raise ConfigError(f"path probabilities must be a 1-d array, got shape {arr.shape}")
    if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise ConfigError(
            "path probabilities must be finite and > 0 (pass exp(mean token log-prob)), "
            f"got min {np.nanmin(arr) if not np.all(np.isnan(arr)) else np.nan}"
        )
    return arr


def fit_weibull_mixture(p: ArrayLike) -> WeibullMixture:
    """Fit a two-component Weibull mixture to ``p`` (shape ``(n,)``, values > 0) by maximum likelihood.

    Minimises ``−Σ log f(p_i)`` with L-BFGS-B from ``(w1, k1, λ1, k2, λ2) = (0.5, 1, 1, 1.5, 2)``
    under ``w1 ∈ [0.2, 0.8]`` and the other parameters ``≥ 0.01`` (the RPC reference set-up), then
    relabels so component 1 has the larger mean. ``log f`` is computed with ``logaddexp`` of the
    component log-densities, so no ``log(0)`` occurs.
    """
    from scipy.optimize import minimize

    x = _as_probabilities(p)
    if x.size < 2:
        raise ConfigError(f"fitting a Weibull mixture needs at least 2 probabilities, got {x.size}")
    logx = np.log(x)

    def nll(theta: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        # Objective and its analytic gradient: finite differences (the reference's default)
        # cost six objective calls per step and made a fit take ~1 s; this takes milliseconds
        # and lands on the same optimum.
        w1, k1, lam1, k2, lam2 = (float(t) for t in theta)
        z1 = logx - math.log(lam1)
        z2 = logx - math.log(lam2)
        e1 = np.exp(k1 * z1)
        e2 = np.exp(k2 * z2)
        a = math.log(w1) + math.log(k1) - math.log(lam1) + (k1 - 1.0) * z1 - e1
        b = math.log1p(-w1) + math.log(k2) - math.log(lam2) + (k2 - 1.0) * z2 - e2
        lse = np.logaddexp(a, b)
        val = -float(np.sum(lse))
        if not math.isfinite(val):
            # An overflowing exp gives -inf log-density (+inf objective): the same signal as the
            # reference's log(0), which L-BFGS-B treats as a bad step.
            return math.inf, np.zeros(5)
        r = np.exp(a - lse)  # responsibility of component 1
        s = 1.0 - r
        grad = -np.array(
            [
                float(np.sum(r / w1 - s / (1.0 - w1))),
                float(np.sum(r * (1.0 / k1 + z1 - z1 * e1))),
                float(np.sum(r * k1 * (e1 - 1.0) / lam1)),
                float(np.sum(s * (1.0 / k2 + z2 - z2 * e2))),
                float(np.sum(s * k2 * (e2 - 1.0) / lam2)),
            ]
        )
        if not np.all(np.isfinite(grad)):
            return math.inf, np.zeros(5)
        return val, grad

    # L-BFGS-B's 5-dimensional BLAS calls gain nothing from threads, and OpenBLAS threads that
    # spin on a busy machine made each fit ~10x slower: run the fit single-threaded.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        res = minimize(
            nll, np.asarray(_INITIAL_GUESS), method="L-BFGS-B", jac=True, bounds=_BOUNDS
        )
    w1, k1, lam1, k2, lam2 = (float(t) for t in res.x)
    if not res.success:
        logger.debug("Weibull mixture fit did not converge: %s", res.message)
    if _weibull_mean(k1, lam1) < _weibull_mean(k2, lam2):
        k1, lam1, k2, lam2 = k2, lam2, k1, lam1
        w1 = 1.0 - w1
    return WeibullMixture(w1, k1, lam1, k2, lam2, nll=float(res.fun), converged=bool(res.success))


def weibull_posterior(p: ArrayLike, mix: WeibullMixture) -> NDArray[np.float64]:
    """Posterior ``π1(p_i)`` of the high-probability component, shape ``(n,)``."""
    return mix.posterior(_as_probabilities(p))


def weibull_prune(p: ArrayLike, mix: WeibullMixture | None = None) -> NDArray[np.bool_]:
    """Reasoning-pruning mask over paths (``True`` = pruned), shape ``(n,)``.

    Path ``i`` is pruned iff ``π1(p_i) < 1 − π1(p_i)`` and ``p_i < mean(p)``. With fewer than two
    paths, or all ``p_i`` equal, nothing is pruned (no fit is attempted). ``mix`` may pass a
    mixture fitted beforehand; by default it is fitted on ``p``. At least one path (any with
    ``p_i ≥ mean(p)``) always survives.
    """
    x = _as_probabilities(p)
    if x.size < 2 or np.all(x == x[0]):
        return np.zeros(x.size, dtype=bool)
    if mix is None:
        mix = fit_weibull_mixture(x)
    pi1 = mix.posterior(x)
    return (pi1 < 1.0 - pi1) & (x < x.mean())
