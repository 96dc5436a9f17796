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

from ttscale.errors import ConfigError
from ttscale.pool import Pool

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

METHODS: dict[str, str] = {
    "coverage": "pass@k: any of k samples correct (oracle verifier)",
    "majority": "majority vote over answers (self-consistency)",
    "weighted": "score-weighted majority vote (needs a score)",
    "bon": "best-of-N by a score (needs a score)",
    "ppl": "the path with the highest mean token log-prob",
    "pc": "perplexity consistency",
    "rpc": "reasoning-pruning perplexity consistency",
    "deepconf": "DeepConf confidence-filtered weighted vote (needs top logprobs)",
}

_LABELS = {
    "coverage": "coverage (pass@k)",
    "majority": "majority@k",
    "weighted": "weighted vote@k",
    "bon": "best-of-N@k",
    "ppl": "PPL@k",
    "pc": "PC@k",
    "rpc": "RPC@k",
    "deepconf": "DeepConf@k",
}


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
    fit: Any | None = None  # ttscale.scaling.PowerLawBootstrap
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
    from ttscale import confidence as cf

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
        elif measure == "mean":
            out[i] = cf.mean_confidence(conf)
        else:
            raise ConfigError(
                f"confidence measure must be bottom_window, lowest_group, tail or mean, got {measure!r}"
            )
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
    score_mapping: str = "identity",
    confidences: NDArray[np.float64] | None = None,
    deepconf_eta: float = 10.0,
    confidence: float = 0.95,
    n_boot: int = 1000,
    n_draws: int = 1000,
    rpc_draws: int = 50,
    rpc_fit: str = "fast",
    tie: str = "expected",
    seed: int = 0,
    fit: bool = False,
    fit_method: str = "loglog",
) -> CurveReport:
    """Accuracy of each method at each budget ``k`` on ``pool``, with bootstrap CIs.

    ``score`` names the pool score used by ``weighted``/``bon`` (default: the only score, if
    there is exactly one). ``confidences`` are per-sample DeepConf trace confidences (see
    :func:`trace_confidences`) for ``deepconf``. Budgets ``k`` larger than a problem's sample
    count are skipped for that problem (ragged pools), and reported as NaN when no problem has
    that many samples. Every stochastic step is seeded by ``seed``.

    Budgets without a closed form are enumerated when a problem has at most ``n_draws`` subsets
    of that size, else estimated from ``n_draws`` random subsets (seeded; reported per ``k``).
    RPC refits a Weibull mixture on every subset, so it uses ``rpc_draws`` subsets; ``rpc_fit``
    chooses the fit: ``"fast"`` (default; all subsets of all problems in one batched pass per
    ``k``) or ``"reference"`` (the authors' optimiser, one subset at a time, about 10 ms a fit).
    The choice is recorded in ``meta["rpc_fit"]`` when RPC is computed. At ``k = 1`` every
    method is exact (each rule picks the single sample).
    """
    from ttscale.metrics import coverage_curve, selection_at_k
    from ttscale.rpc import RPC_FITS
    from ttscale.stats import bootstrap_ci

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ConfigError("no methods given")
    if rpc_fit not in RPC_FITS:
        raise ConfigError(f"rpc fit must be one of {', '.join(RPC_FITS)}, got {rpc_fit!r}")
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
    if any(m in ("weighted", "bon") for m in methods):
        names = sorted(pool.scores)
        if score is None:
            if len(names) != 1:
                raise ConfigError(
                    f"methods weighted/bon need --score NAME; the run has scores: {names or 'none'}"
                )
            score = names[0]
        if score not in pool.scores:
            raise ConfigError(f"no score named {score!r} in the run; it has: {names or 'none'}")
        score_arr = pool.scores[score]

    curves: dict[str, MethodCurve] = {}
    for j, m in enumerate(methods):
        mseed = seed + 1000 * j
        if m == "coverage":
            cov = coverage_curve(n_p, pool.correct_counts(), k_arr, missing="skip")
            per, est, draws = cov.per_problem, ("closed-form",) * k_arr.size, None
        else:
            kw: dict[str, Any] = {}
            if m == "majority":
                kw = {"method": "majority"}
            elif m == "weighted":
                from ttscale.aggregate import map_scores

                assert score_arr is not None
                _require(pool, score_arr, m, f"score {score!r}")
                w = np.where(pool.answer >= 0, score_arr, 0.0)
                kw = {"method": "weighted", "scores": map_scores(w, score_mapping)}  # type: ignore[arg-type]
            elif m == "bon":
                assert score_arr is not None
                _require(pool, score_arr, m, f"score {score!r}")
                kw = {"method": "bon", "scores": score_arr}
            elif m == "ppl":
                _require(pool, pool.mean_logprob, m, "mean log-probs")
                kw = {"method": "bon", "scores": pool.mean_logprob}
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
            per, est, draws = res.per_problem, tuple(res.method), res.draws
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
        meta={
            "tie": tie, "score": score, "seed": seed, "verifier": pool.meta.get("verifier"),
            **({"rpc_fit": rpc_fit} if "rpc" in methods else {}),
        },
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
    from ttscale.aggregate import deepconf_vote_labels

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
    from ttscale.scaling import bootstrap_power_law

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
