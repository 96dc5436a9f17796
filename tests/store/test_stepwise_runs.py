"""Step-wise runs in the store: step/parent/log-weight/fate columns, iid flag, weighted analysis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttscale.analysis import compute_curves
from ttscale.cli.app import app
from ttscale.errors import ConfigError, NonIIDPoolError
from ttscale.metrics.weighted import weighted_results
from ttscale.store import SAMPLE_SCHEMA, SampleStore
from ttscale.types import Problem, Sample

runner = CliRunner()


def particle(pid: str, i: int, answer: str, w: float, correct: bool, **kw: object) -> Sample:
    return Sample(pid, i, text=f"#### {answer}", answer=answer, correct=correct,
                  log_weight=math.log(w) + math.log(7.0), step=3, fate="kept", **kw)  # fmt: skip


def smc_run(tmp_path: Path) -> SampleStore:
    """Two problems of weighted particles, computed by hand:

    A: answers 1, 1, 2 with weights .3, .3, .4 (1 is right), plus a resampled-away particle with
       answer 2 and a huge weight that must not count: weighted vote picks 1 (.6) -> solved;
       the highest weight is the 2 (.4) -> not solved.
    B: answers 3, 4, 4 with weights .4, .35, .25 (4 is right): vote picks 4 (.6) -> solved;
       highest weight is 3 -> not solved.
    So weighted_vote = 1.0 and max_weight = 0.0. (Weights are scaled by 7: only ratios matter.)
    """
    store = SampleStore.create(tmp_path / "smc", {"model": "toy"})
    store.write_problems([Problem("A", "q"), Problem("B", "q")])
    gone = Sample("A", 3, text="#### 2", answer="2", correct=False, log_weight=50.0, step=2,
                  parent=0, fate="resampled")  # fmt: skip
    store.append(
        [
            particle("A", 0, "1", 0.3, True, parent=0),
            particle("A", 1, "1", 0.3, True, parent=0),
            particle("A", 2, "2", 0.4, False, parent=1),
            gone,
            particle("B", 0, "3", 0.4, False),
            particle("B", 1, "4", 0.35, True),
            particle("B", 2, "4", 0.25, True),
        ]
    )
    store.update_manifest(iid=False)
    return store


def test_stepwise_columns_round_trip(tmp_path: Path) -> None:
    store = smc_run(tmp_path)
    s = next(x for x in SampleStore.open(store.path).samples("A") if x.index == 3)
    assert (s.step, s.parent, s.log_weight, s.fate, s.pruned_at) == (2, 0, 50.0, "resampled", None)
    with pytest.raises(ConfigError, match="fate must be one of"):
        Sample("A", 0, fate="gone")


def test_old_shards_without_stepwise_columns_stay_readable(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "old", {"model": "toy"})
    store.append([Sample("p", 0, text="#### 1", answer="1", correct=True)])
    # rewrite the shard as a run made before the step-wise columns existed
    (shard,) = (store.path / "samples").glob("part-*.parquet")
    old = pq.read_table(shard).drop_columns(["step", "parent", "log_weight", "fate", "pruned_at"])
    assert "fate" not in old.column_names and len(old.schema) == len(SAMPLE_SCHEMA) - 5
    pq.write_table(old, shard)
    again = SampleStore.open(store.path)
    (s,) = list(again.samples())
    assert s.fate is None and s.step is None and s.answer == "1"
    pool = again.pool()
    assert pool.iid and pool.log_weight is None
    report = compute_curves(pool, ("coverage",), [1], n_boot=10)
    assert report.curves["coverage"].mean.tolist() == [1.0]


def test_weighted_pool_keeps_final_particles_and_refuses_iid_estimators(tmp_path: Path) -> None:
    pool = smc_run(tmp_path).pool()
    assert not pool.iid and pool.n_per_problem.tolist() == [3, 3]  # resampled-away one left out
    with pytest.raises(NonIIDPoolError, match="not iid draws"):
        compute_curves(pool, ("coverage", "majority"), [1, 2])
    rep = weighted_results(pool, n_boot=200, seed=0)
    assert rep.mean == {"weighted_vote": 1.0, "max_weight": 0.0}
    # ESS of A: 1 / (.3^2 + .3^2 + .4^2) = 1 / .34
    assert rep.ess[0] == pytest.approx(1 / 0.34)


def test_cli_fit_refuses_a_weighted_run(tmp_path: Path) -> None:
    store = smc_run(tmp_path)
    r = runner.invoke(app, ["fit", str(store.path)])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "not iid draws" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_weighted_results_need_correctness(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "u", {"model": "toy"})
    store.append([Sample("A", 0, text="x", answer="1", log_weight=0.0, fate="kept")])
    store.update_manifest(iid=False)
    with pytest.raises(ConfigError, match="verify the run first"):
        weighted_results(store.pool())


def test_weighted_results_all_zero_weights_select_nothing(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "z", {"model": "toy"})
    store.append(
        [Sample("A", 0, text="x", answer="1", correct=True, log_weight=-math.inf, fate="kept")]
    )
    store.update_manifest(iid=False)
    rep = weighted_results(store.pool(), n_boot=10)
    assert rep.mean["weighted_vote"] == 0.0 and math.isnan(rep.ess[0])


def test_cli_curve_on_a_weighted_run(tmp_path: Path) -> None:
    store = smc_run(tmp_path)
    # k-sample methods asked for explicitly: one line saying why not and what to run, nothing else
    r = runner.invoke(
        app, ["curve", str(store.path), "--methods", "coverage,majority", "--json", "--n-boot", "100"]
    )
    assert r.exit_code == 1 and r.stdout == ""
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "does not apply" in err[0]
    assert f"`ttscale curve {store.path}`" in err[0]
    # no methods asked for: the weighted results at the run's cost, exit 0
    r = runner.invoke(app, ["curve", str(store.path), "--json", "--n-boot", "100"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["runs"] == [] and {p["method"]: p["accuracy"]["mean"] for p in d["points"]} == {
        "weighted_vote": 1.0, "max_weight": 0.0,
    }
    # no particle count recorded: the final particles per problem (3 and 3); no token counts
    # stored: the tokens are unknown, not 0
    for p in d["points"]:
        assert p["kind"] == "smc" and p["problems"] == 2 and p["samples"]["mean"] == 3.0
        assert p["tokens"]["mean"] is None
    r = runner.invoke(app, ["curve", str(store.path)])
    assert r.exit_code == 0 and "tokens/problem" in r.stdout and "weighted_vote" in r.stdout


def test_repeated_runs_are_recorded_iid(tmp_path: Path) -> None:
    from ttscale import SamplingParams
    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.samplers import RepeatedSampler

    store = SampleStore.create(tmp_path / "r", {"model": "toy"})
    RepeatedSampler(ScriptedEngine(), SamplingParams(n=2, max_tokens=4), store, progress=False).run(
        [Problem("p", "q")]
    )
    assert SampleStore.open(store.path).manifest["iid"] is True
    # a run once marked non-iid stays non-iid
    store.update_manifest(iid=False)
    RepeatedSampler(ScriptedEngine(), SamplingParams(n=3, max_tokens=4), store, progress=False).run(
        [Problem("p", "q")]
    )
    assert SampleStore.open(store.path).manifest["iid"] is False
