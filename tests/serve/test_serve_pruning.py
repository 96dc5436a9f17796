"""``ttscale serve`` with ``strategy: pruning``, through the official ``openai`` client (scripted
engine; see conftest). The expected answer comes from :class:`PruningSampler` run directly on the
same engine with the same seed and budget, and a majority vote over the traces it kept, counted
here from the scripted model's seed -> answer table."""

from __future__ import annotations

from collections import Counter
from typing import Any

import openai
import pytest
from conftest import Served, answer_of

from ttscale.serve.app import problem_id_of
from ttscale.types import Problem

RULES = ["deepconf-online:eta=50,warmup=4,window=8", "lowprob:threshold=-1.2,min_tokens=4"]


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)


def direct(served: Served, prompt: str, rule: str, seed: int, budget: int) -> Any:
    from ttscale.samplers.pruning import PruningSampler
    from ttscale.types import SamplingParams

    logprobs = 20 if rule.startswith("deepconf") else 0
    sampler = PruningSampler(served.engine, SamplingParams(max_tokens=8192, seed=0, logprobs=logprobs), rule)
    (res,) = list(sampler.sample([Problem(id=problem_id_of({"prompt": prompt}), prompt=prompt)], budget, seed=seed))
    return res


@pytest.mark.parametrize("rule", RULES)
def test_pruning_matches_library(served: Served, client: openai.OpenAI, rule: str) -> None:
    r = client.completions.create(
        model="sc8", prompt="What is 3 + 4?", seed=5, n=3,
        extra_body={"ttscale": {"strategy": "pruning", "rule": rule, "budget": 24, "return_candidates": True}},
    )
    res = direct(served, "What is 3 + 4?", rule, 5, 24)
    kept = [c for c in res.candidates if c.pruned_at is None]
    pruned = [c for c in res.candidates if c.pruned_at is not None]
    assert kept and pruned  # the rule decides something here
    votes = Counter(answer_of(c.completion.seed) for c in kept)
    first_seen = {a: i for i, a in reversed(list(enumerate(answer_of(c.completion.seed) for c in kept)))}
    ranked = sorted(votes, key=lambda a: (-votes[a], first_seen[a]))
    tt = r.model_extra["ttscale"]
    assert tt["strategy"] == "pruning" and tt["params"]["rule"] == rule and tt["seed"] == 5
    assert tt["samples"] == 24 and tt["pruned"] == len(pruned)
    assert tt["answers"] == dict(votes)
    assert len(r.choices) == len(ranked[:3])
    for choice, a in zip(r.choices, ranked, strict=False):
        assert choice.text.endswith(f"\\boxed{{{a}}}")
    assert tt["selected"]["answer"] == ranked[0]
    # every generated token counts, the pruned traces' included
    assert r.usage.completion_tokens == tt["tokens"] == res.generated_tokens
    cands = {c["index"]: c for c in tt["candidates"]}
    for c in res.candidates:
        assert cands[c.index]["text"] == c.completion.text
        assert cands[c.index]["pruned_at"] == c.pruned_at


def test_pruning_seed_reproducible(client: openai.OpenAI) -> None:
    extra = {"ttscale": {"strategy": "pruning", "rule": RULES[0], "budget": 12, "return_candidates": True}}
    a, b = (client.completions.create(model="sc8", prompt="q", seed=9, extra_body=extra) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    assert a.model_extra["ttscale"]["candidates"] == b.model_extra["ttscale"]["candidates"]


@pytest.mark.parametrize(
    "rule", ["nosuchrule", "selfeval", "deepconf-online:eta=500", "lowprob", "lowprob:colour=red"]
)
def test_bad_pruning_rule_is_400(client: openai.OpenAI, rule: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="sc8", prompt="x", extra_body={"ttscale": {"strategy": "pruning", "rule": rule}}
        )
    assert e.value.body["param"] == "ttscale.rule"  # type: ignore[index]
    assert rule.partition(":")[0] in e.value.body["message"]  # type: ignore[index]
