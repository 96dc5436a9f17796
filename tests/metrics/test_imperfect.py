"""Imperfect verifiers on a stored run (ttscale.metrics.imperfect) and the verifier-utility CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import ConfigError
from ttscale.metrics.imperfect import verifier_utility, weak_strong_counts
from ttscale.metrics.scaling import two_type_utility
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample, Verdict, VerdictStatus

runner = CliRunner()


def _verdict(pid: str, i: int, ok: bool | None, name: str) -> Verdict:
    status = VerdictStatus.ERROR if ok is None else (VerdictStatus.PASS if ok else VerdictStatus.FAIL)
    return Verdict(problem_id=pid, index=i, status=status, verifier=name, correct=ok)


def _store(tmp_path, tasks: dict[str, list[tuple[bool | None, bool | None]]], extra=()) -> SampleStore:
    """A run whose sample i of task p has weak/strong verdicts tasks[p][i] (None = not verified
    by that verifier when it is the only one missing, else an error verdict); ``extra``: problem
    ids recorded without samples."""
    store = SampleStore.create(tmp_path / "run")
    store.write_problems([Problem(p, p, None) for p in [*tasks, *extra]])
    store.append([Sample(p, i, text=f"{p}{i}") for p, vs in tasks.items() for i in range(len(vs))])
    for name, j in (("weak", 0), ("strong", 1)):
        store.add_verdicts(
            [_verdict(p, i, v[j], name) for p, vs in tasks.items() for i, v in enumerate(vs)],
            verifier=name,
        )
    return store


# issue 12's minimal case: A has 1 sample passing both; B has 4, only the last passes both
MINIMAL = {"A": [(True, True)], "B": [(False, False)] * 3 + [(True, True)]}
ARGS = ["verifier-utility", "--weak", "weak", "--strong", "strong"]


def test_cli_k_axis_is_not_cut_at_the_smallest_sample_count(tmp_path):
    store = _store(tmp_path, MINIMAL)
    r = runner.invoke(app, [*ARGS, "--run", str(store.path), "--max-k", "4", "--cost-ratio", "1",
                            "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    # A: 1 at every k; B: k/4 -> mean (1 + k/4)/2
    assert d["k"] == [1, 2, 3, 4]
    np.testing.assert_allclose(d["utility"], [0.625, 0.75, 0.875, 1.0], rtol=1e-12)
    assert d["optimal_k"] == 4
    assert d["n_tasks"] == 2 and d["empty_tasks"]["count"] == 0
    # without --max-k the axis runs to the largest per-task sample count
    r = runner.invoke(app, [*ARGS, "--run", str(store.path), "--json"])
    assert json.loads(r.output)["k"] == [1, 2, 3, 4]
    # the library gives the same
    rep = verifier_utility(store, "weak", "strong", cost_ratio=1.0, max_k=4)
    np.testing.assert_allclose(rep.utility, [0.625, 0.75, 0.875, 1.0], rtol=1e-12)
    assert rep.optimal_k == 4


def test_problems_without_samples_are_dropped_counted_or_refused(tmp_path):
    store = _store(tmp_path, MINIMAL, extra=("C",))
    base = [*ARGS, "--run", str(store.path), "--max-k", "4", "--json"]
    d = json.loads(runner.invoke(app, base).output)
    assert d["empty_tasks"] == {"count": 1, "ids": ["C"], "policy": "drop"}
    np.testing.assert_allclose(d["utility"], [0.625, 0.75, 0.875, 1.0])
    d = json.loads(runner.invoke(app, [*base, "--empty", "zero"]).output)
    np.testing.assert_allclose(d["utility"], [1.25 / 3, 0.5, 1.75 / 3, 2 / 3])  # (1 + k/4 + 0)/3
    assert d["n_tasks"] == 3
    r = runner.invoke(app, [*base, "--empty", "error"])
    assert r.exit_code == 1 and r.output.startswith("error: 1 problem(s) have no sample")
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, [*ARGS, "--run", str(store.path), "--max-k", "4"])
    assert r.exit_code == 0 and "no sample checked by both verifiers: 1 (left out): C" in r.output


def test_samples_one_verifier_did_not_check_are_left_out_and_counted(tmp_path):
    store = _store(tmp_path, {"A": [(True, True), (True, None)], "B": [(None, False), (False, False)]})
    store.append([Sample("B", 2, text="unverified")])
    c = weak_strong_counts(store, "weak", "strong")
    assert c.problem_ids == ("A", "B")
    assert c.n.tolist() == [1, 1] and c.excluded_samples == 3
    rep = verifier_utility(c, "weak", "strong", max_k=2)
    np.testing.assert_allclose(rep.utility, [0.5, 0.5])  # A: 1, B: 0 (nothing accepted)


def test_false_negative_tasks_are_reported_and_dropped_on_request(tmp_path):
    # D: the weak verifier rejects both samples, the strong accepts one -> a false-negative task
    tasks = {**MINIMAL, "D": [(False, True), (False, False)]}
    store = _store(tmp_path, tasks)
    base = [*ARGS, "--run", str(store.path), "--max-k", "4", "--json"]
    d = json.loads(runner.invoke(app, base).output)
    assert d["false_negative_tasks"]["ids"] == ["D"] and not d["false_negative_tasks"]["dropped"]
    np.testing.assert_allclose(d["utility"], [1.25 / 3, 0.5, 1.75 / 3, 2 / 3])  # D counts 0
    d = json.loads(runner.invoke(app, [*base, "--drop-false-negatives"]).output)
    assert d["false_negative_tasks"] == {
        "rule": "strong pass rate > weak pass rate", "count": 1, "ids": ["D"], "dropped": True
    }
    np.testing.assert_allclose(d["utility"], [0.625, 0.75, 0.875, 1.0])
    out = runner.invoke(app, [*ARGS, "--run", str(store.path), "--drop-false-negatives"]).output
    assert "false-negative tasks (strong pass rate > weak pass rate): 1 (dropped): D" in out


def _counts_store(tmp_path, n, weak, strong, both) -> SampleStore:
    tasks = {}
    for t, (nn, w, s, b) in enumerate(zip(n, weak, strong, both, strict=True)):
        rows = [(True, True)] * b + [(True, False)] * (w - b) + [(False, True)] * (s - b)
        rows += [(False, False)] * (nn - w - s + b)
        tasks[f"T{t}"] = rows
    return _store(tmp_path, tasks)


def test_fit_from_a_run_with_both_estimators_and_a_plot(tmp_path):
    # the four tasks of tests/test_scaling.py (hand-derived there): paper r = (1, 0.2),
    # s = 7/12, c = 1; pooled r = (1, 3/16), c = 6/7, s = 11/13; p_easy = 1/4
    store = _counts_store(tmp_path, [4, 4, 2, 10], [4, 3, 1, 0], [4, 2, 0, 1], [4, 2, 0, 0])
    png = tmp_path / "u.png"
    r = runner.invoke(app, [*ARGS, "--run", str(store.path), "--fit", "--cost-ratio", "2",
                            "--mode", "notebook", "--max-k", "6", "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["mode"] == "notebook" and d["v_fp"] == -2.0
    paper, pooled = d["fits"]["paper"], d["fits"]["pooled"]
    assert (paper["r_easy"], paper["r_hard"]) == pytest.approx((1.0, 0.2))
    assert paper["soundness"] == pytest.approx(7 / 12) and paper["completeness"] == 1.0
    assert (pooled["r_easy"], pooled["r_hard"]) == pytest.approx((1.0, 3 / 16))
    assert pooled["completeness"] == pytest.approx(6 / 7)
    assert pooled["soundness"] == pytest.approx(11 / 13)
    assert paper["p_easy"] == pooled["p_easy"] == 0.25
    np.testing.assert_allclose(
        paper["utility"],
        two_type_utility(6, r=(1.0, 0.2), priors=(0.25, 0.75), c=1.0, s=7 / 12, v_fp=-2.0,
                         mode="notebook"),
        rtol=1e-12,
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = runner.invoke(app, [*ARGS, "--run", str(store.path), "--fit"]).output
    assert "fitted two-type model, mode exact" in text
    assert "fit [paper]: r_easy = 1.0000, r_hard = 0.2000" in text
    assert "fit [pooled]: r_easy = 1.0000, r_hard = 0.1875" in text


def test_analytical_output_echoes_the_model_and_the_mode():
    r = runner.invoke(app, ["verifier-utility", "--max-k", "3", "--s", "0.6", "--json"])
    d = json.loads(r.output)
    assert d["source"] == "analytical" and d["mode"] == "exact"
    assert d["model"] == {"r": [0.87, 0.13], "priors": [0.58, 0.42], "c": 1.0, "s": 0.6,
                          "v_fp": -1.0, "v_correct": 1.0}
    # docs/algorithms.md 7.2: V_fp = -1, notebook U(1..3) = 0.449, 0.488433, 0.463704
    r = runner.invoke(app, ["verifier-utility", "--max-k", "3", "--mode", "notebook"])
    assert r.exit_code == 0
    assert "two-type model, mode notebook" in r.output
    assert "assumed: r = 0.87, 0.13; priors = 0.58, 0.42; c = 1; s = 0.75; V_fp = -1" in r.output
    assert "K =    2: utility +0.4884" in r.output


def test_every_verifier_utility_option_has_help():
    cmd = typer.main.get_command(app).commands["verifier-utility"]  # type: ignore[attr-defined]
    missing = [p.name for p in cmd.params if not getattr(p, "help", None)]
    assert missing == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--weak", "w"], "--weak need --run"),
        (["--fit"], "--fit need --run"),
        (["--mode", "approx"], "--mode must be exact or notebook"),
        (["--r", "0.5,x"], "--r must be a comma-separated list of numbers"),
        (["--run", "RUN", "--v-fp", "-1", "--weak", "w", "--strong", "s"], "--v-fp describe"),
        (["--run", "RUN", "--weak", "weak"], "--run needs --weak and --strong"),
        (["--run", "RUN", "--weak", "weak", "--strong", "nope"], "no verdicts from the strong"),
        (["--run", "RUN", "--weak", "weak", "--strong", "strong", "--empty", "x"], "--empty must"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, argv, needle):
    store = _store(tmp_path, MINIMAL)
    argv = [str(store.path) if a == "RUN" else a for a in argv]
    r = runner.invoke(app, ["verifier-utility", *argv])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: ") and needle in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_library_rejects_bad_arguments(tmp_path):
    store = _store(tmp_path, MINIMAL)
    with pytest.raises(ConfigError):
        verifier_utility(store, "weak", "weak")
    with pytest.raises(ConfigError):
        verifier_utility(store, "weak", "strong", mode="approx")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        verifier_utility(store, "weak", "strong", cost_ratio=-1.0)
