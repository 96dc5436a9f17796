"""The selection-rule registry: one name per rule across aggregate, selection@k, curves and CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ttscale.analysis import METHODS, compute_curves
from ttscale.errors import ConfigError
from ttscale.metrics import selection_at_k
from ttscale.select.aggregate import TIE_RULES, max_probability_labels
from ttscale.select.rules import ORACLE, RULES, get_rule
from ttscale.store.pool import Pool

ANS = [12, 12, 7, 7, 7, 3, None, 12]
SCORES = [0.9, 0.1, 0.4, 0.3, 0.2, 0.95, 0.5, 0.6]
LOGP = [-0.05, -0.05, -0.40, -0.45, -0.50, -1.20, -2.30, -0.90]
CONF = [3.0, 2.5, 4.0, 1.0, 2.0, 0.5, 1.0, 2.0]  # DeepConf trace confidences
SECOND = {"scores": SCORES, "mean_logprobs": LOGP, "top_logprobs": CONF}


def _labels(answers: list) -> np.ndarray:
    codes: dict = {}
    return np.array([-1 if a is None else codes.setdefault(a, len(codes)) for a in answers])


@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_reports_its_own_name_at_both_levels(name: str) -> None:
    rule = RULES[name]
    assert rule.name == name and rule.inputs[0] == "answers"
    extra = [SECOND[i] for i in rule.inputs[1:]]
    by_answer = rule.answers_fn(ANS, *extra)
    by_label = rule.labels_fn(_labels(ANS), *extra)
    assert by_answer.method == name and by_label.method == name
    # the answer-level function is the label-level one plus clustering
    assert by_answer.index == by_label.index
    np.testing.assert_array_equal(by_answer.labels, by_label.labels)
    assert rule.plot_label == f"{rule.label}@k"


def test_rule_options_are_recorded_not_folded_into_the_name() -> None:
    w = RULES["weighted"].answers_fn(ANS, LOGP, score_map="exp", temperature=0.5)
    assert w.method == "weighted" and w.options == {"score_map": "exp", "temperature": 0.5}
    d = RULES["deepconf"].answers_fn(ANS, CONF, eta=50.0)
    assert d.method == "deepconf" and d.options == {"eta": 50.0, "weighted": True}


@pytest.mark.parametrize("name", ["vote", "bon", "ppl"])  # bon/ppl: names from before the registry
def test_one_name_per_rule_and_unknown_names_fail(name: str) -> None:
    assert get_rule("rpc") is RULES["rpc"]
    with pytest.raises(ConfigError, match=f"unknown selection rule '{name}'; choose from majority"):
        get_rule(name)
    with pytest.raises(ConfigError, match=f"method must be one of .* got '{name}'"):
        selection_at_k(LAB, COR, [1], method=name, scores=SC)
    pool = Pool.from_arrays(["a"], [2], answer=["x", "y"], correct=[1, 0], scores={"rm": [0.1, 0.2]})
    with pytest.raises(ConfigError, match=rf"unknown method\(s\) \['{name}'\]"):
        compute_curves(pool, [name], [1], score="rm", n_boot=10)


def test_coverage_is_the_oracle_not_a_rule() -> None:
    assert ORACLE == "coverage" and ORACLE not in RULES
    assert list(METHODS) == [ORACLE, *RULES]
    with pytest.raises(ConfigError, match="unknown selection rule"):
        get_rule("coverage")
    with pytest.raises(ConfigError, match="method must be one of"):
        selection_at_k([[0, 0]], [[1, 0]], [1], method="coverage")


# a pool small enough to enumerate: 2 problems x 6 samples, with an unanswered sample and ties
LAB = [[0, 0, 1, 1, 2, -1], [0, 1, 1, 2, 2, 0]]
COR = [[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
SC = [[-0.2, -0.9, -0.2, -0.4, -1.0, -0.1], [-0.3, -0.3, -0.5, -0.1, -0.7, -0.6]]


@pytest.mark.parametrize("name", [r.name for r in RULES.values() if r.at_k])
@pytest.mark.parametrize("tie", TIE_RULES)
def test_closed_form_flag_matches_selection_at_k(name: str, tie: str) -> None:
    """``closed_form_ties`` is what selection_at_k can do in closed form, and the value is exact."""
    rule = RULES[name]
    scores = None if rule.inputs == ("answers",) else SC
    if name == "weighted":
        scores = (np.asarray(SC) + 2.0).tolist()  # vote weights must be >= 0
    kw = {"method": name, "scores": scores, "tie": tie, "seed": 0}
    if tie in rule.closed_form_ties:
        closed = selection_at_k(LAB, COR, [1, 2, 3, 6], strategy="closed-form", **kw)  # type: ignore[arg-type]
        exact = selection_at_k(LAB, COR, [1, 2, 3, 6], strategy="enumerate", **kw)  # type: ignore[arg-type]
        assert set(closed.estimator) == {"closed-form"} and closed.rule == name
        np.testing.assert_allclose(closed.mean, exact.mean, atol=1e-12)
    else:
        with pytest.raises(ConfigError, match=f"no closed form for method='{name}'"):
            selection_at_k(LAB, COR, [2], strategy="closed-form", **kw)  # type: ignore[arg-type]


def test_max_probability_at_k_is_the_ppl_rule_on_every_subset() -> None:
    lab, cor, lp = np.array(LAB[0]), np.array(COR[0]), np.array(SC[0])
    lp[3] = -np.inf  # a path with probability 0 is allowed, as in max_probability_labels
    got = selection_at_k([lab], [cor], [1, 2, 3], method="max_probability", scores=[lp])
    # by hand from the aggregator: mean credit over all subsets of each size
    for j, k in enumerate([1, 2, 3]):
        credits = []
        for sub in itertools.combinations(range(6), k):
            s = np.array(sub)
            res = max_probability_labels(lab[s], lp[s], n_clusters=3)
            corr_cl = [float(cor[s][res.labels == c].max()) if (res.labels == c).any() else 0.0
                       for c in range(3)]
            credits.append(res.credit(corr_cl))
        assert got.mean[j] == pytest.approx(np.mean(credits), abs=1e-12)
    assert got.rule == "max_probability"


def test_deepconf_has_no_selection_at_k() -> None:
    with pytest.raises(ConfigError, match="or a callable, got 'deepconf'"):
        selection_at_k(LAB, COR, [1], method="deepconf", scores=SC)


def test_compute_curves_best_of_n_and_max_probability_by_hand() -> None:
    pool = Pool.from_arrays(
        ["a", "b"], [4, 4], answer=["x", "x", "y", "z", "u", "v", "v", "w"],
        correct=[1, 1, 0, 0, 0, 1, 1, 0], scores={"rm": [0.1, 0.2, 0.9, 0.3, 0.9, 0.2, 0.7, 0.4]},
        mean_logprob=[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8],
    )
    new = compute_curves(pool, ["best_of_n", "max_probability"], [1, 2], score="rm", n_boot=20)
    assert list(new.curves) == ["best_of_n", "max_probability"]
    # k = 1: best-of-1 is a random sample; problem a has 2/4 correct, b 2/4
    np.testing.assert_allclose(new.curves["best_of_n"].per_problem[:, 0], [0.5, 0.5])
    # k = 2 by hand, max_probability: log-probs fall with the index, so each pair picks its first
    # member. Problem a (correct 1,1,0,0): every pair but (2,3) starts at 0 or 1 -> 5/6.
    # Problem b (correct 0,1,1,0): pairs (1,2), (1,3), (2,3) start at a correct sample -> 3/6.
    np.testing.assert_allclose(new.curves["max_probability"].per_problem[:, 1], [5 / 6, 3 / 6])
