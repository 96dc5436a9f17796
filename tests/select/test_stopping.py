"""ESC and Adaptive-Consistency stopping rules (docs/algorithms.md 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.select.stopping import (
    answer_counts,
    beta_stop_probability,
    dirichlet_top_probability,
    esc_affected_probability,
    esc_expected_cost,
    esc_run,
    esc_window_probability,
    normalized_answer_entropy,
    should_stop,
    window_unanimous,
)

# --- ESC -----------------------------------------------------------------------------------


def test_esc_stops_at_first_unanimous_window() -> None:
    stream = [3, 5, 3, 3, 3] + [3] * 5 + [9] * 30
    res = esc_run(stream, window=5, max_samples=40)
    assert (res.answer, res.cost, res.stopped_early) == (3, 10, True)


def test_esc_exhausts_budget_and_breaks_tie_by_first_seen() -> None:
    res = esc_run([3, 5] * 20, window=5, max_samples=40)
    assert (res.answer, res.cost, res.stopped_early) == (3, 40, False)
    res = esc_run([5, 3] * 20, window=5, max_samples=40)
    assert res.answer == 5


def test_esc_returns_window_answer_not_overall_majority() -> None:
    stream = [1, 1, 1, 2, 2] + [1, 1, 2, 2, 2] + [7] * 5
    res = esc_run(stream, window=5, max_samples=40)
    assert (res.answer, res.cost) == (7, 15)


def test_esc_short_stream_and_bad_args() -> None:
    assert esc_run([1, 2, 1, 2, 1, 2, 2], window=3, max_samples=40).cost == 6
    assert window_unanimous([None, None], no_answer="vote")  # the reference: None is a value
    assert not window_unanimous([None, None]) and not window_unanimous(["", ""])
    assert not window_unanimous([])
    with pytest.raises(ConfigError):
        esc_run([1, 2], window=5)
    with pytest.raises(ConfigError):
        esc_run([1] * 10, window=0)


def test_esc_cost_model_vectors() -> None:
    assert esc_window_probability([0.6, 0.3, 0.1], 5) == pytest.approx(0.0802)
    assert esc_expected_cost([0.6, 0.3, 0.1], 5, 40) == pytest.approx(30.403553778, abs=1e-9)
    assert esc_window_probability([0.95, 0.05], 5) == pytest.approx(0.77378125)
    assert esc_expected_cost([0.95, 0.05], 5, 40) == pytest.approx(6.461730247, abs=1e-9)
    # limits: always unanimous -> one window; never unanimous -> the whole budget
    assert esc_expected_cost([1.0], 5, 40) == pytest.approx(5.0)
    assert esc_expected_cost([0.5, 0.5], 40, 40) == pytest.approx(40.0)


def test_esc_expected_cost_matches_simulation() -> None:
    rng = np.random.default_rng(0)
    p = [0.6, 0.3, 0.1]
    costs = [esc_run(list(rng.choice(3, size=40, p=p)), 5, 40).cost for _ in range(4000)]
    assert np.mean(costs) == pytest.approx(esc_expected_cost(p, 5, 40), rel=0.02)


def test_esc_affected_probability() -> None:
    assert esc_affected_probability([0.6, 0.3, 0.1], 5, estimator="exact") == pytest.approx(
        0.3**5 + 0.1**5
    )
    # normal approximation, computed by hand: 1 - Φ(3.5 / sqrt(1.05)) + 1 - Φ(4.5 / sqrt(0.45))
    from statistics import NormalDist

    nd = NormalDist()
    want = 2 - nd.cdf(3.5 / math.sqrt(1.05)) - nd.cdf(4.5 / math.sqrt(0.45))
    assert esc_affected_probability([0.6, 0.3, 0.1], 5) == pytest.approx(want, rel=1e-12)


# --- Adaptive-Consistency --------------------------------------------------------------------

BETA_TABLE = [
    (["A"], 0.75, False),
    (["A", "A"], 0.875, False),
    (["A"] * 4 + ["B"], 0.890625, False),
    (["A"] * 5, 0.984375, True),
    (["A", "A", "B", "C"], 0.6875, False),
    (["A"] * 6 + ["B"] * 2 + ["C"], 0.910156, False),
]


@pytest.mark.parametrize(("answers", "prob", "stop"), BETA_TABLE)
def test_beta_table(answers: list[str], prob: float, stop: bool) -> None:
    d = should_stop(answers, "beta")
    assert d.score == pytest.approx(prob, abs=1e-6)
    assert d.stop is stop
    assert d.answer == "A"


def test_beta_matches_quadrature_and_is_stable_for_large_counts() -> None:
    from scipy.integrate import quad

    for v1, v2 in [(3, 1), (7, 4), (12, 0)]:
        num = quad(lambda x, a=v1, b=v2: x**a * (1 - x) ** b, 0.5, 1)[0]
        den = quad(lambda x, a=v1, b=v2: x**a * (1 - x) ** b, 0, 1)[0]
        assert beta_stop_probability(v1, v2) == pytest.approx(num / den, rel=1e-10)
    # large counts: normal approximation of Beta(3001, 2901) at 0.5
    a, b = 3001.0, 2901.0
    mean = a / (a + b)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    from statistics import NormalDist

    want = 1 - NormalDist(mean, sd).cdf(0.5)
    assert beta_stop_probability(3000, 2900) == pytest.approx(want, abs=1e-3)
    assert beta_stop_probability(2000, 0) == 1.0
    assert beta_stop_probability(0, 2000) == pytest.approx(0.5**2001, rel=1e-9)


@pytest.mark.parametrize(
    ("counts", "quad_value", "mc_value"),
    [
        ((3, 1, 1), 0.697702, 0.697168),
        ((5, 2, 1), 0.817965, 0.818391),
        ((2, 1, 1), 0.535494, 0.535073),
        ((8, 1, 1), 0.979379, 0.979318),
    ],
)
def test_dirichlet_vectors(counts: tuple[int, ...], quad_value: float, mc_value: float) -> None:
    assert dirichlet_top_probability(counts) == pytest.approx(quad_value, abs=2e-6)
    mc = dirichlet_top_probability(counts, estimator="mc", n_draws=200_000, seed=0)
    assert mc == pytest.approx(quad_value, abs=5 * 0.5 / math.sqrt(200_000))
    assert dirichlet_top_probability(counts, estimator="mc", n_draws=1000, seed=3) == (
        dirichlet_top_probability(counts, estimator="mc", n_draws=1000, seed=3)
    )
    del mc_value  # the listed MC value used another generator stream


def test_dirichlet_two_categories_equals_beta() -> None:
    assert dirichlet_top_probability([4, 1]) == pytest.approx(beta_stop_probability(4, 1), abs=1e-7)


def test_dirichlet_criterion_and_fallback() -> None:
    d = should_stop(["A", "A", "A", "B", "C"], "dirichlet")
    assert d.criterion == "dirichlet"
    assert d.score == pytest.approx(0.697702, abs=2e-6)
    assert not d.stop
    d2 = should_stop(["A"] * 4 + ["B"], "dirichlet")
    assert d2.criterion == "beta"
    assert d2.score == pytest.approx(0.890625)
    # only the top_k most common answers enter the integral
    many = ["A"] * 8 + ["B", "C", "D", "E", "F", "G"]
    full = dirichlet_top_probability([8, 1, 1, 1, 1, 1, 1])
    top3 = dirichlet_top_probability([8, 1, 1])
    assert should_stop(many, "dirichlet", top_k=3).score == pytest.approx(top3)
    assert should_stop(many, "dirichlet", top_k=10).score == pytest.approx(full)


def test_entropy_and_majority() -> None:
    assert normalized_answer_entropy([3]) == pytest.approx(0.811278, abs=1e-6)
    assert not should_stop(["A"] * 3, "entropy").stop  # padded to [3, 1]
    assert should_stop(["A"] * 4, "entropy").stop
    d = should_stop(["A"] * 4 + ["B"], "entropy")
    assert d.score == pytest.approx(0.721928, abs=1e-6) and d.stop
    m = should_stop(["A"] * 4 + ["B"], "majority")
    assert m.score == pytest.approx(0.8) and m.stop
    assert not should_stop(["A"], "majority").stop  # needs more than one answer
    assert not should_stop(["A"], "entropy").stop


def test_invalid_answers_ignored_and_ties_first_seen() -> None:
    assert answer_counts(["B", None, "A", " ", "A", "B"]) == [("B", 2), ("A", 2)]
    d = should_stop([None, ""], "beta")
    assert not d.stop and d.n == 0 and d.answer is None and math.isnan(d.score)
    assert should_stop(["B", "A", None], "majority").answer == "B"


def test_random_criterion_is_seeded() -> None:
    a = [should_stop(["A", "B"], "random", seed=s).stop for s in range(200)]
    b = [should_stop(["A", "B"], "random", seed=s).stop for s in range(200)]
    assert a == b
    assert 5 <= sum(a) <= 40  # p = 0.1


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError):
        should_stop(["A"], "vote")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        dirichlet_top_probability([3])
    with pytest.raises(ConfigError):
        dirichlet_top_probability([3, 1], estimator="grid")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        esc_expected_cost([0.5, 0.5], window=10, max_samples=5)
    with pytest.raises(ConfigError):
        esc_window_probability([1.5])
