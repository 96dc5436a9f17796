"""Exact offline replay of level-1 adaptive rules on a stored pool.

For each problem the rule (:mod:`ttscale.select.adaptive`) reads the pool's answers in an order
(the stored index order, or ``orders`` seeded random permutations, as the papers evaluate) and
stops where it would have stopped live; the chosen answer is scored with the pool's
correctness. The ``fixed`` baseline (self-consistency over the same ``max_samples`` samples, in
the same orders) is computed alongside. Because seeds are per ``(problem, index)``, the
index-order replay of a full run is exactly what a live adaptive run with the same seed does.

Only answers, correctness and (for token counts) ``num_tokens`` are read, so an imported JSONL
pool without text is enough; the ``deepconf`` rule also needs per-sample trace confidences.
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
from ttscale.select.adaptive import StopRule, StreamOutcome, parse_rule, run_stream
from ttscale.store.pool import Pool

__all__ = ["ProblemReplay", "ReplayReport", "replay", "replay_on_adaptive_run", "summary_line"]


@dataclass(frozen=True)
class ProblemReplay:
    """One problem, averaged over orders: samples used, accuracy, tokens (NaN unknown), how
    often the rule stopped early, and per order the samples used and answer chosen."""

    problem_id: str
    samples: float
    correct: float
    tokens: float
    stopped: float
    fixed_correct: float
    fixed_tokens: float
    used: tuple[int, ...]
    answers: tuple[Hashable | None, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class ReplayReport:
    """Replay of one rule over a pool (see :func:`replay`)."""

    rule: StopRule
    order: str
    orders: int
    seed: int
    max_samples: int
    tie: str
    problems: tuple[ProblemReplay, ...]
    confidence: float = 0.95
    n_boot: int = 1000

    def _ci(self, values: NDArray[np.float64]) -> dict[str, float | None]:
        if values.size == 0 or np.isnan(values).any():
            return {"mean": None, "low": None, "high": None}
        ci = bootstrap_ci(values, confidence=self.confidence, n_boot=self.n_boot, seed=self.seed)
        return {"mean": float(ci.mean), "low": float(ci.low), "high": float(ci.high)}

    def column(self, name: str) -> NDArray[np.float64]:
        return np.array([getattr(p, name) for p in self.problems], dtype=np.float64)

    @property
    def has_tokens(self) -> bool:
        return bool(self.problems) and not np.isnan(self.column("tokens")).any()

    def token_ratio(self) -> dict[str, float | None]:
        """Total rule tokens / total fixed tokens, with a bootstrap CI over problems."""
        if not self.has_tokens:
            return {"mean": None, "low": None, "high": None}
        return self._ratio(self.column("tokens"), self.column("fixed_tokens"))

    def sample_ratio(self) -> dict[str, float | None]:
        """Total rule samples / total fixed samples (the cap per problem), with a bootstrap CI
        over problems like :meth:`token_ratio`."""
        if not self.problems:
            return {"mean": None, "low": None, "high": None}
        # problems the run lists without samples used 0 of 0
        fixed = np.array([float(self.max_samples) if p.used else 0.0 for p in self.problems])
        return self._ratio(self.column("samples"), fixed)

    def _ratio(self, t: NDArray[np.float64], f: NDArray[np.float64]) -> dict[str, float | None]:
        if f.sum() <= 0:
            return {"mean": None, "low": None, "high": None}
        rng = np.random.default_rng(self.seed)
        idx = rng.integers(0, len(t), size=(self.n_boot, len(t)))
        ratios = t[idx].sum(axis=1) / np.maximum(f[idx].sum(axis=1), 1e-300)
        q = (1.0 - self.confidence) / 2.0
        return {
            "mean": float(t.sum() / f.sum()),
            "low": float(np.quantile(ratios, q)),
            "high": float(np.quantile(ratios, 1.0 - q)),
        }

    def to_dict(self, *, per_problem: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rule": self.rule.spec,
            "order": self.order,
            "orders": self.orders,
            "seed": self.seed,
            "max_samples": self.max_samples,
            "tie": self.tie,
            "problems": len(self.problems),
            "accuracy": self._ci(self.column("correct")),
            "samples": self._ci(self.column("samples")),
            "tokens": self._ci(self.column("tokens")) if self.has_tokens else None,
            "stopped_early": float(np.mean(self.column("stopped"))) if self.problems else None,
            "fixed": {
                "rule": "fixed",
                "accuracy": self._ci(self.column("fixed_correct")),
                "samples": {"mean": float(self.max_samples), "low": float(self.max_samples), "high": float(self.max_samples)},
                "tokens": self._ci(self.column("fixed_tokens")) if self.has_tokens else None,
            },
            # paired over problems: rule accuracy minus the fixed baseline's, same orders
            "accuracy_delta": self._ci(self.column("correct") - self.column("fixed_correct")),
            "token_ratio": self.token_ratio(),
            "sample_ratio": self.sample_ratio(),
        }
        if per_problem:
            out["per_problem"] = [
                {
                    "problem_id": p.problem_id,
                    "samples": p.samples,
                    "correct": p.correct,
                    "tokens": None if math.isnan(p.tokens) else p.tokens,
                    "used": list(p.used),
                    "answers": list(p.answers),
                    "reasons": list(p.reasons),
                }
                for p in self.problems
            ]
        return out


def _correct_of(
    outcome: StreamOutcome, answers: Sequence[Hashable | None], correct: NDArray[np.float64], tie: str
) -> float:
    """Correctness of the chosen answer (mean over tied answers for ``tie="expected"``)."""
    by_answer: dict[Hashable, float] = {}
    for a, c in zip(answers, correct, strict=True):
        if a is not None and a not in by_answer and not math.isnan(c):
            by_answer[a] = float(c)
    if tie == "expected" and not outcome.stopped and len(outcome.tied) > 1:
        return float(np.mean([by_answer.get(a, 0.0) for a in outcome.tied]))
    if outcome.answer is None:
        return 0.0
    return by_answer.get(outcome.answer, 0.0)


def replay(
    pool: Pool,
    rule: StopRule | str,
    *,
    orders: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    tie: str = "first",
    confidences: NDArray[np.float64] | Sequence[float] | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    require_correctness: bool = True,
) -> ReplayReport:
    """Replay ``rule`` on every problem of ``pool``.

    ``orders=None`` replays the samples in stored index order; ``orders=N`` averages over ``N``
    random permutations of each problem's samples (permutation ``j`` of problem ``p`` is drawn
    from ``seed``, ``p`` and ``j``, so a rule and its baseline see the same orders).
    ``max_samples``: the budget (default: the fewest samples any problem has); problems must
    hold at least that many. ``tie``: the final vote's tie rule at the budget (``first``,
    ``random`` or ``expected``). ``confidences``: per-sample trace confidences in pool order
    (for ``deepconf``). Problems the run lists without samples count as wrong with 0 samples.
    A pool without any correctness is refused (its accuracy would read 0 [0, 0]) unless
    ``require_correctness=False`` (only the decisions are wanted).
    """
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    if tie not in ("first", "random", "expected"):
        raise ConfigError(f"--tie must be first, random or expected, got {tie!r}")
    if orders is not None and orders < 1:
        raise ConfigError(f"--orders must be at least 1, got {orders}")
    if pool.num_problems == 0:
        raise ConfigError("the pool has no problems to replay")
    if pool.meta.get("run_kind") == "adaptive":
        raise ConfigError(
            "the pool comes from a run that was itself adaptive: its problems hold the samples "
            "its rule drew, not a common budget; use replay_on_adaptive_run (ttscale replay does)"
        )
    if pool.meta.get("run_kind") == "allocated":
        raise ConfigError(
            "the pool comes from an allocated run: each problem holds the samples a policy gave "
            "it from a dataset budget, not a common budget; replay on a fixed-n run"
        )
    if not pool.iid:
        raise ConfigError("replay needs iid draws; this pool is not (SMC, search or pruned traces)")
    counts = pool.n_per_problem
    budget = int(counts.min()) if max_samples is None else int(max_samples)
    if budget < 1:
        raise ConfigError("a problem of the pool has no samples; pass --max-samples or drop it")
    if budget > int(counts.min()):
        short = str(pool.problem_ids[int(np.argmin(counts))])
        raise ConfigError(
            f"--max-samples {budget} exceeds the samples of problem {short!r} ({int(counts.min())}); "
            "lower --max-samples"
        )
    if require_correctness and pool.num_samples and not pool.has_correctness():
        raise ConfigError(
            "the pool has no correctness (every sample's correct is null); verify it first "
            "(ttscale verify RUN) or fill the correct field of the imported samples"
        )
    # ESC uses whole windows only: the fixed baseline ends at the same cap, so a window that
    # does not divide the budget is never counted as savings
    budget = rule.usable(budget)
    conf_all: NDArray[np.float64] | None = None
    if rule.needs_confidences:
        if confidences is None:
            raise ConfigError("the deepconf rule needs trace confidences (a run sampled with --logprobs)")
        conf_all = np.asarray(confidences, dtype=np.float64)
        if conf_all.shape != pool.answer.shape:
            raise ConfigError("confidences must hold one value per pool sample")
        if conf_all.size and np.isnan(conf_all).all():
            raise ConfigError(
                "the deepconf rule needs top log-probs, and this run has none; sample with "
                "--logprobs K (K >= 1) or choose another rule"
            )
    fixed = parse_rule("fixed")
    has_tokens = bool((pool.num_tokens >= 0).all())
    values = pool.answer_values
    out: list[ProblemReplay] = []
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        # stored index order
        sort = np.argsort(pool.index[lo:hi], kind="stable")
        codes = pool.answer[lo:hi][sort]
        corr = pool.correct[lo:hi][sort]
        toks = pool.num_tokens[lo:hi][sort].astype(np.float64)
        conf = None if conf_all is None else conf_all[lo:hi][sort]
        n = hi - lo
        if orders is None:
            perms = [np.arange(n)]
        else:
            perms = [
                np.random.default_rng([seed, p, j]).permutation(n) for j in range(orders)
            ]
        used: list[int] = []
        answers_out: list[Hashable | None] = []
        reasons: list[str] = []
        cor: list[float] = []
        tok: list[float] = []
        stop: list[float] = []
        fcor: list[float] = []
        ftok: list[float] = []
        for j, perm in enumerate(perms):
            ans = [None if c < 0 else str(values[c]) for c in codes[perm]]
            cperm = corr[perm]
            cf = None if conf is None else [float(x) for x in conf[perm]]
            rng = np.random.default_rng([seed, p, j, 1]) if tie == "random" else None
            o = run_stream(rule, ans, cf, budget=budget, tie=tie, rng=rng)
            f = run_stream(fixed, ans, None, budget=budget, tie=tie, rng=rng)
            used.append(o.used)
            answers_out.append(o.answer)
            reasons.append(o.reason)
            cor.append(_correct_of(o, ans, cperm, tie))
            stop.append(float(o.stopped))
            fcor.append(_correct_of(f, ans, cperm, tie))
            tok.append(float(toks[perm][: o.used].sum()) if has_tokens else math.nan)
            ftok.append(float(toks[perm][:budget].sum()) if has_tokens else math.nan)
        out.append(
            ProblemReplay(
                problem_id=str(pool.problem_ids[p]),
                samples=float(np.mean(used)),
                correct=float(np.mean(cor)),
                tokens=float(np.mean(tok)),
                stopped=float(np.mean(stop)),
                fixed_correct=float(np.mean(fcor)),
                fixed_tokens=float(np.mean(ftok)),
                used=tuple(used),
                answers=tuple(answers_out),
                reasons=tuple(reasons),
            )
        )
    for pid in pool.unsampled:
        out.append(ProblemReplay(str(pid), 0.0, 0.0, 0.0 if has_tokens else math.nan, 0.0, 0.0,
                                 0.0 if has_tokens else math.nan, (), (), ()))
    return ReplayReport(
        rule=rule,
        order="index" if orders is None else "random",
        orders=1 if orders is None else orders,
        seed=seed,
        max_samples=budget,
        tie=tie,
        problems=tuple(out),
        confidence=confidence,
        n_boot=n_boot,
    )


def summary_line(report: ReplayReport) -> str:
    """One human line: accuracy and tokens of the rule against the fixed baseline."""
    d = report.to_dict()
    acc, facc = d["accuracy"]["mean"], d["fixed"]["accuracy"]["mean"]
    parts = [
        f"{d['rule']}: accuracy {acc:.4f} (fixed@{report.max_samples} {facc:.4f})",
        f"samples/problem {d['samples']['mean']:.2f}",
    ]
    if d["token_ratio"]["mean"] is not None:
        r = d["token_ratio"]
        parts.append(f"tokens {r['mean']:.3f}x of fixed [{r['low']:.3f}, {r['high']:.3f}]")
    return ", ".join(parts)


def replay_trace_rule(
    store: Any,
    rule: str,
    *,
    max_samples: int | None = None,
    verifier: str | None = None,
    seed: int = 0,
    engine: Any = None,
) -> dict[str, Any]:
    """Replay a level-2 (trace pruning) rule on a stored run, in stored index order, against
    self-consistency over the same traces. ``engine``: the scoring engine the self-evaluation
    rules (``selfeval``, ``selfeval-top``) ask at their checkpoints; their ``scored_tokens``
    (self-evaluation context, not generated tokens) is reported apart, as a live run records it.

    :func:`ttscale.samplers.pruning.replay_pruning` decides which traces the rule would have
    stopped and when (the first warm-up traces run in full); a pruned trace has no answer, so
    the rule's answer is the majority (first-seen tie) of the kept traces' answers, and the
    baseline's that of every trace. Accuracy and tokens per problem get 95% percentile-bootstrap
    CIs over problems (seeded). Returns a JSON-serialisable dict shaped like
    :meth:`ReplayReport.to_dict` (``accuracy``, ``tokens`` and ``fixed``), plus ``pruned`` and
    ``saved_fraction``.
    """
    from ttscale.samplers.pruning import replay_pruning
    from ttscale.select.adaptive import final_vote

    rep = replay_pruning(store, rule, max_samples=max_samples, engine=engine)
    pool = store.pool(verifier)
    rows = {str(pid): i for i, pid in enumerate(pool.problem_ids)}
    acc_rule, acc_fixed, tok_rule, tok_fixed = [], [], [], []
    for prob in rep.problems:
        p = rows[prob.problem_id]
        lo = int(pool.offsets[p])
        at = {int(i): lo + j for j, i in enumerate(pool.index[lo : int(pool.offsets[p + 1])])}

        def vote_correct(indices: list[int], at: dict[int, int] = at) -> float:
            # majority of the answered traces, first-seen tie; correct if a trace with it is
            rows_ = [at[i] for i in indices if i in at]
            codes = [int(pool.answer[r]) for r in rows_]
            chosen, _ = final_vote([c if c >= 0 else None for c in codes], tie="first")
            if chosen is None:
                return 0.0
            right = [pool.correct[r] for r, c in zip(rows_, codes, strict=True) if c == chosen]
            return float(np.nan_to_num(right[-1], nan=0.0) > 0.5)

        order = [t.index for t in prob.traces]
        kept = set(prob.kept_indices)
        acc_rule.append(vote_correct([i for i in order if i in kept]))
        acc_fixed.append(vote_correct(order))
        tok_rule.append(prob.tokens)
        tok_fixed.append(prob.full_tokens)

    def block(acc: list[float], tok: list[int]) -> dict[str, Any]:
        a = bootstrap_ci(np.asarray(acc, dtype=np.float64), seed=seed)
        t = bootstrap_ci(np.asarray(tok, dtype=np.float64), seed=seed)
        return {
            "accuracy": {"mean": float(a.mean), "low": float(a.low), "high": float(a.high)},
            "tokens": {"mean": float(t.mean), "low": float(t.low), "high": float(t.high)},
        }

    out = {"rule": rep.rule, "level": 2, "order": "index", "problems": len(rep.problems)}
    out.update(block(acc_rule, tok_rule))
    out["fixed"] = block(acc_fixed, tok_fixed)
    out["pruned"] = rep.pruned
    out["saved_fraction"] = rep.saved_fraction
    out["scored_tokens"] = rep.scored_tokens
    out["verdicts"] = pool.meta.get("verdicts")  # which verdict set gave correctness, and why
    return out


def replay_on_adaptive_run(
    pool: Pool,
    rule: StopRule | str,
    *,
    budget: int,
    tie: str = "first",
    confidences: NDArray[np.float64] | Sequence[float] | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Replay ``rule`` on a run that was itself adaptive (budget ``budget`` per problem).

    Such a run holds, per problem, only the samples its own rule drew, in index order (seeds are
    per ``(problem, index)``, so they are the first samples a fixed run would hold). A rule
    replays exactly on a problem where it stops within those samples, or where the run drew the
    whole budget; on the others it would need samples the run never drew, so the problem is
    reported as not replayable (``undecided``) rather than guessed. Random orders and the fixed
    baseline at the budget need the whole budget drawn everywhere, so they are not offered.
    Returns the JSON of ``ttscale replay`` on such a run: accuracy, samples and tokens per
    problem over the replayable problems, with bootstrap CIs.
    """
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    if tie not in ("first", "random", "expected"):
        raise ConfigError(f"--tie must be first, random or expected, got {tie!r}")
    rule.usable(budget)
    conf_all = None if confidences is None else np.asarray(confidences, dtype=np.float64)
    if rule.needs_confidences and (conf_all is None or (conf_all.size and np.isnan(conf_all).all())):
        raise ConfigError("the deepconf rule needs top log-probs, and this run has none; choose another rule")
    values = pool.answer_values
    has_tokens = bool((pool.num_tokens >= 0).all())
    cor: list[float] = []
    used: list[float] = []
    tok: list[float] = []
    undecided: list[str] = [str(x) for x in pool.unsampled]  # the run never reached them
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        sort = np.argsort(pool.index[lo:hi], kind="stable")
        ans = [None if c < 0 else str(values[c]) for c in pool.answer[lo:hi][sort]]
        corr = pool.correct[lo:hi][sort]
        toks = pool.num_tokens[lo:hi][sort].astype(np.float64)
        cf = None if conf_all is None else [float(x) for x in conf_all[lo:hi][sort]]
        rng = np.random.default_rng([seed, p, 0, 1]) if tie == "random" else None
        o = run_stream(rule, ans, cf, budget=budget, tie=tie, rng=rng)
        if not o.stopped and len(ans) < budget:
            undecided.append(str(pool.problem_ids[p]))
            continue
        cor.append(_correct_of(o, ans, corr, tie))
        used.append(float(o.used))
        tok.append(float(toks[: o.used].sum()) if has_tokens else math.nan)

    def ci(v: list[float]) -> dict[str, float | None]:
        a = np.asarray(v, dtype=np.float64)
        if a.size == 0 or np.isnan(a).any():
            return {"mean": None, "low": None, "high": None}
        c = bootstrap_ci(a, confidence=confidence, n_boot=n_boot, seed=seed)
        return {"mean": float(c.mean), "low": float(c.low), "high": float(c.high)}

    return {
        "rule": rule.spec,
        "order": "index",
        "max_samples": budget,
        "tie": tie,
        "problems": pool.num_problems + len(pool.unsampled),
        "replayed": len(cor),
        "undecided": {"count": len(undecided), "ids": undecided},
        "accuracy": ci(cor),
        "samples": ci(used),
        "tokens": ci(tok) if has_tokens else None,
        "not_replayable": [
            "problems where the rule needs samples the run did not draw (undecided)",
            "random orders (--orders): the stored samples are the prefix the run's own rule chose",
            f"the fixed baseline at {budget} samples: problems stopped early hold fewer",
        ],
    }
