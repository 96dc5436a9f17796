"""Reasoning pruning (RPC, Zhou et al. 2025): a two-component Weibull mixture over path probabilities.

Each sampled path ``i`` has a length-normalised probability ``p_i = exp(mean token log-prob)``.
A two-component Weibull mixture is fitted to ``p`` by maximum likelihood; paths that are more
likely to come from the low-probability component *and* lie below the mean probability are pruned
(docs/algorithms.md section 2.5).

Two fits are available (``fit=``):

* ``"reference"``: the authors' optimiser exactly (``WNJXYK/RPC`` ``compute_rpc.py``):
  ``scipy.optimize.minimize`` (L-BFGS-B, finite-difference gradient) of
  ``−Σ log(w1·Wb(p; k1, λ1) + (1 − w1)·Wb(p; k2, λ2))`` with the densities evaluated in linear
  space, from ``(w1, k1, λ1, k2, λ2) = (0.5, 1, 1, 1.5, 2)`` under ``w1 ∈ [0.2, 0.8]`` and the other
  parameters ``≥ 0.01``. With few paths the mixture likelihood has no proper maximum (it grows
  without bound as one component collapses onto a point), so the result is wherever this
  optimiser's path stops; this fit reproduces that path. Two guards are added, and neither
  changes a fit that the optimiser reports as converged at a finite objective: a fit never
  reports convergence from a non-finite objective, and when the optimiser ends on a non-finite
  objective, or fails after visiting a better point, the best point it evaluated is kept. Its
  only guard against a degenerate spike component is the optimiser's own path (a fixed start,
  L-BFGS-B's stopping rule); nothing bounds the shapes. About 10 ms a fit.
* ``"fast"``: every fit of a batch at once (:func:`fit_weibull_mixtures`), a damped Newton method
  on the exact Hessian over a ``(fits, 5)`` float64 parameter array, from the same start point and
  under the same bounds, in the coordinates ``(w1, log k1, log λ1, log k2, log λ2)``. Guards: a
  step is accepted only if the objective is finite and does not increase (so the best point seen is
  always the current one); directions of negative curvature are followed with their curvature's
  absolute value (a modified ``LDLᵀ`` factorisation), so each step is a descent direction; a
  parameter at its bound whose gradient points outwards is held; and each shape is capped at
  :data:`FAST_MAX_SHAPE`, which bounds the likelihood of a spike component (a Weibull of shape
  ``k`` has a log-scale standard deviation ``π/(k√6)``, 0.13% at the cap). A fit stops when a
  step lowers the objective by less than 1e-12 relative (or after 200 steps). On
  well-conditioned data (a proper interior maximum) both fits land on the same optimum; where
  the likelihood is unbounded (a handful of paths) or multimodal they may stop at different
  stationary points and prune differently (``benchmarks/RESULTS.md``: 7% of 64-path and 37% of
  4-path subsets of a synthetic pool).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError

__all__ = [
    "FAST_MAX_SHAPE",
    "RPC_FITS",
    "BatchFit",
    "RpcFit",
    "WeibullMixture",
    "fit_weibull_mixture",
    "fit_weibull_mixtures",
    "weibull_log_pdf",
    "weibull_posterior",
    "weibull_prune",
    "weibull_prune_batch",
]

logger = logging.getLogger(__name__)

RpcFit = Literal["reference", "fast"]
RPC_FITS: tuple[str, ...] = ("reference", "fast")

# Reference optimiser set-up (WNJXYK/RPC compute_rpc.py): start point and box constraints.
_INITIAL_GUESS = (0.5, 1.0, 1.0, 1.5, 2.0)
_BOUNDS = ((0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None))

FAST_MAX_SHAPE = 1000.0
"""Largest Weibull shape the fast fit allows (its guard against a degenerate spike component)."""

_FAST_MAX_ITER = 200
_MU0, _MU_DOWN, _MU_UP = 1e-1, 0.25, 8.0  # Levenberg-Marquardt damping: start, after a good / bad step
_FAST_CHUNK = 32768  # data points per chunk of fits
_FAST_FTOL = 1e-12  # relative decrease of the objective below which a fast fit has converged


def _check_fit(fit: str) -> None:
    if fit not in RPC_FITS:
        raise ConfigError(f"RPC fit must be one of {', '.join(RPC_FITS)}, got {fit!r}")


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

    ``nll`` is the negative log-likelihood at the fit, ``converged`` whether the optimiser
    stopped on its convergence test at a finite objective, and ``fit`` which fit produced it
    (informational; ``nan``/``True``/``""`` when the mixture is built by hand).
    """

    w1: float
    k1: float
    lam1: float
    k2: float
    lam2: float
    nll: float = math.nan
    converged: bool = True
    fit: str = ""

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
    _check_positive(arr)
    return arr


def _check_positive(arr: NDArray[np.float64]) -> None:
    if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise ConfigError(
            "path probabilities must be finite and > 0 (pass exp(mean token log-prob)), "
            f"got min {np.nanmin(arr) if not np.all(np.isnan(arr)) else np.nan}"
        )


def _relabelled(
    w1: float, k1: float, lam1: float, k2: float, lam2: float
) -> tuple[float, float, float, float, float]:
    if _weibull_mean(k1, lam1) < _weibull_mean(k2, lam2):
        return 1.0 - w1, k2, lam2, k1, lam1
    return w1, k1, lam1, k2, lam2


def fit_weibull_mixture(p: ArrayLike, *, fit: RpcFit = "reference") -> WeibullMixture:
    """Fit a two-component Weibull mixture to ``p`` (shape ``(n,)``, values > 0) by maximum likelihood.

    ``fit="reference"`` (default) runs the authors' optimiser exactly; ``fit="fast"`` runs the
    batched Newton fit on this one row (module docstring). Either way the result is relabelled so
    that component 1 has the larger mean.
    """
    _check_fit(fit)
    x = _as_probabilities(p)
    if x.size < 2:
        raise ConfigError(f"fitting a Weibull mixture needs at least 2 probabilities, got {x.size}")
    if fit == "fast":
        b = fit_weibull_mixtures(x[None, :])
        w1, k1, lam1, k2, lam2 = (float(t) for t in b.params[0])
        return WeibullMixture(
            w1, k1, lam1, k2, lam2, nll=float(b.nll[0]), converged=bool(b.converged[0]), fit="fast"
        )
    return _reference_fit(x)


def _mixture_nll_linear(theta: NDArray[np.float64], x: NDArray[np.float64]) -> float:
    """The reference objective: ``−Σ log f(x)`` with both densities computed in linear space."""
    w1, k1, lam1, k2, lam2 = theta
    d1 = (k1 / lam1) * (x / lam1) ** (k1 - 1) * np.exp(-((x / lam1) ** k1))
    d2 = (k2 / lam2) * (x / lam2) ** (k2 - 1) * np.exp(-((x / lam2) ** k2))
    return float(-np.sum(np.log(w1 * d1 + (1 - w1) * d2)))


def _reference_fit(x: NDArray[np.float64]) -> WeibullMixture:
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    best_f = math.inf
    best_x = np.asarray(_INITIAL_GUESS, dtype=np.float64)

    def objective(theta: NDArray[np.float64]) -> float:
        nonlocal best_f, best_x
        val = _mixture_nll_linear(theta, x)
        if math.isfinite(val) and val < best_f:
            best_f, best_x = val, np.array(theta, dtype=np.float64)
        return val

    # L-BFGS-B's 5-dimensional BLAS calls gain nothing from threads, and OpenBLAS threads that
    # spin on a busy machine made each fit ~10x slower: run the fit single-threaded.
    with threadpool_limits(1), np.errstate(all="ignore"):
        # jac=None: scipy's 2-point finite differences, as in the reference (which passes no
        # method; with bounds and no constraints scipy selects L-BFGS-B)
        res = minimize(
            objective, np.asarray(_INITIAL_GUESS), method="L-BFGS-B", bounds=_BOUNDS
        )
    theta, fun, converged = np.asarray(res.x, dtype=np.float64), float(res.fun), bool(res.success)
    if not math.isfinite(fun) or (not converged and best_f < fun - 1e-9 * (1.0 + abs(fun))):
        # the optimiser stopped on a non-finite step, or failed after visiting a better point:
        # keep the best point (a successful finite stop is the reference's answer, kept as is)
        logger.debug(
            "Weibull fit ended at objective %s after visiting %s (%s); keeping the best point",
            fun, best_f, res.message,
        )
        theta, fun, converged = best_x, best_f, False
    elif not converged:
        logger.debug("Weibull mixture fit did not converge: %s", res.message)
    w1, k1, lam1, k2, lam2 = _relabelled(*(float(t) for t in theta))
    return WeibullMixture(w1, k1, lam1, k2, lam2, nll=fun, converged=converged, fit="reference")


# --------------------------------------------------------------------------------------------
# fast fit: all rows at once


@dataclass(frozen=True)
class BatchFit:
    """Fast fits of many rows: ``params`` ``(fits, 5)`` = ``(w1, k1, λ1, k2, λ2)`` relabelled so
    component 1 has the larger mean (NaN for rows that were not fitted), ``nll`` ``(fits,)``,
    ``converged`` ``(fits,)`` bool and ``iterations`` ``(fits,)``."""

    params: NDArray[np.float64]
    nll: NDArray[np.float64]
    converged: NDArray[np.bool_]
    iterations: NDArray[np.int64]


def _nll_terms(
    L: NDArray[np.float64], th: NDArray[np.float64], wt: NDArray[np.float64] | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Objective ``−Σ wt·log f``, its gradient and Hessian in ``(w1, log k1, log λ1, log k2, log λ2)``.

    Rows of ``L`` (log data) are fits; ``wt`` (0/1) masks padding. Non-finite values are returned
    as they come (the caller rejects such steps). With ``t = k·log(x/λ)`` and ``e = exp(t)``,
    ``log Wb = log k − log λ + (k − 1)·log(x/λ) − e`` has derivatives ``1 + t − t·e`` (in log k)
    and ``k·(e − 1)`` (in log λ), and second derivatives ``t − t·e − t²·e``, ``k·(e − 1 + t·e)``
    and ``−k²·e``; the mixture's Hessian is ``Σ r·∇²a + s·∇²b + r·s·(∇a − ∇b)(∇a − ∇b)ᵀ``
    with ``r`` the responsibility of component 1 and ``s = 1 − r``.
    """
    F = th.shape[0]
    ones = np.ones(L.shape[1])  # row sums as BLAS matrix-vector products: ~5x faster than sum(axis=1)
    w = th[:, 0:1]
    u1, v1, u2, v2 = th[:, 1:2], th[:, 2:3], th[:, 3:4], th[:, 4:5]
    k1, k2 = np.exp(u1), np.exp(u2)
    z1, z2 = L - v1, L - v2
    t1, t2 = k1 * z1, k2 * z2
    e1, e2 = np.exp(t1), np.exp(t2)
    a = (k1 - 1.0) * z1
    a -= e1
    a += np.log(w) + u1 - v1
    b = (k2 - 1.0) * z2
    b -= e2
    b += np.log1p(-w) + u2 - v2
    ll = np.logaddexp(a, b)
    r = a - ll
    np.exp(r, out=r)
    if wt is not None:
        ll *= wt
        r *= wt
        s = wt - r
        n = wt @ ones
    else:
        s = 1.0 - r
        n = np.full(F, float(L.shape[1]))
    f = -(ll @ ones)
    g = np.empty((F, 5))
    H = np.zeros((F, 5, 5))
    wf = w[:, 0]
    R = r @ ones
    S = n - R
    dw = 1.0 / wf + 1.0 / (1.0 - wf)
    g[:, 0] = R / wf - S / (1.0 - wf)
    q = r * s
    sq = q @ ones
    H[:, 0, 0] = -R / wf**2 - S / (1.0 - wf) ** 2 + dw * dw * sq
    # per component: moments Σ ρ·t, Σ ρ·e, Σ ρ·t·e, Σ ρ·t²·e (ρ = r or s) give its gradient and
    # its own Hessian block; D = (∂/∂log k, ∂/∂log λ) per point for the r·s outer products
    D = []
    for c, (rho, t, e, kk, tot) in enumerate(((r, t1, e1, k1[:, 0], R), (s, t2, e2, k2[:, 0], S))):
        te = t * e
        m_t = (rho * t) @ ones
        m_e = (rho * e) @ ones
        rte = rho * te
        m_te = rte @ ones
        m_tte = (rte * t) @ ones
        iu, iv = 1 + 2 * c, 2 + 2 * c
        g[:, iu] = tot + m_t - m_te
        g[:, iv] = kk * (m_e - tot)
        H[:, iu, iu] = m_t - m_te - m_tte
        H[:, iu, iv] = H[:, iv, iu] = kk * (m_e - tot + m_te)
        H[:, iv, iv] = -kk * kk * m_e
        du = t - te
        du += 1.0
        dv = e - 1.0
        dv *= kk[:, None]
        D += [du, dv]
    sign = (1.0, 1.0, -1.0, -1.0)  # ∇a − ∇b = (dw, du1, dv1, −du2, −dv2)
    for i in range(4):
        qd = q * D[i]
        c0 = sign[i] * dw * (qd @ ones)
        H[:, 0, i + 1] = c0
        H[:, i + 1, 0] = c0
        for j in range(i, 4):
            c1 = sign[i] * sign[j] * ((qd * D[j]) @ ones)
            if i == j:
                H[:, i + 1, i + 1] += c1
            else:
                H[:, i + 1, j + 1] += c1
                H[:, j + 1, i + 1] += c1
    return f, -g, -H


def _newton_steps(H: NDArray[np.float64], g: NDArray[np.float64], mu: NDArray[np.float64]) -> NDArray[np.float64]:
    """``−M⁻¹ g`` for a positive-definite modification ``M`` of ``H`` (batched 5x5).

    ``M = L·|D|·Lᵀ`` from an ``LDLᵀ`` factorisation of ``H + μ·s·I`` (``s`` the largest diagonal
    magnitude) in which each pivot is replaced by ``max(|d|, μ·s)``: negative curvature is
    followed with its magnitude, so the step always descends. Entries are handled as contiguous
    1-d arrays over the batch.
    """
    n = g.shape[1]
    A = np.ascontiguousarray(H.transpose(1, 2, 0))  # (5, 5, F)
    G = np.ascontiguousarray(g.T)
    scale = np.maximum(np.abs(np.einsum("iif->if", A)).max(axis=0), 1.0)
    shift = mu * scale
    floor = np.maximum(shift, 1e-12)
    Lm: list[list[NDArray[np.float64]]] = [[] for _ in range(n)]  # Lm[i][j], j < i
    d: list[NDArray[np.float64]] = []
    for j in range(n):
        dj = A[j, j] + shift
        for k in range(j):
            dj = dj - Lm[j][k] * Lm[j][k] * d[k]
        dj = np.abs(dj)
        dj = np.where(dj < floor, floor, dj)
        d.append(dj)
        for i in range(j + 1, n):
            acc = A[i, j]
            for k in range(j):
                acc = acc - Lm[i][k] * Lm[j][k] * d[k]
            Lm[i].append(acc / dj)
    y: list[NDArray[np.float64]] = []
    for i in range(n):
        yi = -G[i]
        for k in range(i):
            yi = yi - Lm[i][k] * y[k]
        y.append(yi)
    x: list[NDArray[np.float64]] = [np.empty(0)] * n
    for i in range(n - 1, -1, -1):
        xi = y[i] / d[i]
        for k in range(i + 1, n):
            xi = xi - Lm[k][i] * x[k]
        x[i] = xi
    return np.stack(x, axis=1)


def _newton_fit(
    L: NDArray[np.float64],
    wt: NDArray[np.float64] | None,
    th: NDArray[np.float64],
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.int64]]:
    """Damped Newton from ``th`` (updated in place) for every row; returns (nll, converged, iterations)."""
    F = th.shape[0]
    f, g, H = _nll_terms(L, th, wt)
    its = np.zeros(F, dtype=np.int64)
    mu = np.full(F, _MU0)
    active = np.arange(F)
    done = np.zeros(F, dtype=bool)
    for _ in range(_FAST_MAX_ITER):
        if active.size == 0:
            break
        fa, ga, Ha, ta = f[active], g[active], H[active], th[active]
        # hold a parameter at its bound when the gradient pushes it outwards
        held = ((ta <= lo + 1e-12) & (ga > 0)) | ((ta >= hi - 1e-12) & (ga < 0))
        if held.any():
            ga[held] = 0.0
            hr, hc = np.nonzero(held)
            Ha[hr, hc, :] = 0.0
            Ha[hr, :, hc] = 0.0
            Ha[hr, hc, hc] = 1.0
        step = _newton_steps(Ha, ga, mu[active])
        # predicted decrease of the quadratic model: converged when below the tolerance
        pred = -(ga * step).sum(axis=1)
        flat = (pred <= _FAST_FTOL * (1.0 + np.abs(fa))) & (mu[active] <= _MU0)
        if flat.any():
            done[active[flat]] = True
            keep = ~flat
            active, fa, ta, step = active[keep], fa[keep], ta[keep], step[keep]
            if active.size == 0:
                break
        trial = np.clip(ta + step, lo, hi)
        f2, g2, H2 = _nll_terms(L[active], trial, None if wt is None else wt[active])
        ok = np.isfinite(f2) & (f2 <= fa) & np.isfinite(g2).all(axis=1) & np.isfinite(H2).all(axis=(1, 2))
        its[active] += 1
        acc = active[ok]
        small = (fa[ok] - f2[ok]) <= _FAST_FTOL * (1.0 + np.abs(fa[ok]))
        th[acc], f[acc], g[acc], H[acc] = trial[ok], f2[ok], g2[ok], H2[ok]
        mu[acc] = np.maximum(mu[acc] * _MU_DOWN, 1e-12)
        rej = active[~ok]
        mu[rej] *= _MU_UP
        stop = np.zeros(active.size, dtype=bool)
        stop[ok] = small
        stop[~ok] = mu[rej] > 1e10  # no descent step left: a (bounded) stationary point
        done[active[stop]] = True
        active = active[~stop]
    return f, done, its


def fit_weibull_mixtures(
    p: ArrayLike, mask: ArrayLike | None = None, *, max_shape: float = FAST_MAX_SHAPE
) -> BatchFit:
    """Fast fit (module docstring) of one Weibull mixture per row of ``p`` ``(fits, m)``, values > 0.

    ``mask`` ``(fits, m)`` bool marks the entries of each row that belong to its sample (default:
    all); rows with fewer than 2 entries are not fitted (NaN parameters). Every row is fitted
    independently (a row's result does not depend on the other rows of the batch).
    """
    x = np.asarray(p, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"a batch of path probabilities must be 2-d (fits, m), got shape {x.shape}")
    F, m = x.shape
    if mask is None:
        wt = None
        cnt = np.full(F, m)
    else:
        mk = np.asarray(mask, dtype=bool)
        if mk.shape != x.shape:
            raise ConfigError(f"mask must have the shape of p {x.shape}, got {mk.shape}")
        x = np.where(mk, x, 1.0)
        wt = mk.astype(np.float64)
        cnt = mk.sum(axis=1)
    _check_positive(x)
    if not max_shape > 1.0:
        raise ConfigError(f"max_shape must be > 1, got {max_shape}")
    params = np.full((F, 5), np.nan)
    nll = np.full(F, np.nan)
    conv = np.zeros(F, dtype=bool)
    its = np.zeros(F, dtype=np.int64)
    rows = np.flatnonzero(cnt >= 2)
    if rows.size == 0:
        return BatchFit(params, nll, conv, its)
    L_all = np.log(x)
    lo = np.array([_BOUNDS[0][0]] + [math.log(0.01)] * 4)
    hi = np.array([_BOUNDS[0][1], math.log(max_shape), np.inf, math.log(max_shape), np.inf])
    th = np.tile(
        [_INITIAL_GUESS[0]] + [math.log(v) for v in _INITIAL_GUESS[1:]], (rows.size, 1)
    )
    f = np.empty(rows.size)
    done = np.zeros(rows.size, dtype=bool)
    it_rows = np.zeros(rows.size, dtype=np.int64)
    # rows are fitted in chunks of ~32k data points: the temporaries stay in cache (2-3x faster)
    chunk = max(16, _FAST_CHUNK // m)
    from threadpoolctl import threadpool_limits

    # small BLAS calls (row sums) gain nothing from threads, which spin on a busy machine
    with threadpool_limits(1), np.errstate(all="ignore"):
        for c0 in range(0, rows.size, chunk):
            sl = slice(c0, c0 + chunk)
            rr = rows[sl]
            f[sl], done[sl], it_rows[sl] = _newton_fit(
                L_all[rr], None if wt is None else wt[rr], th[sl], lo, hi
            )
    its[rows] = it_rows
    k1, lam1, k2, lam2 = (np.exp(th[:, i]) for i in range(1, 5))
    w1 = th[:, 0].copy()
    from scipy.special import gamma

    with np.errstate(all="ignore"):
        swap = lam1 * gamma(1.0 + 1.0 / k1) < lam2 * gamma(1.0 + 1.0 / k2)
    params[rows] = np.stack(
        [np.where(swap, 1.0 - w1, w1), np.where(swap, k2, k1), np.where(swap, lam2, lam1),
         np.where(swap, k1, k2), np.where(swap, lam1, lam2)], axis=1
    )
    nll[rows] = f
    conv[rows] = done & np.isfinite(f)
    return BatchFit(params, nll, conv, its)


def weibull_posterior(p: ArrayLike, mix: WeibullMixture) -> NDArray[np.float64]:
    """Posterior ``π1(p_i)`` of the high-probability component, shape ``(n,)``."""
    return mix.posterior(_as_probabilities(p))


def weibull_prune(
    p: ArrayLike, mix: WeibullMixture | None = None, *, fit: RpcFit = "reference"
) -> NDArray[np.bool_]:
    """Reasoning-pruning mask over paths (``True`` = pruned), shape ``(n,)``.

    Path ``i`` is pruned iff ``π1(p_i) < 1 − π1(p_i)`` and ``p_i < mean(p)``. With fewer than two
    paths, or all ``p_i`` equal, nothing is pruned (no fit is attempted). ``mix`` may pass a
    mixture fitted beforehand; by default it is fitted on ``p`` with ``fit``. At least one path
    (any with ``p_i ≥ mean(p)``) always survives.
    """
    _check_fit(fit)
    x = _as_probabilities(p)
    if x.size < 2 or np.all(x == x[0]):
        return np.zeros(x.size, dtype=bool)
    if mix is None:
        mix = fit_weibull_mixture(x, fit=fit)
    pi1 = mix.posterior(x)
    return (pi1 < 1.0 - pi1) & (x < x.mean())


def weibull_prune_batch(p: ArrayLike, mask: ArrayLike | None = None) -> NDArray[np.bool_]:
    """:func:`weibull_prune` with the fast fit for every row of ``p`` ``(fits, m)`` at once.

    ``mask`` ``(fits, m)`` marks each row's paths (default: all); entries outside it are never
    pruned. Rows with fewer than two paths or all paths equal prune nothing (and are not fitted).
    """
    x = np.asarray(p, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"a batch of path probabilities must be 2-d (fits, m), got shape {x.shape}")
    mk = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mk.shape != x.shape:
        raise ConfigError(f"mask must have the shape of p {x.shape}, got {mk.shape}")
    out = np.zeros(x.shape, dtype=bool)
    if x.size == 0:
        return out
    xs = np.where(mk, x, 1.0)
    _check_positive(xs)
    cnt = mk.sum(axis=1)
    mean = np.where(mk, xs, 0.0).sum(axis=1) / np.maximum(cnt, 1)
    first = xs[np.arange(x.shape[0]), np.argmax(mk, axis=1)]
    need = (cnt >= 2) & (np.where(mk, xs != first[:, None], False).any(axis=1))
    rows = np.flatnonzero(need)
    if rows.size == 0:
        return out
    bf = fit_weibull_mixtures(xs[rows], None if mask is None else mk[rows])
    w1, k1, lam1, k2, lam2 = (bf.params[:, i : i + 1] for i in range(5))
    xr = xs[rows]
    with np.errstate(all="ignore"):
        z1 = np.log(xr) - np.log(lam1)
        z2 = np.log(xr) - np.log(lam2)
        a = np.log(w1) + np.log(k1) - np.log(lam1) + (k1 - 1.0) * z1 - np.exp(k1 * z1)
        b = np.log1p(-w1) + np.log(k2) - np.log(lam2) + (k2 - 1.0) * z2 - np.exp(k2 * z2)
        pi1 = np.exp(a - np.logaddexp(a, b))
    out[rows] = (pi1 < 1.0 - pi1) & (xr < mean[rows, None]) & mk[rows]
    return out
