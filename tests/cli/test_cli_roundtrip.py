"""CLI: runs made by the scripted engine, analysed after damage-free edits and a JSONL round trip.

Problems without samples stay in the denominator; export -> import keeps verdicts, top
log-probs (so DeepConf still works), sampling metadata and the problems.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.evals import load_problems
from ttscale.metrics import pass_at_k
from ttscale.store import SampleStore
from ttscale.types import Sample

runner = CliRunner()

SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]


def _sample(out: Path, *extra: str) -> None:
    r = runner.invoke(app, ["sample", *SCRIPTED, "--max-tokens", "24", "--seed", "1",
                            "--out", str(out), *extra])  # fmt: skip
    assert r.exit_code == 0, r.output


def test_curve_counts_problems_without_samples(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _sample(out, "--n", "4", "--limit", "6")
    store = SampleStore.open(out)
    probs = load_problems("arith", limit=8)
    # the run's problems file lists 8 problems: one gets 2 of its 4 samples, one none at all
    store.write_problems(probs)
    short = probs[6]
    gold = str(short.reference) if not isinstance(short.reference, dict) else short.reference["answer"]
    store.append([Sample(short.id, 0, f"#### {gold}"), Sample(short.id, 1, "#### -1")])
    r = runner.invoke(app, ["verify", str(out), "--json"])
    assert r.exit_code == 0, r.output
    v = {(x.problem_id, x.index): bool(x.correct) for x in store.verdicts("arith")}
    assert v[(short.id, 0)] is True and v[(short.id, 1)] is False

    # reference: pass@k per problem from the verdicts, by the unbiased estimator
    full = [p.id for p in probs[:6]]
    c_full = np.array([sum(v[(pid, i)] for i in range(4)) for pid in full])
    ks = np.array([1, 2, 4])
    per_full = np.array([[pass_at_k(4, c, k) for k in ks] for c in c_full])
    per_short = np.array([pass_at_k(2, 1, 1), pass_at_k(2, 1, 2), 0.0])  # unsolved at k=4
    want_count = (per_full.sum(0) + per_short) / 8  # the unsampled problem adds 0
    want_drop = per_full.mean(0)

    r = runner.invoke(app, ["curve", str(out), "--k", "1,2,4", "--json", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["problems"] == 8
    assert d["missing_samples"] == {
        "requested": 4, "requested_known": True, "problems": 8, "short": 1, "unsampled": 1,
        "policy": "count",
    }
    np.testing.assert_allclose(d["methods"]["coverage"]["mean"], want_count)

    r = runner.invoke(app, ["curve", str(out), "--k", "1,2,4", "--json", "--n-boot", "20",
                            "--missing", "drop"])  # fmt: skip
    d = json.loads(r.output)
    assert d["problems"] == 6 and d["missing_samples"]["dropped"] == 2
    np.testing.assert_allclose(d["methods"]["coverage"]["mean"], want_drop)

    # the table says it, in one line
    r = runner.invoke(app, ["curve", str(out), "--k", "1,2"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "8 problems" in r.output
    assert ("2 of 8 problems have fewer samples than the 4 requested (1 have none): counted as "
            "unsolved") in r.output
    r = runner.invoke(app, ["curve", str(out), "--missing", "nope"])
    assert r.exit_code == 1 and "--missing must be one of" in r.output

    # fit: the unsampled problem enters with coverage 0 at every k
    r = runner.invoke(app, ["fit", str(out), "--k", "1,2", "--json", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["missing_samples"]["unsampled"] == 1
    r = runner.invoke(app, ["fit", str(out), "--k", "1,2", "--n-boot", "20"], env={"COLUMNS": "300"})
    assert "1 of 8 problems have no samples: fitted as unsolved" in r.output
    assert "verdicts: arith = arith" in r.output


def test_export_import_round_trip_keeps_verdicts_logprobs_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _sample(out, "--n", "4", "--limit", "5", "--logprobs", "3")
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    dc = ["--methods", "coverage,majority,deepconf", "--k", "1,2,4", "--deepconf-eta", "50",
          "--deepconf-window", "4", "--json", "--n-boot", "20"]  # fmt: skip
    r = runner.invoke(app, ["curve", str(out), *dc])
    assert r.exit_code == 0, r.output
    before = json.loads(r.output)

    f = tmp_path / "e.jsonl"
    r = runner.invoke(app, ["export", str(out), "--out", str(f)])
    assert r.exit_code == 0, r.output
    assert "verdicts: arith = arith" in r.output
    line = json.loads(f.read_text().splitlines()[0])
    assert "top_logprobs" in line and "token_ids" in line
    assert isinstance(line["correct"], bool)  # the verdict's correctness, not the sampled None

    r = runner.invoke(app, ["import", str(f), "--out", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    assert "run metadata from" in r.output
    back = SampleStore.open(tmp_path / "back")
    m, m0 = back.manifest, SampleStore.open(out).manifest
    for key in ("model", "benchmark", "sampling", "engine", "logprob_mode", "seed"):
        assert m[key] == m0[key], key
    assert m["imported_verdicts"]["name"] == "arith"
    assert [p.id for p in back.problems()] == [p.id for p in SampleStore.open(out).problems()]
    a = {s.key: s for s in SampleStore.open(out).samples()}
    for s in back.samples():
        assert s.top_logprobs == a[s.key].top_logprobs and s.token_ids == a[s.key].token_ids

    # curve (deepconf included) gives the same numbers on the imported run
    r = runner.invoke(app, ["curve", str(tmp_path / "back"), *dc])
    assert r.exit_code == 0, r.output
    after = json.loads(r.output)
    for name in ("coverage", "majority", "deepconf"):
        assert after["methods"][name]["mean"] == pytest.approx(before["methods"][name]["mean"])
    # and it can be verified again: the problems came along
    r = runner.invoke(app, ["verify", str(tmp_path / "back"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["accuracy"] == pytest.approx(
        np.mean([bool(x.correct) for x in SampleStore.open(out).verdicts("arith")])
    )
    # --no-verdicts exports the samples as stored (no correctness)
    r = runner.invoke(app, ["export", str(out), "--no-verdicts"])
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert rows and all(x["correct"] is None for x in rows)
