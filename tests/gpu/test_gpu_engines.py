"""Engines on a CUDA GPU (skipped without one): the same contract, and agreement with CPU."""

from __future__ import annotations

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
    # the base contract and the 5 capability checks (scoring = generation, abort, chunks, ...)
    assert len(check_engine(gpu)) == 15
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


def test_vllm_engine_on_cuda(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    from ttscale.engines.vllm import VLLMEngine
    from ttscale.testing import ENGINE_CHECKS

    eng = VLLMEngine(tiny_model_dir, dtype="float32", gpu_memory_utilization=0.2)
    try:
        assert check_engine(eng) == list(ENGINE_CHECKS)  # capability checks included
    finally:
        eng.close()
