"""Scaling curves of a run: coverage and every selection method at every budget, with CIs.

:func:`compute_curves` replays each method on the same stored pool at each ``k`` (expected
accuracy over random size-``k`` subsets, :func:`ttscale.metrics.selection_at_k`), attaches
problem-bootstrap confidence intervals, and optionally fits the exponentiated power law to the
coverage curve. :func:`plot_curves` draws the result; :meth:`CurveReport.to_json` serialises it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale._deprecation import renamed_keyword
from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike, as_int_seed
from ttscale.select.rules import (
    DEPRECATED_NAMES,
    ORACLE,
    ORACLE_DESCRIPTION,
    ORACLE_LABEL,
    RULES,
    canonical_name,
)
from ttscale.store.pool import Pool
from ttscale.validation import check_choice

__all__ = [
    "METHODS",
    "CurveReport",
    "MethodCurve",
    "compute_curves",
    "default_ks",
    "plot_curves",
    "run_confidences",
    "trace_confidences",
]

log = logging.getLogger(__name__)

#: Curve names -> description: the oracle (``coverage``) and every selection rule of
#: :data:`ttscale.select.rules.RULES`, under the rule's canonical name.
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
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


def _require(pool: Pool, what: NDArray[np.float64], method: str, hint: str) -> None:
    answered = pool.answer >= 0
    if not np.isfinite(what[answered]).all():
        raise ConfigError(f"method {method!r} needs {hint} for every answered sample")


def compute_curves(
    pool: Pool,
    methods: Sequence[str] = ("coverage", "majority"),
    ks: Sequence[int] | None = None,
    *,
    score: str | None = None,
    score_map: str = "identity",
    confidences: NDArray[np.float64] | None = None,
    deepconf_eta: float = 10.0,
    confidence: float = 0.95,
    n_boot: int = 1000,
    n_draws: int = 1000,
    rpc_draws: int = 50,
    tie: str = "expected",
    seed: SeedLike = 0,
    fit: bool = False,
    fit_method: str = "loglog",
    score_mapping: str | None = None,
) -> CurveReport:
    """Accuracy of each method at each budget ``k`` on ``pool``, with bootstrap CIs.

    ``methods`` are keys of :data:`METHODS`: ``"coverage"`` (the oracle) and selection-rule names
    of :data:`ttscale.select.rules.RULES` (the older ``"bon"``/``"ppl"`` work with a
    ``DeprecationWarning``; the report is keyed by the canonical names). ``score`` names the pool
    score used by ``weighted``/``best_of_n`` (default: the only score, if there is exactly one). ``confidences`` are per-sample DeepConf trace confidences (see
    :func:`trace_confidences`) for ``deepconf``. Budgets ``k`` larger than a problem's sample
    count are skipped for that problem (ragged pools), and reported as NaN when no problem has
    that many samples. ``score_map`` maps the score to vote weights for ``weighted``
    (:func:`ttscale.select.aggregate.map_scores`; ``score_mapping=`` is its deprecated former
    name). Every stochastic step is seeded by ``seed`` (``None | int | Generator``; the int seed
    used is reported in the report's ``meta``).

    Budgets without a closed form are enumerated when a problem has at most ``n_draws`` subsets
    of that size, else estimated from ``n_draws`` random subsets (seeded; reported per ``k``).
    RPC refits a Weibull mixture on every subset (milliseconds each), so it uses ``rpc_draws``.
    """
    from ttscale.metrics import coverage_curve, selection_at_k
    from ttscale.metrics.stats import bootstrap_ci

    score_map = renamed_keyword(
        "compute_curves", "score_mapping", "score_map", score_mapping, score_map, "identity"
    )
    seed = as_int_seed(seed)

    unknown = [m for m in methods if m not in METHODS and m not in DEPRECATED_NAMES]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ConfigError("no methods given")
    methods = [m if m == ORACLE else canonical_name(m, stacklevel=2) for m in methods]
    if pool.num_problems == 0:
        raise ConfigError("the run has no samples; nothing to analyse")
    n_p = pool.n_per_problem
    k_arr = default_ks(int(n_p.min())) if ks is None else np.asarray(sorted(set(ks)), dtype=np.int64)
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

    curves: dict[str, MethodCurve] = {}
    for j, m in enumerate(methods):
        mseed = seed + 1000 * j
        if m == ORACLE:
            cov = coverage_curve(n_p, pool.correct_counts(), k_arr, missing="skip")
            per, est, draws = cov.per_problem, ("closed-form",) * k_arr.size, None
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
            elif m == "deepconf":
                if confidences is None:
                    raise ConfigError(
                        "deepconf needs per-token top log-probs; sample with --logprobs 20"
                    )
                kw = {"method": _deepconf_selector(pool, confidences, deepconf_eta)}
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
                **kw,
            )
            per, est, draws = res.per_problem, res.estimator, res.draws
        ci = _ci(per, confidence=confidence, n_boot=n_boot, seed=mseed, bootstrap_ci=bootstrap_ci)
        curves[m] = MethodCurve(m, k_arr, ci[0], ci[1], ci[2], per, est, draws)

    fit_res = None
    if fit:
        fit_res = _fit_coverage(pool, k_arr, fit_method, n_boot, confidence, seed)
    return CurveReport(
        ks=k_arr,
        curves=curves,
        n_problems=pool.num_problems,
        n_samples=n_p,
        confidence=confidence,
        fit=fit_res,
        meta={"tie": tie, "score": score, "seed": seed, "verifier": pool.meta.get("verifier")},
    )


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


def _fit_coverage(
    pool: Pool, ks: NDArray[np.int64], method: str, n_boot: int, confidence: float, seed: int
) -> Any:
    from ttscale.metrics.scaling import bootstrap_power_law

    n_p = pool.n_per_problem
    usable = ks[ks <= n_p.min()]
    if usable.size < 2:
        raise ConfigError("a power-law fit needs at least two k values within every problem's n")
    return bootstrap_power_law(
        n_p,
        pool.correct_counts(),
        usable,
        method=method,  # type: ignore[arg-type]
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
    )


def plot_curves(
    report: CurveReport,
    path: str | Path,
    *,
    title: str | None = None,
    extrapolate_to: int | None = None,
) -> Path:
    """Write a PNG: accuracy vs ``k`` (log2 axis), CI bands, fitted coverage law dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    p = Path(path)
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    colors = plt.get_cmap("tab10")
    for i, (name, c) in enumerate(report.curves.items()):
        ok = np.isfinite(c.mean)
        col = colors(i % 10)
        ax.plot(c.ks[ok], c.mean[ok], "o-", color=col, label=_LABELS.get(name, name), lw=1.8, ms=3.5)
        ax.fill_between(c.ks[ok], c.low[ok], c.high[ok], color=col, alpha=0.18, lw=0)
    if report.fit is not None:
        f = report.fit.fit
        kmax = max(int(report.ks.max()), extrapolate_to or 0)
        kk = np.geomspace(1, kmax, 200)
        ax.plot(kk, f.predict(kk), "--", color="black", lw=1.2,
                label=f"fit exp({f.a:.3f}·k^{f.b:.3f})")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("samples per problem k")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    pct = round(report.confidence * 100)
    ax.set_title(title or f"{report.n_problems} problems, {pct}% bootstrap CIs")
    fig.tight_layout()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def run_confidences(store: Any, **kwargs: Any) -> NDArray[np.float64]:
    """Per-sample DeepConf trace confidences of a stored run, in pool order (NaN without top logprobs)."""
    t = store.table(["top_logprobs"])
    tops = t.column("top_logprobs").to_pylist()
    return trace_confidences([None if x is None else [dict(p) for p in x] for x in tops], **kwargs)
