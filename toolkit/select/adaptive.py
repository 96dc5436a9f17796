"""Level-1 adaptive rules: how many samples a problem gets, decided on the answers so far.

A :class:`StopRule` looks at the answers (and, for DeepConf, the trace confidences) of the first
``k`` samples of one problem and says whether to stop there, with which answer and why. The
same rule object drives the live :class:`~ttscale.samplers.adaptive.AdaptiveSampler` and the
offline replay (:mod:`ttscale.replay`), through :func:`run_stream`, so a live run and a replay
of the same answer stream stop at the same sample with the same answer.

Rules (``parse_rule`` specs; a bare number is the rule's main parameter)::

    fixed                      never stop: self-consistency at the budget
    esc:window=5               ESC (docs/algorithms.md 5.1): stop at the first unanimous window
    beta:0.95                  Adaptive-Consistency criteria (5.2) on the answers so far
    dirichlet:0.95[,top_k=5]
    entropy:0.75
    majority:0.8[,votes=K]     leader share >= t once K samples answered (see below)
    deepconf:0.95[,warmup=16]  DeepConf consensus (4.3): confidence-weighted share >= tau
    sprt:p1=0.8,alpha=0.05,beta=0.05[,h0=0]          Wald SPRT, leader vs runner-up (ours)
    msprt:alpha=0.05,a=1,b=1[,beta=0,truncate=0,h0=0] mixture SPRT (ours)
    consol-sprt                ConSol's SPRT exactly (a preset of sprt, see below)
    consol-msprt               ConSol's mSPRT exactly (a preset of msprt)

Every rule also takes ``min=K``: never stop before ``K`` samples.

SPRT and mSPRT follow ConSol (Lee et al. 2025, arXiv 2503.17587): "is the current leader the
mode?" becomes a Bernoulli test on the samples that gave one of the two most common answers
(``X = 1`` for the leader, ``0`` for the runner-up, ``p = P(X = 1)``), re-run on the current
top two after every sample. SPRT tests ``H0: p = 0.5`` against ``H1: p = p1`` with Wald's
``LLR = v1·log(2·p1) + v2·log(2·(1 − p1))`` (``v1``, ``v2`` the two top counts) and stops once
``LLR ≥ log((1 − β)/α)``. mSPRT replaces the simple alternative by a ``Beta(a, b)`` mixture over
``p`` -- with ``truncate=1`` restricted (and renormalised) to ``p > 0.5`` -- and compares the
mixture likelihood ratio ``Λ`` with the same Wald bound ``log((1 − β)/α)`` (``beta=0``, the
default, gives the always-valid ``1/α``). ``h0=1`` also stops when the statistic falls to
Wald's lower bound ``log(β/(1 − α))`` (``H0`` accepted: no clear mode), answering with the
leader, as ConSol's ``confidence_models.py`` does.

The defaults of ``sprt`` and ``msprt`` are ours (``p1 = 0.8``, ``α = β = 0.05``, uniform
prior, no lower stop); they are not ConSol's. ConSol's own tests, read from the authors'
code (github.com/LiuzLab/consol, ``consol/confidence_models.py``), are the presets
``consol-sprt`` = ``sprt:p1=0.5001,alpha=0.05,beta=0.949976,h0=1`` and ``consol-msprt`` =
``msprt:alpha=0.05,beta=0.94994,a=1000000,b=1000000,truncate=1,h0=1``. With ``p1`` and the
prior that close to 0.5 both reduce to "stop once the leader is 3 votes ahead of the runner-up"
for every count below 1,264 samples (SPRT) and 254 samples (mSPRT, whose lower bound is
crossed by 127–127 ties); tested by exact enumeration. ConSol draws
the smallest batch that could reach the bound (``_determine_trials``); since the lead can reach
3 only with the last sample of such a batch, checking after every sample stops at the same
count.

``majority:t`` stops when the leader holds at least a share ``t`` of the answered samples, but
only once ``votes`` samples have answered. The Adaptive-Consistency reference code
(``MajorityStoppingCriteria``) checks from 2 answers, so two agreeing samples stop it whatever
``t`` is; the default ``votes = ⌈1/(1 − t)⌉`` is the first count at which a single dissenting
answer keeps the share below ``t`` (``t = 0.8``: 5), so ``t`` decides. ``t = 1`` needs an
explicit ``votes``.

Samples without an answer (``None``) never vote (:func:`ttscale.select.answers.is_no_answer`).
At the budget every rule answers with the final vote over the samples it used: plurality
(``deepconf``: confidence-weighted) with ties to the first-seen answer, or a seeded random pick.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ttscale.errors import ConfigError
from ttscale.select.answers import is_no_answer
from ttscale.select.stopping import (
    CRITERION_DEFAULTS,
    answer_counts,
    beta_stop_probability,
    dirichlet_top_probability_exact,
    normalized_answer_entropy,
    window_unanimous,
)

__all__ = [
    "PRESETS",
    "RULE_NAMES",
    "StopRule",
    "StreamOutcome",
    "final_vote",
    "parse_rule",
    "run_stream",
]

#: rule name -> (main parameter name or None, {parameter: default})
_RULES: dict[str, tuple[str | None, dict[str, float]]] = {
    "fixed": (None, {}),
    "esc": ("window", {"window": 5}),
    "beta": ("threshold", {"threshold": CRITERION_DEFAULTS["beta"]}),
    "dirichlet": ("threshold", {"threshold": CRITERION_DEFAULTS["dirichlet"], "top_k": 5}),
    "entropy": ("threshold", {"threshold": CRITERION_DEFAULTS["entropy"]}),
    "majority": ("threshold", {"threshold": CRITERION_DEFAULTS["majority"], "votes": 0}),
    "deepconf": ("tau", {"tau": 0.95, "warmup": 16}),
    "sprt": ("p1", {"p1": 0.8, "alpha": 0.05, "beta": 0.05, "h0": 0}),
    "msprt": ("alpha", {"alpha": 0.05, "a": 1.0, "b": 1.0, "beta": 0.0, "truncate": 0, "h0": 0}),
}
#: named presets: name -> (rule, parameters); ConSol's tests as the authors' code sets them
PRESETS: dict[str, tuple[str, dict[str, float]]] = {
    "consol-sprt": ("sprt", {"p1": 0.5001, "alpha": 0.05, "beta": 0.949976, "h0": 1}),
    "consol-msprt": (
        "msprt",
        {"alpha": 0.05, "a": 1e6, "b": 1e6, "beta": 0.94994, "truncate": 1, "h0": 1},
    ),
}
RULE_NAMES: tuple[str, ...] = (*_RULES, *PRESETS)
_INT_PARAMS = frozenset({"window", "top_k", "warmup", "min", "votes"})
_FLAG_PARAMS = frozenset({"h0", "truncate"})
_OFF_WHEN_ZERO = frozenset({"votes", "h0", "truncate", "beta"})


@dataclass(frozen=True)
class Decision:
    """A rule's verdict on a prefix: ``stop``, the answer it would give, ``score`` and ``reason``."""

    stop: bool
    answer: Hashable | None
    score: float
    reason: str


@dataclass(frozen=True)
class StopRule:
    """A parsed rule (see the module docstring); ``params`` hold every parameter, defaults filled."""

    name: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """Canonical spec string (``esc:window=5``); parses back to the same rule."""
        # parameters added later are left out at their off value, so older specs read the same
        shown = {k: v for k, v in self.params.items() if not (k in _OFF_WHEN_ZERO and v == 0)}
        if not shown:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in shown.items())

    @property
    def needs_confidences(self) -> bool:
        return self.name == "deepconf"

    @property
    def step(self) -> int:
        """Samples between two checks (ESC checks whole windows; other rules every sample)."""
        return int(self.params["window"]) if self.name == "esc" else 1

    def usable(self, budget: int) -> int:
        """Samples this rule can use of a ``budget`` (ESC: whole windows only)."""
        if self.name == "esc":
            w = int(self.params["window"])
            if budget < w:
                raise ConfigError(f"esc:window={w} needs a budget of at least {w} samples, got {budget}")
            return budget // w * w
        return budget

    def check(
        self, answers: Sequence[Hashable | None], confidences: Sequence[float] | None = None
    ) -> Decision:
        """Whether to stop after the samples ``answers`` (all of the prefix so far)."""
        k = len(answers)
        if k == 0 or k < int(self.params.get("min", 0)):
            return Decision(False, None, math.nan, "")
        name, p = self.name, self.params
        if name == "fixed":
            return Decision(False, None, math.nan, "")
        if name == "esc":
            w = int(p["window"])
            if k % w:
                return Decision(False, None, math.nan, "")
            window = answers[k - w :]
            if window_unanimous(window):
                return Decision(True, window[0], 0.0, f"window {k // w} of {w} unanimous")
            return Decision(False, None, math.nan, "")
        if name == "deepconf":
            if confidences is None or len(confidences) != k:
                raise ConfigError("the deepconf rule needs one trace confidence per sample (top log-probs)")
            if k < int(p["warmup"]):
                return Decision(False, None, math.nan, "")
            weights = _weights(answers, confidences)
            total = sum(weights.values())
            if total <= 0:
                return Decision(False, None, math.nan, "")
            leader = max(weights, key=lambda a: weights[a])  # first-seen among equal weights
            share = weights[leader] / total
            return Decision(share >= p["tau"], leader, share, f"confidence share {share:.4f} >= {_fmt(p['tau'])}")
        pairs = answer_counts(answers)
        if not pairs:
            return Decision(False, None, math.nan, "")
        leader = pairs[0][0]
        v1 = pairs[0][1]
        v2 = pairs[1][1] if len(pairs) > 1 else 0
        n = sum(c for _, c in pairs)
        if name == "beta" or (name == "dirichlet" and len(pairs) < 3):
            prob = beta_stop_probability(v1, v2)
            return _threshold(prob >= p["threshold"], leader, prob, f"P(leader is mode) {prob:.4f} >= {_fmt(p['threshold'])} (beta)")
        if name == "dirichlet":
            top = tuple(c for _, c in pairs[: int(p["top_k"])])
            prob = _dirichlet(top)
            return _threshold(prob >= p["threshold"], leader, prob, f"P(leader is mode) {prob:.4f} >= {_fmt(p['threshold'])} (dirichlet)")
        if name == "entropy":
            if n < 2:
                return Decision(False, leader, math.nan, "")
            h = normalized_answer_entropy([c for _, c in pairs])
            return _threshold(h <= p["threshold"], leader, h, f"normalised entropy {h:.4f} <= {_fmt(p['threshold'])}")
        if name == "majority":
            if n < max(2, majority_votes(p["threshold"], int(p["votes"]))):
                return Decision(False, leader, math.nan, "")
            share = v1 / n
            return _threshold(share >= p["threshold"], leader, share, f"leader share {share:.4f} >= {_fmt(p['threshold'])}")
        if name == "sprt":
            llr = sprt_llr(v1, v2, p["p1"])
            return _wald(llr, p, leader, "SPRT LLR")
        # msprt
        lam = msprt_log_ratio(v1, v2, p["a"], p["b"], truncate=bool(p["truncate"]))
        return _wald(lam, p, leader, "mSPRT log-ratio")


def _threshold(stop: bool, answer: Hashable, score: float, reason: str) -> Decision:
    return Decision(stop, answer, score, reason if stop else "")


def wald_bounds(alpha: float, beta: float) -> tuple[float, float]:
    """Wald's log bounds ``(log(β/(1 − α)), log((1 − β)/α))``: ``H0`` below, ``H1`` above."""
    return math.log(beta / (1.0 - alpha)) if beta > 0 else -math.inf, math.log((1.0 - beta) / alpha)


def _wald(stat: float, p: dict[str, float], leader: Hashable, what: str) -> Decision:
    lower, upper = wald_bounds(p["alpha"], p["beta"])
    if stat >= upper:
        return Decision(True, leader, stat, f"{what} {stat:.6g} >= {upper:.6g} (H1: leader is the mode)")
    if p["h0"] and stat <= lower:
        return Decision(True, leader, stat, f"{what} {stat:.6g} <= {lower:.6g} (H0 accepted: no clear mode)")
    return Decision(False, leader, stat, "")


def majority_votes(threshold: float, votes: int = 0) -> int:
    """Answered samples ``majority:threshold`` waits for: ``votes`` if set, else
    ``⌈1/(1 − t)⌉`` (the first count where one dissenting answer keeps the share below ``t``)."""
    if votes > 0:
        return votes
    if threshold >= 1.0:
        raise ConfigError("majority:1 (unanimity) needs votes=K: how many answers must agree")
    # 1e-9: 1/(1 - 0.8) is 4.999..98 in floating point
    return max(2, math.ceil(1.0 / (1.0 - threshold) - 1e-9))


def sprt_llr(v1: int, v2: int, p1: float) -> float:
    """Wald's log-likelihood ratio of ``p = p1`` against ``p = 0.5`` for ``v1`` leader, ``v2``
    runner-up samples: ``v1·log(2·p1) + v2·log(2·(1 − p1))``."""
    return v1 * math.log(2.0 * p1) + v2 * math.log(2.0 * (1.0 - p1))


def msprt_log_ratio(v1: int, v2: int, a: float = 1.0, b: float = 1.0, *, truncate: bool = False) -> float:
    """``log Λ`` of the Beta(a, b)-mixture SPRT against ``p = 0.5``:
    ``log B(v1 + a, v2 + b) − log B(a, b) + (v1 + v2)·log 2``; with ``truncate`` the prior is
    restricted to ``p > 0.5`` and renormalised, which adds
    ``log P(p > 0.5 | Beta(v1 + a, v2 + b)) − log P(p > 0.5 | Beta(a, b))``."""
    from scipy.special import betainc, betaln

    out = float(betaln(v1 + a, v2 + b) - betaln(a, b) + (v1 + v2) * math.log(2.0))
    if truncate:
        # P(p > 0.5) under Beta(x, y) is I_0.5(y, x) (no 1 − I cancellation)
        out += math.log(float(betainc(v2 + b, v1 + a, 0.5))) - math.log(float(betainc(b, a, 0.5)))
    return out


def _dirichlet_cannot_stop(rule: StopRule, answers: Sequence[Hashable | None]) -> bool:
    """A cheap proof that ``dirichlet`` does not stop here: under ``Dir(counts + 1)`` the share
    ``p0/(p0 + p1)`` of the leader against the runner-up is ``Beta(v1 + 1, v2 + 1)``, so
    ``P(leader is the mode) ≤ P(p0 > p1)``, the ``beta`` rule's probability. Below the threshold
    the exact (slower) probability is not needed; the stopping point is the same."""
    if len(answers) < int(rule.params.get("min", 0)):
        return True
    pairs = answer_counts(answers)
    if len(pairs) < 3:
        return False  # the rule is beta itself there
    return beta_stop_probability(pairs[0][1], pairs[1][1]) < rule.params["threshold"]


@lru_cache(maxsize=65536)
def _dirichlet(counts: tuple[int, ...]) -> float:
    # closed form (exact for integer counts): the quadrature made replay 15-20x slower
    return dirichlet_top_probability_exact(counts)


def _weights(answers: Sequence[Hashable | None], confidences: Sequence[float]) -> dict[Hashable, float]:
    """Confidence-weighted votes, in first-seen order (NaN confidences weigh 0)."""
    out: dict[Hashable, float] = {}
    for a, c in zip(answers, confidences, strict=True):
        if is_no_answer(a):
            continue
        w = float(c)
        out[a] = out.get(a, 0.0) + (w if math.isfinite(w) and w > 0 else 0.0)
    return out


def final_vote(
    answers: Sequence[Hashable | None],
    confidences: Sequence[float] | None = None,
    *,
    tie: str = "first",
    rng: np.random.Generator | None = None,
) -> tuple[Hashable | None, list[Hashable]]:
    """The vote over ``answers`` (confidence-weighted when ``confidences`` is given).

    Returns ``(answer, tied)``: ``tied`` lists every answer sharing the top vote, first-seen
    first; ``answer`` is the first of them (``tie="first"``) or a pick with ``rng``
    (``tie="random"``; ``"expected"`` also returns the first, the caller averages over ``tied``).
    """
    if tie not in ("first", "random", "expected"):
        raise ConfigError(f"tie must be first, random or expected, got {tie!r}")
    if confidences is not None:
        votes = _weights(answers, confidences)
    else:
        votes = {}
        for a in answers:
            if not is_no_answer(a):
                votes[a] = votes.get(a, 0.0) + 1.0
    if not votes:
        return None, []
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    if tie == "random" and len(tied) > 1:
        if rng is None:
            raise ConfigError("tie='random' needs a seeded generator")
        return tied[int(rng.integers(len(tied)))], tied
    return tied[0], tied


@dataclass(frozen=True)
class StreamOutcome:
    """What a rule did on one answer stream: ``used`` samples, the ``answer``, whether it
    ``stopped`` early, ``reason`` (``"budget"`` when it ran out) and the answers tied at the
    budget (for ``tie="expected"``)."""

    used: int
    answer: Hashable | None
    stopped: bool
    reason: str
    tied: tuple[Hashable, ...] = ()


def first_stop(
    rule: StopRule,
    answers: Sequence[Hashable | None],
    confidences: Sequence[float] | None,
    start: int,
    end: int,
) -> tuple[int, Decision] | None:
    """The first prefix length ``k`` in ``start+1..end`` at which ``rule`` stops, or ``None``."""
    for k in range(start + 1, end + 1):
        if rule.name == "dirichlet" and _dirichlet_cannot_stop(rule, answers[:k]):
            continue
        d = rule.check(answers[:k], None if confidences is None else confidences[:k])
        if d.stop:
            return k, d
    return None


def run_stream(
    rule: StopRule,
    answers: Sequence[Hashable | None],
    confidences: Sequence[float] | None = None,
    *,
    budget: int | None = None,
    tie: str = "first",
    rng: np.random.Generator | None = None,
) -> StreamOutcome:
    """Run ``rule`` over an answer stream in order, up to ``budget`` samples (default all)."""
    limit = rule.usable(len(answers) if budget is None else min(budget, len(answers)))
    hit = first_stop(rule, answers, confidences, 0, limit)
    if hit is not None:
        k, d = hit
        return StreamOutcome(k, d.answer, True, d.reason)
    conf = None if confidences is None or rule.name != "deepconf" else confidences[:limit]
    ans, tied = final_vote(answers[:limit], conf, tie=tie, rng=rng)
    return StreamOutcome(limit, ans, False, "budget", tuple(tied))


def parse_rule(spec: str) -> StopRule:
    """Parse ``name[:value][,key=value...]`` (e.g. ``esc:window=5``, ``beta:0.95``, ``fixed``)."""
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    preset: dict[str, float] = {}
    if name in PRESETS:
        name, preset = PRESETS[name]
    if name not in _RULES:
        raise ConfigError(f"unknown adaptive rule {name!r} in {spec!r}; choose one of {', '.join(RULE_NAMES)}")
    main, defaults = _RULES[name]
    params: dict[str, float] = {**defaults, **preset}
    for part in (x.strip() for x in rest.split(",")) if rest.strip() else ():
        if not part:
            raise ConfigError(f"empty parameter in rule {spec!r}")
        key, eq, value = part.partition("=")
        if not eq:
            if main is None:
                raise ConfigError(f"rule {name!r} takes no value, got {spec!r}")
            key, value = main, part
        key = key.strip()
        if key not in defaults and key != "min":
            allowed = ", ".join([*defaults, "min"])
            raise ConfigError(f"rule {name!r} has no parameter {key!r} (it takes {allowed})")
        try:
            num = float(value)
        except ValueError:
            raise ConfigError(f"parameter {key} of rule {name!r} must be a number, got {value.strip()!r}") from None
        if key in _INT_PARAMS and (num != int(num) or num < (0 if key in ("min", "votes") else 1)):
            raise ConfigError(f"parameter {key} of rule {name!r} must be a positive integer, got {value.strip()!r}")
        if key in _FLAG_PARAMS and num not in (0.0, 1.0):
            raise ConfigError(f"parameter {key} of rule {name!r} is 0 or 1, got {value.strip()!r}")
        params[key] = float(int(num)) if key in _INT_PARAMS | _FLAG_PARAMS else num
    _check_params(name, params, spec)
    return StopRule(name, params)


def _check_params(name: str, p: dict[str, float], spec: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"rule {spec!r}: {msg}")

    if name in ("beta", "dirichlet", "majority") and not 0.0 < p["threshold"] <= 1.0:
        raise bad("the threshold must be in (0, 1]")
    if name == "majority" and p["threshold"] >= 1.0 and not p["votes"]:
        raise bad("majority:1 (unanimity) needs votes=K: how many answers must agree")
    if name == "entropy" and not 0.0 <= p["threshold"] < 1.0:
        raise bad("the entropy threshold must be in [0, 1)")
    if name == "deepconf" and not 0.0 < p["tau"] <= 1.0:
        raise bad("tau must be in (0, 1]")
    if name == "dirichlet" and p["top_k"] < 2:
        raise bad("top_k must be at least 2")
    if name == "sprt":
        if not 0.5 < p["p1"] < 1.0:
            raise bad("p1 must be in (0.5, 1)")
        if not (0.0 < p["alpha"] < 1.0 and 0.0 < p["beta"] < 1.0):
            raise bad("alpha and beta must be in (0, 1)")
        if p["alpha"] + p["beta"] >= 1.0:
            raise bad("alpha + beta must be below 1 (Wald's bounds cross otherwise)")
    if name == "msprt":
        if not 0.0 < p["alpha"] < 1.0 or not 0.0 <= p["beta"] < 1.0:
            raise bad("alpha must be in (0, 1) and beta in [0, 1)")
        if p["alpha"] + p["beta"] >= 1.0:
            raise bad("alpha + beta must be below 1 (Wald's bounds cross otherwise)")
        if p["a"] <= 0 or p["b"] <= 0:
            raise bad("the Beta prior's a and b must be positive")


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
