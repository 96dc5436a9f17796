"""Adaptive sampling (issue 10, level 1): tokens saved against self-consistency at n = 64.

One fixed run of the bundled model on ``arith`` (``--problems`` x ``--n`` samples, seed 0) is
sampled and verified once; every rule is then replayed on it with ``--orders`` seeded random
orders per problem (``ttscale.replay``), against self-consistency over all ``n`` samples in the
same orders (``fixed``, ties to the first-seen answer). The best rule is the cheapest (token
ratio) whose accuracy is within ``--tolerance`` (0.5 points) of SC@n. Then that rule runs live
(``ttscale sample --adaptive``) with the same seed, and its per-problem decisions are compared
with the index-order replay of the fixed run (live = replay), and its generated tokens with the
fixed run's.

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive.py --problems 200 --n 64 --orders 20
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

RULES = [
    "esc:window=2", "esc:window=3", "esc:window=4", "esc:window=5", "esc:window=8",
    "beta:0.7", "beta:0.8", "beta:0.85", "beta:0.9", "beta:0.92", "beta:0.95", "beta:0.99",
    "dirichlet:0.8", "dirichlet:0.85", "dirichlet:0.9", "dirichlet:0.95",
    "entropy:0.5", "entropy:0.75", "entropy:0.85", "entropy:0.9",
    "majority:0.7", "majority:0.8", "majority:0.9",
    "sprt:p1=0.7", "sprt:p1=0.8", "sprt:p1=0.9", "sprt:p1=0.9,alpha=0.2,beta=0.2",
    "msprt:alpha=0.05", "msprt:alpha=0.01", "msprt:alpha=0.2",
]  # fmt: skip
# DeepConf consensus needs top log-probs (--logprobs K > 0): the paper's warm-up 16, and shorter
DEEPCONF_RULES = ["deepconf:0.95", "deepconf:0.95,warmup=4", "deepconf:0.9,warmup=4"]


def ttscale(*args: str) -> str:
    exe = str(Path(sys.executable).parent / "ttscale")
    r = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"ttscale {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def fmt_ci(d: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if d is None or d.get("mean") is None:
        return "-"
    return f"{d['mean'] * scale:.{digits}f} [{d['low'] * scale:.{digits}f}, {d['high'] * scale:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--orders", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.005, help="accuracy loss allowed (fraction)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ttscale-bench-adaptive"))
    ap.add_argument("--reuse", action="store_true", help="reuse WORKDIR/full if it exists")
    ap.add_argument("--logprobs", type=int, default=20, help="top log-probs per token (0: no deepconf)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    from ttscale.replay import replay
    from ttscale.store import SampleStore

    full = args.workdir / "full"
    common = ["--benchmark", "arith", "--limit", str(args.problems), "--n", str(args.n),
              "--seed", str(args.seed), "--no-progress", "--logprobs", str(args.logprobs)]  # fmt: skip
    t0 = time.perf_counter()
    if not (args.reuse and (full / "manifest.json").exists()):
        ttscale("sample", *common, "--out", str(full))
        ttscale("verify", str(full), "--verifier", "arith")
    sample_s = time.perf_counter() - t0
    store = SampleStore.open(full)
    pool = store.pool("arith")
    confs = None
    rules = list(RULES)
    if args.logprobs > 0:
        from ttscale.analysis import run_confidences

        confs = run_confidences(store)
        rules += DEEPCONF_RULES
    rows = []
    for rule in rules:
        t = time.perf_counter()
        rep = replay(pool, rule, orders=args.orders, seed=args.seed, max_samples=args.n, confidences=confs)
        d = rep.to_dict()
        d["replay_seconds"] = time.perf_counter() - t
        rows.append(d)
        print(f"{rule}: acc {d['accuracy']['mean']:.4f} vs {d['fixed']['accuracy']['mean']:.4f}, "
              f"tokens x{d['token_ratio']['mean']:.3f}", file=sys.stderr)  # fmt: skip
    sc = rows[0]["fixed"]["accuracy"]["mean"]
    ok = [r for r in rows if r["accuracy"]["mean"] >= sc - args.tolerance - 1e-12]
    best = min(ok, key=lambda r: r["token_ratio"]["mean"]) if ok else None

    live: dict[str, Any] = {}
    if best is not None:
        out = args.workdir / "live"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = time.perf_counter()
        ttscale("sample", *common, "--out", str(out), "--adaptive", best["rule"])
        live_s = time.perf_counter() - t
        decisions = [json.loads(x) for x in (out / "adaptive.jsonl").read_text().splitlines()]
        idx = replay(pool, best["rule"], orders=None, max_samples=args.n, confidences=confs).to_dict(
            per_problem=True
        )
        agree = sum(
            (p["used"][0], p["answers"][0]) == (d["used"], d["answer"])
            for p, d in zip(idx["per_problem"], decisions, strict=True)
        )
        live_tokens = SampleStore.open(out).accounting()["generated_tokens"]
        fixed_tokens = int(sum(max(0, x) for x in pool.num_tokens))
        live = {
            "rule": best["rule"],
            "agree": agree,
            "problems": len(decisions),
            "live_tokens": int(live_tokens),
            "fixed_tokens": fixed_tokens,
            "live_token_ratio": live_tokens / fixed_tokens,
            "index_order_accuracy": idx["accuracy"],
            "index_order_fixed_accuracy": idx["fixed"]["accuracy"],
            "live_samples": sum(d["used"] for d in decisions) / len(decisions),
            "live_seconds": live_s,
        }
    result = {
        "problems": args.problems, "n": args.n, "orders": args.orders, "seed": args.seed,
        "sc_accuracy": sc, "sample_seconds": sample_s, "rules": rows,
        "best": None if best is None else best["rule"], "live": live,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    print(f"SC@{args.n} accuracy {sc:.4f} ({args.problems} problems, {args.orders} orders)\n")
    print("| rule | accuracy % [95% CI] | Δ vs SC, pts [paired 95% CI] | samples/problem | tokens/problem | tokens vs SC [95% CI] |")
    print("|---|---|---|---|---|---|")
    fixed = rows[0]
    print(f"| SC@{args.n} (fixed) | {fmt_ci(fixed['fixed']['accuracy'], 100)} | 0 | {args.n} | "
          f"{fmt_ci(fixed['fixed']['tokens'], 1, 0)} | 1.000 |")  # fmt: skip
    for r in rows:
        mark = " **best**" if best is not None and r["rule"] == best["rule"] else ""
        print(f"| `{r['rule']}`{mark} | {fmt_ci(r['accuracy'], 100)} | "
              f"{fmt_ci(r['accuracy_delta'], 100, 2)} | {r['samples']['mean']:.2f} | "
              f"{fmt_ci(r['tokens'], 1, 0)} | {fmt_ci(r['token_ratio'], 1, 3)} |")  # fmt: skip
    if live:
        print(f"\nlive `{live['rule']}`: {live['agree']}/{live['problems']} problems agree with the "
              f"index-order replay (samples used and answer); {live['live_samples']:.2f} samples/problem; "
              f"generated tokens {live['live_tokens']:,} vs {live['fixed_tokens']:,} for SC@{args.n} "
              f"(x{live['live_token_ratio']:.3f}); index-order accuracy "
              f"{live['index_order_accuracy']['mean'] * 100:.1f}% vs SC "
              f"{live['index_order_fixed_accuracy']['mean'] * 100:.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
