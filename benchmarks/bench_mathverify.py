"""Throughput of math answer verification: 10,000 (gold, candidate) pairs, with and without cache.

The pairs imitate vote pools: problems with 64 samples each, whose candidates are drawn from a
handful of distinct answers per problem (the gold answer in several spellings plus wrong
answers), over a mix of gold types: integers, fractions, LaTeX expressions, sets/intervals.

Modes (each repetition runs in a fresh interpreter, so no cache survives between repetitions;
worker start-up and imports are done before the clock starts):

* ``baseline``  math-verify called directly, one ``verify(parse(gold), parse(cand))`` per pair,
                in-process, no timeouts (what a plain loop over samples does);
* ``nocache``   ttscale ``MathChecker(cache_size=0)``, one call per pair: numeric fast path and
                a worker process with per-check timeouts, but no cache and no de-duplication;
* ``cache``     ttscale ``MathChecker`` as ``MathVerifier`` uses it: all pairs in one call
                (de-duplicated, LRU cache, fast path);
* ``warm``      the same call again on the same checker (every pair a cache hit).

Usage: ``python benchmarks/bench_mathverify.py [--pairs 10000] [--repeats 3] [--workers 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# Each generator returns (gold, equivalent spellings, wrong answers) for one random problem.


def _integer(rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
    v = int(rng.integers(-50, 20000))
    right = [str(v), f"{v}.0", f"{v}.", f"${v}$", f"\\boxed{{{v}}}", f"{v:,}"]
    wrong = [str(v + d) for d in (-2, -1, 1, 2, 10)] + [str(2 * v), str(-v)]
    return str(v), right, wrong


def _fraction(rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
    q = int(rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 12, 16]))
    p = int(rng.integers(1, 4 * q))
    while np.gcd(p, q) != 1:
        p += 1
    right = [f"{p}/{q}", f"\\dfrac{{{p}}}{{{q}}}", f"\\frac{{{2 * p}}}{{{2 * q}}}", f"{p / q:.6f}"]
    wrong = [f"{q}/{p}", f"\\frac{{{p + 1}}}{{{q}}}", f"{p / q:.2f}", str(p)]
    return f"\\frac{{{p}}}{{{q}}}", right, wrong


def _radical(rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
    a, b = int(rng.integers(2, 9)), int(rng.choice([2, 3, 5, 6, 7]))
    c = int(rng.integers(2, 7))
    gold = f"\\frac{{{a}\\sqrt{{{b}}}}}{{{c}}}"
    right = [
        f"\\dfrac{{{a}\\sqrt{b}}}{{{c}}}",
        f"{a}\\sqrt{{{b}}}/{c}",
        f"\\frac{{\\sqrt{{{a * a * b}}}}}{{{c}}}",
        f"\\frac{{{a}}}{{{c}}}\\sqrt{{{b}}}",
    ]
    wrong = [
        f"\\frac{{{a}\\sqrt{{{b}}}}}{{{c + 1}}}",
        f"{a}\\sqrt{{{b}}}",
        f"\\frac{{{a + 1}\\sqrt{{{b}}}}}{{{c}}}",
        f"\\sqrt{{{b}}}",
    ]
    return gold, right, wrong


def _pi(rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
    a, b = int(rng.integers(1, 9)), int(rng.choice([2, 3, 4, 6, 12]))
    gold = f"\\frac{{{a}\\pi}}{{{b}}}"
    right = [f"{a}\\pi/{b}", f"\\frac{{{a}}}{{{b}}}\\pi", f"\\dfrac{{{2 * a}\\pi}}{{{2 * b}}}"]
    wrong = [f"\\frac{{{a}\\pi}}{{{b + 1}}}", f"{a}\\pi", f"\\frac{{{a + 1}\\pi}}{{{b}}}"]
    return gold, right, wrong


def _polynomial(rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
    r = int(rng.integers(1, 9))
    gold = f"x^2+{2 * r}x+{r * r}"
    right = [f"(x+{r})^2", f"x^2 + {2 * r}x + {r * r}", f"{r * r}+{2 * r}x+x^2"]
    wrong = [f"(x-{r})^2", f"x^2+{r * r}", f"x^2+{r}x+{r * r}"]
    return gold, right, wrong


def _set_or_interval(rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
    a = int(rng.integers(-5, 5))
    b = a + int(rng.integers(1, 6))
    if rng.random() < 0.5:
        gold = f"\\{{{a},{b}\\}}"
        return (
            gold,
            [f"\\{{{b},{a}\\}}", f"\\{{{a}, {b}\\}}"],
            [f"\\{{{a}\\}}", f"\\{{{a},{b + 1}\\}}"],
        )
    gold = f"({a},{b})"
    return gold, [f"({a}, {b})", f"\\left({a},{b}\\right)"], [f"[{a},{b}]", f"({a},{b + 1})"]


# answer-type mix of a MATH/GSM8K-like workload
_TYPES = [(_integer, 0.40), (_fraction, 0.20), (_radical, 0.12), (_pi, 0.08),
          (_polynomial, 0.10), (_set_or_interval, 0.10)]  # fmt: skip


def make_pairs(n_pairs: int, per_problem: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    """``n_pairs`` (gold, candidate) pairs, ``per_problem`` per problem (seeded).

    Each problem has its own random gold; its 64 candidates are drawn from a pool of 2-3
    spellings of the gold and 2-4 wrong answers with Dirichlet(0.7) frequencies, so answers
    repeat within a problem as they do in a sampled vote pool.
    """
    rng = np.random.default_rng(seed)
    w = np.array([x for _, x in _TYPES])
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_pairs:
        gen = _TYPES[int(rng.choice(len(_TYPES), p=w / w.sum()))][0]
        gold, right, wrong = gen(rng)
        pool = [str(x) for x in rng.choice(right, size=min(int(rng.integers(2, 4)), len(right)),
                                          replace=False)]  # fmt: skip
        pool += [str(x) for x in rng.choice(wrong, size=min(int(rng.integers(2, 5)), len(wrong)),
                                           replace=False)]  # fmt: skip
        p = rng.dirichlet(np.ones(len(pool)) * 0.7)
        pairs.extend((gold, pool[j]) for j in rng.choice(len(pool), size=per_problem, p=p))
    return pairs[:n_pairs]


def _run_mode(mode: str, n_pairs: int, workers: int) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pairs = make_pairs(n_pairs)
    if mode == "baseline":
        import logging

        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)
        parse("$1$", parsing_timeout=None)  # imports and first-call set-up off the clock
        t0 = time.perf_counter()
        out = []
        for g, c in pairs:
            gp = parse(f"${g}$", parsing_timeout=None)
            cp = parse(f"${c}$", parsing_timeout=None)
            out.append(bool(verify(gp, cp, timeout_seconds=None)))
        dt = time.perf_counter() - t0
        return {"mode": mode, "seconds": dt, "correct": sum(out)}
    from ttscale.verifiers.mathcheck import MathChecker

    cache_size = 0 if mode == "nocache" else 100_000
    with MathChecker(workers=workers, timeout=30.0, cache_size=cache_size) as mc:
        mc.equivalent("x+1", "1+x")  # start the workers off the clock
        mc.stats.__init__()
        t0 = time.perf_counter()
        if mode == "nocache":
            res = [mc.equivalent(g, c) for g, c in pairs]
        else:
            res = mc.equivalent_many(pairs)
        dt = time.perf_counter() - t0
        out = {"mode": mode, "seconds": dt, "correct": sum(r.equal for r in res),
               "timeouts": sum(r.status == "timeout" for r in res), "stats": mc.stats.as_dict()}  # fmt: skip
        if mode == "cache":
            t0 = time.perf_counter()
            res2 = mc.equivalent_many(pairs)
            out["warm_seconds"] = time.perf_counter() - t0
            assert [r.equal for r in res2] == [r.equal for r in res]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--modes", default="baseline,nocache,cache")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run_mode(args.child, args.pairs, args.workers)))
        return
    pairs = make_pairs(args.pairs)
    print(
        f"{len(pairs)} pairs, {len(set(pairs))} distinct, "
        f"{len({c for _, c in pairs})} distinct candidates; workers={args.workers}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", mode, "--pairs", str(args.pairs),
                   "--workers", str(args.workers)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            runs.setdefault(mode, []).append(res)
            print(f"rep {rep} {mode}: {res['seconds']:.2f} s", flush=True)
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    if "cache" in runs:
        med["warm"] = statistics.median(r["warm_seconds"] for r in runs["cache"])
    base = med.get("baseline")
    print(
        f"\nmachine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    print(f"{'mode':10s} {'median s':>9s} {'pairs/s':>10s} {'vs baseline':>12s} {'correct':>8s}")
    for m, s in med.items():
        rs = runs.get(m if m != "warm" else "cache")
        correct = rs[0]["correct"] if rs else ""
        ratio = f"{base / s:.1f}x" if base else ""
        print(f"{m:10s} {s:9.3f} {len(pairs) / s:10.0f} {ratio:>12s} {correct!s:>8s}")
    if "cache" in runs:
        print("cache stats:", json.dumps(runs["cache"][0]["stats"]))
    if "nocache" in runs:
        print("nocache stats:", json.dumps(runs["nocache"][0]["stats"]))


if __name__ == "__main__":
    main()
