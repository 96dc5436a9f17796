"""Step-level search (beam, DVTS, best-of-N with step scores): which branches survive given
scripted step texts and scripted scores, the token/particle-step accounting, and arith-prm."""

from __future__ import annotations

import math

import pytest

from ttscale.engines.base import GenerationError
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers.base import Fate, Sampler
from ttscale.samplers.potentials import make_potential
from ttscale.samplers.search import SearchSampler, particle_steps, select_survivors
from ttscale.types import Problem, SamplingParams

PROBLEM = Problem(id="p", prompt="Q\n", reference="0")
PARAMS = SamplingParams(temperature=1.0, max_tokens=32, seed=0, logprobs=None)


def done_text(req) -> str:
    return req.prefix + "".join(chr(t) for t in req.prefix_token_ids)


def two_steps(req, index, seed, params):
    """Step 0 of sample i writes 'a<i>' and a newline; step 1 writes 'b<i>' and ends (EOS)."""
    return f"a{index}\n" if not done_text(req) else f"b{index}"


# scores of the first-step texts; second-step texts score 0
SCORES = {"a0\n": 0.8, "a1\n": 0.9, "a2\n": 0.5, "a3\n": 0.3}


def scripted_potential(problem, texts, finished):
    return [SCORES.get(t, 0.0) for t in texts]


def run(search: str, n: int = 4, width: int = 2, responder=two_steps, potential=scripted_potential):
    s = SearchSampler(ScriptedEngine(responder), potential, PARAMS, search=search, width=width)
    assert isinstance(s, Sampler)
    (res,) = list(s.sample([PROBLEM], n, seed=0))
    return s, res


def test_select_survivors_rules():
    # beam: the 2 best overall (ties to the lower position); dvts: the best of each group
    assert select_survivors("beam", [0.8, 0.9, 0.5, 0.3], [0, 0, 1, 1], 2) == [0, 1]
    assert select_survivors("dvts", [0.8, 0.9, 0.5, 0.3], [0, 0, 1, 1], 2) == [1, 2]
    assert select_survivors("beam", [1.0, 1.0, 1.0], [0, 0, 0], 2) == [0, 1]
    assert select_survivors("beam", [float("nan"), -math.inf, 0.0], [0, 0, 0], 1) == [2]
    assert select_survivors("best_of_n", [0.1, 0.2], [0, 1], 1) == [0, 1]


def test_beam_keeps_the_global_top_n_over_m_and_expands_each_m_ways():
    _, res = run("beam")
    # step 0: a0..a3 scored .8 .9 .5 .3 -> keep the top 4/2 = 2: a0, a1 (both from subtree 0)
    # step 1: a0 -> indices 4, 5; a1 -> indices 6, 7; all end with EOS
    kept = {c.index: (c.text, c.parent) for c in res.kept}
    assert kept == {4: ("a0\nb4", 0), 5: ("a0\nb5", 0), 6: ("a1\nb6", 1), 7: ("a1\nb7", 1)}
    pruned = {c.index: c.text for c in res.candidates if c.fate is Fate.PRUNED}
    assert pruned == {2: "a2\n", 3: "a3\n"}
    # tokens: step 0 four 3-char steps ("a0\n"), step 1 four of 2 chars + EOS -> 12 + 12
    assert res.generated_tokens == 24
    assert particle_steps(res) == 8
    assert [s.ancestors for s in res.steps] == [(0, 1), ()]
    # a0 and a1 were extended; every node is a candidate holding its step's tokens
    assert sorted(c.index for c in res.candidates if c.fate is Fate.EXTENDED) == [0, 1]
    assert sum(c.completion.num_tokens for c in res.candidates) == res.generated_tokens
    assert res.info["particle_steps"] == 8
    assert res.log_weights == (0.0, 0.0, 0.0, 0.0) and not res.iid


def test_dvts_keeps_the_best_of_each_subtree():
    _, res = run("dvts")
    # subtrees {0, 1} and {2, 3}: best a1 (.9) and a2 (.5); a0 (.8) is pruned although it beats a2
    assert {c.index: (c.text, c.parent) for c in res.kept} == {
        4: ("a1\nb4", 1),
        5: ("a1\nb5", 1),
        6: ("a2\nb6", 2),
        7: ("a2\nb7", 2),
    }
    assert sorted(c.index for c in res.candidates if c.fate is Fate.PRUNED) == [0, 3]
    assert res.generated_tokens == 24


def test_bon_keeps_every_trace_with_its_final_score():
    def pot(problem, texts, finished):
        # finished texts score by their last digit: b4 -> 4, ...
        return [float(t[-1]) if f else 0.0 for t, f in zip(texts, finished, strict=True)]

    _, res = run("best_of_n", potential=pot)
    assert {c.index: (c.text, c.parent) for c in res.kept} == {
        4: ("a0\nb4", 0),
        5: ("a1\nb5", 1),
        6: ("a2\nb6", 2),
        7: ("a3\nb7", 3),
    }
    assert res.log_weights == (4.0, 5.0, 6.0, 7.0)
    assert not [c for c in res.candidates if c.fate is Fate.PRUNED]
    assert particle_steps(res) == 8 and res.generated_tokens == 24


def test_beam_stops_expanding_once_the_pool_is_full():
    def resp(req, index, seed, params):
        if index in (0, 1, 4, 5):
            return f"z{index}"  # ends (EOS) in this step
        return f"s{index}\n"  # a step that needs another

    s = SearchSampler(
        ScriptedEngine(resp),
        lambda p, t, f: [0.0] * len(t),
        PARAMS,
        search="beam",
        width=2,
        max_steps=5,
    )
    (res,) = list(s.sample([PROBLEM], 4, seed=0))
    # step 0: z0, z1 finish (pool 2); keep min(4/2, 4 - 2) = 2: s2, s3; step 1: s2 -> 4, 5;
    # s3 -> 6, 7; z4, z5 finish (pool 4 = N): nothing more is expanded, 6 and 7 are pruned
    assert [s.extra["particle_steps"] for s in res.steps] == [4, 4]
    assert {c.index: c.text for c in res.kept} == {0: "z0", 1: "z1", 4: "s2\nz4", 5: "s2\nz5"}
    assert sorted(c.index for c in res.candidates if c.fate is Fate.PRUNED) == [6, 7]


def test_max_steps_ends_every_solution():
    s = SearchSampler(
        ScriptedEngine(lambda r, i, sd, p: "x\n"),
        lambda p, t, f: [0.0] * len(t),
        PARAMS,
        search="best_of_n",
        max_steps=3,
    )
    (res,) = list(s.sample([PROBLEM], 2, seed=0))
    assert [c.text for c in res.kept] == ["x\nx\nx\n"] * 2
    assert res.generated_tokens == 12 and particle_steps(res) == 6


def test_arith_prm_beam_keeps_only_correct_lines():
    q = "Tom has 12 apples. He buys 7 more. Then he gives away 5. How many apples does Tom have?"
    prob = Problem(id="a", prompt=q + "\n", reference="14", meta={"question": q})
    right = ["12 + 7 = 19\n", "19 - 5 = 14\n", "#### 14"]
    wrong = ["12 + 7 = 20\n", "19 - 5 = 13\n", "#### 15"]

    def resp(req, index, seed, params):
        k = done_text(req).count("\n")
        return (right if index % 2 == 0 else wrong)[k]

    pot = make_potential("arith-prm")
    s = SearchSampler(ScriptedEngine(resp), pot, PARAMS, search="beam", width=2)
    (res,) = list(s.sample([prob], 4, seed=0))
    # each step half the children are wrong (-inf); the 2 survivors are the right ones
    assert {c.text for c in res.kept} == {"".join(right), "12 + 7 = 19\n19 - 5 = 14\n#### 15"}
    assert sorted(res.log_weights) == [-math.inf, -math.inf, 0.0, 0.0]
    s_bon = SearchSampler(ScriptedEngine(resp), pot, PARAMS, search="best_of_n")
    (r2,) = list(s_bon.sample([prob], 4, seed=0))
    # independent traces: index 0, 2 write right lines at step 0; their children (4, 6 then
    # 8, 10) keep their parity, so exactly 2 of 4 are right end to end
    assert sorted(r2.log_weights) == [-math.inf, -math.inf, 0.0, 0.0]


def test_bad_settings_are_config_errors():
    s = SearchSampler(ScriptedEngine(two_steps), scripted_potential, PARAMS, search="beam", width=3)
    with pytest.raises(ConfigError, match="divisible by width 3"):
        list(s.sample([PROBLEM], 4, seed=0))
    with pytest.raises(ConfigError, match="search must be one of"):
        SearchSampler(ScriptedEngine(two_steps), scripted_potential, PARAMS, search="mcts")


def test_sink_stores_every_node_and_resumes_per_problem(tmp_path):
    from ttscale.store import SampleStore

    probs = [PROBLEM, Problem(id="q", prompt="R\n", reference="0")]
    fresh = list(
        SearchSampler(
            ScriptedEngine(two_steps),
            scripted_potential,
            PARAMS,
            search="beam",
            width=2,
            batch_problems=1,
        ).sample(probs, 4, seed=0)
    )
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    # the engine fails on the second problem's first step: the first problem is stored whole
    eng = ScriptedEngine(two_steps, fail_after=8)
    s = SearchSampler(eng, scripted_potential, PARAMS, search="beam", width=2, batch_problems=1)
    got = []
    with pytest.raises(GenerationError):
        for r in s.sample(probs, 4, seed=0, sink=store):
            got.append(r)
    store.refresh()
    assert [r.problem_id for r in got] == ["p"]
    assert store.manifest["iid"] is False and store.manifest["search_done"] == {"4": ["p"]}
    stored = {x.index: (x.fate, x.parent, x.text) for x in store.samples("p")}
    assert stored[0] == ("extended", None, "a0\n") and stored[2] == ("pruned", None, "a2\n")
    assert stored[4] == ("kept", 0, "a0\nb4")
    eng2 = ScriptedEngine(two_steps)
    again = list(
        SearchSampler(
            eng2, scripted_potential, PARAMS, search="beam", width=2, batch_problems=1
        ).sample(probs, 4, seed=0, sink=store)
    )
    assert [r.resumed for r in again] == [8, 0]
    assert {q.problem_id for q, _ in eng2.calls} == {"q"}  # p was read back, not searched

    def key(rs):
        return [sorted((c.index, c.text, c.fate, c.log_weight) for c in r.candidates) for r in rs]

    assert key(again) == key(fresh)
    assert [r.generated_tokens for r in again] == [r.generated_tokens for r in fresh]


def test_a_solution_never_exceeds_max_tokens():
    # each step would write 5 characters and a newline; max_tokens=10 allows 6 + 4
    s = SearchSampler(
        ScriptedEngine(lambda r, i, sd, p: "xxxxx\n"),
        lambda p, t, f: [0.0] * len(t),
        PARAMS,
        search="best_of_n",
        max_tokens=10,
    )
    (res,) = list(s.sample([PROBLEM], 2, seed=0))
    assert [c.text for c in res.kept] == ["xxxxx\nxxxx"] * 2
    assert res.generated_tokens == 20


def test_node_text_is_the_text_of_its_tokens():
    # a stop string ending inside a multi-character token: the engine trims its text to "x\n",
    # the node keeps the token (text "x\ny") and its child continues after it: "x\nyz"
    from ttscale.engines.base import EngineCapabilities
    from ttscale.types import Completion

    class Words:
        capabilities = EngineCapabilities(token_prefixes=True)

        def info(self):
            return {"engine": "words"}

        def decode(self, ids):
            return "".join({1: "x\ny", 2: "z"}[int(t)] for t in ids)

        def generate(self, requests, params, on_result=None):
            out = []
            for r in requests:
                if not r.prefix_token_ids:
                    cs = [Completion(r.problem_id, i, "x\n", token_ids=(1,), num_tokens=1,
                                     stop_reason="\n") for i in r.indices]  # fmt: skip
                else:
                    cs = [Completion(r.problem_id, i, "z", token_ids=(2,), num_tokens=1)
                          for i in r.indices]  # fmt: skip
                out.append(cs)
            return out

    s = SearchSampler(Words(), lambda p, t, f: [0.0] * len(t), PARAMS, search="best_of_n")
    (res,) = list(s.sample([PROBLEM], 2, seed=0))
    assert [c.text for c in res.kept] == ["x\nyz", "x\nyz"]


@pytest.mark.parametrize("search", ["beam", "dvts", "best_of_n"])
def test_search_passes_the_sampler_contract_suite(search):
    from ttscale.testing import check_sampler

    def make(engine):
        # a reward that prefers texts with more vowels: partial solutions compete for real
        def pot(problem, texts, finished):
            return [float(sum(ch in "aeiou" for ch in t)) for t in texts]

        return SearchSampler(
            engine, pot, SamplingParams(max_tokens=4, seed=0), search=search, width=2, max_steps=3
        )

    ran = check_sampler(make)
    assert {"results", "reproducible", "accounting", "sink", "salvage", "resume"} <= set(ran)


@pytest.mark.parametrize("stop_reason", [None, 7])
def test_a_stop_token_ends_a_solution_in_search_and_smc(stop_reason):
    # vLLM reports stop_reason None for EOS and the token id (an int) for another stop token of
    # the model's generation config: both end the trace; a stop string (a str) ends the step
    from ttscale.engines.base import EngineCapabilities
    from ttscale.samplers.smc import SMCSampler
    from ttscale.types import Completion

    class Ends:
        name = "ends"
        capabilities = EngineCapabilities(token_prefixes=True)

        def info(self):
            return {"engine": "ends"}

        def decode(self, ids):
            return "".join({1: "x\n", 2: "y"}[int(t)] for t in ids)

        def generate(self, requests, params, on_result=None):
            out = []
            for r in requests:
                if not r.prefix_token_ids:  # step 1 ends at the stop string "\n"
                    out.append([Completion(r.problem_id, i, "x\n", token_ids=(1,),
                                           finish_reason="stop", stop_reason="\n")
                                for i in r.indices])
                else:  # step 2 ends with a stop token
                    out.append([Completion(r.problem_id, i, "y", token_ids=(2,),
                                           finish_reason="stop", stop_reason=stop_reason)
                                for i in r.indices])
            return out

    s = SearchSampler(Ends(), lambda p, t, f: [0.0] * len(t), PARAMS, search="best_of_n", max_steps=8)
    (res,) = list(s.sample([PROBLEM], 2, seed=0))
    assert [c.text for c in res.kept] == ["x\ny", "x\ny"]
    assert {c.step for c in res.kept} == {1}
    smc = SMCSampler(Ends(), lambda p, t, f: [0.0] * len(t), SamplingParams(max_tokens=8),
                     step_stop=("\n",), max_steps=8, progress=False)
    (res,) = list(smc.sample([PROBLEM], 2, seed=0))
    assert [c.text for c in res.kept] == ["x\ny", "x\ny"]
    assert res.info["steps"] == 2


@pytest.mark.parametrize("search", ["beam", "dvts", "best_of_n"])
def test_results_do_not_depend_on_problems_in_flight(search):
    # every problem's search shares the engine loop; steps come back in an order that depends
    # on what else is in flight, but seeds are per (problem, node, step) and selection per
    # problem: one problem at a time and all at once give the same trees
    probs = [Problem(id=f"q{k}", prompt=f"{k}:") for k in range(5)]

    def potential(problem, texts, finished):
        return [t.count("a") - 0.3 * len(t) + 0.01 * len(problem.prompt) for t in texts]

    def go(**kw):
        eng = ScriptedEngine(alphabet="ab ", order=2, eos_logprob=math.log(0.15))
        s = SearchSampler(
            eng, potential, SamplingParams(temperature=0.8, max_tokens=4, seed=3), search=search,
            width=2, step_stop=(" ",), max_steps=4, max_tokens=10, **kw,
        )  # fmt: skip
        return list(s.sample(probs, 4, seed=3))

    def key(r):
        return [(c.index, c.text, c.fate, c.parent, c.log_weight) for c in r.candidates]

    one = go(batch_problems=1)
    assert len({len(r.candidates) for r in one}) > 1  # the problems' trees differ in size
    for many in (go(), go(batch_problems=3, max_sequences=5)):
        assert [r.problem_id for r in many] == [p.id for p in probs]
        assert [key(r) for r in many] == [key(r) for r in one]
        assert [r.generated_tokens for r in many] == [r.generated_tokens for r in one]
        assert [particle_steps(r) for r in many] == [particle_steps(r) for r in one]


def test_failure_with_problems_in_flight_journals_each_and_resumes_exactly(tmp_path):
    # both problems in flight when the engine fails: each one's finished nodes are journaled,
    # the resume generates only the rest, and the trees, tokens and accounting equal a run
    # that never failed (plus the tokens of requests lost in flight, counted as discarded)
    from ttscale.samplers.stepwise import salvaged_keys
    from ttscale.store import SampleStore

    probs = [PROBLEM, Problem(id="q", prompt="R\n", reference="0")]

    def sampler(eng):
        return SearchSampler(eng, scripted_potential, PARAMS, search="beam", width=2)

    fresh = list(sampler(ScriptedEngine(two_steps)).sample(probs, 4, seed=0))
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    with pytest.raises(GenerationError):
        list(sampler(ScriptedEngine(two_steps, fail_after=10)).sample(probs, 4, seed=0, sink=store))
    journaled = salvaged_keys(store)
    assert {pid for pid, _ in journaled} == {"p", "q"}
    lost = SampleStore.open(store.path).accounting()["generated_tokens"]
    eng2 = ScriptedEngine(two_steps)
    again = list(sampler(eng2).sample(probs, 4, seed=0, sink=SampleStore.open(store.path)))
    asked = {(r.problem_id, i) for r, _ in eng2.calls for i in r.indices}
    assert not asked & journaled
    assert sum(r.resumed for r in again) == len(journaled)

    def key(rs):
        return [sorted((c.index, c.text, c.fate, c.log_weight) for c in r.candidates) for r in rs]

    assert key(again) == key(fresh)
    assert [r.generated_tokens for r in again] == [r.generated_tokens for r in fresh]
    run = SampleStore.open(store.path)
    assert run.accounting()["generated_tokens"] == sum(r.generated_tokens for r in fresh) + lost
    assert not salvaged_keys(run)
