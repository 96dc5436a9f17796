"""CLI: ``ttscale verify`` adds verdicts to a run, resumably and idempotently."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample

runner = CliRunner()


def _make_run(tmp_path, benchmark="math500"):
    store = SampleStore.create(tmp_path / "run", {"model": "m", "benchmark": benchmark})
    store.write_problems(
        [
            Problem("p1", "What is 1/2?", reference=r"\frac{1}{2}"),
            Problem("p2", "What is 6*7?", reference="Natalia ... so\n#### 42"),
        ]
    )
    texts1 = [r"so \boxed{0.5}", r"\boxed{1/3}", "no answer", r"\boxed{\frac{2}{4}}"]
    texts2 = ["The answer is 42.", r"\boxed{41}", "#### 42"]
    store.append([Sample("p1", i, t) for i, t in enumerate(texts1)])
    store.append([Sample("p2", i, t) for i, t in enumerate(texts2)])
    return store


def test_verify_math_writes_verdicts_and_is_idempotent(tmp_path):
    store = _make_run(tmp_path)
    run = str(store.path)
    r = runner.invoke(app, ["verify", run, "--verifier", "math", "--json", "--batch", "4"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["verifier"] == "math" and s["new"] == 7 and s["skipped"] == 0
    assert s["by_status"] == {"pass": 4, "fail": 2, "invalid": 1}
    assert s["accuracy"] == pytest.approx(4 / 7)
    verdicts = {(v.problem_id, v.index): v for v in store.verdicts("math")}
    assert verdicts[("p1", 0)].answer == "0.5" and verdicts[("p1", 0)].correct is True
    assert verdicts[("p1", 1)].answer == "1/3" and verdicts[("p1", 1)].score == 0.0
    assert verdicts[("p1", 2)].answer is None and verdicts[("p1", 2)].status.value == "invalid"
    assert verdicts[("p1", 3)].answer == "0.5"
    assert [verdicts[("p2", i)].correct for i in range(3)] == [True, False, True]
    # two batches of <= 4 samples (whole problems) -> two shards
    assert len(list((store.path / "verdicts" / "math").glob("part-*.parquet"))) == 2
    assert SampleStore.open(store.path).manifest["verifiers"]["math"]["extractor"] == "auto"
    # the recorded spec is the canonical one (no context needed to rebuild it); the spelling
    # the user gave is kept beside it
    rec = SampleStore.open(store.path).manifest["verifiers"]["math"]
    assert rec["spec"] == "math:auto" and rec["specs"] == ["math"] and rec["fingerprint"]

    # second run: nothing recomputed, nothing written
    r = runner.invoke(app, ["verify", run, "--json"])
    s2 = json.loads(r.output)
    assert s2["new"] == 0 and s2["skipped"] == 7 and s2["verified"] == 7
    assert len(list((store.path / "verdicts" / "math").glob("part-*.parquet"))) == 2

    # the analysis view uses the verdicts' answers (voting keys) and correctness
    pool = store.pool("math")
    assert pool.correct.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    keys = [pool.answer_values[a] if a >= 0 else None for a in pool.answer]
    assert keys == ["0.5", "1/3", None, "0.5", "42", "41", "42"]


def test_verify_resumes_after_new_samples(tmp_path):
    store = _make_run(tmp_path)
    run = str(store.path)
    assert runner.invoke(app, ["verify", run]).exit_code == 0
    store.append([Sample("p1", 4, r"\boxed{0.50}"), Sample("p2", 3, "#### 7")])
    r = runner.invoke(app, ["verify", run, "--json"])
    s = json.loads(r.output)
    assert s["new"] == 2 and s["skipped"] == 7 and s["verified"] == 9
    v = {(x.problem_id, x.index): x for x in store.verdicts("math")}
    assert v[("p1", 4)].correct is True and v[("p2", 3)].correct is False
    # --force re-verifies everything; the latest shard wins, so still 9 verdicts
    r = runner.invoke(app, ["verify", run, "--json", "--force"])
    s = json.loads(r.output)
    assert s["new"] == 9 and s["verified"] == 9


def test_verify_named_extractor_and_human_output(tmp_path):
    store = _make_run(tmp_path, benchmark="gsm8k")
    r = runner.invoke(
        app, ["verify", str(store.path), "--verifier", "math:boxed", "--name", "boxed"]
    )
    assert r.exit_code == 0, r.output
    assert "verified 7 new samples with boxed" in r.output
    v = {(x.problem_id, x.index): x for x in store.verdicts("boxed")}
    # the boxed extractor ignores "The answer is 42." and "#### 42"
    assert v[("p2", 0)].status.value == "invalid" and v[("p2", 2)].status.value == "invalid"
    # the gsm8k benchmark names the math verifier, with the auto extractor
    r = runner.invoke(app, ["verify", str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    info = SampleStore.open(store.path).manifest["verifiers"]["math"]
    assert info["extractor"] == "auto" and info["spec"] == "math:auto"


def test_verify_default_verifier_from_benchmark(tmp_path):
    store = SampleStore.create(tmp_path / "run", {"model": "m", "benchmark": "arith"})
    store.write_problems([Problem("a", "1+2=?", reference="3")])
    store.append([Sample("a", 0, "1+2=3\n#### 3"), Sample("a", 1, "The answer is 3")])
    r = runner.invoke(app, ["verify", str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    # the arith verifier reads only a final "#### x" line
    assert s["verifier"] == "arith" and s["by_status"] == {"pass": 1, "invalid": 1}


def test_verify_user_errors(tmp_path):
    r = runner.invoke(app, ["verify", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "not a ttscale run directory" in r.output
    store = SampleStore.create(tmp_path / "noprob", {"model": "m"})
    store.append([Sample("p", 0, "x")])
    r = runner.invoke(app, ["verify", str(store.path)])
    assert r.exit_code == 1 and "records no problems" in r.output
    assert len(r.output.strip().splitlines()) == 1
    run = str(_make_run(tmp_path).path)
    r = runner.invoke(app, ["verify", run, "--verifier", "nope"])
    assert r.exit_code == 1 and "unknown verifier" in r.output
    r = runner.invoke(app, ["verify", run, "--verifier", "math:boxed", "--extractor", "gsm8k"])
    assert r.exit_code == 1 and "extractor once" in r.output
    r = runner.invoke(app, ["verify", run, "--extractor", "bogus"])
    assert r.exit_code == 1 and "extractor must be one of" in r.output
