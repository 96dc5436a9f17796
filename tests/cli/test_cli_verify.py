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


def _numbers_run(tmp_path, benchmark="gsm8k"):
    # last_number: p1 42 pass, 41 fail, 43 fail; p2 7 pass, 8 fail -> 2/5. No \boxed anywhere,
    # so the boxed extractor finds no answer: 0/5.
    store = SampleStore.create(tmp_path / "run", {"model": "m", "benchmark": benchmark})
    store.write_problems([Problem("p1", "q1", reference="42"), Problem("p2", "q2", reference="7")])
    store.append([Sample("p1", i, t) for i, t in enumerate(["so 42", "so 41", "42 then 43"])])
    store.append([Sample("p2", i, t) for i, t in enumerate(["it is 7", "8"])])
    return store


def test_a_different_configuration_never_reuses_verdicts(tmp_path):
    # the scenario: math + last_number, then math:boxed on the same run
    store = _numbers_run(tmp_path)
    run = str(store.path)
    r = runner.invoke(app, ["verify", run, "--verifier", "math", "--extractor", "last_number", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["verifier"] == "math" and s["spec"] == "math:last_number"
    assert s["accuracy"] == pytest.approx(2 / 5)
    before = SampleStore.open(run).manifest["verifiers"]["math"]

    # refused in one line naming the way out; nothing computed, manifest untouched
    r = runner.invoke(app, ["verify", run, "--verifier", "math:boxed", "--json"])
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: ")
    assert "math:last_number" in r.output and "--force" in r.output and "--name" in r.output
    assert SampleStore.open(run).manifest["verifiers"]["math"] == before
    assert sum(v.correct is True for v in store.verdicts("math")) == 2

    # its own verdict set under --name
    r = runner.invoke(app, ["verify", run, "--verifier", "math:boxed", "--name", "boxed", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["accuracy"] == 0.0 and s["new"] == 5 and s["spec"] == "math:boxed"
    m = SampleStore.open(run).manifest["verifiers"]
    assert m["math"]["spec"] == "math:last_number" and m["boxed"]["spec"] == "math:boxed"
    assert m["math"]["fingerprint"] != m["boxed"]["fingerprint"]

    # --force replaces the set: recomputed, old verdicts moved aside (not deleted)
    r = runner.invoke(app, ["verify", run, "--verifier", "math:boxed", "--force", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["accuracy"] == 0.0 and s["new"] == 5 and s["verdict_set"] == "replaced"
    m = SampleStore.open(run).manifest
    assert m["verifiers"]["math"]["spec"] == "math:boxed"
    assert m["replaced_verdicts"][0]["record"]["spec"] == "math:last_number"
    aside = store.path / m["replaced_verdicts"][0]["moved_to"]
    assert list(aside.glob("part-*.parquet"))
    assert SampleStore.open(run).verifiers() == ["boxed", "math"]
    # the same configuration again is reused: nothing new
    r = runner.invoke(app, ["verify", run, "--verifier", "math:boxed", "--json"])
    assert json.loads(r.output)["new"] == 0


def test_math_on_an_arith_run_says_it_is_the_arith_configuration(tmp_path):
    store = SampleStore.create(tmp_path / "run", {"model": "m", "benchmark": "arith"})
    store.write_problems([Problem("a", "1+2=?", reference="3")])
    store.append([Sample("a", 0, "1+2=3\n#### 3"), Sample("a", 1, "The answer is 3")])
    run = str(store.path)
    assert runner.invoke(app, ["verify", run, "--verifier", "arith"]).exit_code == 0
    # `math` resolves to the arith extractor on this benchmark: the same configuration, so the
    # verdicts are reused, the entry keeps its spec, and the output says what `math` became
    r = runner.invoke(app, ["verify", run, "--verifier", "math"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())  # rich wraps long lines
    assert "with arith = arith" in out and "requested as math" in out and "0 new samples" in out
    rec = SampleStore.open(run).manifest["verifiers"]["arith"]
    assert rec["spec"] == "arith" and rec["specs"] == ["arith", "math"]
    # math with another extractor on the arith run is a different configuration: refused
    r = runner.invoke(app, ["verify", run, "--verifier", "math:auto", "--name", "arith"])
    assert r.exit_code == 1 and "--force" in r.output


def test_runs_written_before_verdicts_were_keyed_stay_usable(tmp_path):
    # what today's release writes: the flat info() plus the spec given, no fingerprint
    from ttscale.verifiers.math import MathVerifier

    store = _numbers_run(tmp_path)
    run = str(store.path)
    with MathVerifier("last_number", workers=0) as v:
        verdicts = v.verify_many([(p, list(store.samples(p.id))) for p in store.problems()])
        info = v.info()
    store.add_verdicts([x for vs in verdicts for x in vs], verifier="math")
    store.update_manifest(verifiers={"math": {**info, "workers": 1, "spec": "math"}})
    # curve reads it and names the set (configuration as recorded)
    r = runner.invoke(app, ["curve", run, "--k", "1"])
    assert r.exit_code == 0, r.output
    assert "verdicts: math = math" in r.output
    # the recorded configuration again: reused and upgraded with a fingerprint
    r = runner.invoke(app, ["verify", run, "--verifier", "math", "--extractor", "last_number", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["new"] == 0
    rec = SampleStore.open(run).manifest["verifiers"]["math"]
    assert rec["fingerprint"] and rec["legacy"] is True and rec["spec"] == "math:last_number"
    # another configuration: refused
    r = runner.invoke(app, ["verify", run, "--verifier", "math:boxed"])
    assert r.exit_code == 1 and "--force" in r.output
    # verdicts whose configuration was never recorded (library add_verdicts) are not reused
    store.add_verdicts(verdicts[0], verifier="x")
    r = runner.invoke(app, ["verify", run, "--verifier", "math", "--name", "x"])
    assert r.exit_code == 1 and "never recorded" in r.output


def test_curve_info_export_name_the_verdict_set(tmp_path):
    store = _numbers_run(tmp_path)
    run = str(store.path)
    assert runner.invoke(app, ["verify", run, "--verifier", "math:last_number"]).exit_code == 0
    assert runner.invoke(app, ["verify", run, "--verifier", "math:boxed", "--name", "boxed"]).exit_code == 0
    # the run's default (the first set verified) is used, not the latest written; said so,
    # with its configuration
    r = runner.invoke(app, ["curve", run, "--k", "1", "--json"])
    d = json.loads(r.output)
    assert d["verdicts"]["name"] == "math" and d["verdicts"]["spec"] == "math:last_number"
    assert d["verdicts"]["chosen_by"].startswith("the run's default") and d["verdicts"]["others"] == ["boxed"]
    # coverage at k=1 = mean over problems of c/n = (1/3 + 1/2) / 2
    assert d["methods"]["coverage"]["mean"][0] == pytest.approx((1 / 3 + 1 / 2) / 2)
    r = runner.invoke(app, ["curve", run, "--k", "1", "--verifier", "boxed", "--json"])
    d = json.loads(r.output)
    assert d["verdicts"]["spec"] == "math:boxed" and d["verdicts"]["chosen_by"] == "--verifier"
    assert d["methods"]["coverage"]["mean"] == [0.0]
    r = runner.invoke(app, ["info", run], env={"COLUMNS": "400"})
    assert "math = math:last_number, config" in r.output and "boxed = math:boxed" in r.output
    row = next(x for x in r.output.splitlines() if "analyses use" in x)
    assert "math = math:last_number" in row and "the run's default" in row
    d = json.loads(runner.invoke(app, ["info", run, "--json"]).output)
    assert d["analysis_verdicts"]["name"] == "math"
    r = runner.invoke(app, ["export", run, "--out", str(tmp_path / "e.jsonl")])
    assert r.exit_code == 0 and "verdicts: math = math:last_number" in r.output


def test_bare_math_says_which_extractor_it_chose_and_the_spec_for_the_other(tmp_path):
    store = SampleStore.create(tmp_path / "run", {"model": "m", "benchmark": "arith"})
    store.write_problems([Problem("a", "1+2=?", reference="3")])
    store.append([Sample("a", 0, "1+2=3\n#### 3"), Sample("a", 1, "The answer is 3")])
    run = str(store.path)
    r = runner.invoke(app, ["verify", run, "--verifier", "math"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("verifier math with"))
    assert line == (
        "verifier math with the arith extractor (the default for benchmark arith); --verifier "
        "math:auto for math's general extractor (\\boxed{}, ####, Minerva, 'The answer is')"
    )
    # the spec it names gives the other choice: auto reads "The answer is 3" too
    r = runner.invoke(app, ["verify", run, "--verifier", "math:auto", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["spec"] == "math:auto" and s["by_status"] == {"pass": 2} and s["chose"] is None
    # an extractor given explicitly: nothing was chosen for the user, no line
    r = runner.invoke(app, ["verify", run, "--verifier", "math", "--extractor", "last_number", "--name", "ln"])
    assert r.exit_code == 0, r.output
    assert "verifier math with" not in r.output
    # another benchmark: auto, and the specs of the other extractors
    g = _make_run(tmp_path / "g", benchmark="gsm8k")
    r = runner.invoke(app, ["verify", str(g.path), "--verifier", "math", "--json"])
    assert json.loads(r.output)["chose"] == (
        "verifier math with the auto extractor (the default for benchmark gsm8k); another "
        "extractor: --verifier math:boxed (or math:gsm8k, math:minerva, math:last_number, math:arith)"
    )
