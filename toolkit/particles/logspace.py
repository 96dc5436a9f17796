"""Log-space weights: normalisation, effective sample size, log-mean-exp (float64).

Weights are stored as ``ℓ_i = log w_i``. NaN log-weights are treated as ``−inf`` (zero weight) at
this boundary, so NaN never reaches a resampler. All-``−inf`` weights have no normalisation; they
fall back to uniform with a flag, or raise ``DegenerateWeightsError`` when asked to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError, DegenerateWeightsError

__all__ = ["NormalizedWeights", "ess", "log_mean_exp", "log_normalize", "logsumexp"]


def _clean(logw: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(logw, dtype=np.float64)
    if arr.ndim != 1:
        raise ConfigError(f"log-weights must be a 1-d array, got shape {arr.shape}")
    if arr.size == 0:
        raise ConfigError("log-weights are empty; need at least one particle")
    if np.any(np.isposinf(arr)):
        raise DegenerateWeightsError("log-weights contain +inf; a weight must be finite")
    return np.where(np.isnan(arr), -np.inf, arr)


def logsumexp(x: ArrayLike, axis: int | None = None) -> NDArray[np.float64] | float:
    """``LSE(x) = m + log Σ exp(x − m)``, ``m = max x``; ``−inf`` where every entry is ``−inf``.

    NaN entries count as ``−inf``. Returns a float for ``axis=None``, else an array.
    """
    a = np.asarray(x, dtype=np.float64)
    a = np.where(np.isnan(a), -np.inf, a)
    if a.size == 0:
        raise ConfigError("logsumexp of an empty array")
    m = np.max(a, axis=axis, keepdims=True)
    safe_m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - safe_m), axis=axis, keepdims=True)) + safe_m
    out = np.where(np.isposinf(m), np.inf, out)
    if axis is None:
        return float(out.reshape(()))
    return np.squeeze(out, axis=axis)


@dataclass(frozen=True)
class NormalizedWeights:
    """Normalised weights of one particle population.

    ``log_weights = ℓ − LSE(ℓ)`` and ``weights = exp(log_weights)`` (sum 1); ``log_total = LSE(ℓ)``
    (``−inf`` when degenerate); ``degenerate`` is True when every ``ℓ_i`` was ``−inf``/NaN and
    uniform weights were substituted.
    """

    log_weights: NDArray[np.float64]
    weights: NDArray[np.float64]
    log_total: float
    degenerate: bool


def log_normalize(
    logw: ArrayLike, *, on_degenerate: Literal["uniform", "raise"] = "uniform"
) -> NormalizedWeights:
    """Normalise log-weights ``ℓ`` (shape ``(N,)``): ``W_i = exp(ℓ_i − LSE(ℓ))``.

    NaN counts as ``−inf``. If all are ``−inf``: ``on_degenerate="uniform"`` returns ``W = 1/N``
    with ``degenerate=True``; ``"raise"`` raises ``DegenerateWeightsError``. ``+inf`` always raises.
    """
    if on_degenerate not in ("uniform", "raise"):
        raise ConfigError(f"on_degenerate must be 'uniform' or 'raise', got {on_degenerate!r}")
    lw = _clean(logw)
    total = float(logsumexp(lw))
    if total == -math.inf:
        if on_degenerate == "raise":
            raise DegenerateWeightsError(
                f"all {lw.size} log-weights are -inf or NaN; no particle has positive weight"
            )
        lu = np.full(lw.size, -math.log(lw.size))
        return NormalizedWeights(lu, np.exp(lu), -math.inf, True)
    ln = lw - total
    w = np.exp(ln)
    return NormalizedWeights(ln, w / w.sum(), total, False)


def ess(logw: ArrayLike) -> float:
    """Effective sample size ``1/Σ W_i² = exp(−LSE(2·(ℓ − LSE(ℓ))))``, in ``[1, N]``.

    Returns ``0.0`` when every weight is zero (all ``−inf``/NaN): no particle carries weight.
    """
    lw = _clean(logw)
    total = float(logsumexp(lw))
    if total == -math.inf:
        return 0.0
    return float(math.exp(-float(logsumexp(2.0 * (lw - total)))))


def log_mean_exp(x: ArrayLike, axis: int | None = None) -> NDArray[np.float64] | float:
    """``log((1/N) Σ exp(x_i)) = LSE(x) − log N`` (e.g. ``log Ẑ`` of an SMC step); NaN counts as ``−inf``."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ConfigError("log_mean_exp of an empty array")
    n = a.size if axis is None else a.shape[axis]
    out = logsumexp(a, axis=axis)
    return out - math.log(n)
