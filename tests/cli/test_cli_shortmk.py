"""``ttscale sample/run --adaptive short-m@k``: a stored run of kind ``shortmk`` on the bundled
model, its choices equal to ``replay --rule`` on the fixed run with the same seed, resumed and
refused in one line where it does not apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.select.shortmk import short_mk
from ttscale.store import SampleStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

runner = CliRunner()
HF = ["--engine", "hf", "--benchmark", "arith", "--no-progress", "--seed", "7"]


def ok(*args: Any) -> Any:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output)
    return r


def refused(*args: Any, needle: str) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, (args, r.output)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output


def rows(run: Path) -> dict[str, dict[str, Any]]:
    return {json.loads(ln)["problem_id"]: json.loads(ln) for ln in (run / "shortmk.jsonl").read_text().splitlines()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")  # the hf engine runs the bundled model
    root = tmp_path_factory.mktemp("shortmk")
    out = {"fixed": root / "fixed", "live": root / "live"}
    ok("sample", *HF, "--limit", "4", "--n", "6", "--out", out["fixed"])
    ok("verify", out["fixed"])
    r = ok("sample", *HF, "--limit", "4", "--n", "6", "--adaptive", "short-3@k", "--out", out["live"])
    assert "short-3@k, 6 traces per problem" in r.output and "shortmk.jsonl" in r.output
    ok("verify", out["live"])
    return out


def test_live_run_chooses_what_replay_chooses_on_the_fixed_run(runs: dict[str, Path]) -> None:
    """The same seed: the live run's traces are the fixed run's of their indices, and its choices
    (the 3 shortest, majority, ties to the shortest) those of the fixed run's 6 by length."""
    fixed = SampleStore.open(runs["fixed"])
    verdicts = {(v.problem_id, v.index): v.answer for v in fixed.verdicts("arith")}
    by_problem: dict[str, list[Any]] = {}
    for s in fixed.samples():
        by_problem.setdefault(s.problem_id, []).append(s)
    live_rows = rows(runs["live"])
    assert set(live_rows) == set(by_problem)
    live = {s.key: s for s in SampleStore.open(runs["live"]).samples()}
    for pid, samples in by_problem.items():
        samples.sort(key=lambda s: s.index)
        o = short_mk([verdicts[s.key] for s in samples], [int(s.num_tokens or 0) for s in samples], 3)
        r = live_rows[pid]
        assert r["chosen"] == [samples[i].index for i in o.chosen] and r["answer"] == o.answer
        assert r["rule"] == "short-3@k" and r["k"] == 6 and r["finished"] + r["aborted"] == 6
        for key in ((pid, i) for i in r["finish_order"]):
            assert live[key].text == next(s.text for s in samples if s.key == key)
    # its own accuracy at its own cost (curve) = the index-order replay on the fixed run
    c = json.loads(ok("curve", runs["live"], "--json", "--n-boot", "10").stdout)
    (pt,) = c["points"]
    rep = json.loads(ok("replay", runs["fixed"], "--rule", "short-3@k", "--json").stdout)
    assert pt["kind"] == "shortmk" and pt["rule"] == "short-3@k" and pt["k"] == 6
    assert pt["accuracy"]["mean"] == pytest.approx(rep["accuracy"]["mean"], abs=1e-12)
    assert pt["samples"]["mean"] == 6
    acct = SampleStore.open(runs["live"]).accounting()
    assert pt["tokens"]["mean"] == pytest.approx(acct["generated_tokens"] / 4)
    info = json.loads(ok("info", runs["live"], "--json").stdout)
    assert "short-m@k (short-3@k, k = 6" in info["run_kind"]


def test_resume_extends_to_new_problems_and_keeps_decided_ones(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok("sample", *HF, "--limit", "2", "--n", "6", "--adaptive", "short-3@k", "--out", run)
    first = rows(run)
    n_first = len(SampleStore.open(run))
    r = ok("sample", *HF, "--limit", "4", "--n", "6", "--adaptive", "short-3@k", "--out", run, "--resume")
    assert "already stored" in r.output
    again = rows(run)
    assert {p: again[p] for p in first} == first  # decided problems untouched
    assert [again[p]["chosen"] for p in sorted(again)] == [v["chosen"] for _, v in sorted(rows(runs["live"]).items())]
    keys = [s.key for s in SampleStore.open(run).samples()]
    assert len(keys) == len(set(keys)) > n_first
    refused("sample", *HF, "--limit", "4", "--n", "6", "--adaptive", "short-1@k", "--out", run, "--resume",
            needle="resume with the same rule and --n")  # fmt: skip
    refused("sample", *HF, "--limit", "4", "--n", "6", "--adaptive", "short-3@k", "--out", runs["fixed"],
            "--resume", needle="short-m@k stores the traces that finished first")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--adaptive", "short-3@k", "--shard", "0/2"], "drop --shard"),
        (["--prune", "short-3@k"], "give it as --adaptive short-3@k"),
        (["--adaptive", "short-3@x"], "bad short-m@k rule"),
        (["--adaptive", "short-9@k"], "at least 9"),
    ],
)
def test_bad_short_options_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    refused("sample", *HF, "--limit", "2", "--n", "6", *args, "--out", tmp_path / "o", needle=needle)
    assert not (tmp_path / "o").exists()


def test_run_reports_the_point(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    r = ok("run", *HF, "--limit", "2", "--n", "4", "--adaptive", "short-1@k", "--out", tmp_path / "r")
    assert "short-m@k" in r.output and "accuracy at each run's cost per problem" in r.output
