"""Early-stopping rules for repeated sampling with voting (docs/algorithms.md 5).

* ESC (Li et al. 2024): draw samples in windows of ``w``; stop at the first window whose answers
  are all identical and return that answer; otherwise majority-vote at the budget ``L``. Plus the
  expected-cost model of the reference ``control_scheme.py``.
* Adaptive-Consistency (Aggarwal et al. 2023): after each new sample, a stopping criterion on the
  answer counts so far (``beta``, ``dirichlet``, ``entropy``, ``majority``, ``random``).

Pure functions over answer lists; answers are any hashable values. Plurality ties go to the answer
seen first (``Counter.most_common`` order), as in both references. Samples without an answer
(``None``, blank strings: :func:`ttscale.select.answers.is_no_answer`) do not vote; ESC's
reference behaviour, where they do, is ``esc_run(..., no_answer="vote")``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike, as_generator
from ttscale.select.answers import NO_ANSWER_POLICIES, NoAnswerPolicy, answered, is_no_answer
from ttscale.validation import check_choice, check_int, choices

__all__ = [
    "CRITERION_DEFAULTS",
    "ESCResult",
    "StopDecision",
    "answer_counts",
    "beta_stop_probability",
    "dirichlet_top_probability",
    "dirichlet_top_probability_exact",
    "esc_affected_probability",
    "esc_expected_cost",
    "esc_run",
    "esc_window_probability",
    "normalized_answer_entropy",
    "should_stop",
    "window_unanimous",
]

Criterion = Literal["beta", "dirichlet", "entropy", "majority", "random"]

#: Default thresholds of the Adaptive-Consistency criteria (reference constructor defaults).
CRITERION_DEFAULTS: dict[str, float] = {
    "beta": 0.95,
    "dirichlet": 0.95,
    "entropy": 0.75,
    "majority": 0.8,
    "random": 0.1,
}


def _check_int(name: str, value: int, lo: int) -> int:
    return int(check_int(name, value, min=lo))


# ---------------------------------------------------------------------------------------------
# ESC


def _check_no_answer(no_answer: str) -> None:
    check_choice("no_answer", no_answer, NO_ANSWER_POLICIES)


def window_unanimous(window: Sequence[Hashable | None], *, no_answer: NoAnswerPolicy = "skip") -> bool:
    """True iff the window is non-empty and all its answers are identical (answer entropy 0).

    With ``no_answer="skip"`` (default) a window holding a sample without an answer is never
    unanimous; with ``"vote"`` a missing answer is a value like any other.
    """
    _check_no_answer(no_answer)
    if no_answer == "skip" and any(is_no_answer(a) for a in window):
        return False
    return len(window) > 0 and all(a == window[0] for a in window[1:])


@dataclass(frozen=True)
class ESCResult:
    """Outcome of ESC on one answer stream: the answer, samples consumed, and whether a window
    was unanimous before the budget ran out."""

    answer: Hashable | None
    cost: int
    stopped_early: bool


def esc_run(
    answers: Sequence[Hashable | None],
    window: int = 5,
    max_samples: int = 40,
    *,
    no_answer: NoAnswerPolicy = "skip",
) -> ESCResult:
    """Run ESC over a stream of answers (in sampling order).

    Windows ``b = 0..⌊L/w⌋−1`` of ``w`` answers are consumed, ``L = min(max_samples, len(answers))``;
    at the first unanimous window return its answer with cost ``(b+1)·w``. Otherwise return the
    plurality answer over all consumed answers (first-seen wins ties) with cost ``⌊L/w⌋·w``.

    ``no_answer="skip"`` (default, the rule of every aggregator): a sample without an answer costs
    its place in the window but does not vote, so a window holding one is not unanimous, and the
    answer is ``None`` when no consumed sample has one. ``no_answer="vote"``: the reference's
    behaviour, where a missing answer (``None``, its sentinel) is a value that votes and can fill
    a unanimous window.
    """
    _check_no_answer(no_answer)
    w = _check_int("window", window, 1)
    lim = min(_check_int("max_samples", max_samples, 1), len(answers))
    n_windows = lim // w
    if n_windows == 0:
        raise ConfigError(f"ESC needs at least one full window of {w} answers, got {len(answers)}")
    for b in range(n_windows):
        chunk = answers[b * w : (b + 1) * w]
        if window_unanimous(chunk, no_answer=no_answer):
            return ESCResult(chunk[0], (b + 1) * w, True)
    consumed = answers[: n_windows * w]
    votes = list(consumed) if no_answer == "vote" else answered(consumed)
    top = Counter(votes).most_common(1)[0][0] if votes else None
    return ESCResult(top, n_windows * w, False)


def _distribution(p: ArrayLike) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64).ravel()
    if arr.size == 0 or np.any(~np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ConfigError("p must be a non-empty answer distribution with entries in [0, 1]")
    return arr


def esc_window_probability(p: ArrayLike, window: int = 5) -> float:
    """``q = Σ_a p_a^w``: probability that a window of ``w`` iid answers is unanimous."""
    arr = _distribution(p)
    return float(np.sum(arr ** _check_int("window", window, 1)))


def esc_expected_cost(p: ArrayLike, window: int = 5, max_samples: int = 40) -> float:
    """Expected samples drawn by ESC for answer distribution ``p``.

    ``E[N] = w·(Σ_{i=0}^{M−2} (i+1)·q·(1−q)^i + M·(1−q)^{M−1})``, ``M = ⌊L/w⌋``, ``q`` from
    :func:`esc_window_probability` (reference ``control_scheme.cal_n``).
    """
    w = _check_int("window", window, 1)
    m = _check_int("max_samples", max_samples, 1) // w
    if m == 0:
        raise ConfigError(f"max_samples must be at least one window ({w}), got {max_samples}")
    q = esc_window_probability(p, w)
    i = np.arange(m - 1, dtype=np.float64)
    return float(w * (np.sum((i + 1.0) * q * (1.0 - q) ** i) + m * (1.0 - q) ** (m - 1)))


def esc_affected_probability(
    p: ArrayLike,
    window: int = 5,
    *,
    estimator: Literal["normal", "exact"] = "normal",
) -> float:
    """Probability that a unanimous window shows an answer other than ``p[0]`` (ESC's risk estimate).

    ``Σ_{a ≥ 1} P(Bin(w, p_a) ≥ w)``: ``estimator="exact"`` gives ``Σ p_a^w``; ``"normal"`` is the
    reference's normal approximation ``Σ (1 − Φ((w − w·p_a)/sqrt(w·p_a·(1 − p_a))))`` (entries with
    ``p_a ∈ {0, 1}`` use the exact value). ``p[0]`` should be the answer the full budget would pick.
    Average over questions for the reference's "proportion of performance affected".
    """
    arr = _distribution(p)[1:]
    w = _check_int("window", window, 1)
    if estimator == "exact":
        return float(np.sum(arr**w))
    check_choice("estimator", estimator, ("normal", "exact"))
    nd = NormalDist()
    total = 0.0
    for pa in arr:
        if pa <= 0.0 or pa >= 1.0:
            total += float(pa**w)
        else:
            total += 1.0 - nd.cdf((w - w * pa) / math.sqrt(w * pa * (1.0 - pa)))
    return total


# ---------------------------------------------------------------------------------------------
# Adaptive-Consistency


def answer_counts(answers: Iterable[Hashable | None]) -> list[tuple[Hashable, int]]:
    """``(answer, count)`` pairs, most common first, ties in first-seen order.

    ``None`` and blank strings are dropped (unparsed answers do not vote).
    """
    return Counter(answered(answers)).most_common()


def beta_stop_probability(v1: int, v2: int) -> float:
    """``P(p1 > p2 | v1, v2) = 1 − I_{0.5}(v1 + 1, v2 + 1)`` under ``p1 ~ Beta(v1+1, v2+1)``.

    ``v1``/``v2``: counts of the two most common answers (``v2 = 0`` if only one). Uses the
    regularised incomplete beta, stable for large counts.
    """
    from scipy.special import betainc

    check_int("v1", v1, min=0)
    check_int("v2", v2, min=0)
    # 1 − I_x(a, b) = I_{1−x}(b, a): avoids cancellation when the probability is close to 1
    return float(betainc(v2 + 1.0, v1 + 1.0, 0.5))


def dirichlet_top_probability(
    counts: ArrayLike,
    *,
    estimator: Literal["quad", "mc"] = "quad",
    n_draws: int = 200_000,
    seed: SeedLike = None,
) -> float:
    """``P(p_0 > p_j ∀ j ≥ 1)`` under ``p ~ Dir(counts + 1)``; ``counts[0]`` is the leading answer.

    ``estimator="quad"`` (deterministic): with ``p = G/ΣG``, ``G_i ~ Gamma(counts_i + 1)``
    independent, the probability is ``∫_0^∞ f_0(x) Π_{j≥1} F_j(x) dx`` (Gamma pdf ``f``, cdf ``F``),
    one 1-d integral for any number of categories (absolute error ~1e-8). ``estimator="mc"``:
    share of ``n_draws`` seeded Dirichlet draws whose first coordinate is the largest (standard error
    ``≤ 0.5/sqrt(n_draws)``).
    """
    check_choice("estimator", estimator, ("quad", "mc"))
    v = np.asarray(counts, dtype=np.float64).ravel()
    if v.size < 2 or np.any(v < 0) or np.any(~np.isfinite(v)):
        raise ConfigError("dirichlet_top_probability needs >= 2 non-negative counts")
    alpha = v + 1.0
    if estimator == "quad":
        from scipy.integrate import quad
        from scipy.stats import gamma

        def integrand(x: float) -> float:
            return float(gamma.pdf(x, alpha[0]) * np.prod(gamma.cdf(x, alpha[1:])))

        # The mass of Gamma(alpha_0) lies well inside [0, hi]; splitting at the mode helps quad.
        hi = float(gamma.ppf(1.0 - 1e-14, alpha[0]))
        mode = max(alpha[0] - 1.0, 0.0)
        val = quad(integrand, 0.0, mode, limit=200)[0] if mode > 0 else 0.0
        val += quad(integrand, mode, hi, limit=200)[0]
        return float(min(max(val, 0.0), 1.0))
    # estimator == "mc"
    draws = _check_int("n_draws", n_draws, 1)
    rng = as_generator(seed)
    hits = 0
    chunk = 100_000
    done = 0
    while done < draws:
        m = min(chunk, draws - done)
        x = rng.dirichlet(alpha, size=m)
        hits += int(np.sum(np.argmax(x, axis=1) == 0))
        done += m
    return hits / draws


def dirichlet_top_probability_exact(counts: Sequence[int]) -> float:
    """:func:`dirichlet_top_probability` in closed form for integer counts (``estimator="quad"``
    to ~1e-12, about a hundred times faster; the replay of the ``dirichlet`` rule uses it).

    With ``G_i ~ Gamma(c_i + 1)`` the probability is ``P(G_j < G_0 ∀ j ≥ 1)``. For an integer
    shape ``α``, ``P(G > x) = e^{-x} Σ_{m<α} x^m/m!``, so expanding ``Π_j (1 − P(G_j > x))``
    over the subsets ``S`` of the other answers gives
    ``Σ_S (−1)^{|S|} E[Π_{j∈S} P(G_j > G_0)]`` and each term integrates exactly:
    ``Σ_M r_M/M! · Γ(α_0 + M) / (Γ(α_0)·(1 + |S|)^{α_0 + M})`` with ``r_M`` the multinomial
    sums of the polynomial ``Π_{j∈S} Σ_{m<α_j} x^m/m!`` scaled by ``M!``. Each term lies in
    [0, 1] and there are at most ``2^(k−1)`` of them, so the cancellation error stays ~1e-15.
    Counts above 400 fall back to quadrature (the scaled coefficients would overflow).
    """
    from itertools import combinations

    from scipy.special import gammaln

    v = [int(c) for c in counts]
    if len(v) < 2 or any(c < 0 for c in v):
        raise ConfigError("dirichlet_top_probability_exact needs >= 2 non-negative integer counts")
    if sum(v) > 400:
        return dirichlet_top_probability(v)
    a0 = v[0] + 1
    others = [c + 1 for c in v[1:]]
    total = 0.0
    for size in range(len(others) + 1):
        for subset in combinations(others, size):
            # r_M = M! · [x^M] Π_{j∈S} Σ_{m<α_j} x^m/m!, built by binomial convolution
            r = np.ones(1)
            for alpha in subset:
                deg = len(r) - 1 + alpha - 1
                new = np.zeros(deg + 1)
                m_idx = np.arange(alpha)
                for i, ri in enumerate(r):
                    M = i + m_idx
                    # C(M, m) = M!/(i! m!): r_i/i! · 1/m! rescaled by M!
                    new[M] += ri * np.exp(gammaln(M + 1) - gammaln(i + 1) - gammaln(m_idx + 1))
                r = new
            M = np.arange(len(r))
            with np.errstate(divide="ignore"):
                logs = (np.log(r) + gammaln(a0 + M) - gammaln(M + 1) - gammaln(a0)
                        - (a0 + M) * math.log(1.0 + size))
            term = float(np.exp(logs).sum())
            total += -term if size % 2 else term
    return float(min(max(total, 0.0), 1.0))


def normalized_answer_entropy(counts: Sequence[int]) -> float:
    """``H_2(counts) / log2(#entries)``, with a single count padded by a ``1`` (reference quirk).

    So ``[3]`` becomes ``[3, 1]`` → 0.811278 and ``[4]`` → ``[4, 1]`` → 0.721928.
    """
    c = np.asarray(list(counts), dtype=np.float64)
    if c.size == 0 or np.any(c <= 0):
        raise ConfigError("normalized_answer_entropy needs >= 1 positive count")
    if c.size < 2:
        c = np.append(c, 1.0)
    p = c / c.sum()
    return float(-np.sum(p * np.log2(p)) / math.log2(c.size))


@dataclass(frozen=True)
class StopDecision:
    """Result of a stopping criterion on the answers so far.

    ``score``: the criterion's statistic (``beta``/``dirichlet``: probability the leader is the
    true mode; ``entropy``: normalised entropy, stop when small; ``majority``: leader's share;
    ``random``: the uniform drawn), NaN when undefined (no valid answer, or one answer for
    entropy/majority). ``answer``: current plurality answer (first-seen on ties). ``n``: valid
    answers counted.
    """

    stop: bool
    score: float
    answer: Hashable | None
    n: int
    criterion: str


def should_stop(
    answers: Iterable[Hashable | None],
    criterion: Criterion = "beta",
    threshold: float | None = None,
    *,
    top_k: int = 5,
    estimator: Literal["quad", "mc"] = "quad",
    n_draws: int = 200_000,
    seed: SeedLike = None,
) -> StopDecision:
    """Adaptive-Consistency stopping rule over all answers so far.

    * ``beta`` (0.95): stop iff ``P(p1 > p2) ≥ t`` for the top two counts.
    * ``dirichlet`` (0.95): keep the ``top_k`` most common answers; stop iff
      ``P(leader is the mode) ≥ t`` under ``Dir(counts + 1)``; falls back to ``beta`` with fewer
      than 3 distinct answers.
    * ``entropy`` (0.75): stop iff normalised entropy ``≤ t`` and more than one answer.
    * ``majority`` (0.8): stop iff leader's share ``≥ t`` and more than one answer.
    * ``random`` (0.1): stop with probability ``t`` (baseline; uses ``seed``).

    ``None`` and blank answers are ignored; with no valid answer the rule never stops.
    ``estimator`` is :func:`dirichlet_top_probability`'s.
    """
    check_choice("criterion", criterion, choices(Criterion))
    t = CRITERION_DEFAULTS[criterion] if threshold is None else float(threshold)
    pairs = answer_counts(answers)
    n = sum(c for _, c in pairs)
    if not pairs:
        return StopDecision(False, math.nan, None, 0, criterion)
    leader = pairs[0][0]
    if criterion == "dirichlet" and len(pairs) < 3:
        criterion = "beta"
    if criterion == "beta":
        v2 = pairs[1][1] if len(pairs) > 1 else 0
        prob = beta_stop_probability(pairs[0][1], v2)
        return StopDecision(prob >= t, prob, leader, n, "beta")
    if criterion == "dirichlet":
        k = _check_int("top_k", top_k, 2)
        top = [c for _, c in pairs[:k]]
        prob = dirichlet_top_probability(top, estimator=estimator, n_draws=n_draws, seed=seed)
        return StopDecision(prob >= t, prob, leader, n, "dirichlet")
    if criterion == "random":
        u = float(as_generator(seed).random())
        return StopDecision(u < t, u, leader, n, "random")
    if n < 2:
        return StopDecision(False, math.nan, leader, n, criterion)
    if criterion == "entropy":
        h = normalized_answer_entropy([c for _, c in pairs])
        return StopDecision(h <= t, h, leader, n, "entropy")
    share = pairs[0][1] / n
    return StopDecision(share >= t, share, leader, n, "majority")
