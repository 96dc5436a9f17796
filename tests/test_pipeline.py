"""The library pipeline: verify_store and sample -> verify -> curve from Python, as the CLI does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ttscale import Problem, SamplingParams
from ttscale.engines.scripted import ScriptedEngine
from ttscale.samplers import RepeatedSampler
from ttscale.store import SampleStore
from ttscale.types import Sample, Verdict, VerdictStatus

# the scripted answers, per problem and index: "#### 5" is right for every problem below
ANSWERS = {
    "a": ["#### 5", "#### 4", "#### 5", "#### 6"],
    "b": ["#### 1", "#### 5", "#### 2", "#### 3"],
}


def problems() -> list[Problem]:
    return [Problem("a", "2+3=", reference="5"), Problem("b", "1+4=", reference="5")]


def test_verifiers_import_lazily() -> None:
    code = (
        "import sys; import ttscale.verifiers as v; "
        "print(sorted(m for m in sys.modules if m.startswith('ttscale.verifiers.'))); "
        "from ttscale.verifiers import CodeVerifier, MathVerifier, make_verifier, verify_store; "
        "print(CodeVerifier.__name__, MathVerifier.__name__, make_verifier.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.splitlines()
    assert first == "[]"
    assert second == "CodeVerifier MathVerifier make_verifier"


def test_verify_store_from_python_matches_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ttscale.cli.app import app
    from ttscale.verifiers import verify_store

    runs = []
    for name in ("lib", "cli"):
        store = SampleStore.create(tmp_path / name, {"model": "toy"})
        RepeatedSampler(ScriptedEngine(ANSWERS), SamplingParams(n=4), store, progress=False).run(
            problems()
        )
        runs.append(store)
    summary = verify_store(runs[0], "arith")
    # a: indices 0 and 2 right; b: index 1 right -> 3 of 8
    assert summary["accuracy"] == pytest.approx(3 / 8) and summary["new"] == 8
    assert summary["by_status"] == {"pass": 3, "fail": 5}
    again = verify_store(runs[0].path, "arith")
    assert again["new"] == 0 and again["skipped"] == 8  # resumable and idempotent
    r = CliRunner().invoke(app, ["verify", str(runs[1].path), "--verifier", "arith", "--json"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    for key in ("verifier", "spec", "fingerprint", "new", "verified", "by_status", "accuracy"):
        assert cli[key] == summary[key], key


def test_verify_store_takes_a_verifier_object(tmp_path: Path) -> None:
    from ttscale.verifiers import verify_store

    class Even:
        name = "even"
        closed = False

        def verify(self, problem: Problem, samples: list[Sample]) -> list[Verdict]:
            out = []
            for s in samples:
                even = s.index % 2 == 0
                status = VerdictStatus.PASS if even else VerdictStatus.FAIL
                out.append(Verdict(s.problem_id, s.index, status, "even", correct=even))
            return out

        def info(self) -> dict[str, str]:
            return {"verifier": "even"}

        def close(self) -> None:
            self.closed = True

    store = SampleStore.create(tmp_path / "r", {"model": "toy"})
    RepeatedSampler(ScriptedEngine(ANSWERS), SamplingParams(n=4), store, progress=False).run(
        problems()
    )
    v = Even()
    summary = verify_store(store, v)
    assert summary["verifier"] == "even" and summary["accuracy"] == 0.5
    assert not v.closed  # the caller's verifier is the caller's to close
    assert store.pool("even").correct.tolist() == [1.0, 0.0, 1.0, 0.0] * 2


def test_sample_verify_curve(tmp_path: Path) -> None:
    from ttscale.pipeline import sample_verify_curve

    out = sample_verify_curve(
        ScriptedEngine(ANSWERS), SamplingParams(n=4), problems(), tmp_path / "run",
        verifier="arith", plot=False, progress=False,
    )  # fmt: skip
    assert out.sampling.generated == 8 and out.ks == (1, 2, 4) and out.plot is None
    t = out.table()
    # coverage@4: both problems have a right answer -> 1.0. majority@4: a votes 5 (2 of 4) ->
    # right; b's answers 1, 5, 2, 3 all tie, expected tie rule -> 1/4 -> (1 + 0.25) / 2
    assert t["coverage"][-1] == 1.0
    assert t["majority"][-1] == pytest.approx(0.625)
    # coverage@1 = mean fraction right = (2/4 + 1/4) / 2
    assert t["coverage"][0] == pytest.approx(0.375)
    saved = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert saved["run"] == str(tmp_path / "run")
