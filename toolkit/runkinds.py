"""What kind of run a directory holds, and the accuracy a non-fixed run reached at its own cost.

Every analysis command first asks :func:`run_kind`: a **fixed** run (``sample --n``, extended,
imported or merged) holds iid draws, so k-sample estimators (coverage, majority@k, fits,
replays) apply. The other kinds are a single operating point each, and they are reported as
such (:func:`run_points`): accuracy, samples and generated tokens per problem, each with a
problem-bootstrap CI (the same resamples for the three, so they keep their joint uncertainty):

* **adaptive** (``sample --adaptive RULE``): each problem stopped on its own; the answer is the
  one the run chose (``adaptive.jsonl``), over the samples it used, scored with the analysed
  verdict set; cost = every sample drawn and every token generated. Its samples are a prefix
  whose length depends on the answers, so a k-sample curve over them is biased: refused.
* **allocated** (``sample --allocate POLICY --budget-total N``): a dataset budget spread over
  the problems by a policy that reads the answers; as adaptive, the answer the run chose
  (``allocation.jsonl``) over the samples the problem got, at every sample and token drawn.
* **pruned** (``sample --prune RULE``): majority over the kept traces; cost = every trace
  started (pruned ones included) and every token generated.
* **shortmk** (``sample --adaptive short-3@k``, :mod:`ttscale.samplers.shortmk`): the run
  stored the traces that finished first; the answer is short-m@k's over the ``m`` traces the
  run chose (``shortmk.jsonl``: majority among them, ties to the shortest), scored with the
  analysed verdict set; cost = the ``k`` traces started and every token generated, the aborted
  traces' included (from the decision rows; unknown without them).
* **smc** / **search** (``ttscale smc``, ``--search``): weighted vote and highest weight over
  the final particles (:mod:`ttscale.metrics.weighted`); cost = particles and every token of
  every particle-step.

A problem the run lists without samples counts unsolved at zero cost (as ``curve``'s default
``--missing count``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.metrics.stats import bootstrap_ci
from ttscale.store.pool import Pool

__all__ = [
    "KIND_LABELS",
    "RunPoint",
    "describe_kind",
    "kind_refusal",
    "run_kind",
    "run_points",
]

#: run kind -> how it is named in tables and messages
KIND_LABELS = {
    "fixed": "fixed-n",
    "adaptive": "adaptive",
    "allocated": "allocated",
    "pruned": "pruned",
    "shortmk": "short-m@k",
    "smc": "SMC",
    "search": "search",
}


def run_kind(manifest: Mapping[str, Any]) -> str:
    """``"fixed"``, ``"adaptive"``, ``"allocated"``, ``"pruned"``, ``"shortmk"``, ``"smc"`` or
    ``"search"`` from a run's manifest.

    A non-iid run that names neither pruning nor search is a weighted population (SMC).
    """
    if manifest.get("shortmk"):
        return "shortmk"
    iid = manifest.get("iid") is not False
    if not iid:
        if manifest.get("pruning"):
            return "pruned"
        if manifest.get("search"):
            return "search"
        return "smc"
    if manifest.get("adaptive"):
        return "adaptive"
    if manifest.get("allocation"):
        return "allocated"
    return "fixed"


def describe_kind(manifest: Mapping[str, Any]) -> str:
    """One phrase: ``"adaptive (beta:threshold=0.95, budget 64)"``, ``"SMC (4 particles)"``."""
    kind = run_kind(manifest)
    if kind == "adaptive":
        a = manifest.get("adaptive") or {}
        return f"adaptive ({a.get('rule')}, budget {a.get('budget')} per problem)"
    if kind == "allocated":
        a = manifest.get("allocation") or {}
        return (
            f"allocated ({a.get('policy')}, {a.get('budget_total'):,.0f} {a.get('unit')} over the "
            f"problems, at most {a.get('max_samples')} each)"
        )
    if kind == "pruned":
        return f"pruned ({(manifest.get('pruning') or {}).get('rule')})"
    if kind == "shortmk":
        s = manifest.get("shortmk") or {}
        return f"short-m@k ({s.get('rule')}, k = {s.get('k')} traces per problem)"
    if kind == "smc":
        return f"SMC ({_particles(manifest)} particles)"
    if kind == "search":
        s = manifest.get("search") or {}
        return f"search {s.get('search')} ({_particles(manifest)} particles, width {s.get('width')})"
    n = (manifest.get("sampling") or {}).get("n")
    return "fixed-n" + (f" (n = {n})" if n else "")


def _particles(manifest: Mapping[str, Any]) -> int | None:
    for key in ("smc", "search"):
        d = manifest.get(key) or {}
        for f in ("particles", "budget"):
            if isinstance(d.get(f), int):
                return int(d[f])
    n = (manifest.get("sampling") or {}).get("n")
    return int(n) if isinstance(n, int) else None


def kind_refusal(kind: str, what: str, run: Any) -> str:
    """Why ``what`` (e.g. ``"replay"``, ``"majority at k samples"``) does not apply to a run of
    ``kind``, and what to run instead: one line."""
    why = {
        "adaptive": "an adaptive run stopped each problem after an answer-dependent number of "
        "samples, so its samples are not k iid draws",
        "allocated": "an allocated run gave each problem an answer-dependent number of samples "
        "from a dataset budget, so its samples are not k iid draws",
        "pruned": "a pruning run's traces were cut mid-generation and only the kept ones vote, "
        "so they are not k iid draws",
        "shortmk": "a short-m@k run stored only the traces that finished first (the shortest of "
        "each problem's k), so they are not k iid draws",
        "smc": "an SMC run holds a weighted population of particles, not iid draws",
        "search": "a search run holds the beams a reward-guided search kept, not iid draws",
    }[kind]
    return (
        f"{run}: {why}: {what} does not apply; `ttscale curve {run}` reports its accuracy at its "
        "own cost (samples and tokens per problem)"
    )


@dataclass(frozen=True)
class RunPoint:
    """One run as one point: ``method``'s accuracy at the samples and tokens the run spent per
    problem, each ``(mean, low, high)`` with a problem-bootstrap CI at ``confidence``."""

    label: str
    kind: str
    method: str
    n_problems: int
    accuracy: tuple[float, float, float]
    samples: tuple[float, float, float]
    tokens: tuple[float, float, float]
    confidence: float
    detail: Mapping[str, Any] = field(default_factory=dict)
    per_problem_correct: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False)
    per_problem_samples: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False)
    per_problem_tokens: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        def ci(t: tuple[float, float, float]) -> dict[str, float | None]:
            return {k: (float(v) if np.isfinite(v) else None) for k, v in zip(("mean", "low", "high"), t, strict=True)}

        return {
            "label": self.label,
            "kind": self.kind,
            "method": self.method,
            "problems": self.n_problems,
            "confidence": self.confidence,
            "accuracy": ci(self.accuracy),
            "samples": ci(self.samples),
            "tokens": ci(self.tokens),
            **dict(self.detail),
        }


def _stored_counts(store: Any, problem_ids: list[str]) -> tuple[NDArray[np.float64], NDArray[np.float64], bool]:
    """Per problem: every stored sample (pruned, resampled-away and unused ones included) and
    the tokens they generated; ``False`` when some sample has no token count."""
    t = store.table(["num_tokens"])
    n: dict[str, float] = {}
    toks: dict[str, float] = {}
    known = True
    for pid, k in zip(t.column("problem_id").to_pylist(), t.column("num_tokens").to_pylist(), strict=True):
        n[pid] = n.get(pid, 0.0) + 1.0
        if k is None:
            known = False
        toks[pid] = toks.get(pid, 0.0) + float(k or 0)
    return (
        np.asarray([n.get(p, 0.0) for p in problem_ids], dtype=np.float64),
        np.asarray([toks.get(p, 0.0) for p in problem_ids], dtype=np.float64),
        known,
    )


def _majority_first(answers: NDArray[np.int64], correct: NDArray[np.float64], tie: str, seed: int) -> float:
    """Credit of a majority vote over ``answers`` (index order; clusters by first appearance)."""
    from ttscale.select.aggregate import majority_vote_labels

    valid = answers >= 0
    if not valid.any():
        return 0.0
    codes, first, local = np.unique(answers[valid], return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = np.full(answers.size, -1, dtype=np.int64)
    labels[valid] = rank[local]
    res = majority_vote_labels(labels, n_clusters=codes.size, tie=tie, seed=seed)  # type: ignore[arg-type]
    cv = correct[valid]
    per_cluster = np.asarray(
        [float(np.any(cv[local == order[c]] == 1.0)) for c in range(codes.size)], dtype=np.float64
    )
    return float(res.credit(per_cluster))


def _shortmk_point(
    store: Any, pool: Pool, ids: list[str], stored_tokens: NDArray[np.float64], detail: dict[str, Any]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """A short-m@k run's credit, traces started and tokens per problem (see the module
    docstring): the chosen traces of each decision row vote (analysed answers; ties to the
    shortest, their order in the row); a problem without a row is decided again from its stored
    traces by length (what the live run did), its aborted tokens unknown (NaN)."""
    from ttscale.samplers.shortmk import read_short_decisions
    from ttscale.select.shortmk import short_mk

    entry = store.manifest.get("shortmk") or {}
    k, m = int(entry.get("k") or 0), int(entry.get("m") or 1)
    rows = {r["problem_id"]: r for r in read_short_decisions(store.path)}
    P = len(ids)
    c, samples, toks = np.zeros(P), np.zeros(P), stored_tokens.copy()
    values = pool.answer_values
    missing = 0
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        idx = [int(i) for i in pool.index[lo:hi]]
        pos = {i: j for j, i in enumerate(idx)}
        ans = [None if int(a) < 0 else str(values[int(a)]) for a in pool.answer[lo:hi]]
        row = rows.get(ids[p])
        if row is not None and all(int(i) in pos for i in row["chosen"]):
            chosen = [pos[int(i)] for i in row["chosen"]]
            toks[p] += float(row["aborted_tokens"])
            o = short_mk([ans[j] for j in chosen], list(range(len(chosen))), len(chosen))
        else:  # no record (or not of these traces): the m shortest stored, as the live run chose
            missing += 1
            toks[p] = np.nan
            o = short_mk(ans, [int(x) for x in pool.num_tokens[lo:hi]], min(m, hi - lo))
            chosen = list(o.chosen)
        if o.answer is not None:
            c[p] = float(any(ans[j] == o.answer and pool.correct[lo + j] == 1.0 for j in chosen))
        samples[p] = float(k or hi - lo)
    detail.update(rule=entry.get("rule"), k=k, m=m, budget=entry.get("budget"))
    if missing:
        detail["note"] = (
            f"{missing} problems have no decision row (shortmk.jsonl): decided again from their "
            "stored traces by length; their aborted traces' tokens are unknown"
        )
    return c, samples, toks


def _scored_tokens(store: Any, ids: Sequence[str]) -> NDArray[np.float64] | None:
    """Per problem (in ``ids`` order), the context tokens a pruning run's self-evaluation scored
    (``pruning.jsonl``'s ``scored_tokens``, never part of the generated tokens); NaN where a
    trace's count is unknown; None for runs whose rule scores nothing (or logs that predate the
    count)."""
    import json

    entry = store.manifest.get("pruning") or {}
    if "scored_tokens" not in entry or not str(entry.get("rule") or "").startswith("selfeval"):
        return None  # a rule that scores nothing, or a run made before the count was kept
    path = store.path / "pruning.jsonl"
    if not path.is_file():
        return None
    pos = {p: i for i, p in enumerate(ids)}
    out = np.zeros(len(ids))
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        i = pos.get(str(r["problem_id"]))
        if i is not None:
            n = r.get("scored_tokens")  # missing: a line from before the count was kept
            out[i] += np.nan if n is None else float(n)
    return out


def run_points(
    store: Any,
    pool: Pool,
    *,
    label: str,
    tie: str = "expected",
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[RunPoint]:
    """The accuracy a non-fixed run reached at its own cost (see the module docstring): one
    point for an adaptive, allocated, pruned or short-m@k run, two (weighted vote, highest weight) for SMC/search.

    ``pool`` is ``store.pool(...)`` (the verdict set to score with). ``tie`` is the tie rule
    of a pruned run's majority vote (an adaptive run's answer is the one it chose live).
    A :class:`ConfigError` if the run has no correctness labels (verify it first).
    """
    kind = run_kind(store.manifest)
    if kind == "fixed":
        raise ConfigError(f"{store.path} is a fixed-n run: its accuracy is a curve over k (ttscale curve)")
    if not pool.has_correctness():
        raise ConfigError(
            f"{store.path} has no correctness labels: verify it first (`ttscale verify {store.path}`)"
        )
    ids = [str(p) for p in pool.problem_ids] + [str(p) for p in pool.unsampled]
    n_stored, toks, known = _stored_counts(store, ids)
    if not known:  # an imported or hand-made run: the tokens are unknown (NaN), not zero
        toks = np.full(len(ids), np.nan)
    P = len(ids)
    detail: dict[str, Any] = {"run_kind": describe_kind(store.manifest), "verdicts": pool.meta.get("verdicts")}
    correct: dict[str, NDArray[np.float64]] = {}
    samples = n_stored
    if kind in ("smc", "search"):
        from ttscale.metrics.weighted import WEIGHTED_METHODS, weighted_results

        lw = store.table(["log_weight"]).column("log_weight")
        if len(lw) and lw.null_count == len(lw):  # the pool reads a null weight as -inf
            raise ConfigError(
                f"{store.path} records no particle log-weights, so its particles cannot be "
                "weighed; re-run it with `ttscale smc` (which records them)"
            )
        rep = weighted_results(pool, confidence=confidence, n_boot=10, seed=seed)
        for m in WEIGHTED_METHODS:
            correct[m] = np.concatenate([rep.solved[m], np.zeros(len(pool.unsampled))])
        particles = _particles(store.manifest)
        # particles per problem as recorded, else the final particles stored
        samples = np.concatenate([
            np.full(pool.num_problems, float(particles)) if particles else pool.n_per_problem.astype(np.float64),
            np.zeros(len(pool.unsampled)),
        ])
        detail["particles"] = particles
        detail["particle_steps"] = {"mean": float(n_stored.mean()) if P else 0.0}
    elif kind == "pruned":
        c = np.zeros(P)
        for p in range(pool.num_problems):
            v = pool.problem(p)
            c[p] = _majority_first(np.asarray(v.answer), np.asarray(v.correct), tie, seed)
        correct["majority"] = c
        detail["rule"] = (store.manifest.get("pruning") or {}).get("rule")
        detail["tie"] = tie
        scored = _scored_tokens(store, ids)
        if scored is not None:  # self-evaluation's scoring cost: a cost column beside tokens
            s_ci = bootstrap_ci(scored, confidence=confidence, n_boot=n_boot, seed=seed)
            detail["scored_tokens"] = {
                k: (float(v) if np.isfinite(v) else None)
                for k, v in zip(("mean", "low", "high"), (s_ci.mean, s_ci.low, s_ci.high), strict=True)
            }
    elif kind == "shortmk":
        c, samples, toks = _shortmk_point(store, pool, ids, toks, detail)
        correct["majority"] = c
    else:  # adaptive, allocated: the answer the run chose over the samples it used
        if kind == "adaptive":
            from ttscale.samplers.adaptive import read_decisions

            dec = {d["problem_id"]: d for d in read_decisions(store.path)}
        else:
            from ttscale.samplers.allocation import read_allocation

            dec = {d["problem_id"]: {**d, "used": d.get("samples")} for d in read_allocation(store.path)}
        c = np.zeros(P)
        used = np.zeros(P)
        values = pool.answer_values
        for p in range(pool.num_problems):
            lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
            order = np.argsort(pool.index[lo:hi], kind="stable")
            ans, cor = pool.answer[lo:hi][order], pool.correct[lo:hi][order]
            d = dec.get(ids[p])
            u = int(d["used"]) if d and isinstance(d.get("used"), int) else hi - lo
            used[p] = min(u, hi - lo)
            ans, cor = ans[: int(used[p])], cor[: int(used[p])]
            chosen = None if d is None else d.get("answer")
            hit = [i for i in range(ans.size) if ans[i] >= 0 and str(values[ans[i]]) == chosen]
            if chosen is not None and hit:
                c[p] = float(np.any(cor[hit] == 1.0))
            else:  # no record, or the verdicts canonicalise answers otherwise: the live vote
                c[p] = _majority_first(ans, cor, "first", seed)
        correct["majority"] = c
        if kind == "adaptive":
            a = store.manifest.get("adaptive") or {}
            detail["rule"], detail["budget"] = a.get("rule"), a.get("budget")
        else:
            a = store.manifest.get("allocation") or {}
            detail["policy"], detail["budget_total"] = a.get("policy"), a.get("budget_total")
        u_ci = bootstrap_ci(used, confidence=confidence, n_boot=n_boot, seed=seed)
        detail["samples_used"] = {"mean": float(u_ci.mean), "low": float(u_ci.low), "high": float(u_ci.high)}
    out = []
    for method, c in correct.items():
        # NaN tokens propagate to a NaN mean and CI (reported as unknown)
        ci = bootstrap_ci(np.stack([c, samples, toks], axis=1), confidence=confidence, n_boot=n_boot, seed=seed)
        out.append(
            RunPoint(
                label=label, kind=kind, method=method, n_problems=P,
                accuracy=(float(ci.mean[0]), float(ci.low[0]), float(ci.high[0])),
                samples=(float(ci.mean[1]), float(ci.low[1]), float(ci.high[1])),
                tokens=(float(ci.mean[2]), float(ci.low[2]), float(ci.high[2])),
                confidence=confidence, detail=detail, per_problem_correct=c,
                per_problem_samples=samples, per_problem_tokens=toks,
            )
        )  # fmt: skip
    return out
