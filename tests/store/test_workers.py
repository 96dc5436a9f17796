"""Split work across workers: --shard i/N, `ttscale merge`, concurrent workers on one run
directory (claims, no duplicated work), and accounting that never loses a worker's tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttscale import Problem, SamplingParams
from ttscale.cli.app import app
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers import RepeatedSampler
from ttscale.samplers.repeated import parse_shard, shard_problems
from ttscale.store import SampleStore
from ttscale.store.claims import ProblemClaims

runner = CliRunner()
SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]
ARGS = ["sample", *SCRIPTED, "--limit", "7", "--n", "4", "--max-tokens", "12", "--seed", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def rows(run: Path) -> list[tuple[Any, ...]]:
    t = SampleStore.open(run).table(["text", "seed", "token_ids", "num_tokens"]).to_pylist()
    return [tuple(r.values()) for r in t]


def shard_rows(run: Path) -> int:
    """Rows over all shard files: equal to the stored keys iff no sample was written twice."""
    return sum(pq.read_metadata(f).num_rows for f in (run / "samples").glob("part-*.parquet"))


def problems(k: int) -> list[Problem]:
    return [Problem(f"p{i:02d}", f"prompt {i}: ", reference=str(i)) for i in range(k)]


def test_shard_partition_is_disjoint_complete_balanced(tmp_path: Path) -> None:
    ps = problems(11)
    parts = [shard_problems(ps, (i, 4)) for i in range(4)]
    assert [[p.id for p in part] for part in parts] == [
        ["p00", "p04", "p08"], ["p01", "p05", "p09"], ["p02", "p06", "p10"], ["p03", "p07"],
    ]  # fmt: skip
    # stable when the problem list grows (a larger --limit): old assignments do not move
    assert shard_problems(problems(20), (1, 4))[:3] == parts[1]
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    x = tmp_path / "x"
    r = invoke(*ARGS, "--out", str(x), "--shard", "2/2")
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "error: shard i/N needs N >= 1 and 0 <= i < N, got 2/2"
    ]
    r = invoke(*ARGS, "--limit", "2", "--out", str(x), "--shard", "2/3")
    assert r.exit_code == 1 and "is empty" in r.output and not x.exists()


def test_sharded_workers_into_one_directory_equal_an_unsharded_run(tmp_path: Path) -> None:
    full, shared = tmp_path / "full", tmp_path / "shared"
    assert invoke(*ARGS, "--out", str(full)).exit_code == 0
    outs = []
    for i in range(3):
        r = invoke(*ARGS, "--out", str(shared), "--resume", "--shard", f"{i}/3")
        assert r.exit_code == 0, r.output
        outs.append(r.output)
    # 7 problems: shards of 3, 2 and 2 problems x n=4
    assert [f"sampled {k} new samples (0 already stored) for {k // 4} problems" in o
            for k, o in zip((12, 8, 8), outs, strict=True)] == [True] * 3  # fmt: skip
    assert rows(shared) == rows(full)
    assert shard_rows(shared) == 28
    acct, ref = SampleStore.open(shared).manifest["accounting"], SampleStore.open(full).manifest["accounting"]
    assert acct["samples"] == 28 and acct["sessions"] == 3
    assert acct["generated_tokens"] == ref["generated_tokens"]
    assert len(SampleStore.open(shared).problems()) == 7  # every worker records every problem
    # each session kept its own record
    shards = sorted(json.loads(f.read_text())["shard"] for f in (shared / "accounting").glob("*.json"))
    assert shards == ["0/3", "1/3", "2/3"]


def test_separate_shard_directories_merge_into_the_unsharded_run(tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert invoke(*ARGS, "--out", str(full)).exit_code == 0
    parts = [tmp_path / f"s{i}" for i in range(2)]
    for i, p in enumerate(parts):
        assert invoke(*ARGS, "--out", str(p), "--shard", f"{i}/2").exit_code == 0
        assert invoke("verify", str(p), "--verifier", "arith").exit_code == 0
    merged = tmp_path / "merged"
    r = invoke("merge", str(merged), *map(str, parts))
    assert r.exit_code == 0, r.output
    assert f"merged {parts[0]}: 16 new samples" in r.output
    assert f"merged {parts[1]}: 12 new samples" in r.output
    assert rows(merged) == rows(full)
    st = SampleStore.open(merged)
    assert st.manifest["accounting"]["samples"] == 28 and st.manifest["accounting"]["sessions"] == 2
    assert st.manifest["merged_from"] == [str(p) for p in parts]
    assert len(st.verified_keys("arith")) == 28
    # merging again adds nothing: no samples, no accounting counted twice
    r = invoke("merge", str(merged), *map(str, parts))
    assert r.exit_code == 0 and "0 new samples" in r.output
    assert SampleStore.open(merged).manifest["accounting"]["samples"] == 28


def test_merge_conflicts_are_detected_before_anything_is_written(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert invoke(*ARGS, "--limit", "2", "--out", str(a)).exit_code == 0
    # same settings, different content under the same keys (another engine's script)
    resp = {f"arith-test-{i:04d}": "#### 7" for i in range(2)}
    assert invoke(*ARGS, "--limit", "2", "--out", str(b),
                  "--engine-opt", "responses=" + json.dumps(resp)).exit_code == 0  # fmt: skip
    out = tmp_path / "m"
    r = invoke("merge", str(out), str(a), str(b))
    assert r.exit_code == 1
    line = r.output.strip()
    assert line.startswith("error: conflicting samples for key ('arith-test-0000', 0)")
    assert str(a) in line and str(b) in line and "nothing was merged" in line
    assert not out.exists()
    # other sampling settings are refused as a resume would be
    assert invoke(*ARGS, "--limit", "2", "--out", str(c), "--temperature", "0.5").exit_code == 0
    r = invoke("merge", str(out), str(a), str(c))
    assert r.exit_code == 1 and "different sampling parameters" in r.output and not out.exists()


class _Gate:
    """Engine wrapper: signals when its first call starts and may hold it until an event."""

    def __init__(self, started: threading.Event, hold: threading.Event | None) -> None:
        self.inner = ScriptedEngine()
        self.started, self.hold = started, hold
        self.name = self.inner.name
        self.requested: list[tuple[str, int]] = []

    def generate(self, requests: Any, params: Any, *, on_result: Any = None) -> Any:
        self.requested += [(r.problem_id, i) for r in requests for i in r.indices]
        self.started.set()
        if self.hold is not None:
            assert self.hold.wait(30)
            self.hold = None
        return self.inner.generate(requests, params, on_result=on_result)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def close(self) -> None:
        pass


def test_two_workers_in_threads_share_the_work_without_duplicates(tmp_path: Path) -> None:
    params = SamplingParams(n=4, max_tokens=10, seed=3)
    ps = problems(6)
    ref = SampleStore.create(tmp_path / "ref", {"model": "toy"})
    RepeatedSampler(ScriptedEngine(), params, ref, progress=False).run(ps)

    run = tmp_path / "run"
    SampleStore.create(run, {"model": "toy"})
    a_started, b_started = threading.Event(), threading.Event()
    # worker A claims p00 and is held inside its first engine call until B is sampling
    eng_a, eng_b = _Gate(a_started, hold=b_started), _Gate(b_started, hold=None)
    kw = {"batch_size": 4, "flush_every": 4, "progress": False}
    results: dict[str, Any] = {}

    def work(name: str, eng: _Gate) -> None:
        results[name] = RepeatedSampler(eng, params, SampleStore.open(run), **kw).run(ps)

    ta = threading.Thread(target=work, args=("a", eng_a))
    ta.start()
    assert a_started.wait(30)
    tb = threading.Thread(target=work, args=("b", eng_b))
    tb.start()
    ta.join(60)
    tb.join(60)
    assert not ta.is_alive() and not tb.is_alive()
    # A had p00 when B arrived, so B never generated it; nothing was generated twice
    assert [k for k in eng_a.requested if k[0] == "p00"] == [("p00", i) for i in range(4)]
    assert not any(k[0] == "p00" for k in eng_b.requested)
    assert sorted(eng_a.requested + eng_b.requested) == sorted((p.id, i) for p in ps for i in range(4))
    assert results["a"].generated + results["b"].generated == 24
    assert results["a"].complete and results["b"].complete
    assert rows(run) == rows(tmp_path / "ref") and shard_rows(run) == 24
    acct = SampleStore.open(run).manifest["accounting"]
    assert acct["samples"] == 24 and acct["sessions"] == 2
    assert acct["generated_tokens"] == SampleStore.open(tmp_path / "ref").manifest["accounting"]["generated_tokens"]


@pytest.mark.slow
def test_two_worker_processes_on_one_directory(tmp_path: Path) -> None:
    """Two real `ttscale sample --resume` processes on one (not yet existing) run directory:
    the run is complete, equal to a single worker's, no sample was generated twice, and the
    accounting holds both workers' samples and tokens."""
    args = ["sample", *SCRIPTED, "--limit", "24", "--n", "4", "--max-tokens", "16", "--seed", "9",
            "--batch-size", "4", "--flush-every", "4"]  # fmt: skip
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ttscale.cli.app", *args, "--out", str(run), "--resume",
           "--throttle", "0.15"]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e
    full = tmp_path / "full"
    assert invoke(*args, "--out", str(full)).exit_code == 0
    assert rows(run) == rows(full)
    assert shard_rows(run) == 96  # not one sample generated twice
    acct = SampleStore.open(run).manifest["accounting"]
    assert acct["samples"] == 96 and acct["sessions"] == 2
    assert acct["generated_tokens"] == SampleStore.open(full).manifest["accounting"]["generated_tokens"]
    per_worker = [json.loads(f.read_text())["committed"]["samples"]
                  for f in (run / "accounting").glob("*.json")]  # fmt: skip
    assert sum(per_worker) == 96
    # both workers did part of the work (the first to start cannot finish alone in time)
    assert min(per_worker) > 0, per_worker


def test_a_killed_workers_claims_are_free_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    SampleStore.create(run, {})
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom ttscale.store.claims import ProblemClaims\n"
         f"c = ProblemClaims({str(run)!r})\nassert c.try_claim('p1')\n"
         "print('held', flush=True)\ntime.sleep(120)\n"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with ProblemClaims(run) as mine:
            assert not mine.try_claim("p1") and mine.try_claim("p2")
            holder.send_signal(signal.SIGKILL)
            holder.wait(30)
            assert mine.try_claim("p1")  # no stale claim left behind by the dead worker
            # another claimer in this process (a thread's sampler) sees our claims
            with ProblemClaims(run) as other:
                assert not other.try_claim("p1") and other.try_claim("p3")
            mine.release("p1")
        with ProblemClaims(run) as again:
            assert again.try_claim("p1") and again.try_claim("p2")
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_manifest_updates_lose_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    SampleStore.create(run, {"model": "m"})
    code = (
        "import sys\nfrom ttscale.store import SampleStore\n"
        "s = SampleStore.open(sys.argv[1])\n"
        "for i in range(40):\n    s.update_manifest(**{f'w{sys.argv[2]}_{i}': i})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), str(w)], env=ENV)
             for w in range(2)]  # fmt: skip
    threads = [threading.Thread(target=lambda t=t: [SampleStore.open(run).update_manifest(
        **{f"t{t}_{i}": i}) for i in range(40)]) for t in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        assert p.wait(120) == 0
    m = SampleStore.open(run).manifest
    for prefix in ("w0", "w1", "t0", "t1"):
        assert all(m.get(f"{prefix}_{i}") == i for i in range(40)), prefix
    assert m["model"] == "m"


@pytest.mark.network
def test_the_multi_server_recipe_through_the_cli(tmp_path: Path) -> None:
    """The README's recipe against two local OpenAI-style servers: one worker spreading over
    both with --base-url repeated, and one worker per server and shard; same run either way."""
    from fakeopenai import FakeServer

    from ttscale.evals import load_problems

    servers = [FakeServer(delay=0.02), FakeServer(delay=0.02)]
    try:
        common = ["sample", "--engine", "openai", "--model", "m", "--benchmark", "arith",
                  "--limit", "8", "--n", "3", "--no-progress", "--batch-size", "6",
                  "--engine-opt", "max_concurrency=4"]  # fmt: skip
        spread = tmp_path / "spread"
        r = invoke(*common, "--out", str(spread),
                   "--base-url", servers[0].url, "--base-url", servers[1].url)  # fmt: skip
        assert r.exit_code == 0, r.output
        assert all(len(s.attempts) > 0 for s in servers)  # both servers did part of the work
        assert SampleStore.open(spread).manifest["engine"]["base_urls"] == [s.url for s in servers]
        seen = [len(s.attempts) for s in servers]

        shared = tmp_path / "shared"
        for i, s in enumerate(servers):
            r = invoke(*common, "--out", str(shared), "--resume", "--base-url", s.url,
                       "--shard", f"{i}/2")  # fmt: skip
            assert r.exit_code == 0, r.output
        # each server saw only its own shard's prompts
        for i, s in enumerate(servers):
            prompts = {a[2]["prompt"] for a in s.attempts[seen[i]:]}
            mine = {p.prompt for p in shard_problems(load_problems("arith", limit=8), (i, 2))}
            assert prompts and prompts <= mine
        assert rows(shared) == rows(spread) and shard_rows(shared) == 24
    finally:
        for s in servers:
            s.close()
