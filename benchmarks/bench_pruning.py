"""Benchmark: mid-generation trace pruning vs self-consistency at the same n, live and replay.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pruning.py [--problems 40 --n 64]

The bundled arith model (hf engine, CPU) samples ``--n`` traces per problem of arith's test
split (seed 0, temperature 1, top-20 log-probs for DeepConf). Self-consistency (SC@n): majority
vote over all ``n`` traces. Each pruning rule is run twice on the same problems and seed:

* **replay** (:func:`ttscale.samplers.pruning.replay_pruning`) on the SC traces: which traces the
  rule would have stopped, at which token, and the tokens it would have generated;
* **live** (:class:`ttscale.samplers.pruning.PruningSampler`, streaming/abort through the hf
  engine's ``on_token``): the traces actually generated, pruned ones counted.

Accuracy = majority vote over the kept traces (ties: expected credit, as ``ttscale curve``),
scored by the arith verifier; tokens = every generated token per problem. 95% percentile
bootstrap CIs over problems (1,000 resamples) for accuracy, for the tokens ratio rule/SC and for
the accuracy difference rule - SC (paired). ``live = replay`` is the fraction of traces whose
pruning decision (kept / stopped at token t) agrees.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ttscale.engines import make_engine
from ttscale.evals.registry import get_benchmark
from ttscale.metrics.stats import bootstrap_ci
from ttscale.samplers import RepeatedSampler
from ttscale.samplers.pruning import PruningSampler, parse_prune_rule, replay_pruning
from ttscale.select.aggregate import majority_vote
from ttscale.types import Completion, Problem, Sample, SamplingParams
from ttscale.verifiers import make_verifier

DEFAULT_RULES = [
    "deepconf-online:eta=90,warmup=16,window=8",
    "deepconf-online:eta=10,warmup=16,window=8",
    "lowprob:threshold=-0.4,min_tokens=8",
    "lowprob:threshold=-0.6,min_tokens=8",
    "lowprob:threshold=-0.3,min_tokens=8",
]


def majority_credit(answers: list[str | None], correct: list[bool]) -> float:
    """Expected accuracy of a majority vote (uniform tie-break) over answered traces."""
    if not any(a is not None for a in answers):
        return 0.0
    res = majority_vote(answers, tie="expected")
    per = []
    for a in res.answers:
        i = answers.index(a)
        per.append(1.0 if correct[i] else 0.0)
    return res.credit(np.asarray(per))


def verify(verifier: Any, problem: Problem, comps: list[Completion]) -> tuple[list, list]:
    verdicts = verifier.verify(problem, [Sample.from_completion(c) for c in comps])
    return [v.answer for v in verdicts], [bool(v.correct) for v in verdicts]


def ci(values: np.ndarray) -> tuple[float, float, float]:
    c = bootstrap_ci(values, n_boot=1000, seed=0)
    return float(c.mean), float(c.low), float(c.high)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--rules", nargs="*", default=DEFAULT_RULES)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()

    from ttscale.evals import default_model_path

    model = args.model or default_model_path()
    bench = get_benchmark("arith")
    problems = bench.load(bench.default_split, limit=args.problems)
    verifier = make_verifier(bench.verifier)
    engine = make_engine(args.engine, model)
    params = SamplingParams(
        max_tokens=bench.max_tokens, stop=tuple(bench.stop), logprobs=20, seed=0, temperature=1.0
    )
    print(f"# {platform.processor() or platform.machine()}, {args.engine} engine, model {model}")
    print(f"# arith test, {len(problems)} problems, n={args.n}, seed 0, top-20 log-probs")

    t = time.perf_counter()
    sc = list(RepeatedSampler(engine, params, batch_size=args.batch_size, progress=False)
              .sample(problems, args.n, seed=0))
    sc_wall = time.perf_counter() - t
    sc_comps = {r.problem_id: [c.completion for c in r.candidates] for r in sc}
    sc_tokens = np.asarray([r.generated_tokens for r in sc], dtype=np.float64)
    checked: dict[str, tuple[list, list]] = {}
    sc_acc = []
    for p in problems:
        a, ok = verify(verifier, p, sc_comps[p.id])
        checked[p.id] = (a, ok)
        sc_acc.append(majority_credit(a, ok))
    sc_acc_a = np.asarray(sc_acc)
    m, lo, hi = ci(sc_acc_a)
    print(f"SC@{args.n}: accuracy {m:.3f} [{lo:.3f}, {hi:.3f}], tokens/problem "
          f"{sc_tokens.mean():,.1f}, {sc_wall:.1f}s")
    print()
    print("| rule | mode | accuracy [95% CI] | Δ acc vs SC [CI] | tokens/problem | tokens ratio "
          "[CI] | pruned | live = replay | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")

    all_sc = [c for p in problems for c in sc_comps[p.id]]
    for spec in args.rules:
        rule = parse_prune_rule(spec)
        t = time.perf_counter()
        rep = replay_pruning(all_sc, rule)
        rep_wall = time.perf_counter() - t
        rep_by = {pp.problem_id: pp for pp in rep.problems}
        acc_r, tok_r = [], []
        for p in problems:
            a, ok = checked[p.id]
            keep = set(rep_by[p.id].kept_indices)
            acc_r.append(majority_credit([x for i, x in enumerate(a) if i in keep],
                                         [x for i, x in enumerate(ok) if i in keep]))
            tok_r.append(rep_by[p.id].tokens)
        t = time.perf_counter()
        live = list(PruningSampler(engine, params, rule, batch_size=args.batch_size, progress=False)
                    .sample(problems, args.n, seed=0))
        live_wall = time.perf_counter() - t
        acc_l, tok_l = [], []
        agree = total = pruned_live = 0
        for p, res in zip(problems, live, strict=True):
            kept = list(res.kept)
            a, ok = verify(verifier, p, [c.completion for c in kept]) if kept else ([], [])
            acc_l.append(majority_credit(a, ok))
            tok_l.append(res.generated_tokens)
            want = {t_.index: t_.pruned_at for t_ in rep_by[p.id].traces}
            for c in res.candidates:
                total += 1
                agree += int(want[c.index] == c.pruned_at)
                pruned_live += int(c.pruned_at is not None)
        for mode, acc, tok, pruned, wall, agreement in [
            ("replay", acc_r, tok_r, rep.pruned, rep_wall, ""),
            ("live", acc_l, tok_l, pruned_live, live_wall, f"{agree / total:.3f}"),
        ]:
            acc_a = np.asarray(acc, dtype=np.float64)
            tok_a = np.asarray(tok, dtype=np.float64)
            am, alo, ahi = ci(acc_a)
            dm, dlo, dhi = ci(acc_a - sc_acc_a)
            # ratio of means with a paired bootstrap over problems
            rng = np.random.default_rng(0)
            idx = rng.integers(0, len(problems), size=(1000, len(problems)))
            ratios = tok_a[idx].sum(axis=1) / sc_tokens[idx].sum(axis=1)
            r = tok_a.sum() / sc_tokens.sum()
            rlo, rhi = np.quantile(ratios, [0.025, 0.975])
            print(f"| `{spec}` | {mode} | {am:.3f} [{alo:.3f}, {ahi:.3f}] | {dm:+.3f} "
                  f"[{dlo:+.3f}, {dhi:+.3f}] | {tok_a.mean():,.1f} | {r:.3f} [{rlo:.3f}, {rhi:.3f}] "
                  f"| {pruned} of {len(problems) * args.n} | {agreement} | {wall:.1f} |")
    engine.close()

    # budget sweep by replay (cheap): SC@m and each rule on the first m traces, for the fewest
    # tokens that reach SC@n accuracy within 0.5 points
    target = sc_acc_a.mean() - 0.005
    print()
    print(f"Budget sweep by replay (first m traces of each problem); target: SC@{args.n} "
          f"accuracy - 0.5 points = {target:.3f}")
    print()
    print("| method | m | accuracy [95% CI] | tokens/problem | tokens vs SC@n | reaches target |")
    print("|---|---|---|---|---|---|")
    best: tuple[float, str] | None = None
    ms = [m for m in (4, 8, 16, 24, 32, 48, 64, 128) if m <= args.n]
    for spec in ["sc", *args.rules]:
        for m in ms:
            acc, tok = [], []
            if spec == "sc":
                for p in problems:
                    a, ok = checked[p.id]
                    acc.append(majority_credit(a[:m], ok[:m]))
                    tok.append(sum(c.num_tokens for c in sc_comps[p.id][:m]))
            else:
                rep = replay_pruning(all_sc, spec, max_samples=m)
                by = {pp.problem_id: pp for pp in rep.problems}
                for p in problems:
                    a, ok = checked[p.id]
                    keep = set(by[p.id].kept_indices)
                    acc.append(majority_credit([x for i, x in enumerate(a) if i in keep],
                                               [x for i, x in enumerate(ok) if i in keep]))
                    tok.append(by[p.id].tokens)
            acc_a = np.asarray(acc, dtype=np.float64)
            am, alo, ahi = ci(acc_a)
            tm = float(np.mean(tok))
            ok_ = am >= target
            if ok_ and (best is None or tm < best[0]):
                best = (tm, f"{spec} at m={m}")
            label = f"SC@{m}" if spec == "sc" else f"`{spec}`"
            print(f"| {label} | {m} | {am:.3f} [{alo:.3f}, {ahi:.3f}] | {tm:,.1f} | "
                  f"{tm / sc_tokens.mean():.3f} | {'yes' if ok_ else 'no'} |")
    if best is not None:
        print()
        print(f"Fewest tokens reaching the target: {best[1]}, {best[0]:,.1f} tokens/problem = "
              f"{best[0] / sc_tokens.mean():.3f} of SC@{args.n} "
              f"({1 - best[0] / sc_tokens.mean():.1%} fewer)")


if __name__ == "__main__":
    main()
