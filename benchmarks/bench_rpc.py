"""Benchmark: RPC@k with the fast (batched) and reference (per-fit) Weibull fits, and how often
the two fits make different pruning decisions.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rpc.py [--problems 1000 --samples 64]

Workload (issue 8): RPC@k for ``--problems`` problems x ``--samples`` samples, every
``k = 1..samples``, ``--draws`` random subsets per problem and k (enumerated where a problem has
at most that many subsets), on the synthetic pool of ``bench_curves.py`` (same generator, seed
0). Timed, median of ``--repeats`` runs: ``selection_at_k(method="rpc", rpc_fit="fast")``. The
reference path (``rpc_fit="reference"``, one scipy fit per subset) runs on the first
``--ref-problems`` problems and is extrapolated linearly to all problems; the issue's per-fit
path (a reference fit for *every* subset, as before this change) is estimated from the measured
cost of one reference fit. Raw fast-fit throughput (every subset fitted) is measured at a few k.

Pruning decisions: ``--corpus`` random subsets (sizes 4, 8, 16, 32, 64, equal shares) of random
problems of the same pool are fitted with both fits; the pruning masks are compared, each
difference is classified by the two fits' negative log-likelihoods, and it is checked whether
the RPC answer changes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curves import make_pool

import ttscale.metrics.at_k as metrics_mod
from ttscale.metrics import selection_at_k
from ttscale.select.aggregate import perplexity_consistency_labels
from ttscale.select.rpc import (
    FAST_MAX_SHAPE,
    fit_weibull_mixture,
    fit_weibull_mixtures,
    weibull_prune,
    weibull_prune_batch,
)

COUNT = {"rows": 0, "points": 0}


def _counting_prune_batch(x, mask=None):  # type: ignore[no-untyped-def]
    COUNT["rows"] += int(x.shape[0])
    COUNT["points"] += int(np.asarray(mask).sum()) if mask is not None else int(x.size)
    return weibull_prune_batch(x, mask)


def _counting_prune(x, mix=None, *, fit="reference"):  # type: ignore[no-untyped-def]
    COUNT["rows"] += 1
    COUNT["points"] += int(np.size(x))
    return weibull_prune(x, mix, fit=fit)


def timed(fn, repeats: int):  # type: ignore[no-untyped-def]
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), walls, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-problems", type=int, default=10)
    ap.add_argument("--corpus", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, default=None, help="append a results section to this file")
    args = ap.parse_args()
    load0 = os.getloadavg()
    codes, correct, logp = make_pool(args.problems, args.samples, args.seed)
    ks = np.arange(1, args.samples + 1)
    metrics_mod.weibull_prune_batch = _counting_prune_batch  # type: ignore[assignment]
    metrics_mod.weibull_prune = _counting_prune  # type: ignore[assignment]

    def run(fit: str, P: int):  # type: ignore[no-untyped-def]
        COUNT["rows"] = COUNT["points"] = 0
        return selection_at_k(codes[:P], correct[:P], ks, method="rpc", scores=logp[:P],
                              n_draws=args.draws, max_subsets=args.draws, seed=2, rpc_fit=fit)  # type: ignore[arg-type]

    subsets = sum(min(args.draws, _comb(args.samples, int(k))) for k in ks[1:]) * args.problems
    fast_wall, fast_cpu, fast_walls, _ = timed(lambda: run("fast", args.problems), args.repeats)
    fast_fits, fast_points = COUNT["rows"], COUNT["points"]
    print(f"fast: median wall {fast_wall:.1f}s cpu {fast_cpu:.1f}s ({fast_walls}), fits {fast_fits}", flush=True)

    R = min(args.ref_problems, args.problems)
    ref_wall, ref_cpu, _, ref = timed(lambda: run("reference", R), 1)
    ref_fits = COUNT["rows"]
    fast_sub = run("fast", R)
    per_fit = ref_cpu / max(ref_fits, 1)
    ref_total = ref_cpu * args.problems / R
    old_total = per_fit * subsets
    curve_diff = float(np.nanmax(np.abs(fast_sub.mean - ref.mean)))
    print(f"reference on {R} problems: wall {ref_wall:.1f}s cpu {ref_cpu:.1f}s, fits {ref_fits}", flush=True)

    # raw fast-fit throughput, every subset fitted, at a few k
    rng = np.random.default_rng(5)
    raw = []
    for k in (8, 32, args.samples):
        idx = np.argsort(rng.random((args.problems * args.draws, args.samples)), axis=1)[:, :k]
        rows = np.repeat(np.arange(args.problems), args.draws)
        x = np.exp(logp[rows[:, None], idx])
        mask = codes[rows[:, None], idx] >= 0
        t, c = time.perf_counter(), time.process_time()
        b = fit_weibull_mixtures(x, mask)
        raw.append((k, x.shape[0], time.perf_counter() - t, time.process_time() - c,
                    float(b.iterations.mean()), float(b.converged.mean())))
        print(f"raw fast fit k={k}: {raw[-1]}", flush=True)

    # pruning decisions of the two fits on a random corpus
    sizes = (4, 8, 16, 32, 64)
    stats = {m: dict(n=0, diff=0, same_opt=0, fast_better=0, ref_better=0, answer=0,
                     ref_unconv=0, fast_cap=0, ref_big=0) for m in sizes}
    t_ref = t_fast = 0.0
    per_size = args.corpus // len(sizes)
    for m in sizes:
        m_eff = min(m, args.samples)
        X, masks, labs = [], [], []
        while len(X) < per_size:
            p = int(rng.integers(args.problems))
            sub = np.sort(rng.permutation(args.samples)[:m_eff])
            ans = codes[p, sub] >= 0
            if ans.sum() < 2:
                continue
            X.append(np.exp(logp[p, sub]))
            masks.append(ans)
            labs.append(codes[p, sub])
        Xa, Ma = np.array(X), np.array(masks)
        t = time.process_time()
        bf = fit_weibull_mixtures(Xa, Ma)
        fast_mask = weibull_prune_batch(Xa, Ma)
        t_fast += time.process_time() - t
        st = stats[m]
        for i in range(per_size):
            a = Ma[i]
            t = time.process_time()
            mix = fit_weibull_mixture(Xa[i, a])
            ref_mask = np.zeros(m_eff, dtype=bool)
            ref_mask[a] = weibull_prune(Xa[i, a], mix)
            t_ref += time.process_time() - t
            st["n"] += 1
            st["ref_unconv"] += not mix.converged
            st["ref_big"] += max(mix.k1, mix.k2) > FAST_MAX_SHAPE
            st["fast_cap"] += bool(np.nanmax(bf.params[i, [1, 3]]) >= FAST_MAX_SHAPE * (1 - 1e-9))
            if np.array_equal(ref_mask, fast_mask[i]):
                continue
            st["diff"] += 1
            nf, nr = float(bf.nll[i]), mix.nll
            tol = 1e-6 * (1 + abs(nr))
            if nf < nr - tol:
                st["fast_better"] += 1
            elif nr < nf - tol:
                st["ref_better"] += 1
            else:
                st["same_opt"] += 1
            lab = np.where(a, labs[i], -1)
            lp = np.log(Xa[i])
            ra = perplexity_consistency_labels(lab, lp, pruned=ref_mask)
            fa = perplexity_consistency_labels(lab, lp, pruned=fast_mask[i])
            st["answer"] += ra.index != fa.index
        print(f"corpus m={m}: {st}", flush=True)
    load1 = os.getloadavg()

    lines = [
        "",
        "## RPC curves at scale: fast vs reference Weibull fit (issue 8)",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rpc.py --problems {args.problems} "
        f"--samples {args.samples} --draws {args.draws} --repeats {args.repeats} --ref-problems {R} "
        f"--corpus {args.corpus}`",
        f"Machine: {platform.node() or 'unknown'}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at the end "
        "(shared machine: wall times are inflated by other jobs; CPU time is this process's).",
        f"Workload: RPC@k for {args.problems} problems x n = {args.samples}, k = 1..{args.samples}, "
        f"{args.draws} subsets per problem and k ({subsets:,} subsets with k >= 2; k = 1 is exact "
        "without a fit), synthetic pool of bench_curves.py (seed 0).",
        "",
        "| path | wall | CPU | Weibull fits | notes |",
        "|---|---|---|---|---|",
        f"| fast (`rpc_fit=\"fast\"`, default of `curve`), median of {args.repeats} | {fast_wall:.1f} s | "
        f"{fast_cpu:.1f} s | {fast_fits:,} ({fast_points:,} paths) | runs: {', '.join(f'{w:.1f}' for w in fast_walls)} s |",
        f"| reference (`rpc_fit=\"reference\"`), {R} problems, measured | {ref_wall:.1f} s | {ref_cpu:.1f} s | "
        f"{ref_fits:,} | {per_fit * 1e3:.1f} ms CPU a fit |",
        f"| reference, extrapolated to {args.problems} problems | | {ref_total:.0f} s | "
        f"~{ref_fits * args.problems // R:,} | ratio to fast (CPU): {ref_total / fast_cpu:.0f}x |",
        f"| one reference fit per subset (the path before this change), estimated | | {old_total:.0f} s | "
        f"{subsets:,} | ratio to fast (CPU): {old_total / fast_cpu:.0f}x |",
        "",
        "Fits skipped: a subset is fitted only when the clusters that could win under some pruning "
        f"are not all wholly correct or all wholly wrong; here {fast_fits:,} of {subsets:,} subsets "
        f"({100 * fast_fits / subsets:.0f}%) needed a fit. Same subsets, fast vs reference RPC@k on the "
        f"first {R} problems: largest |difference| of the mean over k = {curve_diff:.4f}.",
        "",
        "Raw fast-fit throughput (every subset fitted, no skipping):",
        "",
        "| k | fits | wall | CPU | CPU per fit | mean Newton iterations | converged |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, nf, w, c, it, cv in raw:
        lines.append(f"| {k} | {nf:,} | {w:.1f} s | {c:.1f} s | {c / nf * 1e6:.0f} µs | {it:.1f} | {cv:.3f} |")
    n_all = sum(s["n"] for s in stats.values())
    lines += [
        "",
        f"Pruning decisions on a random corpus of {n_all:,} subsets (CPU: reference {t_ref:.1f} s, "
        f"fast {t_fast:.2f} s, ratio {t_ref / max(t_fast, 1e-9):.0f}x). A difference is classified by "
        "the negative log-likelihoods (NLL) of the two fits (tolerance 1e-6 relative):",
        "",
        "| paths | subsets | masks differ | fast NLL lower | reference NLL lower | same NLL | RPC answer differs | reference not converged | reference shape > cap | fast shape at cap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in stats.items():
        n = max(s["n"], 1)
        lines.append(
            f"| {m} | {s['n']} | {s['diff']} ({100 * s['diff'] / n:.1f}%) | {s['fast_better']} | "
            f"{s['ref_better']} | {s['same_opt']} | {s['answer']} | {s['ref_unconv']} | {s['ref_big']} | {s['fast_cap']} |"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        with args.write.open("a", encoding="utf-8") as fh:
            fh.write(text)


def _comb(n: int, k: int) -> int:
    import math

    return math.comb(n, k)


if __name__ == "__main__":
    main()
