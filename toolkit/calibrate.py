"""K-fold calibration of stopping rules and allocation policies: parameters that hold out of sample.

The problems are split into ``K`` folds by a seeded permutation. For each fold, each family's
parameter -- a stopping rule's main parameter, or an allocation policy's dataset budget (per
problem, so it scales with the fold size) -- is chosen on the other ``K − 1`` folds for a
stated target, and the chosen value is then replayed on the held-out fold. Every problem is
held out exactly once, so the pooled held-out results cover the whole pool; they are the
numbers to report.

Targets::

    within:X    the cheapest candidate (tokens, or samples without token counts) whose accuracy
                on the training folds is at least SC@cap's accuracy there minus X points
                (none qualifies: the most accurate one)
    tokens:R    the most accurate candidate whose tokens on the training folds are at most R x
                SC@cap's there (none qualifies: the cheapest one)

The choice reads only the training folds: a rule's per-problem outcomes on the training
problems, and an allocation policy replayed on the training problems alone (its budget is
shared, so a policy is never run on a pool that holds held-out problems).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.allocation import Streams, budget_grid, replay_allocation, streams_of
from ttscale.errors import ConfigError
from ttscale.metrics.stats import bootstrap_ci
from ttscale.select.adaptive import parse_rule
from ttscale.select.allocation import parse_policy
from ttscale.store.pool import Pool

__all__ = ["DEFAULT_FAMILIES", "Target", "calibrate", "fold_ids", "parse_target"]

#: rule families and the values of their main parameter tried by default
DEFAULT_FAMILIES: dict[str, list[str]] = {
    "beta": [f"beta:{t}" for t in (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)],
    "majority": [f"majority:{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)],
    "entropy": [f"entropy:{t}" for t in (0.3, 0.5, 0.75, 0.9)],
    "sprt": [f"sprt:p1={p}" for p in (0.55, 0.6, 0.7, 0.8, 0.9)],
    "msprt": [f"msprt:alpha={a}" for a in (0.01, 0.05, 0.2, 0.5)],
    "esc": [f"esc:window={w}" for w in (2, 3, 4, 5, 8)],
}


@dataclass(frozen=True)
class Target:
    """``kind`` ``within`` (``value`` points of SC@cap) or ``tokens`` (``value`` x SC@cap's tokens)."""

    kind: str
    value: float

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.value:g}"


def parse_target(text: str) -> Target:
    kind, _, val = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in ("within", "tokens"):
        raise ConfigError(f"--target must be within:X (points of SC at the full budget) or tokens:R (x its tokens), got {text!r}")
    try:
        v = float(val)
    except ValueError:
        raise ConfigError(f"--target {text!r}: the value must be a number") from None
    if kind == "within" and not v >= 0:
        raise ConfigError(f"--target within:X needs X >= 0 points, got {v:g}")
    if kind == "tokens" and not 0 < v <= 1:
        raise ConfigError(f"--target tokens:R needs 0 < R <= 1, got {v:g}")
    return Target(kind, v)


def fold_ids(n_problems: int, k: int, seed: int) -> NDArray[np.int64]:
    """Fold of each problem: a seeded permutation dealt round-robin into ``k`` folds."""
    if k < 2:
        raise ConfigError(f"--calibrate K needs K >= 2 folds, got {k}")
    if k > n_problems:
        raise ConfigError(f"--calibrate {k} needs at least {k} problems, the pool has {n_problems}")
    perm = np.random.default_rng([seed, 18]).permutation(n_problems)
    out = np.empty(n_problems, dtype=np.int64)
    out[perm] = np.arange(n_problems) % k
    return out


def _choose(target: Target, acc: NDArray[np.float64], cost: NDArray[np.float64], sc_acc: float, sc_cost: float) -> int:
    """Index of the candidate the target picks from training accuracy and cost."""
    order = list(range(len(acc)))
    if target.kind == "within":
        ok = [i for i in order if acc[i] >= sc_acc - target.value / 100.0 - 1e-12]
        if not ok:
            return max(order, key=lambda i: (acc[i], -cost[i], -i))
        return min(ok, key=lambda i: (cost[i], -acc[i], i))
    ok = [i for i in order if cost[i] <= target.value * sc_cost + 1e-9]
    if not ok:
        return min(order, key=lambda i: (cost[i], -acc[i], i))
    return max(ok, key=lambda i: (acc[i], -cost[i], -i))


def calibrate(
    pool: Pool | Streams,
    *,
    k: int,
    target: Target | str = "within:0.5",
    rules: dict[str, Sequence[str]] | None = None,
    policies: Sequence[str] = (),
    orders: int | None = 1,
    seed: int = 0,
    max_samples: int | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Calibrate each family on ``k − 1`` folds and report its held-out fold (module docstring).

    ``rules``: family -> candidate specs (default :data:`DEFAULT_FAMILIES` when no policy is
    given either); ``policies``: allocation policies whose per-problem budget is calibrated
    over :func:`~ttscale.allocation.budget_grid` (tokens with a ``tokens:`` target).
    """
    tgt = parse_target(target) if isinstance(target, str) else target
    streams = pool if isinstance(pool, Streams) else streams_of(pool, orders=orders, seed=seed, max_samples=max_samples)
    P = streams.n_problems
    folds = fold_ids(P, k, seed)
    families_in: dict[str, Sequence[str]] = dict(DEFAULT_FAMILIES if rules is None and not policies else rules or {})
    tokens = streams.has_tokens
    # SC@cap per problem (mean over orders): the reference of every target
    sc = replay_allocation(streams, "uniform", P * streams.cap, n_boot=10)
    sc_acc = sc.full_correct.mean(axis=1)
    sc_cost = sc.full_tokens.mean(axis=1) if tokens else np.full(P, float(streams.cap))

    families: dict[str, Any] = {}
    for fam, specs in families_in.items():
        if any(parse_rule(s).needs_confidences for s in specs):
            raise ConfigError("deepconf needs trace confidences, which calibration does not read; leave it out")
        specs = [parse_rule(s).spec for s in specs]
        acc, cost = _rule_outcomes(streams, specs, tokens)  # (candidates, problems)
        chosen, held_acc, held_cost = [], np.zeros(P), np.zeros(P)
        for f in range(k):
            train, test = folds != f, folds == f
            i = _choose(tgt, acc[:, train].mean(axis=1), cost[:, train].sum(axis=1),
                        float(sc_acc[train].mean()), float(sc_cost[train].sum()))
            chosen.append(specs[i])
            held_acc[test], held_cost[test] = acc[i, test], cost[i, test]
        families[fam] = _summary(chosen, held_acc, held_cost, sc_acc, sc_cost, confidence, n_boot, seed)
    for pol in policies:
        spec = parse_policy(pol).spec
        mults = budget_grid(1, streams.cap)
        unit_tokens = tgt.kind == "tokens" and tokens
        chosen, held_acc, held_cost = [], np.zeros(P), np.zeros(P)
        for f in range(k):
            train_rows = np.flatnonzero(folds != f)
            test_rows = np.flatnonzero(folds == f)
            tr = streams.subset(train_rows)
            # token budgets in multiples of the training folds' mean tokens per sample
            mean_tok = float(np.mean([t for o in tr.orders for (_, _, tk) in o for t in tk])) if unit_tokens else 1.0
            per_problem = [m * mean_tok for m in mults]
            accs, costs = [], []
            for b in per_problem:
                rep = replay_allocation(tr, spec, b * len(train_rows), tokens=unit_tokens, n_boot=10, baseline=False)
                accs.append(float(rep.correct.mean()))
                costs.append(float(rep.tokens.mean(axis=1).sum()) if tokens else float(rep.samples.mean(axis=1).sum()))
            i = _choose(tgt, np.array(accs), np.array(costs), float(sc_acc[train_rows].mean()),
                        float(sc_cost[train_rows].sum()))
            b = per_problem[i]
            chosen.append(f"{spec} budget {b:g} {'tokens' if unit_tokens else 'samples'}/problem")
            rep = replay_allocation(streams.subset(test_rows), spec, b * len(test_rows), tokens=unit_tokens, n_boot=10,
                                    baseline=False)
            held_acc[test_rows] = rep.correct.mean(axis=1)
            held_cost[test_rows] = rep.tokens.mean(axis=1) if tokens else rep.samples.mean(axis=1)
        families[spec] = _summary(chosen, held_acc, held_cost, sc_acc, sc_cost, confidence, n_boot, seed)
    return {
        "k": k, "seed": seed, "target": tgt.spec, "problems": P, "orders": len(streams.orders),
        "max_samples": streams.cap, "cost": "tokens" if tokens else "samples",
        "folds": [int(x) for x in folds],
        "sc_full": _ci(sc_acc, confidence, n_boot, seed),
        "families": families,
    }


def _rule_outcomes(streams: Streams, specs: Sequence[str], tokens: bool) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(candidates, problems) accuracy and cost of each rule, mean over orders; a rule decides
    each problem from that problem's samples alone."""
    from ttscale.select.adaptive import run_stream

    P, J = streams.n_problems, len(streams.orders)
    acc = np.zeros((len(specs), P))
    cost = np.zeros((len(specs), P))
    for c, spec in enumerate(specs):
        rule = parse_rule(spec)
        budget = rule.usable(streams.cap)
        for order in streams.orders:
            for i, (ans, by, tk) in enumerate(order):
                o = run_stream(rule, ans, budget=budget)
                acc[c, i] += (by.get(o.answer, 0.0) if o.answer is not None else 0.0) / J
                cost[c, i] += (sum(tk[: o.used]) if tokens else o.used) / J
    return acc, cost


def _ci(v: NDArray[np.float64], confidence: float, n_boot: int, seed: int) -> dict[str, float]:
    ci = bootstrap_ci(v, confidence=confidence, n_boot=n_boot, seed=seed)
    return {"mean": float(ci.mean), "low": float(ci.low), "high": float(ci.high)}


def _summary(
    chosen: list[str], acc: NDArray[np.float64], cost: NDArray[np.float64], sc_acc: NDArray[np.float64],
    sc_cost: NDArray[np.float64], confidence: float, n_boot: int, seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(acc), size=(n_boot, len(acc)))
    r = cost[idx].sum(axis=1) / np.maximum(sc_cost[idx].sum(axis=1), 1e-300)
    q = (1.0 - confidence) / 2.0
    return {
        "chosen": chosen,
        "held_out_accuracy": _ci(acc, confidence, n_boot, seed),
        "delta_vs_sc_full_points": {k: v * 100 for k, v in _ci(acc - sc_acc, confidence, n_boot, seed).items()},
        "cost_ratio": {"mean": float(cost.sum() / sc_cost.sum()) if sc_cost.sum() > 0 else math.nan,
                       "low": float(np.quantile(r, q)), "high": float(np.quantile(r, 1 - q))},
    }
