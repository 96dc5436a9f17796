"""The OpenAI engine's loop (issue 16): samplers' tokens/s against RepeatedSampler through
``OpenAIEngine``, before (the batch fallback: each poll is one blocking ``generate`` of what is
pending) and after (``OpenAIEngine.open_loop``: HTTP calls go out as requests arrive and come
back as they finish, within ``max_concurrency``).

The script starts a vLLM OpenAI server on 127.0.0.1 (the bundled model unless ``--model``;
float32, eager, ``--server-block-size``-token KV blocks, prefix caching on) and runs
``bench_engine_loop``'s part A (repeated, adaptive and pruning samplers with rules that never
stop or prune, so every sampler generates the same tokens, checked) and, with ``--stepwise``,
part S (SMC with a zero potential, beam, DVTS) through two engines on the same server: the
``OpenAIEngine`` ("after") and the same engine without its loop ("before"), every arm of both
interleaved within a repeat. Ratios are tokens/s relative to ``RepeatedSampler`` on the same
engine in the same repeat, and after over before per sampler; medians over ``--repeats``.

    OMP_NUM_THREADS=1 python benchmarks/bench_openai_loop.py --problems 32 --n 8 --repeats 3 \\
        --stepwise
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, resolve_model
from bench_engine_loop import _answers, _timed


def _arms(engine: Any, args: argparse.Namespace, stepwise: bool) -> dict[str, Any]:
    """The samplers of ``bench_engine_loop``'s part A (or, ``stepwise``, part S) on ``engine``."""
    from ttscale.samplers import AdaptiveSampler, PruningSampler, RepeatedSampler
    from ttscale.samplers.search import SearchSampler
    from ttscale.samplers.smc import SMCSampler
    from ttscale.types import SamplingParams

    if not stepwise:
        # logprobs for every sampler: the pruning rule reads them, and the work must be the same
        params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed, logprobs=0)
        answers = _answers()
        return {
            "repeated": lambda: RepeatedSampler(engine, params, progress=False),
            "adaptive ahead=0 (fixed)": lambda: AdaptiveSampler(
                engine, params, "fixed", answers, ahead=0
            ),
            "adaptive ahead=auto (fixed)": lambda: AdaptiveSampler(
                engine, params, "fixed", answers, ahead=None
            ),
            "pruning (lowprob:-1e9: never prunes)": lambda: PruningSampler(
                engine, params, "lowprob:threshold=-1000000000,min_tokens=1", progress=False
            ),
        }
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed)

    def zero(problem: Any, texts: Any, finished: Any) -> list[float]:
        return [0.0] * len(texts)

    def search(kind: str) -> Any:
        return SearchSampler(engine, zero, params, search=kind, width=args.width,
                             max_tokens=args.max_tokens, max_steps=args.max_steps)  # fmt: skip

    return {
        "repeated": lambda: RepeatedSampler(engine, params, progress=False),
        "smc (zero potential, steps at \\n)": lambda: SMCSampler(
            engine, zero, params, step_stop=("\n",), tokens_per_step=args.max_tokens,
            max_steps=args.max_steps, progress=False,
        ),
        f"beam (width {args.width})": lambda: search("beam"),
        f"dvts (width {args.width})": lambda: search("dvts"),
    }


def part(engines: dict[str, Any], args: argparse.Namespace, stepwise: bool) -> dict[str, Any]:
    """Every sampler on every engine, interleaved within each repeat (the order alternates
    between repeats): tokens/s relative to ``RepeatedSampler`` on the same engine in the same
    repeat, and each arm's tokens/s after relative to before."""
    from ttscale.evals import load_problems

    problems = load_problems("arith", limit=args.problems)
    arms = {(mode, name): make for mode, eng in engines.items()
            for name, make in _arms(eng, args, stepwise).items()}  # fmt: skip
    for eng in engines.values():  # warm-up (server caches, connections), another seed
        list(_arms(eng, args, False)["repeated"]().sample(problems[:2], 2, seed=args.seed + 1))
    rows: list[dict[str, Any]] = []
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        got = {}
        for key in order:
            wall, tokens, _, _, _ = _timed(arms[key](), problems, args.n, args.seed)
            got[key] = {"wall_s": wall, "tokens": tokens, "tps": tokens / wall}
        for (mode, name), x in got.items():
            base = got[(mode, "repeated")]
            if not stepwise and x["tokens"] != base["tokens"]:
                raise SystemExit(f"{mode} {name}: {x['tokens']} tokens, repeated {base['tokens']}")
            x["ratio"] = x["tps"] / base["tps"]
        rows.append({"repeat": r, **{f"{m} | {n}": v for (m, n), v in got.items()}})
        for mode in engines:
            print(f"  {'S' if stepwise else 'A'} repeat {r} {mode}: " + ", ".join(
                f"{n.split(' (')[0]} {got[(mode, n)]['tps']:,.0f} tok/s ({got[(mode, n)]['ratio']:.2f})"
                for (m, n) in arms if m == mode
            ), flush=True)  # fmt: skip
    keys = [f"{m} | {n}" for m, n in arms]
    modes = list(engines)
    names = [n for m, n in arms if m == modes[0]]
    return {
        "part": "S" if stepwise else "A",
        "problems": len(problems),
        "n": args.n,
        "tokens": {k: rows[0][k]["tokens"] for k in keys},
        "median_ratio": {k: statistics.median(row[k]["ratio"] for row in rows) for k in keys},
        "median_tps": {k: statistics.median(row[k]["tps"] for row in rows) for k in keys},
        "median_after_over_before_tps": {
            n: statistics.median(
                row[f"{modes[1]} | {n}"]["tps"] / row[f"{modes[0]} | {n}"]["tps"] for row in rows
            )
            for n in names
        },
        "repeats": rows,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(model: str, args: argparse.Namespace, log_path: Path) -> tuple[Any, str]:
    import httpx

    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.server_kv_gib), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", "bundled",
        "--dtype", "float32", "--enforce-eager", "--seed", "0",
        "--block-size", str(args.server_block_size), "--enable-prefix-caching",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = open(log_path, "wb")  # the server writes to it until it is stopped
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, f"{url}/v1"
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise SystemExit("the vLLM server did not become healthy in 600 s")


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=64, help="the engine's max_concurrency")
    ap.add_argument("--stepwise", action="store_true", help="part S: SMC, beam and DVTS")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--width", type=int, default=4, help="beam/DVTS width (part S)")
    ap.add_argument("--max-steps", type=int, default=16, help="steps per solution (part S)")
    ap.add_argument("--server-block-size", type=int, default=32)
    ap.add_argument("--server-kv-gib", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import ttscale
    from ttscale.engines.openai import OpenAIEngine

    class BatchOnly(OpenAIEngine):
        """The same engine through the batch fallback (the loop before this change)."""

        open_loop = None  # type: ignore[assignment]

    tmp = Path(tempfile.mkdtemp(prefix="ttscale-bench-openai-"))
    model = resolve_model(args.model, tmp)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    out: dict[str, Any] = {
        "command": "python benchmarks/bench_openai_loop.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)
        ),
        "ttscale": str(Path(ttscale.__file__).resolve().parent),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}; shared with other jobs",
        "parts": [],
    }
    proc, url = _start_server(model, args, tmp / "vllm-server.log")
    print(f"vLLM server at {url} (log {tmp / 'vllm-server.log'})", flush=True)
    engines = {
        label: cls("bundled", url, max_concurrency=args.concurrency, token_prompts=True,
                   tokenizer=model, timeout=600.0)
        for label, cls in (("before", BatchOnly), ("after", OpenAIEngine))
    }
    try:
        if not args.skip_a:
            out["parts"].append(part(engines, args, stepwise=False))
        if args.stepwise:
            out["parts"].append(part(engines, args, stepwise=True))
    finally:
        for eng in engines.values():
            eng.close()
        _stop(proc)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
