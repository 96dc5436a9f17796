"""``ttscale curve --methods self_certainty,self_certainty_borda`` on a run of the bundled model:
the CLI's curves at the full budget are the library's choices on the stored top log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.select.certainty import borda_weights, run_certainties, self_certainty_topk
from ttscale.store import SampleStore

runner = CliRunner()


@pytest.mark.slow
def test_curve_self_certainty_matches_the_library(tmp_path: Path) -> None:
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    run = tmp_path / "run"
    r = runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "6", "--n", "6",
                            "--logprobs", "20", "--seed", "2", "--no-progress", "--out", str(run)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["verify", str(run), "--verifier", "arith"]).exit_code == 0
    r = runner.invoke(app, ["curve", str(run), "--methods", "majority,self_certainty,self_certainty_borda",
                            "--k", "6", "--json", "--n-boot", "10"])  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)["methods"]
    store = SampleStore.open(run)
    pool = store.pool()
    cert, vocab = run_certainties(store)
    assert vocab == 380
    tops = store.table(["top_logprobs"]).column("top_logprobs").to_pylist()
    assert cert[0] == pytest.approx(self_certainty_topk([dict(p) for p in tops[0]], 380))
    best, borda = [], []
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        a, c, s = pool.answer[lo:hi], pool.correct[lo:hi], cert[lo:hi]
        ok = a >= 0
        # best-of-N: the most certain answered trace (ties share the credit: tie "expected")
        top = np.flatnonzero(ok & (s == s[ok].max())) if ok.any() else []
        best.append(float(np.mean(c[top])) if len(top) else 0.0)
        w = borda_weights(s)
        votes: dict[int, float] = {}
        for code, wt in zip(a, w, strict=True):
            if code >= 0:
                votes[int(code)] = votes.get(int(code), 0.0) + float(wt)
        if votes:
            m = max(votes.values())
            tied = [k for k, v in votes.items() if np.isclose(v, m, rtol=1e-9)]
            borda.append(float(np.mean([c[a == k][0] for k in tied])))
        else:
            borda.append(0.0)
    assert d["self_certainty"]["mean"][0] == pytest.approx(np.mean(best))
    assert d["self_certainty_borda"]["mean"][0] == pytest.approx(np.mean(borda))
    # a run without top log-probs: one line naming the methods and the fix
    plain = tmp_path / "plain"
    runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "2", "--n", "2",
                        "--seed", "2", "--no-progress", "--out", str(plain)])  # fmt: skip
    runner.invoke(app, ["verify", str(plain), "--verifier", "arith"])
    r = runner.invoke(app, ["curve", str(plain), "--methods", "self_certainty"])
    assert r.exit_code == 1 and "self_certainty needs per-token top log-probs" in r.output
