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
    assert "pruning traces with lowprob:threshold=-3.2,min_tokens=4 (streaming, in chunks of up to 4 tokens)" in r.output
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
    ]:
        out = tmp_path / "x"
        r = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, *extra, "--out", str(out)])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
        assert not out.exists()


def test_sample_prune_shards_and_resumes_like_the_others(tmp_path: Path) -> None:
    one = tmp_path / "one"
    assert runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--prune", RULE, "--out", str(one)]).exit_code == 0
    two = tmp_path / "two"
    for i, extra in enumerate([[], ["--resume"]]):
        r = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--prune", RULE, "--shard", f"{i}/2",
                                "--out", str(two), *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
    a, b = SampleStore.open(one), SampleStore.open(two)
    assert {s.key: (s.text, s.pruned_at) for s in a.samples()} == {
        s.key: (s.text, s.pruned_at) for s in b.samples()
    }
    assert a.accounting()["generated_tokens"] == b.accounting()["generated_tokens"]
    assert a.manifest["pruning"]["pruned"] == b.manifest["pruning"]["pruned"]
    log = (two / "pruning.jsonl").read_text().splitlines()
    assert sorted(log) == sorted((one / "pruning.jsonl").read_text().splitlines())
    # resuming a finished run generates nothing
    r = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--prune", RULE, "--out", str(two), "--resume"])
    assert r.exit_code == 0, r.output
    assert SampleStore.open(two).accounting()["generated_tokens"] == a.accounting()["generated_tokens"]


def test_replay_command_replays_a_trace_rule_against_sc(tmp_path: Path) -> None:
    # `ttscale replay --rule lowprob:...` on an unpruned, verified run: which traces the rule
    # stops (replay_pruning), the kept traces' majority vs all traces' majority, tokens per problem
    full = tmp_path / "full"
    assert runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--out", str(full)]).exit_code == 0
    assert runner.invoke(app, ["verify", str(full)]).exit_code == 0
    r = runner.invoke(app, ["replay", str(full), "--rule", RULE, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rep = replay_pruning(SampleStore.open(full), RULE)
    assert d["pruned"] == rep.pruned > 0 and d["level"] == 2
    assert d["tokens"]["mean"] * d["problems"] == rep.tokens
    assert d["fixed"]["tokens"]["mean"] * d["problems"] == rep.full_tokens
    # independent majority votes (first-seen ties) from the stored verdicts
    pool = SampleStore.open(full).pool()
    kept = {(p.problem_id, t.index) for p in rep.problems for t in p.traces if t.pruned_at is None}

    def vote(pairs):  # list of (answer code, correct) in index order
        counts: dict[int, int] = {}
        for a, _ in pairs:
            if a >= 0:
                counts[a] = counts.get(a, 0) + 1
        if not counts:
            return 0.0
        top = max(counts.values())
        winner = next(a for a, _ in pairs if a >= 0 and counts[a] == top)
        return float([c for a, c in pairs if a == winner][-1] > 0.5)

    acc_rule, acc_sc = [], []
    for p in range(pool.num_problems):
        lo, hi = int(pool.offsets[p]), int(pool.offsets[p + 1])
        pid = str(pool.problem_ids[p])
        pairs = [(int(pool.answer[i]), float(pool.correct[i]), int(pool.index[i])) for i in range(lo, hi)]
        acc_sc.append(vote([(a, c) for a, c, _ in pairs]))
        acc_rule.append(vote([(a, c) for a, c, i in pairs if (pid, i) in kept]))
    assert d["accuracy"]["mean"] == sum(acc_rule) / len(acc_rule)
    assert d["fixed"]["accuracy"]["mean"] == sum(acc_sc) / len(acc_sc)
    # trace rules replay in stored order only
    r = runner.invoke(app, ["replay", str(full), "--rule", RULE, "--orders", "3"])
    assert r.exit_code == 1 and "drop --orders" in r.output


def test_sample_prune_selfeval_top_on_the_bundled_model(tmp_path: Path) -> None:
    """Keep-top-fraction: per problem, half of the traces that reached the checkpoint go on."""
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        import pytest

        pytest.skip("the bundled model is not built")
    out = tmp_path / "top"
    r = runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "3", "--n", "4",
                            "--seed", "1", "--no-progress", "--out", str(out),
                            "--prune", "selfeval-top:checkpoint=6,keep=0.5,yes=Y,no=N"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "pruning.jsonl").read_text().splitlines()]
    by: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by.setdefault(str(row["problem_id"]), []).append(row)
    for trs in by.values():
        cut = [t for t in trs if t["pruned_at"] is not None]
        assert len(cut) <= 2 and all(t["pruned_at"] == 7 and "ranked" in str(t["reason"]) for t in cut)
    assert sum(t["pruned_at"] is not None for t in rows) > 0


def test_selfeval_scoring_cost_is_shown_apart_by_sample_info_and_curve(tmp_path: Path) -> None:
    """The self-evaluation's scored context tokens: in the summary, `info` and the curve point,
    never in the generated tokens."""
    out = tmp_path / "se"
    r = runner.invoke(app, ["sample", *SCRIPTED, *SMALL, "--out", str(out),
                            "--prune", "selfeval:checkpoint=6,every=4,threshold=0.5,prompt=Q,yes=y,no=n"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "pruning.jsonl").read_text().splitlines()]
    scored = sum(int(x["scored_tokens"]) for x in rows)
    made = sum(int(x["tokens"]) for x in rows)
    assert scored > 0
    flat = " ".join(r.output.split())
    assert f"({made:,} generated tokens, pruned traces included; self-evaluation scored {scored:,} context tokens besides)" in flat
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    r = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert f"{made:,} generated tokens; self-evaluation scored {scored:,} context tokens besides" in flat
    per_problem = scored / 4  # --limit 4
    assert f"self-evaluation scored {per_problem:,.1f} [" in flat
    r = runner.invoke(app, ["info", str(out), "--json"])
    point = json.loads(r.output)["own_result"][0]
    assert point["scored_tokens"]["mean"] == per_problem
    # tokens per problem stay the generated ones
    assert abs(point["tokens"]["mean"] - made / 4) < 1e-9
    r = runner.invoke(app, ["curve", str(out)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert f"self-evaluation scored {per_problem:,.1f} [" in " ".join(r.output.split())
