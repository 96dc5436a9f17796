"""Exact self-certainty stored per sample on the bundled model: ``ttscale certainty RUN``
(a scoring pass, resumable, refusing another tokenizer) and ``sample --self-certainty`` (the hf
decode loop's own distributions); ``curve`` then uses the exact values and says so, and says
"top-k approximation" where a run has none; ``--borda-power``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import SampleStore

runner = CliRunner()


def _model() -> str:
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    return str(default_model_path())


def _sample(out: Path, *extra: str, limit: int = 4, n: int = 4) -> None:
    r = runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", str(limit), "--n",
                            str(n), "--logprobs", "20", "--seed", "2", "--no-progress", "--out", str(out), *extra])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["verify", str(out), "--verifier", "arith"]).exit_code == 0


def _exact_by_key(store: SampleStore) -> dict[tuple[str, int], float]:
    """The Python API's exact values (exact_self_certainty, one forward pass per trace)."""
    from ttscale.engines import GenerationRequest
    from ttscale.engines.hf import HFEngine
    from ttscale.select.certainty import exact_self_certainty

    engine = HFEngine(_model(), device="cpu", threads=1)
    prompts = {p.id: p.prompt for p in store.problems()}
    smp = list(store.samples())
    vals = exact_self_certainty(engine, [GenerationRequest(problem_id=s.problem_id, prompt=prompts[s.problem_id])
                                         for s in smp], [s.token_ids for s in smp])  # fmt: skip
    return {(s.problem_id, s.index): v for s, v in zip(smp, vals, strict=True)}


def _curve(run: Path, *extra: str) -> dict:
    r = runner.invoke(app, ["curve", str(run), "--methods", "majority,self_certainty,self_certainty_borda",
                            "--n-boot", "10", "--json", *extra])  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _independent(store: SampleStore, by_key: dict, k: int, power: float) -> tuple[float, float]:
    """Best-of-N and Borda accuracy at k = n from the stored values, computed here from the
    samples' answers (no pool, no aggregate code): ties share the credit."""
    by_pid: dict[str, list] = {}
    for s in store.samples():
        by_pid.setdefault(s.problem_id, []).append(s)
    best, borda = [], []
    verdicts = {(v.problem_id, v.index): v for v in store.verdicts("arith")}
    for pid in sorted(by_pid):
        smp = sorted(by_pid[pid], key=lambda s: s.index)[:k]
        ans = [verdicts[(s.problem_id, s.index)].answer for s in smp]
        ok = {a: bool(verdicts[(s.problem_id, s.index)].correct) for s, a in zip(smp, ans, strict=True)}
        c = [by_key[(s.problem_id, s.index)] for s in smp]
        answered = [i for i, a in enumerate(ans) if a is not None]
        if not answered:
            best.append(0.0)
            borda.append(0.0)
            continue
        top = max(c[i] for i in answered)
        best.append(float(np.mean([ok[ans[i]] for i in answered if c[i] == top])))
        order = sorted(range(len(smp)), key=lambda i: (-c[i], i))
        votes: dict = {}
        for r, i in enumerate(order, start=1):
            if ans[i] is not None:
                votes[ans[i]] = votes.get(ans[i], 0.0) + (len(smp) - r + 1) ** power
        m = max(votes.values())
        borda.append(float(np.mean([ok[a] for a, v in votes.items() if math.isclose(v, m, rel_tol=1e-9)])))
    return float(np.mean(best)), float(np.mean(borda))


@pytest.mark.slow
def test_certainty_command_stores_exact_values_and_curve_uses_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    _model()
    run = tmp_path / "run"
    _sample(run)
    # no exact values yet: the approximation, named in the JSON and in the table's notes
    d = _curve(run, "--k", "4")
    assert d["meta"]["self_certainty"]["exact"] is False
    assert "top-k approximation" in d["meta"]["self_certainty"]["how"]
    r = runner.invoke(app, ["curve", str(run), "--methods", "self_certainty", "--k", "4", "--n-boot", "10"])
    assert r.exit_code == 0 and "self-certainty: top-k approximation" in r.output

    # another tokenizer is refused in one line, before anything is written
    r = runner.invoke(app, ["certainty", str(run), "--model", str(tiny_model_dir)])
    assert r.exit_code == 1 and "tokenizer" in r.output and "--model PATH" in r.output
    assert not (run / "scores" / "self_certainty").exists()

    r = runner.invoke(app, ["certainty", str(run), "--chunk", "5", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["scored"] == 16 and summary["already"] == 0 and summary["status"] == "new"
    store = SampleStore.open(run)
    rec = store.score_set_record("self_certainty")
    assert rec["config"]["model"] == str(Path(_model()).resolve()) and rec["config"]["how"].startswith("exact")
    shards = sorted((run / "scores" / "self_certainty").glob("part-*.parquet"))
    assert len(shards) == 4  # 16 samples in chunks of 5: each chunk its own atomic shard

    # stored values = the Python API's exact_self_certainty, float64
    want = _exact_by_key(store)
    t = store.score_table("self_certainty")
    got = dict(zip(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True),
                   t.column("score").to_pylist(), strict=True))  # fmt: skip
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-9, abs=1e-12)

    # a killed pass loses at most a chunk: drop one shard, rerun: only its samples are scored
    shards[1].unlink()
    r = runner.invoke(app, ["certainty", str(run), "--chunk", "5", "--json"])
    again = json.loads(r.stdout)
    assert again["scored"] == 5 and again["already"] == 11 and again["status"] == "same"
    t = SampleStore.open(run).score_table("self_certainty")
    assert t.num_rows == 16 and t.column("score").to_pylist() == pytest.approx([got[k] for k in sorted(got)], rel=1e-9)

    info = json.loads(runner.invoke(app, ["info", str(run), "--json"]).stdout)
    assert info["score_sets_stored"] == {"self_certainty": 16}

    # curve now reads the exact values, says so, and equals an independent computation
    d = _curve(run, "--k", "4")
    sc = d["meta"]["self_certainty"]
    assert sc["exact"] is True and "score set 'self_certainty'" in sc["source"]
    best, borda = _independent(store, got, 4, 0.5)
    assert d["methods"]["self_certainty"]["mean"][0] == pytest.approx(best, abs=1e-12)
    assert d["methods"]["self_certainty_borda"]["mean"][0] == pytest.approx(borda, abs=1e-12)
    assert d["meta"]["borda_power"] == 0.5
    d = _curve(run, "--k", "4", "--borda-power", "3")
    assert d["methods"]["self_certainty_borda"]["mean"][0] == pytest.approx(_independent(store, got, 4, 3.0)[1], abs=1e-12)
    assert d["meta"]["borda_power"] == 3.0
    r = runner.invoke(app, ["curve", str(run), "--methods", "self_certainty_borda", "--k", "4", "--n-boot", "10"])
    assert "self-certainty: exact, score set 'self_certainty'" in " ".join(r.output.split())


@pytest.mark.slow
def test_sample_self_certainty_stores_the_decode_loops_exact_values(tmp_path: Path) -> None:
    _model()
    # engines that cannot see the whole distribution refuse in one line naming the fix
    r = runner.invoke(app, ["sample", "--engine", "scripted", "--benchmark", "arith", "--limit", "2", "--n", "2",
                            "--self-certainty", "--no-progress", "--out", str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 1 and "--engine hf" in r.output and "ttscale certainty" in r.output
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    _sample(run, "--self-certainty", limit=3, n=3)
    store = SampleStore.open(run)
    assert store.manifest["engine"]["self_certainty"] is True
    want = _exact_by_key(store)
    got = {(s.problem_id, s.index): s.scores["self_certainty"] for s in store.samples()}
    assert got.keys() == want.keys()
    # the decode loop's logits (KV cache, batched rows) differ from one full forward pass only in
    # float32 rounding: measured ~1e-7 relative on this model
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-5)
    d = _curve(run, "--k", "3")
    assert d["meta"]["self_certainty"]["exact"] is True
    assert "stored at sampling" in d["meta"]["self_certainty"]["source"]
    best, borda = _independent(store, got, 3, 0.5)
    assert d["methods"]["self_certainty"]["mean"][0] == pytest.approx(best, abs=1e-12)
    assert d["methods"]["self_certainty_borda"]["mean"][0] == pytest.approx(borda, abs=1e-12)
    # resuming without the option would leave some samples without a value: refused
    r = runner.invoke(app, ["sample", "--engine", "hf", "--resume", "--n", "4", "--no-progress", "--out", str(run)])
    assert r.exit_code == 1 and "--self-certainty" in r.output


@pytest.mark.slow
def test_run_reports_which_self_certainty_it_used(tmp_path: Path) -> None:
    """``ttscale run --methods ...self_certainty`` (the pipeline path) reads the exact values a
    --self-certainty run stores and says so in its table and curve.json."""
    _model()
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", "--engine", "hf", "--benchmark", "arith", "--limit", "2", "--n", "2",
                            "--logprobs", "20", "--seed", "1", "--no-progress", "--self-certainty",
                            "--methods", "majority,self_certainty", "--out", str(run)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "self-certainty: exact, stored at sampling" in " ".join(r.output.split())
    meta = json.loads((run / "curve.json").read_text())["meta"]
    assert meta["self_certainty"]["exact"] is True and "borda_power" not in meta
