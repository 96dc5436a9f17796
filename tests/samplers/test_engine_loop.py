"""The engine loop: engines that take work continuously, and the scheduler that runs samplers'
per-problem programs on them (results independent of concurrency, aborts accounted)."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from pathlib import Path

import pytest

from ttscale.engines import GenerationError, GenerationRequest, ScriptedEngine
from ttscale.engines.loop import BatchLoop, EngineLoop, LoopFailure, open_loop
from ttscale.errors import ConfigError
from ttscale.samplers import AdaptiveSampler, RepeatedSampler, SamplingSession
from ttscale.samplers.loop import Abort, Scheduler, Submit, Wait
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams

PARAMS = SamplingParams(temperature=1.0, max_tokens=24, seed=0)
PROBLEMS = [Problem(id=f"p{k}", prompt=f"q{k}") for k in range(6)]


def _drain(loop: EngineLoop) -> dict[int, list[Completion]]:
    got: dict[int, list[Completion]] = {}
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    return got


def _key(c: Completion) -> tuple[object, ...]:
    return (c.problem_id, c.index, c.token_ids, c.text, c.seed, c.finish_reason)


@pytest.mark.parametrize("kind", ["batch", "scripted-1", "scripted-5"])
def test_a_loop_returns_what_generate_returns(kind: str) -> None:
    engine = ScriptedEngine()
    reqs = [
        GenerationRequest(problem_id=p.id, prompt=p.prompt, indices=(0, 1, 2)) for p in PROBLEMS
    ] + [GenerationRequest(problem_id="p0", prompt="q0", indices=(5,), step=2)]
    want = engine.generate(reqs, PARAMS)
    loop: EngineLoop = (
        BatchLoop(engine, PARAMS)
        if kind == "batch"
        else engine.open_loop(PARAMS, tokens_per_poll=int(kind[-1]))
    )
    tickets = [loop.submit(r) for r in reqs]
    assert loop.in_flight == 3 * len(PROBLEMS) + 1
    got = _drain(loop)
    assert [[_key(c) for c in got[t]] for t in tickets] == [[_key(c) for c in w] for w in want]


def test_open_loop_uses_the_engines_own_loop_or_coalesces_batches() -> None:
    assert not isinstance(open_loop(ScriptedEngine(), PARAMS), BatchLoop)

    class Plain:  # an engine with batch generate only
        name = "plain"

        def __init__(self) -> None:
            self.inner = ScriptedEngine()
            self.calls: list[int] = []

        def generate(self, requests, params, *, on_result=None):  # type: ignore[no-untyped-def]
            self.calls.append(len(requests))
            return self.inner.generate(requests, params, on_result=on_result)

        def info(self) -> dict[str, str]:
            return {"engine": "plain"}

        def close(self) -> None:
            pass

    eng = Plain()
    loop = open_loop(eng, PARAMS)  # type: ignore[arg-type]
    assert isinstance(loop, BatchLoop)
    t = [loop.submit(GenerationRequest(problem_id=p.id, prompt=p.prompt)) for p in PROBLEMS]
    assert loop.abort(t[1]) == 0  # not started: dropped, no tokens
    got = _drain(loop)
    assert eng.calls == [len(PROBLEMS) - 1] and sorted(got) == [x for x in t if x != t[1]]


def test_abort_frees_the_slot_and_returns_the_tokens_generated_so_far() -> None:
    # "ab" + EOS = 3 tokens; 20 characters + EOS = 21 tokens; 2 tokens per poll
    engine = ScriptedEngine({"short": "ab", "long": "x" * 20})
    loop = engine.open_loop(PARAMS, tokens_per_poll=2)
    short = loop.submit(GenerationRequest(problem_id="short", prompt="s"))
    long = loop.submit(GenerationRequest(problem_id="long", prompt="l"))
    got: dict[int, list[Completion]] = {}
    loop.poll(lambda t, comps: got.__setitem__(t, comps))
    # the short request ends on the second poll (3 tokens <= 2 * 2), the long one has 4 by then
    assert list(got) == [short] and loop.polls == 2 and loop.in_flight == 1
    assert loop.abort(long) == 4
    assert loop.in_flight == 0 and loop.abort(long) == 0
    loop.poll(lambda t, comps: got.__setitem__(t, comps))
    assert list(got) == [short]  # never handed over


def test_scheduler_counts_aborted_tokens() -> None:
    engine = ScriptedEngine({"short": "ab", "long": "x" * 20})
    session = SamplingSession(engine, None)
    loop = engine.open_loop(PARAMS, tokens_per_poll=2)
    seen: list[object] = []

    def first_of_two(p: Problem):  # type: ignore[no-untyped-def]
        a, b = yield Submit(
            (
                GenerationRequest(problem_id="short", prompt="s"),
                GenerationRequest(problem_id="long", prompt="l"),
            )
        )
        got = yield Wait()
        seen.append(sorted(got) == [a])
        res = yield Abort((b,))
        seen.append(res.tokens)
        return got[a][0].text

    with session:
        out = list(Scheduler(session, PARAMS, loop=loop).run([first_of_two(PROBLEMS[0])]))
    assert out == ["ab"] and seen == [True, 4]
    assert session.generated["generated_tokens"] == 3 + 4
    assert session.generated["samples"] == 1


def _sig(results: Sequence[object]) -> list[tuple[object, ...]]:
    return [
        (r.problem_id, r.generated_tokens, r.resumed, tuple(_key(c.completion) for c in r.candidates))  # type: ignore[attr-defined]
        for r in results
    ]


class _BatchOnly:
    """A ScriptedEngine seen through batch ``generate`` only (no loop of its own)."""

    name = "scripted"

    def __init__(self, inner: ScriptedEngine) -> None:
        self.inner = inner

    def generate(self, requests, params, *, on_result=None, **kw):  # type: ignore[no-untyped-def]
        return self.inner.generate(requests, params, on_result=on_result, **kw)

    def info(self) -> dict[str, object]:
        return self.inner.info()

    def close(self) -> None:
        pass


def test_repeated_results_do_not_depend_on_concurrency() -> None:
    ref = _sig(list(RepeatedSampler(ScriptedEngine(), PARAMS, progress=False, batch_size=1).sample(PROBLEMS, 5)))
    for batch in (3, 7, 512):
        for eng in (ScriptedEngine(), _BatchOnly(ScriptedEngine())):
            s = RepeatedSampler(eng, PARAMS, progress=False, batch_size=batch)  # type: ignore[arg-type]
            assert _sig(list(s.sample(PROBLEMS, 5))) == ref, (batch, type(eng).__name__)
    # one problem in flight at a time, through the scheduler itself
    engine = ScriptedEngine()
    rep = RepeatedSampler(engine, PARAMS, progress=False)
    session = SamplingSession(engine, None)
    with session:
        sched = Scheduler(session, PARAMS, max_problems=1, max_sequences=2)
        one = list(sched.run(rep.program(p, 5, {}) for p in PROBLEMS))
    assert _sig(one) == ref


def _last_char(p: Problem, comps: Sequence[Completion]) -> list[Hashable | None]:
    return [c.text[-1:] or None for c in comps]


def _skewed(req: GenerationRequest, index: int, seed: int, params: SamplingParams) -> str:
    # mostly "a" for even problems, a mix for odd ones; lengths vary with the index
    k = int(req.problem_id[1:])
    return "z" * (1 + (index * 7 + k) % 9) + ("a" if k % 2 == 0 or index % 3 else "b")


def test_adaptive_results_do_not_depend_on_concurrency_or_drawing_ahead() -> None:
    def run(engine: object, batch: int, ahead: int | None, rule: str = "beta:0.9"):  # type: ignore[no-untyped-def]
        s = AdaptiveSampler(engine, PARAMS, rule, _last_char, batch_size=batch, ahead=ahead)  # type: ignore[arg-type]
        return list(s.sample(PROBLEMS, 16, seed=1)), s.decisions

    ref, ref_d = run(ScriptedEngine(_skewed), 1, 0)
    assert any(d.stopped for d in ref_d) and any(d.used > 4 for d in ref_d)
    for batch in (2, 5, 512):
        for engine in (ScriptedEngine(_skewed), _BatchOnly(ScriptedEngine(_skewed))):
            got, d = run(engine, batch, 0)
            # ahead=0: samples, decisions and tokens spent are the same
            assert _sig(got) == _sig(ref) and d == ref_d
            got, d = run(engine, batch, None)
            # drawing ahead: the same kept samples and decisions, more tokens spent
            assert [x[:1] + x[3:] for x in _sig(got)] == [x[:1] + x[3:] for x in _sig(ref)]
            assert [(x.used, x.answer, x.stopped) for x in d] == [
                (x.used, x.answer, x.stopped) for x in ref_d
            ]
            for r, x, y in zip(got, d, ref_d, strict=True):
                assert r.generated_tokens == x.generated_tokens >= y.generated_tokens
                assert x.drawn >= x.used


def test_adaptive_drawing_ahead_aborts_and_accounts_every_token(tmp_path: Path) -> None:
    engine = ScriptedEngine(_skewed)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    s = AdaptiveSampler(engine, PARAMS, "beta:0.9", _last_char, batch_size=64, ahead=None)
    results = list(s.sample(PROBLEMS, 16, seed=1, sink=store))
    assert sum(d.aborted_tokens for d in s.decisions) > 0
    store.refresh()
    stored = {(x.problem_id, x.index): x.num_tokens for x in store.samples()}
    for r, d in zip(results, s.decisions, strict=True):
        mine = [v for (pid, _), v in stored.items() if pid == r.problem_id]
        # every finished sample is stored (kept or drawn beyond the stop), aborted ones add tokens
        assert len(mine) == d.drawn
        assert r.generated_tokens == sum(mine) + d.aborted_tokens
    acct = store.accounting()
    assert acct["generated_tokens"] == sum(r.generated_tokens for r in results)


class _Watched(ScriptedEngine):
    """The scripted engine whose loop records how many samples are in it at every poll."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.busy: list[int] = []

    def open_loop(self, params: SamplingParams, *, tokens_per_poll: int = 4):  # type: ignore[no-untyped-def]
        loop = super().open_loop(params, tokens_per_poll=tokens_per_poll)
        inner, busy = loop.poll, self.busy

        def poll(on_result, max_steps=None):  # type: ignore[no-untyped-def]
            busy.append(loop.in_flight)
            return inner(on_result, max_steps)

        loop.poll = poll  # type: ignore[method-assign]
        return loop


def test_adaptive_drawing_ahead_keeps_the_engine_full() -> None:
    # ahead=None: each problem draws its share of the engine's room on top of what it already
    # drew, so the problems in flight keep nearly batch_size samples in the engine (a window of the
    # share alone settled at about (batch_size + problems) / 2: 23 of 40 here)
    engine = _Watched(_skewed)
    s = AdaptiveSampler(engine, PARAMS, "fixed", _last_char, batch_size=40, ahead=None)
    results = list(s.sample(PROBLEMS, 48, seed=1))
    assert [d.used for d in s.decisions] == [48] * len(PROBLEMS)  # a rule that never stops
    assert all(r.generated_tokens == sum(c.num_tokens for c in r.completions) for r in results)
    early = engine.busy[: len(engine.busy) // 2]  # before the last samples drain the engine
    assert max(engine.busy) <= 40 and sorted(early)[len(early) // 2] >= 30


def test_an_engine_failure_keeps_finished_samples(tmp_path: Path) -> None:
    # 2 samples per request: p0 and p1 are made, p2's first sample is the last before the failure
    engine = ScriptedEngine(fail_after=5)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    s = RepeatedSampler(engine, PARAMS, progress=False, batch_size=512)
    with pytest.raises(GenerationError, match="scripted failure after 5 samples"):
        list(s.sample(PROBLEMS, 2, sink=store))
    store.refresh()
    # p0 and p1 were in flight (lost with the engine); p2's finished sample is kept
    assert sorted(x.key for x in store.samples()) == [("p2", 0)]
    assert isinstance(GenerationError("x", []), GenerationError) and issubclass(LoopFailure, GenerationError)


def test_a_program_that_waits_for_nothing_is_an_error() -> None:
    engine = ScriptedEngine()
    session = SamplingSession(engine, None)

    def bad(p: Problem):  # type: ignore[no-untyped-def]
        yield Wait()
        return None

    with session, pytest.raises(Exception, match="no outstanding request"):
        list(Scheduler(session, PARAMS).run([bad(PROBLEMS[0])]))


README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- the code below is run by tests/samplers/test_engine_loop.py -->"


def test_the_readme_custom_sampler_runs() -> None:
    text = README.read_text()
    assert MARKER in text, "the README lost its custom-sampler example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    ns: dict[str, object] = {"__name__": "readme"}
    exec(compile(block.group(1), "README.md", "exec"), ns)
    results = ns["results"]
    session = ns["session"]
    # each problem drew samples two at a time until one contained "a" (at most 8); the kept
    # sample is the first such in index order, as a sequential loop over the indices finds it
    engine = ScriptedEngine()
    for p, (kept, spent) in zip(PROBLEMS, results, strict=True):  # type: ignore[call-overload]
        comps = engine.generate(
            [GenerationRequest(problem_id=p.id, prompt=p.prompt, indices=tuple(range(8)))], PARAMS
        )[0]
        first = next(c for c in comps if "a" in c.text)
        assert (kept.index, kept.text) == (first.index, first.text)
        assert spent >= sum(c.num_tokens for c in comps[: first.index + 1])
    # what the programs say they spent is what the session counted
    assert sum(s for _, s in results) == session.generated["generated_tokens"]  # type: ignore[attr-defined]


def test_pruning_results_do_not_depend_on_concurrency() -> None:
    from ttscale.samplers import PruningSampler

    params = SamplingParams(temperature=1.0, max_tokens=24, seed=0, logprobs=0)
    rule = "lowprob:threshold=-3.5,min_tokens=4"

    def run(engine: object, batch: int) -> list[tuple[object, ...]]:
        s = PruningSampler(engine, params, rule, batch_size=batch, progress=False)  # type: ignore[arg-type]
        return [
            (r.problem_id, r.generated_tokens, c.index, c.fate, c.pruned_at, c.completion.token_ids)
            for r in s.sample(PROBLEMS, 6, seed=2)
            for c in r.candidates
        ]

    ref = run(ScriptedEngine(), 1)
    assert any(x[4] is not None for x in ref) and any(x[4] is None for x in ref)
    for batch in (4, 512):
        assert run(ScriptedEngine(), batch) == ref
        # an engine with batch generate only: the same traces, watched through on_token
        batch_only = _BatchOnly(ScriptedEngine())
        batch_only.capabilities = batch_only.inner.capabilities  # type: ignore[attr-defined]
        assert run(batch_only, batch) == ref


def test_queued_requests_go_lowest_priority_first_and_ahead_ones_do_not_block_admission() -> None:
    engine = ScriptedEngine()
    loop = engine.open_loop(PARAMS)
    session = SamplingSession(engine, None)

    def prog(p: Problem, ahead: int):  # type: ignore[no-untyped-def]
        # the next sample at priority 0; ``ahead`` more drawn ahead at priority = index
        first = yield Submit((GenerationRequest(p.id, prompt=p.prompt, indices=(0,)),))
        rest = yield Submit(
            tuple(GenerationRequest(p.id, prompt=p.prompt, indices=(i,)) for i in range(1, ahead + 1)),
            priority=tuple(range(1, ahead + 1)),
            ahead=True,
        )
        got = yield Wait(first)
        # the drawn-ahead samples still queued are dropped at no cost
        dropped = yield Abort(rest)
        return got[first[0]][0].index, dropped.tokens

    with session:
        # room for 2 samples at a time, while every program queues 5 ahead of need: the ahead
        # ones do not hold the later programs out, and every program's sample 0 starts first
        sched = Scheduler(session, PARAMS, max_sequences=2, loop=loop)
        out = list(sched.run([prog(p, 5) for p in PROBLEMS[:4]]))
    assert [o[0] for o in out] == [0, 0, 0, 0]
    prios = [s[2] for s in loop.started]
    assert prios[:4] == [0, 0, 0, 0] and prios == sorted(prios)
    assert [s[0] for s in loop.started[:4]] == [p.id for p in PROBLEMS[:4]]  # FCFS among equals
    # aborted queued samples never started and cost nothing; those that did start are counted
    assert len(loop.started) < 4 * 6
    def full(pid: str, idx: tuple[int, ...]) -> int:
        req = GenerationRequest(pid, prompt="q" + pid[1:], indices=idx)
        return sum(c.num_tokens for c in engine.generate([req], PARAMS)[0])

    spent = session.generated["generated_tokens"]
    assert sum(full(p.id, (0,)) for p in PROBLEMS[:4]) <= spent <= sum(full(s[0], s[1]) for s in loop.started)
    with pytest.raises(ConfigError, match="2 requests but 1 priorities"):
        Submit((GenerationRequest("a", prompt="x"), GenerationRequest("b", prompt="y")), priority=(0,))
