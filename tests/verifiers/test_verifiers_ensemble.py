"""Verifier ensembles: z-scoring, aggregators (ALGORITHMS 8 vector) and the cost-aware cascade."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.select.ensemble import argmax_first
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.verifiers.ensemble import EnsembleVerifier

PROBLEM = Problem(id="p", prompt="?")


class Fixed:
    """A verifier returning fixed scores by sample index; counts the candidates it was shown."""

    def __init__(self, name: str, scores: Sequence[float | None], cost: float = 1.0) -> None:
        self.name = name
        self.scores = list(scores)
        self.cost = cost
        self.seen: list[int] = []

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        out = []
        for s in samples:
            self.seen.append(s.index)
            x = self.scores[s.index]
            status = VerdictStatus.ERROR if x is None else VerdictStatus.SCORED
            out.append(
                Verdict(
                    problem_id=problem.id, index=s.index, status=status, verifier=self.name, score=x
                )
            )
        return out

    def info(self) -> dict[str, Any]:
        return {"fixed": True}


def samples(answers: Sequence[str | None]) -> list[Sample]:
    return [Sample(problem_id="p", index=i, text="", answer=a) for i, a in enumerate(answers)]


# ALGORITHMS 8 test vector (already z-normalised).
R8 = [[1.2, 0.4, 2.5, 0.9], [1.0, 0.6, -0.8, 1.1], [1.4, 0.5, 2.2, 0.7]]
TABLE8 = [
    ("mean", 1.0, [1.2, 0.5, 1.3, 0.9], 2),
    ("median", 1.0, [1.2, 0.5, 2.2, 0.9], 2),
    ("min", 1.0, [1.0, 0.4, -0.8, 0.7], 0),
    ("mean_minus_std", 1.0, [1.036701, 0.418350, -0.189966, 0.736701], 0),
    ("mean_minus_std", 0.5, [1.118350, 0.459175, 0.555017, 0.818350], 0),
    ("mean_minus_var", 0.5, [1.186667, 0.496667, 0.190000, 0.886667], 0),
]


@pytest.mark.parametrize(("aggregate", "lam", "values", "pick"), TABLE8)
def test_section_8_vector(aggregate: str, lam: float, values: list[float], pick: int) -> None:
    members = [Fixed(f"m{k}", row) for k, row in enumerate(R8)]
    ens = EnsembleVerifier(members, aggregation=aggregate, lam=lam, normalize=None)
    verdicts = ens.verify(PROBLEM, samples(["a", "b", "c", "d"]))
    got = [v.score for v in verdicts]
    np.testing.assert_allclose(got, values, atol=5e-7)
    assert argmax_first(got) == pick
    assert all(v.status is VerdictStatus.SCORED and v.verifier == "ensemble" for v in verdicts)
    assert verdicts[2].meta["members"] == {"m0": 2.5, "m1": -0.8, "m2": 2.2}


def test_single_member_reduces_to_its_score() -> None:
    for agg in ("mean", "median", "min", "mean_minus_std", "mean_minus_var"):
        v = EnsembleVerifier([Fixed("a", [0.3, -1.0])], aggregation=agg, normalize=None)
        assert [x.score for x in v.verify(PROBLEM, samples(["x", "y"]))] == [0.3, -1.0]


def test_zscore_per_member_on_the_problem() -> None:
    big = [100.0, 300.0, 200.0, 0.0]
    small = [0.3, 0.1, 0.2, 0.4]
    ens = EnsembleVerifier([Fixed("big", big), Fixed("small", small)])
    got = [v.score for v in ens.verify(PROBLEM, samples("abcd"))]
    zb = (np.array(big) - np.mean(big)) / np.std(big)
    zs = (np.array(small) - np.mean(small)) / np.std(small)
    np.testing.assert_allclose(got, (zb + zs) / 2, atol=1e-12)
    # Without normalisation the large-scale member decides alone.
    raw = EnsembleVerifier([Fixed("big", big), Fixed("small", small)], normalize=None)
    assert argmax_first([v.score for v in raw.verify(PROBLEM, samples("abcd"))]) == 1


def test_zscore_against_reference_scores() -> None:
    ref = {"a": [0.0, 2.0], "b": [10.0, 20.0, 30.0]}  # mu/sigma: (1, 1) and (20, 8.1650)
    ens = EnsembleVerifier([Fixed("a", [1.0, 3.0]), Fixed("b", [20.0, 10.0])], reference_scores=ref)
    got = [v.score for v in ens.verify(PROBLEM, samples("xy"))]
    sb = np.std([10.0, 20.0, 30.0])
    np.testing.assert_allclose(got, [(0.0 + 0.0) / 2, (2.0 + (-10.0 / sb)) / 2], atol=1e-12)
    by_position = EnsembleVerifier(
        [Fixed("a", [1.0, 3.0]), Fixed("b", [20.0, 10.0])], reference_scores=[ref["a"], ref["b"]]
    )
    assert [v.score for v in by_position.verify(PROBLEM, samples("xy"))] == pytest.approx(got)


def test_missing_member_scores_are_left_out() -> None:
    a = Fixed("a", [1.0, None, None])
    b = Fixed("b", [3.0, 5.0, None])
    v = EnsembleVerifier([a, b], normalize=None).verify(PROBLEM, samples("xyz"))
    assert v[0].score == 2.0 and v[1].score == 5.0
    assert v[2].status is VerdictStatus.ERROR and math.isnan(v[2].score)
    assert v[1].meta["members"] == {"a": None, "b": 5.0}


def test_members_run_cheap_first() -> None:
    calls: list[str] = []

    class Logged(Fixed):
        def verify(self, problem, samples):  # type: ignore[no-untyped-def]
            calls.append(self.name)
            return super().verify(problem, samples)

    ens = EnsembleVerifier(
        [Logged("exp", [1, 2], cost=10), Logged("cheap", [2, 1], cost=0.5), Logged("mid", [0, 0])]
    )
    ens.verify(PROBLEM, samples("xy"))
    assert calls == ["cheap", "mid", "exp"]
    assert [lv for lv in ens.info()["levels"]] == [["cheap"], ["mid"], ["exp"]]
    calls.clear()
    EnsembleVerifier(
        [Logged("exp", [1, 2], cost=10), Logged("cheap", [2, 1])], order="given"
    ).verify(PROBLEM, samples("xy"))
    assert calls == ["exp", "cheap"]


def test_cascade_runs_expensive_member_on_contention_only() -> None:
    # Answers: clusters A = {0, 3}, B = {1, 4}, C = {2}, and 5 with no answer (its own cluster).
    answers = ["A", "B", "C", "A", "B", None]
    cheap1 = Fixed("cheap1", [2.0, 1.8, 0.0, 0.1, 0.2, -1.0], cost=1)
    cheap2 = Fixed("cheap2", [2.0, 1.8, 0.0, 0.1, 0.2, -1.0], cost=1)
    expensive = Fixed("judge", [0.0, 5.0, 9.0, 1.0, 4.0, 9.0], cost=50)
    ens = EnsembleVerifier([expensive, cheap1, cheap2], normalize=None, margin=0.5)
    v = ens.verify(PROBLEM, samples(answers))
    # After the cheap level, cluster bests: A 2.0, B 1.8, C 0.0, {5} -1.0; top 2.0, keep >= 1.5.
    assert sorted(cheap1.seen) == [0, 1, 2, 3, 4, 5] and cheap2.seen == cheap1.seen
    assert sorted(expensive.seen) == [0, 1, 3, 4]  # fewer candidates than the cheap members
    assert ens.info()["scored_counts"] == {"cheap1": 6, "cheap2": 6, "judge": 4}
    means = {0: 4 / 3, 1: 8.6 / 3, 3: 1.2 / 3, 4: 4.4 / 3}
    for j, want in means.items():
        assert v[j].score == pytest.approx(want) and v[j].status is VerdictStatus.SCORED
    for j in (2, 5):
        assert v[j].score == -math.inf and v[j].meta["pruned_after"] == 0
        assert v[j].meta["members"]["judge"] is None
    assert v[2].meta["partial_score"] == 0.0
    assert argmax_first([x.score for x in v]) == 1
    # Without a margin every member sees every candidate.
    full = Fixed("judge", expensive.scores, cost=50)
    EnsembleVerifier([full, Fixed("c", cheap1.scores)], normalize=None).verify(
        PROBLEM, samples(answers)
    )
    assert sorted(full.seen) == list(range(6))


def test_cascade_keeps_whole_clusters_and_zero_margin_keeps_ties() -> None:
    # Candidate 2 scores low but shares answer "A" with the leader: it stays in contention.
    cheap = Fixed("c", [3.0, 1.0, -2.0, 3.0], cost=1)
    exp = Fixed("e", [0.0, 0.0, 0.0, 0.0], cost=2)
    EnsembleVerifier([cheap, exp], normalize=None, margin=0.0).verify(
        PROBLEM, samples(["A", "B", "A", "D"])
    )
    assert sorted(exp.seen) == [0, 2, 3]


def test_cascade_treats_blank_answers_as_no_answer() -> None:
    # Blank answers are no answer (each its own cluster), as in every aggregator: the low "" at
    # index 2 is not carried into contention by the leading "" at index 0.
    cheap = Fixed("c", [3.0, 1.0, -2.0, 3.0], cost=1)
    exp = Fixed("e", [0.0, 0.0, 0.0, 0.0], cost=2)
    EnsembleVerifier([cheap, exp], normalize=None, margin=0.0).verify(
        PROBLEM, samples(["", "B", "", "D"])
    )
    assert sorted(exp.seen) == [0, 3]


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        EnsembleVerifier([])
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        EnsembleVerifier([Fixed("a", [1])], aggregation="max")
    with pytest.raises(ConfigError, match="margin"):
        EnsembleVerifier([Fixed("a", [1])], margin=-1)
    with pytest.raises(ConfigError, match="reference_scores"):
        EnsembleVerifier([Fixed("a", [1]), Fixed("b", [1])], reference_scores={"a": [1.0]})
    with pytest.raises(ConfigError, match="normalize"):
        EnsembleVerifier([Fixed("a", [1])], normalize=None, reference_scores={"a": [1.0]})
    with pytest.raises(ConfigError, match="cost"):
        EnsembleVerifier([Fixed("a", [1], cost=-1)])
    with pytest.raises(ConfigError, match="not a verifier"):
        EnsembleVerifier([object()])


def test_info_lists_members_and_cost() -> None:
    ens = EnsembleVerifier([Fixed("a", [1.0], cost=2), Fixed("b", [1.0], cost=3)], aggregation="min")
    info = ens.info()
    assert [m["name"] for m in info["members"]] == ["a", "b"] and info["aggregation"] == "min"
    assert ens.cost == 5.0 and info["members"][0]["info"] == {"fixed": True}


def test_repeated_member_names_are_made_unique() -> None:
    ens = EnsembleVerifier(
        [Fixed("a", [1.0]), Fixed("a", [3.0]), Fixed("a#2", [5.0])], normalize=None
    )
    assert ens.member_names == ["a", "a#2", "a#2#2"]
    (v,) = ens.verify(PROBLEM, samples("x"))
    assert v.meta["members"] == {"a": 1.0, "a#2": 3.0, "a#2#2": 5.0} and v.score == 3.0


def test_verify_many_batches_each_level_across_problems() -> None:
    class Batched(Fixed):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.batches: list[int] = []

        def verify_many(self, items):  # type: ignore[no-untyped-def]
            self.batches.append(len(items))
            return [self.verify(p, s) for p, s in items]

    cheap = Batched("c", [3.0, 1.0, 0.0, 2.9], cost=1)
    exp = Batched("e", [1.0, 2.0, 3.0, 4.0], cost=5)
    ens = EnsembleVerifier([cheap, exp], normalize=None, margin=0.5)
    p2 = Problem(id="p2", prompt="?")
    items = [(PROBLEM, samples(["A", "B", "C", "D"])), (p2, samples(["A", "A", "B", "C"])[:2])]
    out = ens.verify_many(items)
    assert cheap.batches == [2] and exp.batches == [2]  # one call per level for both problems
    assert [len(v) for v in out] == [4, 2]
    # problem 1: clusters A 3.0, D 2.9 stay; B, C pruned. problem 2: one cluster, all stay.
    assert [v.score for v in out[0]] == [2.0, -math.inf, -math.inf, 3.45]
    assert [v.score for v in out[1]] == [2.0, 1.5]
    assert out[1][0].problem_id == "p2"
    single = EnsembleVerifier(
        [Fixed("c", cheap.scores, cost=1), Fixed("e", exp.scores, cost=5)],
        normalize=None,
        margin=0.5,
    )
    assert [v.score for v in single.verify(*items[0])] == [v.score for v in out[0]]
