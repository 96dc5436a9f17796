"""`ttscale smc`: a run with lineage, resumable per problem, weighted results from `curve`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.samplers.potentials import POTENTIAL_SPECS, make_potential, register_potential
from ttscale.store import SampleStore

runner = CliRunner()

POT = """
def score(problem, texts, finished):
    # reward in [0, 1]: the share of digits in the partial text
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]
"""


@pytest.fixture
def pot_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "smc_pot_mod.py").write_text(POT)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "py:smc_pot_mod:score"


def _args(out: Path, pot: str, *extra: str) -> list[str]:
    return [
        "smc", "--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--limit", "3",
        "--particles", "4", "--potential", pot, "--fk", "difference", "--lambda", "5",
        "--resample", "systematic", "--ess", "0.5", "--tokens-per-step", "4", "--max-tokens", "12",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_smc_run_lineage_resume_and_curve(tmp_path: Path, pot_module: str) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, [*_args(out, pot_module), "--plot-dir", str(tmp_path / "plots")])
    assert r.exit_code == 0, r.stderr + r.stdout
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 3 and all((tmp_path / "plots" / p).stat().st_size > 1000 for p in pngs)
    assert "shaping difference, lambda 5" in r.stderr  # says what it chose
    store = SampleStore.open(out)
    m = store.manifest
    assert m["iid"] is False and m["smc"]["particles"] == 4 and m["smc"]["shaping"] == "difference"
    assert sorted(m["smc_done"]["4"]) == sorted(store.problem_ids())
    samples = list(store.samples())
    by = {(s.problem_id, s.index): s for s in samples}
    for s in samples:
        assert s.fate in ("kept", "extended", "resampled") and s.step is not None
        if s.parent is not None:
            assert by[(s.problem_id, s.parent)].fate == "extended"
    assert all(
        sum(s.fate == "kept" for s in samples if s.problem_id == p) >= 1
        for p in store.problem_ids()
    )
    # accounting covers every particle-step, resampled-away ones included
    acct = store.accounting()
    assert acct["generated_tokens"] == sum(s.num_tokens or 0 for s in samples)
    # resume: nothing is regenerated
    before = len(store)
    r = runner.invoke(app, [*_args(out, pot_module), "--resume"])
    assert r.exit_code == 0, r.stderr
    assert "(3 resumed)" in r.stdout and "0 tokens generated" in r.stdout
    assert len(SampleStore.open(out)) == before
    # weighted results with the budget
    r = runner.invoke(app, ["curve", str(out), "--json", "--n-boot", "50"])
    assert r.exit_code == 0, r.stderr
    (pt, _) = json.loads(r.stdout)["points"]
    assert pt["kind"] == "smc" and pt["problems"] == 3 and pt["samples"]["mean"] == 4
    assert math.isclose(pt["tokens"]["mean"], acct["generated_tokens"] / 3)


def test_smc_reads_back_a_problem_stored_but_not_marked_done(tmp_path: Path, pot_module: str) -> None:
    # a run killed between storing a problem's particles and recording it done
    out = tmp_path / "run"
    assert runner.invoke(app, [*_args(out, pot_module), "--no-verify"]).exit_code == 0
    full = {(s.problem_id, s.index): s.text for s in SampleStore.open(out).samples()}
    store = SampleStore.open(out)
    acct = store.accounting()["generated_tokens"]
    last = sorted(store.problem_ids())[-1]

    def unmark(m: dict) -> None:  # type: ignore[type-arg]
        m["smc_done"]["4"] = [p for p in m["smc_done"]["4"] if p != last]

    store.modify_manifest(unmark)
    r = runner.invoke(app, [*_args(out, pot_module), "--resume", "--no-verify"])
    assert r.exit_code == 0, r.stderr
    assert "(3 resumed)" in r.stdout and "0 tokens generated" in r.stdout  # not rerun
    again = SampleStore.open(out)
    assert {(s.problem_id, s.index): s.text for s in again.samples()} == full
    assert again.accounting()["generated_tokens"] == acct  # not counted twice
    assert last in again.manifest["smc_done"]["4"]


def test_smc_bad_input_is_one_line(tmp_path: Path, pot_module: str) -> None:
    r = runner.invoke(app, [*_args(tmp_path / "a", "nope:x")])
    assert r.exit_code == 1 and r.stderr.strip().startswith("error: unknown potential 'nope:x'")
    r = runner.invoke(app, [*_args(tmp_path / "b", pot_module), "--fk", "bogus"])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    r = runner.invoke(app, [*_args(tmp_path / "c", "rm:")])
    assert r.exit_code == 1 and "rm:PATH" in r.stderr


def test_potential_registry_is_open() -> None:
    seen: dict[str, object] = {}

    def factory(arg: str, **options: object) -> object:
        seen.update(arg=arg, **options)
        return lambda p, t, f: [0.0] * len(t)

    register_potential("test-pot", factory)
    try:
        pot = make_potential("test-pot:xyz", value="prob")
        assert seen == {"arg": "xyz", "value": "prob"}
        assert callable(pot)
    finally:
        POTENTIAL_SPECS.pop("test-pot")


def test_search_beam_runs_stores_the_tree_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "beam"
    args = [
        "smc", "--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--limit", "2",
        "--particles", "4", "--potential", "arith-prm", "--search", "beam", "--width", "2",
        "--tokens-per-step", "4", "--max-tokens", "12", "--out", str(out), "--no-verify",
    ]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "search beam, N=4, M=2" in r.output
    store = SampleStore.open(out)
    m = store.manifest
    assert m["iid"] is False and m["search"]["search"] == "beam" and m["search"]["width"] == 2
    assert sorted(m["search_done"]["4"]) == sorted(store.problem_ids())
    fates = {s.fate for s in store.samples()}
    assert "kept" in fates and fates <= {"kept", "pruned", "extended"}
    n = len(store)
    r2 = runner.invoke(app, [*args, "--resume"])
    assert r2.exit_code == 0, r2.output
    assert "0 tokens generated in this call" in r2.output and len(SampleStore.open(out)) == n
    # other search settings cannot resume this run, nor can SMC
    i = args.index("--width")
    r3 = runner.invoke(app, [*args[: i + 1], "4", *args[i + 2 :], "--resume"])
    assert r3.exit_code == 1
    assert r3.output.strip().splitlines()[-1].startswith("error: run directory")
    assert "made with search width 2, not 4" in r3.output, r3.output
    j = args.index("--search")
    r4 = runner.invoke(app, [*args[:j], *args[j + 4 :], "--resume"])
    assert r4.exit_code == 1 and "not from SMC" in r4.output, r4.output


def test_search_needs_particles_divisible_by_width(tmp_path: Path) -> None:
    args = [
        "smc", "--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--limit", "1",
        "--particles", "4", "--potential", "arith-prm", "--search", "dvts", "--width", "3",
        "--out", str(tmp_path / "x"),
    ]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        "error: --search dvts needs --particles divisible by --width 3, got 4"
    )


def test_resume_with_other_smc_settings_is_refused(tmp_path: Path, pot_module: str) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, [*_args(out, pot_module), "--no-verify"]).exit_code == 0
    before = SampleStore.open(out).manifest
    for flag, value, what in (
        ("--particles", "8", "particles 4, not 8"),
        ("--lambda", "3", "lambda 5.0"),
    ):
        args = [*_args(out, pot_module), "--no-verify", "--resume"]
        args[args.index(flag) + 1] = value
        r = runner.invoke(app, args)
        # one line, before the engine is built
        assert r.exit_code == 1 and r.stderr.strip().startswith("error: ") and what in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert SampleStore.open(out).manifest == before  # nothing recorded


def test_tempering_needs_raw_logprobs() -> None:
    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.errors import ConfigError
    from ttscale.samplers import LikelihoodTempering, SMCSampler

    with pytest.raises(ConfigError, match="raw_logprobs"):
        SMCSampler(ScriptedEngine({"p": "x"}), LikelihoodTempering(2.0))


def test_curve_over_smc_runs_with_particles_and_tokens(tmp_path: Path, pot_module: str) -> None:
    runs = []
    for n in ("2", "8"):
        out = tmp_path / f"run{n}"
        args = _args(out, pot_module)
        args[args.index("--particles") + 1] = n
        assert runner.invoke(app, args).exit_code == 0
        runs.append(str(out))
    plot = tmp_path / "acc.png"
    r = runner.invoke(app, ["curve", *runs, "--json", "--n-boot", "50", "--plot", str(plot)])
    assert r.exit_code == 0, r.stderr
    pts = [p for p in json.loads(r.stdout)["points"] if p["method"] == "weighted_vote"]
    assert [p["run"] for p in pts] == runs and [p["particles"] for p in pts] == [2, 8]
    # more particles spend more tokens
    assert pts[1]["tokens"]["mean"] > pts[0]["tokens"]["mean"]
    assert plot.stat().st_size > 1000
