"""`ttscale sample` against `ttscale demo`: sampling throughput on the same model and work.

Both commands run as a user runs them (subprocesses of the installed ``ttscale`` script, the
user's environment minus ``OMP_NUM_THREADS`` unless ``--keep-omp``, default engine choice),
on the bundled model, 50 arith test problems x n = 64, max_tokens 96, seed 0: the demo's work.
Each prints ``sampled N new samples ... in S s``; the benchmark reads the samples and the
generated tokens from each run's manifest and divides by the sampling seconds. Repeats
alternate the order; the reported ratio is the median of the per-repeat ratios
(sample / demo), so machine noise that hits both sides of a repeat cancels.

    python benchmarks/bench_sample_vs_demo.py --repeats 3

``--old`` adds `sample` with the HF engine's former fixed batch of 16 (``--engine-opt
batch_size=16``), ``--vllm`` adds `sample --engine vllm`, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_SAMPLED = re.compile(r"sampled ([\d,]+) new samples .* in ([\d.]+)s")


def _ttscale() -> str:
    exe = Path(sys.executable).with_name("ttscale")
    return str(exe) if exe.exists() else "ttscale"


def _run(name: str, args: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run(
        [_ttscale(), *args, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stdout}\n{p.stderr}")
    m = _SAMPLED.search(p.stdout)
    if m is None:
        raise SystemExit(f"{name}: no 'sampled ...' line in\n{p.stdout}")
    seconds = float(m.group(2))
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = int(manifest["accounting"]["generated_tokens"])
    samples = int(m.group(1).replace(",", ""))
    engine_line = next((x for x in p.stderr.splitlines() if x.startswith("engine:")), "")
    return {
        "command": name,
        "samples": samples,
        "tokens": tokens,
        "sampling_s": seconds,
        "wall_s": round(wall, 1),
        "tokens_per_s": tokens / seconds,
        "engine_line": engine_line,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", action="store_true", help="also time the former HF batch of 16")
    ap.add_argument("--vllm", action="store_true", help="also time `sample --engine vllm`")
    ap.add_argument("--keep-omp", action="store_true", help="keep OMP_NUM_THREADS if set")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()

    from ttscale.evals import default_model_path

    model = default_model_path()
    env = dict(os.environ)
    if not args.keep_omp:
        env.pop("OMP_NUM_THREADS", None)
    common = ["--n", str(args.n)]
    commands = {
        "demo": ["demo", "--limit", str(args.problems), *common],
        "sample": ["sample", "--model", model, "--benchmark", "arith",
                   "--limit", str(args.problems), "--max-tokens", "96", *common],
    }  # fmt: skip
    if args.old:
        commands["sample-batch16"] = [*commands["sample"], "--engine-opt", "batch_size=16"]
    if args.vllm:
        commands["sample-vllm"] = [*commands["sample"], "--engine", "vllm"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ttscale-bench-") as tmp:
        for rep in range(args.repeats):
            order = list(commands) if rep % 2 == 0 else list(reversed(commands))
            for name in order:
                r = _run(name, commands[name], Path(tmp) / f"{name}-{rep}", env)
                r["repeat"] = rep
                rows.append(r)
                print(
                    f"repeat {rep} {name:15s} {r['tokens']:,} tokens in {r['sampling_s']:.1f}s "
                    f"-> {r['tokens_per_s']:,.0f} tok/s (command wall {r['wall_s']}s)",
                    flush=True,
                )
    by = {name: [r for r in rows if r["command"] == name] for name in commands}
    tokens = {r["tokens"] for r in by["demo"] + by["sample"]}
    if len(tokens) != 1:
        print(f"warning: demo and sample generated different token counts: {sorted(tokens)}")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(f"model: {model}; work: {args.problems} problems x n={args.n}, max_tokens 96")
    print(f"engine lines: {by['sample'][0]['engine_line']}")
    for name, rs in by.items():
        med = statistics.median(r["tokens_per_s"] for r in rs)
        print(f"{name:15s} median {med:,.0f} tok/s")
    for name in commands:
        if name == "demo":
            continue
        ratios = [
            d["tokens_per_s"] / s["tokens_per_s"] for d, s in zip(by["demo"], by[name], strict=True)
        ]
        print(
            f"demo / {name} throughput: median {statistics.median(ratios):.3f} "
            f"(per repeat {', '.join(f'{x:.3f}' for x in ratios)})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
