"""``ttscale serve`` under load on loopback, against the same work through the library.

Starts ``ttscale serve`` (bundled model on hf, a self-consistency preset) as a subprocess,
sends ``--requests`` chat requests (distinct arith problems, ``--budget`` samples each) from
``--clients`` concurrent clients, and reports latency p50/p99, errors, generated tokens/s and the
engine's mean batch (samples in flight per engine poll, from ``/health``). Then the same
problems run through the library in this process (``RepeatedSampler``, same seed, budget and
sampling settings, so the same samples): tokens/s ratio served / library (goal >= 0.8).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --requests 256 --clients 64 --budget 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(url: str, prompts: list[str], clients: int, budget: int, max_tokens: int) -> dict[str, Any]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    lat: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def client(h: httpx.AsyncClient) -> None:
        nonlocal tokens
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                r = await h.post(url + "/v1/chat/completions", json={
                    "model": "sc", "messages": [{"role": "user", "content": p}], "seed": 0,
                    "temperature": 1.0, "max_tokens": max_tokens, "ttscale": {"budget": budget},
                })
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                tokens += int(r.json()["usage"]["completion_tokens"])
                lat.append(time.perf_counter() - t0)
            except httpx.HTTPError as e:
                errors.append(repr(e))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as h:
        await asyncio.gather(*(client(h) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "lat": lat, "errors": errors, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-sequences", type=int, default=256)
    args = ap.parse_args()

    from ttscale.engines import make_engine
    from ttscale.evals import default_model_path, get_benchmark
    from ttscale.samplers import RepeatedSampler
    from ttscale.serve.app import problem_id_of
    from ttscale.types import Problem, SamplingParams

    problems = get_benchmark("arith").load("test", limit=args.requests)
    prompts = [p.prompt for p in problems]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttscale.cli.app", "serve", "--engine", "hf", "--port", str(port),
         "--max-concurrency", str(max(args.clients, 1)), "--max-sequences", str(args.max_sequences),
         "--preset", "sc=strategy=repeated;rule=majority;budget=4;verifier=arith"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise SystemExit("ttscale serve did not start")
            time.sleep(0.2)
        res = asyncio.run(load(url, prompts, args.clients, args.budget, args.max_tokens))
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(30)

    engine = make_engine("hf", default_model_path())
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0)
    direct = [Problem(id=problem_id_of({"prompt": p}), prompt=p) for p in prompts]
    sampler = RepeatedSampler(engine, params, chat=False, batch_size=args.max_sequences)
    t0 = time.perf_counter()
    lib_tokens = sum(r.generated_tokens for r in sampler.sample(direct, args.budget))
    lib_wall = time.perf_counter() - t0

    lat = np.asarray(res["lat"])
    served_tps = res["tokens"] / res["wall"]
    lib_tps = lib_tokens / lib_wall
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"requests {args.requests}, clients {args.clients}, budget {args.budget}, max_tokens {args.max_tokens}")
    print(f"errors {len(res['errors'])} {res['errors'][:3]}")
    print(f"latency p50 {np.percentile(lat, 50):.2f}s p99 {np.percentile(lat, 99):.2f}s; wall {res['wall']:.1f}s")
    print(f"served: {res['tokens']} tokens, {served_tps:.0f} tokens/s; engine mean batch "
          f"{health['engine']['samples_in_flight_per_poll']:.1f} samples over {health['engine']['polls']} polls")
    print(f"library: {lib_tokens} tokens in {lib_wall:.1f}s, {lib_tps:.0f} tokens/s")
    print(f"ratio served/library: {served_tps / lib_tps:.2f}x (same tokens: {lib_tokens == res['tokens']})")


if __name__ == "__main__":
    main()
