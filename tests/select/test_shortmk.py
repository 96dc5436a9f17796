"""short-m@k (Hassid et al., 2025): the rule on hand-derived vectors, its replay on a pool, and
the live program on the engine loop against the replay of the fixed-k run with the same seed."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import pytest

from ttscale.engines import GenerationRequest, ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers import RepeatedSampler
from ttscale.samplers.shortmk import ShortMKSampler, read_short_decisions
from ttscale.select.shortmk import ShortMK, finish_order, parse_short, replay_short, short_mk
from ttscale.store import SampleStore
from ttscale.store.pool import Pool
from ttscale.types import Completion, Problem, SamplingParams

# lengths 10, 3, 7, 3, 20: finish order 1, 3 (equal length: index order), 2, 0, 4
ANS = ["a", "b", "a", "c", "b"]
LENS = [10, 3, 7, 3, 20]


def test_finish_order_is_by_length_then_position() -> None:
    assert finish_order(LENS) == [1, 3, 2, 0, 4]


@pytest.mark.parametrize(
    ("m", "answer", "chosen", "tokens", "steps"),
    [
        # first trace only; the four others were aborted at 3 tokens each
        (1, "b", (1,), 3 + 4 * 3, 3),
        # b, c, a: a three-way tie goes to the shortest (b, length 3, first to finish)
        (3, "b", (1, 3, 2), 3 + 3 + 7 + 7 + 7, 7),
        # 0, 1, 2, 3: a 2, b 1, c 1 -> a
        (4, "a", (1, 3, 2, 0), 3 + 3 + 7 + 10 + 10, 10),
        # all five: a 2 and b 2 tie; b's shortest trace (3) is shorter than a's (7)
        (5, "b", (1, 3, 2, 0, 4), 43, 20),
    ],
)
def test_short_mk_by_hand(m: int, answer: str, chosen: tuple[int, ...], tokens: int, steps: int) -> None:
    o = short_mk(ANS, LENS, m)
    assert (o.answer, o.chosen, o.tokens, o.steps) == (answer, chosen, tokens, steps)
    assert (o.full_tokens, o.full_steps) == (43, 20)


def test_unanswered_traces_finish_but_do_not_vote() -> None:
    o = short_mk([None, "x", None], [1, 5, 2], 2)
    assert o.chosen == (0, 2) and o.answer is None
    assert short_mk([None, "x", None], [1, 5, 2], 3).answer == "x"


def test_specs() -> None:
    assert parse_short("short-3@k") == ShortMK(3)
    assert parse_short(" SHORT-1@16 ") == ShortMK(1, 16)
    assert ShortMK(3).spec == "short-3@k" and ShortMK(1, 16).spec == "short-1@16"
    assert ShortMK(3).size(8) == 8 and ShortMK(1, 4).size(8) == 4
    for bad in ("short-0@k", "short-3", "short-x@k", "short-3@k,foo"):
        with pytest.raises(ConfigError, match=r"short-m@k|m must"):
            parse_short(bad)
    with pytest.raises(ConfigError, match="at most k"):
        ShortMK(5, 3)
    with pytest.raises(ConfigError, match="budget is 8"):
        ShortMK(1, 16).size(8)
    with pytest.raises(ConfigError, match="at least 3"):
        ShortMK(3).size(2)


def _pool() -> Pool:
    # p0: short traces right; p1: short traces wrong, the long ones right
    return Pool.from_arrays(
        ["p0", "p1"],
        [4, 4],
        answer=["1", "2", "1", "2", "7", "9", "9", "9"],
        correct=[1, 0, 1, 0, 0, 1, 1, 1],
        num_tokens=[5, 9, 6, 30, 2, 10, 11, 12],
    )


def test_replay_in_index_order_by_hand() -> None:
    d = replay_short(_pool(), "short-1@k", n_boot=200)
    # p0: shortest is trace 0 (5 tokens) -> "1" right; p1: trace 0 (2) -> "7" wrong
    assert d["k"] == 4 and d["accuracy"]["mean"] == pytest.approx(0.5)
    # tokens: p0 5 + 3*5 = 20, p1 2 + 3*2 = 8; majority@4: 50 and 35
    assert d["tokens"]["mean"] == pytest.approx((20 + 8) / 2)
    assert d["fixed"]["tokens"]["mean"] == pytest.approx((50 + 35) / 2)
    assert d["wall_steps"]["mean"] == pytest.approx((5 + 2) / 2)
    assert d["fixed"]["wall_steps"]["mean"] == pytest.approx((30 + 12) / 2)
    # majority@4: p0 "1" vs "2" tie -> first seen "1" (right); p1 "9" (right)
    assert d["fixed"]["accuracy"]["mean"] == pytest.approx(1.0)
    assert d["token_ratio"] == pytest.approx(28 / 85) and d["wall_ratio"] == pytest.approx(7 / 42)
    d3 = replay_short(_pool(), "short-3@k", n_boot=200)
    # p0: traces 0, 2, 1 -> "1" x2 right; p1: 0, 1, 2 -> "9" x2 right
    assert d3["accuracy"]["mean"] == pytest.approx(1.0)
    assert d3["tokens"]["mean"] == pytest.approx(((5 + 6 + 9 + 9) + (2 + 10 + 11 + 11)) / 2)


def test_replay_random_subsets_average_the_draws() -> None:
    pool = _pool()
    d = replay_short(pool, "short-1@2", orders=20, seed=3, n_boot=200)
    # recompute the draws independently: k=2 of 4 traces per problem
    want = []
    for p, (_ans, cor, lens) in enumerate(
        [(["1", "2", "1", "2"], [1, 0, 1, 0], [5, 9, 6, 30]), (["7", "9", "9", "9"], [0, 1, 1, 1], [2, 10, 11, 12])]
    ):
        vals = []
        for j in range(20):
            pick = np.random.default_rng([3, p, j]).permutation(4)[:2]
            best = min(pick, key=lambda i: (lens[i], list(pick).index(i)))
            vals.append(cor[best])
        want.append(np.mean(vals))
    assert d["accuracy"]["mean"] == pytest.approx(float(np.mean(want)))


def test_replay_refuses_pools_without_lengths_or_too_few_traces() -> None:
    p = Pool.from_arrays(["p0"], [2], answer=["1", "2"], correct=[1, 0])
    with pytest.raises(ConfigError, match="num_tokens"):
        replay_short(p, "short-1@k")
    with pytest.raises(ConfigError, match="at least 3"):
        replay_short(_pool(), "short-3@k", max_samples=2)


PARAMS = SamplingParams(temperature=1.0, max_tokens=40, seed=0)
PROBLEMS = [Problem(id=f"p{k}", prompt=f"q{k}") for k in range(5)]


def _script(req: GenerationRequest, index: int, seed: int, params: SamplingParams) -> str:
    # lengths differ across traces (all distinct per problem); the answer is the last character
    k = int(req.problem_id[1:])
    return "z" * (2 + (index * 5 + 3 * k) % 13) + "ab"[(index + k) % 3 == 0]


def _last(p: Problem, comps: Sequence[Completion]) -> list[Hashable | None]:
    return [c.text[-1:] or None for c in comps]


@pytest.mark.parametrize("rule", ["short-1@k", "short-3@k"])
def test_live_equals_replay_of_the_fixed_run_and_counts_aborted_tokens(rule: str) -> None:
    k = 8
    full = list(RepeatedSampler(ScriptedEngine(_script), PARAMS, progress=False).sample(PROBLEMS, k))
    s = ShortMKSampler(ScriptedEngine(_script), PARAMS, rule, _last)
    live = list(s.sample(PROBLEMS, k))
    m = parse_short(rule).m
    for res, d, f in zip(live, s.decisions, full, strict=True):
        comps = [c.completion for c in f.candidates]
        o = short_mk(_last(f.problem, comps), [c.num_tokens for c in comps], m)
        assert d.chosen == tuple(comps[i].index for i in o.chosen)
        assert d.answer == o.answer
        assert [c.completion.text for c in res.candidates] == [comps[i].text for i in o.chosen]
        # the others were stopped early: fewer tokens than the full run, aborted ones counted
        assert d.aborted > 0 and d.aborted_tokens > 0
        assert res.generated_tokens == d.generated_tokens < o.full_tokens
        assert d.finished + d.aborted == k


def test_live_refuses_a_too_small_budget() -> None:
    s = ShortMKSampler(ScriptedEngine(_script), PARAMS, "short-3@k", _last)
    with pytest.raises(ConfigError, match="at least 3"):
        list(s.sample(PROBLEMS, 2))


@pytest.mark.slow
def test_live_equals_replay_on_the_tiny_model_in_vllm(vllm_engine: object, tmp_path: Path) -> None:
    """On vLLM a problem's k traces decode side by side: the first m to finish are the m
    shortest, so the live choice is the index-order replay's of the fixed-k run (same seed)."""
    params = SamplingParams(temperature=1.0, max_tokens=48, seed=11, stop=("9",))
    probs = [Problem(id=f"t{k}", prompt=f"{k} + {k} = ") for k in range(4)]
    k = 6
    full = list(RepeatedSampler(vllm_engine, params, progress=False).sample(probs, k))  # type: ignore[arg-type]
    s = ShortMKSampler(vllm_engine, params, "short-3@k", _last)  # type: ignore[arg-type]
    sink = SampleStore.create(tmp_path / "run", {"model": "tiny"})
    live = list(s.sample(probs, k, sink=sink))
    lengths = [[c.completion.num_tokens for c in f.candidates] for f in full]
    assert any(len(set(x)) > 1 for x in lengths)  # the traces differ in length
    for res, d, f in zip(live, s.decisions, full, strict=True):
        comps = [c.completion for c in f.candidates]
        o = short_mk(_last(f.problem, comps), [c.num_tokens for c in comps], 3)
        assert (d.chosen, d.answer) == (tuple(comps[i].index for i in o.chosen), o.answer)
        assert [c.completion.token_ids for c in res.candidates] == [comps[i].token_ids for i in o.chosen]
        assert res.generated_tokens <= o.full_tokens
    assert any(d.aborted_tokens for d in s.decisions)  # traces were stopped early
    # the stored run: its rows are the live decisions, its traces the fixed run's of their seeds
    rows = read_short_decisions(sink.path)
    assert [(tuple(r["chosen"]), r["answer"]) for r in rows] == [(d.chosen, d.answer) for d in s.decisions]
    fixed = {(c.completion.problem_id, c.completion.index): c.completion.token_ids for f in full for c in f.candidates}
    stored = list(SampleStore.open(sink.path).samples())
    assert len(stored) == sum(r["finished"] for r in rows)
    assert all(list(x.token_ids or []) == list(fixed[x.key]) for x in stored)
