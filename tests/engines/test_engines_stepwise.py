"""Step-wise engine capabilities: scoring, token prefixes over chunks with step seeds, the chunked
fallback's semantics, streaming abort, the capability check, the shared result collector.

Scripted (toy model: exact) and HF (the tiny local Llama, float32 on CPU) engines.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ttscale.engines import (
    EngineCapabilities,
    GenerationError,
    GenerationRequest,
    ResultCollector,
    ScriptedEngine,
    TokenEvent,
    generate_chunked,
    require_capabilities,
)
from ttscale.engines.base import capabilities_of, continuation_text
from ttscale.errors import ConfigError, EngineError
from ttscale.seeding import sample_seed, step_seed, substream_seed
from ttscale.testing import EngineContractError, check_engine
from ttscale.types import Completion, SamplingParams

# -- seeds ---------------------------------------------------------------------------------------


def test_step_seeds() -> None:
    # step 0 is the repeated-sampling seed, so existing runs keep their samples
    for idx in (0, 1, 7, 1000):
        assert step_seed(5, "p", idx, 0) == sample_seed(5, "p", idx)
    # later steps: a fresh base per step, consecutive over indices (one vLLM fan-out per step)
    s1 = [step_seed(5, "p", i, 1) for i in range(4)]
    assert s1 == [s1[0] + i for i in range(4)]
    bases = {step_seed(5, "p", 0, t) for t in range(50)}
    assert len(bases) == 50
    assert step_seed(5, "p", 0, 3) != step_seed(6, "p", 0, 3) != step_seed(5, "q", 0, 3)
    # a request carries its step; explicit seeds still win
    params = SamplingParams(seed=5)
    req = GenerationRequest("p", prompt="x", indices=(2, 3), step=4)
    assert [req.seed_for(j, params) for j in (0, 1)] == [step_seed(5, "p", i, 4) for i in (2, 3)]
    assert replace(req, seeds=(9, 10)).seed_for(1, params) == 10
    assert substream_seed(77, 0) == 77 and substream_seed(77, 1) != substream_seed(77, 2)
    with pytest.raises(ConfigError, match="step must be"):
        GenerationRequest("p", prompt="x", step=-1)
    with pytest.raises(ConfigError, match="step must be >= 0"):
        step_seed(5, "p", 0, -1)


def test_request_context_fields_are_validated() -> None:
    with pytest.raises(
        ConfigError, match="exactly one of prompt=, messages= and prompt_token_ids="
    ):
        GenerationRequest("p", prompt="x", prompt_token_ids=(1, 2))
    with pytest.raises(ConfigError, match="exactly one"):
        GenerationRequest("p")
    with pytest.raises(ConfigError, match="prompt_token_ids of 'p' is empty"):
        GenerationRequest("p", prompt_token_ids=())
    with pytest.raises(ConfigError, match="token ids must be >= 0"):
        GenerationRequest("p", prompt="x", prefix_token_ids=(3, -1))
    r = GenerationRequest("p", prompt_token_ids=[104, 105], prefix_token_ids=[106])
    assert r.prompt_token_ids == (104, 105) and r.prefix_token_ids == (106,) and r.has_token_ids
    assert not GenerationRequest("p", prompt="x").has_token_ids


# -- capabilities ----------------------------------------------------------------------------------


def test_capability_check_error_message() -> None:
    scripted_texts = ScriptedEngine({"a": "x"})
    with pytest.raises(ConfigError) as ei:
        require_capabilities(scripted_texts, "token_prefixes", "scoring", by="SMCSampler")
    assert str(ei.value) == (
        "SMCSampler needs an engine that can score a given continuation (capability 'scoring'); "
        "engine 'scripted' does not declare it; use the hf, vllm, scripted or openai "
        "(token_prompts=True) engine"
    )
    assert "\n" not in str(ei.value)

    class Old:  # an engine from before capabilities existed declares nothing
        name = "mine"

    assert capabilities_of(Old()) == EngineCapabilities()
    with pytest.raises(ConfigError, match=r"capability 'processed_logprobs'.*engine 'mine'.*hf, scripted or vllm"):
        require_capabilities(Old(), "processed_logprobs", by="SMCSampler")
    with pytest.raises(ConfigError, match="unknown engine capability 'telepathy'"):
        require_capabilities(ScriptedEngine(), "telepathy", by="X")
    require_capabilities(ScriptedEngine(), "scoring", "streaming", "raw_logprobs", by="X")
    with pytest.raises(ConfigError, match="unknown logprob modes"):
        EngineCapabilities(logprob_modes=frozenset({"raw"}))

    class Lying:
        name = "liar"
        capabilities = ("scoring",)

    with pytest.raises(ConfigError, match="must be an EngineCapabilities"):
        capabilities_of(Lying())
    with pytest.raises(ConfigError, match=r"chunked generation needs .*'token_prefixes'.*'mine'"):
        generate_chunked(Old(), [], SamplingParams(), chunk_tokens=4)  # type: ignore[arg-type]


# -- scoring equals generation ---------------------------------------------------------------------


def _score_matches_generation(engine: Any, params: SamplingParams, tol: float) -> None:
    reqs = [
        GenerationRequest("p0", prompt="Once upon", indices=(0, 1, 2)),
        GenerationRequest("p1", prompt="The cat sat", indices=(0, 3)),
    ]
    out = engine.generate(reqs, params)
    rows = [(r, c) for r, comps in zip(reqs, out, strict=True) for c in comps]
    scores = engine.score([r for r, _ in rows], [c.token_ids for _, c in rows])
    worst = 0.0
    for (_, c), s in zip(rows, scores, strict=True):
        assert c.target_logprobs is not None and len(s) == c.num_tokens > 0
        worst = max(worst, float(np.max(np.abs(np.array(s) - np.array(c.target_logprobs)))))
    assert worst <= tol


def test_scripted_scores_equal_generation_logprobs() -> None:
    # the raw log-probabilities do not depend on how tokens were drawn (temperature, filters)
    for params in (
        SamplingParams(max_tokens=20, seed=3),
        SamplingParams(max_tokens=20, seed=3, temperature=0.6, top_k=5, min_tokens=4),
    ):
        _score_matches_generation(ScriptedEngine(), params, 0.0)  # exact: same arithmetic
        _score_matches_generation(ScriptedEngine(logprob_mode="processed_logprobs"), params, 0.0)
    with pytest.raises(ConfigError, match="cannot score"):
        ScriptedEngine({"a": "x"}).score([GenerationRequest("a", prompt="p")], [(120,)])
    with pytest.raises(ConfigError, match="not in the toy model's vocabulary"):
        ScriptedEngine().score([GenerationRequest("a", prompt="p")], [(ord("Q"),)])


def test_scripted_score_is_the_toy_model() -> None:
    # by hand: each raw log-probability is the toy model's table at the context's last chars
    eng = ScriptedEngine(order=2)
    (lps,) = eng.score([GenerationRequest("a", prompt="ab")], [(ord("c"), 0, ord("d"))])
    ids = list(eng._vocab_ids)
    want = [
        eng._next_logprobs_uncached("ab")[ids.index(ord("c"))],
        eng._next_logprobs_uncached("bc")[0],  # EOS
        eng._next_logprobs_uncached("bc")[ids.index(ord("d"))],  # EOS adds no text
    ]
    assert lps == pytest.approx(want, abs=0)


# -- chunks over token prefixes with step seeds -------------------------------------------------


def _continue_in_chunks(engine: Any, params: SamplingParams, chunks: int) -> list[Completion]:
    """Sample 2 traces of one problem in ``chunks`` steps, each continuing from the exact token
    ids generated so far, with the seeds of step ``t``; returns the chunks of trace 0 and 1."""
    prompt = GenerationRequest("p", prompt="Once upon", indices=(0, 1))
    traces: list[list[Completion]] = [[], []]
    for t in range(chunks):
        reqs = [
            replace(
                prompt,
                indices=(i,),
                step=t,
                prefix_token_ids=tuple(x for c in traces[i] for x in c.token_ids or ()),
            )
            for i in (0, 1)
        ]
        for i, (c,) in enumerate(engine.generate(reqs, params)):
            assert c.seed == step_seed(params.seed, "p", i, t)
            traces[i].append(c)
    return [c for tr in traces for c in tr]


@pytest.mark.parametrize("engine_kind", ["scripted", "hf"])
def test_chunks_from_token_ids_reproducible_and_exact(engine_kind: str, request: Any) -> None:
    if engine_kind == "hf":
        pytest.importorskip("torch")
        from ttscale.engines.hf import HFEngine

        engine: Any = HFEngine(request.getfixturevalue("tiny_model_dir"), batch_size=2)
        tol = 1e-4
    else:
        engine, tol = ScriptedEngine(), 0.0
    # no EOS before the end so every chunk continues the trace
    params = SamplingParams(max_tokens=5, min_tokens=5, seed=11, temperature=0.9, top_p=0.95)
    a = _continue_in_chunks(engine, params, 4)
    b = _continue_in_chunks(engine, params, 4)
    assert [(c.token_ids, c.target_logprobs) for c in a] == [
        (c.token_ids, c.target_logprobs) for c in b
    ]
    for trace in (a[:4], a[4:]):
        head = trace[0].prompt_token_ids
        assert head is not None
        done: tuple[int, ...] = ()
        for c in trace:
            # each chunk saw exactly the prompt and the tokens generated before it
            assert c.prompt_token_ids == head + done and c.prompt_tokens == len(head + done)
            assert c.num_tokens == 5 and c.finish_reason == "length"
            done += c.token_ids or ()
        # and its raw log-probabilities are those of the whole trace scored in one pass
        (whole,) = engine.score([GenerationRequest("p", prompt="Once upon")], [done])
        got = [x for c in trace for x in c.target_logprobs or ()]
        assert np.max(np.abs(np.array(got) - np.array(whole))) <= tol
    # different steps draw from different streams: the two traces and the chunks all differ
    assert len({c.token_ids for c in a}) == len(a)


def test_hf_scores_equal_generation_logprobs(tiny_model_dir: Path) -> None:
    pytest.importorskip("torch")
    from ttscale.engines.hf import HFEngine

    raw = HFEngine(tiny_model_dir, batch_size=4)
    proc = HFEngine(tiny_model_dir, batch_size=3, logprob_mode="processed_logprobs")
    for params in (
        SamplingParams(max_tokens=16, seed=3),
        SamplingParams(max_tokens=16, seed=3, temperature=0.7, top_k=20, min_tokens=3),
    ):
        _score_matches_generation(raw, params, 1e-4)
        _score_matches_generation(proc, params, 1e-4)
    # a scored continuation is the model's teacher-forced distribution (an uncached forward)
    import torch

    (c,) = raw.generate([GenerationRequest("p", prompt="Hello")], SamplingParams(max_tokens=8))[0]
    ids = list(c.prompt_token_ids or ()) + list(c.token_ids or ())
    with torch.inference_mode():
        ref = torch.log_softmax(raw.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    n = len(c.prompt_token_ids or ())
    want = [float(ref[n - 1 + t, tok]) for t, tok in enumerate(c.token_ids or ())]
    (got,) = raw.score([GenerationRequest("p", prompt="Hello")], [c.token_ids or ()])
    assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        raw.score([GenerationRequest("p", prompt="Hello")], [(10**6,)])
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        raw.generate(
            [GenerationRequest("p", prompt="x", prefix_token_ids=(10**6,))], SamplingParams()
        )
    # proposal log-probabilities are those of the processed distribution (temperature 0.7)
    (d,) = raw.generate(
        [GenerationRequest("p", prompt="Hello")], SamplingParams(max_tokens=4, temperature=0.7)
    )[0]
    lp = torch.log_softmax(ref[n - 1].double() / 0.7, -1)  # same prompt, first token
    assert d.prompt_token_ids == c.prompt_token_ids
    assert d.proposal_logprobs is not None
    assert d.proposal_logprobs[0] == pytest.approx(float(lp[d.token_ids[0]]), abs=1e-4)


# -- the chunked fallback ------------------------------------------------------------------------


def test_chunked_boundary_is_not_a_length_finish() -> None:
    eng = ScriptedEngine({"a": "abcdefghij"})
    params = SamplingParams(max_tokens=7, seed=1)
    (c,) = generate_chunked(eng, [GenerationRequest("a", prompt="p")], params, chunk_tokens=3)[0]
    # chunks 3 + 3 + 1: only the 7th token is a length finish
    assert (c.text, c.finish_reason, c.num_tokens) == ("abcdefg", "length", 7)
    assert [call[1].max_tokens for call in eng.calls] == [3, 3, 1]
    assert [call[0].prefix_token_ids for call in eng.calls] == [
        (),
        tuple(map(ord, "abc")),
        tuple(map(ord, "abcdef")),
    ]
    # a text that ends (EOS) inside a chunk ends the trace with stop
    (d,) = generate_chunked(
        ScriptedEngine({"a": "abcde"}), [GenerationRequest("a", prompt="p")], params, chunk_tokens=3
    )[0]
    assert (d.text, d.finish_reason, d.token_ids) == ("abcde", "stop", (*map(ord, "abcde"), 0))


def test_chunked_stop_string_spanning_two_chunks() -> None:
    eng = ScriptedEngine({"a": "abcdefgh"})
    req = [GenerationRequest("a", prompt="p")]
    params = SamplingParams(max_tokens=20, stop=("cd",), seed=1)
    (c,) = generate_chunked(eng, req, params, chunk_tokens=3)[0]
    # chunk 1 is "abc", chunk 2 "def": "cd" spans them and is completed by the 4th token
    assert (c.text, c.finish_reason, c.stop_reason) == ("ab", "stop", "cd")
    assert c.token_ids == tuple(map(ord, "abcd")) and c.discarded_tokens == 2  # "e", "f"
    assert all(call[1].stop == () for call in eng.calls)  # the helper searches the stops
    inc = params.replace(include_stop_str_in_output=True)
    (c2,) = generate_chunked(eng, req, inc, chunk_tokens=3)[0]
    assert c2.text == "abcd"
    # the same answer as one call
    (one,) = eng.generate(req, params)[0]
    assert (one.text, one.token_ids, one.stop_reason) == (c.text, c.token_ids, c.stop_reason)


def test_chunked_min_tokens_counts_the_whole_trace() -> None:
    # stop strings count from the 5th token on: "b" at text positions 1 and 4 is too early, the
    # one at position 7 (the 8th token) stops the trace
    eng = ScriptedEngine({"a": "abcabcabc"})
    params = SamplingParams(max_tokens=20, stop=("b",), min_tokens=5, seed=1)
    (c,) = generate_chunked(eng, [GenerationRequest("a", prompt="p")], params, chunk_tokens=2)[0]
    assert (c.text, c.num_tokens, c.finish_reason) == ("abcabca", 8, "stop")
    assert [call[1].min_tokens for call in eng.calls] == [2, 2, 1, 0]
    # EOS is suppressed for the first 7 tokens of the whole trace, then allowed: with EOS at
    # probability 0.9, traces end right after the 7th token unless they draw the 10% (length 20)
    toy = ScriptedEngine(eos_logprob=math.log(0.9))
    p2 = SamplingParams(max_tokens=20, min_tokens=7, seed=5)
    reqs = [GenerationRequest("a", prompt="xyz", indices=tuple(range(12)))]
    comps = generate_chunked(toy, reqs, p2, chunk_tokens=3)[0]
    assert min(c.num_tokens for c in comps) >= 8  # 7 tokens, then EOS at the earliest
    ended = [c for c in comps if c.finish_reason == "stop"]
    assert len(ended) >= 8 and all(c.token_ids[-1] == 0 for c in ended)
    assert sum(c.num_tokens == 8 for c in comps) >= 6  # EOS as token 8, in the third chunk


def test_chunked_abort_and_streaming() -> None:
    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=12, min_tokens=12, seed=2)
    reqs = [GenerationRequest("a", prompt="xyz", indices=(0, 1, 2))]
    base = generate_chunked(eng, reqs, params, chunk_tokens=5)[0]
    events: list[TokenEvent] = []

    def stop_slot1_at_7(ev: TokenEvent) -> bool:
        events.append(ev)
        return ev.slot == 1 and ev.num_tokens == 7

    got = generate_chunked(eng, reqs, params, chunk_tokens=5, on_token=stop_slot1_at_7)[0]
    assert got[0] == base[0] and got[2] == base[2]
    cut = got[1]
    assert cut.finish_reason == "abort" and cut.token_ids == base[1].token_ids[:7]
    assert cut.discarded_tokens == 3  # tokens 8-10 of the second chunk
    assert cut.target_logprobs == base[1].target_logprobs[:7]
    assert cut.text == base[1].text[:7]
    streamed = [e.token_id for e in events if e.slot == 0]
    assert streamed == list(base[0].token_ids) and events[-1].finished
    assert [e.num_tokens for e in events if e.slot == 1] == list(range(1, 8))


def test_chunked_keeps_finished_traces_on_failure() -> None:
    # 2 requests of 1 sample: both need 2 chunks of 3; the engine dies in the second chunk
    eng = ScriptedEngine({"a": "ab", "b": "abcdef"}, fail_after=3)
    reqs = [GenerationRequest("a", prompt="p"), GenerationRequest("b", prompt="p")]
    delivered: list[int] = []
    with pytest.raises(GenerationError, match="chunked scripted generation failed after 1/2") as ei:
        generate_chunked(
            eng, reqs, SamplingParams(max_tokens=9), chunk_tokens=3,
            on_result=lambda pos, comps: delivered.append(pos),
        )  # fmt: skip
    assert delivered == [0] and ei.value.results[0] is not None
    assert ei.value.results[0][0].text == "ab" and ei.value.results[1] is None


def test_continuation_text() -> None:
    # a decoder that drops a leading space at the start of a decode (sentencepiece-like)
    vocab = {1: " hello", 2: " world", 3: "!"}

    def decode(ids: Any) -> str:
        return "".join(vocab[i] for i in ids).lstrip(" ")

    assert decode([2]) == "world"
    assert continuation_text(decode, [1], [2, 3]) == " world!"
    assert continuation_text(decode, [], [2]) == "world"
    assert continuation_text(decode, [1], []) == ""


# -- streaming and abort in the engines' own loops ------------------------------------------------


def _abort_one(engine: Any, params: SamplingParams) -> None:
    reqs = [
        GenerationRequest("p0", prompt="Once upon", indices=(0, 1, 2)),
        GenerationRequest("p1", prompt="The cat", indices=(0, 1)),
    ]
    base = engine.generate(reqs, params)
    calls: list[tuple[int, int, int]] = []

    def abort(ev: TokenEvent) -> bool:
        calls.append((ev.request, ev.slot, ev.num_tokens))
        return (ev.request, ev.slot) == (0, 1) and ev.num_tokens == 3

    got = engine.generate(reqs, params, on_token=abort)
    cut = got[0][1]
    assert cut.finish_reason == "abort" and cut.token_ids == base[0][1].token_ids[:3]
    assert cut.target_logprobs == pytest.approx(base[0][1].target_logprobs[:3], abs=1e-9)
    assert max(n for r, s, n in calls if (r, s) == (0, 1)) == 3  # nothing after the abort
    for pos, comps in enumerate(got):
        for j, c in enumerate(comps):
            if (pos, j) == (0, 1):
                continue
            ref = base[pos][j]
            assert (c.token_ids, c.text, c.finish_reason) == (
                ref.token_ids,
                ref.text,
                ref.finish_reason,
            )
            assert c.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)


def test_scripted_abort_one_trace() -> None:
    _abort_one(ScriptedEngine(), SamplingParams(max_tokens=10, min_tokens=10, seed=4))


def test_hf_abort_one_trace_mid_batch(tiny_model_dir: Path) -> None:
    pytest.importorskip("torch")
    from ttscale.engines.hf import HFEngine

    # all 5 rows decoded in one batch: the aborted row leaves the batch at step 3
    _abort_one(HFEngine(tiny_model_dir), SamplingParams(max_tokens=10, min_tokens=10, seed=4))


def test_hf_continuation_text_and_prompt_ids(tiny_model_dir: Path) -> None:
    pytest.importorskip("torch")
    from ttscale.engines.hf import HFEngine

    eng = HFEngine(tiny_model_dir)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    (full,) = eng.generate([GenerationRequest("p", prompt="ab")], greedy)[0]
    # the tiny tokenizer: BOS, then one token per character
    bos = eng.tokenizer.bos_token_id
    assert full.prompt_token_ids == (bos, *eng.tokenizer.convert_tokens_to_ids(["a", "b"]))
    head = full.token_ids[:4]
    (c,) = eng.generate(
        [GenerationRequest("p", prompt_token_ids=full.prompt_token_ids, prefix_token_ids=head)],
        greedy.replace(max_tokens=6),
    )[0]
    assert c.token_ids == full.token_ids[4:] and eng.decode(head) + c.text == full.text
    assert c.prompt_token_ids == full.prompt_token_ids + head


# -- the result collector ------------------------------------------------------------------------


def test_result_collector() -> None:
    reqs = [GenerationRequest("a", prompt="x", indices=(3, 1)), GenerationRequest("b", prompt="y")]
    seen: list[tuple[int, list[int]]] = []
    col = ResultCollector(reqs, lambda pos, comps: seen.append((pos, [c.index for c in comps])))
    col.put(0, 1, Completion("a", 1, "one"))
    assert seen == [] and not col.is_finished(0)
    with pytest.raises(EngineError, match="delivered twice"):
        col.put(0, 1, Completion("a", 1, "one"))
    with pytest.raises(EngineError, match="expects sample 3, got 1"):
        col.put(0, 0, Completion("a", 1, "one"))
    col.put(0, 0, Completion("a", 3, "three"))
    assert seen == [(0, [3, 1])] and col.is_finished(0) and not col.done  # in indices order
    with pytest.raises(EngineError, match="no result for requests"):
        col.results()
    err = col.failure("mine", RuntimeError("boom"))
    assert str(err) == "mine generation failed after 1/2 requests: boom"
    assert list(err.completed) == [0] and [c.text for c in err.completed[0]] == ["three", "one"]
    assert err.results[1] is None and err.partial == {}
    col.put(1, 0, Completion("b", 0, "b0"))
    assert col.done and [[c.text for c in r] for r in col.results()] == [["three", "one"], ["b0"]]
    # the finished samples of an unfinished request are kept as partial
    col2 = ResultCollector(reqs)
    col2.put(0, 1, Completion("a", 1, "one"))
    assert {k: [c.text for c in v] for k, v in col2.failure("m", KeyError()).partial.items()} == {
        0: ["one"]
    }


# -- check_engine catches broken capabilities ---------------------------------------------------


class _BrokenCaps:
    """A toy ScriptedEngine that declares every capability and breaks one of them."""

    name = "broken"

    def __init__(self, how: str) -> None:
        self.inner, self.how = ScriptedEngine(), how
        self.capabilities = self.inner.capabilities

    def info(self) -> dict:
        return self.inner.info()

    def close(self) -> None:
        pass

    def decode(self, ids: Any) -> str:
        return self.inner.decode(ids)

    def score(self, requests: Any, continuations: Any) -> Any:
        out = self.inner.score(requests, continuations)
        if self.how == "score_shifted":
            out = [tuple(x - 0.01 for x in s) for s in out]
        return out

    def generate(self, requests, params, *, on_result=None, on_token=None):  # type: ignore[no-untyped-def]
        if self.how == "drop_token_prefix":
            requests = [replace(r, prefix_token_ids=()) for r in requests]
        if self.how == "ignore_abort" and on_token is not None:
            on_token_inner = on_token

            def on_token(ev: TokenEvent) -> bool:
                on_token_inner(ev)
                return False

        out = self.inner.generate(requests, params, on_result=on_result, on_token=on_token)
        if self.how == "swap_modes":
            out = [
                [
                    replace(
                        c, target_logprobs=c.proposal_logprobs, proposal_logprobs=c.target_logprobs
                    )
                    for c in r
                ]
                for r in out
            ]
        return out


@pytest.mark.parametrize(
    ("how", "check"),
    [
        ("drop_token_prefix", "token_prefixes"),
        ("score_shifted", "scoring"),
        ("ignore_abort", "streaming"),
        ("swap_modes", "logprob_modes"),
    ],
)
def test_check_engine_catches_broken_capabilities(how: str, check: str) -> None:
    with pytest.raises(EngineContractError, match=rf"check_engine\[{check}\]"):
        check_engine(_BrokenCaps(how), only=(check,))
    # the same checks pass on the unbroken engine
    assert check_engine(_BrokenCaps("none"), only=(check,)) == [check]


def test_check_engine_runs_only_declared_capability_checks() -> None:
    ran = check_engine(ScriptedEngine({"p0": "hello world", "p1": "abc", "q": "x", "p2": "y"}),
                       only=("token_prefixes", "scoring", "streaming", "logprob_modes"))  # fmt: skip
    # scripted texts: token prefixes and streaming, no model to score, no target/proposal
    assert ran == ["token_prefixes", "streaming"]


def test_continuation_text_window_and_unfinished_characters() -> None:
    # byte tokens: "é" is two UTF-8 bytes; a prefix ending after the first byte decodes to "\ufffd"
    def decode(ids: Any) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    e1, e2 = "é".encode()
    assert continuation_text(decode, [ord("a"), e1], [e2, ord("b")]) == "éb"
    # only the last `window` prefix tokens are decoded
    seen: list[int] = []

    def counting(ids: Any) -> str:
        seen.append(len(ids))
        return decode(ids)

    assert continuation_text(counting, list(b"x" * 1000), list(b"yz"), window=4) == "yz"
    assert max(seen) == 6


def test_hf_score_batches(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from ttscale.engines import hf as hf_module

    eng = hf_module.HFEngine(tiny_model_dir)
    reqs = [GenerationRequest("p", prompt=p) for p in ("ab", "c", "hello", "xyz", "q")]
    conts = [
        eng.tokenizer.convert_tokens_to_ids(list(c)) for c in ("abc", "", "abcd", "ab", "abcde")
    ]
    whole = eng.score(reqs, conts)
    # room for 10 kept logit rows: [0, 2] keep 2 x (4 + 1); 3 and 4 would not fit beside them
    monkeypatch.setattr(hf_module, "_SCORE_LOGITS_BYTES", 4 * eng._vocab * 10)
    assert eng._score_batches(conts) == [[0, 2], [3], [4]]
    split = eng.score(reqs, conts)
    assert split[1] == () and [len(s) for s in split] == [3, 0, 4, 2, 5]
    for a, b in zip(whole, split, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    eng.batch_size = 1
    assert eng._score_batches(conts) == [[0], [2], [3], [4]]


def test_engines_without_token_prefixes_refuse_token_ids() -> None:
    from ttscale.engines.openai import OpenAIEngine

    eng = OpenAIEngine("m", "http://127.0.0.1:1/v1")  # never contacted: refused up front
    req = GenerationRequest("p", prompt="x", prefix_token_ids=(5, 6))
    with pytest.raises(ConfigError, match="engine 'openai' cannot continue from token ids"):
        eng.generate([req], SamplingParams())
    with pytest.raises(ConfigError, match="cannot continue from token ids"):
        eng.generate([GenerationRequest("p", prompt_token_ids=(1, 2))], SamplingParams())
