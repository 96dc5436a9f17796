"""Self-certainty on the bundled model: the top-k approximation's error against the exact
value (top-20 and top-5), and what each does to selection, beside the cost of the exact value.

One fixed run of the bundled model on ``arith`` (``--problems`` x ``--n``, top-20 log-probs,
seed 0, the hf engine) is sampled twice, without and with ``--self-certainty`` (the same
samples: the option only reads the distributions), and ``ttscale certainty`` scores the first
run (a scoring pass). Then, per trace:

* exact: the scoring pass's value; the sampling-time values are compared with it;
* top-20: the stored top-20 log-probs (plus the sampled token), tail spread evenly;
* top-5: the 5 largest of those (plus the sampled token), as ``--logprobs 5`` would store.

Reported: relative error (mean, median, max; the approximation is a lower bound), Spearman rank
correlation over all traces and within each problem (what selection reads), how often best-of-n
picks the same trace as with the exact values, and best-of-n / Borda accuracy at k = n with 95%
bootstrap CIs over problems; wall time of sampling with and without the option and of the pass.

    OMP_NUM_THREADS=1 python benchmarks/bench_certainty.py --problems 100 --n 16 [--out DIR]

Then the decode loop's own cost of the option: in-process hf ``generate`` calls with and
without it, alternating (``--reps``), medians and minima (the machine is shared: minima are the
least disturbed).
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


def _spearman(a: Any, b: Any) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _top(top: dict, tok: int, lp: float, k: int) -> dict:
    keep = dict(sorted(top.items(), key=lambda kv: -kv[1])[:k])
    keep[tok] = lp  # as an engine stores it: the sampled token is always listed
    return keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=15, help="alternating calls for the decode overhead")
    args = ap.parse_args()
    from ttscale.analysis import compute_curves
    from ttscale.select.certainty import self_certainty_topk
    from ttscale.store import SampleStore

    root = args.out or Path(tempfile.mkdtemp(prefix="bench-certainty-"))
    exe = str(Path(sys.executable).parent / "ttscale")
    base = [exe, "sample", "--engine", "hf", "--benchmark", "arith", "--limit", str(args.problems),
            "--n", str(args.n), "--logprobs", "20", "--seed", "0", "--no-progress"]  # fmt: skip
    wall = {}
    run, sc_run = root / "plain", root / "sc"
    if not (sc_run / "manifest.json").is_file():  # --out of an earlier run: reuse its runs
        for name, extra in (("sample (plain)", []), ("sample --self-certainty", ["--self-certainty"])):
            out = root / ("plain" if not extra else "sc")
            t0 = time.perf_counter()
            subprocess.run([*base, *extra, "--out", str(out)], check=True, capture_output=True)
            wall[name] = time.perf_counter() - t0
        subprocess.run([exe, "verify", str(run), "--verifier", "arith"], check=True, capture_output=True)
        t0 = time.perf_counter()
        subprocess.run([exe, "certainty", str(run)], check=True, capture_output=True)
        wall["ttscale certainty (scoring pass)"] = time.perf_counter() - t0

    store = SampleStore.open(run)
    samples = {(s.problem_id, s.index): s for s in store.samples()}
    sc_samples = {(s.problem_id, s.index): s for s in SampleStore.open(sc_run).samples()}
    at_sampling = {k: s.scores["self_certainty"] for k, s in sc_samples.items()}
    t = store.score_table("self_certainty")
    keys = list(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True))
    exact = np.array(t.column("score").to_pylist(), dtype=np.float64)
    vocab = int((store.score_set_record("self_certainty") or {})["config"]["vocab_size"])
    same = sc_samples.keys() == samples.keys() and all(sc_samples[k].token_ids == samples[k].token_ids for k in keys)
    samp = np.array([at_sampling[k] for k in keys])
    approx = {}
    for k_top in (20, 5):
        vals = []
        for key in keys:
            s = samples[key]
            tops = [_top(dict(tp), tok, lp, k_top) for tp, tok, lp in
                    zip(s.top_logprobs or (), s.token_ids or (), s.token_logprobs or (), strict=True)]  # fmt: skip
            vals.append(self_certainty_topk(tops, vocab))
        approx[k_top] = np.array(vals, dtype=np.float64)

    pool = store.pool()
    # pool order is (problem_id, index), as the score table's
    assert [(str(p), int(i)) for p, i in zip(np.repeat(pool.problem_ids, np.diff(pool.offsets)), pool.index, strict=True)] == keys
    print(f"# self-certainty: top-k approximation vs exact, bundled model (V={vocab}), arith "
          f"{pool.num_problems} problems x {args.n} (seed 0, T=1.0)")
    print(f"# {platform.machine()} {platform.system()}, {platform.python_version()}, OMP_NUM_THREADS=1; "
          "machine shared with other jobs")
    print(f"# sampling-time values vs scoring pass: max |rel diff| {np.max(np.abs(samp - exact) / exact):.2e} "
          f"(identical samples: {same})")
    print("\n| values | mean rel. error | median | max | Spearman (all) | Spearman within problem (mean) | "
          "best-of-n picks the exact's trace |")
    print("|---|---|---|---|---|---|---|")
    rows: dict[str, np.ndarray] = {"exact": exact, "top-20": approx[20], "top-5": approx[5]}
    for name, v in rows.items():
        rel = (exact - v) / exact
        within, agree = [], []
        for p in range(pool.num_problems):
            lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
            within.append(_spearman(exact[lo:hi], v[lo:hi]))
            agree.append(int(np.argmax(v[lo:hi]) == np.argmax(exact[lo:hi])))
        assert (v <= exact + 1e-9).all()  # a lower bound, sample by sample
        print(f"| {name} | {rel.mean():.4f} | {np.median(rel):.4f} | {rel.max():.4f} | {_spearman(exact, v):.3f} | "
              f"{np.nanmean(within):.3f} | {np.mean(agree):.3f} |")
    print("\n| selection at k = n | exact | top-20 approx. | top-5 approx. |")
    print("|---|---|---|---|")
    for method, label in (("self_certainty", f"best-of-{args.n} by self-certainty"),
                          ("self_certainty_borda", f"Borda@{args.n} (p=0.5)")):  # fmt: skip
        cells = []
        for v in rows.values():
            c = compute_curves(pool, [method], [args.n], certainties=v, tie="first", n_boot=1000, seed=0).curves[method]
            cells.append(f"{c.mean[0]:.3f} [{c.low[0]:.3f}, {c.high[0]:.3f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    maj = compute_curves(pool, ["majority"], [args.n], tie="first", n_boot=1000, seed=0).curves["majority"]
    print(f"| majority@{args.n} (same traces) | {maj.mean[0]:.3f} [{maj.low[0]:.3f}, {maj.high[0]:.3f}] | | |")
    if wall:
        print("\n| wall time (one run each, CLI start-up included) | seconds |")
        print("|---|---|")
        for name, s in wall.items():
            print(f"| {name} | {s:.1f} |")
    _decode_overhead(args.reps)


def _decode_overhead(reps: int) -> None:
    """The decode loop with and without ``self_certainty``: the same 64 samples, in-process,
    calls alternating (the order flipped every rep), medians and minima."""
    import statistics

    from ttscale.engines import GenerationRequest
    from ttscale.engines.hf import HFEngine
    from ttscale.evals import default_model_path
    from ttscale.types import SamplingParams

    m = default_model_path()
    plain, sc = HFEngine(m, device="cpu", threads=1), HFEngine(m, device="cpu", threads=1, self_certainty=True)
    reqs = [GenerationRequest(problem_id=f"q{i}", prompt=f"Q: {i + 3} + {2 * i + 5} = ?\nA:", indices=tuple(range(8)))
            for i in range(8)]  # fmt: skip
    params = SamplingParams(temperature=1.0, max_tokens=48, logprobs=20, seed=0)
    times: dict[str, list[float]] = {"plain": [], "self_certainty": []}
    for r in range(reps):
        order = (("plain", plain), ("self_certainty", sc))
        for name, eng in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            out = eng.generate(reqs, params)
            times[name].append(time.perf_counter() - t0)
    toks = sum(c.num_tokens for cs in out for c in cs)
    a, b = statistics.median(times["plain"]), statistics.median(times["self_certainty"])
    print(f"\n| hf decode, 64 samples ({toks} tokens) per call, {reps} alternating calls | median s | min s |")
    print("|---|---|---|")
    print(f"| plain | {a:.3f} | {min(times['plain']):.3f} |")
    print(f"| self_certainty=True | {b:.3f} | {min(times['self_certainty']):.3f} |")
    print(f"| ratio | {b / a:.3f} | {min(times['self_certainty']) / min(times['plain']):.3f} |")


if __name__ == "__main__":
    main()
