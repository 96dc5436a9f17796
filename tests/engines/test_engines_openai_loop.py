"""OpenAIEngine.open_loop: requests go out as they are submitted and come back as they finish,
within max_concurrency; abort closes connections; the samples are generate's. Against the fake
server on 127.0.0.1; what is checked is counted at the server (held requests, disconnects,
requests in flight), never timed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from fakeopenai import FakeServer

from ttscale.engines import GenerationRequest
from ttscale.engines.loop import BatchLoop, EngineLoop, LoopFailure, open_loop
from ttscale.engines.openai import OpenAIEngine
from ttscale.errors import ConfigError
from ttscale.samplers import AdaptiveSampler, PruningSampler, RepeatedSampler
from ttscale.seeding import sample_seed
from ttscale.testing import check_engine
from ttscale.types import Completion, Problem, SamplingParams

pytestmark = pytest.mark.network

P = SamplingParams(seed=9, max_tokens=8)


class _CharTokenizer:
    """Decodes the fake server's ids (``ord``; 0-3 are special)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # type: ignore[no-untyped-def]
        return "".join(chr(t) for t in ids if t > 3 or not skip_special_tokens)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeServer]]:
    made: list[FakeServer] = []

    def make(**kw: Any) -> FakeServer:
        made.append(FakeServer(**kw))
        return made[-1]

    yield make
    for s in made:
        s.gate.set()  # nothing stays held
        s.close()


def _engine(url: str | list[str], **kw: Any) -> OpenAIEngine:
    kw.setdefault("backoff", (0.01, 2.0, 0.05))
    kw.setdefault("timeout", 10.0)
    kw.setdefault("jitter_seed", 0)
    if kw.get("token_prompts"):
        kw.setdefault("tokenizer", _CharTokenizer())
    return OpenAIEngine("m", url, **kw)


def _text(pid: str, index: int, seed: int = 9) -> str:
    return f"s{sample_seed(seed, pid, index)}"


def _drain(loop: EngineLoop, got: dict[int, list[Completion]], polls: int = 10_000) -> None:
    for _ in range(polls):
        if not loop.in_flight:
            return
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    raise AssertionError("the loop made no progress")


def _poll_until(loop: Any, cond: Callable[[], bool], got: dict[int, list[Completion]]) -> None:
    for _ in range(4000):  # short bounded polls (5 ms each): 20 s at most
        if cond():
            return
        loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=1)
    raise AssertionError("the condition was not reached")


def test_the_loop_passes_the_engine_contract(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake()
    for eng in (_engine(s.url), _engine(s.url, n_fanout=True), _engine(s.url, token_prompts=True)):
        assert not isinstance(eng.open_loop(P), BatchLoop)
        assert check_engine(eng, only=("loop",)) == ["loop"]
        eng.close()
        assert eng._runtime is None


def test_loop_batch_chooses_the_batch_fallback(fake) -> None:  # type: ignore[no-untyped-def]
    """``loop="batch"``: each poll one blocking ``generate`` of what is pending; the same
    samples as the asyncio loop, said in the engine's info; a wrong value is refused."""
    s = fake()
    reqs = [GenerationRequest("a", prompt="A", indices=(0, 1, 2)), GenerationRequest("b", prompt="B", indices=(4,))]
    outs = []
    for mode in ("async", "batch"):
        eng = _engine(s.url, loop=mode)
        assert eng.info()["loop"] == mode
        loop = eng.open_loop(P)
        assert isinstance(loop, BatchLoop) == (mode == "batch")
        tickets = [loop.submit(r) for r in reqs]
        got: dict[int, list[Completion]] = {}
        _drain(loop, got)
        outs.append([[c.text for c in got[t]] for t in tickets])
        loop.close()
        eng.close()
    assert outs[0] == outs[1] == [[_text("a", i) for i in (0, 1, 2)], [_text("b", 4)]]
    with pytest.raises(ConfigError, match="loop must be 'async' or 'batch'"):
        _engine(s.url, loop="threads")


def test_the_loop_returns_what_generate_returns(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake()
    msgs = [{"role": "user", "content": "Yo"}]
    reqs = [
        GenerationRequest("a", prompt="A", indices=(0, 1, 2)),
        GenerationRequest("b", messages=msgs, indices=(4,)),
        GenerationRequest("c", prompt_token_ids=(1, 70), prefix_token_ids=(71,), indices=(0, 3)),
        GenerationRequest("d", prompt="D", indices=(1,), step=2),
    ]
    params = SamplingParams(seed=9, max_tokens=8, logprobs=1)
    for kw in ({}, {"n_fanout": True}, {"processed": True}):
        processed = kw.pop("processed", False)
        mode = "processed_logprobs" if processed else "raw_logprobs"
        s.processed = processed
        eng = _engine(s.url, token_prompts=True, logprob_mode=mode, **kw)
        want = eng.generate(reqs, params)
        streamed = eng.generate(reqs, params, on_token=lambda e: False)
        loop = eng.open_loop(params)
        plain = [loop.submit(r) for r in reqs]
        tokens: dict[tuple[int, int], list[int]] = {}

        def record(ev, k, tokens=tokens):  # type: ignore[no-untyped-def]
            tokens.setdefault((k, ev.slot), []).append(ev.token_id)
            return False

        streams = [loop.submit(r, on_token=lambda e, k=k: record(e, k)) for k, r in enumerate(reqs)]
        assert loop.in_flight == 2 * sum(len(r.indices) for r in reqs)
        got: dict[int, list[Completion]] = {}
        _drain(loop, got)
        assert [got[t] for t in plain] == want
        assert [got[t] for t in streams] == streamed
        for k, comps in enumerate(streamed):
            for j, c in enumerate(comps):
                assert tokens[(k, j)] == list(c.token_ids)
        loop.close()
        eng.close()


def test_a_later_short_request_is_not_held_behind_a_slow_one(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake(by_prompt={"S": ["gate"]})
    eng = _engine(s.url)
    loop = eng.open_loop(P)
    slow = loop.submit(GenerationRequest("slow", prompt="S"))
    s.wait_for(lambda: len(s.attempts) == 1)  # the slow request is held at the server
    got: dict[int, list[Completion]] = {}
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=1)  # returns without it
    assert got == {} and loop.in_flight == 1
    short = loop.submit(GenerationRequest("short", prompt="A"))
    loop.poll(lambda t, comps: got.__setitem__(t, comps))  # the short one, while slow is held
    assert list(got) == [short] and got[short][0].text == _text("short", 0)
    assert loop.in_flight == 1 and not s.gate.is_set()
    s.gate.set()
    _drain(loop, got)
    assert list(got) == [short, slow] and got[slow][0].text == _text("slow", 0)
    loop.close()


def test_batch_loop_holds_a_short_request_behind_a_slow_one(fake) -> None:  # type: ignore[no-untyped-def]
    """The fallback this replaces: one poll is one generate call over what is pending."""
    s = fake(by_prompt={"S": ["gate"]})
    eng = _engine(s.url)
    loop = BatchLoop(eng, P)
    slow = loop.submit(GenerationRequest("slow", prompt="S"))
    short = loop.submit(GenerationRequest("short", prompt="A"))
    order: list[int] = []

    def on_result(t: int, comps: list[Completion]) -> None:
        order.append(t)
        if t == short:
            assert not s.gate.is_set() or slow in order
            s.gate.set()  # only now may the slow one finish

    loop.poll(on_result)
    assert order == [short, slow]  # one poll: the short request came with the slow one's call


def test_concurrency_is_bounded_across_loops(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake(by_prompt={"G": ["gate"] * 8})
    eng = _engine(s.url, max_concurrency=3)
    loops = [eng.open_loop(P), eng.open_loop(P)]
    tickets = [
        [loop.submit(GenerationRequest(f"g{k}{i}", prompt="G", indices=(0,))) for i in range(4)]
        for k, loop in enumerate(loops)
    ]
    s.wait_for(lambda: s.shared["inflight"] == 3)  # three held at the server, five queued
    got: dict[int, list[Completion]] = {}
    loops[0].poll(lambda t, comps: got.__setitem__(t, comps), max_steps=1)
    assert got == {} and len(s.attempts) == 3
    s.gate.set()
    for k, loop in enumerate(loops):
        got = {}
        _drain(loop, got)
        assert [got[t][0].text for t in tickets[k]] == [_text(f"g{k}{i}", 0) for i in range(4)]
        loop.close()
    assert len(s.attempts) == 8 and s.shared["max_inflight"] == 3


def test_abort_of_a_queued_call_never_sends_it_and_of_a_sent_one_disconnects(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake(by_prompt={"G": ["gate"]})
    eng = _engine(s.url, max_concurrency=1)
    loop = eng.open_loop(P)
    sent = loop.submit(GenerationRequest("g", prompt="G", indices=(0,)))
    queued = loop.submit(GenerationRequest("q", prompt="Q", indices=(0, 1)))
    s.wait_for(lambda: len(s.attempts) == 1)
    assert loop.abort(queued) == 0 and loop.in_flight == 1
    assert loop.abort(sent) == 0  # a plain call reports nothing before it answers
    s.wait_for(lambda: s.disconnects == 1)  # its connection was closed: the server saw it
    after = loop.submit(GenerationRequest("a", prompt="A"))
    got: dict[int, list[Completion]] = {}
    _drain(loop, got)
    assert list(got) == [after]  # the aborted ones are never handed over
    assert [b["prompt"] for _, _, b in s.attempts] == ["G", "A"]  # the queued one never went out
    loop.close()


def test_abort_closes_a_stream_and_counts_its_tokens(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake(stream_hold=2)
    eng = _engine(s.url, token_prompts=True)
    loop = eng.open_loop(P)
    seen: list[int] = []
    req = GenerationRequest("p", prompt_token_ids=(1, 65), indices=(0,))
    t = loop.submit(req, on_token=lambda e: seen.append(e.token_id) is None and False)
    got: dict[int, list[Completion]] = {}
    _poll_until(loop, lambda: len(seen) == 2, got)  # the server holds after two events
    assert loop.abort(t) == 2 and loop.in_flight == 0
    s.wait_for(lambda: s.disconnects == 1)
    assert s.streams[0]["disconnected"] and not s.streams[0]["completed"]
    assert got == {}
    # an on_token abort closes that trace's stream at once; the trace is generate's, cut there
    s.gate.set()
    want = eng.generate([req], P, on_token=lambda e: e.num_tokens == 2)[0][0]
    s.gate.clear()
    s.streams.clear()
    t = loop.submit(req, on_token=lambda e: e.num_tokens == 2)
    _poll_until(loop, lambda: t in got, got)
    assert got[t] == [want] and want.finish_reason == "abort" and want.num_tokens == 2
    s.wait_for(lambda: s.disconnects == 2)
    assert not s.streams[0]["completed"]
    loop.close()


def test_retries_429_with_retry_after_and_an_abort_stops_them(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake(script=["429:0.2", "ok"])
    eng = _engine(s.url)
    loop = eng.open_loop(P)
    t = loop.submit(GenerationRequest("p", prompt="A", indices=(0,)))
    got: dict[int, list[Completion]] = {}
    _drain(loop, got)
    assert got[t][0].text == _text("p", 0) and eng.stats["retries"] == 1
    (t0, *_), (t1, *_) = s.attempts
    assert t1 - t0 >= 0.2  # the header's 0.2 s beats the 0.01 s backoff
    # a request waiting out a Retry-After is cancelled by abort: no second attempt
    s.attempts.clear()
    s.script = ["429:60"]
    t = loop.submit(GenerationRequest("p", prompt="A", indices=(0,)))
    s.wait_for(lambda: len(s.attempts) == 1)
    assert loop.abort(t) == 0
    loop.close()  # joins the loop thread: nothing is left waiting to retry
    assert eng._runtime is None and len(s.attempts) == 1


def test_a_failure_hands_over_what_finished_and_carries_partial_samples(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake(by_prompt={"B": ["ok", "status:400"]})
    eng = _engine(s.url, max_concurrency=1)
    loop = eng.open_loop(P)
    a = loop.submit(GenerationRequest("a", prompt="A", indices=(0, 1)))
    b = loop.submit(GenerationRequest("b", prompt="B", indices=(0, 1, 2)))
    got: dict[int, list[Completion]] = {}
    with pytest.raises(LoopFailure, match="HTTP 400") as err:
        _drain(loop, got)
    assert [c.text for c in got[a]] == [_text("a", 0), _text("a", 1)] and b not in got
    assert {k: [c.text for c in v] for k, v in err.value.by_ticket.items()} == {b: [_text("b", 0)]}
    assert loop.in_flight == 0 and eng._runtime is None  # closed: nothing left running
    # the prompt "B" got 2 requests: the third sample never went out
    assert [x["prompt"] for _, _, x in s.attempts].count("B") == 2


# -- samplers end to end: the same samples through the loop as through the batch fallback ------


class _BatchOnly(OpenAIEngine):
    """The same engine seen through :class:`BatchLoop` (no loop of its own)."""

    open_loop = None  # type: ignore[assignment]


PROBLEMS = [Problem(id=f"q{k}", prompt=f"Q{k}") for k in range(5)]


def _sig(results: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [
        (r.problem_id, r.generated_tokens,
         tuple((c.completion.index, c.completion.text, c.completion.token_ids,
                c.completion.finish_reason, c.fate) for c in r.candidates))
        for r in results
    ]  # fmt: skip


def _parity(problem: Problem, comps: Sequence[Completion]) -> list[int]:
    return [int(c.text[-1]) % 3 for c in comps]  # the fake's texts end in a seed digit


def test_samplers_give_the_same_samples_through_the_loop_and_the_batch_fallback(fake) -> None:  # type: ignore[no-untyped-def]
    s = fake()
    params = SamplingParams(seed=9, max_tokens=8, logprobs=0)
    loop_eng = _engine(s.url, token_prompts=True, max_concurrency=4)
    batch_eng = _BatchOnly("m", s.url, token_prompts=True, tokenizer=_CharTokenizer())
    assert isinstance(open_loop(batch_eng, params), BatchLoop)
    assert not isinstance(open_loop(loop_eng, params), BatchLoop)
    runs: dict[str, list[Any]] = {}
    for name, eng in (("loop", loop_eng), ("batch", batch_eng)):
        rep = RepeatedSampler(eng, params, progress=False, batch_size=6)
        ada = AdaptiveSampler(eng, params, "beta:0.8", _parity, batch_size=6, ahead=0)
        # drawing ahead: what was drawn beyond the stop depends on timing, so its tokens may
        # differ; the kept samples and the decisions do not
        ahead = AdaptiveSampler(eng, params, "beta:0.8", _parity, batch_size=6, ahead=None)
        # the fake's mean log-prob is -0.25 .. -0.29: this rule prunes some traces mid-stream
        pru = PruningSampler(eng, params, "lowprob:threshold=-0.27,min_tokens=3", progress=False)
        runs[name] = [
            _sig(list(rep.sample(PROBLEMS, 6, seed=1))),
            _sig(list(ada.sample(PROBLEMS, 12, seed=2))),
            [(d.used, d.answer, d.stopped) for d in ada.decisions],
            _sig(list(pru.sample(PROBLEMS, 6, seed=3))),
            [x[:1] + x[2:] for x in _sig(list(ahead.sample(PROBLEMS, 12, seed=2)))],
            [(d.used, d.answer, d.stopped) for d in ahead.decisions],
        ]
    assert runs["loop"] == runs["batch"]
    _, _, decisions, pruned, _, ahead_decisions = runs["loop"]
    assert ahead_decisions == decisions
    assert any(stopped for _, _, stopped in decisions) and any(used > 6 for used, _, _ in decisions)
    fates = [c[4] for r in pruned for c in r[2]]
    assert "pruned" in fates and any(f != "pruned" for f in fates), fates
    loop_eng.close()
