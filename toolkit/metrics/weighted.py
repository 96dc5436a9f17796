"""Accuracy of a weighted population (SMC particles): weighted vote and highest weight.

A weighted sampler's particles are not iid draws, so k-sample estimators (pass@k, majority@k)
do not apply; what a run supports is the answer the population as a whole selects. Per
problem, with normalised weights ``w_j = exp(l_j - logsumexp(l))`` over the kept particles:

* **weighted vote**: the answer ``a`` maximising ``sum_{j: answer_j = a} w_j`` (particles
  without an answer do not vote);
* **highest weight**: the answer of the particle with the largest ``l_j``.

A problem is solved when the selected answer is correct (any particle with that answer is
marked correct). Ties go to the answer (particle) seen first in index order; a problem whose
particles all have weight 0 (``-inf``) or no answer selects nothing and counts unsolved.
Accuracies are means over problems with a percentile bootstrap CI over problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.metrics.stats import bootstrap_ci
from ttscale.seeding import SeedLike
from ttscale.store.pool import Pool

__all__ = ["WEIGHTED_METHODS", "WeightedReport", "weighted_results"]

#: the selection rules of a weighted population, with a one-line description each
WEIGHTED_METHODS = {
    "weighted_vote": "the answer with the largest total normalised weight",
    "max_weight": "the answer of the particle with the largest weight",
}


@dataclass(frozen=True)
class WeightedReport:
    """Per-problem and mean accuracy of each rule in :data:`WEIGHTED_METHODS`.

    ``solved[name]``: (P,) float64 1/0 per problem; ``mean``/``low``/``high``: the mean over
    problems and its ``confidence`` bootstrap CI; ``ess``: (P,) effective sample size
    ``1 / sum w_j^2`` of each problem's particles (NaN when all weights are 0).
    """

    problem_ids: tuple[str, ...]
    solved: dict[str, NDArray[np.float64]]
    mean: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    ess: NDArray[np.float64]
    confidence: float
    n_boot: int

    @property
    def n_problems(self) -> int:
        return len(self.problem_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "iid": False,
            "n_problems": self.n_problems,
            "confidence": self.confidence,
            "n_boot": self.n_boot,
            "methods": {
                m: {"mean": self.mean[m], "low": self.low[m], "high": self.high[m]}
                for m in self.solved
            },
            "mean_ess": float(np.nanmean(self.ess)) if np.isfinite(self.ess).any() else None,
        }


def _select(
    answers: NDArray[np.int64], correct: NDArray[np.float64], logw: NDArray[np.float64]
) -> tuple[float, float, float]:
    """(weighted-vote solved, max-weight solved, ESS) of one problem's particles."""
    ok = np.isfinite(logw) & (answers >= 0)
    if not ok.any():
        return 0.0, 0.0, float("nan")
    finite = np.isfinite(logw)
    shifted = logw[finite] - logw[finite].max()
    w_all = np.exp(shifted) / np.exp(shifted).sum()
    ess = float(1.0 / np.square(w_all).sum())
    w = np.zeros(answers.shape[0], dtype=np.float64)
    w[finite] = w_all
    voters = np.flatnonzero(ok)

    def is_correct(code: int) -> float:
        return float(np.any(correct[answers == code] == 1.0))

    # first-seen order of answers makes np.argmax's first-maximum rule "first in index order"
    codes, first = np.unique(answers[voters], return_index=True)
    codes = codes[np.argsort(first)]
    totals = np.array([w[voters][answers[voters] == c].sum() for c in codes])
    vote = int(codes[int(np.argmax(totals))])
    best = int(voters[int(np.argmax(logw[voters]))])
    return is_correct(vote), is_correct(int(answers[best])), ess


def weighted_results(
    pool: Pool, *, confidence: float = 0.95, n_boot: int = 1000, seed: SeedLike = 0
) -> WeightedReport:
    """Weighted-vote and highest-weight accuracy of ``pool``'s particles (see module docstring).

    ``pool.log_weight`` holds each particle's natural-log weight (unnormalised; only
    differences within a problem matter). Needs correctness (a verified run).
    """
    if pool.log_weight is None:
        raise ConfigError(
            "the pool has no particle log-weights; weighted results need a run made by a "
            "weighted sampler (its samples record log_weight)"
        )
    if not pool.has_correctness():
        raise ConfigError("the pool has no correctness; verify the run first (`ttscale verify RUN`)")
    p = pool.num_problems
    solved = {m: np.zeros(p, dtype=np.float64) for m in WEIGHTED_METHODS}
    ess = np.full(p, np.nan, dtype=np.float64)
    for i in range(p):
        a, b = int(pool.offsets[i]), int(pool.offsets[i + 1])
        v, m, e = _select(pool.answer[a:b], pool.correct[a:b], pool.log_weight[a:b])
        solved["weighted_vote"][i], solved["max_weight"][i], ess[i] = v, m, e
    mean: dict[str, float] = {}
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    for name, vals in solved.items():
        ci = bootstrap_ci(vals, confidence=confidence, n_boot=n_boot, seed=seed)
        mean[name], low[name], high[name] = float(ci.mean), float(ci.low), float(ci.high)
    return WeightedReport(
        problem_ids=tuple(str(x) for x in pool.problem_ids),
        solved=solved,
        mean=mean,
        low=low,
        high=high,
        ess=ess,
        confidence=confidence,
        n_boot=int(n_boot),
    )
