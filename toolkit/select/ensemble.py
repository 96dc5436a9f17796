"""Reward-model / verifier ensembles: per-member z-normalisation and score aggregation (docs/algorithms.md 8).

A score matrix ``R[m, j]`` holds member ``m``'s score of candidate ``j``. Members are put on one
scale first (z-scores against a reference set), then combined per candidate by an aggregator
(mean, median, worst case, or uncertainty-penalised mean), then best-of-N picks the argmax.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.validation import check_choice, choices

__all__ = [
    "ENSEMBLE_METHODS",
    "EnsembleMethod",
    "aggregate_ensemble",
    "argmax_first",
    "ensemble_best_of_n",
    "znormalize",
]

EnsembleMethod = Literal["mean", "median", "min", "mean_minus_std", "mean_minus_var"]
ENSEMBLE_METHODS: tuple[str, ...] = choices(EnsembleMethod)


def _as_matrix(scores: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ConfigError(f"{name} must be a (members, candidates) matrix, got shape {arr.shape}")
    return arr


def znormalize(scores: ArrayLike, reference: ArrayLike | None = None) -> NDArray[np.float64]:
    """Per-member z-scores ``(R[m, ·] − μ_m) / σ_m``, shape ``(members, candidates)``.

    ``μ_m`` and ``σ_m`` (population std, ``ddof=0``) are estimated on ``reference[m, ·]`` (e.g. all
    scores member ``m`` gave on a calibration set; any number of columns) or, by default, on
    ``scores`` itself. A member with ``σ_m = 0`` is only centred (it cannot rank anything).
    NaN reference values are ignored.
    """
    r = _as_matrix(scores)
    ref = r if reference is None else _as_matrix(reference, "reference")
    if ref.shape[0] != r.shape[0]:
        raise ConfigError(
            f"reference has {ref.shape[0]} members but scores has {r.shape[0]}; one row per member"
        )
    mu = np.nanmean(ref, axis=1, keepdims=True)
    sd = np.nanstd(ref, axis=1, keepdims=True)
    return (r - mu) / np.where(sd > 0, sd, 1.0)


def aggregate_ensemble(
    scores: ArrayLike,
    aggregation: EnsembleMethod = "mean",
    *,
    lam: float = 1.0,
) -> NDArray[np.float64]:
    """Combine member scores per candidate, shape ``(candidates,)``.

    ``mean``, ``median``, ``min`` (worst-case), ``mean_minus_std`` (``mean − λ·std``, ``ddof=0``)
    and ``mean_minus_var`` (``mean − λ·var``). Columns are candidates, rows members; a 1-d input
    is one member. Normalise first (:func:`znormalize`) unless members share a scale.
    """
    check_choice("aggregation", aggregation, ENSEMBLE_METHODS)
    r = _as_matrix(scores)
    if aggregation == "mean":
        return r.mean(axis=0)
    if aggregation == "median":
        return np.median(r, axis=0)
    if aggregation == "min":
        return r.min(axis=0)
    if aggregation == "mean_minus_std":
        return r.mean(axis=0) - lam * r.std(axis=0)
    return r.mean(axis=0) - lam * r.var(axis=0)  # mean_minus_var


def argmax_first(values: ArrayLike) -> int:
    """Index of the largest value, the first one on ties; NaN counts as lowest.

    Raises ``ConfigError`` for an empty or all-NaN input.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or np.all(np.isnan(v)):
        raise ConfigError("cannot pick a best candidate: no candidate has a score")
    return int(np.nanargmax(v))


def ensemble_best_of_n(
    scores: ArrayLike,
    aggregation: EnsembleMethod = "mean",
    *,
    lam: float = 1.0,
    normalize: bool = True,
    reference: ArrayLike | None = None,
) -> int:
    """Best-of-N over candidates scored by an ensemble: ``argmax_j A(z(R)[:, j])`` (first on ties).

    ``normalize=True`` z-scores each member against ``reference`` (default: ``scores``) first.
    """
    r = znormalize(scores, reference) if normalize else _as_matrix(scores)
    return argmax_first(aggregate_ensemble(r, aggregation, lam=lam))
