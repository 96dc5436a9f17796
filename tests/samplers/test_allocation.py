"""Budget allocation across problems (issue 18): policies, exact replay, live = replay."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.samplers.test_samplers_adaptive import PARAMS, PROBLEMS, full_pool, last_char, responder
from ttscale.allocation import allocation_curve, budget_grid, replay_allocation, streams_of
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.replay import replay
from ttscale.samplers import Sampler
from ttscale.samplers.allocation import AllocationSampler, read_allocation
from ttscale.select.allocation import AllocationState, greedy_gain, parse_policy
from ttscale.store import SampleStore
from ttscale.store.pool import Pool


def scattered_pool(P: int = 40, n: int = 12, seed: int = 0) -> Pool:
    rng = np.random.default_rng(seed)
    answers: list[str] = []
    correct: list[bool] = []
    toks: list[int] = []
    for _ in range(P):
        p = rng.dirichlet([0.6] * 4)
        a = rng.choice(4, size=n, p=p)
        answers += [str(x) for x in a]
        correct += [bool(x == 0) for x in a]
        toks += [int(t) for t in rng.integers(5, 60, size=n)]
    return Pool.from_arrays([f"q{i}" for i in range(P)], [n] * P, answer=answers, correct=correct, num_tokens=toks)


@pytest.mark.parametrize("n", [1, 3, 7, 12])
def test_uniform_with_n_times_problems_is_sc_at_n(n: int) -> None:
    pool = scattered_pool()
    for orders in (None, 5):
        rep = replay_allocation(pool, "uniform", n * 40, orders=orders, seed=2)
        sc = replay(pool, "fixed", orders=orders, seed=2, max_samples=n)
        # problem by problem and order by order, not just on average
        assert np.array_equal(rep.correct.mean(axis=1), sc.column("correct"))
        assert (rep.samples == n).all()
        assert np.allclose(rep.tokens.mean(axis=1), sc.column("tokens"))


def test_greedy_gain_by_enumeration() -> None:
    # one more sample, counts (1, 1, 0): the runner-up's vote (prob 2/5) changes the answer,
    # the leader's keeps it, "rest" (1/5) keeps it: 0.4
    assert greedy_gain(1, 1, 0, 1) == pytest.approx(2 / 5)
    # (1, 0, 0): a runner-up vote ties 1-1 (prob 1/4) -> 1/2 -> 0.125
    assert greedy_gain(1, 0, 0, 1) == pytest.approx(1 / 8)
    # leader two ahead: one sample cannot change it
    assert greedy_gain(2, 0, 0, 1) == 0.0
    # two samples from (2, 0, 0): both to the runner-up ties: P = 1*2/(5*6) -> 1/2 of it
    assert greedy_gain(2, 0, 0, 2) == pytest.approx(0.5 * (1 / 5) * (2 / 6))
    # against a Monte Carlo of the Dirichlet-multinomial
    rng = np.random.default_rng(0)
    v1, v2, r, h = 5, 3, 2, 4
    p = rng.dirichlet([v1 + 1, v2 + 1, r + 1], size=400_000)
    draws = np.array([rng.multinomial(h, x) for x in p[:100_000]])
    d = (v2 + draws[:, 1]) - (v1 + draws[:, 0])
    mc = np.mean(d > 0) + 0.5 * np.mean(d == 0)
    assert greedy_gain(v1, v2, r, h) == pytest.approx(mc, abs=0.006)
    assert greedy_gain(0, 0, 0, 1) == 1.0


def test_gape_index_and_choices() -> None:
    pol = parse_policy("gape:a=1")
    s = [AllocationState(answers=list("aaaa")), AllocationState(answers=list("abab")), AllocationState()]
    pri = pol.priorities(s, tokens=False)
    assert pri[0] == pytest.approx(-1 + math.sqrt(1 / 4))
    assert pri[1] == pytest.approx(0 + math.sqrt(1 / 4))
    assert pri[2] == math.inf
    assert pol.choose(s, 2) == [2, 1]
    assert parse_policy("uniform").choose(s, 3) == [2, 0, 1]  # fewest samples, then first


def test_policy_specs_and_errors() -> None:
    assert parse_policy("greedy").spec == "greedy:lookahead=1"
    assert parse_policy("greedy:3") == parse_policy("greedy:lookahead=3")
    assert parse_policy(parse_policy("gape:0.25").spec) == parse_policy("gape:a=0.25")
    for spec, msg in [("bogus", "unknown allocation policy"), ("uniform:3", "takes no value"),
                      ("greedy:lookahead=0", "positive integer"), ("gape:a=-1", "positive"),
                      ("greedy:x=1", "no parameter")]:
        with pytest.raises(ConfigError, match=msg):
            parse_policy(spec)


def test_adaptive_policies_spend_the_budget_and_respect_the_cap() -> None:
    pool = scattered_pool()
    for pol in ("greedy", "greedy:lookahead=3", "gape:a=0.5"):
        rep = replay_allocation(pool, pol, 4 * 40, orders=3, seed=0, max_samples=10)
        assert (rep.samples.sum(axis=0) == 160).all()
        assert rep.samples.max() <= 10
        # greedy moves samples: problems do not all get 4
        assert rep.samples.std() > 0
    # a stopping rule closes problems early: with budget for everything, beta spends less
    rep = replay_allocation(pool, "uniform", 12 * 40, stop="beta:0.9", orders=2, seed=0)
    assert rep.samples.sum(axis=0).max() < 12 * 40
    d = rep.to_dict()
    assert d["stop"] == "beta:threshold=0.9"


def test_token_budget() -> None:
    pool = scattered_pool()
    budget = 5000
    rep = replay_allocation(pool, "greedy", budget, tokens=True, orders=3, seed=0)
    spent = rep.tokens.sum(axis=0)
    # the last round is cut to what the remaining tokens pay for: at most a few samples over
    assert (spent >= budget).all() and (spent < budget + 3 * 60).all()
    d = rep.to_dict()
    assert d["unit"] == "tokens" and d["token_ratio"]["mean"] == pytest.approx(
        rep.tokens.mean(axis=1).sum() / rep.full_tokens.mean(axis=1).sum()
    )
    with pytest.raises(ConfigError, match="token counts"):
        replay_allocation(Pool.from_arrays(["p"], [2], answer=["a", "a"], correct=[1, 1]), "uniform", 10, tokens=True)


def test_curve_goes_from_1x_to_the_full_pool() -> None:
    assert budget_grid(10, 12) == [10, 20, 30, 40, 60, 80, 120]
    pool = scattered_pool(P=20, n=8)
    cur = allocation_curve(pool, ["greedy"], orders=2, seed=0, n_boot=100)
    assert cur["budgets"][0] == 20 and cur["budgets"][-1] == 160
    assert set(cur["curves"]) == {"uniform", "greedy:lookahead=1"}
    # at the full pool every policy has every sample: all equal SC@8
    last = [c[-1]["accuracy"]["mean"] for c in cur["curves"].values()]
    assert last == pytest.approx([cur["full"]["accuracy"]["mean"]] * 2)


@pytest.mark.parametrize("policy", ["uniform", "greedy", "gape:a=0.5"])
@pytest.mark.parametrize("tokens", [False, True])
def test_live_equals_index_order_replay(policy: str, tokens: bool) -> None:
    pool, _ = full_pool()
    budget = 900 if tokens else 70
    rep = replay_allocation(pool, policy, budget, tokens=tokens, orders=None, max_samples=16, round_size=3)
    sampler = AllocationSampler(ScriptedEngine(responder), PARAMS, policy, last_char, budget_total=budget,
                                tokens=tokens, round_size=3, batch_size=64)
    assert isinstance(sampler, Sampler)
    results = list(sampler.sample(PROBLEMS, 16, seed=3))
    assert [r.problem_id for r in results] == [p.id for p in PROBLEMS]
    per = rep.to_dict(per_problem=True)["per_problem"]
    for r, d, pr in zip(results, sampler.decisions, per, strict=True):
        assert (d.samples, d.answer, d.tokens) == (pr["samples"][0], pr["answers"][0], pr["tokens"][0]), r.problem_id
        assert len(r.candidates) == d.samples
    # one engine call per round (3 problems per round, batch 64)
    rounds = math.ceil(sum(d.samples for d in sampler.decisions) / 3)
    assert sampler.engine_calls <= rounds + 1


def test_live_records_and_resumes(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "run")
    s = AllocationSampler(ScriptedEngine(responder), PARAMS, "greedy", last_char, budget_total=50, round_size=4)
    list(s.sample(PROBLEMS, 16, seed=3, sink=store))
    rows = read_allocation(tmp_path / "run")
    assert sum(r["samples"] for r in rows) == 50 and rows[0]["policy"] == "greedy:lookahead=1"
    store.refresh()
    n_stored = len(store)
    calls: list[int] = []

    def counting(req, index, seed, params):  # type: ignore[no-untyped-def]
        calls.append(index)
        return responder(req, index, seed, params)

    again = AllocationSampler(ScriptedEngine(counting), PARAMS, "greedy", last_char, budget_total=50, round_size=4)
    list(again.sample(PROBLEMS, 16, seed=3, sink=SampleStore.open(tmp_path / "run")))
    assert calls == [] and [d.samples for d in again.decisions] == [r["samples"] for r in rows]
    assert len(SampleStore.open(tmp_path / "run")) == n_stored


def test_streams_refuse_a_pool_without_correctness() -> None:
    pool = Pool.from_arrays(["p"], [3], answer=list("aab"))
    with pytest.raises(ConfigError, match="verify"):
        streams_of(pool, orders=None)
