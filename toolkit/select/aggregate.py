"""Aggregators: pick one answer from one problem's samples (votes, best-of-N, PPL, PC, RPC, DeepConf).

Every rule exists once, at the level of integer cluster labels (``*_labels`` functions: ``labels[i]``
is sample ``i``'s cluster, ``-1`` = no answer); the answer-level functions cluster the answers
(:func:`cluster_answers`) and call them. All return one type, :class:`AggregateResult`, whose
``method`` is the rule's name in the registry :data:`ttscale.select.rules.RULES`.

Conventions (docs/algorithms.md sections 0, 2, 4.2, 9.1):

* A sample without an answer (``None`` or a blank string, :func:`ttscale.select.answers.is_no_answer`)
  never votes and is never selected, but it is still a sample of the budget. If no sample has an
  answer, the result's ``answer`` is ``None``.
* Clusters are numbered in order of first appearance. With a user equivalence ``E`` they are the
  connected components of the graph with an edge ``(i, j)``, ``j < i``, whenever
  ``E(answer_i, answer_j)`` (single linkage; ``E`` is always called as ``E(later, earlier)``), and
  a cluster's representative answer is that of its largest-index member (the RPC rule).
* Ties (``tie=``): ``"first"`` picks the tied cluster seen first (``Counter.most_common``);
  ``"random"`` picks uniformly (seeded); ``"expected"`` (default) also returns the first tied
  cluster as ``answer`` but is meant for evaluation, which credits ``Σ tie_shares · correct``
  over ``tied`` (fractional credit ``#correct_tied / #tied``, the RPC evaluation rule).
  Sums of weights are compared with a relative tolerance of ``1e-12`` so that summation order
  (a permutation of the samples) cannot break or create a tie; maxima of given scores are
  compared exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError, DataError
from ttscale.seeding import SeedLike, as_generator
from ttscale.select.answers import is_no_answer
from ttscale.select.rpc import RpcFit
from ttscale.validation import check_choice, check_number, choices

__all__ = [
    "DEEPCONF_MEASURES",
    "SCORE_MAPPINGS",
    "TIE_RULES",
    "AggregateResult",
    "Clustering",
    "ConfidenceMeasure",
    "Equivalence",
    "PrmAggregation",
    "ScoreMapping",
    "TieRule",
    "best_of_n",
    "best_of_n_labels",
    "cluster_answers",
    "deepconf_vote",
    "deepconf_vote_labels",
    "majority_vote",
    "majority_vote_labels",
    "map_scores",
    "max_probability",
    "max_probability_labels",
    "perplexity_consistency",
    "perplexity_consistency_labels",
    "prm_aggregate",
    "rpc",
    "rpc_labels",
    "weighted_vote",
    "weighted_vote_labels",
]

TieRule = Literal["expected", "first", "random"]
TIE_RULES: tuple[str, ...] = choices(TieRule)
ScoreMapping = Literal["identity", "sigmoid", "exp"]
SCORE_MAPPINGS: tuple[str, ...] = choices(ScoreMapping)
ConfidenceMeasure = Literal["bottom_window", "lowest_group", "tail", "mean"]
DEEPCONF_MEASURES: tuple[str, ...] = choices(ConfidenceMeasure)
PrmAggregation = Literal["last", "min", "prod"]
PRM_AGGREGATIONS: tuple[str, ...] = choices(PrmAggregation)
Equivalence = Callable[[Any, Any], bool]

_SUM_RTOL = 1e-12  # tie tolerance for sums of weights (summation order must not decide a tie)


@dataclass(frozen=True)
class AggregateResult:
    """The outcome of one aggregation over one problem's samples.

    ``answers[c]`` is cluster ``c``'s representative (cluster ids when called with labels);
    ``scores[c]`` its unnormalised score (float64); ``confidence[c]`` the method's confidence
    (normalised scores for vote rules, so it sums to 1; the best sample's score for best-of-N and
    ``exp(max ℓ)`` for PPL); ``tied`` the clusters at the maximum, in order of first appearance,
    with ``tie_shares`` (sum 1) the chance each is picked by a uniform random tie-break;
    ``labels[i]`` sample ``i``'s cluster (``-1`` = no answer). ``answer``/``index`` are ``None``
    iff no sample has an answer. ``method`` is the rule's name in
    :data:`ttscale.select.rules.RULES` and ``options`` the rule's settings that shaped the result
    (``score_map``/``temperature`` for ``weighted``, ``eta``/``weighted`` for ``deepconf``).
    """

    answer: Any | None
    index: int | None
    answers: tuple[Any, ...]
    scores: NDArray[np.float64]
    confidence: NDArray[np.float64]
    tied: NDArray[np.int64]
    tie_shares: NDArray[np.float64]
    labels: NDArray[np.int64]
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def credit(self, correct: ArrayLike) -> float:
        """Expected accuracy under a uniform random tie-break: ``Σ tie_shares · correct[tied]``.

        ``correct`` is per cluster (length ``len(answers)``), truthy = correct. 0 without answer.
        """
        corr = np.asarray(correct, dtype=np.float64)
        if corr.shape != (len(self.answers),):
            raise ConfigError(
                f"correct must have one entry per cluster ({len(self.answers)}), got shape {corr.shape}"
            )
        if self.tied.size == 0:
            return 0.0
        return float(np.dot(self.tie_shares, corr[self.tied]))


@dataclass(frozen=True)
class Clustering:
    """Answer clusters: ``labels[i]`` (-1 = no answer) and each cluster's representative answer."""

    labels: NDArray[np.int64]
    representatives: tuple[Any, ...]

    @property
    def n_clusters(self) -> int:
        return len(self.representatives)


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_tie(tie: str) -> None:
    check_choice("tie", tie, TIE_RULES)


def _as_labels(labels: ArrayLike, n_clusters: int | None) -> tuple[NDArray[np.int64], int]:
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ConfigError(f"labels must be a 1-d array, got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ConfigError(f"labels must be integers (-1 = no answer), got dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and lab.min() < -1:
        raise ConfigError(f"labels must be >= -1 (-1 = no answer), got {int(lab.min())}")
    top = int(lab.max()) + 1 if lab.size else 0
    if n_clusters is None:
        n_clusters = top
    elif n_clusters < top:
        raise ConfigError(f"n_clusters={n_clusters} but labels go up to {top - 1}")
    return lab, int(n_clusters)


def _as_values(name: str, values: ArrayLike, n: int) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ConfigError(f"{name} must have one value per sample ({n}), got shape {arr.shape}")
    return arr


def _require_finite(name: str, values: NDArray[np.float64], mask: NDArray[np.bool_], *, allow_neg_inf: bool = False) -> None:
    bad = mask & (np.isnan(values) | np.isposinf(values) | (np.isneginf(values) & (not allow_neg_inf)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{name}[{i}] = {values[i]} for a sample with an answer; scores of answered samples "
            "must be finite (drop the answer or fix the score)"
        )


# --------------------------------------------------------------------------------------------
# clustering


def cluster_answers(
    answers: Sequence[Hashable | None], equivalence: Equivalence | None = None
) -> Clustering:
    """Cluster answers; no answer (``None``, blank strings) gets label -1. Clusters are numbered
    by first appearance.

    Without ``equivalence`` answers are grouped by equality (``==``/hash). With a callable
    ``E(later, earlier) -> bool`` the clusters are the connected components of the graph with an
    edge ``(i, j)``, ``j < i``, whenever ``E(answers[i], answers[j])`` (RPC union-find); ``E`` is
    not assumed symmetric or transitive, is called only for pairs not yet connected, and results
    are memoised per (later, earlier) value pair when the answers are hashable.
    """
    n = len(answers)
    labels = np.full(n, -1, dtype=np.int64)
    if equivalence is None:
        ids: dict[Any, int] = {}
        reps: list[Any] = []
        for i, a in enumerate(answers):
            if is_no_answer(a):
                continue
            c = ids.get(a)
            if c is None:
                c = ids[a] = len(reps)
                reps.append(a)
            else:
                reps[c] = a  # representative = largest-index member
            labels[i] = c
        return Clustering(labels, tuple(reps))

    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    memo: dict[tuple[Any, Any], bool] = {}

    def equal(a: Any, b: Any) -> bool:
        try:
            key = (a, b)
            hit = memo.get(key)
        except TypeError:  # unhashable answers: no memo
            return bool(equivalence(a, b))
        if hit is None:
            hit = memo[key] = bool(equivalence(a, b))
        return hit

    present = [i for i, a in enumerate(answers) if not is_no_answer(a)]
    for pos, i in enumerate(present):
        for j in present[:pos]:
            # i is a root until merged, and merges keep the later index as root.
            if find(j) == find(i):
                continue
            if equal(answers[i], answers[j]):
                parent[find(j)] = find(i)
    root_to_label: dict[int, int] = {}
    reps = []
    for i in present:
        r = find(i)
        c = root_to_label.get(r)
        if c is None:
            c = root_to_label[r] = len(reps)
            reps.append(answers[r])
        labels[i] = c
    return Clustering(labels, tuple(reps))


# --------------------------------------------------------------------------------------------
# the decision shared by every rule


def _first_positions(lab: NDArray[np.int64], mask: NDArray[np.bool_], n_clusters: int) -> NDArray[np.int64]:
    """Per cluster, the smallest sample position among ``mask`` samples (n if none)."""
    fp = np.full(n_clusters, lab.size, dtype=np.int64)
    pos = np.flatnonzero(mask)
    if pos.size:
        u, first = np.unique(lab[pos], return_index=True)
        fp[u] = pos[first]
    return fp


def _decide(
    scores: NDArray[np.float64],
    present: NDArray[np.bool_],
    first_pos: NDArray[np.int64],
    *,
    tie: str,
    seed: SeedLike,
    rtol: float,
    share_weights: NDArray[np.float64] | None = None,
) -> tuple[int | None, NDArray[np.int64], NDArray[np.float64]]:
    if not present.any():
        return None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    best = float(np.max(scores[present]))
    thr = best - rtol * abs(best) if math.isfinite(best) else best
    tied = np.flatnonzero(present & (scores >= thr))
    tied = tied[np.argsort(first_pos[tied], kind="stable")]
    if share_weights is None:
        shares = np.full(tied.size, 1.0 / tied.size)
    else:
        w = share_weights[tied].astype(np.float64)
        shares = w / w.sum()
    if tie == "random" and tied.size > 1:
        index = int(as_generator(seed).choice(tied, p=shares))
    else:
        index = int(tied[0])
    return index, tied.astype(np.int64), shares


def _vote(
    lab: NDArray[np.int64],
    n_clusters: int,
    weights: NDArray[np.float64] | None,
    voters: NDArray[np.bool_],
    present: NDArray[np.bool_] | None,
    *,
    tie: str,
    seed: SeedLike,
    method: str,
    first_from: NDArray[np.bool_] | None = None,
    options: Mapping[str, Any] | None = None,
) -> AggregateResult:
    """Sum ``weights`` (1 each if None) of the ``voters`` per cluster and pick the largest sum.

    Candidates are the ``present`` clusters (default: those with a voter); "first" order is by
    first appearance among ``first_from`` samples (default: the voters).
    """
    _check_tie(tie)
    idx = lab[voters]
    w = None if weights is None else weights[voters]
    scores = np.bincount(idx, weights=w, minlength=n_clusters).astype(np.float64)
    if present is None:
        present = np.bincount(idx, minlength=n_clusters) > 0
    first = _first_positions(lab, voters if first_from is None else first_from, n_clusters)
    index, tied, shares = _decide(scores, present, first, tie=tie, seed=seed, rtol=_SUM_RTOL)
    total = float(scores.sum())
    if total > 0:
        confidence = scores / total
    else:  # every weight is 0: no information, spread evenly over the candidates
        confidence = np.where(present, 1.0 / max(int(present.sum()), 1), 0.0)
    return AggregateResult(
        answer=index,
        index=index,
        answers=tuple(range(n_clusters)),
        scores=scores,
        confidence=confidence,
        tied=tied,
        tie_shares=shares,
        labels=lab,
        method=method,
        options=dict(options or {}),
    )


def _max_rule(
    lab: NDArray[np.int64],
    n_clusters: int,
    values: NDArray[np.float64],
    *,
    tie: str,
    seed: SeedLike,
) -> tuple[int | None, NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Pick the answered sample with the largest value; returns (index, tied, shares, cluster max)."""
    _check_tie(tie)
    answered = lab >= 0
    cmax = np.full(n_clusters, -np.inf)
    np.maximum.at(cmax, lab[answered], values[answered])
    present = np.bincount(lab[answered], minlength=n_clusters) > 0
    if not answered.any():
        empty_i = np.zeros(0, dtype=np.int64)
        return None, empty_i, np.zeros(0, dtype=np.float64), cmax
    best = float(np.max(values[answered]))
    top = answered & (values == best)
    n_top = np.bincount(lab[top], minlength=n_clusters).astype(np.float64)
    first = _first_positions(lab, top, n_clusters)
    index, tied, shares = _decide(
        cmax, present, first, tie=tie, seed=seed, rtol=0.0, share_weights=n_top
    )
    return index, tied, shares, cmax


# --------------------------------------------------------------------------------------------
# label-level rules (one implementation each)


def majority_vote_labels(
    labels: ArrayLike,
    *,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Self-consistency: the cluster with the most samples. Score = count, confidence = count/#answered."""
    lab, L = _as_labels(labels, n_clusters)
    return _vote(lab, L, None, lab >= 0, None, tie=tie, seed=seed, method="majority")


def map_scores(
    scores: ArrayLike,
    score_map: ScoreMapping = "identity",
    temperature: float = 1.0,
) -> NDArray[np.float64]:
    """Map raw scores to non-negative vote weights (float64, same shape).

    ``identity`` (scores must already be ``≥ 0``), ``sigmoid`` (``1/(1+e^{−s})``, for logits), or
    ``exp`` (``exp((s − max s)/T)``: proportional to ``exp(s/T)``, shifted by the common factor
    ``exp(−max s/T)`` so it cannot overflow; ranking and normalised confidence are unchanged).
    NaN entries stay NaN.
    """
    s = np.asarray(scores, dtype=np.float64)
    if score_map == "identity":
        if np.any(s < 0):
            raise ConfigError(
                f"weighted voting needs non-negative scores, got min {np.nanmin(s)}; "
                "use score_map='sigmoid' or score_map='exp' for logits"
            )
        return s
    if score_map == "sigmoid":
        e = np.exp(-np.abs(s))  # never overflows
        return np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if score_map == "exp":
        check_number("temperature", temperature, low=0.0, low_open=True, finite=True)
        finite = s[np.isfinite(s)]
        shift = float(finite.max()) if finite.size else 0.0
        return np.exp((s - shift) / temperature)
    raise ConfigError(f"score_map must be one of {', '.join(SCORE_MAPPINGS)}, got {score_map!r}")


def weighted_vote_labels(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    score_map: ScoreMapping = "identity",
    temperature: float = 1.0,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Reward-weighted vote ``argmax_a Σ_i 1{a_i = a}·w_i``, ``w = map_scores(scores, score_map, T)``.

    Scores of samples without an answer are ignored (may be NaN); answered samples need finite
    scores. Confidence = cluster weight / total weight.
    """
    lab, L = _as_labels(labels, n_clusters)
    s = _as_values("scores", scores, lab.size)
    answered = lab >= 0
    _require_finite("scores", s, answered)
    w = np.zeros(lab.size)
    w[answered] = map_scores(s[answered], score_map, temperature)
    return _vote(
        lab, L, w, answered, None, tie=tie, seed=seed, method="weighted",
        options={"score_map": score_map, "temperature": temperature},
    )


def best_of_n_labels(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Best-of-N: the answered sample with the highest score (``-inf`` allowed, NaN not).

    Cluster score = best score of its samples (also its confidence); ties are between samples, so
    ``tie_shares`` are proportional to the number of top-scoring samples in each tied cluster.
    """
    lab, L = _as_labels(labels, n_clusters)
    s = _as_values("scores", scores, lab.size)
    _require_finite("scores", s, lab >= 0, allow_neg_inf=True)
    index, tied, shares, cmax = _max_rule(lab, L, s, tie=tie, seed=seed)
    return AggregateResult(index, index, tuple(range(L)), cmax, cmax.copy(), tied, shares, lab, "best_of_n")


def max_probability_labels(
    labels: ArrayLike,
    mean_logprobs: ArrayLike,
    *,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """PPL baseline: the path with the largest mean token log-prob ``ℓ_i``.

    Cluster score and confidence = ``exp(max ℓ)`` over its paths (not normalised across clusters).
    """
    lab, L = _as_labels(labels, n_clusters)
    lp = _as_values("mean_logprobs", mean_logprobs, lab.size)
    _require_finite("mean_logprobs", lp, lab >= 0, allow_neg_inf=True)
    index, tied, shares, cmax = _max_rule(lab, L, lp, tie=tie, seed=seed)
    p = np.exp(cmax)
    return AggregateResult(index, index, tuple(range(L)), p, p.copy(), tied, shares, lab, "max_probability")


def perplexity_consistency_labels(
    labels: ArrayLike,
    mean_logprobs: ArrayLike,
    *,
    text_ids: ArrayLike | None = None,
    pruned: ArrayLike | None = None,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Perplexity consistency: cluster score ``Σ p_i`` with ``p_i = exp(ℓ_i)``, duplicates once.

    Paths with the same ``text_ids`` value and the same ``p`` count once (the reference keeps a
    set of probabilities per text); without ``text_ids`` every path is distinct. ``pruned`` paths
    (bool mask) still form clusters but add 0 (used by RPC). Confidence = score / total.
    """
    lab, L = _as_labels(labels, n_clusters)
    lp = _as_values("mean_logprobs", mean_logprobs, lab.size)
    answered = lab >= 0
    _require_finite("mean_logprobs", lp, answered)
    voters = answered.copy()
    if pruned is not None:
        pr = np.asarray(pruned, dtype=bool)
        if pr.shape != lab.shape:
            raise ConfigError(f"pruned must have one entry per sample ({lab.size}), got {pr.shape}")
        voters &= ~pr
    p = np.exp(lp)
    if text_ids is not None:
        tid = np.asarray(text_ids)
        if tid.shape != lab.shape:
            raise ConfigError(f"text_ids must have one entry per sample ({lab.size}), got {tid.shape}")
        idx = np.flatnonzero(voters)
        if idx.size:
            keys = np.stack([lab[idx], np.unique(tid[idx], return_inverse=True)[1].ravel()])
            order = np.lexsort((idx, p[idx], keys[1], keys[0]))
            k0, k1, pv = keys[0][order], keys[1][order], p[idx][order]
            dup = np.zeros(idx.size, dtype=bool)
            dup[1:] = (k0[1:] == k0[:-1]) & (k1[1:] == k1[:-1]) & (pv[1:] == pv[:-1])
            voters = np.zeros_like(voters)
            voters[idx[order][~dup]] = True
    present = np.bincount(lab[answered], minlength=L) > 0
    return _vote(
        lab, L, p, voters, present, tie=tie, seed=seed, method="pc", first_from=answered
    )


def rpc_labels(
    labels: ArrayLike,
    mean_logprobs: ArrayLike,
    *,
    text_ids: ArrayLike | None = None,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
    fit: RpcFit = "reference",
) -> AggregateResult:
    """RPC: reasoning pruning (Weibull mixture over ``p = exp(ℓ)`` of the answered paths,
    :func:`ttscale.select.rpc.weibull_prune`) followed by perplexity consistency on the surviving paths.

    ``fit``: ``"reference"`` (default; the authors' optimiser, exactly) or ``"fast"`` (the
    batched Newton fit used for curves); see :mod:`ttscale.select.rpc`.
    """
    from ttscale.select.rpc import weibull_prune

    lab, L = _as_labels(labels, n_clusters)
    lp = _as_values("mean_logprobs", mean_logprobs, lab.size)
    answered = lab >= 0
    _require_finite("mean_logprobs", lp, answered)
    pruned = np.zeros(lab.size, dtype=bool)
    if answered.sum() >= 2:
        with np.errstate(over="ignore"):  # exp overflow in a far tail = log-density -inf: benign
            pruned[answered] = weibull_prune(np.exp(lp[answered]), fit=fit)
    res = perplexity_consistency_labels(
        lab, lp, text_ids=text_ids, pruned=pruned, n_clusters=L, tie=tie, seed=seed
    )
    return replace(res, method="rpc")


def deepconf_vote_labels(
    labels: ArrayLike,
    confidences: ArrayLike,
    *,
    eta: float | None = None,
    weighted: bool = True,
    n_clusters: int | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """DeepConf offline vote over per-trace confidences ``C_t`` (non-negative).

    With ``eta`` (percent of traces kept, in ``(0, 100]``) the answered traces with
    ``C_t ≥ s = percentile(C, 100 − eta)`` (numpy linear interpolation) are kept; then
    ``V(a) = Σ_kept C_t·1{ans_t = a}`` (``weighted=False``: counts). Confidence = ``V/ΣV``, so
    ``confidence[index]`` is DeepConf's consensus ``β``.
    """
    lab, L = _as_labels(labels, n_clusters)
    conf = _as_values("confidences", confidences, lab.size)
    answered = lab >= 0
    _require_finite("confidences", conf, answered)
    if np.any(conf[answered] < 0):
        raise ConfigError("DeepConf confidences must be >= 0 (C = -mean top-k log-prob)")
    keep = answered.copy()
    if eta is not None:
        check_number("eta", eta, low=0.0, high=100.0, low_open=True)  # percent of traces kept
        if answered.any():
            s = float(np.percentile(conf[answered], 100.0 - eta))
            keep &= conf >= s
    return _vote(
        lab, L, conf if weighted else None, keep, None, tie=tie, seed=seed, method="deepconf",
        options={"eta": eta, "weighted": weighted},
    )


# --------------------------------------------------------------------------------------------
# answer-level wrappers


def _with_answers(res: AggregateResult, cl: Clustering) -> AggregateResult:
    answer = None if res.index is None else cl.representatives[res.index]
    return replace(res, answer=answer, answers=cl.representatives)


def majority_vote(
    answers: Sequence[Hashable | None],
    *,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Self-consistency over ``answers`` (``None`` = no answer). See :func:`majority_vote_labels`."""
    cl = cluster_answers(answers, equivalence)
    res = majority_vote_labels(cl.labels, n_clusters=cl.n_clusters, tie=tie, seed=seed)
    return _with_answers(res, cl)


def weighted_vote(
    answers: Sequence[Hashable | None],
    scores: ArrayLike,
    *,
    score_map: ScoreMapping = "identity",
    temperature: float = 1.0,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Reward-weighted majority vote. See :func:`weighted_vote_labels`."""
    cl = cluster_answers(answers, equivalence)
    res = weighted_vote_labels(
        cl.labels, scores, score_map=score_map, temperature=temperature,
        n_clusters=cl.n_clusters, tie=tie, seed=seed,
    )
    return _with_answers(res, cl)


def best_of_n(
    answers: Sequence[Hashable | None],
    scores: ArrayLike,
    *,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """Best-of-N by score. See :func:`best_of_n_labels`."""
    cl = cluster_answers(answers, equivalence)
    res = best_of_n_labels(cl.labels, scores, n_clusters=cl.n_clusters, tie=tie, seed=seed)
    return _with_answers(res, cl)


def max_probability(
    answers: Sequence[Hashable | None],
    mean_logprobs: ArrayLike,
    *,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """PPL: the answer of the path with the largest mean token log-prob. See :func:`max_probability_labels`."""
    cl = cluster_answers(answers, equivalence)
    res = max_probability_labels(cl.labels, mean_logprobs, n_clusters=cl.n_clusters, tie=tie, seed=seed)
    return _with_answers(res, cl)


def _text_ids(texts: Sequence[str] | None, n: int) -> NDArray[np.int64] | None:
    if texts is None:
        return None
    if len(texts) != n:
        raise ConfigError(f"texts must have one entry per sample ({n}), got {len(texts)}")
    ids: dict[str, int] = {}
    return np.fromiter((ids.setdefault(t, len(ids)) for t in texts), dtype=np.int64, count=n)


def perplexity_consistency(
    answers: Sequence[Hashable | None],
    mean_logprobs: ArrayLike,
    *,
    texts: Sequence[str] | None = None,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """PC over answers; identical completion ``texts`` (same probability) count once."""
    cl = cluster_answers(answers, equivalence)
    res = perplexity_consistency_labels(
        cl.labels, mean_logprobs, text_ids=_text_ids(texts, len(answers)),
        n_clusters=cl.n_clusters, tie=tie, seed=seed,
    )
    return _with_answers(res, cl)


def rpc(
    answers: Sequence[Hashable | None],
    mean_logprobs: ArrayLike,
    *,
    texts: Sequence[str] | None = None,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
    fit: RpcFit = "reference",
) -> AggregateResult:
    """RPC (reasoning pruning + perplexity consistency) over answers. See :func:`rpc_labels`.

    ``fit="reference"`` (default) fits the Weibull mixture with the authors' optimiser exactly;
    ``fit="fast"`` with the batched fit :func:`ttscale.select.rpc.fit_weibull_mixtures`.
    """
    cl = cluster_answers(answers, equivalence)
    res = rpc_labels(
        cl.labels, mean_logprobs, text_ids=_text_ids(texts, len(answers)),
        n_clusters=cl.n_clusters, tie=tie, seed=seed, fit=fit,
    )
    return _with_answers(res, cl)


def _trace_confidence(
    top_logprobs: Any, measure: str, window: int, bottom_percent: float, round_to: int | None
) -> float:
    from ttscale.select import confidence as cf

    tok = cf.token_confidence(top_logprobs, round_to=round_to)
    if measure == "bottom_window":
        return cf.bottom_percent_group_confidence(tok, window, bottom_percent)
    if measure == "lowest_group":
        return cf.lowest_group_confidence(tok, window, round_to=round_to)
    if measure == "tail":
        return cf.tail_confidence(tok, window)
    return cf.mean_confidence(tok)  # mean


def deepconf_vote(
    answers: Sequence[Hashable | None],
    confidences: ArrayLike | None = None,
    *,
    top_logprobs: Sequence[Any] | None = None,
    measure: ConfidenceMeasure = "bottom_window",
    window: int = 2048,
    bottom_percent: float = 0.1,
    round_to: int | None = None,
    eta: float | None = None,
    weighted: bool = True,
    equivalence: Equivalence | None = None,
    tie: TieRule = "expected",
    seed: SeedLike = None,
) -> AggregateResult:
    """DeepConf offline vote (confidence-weighted, optional top-``eta``% filtering).

    Give per-trace ``confidences``, or ``top_logprobs`` (one per trace, in any form
    :func:`ttscale.select.confidence.token_confidence` takes) and a ``measure``: ``bottom_window``
    (mean of the lowest ``bottom_percent`` window means, window ``window``), ``lowest_group``,
    ``tail`` (last ``window`` tokens) or ``mean``; ``round_to=3`` rounds token (and lowest-group
    window) confidences as the reference code does. Empty-string answers count as no answer, as in
    the reference (and as everywhere, :func:`ttscale.select.answers.is_no_answer`). See
    :func:`deepconf_vote_labels`.
    """
    if (confidences is None) == (top_logprobs is None):
        raise ConfigError("deepconf_vote needs exactly one of confidences= or top_logprobs=")
    if top_logprobs is not None:
        check_choice("measure", measure, DEEPCONF_MEASURES)
        if len(top_logprobs) != len(answers):
            raise ConfigError(
                f"top_logprobs must have one entry per trace ({len(answers)}), got {len(top_logprobs)}"
            )
        confidences = np.array(
            [_trace_confidence(t, measure, window, bottom_percent, round_to) for t in top_logprobs],
            dtype=np.float64,
        )
    cl = cluster_answers(answers, equivalence)
    res = deepconf_vote_labels(
        cl.labels, confidences, eta=eta, weighted=weighted,  # type: ignore[arg-type]
        n_clusters=cl.n_clusters, tie=tie, seed=seed,
    )
    return _with_answers(res, cl)


# --------------------------------------------------------------------------------------------
# PRM step aggregation


def prm_aggregate(
    step_scores: Sequence[ArrayLike],
    prm_aggregation: PrmAggregation = "last",
    *,
    eps: float = 1e-12,
) -> NDArray[np.float64]:
    """One score per solution from its PRM step scores; shape ``(n_solutions,)``, float64.

    ``last`` (default), ``min`` (Math-Shepherd), or ``prod`` computed as ``exp(Σ log max(s_t, eps))``
    (steps must lie in ``[0, 1]``; clipping keeps long solutions away from ``log 0``). A solution
    without steps scores NaN.
    """
    check_choice("prm_aggregation", prm_aggregation, PRM_AGGREGATIONS)
    check_number("eps", eps, low=0.0, high=1.0, low_open=True, high_open=True)
    out = np.full(len(step_scores), np.nan)
    for i, steps in enumerate(step_scores):
        s = np.asarray(steps, dtype=np.float64).ravel()
        if s.size == 0:
            continue
        if not np.all(np.isfinite(s)):
            raise DataError(f"step scores of solution {i} must be finite, got {s.tolist()}")
        if prm_aggregation == "last":
            out[i] = s[-1]
        elif prm_aggregation == "min":
            out[i] = s.min()
        else:
            if s.min() < 0 or s.max() > 1:
                raise DataError(
                    f"prod aggregation needs step scores in [0, 1]; solution {i} has {s.tolist()}"
                )
            out[i] = math.exp(float(np.sum(np.log(np.maximum(s, eps)))))
    return out
