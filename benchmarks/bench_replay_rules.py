"""Replay speed of the level-1 rules (issue 18): ``dirichlet`` against the other rules, before
(quadrature per count vector, the old path) and after (beta-bound shortcut + closed form) in
the same run.

A synthetic pool (``--problems`` x ``--n`` samples; each problem's answers drawn from a seeded
Dirichlet(0.5, ...) over 6 answers, as scattered as hard problems) is replayed with ``--orders``
seeded random orders; each timing is the median of ``--reps`` runs. Both dirichlet paths must
give the same decisions (checked).

    OMP_NUM_THREADS=1 python benchmarks/bench_replay_rules.py --problems 100 --n 40 --orders 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--orders", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import ttscale.select.adaptive as adaptive
    from ttscale.replay import replay
    from ttscale.select.stopping import dirichlet_top_probability
    from ttscale.store.pool import Pool

    rng = np.random.default_rng(0)
    answers, correct = [], []
    for _ in range(args.problems):
        p = rng.dirichlet([0.5] * 6)
        a = rng.choice(6, size=args.n, p=p)
        answers += [str(x) for x in a]
        correct += [bool(x == 0) for x in a]
    pool = Pool.from_arrays([f"p{i}" for i in range(args.problems)], [args.n] * args.problems,
                            answer=answers, correct=correct, num_tokens=[100] * len(answers))

    def timed(rule: str) -> tuple[float, list[tuple[int, ...]]]:
        times, used = [], []
        for _ in range(args.reps):
            adaptive._dirichlet.cache_clear()
            t0 = time.perf_counter()
            rep = replay(pool, rule, orders=args.orders, seed=0)
            times.append(time.perf_counter() - t0)
            used = [p.used for p in rep.problems]
        return statistics.median(times), used

    rows = []
    for rule in ("fixed", "beta:0.95", "majority:0.8", "entropy:0.75", "dirichlet:0.95"):
        t, used = timed(rule)
        rows.append((rule, t))
        if rule == "dirichlet:0.95":
            fast_used = used
    # the old path: scipy quadrature per distinct count vector (still cached per vector) and no
    # beta-bound shortcut; and the closed form alone, without the shortcut
    new, shortcut = adaptive._dirichlet, adaptive._dirichlet_cannot_stop
    old = adaptive.lru_cache(maxsize=65536)(lambda counts: dirichlet_top_probability(list(counts)))
    adaptive._dirichlet_cannot_stop = lambda rule, answers: False  # type: ignore[assignment]
    try:
        t_closed, closed_used = timed("dirichlet:0.95")
        adaptive._dirichlet = old  # type: ignore[assignment]
        t_old, old_used = timed("dirichlet:0.95")
    finally:
        adaptive._dirichlet, adaptive._dirichlet_cannot_stop = new, shortcut
    assert old_used == fast_used == closed_used, "a faster path changed a decision"
    base = statistics.median(t for r, t in rows if r in ("beta:0.95", "majority:0.8", "entropy:0.75"))
    print(f"machine: {platform.processor() or platform.machine()}, {args.problems} problems x "
          f"{args.n} samples x {args.orders} orders, median of {args.reps}")
    print("| rule | replay s | vs median of beta/majority/entropy |")
    print("|---|---|---|")
    for rule, t in rows:
        print(f"| {rule} | {t:.2f} | {t / base:.2f}x |")
    print(f"| dirichlet:0.95, closed form without the beta-bound shortcut | {t_closed:.2f} | {t_closed / base:.2f}x |")
    print(f"| dirichlet:0.95 before (quadrature, no shortcut) | {t_old:.2f} | {t_old / base:.2f}x |")
    print(f"decisions identical: yes; speed-up of dirichlet {t_old / dict(rows)['dirichlet:0.95']:.1f}x")


if __name__ == "__main__":
    main()
