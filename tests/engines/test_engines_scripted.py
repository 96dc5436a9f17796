"""ScriptedEngine, make_engine, and the check_engine suite's power to catch broken engines."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from ttscale.engines import Engine, GenerationError, GenerationRequest, make_engine
from ttscale.engines.base import seed_runs
from ttscale.engines.scripted import EOS_TOKEN_ID, ScriptedEngine, process_logprobs
from ttscale.errors import ConfigError
from ttscale.seeding import sample_seed
from ttscale.testing import EngineContractError, check_engine
from ttscale.types import Completion, SamplingParams


def test_toy_model_passes_contract() -> None:
    # the base contract (10 checks), the 5 checks of what the toy model declares and the loop
    assert len(check_engine(ScriptedEngine())) == 16
    check_engine(ScriptedEngine(logprob_mode="processed_logprobs"))


def test_seeded_responder_passes_contract() -> None:
    def respond(req: GenerationRequest, index: int, seed: int, params: SamplingParams) -> str:
        rng = np.random.default_rng(seed)
        full = "".join(rng.choice(list("abcde"), size=20))
        done = req.prefix + "".join(map(chr, req.prefix_token_ids))
        return full[len(done) :] if params.temperature == 0 else full

    # greedy must ignore the seed for the prefix check: a fixed text then
    def greedy_aware(req, index, seed, params):  # type: ignore[no-untyped-def]
        return respond(req, index, 0 if params.temperature == 0 else seed, params)

    check_engine(ScriptedEngine(greedy_aware), skip=("chat",))


def test_table_responses_stop_and_length() -> None:
    eng = ScriptedEngine({"a": "hello world", "b": ["x1", "x2"]})
    params = SamplingParams(max_tokens=100, stop=("o w",), seed=3, logprobs=2)
    (ra, rb) = eng.generate(
        [GenerationRequest("a", prompt="p"), GenerationRequest("b", prompt="q", indices=(0, 1, 2))],
        params,
    )
    (a,) = ra
    assert a.text == "hell" and a.finish_reason == "stop" and a.stop_reason == "o w"
    assert a.token_ids == tuple(ord(c) for c in "hello w")  # ends at the token completing the stop
    assert [c.text for c in rb] == ["x1", "x2", "x1"]
    assert rb[0].token_ids == (ord("x"), ord("1"), EOS_TOKEN_ID)
    assert rb[0].finish_reason == "stop" and rb[0].stop_reason is None
    for c in (a, *rb):
        assert math.isclose(math.fsum(c.token_logprobs), c.cumulative_logprob)
        for t, top in enumerate(c.top_logprobs):
            assert top[c.token_ids[t]] == c.token_logprobs[t]
            assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-12
    # max_tokens cuts and reports length; exactly max_tokens characters is still "length"
    (c,) = eng.generate(
        [GenerationRequest("a", prompt="p")], params.replace(max_tokens=4, stop=())
    )[0]
    assert (c.text, c.finish_reason, c.num_tokens) == ("hell", "length", 4)
    # include_stop_str_in_output keeps the stop string
    (c,) = eng.generate(
        [GenerationRequest("a", prompt="p")], params.replace(include_stop_str_in_output=True)
    )[0]
    assert c.text == "hello w"
    # a prefix the response starts with is not repeated
    (c,) = eng.generate(
        [GenerationRequest("a", prompt="p", prefix="hello")], params.replace(stop=())
    )[0]
    assert c.text == " world"
    with pytest.raises(ConfigError, match="no scripted response"):
        eng.generate([GenerationRequest("zzz", prompt="p")], params)


def test_responder_receives_request_index_and_derived_seed() -> None:
    seen = []

    def respond(req, index, seed, params):  # type: ignore[no-untyped-def]
        seen.append((req.problem_id, index, seed))
        return f"{req.problem_id}-{index}"

    eng = ScriptedEngine(respond)
    params = SamplingParams(seed=11)
    out = eng.generate([GenerationRequest("p", prompt="x", indices=(4, 2))], params)
    assert [c.text for c in out[0]] == ["p-4", "p-2"]
    assert seen == [("p", 4, sample_seed(11, "p", 4)), ("p", 2, sample_seed(11, "p", 2))]
    assert [c.seed for c in out[0]] == [sample_seed(11, "p", 4), sample_seed(11, "p", 2)]
    assert eng.calls[0][0].problem_id == "p"


def test_fault_injection_keeps_completed_requests() -> None:
    eng = ScriptedEngine(fail_after=3)
    delivered: dict[int, list[Completion]] = {}
    reqs = [GenerationRequest(f"p{i}", prompt="x", indices=(0, 1)) for i in range(3)]
    with pytest.raises(GenerationError) as ei:
        eng.generate(reqs, SamplingParams(max_tokens=5), on_result=delivered.__setitem__)
    assert sorted(delivered) == [0]
    assert ei.value.completed.keys() == {0}
    assert ei.value.results[1] is None
    assert [c.index for c in delivered[0]] == [0, 1]


def test_toy_greedy_and_min_tokens() -> None:
    eng = ScriptedEngine()
    req = GenerationRequest("p", prompt="abc", indices=(0, 1, 2))
    g = eng.generate([req], SamplingParams(temperature=0.0, max_tokens=30))[0]
    assert len({c.text for c in g}) == 1
    # min_tokens suppresses EOS: with an EOS-happy model every sample runs to at least 10 tokens
    eos_happy = ScriptedEngine(eos_logprob=math.log(0.9))
    out = eos_happy.generate([req], SamplingParams(max_tokens=12, min_tokens=10))[0]
    assert all(c.num_tokens >= 10 for c in out)
    out = eos_happy.generate([req], SamplingParams(max_tokens=12))[0]
    assert min(c.num_tokens for c in out) < 10


def test_toy_raw_vs_processed_logprobs() -> None:
    params = SamplingParams(temperature=0.5, top_k=3, max_tokens=10, seed=5)
    req = [GenerationRequest("p", prompt="xyz", indices=(0, 1))]
    raw = ScriptedEngine().generate(req, params)[0]
    proc = ScriptedEngine(logprob_mode="processed_logprobs").generate(req, params)[0]
    for r, p in zip(raw, proc, strict=True):
        assert r.token_ids == p.token_ids  # the mode changes what is reported, not what is sampled
        # sharpening by T=0.5 and top-3 makes every sampled token more probable
        assert all(b >= a for a, b in zip(r.token_logprobs, p.token_logprobs, strict=True))


def _reference_process(lp: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Direct probability-space implementation (loops), to check process_logprobs."""
    p = np.exp(lp / params.temperature)
    p /= p.sum()
    if params.min_p:
        p[p < params.min_p * p.max()] = 0
        p /= p.sum()
    if params.top_k:
        order = sorted(range(p.size), key=lambda i: -p[i])
        for i in order[params.top_k :]:
            p[i] = 0
        p /= p.sum()
    if params.top_p < 1:
        order = sorted(range(p.size), key=lambda i: -p[i])
        mass, keep = 0.0, set()
        for i in order:
            if mass >= params.top_p:
                break
            keep.add(i)
            mass += p[i]
        for i in range(p.size):
            if i not in keep:
                p[i] = 0
        p /= p.sum()
    with np.errstate(divide="ignore"):
        return np.log(p)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.7},
        {"temperature": 1.3, "top_k": 4},
        {"temperature": 1.0, "top_p": 0.6},
        {"temperature": 0.9, "min_p": 0.2},
        {"temperature": 0.8, "top_k": 6, "top_p": 0.5, "min_p": 0.05},
    ],
)
def test_process_logprobs_matches_reference(kw: dict) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12) * 2
    lp = logits - np.log(np.exp(logits).sum())
    params = SamplingParams(**kw)
    got, want = process_logprobs(lp, params), _reference_process(lp, params)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=1e-12)


# -- check_engine must catch broken engines ------------------------------------------------------


class _Broken:
    """Wraps the toy engine and breaks one promise."""

    name = "broken"

    def __init__(self, how: str) -> None:
        self.inner, self.how = ScriptedEngine(), how

    def info(self) -> dict:
        return self.inner.info()

    def close(self) -> None:
        pass

    def generate(self, requests, params, *, on_result=None):  # type: ignore[no-untyped-def]
        if self.how == "ignore_seed":
            requests = [replace(r, seeds=(7,) * len(r.indices)) for r in requests]
        if self.how == "ignore_stop":
            params = params.replace(stop=())
        out = self.inner.generate(requests, params)
        if self.how == "bad_cumulative":
            out = [
                [replace(c, cumulative_logprob=(c.cumulative_logprob or 0) - 1) for c in r]
                for r in out
            ]
        if self.how == "reversed":
            out = [list(reversed(r)) for r in out]
        if self.how == "echo_prefix":
            out = [
                [replace(c, text=q.prefix + c.text) for c in r]
                for q, r in zip(requests, out, strict=True)
            ]
        if on_result is not None and self.how != "no_callback":
            for i, r in enumerate(out):
                on_result(i, r)
        return out


@pytest.mark.parametrize(
    ("how", "check"),
    [
        ("ignore_seed", "distinct"),
        ("ignore_stop", "stop"),
        ("bad_cumulative", "shapes"),
        ("reversed", "shapes"),
        ("echo_prefix", "prefix"),
        ("no_callback", "shapes"),
    ],
)
def test_check_engine_catches(how: str, check: str) -> None:
    with pytest.raises(EngineContractError, match=rf"check_engine\[{check}\]"):
        check_engine(_Broken(how), only=(check,))


def test_check_engine_rejects_unknown_check_names() -> None:
    with pytest.raises(ConfigError, match="unknown engine checks"):
        check_engine(ScriptedEngine(), skip=("nope",))


# -- make_engine ---------------------------------------------------------------------------------


def test_make_engine_scripted_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(make_engine("scripted"), ScriptedEngine)
    with pytest.raises(ConfigError, match="unknown engine 'nope'"):
        make_engine("nope", "x")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"model path {missing} does not exist"):
        make_engine("auto", str(missing))
    with pytest.raises(ConfigError, match="does not exist"):
        make_engine("hf", "./missing.gguf")
    with pytest.raises(ConfigError, match="needs a model"):
        make_engine("vllm", None)
    with pytest.raises(ConfigError, match="base_urls"):
        make_engine("openai", "served-name")


def test_make_engine_hub_id_offline(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        make_engine("hf", "nobody-ttscale/not-a-model")


def test_scripted_constructor_validation() -> None:
    with pytest.raises(ConfigError, match="logprob_mode"):
        ScriptedEngine(logprob_mode="weird")
    with pytest.raises(ConfigError, match="responses"):
        ScriptedEngine(responses=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fail_after"):
        ScriptedEngine(fail_after=-1)


def test_seed_runs() -> None:
    assert seed_runs([5, 6, 7, 2, 3, 9]) == [(0, 3), (3, 2), (5, 1)]
    assert seed_runs([]) == []
    assert seed_runs([4]) == [(0, 1)]
    assert seed_runs([1, 1]) == [(0, 1), (1, 1)]


def test_engines_satisfy_protocol() -> None:
    assert isinstance(ScriptedEngine(), Engine)


def test_make_engine_routing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """auto picks vLLM when importable and a GPU is visible (transformers otherwise, and always
    for .gguf files); the rule itself is tested in test_engines_selection.py."""
    import ttscale.engines.hf as hf_mod
    import ttscale.engines.selection as sel_mod
    import ttscale.engines.vllm as vllm_mod

    made = []
    monkeypatch.setattr(vllm_mod, "VLLMEngine", lambda m, **kw: made.append(("vllm", m, kw)))
    monkeypatch.setattr(hf_mod, "HFEngine", lambda m, **kw: made.append(("hf", m, kw)))
    model = tmp_path / "m"
    model.mkdir()
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(sel_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(sel_mod, "vllm_available", lambda: True)
    make_engine("auto", model, dtype="float32")
    make_engine("auto", gguf)
    monkeypatch.setattr(sel_mod, "vllm_available", lambda: False)
    make_engine("auto", str(model))
    assert made == [
        ("vllm", str(model), {"dtype": "float32"}),
        ("hf", str(tmp_path), {"gguf_file": "w.gguf"}),
        ("hf", str(model), {}),
    ]


def test_scripted_table_validation() -> None:
    with pytest.raises(ConfigError, match="non-empty list"):
        ScriptedEngine({"p": []})
    with pytest.raises(ConfigError, match="non-empty list"):
        ScriptedEngine({"p": [1, 2]})  # type: ignore[list-item]


def test_engine_modules_import_no_heavy_backends() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ttscale.engines, ttscale.engines.hf, ttscale.engines.vllm, "
        "ttscale.engines.openai, ttscale.engines.scripted, ttscale.testing\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'httpx') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
