"""``ttscale curve --x tokens``: fixed-n curves at k x mean tokens, other run kinds as points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample

runner = CliRunner()
PROBLEMS = [Problem(id="A", prompt="a", reference="1"), Problem(id="B", prompt="b", reference="5")]


def _store(path: Path, rows: list[tuple], manifest: dict | None = None) -> Path:
    store = SampleStore.create(path, {"model": "m", "benchmark": "arith", **(manifest or {})})
    store.write_problems(PROBLEMS)
    samples = []
    for pid, i, ans, ok, toks, *step in rows:
        kw = {}
        if step:
            kw = {"step": 0, "fate": step[0], "pruned_at": step[1]}
        samples.append(Sample(problem_id=pid, index=i, text=str(ans), answer=ans, correct=ok,
                              num_tokens=toks, **kw))
    store.append(samples)
    return path


def test_tokens_axis_numbers_by_hand(tmp_path: Path) -> None:
    # fixed run: A: ("1", right, 10 tokens), ("2", wrong, 30) -> 20 tokens a sample;
    #            B: ("5", right, 40), ("5", right, 60)       -> 50 tokens a sample
    # tokens at k: k * mean(20, 50) = 35k. majority@1 = mean(1/2, 1) = 0.75; majority@2: A ties
    # "1"/"2" (expected credit 1/2), B right -> 0.75; coverage@1 0.75, coverage@2 1.0
    full = _store(tmp_path / "full", [
        ("A", 0, "1", True, 10), ("A", 1, "2", False, 30),
        ("B", 0, "5", True, 40), ("B", 1, "5", True, 60),
    ])
    # pruning run: A keeps "1" (10 tokens), prunes a trace at 5 tokens; B keeps "5" (40) and
    # prunes "7" at 12 -> tokens per problem 15 and 52, mean 33.5; majority over kept: 1.0
    pr = _store(tmp_path / "pr", [
        ("A", 0, "1", True, 10, "kept", None), ("A", 1, None, None, 5, "pruned", 5),
        ("B", 0, "5", True, 40, "kept", None), ("B", 1, "7", False, 12, "pruned", 12),
    ], {"iid": False, "pruning": {"rule": "lowprob:threshold=-1,min_tokens=1"}})
    r = runner.invoke(app, ["curve", str(full), str(pr), "--x", "tokens", "--json",
                            "--methods", "coverage,majority", "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    (run,) = d["runs"]
    assert run["k"] == [1, 2] and run["tokens"] == pytest.approx([35.0, 70.0])
    assert run["methods"]["majority"]["mean"] == pytest.approx([0.75, 0.75])
    assert run["methods"]["coverage"]["mean"] == pytest.approx([0.75, 1.0])
    (pt,) = d["points"]
    assert pt["tokens"]["mean"] == pytest.approx(33.5)
    assert pt["accuracy"]["mean"] == pytest.approx(1.0)
    # the table says the same
    r = runner.invoke(app, ["curve", str(full), str(pr), "--x", "tokens", "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    assert "35.0" in r.output and "70.0" in r.output and "33.5" in r.output


def test_tokens_axis_refusals_are_one_line(tmp_path: Path) -> None:
    no_tokens = _store(tmp_path / "nt", [("A", 0, "1", True, None), ("B", 0, "5", True, None)])
    smc = _store(tmp_path / "smc", [("A", 0, "1", True, 3, "kept", None)], {"iid": False})
    for run, needle in [(no_tokens, "needs every sample's token count"),
                        (smc, "records no particle log-weights")]:
        r = runner.invoke(app, ["curve", str(run), "--x", "tokens"])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    r = runner.invoke(app, ["curve", str(no_tokens), "--x", "samples"])
    assert r.exit_code == 1 and "--x must be k or tokens" in r.output


def test_token_point_of_an_unverified_run_asks_for_verify(tmp_path: Path) -> None:
    # the check read `pool.has_correctness` (a method, always true): an unverified pruning run
    # scored 0.000 instead of asking for `ttscale verify`
    from ttscale.errors import ConfigError
    from ttscale.metrics.tokens import run_token_point

    pr = _store(tmp_path / "pr", [("A", 0, "1", None, 10, "kept", None), ("B", 0, "5", None, 40, "kept", None)],
                {"iid": False, "pruning": {"rule": "lowprob:threshold=-1,min_tokens=1"}})  # fmt: skip
    pool = SampleStore.open(pr).pool()
    with pytest.raises(ConfigError, match="verify it first"):
        run_token_point(pool, [10.0, 40.0], label="pr")
    r = runner.invoke(app, ["curve", str(pr), "--x", "tokens"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"error: {pr} has no correctness labels: verify it first (`ttscale verify {pr}`)"
    ]
