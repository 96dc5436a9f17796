"""Accuracy against generated tokens: fixed-n curves and adaptive runs on one axis.

A fixed-n method at budget ``k`` costs, per problem, the expected tokens of ``k`` samples:
``k · mean(num_tokens of the problem's samples)`` (a random k-subset's expected total); the
x value of the curve at ``k`` is the mean of that over problems. A run made by a pruning sampler
is one point: the accuracy of a majority vote over its kept traces, at the tokens it generated
per problem (every stored trace, pruned ones included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.metrics.stats import bootstrap_ci
from ttscale.select.aggregate import majority_vote_labels
from ttscale.store.pool import Pool

__all__ = [
    "TokenPoint",
    "expected_tokens_at_k",
    "per_problem_mean_tokens",
    "run_token_point",
    "stored_tokens_per_problem",
]


def per_problem_mean_tokens(pool: Pool) -> NDArray[np.float64]:
    """Mean generated tokens per sample of each problem, shape ``(problems,)``.

    A :class:`ConfigError` if some sample's token count is unknown (an imported pool without
    ``num_tokens``): a tokens axis needs them all.
    """
    if np.any(pool.num_tokens < 0):
        raise ConfigError(
            "the tokens axis needs every sample's token count; this pool has samples without "
            "num_tokens (use --x k)"
        )
    out = np.zeros(pool.num_problems, dtype=np.float64)
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        out[p] = pool.num_tokens[lo:hi].mean() if hi > lo else 0.0
    return out


def expected_tokens_at_k(pool: Pool, ks: ArrayLike) -> NDArray[np.float64]:
    """Mean over problems of the expected tokens of ``k`` samples, one value per ``k``."""
    k = np.asarray(ks, dtype=np.float64)
    per = per_problem_mean_tokens(pool)
    return k * (per.mean() if per.size else 0.0)


@dataclass(frozen=True)
class TokenPoint:
    """A run as one point: accuracy (mean and CI over problems) at tokens per problem (mean and
    CI); ``per_problem_tokens``/``per_problem_correct`` the values behind them."""

    label: str
    tokens: float
    tokens_low: float
    tokens_high: float
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    n_problems: int
    per_problem_tokens: NDArray[np.float64]
    per_problem_correct: NDArray[np.float64]
    method: str = "majority"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "problems": self.n_problems,
            "tokens": {"mean": self.tokens, "low": self.tokens_low, "high": self.tokens_high},
            "accuracy": {
                "mean": self.accuracy,
                "low": self.accuracy_low,
                "high": self.accuracy_high,
            },
        }


def run_token_point(
    pool: Pool,
    tokens_per_problem: Sequence[float] | NDArray[np.float64],
    *,
    label: str,
    tie: str = "expected",
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> TokenPoint:
    """Majority vote over each problem's samples in ``pool`` (the kept traces of an adaptive or
    pruning run), scored with the pool's correctness, at ``tokens_per_problem`` (aligned with
    ``pool.problem_ids``: every token the run generated for the problem). A problem with no
    answered sample scores 0. ``tie`` as in ``ttscale curve``."""
    toks = np.asarray(tokens_per_problem, dtype=np.float64)
    if toks.shape != (pool.num_problems,):
        raise ConfigError(
            f"tokens_per_problem needs one value per problem ({pool.num_problems}), got {toks.shape}"
        )
    if not pool.has_correctness():  # a method: the bare attribute is always true
        raise ConfigError("the run has no correctness labels; verify it first (ttscale verify)")
    correct = np.zeros(pool.num_problems, dtype=np.float64)
    for p in range(pool.num_problems):
        view = pool.problem(p)
        if view.n == 0:
            continue
        ans = np.asarray(view.answer)
        valid = ans >= 0
        if not valid.any():
            continue
        codes, first, local = np.unique(ans[valid], return_index=True, return_inverse=True)
        # clusters numbered by first appearance (so tie="first" means first seen)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        labels = np.full(ans.size, -1, dtype=np.int64)
        labels[valid] = rank[local]
        res = majority_vote_labels(labels, n_clusters=codes.size, tie=tie, seed=seed)  # type: ignore[arg-type]
        corr_valid = view.correct[valid]
        per_cluster = np.zeros(codes.size, dtype=np.float64)
        for c in range(codes.size):
            v = corr_valid[first[order[c]]]
            per_cluster[c] = 0.0 if np.isnan(v) else float(v)
        correct[p] = res.credit(per_cluster)
    both = np.stack([correct, toks], axis=1)
    ci = bootstrap_ci(both, confidence=confidence, n_boot=n_boot, seed=seed)
    return TokenPoint(
        label=label,
        tokens=float(ci.mean[1]),
        tokens_low=float(ci.low[1]),
        tokens_high=float(ci.high[1]),
        accuracy=float(ci.mean[0]),
        accuracy_low=float(ci.low[0]),
        accuracy_high=float(ci.high[0]),
        n_problems=pool.num_problems,
        per_problem_tokens=toks,
        per_problem_correct=correct,
    )


def stored_tokens_per_problem(store: Any, problem_ids: Sequence[str]) -> NDArray[np.float64]:
    """Tokens of every stored trace of each problem (pruned and resampled ones included), in
    the order of ``problem_ids``: what a step-wise or pruning run generated per problem."""
    t = store.table(["num_tokens"])
    pids = t.column("problem_id").to_pylist()
    toks = t.column("num_tokens").to_pylist()
    total: dict[str, float] = {}
    for pid, n in zip(pids, toks, strict=True):
        if n is None:
            raise ConfigError(f"a stored sample of {pid!r} has no token count")
        total[pid] = total.get(pid, 0.0) + float(n)
    return np.asarray([total.get(str(pid), 0.0) for pid in problem_ids], dtype=np.float64)
