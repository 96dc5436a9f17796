"""An exact process reward for the bundled ``arith`` benchmark: every solution line is checked.

An ``arith`` solution is one ``a op b = c`` line per step of the question and a final
``#### answer`` line (``evals/arith.py``). The question fixes the whole computation: a start
value, then one operation per sentence (``buys/finds/gets n more`` is ``+ n``, ``gives
away/loses/sells n`` is ``- n``, ``doubles them`` / ``triples them`` is ``* 2`` / ``* 3``).
Line ``t`` (0-based) **scores 1** when all of these hold, else **0**:

* it parses as ``a op b = c`` (integers, ``op`` one of ``+ - *``; spaces optional);
* ``c == a op b`` (the arithmetic is right);
* ``a`` is the running value: the question's start value for ``t = 0``, else the previous
  line's ``c`` (the previous line must itself have parsed);
* ``(op, b)`` is the question's ``t``-th operation (so a line beyond the question's steps is
  wrong).

The ``#### x`` line scores 1 when every operation has been written (exactly as many operation
lines as the question has steps) and ``x`` is the last line's ``c``. A solution that stops
(``finished``) without a ``####`` line gets a final step scoring 0. When the question cannot be
parsed (not an ``arith`` problem), the operation check is replaced by a weaker one: ``b`` must
be a number of the question (or 2/3 for ``*``) and the first ``a`` too.

Only **complete** lines are scored: the text after the last newline of an unfinished
particle is still being written and is ignored; a finished text's last line is complete.

**Mapping to a reward and a log-potential.** With per-step scores ``s_t ∈ {0, 1}`` (a wrong
step is scored ``wrong``, default 0) the reward of a (partial) text is the aggregate over its
scored steps (``prod`` by default: 1 while every line so far is right, ``wrong`` to the power
of the number of wrong lines otherwise; ``min``; ``last``; ``mean`` = fraction of right
lines), a number in ``[0, 1]``; a text with no complete line yet has reward 1 (nothing is
wrong yet). The log-potential is ``log(reward)`` (``-inf`` for reward 0; with ``wrong > 0`` it
is ``n_wrong · log(wrong)`` under ``prod``). Used as a potential with ``prod`` and ``wrong=0``
the SMC target is the model's distribution conditioned on every line being right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ttscale.errors import ConfigError
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.validation import check_choice, check_number

__all__ = [
    "ARITH_PRM_AGGREGATIONS",
    "ARITH_PRM_VALUES",
    "ArithProcessReward",
    "ArithProgram",
    "arith_prm_potential",
    "LineCheck",
    "check_lines",
    "parse_question",
]

ARITH_PRM_AGGREGATIONS = ("prod", "min", "last", "mean")
ARITH_PRM_VALUES = ("log_prob", "prob")

_LINE_RE = re.compile(r"^\s*(-?\d+)\s*([+\-*x×])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_FINAL_RE = re.compile(r"^\s*####\s*(-?\d+)\s*$")
_START_RE = re.compile(r"\bhas (\d+) [a-z]+\.")
_OP_PATTERNS: tuple[tuple[re.Pattern[str], str, int | None], ...] = (
    (re.compile(r"^(?:buys|finds|gets) (\d+) more$"), "+", None),
    (re.compile(r"^(?:gives away|loses|sells) (\d+)$"), "-", None),
    (re.compile(r"^doubles them$"), "*", 2),
    (re.compile(r"^triples them$"), "*", 3),
)
_SENTENCE_RE = re.compile(r"(?:He|She|Then he|Then she) ([a-z ]+?(?: \d+)?(?: more)?)\.")
_NUMBER_RE = re.compile(r"\d+")


@dataclass(frozen=True)
class ArithProgram:
    """The computation an ``arith`` question describes: a start value and ``(op, operand)``s."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def answer(self) -> int:
        v = self.start
        for op, b in self.ops:
            v = _apply(v, op, b)
        return v


@dataclass(frozen=True)
class LineCheck:
    """The verdict on one complete solution line: ``ok``, and why not when it is wrong."""

    line: str
    ok: bool
    reason: str = ""


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_question(question: str) -> ArithProgram | None:
    """The :class:`ArithProgram` of an ``arith`` question (or prompt), or ``None`` if it is not one."""
    m = _START_RE.search(question)
    if m is None:
        return None
    ops: list[tuple[str, int]] = []
    for phrase in _SENTENCE_RE.findall(question[m.end() :]):
        for pat, op, fixed in _OP_PATTERNS:
            pm = pat.match(phrase.strip())
            if pm:
                ops.append((op, fixed if fixed is not None else int(pm.group(1))))
                break
        else:
            return None
    if not ops:
        return None
    return ArithProgram(start=int(m.group(1)), ops=tuple(ops))


def _norm_op(op: str) -> str:
    return "*" if op in ("x", "×") else op


def check_lines(question: str, lines: Sequence[str], *, finished: bool) -> list[LineCheck]:
    """Check complete solution lines against the question (see the module docstring).

    ``lines`` are the complete lines of one solution (blank lines are skipped); ``finished``
    says the solution has ended, which adds a failing final step when no ``####`` line came.
    Lines after a ``####`` line are each wrong (the solution should have stopped).
    """
    program = parse_question(question)
    numbers = {int(x) for x in _NUMBER_RE.findall(question)}
    out: list[LineCheck] = []
    value: int | None = program.start if program is not None else None
    n_ops = 0
    answered = False
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if answered:
            out.append(LineCheck(raw, False, "text after the #### line"))
            continue
        fm = _FINAL_RE.match(line)
        if fm is not None:
            answered = True
            x = int(fm.group(1))
            if program is not None and n_ops != len(program.ops):
                out.append(
                    LineCheck(raw, False, f"answer after {n_ops} of {len(program.ops)} steps")
                )
            elif value is None or x != value:
                out.append(LineCheck(raw, False, f"answer {x} is not the last result {value}"))
            else:
                out.append(LineCheck(raw, True))
            continue
        lm = _LINE_RE.match(line)
        if lm is None:
            out.append(LineCheck(raw, False, "not an 'a op b = c' line"))
            value = None
            n_ops += 1
            continue
        a, op, b, c = int(lm.group(1)), _norm_op(lm.group(2)), int(lm.group(3)), int(lm.group(4))
        reason = ""
        if c != _apply(a, op, b):
            reason = f"{a} {op} {b} is {_apply(a, op, b)}, not {c}"
        elif program is not None:
            if n_ops >= len(program.ops):
                reason = f"the question has only {len(program.ops)} steps"
            elif value is None or a != value:
                reason = f"operand {a} is not the running value {value}"
            elif (op, b) != program.ops[n_ops]:
                want_op, want_b = program.ops[n_ops]
                reason = f"step {n_ops + 1} is '{want_op} {want_b}', not '{op} {b}'"
        else:
            if n_ops == 0 and a not in numbers:
                reason = f"operand {a} is not a number of the question"
            elif n_ops > 0 and (value is None or a != value):
                reason = f"operand {a} is not the previous result {value}"
            elif not (b in numbers or (op == "*" and b in (2, 3))):
                reason = f"operand {b} is not a number of the question"
        out.append(LineCheck(raw, not reason, reason))
        value = c
        n_ops += 1
    if finished and not answered:
        out.append(LineCheck("", False, "the solution ended without a #### line"))
    return out


def _complete_lines(text: str, finished: bool) -> list[str]:
    lines = text.split("\n")
    if not finished:
        lines = lines[:-1]  # the last piece is still being written (or empty after a newline)
    return lines


def _question(problem: Problem) -> str:
    q = problem.meta.get("question") if problem.meta else None
    return str(q) if q else problem.prompt


class ArithProcessReward:
    """Exact process reward for ``arith``: a PRM verifier and an SMC potential in one object.

    * ``step_scores(problem, text, finished=True)`` -> per-line scores ``s_t ∈ {wrong, 1}``;
    * ``reward(problem, texts, finished)`` -> the aggregated reward in ``[0, 1]`` per text;
    * ``score(problem, texts, finished)`` -> ``log(reward)`` per text (the potential protocol);
    * ``verify(problem, samples)`` -> one :class:`Verdict` per sample: ``status`` pass/fail by
      whether every line (the ``####`` line included) is right, ``answer`` the ``####`` value,
      ``score`` the aggregated reward, ``meta["step_scores"]`` and ``meta["wrong_steps"]``.

    ``aggregation``: ``prod`` (default), ``min``, ``last`` or ``mean``; ``wrong``: the score of
    a wrong step, in ``[0, 1)``; ``value``: what ``score`` returns, ``"log_prob"`` (default,
    ``log(reward)``: a log-potential) or ``"prob"`` (the reward itself: what Feynman-Kac shaping
    and particle-filter weighting take as ``r_t``).
    """

    name = "arith-prm"

    def __init__(
        self, *, aggregation: str = "prod", wrong: float = 0.0, value: str = "log_prob"
    ) -> None:
        check_choice("aggregation", aggregation, ARITH_PRM_AGGREGATIONS)
        check_number("wrong", wrong, low=0.0, high=1.0, high_open=True)
        check_choice("value", value, ARITH_PRM_VALUES)
        self.aggregation = aggregation
        self.wrong = float(wrong)
        self.value = value

    def info(self) -> dict[str, Any]:
        return {"class": "ArithProcessReward", "aggregation": self.aggregation, "wrong": self.wrong}

    def checks(self, problem: Problem, text: str, *, finished: bool = True) -> list[LineCheck]:
        """The :class:`LineCheck` of every complete line of ``text``."""
        return check_lines(_question(problem), _complete_lines(text, finished), finished=finished)

    def step_scores(self, problem: Problem, text: str, *, finished: bool = True) -> list[float]:
        """Per-step scores: 1.0 for a right line, ``wrong`` for a wrong one."""
        return [1.0 if c.ok else self.wrong for c in self.checks(problem, text, finished=finished)]

    def _aggregate(self, s: list[float]) -> float:
        if not s:
            return 1.0
        if self.aggregation == "prod":
            return float(math.prod(s))
        if self.aggregation == "min":
            return min(s)
        if self.aggregation == "last":
            return s[-1]
        return float(sum(s) / len(s))

    def reward(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool] | bool = False
    ) -> np.ndarray:
        """The aggregated reward in ``[0, 1]`` of each (partial) text; float64."""
        fin = _finished_list(finished, len(texts))
        return np.array(
            [
                self._aggregate(self.step_scores(problem, t, finished=f))
                for t, f in zip(texts, fin, strict=True)
            ],
            dtype=np.float64,
        )

    def score(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool] | bool = False
    ) -> np.ndarray:
        """The log-potential ``log(reward)`` of each text (``-inf`` where the reward is 0), or
        the reward itself with ``value="prob"``."""
        r = self.reward(problem, texts, finished)
        if self.value == "prob":
            return r
        with np.errstate(divide="ignore"):
            return np.log(r)

    __call__ = score

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        from ttscale.verifiers.extract import final_hash_integer

        out: list[Verdict] = []
        for s in samples:
            text = s.text or ""
            checks = self.checks(problem, text, finished=True)
            scores = [1.0 if c.ok else self.wrong for c in checks]
            wrong_steps = [i for i, c in enumerate(checks) if not c.ok]
            answer = final_hash_integer(text)
            if answer is None:
                status = VerdictStatus.INVALID
            else:
                status = VerdictStatus.FAIL if wrong_steps else VerdictStatus.PASS
            first = checks[wrong_steps[0]].reason if wrong_steps else ""
            out.append(
                Verdict(
                    problem_id=problem.id,
                    index=s.index,
                    status=status,
                    verifier=self.name,
                    answer=answer,
                    correct=status is VerdictStatus.PASS,
                    score=self._aggregate(scores),
                    detail=f"step {wrong_steps[0] + 1}: {first}" if wrong_steps else "",
                    meta={"step_scores": scores, "wrong_steps": wrong_steps},
                )
            )
        return out


def arith_prm_potential(arg: str = "", *, value: str = "log_prob", **options: Any) -> Any:
    """The ``--potential arith-prm[:AGG]`` factory: ``ArithProcessReward(aggregation=AGG,
    value=value)``; other CLI options (engine settings) do not apply to it and are ignored."""
    if arg:
        check_choice("arith-prm aggregation", arg, ARITH_PRM_AGGREGATIONS)
    wrong = float(options.get("wrong", 0.0))
    return ArithProcessReward(aggregation=arg or "prod", wrong=wrong, value=value)


def _finished_list(finished: Sequence[bool] | bool, n: int) -> list[bool]:
    if isinstance(finished, (bool, np.bool_)):
        return [bool(finished)] * n
    fin = [bool(f) for f in finished]
    if len(fin) != n:
        raise ConfigError(f"finished must have one flag per text ({n}), got {len(fin)}")
    return fin
