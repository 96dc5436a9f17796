"""The engine loop (issue 16): samplers' tokens/s against RepeatedSampler, and live adaptive wall
time against SC@64.

Part A, per engine (vLLM CPU build, transformers), bundled model, ``arith``: ``--problems`` x
``--n`` samples drawn by each sampler in the same process, on the same problems, with rules
that never stop or prune, so every sampler generates exactly the same tokens (checked);
tokens/s relative to ``RepeatedSampler`` in the same repeat (the order alternates between
repeats), medians over ``--repeats``.

Part S (``--stepwise``): SMC (zero potential, steps at ``\\n``), beam and DVTS tokens/s against
``RepeatedSampler`` in the same repeat, on the same problems (their tokens differ; each is
reported).

Part B (``--live-problems`` > 0, first engine): live adaptive ``beta:0.92`` (``ahead=0`` and,
where the sampler has it, ``ahead=None``) against SC@``--live-n`` (RepeatedSampler) on the same
problems: wall time, samples and tokens, and whether the adaptive answers equal the index-order
replay of the SC run (live = replay), and the token ratio of the samples the rule reads (no
live arm can draw fewer). ``--adaptive-batch 64,128`` adds adaptive arms with that bound on the
samples in the engine at once, ``--sc-batch`` SC arms likewise (checked to draw the same
samples), ``--vllm-max-num-seqs`` sets vLLM's running batch; every arm is also compared with
the fastest SC arm of its repeat.

    OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/bench_engine_loop.py \\
        --engines vllm,hf --problems 32 --n 8 --repeats 3 --live-problems 50 --live-n 64
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, resolve_model


def _engine(kind: str, model: str, args: argparse.Namespace) -> Any:
    from ttscale.engines import make_engine

    opts: dict[str, Any] = {}
    if kind == "vllm":
        # as in bench_sampler_overhead: a KV cache that fits a shared machine, eager float32
        opts.update(
            kv_cache_memory_bytes=args.vllm_kv_mib * 2**20,
            dtype="float32",
            enforce_eager=True,
            enable_chunked_prefill=False,
        )
        if args.vllm_max_num_seqs:
            # vLLM's bound on running sequences (CPU default 256): the engine's own batch
            opts["max_num_seqs"] = args.vllm_max_num_seqs
        if args.vllm_block_size:
            # vLLM CPU's default KV block is 128 tokens: a step-wise sampler's prefix (prompt +
            # steps so far) shorter than a block never hits the prefix cache
            opts["block_size"] = args.vllm_block_size
    return make_engine(kind, model, **opts)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _answers() -> Any:
    from ttscale.samplers.adaptive import verifier_answers
    from ttscale.verifiers import MathVerifier

    return verifier_answers(MathVerifier(extractor="arith"))


def _timed(
    sampler: Any, problems: list[Any], budget: int, seed: int
) -> tuple[float, int, int, list[Any], float]:
    # the CPU time of this process (all its threads) beside wall time: the engine core runs in
    # this process, so on a machine shared with other jobs the CPU seconds a sampler needed
    # are a steadier measure of its work than wall time, which other jobs' load stretches
    t, c = time.perf_counter(), time.process_time()
    results = list(sampler.sample(problems, budget, seed=seed))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    tokens = sum(r.generated_tokens for r in results)
    samples = sum(len(r.candidates) for r in results)
    return wall, tokens, samples, results, cpu


def part_a(kind: str, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ttscale.evals import load_problems
    from ttscale.samplers import AdaptiveSampler, PruningSampler, RepeatedSampler
    from ttscale.types import SamplingParams

    problems = load_problems("arith", limit=args.problems)
    # logprobs for every sampler: the pruning rule reads them, and the work must be the same
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed, logprobs=0)
    answers = _answers()
    make: dict[str, Any] = {
        "repeated": lambda: RepeatedSampler(engine, params, progress=False),
        "adaptive (fixed: never stops)": lambda: AdaptiveSampler(engine, params, "fixed", answers),
    }
    if "ahead" in inspect.signature(AdaptiveSampler).parameters:
        make["adaptive ahead=auto (fixed)"] = lambda: AdaptiveSampler(
            engine, params, "fixed", answers, ahead=None
        )
    make |= {
        "pruning (lowprob:-1e9: never prunes)": lambda: PruningSampler(
            engine, params, "lowprob:threshold=-1000000000,min_tokens=1", progress=False
        ),
    }
    # warm-up (kernels, caches), another seed
    list(RepeatedSampler(engine, params, progress=False).sample(problems[:2], 2, seed=args.seed + 1))
    rows: list[dict[str, Any]] = []
    for r in range(args.repeats):
        names = list(make) if r % 2 == 0 else list(reversed(make))
        got: dict[str, tuple[float, int, float]] = {}
        for name in names:
            wall, tokens, _, _, cpu = _timed(make[name](), problems, args.n, args.seed)
            got[name] = (wall, tokens, cpu)
        base_wall, base_tokens, base_cpu = got["repeated"]
        row: dict[str, Any] = {"repeat": r}
        for name, (wall, tokens, cpu) in got.items():
            if tokens != base_tokens:
                raise SystemExit(f"{name} generated {tokens} tokens, repeated {base_tokens}")
            row[name] = {"wall_s": wall, "tokens": tokens, "tps": tokens / wall,
                         "ratio": (tokens / wall) / (base_tokens / base_wall), "cpu_s": cpu,
                         "cpu_ratio": (tokens / cpu) / (base_tokens / base_cpu)}  # fmt: skip
        rows.append(row)
        print(f"  {kind} repeat {r}: " + ", ".join(
            f"{n.split(' (')[0]} {row[n]['tps']:,.0f} tok/s ({row[n]['ratio']:.2f}; "
            f"cpu {row[n]['cpu_ratio']:.2f})" for n in make
        ), flush=True)  # fmt: skip
    return {
        "engine": kind,
        "problems": len(problems),
        "n": args.n,
        "tokens": rows[0]["repeated"]["tokens"],
        "median_ratio": {n: statistics.median(row[n]["ratio"] for row in rows) for n in make},
        "median_tps": {n: statistics.median(row[n]["tps"] for row in rows) for n in make},
        "median_cpu_ratio": {n: statistics.median(row[n]["cpu_ratio"] for row in rows) for n in make},
        "repeats": rows,
    }


def part_s(kind: str, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Step-wise samplers (SMC with a zero potential, beam, DVTS; steps at ``\\n``) against
    ``RepeatedSampler`` in the same repeat: tokens/s ratios. They do not generate the same
    tokens as repeated sampling (steps are seeded per step, beam/DVTS prune), so each row
    reports its own token count; the ratio is of tokens per second."""
    from ttscale.evals import load_problems
    from ttscale.samplers import RepeatedSampler
    from ttscale.samplers.search import SearchSampler
    from ttscale.samplers.smc import SMCSampler
    from ttscale.types import SamplingParams

    problems = load_problems("arith", limit=args.problems)
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed)

    def zero(problem: Any, texts: Any, finished: Any) -> list[float]:
        return [0.0] * len(texts)

    def search(kind_: str) -> Any:
        return SearchSampler(engine, zero, params, search=kind_, width=args.width,
                             max_tokens=args.max_tokens, max_steps=args.max_steps)  # fmt: skip

    make: dict[str, Any] = {
        "repeated": lambda: RepeatedSampler(engine, params, progress=False),
        "smc (zero potential, steps at \\n)": lambda: SMCSampler(
            engine, zero, params, step_stop=("\n",), tokens_per_step=args.max_tokens,
            max_steps=args.max_steps, progress=False,
        ),
        f"beam (width {args.width})": lambda: search("beam"),
        f"dvts (width {args.width})": lambda: search("dvts"),
    }
    list(RepeatedSampler(engine, params, progress=False).sample(problems[:2], 2, seed=args.seed + 1))
    rows: list[dict[str, Any]] = []
    for r in range(args.repeats):
        names = list(make) if r % 2 == 0 else list(reversed(make))
        got: dict[str, tuple[float, int, float]] = {}
        for name in names:
            wall, tokens, _, _, cpu = _timed(make[name](), problems, args.n, args.seed)
            got[name] = (wall, tokens, cpu)
        base_wall, base_tokens, base_cpu = got["repeated"]
        row: dict[str, Any] = {"repeat": r}
        for name, (wall, tokens, cpu) in got.items():
            row[name] = {"wall_s": wall, "tokens": tokens, "tps": tokens / wall,
                         "ratio": (tokens / wall) / (base_tokens / base_wall), "cpu_s": cpu,
                         "cpu_ratio": (tokens / cpu) / (base_tokens / base_cpu)}  # fmt: skip
        rows.append(row)
        print(f"  {kind} step-wise repeat {r}: " + ", ".join(
            f"{n.split(' (')[0]} {row[n]['tps']:,.0f} tok/s ({row[n]['ratio']:.2f}, "
            f"{row[n]['wall_s']:.1f}s; cpu {row[n]['cpu_ratio']:.2f})" for n in make
        ), flush=True)  # fmt: skip
    return {
        "engine": kind,
        "problems": len(problems),
        "n": args.n,
        "tokens": {n: rows[0][n]["tokens"] for n in make},
        "median_ratio": {n: statistics.median(row[n]["ratio"] for row in rows) for n in make},
        "median_tps": {n: statistics.median(row[n]["tps"] for row in rows) for n in make},
        "median_cpu_ratio": {n: statistics.median(row[n]["cpu_ratio"] for row in rows) for n in make},
        "repeats": rows,
    }


def part_b(kind: str, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Live adaptive (``--rule``) and, with ``--prune``, a pruning rule against SC@``--live-n``
    on the same problems: wall time next to tokens, each as a ratio to its SC arm in the same
    repeat (the pruning rule against SC with the same log-probs, which the rule reads); the arms'
    order alternates between repeats."""
    from ttscale.evals import load_problems
    from ttscale.samplers import AdaptiveSampler, PruningSampler, RepeatedSampler
    from ttscale.samplers.pruning import parse_prune_rule, replay_pruning
    from ttscale.select.adaptive import parse_rule, run_stream
    from ttscale.types import SamplingParams

    problems = load_problems("arith", limit=args.live_problems)
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed, temperature=args.temperature)
    answers = _answers()
    has_ahead = "ahead" in inspect.signature(AdaptiveSampler).parameters
    arms: dict[str, Any] = {}
    base: dict[str, str] = {}  # the SC arm each arm is compared with
    if args.rule or not args.prune:  # plain SC is the adaptive arms' baseline only
        arms["sc"] = lambda: RepeatedSampler(engine, params, progress=False)
        base["sc"] = "sc"
        # SC with another bound on the samples in the engine at once (the scheduler's
        # ``max_sequences``), to find where the engine saturates: the adaptive arms are also
        # compared with the fastest SC arm of their repeat
        for b in _ints(args.sc_batch):
            arms[f"sc b={b}"] = lambda b=b: RepeatedSampler(engine, params, batch_size=b, progress=False)
            base[f"sc b={b}"] = "sc"
    if args.rule:
        if not args.skip_ahead0 or not has_ahead:
            arms["adaptive ahead=0"] = lambda: AdaptiveSampler(
                engine, params, args.rule, answers, **({"ahead": 0} if has_ahead else {})
            )
            base["adaptive ahead=0"] = "sc"
        if has_ahead:
            arms["adaptive ahead=auto"] = lambda: AdaptiveSampler(
                engine, params, args.rule, answers, ahead=None
            )
            base["adaptive ahead=auto"] = "sc"
        for b in _ints(args.adaptive_batch):
            # a smaller running batch: fewer samples drawn beyond a problem's stop
            arms[f"adaptive b={b}"] = lambda b=b: AdaptiveSampler(
                engine, params, args.rule, answers, ahead=None, batch_size=b
            )
            base[f"adaptive b={b}"] = "sc"
        if not args.skip_fifo and "priority" in inspect.signature(AdaptiveSampler).parameters:
            # the spare-room window without priorities (the default before them), same process
            arms["adaptive ahead=auto fifo"] = lambda: AdaptiveSampler(
                engine, params, args.rule, answers, ahead=None, priority=False
            )
            base["adaptive ahead=auto fifo"] = "sc"
    if args.prune:
        rule = parse_prune_rule(args.prune)
        # the pruning rule reads log-probs: its SC arm samples the same way
        lp_params = params.replace(logprobs=20 if rule.needs == "top_logprobs" else 0)
        arms["sc+logprobs"] = lambda: RepeatedSampler(engine, lp_params, progress=False)
        base["sc+logprobs"] = "sc+logprobs"
        intervals = [int(k) for k in args.prune_intervals.split(",")] if args.prune_intervals else [None]
        for k in intervals:
            # one arm per streamed chunk size (PruningSampler's stream_interval; None: its default)
            name = f"prune {args.prune}" + (f" every {k}" if k is not None else "")
            kw = {"stream_interval": k} if k is not None else {}
            arms[name] = lambda kw=kw: PruningSampler(engine, lp_params, args.prune, progress=False, **kw)
            base[name] = "sc+logprobs"
    # warm-up (kernels, caches), another seed
    list(RepeatedSampler(engine, params, progress=False).sample(problems[:2], 2, seed=args.seed + 1))
    rows: list[dict[str, Any]] = []
    full: dict[str, list[Any]] = {}
    pruned_live: dict[str, list[tuple[str, int, int | None]]] = {}
    for r in range(args.live_repeats):
        names = list(arms) if r % 2 == 0 else list(reversed(arms))
        row: dict[str, Any] = {"repeat": r}
        for name in names:
            s = arms[name]()
            wall, tokens, samples, results, cpu = _timed(s, problems, args.live_n, args.seed)
            row[name] = {"wall_s": wall, "tokens": tokens, "samples": samples, "cpu_s": cpu}
            if name.startswith("sc"):
                full[name] = results
            elif name.startswith("adaptive"):
                row[name]["decisions"] = [(d.used, str(d.answer)) for d in s.decisions]
            else:
                # every repeat's cuts must equal the replay: a later repeat overwrites only if equal
                cut = sorted(
                    (res.problem_id, c.index, c.pruned_at)
                    for res in results for c in res.candidates
                )  # fmt: skip
                if pruned_live.setdefault(name, cut) != cut:
                    pruned_live[name] = []  # repeats disagree: never equal to the replay
                row[name]["pruned"] = sum(c.pruned_at is not None for res in results
                                          for c in res.candidates)  # fmt: skip
        # (without the adaptive arms' plain SC: the pruning arms' SC with log-probs)
        sc_arms = [n for n in arms if n == "sc" or n.startswith("sc b=")] or sorted(set(base.values()))
        fastest = min(sc_arms, key=lambda n: row[n]["wall_s"])
        row["fastest_sc"] = fastest
        for name in arms:
            b = row[base[name]]
            row[name]["wall_ratio"] = row[name]["wall_s"] / b["wall_s"]
            row[name]["cpu_ratio"] = row[name]["cpu_s"] / b["cpu_s"]
            row[name]["wall_ratio_fastest_sc"] = row[name]["wall_s"] / row[fastest]["wall_s"]
            row[name]["cpu_ratio_fastest_sc"] = row[name]["cpu_s"] / row[fastest]["cpu_s"]
            row[name]["tokens_per_s"] = row[name]["tokens"] / row[name]["wall_s"]
            row[name]["tokens_per_cpu_s"] = row[name]["tokens"] / row[name]["cpu_s"]
            row[name]["token_ratio"] = row[name]["tokens"] / b["tokens"]
            row[name]["sample_ratio"] = row[name]["samples"] / b["samples"]
        rows.append(row)
        print(f"  {kind} live repeat {r}: " + ", ".join(
            f"{n} {row[n]['wall_s']:.1f}s ({row[n]['wall_ratio']:.2f}x wall, "
            f"{row[n]['cpu_ratio']:.2f}x cpu, {row[n]['token_ratio']:.3f}x tokens)" for n in arms
        ) + f"; fastest SC: {fastest}", flush=True)  # fmt: skip
    agree: dict[str, bool] = {}
    floor = 0.0
    # the bound on samples in flight changes no sample: every SC arm drew the same texts
    texts = {n: [[c.text for c in res.completions] for res in full[n]] for n in full}
    agree |= {n: texts[n] == texts["sc"] for n in texts if n.startswith("sc b=")}
    if args.rule:
        # live = replay: the index-order replay of the SC run decides every problem the same way
        stop = parse_rule(args.rule)
        replayed = []
        needed = 0  # the tokens of the samples the rule reads: no live run can draw fewer
        for res in full["sc"]:
            out = run_stream(stop, answers(res.problem, res.completions))
            replayed.append((out.used, str(out.answer)))
            needed += sum(c.num_tokens for c in res.completions[: out.used])
        floor = needed / rows[0]["sc"]["tokens"]
        agree |= {n: all(row[n]["decisions"] == replayed for row in rows)
                  for n in arms if n.startswith("adaptive")}  # fmt: skip
    if args.prune:
        # live = replay: the pruning rule replayed on the full SC run stops the same traces at
        # the same token
        rep = replay_pruning([c for res in full["sc+logprobs"] for c in res.completions], args.prune)
        replayed_p = sorted((t.problem_id, t.index, t.pruned_at) for p in rep.problems for t in p.traces)
        agree |= {n: replayed_p == cut for n, cut in pruned_live.items()}
    return {
        "engine": kind,
        "rule": args.rule,
        "prune": args.prune,
        "temperature": args.temperature,
        "problems": len(problems),
        "n": args.live_n,
        "baseline": base,
        # the token ratio of the samples the rule reads (the replay's): the live arms' floor
        "rule_token_ratio": floor if args.rule else None,
        "live_equals_replay": agree,
        "median_wall_ratio": {n: statistics.median(row[n]["wall_ratio"] for row in rows) for n in arms},
        "median_cpu_ratio": {n: statistics.median(row[n]["cpu_ratio"] for row in rows) for n in arms},
        "median_token_ratio": {n: statistics.median(row[n]["token_ratio"] for row in rows) for n in arms},
        "median_wall_ratio_fastest_sc": {
            n: statistics.median(row[n]["wall_ratio_fastest_sc"] for row in rows) for n in arms
        },
        "median_tokens_per_s": {n: statistics.median(row[n]["tokens_per_s"] for row in rows) for n in arms},
        "median_wall_s": {n: statistics.median(row[n]["wall_s"] for row in rows) for n in arms},
        "sample_ratio": {n: rows[0][n]["sample_ratio"] for n in arms},
        "repeats": [{k: {kk: vv for kk, vv in v.items() if kk != "decisions"} if isinstance(v, dict) else v
                     for k, v in row.items()} for row in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--model", default=None)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live-problems", type=int, default=50)
    ap.add_argument("--live-n", type=int, default=64)
    ap.add_argument("--live-repeats", type=int, default=1)
    ap.add_argument("--rule", default="beta:0.92", help="adaptive rule of part B ('' for none)")
    ap.add_argument("--prune", default=None,
                    help="part B: also a pruning rule (e.g. lowprob:threshold=-0.3,min_tokens=8) "
                    "against SC with the log-probs it reads")  # fmt: skip
    ap.add_argument("--prune-intervals", default=None,
                    help="part B: comma-separated stream_interval values, one pruning arm each "
                    "(default: one arm at PruningSampler's default)")  # fmt: skip
    ap.add_argument("--skip-ahead0", action="store_true",
                    help="part B: leave out adaptive with ahead=0 (one round in flight)")  # fmt: skip
    ap.add_argument("--adaptive-batch", default="",
                    help="part B: also adaptive arms with these bounds on samples in the engine "
                    "at once (AdaptiveSampler batch_size), e.g. 64,32")  # fmt: skip
    ap.add_argument("--sc-batch", default="",
                    help="part B: also SC arms with these bounds (RepeatedSampler batch_size)")  # fmt: skip
    ap.add_argument("--skip-fifo", action="store_true",
                    help="part B: leave out adaptive without priorities (priority=False)")  # fmt: skip
    ap.add_argument("--vllm-max-num-seqs", type=int, default=None,
                    help="vLLM's max_num_seqs (running sequences; CPU default 256)")  # fmt: skip
    ap.add_argument("--temperature", type=float, default=1.0, help="part B sampling temperature")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--stepwise", action="store_true",
                    help="part S: SMC, beam and DVTS against RepeatedSampler")  # fmt: skip
    ap.add_argument("--width", type=int, default=4, help="beam/DVTS width (part S)")
    ap.add_argument("--max-steps", type=int, default=16, help="steps per solution (part S)")
    ap.add_argument("--vllm-kv-mib", type=int, default=1024)
    ap.add_argument("--vllm-block-size", type=int, default=None,
                    help="vLLM KV block size (CPU: a multiple of 32; default vLLM's, 128 on CPU)")  # fmt: skip
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import ttscale

    tmp = Path(tempfile.mkdtemp(prefix="ttscale-bench-loop-"))
    model = resolve_model(args.model, tmp)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    out: dict[str, Any] = {
        "command": "python benchmarks/bench_engine_loop.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)
        ),
        "ttscale": str(Path(ttscale.__file__).resolve().parent),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}; shared with other jobs",
        "parts": [],
    }
    for i, kind in enumerate(k.strip() for k in args.engines.split(",") if k.strip()):
        engine = _engine(kind, model, args)
        try:
            if not args.skip_a:
                out["parts"].append({"part": "A", **part_a(kind, engine, args)})
            if args.stepwise:
                out["parts"].append({"part": "S", **part_s(kind, engine, args)})
            if i == 0 and args.live_problems > 0:
                out["parts"].append({"part": "B", **part_b(kind, engine, args)})
        finally:
            engine.close()
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
