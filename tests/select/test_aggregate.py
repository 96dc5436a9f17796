"""Aggregators: docs/algorithms.md 2.7 (RPC/PC/SC/PPL), 4.4 (DeepConf offline), 9.1 (weighted/BoN/PRM)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.errors import ConfigError, DataError
from ttscale.select.aggregate import (
    AggregateResult,
    best_of_n,
    best_of_n_labels,
    cluster_answers,
    deepconf_vote,
    majority_vote,
    majority_vote_labels,
    map_scores,
    max_probability,
    perplexity_consistency,
    prm_aggregate,
    rpc,
    rpc_labels,
    weighted_vote,
    weighted_vote_labels,
)

# --- section 2.7 worked example -------------------------------------------------------------

ANS = [12, 12, 7, 7, 7, 3, 7, 12]
TEXTS = ["t0", "t0", "t2", "t3", "t4", "t5", "t6", "t7"]
LOGP = [-0.05, -0.05, -0.40, -0.45, -0.50, -1.20, -2.30, -0.90]


def _by_answer(res: AggregateResult, values: np.ndarray) -> dict:
    return {a: float(v) for a, v in zip(res.answers, values, strict=True)}


def test_rpc_worked_example() -> None:
    res = rpc(ANS, LOGP, texts=TEXTS)
    assert res.answer == 7
    assert res.method == "rpc"
    conf = _by_answer(res, res.confidence)
    assert conf[12] == pytest.approx(0.331935, abs=1e-6)
    assert conf[7] == pytest.approx(0.668065, abs=1e-6)
    assert conf[3] == 0.0  # all of its paths pruned: kept in the normalisation with 0
    scores = _by_answer(res, res.scores)
    assert scores[12] == pytest.approx(0.951229, abs=1e-6)  # identical t0 paths count once
    assert scores[7] == pytest.approx(1.914479, abs=1e-6)
    assert res.credit([a == 12 for a in res.answers]) == 0.0


def test_pc_worked_example() -> None:
    res = perplexity_consistency(ANS, LOGP, texts=TEXTS)
    assert res.answer == 7
    scores = _by_answer(res, res.scores)
    assert scores == pytest.approx({12: 1.357799, 7: 2.014738, 3: 0.301194}, abs=1e-6)
    conf = _by_answer(res, res.confidence)
    assert conf == pytest.approx({12: 0.369597, 7: 0.548417, 3: 0.081986}, abs=1e-6)
    # without texts every path is distinct, so the duplicated t0 path counts twice
    res2 = perplexity_consistency(ANS, LOGP)
    assert _by_answer(res2, res2.scores)[12] == pytest.approx(1.357799 + 0.951229, abs=1e-6)


def test_sc_and_ppl_worked_example() -> None:
    sc = majority_vote(ANS)
    assert sc.answer == 7
    assert _by_answer(sc, sc.confidence)[7] == pytest.approx(0.5)
    assert _by_answer(sc, sc.scores) == {12: 3.0, 7: 4.0, 3: 1.0}
    ppl = max_probability(ANS, LOGP)
    assert ppl.answer == 12
    assert ppl.tied.tolist() == [0]
    assert ppl.credit([a == 12 for a in ppl.answers]) == 1.0  # = 2 tied paths x 1/2
    assert _by_answer(ppl, ppl.confidence)[12] == pytest.approx(0.951229, abs=1e-6)


def test_rpc_labels_matches_answer_level() -> None:
    cl = cluster_answers(ANS)
    tid = np.array([0, 0, 2, 3, 4, 5, 6, 7])
    a = rpc_labels(cl.labels, LOGP, text_ids=tid)
    b = rpc(ANS, LOGP, texts=TEXTS)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.index == b.index and a.answer == b.index
    assert b.answers == (12, 7, 3)


# --- section 4.4 DeepConf offline votes -----------------------------------------------------

DC_ANS = [42, 42, 17, 42, 17, 17, 9, 17]
DC_CONF = [3.1, 2.8, 1.2, 2.9, 1.0, 1.1, 0.7, 1.3]


def test_deepconf_plain_majority() -> None:
    assert majority_vote(DC_ANS, tie="first").answer == 17


@pytest.mark.parametrize(
    ("eta", "threshold", "votes", "beta"),
    [
        (10, 2.96, {42: 3.1}, 1.0),
        (50, 1.25, {42: 8.8, 17: 1.3}, 0.8713),
        (90, 0.91, {42: 8.8, 17: 4.6}, 0.6567),
    ],
)
def test_deepconf_filtered_votes(eta: float, threshold: float, votes: dict, beta: float) -> None:
    assert np.percentile(DC_CONF, 100 - eta) == pytest.approx(threshold)
    res = deepconf_vote(DC_ANS, DC_CONF, eta=eta)
    assert res.answer == 42
    got = {a: s for a, s in _by_answer(res, res.scores).items() if s > 0}
    assert got == pytest.approx(votes)
    assert res.confidence[res.index] == pytest.approx(beta, abs=1e-4)


def test_deepconf_unweighted_and_unfiltered() -> None:
    assert deepconf_vote(DC_ANS, DC_CONF).answer == 42  # V = {42: 8.8, 17: 4.6, 9: 0.7}
    assert deepconf_vote(DC_ANS, DC_CONF, weighted=False).answer == 17


def test_deepconf_from_top_logprobs() -> None:
    trace = [[-0.01, -5.2, -6.0], [-0.3, -1.5, -3.0], [-1.2, -1.3, -1.4],
             [-0.05, -4.0, -5.5], [-0.7, -0.9, -2.5], [-0.02, -6.0, -7.1]]
    flat = [[-0.5, -0.6, -0.7]] * 6  # confidence 0.6 everywhere
    res = deepconf_vote(["x", "y"], top_logprobs=[trace, flat], measure="lowest_group", window=3)
    assert _by_answer(res, res.scores) == pytest.approx({"x": 1.95, "y": 0.6}, abs=1e-9)
    # the section 4.4 value uses token confidences rounded to 3 decimals, as the reference does
    res = deepconf_vote(["x", "y"], top_logprobs=[trace, flat], measure="bottom_window",
                        window=3, bottom_percent=0.5, round_to=3)
    assert _by_answer(res, res.scores)["x"] == pytest.approx(1.9888333, abs=1e-6)
    res = deepconf_vote(["x", "y"], top_logprobs=[trace, flat], measure="bottom_window",
                        window=3, bottom_percent=0.5)
    assert _by_answer(res, res.scores)["x"] == pytest.approx(1.9888889, abs=1e-6)
    res = deepconf_vote(["x", "y"], top_logprobs=[trace, flat], measure="mean", round_to=3)
    assert _by_answer(res, res.scores)["x"] == pytest.approx(2.5933333, abs=1e-6)
    res = deepconf_vote(["x", "y"], top_logprobs=[trace, flat], measure="tail", window=2, round_to=3)
    assert _by_answer(res, res.scores)["x"] == pytest.approx(2.87, abs=1e-9)
    with pytest.raises(ConfigError):
        deepconf_vote(["x"], [1.0], top_logprobs=[trace])
    with pytest.raises(ConfigError):
        deepconf_vote(["x", "y"], [1.0, 2.0], eta=0)


def test_deepconf_drops_empty_answers() -> None:
    res = deepconf_vote(["", "a", None], [5.0, 1.0, 9.0])
    assert res.answer == "a"
    assert res.labels.tolist() == [-1, 0, -1]


# --- section 9.1 ---------------------------------------------------------------------------

PRM_ANS = [4, 5, 4, 6, 5, 5]
STEPS = [[0.9, 0.8, 0.95], [0.7, 0.6], [0.9, 0.9, 0.3], [0.99], [0.5, 0.4, 0.45], [0.6, 0.65]]


@pytest.mark.parametrize(
    ("how", "scores", "votes", "weighted", "bon"),
    [
        ("last", [0.95, 0.6, 0.3, 0.99, 0.45, 0.65], {4: 1.25, 5: 1.7, 6: 0.99}, 5, 6),
        ("min", [0.8, 0.6, 0.3, 0.99, 0.4, 0.6], {4: 1.1, 5: 1.6, 6: 0.99}, 5, 6),
        ("prod", [0.684, 0.42, 0.243, 0.99, 0.09, 0.39], {4: 0.927, 5: 0.9, 6: 0.99}, 6, 6),
    ],
)
def test_prm_weighted_and_bon(how: str, scores: list, votes: dict, weighted: int, bon: int) -> None:
    s = prm_aggregate(STEPS, how)  # type: ignore[arg-type]
    np.testing.assert_allclose(s, scores, atol=1e-12)
    res = weighted_vote(PRM_ANS, s)
    assert _by_answer(res, res.scores) == pytest.approx(votes)
    assert res.answer == weighted
    assert best_of_n(PRM_ANS, s).answer == bon
    assert majority_vote(PRM_ANS).answer == 5


def test_prm_aggregate_edges() -> None:
    out = prm_aggregate([[], [0.5] * 2000, [0.0, 1.0]], "prod", eps=1e-12)
    assert np.isnan(out[0])
    assert out[1] == 0.0 or out[1] == pytest.approx(np.exp(2000 * np.log(0.5)))
    assert out[2] == pytest.approx(1e-12)  # a zero step is clipped to eps, not log(0)
    with pytest.raises(DataError):
        prm_aggregate([[1.5]], "prod")
    with pytest.raises(DataError):
        prm_aggregate([[np.nan]], "min")
    with pytest.raises(ConfigError):
        prm_aggregate([[0.5]], "mean")  # type: ignore[arg-type]


def test_weighted_vote_score_mappings() -> None:
    ans = ["big"] * 5 + ["one"]
    logits = [-1.0] * 5 + [0.1]
    with pytest.raises(ConfigError, match="sigmoid"):
        weighted_vote(ans, logits)
    assert weighted_vote(ans, logits, score_map="sigmoid").answer == "big"
    res = weighted_vote(ans, logits, score_map="exp", temperature=0.5)
    want_ratio = 5 * np.exp(-1.0 / 0.5) / np.exp(0.1 / 0.5)
    assert res.scores[0] / res.scores[1] == pytest.approx(want_ratio)
    assert res.answer == "one"  # a sharp temperature lets the single high score win
    assert weighted_vote(ans, logits, score_map="exp", temperature=5.0).answer == "big"
    np.testing.assert_allclose(map_scores([0.0, 800.0], "sigmoid"), [0.5, 1.0])
    assert np.all(np.isfinite(map_scores([1e4, 1e4 - 1], "exp")))
    with pytest.raises(ConfigError):
        map_scores([1.0], "exp", temperature=0)
    with pytest.raises(DataError):
        weighted_vote(["a", "b"], [np.nan, 1.0])
    # the score of an unanswered sample is ignored
    assert weighted_vote([None, "b"], [np.nan, 1.0]).answer == "b"


# --- conventions ----------------------------------------------------------------------------


def test_no_answers() -> None:
    for res in (majority_vote([None, None]), best_of_n([None], [1.0]),
                weighted_vote([None], [1.0]), rpc([None, None], [-1.0, -2.0]),
                deepconf_vote([None], [1.0], eta=50)):
        assert res.answer is None and res.index is None
        assert res.answers == () and res.tied.size == 0 and res.scores.size == 0
        assert res.labels.tolist() == [-1] * res.labels.size
        assert res.credit([]) == 0.0
    res = majority_vote([])
    assert res.answer is None and res.labels.size == 0


def test_tie_rules() -> None:
    res = majority_vote(["b", "a", "a", "b"])
    assert res.answer == "b" and res.tied.tolist() == [0, 1]
    np.testing.assert_allclose(res.tie_shares, [0.5, 0.5])
    assert res.credit([False, True]) == 0.5
    assert majority_vote(["b", "a", "a", "b"], tie="first").answer == "b"
    picks = {majority_vote(["b", "a", "a", "b"], tie="random", seed=s).answer for s in range(20)}
    assert picks == {"a", "b"}
    one = majority_vote(["b", "a", "a", "b"], tie="random", seed=3).answer
    assert majority_vote(["b", "a", "a", "b"], tie="random", seed=3).answer == one
    with pytest.raises(ConfigError):
        majority_vote(["a"], tie="last")  # type: ignore[arg-type]
    # best-of-N ties are between samples: shares follow the number of tied samples
    bon = best_of_n(["a", "a", "b", "c"], [1.0, 1.0, 1.0, 0.5])
    assert bon.tied.tolist() == [0, 1]
    np.testing.assert_allclose(bon.tie_shares, [2 / 3, 1 / 3])
    # "first" for best-of-N is the first top-scoring sample
    assert best_of_n(["a", "b", "b"], [0.1, 0.9, 0.9], tie="first").answer == "b"
    assert best_of_n(["a", "b", "c"], [0.9, 0.1, 0.9], tie="first").answer == "a"


def test_equivalence_single_linkage_and_argument_order() -> None:
    calls: list[tuple[int, int]] = []
    answers = [10, 30, 20, 99]

    def close(later: int, earlier: int) -> bool:
        calls.append((answers.index(later), answers.index(earlier)))
        return abs(later - earlier) <= 10

    cl = cluster_answers(answers, close)
    assert cl.labels.tolist() == [0, 0, 0, 1]  # 20 glues 10 and 30 together
    assert cl.representatives == (20, 99)  # largest-index member
    assert calls and all(i > j for i, j in calls)  # E(later, earlier)
    res = majority_vote(answers, equivalence=close)
    assert res.answer == 20
    # an asymmetric relation is honoured in the documented direction only
    cl2 = cluster_answers(["ab", "a"], lambda later, earlier: later.startswith(earlier))
    assert cl2.labels.tolist() == [0, 1]
    cl3 = cluster_answers(["a", "ab"], lambda later, earlier: later.startswith(earlier))
    assert cl3.labels.tolist() == [0, 0]


def test_exact_clustering_representative_is_last_member() -> None:
    cl = cluster_answers([1, None, 1.0])
    assert cl.labels.tolist() == [0, -1, 0]
    assert cl.representatives == (1.0,) and isinstance(cl.representatives[0], float)


def test_label_validation() -> None:
    with pytest.raises(ConfigError):
        majority_vote_labels([0, -2])
    with pytest.raises(ConfigError):
        majority_vote_labels([0.5, 1.0])
    with pytest.raises(ConfigError):
        majority_vote_labels([0, 3], n_clusters=2)
    res = majority_vote_labels([2, 2, -1], n_clusters=4)
    assert res.scores.tolist() == [0.0, 0.0, 2.0, 0.0] and res.answer == 2
    with pytest.raises(ConfigError):
        weighted_vote_labels([0, 1], [1.0])


# --- properties (hypothesis) ----------------------------------------------------------------

answer_st = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]))
weight_st = st.integers(0, 4).map(lambda i: i / 4)


def _summary(res: AggregateResult) -> tuple:
    scores = {a: round(float(s), 9) for a, s in zip(res.answers, res.scores, strict=True)}
    tied = sorted(res.answers[i] for i in res.tied)
    shares = {res.answers[i]: round(float(s), 9) for i, s in zip(res.tied, res.tie_shares, strict=True)}
    return scores, tied, shares


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(answer_st, weight_st), max_size=12), st.randoms(use_true_random=False))
def test_permutation_invariance(items: list, rnd) -> None:  # type: ignore[no-untyped-def]
    perm = list(items)
    rnd.shuffle(perm)
    for f in (
        lambda xs: majority_vote([a for a, _ in xs]),
        lambda xs: weighted_vote([a for a, _ in xs], [w for _, w in xs]),
        lambda xs: best_of_n([a for a, _ in xs], [w for _, w in xs]),
        lambda xs: perplexity_consistency([a for a, _ in xs], [-w for _, w in xs]),
        lambda xs: deepconf_vote([a for a, _ in xs], [w for _, w in xs], eta=50),
    ):
        assert _summary(f(items)) == _summary(f(perm))


@settings(max_examples=100, deadline=None)
@given(st.lists(answer_st, max_size=12), st.sampled_from([0.3, 1.0, 7.0]))
def test_equal_weights_equal_majority(answers: list, w: float) -> None:
    for tie in ("expected", "first"):
        maj = majority_vote(answers, tie=tie)  # type: ignore[arg-type]
        wv = weighted_vote(answers, [w] * len(answers), tie=tie)  # type: ignore[arg-type]
        dc = deepconf_vote(answers, [w] * len(answers), tie=tie)  # type: ignore[arg-type]
        for other in (wv, dc):
            assert other.answer == maj.answer
            assert other.tied.tolist() == maj.tied.tolist()
            np.testing.assert_allclose(other.confidence, maj.confidence)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), weight_st), min_size=1, max_size=10),
    st.lists(st.tuples(st.integers(0, 10), weight_st), max_size=5),
)
def test_unparsed_answers_are_ignored(items: list, nones: list) -> None:
    answers = [a for a, _ in items]
    w = [x for _, x in items]
    a2, w2 = list(answers), list(w)
    for pos, x in nones:
        a2.insert(min(pos, len(a2)), None)
        w2.insert(min(pos, len(w2)), x + 5.0)  # large scores must not matter
    for f in (
        lambda a, s: majority_vote(a),
        lambda a, s: weighted_vote(a, s),
        lambda a, s: best_of_n(a, s),
        lambda a, s: perplexity_consistency(a, [-x for x in s]),
        lambda a, s: deepconf_vote(a, s, eta=60),
    ):
        r1, r2 = f(answers, w), f(a2, w2)
        assert r1.answer == r2.answer and r1.answers == r2.answers
        np.testing.assert_allclose(r1.scores, r2.scores)
        assert r1.tied.tolist() == r2.tied.tolist()
        assert int((r2.labels == -1).sum()) == len(nones)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(answer_st, weight_st), max_size=10))
def test_answer_level_is_a_thin_wrapper(items: list) -> None:
    answers = [a for a, _ in items]
    w = np.array([x for _, x in items])
    cl = cluster_answers(answers)
    for lab_f, ans_f in (
        (lambda: majority_vote_labels(cl.labels, n_clusters=cl.n_clusters), lambda: majority_vote(answers)),
        (lambda: best_of_n_labels(cl.labels, w, n_clusters=cl.n_clusters), lambda: best_of_n(answers, w)),
    ):
        a, b = lab_f(), ans_f()
        assert a.index == b.index
        np.testing.assert_array_equal(a.scores, b.scores)
        assert b.answer == (None if b.index is None else cl.representatives[b.index])
