"""Prerequisites are checked before any expensive step; Ctrl-C says what was saved (exit 130)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ttscale.engines
from ttscale.cli.app import app
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.paths import check_writable_dir, check_writable_file
from ttscale.store import SampleStore

runner = CliRunner()

SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]
SMALL = ["--limit", "6", "--n", "4", "--max-tokens", "12", "--seed", "1"]


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.fixture
def engines_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every engine the CLI builds (the expensive step that must come last)."""
    built: list[str] = []
    real = ttscale.engines.make_engine

    def spy(kind: str = "auto", model: Any = None, **options: Any) -> Any:
        built.append(kind)
        return real(kind, model, **options)

    monkeypatch.setattr(ttscale.engines, "make_engine", spy)
    return built


# unwritable even for root: below a regular file, and inside /proc
def _unwritable(tmp_path: Path) -> list[Path]:
    f = tmp_path / "a-file"
    f.write_text("x")
    return [f / "run", Path("/proc/ttscale-test-run")]


def test_unwritable_out_fails_before_the_engine_loads(
    tmp_path: Path, engines_built: list[str]
) -> None:
    for out in _unwritable(tmp_path):
        line = one_line_error(invoke("sample", *SCRIPTED, *SMALL, "--out", str(out)))
        assert str(out) in line and "--out" in line
        line = one_line_error(invoke("run", *SCRIPTED, *SMALL, "--out", str(out)))
        assert str(out) in line
    assert engines_built == []
    # the check creates nothing
    assert not (tmp_path / "a-file" / "run").exists()
    # a writable --out goes ahead (the spy sees the engine)
    assert invoke("sample", *SCRIPTED, *SMALL, "--out", str(tmp_path / "ok")).exit_code == 0
    assert engines_built == ["scripted"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_directory(tmp_path: Path, engines_built: list[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_line_error(invoke("sample", *SCRIPTED, *SMALL, "--out", str(ro / "run")))
        assert "not writable" in line and engines_built == []
    finally:
        ro.chmod(0o700)


def test_run_plot_curve_plot_export_and_verify_check_outputs_first(
    tmp_path: Path, engines_built: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "a-file"
    bad.write_text("x")
    line = one_line_error(
        invoke("run", *SCRIPTED, *SMALL, "--out", str(tmp_path / "r"), "--plot", str(bad / "p.png"))
    )
    assert "--plot" in line and str(bad / "p.png") in line and engines_built == []
    assert not (tmp_path / "r").exists()

    run = tmp_path / "run"
    assert invoke("run", *SCRIPTED, *SMALL, "--out", str(run)).exit_code == 0
    import ttscale.analysis

    computed: list[int] = []
    real = ttscale.analysis.compute_curves
    monkeypatch.setattr(
        ttscale.analysis, "compute_curves", lambda *a, **k: computed.append(1) or real(*a, **k)
    )
    line = one_line_error(invoke("curve", str(run), "--plot", str(bad / "c.png")))
    assert "--plot" in line and computed == []
    line = one_line_error(invoke("curve", str(run), "--plot", str(tmp_path)))
    assert "is a directory" in line and computed == []
    assert invoke("curve", str(run), "--plot", str(tmp_path / "c.png")).exit_code == 0
    assert computed == [1]

    line = one_line_error(invoke("export", str(run), "--out", str(tmp_path / "no" / "e.jsonl")))
    assert "does not exist" in line
    line = one_line_error(invoke("export", str(run), "--out", str(bad / "e.jsonl")))
    assert "--out" in line


def test_writability_checks() -> None:
    with pytest.raises(ConfigError, match="not writable"):
        check_writable_dir("/proc/ttscale-x/run")
    with pytest.raises(ConfigError, match="not writable"):
        check_writable_file("/proc/ttscale-x.png", "--plot")
    check_writable_dir(Path.cwd() / "not-yet" / "deeper")  # creatable: fine, and not created
    assert not (Path.cwd() / "not-yet").exists()


class _InterruptAfter:
    """Hands ``calls`` engine calls' results to the sampler, then raises KeyboardInterrupt
    inside the next call after its first finished request (as Ctrl-C would)."""

    def __init__(self, calls: int) -> None:
        self.inner = ScriptedEngine()
        self.calls = calls
        self.name = self.inner.name

    def generate(self, requests: Any, params: Any, *, on_result: Any = None) -> Any:
        if self.calls == 0:
            def first_then_stop(pos: int, comps: Any) -> None:
                on_result(pos, comps)
                raise KeyboardInterrupt

            return self.inner.generate(requests, params, on_result=first_then_stop)
        self.calls -= 1
        return self.inner.generate(requests, params, on_result=on_result)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()


def test_ctrl_c_during_sampling_reports_what_is_stored_and_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ttscale.engines, "make_engine", lambda *a, **k: _InterruptAfter(2))
    out = tmp_path / "run"
    # 6 problems x n=4, 4 samples per engine call: 2 calls (8 samples) + 1 request of the third
    r = invoke("sample", *SCRIPTED, *SMALL, "--out", str(out), "--batch-size", "4",
               "--shard", "0/1")  # fmt: skip
    assert r.exit_code == 130, r.output
    # the engine line (printed before sampling) and one line about the interrupt
    engine_line, *lines = r.output.strip().splitlines()
    assert engine_line.startswith("engine: scripted") and len(lines) == 1, r.output
    stored = len(SampleStore.open(out))
    assert stored == 12  # every finished sample was flushed before the interrupt propagated
    assert lines[0].startswith(f"interrupted: 12 of 24 requested samples are stored in {out}")
    # the complete command: the run does not record the engine, the batch size or the shard
    hint = lines[0].split("; continue with: ")[1]
    assert hint.startswith("ttscale sample ") and hint.endswith(f" --out {out} --resume")
    for given in ("--engine scripted", "--batch-size 4", "--shard 0/1", "--model toy", "--n 4"):
        assert f" {given} " in hint, hint
    assert SampleStore.open(out).manifest["accounting"]["samples"] == 12

    monkeypatch.undo()
    r = invoke("sample", "--engine", "scripted", "--no-progress", "--out", str(out), "--resume")
    assert r.exit_code == 0 and "sampled 12 new samples (12 already stored)" in r.output
    fresh = tmp_path / "fresh"
    assert invoke("sample", *SCRIPTED, *SMALL, "--out", str(fresh)).exit_code == 0
    cols = ["text", "seed"]
    assert SampleStore.open(out).table(cols).to_pylist() == (
        SampleStore.open(fresh).table(cols).to_pylist()
    )


def test_ctrl_c_during_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    assert invoke("sample", *SCRIPTED, *SMALL, "--out", str(run)).exit_code == 0
    import ttscale.verifiers.base as vb

    real, calls = vb.verify_many, []

    def interrupting(verifier: Any, items: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(verifier, items)

    monkeypatch.setattr(vb, "verify_many", interrupting)
    # --batch 4: one problem (4 samples) per verdict shard; two shards are written, then Ctrl-C
    r = invoke("verify", str(run), "--verifier", "arith", "--batch", "4")
    assert r.exit_code == 130
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: 8 new verdicts of arith are stored in {run}")
    assert line.endswith(f"continue with: ttscale verify {run} --verifier arith")
    assert len(SampleStore.open(run).verified_keys("arith")) == 8
    monkeypatch.undo()
    r = invoke("verify", str(run), "--verifier", "arith", "--json")
    assert r.exit_code == 0 and '"new": 16' in r.output and '"skipped": 8' in r.output


def test_ctrl_c_elsewhere_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    assert invoke("sample", *SCRIPTED, *SMALL, "--out", str(run)).exit_code == 0
    import ttscale.analysis

    def stop(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(ttscale.analysis, "compute_curves", stop)
    r = invoke("curve", str(run))
    assert r.exit_code == 130 and r.output.strip() == "interrupted"
