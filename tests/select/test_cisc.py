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
