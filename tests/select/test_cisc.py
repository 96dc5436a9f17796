"""CISC (Taubenfeld et al., 2025): softmax weights by hand, the temperature's two limits, and
``curve --methods cisc,cisc_score`` at the full budget against the library's vote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import ConfigError
from ttscale.select.cisc import cisc_vote, cisc_weights, sequence_confidence
from ttscale.store import import_jsonl


def test_weights_are_the_softmax_over_the_traces() -> None:
    w = cisc_weights([0.9, 0.5, 0.1], 0.5)
    e = [math.exp(1.8), math.exp(1.0), math.exp(0.2)]
    assert w == pytest.approx([x / sum(e) for x in e], rel=1e-12)
    assert cisc_weights([1000.0, 999.0], 1.0).sum() == pytest.approx(1.0)  # no overflow
    with pytest.raises(ConfigError, match="temperature"):
        cisc_weights([0.1], 0.0)


def test_temperature_moves_between_best_of_n_and_majority() -> None:
    answers, conf = ["a", "b", "b"], [0.9, 0.5, 0.4]
    # T = 0.05: weights ~ e^18, e^10, e^8 -> a; T = 1: e^0.9 = 2.46 < e^0.5 + e^0.4 = 3.14 -> b
    assert cisc_vote(answers, conf, temperature=0.05).answer == "a"
    assert cisc_vote(answers, conf, temperature=1.0).answer == "b"
    r = cisc_vote(answers, conf, temperature=1.0)
    assert r.confidence[r.index] == pytest.approx((math.exp(0.5) + math.exp(0.4)) / (math.exp(0.9) + math.exp(0.5) + math.exp(0.4)))
    assert sequence_confidence([-0.1])[0] == pytest.approx(math.exp(-0.1))


def test_curve_cisc_matches_the_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rows = []
    for p in range(12):
        for i in range(5):
            a = str(int(rng.integers(0, 3)))
            rows.append({"problem_id": f"p{p}", "index": i, "answer": a, "correct": a == "1",
                         "mean_logprob": float(-rng.exponential(0.5)), "num_tokens": 10,
                         "scores": {"judge": float(rng.uniform())}})  # fmt: skip
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    import_jsonl(f, tmp_path / "run")
    runner = CliRunner()
    for temp in (0.05, 1.0):
        r = runner.invoke(app, ["curve", str(tmp_path / "run"), "--methods", "cisc,cisc_score", "--score", "judge",
                                "--k", "5", "--json", "--n-boot", "10", "--cisc-temperature", str(temp)])  # fmt: skip
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)["methods"]
        for method, key in (("cisc", "mean_logprob"), ("cisc_score", "scores")):
            acc = []
            for p in range(12):
                mine = [x for x in rows if x["problem_id"] == f"p{p}"]
                conf = [math.exp(x[key]) if key == "mean_logprob" else x["scores"]["judge"] for x in mine]
                res = cisc_vote([x["answer"] for x in mine], conf, temperature=temp)
                # tie "expected": the chance a uniform tie-break picks the right answer
                acc.append(sum(s for t, s in zip(res.tied, res.tie_shares, strict=True) if res.answers[t] == "1"))
            assert d[method]["mean"][0] == pytest.approx(np.mean(acc)), (method, temp)


@pytest.mark.slow
def test_cisc_with_p_true_from_the_yes_no_judge_on_the_bundled_model(tmp_path: Path) -> None:
    """P(True): the bundled model judges its own traces through the yes/no judge; CISC reads the
    judge's P(yes) as each trace's confidence (cisc_score --score NAME)."""
    from ttscale.engines.hf import HFEngine
    from ttscale.evals import default_model_path
    from ttscale.store import SampleStore
    from ttscale.verifiers.judge import JudgeVerifier
    from ttscale.verifiers.runner import verify_store

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "6", "--n", "4",
                            "--seed", "3", "--no-progress", "--out", str(run)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["verify", str(run), "--verifier", "arith"]).exit_code == 0
    # the arith model never ranks "Y"/"N" in its top 20: all 380 tokens, so P(yes) is exact
    engine = HFEngine(default_model_path(), device="cpu", threads=1)
    judge = JudgeVerifier(engine, yes_token="Y", no_token="N", top_logprobs=380, name="ptrue")
    verify_store(run, judge, name="ptrue")
    pool = SampleStore.open(run).pool("arith")
    p_true = pool.scores["ptrue"]
    assert np.isfinite(p_true).all() and ((p_true > 0) & (p_true < 1)).all()
    r = runner.invoke(app, ["curve", str(run), "--methods", "cisc_score", "--score", "ptrue", "--verifier", "arith",
                            "--k", "4", "--json", "--n-boot", "10", "--cisc-temperature", "0.1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["methods"]["cisc_score"]["mean"][0]
    acc = []
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        ans = [None if a < 0 else int(a) for a in pool.answer[lo:hi]]
        res = cisc_vote(ans, p_true[lo:hi], temperature=0.1)
        right = {int(a): float(c) for a, c in zip(pool.answer[lo:hi], pool.correct[lo:hi], strict=True) if a >= 0}
        acc.append(sum(s for t, s in zip(res.tied, res.tie_shares, strict=True) if right[res.answers[t]] == 1.0))
    assert got == pytest.approx(np.mean(acc))
