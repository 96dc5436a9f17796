"""check_verifier against every built-in verifier that runs offline, and against broken ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from ttscale.testing import VerifierContractError, check_verifier
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.verifiers.base import make_verifier

ADD_PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n"


def test_math_verifier_contract() -> None:
    p = Problem(id="m", prompt="1/2 + 0?", reference=r"\frac{1}{2}")
    out = check_verifier(make_verifier("math"), p, [r"so \boxed{0.5}", r"\boxed{3}", "no idea"])
    assert [v.correct for v in out] == [True, False, False]
    assert out[2].status is VerdictStatus.INVALID


def test_arith_verifier_contract() -> None:
    p = Problem(id="a", prompt="2+3=", reference="5")
    out = check_verifier(make_verifier("arith"), p, ["2+3\n#### 5", "#### 7", "5"])
    # the arith format wants a "#### x" line: a bare "5" has no extractable answer
    assert [v.status for v in out] == [
        VerdictStatus.PASS,
        VerdictStatus.FAIL,
        VerdictStatus.INVALID,
    ]


def test_code_verifier_contract() -> None:
    p = Problem(
        id="he/add",
        prompt=ADD_PROMPT,
        reference=ADD_TEST,
        meta={"entry_point": "add", "code_prompt": ADD_PROMPT, "format": "humaneval"},
    )
    v = make_verifier("code", isolation="process", timeout=5.0, workers=1)
    out = check_verifier(v, p, ["    return a + b\n", "    return a - b\n"])
    assert [x.status for x in out] == [VerdictStatus.PASS, VerdictStatus.FAIL]


class _Base:
    def info(self) -> dict[str, Any]:
        return {"verifier": "toy"}

    def verdict(self, s: Sample) -> Verdict:
        return Verdict(s.problem_id, s.index, VerdictStatus.FAIL, "toy", answer=s.text[:3])


class _RaisesOnEmpty(_Base):
    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        if any(not s.text for s in samples):
            raise ValueError("empty candidate")
        return [self.verdict(s) for s in samples]


class _SortsByIndex(_Base):
    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        return [self.verdict(s) for s in sorted(samples, key=lambda s: s.index)]


class _DropsOne(_Base):
    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        return [self.verdict(s) for s in samples][1:]


class _BadInfo(_Base):
    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        return [self.verdict(s) for s in samples]

    def info(self) -> dict[str, Any]:
        return {"verifier": "toy", "extractor": object()}


@pytest.mark.parametrize(
    ("verifier", "match"),
    [
        (_RaisesOnEmpty(), "verify raised ValueError"),
        (_SortsByIndex(), "one verdict per sample, in order"),
        (_DropsOne(), "verdicts for"),
        (_BadInfo(), "not JSON-serialisable"),
    ],
)
def test_check_verifier_catches_broken_verifiers(verifier: Any, match: str) -> None:
    with pytest.raises(VerifierContractError, match=match):
        check_verifier(verifier, Problem(id="x", prompt="q", reference="1"), ["1", "2"])
