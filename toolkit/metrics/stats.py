"""Statistics over problems: bootstrap intervals, paired comparisons, Wilson intervals, ECE.

Every interval here treats *problems* as the unit of resampling: a benchmark score is a mean over
problems, and its uncertainty comes from which problems were drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike, as_generator
from ttscale.validation import check_int, check_number

__all__ = [
    "BootstrapCI",
    "PairedDifference",
    "bootstrap_ci",
    "bootstrap_counts",
    "ece",
    "ece_top_candidates",
    "paired_difference",
    "wilson_interval",
]


def _check_confidence(confidence: float) -> None:
    check_number("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)


def _check_n_boot(n_boot: int) -> None:
    check_int("n_boot", n_boot, min=1)


def _problems_first(values: ArrayLike, axis: int) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        raise ConfigError("per-problem values must have a problems axis, got a scalar")
    try:
        arr = np.moveaxis(arr, axis, 0)
    except np.exceptions.AxisError as e:
        raise ConfigError(f"axis {axis} is out of range for values of shape {arr.shape}") from e
    if arr.shape[0] == 0:
        raise ConfigError("per-problem values are empty; need at least one problem")
    return arr


def bootstrap_counts(n_problems: int, n_boot: int, seed: SeedLike = None) -> NDArray[np.int64]:
    """Resampling counts ``(n_boot, n_problems)``: row ``b`` says how often each problem was drawn.

    Drawing ``n_problems`` indices with replacement per replicate and counting them lets a
    statistic that is a mean over problems be computed for all replicates with one matrix
    product (``counts @ values / n_problems``) instead of materialising resampled copies.
    """
    _check_n_boot(n_boot)
    check_int("n_problems", n_problems, min=1)
    rng = as_generator(seed)
    idx = rng.integers(0, n_problems, size=(n_boot, n_problems))
    flat = (np.arange(n_boot)[:, None] * n_problems + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n_problems).reshape(n_boot, n_problems)


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile-bootstrap interval of a mean over problems.

    ``mean``, ``low`` and ``high`` have the shape of the values without the problems axis
    (0-d arrays for 1-d input; use ``float(ci.mean)``).
    """

    mean: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    confidence: float
    n_boot: int
    n_problems: int


def bootstrap_ci(
    per_problem_values: ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: SeedLike = None,
    axis: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap CI of the mean over problems, for many curves at once.

    ``per_problem_values`` has a problems axis (``axis``, default 0), e.g. shape ``(problems,)``
    or ``(problems, K)`` for a pass@k curve per problem. Problems are resampled with
    replacement ``n_boot`` times (the same resamples for every column, so curves keep their
    joint uncertainty); ``low``/``high`` are the ``(1 ∓ confidence)/2`` quantiles of the
    replicate means. NaN values propagate.
    """
    _check_confidence(confidence)
    _check_n_boot(n_boot)
    arr = _problems_first(per_problem_values, axis)
    p = arr.shape[0]
    flat = arr.reshape(p, -1)
    counts = bootstrap_counts(p, n_boot, seed).astype(np.float64)
    reps = counts @ flat / p  # (n_boot, columns)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
    shape = arr.shape[1:]
    return BootstrapCI(
        mean=flat.mean(axis=0).reshape(shape),
        low=lo.reshape(shape),
        high=hi.reshape(shape),
        confidence=confidence,
        n_boot=int(n_boot),
        n_problems=p,
    )


@dataclass(frozen=True)
class PairedDifference:
    """Difference ``mean(a − b)`` of two methods on the same problems.

    ``low``/``high``: percentile-bootstrap CI of the mean difference (problems resampled).
    ``p_sign``: exact two-sided sign test over problems with a non-zero difference.
    ``p_permutation``: two-sided paired sign-flip permutation test of the mean difference,
    ``(1 + #{|mean*| ≥ |mean|}) / (1 + n_boot)``. ``n_better``/``n_worse``/``n_ties`` count
    problems with ``a > b``, ``a < b``, ``a == b``. All arrays have the shape of one problem's values.
    """

    mean: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    p_sign: NDArray[np.float64]
    p_permutation: NDArray[np.float64]
    n_better: NDArray[np.int64]
    n_worse: NDArray[np.int64]
    n_ties: NDArray[np.int64]
    confidence: float
    n_boot: int


def _sign_test_p(n_pos: NDArray[np.int64], n_neg: NDArray[np.int64]) -> NDArray[np.float64]:
    from scipy.stats import binom

    n = n_pos + n_neg
    k = np.minimum(n_pos, n_neg)
    p = np.where(n > 0, 2.0 * binom.cdf(k, np.maximum(n, 1), 0.5), 1.0)
    return np.minimum(p, 1.0)


def paired_difference(
    a: ArrayLike,
    b: ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: SeedLike = None,
    axis: int = 0,
) -> PairedDifference:
    """Compare two methods scored on the same problems (shapes ``(problems,)`` or ``(problems, K)``).

    The bootstrap and the permutation test share one generator (``seed``), so the result is
    reproducible for a fixed seed.
    """
    _check_confidence(confidence)
    _check_n_boot(n_boot)
    xa = _problems_first(a, axis)
    xb = _problems_first(b, axis)
    if xa.shape != xb.shape:
        raise ConfigError(f"a and b must have the same shape, got {xa.shape} and {xb.shape}")
    rng = as_generator(seed)
    d = xa - xb
    ci = bootstrap_ci(d, confidence=confidence, n_boot=n_boot, seed=rng)
    p = d.shape[0]
    flat = d.reshape(p, -1)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_boot, p))
    perm = np.abs(signs @ flat / p)
    obs = np.abs(flat.mean(axis=0))
    # Tolerance so that replicates equal to the observed statistic up to rounding count as ≥.
    ge = perm >= obs - 1e-12 * np.maximum(1.0, obs)
    p_perm = (1.0 + ge.sum(axis=0)) / (1.0 + n_boot)
    n_pos = (flat > 0).sum(axis=0)
    n_neg = (flat < 0).sum(axis=0)
    shape = d.shape[1:]
    return PairedDifference(
        mean=ci.mean,
        low=ci.low,
        high=ci.high,
        p_sign=_sign_test_p(n_pos, n_neg).reshape(shape),
        p_permutation=p_perm.reshape(shape),
        n_better=n_pos.reshape(shape),
        n_worse=n_neg.reshape(shape),
        n_ties=(p - n_pos - n_neg).reshape(shape),
        confidence=confidence,
        n_boot=int(n_boot),
    )


def wilson_interval(
    successes: ArrayLike, n: ArrayLike, *, confidence: float = 0.95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Wilson score interval ``(low, high)`` for a binomial proportion ``successes / n``.

    ``centre = (p̂ + z²/2n) / (1 + z²/n)``, ``half = z·sqrt(p̂(1 − p̂)/n + z²/4n²) / (1 + z²/n)``.
    Vectorised over broadcastable ``successes`` and ``n``; ``n = 0`` gives ``(0, 1)``.
    """
    _check_confidence(confidence)
    s = np.asarray(successes, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    if np.any(m < 0) or np.any(s < 0) or np.any(s > m):
        raise ConfigError("wilson_interval needs 0 <= successes <= n")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ph = s / m
        denom = 1.0 + z * z / m
        centre = (ph + z * z / (2.0 * m)) / denom
        half = z * np.sqrt(ph * (1.0 - ph) / m + z * z / (4.0 * m * m)) / denom
        # The exact bound at s = 0 (s = n) is 0 (1); pin it against rounding.
        lo = np.where((m > 0) & (s > 0), np.clip(centre - half, 0.0, 1.0), 0.0)
        hi = np.where((m > 0) & (s < m), np.clip(centre + half, 0.0, 1.0), 1.0)
    return lo, hi


def ece(
    confidences: ArrayLike,
    correct: ArrayLike,
    n_bins: int = 10,
    weights: ArrayLike | None = None,
) -> float:
    """Expected calibration error over weighted predictions (RPC ``compute_maximum_metrics``).

    Bins are ``(b/n_bins, (b+1)/n_bins]`` (left-open, so ``q = 0`` and NaN fall in no bin).
    Per bin, ``size`` = Σ weights, ``acc`` = weighted mean correctness, ``conf`` = weighted mean
    confidence; ``ECE = Σ_b size_b·|acc_b − conf_b| / Σ_b size_b``. ``weights`` (default 1) carry the
    ``1/#ties`` split of tied top candidates (see :func:`ece_top_candidates`). Returns NaN when no
    prediction falls in any bin.
    """
    check_int("n_bins", n_bins, min=1)
    q = np.asarray(confidences, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    w = np.ones_like(q) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (q.shape == y.shape == w.shape):
        raise ConfigError(
            f"confidences, correct and weights must have one entry each, got {q.size}, {y.size}, {w.size}"
        )
    # Edges computed as b / n_bins, as the reference does, so boundary values land identically.
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    b = np.searchsorted(edges, q, side="left") - 1
    ok = (b >= 0) & (b < n_bins) & ~np.isnan(q)
    b, q, y, w = b[ok], q[ok], y[ok], w[ok]
    size = np.bincount(b, weights=w, minlength=n_bins)
    total = size.sum()
    if total <= 0:
        return math.nan
    acc = np.bincount(b, weights=w * y, minlength=n_bins)
    conf = np.bincount(b, weights=w * q, minlength=n_bins)
    nz = size > 0
    gap = np.abs(acc[nz] / size[nz] - conf[nz] / size[nz])
    return float(np.sum(size[nz] * gap) / total)


def ece_top_candidates(
    candidate_confidences: list[ArrayLike],
    candidate_correct: list[ArrayLike],
    n_bins: int = 10,
    *,
    tie_tol: float = 1e-10,
) -> float:
    """ECE of each problem's top candidate(s): the RPC evaluation protocol.

    For problem ``t`` with candidate (e.g. answer-cluster) confidences ``q`` and correctness flags,
    every candidate with ``q ≥ max(q) − tie_tol`` is a top candidate with weight ``1/#ties`` and
    confidence ``max(q)``. (The reference counts near-ties within ``tie_tol`` in ``#ties`` but
    skips those strictly below the max; here all of them get their share, a difference of at
    most ``tie_tol`` in confidence.) Problems without candidates are skipped.
    """
    if len(candidate_confidences) != len(candidate_correct):
        raise ConfigError("candidate_confidences and candidate_correct must list the same problems")
    qs: list[NDArray[np.float64]] = []
    ys: list[NDArray[np.float64]] = []
    ws: list[NDArray[np.float64]] = []
    for qc, yc in zip(candidate_confidences, candidate_correct, strict=True):
        q = np.asarray(qc, dtype=np.float64).ravel()
        y = np.asarray(yc, dtype=np.float64).ravel()
        if q.shape != y.shape:
            raise ConfigError(f"a problem has {q.size} confidences but {y.size} correctness flags")
        if q.size == 0 or np.all(np.isnan(q)):
            continue
        top = np.nanmax(q)
        tied = q >= top - tie_tol
        n_t = int(tied.sum())
        qs.append(np.full(n_t, top))
        ys.append(y[tied])
        ws.append(np.full(n_t, 1.0 / n_t))
    if not qs:
        return math.nan
    return ece(np.concatenate(qs), np.concatenate(ys), n_bins, np.concatenate(ws))
