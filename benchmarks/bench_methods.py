"""Issue 19's methods beside majority vote, DeepConf and the adaptive rules, at equal tokens.

A fixed pool (``--n`` samples per problem, top-20 log-probs, verified) is either sampled here --
the bundled arith model on ``arith`` (``--problems`` problems, seed 0, the hf engine) -- or read
from a stored run made by ``ttscale sample`` + ``ttscale verify`` (``--run RUN``, e.g.
SmolLM2-135M-Instruct on GSM8K; see RESULTS.md for the commands). On it:

* selection at ``k = n`` (all traces, the same tokens): majority, DeepConf (offline vote),
  self-certainty best-of-N and Borda (top-20 approximation), CISC (response probability, T=1);
* stopping/short rules replayed in index order: short-1@n, short-3@n (tokens by the paper's
  lockstep model), adaptive ``beta:0.95`` and ``esc:window=4``;
* live rows (each a new ``ttscale sample`` run on the pool's model, problems, n, seed and
  sampling settings, verified with the pool's verifier): keep-top-fraction pruning
  (``--prune selfeval-top:...``, repeatable) and s1 budget forcing (``--budget-forcing ...``,
  repeatable; plain prompts only, so only on pools sampled without chat). Accuracy is majority
  (ties first-seen) over the traces the run keeps; tokens are the generated tokens the library
  accounts (pruned traces up to their cut; budget forcing's thinking + answer). Self-evaluation
  is a scoring pass, not generation: the library does not count it, so its prefill is printed
  beside the table (an estimate: prompt + checkpoint + the evaluation prompt's tokens, for the
  two scored continuations per trace, without chat-template tokens);
* for every row, majority@k of the fixed pool at the ``k`` whose tokens (``k`` x the mean
  tokens of a sample) are closest to the row's tokens: the comparison at equal tokens.

Accuracy and tokens per problem get 95% percentile-bootstrap CIs over problems.

    OMP_NUM_THREADS=1 python benchmarks/bench_methods.py --problems 200 --n 16 \\
        --prune selfeval-top:checkpoint=12,keep=0.5,yes=Y,no=N \\
        --budget-forcing 'think_end=\\n####,max=12,answer_prefix= ,answer_tokens=8'
    OMP_NUM_THREADS=1 python benchmarks/bench_methods.py --run runs/smollm2-arith

(the arith model's tokenizer is character-level: " Yes" and " No" share a first token, so the
self-evaluation answers are Y/N; RESULTS.md has the commands that made the SmolLM2 pool.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CI = tuple[float, float, float]


def _ci(a: Any, seed: int = 0) -> CI:
    from ttscale.metrics.stats import bootstrap_ci

    c = bootstrap_ci(np.asarray(a, dtype=np.float64), n_boot=1000, seed=seed)
    return float(c.mean), float(c.low), float(c.high)


def _slug(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def _exe() -> str:
    return str(Path(sys.executable).parent / "ttscale")


def _majority_first(pool: Any) -> np.ndarray:
    """Per problem: 1 if the majority answer (ties to the first seen, by index) over the pool's
    traces is correct, else 0 (no answered trace: 0)."""
    from ttscale.select.aggregate import majority_vote_labels

    out = np.zeros(pool.num_problems, dtype=np.float64)
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        lab = pool.answer[lo:hi]
        if hi == lo or not (lab >= 0).any():
            continue
        r = majority_vote_labels(lab, tie="first")
        ok = pool.correct[lo:hi][lab == int(r.index)]  # type: ignore[arg-type]
        out[p] = float(np.nan_to_num(np.nanmax(ok)) if ok.size else 0.0)
    return out


def _live_args(store: Any) -> list[str]:
    """``ttscale sample`` options that remake the stored pool's draws (model, problems, n, seed,
    sampling settings)."""
    m = store.manifest
    s = m["sampling"]
    args = ["--engine", "hf", "--model", str(m["model"]), "--benchmark", str(m["benchmark"]),
            "--n", str(s["n"]), "--seed", str(s["seed"]), "--temperature", str(s["temperature"]),
            "--top-p", str(s["top_p"]), "--top-k", str(s["top_k"]), "--max-tokens", str(s["max_tokens"]),
            "--logprobs", str(s["logprobs"]), "--no-progress"]  # fmt: skip
    if m.get("limit"):
        args += ["--limit", str(m["limit"])]
    if m.get("split"):
        args += ["--split", str(m["split"])]
    for st in s.get("stop") or ():
        args += ["--stop", st]
    return args


def _live_run(
    store: Any, out: Path, extra: list[str], verifier: str, resumable: bool
) -> tuple[Any, float]:
    """A live ``ttscale sample`` run into ``out`` (reused once verified; a pruning run resumes,
    a budget-forcing run, which cannot, starts again), verified with ``verifier``."""
    t0 = time.perf_counter()
    done = out / "bench-done.json"
    cmd = [_exe(), "sample", *_live_args(store), *extra, "--out", str(out)]
    if not (done.is_file() and json.loads(done.read_text()) == cmd):
        if (out / "manifest.json").is_file():
            if resumable:
                cmd_run = [*cmd, "--resume"]
            else:
                shutil.rmtree(out)
                cmd_run = cmd
        else:
            cmd_run = cmd
        subprocess.run(cmd_run, check=True)
        subprocess.run([_exe(), "verify", str(out), "--verifier", verifier], check=True)
        done.write_text(json.dumps(cmd))
    from ttscale.store import SampleStore

    return SampleStore.open(out), time.perf_counter() - t0


def _per_problem(
    pids: list[str], records: list[dict[str, Any]], key: str, field: str | list[str]
) -> np.ndarray:
    fields = [field] if isinstance(field, str) else field
    pos = {p: i for i, p in enumerate(pids)}
    out = np.zeros(len(pids), dtype=np.float64)
    for r in records:
        out[pos[r[key]]] += sum(float(r[f]) for f in fields)
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _selfeval_prompt_tokens(
    model: str, chat: bool, problems: list[Any], eval_prompt: str
) -> dict[str, int]:
    """Per problem: the tokens of a self-evaluation request without its partial trace (the
    prompt, or its chat template with an empty assistant turn and the evaluation question)."""
    from transformers import AutoTokenizer

    p = Path(model)
    tok = (AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name) if p.suffix == ".gguf"
           else AutoTokenizer.from_pretrained(model))  # fmt: skip
    out = {}
    for q in problems:
        if chat:
            msgs = [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": eval_prompt.strip()}]  # fmt: skip
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = q.prompt + eval_prompt
        out[q.id] = len(tok(text, add_special_tokens=False)["input_ids"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument(
        "--out", type=Path, default=None, help="where the bundled-model pool goes (reused)"
    )
    ap.add_argument(
        "--run", type=Path, default=None, help="a stored, verified run to use as the pool"
    )
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size for self-certainty (default: the model's config.json)",
    )
    ap.add_argument(
        "--prune", action="append", default=[], help="live selfeval-top (or any --prune) rule"
    )
    ap.add_argument(
        "--budget-forcing", action="append", default=[], help="live budget-forcing spec"
    )
    ap.add_argument(
        "--live-dir", type=Path, default=None, help="where live runs go (reused: resumable)"
    )
    args = ap.parse_args()
    from ttscale.analysis import compute_curves, run_confidences
    from ttscale.replay import replay
    from ttscale.samplers.pruning import SelfEvalTop, parse_prune_rule
    from ttscale.select.certainty import run_certainties
    from ttscale.select.shortmk import replay_short
    from ttscale.store import SampleStore

    t0 = time.perf_counter()
    if args.run is not None:
        run = args.run
        if not (run / "manifest.json").is_file():
            sys.exit(f"error: {run} is not a run directory (make one with ttscale sample + verify)")
    else:
        run = args.out or Path(tempfile.mkdtemp(prefix="bench-methods-")) / "run"
        if not (run / "manifest.json").is_file():
            subprocess.run([_exe(), "sample", "--engine", "hf", "--benchmark", "arith", "--limit", str(args.problems),
                            "--n", str(args.n), "--logprobs", "20", "--seed", "0", "--no-progress", "--out", str(run)],
                           check=True)  # fmt: skip
            subprocess.run([_exe(), "verify", str(run), "--verifier", "arith"], check=True)
    sample_s = time.perf_counter() - t0
    store = SampleStore.open(run)
    man = store.manifest
    pool = store.pool()
    verifier = str(pool.meta["verdicts"]["name"])
    n = int(man["sampling"]["n"])
    P = pool.num_problems
    counts = np.diff(pool.offsets)
    if not (counts == n).all():
        sys.exit(
            f"error: {run} is not a fixed-n pool: problems have {counts.min()}..{counts.max()} samples, n={n}"
        )
    pids = [str(x) for x in pool.problem_ids]
    tok = pool.num_tokens.astype(np.float64)
    per_sample = float(tok.mean())
    full_tokens = np.array([tok[pool.offsets[p] : pool.offsets[p + 1]].sum() for p in range(P)])
    confs = run_confidences(store)
    certs, vocab = run_certainties(store, args.vocab_size)
    ks = list(range(1, n + 1))
    maj = compute_curves(pool, ["majority"], ks, tie="first", n_boot=1000).curves["majority"]
    cov = compute_curves(pool, ["coverage"], [n], n_boot=1000).curves["coverage"]
    sel = compute_curves(
        pool, ["majority", "deepconf", "self_certainty", "self_certainty_borda", "cisc"], [n],
        confidences=confs, certainties=certs, tie="first", n_boot=1000,
    )  # fmt: skip
    rows: list[tuple[str, CI, CI]] = []
    ft = _ci(full_tokens)
    for m, label in (("majority", f"majority@{n}"), ("deepconf", f"DeepConf@{n} (offline vote, eta=10)"),
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
        rows.append(
            (
                f"adaptive {rule} (index order)",
                (a["mean"], a["low"], a["high"]),
                (t["mean"], t["low"], t["high"]),
            )
        )

    live_dir = args.live_dir or run.parent / f"{run.name}-live"
    notes: list[str] = []
    for i, spec in enumerate(args.prune):
        rule = parse_prune_rule(spec)
        out = live_dir / f"prune-{i}-{_slug(spec)}"
        lstore, wall = _live_run(
            store,
            out,
            ["--prune", spec, "--chat" if man.get("chat") else "--no-chat"],
            verifier,
            True,
        )
        lpool = lstore.pool(verifier)
        if [str(x) for x in lpool.problem_ids] != pids:
            sys.exit(f"error: live run {out} has other problems than {run}")
        recs = _jsonl(out / "pruning.jsonl")
        toks = _per_problem(pids, recs, "problem_id", "tokens")
        pruned = sum(1 for r in recs if r.get("pruned_at") is not None)
        rows.append(
            (
                f"live `{spec}` ({pruned} of {len(recs)} traces pruned)",
                _ci(_majority_first(lpool)),
                _ci(toks),
            )
        )
        if isinstance(rule, SelfEvalTop):
            base = _selfeval_prompt_tokens(
                str(man["model"]), bool(man.get("chat")), store.problems(), rule.prompt
            )
            scored = [r for r in recs if int(r["tokens"]) >= rule.checkpoint]
            pre = sum(2 * (base[str(r["problem_id"])] + rule.checkpoint) for r in scored)
            notes.append(f"`{spec}`: {len(scored)} traces scored at token {rule.checkpoint}; self-evaluation "
                         f"prefill ~{pre / P:,.0f} tokens/problem (the library scores 2 continuations of "
                         f"prompt + partial trace + evaluation question per trace; not in the generated-token "
                         f"count); run {out}, sampled + verified in {wall:.0f} s")  # fmt: skip
    for i, spec in enumerate(args.budget_forcing):
        if man.get("chat"):
            notes.append(
                f"budget forcing `{spec}` skipped: it runs on plain prompts and this pool used chat"
            )
            continue
        out = live_dir / f"budget-{i}-{_slug(spec)}"
        lstore, wall = _live_run(store, out, ["--budget-forcing", spec], verifier, False)
        lpool = lstore.pool(verifier)
        recs = _jsonl(out / "budget_forcing.jsonl")
        toks = _per_problem(pids, recs, "problem_id", ["thinking_tokens", "answer_tokens"])
        waits = sum(1 for r in recs if r["waits"]) / len(recs)
        forced = sum(1 for r in recs if r["forced_end"]) / len(recs)
        rows.append((f"live budget forcing `{spec}` (cue on {waits:.0%}, end forced on {forced:.0%} of traces)",
                     _ci(_majority_first(lpool)), _ci(toks)))  # fmt: skip
        notes.append(f"budget forcing `{spec}`: run {out}, sampled + verified in {wall:.0f} s")

    s = man["sampling"]
    eng = man.get("engine") or {}
    print(f"{man['model']} on {man['benchmark']} ({eng.get('engine', '?')}, {eng.get('device', '?')}), "
          f"{P} problems x n={n}, chat {bool(man.get('chat'))}, T={s['temperature']}, top-p {s['top_p']}, "
          f"max_tokens {s['max_tokens']}, top-{s['logprobs']} log-probs, seed {s['seed']}; verifier {verifier}; "
          f"{per_sample:.1f} tokens per sample; coverage@{n} (pass@{n}) {cov.mean[0]:.3f} "
          f"[{cov.low[0]:.3f}, {cov.high[0]:.3f}]; self-certainty vocabulary {vocab}; "
          f"pool ready in {sample_s:.0f} s; {platform.node()} ({platform.processor() or platform.machine()}), "
          f"run {run}")  # fmt: skip
    print()
    print(
        "| method | accuracy [95% CI] | tokens/problem [95% CI] | majority@k at equal tokens (k) |"
    )
    print("|---|---|---|---|")
    for label, a, t in rows:
        k = int(np.clip(round(t[0] / per_sample), 1, n)) if math.isfinite(t[0]) else n
        print(
            f"| {label} | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {t[0]:.0f} [{t[1]:.0f}, {t[2]:.0f}] "
            f"| {maj.mean[k - 1]:.3f} [{maj.low[k - 1]:.3f}, {maj.high[k - 1]:.3f}] (k={k}) |"
        )
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
