"""short-m@k (Hassid et al., 2025, "Don't Overthink it", arXiv 2505.17813): stop at the first m.

``k`` traces of a problem are generated in parallel; the problem stops as soon as the first
``m`` of them finish, the other ``k - m`` are aborted, and the answer is the majority among the
``m`` finished traces, a tie going to the answer of the shortest trace among the tied ones.
``short-1@k`` (the first trace to finish) and ``short-3@k`` are the paper's presets.

Finish order is the order of generated length (the paper's definition: traces decode in
lockstep, one token per step, so the shortest finishes first); equal lengths finish in index
order. The cost model, per problem, with ``L_(1) <= ... <= L_(k)`` the sorted lengths:

* tokens: ``L_(1) + ... + L_(m)`` for the finished traces plus ``(k - m) * L_(m)`` for the
  aborted ones (each had generated ``L_(m)`` tokens when the m-th finished); majority@k spends
  ``L_(1) + ... + L_(k)``;
* wall time: ``L_(m)`` decode steps (majority@k: ``L_(k)``), the paper's "time to answer" in
  tokens, under the same lockstep model.

What was checked: the method and the tie rule against the paper's text (halt at the first m,
majority among them, ties to the shortest thinking); no reference code was found (searched the
stored GitHub index and pages about the paper), so the code and the token/time model are checked
against hand-derived vectors in ``tests/select/test_shortmk.py``, not against the authors'
numbers. The paper measures thinking tokens (between ``<think>`` and ``</think>``); the models
here have no thinking delimiter, so length is the whole generation (``num_tokens``).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.metrics.stats import bootstrap_ci
from ttscale.store.pool import Pool
from ttscale.validation import check_int

__all__ = [
    "SHORT_PRESETS",
    "ShortMK",
    "ShortOutcome",
    "finish_order",
    "is_short_spec",
    "parse_short",
    "replay_short",
    "short_mk",
]

#: The paper's named presets (``k`` is the budget).
SHORT_PRESETS: tuple[str, ...] = ("short-1@k", "short-3@k")

_SPEC = re.compile(r"^short-(\d+)@(k|\d+)$")


@dataclass(frozen=True)
class ShortMK:
    """short-``m``@``k``; ``k=None`` means the budget (``short-3@k``)."""

    m: int
    k: int | None = None

    def __post_init__(self) -> None:
        check_int("m", self.m, min=1)
        check_int("k", self.k, min=1, allow_none=True)
        if self.k is not None and self.m > self.k:
            raise ConfigError(f"short-{self.m}@{self.k}: m must be at most k")

    @property
    def spec(self) -> str:
        return f"short-{self.m}@{'k' if self.k is None else self.k}"

    def size(self, budget: int) -> int:
        """``k`` for a budget of ``budget`` traces per problem (``k=None``: the budget)."""
        k = budget if self.k is None else self.k
        if k > budget:
            raise ConfigError(f"{self.spec} needs {k} traces per problem, the budget is {budget}")
        if self.m > k:
            raise ConfigError(f"{self.spec} stops at the first {self.m} of {k} traces: give at least {self.m}")
        return k


def is_short_spec(spec: str) -> bool:
    """Whether ``spec`` names a short-m@k rule (``short-...``)."""
    return str(spec).strip().lower().startswith("short-")


def parse_short(spec: str) -> ShortMK:
    """``short-M@k`` (k = the budget) or ``short-M@K``; e.g. ``short-1@k``, ``short-3@16``."""
    text = str(spec).strip().lower()
    hit = _SPEC.match(text)
    if hit is None:
        raise ConfigError(
            f"bad short-m@k rule {spec!r}; write short-M@k (k = the budget) or short-M@K, "
            f"e.g. {' or '.join(SHORT_PRESETS)}"
        )
    m, k = int(hit.group(1)), hit.group(2)
    if m < 1:
        raise ConfigError(f"bad short-m@k rule {spec!r}: m must be at least 1")
    return ShortMK(m, None if k == "k" else int(k))


def finish_order(lengths: Sequence[int] | NDArray[Any]) -> list[int]:
    """Positions of ``lengths`` in finish order: shortest first, equal lengths by position."""
    return [int(i) for i in np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")]


@dataclass(frozen=True)
class ShortOutcome:
    """One problem: the ``answer``, the ``chosen`` positions (finish order), ``tokens`` and
    ``steps`` (wall time in decode steps) of short-m@k, and of majority@k over the same k."""

    answer: Hashable | None
    chosen: tuple[int, ...]
    tokens: int
    steps: int
    full_tokens: int
    full_steps: int


def short_mk(answers: Sequence[Hashable | None], lengths: Sequence[int], m: int) -> ShortOutcome:
    """short-``m``@``k`` over ``k = len(answers)`` traces with generated ``lengths`` (see the
    module docstring). ``None`` answers take part in the stop (a trace that finishes without an
    answer still finishes) but get no vote; if none of the m has an answer, the answer is
    ``None``."""
    k = len(answers)
    if len(lengths) != k:
        raise ConfigError("short_mk needs one length per answer")
    check_int("m", m, min=1)
    if m > k:
        raise ConfigError(f"short-{m}@k needs at least {m} traces, got {k}")
    if any(int(x) < 0 for x in lengths):
        raise ConfigError("short_mk needs known lengths (num_tokens >= 0) for every trace")
    order = finish_order(lengths)
    chosen = order[:m]
    lm = int(lengths[chosen[-1]])
    counts: dict[Hashable, int] = {}
    first_at: dict[Hashable, int] = {}  # rank in finish order of the shortest trace per answer
    for rank, pos in enumerate(chosen):
        a = answers[pos]
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first_at.setdefault(a, rank)
    answer: Hashable | None = None
    if counts:
        top = max(counts.values())
        answer = min((a for a, c in counts.items() if c == top), key=lambda a: first_at[a])
    tokens = sum(int(lengths[i]) for i in chosen) + sum(min(int(lengths[i]), lm) for i in order[m:])
    return ShortOutcome(
        answer=answer,
        chosen=tuple(chosen),
        tokens=tokens,
        steps=lm,
        full_tokens=sum(int(x) for x in lengths),
        full_steps=max(int(x) for x in lengths),
    )


def _ci(values: Sequence[float], seed: int, confidence: float, n_boot: int) -> dict[str, float | None]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0 or np.isnan(a).any():
        return {"mean": None, "low": None, "high": None}
    c = bootstrap_ci(a, confidence=confidence, n_boot=n_boot, seed=seed)
    return {"mean": float(c.mean), "low": float(c.low), "high": float(c.high)}


def replay_short(
    pool: Pool,
    rule: ShortMK | str,
    *,
    max_samples: int | None = None,
    orders: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Replay short-m@k on a stored fixed-n pool, against majority@k over the same traces.

    ``max_samples`` is the budget (default: the fewest samples of any problem); ``k`` is the
    rule's or the budget. ``orders=None`` takes each problem's first ``k`` traces in index order
    (what a live run with the same seed generates); ``orders=N`` averages over ``N`` seeded
    random draws of ``k`` of the budget's traces (the paper's evaluation draws subsets of its 20
    generations). Accuracy, tokens and wall steps per problem, with bootstrap CIs over problems;
    majority@k breaks ties to the first-seen answer in the same order. Returns JSON-ready data.
    """
    from ttscale.select.adaptive import final_vote

    r = parse_short(rule) if isinstance(rule, str) else rule
    if pool.num_problems == 0:
        raise ConfigError("the pool has no problems to replay")
    if not pool.iid:
        raise ConfigError("short-m@k replays on iid draws; this pool is not (SMC, search or pruned traces)")
    counts = pool.n_per_problem
    budget = int(counts.min()) if max_samples is None else int(max_samples)
    if budget < 1 or budget > int(counts.min()):
        raise ConfigError(
            f"--max-samples {budget} needs that many samples in every problem; the fewest is "
            f"{int(counts.min())}: lower --max-samples"
        )
    k = r.size(budget)
    if bool((pool.num_tokens < 0).any()):
        raise ConfigError(
            "short-m@k needs each trace's generated length (num_tokens), and this pool lacks it; "
            "replay it on a run sampled by ttscale or an import with num_tokens"
        )
    values = pool.answer_values
    cor: list[float] = []
    fcor: list[float] = []
    tok: list[float] = []
    ftok: list[float] = []
    steps: list[float] = []
    fsteps: list[float] = []
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        sort = np.argsort(pool.index[lo:hi], kind="stable")[:budget]
        codes = pool.answer[lo:hi][sort]
        corr = pool.correct[lo:hi][sort]
        lens = pool.num_tokens[lo:hi][sort]
        picks = (
            [np.arange(k)]
            if orders is None
            else [np.random.default_rng([seed, p, j]).permutation(budget)[:k] for j in range(orders)]
        )
        c1, c2, t1, t2, s1, s2 = [], [], [], [], [], []
        for pick in picks:
            ans = [None if int(c) < 0 else str(values[int(c)]) for c in codes[pick]]
            right: dict[Hashable, float] = {a: float(np.nan_to_num(x, nan=0.0) > 0.5) for a, x in zip(ans, corr[pick], strict=True) if a is not None}
            o = short_mk(ans, [int(x) for x in lens[pick]], r.m)
            maj, _ = final_vote(ans, tie="first")
            c1.append(0.0 if o.answer is None else right[o.answer])
            c2.append(0.0 if maj is None else right[maj])
            t1.append(o.tokens)
            t2.append(o.full_tokens)
            s1.append(o.steps)
            s2.append(o.full_steps)
        cor.append(float(np.mean(c1)))
        fcor.append(float(np.mean(c2)))
        tok.append(float(np.mean(t1)))
        ftok.append(float(np.mean(t2)))
        steps.append(float(np.mean(s1)))
        fsteps.append(float(np.mean(s2)))
    n_unsampled = len(pool.unsampled)
    cor += [0.0] * n_unsampled
    fcor += [0.0] * n_unsampled
    tok += [0.0] * n_unsampled
    ftok += [0.0] * n_unsampled
    steps += [0.0] * n_unsampled
    fsteps += [0.0] * n_unsampled

    def block(c: list[float], t: list[float], s: list[float]) -> dict[str, Any]:
        return {
            "accuracy": _ci(c, seed, confidence, n_boot),
            "tokens": _ci(t, seed, confidence, n_boot),
            "wall_steps": _ci(s, seed, confidence, n_boot),
        }

    out: dict[str, Any] = {"rule": r.spec, "m": r.m, "k": k, "max_samples": budget,
                           "order": "index" if orders is None else "random",
                           "orders": 1 if orders is None else orders, "seed": seed,
                           "problems": pool.num_problems + n_unsampled}
    out.update(block(cor, tok, steps))
    out["fixed"] = {"rule": f"majority@{k}", **block(fcor, ftok, fsteps)}
    out["accuracy_delta"] = _ci([a - b for a, b in zip(cor, fcor, strict=True)], seed, confidence, n_boot)
    ft, fs = sum(ftok), sum(fsteps)
    out["token_ratio"] = sum(tok) / ft if ft > 0 else None
    out["wall_ratio"] = sum(steps) / fs if fs > 0 else None
    out["cost_model"] = (
        "lockstep decoding: the k-m aborted traces have L_(m) tokens each; wall time = L_(m) "
        "decode steps (majority@k: L_(k))"
    )
    return out
