"""RPC@k at scale: selection_at_k/compute_curves/`ttscale curve` with the fast and reference fits,
and exact values at k = 1 for every rule (issues 7 and 8)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.analysis import compute_curves
from ttscale.cli.app import app
from ttscale.errors import ConfigError
from ttscale.metrics import selection_at_k
from ttscale.select.aggregate import AggregateResult, majority_vote_labels, rpc
from ttscale.store.pool import Pool

runner = CliRunner()


def _small_pool(seed: int, n: int = 7) -> tuple[list[list[str | None]], np.ndarray, np.ndarray, np.ndarray]:
    """Answers (with a gap), correctness, mean log-probs and text ids with exact duplicates."""
    rng = np.random.default_rng(seed)
    answers: list[list[str | None]] = []
    corr, lps, tids = [], [], []
    for _ in range(3):
        a: list[str | None] = [str(v) for v in rng.integers(0, 3, n)]
        a[int(rng.integers(n))] = None
        lp = -np.exp(np.log(0.4) + 0.5 * rng.standard_normal(n))
        tid = np.arange(n)
        # two identical completions (same text, answer and log-prob): PC/RPC count them once
        j = int(rng.integers(1, n))
        a[j], lp[j], tid[j] = a[0], lp[0], tid[0]
        answers.append(a)
        corr.append([x == "0" for x in a])
        lps.append(lp)
        tids.append(tid)
    return answers, np.array(corr, dtype=float), np.array(lps), np.array(tids)


@pytest.mark.parametrize("fit", ["fast", "reference"])
def test_rpc_at_k_equals_brute_force_over_all_subsets(fit: str) -> None:
    # Independent check: enumerate every subset, run the answer-level aggregator
    # ttscale.select.aggregate.rpc (one fit per subset) and credit the tied winners' share.
    answers, corr, lps, tids = _small_pool(0)
    codes = np.array([[-1 if x is None else int(x) for x in a] for a in answers])
    ks = [1, 2, 3, 5, 7]
    res = selection_at_k(codes, corr, ks, method="rpc", scores=lps, text_ids=tids,
                         strategy="enumerate", rpc_fit=fit)  # type: ignore[arg-type]
    assert res.rpc_fit == fit
    for p, a in enumerate(answers):
        for j, k in enumerate(ks):
            credits = []
            for sub in itertools.combinations(range(len(a)), k):
                s = list(sub)
                r = rpc([a[i] for i in s], lps[p, s], texts=[str(tids[p, i]) for i in s], fit=fit)  # type: ignore[arg-type]
                if r.tied.size == 0:
                    credits.append(0.0)
                    continue
                lab = np.asarray(r.labels)
                cc = [corr[p, s[int(np.flatnonzero(lab == c).max())]] for c in r.tied.tolist()]
                credits.append(float(np.dot(r.tie_shares, cc)))
            assert res.per_problem[p, j] == pytest.approx(np.mean(credits), abs=1e-12), (p, k)


def test_every_rule_is_exact_at_k_equal_1() -> None:
    # At k = 1 each rule selects the single sample (none when it has no answer), so
    # selection@1 = mean over samples of correct·answered, whatever max_subsets/n_draws say.
    rng = np.random.default_rng(3)
    P, n = 4, 64
    codes = rng.integers(-1, 4, (P, n))
    corr = (codes == 0).astype(float)
    lps = -rng.exponential(0.5, (P, n))
    want = np.where(codes >= 0, corr, 0.0).mean(axis=1)

    def selector(p: int, sub: np.ndarray) -> AggregateResult:
        return majority_vote_labels(codes[p, sub])

    cases = [("majority", None), ("weighted", np.exp(lps)), ("best_of_n", lps), ("max_probability", lps), ("pc", lps),
             ("rpc", lps), (selector, None)]
    for method, sc in cases:
        r = selection_at_k(codes, corr, [1, 2], method=method, scores=sc,  # type: ignore[arg-type]
                           max_subsets=5, n_draws=5, seed=1)
        np.testing.assert_allclose(r.per_problem[:, 0], want, atol=1e-12, err_msg=str(method))
        assert r.estimator[0] in ("closed-form", "exact") and r.mc_stderr[0] == 0.0, method
        if method not in ("majority", "best_of_n", "max_probability"):
            assert r.estimator[1] == "mc"  # no closed form: k = 2 is sampled (C(64, 2) > 5)


def _rpc_pool(seed: int = 0, problems: int = 12, n: int = 16) -> Pool:
    rng = np.random.default_rng(seed)
    ans, corr, lp = [], [], []
    for _ in range(problems):
        q = rng.uniform(0.2, 0.7)
        ok = rng.random(n) < q
        ans += ["42" if o else str(rng.integers(3)) for o in ok]
        corr += ok.tolist()
        lp += (-np.exp(np.where(ok, np.log(0.3), np.log(0.5)) + 0.5 * rng.standard_normal(n))).tolist()
    return Pool.from_arrays([f"p{i}" for i in range(problems)], [n] * problems,
                            answer=ans, correct=corr, mean_logprob=lp)


def test_compute_curves_uses_the_fast_fit_by_default_and_says_so() -> None:
    pool = _rpc_pool()
    fast = compute_curves(pool, ["majority", "rpc"], [1, 4, 16], n_boot=20, rpc_draws=10)
    ref = compute_curves(pool, ["rpc"], [1, 4, 16], n_boot=20, rpc_draws=10, rpc_fit="reference")
    assert fast.meta["rpc_fit"] == "fast" and ref.meta["rpc_fit"] == "reference"
    assert fast.to_dict()["meta"]["rpc_fit"] == "fast"
    assert "rpc_fit" not in compute_curves(pool, ["majority"], [1, 4], n_boot=20).meta
    for rep in (fast, ref):
        assert rep.curves["rpc"].estimator[0] == "exact"  # k = 1
        assert rep.curves["rpc"].estimator[2] == "exact"  # k = n: one subset
    # same subsets, only the fit differs: at k = 1 and k = n both fits agree here
    np.testing.assert_allclose(fast.curves["rpc"].per_problem[:, [0, 2]],
                               ref.curves["rpc"].per_problem[:, [0, 2]])
    with pytest.raises(ConfigError, match="rpc fit"):
        compute_curves(pool, ["rpc"], [1], rpc_fit="quick")


def test_cli_curve_rpc_fit_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(2)
    rows = []
    for p in range(6):
        for _ in range(8):
            ok = bool(rng.random() < 0.5)
            rows.append({"problem_id": f"p{p}", "answer": "42" if ok else str(rng.integers(3)),
                         "correct": ok, "mean_logprob": -float(rng.exponential(0.5)) - 1e-3})
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    run = str(tmp_path / "run")
    r = runner.invoke(app, ["curve", run, "--methods", "rpc", "--k", "1,4,8", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    assert "RPC Weibull fit: fast" in r.output
    r = runner.invoke(app, ["curve", run, "--methods", "rpc", "--k", "1,4,8", "--n-boot", "20",
                            "--rpc-fit", "reference", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["meta"]["rpc_fit"] == "reference"
    r = runner.invoke(app, ["curve", run, "--methods", "rpc", "--rpc-fit", "quick"])
    assert r.exit_code == 1 and r.output.startswith("error: rpc fit must be one of reference, fast")


def test_rpc_at_k_is_the_same_in_small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # subsets are drawn in blocks and evaluated in bounded batches: block and batch sizes must
    # not change a value (same random subsets, same fits)
    import ttscale.metrics.at_k as metrics

    rng = np.random.default_rng(4)
    codes = rng.integers(-1, 3, (5, 12))
    corr = (codes == 0).astype(float)
    lps = -rng.exponential(0.5, (5, 12))
    kw = dict(method="rpc", scores=lps, n_draws=30, max_subsets=30, seed=2)
    big = selection_at_k(codes, corr, [2, 5, 11, 12], **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(metrics, "_RPC_BATCH", 40)
    monkeypatch.setattr(metrics, "_CHUNK", 30)
    small = selection_at_k(codes, corr, [2, 5, 11, 12], **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(small.per_problem, big.per_problem, rtol=0, atol=1e-15)
    np.testing.assert_allclose(small.mc_stderr, big.mc_stderr, rtol=1e-12)
    assert small.estimator == big.estimator == ("mc", "mc", "exact", "exact")  # C(12, 11) = 12 <= 30


def test_rpc_at_k_without_any_answer_is_zero() -> None:
    codes = np.full((2, 6), -1)
    res = selection_at_k(codes, np.zeros((2, 6)), [1, 3, 6], method="rpc", scores=-np.ones((2, 6)),
                         n_draws=5, max_subsets=5, seed=1)
    np.testing.assert_array_equal(res.per_problem, 0.0)
