"""The bundled default model: files, tokenizer, generation (HF) and loading in vLLM."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ttscale.evals import default_model_path
from ttscale.evals.arith import check, extract_arith_answer
from ttscale.evals.registry import load_problems
from ttscale.evals.train_arith import majority_correct, pass_at_k

MODEL = Path(default_model_path())
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 120, 128, 192, 256)

needs_model = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file(), reason="bundled model not present"
)


@needs_model
def test_model_files_are_small_and_vllm_compatible() -> None:
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim in VLLM_HEAD_DIMS
    total = sum(f.stat().st_size for f in MODEL.iterdir() if f.is_file())
    assert total < 20 * 2**20
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "TRAINING.md",
    ):
        assert (MODEL / name).is_file(), name
    tok_cfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


@needs_model
def test_tokenizer_round_trips_and_adds_bos() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(MODEL)
    p = load_problems("arith", limit=1)[0]
    text = p.prompt + p.meta["solution"]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # numbers are spelled digit by digit: every digit is a token of its own
    pieces = tok.convert_ids_to_tokens(ids)
    assert "".join(t for t in pieces if any(c.isdigit() for c in t)) == "".join(
        c for c in text if c.isdigit()
    )
    assert all(len(t) == 1 for t in pieces if any(c.isdigit() for c in t))
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id


@needs_model
def test_greedy_answers_easy_problems() -> None:
    """Greedy decoding solves most level-1 problems (it is trained, not random)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    probs = [p for p in load_problems("arith") if p.meta["difficulty"] == 1][:10]
    right = 0
    for p in probs:
        enc = tok(p.prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id
            )
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text.rstrip().splitlines()[-1].startswith("####"), text
        right += check(extract_arith_answer(text), p.reference)
    assert right >= 5


def test_pass_at_k_vectors() -> None:
    # docs/algorithms.md section 1.1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(0.9166666667)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(200, 13, 10) == pytest.approx(0.4975511147)
    assert pass_at_k(10000, 1, 1000) == pytest.approx(0.1)


def test_majority_correct_ties_and_unparsed() -> None:
    assert majority_correct(["3", "3", "4"], "3") == 1.0
    assert majority_correct(["3", "4"], "3") == 0.5  # tie: expected value of a random pick
    assert majority_correct([None, None, "4"], "4") == 1.0  # unparsed answers do not vote
    assert majority_correct([None, None], "4") == 0.0


_VLLM_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, seed=0, max_model_len=512)
        prompts = sys.argv[2:]
        outs = llm.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=96, logprobs=0))
        for o in outs:
            for c in o.outputs:
                print("SAMPLE", repr(c.text), c.finish_reason, len(c.token_ids))
    """
)


@needs_model
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_loads_bundled_model(tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    script.write_text(_VLLM_SCRIPT)
    prompts = [p.prompt for p in load_problems("arith", limit=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(script), str(MODEL), *prompts],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    samples = [ln for ln in res.stdout.splitlines() if ln.startswith("SAMPLE")]
    assert len(samples) == 8
    assert sum("####" in s for s in samples) >= 6


def test_tokenizer_training_is_deterministic() -> None:
    from ttscale.evals.arith import generate_items
    from ttscale.evals.train_arith import build_tokenizer

    texts = [it.prompt + it.solution for it in generate_items(500, split="train", seed=0)]
    a = build_tokenizer(texts).backend_tokenizer.to_str()
    b = build_tokenizer(texts).backend_tokenizer.to_str()
    assert a == b


@needs_model
def test_bundled_tokenizer_is_reproduced_by_the_training_script() -> None:
    from ttscale.evals.arith import generate_items
    from ttscale.evals.train_arith import build_tokenizer

    # train() builds its tokenizer on the first 5,000 problems of the seed-0 train split
    texts = [it.prompt + it.solution for it in generate_items(5000, split="train", seed=0)]
    rebuilt = json.loads(build_tokenizer(texts).backend_tokenizer.to_str())
    bundled = json.loads((MODEL / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == bundled["model"]["vocab"]
    assert rebuilt["model"]["merges"] == bundled["model"]["merges"]


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Same seed, same weights: the bundled model can be reproduced bit for bit."""
    import torch

    from ttscale.evals.train_arith import train

    torch.set_num_threads(1)
    kw = dict(steps=3, batch_size=4, hidden=32, layers=1, heads=1, intermediate=64, train_size=200)
    a = train(tmp_path / "a", seed=3, **kw)
    b = train(tmp_path / "b", seed=3, **kw)
    c = train(tmp_path / "c", seed=4, **kw)
    assert a["final_loss_ema"] == b["final_loss_ema"]
    wa = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert wa == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert wa != (tmp_path / "c" / "model.safetensors").read_bytes()
    assert c["final_loss_ema"] != a["final_loss_ema"]
