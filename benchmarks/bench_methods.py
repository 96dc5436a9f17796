"""Issue 19's methods beside majority vote, DeepConf and the adaptive rules, at equal tokens.

One fixed run of the bundled model on ``arith`` (``--problems`` x ``--n`` samples, top-20
log-probs, seed 0, the hf engine) is sampled and verified once. On it:

* selection at ``k = n`` (all traces, the same tokens): majority, DeepConf (offline vote),
  self-certainty best-of-N and Borda (top-20 approximation), CISC (response probability, T=1);
* stopping/short rules replayed in index order: short-1@n, short-3@n (tokens by the paper's
  lockstep model), adaptive ``beta:0.95`` and ``esc:window=4``;
* for every row, majority@k at the ``k`` whose tokens (``k`` x the mean tokens of a sample)
  are closest to the row's tokens: the comparison at equal tokens.

Accuracy and tokens per problem get 95% percentile-bootstrap CIs over problems.

    OMP_NUM_THREADS=1 python benchmarks/bench_methods.py --problems 200 --n 16
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _ci(a: Any, seed: int = 0) -> tuple[float, float, float]:
    from ttscale.metrics.stats import bootstrap_ci

    c = bootstrap_ci(np.asarray(a, dtype=np.float64), n_boot=1000, seed=seed)
    return float(c.mean), float(c.low), float(c.high)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from ttscale.analysis import compute_curves, run_confidences
    from ttscale.replay import replay
    from ttscale.select.certainty import run_certainties
    from ttscale.select.shortmk import replay_short
    from ttscale.store import SampleStore

    run = args.out or Path(tempfile.mkdtemp(prefix="bench-methods-")) / "run"
    exe = str(Path(sys.executable).parent / "ttscale")
    t0 = time.perf_counter()
    if not (run / "manifest.json").is_file():
        subprocess.run([exe, "sample", "--engine", "hf", "--benchmark", "arith", "--limit", str(args.problems),
                        "--n", str(args.n), "--logprobs", "20", "--seed", "0", "--no-progress", "--out", str(run)],
                       check=True)  # fmt: skip
        subprocess.run([exe, "verify", str(run), "--verifier", "arith"], check=True)
    sample_s = time.perf_counter() - t0
    store = SampleStore.open(run)
    pool = store.pool()
    n = args.n
    P = pool.num_problems
    tok = pool.num_tokens.astype(np.float64)
    per_sample = float(tok.mean())
    full_tokens = np.array([tok[pool.offsets[p] : pool.offsets[p + 1]].sum() for p in range(P)])
    confs = run_confidences(store)
    certs, _ = run_certainties(store)
    ks = list(range(1, n + 1))
    maj = compute_curves(pool, ["majority"], ks, tie="first", n_boot=1000).curves["majority"]
    sel = compute_curves(
        pool, ["majority", "deepconf", "self_certainty", "self_certainty_borda", "cisc"], [n],
        confidences=confs, certainties=certs, tie="first", n_boot=1000,
    )  # fmt: skip
    rows: list[tuple[str, tuple[float, float, float], tuple[float, float, float]]] = []
    ft = _ci(full_tokens)
    for m, label in (("majority", f"majority@{n}"), ("deepconf", f"DeepConf@{n} (offline vote)"),
                     ("self_certainty", f"self-certainty best-of-{n} (top-20 approx.)"),
                     ("self_certainty_borda", f"self-certainty Borda@{n} (p=0.5)"),
                     ("cisc", f"CISC@{n} (response probability, T=1)")):  # fmt: skip
        c = sel.curves[m]
        rows.append((label, (float(c.mean[0]), float(c.low[0]), float(c.high[0])), ft))
    for spec in ("short-1@k", "short-3@k"):
        d = replay_short(pool, spec, max_samples=n)
        a, t = d["accuracy"], d["tokens"]
        rows.append((f"{spec.replace('@k', f'@{n}')} (wall {d['wall_ratio']:.2f}x of majority@{n})",
                     (a["mean"], a["low"], a["high"]), (t["mean"], t["low"], t["high"])))  # fmt: skip
    for rule in ("beta:0.95", "esc:window=4"):
        rep = replay(pool, rule, orders=None, max_samples=n, tie="first").to_dict()
        a, t = rep["accuracy"], rep["tokens"]
        rows.append((f"adaptive {rule} (index order)", (a["mean"], a["low"], a["high"]), (t["mean"], t["low"], t["high"])))
    print(f"bundled arith model (hf, CPU), {P} problems x n={n}, top-20 log-probs, seed 0; "
          f"{per_sample:.1f} tokens per sample; sampling + verify {sample_s:.0f} s; "
          f"{platform.node()} ({platform.processor() or platform.machine()}), run {run}")
    print()
    print("| method | accuracy [95% CI] | tokens/problem [95% CI] | majority@k at equal tokens (k) |")
    print("|---|---|---|---|")
    for label, a, t in rows:
        k = int(np.clip(round(t[0] / per_sample), 1, n))
        print(f"| {label} | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {t[0]:.0f} [{t[1]:.0f}, {t[2]:.0f}] "
              f"| {maj.mean[k - 1]:.3f} [{maj.low[k - 1]:.3f}, {maj.high[k - 1]:.3f}] (k={k}) |")


if __name__ == "__main__":
    main()
