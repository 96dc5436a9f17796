"""``ttscale serve`` with the official ``openai`` client against a running server (scripted
engine; see conftest). Expected answers come from the library run directly on the same engine
with the same seed and budget, or from the scripted model's seed -> answer table."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import openai
import pytest
from conftest import GATE, Served, answer_of

from ttscale.seeding import sample_seed
from ttscale.serve.app import problem_id_of
from ttscale.types import Problem

MSG = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)


def expected(context: dict[str, Any], seed: int, budget: int) -> Counter[str]:
    pid = problem_id_of(context)
    return Counter(answer_of(sample_seed(seed, pid, i)) for i in range(budget))


def direct_run(served: Served, context: dict[str, Any], seed: int, budget: int) -> list[Any]:
    """The same work through the library in one process: RepeatedSampler, same seed/budget."""
    from ttscale.samplers import RepeatedSampler
    from ttscale.types import SamplingParams

    prompt = context["prompt"]
    sampler = RepeatedSampler(served.engine, SamplingParams(max_tokens=8192, seed=seed), chat=False)
    (res,) = list(sampler.sample([Problem(id=problem_id_of(context), prompt=prompt)], budget))
    return [c.completion for c in res.candidates]


def test_chat_majority_matches_library(served: Served, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="sc8", messages=MSG, seed=11, extra_body={"ttscale": {"return_candidates": True}}
    )
    ctx = {"prompt": "What is 3 + 4?"}  # the scripted engine has no chat template
    comps = direct_run(served, ctx, 11, 8)
    counts = Counter(answer_of(c.seed) for c in comps)
    assert counts == expected(ctx, 11, 8)
    top = max(counts.values())
    first = next(answer_of(c.seed) for c in comps if counts[answer_of(c.seed)] == top)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.endswith(f"\\boxed{{{first}}}")
    tt = r.model_extra["ttscale"]
    assert tt["strategy"] == "repeated" and tt["preset"] == "sc8" and tt["seed"] == 11
    assert tt["samples"] == 8 and tt["stopped"] == "budget"
    assert tt["answers"] == dict(counts)
    assert [c["text"] for c in tt["candidates"]] == [c.text for c in comps]
    assert r.usage.completion_tokens == sum(c.num_tokens for c in comps) == tt["tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_n_distinct_answers_best_first(client: openai.OpenAI) -> None:
    r = client.completions.create(model="sc8", prompt="What is 3 + 4?", n=3, seed=5)
    counts = expected({"prompt": "What is 3 + 4?"}, 5, 8)
    got = [c.text.rsplit("{", 1)[1].rstrip("}") for c in r.choices]
    assert len(got) == len(counts) and set(got) == set(counts)
    assert [counts[a] for a in got] == sorted(counts.values(), reverse=True)
    assert [c.index for c in r.choices] == list(range(len(got)))


def test_seed_reproducible(client: openai.OpenAI) -> None:
    a = client.completions.create(model="sc8", prompt="p", seed=42, extra_body={"ttscale": {"return_candidates": True}})
    b = client.completions.create(model="sc8", prompt="p", seed=42, extra_body={"ttscale": {"return_candidates": True}})
    c = client.completions.create(model="sc8", prompt="p", seed=43, extra_body={"ttscale": {"return_candidates": True}})
    assert a.choices[0].text == b.choices[0].text
    assert a.model_extra["ttscale"]["candidates"] == b.model_extra["ttscale"]["candidates"]
    assert a.model_extra["ttscale"]["candidates"] != c.model_extra["ttscale"]["candidates"]


def test_streaming_chunks(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="sc8", messages=MSG, seed=2)
    chunks = list(
        client.chat.completions.create(
            model="sc8", messages=MSG, seed=2, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    no_usage = list(client.chat.completions.create(model="sc8", messages=MSG, seed=2, stream=True))
    assert all(c.usage is None for c in no_usage)


def test_precedence_header_body_flat(client: openai.OpenAI) -> None:
    def samples(**kw: Any) -> int:
        r = client.completions.create(model="sc8", prompt="q", **kw)
        return int(r.model_extra["ttscale"]["samples"])

    assert samples() == 8  # the preset
    assert samples(extra_body={"ttscale_budget": 3}) == 3
    assert samples(extra_body={"ttscale_budget": 3, "ttscale": {"budget": 5}}) == 5
    assert samples(extra_body={"ttscale_budget": 3, "ttscale": {"budget": 5}}, extra_headers={"X-TTScale-Budget": "4"}) == 4


def test_bare_model_is_pass_through(client: openai.OpenAI) -> None:
    r = client.completions.create(model="scripted", prompt="q", n=2, seed=9)
    pid = problem_id_of({"prompt": "q"})
    assert [c.text for c in r.choices] == [
        f"Thinking {sample_seed(9, pid, i) % 97}. The answer is \\boxed{{{answer_of(sample_seed(9, pid, i))}}}"
        for i in range(2)
    ]
    assert r.model_extra["ttscale"]["strategy"] == "none"
    ids = [m.id for m in client.models.list().data]
    assert ids == ["scripted", "sc8", "adaptive"]


@pytest.mark.parametrize("rule", [None, "esc:window=2"])
def test_adaptive_matches_library(served: Served, client: openai.OpenAI, rule: str | None) -> None:
    from ttscale.samplers.adaptive import AdaptiveSampler, verifier_answers
    from ttscale.types import SamplingParams
    from ttscale.verifiers.base import make_verifier

    extra = {} if rule is None else {"ttscale": {"rule": rule}}
    r = client.completions.create(model="adaptive", prompt="a", seed=4, extra_body=extra)
    tt = r.model_extra["ttscale"]
    ctx = {"prompt": "a"}
    sampler = AdaptiveSampler(
        served.engine, SamplingParams(max_tokens=8192, seed=4), rule or "beta:0.95",
        verifier_answers(make_verifier("math")), chat=False,
    )
    list(sampler.sample([Problem(id=problem_id_of(ctx), prompt="a")], 32))
    (d,) = sampler.decisions
    assert tt["strategy"] == "adaptive" and tt["stopped"] == d.reason
    assert tt["candidates_used"] == d.used and tt["samples"] == d.drawn
    assert tt["tokens"] == d.generated_tokens == r.usage.completion_tokens
    assert tt["selected"]["answer"] == d.answer
    assert r.choices[0].text.endswith(f"\\boxed{{{d.answer}}}")
    if rule is not None:
        assert d.stopped and d.used < 32  # the window rule stops this one early


def test_max_total_tokens_stops_early(client: openai.OpenAI) -> None:
    r = client.completions.create(model="sc8", prompt="t", extra_body={"ttscale": {"budget": 64, "max_total_tokens": 100}})
    tt = r.model_extra["ttscale"]
    assert tt["stopped"] == "max_total_tokens"
    assert tt["tokens"] >= 100 and tt["samples"] < 64


def test_deadline_stops_early(client: openai.OpenAI) -> None:
    # the paced engine needs ~5 ms per poll: the first samples arrive after the deadline
    r = client.completions.create(model="sc8", prompt="d", extra_body={"ttscale": {"budget": 64, "deadline_s": 0.001}})
    tt = r.model_extra["ttscale"]
    assert tt["stopped"] == "deadline" and 0 < tt["samples"] < 64
    assert r.usage.completion_tokens == tt["tokens"] >= tt["aborted_tokens"] > 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"ttscale": {"strategy": "mcts"}}, "ttscale.strategy"),
        ({"ttscale": {"strategy": "beam"}}, "ttscale.potential"),
        ({"ttscale": {"budget": 0}}, "ttscale.budget"),
        ({"ttscale_budget": "many"}, "ttscale.budget"),
        ({"ttscale": {"rule": "nosuchrule"}}, "ttscale.rule"),
        ({"ttscale": {"strategy": "adaptive", "rule": "beta:7"}}, "ttscale.rule"),
        ({"ttscale": {"verifier": "rm:/etc/passwd"}}, "ttscale.verifier"),
        ({"ttscale": {"verifier": "code"}}, "ttscale.verifier"),
        ({"ttscale": {"rule": "best_of_n"}}, "ttscale.rule"),
        ({"ttscale": {"colour": "red"}}, "ttscale.colour"),
        ({"model": "scripted", "ttscale": {"budget": 4}}, "ttscale.budget"),
        ({"temperature": -1}, "temperature"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_fields_are_400_naming_them(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sc8", prompt="x", extra_body=extra)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param  # type: ignore[index]


def test_auth_and_unknown_model(served: Served) -> None:
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="sc8", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="gpt-9", prompt="x")


def test_beyond_max_concurrency_is_429(served: Served) -> None:
    GATE.clear()
    results: list[Any] = []

    def call() -> None:
        with httpx.Client(timeout=60) as h:
            results.append(
                h.post(served.url + "/v1/completions", json={"model": "sc8", "prompt": "gate", "ttscale_budget": 1},
                       headers={"Authorization": "Bearer sekrit"}).status_code
            )

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while served.service.in_flight < 4 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    try:
        with httpx.Client(timeout=10) as h:
            r = h.post(served.url + "/v1/completions", json={"model": "sc8", "prompt": "x"},
                       headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        GATE.set()
        for t in threads:
            t.join(60)
    assert results == [200] * 4
    metrics = httpx.get(served.url + "/metrics").text
    assert 'ttscale_rejections_total{reason="concurrency"} 1.0' in metrics


def test_disconnect_aborts_engine_work(served: Served) -> None:
    svc = served.service
    before = svc.worker.session.generated["generated_tokens"]
    body = {"model": "sc8", "prompt": "slow", "stream": True, "ttscale": {"budget": 4}}
    with httpx.Client(timeout=30) as h, h.stream(
        "POST", served.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == ": ttscale started"
        assert next(lines) == ""
        assert next(lines) == ": ttscale running"  # a keep-alive while the strategy runs
        assert svc.worker.engine_in_flight() > 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20 and (svc.in_flight or svc.worker.engine_in_flight()):
        time.sleep(0.05)
    assert svc.in_flight == 0
    assert svc.worker.engine_in_flight() == 0  # its traces left the engine
    spent = svc.worker.session.generated["generated_tokens"] - before
    # aborted traces are counted, and fewer tokens were generated than the full request needs
    assert 0 < spent < 4 * 4000
    m = httpx.get(served.url + "/metrics").text
    assert 'endpoint="completions",status="499",strategy="repeated"' in m


def test_chat_messages_go_through_the_template() -> None:
    """With an engine that has a chat template, the request's messages (system turn included)
    are what the model conditions on: the library with the same messages gives the same samples."""
    from conftest import PacedScripted, responder, start, stop

    from ttscale.samplers.session import SamplingSession
    from ttscale.serve.app import ServeConfig
    from ttscale.types import SamplingParams

    engine = PacedScripted(lambda req, i, seed, p: f"{req.messages[-1]['content']}|{seed}|{responder(req, i, seed, p)}")
    s = start(ServeConfig(model="m", params=SamplingParams(max_tokens=8192), chat=True), engine)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+5?"}]
        r = client.chat.completions.create(model="m", messages=msgs, seed=8, n=2)
    finally:
        stop(s)
    from ttscale.engines.base import GenerationRequest

    pid = problem_id_of({"messages": msgs})
    req = GenerationRequest(problem_id=pid, messages=msgs, indices=(0, 1))
    with SamplingSession(engine, None) as session:
        comps = session.generate([req], SamplingParams(max_tokens=8192, seed=8))[0]
    assert [c.message.content for c in r.choices] == [c.text for c in comps]
    assert engine.calls[0][0].messages == msgs


def test_engine_failure_is_a_500_and_the_server_lives_on() -> None:
    from conftest import PacedScripted, responder, start, stop

    from ttscale.serve.app import ServeConfig
    from ttscale.types import SamplingParams

    s = start(ServeConfig(model="m", params=SamplingParams(max_tokens=8192), chat=False),
              PacedScripted(responder, fail_after=3))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt="q", extra_body={"ttscale": {"strategy": "repeated", "budget": 8}})
        assert "scripted failure" in e.value.body["message"]  # type: ignore[index]
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        assert s.service.in_flight == 0
    finally:
        stop(s)


def test_a_judge_verifiers_tokens_are_in_usage(
    served: Served, client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model-based verifier (a judge preset) spends tokens of its own: usage counts them on top
    of the candidates' tokens, and the ttscale object says how many."""
    from ttscale.types import Completion
    from ttscale.verifiers.judge import JudgeVerifier

    class JudgeEngine:  # one yes/no token per candidate, after a 7-token judge prompt
        name = "judge-table"

        def generate(self, requests: Any, params: Any) -> list[list[Completion]]:
            return [[Completion(problem_id=r.problem_id, index=i, text="y", token_ids=(1,),
                                token_logprobs=(-0.1,), top_logprobs=({1: -0.1, 2: -2.4},),
                                num_tokens=1, prompt_tokens=7) for i in r.indices]
                    for r in requests]  # fmt: skip

        def info(self) -> dict[str, Any]:
            return {"engine": self.name}

    judge = JudgeVerifier(JudgeEngine(), yes_token_id=1, no_token_id=2, name="judge")
    monkeypatch.setattr(served.service, "verifier", lambda spec: judge)
    ctx = {"prompt": "What is 3 + 4?"}
    r = client.chat.completions.create(model="sc8", messages=MSG, seed=11)
    tt = r.model_extra["ttscale"]
    sampled = sum(c.num_tokens for c in direct_run(served, ctx, 11, 8))
    assert tt["tokens"] == sampled and tt["verifier_tokens"] == {"generated": 8, "prompt": 56}
    assert r.usage.completion_tokens == sampled + 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
