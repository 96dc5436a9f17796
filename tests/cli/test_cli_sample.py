"""CLI: ``ttscale sample`` / ``ttscale run`` with the scripted engine; user errors; crash-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.evals import load_problems
from ttscale.evals.arith import check
from ttscale.store import SampleStore

runner = CliRunner()

SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def keys_and_rows(run: Path) -> list[tuple[str, int, str, int]]:
    t = SampleStore.open(run).table(["text", "seed"]).to_pylist()
    return [(r["problem_id"], r["index"], r["text"], r["seed"]) for r in t]


def test_sample_writes_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = invoke("sample", *SCRIPTED, "--n", "4", "--limit", "6", "--max-tokens", "16",
               "--seed", "3", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "sampled 24 new samples" in r.output and str(out) in r.output
    store = SampleStore.open(out)
    assert store.counts() == {p.id: 4 for p in load_problems("arith", limit=6)}
    m = store.manifest
    assert m["model"] == "toy" and m["benchmark"] == "arith" and m["split"] == "test"
    assert m["sampling"]["max_tokens"] == 16 and m["sampling"]["seed"] == 3
    assert m["sampling"]["n"] == 4 and m["engine"]["engine"] == "scripted"
    assert m["accounting"]["samples"] == 24


def test_resume_takes_settings_from_the_run_and_extends(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("sample", *SCRIPTED, "--limit", "3", "--max-tokens", "10", "--seed", "5")
    assert invoke(*args, "--n", "4", "--out", str(out)).exit_code == 0
    first = keys_and_rows(out)
    # --resume with only --out and a larger n: model, benchmark and sampling come from the run
    r = invoke("sample", "--engine", "scripted", "--no-progress", "--out", str(out),
               "--resume", "--n", "8")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "sampled 12 new samples (12 already stored)" in r.output
    rows = keys_and_rows(out)
    assert [x for x in rows if x[1] < 4] == first and len(rows) == 24
    fresh = tmp_path / "fresh"
    assert invoke(*args, "--n", "8", "--out", str(fresh)).exit_code == 0
    assert keys_and_rows(fresh) == rows


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "0"], "'--n'"),
        (["--temperature", "-1"], "'--temperature'"),
        (["--top-p", "2"], "'--top-p'"),
        (["--benchmark", "nope"], "unknown benchmark 'nope'"),
        (
            ["--engine", "hf", "--model", "/no/such/model"],
            "model path /no/such/model does not exist",
        ),
        (["--engine-opt", "oops"], "KEY=VALUE"),
        (["--base-url", "http://x"], "--base-url applies to --engine openai only"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "run"
    r = invoke("sample", *SCRIPTED, "--limit", "2", "--out", str(out), *extra)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert not out.exists()  # nothing is created for a command that fails validation


def test_run_directory_with_other_sampling_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ("sample", *SCRIPTED, "--limit", "2", "--n", "2", "--out", str(out))
    assert invoke(*base).exit_code == 0
    r = invoke(*base, "--resume", "--temperature", "0.5")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: run directory {out} was made with different sampling parameters "
        "(temperature 1.0 != 0.5); resume with the same parameters or use a new --out"
    ]
    r = invoke(*base)  # exists, no --resume
    assert r.exit_code == 1 and "pass --resume" in r.output


def _scripted_answers(problems, n: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Per problem, n texts: a random mix of the right answer, two wrong ones and no answer."""
    table, answers = {}, {}
    for p in problems:
        ref = int(p.reference)
        choices = rng.choice(4, size=n, p=rng.dirichlet([1.0, 1.0, 1.0, 0.5]))
        vals = [ref, ref + 1, ref - 3, None]
        answers[p.id] = [vals[c] for c in choices]
        table[p.id] = [f"x\n#### {vals[c]}" if vals[c] is not None else "no idea" for c in choices]
    return table, answers


def _pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _majority_at_k(answers: list, correct_value: int, k: int) -> float:  # type: ignore[type-arg]
    """Expected majority-vote accuracy over all size-k subsets (ties split evenly), by enumeration."""
    from collections import Counter
    from itertools import combinations

    total, count = 0.0, 0
    for sub in combinations(range(len(answers)), k):
        votes = Counter(answers[i] for i in sub if answers[i] is not None)
        count += 1
        if not votes:
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        total += sum(a == correct_value for a in tied) / len(tied)
    return total / count


def test_run_samples_verifies_and_reports_the_curve(tmp_path: Path) -> None:
    problems = load_problems("arith", limit=5)
    n = 6
    table, answers = _scripted_answers(problems, n, np.random.default_rng(0))
    out = tmp_path / "run"
    r = invoke("run", *SCRIPTED, "--limit", "5", "--n", str(n), "--out", str(out),
               "--engine-opt", "responses=" + json.dumps(table), "--k", "1,2,3,6")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "coverage@k" in r.output and "majority@k" in r.output
    assert f"plot: {out / 'coverage.png'}" in r.output
    assert (out / "coverage.png").stat().st_size > 1000
    curve = json.loads((out / "curve.json").read_text())
    assert curve["k"] == [1, 2, 3, 6]
    refs = {p.id: int(p.reference) for p in problems}
    for j, k in enumerate(curve["k"]):
        cov = np.mean([_pass_at_k(n, sum(a == refs[pid] for a in answers[pid]), k) for pid in refs])
        maj = np.mean([_majority_at_k(answers[pid], refs[pid], k) for pid in refs])
        assert curve["methods"]["coverage"]["mean"][j] == pytest.approx(cov, abs=1e-9)
        assert curve["methods"]["majority"]["mean"][j] == pytest.approx(maj, abs=1e-9)
    # the verdicts stored agree with the arith checker
    store = SampleStore.open(out)
    pool = store.pool()
    for p in range(pool.num_problems):
        pid = pool.problem_ids[p]
        got = pool.problem(p).correct
        want = [check(a, refs[pid]) for a in answers[pid]]
        assert list(got.astype(bool)) == want


def _shard_rows(run: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in (run / "samples").glob("part-*.parquet"))


@pytest.mark.slow
def test_crash_resume_with_sigkill(tmp_path: Path) -> None:
    """A real `ttscale sample` process killed with SIGKILL midway, then resumed: nothing lost or
    duplicated, and the result equals an uninterrupted run sample for sample."""
    args = ["sample", *SCRIPTED, "--limit", "40", "--n", "8", "--max-tokens", "24", "--seed", "11"]
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttscale.cli.app", *args, "--out", str(run),
         "--throttle", "0.05", "--flush-every", "8"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            shards = list((run / "samples").glob("part-*.parquet")) if run.exists() else []
            if len(shards) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, helpers included
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    stored = len(SampleStore.open(run))
    assert 0 < stored < 320, "the run must be killed midway"

    r = subprocess.run(
        [sys.executable, "-m", "ttscale.cli.app", *args, "--out", str(run), "--resume"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"({stored} already stored)" in r.stdout.replace(",", "")

    full = tmp_path / "full"
    assert invoke(*args, "--out", str(full)).exit_code == 0
    assert keys_and_rows(run) == keys_and_rows(full)
    # no sample written twice: the shards hold exactly one row per key
    assert _shard_rows(run) == 320 == len(SampleStore.open(run))
    acct = SampleStore.open(run).manifest["accounting"]
    assert acct["samples"] == 320 and acct["sessions"] == 2
    full_acct = SampleStore.open(full).manifest["accounting"]
    assert acct["generated_tokens"] == full_acct["generated_tokens"]


def test_demo_wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ttscale demo` end to end with the scripted engine standing in for the bundled model."""
    import ttscale.cli.sample_cmds as sc

    problems = load_problems("arith", limit=4)
    table, _ = _scripted_answers(problems, 8, np.random.default_rng(1))
    import ttscale.engines as engines_mod

    monkeypatch.setattr(sc, "_bundled_model", lambda: tmp_path / "model")
    real_make_engine = engines_mod.make_engine
    monkeypatch.setattr(
        engines_mod,
        "make_engine",
        lambda kind, model, **kw: real_make_engine(kind, model, responses=table, **kw),
    )
    out = tmp_path / "demo"
    r = invoke(
        "demo", "--engine", "scripted", "--limit", "4", "--n", "8", "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert (
        lines[0].startswith("ttscale demo: bundled model") and "4 arith problems x n=8" in lines[0]
    )
    assert any(x.startswith("│ coverage") for x in lines) and any(
        x.startswith("│ majority@k") for x in lines
    )
    assert f"plot: {out / 'coverage.png'}" in r.output and f"run:  {out}" in r.output
    assert "coverage@k grows from" in lines[-1] and "Done in" in lines[-1]
    m = SampleStore.open(out).manifest
    assert m["sampling"]["max_tokens"] == sc.DEMO_MAX_TOKENS and m["limit"] == 4


def test_demo_without_the_bundled_model_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda pkg: tmp_path)
    r = invoke("demo", "--out", str(tmp_path / "d"))
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and "bundled model is missing" in r.output


@pytest.mark.slow
def test_demo_on_the_bundled_model(tmp_path: Path) -> None:
    """The real thing, small: transformers on CPU, bundled model, arith."""
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built (python -m ttscale.evals.train_arith)")
    out = tmp_path / "demo"
    r = invoke("demo", "--limit", "6", "--n", "4", "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "engine: hf (transformers" in r.stderr and (out / "coverage.png").exists()
    curve = json.loads((out / "curve.json").read_text())
    assert curve["k"] == [1, 2, 4]
    curve = {name: c["mean"] for name, c in curve["methods"].items()}
    # coverage is monotone in k and never below majority vote
    assert all(
        a <= b + 1e-12 for a, b in zip(curve["coverage"], curve["coverage"][1:], strict=False)
    )
    assert all(m <= c + 1e-12 for m, c in zip(curve["majority"], curve["coverage"], strict=True))


# -- which model and engine a command uses (issue 7) ---------------------------------------------


@pytest.mark.parametrize("command", ["run", "sample"])
def test_no_model_outside_arith_is_a_one_line_error(tmp_path: Path, command: str) -> None:
    """Without --model only arith gets the bundled model; gsm8k would score ~0 without a word."""
    out = tmp_path / "run"
    r = invoke(command, "--benchmark", "gsm8k", "--limit", "2", "--out", str(out))
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model is required for benchmark "
                                                   "'gsm8k'"), r.output  # fmt: skip
    assert not out.exists()


def test_the_chosen_engine_and_model_are_printed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = invoke("sample", *SCRIPTED, "--n", "2", "--limit", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    # one line on stderr, before the summary on stdout
    assert r.stderr.splitlines() == [
        "engine: scripted (version 1), model: toy; chosen with --engine"
    ]
    assert "engine:" not in r.stdout


def test_bundled_model_default_for_arith_is_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sample -b arith` without --model takes the bundled model and says so."""
    import ttscale.cli.sample_cmds as sc

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "config.json").write_text("{}")
    monkeypatch.setattr(sc, "_bundled_model_path", lambda: bundled)
    r = invoke("sample", "--engine", "scripted", "--benchmark", "arith", "--no-progress",
               "--n", "2", "--limit", "2", "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.exit_code == 0, r.output
    line = r.stderr.strip()
    assert f"model: {bundled} (bundled arith model, the default for arith without --model)" in line
    assert SampleStore.open(tmp_path / "run").manifest["model"] == str(bundled)


@pytest.mark.parametrize(
    ("extra", "decode_batches"),
    [
        # 5 problems x n=8 = 40 samples in one sampler call of 40: one decode batch of 40
        # (today's fixed engine batch of 16 would give 16, 16, 8)
        (["--batch-size", "40"], [40]),
        # sampler calls of 16 samples (2 problems), the last 8: the engine follows them
        (["--batch-size", "16"], [16, 16, 8]),
        # an explicit engine batch wins over the sampler's
        (["--batch-size", "40", "--engine-opt", "batch_size=10"], [10, 10, 10, 10]),
    ],
)
def test_batch_size_reaches_the_hf_engine(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dir: Path,
    extra: list[str],
    decode_batches: list[int],
) -> None:
    from ttscale.engines.hf import _Batch

    # the rows that join hf's running batch together (generate's batches and the engine loop's
    # admissions both go through _Batch.admit)
    seen: list[int] = []
    real = _Batch.admit

    def spy(self, rows, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append(len(rows))
        return real(self, rows, *a, **kw)

    monkeypatch.setattr(_Batch, "admit", spy)
    r = invoke("sample", "--engine", "hf", "--model", str(tiny_model_dir), "--benchmark",
               "arith", "--n", "8", "--limit", "5", "--max-tokens", "3", "--no-progress",
               "--out", str(tmp_path / "run"), *extra)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert seen == decode_batches
    assert len(SampleStore.open(tmp_path / "run")) == 40
