"""``ttscale sample --prune``: live pruning from the CLI, its record, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.samplers.pruning import replay_pruning
from ttscale.store import SampleStore

runner = CliRunner()
SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]
SMALL = ["--limit", "4", "--n", "6", "--max-tokens", "30", "--seed", "5"]
RULE = "lowprob:threshold=-3.2,min_tokens=4"


def test_sample_prune_records_and_equals_replay_of_the_unpruned_run(tmp_path: Path) -> None:
    r = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--prune", RULE, "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "pruning traces with lowprob:threshold=-3.2,min_tokens=4 (streaming)" in r.output
    r2 = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--out", str(tmp_path / "full")])
    assert r2.exit_code == 0, r2.output
    live = SampleStore.open(tmp_path / "p")
    rep = replay_pruning(SampleStore.open(tmp_path / "full"), RULE)
    want = {(p.problem_id, t.index): t.pruned_at for p in rep.problems for t in p.traces}
    got = {s.key: s.pruned_at for s in live.samples()}
    assert got == want and rep.pruned > 0
    log = [json.loads(x) for x in (tmp_path / "p" / "pruning.jsonl").read_text().splitlines()]
    assert {(x["problem_id"], x["index"]): x["pruned_at"] for x in log} == want
    m = live.manifest
    assert m["pruning"]["pruned"] == rep.pruned
    assert m["pruning"]["generated_tokens"] == rep.tokens == live.accounting()["generated_tokens"]
    assert f"pruned {rep.pruned} of 24 traces" in r.output


def test_sample_prune_bad_input_is_one_line_and_builds_nothing(tmp_path: Path) -> None:
    for extra, needle in [
        (["--prune", "deepconf-online:eta=abc"], "eta='abc' is not a float"),
        (["--prune", "nope"], "unknown pruning rule 'nope'"),
        (["--prune", RULE, "--shard", "0/2"], "--prune does not take --shard"),
    ]:
        out = tmp_path / "x"
        r = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, *extra, "--out", str(out)])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
        assert not out.exists()
