"""Coverage power law (docs/algorithms.md 1.2) and imperfect-verifier models (section 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.metrics.scaling import (
    PowerLawFit,
    accuracy_ceiling,
    bootstrap_power_law,
    empirical_reward_at_k,
    false_negative_tasks,
    fit_power_law,
    fit_two_type,
    optimal_k,
    single_type_utility,
    two_type_utility,
    verifier_rates,
)

KS = 2.0 ** np.arange(11)
GIVEN = [0.30, 0.42, 0.53, 0.62, 0.70, 0.76, 0.81, 0.85, 0.88, 0.905, 0.925]


@pytest.mark.parametrize("method", ["loglog", "nls"])
def test_power_law_recovers_synthetic_parameters(method: str) -> None:
    cov = np.exp(-1.5 * KS**-0.35)
    np.testing.assert_allclose(
        cov[:4], [0.22313, 0.30824, 0.397183, 0.48459], atol=5e-6
    )  # the listed curve
    fit = fit_power_law(KS, cov, method)  # type: ignore[arg-type]
    assert fit.a == pytest.approx(-1.5, rel=1e-6)
    assert fit.b == pytest.approx(-0.35, rel=1e-6)
    assert fit.method == method
    assert fit.n_points == 11


def test_power_law_given_curve_vectors() -> None:
    ols = fit_power_law(KS, GIVEN, "loglog")
    assert ols.a == pytest.approx(-1.1105590, abs=1e-7)
    assert ols.b == pytest.approx(-0.3911933, abs=1e-7)
    nls = fit_power_law(KS, GIVEN, "nls")
    assert nls.a == pytest.approx(-1.1831219, abs=1e-6)
    assert nls.b == pytest.approx(-0.4253843, abs=1e-6)


def test_predict_and_samples_needed_are_inverse() -> None:
    fit = fit_power_law(KS, GIVEN)
    for target in (0.2, 0.5, 0.95, 0.999):
        k = fit.samples_needed(target)
        assert float(fit.predict(k)) == pytest.approx(target, rel=1e-12)
    assert float(fit.predict(1.0)) == pytest.approx(math.exp(fit.a))
    with pytest.raises(ConfigError):
        fit.samples_needed(1.0)
    empty = np.zeros(0)
    for b in (0.0, -1e-12):  # (almost) flat curves never get from 0.5 to 0.9
        flat = PowerLawFit(math.log(0.5), b, "loglog", empty, empty)
        with pytest.raises(ConfigError):
            flat.samples_needed(0.9)
    rising_wrongly = PowerLawFit(0.3, -0.5, "loglog", empty, empty)  # a > 0: c > 1
    with pytest.raises(ConfigError):
        rising_wrongly.samples_needed(0.9)


def test_points_at_zero_or_one_are_dropped() -> None:
    cov = list(np.exp(-1.5 * KS**-0.35))
    fit = fit_power_law(np.r_[KS, 2048, 4096], [*cov, 1.0, 1.0])
    assert fit.n_points == 11
    assert fit.b == pytest.approx(-0.35, rel=1e-6)
    with pytest.raises(ConfigError):
        fit_power_law([1, 2, 4], [0.0, 1.0, 0.5])
    with pytest.raises(ConfigError):
        fit_power_law([2, 2], [0.3, 0.4])  # one distinct k
    with pytest.raises(ConfigError):
        fit_power_law([1, 2], [0.3, 0.4], "cubic")  # type: ignore[arg-type]


def test_bootstrap_power_law_brackets_truth() -> None:
    # Problems with per-problem success rates drawn so the population coverage is smooth.
    rng = np.random.default_rng(0)
    rates = rng.beta(0.3, 1.2, size=400)
    n = np.full(400, 256)
    c = rng.binomial(n, rates)
    ks = 2 ** np.arange(9)
    res = bootstrap_power_law(n, c, ks, n_boot=300, seed=1)
    assert res.a_low <= res.fit.a <= res.a_high
    assert res.b_low <= res.fit.b <= res.b_high
    assert res.a_samples.size + res.n_failed == 300
    lo, hi = res.predict_interval([4, 1024])
    assert (lo <= hi).all()
    again = bootstrap_power_law(n, c, ks, n_boot=300, seed=1)
    assert again.a_low == res.a_low  # seeded


def test_bootstrap_power_law_nls_runs() -> None:
    rng = np.random.default_rng(4)
    n = np.full(80, 64)
    c = rng.binomial(n, rng.beta(0.4, 1.0, size=80))
    res = bootstrap_power_law(n, c, [1, 2, 4, 8, 16, 32], method="nls", n_boot=50, seed=0)
    assert res.fit.method == "nls"
    assert res.b_low <= res.b_high


# --- imperfect verifiers -------------------------------------------------------------------

TABLE = {
    -0.7: (
        [0.48206, 0.552581, 0.554134, 0.549084, 0.545162],
        3,
        [0.48206, 0.523874, 0.524567, 0.522426, 0.520777],
        3,
    ),
    -1.0: (
        [0.449, 0.488433, 0.463704, 0.44068, 0.424946],
        2,
        [0.449, 0.472381, 0.461352, 0.451593, 0.444976],
        2,
    ),
    -2.0: (
        [0.3388, 0.274607, 0.162271, 0.079335, 0.024225],
        1,
        [0.3388, 0.300737, 0.250637, 0.215482, 0.192304],
        1,
    ),
}


@pytest.mark.parametrize("v_fp", sorted(TABLE))
def test_two_type_table(v_fp: float) -> None:
    nb, k_nb, ex, k_ex = TABLE[v_fp]
    u_nb = two_type_utility(15, v_fp=v_fp, mode="notebook")
    u_ex = two_type_utility(15, v_fp=v_fp, mode="exact")
    np.testing.assert_allclose(u_nb[:5], nb, atol=1e-6)
    np.testing.assert_allclose(u_ex[:5], ex, atol=1e-6)
    assert optimal_k(u_nb) == k_nb
    assert optimal_k(u_ex) == k_ex


def test_exact_mode_is_mixture_of_single_types() -> None:
    ks = np.arange(1, 16)
    mix = 0.58 * single_type_utility(ks, 0.87, 1.0, 0.75, -1.3) + 0.42 * single_type_utility(
        ks, 0.13, 1.0, 0.75, -1.3
    )
    np.testing.assert_allclose(two_type_utility(15, v_fp=-1.3), mix, rtol=1e-12)


def test_single_type_utility_and_ceiling() -> None:
    np.testing.assert_allclose(
        accuracy_ceiling([0.87, 0.13], 1.0, 0.75), [0.963989, 0.374101], atol=1e-6
    )
    # β = 0.0975, per-attempt gain 0.87 − 0.0325 = 0.8375
    u = single_type_utility([0, 1, 2, np.inf], 0.87, 1.0, 0.75, -1.0)
    np.testing.assert_allclose(u, [0.0, 0.8375, 0.8375 * 1.0975, 0.8375 / 0.9025], rtol=1e-12)
    # a verifier that never accepts is worth nothing at any budget
    assert single_type_utility(5, 0.5, 0.0, 1.0, -1.0) == 0.0
    assert math.isnan(float(accuracy_ceiling(0.5, 0.0, 1.0)))


def test_empirical_reward_vectors() -> None:
    ks = [1, 2, 5, 10]
    r0 = empirical_reward_at_k(10, 2, 1, ks, 0.0)
    np.testing.assert_allclose(r0, [0.2, 0.355556, 0.611111, 0.666667], atol=1e-6)
    r1 = empirical_reward_at_k(10, 2, 1, ks, 1.0)
    np.testing.assert_allclose(r1, [0.1, 0.177778, 0.305556, 0.333333], atol=1e-6)
    r4 = empirical_reward_at_k(10, 2, 1, ks, 4.0)
    np.testing.assert_allclose(r4, [-0.2, -0.355556, -0.611111, -0.666667], atol=1e-6)
    assert optimal_k(r0, ks) == 10
    assert optimal_k(r4, ks) == 0
    # k > n is capped at n; tasks are averaged with equal weight; m = 0 contributes 0
    np.testing.assert_allclose(empirical_reward_at_k(10, 2, 1, [50], 0.0), [2 / 3])
    both = empirical_reward_at_k([10, 4], [2, 0], [1, 0], [1, 2], 0.0)
    np.testing.assert_allclose(both, [0.1, 0.355556 / 2], atol=1e-6)


def test_empirical_reward_matches_simulation() -> None:
    # The reference estimates it with random permutations: first accepted sample within k.
    rng = np.random.default_rng(0)
    n, tp, fp, cr = 12, 2, 3, 2.0
    labels = np.array([1] * tp + [2] * fp + [0] * (n - tp - fp))
    ks = np.array([1, 3, 6])
    sims = np.zeros(len(ks))
    trials = 20000
    for _ in range(trials):
        perm = rng.permutation(labels)
        acc = np.flatnonzero(perm > 0)
        first, lab = acc[0] + 1, perm[acc[0]]
        sims += np.where(ks >= first, 1.0 if lab == 1 else -cr, 0.0)
    np.testing.assert_allclose(sims / trials, empirical_reward_at_k(n, tp, fp, ks, cr), atol=0.02)


def test_optimal_k_first_max_and_abstain() -> None:
    assert optimal_k([0.1, 0.3, 0.3, 0.2]) == 2
    assert optimal_k([-0.1, -0.05]) == 0
    assert optimal_k([0.1, 0.4], ks=[4, 16]) == 16
    with pytest.raises(ConfigError):
        optimal_k([])


def test_verifier_rates() -> None:
    weak = [1, 1, 1, 0, 0, 1, 0]
    strong = [1, 0, 1, 1, 0, 1, 0]
    r = verifier_rates(weak, strong)
    assert (r.tp, r.fp, r.fn, r.tn) == (3, 1, 1, 2)
    assert r.completeness == pytest.approx(0.75)
    assert r.soundness == pytest.approx(2 / 3)
    assert r.false_positive_rate == pytest.approx(1 / 3)
    assert r.false_negative_rate == pytest.approx(0.25)
    assert r.precision == pytest.approx(0.75)
    assert math.isnan(verifier_rates([1], [1]).soundness)


@pytest.mark.parametrize(
    "call",
    [
        lambda: two_type_utility(0),
        lambda: two_type_utility(5, priors=(0.5, 0.6)),
        lambda: two_type_utility(5, r=(0.5,)),
        lambda: two_type_utility(5, mode="approx"),  # type: ignore[arg-type]
        lambda: single_type_utility(3, 1.2, 1.0, 0.5, -1.0),
        lambda: empirical_reward_at_k(5, 4, 3, [1]),
        lambda: empirical_reward_at_k(5, 1, 1, [1], cost_ratio=-1),
        lambda: verifier_rates([1, 0], [1]),
    ],
)
def test_bad_arguments_raise(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        call()


# --- imperfect verifiers on real runs: K axis, empty tasks, false negatives, two-type fit ---


def test_each_task_stays_flat_past_its_own_n() -> None:
    # issue 12's minimal case: task A has 1 sample (passes weak and strong); task B has 4, only
    # the last passes both. A: reward 1 at every k. B: the accepted sample is among the first k
    # of a random order with probability k/4. Mean: (1 + k/4)/2 = 0.625, 0.75, 0.875, 1.
    u = empirical_reward_at_k([1, 4], [1, 1], [0, 0], [1, 2, 3, 4], cost_ratio=1.0)
    np.testing.assert_allclose(u, [0.625, 0.75, 0.875, 1.0], rtol=1e-12)
    assert optimal_k(u, [1, 2, 3, 4]) == 4
    # the reference procedure: random permutations, first accepted sample within the first k
    rng = np.random.default_rng(5)
    sims = np.zeros(4)
    trials = 4000
    for _ in range(trials):
        first_b = int(np.flatnonzero(rng.permutation([0, 0, 0, 1]))[0]) + 1
        sims += (1.0 + (np.arange(1, 5) >= first_b)) / 2
    np.testing.assert_allclose(sims / trials, u, atol=0.03)


def test_tasks_with_zero_samples_are_handled_explicitly() -> None:
    n, tp, fp, ks = [1, 4, 0], [1, 1, 0], [0, 0, 0], [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="no samples"):
        empirical_reward_at_k(n, tp, fp, ks)
    np.testing.assert_allclose(
        empirical_reward_at_k(n, tp, fp, ks, empty="drop"), [0.625, 0.75, 0.875, 1.0]
    )
    # counted as an abstention: (1 + k/4 + 0)/3
    np.testing.assert_allclose(
        empirical_reward_at_k(n, tp, fp, ks, empty="zero"), [1.25 / 3, 0.5, 1.75 / 3, 2 / 3]
    )
    with pytest.raises(ConfigError):
        empirical_reward_at_k([0], [0], [0], ks, empty="drop")
    with pytest.raises(ConfigError):
        empirical_reward_at_k(n, tp, fp, ks, empty="ignore")  # type: ignore[arg-type]


def test_false_negative_tasks_rule() -> None:
    # strong pass count > weak pass count (same n): the weak verifier rejects correct programs
    np.testing.assert_array_equal(
        false_negative_tasks([4, 3, 1, 0], [4, 2, 0, 1]), [False, False, False, True]
    )
    with pytest.raises(ConfigError):
        false_negative_tasks([1, 2], [1])


# four tasks (n, weak, strong, both); strong pass rates P = 1, 0.5, 0, 0.1
FIT_TASKS = ([4, 4, 2, 10], [4, 3, 1, 0], [4, 2, 0, 1], [4, 2, 0, 0])


def test_fit_two_type_paper_estimator_by_hand() -> None:
    # easy: P > 0.5 -> only task 1 (P = 0.5 is hard). r_easy = 1, r_hard = (0.5 + 0 + 0.1)/3 = 0.2,
    # p_easy = 1/4. mean B = (1 + .75 + .5 + 0)/4 = .5625, mean P = .4, mean G over tasks with
    # weak > 0 = (1 + 2/3 + 0)/3 = 5/9; s = (1 - .5625 - .4 + 5/9 * .5625)/(1 - .4) = .35/.6 = 7/12
    f = fit_two_type(*FIT_TASKS, estimator="paper")
    assert f.r == pytest.approx((1.0, 0.2), rel=1e-12)
    assert f.priors == pytest.approx((0.25, 0.75))
    assert f.completeness == 1.0
    assert f.soundness == pytest.approx(7 / 12, rel=1e-12)
    assert f.n_tasks == 4 and f.notes == ()


def test_fit_two_type_paper_estimator_matches_a_transcription_of_the_notebook() -> None:
    # the reference's calculate_model_params, spelled out with plain loops on random tasks
    rng = np.random.default_rng(11)
    n = rng.integers(1, 30, 40)
    strong = rng.binomial(n, rng.uniform(0, 1, 40))
    both = rng.binomial(strong, 0.9)
    weak = both + rng.binomial(n - strong, 0.3)
    rows = []
    for i in range(40):
        base_rate, plus_rate = weak[i] / n[i], strong[i] / n[i]
        given = both[i] / weak[i] if weak[i] else None
        rows.append((plus_rate, base_rate, given))
    hi = [p for p, _, _ in rows if p > 0.5]
    lo = [p for p, _, _ in rows if p <= 0.5]
    mean_b = sum(b for _, b, _ in rows) / 40
    mean_p = sum(p for p, _, _ in rows) / 40
    gs = [g for _, _, g in rows if g is not None]
    s = (1 - mean_b - mean_p + sum(gs) / len(gs) * mean_b) / (1 - mean_p)
    f = fit_two_type(n, weak, strong, both, estimator="paper")
    assert f.r == pytest.approx((sum(hi) / len(hi), sum(lo) / len(lo)), rel=1e-12)
    assert f.priors[0] == pytest.approx(len(hi) / 40)
    assert f.soundness == pytest.approx(s, rel=1e-12)


def test_fit_two_type_pooled_estimator_by_hand() -> None:
    # r_easy = 4/4, r_hard = (2 + 0 + 1)/(4 + 2 + 10) = 3/16; c = sum both / sum strong = 6/7;
    # wrong samples rejected: 0 + 1 + 1 + 9 = 11 of 0 + 2 + 2 + 9 = 13 wrong -> s = 11/13
    f = fit_two_type(*FIT_TASKS, estimator="pooled")
    assert f.r == pytest.approx((1.0, 3 / 16), rel=1e-12)
    assert f.priors == pytest.approx((0.25, 0.75))
    assert f.completeness == pytest.approx(6 / 7, rel=1e-12)
    assert f.soundness == pytest.approx(11 / 13, rel=1e-12)
    u = f.utility(6, -2.0, mode="notebook")
    np.testing.assert_allclose(
        u,
        two_type_utility(6, r=(1.0, 3 / 16), priors=(0.25, 0.75), c=6 / 7, s=11 / 13, v_fp=-2.0,
                         mode="notebook"),
        rtol=1e-12,
    )


def test_fit_two_type_with_one_empty_type_is_the_single_type_model() -> None:
    # all tasks hard: r_hard = mean P = (0.25 + 0.5)/2, pooled soundness 1 - 1/5 (1 fp of 5 wrong)
    f = fit_two_type([4, 4], [2, 2], [1, 2], [1, 1], estimator="pooled")
    assert f.priors == (0.0, 1.0) and math.isnan(f.r[0]) and len(f.notes) == 1
    assert f.soundness == pytest.approx((5 - 2) / 5)
    u = f.utility(5, -1.0)
    np.testing.assert_allclose(
        u, single_type_utility(np.arange(1, 6), 3 / 8, 2 / 3, 3 / 5, -1.0), rtol=1e-12
    )
    assert f.to_dict()["r_easy"] is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: fit_two_type([2], [1], [2], [2]),  # both > weak
        lambda: fit_two_type([0], [0], [0], [0]),  # an empty task
        lambda: fit_two_type([2], [2], [2], [2]),  # no wrong sample: soundness undefined
        lambda: fit_two_type([2], [1], [1], [1], estimator="mle"),  # type: ignore[arg-type]
        lambda: fit_two_type([2], [1], [1], [1], threshold=1.0),
    ],
)
def test_fit_two_type_bad_input(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        call()
