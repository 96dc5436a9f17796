"""``ttscale serve`` with ``strategy: smc`` and the step-level searches, through the official ``openai`` client, on a scripted
engine whose traces take two steps (a line, then an answer that depends on the step's seed). The
expected population, weights and answer come from :class:`SMCSampler` / :class:`SearchSampler`
run directly on the same engine with the same seed, budget and settings, the answer picked by
the library's :func:`~ttscale.samplers.smc.select_answer`."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import openai
import pytest
from conftest import PacedScripted, Served, answer_of, start, stop

from ttscale.serve.app import problem_id_of
from ttscale.types import Problem

POTENTIAL = "py:test_serve_smc:reward"


def reward(problem: Problem, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
    """A reward in [0, 1] that prefers the answer 8 (the scripted model's second most common),
    so the weighted answer differs from the plain majority."""
    table = {"7": 0.3, "8": 0.95, "9": 0.1}
    out = []
    for t in texts:
        m = re.search(r"\\boxed\{(\d)\}", t)
        out.append(table[m.group(1)] if m else 0.5)
    return out


def two_steps(request: Any, index: int, seed: int, params: Any) -> str:
    if not request.prefix_token_ids:
        return f"Let me think ({seed % 13}).\n"
    return f"The answer is \\boxed{{{answer_of(seed)}}}"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    from ttscale.serve.app import ServeConfig
    from ttscale.serve.strategy import parse_preset
    from ttscale.types import SamplingParams

    presets = dict(
        [
            parse_preset(f"smc8=strategy=smc;budget=8;potential={POTENTIAL}"),
            parse_preset(f"beam8=strategy=beam;budget=8;potential={POTENTIAL}"),
            parse_preset("sc=strategy=repeated;budget=4"),
        ]
    )
    config = ServeConfig(
        model="scripted", presets=presets, params=SamplingParams(max_tokens=8192, seed=0),
        api_key="sekrit", max_concurrency=4, chat=False,
    )
    s = start(config, PacedScripted(two_steps))
    try:
        yield s
    finally:
        stop(s)


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)


def direct(served: Served, prompt: str, rule: str, seed: int, budget: int) -> Any:
    from ttscale.samplers.potentials import make_potential
    from ttscale.samplers.smc import SMCSampler
    from ttscale.types import SamplingParams

    def answer(text: str) -> str | None:
        m = re.search(r"\\boxed\{(\d)\}", text)
        return m.group(1) if m else None

    sampler = SMCSampler(
        served.engine, make_potential(POTENTIAL, value="prob"), SamplingParams(max_tokens=8192, seed=0),
        shaping="difference", lam=10.0, resample="systematic", ess_threshold=0.5, step_stop=("\n",),
        select=rule, answer_fn=answer,
    )
    (res,) = list(sampler.sample([Problem(id=problem_id_of({"prompt": prompt}), prompt=prompt)], budget, seed=seed))
    return res


@pytest.mark.parametrize("rule", ["vote", "argmax"])
@pytest.mark.parametrize("seed", [3, 21])
def test_smc_matches_library(served: Served, client: openai.OpenAI, rule: str, seed: int) -> None:
    r = client.completions.create(
        model="smc8", prompt="Q?", seed=seed, n=3, extra_body={"ttscale": {"rule": rule, "return_candidates": True}},
    )
    res = direct(served, "Q?", rule, seed, 8)
    tt = r.model_extra["ttscale"]
    assert tt["strategy"] == "smc" and tt["params"]["potential"] == POTENTIAL and tt["seed"] == seed
    assert tt["smc"]["steps"] == res.info["steps"] == 2
    assert tt["selected"]["answer"] == res.info["answer"]
    assert r.choices[0].text.endswith(f"\\boxed{{{res.info['answer']}}}")
    # the other choices: distinct answers of the final population
    got = [re.search(r"\\boxed\{(\d)\}", c.text).group(1) for c in r.choices]  # type: ignore[union-attr]
    assert len(set(got)) == len(got)
    # every particle-step's tokens, those resampled away included
    assert r.usage.completion_tokens == tt["tokens"] == res.generated_tokens
    assert tt["samples"] == res.info["particle_steps"]
    kept = [(c.index, c.text, c.log_weight) for c in res.kept]
    assert [(c["index"], c["text"], c["log_weight"]) for c in tt["candidates"]] == kept


def test_smc_weighted_answer_is_not_the_majority(served: Served, client: openai.OpenAI) -> None:
    # the reward lifts the answer 8 over the scripted model's most common 7
    r = client.completions.create(model="smc8", prompt="Q?", seed=3, extra_body={"ttscale": {"budget": 16}})
    res = direct(served, "Q?", "vote", 3, 16)
    assert r.model_extra["ttscale"]["selected"]["answer"] == res.info["answer"] == "8"


def test_smc_seed_reproducible(client: openai.OpenAI) -> None:
    extra = {"ttscale": {"return_candidates": True}}
    a, b = (client.completions.create(model="smc8", prompt="z", seed=7, extra_body=extra) for _ in range(2))
    assert a.model_extra["ttscale"]["candidates"] == b.model_extra["ttscale"]["candidates"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"ttscale": {"strategy": "smc"}}, "ttscale.potential"),  # the preset sc names none
        ({"ttscale": {"strategy": "smc", "potential": "rm:/etc/passwd"}}, "ttscale.potential"),
        ({"ttscale": {"strategy": "smc", "potential": "py:os:system"}}, "ttscale.potential"),
        ({"ttscale": {"strategy": "smc", "potential": "arith-prm:nosuch"}}, "ttscale.potential"),
        ({"ttscale": {"strategy": "smc", "potential": "arith-prm", "rule": "majority"}}, "ttscale.rule"),
        ({"ttscale": {"strategy": "smc", "potential": "arith-prm", "deadline_s": 1}}, "ttscale.deadline_s"),
        ({"model": "smc8", "temperature": 0.5}, "temperature"),
    ],
)
def test_bad_smc_fields_are_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        extra = dict(extra)
        model = extra.pop("model", "sc")
        temperature = extra.pop("temperature", None)
        client.completions.create(model=model, prompt="x", temperature=temperature, extra_body=extra)
    assert e.value.body["param"] == param  # type: ignore[index]


def direct_search(served: Served, prompt: str, search: str, seed: int, budget: int) -> Any:
    from ttscale.samplers.potentials import make_potential
    from ttscale.samplers.search import SearchSampler
    from ttscale.types import SamplingParams

    sampler = SearchSampler(
        served.engine, make_potential(POTENTIAL, value="log_prob"), SamplingParams(max_tokens=8192, seed=0),
        search=search, width=4, step_stop=("\n",), step_tokens=256, max_steps=64, max_tokens=8192,
    )
    (res,) = list(sampler.sample([Problem(id=problem_id_of({"prompt": prompt}), prompt=prompt)], budget, seed=seed))
    return res


@pytest.mark.parametrize("search", ["beam", "dvts", "best_of_n"])
@pytest.mark.parametrize("rule", ["vote", "argmax"])
def test_search_matches_library(served: Served, client: openai.OpenAI, search: str, rule: str) -> None:
    from ttscale.samplers.smc import select_answer

    r = client.completions.create(
        model="beam8", prompt="S?", seed=2, n=3,
        extra_body={"ttscale": {"strategy": search, "rule": rule, "return_candidates": True}},
    )
    res = direct_search(served, "S?", search, 2, 8)
    want = select_answer(res, rule, lambda t: (m.group(1) if (m := re.search(r"\\boxed\{(\d)\}", t)) else None))
    tt = r.model_extra["ttscale"]
    assert tt["strategy"] == search and tt["search"]["search"] == search and tt["search"]["width"] == res.info["width"]
    assert tt["selected"]["answer"] == want
    assert r.choices[0].text.endswith(f"\\boxed{{{want}}}")
    got = [re.search(r"\\boxed\{(\d)\}", c.text).group(1) for c in r.choices]  # type: ignore[union-attr]
    assert len(set(got)) == len(got)
    assert r.usage.completion_tokens == tt["tokens"] == res.generated_tokens
    assert tt["search"]["pruned"] == sum(c.pruned_at is not None for c in res.candidates)
    if search != "best_of_n":
        assert tt["search"]["pruned"] > 0  # the search dropped branches whose tokens still count
    kept = [(c.index, c.text, c.log_weight) for c in res.kept]
    assert [(c["index"], c["text"], c["log_weight"]) for c in tt["candidates"]] == kept


def test_search_bad_budget_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="beam8", prompt="x", extra_body={"ttscale": {"budget": 6}})
    assert e.value.body["param"] == "ttscale.budget"  # type: ignore[index]


@pytest.mark.parametrize("model", ["smc8", "beam8"])
def test_stepwise_chat_streams_the_selected_answer(client: openai.OpenAI, model: str) -> None:
    msg = [{"role": "user", "content": "S?"}]
    plain = client.chat.completions.create(model=model, messages=msg, seed=6)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=model, messages=msg, seed=6, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and "\\boxed{" in text
    assert chunks[-1].usage == plain.usage and plain.usage is not None and plain.usage.completion_tokens > 0
