"""Step-level search vs voting on the bundled model and ``arith``, with the exact arith process reward.

One run, one engine, the same problems and seeds for every method. For each budget ``N``:

* ``beam``: beam search with ``arith-prm`` (keep the best ``N/M`` partial solutions, expand each
  ``M`` ways); answer = reward-weighted vote over its finished solutions;
* ``dvts``: ``N/M`` independent subtrees, each keeping its best and expanding it ``M`` ways;
  answer = reward-weighted vote;
* ``bon-weighted``: ``N`` independent step-wise samples, answer = reward-weighted vote (weights =
  the process reward in [0, 1]);
* ``majority``: the same ``N`` samples, unweighted majority vote (paired with ``bon-weighted``);
* ``smc``: ``SMCSampler`` with ``N`` particles, the ``arith-prm`` log-potential (target: the
  model conditioned on every line being right), systematic resampling at ESS < N/2; answer =
  weighted vote of the final particles;
* ``smc-fk``: the same with FK ``difference`` shaping of the reward (``--lam``, default 10).

Accuracy is the expected credit of the vote (a tie shares its credit), with a 95% bootstrap CI
over problems; tokens are every generated token per problem (pruned or resampled branches
included) and particle-steps every step continuation drawn. The sampler's own overhead is its
wall time minus the time inside ``engine.generate`` and ``potential.score`` (measured by thin
wrappers around both), as a fraction of its wall time and per engine call (step).

    OMP_NUM_THREADS=1 python benchmarks/bench_smc.py --problems 100 --budgets 4,8,16,32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _vote(answers: list[str | None], weights: list[float] | None, reference: str) -> float:
    from ttscale.evals.arith import check
    from ttscale.select.aggregate import majority_vote, weighted_vote

    if not any(a is not None for a in answers):
        return 0.0
    if weights is None:
        res = majority_vote(answers)
    else:
        res = weighted_vote(answers, np.asarray(weights, dtype=np.float64))
    return float(res.credit([check(a, reference) for a in res.answers]))


def _ci(x: np.ndarray, seed: int, reps: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(reps, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


class Timed:
    """Wraps an engine (``generate``) or a potential (``score``) and adds up the seconds spent
    in that call; every other attribute is the wrapped object's."""

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._method = method
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)
        if name != self._method:
            return fn

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed


def _weights(log_weights: tuple[float, ...] | None) -> list[float]:
    """Normalised weights ``exp(ℓ - max ℓ)``; all zero when every ``ℓ`` is ``-inf``."""
    lw = np.asarray(log_weights or (), dtype=np.float64)
    if lw.size == 0 or not np.isfinite(lw.max()):
        return [0.0] * lw.size
    return np.exp(lw - lw.max()).tolist()


def run_method(
    engine: Any, problems: list[Any], method: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One method at budget ``n``: per-problem vote credits, tokens, particle-steps, timing."""
    from ttscale.evals.arith import extract_arith_answer
    from ttscale.samplers.potentials import make_potential
    from ttscale.samplers.search import SearchSampler, particle_steps
    from ttscale.types import SamplingParams

    eng = Timed(engine, "generate")
    width = 1
    if method in ("smc", "smc-fk"):
        from ttscale.samplers.smc import SMCSampler

        fk = method == "smc-fk"
        pot = Timed(make_potential("arith-prm", value="prob" if fk else "log_prob"), "score")
        sampler: Any = SMCSampler(
            eng,
            pot,
            SamplingParams(
                temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
            ),
            shaping="difference" if fk else "none",
            lam=args.lam,
            resample="systematic",
            ess_threshold=0.5,
            tokens_per_step=args.step_tokens,
            max_steps=args.max_steps,
            progress=False,
        )
    else:
        pot = Timed(make_potential("arith-prm"), "score")
        width = 1 if method == "best_of_n" else min(args.width, n)
        sampler = SearchSampler(
            eng,
            pot,
            SamplingParams(
                temperature=args.temperature, max_tokens=args.step_tokens, seed=args.seed
            ),
            search=method,
            width=width,
            max_steps=args.max_steps,
            max_tokens=args.max_tokens,
            batch_problems=args.batch_problems,
        )
    t0 = time.perf_counter()
    results = list(sampler.sample(problems, n, seed=args.seed))
    wall = time.perf_counter() - t0
    rows: dict[str, list[float]] = {}
    tokens: list[int] = []
    psteps: list[int] = []
    degenerate = 0
    for r in results:
        answers = [extract_arith_answer(c.text) for c in r.kept]
        ref = r.problem.reference
        name = "bon-weighted" if method == "best_of_n" else method
        rows.setdefault(name, []).append(_vote(answers, _weights(r.log_weights), ref))
        if method == "best_of_n":
            rows.setdefault("majority", []).append(_vote(answers, None, ref))
        tokens.append(r.generated_tokens)
        psteps.append(particle_steps(r))
        degenerate += bool(r.info.get("degenerate"))
    return {
        "rows": rows,
        "tokens": tokens,
        "particle_steps": psteps,
        "wall": wall,
        "engine_s": eng.seconds,
        "engine_calls": eng.calls,
        "potential_s": pot.seconds,
        "width": width,
        "degenerate": degenerate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", default="4,8,16,32")
    ap.add_argument("--width", type=int, default=4, help="M: expansions per kept beam")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--step-tokens", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-problems", type=int, default=25)
    ap.add_argument("--lam", type=float, default=10.0, help="FK strength of smc-fk")
    ap.add_argument("--methods", default="beam,dvts,best_of_n,smc,smc-fk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from ttscale.engines import make_engine
    from ttscale.evals import default_model_path, load_problems

    engine = make_engine("hf", str(default_model_path()))
    problems = list(load_problems("arith"))[: args.problems]
    budgets = [int(b) for b in args.budgets.split(",")]
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "problems": len(problems),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [],
    }
    run_method(engine, problems[:2], "best_of_n", 2, args)  # warm-up (first-call allocations)
    own_total = wall_total = 0.0
    for n in budgets:
        for method in args.methods.split(","):
            r = run_method(engine, problems, method, n, args)
            own = r["wall"] - r["engine_s"] - r["potential_s"]
            own_total += own
            wall_total += r["wall"]
            for name, credits in r["rows"].items():
                x = np.asarray(credits, dtype=np.float64)
                lo, hi = _ci(x, args.seed)
                row = {
                    "method": name,
                    "N": n,
                    "M": r["width"],
                    "accuracy": float(x.mean()),
                    "ci95": [lo, hi],
                    "tokens_per_problem": float(np.mean(r["tokens"])),
                    "particle_steps_per_problem": float(np.mean(r["particle_steps"])),
                    "wall_s": r["wall"],
                    "engine_s": r["engine_s"],
                    "engine_calls": r["engine_calls"],
                    "potential_s": r["potential_s"],
                    "sampler_own_s": own,
                    "sampler_own_fraction": own / r["wall"] if r["wall"] else 0.0,
                    "sampler_own_ms_per_step": 1e3 * own / max(r["engine_calls"], 1),
                    "degenerate": r["degenerate"],
                }
                out["results"].append(row)
                print(
                    f"{name:13s} N={n:3d} acc={row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
                    f"tokens/problem={row['tokens_per_problem']:.0f} "
                    f"particle-steps/problem={row['particle_steps_per_problem']:.1f} "
                    f"own={row['sampler_own_fraction']:.2%} "
                    f"({row['sampler_own_ms_per_step']:.2f} ms/step) wall={r['wall']:.1f}s"
                    + (f" degenerate={r['degenerate']}" if r["degenerate"] else ""),
                    flush=True,
                )
    out["sampler_own_fraction_overall"] = own_total / wall_total if wall_total else 0.0
    print(
        f"sampler own time overall: {out['sampler_own_fraction_overall']:.2%} of {wall_total:.1f}s"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
