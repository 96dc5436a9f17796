"""EvalPlus (HumanEval+ / MBPP+) test files as a strong code verifier: code:plus=PATH / code:base=PATH.

The tests write a small file in the format EvalPlus publishes (one JSON object per line with
task_id, prompt, entry_point, canonical_solution, base_input, plus_input, atol; gzipped) and
check verdicts worked out by hand for each candidate.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import ConfigError, DataError
from ttscale.evals.evalplus import load_evalplus
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.verifiers.base import make_verifier

runner = CliRunner()

ADD = 'def add(a, b):\n    """Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n'
MEAN = 'def mean(xs):\n    """Arithmetic mean of a non-empty list."""\n'
ZERO = 'def find_zero(xs):\n    """A root of the polynomial xs[0] + xs[1] x + ..."""\n'
BISECT = (
    "    lo, hi = -100.0, 100.0\n"
    "    f = lambda x: sum(c * x ** i for i, c in enumerate(xs))\n"
    "    for _ in range(200):\n"
    "        mid = (lo + hi) / 2\n"
    "        if (f(lo) < 0) == (f(mid) < 0):\n"
    "            lo = mid\n"
    "        else:\n"
    "            hi = mid\n"
    "    return lo\n"
)
TASKS = [
    {"task_id": "HumanEval/0", "entry_point": "add", "prompt": ADD,
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    pass\n",
     "contract": "", "base_input": [[1, 2], [3, 4]], "plus_input": [[-1, 1], [10**20, 1]],
     "atol": 0},
    {"task_id": "HumanEval/2", "entry_point": "mean", "prompt": MEAN,
     "canonical_solution": "    return sum(xs) / len(xs)\n",
     "base_input": [[[1.0, 2.0]]], "plus_input": [[[0.1, 0.2, 0.3]], [[1, 2, 4]]], "atol": 0},
    # (x - 1)(x - 2)(x - 3): the oracle's bisection finds 3; any root passes (EvalPlus's check)
    {"task_id": "HumanEval/32", "entry_point": "find_zero", "prompt": ZERO,
     "canonical_solution": BISECT, "base_input": [[[-6, 11, -6, 1]]],
     "plus_input": [[[-6, 11, -6, 1]], [[-2, 1]]], "atol": 0.0001},
    {"task_id": "HumanEval/7", "entry_point": "boom", "prompt": "def boom(x):\n",
     "canonical_solution": "    raise ValueError(x)\n", "base_input": [[1]],
     "plus_input": [[2]], "atol": 0},
    {"task_id": "Mbpp/2", "entry_point": "common", "prompt": '"""\nShared elements.\n"""\n',
     "canonical_solution": "def common(a, b):\n    return sorted(set(a) & set(b))\n",
     "base_input": [[[1, 2, 3], [2, 3, 4]]], "plus_input": [[[5, 5, 1], [1, 5]]], "atol": 0},
]


@pytest.fixture(scope="module")
def plus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalplus") / "HumanEvalPlus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in TASKS:
            f.write(json.dumps(t) + "\n")
    return path


def he(task_id: str, prompt: str, entry: str) -> Problem:
    return Problem(task_id, prompt, "def check(candidate):\n    pass\n",
                   meta={"task_id": task_id, "entry_point": entry, "code_prompt": prompt,
                         "format": "humaneval"})


def run(v, problem: Problem, *texts: str):
    return v.verify(problem, [Sample(problem.id, i, text=t) for i, t in enumerate(texts)])


def test_plus_and_base_suites_against_the_oracle(plus_file):
    plus = make_verifier(f"code:plus={plus_file}", timeout=5.0, workers=2)
    base = make_verifier(f"code:base={plus_file}", timeout=5.0, workers=2)
    assert (plus.name, base.name) == ("code-plus", "code-base")
    assert plus.info()["evalplus"]["sha256"] == load_evalplus(plus_file).sha256
    p = he("HumanEval/0", ADD, "add")
    texts = (
        "    return a + b\n",
        "    return abs(a) + b\n",  # right on the base inputs (a > 0), wrong on (-1, 1)
        "    return float(a + b)\n",  # 3.0 == 3 (exact match), but 1e20 + 1 loses the 1
    )
    # plus: (-1, 1) -> 0; (1e20, 1) -> 100000000000000000001
    assert [v.correct for v in run(plus, p, *texts)] == [True, False, False]
    assert [v.correct for v in run(base, p, *texts)] == [True, True, True]
    vs = run(plus, p, *texts)
    assert vs[2].score == 0.5 and "EvalPlus plus input 1" in vs[2].detail
    assert all(v.meta["tests"] == "plus" and v.verifier == "code-plus" for v in vs)


def test_float_outputs_use_the_tolerance_and_types(plus_file):
    plus = make_verifier(f"code:plus={plus_file}", timeout=5.0)
    p = he("HumanEval/2", MEAN, "mean")
    texts = (
        "    import math\n    return math.fsum(xs) / len(xs)\n",  # 0.2 vs 0.20000000000000004: within 1e-6
        "    return round(sum(xs) / len(xs), 2)\n",  # 2.33 vs 2.3333...: off by 3e-3
        "    return [sum(xs) / len(xs)]\n",  # a list where a float is expected
    )
    assert [v.correct for v in run(plus, p, *texts)] == [True, False, False]


def test_find_zero_accepts_any_root(plus_file):
    plus = make_verifier(f"code:plus={plus_file}", timeout=5.0)
    p = he("HumanEval/32", ZERO, "find_zero")
    texts = (
        "    return 1.0 if len(xs) == 4 else 2.0\n",  # roots 1 (not the oracle's 3) and 2
        "    return 1.00000001 if len(xs) == 4 else 2.0\n",  # |p(x)| = 2e-8 <= 1e-4
        "    return 0.0\n",  # p(0) = -6
    )
    assert [v.correct for v in run(plus, p, *texts)] == [True, True, False]


def test_mbpp_task_ids_and_missing_or_broken_tasks(plus_file):
    plus = make_verifier(f"code:plus={plus_file}", timeout=5.0)
    mbpp = Problem("mbpp-2", "Shared elements.", "assert common([1], [1]) == [1]",
                   meta={"task_id": 2, "format": "mbpp", "test_list": ["assert True"]})
    vs = run(plus, mbpp, "```python\ndef common(a, b):\n    return sorted(set(a) & set(b))\n```",
             "def common(a, b):\n    return list(set(a) & set(b)) + [0]\n")
    assert [v.correct for v in vs] == [True, False]
    other = he("HumanEval/99", ADD, "add")
    vs = run(plus, other, "    return a + b\n")
    assert vs[0].status is VerdictStatus.ERROR and vs[0].correct is None
    assert "no EvalPlus task for HumanEval/99" in vs[0].detail
    broken = he("HumanEval/7", "def boom(x):\n", "boom")
    vs = run(plus, broken, "    return x\n")
    assert vs[0].status is VerdictStatus.ERROR and "oracle of HumanEval/7 failed" in vs[0].detail


def test_bad_specs_and_files(tmp_path, plus_file):
    with pytest.raises(ConfigError, match="needs the EvalPlus file"):
        make_verifier("code:plus")
    with pytest.raises(ConfigError, match="code:plus=PATH"):
        make_verifier("code:extra=x.jsonl")
    with pytest.raises(DataError, match="not found"):
        make_verifier(f"code:plus={tmp_path / 'missing.jsonl'}")
    origin = tmp_path / "HumanEvalPlus-OriginFmt.jsonl"
    origin.write_text(json.dumps({"task_id": "HumanEval/0", "prompt": ADD, "entry_point": "add",
                                  "canonical_solution": "", "test": "def check(c): pass"}) + "\n")
    with pytest.raises(DataError, match="no plus_input"):
        make_verifier(f"code:plus={origin}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "plus_input": []}) + "\n")
    with pytest.raises(DataError, match="missing"):
        load_evalplus(bad)
    r = runner.invoke(app, ["verify", str(tmp_path), "--verifier", "code:plus"])
    assert r.exit_code == 1 and r.output.startswith("error: ")


def test_weak_base_strong_plus_end_to_end(tmp_path, plus_file):
    # the paper's pair on two tasks, two samples each:
    #   HumanEval/0: "a + b" (base pass, plus pass), "abs(a) + b" (base pass, plus fail)
    #   HumanEval/2: "fsum/len" (pass, pass), "round(.., 2)" (base pass: 1.5; plus fail)
    # per task m_tp = 1, m_fp = 1, n = 2: reward@1 = (1 - C/B)/2, reward@2 = (1 - C/B)/2 ... with
    # C/B = 0.5: k=1 -> P(accepted in 1 draw) = 1, value (1 - 0.5)/2 = 0.25 for both k
    store = SampleStore.create(tmp_path / "run")
    store.write_problems([he("HumanEval/0", ADD, "add"), he("HumanEval/2", MEAN, "mean")])
    store.append([
        Sample("HumanEval/0", 0, text="    return a + b\n"),
        Sample("HumanEval/0", 1, text="    return abs(a) + b\n"),
        Sample("HumanEval/2", 0, text="    import math\n    return math.fsum(xs) / len(xs)\n"),
        Sample("HumanEval/2", 1, text="    return round(sum(xs) / len(xs), 2)\n"),
    ])
    for suite in ("base", "plus"):
        r = runner.invoke(app, ["verify", str(store.path), "--verifier",
                                f"code:{suite}={plus_file}", "--json"])
        assert r.exit_code == 0, r.output
    store = SampleStore.open(store.path)
    assert {"code-base", "code-plus"} <= set(store.verifiers())
    r = runner.invoke(app, ["verifier-utility", "--run", str(store.path), "--weak", "code-base",
                            "--strong", "code-plus", "--cost-ratio", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    np.testing.assert_allclose(d["utility"], [0.25, 0.25])
    assert d["rates"]["false_positive_rate"] == 1.0 and d["rates"]["completeness"] == 1.0
    assert d["false_negative_tasks"]["count"] == 0


def test_suite_time_limit_scales_with_the_oracle(plus_file):
    # --timeout is a floor: the whole suite gets max(timeout, 1 + 4 x the oracle's seconds),
    # rounded up to half seconds; the oracle of add takes well under a second, so >= 1.0 here
    plus = make_verifier(f"code:plus={plus_file}", timeout=0.5)
    p = he("HumanEval/0", ADD, "add")
    vs = run(plus, p, "    import time\n    time.sleep(0.35)\n    return a + b\n")
    assert vs[0].meta["timeout_s"] >= 1.0 and (2 * vs[0].meta["timeout_s"]).is_integer()
    assert vs[0].correct is True  # 2 x 0.35 s: over the 0.5 s floor, within the suite's limit
    full = make_verifier("code", timeout=0.5)
    slow = run(full, Problem("HumanEval/0", ADD, "def check(c):\n    assert c(1, 2) == 3\n"
                             "    assert c(3, 4) == 7\n",
                             meta={"entry_point": "add", "code_prompt": ADD, "format": "humaneval"}),
               "    import time\n    time.sleep(0.35)\n    return a + b\n")
    assert slow[0].status is VerdictStatus.TIMEOUT  # the same program under the plain 0.5 s limit
