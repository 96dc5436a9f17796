"""HFEngine.open_loop: one running batch that requests join and leave between decoding steps.

Every sample must be the one ``generate`` draws for its seed (tokens, text, finish; float32
log-probabilities within 1e-5, the documented batch-composition effect), whenever it is
submitted and whatever else is in flight; aborts free the rows at once and count their tokens;
``batch_size`` caps the running batch; failures keep finished work; and the samplers give the
same results through the loop as through batch ``generate`` calls (the fallback loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ttscale.engines import GenerationRequest, TokenEvent
from ttscale.engines.loop import BatchLoop, LoopFailure, open_loop
from ttscale.errors import ConfigError
from ttscale.types import Completion, Problem, SamplingParams

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ttscale.engines.hf import HFEngine, _HFLoop  # noqa: E402


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(tiny_model_dir, batch_size=None)


class _BatchOnlyHF(HFEngine):
    """The same engine seen without its loop: the scheduler falls back to BatchLoop (main's
    behaviour before the hf loop)."""

    open_loop = None  # type: ignore[assignment]


def _batch_only(engine: HFEngine) -> HFEngine:
    other = object.__new__(_BatchOnlyHF)
    other.__dict__ = engine.__dict__  # the same model, tokenizer and settings
    return other


def _same(got: Completion, want: Completion) -> None:
    assert (got.index, got.seed, got.token_ids, got.text) == (
        want.index, want.seed, want.token_ids, want.text
    )  # fmt: skip
    assert (got.finish_reason, got.stop_reason, got.num_tokens, got.prompt_token_ids) == (
        want.finish_reason, want.stop_reason, want.num_tokens, want.prompt_token_ids
    )  # fmt: skip
    for a, b in [
        (got.token_logprobs, want.token_logprobs),
        (got.target_logprobs, want.target_logprobs),
        (got.proposal_logprobs, want.proposal_logprobs),
    ]:
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a == pytest.approx(b, abs=1e-5)
    assert (got.self_certainty is None) == (want.self_certainty is None)
    if got.self_certainty is not None:
        assert got.self_certainty == pytest.approx(want.self_certainty, abs=1e-6)
    assert (got.top_logprobs is None) == (want.top_logprobs is None)
    for ta, tb in zip(got.top_logprobs or (), want.top_logprobs or (), strict=True):
        assert ta.keys() == tb.keys()
        assert [ta[k] for k in ta] == pytest.approx([tb[k] for k in ta], abs=1e-5)


def _drain(loop: Any, got: dict[int, list[Completion]], max_steps: int | None = None) -> None:
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=max_steps)


REQS = [
    GenerationRequest("a", prompt="Abc", indices=(0, 1, 2)),
    GenerationRequest("b", prompt="The cat sat", indices=(4,)),
    GenerationRequest("a", prompt="Abc", indices=(7, 3), step=1),
    # the first request's samples capped at 3 tokens by the request's own max_tokens
    GenerationRequest("a", prompt="Abc", indices=(0, 1, 2), max_tokens=3),
    GenerationRequest("c", prompt="x", prefix_token_ids=(40, 41, 42), indices=(1, 2)),
]


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("raw_logprobs", {"temperature": 1.0, "logprobs": 2}),
        ("processed_logprobs", {"temperature": 0.7, "top_k": 20, "min_tokens": 2, "logprobs": 0}),
        ("raw_logprobs", {"temperature": 0.0, "logprobs": None}),
    ],
)
def test_loop_returns_what_generate_returns(hf: HFEngine, mode: str, kw: dict[str, Any]) -> None:
    """Requests join the running batch at different times and come back as generate's."""
    params = SamplingParams(max_tokens=16, seed=5, **kw)
    hf.logprob_mode = mode
    hf.self_certainty = mode == "processed_logprobs"  # the loop's completions carry it too
    try:
        want = hf.generate(REQS, params)
        # no gathering: each poll admits what is queued, so they join at different steps
        loop = hf.open_loop(params, admit_share=0, admit_wait=0)
        assert isinstance(open_loop(hf, params), _HFLoop)
        got: dict[int, list[Completion]] = {}
        t0 = loop.submit(REQS[0])
        loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=2)
        assert loop.steps == 2 and loop._batch.live == 3  # running before the others arrive
        t1 = loop.submit(REQS[1])
        loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=3)
        tickets = [t0, t1, *(loop.submit(r) for r in REQS[2:])]
        assert loop.in_flight == 11
        _drain(loop, got)
    finally:
        hf.logprob_mode = "raw_logprobs"
        hf.self_certainty = False
    for t, w in zip(tickets, want, strict=True):
        assert len(got[t]) == len(w)
        for g, c in zip(got[t], w, strict=True):
            _same(g, c)
    assert loop.admissions >= 3 and loop._batch.cache is None  # merged in; nothing left over
    full, capped = got[tickets[0]], got[tickets[3]]
    assert [c.token_ids for c in capped] == [(c.token_ids or ())[:3] for c in full]


def test_loop_stop_strings_match_generate(hf: HFEngine) -> None:
    base = SamplingParams(temperature=1.0, max_tokens=24, seed=9, min_tokens=2)
    plain = hf.generate(REQS[:2], base)
    # a stop string that occurs after min_tokens in a sample: some samples stop on it
    stop = next(c.text[4] for r in plain for c in r if len(c.text) > 6)
    params = base.replace(stop=(stop,))
    want = hf.generate(REQS, params)
    loop = hf.open_loop(params)
    got: dict[int, list[Completion]] = {}
    t0 = loop.submit(REQS[0])
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=1)
    tickets = [t0, *(loop.submit(r) for r in REQS[1:])]
    _drain(loop, got)
    assert any(c.stop_reason == stop for r in want for c in r)
    for t, w in zip(tickets, want, strict=True):
        for g, c in zip(got[t], w, strict=True):
            _same(g, c)


def test_abort_frees_the_rows_and_counts_their_tokens(hf: HFEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=40, min_tokens=40, seed=5)
    loop = hf.open_loop(params)
    one = loop.submit(GenerationRequest("a", prompt="Abc"))
    fan = loop.submit(GenerationRequest("b", prompt="Xyz", indices=(0, 1, 2)))
    got: dict[int, list[Completion]] = {}
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=5)
    queued = loop.submit(GenerationRequest("q", prompt="Q"))
    assert loop.abort(queued) == 0  # never admitted: no tokens
    # every step generated one token per trace (no EOS before min_tokens): 5 and 3 x 5
    assert loop.abort(one) == 5 and loop.abort(one) == 0
    assert loop.in_flight == 3 and loop._batch.live == 3
    later = GenerationRequest("c", prompt="Later on", indices=(0, 1))
    lt = loop.submit(later)
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=4)
    assert loop._batch.live == 5 and len(loop._batch.rows) == 5  # the aborted row compacted away
    assert loop.abort(fan) == 3 * 9
    assert loop.in_flight == 2 and loop._batch.live == 2
    _drain(loop, got)
    assert list(got) == [lt]  # aborted requests are never handed over
    for g, c in zip(got[lt], hf.generate([later], params)[0], strict=True):
        _same(g, c)
    assert loop._batch.cache is None and loop.in_flight == 0
    loop.poll(lambda t, comps: got.__setitem__(t, comps))  # nothing in flight: nothing happens
    assert loop.steps == 5 + 4 + 36


def test_batch_size_caps_the_running_batch(hf: HFEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=2)
    reqs = [GenerationRequest(f"p{k}", prompt=f"Question {k}", indices=(0, 1)) for k in range(3)]
    want = hf.generate(reqs, params)
    hf.batch_size = 3
    try:
        loop = hf.open_loop(params)
        tickets = [loop.submit(r) for r in reqs]
        got: dict[int, list[Completion]] = {}
        sizes = []
        while loop.in_flight:
            loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=1)
            sizes.append(loop._batch.live)
    finally:
        hf.batch_size = None
    assert max(sizes) == 3 and loop.admissions >= 2
    for t, w in zip(tickets, want, strict=True):
        for g, c in zip(got[t], w, strict=True):
            _same(g, c)


def test_streaming_and_trace_aborts_match_generate(hf: HFEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=20, min_tokens=20, seed=4, logprobs=1)
    reqs = [
        GenerationRequest("a", prompt="Abc", indices=(0, 1, 2)),
        GenerationRequest("b", prompt="Hello", indices=(5,)),
    ]

    def cut(ev: TokenEvent, pos: int) -> bool:
        return (pos, ev.slot) == (0, 1) and ev.num_tokens == 3

    events: list[TokenEvent] = []

    def on_token(ev: TokenEvent) -> bool:
        events.append(ev)
        return cut(ev, ev.request)

    want = hf.generate(reqs, params, on_token=on_token)
    streamed_generate = [(e.request, e.slot, e.token_id) for e in events]
    loop = hf.open_loop(params)
    seen: list[tuple[int, int, int]] = []

    def per(pos: int) -> Callable[[TokenEvent], bool]:
        def cb(ev: TokenEvent) -> bool:
            assert ev.request == 0  # a loop's events name the request itself
            seen.append((pos, ev.slot, ev.token_id))
            return cut(ev, pos)

        return cb

    got: dict[int, list[Completion]] = {}
    t0 = loop.submit(reqs[0], on_token=per(0))
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=2)
    t1 = loop.submit(reqs[1], on_token=per(1))
    _drain(loop, got)
    assert sorted(seen) == sorted(streamed_generate)
    for t, w in zip((t0, t1), want, strict=True):
        for g, c in zip(got[t], w, strict=True):
            _same(g, c)
    aborted = got[t0][1]
    assert aborted.finish_reason == "abort" and aborted.num_tokens == 3
    assert [c.num_tokens for c in got[t0]] == [20, 3, 20]


class _Flaky:
    """A model whose forward raises at call ``fail_at`` (counted from 1)."""

    def __init__(self, model: Any, fail_at: int) -> None:
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated device failure")
        return self.model(*args, **kwargs)


def test_a_failure_hands_over_finished_work_and_raises_loop_failure(hf: HFEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, min_tokens=4, seed=3)
    model = hf.model
    hf.model = _Flaky(model, fail_at=6)  # prefill, 4 decoding steps, then the 6th call fails
    got: dict[int, list[Completion]] = {}
    try:
        loop = hf.open_loop(params)
        short = loop.submit(GenerationRequest("s", prompt="a", max_tokens=4))
        # slot 0 of the long request is cut at its 2nd token: a finished sample of a request
        # that never finishes
        long = loop.submit(
            GenerationRequest("l", prompt="b", indices=(0, 1)),
            on_token=lambda ev: ev.slot == 0 and ev.num_tokens == 2,
        )
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
        assert list(got) == [short] and got[short][0].num_tokens == 4
        with pytest.raises(LoopFailure, match="simulated device failure") as ei:
            _drain(loop, got)
    finally:
        hf.model = model
    assert list(ei.value.by_ticket) == [long]
    (part,) = ei.value.by_ticket[long]
    assert part.index == 0 and part.finish_reason == "abort" and part.num_tokens == 2
    assert loop.in_flight == 0 and loop._batch.cache is None  # the loop is empty after it


# -- samplers through the loop give the results of batch generate calls ---------------------


@pytest.fixture(scope="module")
def bundled() -> Any:
    import ttscale.evals

    eng = HFEngine(ttscale.evals.default_model_path())
    yield eng
    eng.close()


def _cands(results: Any) -> list[tuple[Any, ...]]:
    return [
        (r.problem_id, c.index, c.text, c.completion.token_ids, c.fate, c.parent, c.pruned_at)
        for r in results
        for c in r.candidates
    ]


def _weights(results: Any) -> list[float]:
    return [float(c.log_weight) for r in results for c in r.candidates if c.log_weight is not None]


def _run(make: Callable[[HFEngine], Any], engine: HFEngine, problems: list[Problem], n: int) -> Any:
    return list(make(engine).sample(problems, n, seed=1))


@pytest.mark.parametrize(
    "name",
    ["repeated", "adaptive", "adaptive-ahead", "pruning", "smc", "beam", "dvts"],
)
def test_samplers_give_the_same_results_through_the_loop(bundled: HFEngine, name: str) -> None:
    from ttscale.evals import load_problems
    from ttscale.samplers import AdaptiveSampler, PruningSampler, RepeatedSampler
    from ttscale.samplers.adaptive import verifier_answers
    from ttscale.samplers.search import SearchSampler
    from ttscale.samplers.smc import SMCSampler
    from ttscale.verifiers import MathVerifier

    problems = load_problems("arith", limit=4)
    params = SamplingParams(temperature=0.8, max_tokens=48, seed=1, logprobs=2)
    answers = verifier_answers(MathVerifier(extractor="arith"))

    def potential(problem: Any, texts: Any, finished: Any) -> list[float]:
        # deterministic, text-dependent: particles are reweighted and resampled
        return [-0.05 * (len(t) % 7) for t in texts]

    make: dict[str, Callable[[HFEngine], Any]] = {
        "repeated": lambda e: RepeatedSampler(e, params, progress=False, batch_size=5),
        "adaptive": lambda e: AdaptiveSampler(e, params, "beta:0.8", answers, ahead=0),
        "adaptive-ahead": lambda e: AdaptiveSampler(e, params, "beta:0.8", answers),
        "pruning": lambda e: PruningSampler(
            e, params, "lowprob:threshold=-0.3,min_tokens=4", progress=False
        ),
        "smc": lambda e: SMCSampler(
            e, potential, params, step_stop=("\n",), tokens_per_step=16, max_steps=6,
            ess_threshold=1.0, progress=False,
        ),
        "beam": lambda e: SearchSampler(e, potential, params, search="beam", width=2,
                                        max_tokens=48, max_steps=6),
        "dvts": lambda e: SearchSampler(e, potential, params, search="dvts", width=2,
                                        max_tokens=48, max_steps=6),
    }  # fmt: skip
    batch = _batch_only(bundled)
    assert isinstance(open_loop(batch, params), BatchLoop)
    want = _run(make[name], batch, problems, 6)
    got = _run(make[name], bundled, problems, 6)
    assert _cands(got) == _cands(want)
    assert [r.generated_tokens for r in got] == [r.generated_tokens for r in want]
    assert _weights(got) == pytest.approx(_weights(want), abs=1e-5)  # float32 batch effects
    for a, b in zip(got, want, strict=True):
        if "log_ml" in b.info:
            assert a.info["log_ml"] == pytest.approx(b.info["log_ml"], abs=1e-5)
    if name == "pruning":
        assert any(c.pruned_at is not None for r in got for c in r.candidates)
    if name == "smc":
        assert any(c.parent is not None for r in got for c in r.candidates)


def test_a_continued_step_extends_the_stored_prefix(hf: HFEngine) -> None:
    """A step-wise continuation (prompt + the previous step's tokens) prefills only the new
    tokens, from the cache the previous step left, and draws what generate draws."""
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=8, logprobs=1)
    first = GenerationRequest("a", prompt="Once upon", indices=(0, 1), max_tokens=6)
    loop = hf.open_loop(params)
    got: dict[int, list[Completion]] = {}
    t = loop.submit(first)
    _drain(loop, got)
    assert loop.prefixes is not None and loop.prefixes.hits == 0
    steps = [
        GenerationRequest(
            "a", prompt="Once upon", prefix_token_ids=c.token_ids or (), indices=(c.index,), step=1
        )
        for c in got[t]
    ]
    # a resampled child: the same prefix twice (one stored cache serves both)
    steps.append(replace(steps[0], indices=(5,)))
    want = hf.generate(steps, params)
    tickets = [loop.submit(r) for r in steps]
    _drain(loop, got)
    assert loop.prefixes.hits == 2  # one lookup per distinct prompt
    assert loop.prefixes.saved_tokens == 2 * (len(hf.prompt_token_ids(first)) + 5)
    for tk, w in zip(tickets, want, strict=True):
        for g, c in zip(got[tk], w, strict=True):
            _same(g, c)
    # without reuse: no store, the same samples
    plain = hf.open_loop(params, prefix_reuse=False)
    assert plain.prefixes is None
    again: dict[int, list[Completion]] = {}
    tickets = [plain.submit(r) for r in steps]
    _drain(plain, again)
    for tk, w in zip(tickets, want, strict=True):
        for g, c in zip(again[tk], w, strict=True):
            _same(g, c)


def test_the_prefix_store_keeps_at_most_the_batchs_worth() -> None:
    from ttscale.engines.hf import _Prefix, _PrefixStore

    store = _PrefixStore(minimum=10)
    kv = [torch.zeros((1, 1, 4, 1))]

    def item(n: int) -> _Prefix:
        return _Prefix(n, torch.ones(n, dtype=torch.long), kv, kv)

    for k in range(4):
        store.put((k, 1, 2, 3), item(4), budget=0)
    # 10 columns at most: the two oldest are gone; a prompt extends a kept one by 1-4 tokens
    assert store.find((0, 1, 2, 3, 9)) is None and store.find((1, 1, 2, 3, 9)) is None
    assert store.find((3, 1, 2, 3, 9, 9, 9, 9)) is not None
    assert store.find((3, 1, 2, 3, 9, 9, 9, 9, 9)) is None  # 5 tokens past it: not looked up
    assert store.find((3, 1, 2, 3)) is None  # the prefix itself: nothing left to prefill
    store.put((7,) * 12, item(12), budget=30)  # a larger batch allows more
    assert store.find((2, 1, 2, 3, 0)) is not None and store.hits == 2


def test_rows_queued_while_a_batch_runs_join_together_and_a_lone_one_within_admit_wait(
    hf: HFEngine,
) -> None:
    """Admission policy: rows submitted while the batch runs wait until they are admit_share of
    its live rows (then join in one prefill) or the oldest waited admit_wait steps; with an
    empty batch they join at once. When they join changes nothing in what they draw."""
    params = SamplingParams(temperature=1.0, max_tokens=30, min_tokens=30, seed=3)
    run = GenerationRequest("r", prompt="Abc", indices=(0, 1, 2, 3))
    one, two = GenerationRequest("o", prompt="One"), GenerationRequest("t", prompt="Two two")
    lone = GenerationRequest("l", prompt="Alone", indices=(5,))
    got: dict[int, list[Completion]] = {}

    def put(t: int, comps: list[Completion]) -> None:
        got[t] = comps

    loop = hf.open_loop(params, admit_share=0.5, admit_wait=8)
    tickets = [loop.submit(run)]
    loop.poll(put, max_steps=1)
    assert (loop.admissions, loop._batch.live) == (1, 4)  # an empty batch admits at once
    tickets.append(loop.submit(one))
    loop.poll(put, max_steps=2)
    assert (loop.admissions, loop._batch.live) == (1, 4)  # 1 queued < 0.5 x 4 live: waits
    tickets.append(loop.submit(two))
    loop.poll(put, max_steps=1)
    assert (loop.admissions, loop._batch.live) == (2, 6)  # 2 queued: both join, one prefill
    tickets.append(loop.submit(lone))  # 1 < 0.5 x 6: only the wait admits it
    live = []
    for _ in range(9):
        loop.poll(put, max_steps=1)
        live.append(loop._batch.live)
    assert live == [6] * 8 + [7] and loop.admissions == 3  # joined after 8 steps' wait
    _drain(loop, got)
    want = hf.generate([run, one, two, lone], params)
    for t, w in zip(tickets, want, strict=True):
        for g, c in zip(got[t], w, strict=True):
            _same(g, c)
    # admit_share=0 and admit_wait=0: every poll admits what is queued (no gathering)
    eager = hf.open_loop(params, admit_share=0, admit_wait=0)
    eager.submit(run)
    eager.poll(put, max_steps=1)
    eager.submit(lone)
    eager.poll(put, max_steps=1)
    assert (eager.admissions, eager._batch.live) == (2, 5)
    eager.close()
    with pytest.raises(ConfigError, match="admit_wait"):
        hf.open_loop(params, admit_wait=-1)


def test_a_joining_row_takes_a_freed_slot_and_the_cache_moves_when_full(hf: HFEngine) -> None:
    """Rows leave and later rows are written into their slots (no merge copy); a long run
    reaches the cache's right edge and moves its columns; samples stay generate's."""
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=11, logprobs=1)
    short = GenerationRequest("s", prompt="Ab", indices=(0, 1), max_tokens=3)
    long = GenerationRequest("l", prompt="Hello there", indices=(0,), max_tokens=40, step=1)
    # the later prompts are longer than the running row's columns: the cache must make room
    later = [GenerationRequest(f"j{k}", prompt="Xy" * (12 * (k + 1)), indices=(k,)) for k in range(2)]
    want = hf.generate([short, long, *later], params)
    loop = hf.open_loop(params, admit_share=0, admit_wait=0)
    got: dict[int, list[Completion]] = {}
    tickets = [loop.submit(short), loop.submit(long)]
    # the short rows end after 3 tokens: their two slots free up
    loop.poll(lambda t, comps: got.__setitem__(t, comps))
    assert tickets[0] in got and loop._batch.live == 1 and len(loop._batch.rows) == 3
    tickets += [loop.submit(r) for r in later]
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=1)
    assert len(loop._batch.rows) == 3 and loop._batch.live == 3  # the freed slots, reused
    _drain(loop, got)
    assert loop._batch.relayouts >= 1  # the joining rows' prompts: the cache moved or grew
    for t, w in zip(tickets, want, strict=True):
        for g, c in zip(got[t], w, strict=True):
            _same(g, c)
