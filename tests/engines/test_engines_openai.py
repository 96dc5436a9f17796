"""OpenAIEngine: fault injection against a local stdlib server, and a real vLLM OpenAI server."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from fakeopenai import FakeServer, fake_logprob, fake_tokenize

from ttscale.engines import GenerationError, GenerationRequest, make_engine
from ttscale.engines.openai import OpenAIEngine, parse_retry_after
from ttscale.errors import ConfigError, EngineError
from ttscale.seeding import sample_seed
from ttscale.testing import check_engine
from ttscale.types import SamplingParams

pytestmark = pytest.mark.network


@pytest.fixture
def servers() -> Iterator[list[FakeServer]]:
    made: list[FakeServer] = []
    yield made
    for s in made:
        s.close()


def _engine(urls, **kw) -> OpenAIEngine:  # type: ignore[no-untyped-def]
    kw.setdefault("backoff", (0.01, 2.0, 0.05))
    kw.setdefault("timeout", 5.0)
    kw.setdefault("jitter_seed", 0)
    return OpenAIEngine("m", urls, **kw)


P = SamplingParams(seed=9, max_tokens=8)


def _want_text(pid: str, index: int) -> str:
    return f"s{sample_seed(9, pid, index)}"


def test_ok_roundtrip_and_token_ids(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer())
    eng = _engine(servers[0].url)
    (comps,) = eng.generate([GenerationRequest("p", prompt="A", indices=(0, 3))], P)
    assert [c.text for c in comps] == [_want_text("p", 0), _want_text("p", 3)]
    c = comps[0]
    assert c.token_ids == tuple(ord(ch) for ch in c.text)
    # the fake's prompt "A" is BOS + "A" (2 tokens); generated token t sits at position 2 + t
    want = sum(fake_logprob(2 + t, ord(ch)) for t, ch in enumerate(c.text))
    assert c.cumulative_logprob == pytest.approx(want)
    assert c.prompt_tokens == 2 and c.seed == sample_seed(9, "p", 0)
    body = servers[0].attempts[0][2]
    assert body["return_tokens_as_token_ids"] is True and body["n"] == 1
    assert body["prompt"] == "A" and body["logprobs"] == 0


def test_429_honours_retry_after(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(script=["429:0.3", "ok"]))
    eng = _engine(servers[0].url)
    (comps,) = eng.generate([GenerationRequest("p", prompt="A")], P)
    assert comps[0].text == _want_text("p", 0)
    (t0, *_), (t1, *_) = servers[0].attempts
    assert 0.3 <= t1 - t0 < 1.5  # the header's 0.3 s beats the 0.01 s backoff
    assert eng.stats["retries"] == 1


def test_backoff_grows_within_bounds(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(script=["status:500", "status:502", "status:503", "ok"]))
    eng = _engine(servers[0].url, backoff=(0.1, 2.0, 0.3))
    eng.generate([GenerationRequest("p", prompt="A")], P)
    times = [t for t, *_ in servers[0].attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # attempt a waits min(cap, first * factor**a), jittered into [d/2, d]
    for gap, d in zip(gaps, (0.1, 0.2, 0.3), strict=True):
        assert d / 2 <= gap <= d + 1.0  # the upper slack absorbs a loaded CI machine


def test_timeout_and_dropped_connection_are_retried(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(script=["hang:3", "drop", "ok"]))
    eng = _engine(servers[0].url, timeout=0.4)
    t0 = time.monotonic()
    (comps,) = eng.generate([GenerationRequest("p", prompt="A")], P)
    assert comps[0].text == _want_text("p", 0)
    assert [a for _, a, _ in servers[0].attempts] == ["hang:3", "drop", "ok"]
    assert time.monotonic() - t0 < 2.5


def test_client_errors_are_not_retried(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(script=["status:400"]))
    eng = _engine(servers[0].url)
    with pytest.raises(GenerationError, match="HTTP 400") as ei:
        eng.generate([GenerationRequest("p", prompt="A")], P)
    assert isinstance(ei.value.__cause__, EngineError)
    assert len(servers[0].attempts) == 1


def test_completed_requests_survive_a_final_failure(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(by_prompt={"B": ["status:500"] * 10}))
    eng = _engine(servers[0].url, max_concurrency=1, max_retries=2)
    delivered: dict = {}
    reqs = [
        GenerationRequest("a", prompt="A", indices=(0, 1)),
        GenerationRequest("b", prompt="B", indices=(0,)),
        GenerationRequest("c", prompt="C", indices=(0, 1, 2, 3)),
    ]
    with pytest.raises(GenerationError, match="gave up after 3 attempts") as ei:
        eng.generate(reqs, P, on_result=lambda pos, comps: delivered.__setitem__(pos, comps))
    assert 0 in delivered and [c.text for c in delivered[0]] == [_want_text("a", i) for i in (0, 1)]
    assert ei.value.results[1] is None
    assert set(ei.value.completed) == set(delivered)
    # no new work after the failure: with one call at a time, c's calls queue behind b's and
    # none of them starts once b has given up (the failing worker stops the batch itself)
    assert sum(1 for _, _, b in servers[0].attempts if b["prompt"] == "C") == 0


def test_partial_samples_of_a_failed_request(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(script=["ok", "ok", "status:500", "status:500"]))
    eng = _engine(servers[0].url, max_concurrency=1, max_retries=1)
    with pytest.raises(GenerationError) as ei:
        eng.generate([GenerationRequest("p", prompt="A", indices=(0, 1, 2))], P)
    assert ei.value.completed == {}
    assert [c.index for c in ei.value.partial[0]] == [0, 1]


def test_load_is_spread_and_concurrency_bounded(servers) -> None:  # type: ignore[no-untyped-def]
    shared = {"inflight": 0, "max_inflight": 0}
    servers.extend(FakeServer(delay=0.15, shared=shared) for _ in range(2))
    eng = _engine([s.url for s in servers], max_concurrency=4)
    reqs = [GenerationRequest(f"p{i}", prompt="A", indices=(0, 1)) for i in range(6)]
    out = eng.generate(reqs, P)
    assert [[c.text for c in r] for r in out] == [
        [_want_text(f"p{i}", j) for j in (0, 1)] for i in range(6)
    ]
    counts = [len(s.attempts) for s in servers]
    assert sum(counts) == 12 and min(counts) >= 4
    assert 2 <= shared["max_inflight"] <= 4


def test_retry_moves_to_another_server(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(script=["status:503"] * 50))
    servers.append(FakeServer())
    eng = _engine([s.url for s in servers], max_retries=1, max_concurrency=2)
    reqs = [GenerationRequest(f"p{i}", prompt="A") for i in range(6)]
    out = eng.generate(reqs, P)
    assert all(r[0].text == _want_text(f"p{i}", 0) for i, r in enumerate(out))


def test_n_fanout_sends_runs_of_consecutive_seeds(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer())
    eng = _engine(servers[0].url, n_fanout=True)
    (comps,) = eng.generate([GenerationRequest("p", prompt="A", indices=(0, 1, 2, 7))], P)
    assert [c.text for c in comps] == [_want_text("p", i) for i in (0, 1, 2, 7)]
    sent = sorted((b["seed"], b["n"]) for _, _, b in servers[0].attempts)
    assert sent == [(sample_seed(9, "p", 0), 3), (sample_seed(9, "p", 7), 1)]


def test_request_bodies() -> None:
    eng = OpenAIEngine("m", "http://127.0.0.1:1/v1")
    params = SamplingParams(top_k=5, min_p=0.1, min_tokens=2, stop=("\n",), logprobs=3, seed=1)
    path, body = eng._body(GenerationRequest("p", prompt="Q", prefix="A: "), params, 2, 77)
    assert path == "/completions" and body["prompt"] == "Q" + "A: "
    assert (body["top_k"], body["min_p"], body["min_tokens"], body["stop"]) == (5, 0.1, 2, ["\n"])
    assert (body["n"], body["seed"], body["logprobs"]) == (2, 77, 3)
    msgs = [{"role": "user", "content": "hi"}]
    path, body = eng._body(GenerationRequest("p", messages=msgs, prefix="So"), params, 1, 3)
    assert path == "/chat/completions"
    assert body["messages"][-1] == {"role": "assistant", "content": "So"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    hosted = OpenAIEngine(
        "m", "http://127.0.0.1:1/v1", token_ids=False, vllm_extras=False, chat=True
    )
    path, body = hosted._body(GenerationRequest("p", prompt="Q"), params, 1, 3)
    assert path == "/chat/completions" and body["messages"] == [{"role": "user", "content": "Q"}]
    assert not {"top_k", "min_p", "min_tokens", "return_tokens_as_token_ids"} & set(body)


def test_hosted_style_chat_response_without_token_ids() -> None:
    from ttscale.engines.openai import _parse_choice

    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Paris."},
        "logprobs": {
            "content": [
                {
                    "token": "Paris",
                    "logprob": -0.1,
                    "top_logprobs": [{"token": "Paris", "logprob": -0.1}],
                },
                {"token": ".", "logprob": -0.2, "top_logprobs": []},
            ]
        },
        "finish_reason": "stop",
    }
    req = GenerationRequest("p", prompt="Q")
    c = _parse_choice(choice, req, 0, 5, SamplingParams(logprobs=1), 7, 2)
    assert c.text == "Paris." and c.token_ids is None and c.num_tokens == 2
    assert c.token_logprobs == (-0.1, -0.2) and c.cumulative_logprob == pytest.approx(-0.3)
    assert c.top_logprobs is None  # alternatives keyed by id need token ids


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(
        10.0
    )


def test_constructor_validation() -> None:
    with pytest.raises(ConfigError, match="base_urls"):
        OpenAIEngine("m", "localhost:8000")
    with pytest.raises(ConfigError, match="max_concurrency"):
        OpenAIEngine("m", "http://x/v1", max_concurrency=0)
    with pytest.raises(ConfigError, match="backoff"):
        OpenAIEngine("m", "http://x/v1", backoff=(1.0, 0.5, 2.0))
    assert isinstance(make_engine("openai", "m", base_urls=["http://x/v1"]), OpenAIEngine)


# -- token prompts, scoring, streaming (issue 9) --------------------------------------------------


class _CharTokenizer:
    """Decodes the fake server's ids (``ord``; 0-3 are special)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # type: ignore[no-untyped-def]
        return "".join(chr(t) for t in ids if t > 3 or not skip_special_tokens)


def test_without_token_prompts_nothing_is_declared_and_token_requests_are_refused(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer())
    eng = _engine(servers[0].url)
    caps = eng.capabilities
    assert not (caps.token_prefixes or caps.scoring or caps.streaming or caps.logprob_modes)
    req = GenerationRequest("p", prompt_token_ids=(1, 65))
    with pytest.raises(ConfigError, match="token_prompts=True"):
        eng.generate([req], P)
    with pytest.raises(ConfigError, match="token_prompts=True"):
        eng.score([GenerationRequest("p", prompt="A")], [(66,)])
    with pytest.raises(ConfigError, match="streaming"):
        eng.generate([GenerationRequest("p", prompt="A")], P, on_token=lambda e: False)
    assert servers[0].attempts == []  # refused before sending anything
    # the probe reads a server without /tokenize, token arrays and echo as "no"
    servers.append(FakeServer(vllm_like=False))
    assert not _engine(servers[1].url, token_prompts="auto").capabilities.scoring


def test_token_prompts_scoring_and_streaming_on_fake_server(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer(stream_delay=0.02))
    fake = servers[0]
    eng = _engine(fake.url, token_prompts="auto", tokenizer=_CharTokenizer())
    caps = eng.capabilities
    assert (caps.token_prefixes, caps.scoring, caps.streaming) == (True, True, True)
    assert caps.logprob_modes == {"raw_logprobs"}

    # token ids go out as a token array, exactly; a text prompt is tokenised by the server first
    reqs = [
        GenerationRequest(
            "a", prompt_token_ids=(1, 0, 70), prefix_token_ids=(2, 71), indices=(0, 1)
        ),
        GenerationRequest("b", prompt="Hi", prefix="!", prefix_token_ids=(3,)),
        GenerationRequest(
            "c", messages=[{"role": "user", "content": "Yo"}], prefix_token_ids=(72,)
        ),
    ]
    contexts = [
        [1, 0, 70, 2, 71],
        [1, ord("H"), ord("i"), ord("!"), 3],
        [*fake_tokenize({"messages": [{"role": "user", "content": "Yo"}]}), 72],
    ]
    fake.attempts.clear()
    out = eng.generate(reqs, P)
    sent = sorted(tuple(b["prompt"]) for _, _, b in fake.attempts)
    assert sorted(map(tuple, contexts + contexts[:1])) == sent
    flat = [(ctx, r, c) for ctx, r, cs in zip(contexts, reqs, out, strict=True) for c in cs]
    for ctx, _, c in flat:
        assert c.prompt_token_ids == tuple(ctx) and c.target_logprobs == c.token_logprobs
        # the fake model's values: token t of the completion sits at position len(ctx) + t
        want = [fake_logprob(len(ctx) + t, tok) for t, tok in enumerate(c.token_ids)]
        assert c.token_logprobs == pytest.approx(want)

    # scoring the generated tokens gives the generation's log-probs (echo, max_tokens=0)
    scores = eng.score([r for _, r, _ in flat], [c.token_ids for _, _, c in flat])
    for (_, _, c), s in zip(flat, scores, strict=True):
        assert s == pytest.approx(c.target_logprobs, abs=1e-12)
    echo = [b for _, _, b in fake.attempts if b.get("echo")]
    assert echo and all(b["max_tokens"] == 0 and b["logprobs"] == 0 for b in echo)
    assert eng.score([reqs[0]], [()]) == [()]

    # streaming: the same completions as a plain call, token by token, on the caller's thread
    import threading

    threads, events = set(), []

    def listen(e):  # type: ignore[no-untyped-def]
        threads.add(threading.get_ident())
        events.append(e)
        return False

    streamed = eng.generate(reqs, P, on_token=listen)
    assert streamed == out and threads == {threading.get_ident()}
    for pos, comps in enumerate(out):
        for slot, c in enumerate(comps):
            evs = [e for e in events if (e.request, e.slot) == (pos, slot)]
            assert [e.token_id for e in evs] == list(c.token_ids)
            assert [e.logprob for e in evs] == list(c.token_logprobs)
            assert [e.finished for e in evs][-1] and not any(e.finished for e in evs[:-1])

    # an abort stops that trace at the token it was asked on and closes its connection
    fake.streams.clear()
    got = eng.generate(
        reqs, P, on_token=lambda e: e.request == 0 and e.slot == 1 and e.num_tokens == 2
    )
    cut, full = got[0][1], out[0][1]
    assert cut.finish_reason == "abort" and cut.token_ids == full.token_ids[:2]
    assert cut.text == full.text[:2] and cut.token_logprobs == full.token_logprobs[:2]
    assert [got[0][0], got[1], got[2]] == [out[0][0], out[1], out[2]]
    fake.wait_streams_ended()
    stopped = [s for s in fake.streams if not s["completed"]]
    assert len(stopped) == 1 and stopped[0]["sent"] < len(full.token_ids)


# -- a real vLLM OpenAI server -------------------------------------------------------------------


@pytest.mark.vllm
def test_real_server_contract(vllm_server: str) -> None:
    eng = OpenAIEngine("tiny", vllm_server, max_concurrency=4)
    assert len(check_engine(eng)) == 11  # the engine loop's check included
    fan = OpenAIEngine("tiny", [vllm_server], n_fanout=True)
    check_engine(fan, only=("shapes", "reproducible", "distinct", "explicit_seeds", "loop"))
    # the loop's streamed requests (token prompts) against the real server
    streamed = OpenAIEngine("tiny", vllm_server, token_prompts=True, max_concurrency=4)
    assert check_engine(streamed, only=("loop",)) == ["loop"]


@pytest.mark.vllm
def test_real_server_matches_offline_vllm(vllm_server: str, vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """The server and the in-process engine draw the same samples from the same seeds."""
    params = SamplingParams(max_tokens=20, seed=4, logprobs=2, stop=("q",))
    reqs = [
        GenerationRequest("a", prompt="Hello there", indices=(0, 1, 2)),
        GenerationRequest("b", messages=[{"role": "user", "content": "Hi"}], indices=(5,)),
    ]
    served = OpenAIEngine("tiny", vllm_server, n_fanout=True).generate(reqs, params)
    offline = vllm_engine.generate(reqs, params)
    for rs, ro in zip(served, offline, strict=True):
        for s, o in zip(rs, ro, strict=True):
            assert (s.text, s.token_ids, s.finish_reason) == (o.text, o.token_ids, o.finish_reason)
            assert s.prompt_tokens == o.prompt_tokens
            assert s.cumulative_logprob == pytest.approx(o.cumulative_logprob, abs=1e-4)
            assert s.top_logprobs[0].keys() == o.top_logprobs[0].keys()


@pytest.mark.vllm
def test_real_server_info_reports_vllm_version(vllm_server: str) -> None:
    info = OpenAIEngine("tiny", vllm_server).info()
    assert info["engine"] == "openai" and info["version"].startswith("0.")


def test_info_without_version_endpoint(servers) -> None:  # type: ignore[no-untyped-def]
    servers.append(FakeServer())
    info = _engine(servers[0].url).info()
    assert info["version"] == "unknown" and info["logprob_mode"] == "raw_logprobs"


@pytest.mark.vllm
def test_real_server_token_prompts_scoring_and_streaming(vllm_server: str, vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """Against a real vLLM server: the probe finds token prompts; the contract holds; scoring
    equals generation log-probs; token-id requests match the offline engine; streaming equals a
    plain call and an abort stops one trace."""
    eng = OpenAIEngine("tiny", vllm_server, token_prompts="auto", max_concurrency=4)
    caps = eng.capabilities
    assert (caps.token_prefixes, caps.scoring, caps.streaming) == (True, True, True)
    from ttscale.testing import ENGINE_CHECKS

    assert check_engine(eng) == list(ENGINE_CHECKS)  # every capability check, for real
    params = SamplingParams(max_tokens=14, seed=6, temperature=0.8, top_k=40, stop=("q",))
    reqs = [
        GenerationRequest("a", prompt="The cat", indices=(0, 1, 2)),
        GenerationRequest(
            "b", messages=[{"role": "user", "content": "Hi"}], prefix_token_ids=(9, 1)
        ),
        GenerationRequest(
            "c", prompt_token_ids=(1, 40, 41), prefix_token_ids=(0, 50), indices=(3,)
        ),
    ]
    served = eng.generate(reqs, params)
    offline = vllm_engine.generate(reqs, params)
    for rs, ro in zip(served, offline, strict=True):
        for s, o in zip(rs, ro, strict=True):
            assert (s.token_ids, s.text, s.prompt_token_ids) == (
                o.token_ids,
                o.text,
                o.prompt_token_ids,
            )
            assert s.token_logprobs == pytest.approx(o.token_logprobs, abs=1e-4)
    flat = [(r, c) for r, cs in zip(reqs, served, strict=True) for c in cs]
    scores = eng.score([r for r, _ in flat], [c.token_ids for _, c in flat])
    for (_, c), s in zip(flat, scores, strict=True):
        assert len(s) == c.num_tokens and s == pytest.approx(c.target_logprobs, abs=1e-4)
    assert eng.decode(served[0][0].token_ids) == vllm_engine.decode(served[0][0].token_ids)

    streamed = eng.generate(reqs, params, on_token=lambda e: False)
    for rs, rt in zip(served, streamed, strict=True):
        for s, t in zip(rs, rt, strict=True):
            assert (t.token_ids, t.text, t.finish_reason) == (s.token_ids, s.text, s.finish_reason)
            assert t.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-6)
    victim = next(
        (p, j) for p, cs in enumerate(served) for j, c in enumerate(cs) if c.num_tokens > 3
    )
    got = eng.generate(
        reqs, params, on_token=lambda e: (e.request, e.slot) == victim and e.num_tokens == 3
    )
    cut, full = got[victim[0]][victim[1]], served[victim[0]][victim[1]]
    assert cut.finish_reason == "abort" and cut.token_ids == full.token_ids[:3]
    for p, cs in enumerate(served):
        for j, c in enumerate(cs):
            if (p, j) != victim:
                assert got[p][j].token_ids == c.token_ids


def test_processed_mode_adds_target_by_scoring(servers) -> None:  # type: ignore[no-untyped-def]
    """A processed-mode server: completions carry the proposal as generated and the target
    scored by echo, in plain and streamed calls; greedy proposals are one-hot."""
    servers.append(FakeServer(processed=True))
    eng = _engine(servers[0].url, token_prompts=True, logprob_mode="processed_logprobs",
                  tokenizer=_CharTokenizer())  # fmt: skip
    assert eng.capabilities.logprob_modes == {"raw_logprobs", "processed_logprobs"}
    req = GenerationRequest("a", prompt_token_ids=(1, 70, 71), indices=(0, 1))
    params = SamplingParams(seed=9, max_tokens=8, temperature=0.5, logprobs=1)
    plain = eng.generate([req], params)[0]
    streamed = eng.generate([req], params, on_token=lambda e: False)[0]
    assert plain == streamed
    for c in plain:
        raw = [fake_logprob(3 + t, tok) for t, tok in enumerate(c.token_ids)]
        assert c.target_logprobs == pytest.approx(raw)
        assert c.proposal_logprobs == c.token_logprobs == pytest.approx([v / 0.5 for v in raw])
    (g,) = eng.generate(
        [GenerationRequest("g", prompt_token_ids=(1, 70))], params.replace(temperature=0.0)
    )[0]
    assert g.proposal_logprobs == g.token_logprobs == (0.0,) * g.num_tokens
    assert g.target_logprobs == pytest.approx(
        [fake_logprob(2 + t, k) for t, k in enumerate(g.token_ids)]
    )
    assert all(top[k] == 0.0 for top, k in zip(g.top_logprobs, g.token_ids, strict=True))


def test_a_failed_stream_keeps_the_finished_samples(servers) -> None:  # type: ignore[no-untyped-def]
    """A stream that fails for good (a 400 is not retried) fails the call with GenerationError;
    samples that finished are in it, equal to a plain call's."""
    servers.append(FakeServer())
    eng = _engine(servers[0].url, token_prompts=True, tokenizer=_CharTokenizer(), max_concurrency=1)
    reqs = [GenerationRequest("a", prompt_token_ids=(1, 70), indices=(0, 1, 2))]
    plain = eng.generate(reqs, P)[0]
    servers[0].script = ["ok", "status:400"]  # with one worker: sample 0 streams, sample 1 fails
    with pytest.raises(GenerationError, match="HTTP 400") as err:
        eng.generate(reqs, P, on_token=lambda e: False)
    assert err.value.results == [None]
    assert err.value.partial == {0: [plain[0]]}
