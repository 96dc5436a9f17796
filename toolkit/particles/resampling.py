"""Resampling schemes for particle methods: pure functions, generator first (docs/algorithms.md 6.2).

Each ``scheme(rng, weights, num) -> ancestors`` takes normalised (or merely non-negative) weights
of shape ``(N,)`` and returns ``num`` ancestor indices (int64). All share one inverse-CDF rule:
``CDF = cumsum(W)`` with the end protected (``CDF = 1.0`` from the last positive weight on) and
``A = searchsorted(CDF, u, side="right")`` (the smallest ``i`` with ``CDF[i] > u``), so a
zero-weight particle is never picked, even when float drift leaves the sum at ``0.9999999``.

The ``*_from_uniforms`` variants take the uniforms explicitly, for tests and for reproducing
reference runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError, DegenerateWeightsError
from ttscale.seeding import SeedLike, as_generator
from ttscale.validation import check_int

__all__ = [
    "RESAMPLERS",
    "Resampler",
    "inverse_cdf",
    "multinomial",
    "multinomial_from_uniforms",
    "residual",
    "residual_from_uniforms",
    "resample",
    "stratified",
    "stratified_from_uniforms",
    "systematic",
    "systematic_from_uniform",
]

Resampler = Callable[[SeedLike, ArrayLike, int | None], NDArray[np.int64]]


def _weights(weights: ArrayLike) -> NDArray[np.float64]:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ConfigError(f"weights must be a non-empty 1-d array, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(
            "weights must be finite and >= 0 (normalise log-weights with log_normalize)"
        )
    total = w.sum()
    if total <= 0:
        raise DegenerateWeightsError("all resampling weights are 0; no particle can be chosen")
    return w / total


def _num(num: int | None, n: int) -> int:
    if num is None:
        return n
    return int(check_int("num", num, min=0))


def _protected_cdf(w: NDArray[np.float64]) -> NDArray[np.float64]:
    cdf = np.cumsum(w)
    last = int(np.flatnonzero(w > 0)[-1])
    # Everything from the last positive weight on is exactly 1.0: any u < 1 lands at or before
    # it, never on a trailing zero-weight particle.
    cdf[last:] = 1.0
    return cdf


def _check_uniforms(u: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(u, dtype=np.float64)
    if np.any(~np.isfinite(arr)) or np.any(arr < 0) or np.any(arr >= 1):
        raise ConfigError("uniforms must lie in [0, 1)")
    return arr


def inverse_cdf(weights: ArrayLike, points: ArrayLike) -> NDArray[np.int64]:
    """Ancestors ``searchsorted(CDF, points, side="right")`` for points in ``[0, 1)``."""
    w = _weights(weights)
    pts = _check_uniforms(points)
    idx = np.searchsorted(_protected_cdf(w), pts, side="right")
    return np.minimum(idx, w.size - 1).astype(np.int64)


def multinomial_from_uniforms(weights: ArrayLike, u: ArrayLike) -> NDArray[np.int64]:
    """Multinomial resampling with given iid uniforms ``u`` (one per draw): ``A_j = inv(u_j)``."""
    return inverse_cdf(weights, u)


def stratified_from_uniforms(weights: ArrayLike, u: ArrayLike) -> NDArray[np.int64]:
    """Stratified resampling with given uniforms: points ``(j + U_j)/num``, ``num = len(u)``."""
    uu = _check_uniforms(u).ravel()
    return inverse_cdf(weights, (np.arange(uu.size) + uu) / max(uu.size, 1))


def systematic_from_uniform(
    weights: ArrayLike, u: float, num: int | None = None
) -> NDArray[np.int64]:
    """Systematic resampling with one given uniform ``U``: points ``(j + U)/num``."""
    w = np.asarray(weights)
    m = _num(num, int(w.size))
    uu = float(_check_uniforms(u))
    return inverse_cdf(weights, (np.arange(m) + uu) / max(m, 1))


def residual_from_uniforms(
    weights: ArrayLike, u: ArrayLike, num: int | None = None
) -> NDArray[np.int64]:
    """Residual resampling with given uniforms for the residual multinomial draws.

    ``n_i = ⌊num·W_i⌋`` deterministic copies (in index order), then ``R = num − Σ n_i`` draws
    from the residual weights ``(num·W_i − n_i)/R`` using ``u[:R]`` (``len(u) ≥ R`` required).
    """
    w = _weights(weights)
    m = _num(num, w.size)
    scaled = m * w
    copies = np.floor(scaled).astype(np.int64)
    det = np.repeat(np.arange(w.size, dtype=np.int64), copies)
    r = m - int(copies.sum())
    if r == 0:
        return det
    uu = _check_uniforms(u).ravel()
    if uu.size < r:
        raise ConfigError(f"residual resampling needs {r} uniforms, got {uu.size}")
    resid = np.clip(scaled - copies, 0.0, None)
    return np.concatenate([det, inverse_cdf(resid, uu[:r])])


def multinomial(rng: SeedLike, weights: ArrayLike, num: int | None = None) -> NDArray[np.int64]:
    """``num`` (default ``N``) iid draws from ``W``."""
    g = as_generator(rng)
    m = _num(num, int(np.asarray(weights).size))
    return multinomial_from_uniforms(weights, g.random(m))


def stratified(rng: SeedLike, weights: ArrayLike, num: int | None = None) -> NDArray[np.int64]:
    """One uniform per stratum ``[j/num, (j+1)/num)``."""
    g = as_generator(rng)
    m = _num(num, int(np.asarray(weights).size))
    return stratified_from_uniforms(weights, g.random(m))


def systematic(rng: SeedLike, weights: ArrayLike, num: int | None = None) -> NDArray[np.int64]:
    """One uniform shared by all strata: points ``(j + U)/num``."""
    g = as_generator(rng)
    return systematic_from_uniform(weights, float(g.random()), num)


def residual(rng: SeedLike, weights: ArrayLike, num: int | None = None) -> NDArray[np.int64]:
    """Deterministic ``⌊num·W_i⌋`` copies plus multinomial draws on the residual weights."""
    g = as_generator(rng)
    m = _num(num, int(np.asarray(weights).size))
    return residual_from_uniforms(weights, g.random(m), m)


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def resample(
    scheme: str, rng: SeedLike, weights: ArrayLike, num: int | None = None
) -> NDArray[np.int64]:
    """Dispatch by name: ``multinomial``, ``stratified``, ``systematic`` or ``residual``."""
    try:
        fn = RESAMPLERS[scheme]
    except KeyError:
        raise ConfigError(
            f"unknown resampling scheme {scheme!r}; choose one of {', '.join(RESAMPLERS)}"
        ) from None
    return fn(rng, weights, num)
