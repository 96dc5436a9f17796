"""``ttscale serve`` with the issue-19 methods: the selection rules ``self_certainty``,
``self_certainty_borda`` and ``cisc`` (strategy ``repeated``; also the log-prob rules ``rpc``,
``pc`` and ``max_probability``, which read what ``cisc`` reads) and short-m@k (strategy
``shortmk``), through the official ``openai`` client (scripted engine; see conftest). Each
expected answer comes from the library run directly on the same engine with the same seed."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import openai
import pytest
from conftest import Served

from ttscale.serve.app import problem_id_of
from ttscale.types import Completion, Problem

# the scripted model's token ids are code points; its texts here are ASCII, its top-20
# alternatives letters: a 1000-token vocabulary holds them all
VOCAB = 1000
PROMPT = "What is 3 + 4?"


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    served.engine.vocab_size = VOCAB  # this module's own server and engine
    return openai.OpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)


def answers(comps: Sequence[Completion]) -> list[Hashable | None]:
    from ttscale.types import Sample
    from ttscale.verifiers.base import make_verifier

    v = make_verifier("math")
    return [x.answer for x in v.verify(Problem(id="x", prompt=PROMPT), [Sample.from_completion(c) for c in comps])]


def library_repeated(served: Served, rule: str, seed: int, budget: int) -> tuple[list[Completion], Any]:
    """The library's answer: the same samples (RepeatedSampler, same seed), the rule of
    ttscale.select with the inputs a stored run would give it."""
    import numpy as np

    from ttscale.samplers import RepeatedSampler
    from ttscale.select import aggregate, certainty, cisc
    from ttscale.types import SamplingParams

    mean_lp_rules = ("cisc", "rpc", "pc", "max_probability")
    logprobs = 0 if rule in mean_lp_rules else 20
    sampler = RepeatedSampler(served.engine, SamplingParams(max_tokens=8192, seed=seed, logprobs=logprobs), chat=False,
                              progress=False)  # fmt: skip
    (res,) = list(sampler.sample([Problem(id=problem_id_of({"prompt": PROMPT}), prompt=PROMPT)], budget))
    comps = [c.completion for c in res.candidates]
    ans = answers(comps)
    if rule in mean_lp_rules:
        assert all(c.mean_logprob is not None for c in comps)
        mlp = np.array([c.mean_logprob for c in comps])
        texts = [c.text for c in comps]
        if rule == "cisc":
            out = cisc.cisc_sequence_vote(ans, mlp, tie="first")
        elif rule == "rpc":
            out = aggregate.rpc(ans, mlp, texts=texts, tie="first")
        elif rule == "pc":
            out = aggregate.perplexity_consistency(ans, mlp, texts=texts, tie="first")
        else:
            out = aggregate.max_probability(ans, mlp, tie="first")
    else:
        cert = [certainty.self_certainty_topk([dict(p) for p in c.top_logprobs or ()], VOCAB) for c in comps]
        fn = certainty.self_certainty_best if rule == "self_certainty" else certainty.self_certainty_borda
        out = fn(ans, np.array(cert), tie="first")
    return comps, out.answer


@pytest.mark.parametrize("rule", ["self_certainty", "self_certainty_borda", "cisc", "rpc", "pc", "max_probability"])
def test_selection_rules_match_the_library(served: Served, client: openai.OpenAI, rule: str) -> None:
    for seed in (3, 11):
        r = client.completions.create(
            model="sc8", prompt=PROMPT, seed=seed,
            extra_body={"ttscale": {"rule": rule, "budget": 12, "return_candidates": True}},
        )  # fmt: skip
        comps, want = library_repeated(served, rule, seed, 12)
        tt = r.model_extra["ttscale"]
        assert tt["params"]["rule"] == rule and tt["samples"] == 12
        assert [c["text"] for c in tt["candidates"]] == [c.text for c in comps]
        assert tt["selected"]["answer"] == want
        assert r.choices[0].text.endswith(f"\\boxed{{{want}}}")


def test_the_rules_decide_differently_from_majority(served: Served, client: openai.OpenAI) -> None:
    """Not majority in disguise: on some seed each rule's answer differs from the majority's
    (first-seen on ties); CISC at T = 1 weighs nearly evenly, so it shows on near ties (budget
    4). Each such request is served as the library answers it."""
    from collections import Counter

    for rule, budget in (("self_certainty", 12), ("self_certainty_borda", 12), ("cisc", 4)):
        seen = []
        for seed in range(40):
            comps, want = library_repeated(served, rule, seed, budget)
            ans = [a for a in answers(comps) if a is not None]
            counts = Counter(ans)
            top = next(a for a in ans if counts[a] == max(counts.values()))
            if want != top:
                seen.append((seed, want))
        assert seen, rule
        seed, want = seen[0]
        r = client.completions.create(
            model="sc8", prompt=PROMPT, seed=seed, extra_body={"ttscale": {"rule": rule, "budget": budget}}
        )
        assert r.model_extra["ttscale"]["selected"]["answer"] == want


def test_short_m_at_k_matches_the_library(served: Served, client: openai.OpenAI) -> None:
    from ttscale.samplers.adaptive import verifier_answers
    from ttscale.samplers.shortmk import ShortMKSampler
    from ttscale.types import SamplingParams
    from ttscale.verifiers.base import make_verifier

    for rule, seed in (("short-3@k", 2), ("short-1@k", 5), ("short-3@k", 9)):
        r = client.completions.create(
            model="sc8", prompt=PROMPT, seed=seed, extra_body={"ttscale": {"strategy": "shortmk", "rule": rule}}
        )
        s = ShortMKSampler(served.engine, SamplingParams(max_tokens=8192, seed=seed), rule,
                           verifier_answers(make_verifier("math")), chat=False)  # fmt: skip
        list(s.sample([Problem(id=problem_id_of({"prompt": PROMPT}), prompt=PROMPT)], 8))
        (d,) = s.decisions
        tt = r.model_extra["ttscale"]
        assert tt["strategy"] == "shortmk" and tt["params"]["budget"] == 8
        assert tt["shortmk"]["chosen"] == list(d.chosen) and tt["selected"]["answer"] == d.answer
        assert tt["shortmk"]["k"] == 8 and tt["shortmk"]["m"] == d.m
        assert tt["candidates_used"] == d.m and tt["stopped"] == f"first {d.m} of 8 finished"
        assert r.choices[0].text.endswith(f"\\boxed{{{d.answer}}}")
        assert tt["tokens"] == r.usage.completion_tokens >= tt["shortmk"]["aborted_tokens"]


@pytest.mark.parametrize(
    ("ttscale", "needle"),
    [
        ({"strategy": "shortmk", "rule": "short-9@k", "budget": 8}, "at least 9"),
        ({"strategy": "shortmk", "rule": "beta:0.9"}, "bad short-m@k rule"),
    ],
)
def test_bad_short_requests_are_400(client: openai.OpenAI, ttscale: dict[str, Any], needle: str) -> None:
    with pytest.raises(openai.BadRequestError, match=needle):
        client.completions.create(model="sc8", prompt=PROMPT, extra_body={"ttscale": ttscale})


@pytest.mark.parametrize(
    ("rule", "want"),
    [("majority", None), ("rpc", 0), ("pc", 0), ("max_probability", 0), ("cisc", 0),
     ("deepconf", 20), ("self_certainty", 20), ("self_certainty_borda", 20)],
)  # fmt: skip
def test_a_rule_is_served_with_the_log_probs_it_reads(rule: str, want: int | None) -> None:
    """A server configured without log-probs (``logprobs=None``) still samples with what the
    requested rule reads: the mean log-prob (``0``) or the top-20 (``20``)."""
    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.serve.app import ServeConfig, _Service
    from ttscale.serve.strategy import StrategySpec
    from ttscale.types import SamplingParams

    config = ServeConfig(model="m", presets={}, params=SamplingParams(max_tokens=64, logprobs=None), chat=False)
    service = _Service(config, ScriptedEngine())
    assert service.sampling({}, StrategySpec(strategy="repeated", rule=rule), chat=False).logprobs == want
