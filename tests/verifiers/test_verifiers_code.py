"""CodeVerifier: problem formats, verdict mapping, answer keys, visible vs full suites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import ConfigError, DataError, SandboxError
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.verifiers.base import Verifier, make_verifier
from ttscale.verifiers.code import CodeVerifier, doctest_cases, extract_code

runner = CliRunner()
ADD_PROMPT = 'def add(a, b):\n    """Add two numbers.\n    >>> add(2, 2)\n    4\n    """\n'
ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def cv():
    return CodeVerifier(timeout=1.5, workers=2)


def humaneval_problem(**meta) -> Problem:
    return Problem(
        id="he/add",
        prompt=ADD_PROMPT,
        reference=ADD_TEST,
        meta={"entry_point": "add", "code_prompt": ADD_PROMPT, "format": "humaneval", **meta},
    )


def samples(pid: str, *texts: str) -> list[Sample]:
    return [Sample(problem_id=pid, index=i, text=t) for i, t in enumerate(texts)]


@pytest.mark.bubblewrap
def test_humaneval_statuses(cv):
    p = humaneval_problem()
    texts = (
        "    return a + b\n",
        "    return a - b\n",
        "    while True:\n        pass\n",
        "    return a +\n",
        "    raise ValueError('boom')\n",
        "    import sys; sys.exit(0)\n",
        "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\n",
    )
    vs = cv.verify(p, samples(p.id, *texts))
    assert [v.status for v in vs] == [
        VerdictStatus.PASS,
        VerdictStatus.FAIL,
        VerdictStatus.TIMEOUT,
        VerdictStatus.SYNTAX_ERROR,
        VerdictStatus.FAIL,
        VerdictStatus.FAIL,
        VerdictStatus.PASS,
    ]
    assert [v.correct for v in vs] == [True, False, False, False, False, False, True]
    assert [v.index for v in vs] == list(range(len(texts)))
    assert all(v.verifier == "code" and v.problem_id == p.id for v in vs)
    assert "boom" in vs[4].detail
    assert "assert candidate(1, 2) == 3" in vs[1].detail
    assert vs[0].score == 1.0 and vs[1].score == 0.0
    assert vs[0].meta["isolation"] == "bubblewrap"


@pytest.mark.bubblewrap
def test_answer_key_is_a_behaviour_signature(cv):
    p = humaneval_problem()
    vs = cv.verify(
        p,
        samples(
            p.id,
            "    return a + b\n",
            "    # same behaviour, different text\n    s = b\n    return s + a\n",
            "    return a - b\n",
            "    return a +\n",
        ),
    )
    assert vs[0].answer is not None and vs[0].answer.startswith("sig:")
    assert vs[0].answer == vs[1].answer
    assert vs[2].answer != vs[0].answer
    assert vs[3].answer is None  # did not load


@pytest.mark.bubblewrap
def test_mbpp_asserts_visible_and_full(cv):
    tests = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1"]
    p = Problem(
        id="mbpp/1",
        prompt="square a number",
        reference="\n".join(tests),
        meta={
            "format": "mbpp",
            "test_list": tests,
            "challenge_test_list": ["assert sq(10) == 100"],
            "test_setup_code": "",
            "entry_point": "sq",
        },
    )
    texts = (
        "```python\ndef sq(x):\n    return x * x\n```",
        "```python\ndef sq(x):\n    return 4 if x == 2 else 0\n```",  # overfits the first test
        "def sq(x):\n    return x * x if x < 5 else 0\n",  # fails only the hidden test
    )
    full = cv.verify(p, samples(p.id, *texts))
    assert [v.status for v in full] == [VerdictStatus.PASS, VerdictStatus.FAIL, VerdictStatus.FAIL]
    assert full[1].score == pytest.approx(1 / 4)
    assert full[2].score == pytest.approx(3 / 4)
    assert "assert sq(3) == 9" in full[1].detail
    assert "assert sq(10) == 100" in full[2].detail
    visible = CodeVerifier(timeout=1.5, workers=2, tests="visible").verify(p, samples(p.id, *texts))
    assert all(v.status is VerdictStatus.PASS for v in visible)
    assert all(v.meta["cases_total"] == 1 for v in visible)


@pytest.mark.bubblewrap
def test_stdio_problem(cv):
    p = Problem(
        id="cc/1",
        prompt="add two numbers",
        meta={
            "format": "stdio",
            "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
            "private_tests": {"input": ["5 5\n", "-1 1\n"], "output": ["10\n", "0\n"]},
        },
    )
    texts = (
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "a, b = map(int, input().split())\nprint(b + a)\n",
        "a, b = map(int, input().split())\nprint(3)\n",
    )
    vs = cv.verify(p, samples(p.id, *texts))
    assert [v.status for v in vs] == [VerdictStatus.PASS, VerdictStatus.PASS, VerdictStatus.FAIL]
    assert vs[2].score == pytest.approx(1 / 3)
    assert vs[0].answer == vs[1].answer != vs[2].answer
    weak = CodeVerifier(timeout=1.5, workers=2, tests="visible").verify(p, samples(p.id, *texts))
    assert [v.status for v in weak] == [VerdictStatus.PASS] * 3


@pytest.mark.bubblewrap
def test_compare_suites_rates(cv):
    tests = ["assert inc(1) == 2", "assert inc(5) == 6"]
    p = Problem(
        id="mbpp/2",
        prompt="increment",
        meta={
            "format": "mbpp",
            "test_list": tests,
            # a wrong visible test: correct programs fail it (a false negative of the weak suite)
            "visible_tests": ["assert inc(1) == 3"],
        },
    )
    texts = (
        "def inc(x):\n    return x + 1\n",  # full pass, weak fail -> FN
        "def inc(x):\n    return 3\n",  # full fail, weak pass -> FP
        "def inc(x):\n    return 0\n",  # both fail -> TN
    )
    cmp = cv.compare_suites([(p, samples(p.id, *texts))])
    r = cmp.rates
    assert (r.tp, r.fp, r.fn, r.tn) == (0, 1, 1, 1)
    assert r.false_positive_rate == pytest.approx(0.5)
    assert r.false_negative_rate == pytest.approx(1.0)
    assert [v.meta["tests"] for v in cmp.visible[0]] == ["visible"] * 3


@pytest.mark.bubblewrap
def test_humaneval_visible_suite_from_docstring(cv):
    p = humaneval_problem()
    weak = cv.verify_many([(p, samples(p.id, "    return 4\n"))], tests="visible")[0][0]
    assert weak.status is VerdictStatus.PASS  # only `add(2, 2) == 4` is visible
    strong = cv.verify(p, samples(p.id, "    return 4\n"))[0]
    assert strong.status is VerdictStatus.FAIL


def test_doctest_cases_forms():
    prompt = (
        "def f(x):\n"
        '    """\n'
        "    >>> f(1)\n"
        "    2\n"
        "    >>> round(f(2), 1)  # a comment\n"
        "    3.0\n"
        "\n"
        "    f(3) ==> 4\n"
        "    f(a) => False\n"
        "    f('x') should return 'y'.\n"
        '    """\n'
    )
    cases = doctest_cases(prompt, "f")
    assert len(cases) == 4
    assert cases[0] == "assert _ttscale_doctest((f(1)\n), '2'), 'f(1) -> 2'"
    assert all("f(a)" not in c for c in cases)
    for c in cases:
        compile(c, "<case>", "exec")


def test_extract_code():
    text = "Sure.\n```python\ndef g():\n    return 1\n```\nand\n```python\ndef f():\n    return 2\n```"
    assert extract_code(text, "f") == "def f():\n    return 2\n"
    assert extract_code(text) == "def g():\n    return 1\n"
    assert extract_code("```python\ndef f(): pass\n", "f") == "def f(): pass\n"  # unterminated
    assert extract_code("def f(): pass\n") == "def f(): pass\n"
    assert extract_code("```bash\nls\n```") == "```bash\nls\n```"


def test_errors_and_protocol():
    with pytest.raises(ConfigError, match="tests must be 'full', 'visible', 'plus' or 'base'"):
        CodeVerifier(tests="hidden")
    with pytest.raises(ConfigError, match="timeout_s must be a finite number > 0 seconds"):
        CodeVerifier(timeout=0)
    with pytest.raises(DataError, match="has no code tests"):
        CodeVerifier(isolation="process").verify(Problem(id="x", prompt="p"), samples("x", "pass"))
    v = make_verifier("code", workers=2, timeout=2.0, unrelated_option=1, isolation="process")
    assert isinstance(v, CodeVerifier) and isinstance(v, Verifier)
    assert v.limits.timeout_s == 2.0
    info = v.info()
    assert info["isolation"] == "process" and info["tests"] == "full"


@pytest.mark.bubblewrap
def test_default_isolation_is_bubblewrap():
    assert make_verifier("code").info()["isolation"] == "bubblewrap"


# ---------------------------------------------------------------------------------------
# the sandbox fails closed: refusal without bubblewrap, the explicit opt-in, the manifest

SQ_TESTS = ["assert sq(2) == 4", "assert sq(3) == 9"]


def mbpp_run(tmp_path: Path) -> SampleStore:
    """A run of one MBPP-style problem: sample 0 is right, sample 1 wrong."""
    store = SampleStore.create(tmp_path / "run", {"benchmark": "mbpp"})
    store.write_problems(
        [Problem(id="sq", prompt="square", meta={"format": "mbpp", "test_list": SQ_TESTS})]
    )
    store.append(samples("sq", "def sq(x):\n    return x * x\n", "def sq(x):\n    return 4\n"))
    return store


def test_code_verifier_refuses_without_bubblewrap(no_bubblewrap):
    with pytest.raises(SandboxError, match="needs bubblewrap") as err:
        CodeVerifier()  # refused when built, before any work
    assert "isolation='process'" in str(err.value) and no_bubblewrap in str(err.value)
    with pytest.raises(SandboxError, match="needs bubblewrap"):
        make_verifier("ensemble:code,code:visible")


def test_cli_verify_refuses_without_bubblewrap(no_bubblewrap, tmp_path):
    store = mbpp_run(tmp_path)
    r = runner.invoke(app, ["verify", str(store.path), "--verifier", "code"])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "needs bubblewrap" in errors[0] and "apt-get install bubblewrap" in errors[0]
    assert "--isolation process" in errors[0]
    store = SampleStore.open(store.path)
    assert store.verifiers() == [] and "verifiers" not in store.manifest


def test_cli_verify_process_opt_in_is_recorded(no_bubblewrap, tmp_path):
    store = mbpp_run(tmp_path)
    r = runner.invoke(app, ["verify", str(store.path), "--isolation", "process", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[-1])["accuracy"] == 0.5
    store = SampleStore.open(store.path)
    assert store.manifest["verifiers"]["code"]["isolation"] == "process"
    vs = sorted(store.verdicts("code"), key=lambda v: v.index)
    assert [v.correct for v in vs] == [True, False]
    assert {v.meta["isolation"] for v in vs} == {"process"}


@pytest.mark.bubblewrap
def test_cli_verify_records_bubblewrap(tmp_path):
    store = mbpp_run(tmp_path)
    r = runner.invoke(app, ["verify", str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    store = SampleStore.open(store.path)
    assert store.manifest["verifiers"]["code"]["isolation"] == "bubblewrap"
    assert [v.correct for v in sorted(store.verdicts("code"), key=lambda v: v.index)] == [True, False]


def test_cli_run_refuses_before_sampling(no_bubblewrap, tmp_path):
    """`run` on a code benchmark checks the sandbox before it loads a model or samples."""
    out = tmp_path / "run"
    r = runner.invoke(
        app, ["run", "--benchmark", "mbpp", "--model", str(tmp_path / "no-model"), "--out", str(out)]
    )
    assert r.exit_code == 1, r.output
    assert "needs bubblewrap" in r.output and "--isolation process" in r.output
    assert not out.exists()
