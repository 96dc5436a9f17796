"""Scaling curves of a run: coverage and every selection method at every budget, with CIs.

:func:`compute_curves` replays each method on the same stored pool at each ``k`` (expected
accuracy over random size-``k`` subsets, :func:`ttscale.metrics.selection_at_k`), attaches
problem-bootstrap confidence intervals, and optionally fits the exponentiated power law to the
coverage curve. :func:`plot_curves` draws the result; :meth:`CurveReport.to_json` serialises it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike, as_int_seed
from ttscale.select.rules import ORACLE, ORACLE_DESCRIPTION, ORACLE_LABEL, RULES
from ttscale.store.pool import Pool
from ttscale.validation import check_choice, check_number

__all__ = [
    "METHODS",
    "CurveReport",
    "MISSING_POLICIES",
    "ProgressFn",
    "MethodCurve",
    "check_prerequisites",
    "compute_curves",
    "coverage_counts",
    "curves_figure",
    "default_ks",
    "plot_curves",
    "run_confidences",
    "run_labels",
    "trace_confidences",
]

log = logging.getLogger(__name__)

#: Curve names -> description: the oracle (``coverage``) and every selection rule of
#: :data:`ttscale.select.rules.RULES`, under the rule's name.
METHODS: dict[str, str] = {
    ORACLE: ORACLE_DESCRIPTION,
    **{r.name: r.description for r in RULES.values()},
}

_LABELS = {ORACLE: ORACLE_LABEL, **{r.name: r.plot_label for r in RULES.values()}}


@dataclass(frozen=True)
class MethodCurve:
    """One method's accuracy per budget ``k`` with a bootstrap CI over problems.

    ``per_problem`` is ``(problems, len(ks))``; ``estimator[j]`` says how ``ks[j]`` was computed
    (``"closed-form"``, ``"exact"``, ``"mc"``) and ``draws[j]`` how many random subsets per
    problem a Monte-Carlo estimate used (0 otherwise).
    """

    method: str
    ks: NDArray[np.int64]
    mean: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    per_problem: NDArray[np.float64] = field(repr=False)
    estimator: tuple[str, ...] = ()
    draws: NDArray[np.int64] | None = None
    # why this selection is an oracle (it reads the correctness labels), or None
    oracle: str | None = None

    @property
    def label(self) -> str:
        """Legend label (``"best-of-N@k (oracle selection)"`` when it reads the labels)."""
        base = _LABELS.get(self.method, self.method)
        return f"{base} (oracle selection)" if self.oracle else base

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "label": self.label,
            "oracle": self.oracle is not None,
            "oracle_reason": self.oracle,
            "description": METHODS.get(self.method, ""),
            "k": self.ks.tolist(),
            "mean": _nan_to_none(self.mean),
            "ci_low": _nan_to_none(self.low),
            "ci_high": _nan_to_none(self.high),
            "estimator": list(self.estimator),
            "draws": None if self.draws is None else self.draws.tolist(),
        }


@dataclass(frozen=True)
class CurveReport:
    """Curves of several methods on one pool, plus an optional coverage power-law fit."""

    ks: NDArray[np.int64]
    curves: Mapping[str, MethodCurve]
    n_problems: int
    n_samples: NDArray[np.int64] = field(repr=False)
    confidence: float = 0.95
    fit: Any | None = None  # ttscale.metrics.scaling.PowerLawBootstrap
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "k": self.ks.tolist(),
            "problems": self.n_problems,
            "samples_per_problem": {
                "min": int(self.n_samples.min()) if self.n_samples.size else 0,
                "max": int(self.n_samples.max()) if self.n_samples.size else 0,
            },
            "confidence": self.confidence,
            "missing_samples": dict(self.meta.get("missing_samples") or {}),
            "verdicts": self.meta.get("verdicts"),
            "methods": {name: c.to_dict() for name, c in self.curves.items()},
            "meta": dict(self.meta),
        }
        if self.fit is not None:
            f = self.fit.fit
            d["fit"] = {
                "law": "coverage(k) = exp(a * k^b)",
                "method": f.method,
                "a": f.a,
                "b": f.b,
                "a_ci": [self.fit.a_low, self.fit.a_high],
                "b_ci": [self.fit.b_low, self.fit.b_high],
                "points": f.n_points,
                "r2": None if math.isnan(f.r2) else f.r2,
                "rmse": f.rmse,
            }
        return d


def _nan_to_none(a: NDArray[np.float64]) -> list[float | None]:
    return [None if not math.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def default_ks(n_min: int) -> NDArray[np.int64]:
    """Powers of two up to ``n_min`` (and ``n_min`` itself)."""
    if n_min < 1:
        raise ConfigError("the run has a problem without samples; nothing to analyse")
    ks = [1 << i for i in range(int(math.log2(n_min)) + 1)]
    if ks[-1] != n_min:
        ks.append(n_min)
    return np.asarray(ks, dtype=np.int64)


def trace_confidences(
    top_logprobs: Sequence[Any],
    *,
    measure: str = "bottom_window",
    window: int = 2048,
    bottom_percent: float = 0.1,
) -> NDArray[np.float64]:
    """Per-trace DeepConf confidence from each trace's per-position top log-probs (4.1).

    ``measure``: ``"bottom_window"`` (mean of the lowest 10% sliding-window confidences),
    ``"lowest_group"``, ``"tail"`` (last ``window`` tokens) or ``"mean"``. A trace without top
    log-probs gets NaN.
    """
    from ttscale.select import confidence as cf
    from ttscale.select.aggregate import DEEPCONF_MEASURES

    check_choice("measure", measure, DEEPCONF_MEASURES)
    out = np.full(len(top_logprobs), np.nan)
    for i, top in enumerate(top_logprobs):
        if top is None or len(top) == 0:
            continue
        conf = cf.token_confidence([dict(p) if not isinstance(p, Mapping) else p for p in top])
        if measure == "bottom_window":
            out[i] = cf.bottom_percent_group_confidence(conf, window, bottom_percent)
        elif measure == "lowest_group":
            out[i] = cf.lowest_group_confidence(conf, window)
        elif measure == "tail":
            out[i] = cf.tail_confidence(conf, window)
        else:  # mean
            out[i] = cf.mean_confidence(conf)
    return out


#: ``progress(task, done, total)``: called as a long step advances (``task`` e.g. ``"rpc"``).
ProgressFn = Callable[[str, int, int], None]

_LOGPROB_FIX = (
    "sample with `ttscale sample --logprobs 0` (the default: the sampled token's log-prob) on an "
    "engine that returns log-probs, or import a mean_logprob column"
)
_TOP_LOGPROB_FIX = "sample with `ttscale sample --logprobs 20` (top-20 log-probs per token)"


_CERTAINTY_METHODS = ("self_certainty", "self_certainty_borda")


def check_prerequisites(
    pool: Pool,
    methods: Sequence[str],
    *,
    score: str | None = None,
    confidences: NDArray[np.float64] | None = None,
    check_confidences: bool = True,
    certainties: NDArray[np.float64] | None = None,
) -> None:
    """Raise one :class:`ConfigError` naming every method whose inputs the run lacks, before any work.

    What each method needs is its registry entry's ``inputs``
    (:data:`ttscale.select.rules.RULES`): ``mean_logprobs`` (max_probability, pc, rpc),
    ``top_logprobs`` (deepconf: ``confidences``; skipped with ``check_confidences=False``, for a
    caller that checks them itself), ``scores`` (weighted, best_of_n: a finite ``score`` for every
    answered sample). The self-certainty methods read ``certainties`` when given (exact or
    approximate, :func:`ttscale.select.certainty.pool_certainties`); else, like deepconf, the
    ``confidences`` stand for the top log-probs they come from. The message says which
    ``ttscale sample`` flag (or command) provides what is missing.
    A weighted, non-iid pool (``pool.iid`` false: SMC particles) refuses every method with
    :class:`~ttscale.errors.NonIIDPoolError`: they estimate accuracy from k iid draws.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if pool.meta.get("run_kind") in ("adaptive", "allocated") and methods:
        # iid draws, but each problem stopped after an answer-dependent number of them: a
        # k-sample estimate over that prefix is biased (and cut at the smallest n)
        raise ConfigError(
            f"the run is {pool.meta.get('run_kind')}: each problem stopped after an answer-dependent number of "
            f"samples, so {', '.join(methods)} at k samples do not apply; "
            "ttscale.runkinds.run_points (ttscale curve) reports its accuracy at its own cost"
        )
    if not pool.iid and methods:
        from ttscale.errors import NonIIDPoolError

        raise NonIIDPoolError(
            "the run's samples are not iid draws (SMC particles, search beams, pruned or short-m@k traces): "
            f"{', '.join(methods)} at k samples assume iid draws and are refused; use "
            "ttscale.runkinds.run_points (ttscale curve reports it)"
        )

    def needing(what: str) -> list[str]:
        return [m for m in methods if m != ORACLE and what in RULES[m].inputs]

    answered = pool.answer >= 0
    n_ans = int(answered.sum())
    problems: list[str] = []
    lp = needing("mean_logprobs")
    if lp:
        miss = int((~np.isfinite(pool.mean_logprob[answered])).sum())
        if miss:
            problems.append(
                f"{', '.join(lp)} need{'s' if len(lp) == 1 else ''} per-sample log-probs, missing "
                f"for {miss} of {n_ans} answered samples; {_LOGPROB_FIX}"
            )
    top = needing("top_logprobs")
    if certainties is not None:
        sc_methods = [m for m in top if m in _CERTAINTY_METHODS]
        top = [m for m in top if m not in _CERTAINTY_METHODS]
        cert = np.asarray(certainties, dtype=np.float64)
        miss = int((~np.isfinite(cert[answered])).sum()) if cert.shape == (pool.num_samples,) else n_ans
        if sc_methods and miss:
            problems.append(
                f"{', '.join(sc_methods)} need{'s' if len(sc_methods) == 1 else ''} per-token top "
                f"log-probs (the top-k approximation) or exact self-certainties, missing for {miss} "
                f"of {n_ans} answered samples; {_TOP_LOGPROB_FIX}, or store exact ones with "
                "`ttscale certainty RUN --model PATH` (or `sample --engine hf --self-certainty`)"
            )
    if top and check_confidences:
        if confidences is None:
            miss = n_ans
        else:
            conf = np.asarray(confidences, dtype=np.float64)
            miss = (
                int((~np.isfinite(conf[answered])).sum())
                if conf.shape == (pool.num_samples,)
                else n_ans
            )
        if miss:
            problems.append(
                f"{', '.join(top)} need{'s' if len(top) == 1 else ''} per-token top log-probs, "
                f"missing for {miss} of {n_ans} answered "
                f"samples; {_TOP_LOGPROB_FIX}"
            )
    sc = needing("scores")
    if sc and score is not None and score in pool.scores:
        miss = int((~np.isfinite(pool.scores[score][answered])).sum())
        if miss:
            problems.append(
                f"{', '.join(sc)} need{'s' if len(sc) == 1 else ''} score {score!r}, missing for "
                f"{miss} of {n_ans} answered samples; score every sample (e.g. `ttscale verify "
                "--verifier rm:PATH`) or import the score column"
            )
    if problems:
        raise ConfigError("; and ".join(problems))


def _require(pool: Pool, what: NDArray[np.float64], method: str, hint: str) -> None:
    answered = pool.answer >= 0
    if not np.isfinite(what[answered]).all():
        raise ConfigError(f"method {method!r} needs {hint} for every answered sample")


MISSING_POLICIES = ("count", "drop", "skip")


def _oracle_reason(pool: Pool, name: str | None, scores: NDArray[np.float64]) -> str | None:
    """Why selecting by ``scores`` is oracle selection (it equals coverage), or None.

    Either the score is the correctness verifier's own (same verdict set), or its values are
    exactly the 0/1 correctness labels wherever those are known.
    """
    v = pool.meta.get("verifier")
    if name is not None and v is not None and name == v:
        return f"scored by {v!r}, the verifier whose verdicts give correctness"
    known = np.isfinite(pool.correct)
    if known.any():
        sk = scores[known]
        if np.isfinite(sk).all() and np.array_equal(sk, pool.correct[known]):
            return f"score {name!r} equals the correctness labels"
    return None


def compute_curves(
    pool: Pool,
    methods: Sequence[str] = ("coverage", "majority"),
    ks: Sequence[int] | None = None,
    *,
    score: str | None = None,
    score_map: str = "identity",
    confidences: NDArray[np.float64] | None = None,
    deepconf_eta: float = 10.0,
    certainties: NDArray[np.float64] | None = None,
    certainty_source: Mapping[str, Any] | None = None,
    borda_power: float = 0.5,
    cisc_temperature: float = 1.0,
    confidence: float = 0.95,
    n_boot: int = 1000,
    n_draws: int = 1000,
    rpc_draws: int = 50,
    rpc_fit: str = "fast",
    tie: str = "expected",
    seed: SeedLike = 0,
    fit: bool = False,
    fit_method: str = "loglog",
    missing: str = "count",
    progress: ProgressFn | None = None,
) -> CurveReport:
    """Accuracy of each method at each budget ``k`` on ``pool``, with bootstrap CIs.

    ``methods`` are keys of :data:`METHODS`: ``"coverage"`` (the oracle) and selection-rule names
    of :data:`ttscale.select.rules.RULES`. ``score`` names the pool score used by
    ``weighted``/``best_of_n`` (default: the only score, if there is exactly one).
    ``confidences`` are per-sample DeepConf trace confidences (see :func:`trace_confidences`) for
    ``deepconf``. ``score_map`` maps the score to vote weights for ``weighted``
    (:func:`ttscale.select.aggregate.map_scores`). Every stochastic step is seeded by ``seed``
    (``None | int | Generator``; the int seed used is reported in the report's ``meta``).

    ``missing`` says what a problem with fewer samples than requested (:attr:`Pool.requested_n`,
    else the largest count) does, including a problem of the run with no sample at all
    (:attr:`Pool.unsampled`): ``"count"`` (default) keeps every problem in the denominator and
    counts it unsolved at any ``k`` beyond its samples; ``"drop"`` leaves such problems out of
    every ``k``; ``"skip"`` averages each ``k`` over the problems that have ``k`` samples (the
    denominator changes with ``k``; problems without samples are left out). The report's
    ``meta["missing_samples"]`` says how many problems were short, and what was done. A ``k`` no
    problem reaches is an error.

    Budgets without a closed form are enumerated when a problem has at most ``n_draws`` subsets
    of that size, else estimated from ``n_draws`` random subsets (seeded; reported per ``k``).
    RPC refits a Weibull mixture on every subset, so it uses ``rpc_draws`` subsets; ``rpc_fit``
    chooses the fit: ``"fast"`` (default; all subsets of all problems in one batched pass per
    ``k``) or ``"reference"`` (the authors' optimiser, one subset at a time, about 10 ms a fit).
    The choice is recorded in ``meta["rpc_fit"]`` when RPC is computed. At ``k = 1`` every
    method is exact (each rule picks the single sample).

    ``certainties`` are per-sample self-certainties for ``self_certainty`` and
    ``self_certainty_borda`` (:func:`ttscale.select.certainty.pool_certainties`: exact where the
    run stores them, else the top-k approximation); ``certainty_source`` says which
    (``RunCertainties.to_dict()``) and is recorded in ``meta["self_certainty"]``, with
    ``meta["borda_power"]``: ``self_certainty_borda`` gives rank ``r`` of ``k`` the weight
    ``(k - r + 1) ** borda_power`` (default 0.5, the authors').

    Every method's inputs are checked (:func:`check_prerequisites`) before anything is computed.
    ``progress(task, done, total)`` is told how each method advances over the problems (task =
    the method's name) and how the fit's bootstrap advances (task ``"fit bootstrap"``).
    """
    from ttscale.metrics import coverage_curve, selection_at_k
    from ttscale.metrics.stats import bootstrap_ci
    from ttscale.select.rpc import RPC_FITS

    seed = as_int_seed(seed)

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ConfigError("no methods given")
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
    if rpc_fit not in RPC_FITS:
        raise ConfigError(f"rpc fit must be one of {', '.join(RPC_FITS)}, got {rpc_fit!r}")
    if pool.num_problems == 0:
        raise ConfigError("the run has no samples; nothing to analyse")
    check_number("borda_power", borda_power, low=0.0, finite=True)
    shortfall: dict[str, Any] = {**pool.sample_shortfall(), "policy": missing}
    if missing == "drop":
        keep = pool.n_per_problem >= shortfall["requested"]
        if not keep.any():
            raise ConfigError(
                f"no problem has all {shortfall['requested']} requested samples, so --missing drop "
                "leaves nothing; use --missing count"
            )
        if confidences is not None:
            confidences = np.asarray(confidences, dtype=np.float64)
            if confidences.shape == (pool.num_samples,):
                confidences = confidences[pool.row_mask(keep)]
        pool = pool.select_problems(keep)
        shortfall["dropped"] = shortfall["short"] + shortfall["unsampled"]
    if shortfall["short"] or shortfall["unsampled"]:
        log.warning(
            "%d of %d problems have fewer than %d samples (%d of them none): %s",
            shortfall["short"] + shortfall["unsampled"], shortfall["problems"],
            shortfall["requested"], shortfall["unsampled"],
            {"count": "counted as unsolved beyond their samples", "drop": "left out",
             "skip": "left out at each k beyond their samples"}[missing],
        )  # fmt: skip
    n_p = pool.n_per_problem
    n_pos = n_p[n_p > 0]
    if n_pos.size == 0:
        raise ConfigError("the run has no samples; nothing to analyse")
    k_arr = default_ks(int(n_pos.min())) if ks is None else np.asarray(sorted(set(ks)), dtype=np.int64)
    if k_arr.size == 0 or k_arr.min() < 1:
        raise ConfigError(f"k values must be >= 1, got {list(k_arr)}")
    if k_arr.max() > n_p.max():
        raise ConfigError(
            f"k={int(k_arr.max())} exceeds the largest number of samples per problem ({int(n_p.max())})"
        )
    needs_correct = True
    if needs_correct and not pool.has_correctness():
        raise ConfigError(
            "the run has no correctness labels; run `ttscale verify RUN` (or import `correct`) first"
        )
    if np.isnan(pool.correct).any():
        log.warning(
            "%d samples have unknown correctness and count as wrong",
            int(np.isnan(pool.correct).sum()),
        )
    correct = np.nan_to_num(pool.correct, nan=0.0)

    score_arr: NDArray[np.float64] | None = None
    need_score = [m for m in methods if m != ORACLE and "scores" in RULES[m].inputs]
    if need_score:
        names = sorted(pool.scores)
        if score is None:
            if len(names) != 1:
                raise ConfigError(
                    f"methods {'/'.join(need_score)} need --score NAME; the run has scores: "
                    f"{names or 'none'}"
                )
            score = names[0]
        if score not in pool.scores:
            raise ConfigError(f"no score named {score!r} in the run; it has: {names or 'none'}")
        score_arr = pool.scores[score]
    check_prerequisites(pool, methods, score=score, confidences=confidences, certainties=certainties)
    if fit and (k_arr <= coverage_counts(pool, missing)[0].min()).sum() < 2:  # as _fit_coverage
        raise ConfigError("a power-law fit needs at least two k values within every problem's n")
    oracle = _oracle_reason(pool, score, score_arr) if score_arr is not None else None
    if oracle is not None:
        log.warning(
            "weighted/best-of-N are oracle selection here (%s): they equal coverage, not a "
            "selection method's accuracy",
            oracle,
        )

    curves: dict[str, MethodCurve] = {}
    for j, m in enumerate(methods):
        mseed = seed + 1000 * j
        if m == ORACLE:
            cov = coverage_curve(n_p, pool.correct_counts(), k_arr, missing="skip")
            per, est, draws = cov.per_problem, ("closed-form",) * k_arr.size, None
            if progress is not None:
                progress(m, pool.num_problems, pool.num_problems)
        else:
            kw: dict[str, Any] = {}
            if m == "majority":
                kw = {"method": "majority"}
            elif m == "weighted":
                from ttscale.select.aggregate import map_scores

                assert score_arr is not None
                _require(pool, score_arr, m, f"score {score!r}")
                w = np.where(pool.answer >= 0, score_arr, 0.0)
                kw = {"method": "weighted", "scores": map_scores(w, score_map)}  # type: ignore[arg-type]
            elif m == "best_of_n":
                assert score_arr is not None
                _require(pool, score_arr, m, f"score {score!r}")
                kw = {"method": "best_of_n", "scores": score_arr}
            elif m == "max_probability":
                _require(pool, pool.mean_logprob, m, "mean log-probs")
                kw = {"method": "max_probability", "scores": pool.mean_logprob}
            elif m in ("pc", "rpc"):
                _require(pool, pool.mean_logprob, m, "mean log-probs")
                kw = {"method": m, "scores": pool.mean_logprob, "text_ids": pool.text_id}
                if m == "rpc":
                    kw["rpc_fit"] = rpc_fit
            elif m == "deepconf":
                if confidences is None:
                    raise ConfigError(
                        "deepconf needs per-token top log-probs; sample with --logprobs 20"
                    )
                kw = {"method": _deepconf_selector(pool, confidences, deepconf_eta)}
            elif m in ("cisc", "cisc_score"):
                from ttscale.select.aggregate import map_scores

                if m == "cisc":
                    _require(pool, pool.mean_logprob, m, "mean log-probs")
                    raw = np.exp(pool.mean_logprob)  # length-normalised response probability
                else:
                    assert score_arr is not None
                    _require(pool, score_arr, m, f"score {score!r}")
                    raw = score_arr
                # softmax(c / T) per question = exp(c / T) up to a per-question factor that
                # does not change the vote
                c = np.where(pool.answer >= 0, raw, 0.0)
                kw = {"method": "weighted", "scores": map_scores(c, "exp", cisc_temperature)}
            elif m in ("self_certainty", "self_certainty_borda"):
                if certainties is None:
                    raise ConfigError(
                        f"{m} needs per-sample self-certainties (ttscale.select.certainty."
                        "run_certainties: top log-probs, sample with --logprobs 20)"
                    )
                cert = np.asarray(certainties, dtype=np.float64)
                _require(pool, cert, m, "top log-probs (self-certainty)")
                kw = (
                    {"method": "best_of_n", "scores": cert}
                    if m == "self_certainty"
                    else {"method": _borda_selector(pool, cert, borda_power)}
                )
            draws_m = rpc_draws if m == "rpc" else n_draws
            res = selection_at_k(
                pool.answer,
                correct,
                k_arr,
                offsets=pool.offsets,
                tie=tie,  # type: ignore[arg-type]
                n_draws=draws_m,
                max_subsets=draws_m,
                seed=mseed,
                missing="skip",
                progress=None if progress is None else functools.partial(progress, m),
                **kw,
            )
            per, est, draws = res.per_problem, res.estimator, res.draws
        if missing == "count":
            # a problem without k samples is unsolved at k; a problem without any is unsolved
            per = np.concatenate(
                [np.nan_to_num(per, nan=0.0), np.zeros((len(pool.unsampled), k_arr.size))]
            )
        ci = _ci(per, confidence=confidence, n_boot=n_boot, seed=mseed, bootstrap_ci=bootstrap_ci)
        curves[m] = MethodCurve(
            m, k_arr, ci[0], ci[1], ci[2], per, est, draws,
            oracle=oracle if m in ("weighted", "best_of_n", "cisc_score") else None,
        )  # fmt: skip

    fit_res = None
    if fit:
        fit_res = _fit_coverage(
            pool, k_arr, fit_method, n_boot, confidence, seed, missing, progress
        )
    n_report = pool.num_problems + (len(pool.unsampled) if missing == "count" else 0)
    return CurveReport(
        ks=k_arr,
        curves=curves,
        n_problems=n_report,
        n_samples=n_p,
        confidence=confidence,
        fit=fit_res,
        meta={
            "tie": tie, "score": score, "seed": seed, "verifier": pool.meta.get("verifier"),
            "verdicts": pool.meta.get("verdicts"), "missing_samples": shortfall,
            **({"rpc_fit": rpc_fit} if "rpc" in methods else {}),
            **(_certainty_meta(methods, certainty_source, borda_power)),
        },
    )  # fmt: skip


def _certainty_meta(methods: Sequence[str], source: Mapping[str, Any] | None, power: float) -> dict[str, Any]:
    """What the self-certainty methods read (exact or the top-k approximation, and from where)
    and the Borda power: recorded so that no output hides which values it used."""
    if not any(m in ("self_certainty", "self_certainty_borda") for m in methods):
        return {}
    src = dict(source) if source is not None else {"how": "not stated (certainties passed by the caller)"}
    out: dict[str, Any] = {"self_certainty": src}
    if "self_certainty_borda" in methods:
        out["borda_power"] = power
    return out


def _ci(
    per: NDArray[np.float64], *, confidence: float, n_boot: int, seed: int, bootstrap_ci: Any
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Mean and bootstrap CI per column, over the problems that have a value in that column."""
    K = per.shape[1]
    mean, lo, hi = np.full(K, np.nan), np.full(K, np.nan), np.full(K, np.nan)
    have = ~np.isnan(per)
    full = have.all(axis=0)
    if full.any():
        ci = bootstrap_ci(per[:, full], confidence=confidence, n_boot=n_boot, seed=seed)
        mean[full], lo[full], hi[full] = ci.mean, ci.low, ci.high
    for j in np.flatnonzero(~full & have.any(axis=0)):
        ci = bootstrap_ci(per[have[:, j], j], confidence=confidence, n_boot=n_boot, seed=seed)
        mean[j], lo[j], hi[j] = float(ci.mean), float(ci.low), float(ci.high)
    return mean, lo, hi


def _deepconf_selector(pool: Pool, conf: NDArray[np.float64], eta: float) -> Any:
    from ttscale.select.aggregate import deepconf_vote_labels

    conf = np.asarray(conf, dtype=np.float64)
    if conf.shape != (pool.num_samples,):
        raise ConfigError(f"confidences must have one value per sample ({pool.num_samples})")
    _require(pool, conf, "deepconf", "top log-probs (trace confidences)")
    local: list[NDArray[np.int64]] = []
    for p in range(pool.num_problems):
        a = pool.answer[pool.offsets[p] : pool.offsets[p + 1]]
        _, inv = np.unique(a, return_inverse=True)
        has_none = bool((a < 0).any())
        lab = inv.astype(np.int64) - (1 if has_none else 0)
        local.append(lab)

    def select(p: int, sub: NDArray[np.int64]) -> Any:
        off = pool.offsets[p]
        return deepconf_vote_labels(local[p][sub], conf[off + sub], eta=eta)

    select.__name__ = f"deepconf(eta={eta:g})"
    return select


def _borda_selector(pool: Pool, cert: NDArray[np.float64], power: float) -> Any:
    from ttscale.select.certainty import self_certainty_borda_labels

    local: list[NDArray[np.int64]] = []
    for p in range(pool.num_problems):
        a = pool.answer[pool.offsets[p] : pool.offsets[p + 1]]
        _, inv = np.unique(a, return_inverse=True)
        local.append(inv.astype(np.int64) - (1 if bool((a < 0).any()) else 0))

    def select(p: int, sub: NDArray[np.int64]) -> Any:
        # the ranks are taken within the k traces drawn, as for a run of k
        return self_certainty_borda_labels(local[p][sub], cert[pool.offsets[p] + sub], power=power)

    select.__name__ = f"self_certainty_borda(power={power:g})"
    return select


def coverage_counts(
    pool: Pool, missing: str = "count"
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(n, c)`` per problem for pass@k fits under a ``missing`` policy (see compute_curves).

    Problems without samples enter as ``n = max n, c = 0`` under ``"count"`` (pass@k = 0 at
    every fitted ``k``); ``"drop"``/``"skip"`` leave them out. A weighted, non-iid pool raises
    :class:`~ttscale.errors.NonIIDPoolError` (pass@k counts assume iid draws).
    """
    if not pool.iid:
        from ttscale.errors import NonIIDPoolError

        raise NonIIDPoolError(
            "the run's samples are not iid draws (SMC particles, search beams, pruned or short-m@k traces): "
            "pass@k fits assume iid draws and are refused; `ttscale curve` reports the run's "
            "accuracy at its own cost"
        )
    if pool.meta.get("run_kind") in ("adaptive", "allocated"):
        raise ConfigError(
            f"the run is {pool.meta.get('run_kind')}: each problem stopped after an answer-dependent number of "
            "samples, so pass@k fits do not apply; `ttscale curve` reports its accuracy at its own cost"
        )
    n_p, c = pool.n_per_problem, pool.correct_counts()
    if missing == "drop":
        keep = n_p >= pool.sample_shortfall()["requested"]
        n_p, c = n_p[keep], c[keep]
    if missing == "count" and pool.unsampled:
        z = len(pool.unsampled)
        n_p = np.concatenate([n_p, np.full(z, int(n_p.max(initial=1)), dtype=np.int64)])
        c = np.concatenate([c, np.zeros(z, dtype=np.int64)])
    return n_p, c


def _fit_coverage(
    pool: Pool,
    ks: NDArray[np.int64],
    method: str,
    n_boot: int,
    confidence: float,
    seed: int,
    missing: str = "count",
    progress: ProgressFn | None = None,
) -> Any:
    from ttscale.metrics.scaling import bootstrap_power_law

    n_p, c = coverage_counts(pool, missing)
    usable = ks[ks <= n_p.min()]
    if usable.size < 2:
        raise ConfigError("a power-law fit needs at least two k values within every problem's n")
    return bootstrap_power_law(
        n_p,
        c,
        usable,
        method=method,  # type: ignore[arg-type]
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
        progress=None if progress is None else functools.partial(progress, "fit bootstrap"),
    )


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2)))


def plot_curves(
    report: CurveReport | Mapping[str, CurveReport],
    path: str | Path,
    *,
    title: str | None = None,
    extrapolate_to: int | None = None,
) -> Path:
    """Write a PNG: accuracy vs ``k`` (log2 axis), CIs, fitted coverage law dashed.

    ``report`` is one run's report or ``{label: report}`` for several runs; the layout is
    :func:`curves_figure`'s.
    """
    import matplotlib.pyplot as plt

    p = Path(path)
    fig = curves_figure(report, title=title, extrapolate_to=extrapolate_to)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return p


def curves_figure(
    report: CurveReport | Mapping[str, CurveReport],
    *,
    title: str | None = None,
    extrapolate_to: int | None = None,
) -> Any:
    """The matplotlib ``Figure`` that :func:`plot_curves` saves (to restyle or save elsewhere).

    One report: one panel; each method gets its own colour, marker and line style and, from
    four methods on, its CI as nudged error bars over a faint band (overlapping bands merge
    into one smear); the legend sits outside. Several reports (``{label: report}``, e.g. one per
    model or temperature): one panel per method (small multiples on a shared y axis), the runs
    overlaid in each in their own colours, one legend of runs.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    colors = plt.get_cmap("tab10")
    runs = {"": report} if isinstance(report, CurveReport) else dict(report)
    if not runs:
        raise ConfigError("plot_curves needs at least one report")
    methods: list[str] = []
    for r in runs.values():
        methods += [m for m in r.curves if m not in methods]
    multi = len(runs) > 1
    panels = methods if multi else [""]
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols + 2.2, 3.2 * nrows + 0.8) if multi else (8.2, 4.6),
        dpi=120, sharey=True, squeeze=False,
    )
    # each line: (axes, curve, fit or None, style index, label)
    lines: list[tuple[Any, MethodCurve, Any, int, str]] = []
    for pi, panel in enumerate(panels):
        ax = axes[pi // ncols][pi % ncols]
        if multi:
            for ri, (label, r) in enumerate(runs.items()):
                if panel in r.curves:
                    lines.append((ax, r.curves[panel], r.fit if panel == "coverage" else None, ri, label))
            ax.set_title(_LABELS.get(panel, panel), fontsize=10)
        else:
            r = runs[""]
            for mi, (name, c) in enumerate(r.curves.items()):
                lines.append((ax, c, r.fit if name == "coverage" else None, mi, _LABELS.get(name, name)))
    n_lines = len(runs) if multi else len(methods)
    band_alpha = 0.18 if n_lines <= 3 else 0.04
    kmax = max(int(r.ks.max()) for r in runs.values())
    for ax, c, fit, i, label in lines:
        ok = np.isfinite(c.mean)
        col = colors(i % 10)
        ls = _DASHES[i % len(_DASHES)] if n_lines > 3 else "-"
        mk = _MARKERS[i % len(_MARKERS)]
        if n_lines <= 3:
            ax.plot(c.ks[ok], c.mean[ok], color=col, ls=ls, marker=mk, label=label, lw=1.6, ms=4.5)
            ax.fill_between(c.ks[ok], c.low[ok], c.high[ok], color=col, alpha=band_alpha, lw=0)
        else:
            # overlapping bands of four or more lines merge into one smear: a faint band, and
            # the CI as an error bar at each k, nudged sideways (log2 axis) so the bars stand apart
            x = c.ks[ok] * 2.0 ** (0.035 * (i - (n_lines - 1) / 2))
            ax.fill_between(c.ks[ok], c.low[ok], c.high[ok], color=col, alpha=band_alpha, lw=0)
            ax.errorbar(x, c.mean[ok], yerr=[c.mean[ok] - c.low[ok], c.high[ok] - c.mean[ok]],
                        color=col, ls=ls, marker=mk, label=label, lw=1.5, ms=4.5, elinewidth=0.9,
                        capsize=2.0, mfc="white" if i % 2 else col, mew=1.1)
        if fit is not None:
            f = fit.fit
            kk = np.geomspace(1, max(kmax, extrapolate_to or 0), 200)
            ax.plot(kk, f.predict(kk), ":" if multi else "--", color=col if multi else "black",
                    lw=1.2, label=None if multi else f"fit exp({f.a:.3f}·k^{f.b:.3f})")
    for ax in axes.ravel()[: len(panels)]:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("samples per problem k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("accuracy")
    first = next(iter(runs.values()))
    pct = round(first.confidence * 100)
    if multi:
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes.ravel()[1 : len(panels)]:  # a run missing from the first panel
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   frameon=False)
        fig.suptitle(f"{title or f'{len(runs)} runs'}; bands: {pct}% bootstrap CIs", fontsize=11)
    else:
        ax = axes[0][0]
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        ax.set_title(f"{title or f'{first.n_problems} problems'}; bands: {pct}% bootstrap CIs")
    fig.tight_layout()
    return fig


#: manifest fields that tell runs apart in an overlay, dotted paths into the manifest
_LABEL_FIELDS = (
    "model",
    "benchmark",
    "split",
    "engine.engine",
    "chat",
    "system_prompt",
    "sampling.temperature",
    "sampling.top_p",
    "sampling.top_k",
    "sampling.min_p",
    "sampling.max_tokens",
    "sampling.logprobs",
    "sampling.n",
    "sampling.seed",
)


def run_labels(
    manifests: Sequence[Mapping[str, Any]], paths: Sequence[str | Path], *, max_len: int = 40
) -> list[tuple[str, dict[str, Any]]]:
    """A short, distinct label per run for an overlay, and the manifest fields that differ.

    The label lists the fields of :data:`_LABEL_FIELDS` whose values differ between the runs
    (``temperature=0.7``; a model path by its last component), e.g. ``model=qwen-7b,
    temperature=0.7``. Where no field differs, two runs would get the same label, or a label is
    longer than ``max_len``, every run is labelled by its folder name instead (with as many
    parent folders as make the names distinct).
    """
    if len(manifests) != len(paths):
        raise ConfigError("run_labels needs one manifest per path")

    def get(m: Mapping[str, Any], dotted: str) -> Any:
        cur: Any = m
        for part in dotted.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        return cur

    def show(key: str, v: Any) -> str:
        if key == "model" and isinstance(v, str) and ("/" in v or "\\" in v):
            v = Path(v.rstrip("/")).name or v
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, (list, tuple)):
            return "|".join(str(x) for x in v)
        return str(v)

    values = [[get(m, f) for f in _LABEL_FIELDS] for m in manifests]
    differ = [
        i for i, f in enumerate(_LABEL_FIELDS)
        if len({json.dumps(v[i], sort_keys=True, default=str) for v in values}) > 1
    ]
    differs = [{_LABEL_FIELDS[i]: v[i] for i in differ} for v in values]
    labels = [
        ", ".join(f"{_LABEL_FIELDS[i].rsplit('.', 1)[-1]}={show(_LABEL_FIELDS[i], v[i])}" for i in differ)
        for v in values
    ]
    if not differ or len(set(labels)) < len(labels) or max(map(len, labels)) > max_len:
        parts = [Path(p).resolve().parts for p in paths]
        depth = 1
        while True:
            labels = ["/".join(pp[-depth:]) for pp in parts]
            if len(set(labels)) == len(labels) or depth >= max(map(len, parts)):
                break
            depth += 1
    return list(zip(labels, differs, strict=True))


def run_confidences(store: Any, **kwargs: Any) -> NDArray[np.float64]:
    """Per-sample DeepConf trace confidences of a stored run, in pool order (NaN without top logprobs)."""
    t = store.table(["top_logprobs"])
    tops = t.column("top_logprobs").to_pylist()
    return trace_confidences([None if x is None else [dict(p) for p in x] for x in tops], **kwargs)
