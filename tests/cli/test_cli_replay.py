"""``ttscale replay`` and ``ttscale sample --adaptive`` (issue 10, level 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import import_jsonl

runner = CliRunner()


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


@pytest.fixture
def pool_run(tmp_path: Path) -> Path:
    # p0: beta stops at 4 ("a", correct); p1: never settles in 6, tie a/b -> "a" (wrong)
    rows = []
    for pid, stream, correct in (("p0", "aaaaba", "a"), ("p1", "ababab", "b")):
        for i, a in enumerate(stream):
            rows.append({"problem_id": pid, "index": i, "answer": a, "correct": a == correct,
                         "num_tokens": 10 * (i + 1)})
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    import_jsonl(f, tmp_path / "run")
    return tmp_path / "run"


def test_replay_json_index_order(pool_run: Path) -> None:
    r = invoke("replay", str(pool_run), "--rule", "beta:0.95", "--order", "index", "--tie", "first",
               "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["rule"] == "beta:threshold=0.95" and d["order"] == "index" and d["max_samples"] == 6
    # accuracy (1 + 0)/2; samples (4 + 6)/2; tokens (100 + 210)/2 against fixed 210
    assert d["accuracy"]["mean"] == 0.5 and d["samples"]["mean"] == 5.0
    assert d["tokens"]["mean"] == 155.0 and d["fixed"]["tokens"]["mean"] == 210.0
    assert d["fixed"]["accuracy"]["mean"] == 0.5
    assert d["accuracy_delta"] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # same answers
    assert d["token_ratio"]["mean"] == pytest.approx(310 / 420)
    for key in ("accuracy", "samples", "tokens"):
        assert set(d[key]) == {"mean", "low", "high"}
        assert d[key]["low"] <= d[key]["mean"] <= d[key]["high"]
    # tie=expected: p1's tie a/b scores 0.5
    r = invoke("replay", str(pool_run), "--rule", "fixed", "--order", "index", "--tie", "expected", "--json")
    assert json.loads(r.stdout)["accuracy"]["mean"] == pytest.approx(0.75)


def test_replay_orders_and_text_output(pool_run: Path) -> None:
    r = invoke("replay", str(pool_run), "--rule", "esc:window=2", "--orders", "20", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert "20 random orders" in r.stdout and "esc:window=2" in r.stdout and "tokens" in r.stdout
    r2 = invoke("replay", str(pool_run), "--rule", "esc:window=2", "--orders", "20", "--seed", "1", "--json")
    r3 = invoke("replay", str(pool_run), "--rule", "esc:window=2", "--orders", "20", "--seed", "1", "--json")
    assert r2.stdout == r3.stdout


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--rule", "nope"], "error: unknown rule 'nope' in --rule 'nope'"),
        (["--rule", "beta", "--order", "random"], "error: --order takes only 'index'"),
        (["--rule", "beta", "--order", "index", "--orders", "3"], "exclude each other"),
        (["--rule", "beta", "--max-samples", "9"], "exceeds the samples"),
        (["--rule", "deepconf"], "needs top log-probs"),
        (["--rule", "beta", "--tie", "coin"], "--tie must be"),
    ],
)
def test_replay_errors_are_one_line(pool_run: Path, args: list[str], msg: str) -> None:
    r = invoke("replay", str(pool_run), *args)
    assert r.exit_code == 1
    assert msg in r.output and "Traceback" not in r.output


def test_sample_adaptive_bad_rule_fails_before_loading(tmp_path: Path) -> None:
    r = invoke("sample", "--benchmark", "arith", "--adaptive", "beta:2", "--out", str(tmp_path / "x"))
    assert r.exit_code == 1 and "threshold must be in" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_live_equals_replay_on_the_bundled_model(tmp_path: Path) -> None:
    """A live adaptive run and the index-order replay of the fixed run agree problem by problem."""
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    full, live = tmp_path / "full", tmp_path / "live"
    common = ["--benchmark", "arith", "--limit", "8", "--n", "12", "--no-progress", "--seed", "5"]
    r = invoke("sample", *common, "--out", str(full))
    assert r.exit_code == 0, r.output
    assert invoke("verify", str(full), "--verifier", "arith").exit_code == 0
    for rule in ("beta:0.95", "esc:window=3"):
        out = live / rule.replace(":", "-").replace("=", "")
        r = invoke("sample", *common, "--out", str(out), "--adaptive", rule)
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (out / "adaptive.jsonl").read_text().splitlines()]
        r = invoke("replay", str(full), "--rule", rule, "--order", "index", "--json", "--per-problem")
        rep = json.loads(r.stdout)["per_problem"]
        assert [(p["problem_id"], p["used"][0], p["answers"][0]) for p in rep] == [
            (x["problem_id"], x["used"], x["answer"]) for x in rows
        ]
        assert [p["tokens"] for p in rep] == [x["used_tokens"] for x in rows]


def test_replay_short_m_at_k_by_hand(pool_run: Path) -> None:
    # lengths 10, 20, ..., 60 in index order, so traces finish in index order
    r = invoke("replay", str(pool_run), "--rule", "short-1@k", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    # both problems answer "a" first: p0 right, p1 wrong; majority@6: p0 "a", p1 tie -> "a"
    assert d["k"] == 6 and d["accuracy"]["mean"] == 0.5 and d["fixed"]["accuracy"]["mean"] == 0.5
    assert d["tokens"]["mean"] == 10 + 5 * 10 and d["fixed"]["tokens"]["mean"] == 210
    assert d["wall_steps"]["mean"] == 10 and d["fixed"]["wall_steps"]["mean"] == 60
    d = json.loads(invoke("replay", str(pool_run), "--rule", "short-3@k", "--json").stdout)
    assert d["tokens"]["mean"] == 10 + 20 + 30 + 3 * 30 and d["accuracy"]["mean"] == 0.5
    r = invoke("replay", str(pool_run), "--rule", "short-3@k")
    assert r.exit_code == 0 and "short-3@k with k = 6" in r.output and "majority@6" in r.output


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--rule", "short-3@x"], "bad short-m@k rule"),
        (["--rule", "short-7@k"], "at least 7"),
    ],
)
def test_replay_short_errors_are_one_line(pool_run: Path, args: list[str], msg: str) -> None:
    r = invoke("replay", str(pool_run), *args)
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output
