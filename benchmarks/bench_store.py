"""Store benchmark: write 1,000 problems x 1,000 samples, then load the columnar analysis view.

Reports write throughput, `SampleStore.pool()` load time (medians of repeats), the Python
blocks allocated by a load (must not scale with the number of samples) and peak RSS.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store.py [--problems 1000 --samples 1000]
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

from ttscale.store import SampleStore
from ttscale.types import Sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    P, n = args.problems, args.samples
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        store = SampleStore.create(f"{d}/run", {"model": "synthetic"})
        t0 = time.perf_counter()
        for p in range(P):
            ans = rng.integers(0, 8, n)
            lp = -rng.random(n) * 20
            store.append(
                Sample(f"p{p:04d}", i, text=f"solution {ans[i]} {i % 17}", answer=str(ans[i]),
                       correct=bool(ans[i] == 0), logprob=float(lp[i]), num_tokens=20)
                for i in range(n)
            )
        write_s = time.perf_counter() - t0
        loads, blocks = [], []
        for _ in range(args.repeats):
            s = SampleStore.open(store.path)
            gc.collect()
            b0 = sys.getallocatedblocks()
            t = time.perf_counter()
            pool = s.pool()
            loads.append(time.perf_counter() - t)
            blocks.append(sys.getallocatedblocks() - b0)
            assert pool.num_samples == P * n
            del pool
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.machine()}, {platform.python_version()}")
    print(f"pool: {P} problems x {n} samples = {P * n:,} samples, {P} shards")
    print(f"write: {write_s:.1f} s ({P * n / write_s:,.0f} samples/s)")
    print(f"pool() load: median {statistics.median(loads):.2f} s over {args.repeats} "
          f"(min {min(loads):.2f}, max {max(loads):.2f})")
    print(f"Python blocks allocated by a load: median {int(statistics.median(blocks)):,} "
          f"(vs {P * n:,} samples)")
    print(f"peak RSS: {rss_mb:.0f} MiB")


if __name__ == "__main__":
    main()
