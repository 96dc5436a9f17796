"""Engines on a CUDA GPU (skipped without one): the same contract, and agreement with CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ttscale.engines import GenerationRequest
from ttscale.testing import check_engine
from ttscale.types import SamplingParams

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_hf_engine_on_cuda_matches_cpu_logprobs(tiny_model_dir: Path) -> None:
    from ttscale.engines.hf import HFEngine

    gpu = HFEngine(tiny_model_dir, device="cuda", dtype="float32", batch_size=8)
    # the base contract, the 5 capability checks (scoring = generation, abort, chunks, ...), loop
    assert len(check_engine(gpu)) == 16
    cpu = HFEngine(tiny_model_dir, device="cpu")
    req = GenerationRequest("p", prompt="Hello", indices=(0, 1, 2, 3))
    params = SamplingParams(max_tokens=24, seed=1)
    for c in gpu.generate([req], params)[0]:
        ids = torch.tensor([cpu.prompt_token_ids(req) + list(c.token_ids)])
        with torch.inference_mode():
            lp = torch.log_softmax(cpu.model(input_ids=ids).logits[0].double(), dim=-1)
        n = len(cpu.prompt_token_ids(req))
        for t, tok in enumerate(c.token_ids):
            assert abs(c.token_logprobs[t] - float(lp[n - 1 + t, tok])) < 1e-3


def test_hf_engine_loop_on_cuda(tiny_model_dir: Path) -> None:
    """The hf engine loop on the GPU: requests join the running batch at different times and
    come back with generate's seeds (and, in float32, its tokens); an abort counts the tokens
    generated so far and empties the batch; a continued step reuses the stored prefix."""
    from ttscale.engines.hf import HFEngine

    eng = HFEngine(tiny_model_dir, device="cuda", dtype="float32")
    params = SamplingParams(max_tokens=16, seed=5)
    reqs = [GenerationRequest(f"p{k}", prompt=f"Q{k}", indices=(0, 1, 2, 3)) for k in range(8)]
    want = eng.generate(reqs, params)
    loop = eng.open_loop(params)
    got: dict[int, list] = {}  # type: ignore[type-arg]
    tickets = [loop.submit(reqs[0])]
    loop.poll(lambda t, comps: got.__setitem__(t, comps), max_steps=3)
    tickets += [loop.submit(r) for r in reqs[1:]]
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    for t, w in zip(tickets, want, strict=True):
        assert [(c.index, c.seed) for c in got[t]] == [(c.index, c.seed) for c in w]
        assert [c.token_ids for c in got[t]] == [c.token_ids for c in w]
    step = GenerationRequest("p0", prompt="Q0", prefix_token_ids=got[tickets[0]][0].token_ids or (),
                             step=1)  # fmt: skip
    loop.submit(step)
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    # a row that ended at its token cap left its cache: the continuation extends it
    assert loop.prefixes is not None and (
        loop.prefixes.hits == 1 or got[tickets[0]][0].finish_reason != "length"
    )
    loop = eng.open_loop(SamplingParams(max_tokens=64, min_tokens=64, seed=5))
    one = loop.submit(GenerationRequest("a", prompt="Abc"))
    fan = loop.submit(GenerationRequest("b", prompt="Xyz", indices=(0, 1, 2)))
    loop.poll(lambda t, comps: None, max_steps=5)
    assert loop.abort(one) == 5 and loop.abort(fan) == 15 and loop.in_flight == 0
    assert loop._batch.cache is None


def test_vllm_engine_on_cuda(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from ttscale.engines.vllm import VLLMEngine
    from ttscale.testing import ENGINE_CHECKS

    eng = VLLMEngine(tiny_model_dir, dtype="float32", gpu_memory_utilization=0.2)
    try:
        assert check_engine(eng) == list(ENGINE_CHECKS)  # capability checks included
        _engine_loop_on_cuda(eng)
        _samplers_on_cuda(eng)
    finally:
        eng.close()


def _engine_loop_on_cuda(eng: object) -> None:
    """The engine loop (issue 16) on the GPU: requests join the running engine and come back with
    their seeds, an abort frees the slots and counts the tokens generated so far. (Tokens are
    not compared across batch compositions: GPU kernels may round differently per batch.)"""
    loop = eng.open_loop(SamplingParams(max_tokens=64, min_tokens=64, seed=5))  # type: ignore[attr-defined]
    one = loop.submit(GenerationRequest("a", prompt="Abc"))
    fan = loop.submit(GenerationRequest("b", prompt="Xyz", indices=(0, 1, 2)))
    for _ in range(5):
        loop.steps.step()
    # (with async scheduling on a GPU the output processor may lag the engine by a step)
    assert 0 < loop.abort(one) <= 5 and 0 < loop.abort(fan) <= 15 and loop.in_flight == 0
    assert not eng.llm.llm_engine.has_unfinished_requests()  # type: ignore[attr-defined]
    loop = eng.open_loop(SamplingParams(max_tokens=16, seed=5))  # type: ignore[attr-defined]
    reqs = [GenerationRequest(f"p{k}", prompt=f"Q{k}", indices=(0, 1, 2, 3)) for k in range(8)]
    tickets = [loop.submit(r) for r in reqs]
    got: dict[int, list] = {}  # type: ignore[type-arg]
    while loop.in_flight:
        loop.poll(lambda t, comps: got.__setitem__(t, comps))
    for t, r in zip(tickets, reqs, strict=True):
        assert [(c.problem_id, c.index, c.seed) for c in got[t]] == [
            (r.problem_id, i, r.seed_for(j, SamplingParams(max_tokens=16, seed=5)))
            for j, i in enumerate(r.indices)
        ]


def _samplers_on_cuda(eng: object) -> None:
    """The samplers on the GPU engine's loop (issue 16): SMC (one request per prefix, fanned
    out by vLLM, continuing from token ids through the prefix cache) and live adaptive sampling
    drawing ahead and aborting; every generated token accounted."""
    from ttscale.samplers import AdaptiveSampler
    from ttscale.samplers.smc import SMCSampler
    from ttscale.types import Problem

    problems = [Problem(id=f"p{k}", prompt=f"Question {k}:") for k in range(4)]
    params = SamplingParams(max_tokens=16, seed=2)
    smc = SMCSampler(
        eng, lambda p, t, f: [0.1 * len(x) for x in t], params, step_stop=(" ",),  # type: ignore[arg-type]
        tokens_per_step=4, ess_threshold=1.0, progress=False,
    )  # fmt: skip
    for r in smc.sample(problems, 4):
        assert r.generated_tokens == sum(c.completion.num_tokens for c in r.candidates)
        assert math.isfinite(r.info["log_ml"]) and len(r.kept) >= 1
    ada = AdaptiveSampler(
        eng, params, "beta:0.9", lambda p, comps: [c.text[-1:] or None for c in comps], ahead=None  # type: ignore[arg-type]
    )
    results = list(ada.sample(problems, 16))
    for r, d in zip(results, ada.decisions, strict=True):
        assert r.generated_tokens == d.generated_tokens and d.used <= d.drawn <= 16
