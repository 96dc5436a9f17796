"""CodeVerifier: run each candidate program against its problem's tests in the sandbox.

Problem formats (``problem.meta["format"]``; inferred from the fields when absent):

``"humaneval"``
    ``meta["entry_point"]``; test code defining ``check(candidate)`` in ``meta["test"]`` or
    ``problem.reference``; the code prompt the completion continues in ``meta["code_prompt"]``
    (else ``problem.prompt``). Program = ``code_prompt + completion`` (as the reference
    harness); a completion that holds a fenced code block or a full ``def entry_point(`` is
    appended to the prompt on its own line instead. Full suite: ``check(entry_point)``.
    Visible suite: ``meta["visible_tests"]`` (assert statements) if given, else the ``>>>``
    examples of the prompt's docstring (doctest semantics: the value's ``repr`` or the literal
    must match), else a smoke test that the entry point exists and is callable.
``"mbpp"`` / ``"asserts"``
    Assert statements in ``meta["test_list"]`` (or ``meta["tests"]``, or ``problem.reference``
    one per line), hidden extra asserts in ``meta["challenge_test_list"]`` /
    ``meta["hidden_tests"]``, set-up code in ``meta["test_setup_code"]`` and
    ``meta["test_imports"]``. Program = the completion's fenced code block (else its text).
    Full suite: every assert; visible suite: ``meta["visible_tests"]`` or the first assert.
``"stdio"``
    Input/output pairs in ``meta["io"]`` (``[{"input": ..., "output": ...}, ...]`` or
    ``[[input, output], ...]``) or CodeContests-style ``meta["public_tests"]``,
    ``meta["private_tests"]``, ``meta["generated_tests"]`` (``{"input": [...], "output": [...]}``).
    One sandbox run per pair; stdout is compared after
    :func:`~ttscale.verifiers.sandbox.normalize_output`. Visible suite: ``meta["public_io"]`` /
    ``meta["public_tests"]``, else the first pair.

Verdicts: status ``pass/fail/timeout/crash/memory/syntax_error`` (``error`` when the harness or
the test code failed); ``correct`` is True only on pass (None on error); ``score`` is the
fraction of test cases passed; ``detail`` the first failure (the failing assertion and its
line). ``answer`` (the voting key) is a behaviour signature: a hash of every value the program
returned to the tests (function formats) or of its normalised outputs (stdio), so samples that
behave identically on the test inputs vote together; None when the program did not load.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttscale.errors import ConfigError, DataError
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.verifiers.sandbox import (
    ExecOutcome,
    ExecResult,
    Limits,
    Program,
    Sandbox,
    normalize_output,
    resolve_isolation,
)

__all__ = ["CodeVerifier", "SuiteComparison", "doctest_cases", "extract_code"]

_STATUS = {
    ExecOutcome.PASS: VerdictStatus.PASS,
    ExecOutcome.FAIL: VerdictStatus.FAIL,
    ExecOutcome.TIMEOUT: VerdictStatus.TIMEOUT,
    ExecOutcome.CRASH: VerdictStatus.CRASH,
    ExecOutcome.MEMORY: VerdictStatus.MEMORY,
    ExecOutcome.SYNTAX_ERROR: VerdictStatus.SYNTAX_ERROR,
    ExecOutcome.ERROR: VerdictStatus.ERROR,
}

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)

# Defined in the checker for doctest-derived cases: doctest compares the repr of the value
# with the expected text; the literal comparison also accepts e.g. 0.5 for 0.50.
_DOCTEST_HELPER = '''
def _ttscale_doctest(value, want):
    import ast
    if " ".join(repr(value).split()) == " ".join(want.split()):
        return True
    try:
        return ast.literal_eval(want) == value
    except Exception:
        return False
'''


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a model's answer: the first fenced Python block (the first one that
    defines ``entry_point`` if any does; an unterminated fence runs to the end), else the text."""
    blocks = [
        body
        for lang, body in _FENCE.findall(text)
        if lang.lower() in ("", "python", "py", "python3", "py3")
    ]
    if not blocks:
        return text
    if entry_point:
        pat = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
        for b in blocks:
            if pat.search(b):
                return b
    return blocks[0]


def doctest_cases(prompt: str, entry_point: str | None = None) -> list[str]:
    """Visible test cases from the examples in a HumanEval-style prompt.

    Two forms are read: doctest (``>>> expr`` followed by the expected output lines) and, when
    ``entry_point`` is given, one-line examples ``entry_point(args) SEP value`` with SEP one of
    ``==> => -> ➞ == = returns`` / ``should return`` whose value is a Python literal. Each
    becomes ``assert _ttscale_doctest((expr), 'expected')`` (``repr`` or literal equality).
    """
    cases: list[str] = []
    seen: set[str] = set()

    def add(expr: str, expected: str) -> None:
        try:
            ast.parse(f"({expr}\n)", mode="eval")
        except SyntaxError:
            return
        key = expr.strip() + "\0" + expected
        if key in seen:
            return
        seen.add(key)
        label = f"{expr.strip()} -> {expected}"
        cases.append(f"assert _ttscale_doctest(({expr}\n), {expected!r}), {label!r}")

    lines = prompt.splitlines()
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if not s.startswith(">>>"):
            i += 1
            continue
        expr = s[3:].strip()
        i += 1
        while i < len(lines) and lines[i].strip().startswith("..."):
            expr += "\n" + lines[i].strip()[3:].strip()
            i += 1
        want: list[str] = []
        while i < len(lines):
            t = lines[i].strip()
            if not t or t.startswith(">>>") or t.startswith('"""') or t.startswith("\'\'\'"):
                break
            want.append(t)
            i += 1
        if expr and want:
            add(expr, " ".join(want))
    if entry_point:
        for line in lines:
            for expr, value in _inline_examples(line, entry_point):
                add(expr, value)
    return cases


_SEPS = ("should return", "returns", "==>", "=>", "->", "➞", "==", "=")


def _inline_examples(line: str, entry: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while True:
        m = re.search(rf"(?<![\w.]){re.escape(entry)}\(", line[pos:])
        if m is None:
            return out
        start = pos + m.start()
        end = _close_paren(line, pos + m.end() - 1)
        if end is None:
            return out
        call = line[start:end]
        rest = line[end:].strip().lstrip("#").strip()
        pos = end
        try:
            names = {n.id for n in ast.walk(ast.parse(call, mode="eval")) if isinstance(n, ast.Name)}
        except SyntaxError:
            continue
        if names - {entry}:  # prose such as ``is_happy(a) => False``, not a runnable example
            continue
        for sep in _SEPS:
            if rest.startswith(sep):
                value = rest[len(sep) :].strip()
                value = value.split(" #")[0].strip()
                for cand in (value, value.rstrip(".")):
                    try:
                        ast.literal_eval(cand)
                    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                        continue
                    out.append((call, cand))
                    break
                break


def _close_paren(text: str, open_pos: int) -> int | None:
    """Index just past the parenthesis matching ``text[open_pos]`` (quotes respected)."""
    depth = 0
    quote = ""
    k = open_pos
    while k < len(text):
        c = text[k]
        if quote:
            if c == "\\":
                k += 2
                continue
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return None


@dataclass(frozen=True)
class SuiteComparison:
    """Visible (weak) vs full test suites on the same samples.

    ``rates`` counts the weak suite as the verifier and the full suite as the truth
    (:func:`ttscale.metrics.scaling.verifier_rates`): ``false_positive_rate`` = P(weak pass | full fail),
    ``false_negative_rate`` = P(weak fail | full pass), pooled over all samples.
    """

    visible: list[list[Verdict]]
    full: list[list[Verdict]]
    rates: Any


@dataclass(frozen=True)
class _Suite:
    fmt: str
    programs_for: Any  # callable(text) -> list[Program]
    n_cases: int


class CodeVerifier:
    """Sandboxed execution of candidate programs against the problem's tests.

    ``timeout`` is seconds per program run (per input for stdio problems), ``memory_mb`` its
    address-space limit, ``workers`` the number of sandboxes run in parallel, ``tests`` the
    suite (``"full"`` or ``"visible"``), ``isolation`` as in
    :class:`~ttscale.verifiers.sandbox.Sandbox`: ``"auto"`` needs a working bubblewrap and
    otherwise raises :class:`~ttscale.errors.SandboxError` here, before any work (the sandbox
    fails closed); ``"process"`` is the explicit opt-in to run without it.
    """

    name = "code"

    def __init__(
        self,
        timeout: float = 3.0,
        memory_mb: int = 1024,
        workers: int | None = None,
        tests: str = "full",
        *,
        isolation: str = "auto",
        batch_size: int = 16,
        limits: Limits | None = None,
    ) -> None:
        if tests not in ("full", "visible"):
            raise ConfigError(f"tests must be 'full' or 'visible', got {tests!r}")
        if limits is None:
            try:
                limits = Limits(timeout_s=timeout, memory_mb=memory_mb)
            except ConfigError as e:
                raise ConfigError(f"CodeVerifier: {e}") from None
        self.limits = limits
        self.tests = tests
        # the weak (visible-tests) verifier stores its verdicts apart from the full one, so a run
        # can hold both and the imperfect-verifier analysis can compare them
        self.name = "code" if tests == "full" else f"code-{tests}"
        self.workers = workers
        # fails closed now, not after the caller has done expensive work
        self.isolation = resolve_isolation(isolation).value
        self.batch_size = batch_size
        self._sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(
                self.limits,
                isolation=self.isolation,
                workers=self.workers,
                batch_size=self.batch_size,
            )
        return self._sandbox

    def info(self) -> dict[str, Any]:
        return {
            "class": "CodeVerifier",
            "name": self.name,
            "tests": self.tests,
            **self.sandbox.info(),
        }

    def close(self) -> None:
        """Nothing to release: every program runs in its own short-lived sandbox."""

    # -- verification ------------------------------------------------------------------
    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in order."""
        return self.verify_many([(problem, samples)])[0]

    def verify_many(
        self, items: Sequence[tuple[Problem, Sequence[Sample]]], *, tests: str | None = None
    ) -> list[list[Verdict]]:
        """Verify several problems in one pool of sandboxes (problem-major, batched)."""
        suite = tests or self.tests
        if suite not in ("full", "visible"):
            raise ConfigError(f"tests must be 'full' or 'visible', got {suite!r}")
        plans: list[list[tuple[Sample | str, int, list[Program], str]]] = []
        programs: list[Program] = []
        for problem, samples in items:
            builder = _builder(problem, suite)
            per: list[tuple[Sample | str, int, list[Program], str]] = []
            for k, s in enumerate(samples):
                text = s if isinstance(s, str) else s.text
                index = k if isinstance(s, str) else s.index
                progs = builder(text)
                per.append((s, index, progs, _format_of(problem)))
                programs.extend(progs)
            plans.append(per)
        results = iter(self.sandbox.run_many(programs))
        out: list[list[Verdict]] = []
        for (problem, _), per in zip(items, plans, strict=True):
            verdicts = []
            for _s, index, progs, fmt in per:
                rs = [next(results) for _ in progs]
                verdicts.append(self._verdict(problem, index, rs, fmt, suite))
            out.append(verdicts)
        return out

    def compare_suites(self, items: Sequence[tuple[Problem, Sequence[Sample]]]) -> SuiteComparison:
        """Verify with the visible and the full suites; the weak suite's error rates vs the full.

        Verdicts with status ``error`` count as failing both ways.
        """
        from ttscale.metrics.scaling import verifier_rates

        visible = self.verify_many(items, tests="visible")
        full = self.verify_many(items, tests="full")
        weak = [v.status is VerdictStatus.PASS for vs in visible for v in vs]
        strong = [v.status is VerdictStatus.PASS for vs in full for v in vs]
        return SuiteComparison(visible=visible, full=full, rates=verifier_rates(weak, strong))

    def _verdict(
        self, problem: Problem, index: int, rs: list[ExecResult], fmt: str, suite: str
    ) -> Verdict:
        first_bad = next((r for r in rs if not r.passed), None)
        if fmt == "stdio":
            passed = sum(1 for r in rs if r.passed)
            total = len(rs)
            loaded = all(r.outcome is not ExecOutcome.SYNTAX_ERROR for r in rs)
            sig = hashlib.sha1(
                "\0".join(normalize_output(r.stdout) for r in rs).encode("utf-8", "replace")
            ).hexdigest()[:16]
            answer = f"out:{sig}" if loaded else None
        else:
            r = rs[0]
            total = max(len(r.cases), 1)
            passed = r.cases_passed
            answer = r.meta.get("signature")
        head = first_bad if first_bad is not None else rs[0]
        status = _STATUS[head.outcome]
        correct = None if status is VerdictStatus.ERROR else status is VerdictStatus.PASS
        return Verdict(
            problem_id=problem.id,
            index=index,
            status=status,
            verifier=self.name,
            answer=answer,
            correct=correct,
            score=passed / total if total else 0.0,
            detail=head.detail,
            meta={
                "tests": suite,
                "cases_passed": passed,
                "cases_total": total,
                "isolation": head.isolation,
                "seconds": math.fsum(r.seconds for r in rs),
            },
        )


# ---------------------------------------------------------------------------------------
# problem formats


def _format_of(problem: Problem) -> str:
    meta = problem.meta
    fmt = meta.get("format")
    if fmt in ("humaneval", "stdio"):
        return str(fmt)
    if fmt in ("mbpp", "asserts"):
        return "asserts"
    if meta.get("entry_point") and (
        meta.get("test") or (isinstance(problem.reference, str) and "def check" in problem.reference)
    ):
        return "humaneval"
    if meta.get("test_list") or meta.get("tests"):
        return "asserts"
    if meta.get("io") or meta.get("public_tests") or meta.get("private_tests"):
        return "stdio"
    if isinstance(problem.reference, str) and problem.reference.lstrip().startswith("assert"):
        return "asserts"
    raise DataError(
        f"problem {problem.id!r} has no code tests: set meta['format'] and its fields "
        "(entry_point + test, test_list, or io); see ttscale.verifiers.code"
    )


def _builder(problem: Problem, suite: str) -> Any:
    fmt = _format_of(problem)
    if fmt == "humaneval":
        return _humaneval(problem, suite)
    if fmt == "asserts":
        return _asserts(problem, suite)
    return _stdio(problem, suite)


def _humaneval(problem: Problem, suite: str) -> Any:
    meta = problem.meta
    entry = str(meta["entry_point"])
    code_prompt = str(meta.get("code_prompt") or problem.prompt)
    test = meta.get("test") or problem.reference
    if not isinstance(test, str) or not test.strip():
        raise DataError(f"problem {problem.id!r}: HumanEval test code (meta['test']) is missing")
    full_def = re.compile(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", re.M)

    cases: tuple[str, ...]
    if suite == "full":
        setup, cases = test, (f"check({entry})",)
    else:
        visible = meta.get("visible_tests")
        if visible:
            setup, cases = "", tuple(_as_list(visible))
        else:
            dt = doctest_cases(code_prompt, entry)
            if dt:
                setup, cases = _DOCTEST_HELPER, tuple(dt)
            else:
                setup, cases = "", (f"assert callable({entry}), 'no function {entry}'",)

    def build(text: str) -> list[Program]:
        if "```" in text or full_def.search(text):
            source = code_prompt + "\n" + extract_code(text, entry) + "\n"
        else:
            source = code_prompt + text
        return [
            Program(
                source=source,
                cases=cases,
                setup=setup,
                prelude=code_prompt,
                entry_points=(entry,),
            )
        ]

    return build


def _as_list(x: Any) -> list[str]:
    if isinstance(x, str):
        return [ln for ln in x.splitlines() if ln.strip()]
    return [str(t) for t in x]


def _asserts(problem: Problem, suite: str) -> Any:
    meta = problem.meta
    tests = meta.get("test_list") or meta.get("tests")
    if not tests and isinstance(problem.reference, str):
        tests = problem.reference
    tests = _as_list(tests or [])
    hidden = _as_list(meta.get("challenge_test_list") or meta.get("hidden_tests") or [])
    if not tests and not hidden:
        raise DataError(f"problem {problem.id!r}: no assert tests (meta['test_list'])")
    if suite == "full":
        cases = tuple(tests + hidden)
    else:
        visible = meta.get("visible_tests")
        cases = tuple(_as_list(visible)) if visible else tuple((tests or hidden)[:1])
    setup_parts = [str(meta.get("test_setup_code") or "")]
    setup_parts += _as_list(meta.get("test_imports") or [])
    setup = "\n".join(p for p in setup_parts if p.strip())
    entry = meta.get("entry_point")

    def build(text: str) -> list[Program]:
        source = extract_code(text, str(entry) if entry else None)
        return [Program(source=source, cases=cases, setup=setup)]

    return build


def _pairs(x: Any) -> list[tuple[str, str]]:
    if not x:
        return []
    if isinstance(x, Mapping):  # CodeContests {"input": [...], "output": [...]}
        ins, outs = list(x.get("input") or []), list(x.get("output") or [])
        if len(ins) != len(outs):
            raise DataError("stdio tests: 'input' and 'output' have different lengths")
        return list(zip(ins, outs, strict=True))
    out = []
    for item in x:
        if isinstance(item, Mapping):
            out.append((str(item["input"]), str(item["output"])))
        else:
            a, b = item
            out.append((str(a), str(b)))
    return out


def _stdio(problem: Problem, suite: str) -> Any:
    meta = problem.meta
    public = _pairs(meta.get("public_io")) or _pairs(meta.get("public_tests"))
    full = _pairs(meta.get("io")) or (
        public + _pairs(meta.get("private_tests")) + _pairs(meta.get("generated_tests"))
    )
    if not full:
        raise DataError(f"problem {problem.id!r}: no input/output pairs (meta['io'])")
    pairs = full if suite == "full" else (public or full[:1])

    def build(text: str) -> list[Program]:
        source = extract_code(text)
        return [Program.stdio(source, stdin=i, expected_stdout=o) for i, o in pairs]

    return build
