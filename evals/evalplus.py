"""EvalPlus test files (HumanEval+ / MBPP+) as a strong verifier's tests.

EvalPlus publishes its tests as JSON Lines (``HumanEvalPlus.jsonl.gz`` and
``MbppPlus.jsonl.gz`` on the GitHub releases of ``evalplus/humanevalplus_release`` and
``evalplus/mbppplus_release``), one task per line with the fields read here:

``task_id``             ``"HumanEval/0"`` / ``"Mbpp/2"``
``entry_point``         the function under test
``prompt``              the code prompt (HumanEval: signature and docstring)
``canonical_solution``  the reference body; ``prompt + canonical_solution`` is the oracle
``base_input``          argument lists of the original benchmark's tests
``plus_input``          argument lists EvalPlus added
``atol``                absolute tolerance for float outputs (0: exact, but floats get 1e-6)

No expected outputs are stored: like EvalPlus, ttscale runs the oracle on the inputs (in the
sandbox, once per task and suite) and compares each candidate's return value with it. The
"OriginFmt" export (and the Hugging Face copy ``evalplus/humanevalplus``) folds base and plus
inputs into one HumanEval-style ``test``; it cannot tell the two suites apart, so it is refused
here (it loads as an ordinary HumanEval file with ``load_humaneval(path=...)``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttscale.errors import DataError
from ttscale.evals.loaders import read_records
from ttscale.types import Problem

__all__ = ["EvalPlusTask", "EvalPlusTests", "load_evalplus"]


@dataclass(frozen=True)
class EvalPlusTask:
    """One task's EvalPlus tests: the oracle and the two input suites."""

    task_id: str
    entry_point: str
    oracle: str  # prompt + canonical_solution
    base_input: list[Any] = field(repr=False)
    plus_input: list[Any] = field(repr=False)
    atol: float = 0.0

    def inputs(self, suite: str) -> list[Any]:
        """``"base"``: the original tests' inputs; ``"plus"``: EvalPlus's added inputs."""
        return self.base_input if suite == "base" else self.plus_input


@dataclass(frozen=True)
class EvalPlusTests:
    """The tasks of one EvalPlus file, looked up by a run's problems."""

    path: Path
    sha256: str
    tasks: Mapping[str, EvalPlusTask] = field(repr=False)

    def for_problem(self, problem: Problem) -> EvalPlusTask | None:
        """The task for ``problem``: by id (``HumanEval/0``), by ``meta["task_id"]``, or as
        ``Mbpp/<task_id>`` for ttscale's MBPP problems (``mbpp-<task_id>``)."""
        keys = [problem.id]
        tid = problem.meta.get("task_id")
        if tid is not None:
            keys.append(str(tid))
        if problem.meta.get("format") == "mbpp" or problem.id.startswith("mbpp-"):
            keys.append(f"Mbpp/{tid if tid is not None else problem.id[5:]}")
        for k in keys:
            if k in self.tasks:
                return self.tasks[k]
        return None


def load_evalplus(path: str | os.PathLike[str]) -> EvalPlusTests:
    """Read an EvalPlus ``.jsonl`` / ``.jsonl.gz`` test file (see the module docstring)."""
    p = Path(path).expanduser()
    recs = read_records(p)
    if not recs:
        raise DataError(f"{p}: no tasks in the EvalPlus file")
    tasks: dict[str, EvalPlusTask] = {}
    for i, rec in enumerate(recs):
        if "plus_input" not in rec and "test" in rec:
            raise DataError(
                f"{p}: record {i} has no plus_input (the HumanEval-format 'OriginFmt' export?); "
                "use HumanEvalPlus.jsonl.gz or MbppPlus.jsonl.gz from the EvalPlus releases"
            )
        missing = [
            k
            for k in ("task_id", "entry_point", "prompt", "canonical_solution", "base_input",
                      "plus_input")
            if rec.get(k) is None
        ]
        if missing:
            raise DataError(f"{p}: record {i} is not an EvalPlus task (missing {missing})")
        if not isinstance(rec["base_input"], list) or not isinstance(rec["plus_input"], list):
            raise DataError(f"{p}: record {i}: base_input and plus_input must be lists")
        for name in ("base_input", "plus_input"):
            if not all(isinstance(a, list) for a in rec[name]):
                raise DataError(f"{p}: record {i}: every {name} entry must be an argument list")
        try:
            atol = float(rec.get("atol") or 0.0)
        except (TypeError, ValueError):
            raise DataError(f"{p}: record {i}: atol must be a number, got {rec.get('atol')!r}") from None
        tid = str(rec["task_id"])
        tasks[tid] = EvalPlusTask(
            task_id=tid,
            entry_point=str(rec["entry_point"]),
            oracle=str(rec["prompt"]) + str(rec["canonical_solution"]),
            base_input=rec["base_input"],
            plus_input=rec["plus_input"],
            atol=atol,
        )
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return EvalPlusTests(path=p.resolve(), sha256=digest, tasks=tasks)
