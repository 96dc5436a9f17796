"""End to end on real HumanEval problems: verify with the full and the visible tests, then the
imperfect-verifier analysis from the two verdict sets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import DataError
from ttscale.store import SampleStore
from ttscale.types import Sample

runner = CliRunner()


@pytest.mark.bubblewrap
def test_full_and_visible_code_verdicts_feed_verifier_utility(tmp_path):
    import ttscale.evals

    try:
        problems = ttscale.evals.load_problems("humaneval", limit=4)
    except DataError as e:
        pytest.skip(str(e))
    store = SampleStore.create(tmp_path / "run", {"benchmark": "humaneval"})
    store.write_problems(problems)
    store.append(
        [Sample(p.id, 0, text=p.meta["canonical_solution"]) for p in problems]
        + [Sample(p.id, 1, text="    return None\n") for p in problems]
    )
    for spec in ("code", "code:visible"):
        r = runner.invoke(app, ["verify", str(store.path), "--verifier", spec, "--json"])
        assert r.exit_code == 0, r.output
    store = SampleStore.open(store.path)
    assert store.verifiers() == ["code", "code-visible"]
    full = {(v.problem_id, v.index): v.correct for v in store.verdicts("code")}
    assert [full[(p.id, 0)] for p in problems] == [True] * 4
    assert [full[(p.id, 1)] for p in problems] == [False] * 4
    assert store.manifest["verifiers"]["code"]["isolation"] == "bubblewrap"
    r = runner.invoke(
        app,
        ["verifier-utility", "--run", str(store.path), "--weak", "code-visible",
         "--strong", "code", "--max-k", "2", "--json", "--cost-ratio", "1"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    weak = {(v.problem_id, v.index): v.correct for v in store.verdicts("code-visible")}
    tp = sum(1 for k, ok in weak.items() if ok and full[k])
    fp = sum(1 for k, ok in weak.items() if ok and not full[k])
    # closed form of docs/algorithms.md 7.3 with n = 2 samples per problem, averaged over problems
    per_problem = []
    for p in problems:
        m_tp = sum(1 for i in (0, 1) if weak[(p.id, i)] and full[(p.id, i)])
        m_fp = sum(1 for i in (0, 1) if weak[(p.id, i)] and not full[(p.id, i)])
        m = m_tp + m_fp
        reach = [0.0 if m == 0 else 1 - ((2 - m) / 2), 0.0 if m == 0 else 1.0]
        per_problem.append([0.0 if m == 0 else r_ * (m_tp - m_fp) / m for r_ in reach])
    expected = [sum(x[j] for x in per_problem) / len(problems) for j in (0, 1)]
    assert d["utility"] == pytest.approx(expected)
    assert d["rates"]["false_positive_rate"] == pytest.approx(fp / 4 if fp else 0.0)
    assert tp >= 1
