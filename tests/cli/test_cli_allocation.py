"""``--allocate`` in ``ttscale replay``, ``curve`` and ``sample`` (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import import_jsonl

runner = CliRunner()


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


@pytest.fixture
def pool_run(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(24):
        pr = rng.dirichlet([0.6] * 4)
        for i in range(10):
            a = int(rng.choice(4, p=pr))
            rows.append({"problem_id": f"p{p}", "index": i, "answer": str(a), "correct": a == 0,
                         "num_tokens": int(rng.integers(5, 60))})
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    import_jsonl(f, tmp_path / "run")
    return tmp_path / "run"


def test_replay_uniform_equals_the_fixed_rule(pool_run: Path) -> None:
    r = invoke("replay", str(pool_run), "--allocate", "uniform", "--budget-total", str(4 * 24),
               "--orders", "5", "--json", "--per-problem")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    # an allocation scores the answer it would choose live (ties to the first seen): the rule
    # replay is asked for the same tie rule (its default scores a tie by its expectation)
    f = json.loads(invoke("replay", str(pool_run), "--rule", "fixed", "--max-samples", "4", "--orders", "5",
                          "--tie", "first", "--json", "--per-problem").stdout)
    assert d["accuracy"] == f["accuracy"]
    assert [p["samples"] for p in d["per_problem"]] == [[4] * 5] * 24
    assert d["samples_total"] == 96 and d["full"]["policy"] == "SC@10"


def test_replay_greedy_text_and_tokens(pool_run: Path) -> None:
    r = invoke("replay", str(pool_run), "--allocate", "greedy", "--budget-total", "2000", "--tokens",
               "--order", "index", "--stop-rule", "beta:0.9")
    assert r.exit_code == 0, r.output
    assert "total budget 2,000 tokens" in r.output and "vs uniform at the same budget" in r.output


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--allocate", "greedy"], "needs --budget-total"),
        (["--allocate", "bogus", "--budget-total", "5"], "unknown allocation policy"),
        (["--allocate", "uniform", "--budget-total", "5", "--rule", "beta"], "exclude each other"),
        (["--allocate", "uniform", "--budget-total", "5", "--stop-rule", "esc:3"], "esc"),
        ([], "pass --rule RULE"),
    ],
)
def test_allocation_errors_are_one_line(pool_run: Path, args: list[str], msg: str) -> None:
    r = invoke("replay", str(pool_run), *args)
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) <= 2  # the order note at most, then the error


def test_curve_allocate_table_json_and_plot(pool_run: Path, tmp_path: Path) -> None:
    r = invoke("curve", str(pool_run), "--allocate", "greedy;gape:a=0.5", "--json", "--n-boot", "50")
    assert r.exit_code == 0, r.output
    cur = json.loads(r.stdout)
    assert cur["budgets"] == [24.0, 48.0, 72.0, 96.0, 144.0, 192.0, 240.0]
    assert list(cur["curves"]) == ["uniform", "greedy:lookahead=1", "gape:a=0.5"]
    r = invoke("curve", str(pool_run), "--allocate", "greedy", "--x", "tokens", "--plot", str(tmp_path / "c.png"),
               "--n-boot", "50")
    assert r.exit_code == 0, r.output
    assert "budget (tokens)" in r.output and (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_live_allocation_equals_replay_on_the_bundled_model(tmp_path: Path) -> None:
    """A live allocation run and the index-order replay of the fixed run agree problem by problem."""
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    full, live = tmp_path / "full", tmp_path / "live"
    common = ["--benchmark", "arith", "--limit", "8", "--n", "12", "--no-progress", "--seed", "5"]
    r = invoke("sample", *common, "--out", str(full))
    assert r.exit_code == 0, r.output
    assert invoke("verify", str(full), "--verifier", "arith").exit_code == 0
    for policy, extra in (("greedy", ["--budget-total", "40"]), ("gape", ["--budget-total", "3000", "--tokens"])):
        out = live / policy
        r = invoke("sample", *common, "--out", str(out), "--allocate", policy, *extra)
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (out / "allocation.jsonl").read_text().splitlines()]
        args = ["replay", str(full), "--allocate", policy, *extra, "--order", "index", "--json", "--per-problem"]
        rep = json.loads(invoke(*args).stdout)["per_problem"]
        assert [(p["problem_id"], p["samples"][0], p["answers"][0], p["tokens"][0]) for p in rep] == [
            (x["problem_id"], x["samples"], x["answer"], x["tokens"]) for x in rows
        ]


def test_replay_calibrate(pool_run: Path) -> None:
    r = invoke("replay", str(pool_run), "--calibrate", "3", "--rule", "beta", "--allocate", "greedy",
               "--target", "within:1", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d["families"]) == {"beta", "greedy:lookahead=1"} and len(d["folds"]) == 24
    assert all(len(f["chosen"]) == 3 for f in d["families"].values())
    r = invoke("replay", str(pool_run), "--calibrate", "3", "--rule", "majority:0.6;majority:0.8",
               "--target", "tokens:0.3")
    assert r.exit_code == 0, r.output
    assert "held-out" in r.output and "majority" in r.output
    r = invoke("replay", str(pool_run), "--calibrate", "3", "--target", "tokens:2")
    assert r.exit_code == 1 and "0 < R <= 1" in r.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--allocate", "greedy"], "needs --budget-total"),
        (["--allocate", "nope", "--budget-total", "9"], "unknown allocation policy"),
        (["--allocate", "greedy", "--budget-total", "9", "--stop-rule", "bogus"], "unknown adaptive rule"),
        (["--allocate", "greedy", "--budget-total", "9", "--adaptive", "beta"], "--stop-rule"),
        (["--allocate", "greedy", "--budget-total", "9", "--shard", "1/2"], "drop --shard"),
    ],
)
def test_sample_allocate_bad_input_fails_before_loading(tmp_path: Path, extra: list[str], message: str) -> None:
    from tests.cli.test_cli_sample import SCRIPTED

    out = tmp_path / "run"
    r = invoke("sample", *SCRIPTED, "--limit", "2", "--out", str(out), *extra)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert not out.exists()


def test_sample_allocate_with_the_scripted_engine(tmp_path: Path) -> None:
    from tests.cli.test_cli_sample import SCRIPTED

    out = tmp_path / "run"
    r = invoke("sample", *SCRIPTED, "--limit", "4", "--n", "6", "--out", str(out), "--allocate", "greedy",
               "--budget-total", "10")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "allocation.jsonl").read_text().splitlines()]
    assert sum(x["samples"] for x in rows) == 10 and all(x["samples"] <= 6 for x in rows)
    assert "allocate: policy greedy:lookahead=1" in r.output


def test_an_allocated_run_is_one_point_in_every_command(tmp_path: Path) -> None:
    """An allocated run is its own run kind (issue 15's matrix): curve reports the answer it chose
    at the samples it drew, recomputed here from allocation.jsonl and the stored verdicts; the
    k-sample commands refuse in one line."""
    from tests.cli.test_cli_sample import SCRIPTED
    from ttscale.store import SampleStore

    out = tmp_path / "run"
    r = invoke("sample", *SCRIPTED, "--limit", "4", "--n", "6", "--out", str(out), "--allocate", "greedy",
               "--budget-total", "12")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert invoke("verify", str(out)).exit_code == 0
    rows = {x["problem_id"]: x for x in map(json.loads, (out / "allocation.jsonl").read_text().splitlines())}
    st = SampleStore.open(out)
    verdicts = {(v.problem_id, v.index): v for v in st.verdicts("arith")}
    want_acc, want_samples = [], []
    for pid, row in rows.items():
        used = [verdicts[(pid, i)] for i in range(row["samples"])]
        hit = [v for v in used if v.answer is not None and str(v.answer) == row["answer"]]
        want_acc.append(float(any(v.correct for v in hit)) if row["answer"] is not None else 0.0)
        want_samples.append(sum(1 for s in st.samples() if s.problem_id == pid))
    d = json.loads(invoke("curve", str(out), "--json", "--n-boot", "20").stdout)
    (p,) = d["points"]
    assert p["kind"] == "allocated" and p["method"] == "majority"
    assert p["accuracy"]["mean"] == pytest.approx(np.mean(want_acc))
    assert p["samples"]["mean"] == pytest.approx(np.mean(want_samples))
    info = invoke("info", str(out))
    assert info.exit_code == 0 and "allocated (greedy" in info.output, info.output
    for args in (["fit", str(out)], ["replay", str(out), "--rule", "beta:0.9"],
                 ["replay", str(out), "--allocate", "uniform", "--budget-total", "8"],
                 ["curve", str(out), "--methods", "majority"]):  # fmt: skip
        r = invoke(*args)
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and "allocated run" in lines[0], (args, r.output)
