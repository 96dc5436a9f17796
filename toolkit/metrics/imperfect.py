"""Imperfect verifiers on a stored run: weak/strong verdict counts, the empirical utility curve,
the false-negative task filter, the two-type model fit, and the plot (docs/algorithms.md 7).

A run verified twice, once by a *weak* verifier (the one resampling stops on, e.g. the prompt's
examples or the original HumanEval tests) and once by a *strong* one taken as the truth (the full
tests, or EvalPlus's extended tests), gives per task the counts the paper's analysis needs.
The maths lives in :mod:`ttscale.metrics.scaling`; this module reads the store and assembles a report.

Differences from the reference notebooks (``evalplus/scaling_curves.ipynb``,
``evalplus/visualizations.ipynb``), by design:

* the empirical curve is the closed form of their permutation simulation (no Monte-Carlo noise);
* each task's reward stays flat past its own sample count, and the K axis is not cut at the
  smallest count;
* false-negative tasks are found on this run only (the reference drops the union over all its
  models) and are kept unless asked (``drop_false_negatives=True``); they are always reported;
* a sample that only one of the two verifiers checked, or that either marked ``error``, is left
  out and counted; a task left with no sample is handled by ``empty`` and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.metrics.scaling import (
    EmptyTasks,
    TwoTypeFit,
    VerifierRates,
    empirical_reward_per_task,
    false_negative_tasks,
    fit_two_type,
    optimal_k,
)

__all__ = [
    "VerifierUtilityReport",
    "WeakStrongCounts",
    "plot_verifier_utility",
    "verifier_utility",
    "weak_strong_counts",
]

logger = logging.getLogger(__name__)

Mode = Literal["exact", "notebook"]


@dataclass(frozen=True)
class WeakStrongCounts:
    """Per-task counts over the samples both verifiers checked, shape ``(tasks,)`` each.

    ``n``: samples with a verdict (pass or fail) from both; ``weak``/``strong``: how many pass
    each; ``both``: how many pass both. ``excluded_samples``: samples left out because only one
    verifier checked them or one of the verdicts is ``error``.
    """

    problem_ids: tuple[str, ...]
    n: NDArray[np.int64]
    weak: NDArray[np.int64]
    strong: NDArray[np.int64]
    both: NDArray[np.int64]
    excluded_samples: int = 0

    @property
    def m_tp(self) -> NDArray[np.int64]:
        """Accepted by the weak verifier and correct."""
        return self.both

    @property
    def m_fp(self) -> NDArray[np.int64]:
        """Accepted by the weak verifier but wrong (false positives)."""
        return self.weak - self.both

    def subset(self, keep: NDArray[np.bool_]) -> WeakStrongCounts:
        ids = tuple(p for p, k in zip(self.problem_ids, keep, strict=True) if k)
        return WeakStrongCounts(
            ids, self.n[keep], self.weak[keep], self.strong[keep], self.both[keep],
            self.excluded_samples,
        )


def weak_strong_counts(store: Any, weak: str, strong: str) -> WeakStrongCounts:
    """Count, per problem of ``store`` (a :class:`~ttscale.store.SampleStore`), the samples that
    pass the ``weak`` and the ``strong`` verifier (verifier names as stored, e.g.
    ``code-visible`` and ``code``). Problems recorded in the run but without usable samples
    appear with ``n = 0``."""
    import pyarrow as pa

    if weak == strong:
        raise ConfigError(f"the weak and the strong verifier are the same ({weak!r}); pick two")
    known = store.verifiers()
    for role, name in (("weak", weak), ("strong", strong)):
        if name not in known:
            raise ConfigError(
                f"run {store.path} has no verdicts from the {role} verifier {name!r}; "
                f"known: {known or 'none'} (run `ttscale verify` first)"
            )
    keys = store.table([]).select(["problem_id", "index"])

    def verdict_col(name: str, alias: str) -> pa.Table:
        vt = store.verdict_table(name).select(["problem_id", "index", "status", "correct"])
        usable = [
            None if st == "error" else c
            for st, c in zip(
                vt.column("status").to_pylist(), vt.column("correct").to_pylist(), strict=True
            )
        ]
        return pa.table(
            {
                "problem_id": vt.column("problem_id"),
                "index": vt.column("index"),
                alias: pa.array(usable, type=pa.bool_()),
            }
        )

    joined = keys.join(verdict_col(weak, "w"), keys=["problem_id", "index"], join_type="left outer")
    joined = joined.join(
        verdict_col(strong, "s"), keys=["problem_id", "index"], join_type="left outer"
    )
    pid = joined.column("problem_id").to_pylist()
    w = joined.column("w").to_pylist()
    s = joined.column("s").to_pylist()
    ids = sorted(set(pid) | {p.id for p in store.problems()})
    pos = {p: i for i, p in enumerate(ids)}
    P = len(ids)
    n = np.zeros(P, np.int64)
    cw = np.zeros(P, np.int64)
    cs = np.zeros(P, np.int64)
    cb = np.zeros(P, np.int64)
    excluded = 0
    for p, a, b in zip(pid, w, s, strict=True):
        if a is None or b is None:
            excluded += 1
            continue
        i = pos[p]
        n[i] += 1
        cw[i] += bool(a)
        cs[i] += bool(b)
        cb[i] += bool(a) and bool(b)
    return WeakStrongCounts(tuple(ids), n, cw, cs, cb, excluded)


@dataclass(frozen=True)
class VerifierUtilityReport:
    """Empirical reward@k of "resample until the weak verifier accepts" and the fitted models.

    ``utility[i]`` is the mean over ``tasks`` of the expected reward at budget ``ks[i]`` with a
    correct answer worth 1 and a false positive ``−cost_ratio``; ``optimal_k`` its ``K*`` (0 =
    abstain). ``fits`` maps estimator (``paper``, ``pooled``) to the fitted two-type model and
    ``model_utility`` to its ``U(ks)`` in ``mode``.
    """

    ks: NDArray[np.int64]
    utility: NDArray[np.float64]
    optimal_k: int
    cost_ratio: float
    tasks: tuple[str, ...]
    false_negative_tasks: tuple[str, ...]
    dropped_false_negatives: bool
    empty_tasks: tuple[str, ...]
    empty: str
    excluded_samples: int
    rates: dict[str, float]
    mode: str
    weak: str
    strong: str
    fits: dict[str, TwoTypeFit] = field(default_factory=dict)
    model_utility: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    model_optimal_k: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        fn = list(self.false_negative_tasks)
        d: dict[str, Any] = {
            "source": "empirical",
            "weak": self.weak,
            "strong": self.strong,
            "cost_ratio": self.cost_ratio,
            "rewards": {"true_positive": 1.0, "false_positive": -self.cost_ratio, "abstain": 0.0},
            "k": self.ks.tolist(),
            "utility": [float(x) for x in self.utility],
            "optimal_k": self.optimal_k,
            "n_tasks": len(self.tasks),
            "false_negative_tasks": {
                "rule": "strong pass rate > weak pass rate",
                "count": len(fn),
                "ids": fn,
                "dropped": self.dropped_false_negatives,
            },
            "empty_tasks": {"count": len(self.empty_tasks), "ids": list(self.empty_tasks),
                            "policy": self.empty},
            "excluded_samples": self.excluded_samples,
            "rates": self.rates,
        }
        if self.fits:
            d["mode"] = self.mode
            d["v_fp"] = -self.cost_ratio
            d["fits"] = {
                name: {
                    **f.to_dict(),
                    "utility": [float(x) for x in self.model_utility[name]],
                    "optimal_k": self.model_optimal_k[name],
                }
                for name, f in self.fits.items()
            }
        return d


def verifier_utility(
    source: Any,
    weak: str,
    strong: str,
    *,
    cost_ratio: float = 1.0,
    max_k: int | None = None,
    drop_false_negatives: bool = False,
    empty: EmptyTasks = "drop",
    fit: bool = False,
    mode: Mode = "exact",
    threshold: float = 0.5,
) -> VerifierUtilityReport:
    """The empirical utility curve of a run checked by a weak and a strong verifier.

    ``source``: a :class:`~ttscale.store.SampleStore`, a run directory, or precomputed
    :class:`WeakStrongCounts`. ``ks = 1..max_k`` (default: the largest per-task sample count);
    every task keeps its reward flat past its own count. ``drop_false_negatives`` removes the
    tasks :func:`~ttscale.metrics.scaling.false_negative_tasks` flags (the paper does; off by default,
    the flagged tasks are reported either way). ``empty`` treats tasks with no usable sample
    (``"drop"``: left out, ``"zero"``: reward 0, ``"error"``: raise). ``fit=True`` also fits the
    two-type model with both estimators (:func:`~ttscale.metrics.scaling.fit_two_type`) and evaluates
    it with ``V_fp = −cost_ratio`` in ``mode``.
    """
    if isinstance(source, WeakStrongCounts):
        counts = source
    else:
        from ttscale.store import SampleStore

        store = source if isinstance(source, SampleStore) else SampleStore.open(source)
        counts = weak_strong_counts(store, weak, strong)
    if empty not in ("error", "zero", "drop"):
        raise ConfigError(f"empty must be 'error', 'zero' or 'drop', got {empty!r}")
    if mode not in ("exact", "notebook"):
        raise ConfigError(f"mode must be 'exact' or 'notebook', got {mode!r}")
    if not cost_ratio >= 0:
        raise ConfigError(f"cost_ratio (C/B) must be >= 0, got {cost_ratio}")
    zero = counts.n == 0
    empty_ids = tuple(p for p, z in zip(counts.problem_ids, zero, strict=True) if z)
    if empty_ids and empty == "error":
        raise ConfigError(
            f"{len(empty_ids)} problem(s) have no sample checked by both verifiers "
            f"(e.g. {empty_ids[0]!r}); verify them, or leave them out or count them as 0 "
            "(empty='drop' or 'zero'; --empty in the CLI)"
        )
    fn_mask = false_negative_tasks(counts.weak, counts.strong) & ~zero
    fn_ids = tuple(p for p, f in zip(counts.problem_ids, fn_mask, strict=True) if f)
    keep = np.ones(len(counts.problem_ids), bool)
    if drop_false_negatives:
        keep &= ~fn_mask
    if empty == "drop":
        keep &= ~zero
    used = counts.subset(keep)
    if not used.problem_ids:
        raise ConfigError(
            "no task left to analyse (every task was empty or dropped as a false-negative task)"
        )
    if max_k is None:
        max_k = max(int(used.n.max()), 1)
    if isinstance(max_k, bool) or max_k < 1:
        raise ConfigError(f"max_k must be an integer >= 1, got {max_k!r}")
    ks = np.arange(1, max_k + 1, dtype=np.int64)
    per_task = empirical_reward_per_task(used.n, used.m_tp, used.m_fp, ks, cost_ratio)
    u = per_task.mean(axis=0)
    nonempty = used.n > 0
    rates = _rates(used)
    fits: dict[str, TwoTypeFit] = {}
    model_u: dict[str, NDArray[np.float64]] = {}
    model_k: dict[str, int] = {}
    if fit:
        sub = used.subset(nonempty)
        if not sub.problem_ids:
            raise ConfigError("no task with samples to fit the two-type model on")
        for est in ("paper", "pooled"):
            f = fit_two_type(sub.n, sub.weak, sub.strong, sub.both, estimator=est,  # type: ignore[arg-type]
                             threshold=threshold)
            fits[est] = f
            model_u[est] = f.utility(max_k, -cost_ratio, mode=mode)
            model_k[est] = optimal_k(model_u[est], ks)
    return VerifierUtilityReport(
        ks=ks,
        utility=u,
        optimal_k=optimal_k(u, ks),
        cost_ratio=float(cost_ratio),
        tasks=used.problem_ids,
        false_negative_tasks=fn_ids,
        dropped_false_negatives=drop_false_negatives,
        empty_tasks=empty_ids,
        empty=empty,
        excluded_samples=counts.excluded_samples,
        rates=rates,
        mode=mode,
        weak=weak,
        strong=strong,
        fits=fits,
        model_utility=model_u,
        model_optimal_k=model_k,
    )


def _rates(c: WeakStrongCounts) -> dict[str, float]:
    """The weak verifier's pooled error rates against the strong one, over the tasks used."""
    tp = int(c.both.sum())
    fp = int((c.weak - c.both).sum())
    fn = int((c.strong - c.both).sum())
    tn = int((c.n - c.weak - c.strong + c.both).sum())
    r = VerifierRates(tp=tp, fp=fp, fn=fn, tn=tn)
    return {
        "false_positive_rate": r.false_positive_rate,
        "false_negative_rate": r.false_negative_rate,
        "soundness": r.soundness,
        "completeness": r.completeness,
    }


def plot_verifier_utility(
    report: VerifierUtilityReport, path: str | Path, *, title: str | None = None
) -> Path:
    """Write a PNG: the empirical reward@k and, when fitted, each estimator's model ``U(K)``
    (log2 ``k`` axis; ``K*`` marked with a cross; 0 = abstain is not drawn)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    p = Path(path)
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    ks = report.ks
    ax.plot(ks, report.utility, "o-", color="black", lw=1.8, ms=3.0,
            label=f"empirical (C/B = {report.cost_ratio:g})")
    styles = {"paper": ("tab:blue", "--"), "pooled": ("tab:orange", "-.")}
    for name, u in report.model_utility.items():
        col, ls = styles.get(name, ("tab:green", ":"))
        ax.plot(ks, u, ls, color=col, lw=1.6,
                label=f"two-type model, {name} estimator ({report.mode})")
        k = report.model_optimal_k[name]
        if k > 0:
            ax.plot([k], [u[k - 1]], "x", color=col, ms=9, mew=2)
    if report.optimal_k > 0:
        ax.plot([report.optimal_k], [report.utility[report.optimal_k - 1]], "x", color="black",
                ms=9, mew=2)
    ax.axhline(0.0, color="grey", lw=0.8)
    if ks.size > 1:
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("K (attempts)")
    ax.set_ylabel("reward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"{report.weak} vs {report.strong}: {len(report.tasks)} tasks")
    fig.tight_layout()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
