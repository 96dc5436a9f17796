"""Exact offline replay of budget allocation across problems (:mod:`ttscale.select.allocation`).

Each problem's samples are read in an order -- the stored index order (what a live run with
the run's seed draws) or ``orders`` seeded random permutations, the same permutations
:func:`ttscale.replay.replay` uses -- and the policy hands out a total budget over the
problems, one sample at a time per chosen problem, exactly as the live
:class:`~ttscale.samplers.allocation.AllocationSampler` does. Uniform self-consistency at the
same total budget (``uniform``, same orders) and SC over every sample up to the per-problem cap
(``full``) are computed alongside, so each report pairs the policy with both.

Accuracy per problem is averaged over orders; CIs are percentile bootstraps over problems
(seeded); the sample and token ratios against ``full`` resample problems like
:meth:`ttscale.replay.ReplayReport.token_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.metrics.stats import bootstrap_ci
from ttscale.select.adaptive import StopRule, parse_rule
from ttscale.select.allocation import AllocationPolicy, AllocationState, allocate, parse_policy
from ttscale.store.pool import Pool

__all__ = ["AllocationReport", "Streams", "allocation_curve", "replay_allocation", "streams_of"]


@dataclass(frozen=True)
class Streams:
    """Per order, per problem: answers, correctness of each answer and tokens, in reading order."""

    problem_ids: tuple[str, ...]
    orders: tuple[tuple[tuple[list[Hashable | None], dict[Hashable, float], list[int]], ...], ...]
    cap: int
    has_tokens: bool
    order: str
    seed: int

    @property
    def n_problems(self) -> int:
        return len(self.problem_ids)

    def subset(self, rows: Sequence[int]) -> Streams:
        """The streams of the problems ``rows`` only (for calibration folds)."""
        return Streams(
            tuple(self.problem_ids[r] for r in rows),
            tuple(tuple(o[r] for r in rows) for o in self.orders),
            self.cap, self.has_tokens, self.order, self.seed,
        )


def streams_of(pool: Pool, *, orders: int | None, seed: int = 0, max_samples: int | None = None) -> Streams:
    """Read ``pool`` into per-order answer streams (see the module docstring); ``max_samples``
    is the per-problem cap (default and maximum: the fewest samples any problem has)."""
    if orders is not None and orders < 1:
        raise ConfigError(f"--orders must be at least 1, got {orders}")
    if pool.num_problems == 0:
        raise ConfigError("the pool has no problems to replay")
    if pool.num_samples and not pool.has_correctness():
        raise ConfigError(
            "the pool has no correctness (every sample's correct is null); verify it first "
            "(ttscale verify RUN) or fill the correct field of the imported samples"
        )
    if pool.unsampled:
        raise ConfigError(
            f"{len(pool.unsampled)} problems of the run have no samples; allocation needs every "
            "problem sampled (finish the run or drop them)"
        )
    counts = pool.n_per_problem
    cap = int(counts.min()) if max_samples is None else int(max_samples)
    if cap < 1:
        raise ConfigError("a problem of the pool has no samples; pass --max-samples or drop it")
    if cap > int(counts.min()):
        short = str(pool.problem_ids[int(np.argmin(counts))])
        raise ConfigError(
            f"--max-samples {cap} exceeds the samples of problem {short!r} ({int(counts.min())}); "
            "lower --max-samples"
        )
    has_tokens = bool((pool.num_tokens >= 0).all())
    values = pool.answer_values
    n_orders = 1 if orders is None else orders
    per_order: list[list[tuple[list[Hashable | None], dict[Hashable, float], list[int]]]] = [
        [] for _ in range(n_orders)
    ]
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        sort = np.argsort(pool.index[lo:hi], kind="stable")
        codes = pool.answer[lo:hi][sort]
        corr = pool.correct[lo:hi][sort]
        toks = pool.num_tokens[lo:hi][sort]
        n = hi - lo
        by_answer: dict[Hashable, float] = {}
        for c, ok in zip(codes, corr, strict=True):
            if c >= 0 and not math.isnan(ok):
                by_answer.setdefault(str(values[c]), float(ok))
        for j in range(n_orders):
            # the permutations of ttscale.replay.replay: order j of problem p from (seed, p, j)
            perm = np.arange(n) if orders is None else np.random.default_rng([seed, p, j]).permutation(n)
            ans: list[Hashable | None] = [None if c < 0 else str(values[c]) for c in codes[perm][:cap]]
            tk = [int(t) if has_tokens else 0 for t in toks[perm][:cap]]
            per_order[j].append((ans, by_answer, tk))
    return Streams(
        tuple(str(x) for x in pool.problem_ids),
        tuple(tuple(o) for o in per_order),
        cap, has_tokens, "index" if orders is None else "random", seed,
    )


def _run(
    streams: Streams, policy: AllocationPolicy, budget: float, tokens: bool, stop: StopRule | None,
    round_size: int | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], list[list[AllocationState]]]:
    """(problems, orders) arrays of correctness, samples and tokens, and the states per order."""
    P, J = streams.n_problems, len(streams.orders)
    corr = np.zeros((P, J))
    used = np.zeros((P, J))
    toks = np.zeros((P, J))
    all_states = []
    for j, order in enumerate(streams.orders):
        pos = [0] * P

        def draw(chosen: list[int], order: Any = order, pos: list[int] = pos) -> list[tuple[Hashable | None, int]]:
            out = []
            for i in chosen:
                ans, _, tk = order[i]
                out.append((ans[pos[i]], tk[pos[i]]))
                pos[i] += 1
            return out

        states = allocate(policy, P, draw, budget=budget, tokens=tokens, cap=streams.cap, stop=stop,
                          round_size=round_size)
        for i, s in enumerate(states):
            ans, _ = s.answer()
            corr[i, j] = order[i][1].get(ans, 0.0) if ans is not None else 0.0
            used[i, j] = s.samples
            toks[i, j] = float(sum(s.tokens))
        all_states.append(states)
    return corr, used, toks, all_states


@dataclass(frozen=True)
class AllocationReport:
    """A policy against uniform SC at the same total budget and SC over the full cap."""

    policy: AllocationPolicy
    stop: StopRule | None
    budget: float
    unit: str
    streams: Streams
    correct: NDArray[np.float64]  # (problems, orders)
    samples: NDArray[np.float64]
    tokens: NDArray[np.float64]
    uniform_correct: NDArray[np.float64]
    uniform_samples: NDArray[np.float64]
    uniform_tokens: NDArray[np.float64]
    full_correct: NDArray[np.float64]
    full_tokens: NDArray[np.float64]
    states: tuple[tuple[AllocationState, ...], ...]
    confidence: float = 0.95
    n_boot: int = 1000

    def _ci(self, per_problem: NDArray[np.float64]) -> dict[str, float]:
        ci = bootstrap_ci(per_problem, confidence=self.confidence, n_boot=self.n_boot, seed=self.streams.seed)
        return {"mean": float(ci.mean), "low": float(ci.low), "high": float(ci.high)}

    def _ratio(self, t: NDArray[np.float64], f: NDArray[np.float64]) -> dict[str, float | None]:
        # the resampling of ttscale.replay.ReplayReport.token_ratio: problems with replacement
        if f.sum() <= 0:
            return {"mean": None, "low": None, "high": None}
        rng = np.random.default_rng(self.streams.seed)
        idx = rng.integers(0, len(t), size=(self.n_boot, len(t)))
        r = t[idx].sum(axis=1) / np.maximum(f[idx].sum(axis=1), 1e-300)
        q = (1.0 - self.confidence) / 2.0
        return {"mean": float(t.sum() / f.sum()), "low": float(np.quantile(r, q)), "high": float(np.quantile(r, 1 - q))}

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def to_dict(self, *, per_problem: bool = False) -> dict[str, Any]:
        s = self.streams
        P = s.n_problems
        full_samples = np.full(P, float(s.cap))
        out: dict[str, Any] = {
            "policy": self.policy.spec,
            "stop": None if self.stop is None else self.stop.spec,
            "budget_total": self.budget,
            "unit": self.unit,
            "max_samples": s.cap,
            "order": s.order,
            "orders": len(s.orders),
            "seed": s.seed,
            "problems": P,
            "accuracy": self._ci(self.correct.mean(axis=1)),
            # totals over the dataset, mean over orders
            "samples_total": float(self.samples.sum(axis=0).mean()),
            "tokens_total": float(self.tokens.sum(axis=0).mean()) if s.has_tokens else None,
            "samples_per_problem": self._ci(self.samples.mean(axis=1)),
            "uniform": {
                "policy": "uniform",
                "accuracy": self._ci(self.uniform_correct.mean(axis=1)),
                "samples_total": float(self.uniform_samples.sum(axis=0).mean()),
                "tokens_total": float(self.uniform_tokens.sum(axis=0).mean()) if s.has_tokens else None,
            },
            "full": {
                "policy": f"SC@{s.cap}",
                "accuracy": self._ci(self.full_correct.mean(axis=1)),
                "samples_total": float(s.cap * P),
                "tokens_total": float(self.full_tokens.sum(axis=0).mean()) if s.has_tokens else None,
            },
            # paired over problems, same orders
            "accuracy_delta_uniform": self._ci((self.correct - self.uniform_correct).mean(axis=1)),
            "accuracy_delta_full": self._ci((self.correct - self.full_correct).mean(axis=1)),
            "sample_ratio": self._ratio(self.samples.mean(axis=1), full_samples),
            "token_ratio": (
                self._ratio(self.tokens.mean(axis=1), self.full_tokens.mean(axis=1)) if s.has_tokens
                else {"mean": None, "low": None, "high": None}
            ),
        }
        if per_problem:
            out["per_problem"] = [
                {
                    "problem_id": pid,
                    "samples": [int(x) for x in self.samples[i]],
                    "tokens": [int(x) for x in self.tokens[i]] if s.has_tokens else None,
                    "correct": float(self.correct[i].mean()),
                    "answers": [None if (a := st[i].answer()[0]) is None else str(a) for st in self.states],
                    "reasons": [st[i].reason for st in self.states],
                }
                for i, pid in enumerate(s.problem_ids)
            ]
        return out


def _full(streams: Streams) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    from ttscale.select.adaptive import final_vote

    P, J = streams.n_problems, len(streams.orders)
    corr, toks = np.zeros((P, J)), np.zeros((P, J))
    for j, order in enumerate(streams.orders):
        for i, (ans, by, tk) in enumerate(order):
            a, _ = final_vote(ans, tie="first")
            corr[i, j] = by.get(a, 0.0) if a is not None else 0.0
            toks[i, j] = float(sum(tk))
    return corr, toks


def replay_allocation(
    source: Pool | Streams,
    policy: AllocationPolicy | str,
    budget_total: float,
    *,
    tokens: bool = False,
    stop: StopRule | str | None = None,
    orders: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    round_size: int | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    baseline: bool = True,
) -> AllocationReport:
    """Replay ``policy`` with a total budget of ``budget_total`` samples (or generated tokens,
    ``tokens=True``) over the problems of ``source`` (a pool, or streams from
    :func:`streams_of`), against uniform SC at the same budget and SC@cap (see the module
    docstring). ``stop``: a stopping rule closing a problem early (per-problem cap).
    ``baseline=False`` skips the uniform run (its fields then repeat the policy's)."""
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    rule = parse_rule(stop) if isinstance(stop, str) else stop
    if rule is not None and rule.needs_confidences:
        raise ConfigError("deepconf needs trace confidences, which allocation replay does not read; choose another --stop rule")
    if rule is not None and rule.name == "esc":
        raise ConfigError("esc checks whole windows, and allocation hands out one sample at a time; choose another --stop rule")
    streams = source if isinstance(source, Streams) else streams_of(source, orders=orders, seed=seed, max_samples=max_samples)
    if tokens and not streams.has_tokens:
        raise ConfigError("--tokens needs token counts (num_tokens) for every sample, and this pool lacks them")
    if not budget_total > 0:
        raise ConfigError(f"--budget-total must be positive, got {budget_total}")
    corr, used, toks, states = _run(streams, pol, budget_total, tokens, rule, round_size)
    if (pol.name == "uniform" and rule is None) or not baseline:
        ucorr, uused, utoks = corr, used, toks
    else:
        ucorr, uused, utoks, _ = _run(streams, parse_policy("uniform"), budget_total, tokens, None, None)
    fcorr, ftoks = _full(streams)
    return AllocationReport(
        policy=pol, stop=rule, budget=float(budget_total), unit="tokens" if tokens else "samples",
        streams=streams, correct=corr, samples=used, tokens=toks,
        uniform_correct=ucorr, uniform_samples=uused, uniform_tokens=utoks,
        full_correct=fcorr, full_tokens=ftoks,
        states=tuple(tuple(s) for s in states), confidence=confidence, n_boot=n_boot,
    )


def budget_grid(problems: int, cap: int) -> list[int]:
    """Dataset budgets (samples) from 1x to the full pool: ``m x problems`` for
    ``m`` in 1, 2, 3, 4, 6, 8, 12, 16, ... up to ``cap`` (always included)."""
    mults: list[int] = []
    m = 1
    while m < cap:
        mults.append(m)
        m = m + 1 if m < 4 else (m * 3 // 2 if m % 2 == 0 and (m & (m - 1)) == 0 else m * 4 // 3)
    mults.append(cap)
    return [x * problems for x in sorted(set(mults))]


def allocation_curve(
    source: Pool | Streams,
    policies: Sequence[AllocationPolicy | str],
    *,
    budgets: Sequence[float] | None = None,
    tokens: bool = False,
    stop: StopRule | str | None = None,
    orders: int | None = 1,
    seed: int = 0,
    max_samples: int | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Accuracy against the dataset budget for each policy next to uniform SC (with CIs):
    ``{"budgets": [...], "unit", "curves": {spec: [{"accuracy": ci, "samples_total",
    "tokens_total"}, ...]}, "full": ci}``. Default budgets: :func:`budget_grid` (samples), or
    the same multiples of the mean tokens per sample with ``tokens=True``."""
    streams = source if isinstance(source, Streams) else streams_of(source, orders=orders, seed=seed, max_samples=max_samples)
    P = streams.n_problems
    if budgets is None:
        grid = budget_grid(P, streams.cap)
        if tokens:
            mean = np.mean([t for o in streams.orders for (_, _, tk) in o for t in tk]) if streams.has_tokens else 0.0
            budgets = [round(b * float(mean)) for b in grid]
        else:
            budgets = grid
    specs = ["uniform", *[(parse_policy(p) if isinstance(p, str) else p).spec for p in policies]]
    specs = list(dict.fromkeys(specs))
    curves: dict[str, list[dict[str, Any]]] = {s: [] for s in specs}
    full = None
    for b in budgets:
        for spec in specs:
            rep = replay_allocation(streams, spec, b, tokens=tokens, stop=None if spec == "uniform" else stop,
                                    confidence=confidence, n_boot=n_boot)
            d = rep.to_dict()
            curves[spec].append({"accuracy": d["accuracy"], "samples_total": d["samples_total"],
                                 "tokens_total": d["tokens_total"]})
            full = d["full"]
    return {"budgets": [float(b) for b in budgets], "unit": "tokens" if tokens else "samples",
            "problems": P, "max_samples": streams.cap, "orders": len(streams.orders), "seed": streams.seed,
            "stop": None if stop is None else (stop if isinstance(stop, str) else stop.spec),
            "curves": curves, "full": full}
