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

EvalPlus suites (``tests="plus"`` / ``"base"``, spec ``code:plus=PATH`` / ``code:base=PATH``)
    The tests of a HumanEval+ / MBPP+ file (:mod:`ttscale.evals.evalplus`) replace the
    problem's own: each input of ``plus_input`` (EvalPlus's added tests; its ``plus_status``, the
    truth in the imperfect-verifier paper) or ``base_input`` (the original tests' inputs; its
    ``base_status``, the paper's weak verifier) is one case, passing when the program's return
    value equals the oracle's (``prompt + canonical_solution``, run once per task in the
    sandbox) or, for float outputs, is within ``atol`` (1e-6 when the file says 0) plus 1e-7
    relative, elementwise, with the same type: EvalPlus's rule, in pure Python. HumanEval/32
    (``find_zero``) passes when the polynomial at the returned root is within ``atol`` of 0, as in
    EvalPlus. Time: EvalPlus limits each input to a multiple of the oracle's time; here one
    program's whole suite gets ``max(timeout, 1 + 4 × the oracle's seconds)`` (recorded in the
    verdict's ``meta["timeout_s"]``), so a correct but heavy suite does not time out into a
    wrong truth. Not reproduced: EvalPlus's per-task conversion of some MBPP+ inputs from JSON
    lists to tuples/sets and its special checks of a few MBPP+ tasks (inputs are used as
    stored). A problem with no task in the file, or whose expected outputs exceed 24 MiB
    compressed, gets an ``error`` verdict that says so. EvalPlus's "HumanEval+" score counts a sample
    correct when it passes both suites.

Verdicts: status ``pass/fail/timeout/crash/memory/syntax_error`` (``error`` when the harness or
the test code failed); ``correct`` is True only on pass (None on error); ``score`` is the
fraction of test cases passed; ``detail`` the first failure (the failing assertion and its
line). ``answer`` (the voting key) is a behaviour signature: a hash of every value the program
returned to the tests (function formats) or of its normalised outputs (stdio), so samples that
behave identically on the test inputs vote together; None when the program did not load.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import marshal
import math
import os
import re
import zlib
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
    literal_eval,
    normalize_output,
    parse_python,
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


# Defined in the checker for EvalPlus cases (never in the program's process): the comparison
# EvalPlus makes (exact, else for float outputs |out - exp| <= atol + 1e-7 |exp| elementwise with
# equal types and lengths), in pure Python because the sandbox has no numpy.
_EVALPLUS_HELPER = """
import math as _ttscale_math

def _ttscale_unpack(text):
    import marshal, zlib
    return marshal.loads(zlib.decompress(bytes.fromhex(text)))

def _ttscale_is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False

def _ttscale_close(a, b, atol):
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_ttscale_close(x, y, atol) for x, y in zip(a, b)))
    if not isinstance(a, (int, float, complex)) or not isinstance(b, (int, float, complex)):
        return False
    if isinstance(a, complex) or isinstance(b, complex):
        return abs(a - b) <= atol + 1e-7 * abs(b)
    if _ttscale_math.isinf(a) or _ttscale_math.isinf(b):
        return a == b
    return abs(a - b) <= atol + 1e-7 * abs(b)

def _ttscale_evalplus(out, i):
    try:
        if _ttscale_ep_entry == "find_zero":
            xs = _ttscale_ep_in[i][0]
            value = sum(c * _ttscale_math.pow(out, k) for k, c in enumerate(xs))
            return abs(value) <= _ttscale_ep_atol
        exp = _ttscale_ep_exp[i]
        if out == exp:
            return True
        atol = _ttscale_ep_atol
        if atol == 0 and _ttscale_is_floats(exp):
            atol = 1e-6
        if atol == 0 or type(out) is not type(exp):
            return False
        return _ttscale_close(out, exp, atol)
    except Exception:
        return False
"""

# Runs the EvalPlus oracle (prompt + canonical solution) on every input in the sandbox and
# writes the marshalled return values as hex on stdout; the oracle's own prints are swallowed.
_ORACLE_DRIVER = """
import copy as _ttscale_copy, io as _ttscale_io, marshal as _ttscale_marshal, sys as _ttscale_sys
import zlib as _ttscale_zlib
_ttscale_out_stream = _ttscale_sys.stdout
_ttscale_args = _ttscale_marshal.loads(
    _ttscale_zlib.decompress(bytes.fromhex(_ttscale_sys.stdin.read().strip()))
)
_ttscale_sys.stdout = _ttscale_io.StringIO()
_ttscale_values = [{entry}(*_ttscale_copy.deepcopy(a)) for a in _ttscale_args]
_ttscale_sys.stdout = _ttscale_out_stream
_ttscale_out_stream.write(_ttscale_zlib.compress(_ttscale_marshal.dumps(_ttscale_values)).hex())
"""

_ORACLE_OUTPUT_BYTES = 24 << 20  # under the sandbox's 64 MiB result frame


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
            parse_python(f"({expr}\n)", mode="eval")
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
            names = {n.id for n in ast.walk(parse_python(call, mode="eval")) if isinstance(n, ast.Name)}
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
                        literal_eval(cand)
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
        evalplus: str | os.PathLike[str] | None = None,
        isolation: str = "auto",
        batch_size: int = 16,
        limits: Limits | None = None,
    ) -> None:
        if tests not in _SUITES:
            raise ConfigError(f"tests must be 'full', 'visible', 'plus' or 'base', got {tests!r}")
        self.evalplus: Any = None
        if tests in ("plus", "base"):
            if evalplus is None:
                raise ConfigError(
                    f"tests={tests!r} needs an EvalPlus file: evalplus=PATH (spec code:{tests}=PATH)"
                )
            from ttscale.evals.evalplus import load_evalplus

            self.evalplus = load_evalplus(evalplus)
        elif evalplus is not None:
            raise ConfigError("evalplus=PATH goes with tests='plus' or 'base' (code:plus=PATH)")
        self._oracles: dict[tuple[str, str], tuple[list[Any], list[Any], float] | str] = {}
        self._sandboxes: dict[float, Sandbox] = {}
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
        out = {
            "class": "CodeVerifier",
            "name": self.name,
            "tests": self.tests,
            **self.sandbox.info(),
        }
        if self.evalplus is not None:
            out["evalplus"] = {"path": str(self.evalplus.path), "sha256": self.evalplus.sha256}
        return out

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
        if suite not in _SUITES:
            raise ConfigError(f"tests must be 'full', 'visible', 'plus' or 'base', got {suite!r}")
        if suite in ("plus", "base"):
            if self.evalplus is None:
                raise ConfigError(f"tests={suite!r} needs an EvalPlus file: CodeVerifier(evalplus=PATH)")
            return self._verify_evalplus(items, suite)
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

    # -- EvalPlus suites ----------------------------------------------------------------
    def _oracle_outputs(self, tasks: Sequence[Any], suite: str) -> None:
        """Run each task's oracle on its ``suite`` inputs once (in the sandbox) and cache
        ``(inputs, outputs)``, or the reason it could not run."""
        todo = [t for t in tasks if (t.task_id, suite) not in self._oracles]
        if not todo:
            return
        lim = self.limits
        oracle_box = Sandbox(
            Limits(
                timeout_s=max(60.0, 10 * lim.timeout_s),
                memory_mb=max(lim.memory_mb, 2048),
                nproc=lim.nproc,
                fsize_mb=lim.fsize_mb,
                nofile=lim.nofile,
                tmpfs_mb=lim.tmpfs_mb,
                output_bytes=_ORACLE_OUTPUT_BYTES,
            ),
            isolation=self.sandbox.isolation.value,
            workers=self.workers,
            batch_size=1,
        )
        programs = []
        for t in todo:
            if not t.entry_point.isidentifier():
                raise DataError(f"EvalPlus task {t.task_id}: entry_point {t.entry_point!r} is not a name")
            programs.append(
                Program.stdio(
                    t.oracle + "\n" + _ORACLE_DRIVER.format(entry=t.entry_point),
                    stdin=_pack(t.inputs(suite)),
                )
            )
        for t, r in zip(todo, oracle_box.run_many(programs), strict=True):
            key = (t.task_id, suite)
            if r.output_truncated:
                self._oracles[key] = (
                    f"the EvalPlus oracle of {t.task_id} returned more than "
                    f"{_ORACLE_OUTPUT_BYTES >> 20} MiB of outputs"
                )
                continue
            if r.outcome is not ExecOutcome.PASS:
                self._oracles[key] = f"the EvalPlus oracle of {t.task_id} failed: {r.detail}"
                continue
            try:
                outputs = marshal.loads(zlib.decompress(bytes.fromhex(r.stdout.strip())))
            except (ValueError, EOFError, TypeError, zlib.error):
                self._oracles[key] = f"the EvalPlus oracle of {t.task_id} returned unreadable output"
                continue
            self._oracles[key] = (t.inputs(suite), list(outputs), r.seconds)

    def _verify_evalplus(
        self, items: Sequence[tuple[Problem, Sequence[Sample]]], suite: str
    ) -> list[list[Verdict]]:
        tasks = [self.evalplus.for_problem(problem) for problem, _ in items]
        self._oracle_outputs([t for t in tasks if t is not None], suite)
        programs: list[tuple[float, Program]] = []
        plans: list[tuple[str, list[int], float] | str] = []
        for (problem, samples), task in zip(items, tasks, strict=True):
            if task is None:
                plans.append(f"no EvalPlus task for {problem.id} in {self.evalplus.path.name}")
                continue
            oracle = self._oracles[(task.task_id, suite)]
            if isinstance(oracle, str):
                plans.append(oracle)
                continue
            inputs, outputs, oracle_s = oracle
            # like EvalPlus's time limits (a multiple of the oracle's time), with --timeout as
            # the floor: a correct but heavy suite must not time out into a wrong "truth"
            limit = max(self.limits.timeout_s, math.ceil(2.0 * (1.0 + 4.0 * oracle_s)) / 2.0)
            if not inputs:
                plans.append(f"EvalPlus task {task.task_id} has no {suite} inputs")
                continue
            entry = task.entry_point
            setup = (
                _EVALPLUS_HELPER
                + f"_ttscale_ep_in = _ttscale_unpack({_pack(inputs)!r})\n"
                + f"_ttscale_ep_exp = _ttscale_unpack({_pack(outputs)!r})\n"
                + f"_ttscale_ep_atol = {task.atol!r}\n_ttscale_ep_entry = {entry!r}\n"
            )
            cases = tuple(
                f"assert _ttscale_evalplus({entry}(*_ttscale_ep_in[{i}]), {i}), "
                f"'EvalPlus {suite} input {i}'"
                for i in range(len(inputs))
            )
            fmt, source_of, prelude = _evalplus_program(problem, task)
            per: list[int] = []
            for k, smp in enumerate(samples):
                text = smp if isinstance(smp, str) else smp.text
                index = k if isinstance(smp, str) else smp.index
                programs.append(
                    (limit, Program(source=source_of(text), cases=cases, setup=setup,
                                    prelude=prelude, entry_points=(entry,)))
                )
                per.append(index)
            plans.append((fmt, per, limit))
        results = iter(self._run_with_limits(programs))
        out: list[list[Verdict]] = []
        for (problem, samples), plan in zip(items, plans, strict=True):
            if isinstance(plan, str):
                out.append([self._error_verdict(problem, k if isinstance(smp, str) else smp.index,
                                                plan, suite) for k, smp in enumerate(samples)])
                continue
            fmt, per, limit = plan
            out.append([
                dataclasses.replace(v, meta={**v.meta, "timeout_s": limit})
                for v in (self._verdict(problem, index, [next(results)], fmt, suite) for index in per)
            ])
        return out

    def _run_with_limits(self, programs: Sequence[tuple[float, Program]]) -> list[ExecResult]:
        """Run programs, each under its own wall-clock limit (one sandbox per distinct limit)."""
        results: list[ExecResult | None] = [None] * len(programs)
        for limit in sorted({t for t, _ in programs}):
            idx = [i for i, (t, _) in enumerate(programs) if t == limit]
            if limit == self.limits.timeout_s:
                box = self.sandbox
            else:
                if limit not in self._sandboxes:
                    self._sandboxes[limit] = Sandbox(
                        dataclasses.replace(self.limits, timeout_s=limit),
                        isolation=self.sandbox.isolation.value,
                        workers=self.workers,
                        batch_size=self.batch_size,
                    )
                box = self._sandboxes[limit]
            for i, r in zip(idx, box.run_many([programs[i][1] for i in idx]), strict=True):
                results[i] = r
        return [r for r in results if r is not None]

    def _error_verdict(self, problem: Problem, index: int, detail: str, suite: str) -> Verdict:
        return Verdict(
            problem_id=problem.id,
            index=index,
            status=VerdictStatus.ERROR,
            verifier=self.name,
            answer=None,
            correct=None,
            score=0.0,
            detail=detail,
            meta={"tests": suite},
        )

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


_SUITES = ("full", "visible", "plus", "base")


def _pack(value: Any) -> str:
    """Plain data -> hex of compressed marshal (read back by ``_ttscale_unpack``)."""
    return zlib.compress(marshal.dumps(value)).hex()


def _evalplus_program(problem: Problem, task: Any) -> tuple[str, Any, str]:
    """``(format, text -> program source, prelude)`` for checking ``problem``'s samples against
    an EvalPlus task: the program is built as for the problem's own tests (HumanEval: the code
    prompt and the completion; MBPP: the extracted code)."""
    try:
        fmt = _format_of(problem)
    except DataError:
        fmt = "humaneval" if task.task_id.startswith("HumanEval") else "asserts"
    entry = task.entry_point
    if fmt == "humaneval":
        code_prompt = str(problem.meta.get("code_prompt") or problem.prompt)
        full_def = re.compile(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", re.M)

        def source(text: str) -> str:
            return _humaneval_source(code_prompt, text, entry, full_def)

        return fmt, source, code_prompt
    return fmt, (lambda text: extract_code(text, entry)), ""


def _humaneval_source(code_prompt: str, text: str, entry: str, full_def: re.Pattern[str]) -> str:
    if "```" in text or full_def.search(text):
        return code_prompt + "\n" + extract_code(text, entry) + "\n"
    return code_prompt + text


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
        source = _humaneval_source(code_prompt, text, entry, full_def)
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
