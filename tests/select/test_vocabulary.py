"""One meaning per word: the shared "no answer" rule, one name per parameter, one seed type."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.analysis import compute_curves
from ttscale.errors import ConfigError
from ttscale.metrics import selection_at_k
from ttscale.seeding import as_int_seed
from ttscale.select.aggregate import (
    deepconf_vote,
    majority_vote,
    map_scores,
    perplexity_consistency,
    prm_aggregate,
    weighted_vote,
)
from ttscale.select.answers import answered, is_no_answer
from ttscale.select.ensemble import aggregate_ensemble, ensemble_best_of_n
from ttscale.select.stopping import (
    answer_counts,
    dirichlet_top_probability,
    esc_affected_probability,
    esc_run,
    should_stop,
)
from ttscale.store.pool import Pool

# --- one "no answer" rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "none"),
    [(None, True), ("", True), ("  \n\t", True), ("0", False), (" 7 ", False), (0, False),
     (0.0, False), (False, False), ((), False)],
)
def test_is_no_answer(value: object, none: bool) -> None:
    assert is_no_answer(value) is none


def test_aggregators_drop_blank_answers_like_none() -> None:
    # two blank answers would have outvoted "7" when blanks were a cluster of their own
    res = majority_vote(["", " ", "7", None])
    assert res.answer == "7" and res.labels.tolist() == [-1, -1, 0, -1]
    assert res.answers == ("7",)
    pc = perplexity_consistency(["", "7"], [-0.01, -3.0])
    assert pc.answer == "7" and pc.labels.tolist() == [-1, 0]
    # DeepConf dropped "" only; whitespace is no answer too now
    dc = deepconf_vote(["  ", "a"], [9.0, 1.0])
    assert dc.answer == "a" and dc.labels.tolist() == [-1, 0]
    assert majority_vote(["", None]).answer is None


def test_stopping_and_aggregation_count_the_same_samples() -> None:
    stream = ["4", "", None, "5", " ", "5", "4", "4"]
    assert answered(stream) == ["4", "5", "5", "4", "4"]
    assert answer_counts(stream) == [("4", 3), ("5", 2)]
    assert majority_vote(stream).answer == "4"
    assert should_stop(stream, "majority").n == 5


def test_pool_codes_blank_answers_as_no_answer() -> None:
    pool = Pool.from_arrays(["p"], [3], answer=["", "  ", "x"], correct=[0, 0, 1])
    assert pool.answer.tolist()[:2] == [-1, -1] and pool.answer_values[pool.answer[2]] == "x"
    # majority@3 over the whole pool: only "x" votes -> correct (the blanks would have won 2-1)
    rep = compute_curves(pool, ["majority"], [3], n_boot=10)
    assert rep.curves["majority"].mean.tolist() == [1.0]


def test_esc_skips_missing_answers_unless_asked_to_count_them() -> None:
    stream = [None] * 5 + [3] * 5
    assert esc_run(stream, window=5) == esc_run(stream, window=5, no_answer="skip")
    res = esc_run(stream, window=5)
    assert (res.answer, res.cost, res.stopped_early) == (3, 10, True)
    ref = esc_run(stream, window=5, no_answer="vote")  # the reference: None fills window 1
    assert (ref.answer, ref.cost, ref.stopped_early) == (None, 5, True)
    # budget exhausted: plurality over the answered samples (3 first seen) vs None's 4 votes
    tail = [None, None, None, 3, 5, None]
    assert (esc_run(tail, window=3, max_samples=6).answer, esc_run(tail, 3, 6).cost) == (3, 6)
    assert esc_run(tail, window=3, max_samples=6, no_answer="vote").answer is None
    assert esc_run([None, ""], window=2, max_samples=2).answer is None
    with pytest.raises(ConfigError, match="no_answer must be one of skip, vote, got 'drop'"):
        esc_run(tail, window=3, no_answer="drop")  # type: ignore[arg-type]


# --- one name per parameter (the former names are gone) -------------------------------------


def test_score_map_is_the_one_name() -> None:
    s = np.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(map_scores(s, score_map="sigmoid"), 1.0 / (1.0 + np.exp(-s)))
    # exp weights e^0, e^-2, e^-2 (shifted by the max): "a" 1.0 beats "b" 2e^-2 = 0.27
    res = weighted_vote(["a", "b", "b"], [3.0, 1.0, 1.0], score_map="exp")
    assert res.answer == "a" and res.options["score_map"] == "exp"
    with pytest.raises(TypeError, match="mapping"):
        map_scores(s, mapping="sigmoid")  # type: ignore[call-arg]


def test_prm_aggregation_is_the_one_name() -> None:
    steps = [[0.9, 0.5], [0.8, 0.7]]
    np.testing.assert_allclose(prm_aggregate(steps, prm_aggregation="min"), [0.5, 0.7])
    with pytest.raises(TypeError, match="how"):
        prm_aggregate(steps, how="min")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="prm_aggregation must be one of last, min, prod, got 'avg'"):
        prm_aggregate(steps, "avg")  # type: ignore[arg-type]
    from ttscale.verifiers.reward import aggregate_step_scores

    assert aggregate_step_scores([0.9, 0.5], prm_aggregation="min") == 0.5
    assert aggregate_step_scores([0.9, 0.6], prm_aggregation="last") == 0.6


def test_ensemble_aggregation_is_the_one_name() -> None:
    r = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])
    np.testing.assert_allclose(aggregate_ensemble(r, aggregation="min"), [1.0, 0.0, -2.0])
    # per-candidate min [1, 1.5, -1] picks 1 (the mean [1, 1.5, 2] would pick 2)
    assert ensemble_best_of_n([[1, 1.5, 5], [1, 1.5, -1]], "min", normalize=False) == 1
    assert ensemble_best_of_n([[1, 1.5, 5], [1, 1.5, -1]], normalize=False) == 2
    from ttscale.verifiers.ensemble import EnsembleVerifier

    class Member:
        name = "m"

        def verify(self, problem, samples):  # type: ignore[no-untyped-def]
            return []

    ens = EnsembleVerifier([Member()], aggregation="median")
    assert ens.aggregation == "median" and ens.info()["aggregation"] == "median"
    assert not hasattr(ens, "aggregate")


def test_memory_mb_is_the_one_name() -> None:
    from ttscale.verifiers.math import MathVerifier
    from ttscale.verifiers.mathcheck import MathChecker

    assert MathChecker(memory_mb=300).memory_mb == 300
    assert MathChecker(memory_mb=None).memory_mb is None  # None = no limit, still expressible
    assert MathVerifier(memory_mb=512).checker.memory_mb == 512


def test_estimator_is_the_word_for_how_a_number_is_computed() -> None:
    # dirichlet: two categories with counts (3, 1): P(p0 > p1) = 1 - I_0.5(4, 2) = 0.8125 (by hand:
    # I_0.5(4, 2) = P(Bin(5, 0.5) >= 4) = 6/32)
    assert dirichlet_top_probability([3, 1], estimator="quad") == pytest.approx(26 / 32, abs=1e-8)
    # counts (2, 1, 1) after four answers: P(leader is the mode) < 0.95 -> go on
    assert not should_stop(["a", "b", "c", "a"], "dirichlet", estimator="quad").stop
    assert esc_affected_probability([0.6, 0.4], 5, estimator="exact") == pytest.approx(0.4**5)
    res = selection_at_k([[0, 0, 1]], [[1, 1, 0]], [1, 2])
    assert res.estimator == ("closed-form", "closed-form") and res.rule == "majority"
    assert not hasattr(res, "method")


# --- one seed type ------------------------------------------------------------------------


def test_as_int_seed() -> None:
    assert as_int_seed(7) == 7
    g = np.random.default_rng(3)
    expected = int(np.random.default_rng(3).integers(2**31 - 1))
    assert as_int_seed(g) == expected
    assert 0 <= as_int_seed(None) < 2**31 - 1
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        as_int_seed(-1)
    with pytest.raises(ConfigError, match="seed must be None, an int or a numpy Generator"):
        as_int_seed(1.5)  # type: ignore[arg-type]


def test_compute_curves_takes_any_seed_like_and_reports_the_int() -> None:
    rng = np.random.default_rng(0)
    corr = rng.random((6, 8)) < 0.5
    ans = np.where(corr, "r", rng.integers(0, 3, (6, 8)).astype(str))
    pool = Pool.from_arrays([f"p{i}" for i in range(6)], [8] * 6, answer=ans.ravel(),
                            correct=corr.ravel())
    via_gen = compute_curves(pool, ["majority"], [3], n_boot=50, seed=np.random.default_rng(9))
    used = int(np.random.default_rng(9).integers(2**31 - 1))
    via_int = compute_curves(pool, ["majority"], [3], n_boot=50, seed=used)
    assert via_gen.meta["seed"] == used
    np.testing.assert_array_equal(via_gen.curves["majority"].low, via_int.curves["majority"].low)


def test_cli_score_map(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from ttscale.cli.app import app

    runner = CliRunner()
    src = tmp_path / "s.jsonl"
    rows = [{"problem_id": "p", "answer": a, "correct": a == "1", "scores": {"rm": s}}
            for a, s in (("1", 0.2), ("2", 3.0), ("1", 0.1))]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "run")]).exit_code == 0
    args = ["curve", str(tmp_path / "run"), "--methods", "weighted", "--k", "3", "--json"]
    new = runner.invoke(app, [*args, "--score-map", "sigmoid"])
    assert new.exit_code == 0, new.output
    # k = 3, sigmoid weights: "1" gets s(0.2) + s(0.1) = 1.075 > "2" s(3.0) = 0.953 -> correct
    assert json.loads(new.stdout)["methods"]["weighted"]["mean"] == [1.0]
    # identity weights: "2" 3.0 > "1" 0.3 -> wrong
    ident = runner.invoke(app, [*args, "--score-map", "identity"])
    assert json.loads(ident.stdout)["methods"]["weighted"]["mean"] == [0.0]
    old = runner.invoke(app, [*args, "--score-mapping", "sigmoid"])
    assert old.exit_code != 0 and "--score-mapping" in old.output
