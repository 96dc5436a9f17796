"""Math equivalence (math-verify in worker processes), voting keys, caches, MathVerifier, factory."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("math_verify")

from ttscale.errors import ConfigError, VerifierError
from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.verifiers import base as vbase
from ttscale.verifiers.base import Verifier, make_verifier, split_spec, verify_many
from ttscale.verifiers.math import MathVerifier, extract_answer, gold_answer
from ttscale.verifiers.mathcheck import (
    MathChecker,
    _worker_init,
    _worker_task,
    canonical_number,
    fast_equal,
    math_verify_version,
    numeric_answer,
)

# 3^(3^15): SymPy evaluates the 7-million-digit power, seconds of CPU (more on a loaded machine)
PATHOLOGICAL = r"3^{3^{15}}"


@pytest.fixture(scope="module")
def checker():
    with MathChecker(workers=1, timeout=30.0) as mc:
        yield mc


def test_math_verify_installed():
    v = math_verify_version()
    assert v is not None and tuple(int(x) for x in v.split(".")[:2]) >= (0, 8)


# ---------------------------------------------------------------------------------------
# docs/algorithms.md §10.4 vectors (gold first; the relation is asymmetric)

GOLD_HALF = r"$\frac{1}{2}$"


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (r"The answer is $\boxed{0.5}$", True),
        ("so x = 1/2", True),
        (r"$\boxed{\frac12}$", True),
        ("0.50000001", True),  # float_rounding = 6
        (r"$\boxed{2}$", False),
        ("", False),
    ],
)
def test_math_verify_vectors(checker, candidate, expected):
    r = checker.equivalent(GOLD_HALF, candidate)
    assert r.status == "ok"
    assert r.equal is expected


def test_math_verify_asymmetric_and_other_vectors(checker):
    assert checker.equivalent("$1<x<2$", "$(1,2)$").equal is True
    assert checker.equivalent("$(1,2)$", "$1<x<2$").equal is False
    assert checker.equivalent("$101$", "$a+2z = 101$").equal is True
    assert checker.equivalent(r"$10\%$", "$0.1$").equal is True
    assert checker.equivalent("1234", "The final answer is 1,234").equal is True
    # symbolic, through math-verify rather than the numeric fast path
    r = checker.equivalent(r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}")
    assert r.equal is True and r.how in ("math-verify", "cache")


# ---------------------------------------------------------------------------------------
# numeric fast path


def test_numeric_answer_and_canonical_number():
    assert numeric_answer(r"\frac{1}{2}").value == numeric_answer("0.5").value
    assert numeric_answer(r"-\dfrac12").value == -numeric_answer("1/2").value
    assert numeric_answer("1/0") is None
    assert numeric_answer("x+1") is None
    assert numeric_answer("0.5").decimal and not numeric_answer("1/2").decimal
    from fractions import Fraction

    assert canonical_number(Fraction(1, 2)) == "0.5"
    assert canonical_number(Fraction(-3)) == "-3"
    assert canonical_number(Fraction(1, 3)) == "1/3"
    assert canonical_number(Fraction(1, 1024)) == "0.0009765625"  # terminating, exact
    assert canonical_number(Fraction(0)) == "0"


AGREEMENT_PAIRS = [
    ("1/3", "0.333333"), ("1/3", "0.33"), ("3", "3.0"), ("3", "3.000001"), ("1,234", "1234"),
    ("-3", "\u22123"), ("0.1", "1/10"), ("2", r"\frac{4}{2}"), ("0.5", r"\frac{1}{2}"),
    ("1/2", "0.5000004"), ("1/2", "0.500001"), ("7", "-7"), ("1000000", "1,000,000"),
    (r"\frac{2}{3}", "0.666667"), (r"\frac{2}{3}", "0.666666"), ("12.5", "25/2"),
    ("-0.25", r"-\frac{1}{4}"), ("2.5", "2.50"), ("10", "10."),
]  # fmt: skip


def test_fast_path_agrees_with_math_verify():
    """The fast path must give math-verify's answer on plain numbers (checked in-process)."""
    _worker_init()
    cfg = {"float_rounding": 6, "numeric_precision": 15, "strict": True, "signal_timeout": None}
    for gold, cand in AGREEMENT_PAIRS:
        fast = fast_equal(gold, cand)
        assert fast is not None, (gold, cand)
        assert fast == _worker_task("eq", gold, cand, cfg), (gold, cand)


def test_fast_path_rounds_integer_gold_too():
    # Deliberate deviation: math-verify 0.9 compares Integer(3) with the rounded Float
    # 3.000000 structurally (False) although its float_rounding is meant to accept it;
    # ours applies the rounding rule consistently.
    assert fast_equal("3", "3.0000004") is True
    assert fast_equal("x", "3") is None


# ---------------------------------------------------------------------------------------
# voting keys


def test_equivalent_spellings_share_one_key(checker):
    keys = checker.canonical_many(
        ["0.5", r"\frac{1}{2}", "1/2", r"\dfrac12", "0.50", r"$\frac{1}{2}$", r"\tfrac{2}{4}"]
    )
    assert set(keys) == {"0.5"}
    k = checker.canonical_many(
        [r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}", r"2\sqrt{2}", r"\sqrt{8}", "x=5", "5",
         r"\frac{1}{3}", "1/3", "1,234", "1234.0"]
    )  # fmt: skip
    assert k[0] == k[1] and k[2] == k[3] and k[4] == k[5] == "5"
    assert k[6] == k[7] == "1/3" and k[8] == k[9] == "1234"
    assert k[0] != k[2]


def test_unparsable_answers_fall_back_to_normalised_string(checker):
    keys = checker.canonical_many([r"\text{(A)}", r"\text{ (A) }", "Monday"])
    assert keys[0] == keys[1] == "(A)"
    assert keys[2] == "Monday"


# ---------------------------------------------------------------------------------------
# timeouts in worker processes


def test_pathological_expression_times_out_in_worker():
    timeout = 1.0
    with MathChecker(workers=1, timeout=timeout) as mc:
        assert mc.equivalent(r"\sqrt{4}", "x").status == "ok"  # warm-up: the worker is running
        t0 = time.monotonic()
        r = mc.equivalent("5", PATHOLOGICAL)
        elapsed = time.monotonic() - t0
        assert r.status == "timeout" and r.equal is False
        assert elapsed < timeout + 5.0  # killed at the deadline, not after SymPy finishes
        assert mc.stats.timeouts == 1 and mc.stats.worker_restarts == 1
        # the replacement worker serves the next check
        assert mc.equivalent(r"\frac{\sqrt{4}}{4}", "0.5").equal is True
        # the timed-out pair is remembered: asking again costs no second timeout
        t0 = time.monotonic()
        assert mc.equivalent("5", PATHOLOGICAL).status == "timeout"
        assert time.monotonic() - t0 < 0.5 and mc.stats.timeouts == 1


def test_timeout_verdict_and_key_fallback():
    with MathVerifier(workers=1, timeout=1.0) as v:
        p = Problem("p", "q", reference="5")
        (vd,) = v.verify(p, [Sample("p", 0, rf"\boxed{{{PATHOLOGICAL}}}")])
        assert vd.status is VerdictStatus.TIMEOUT and vd.correct is False and vd.score is None
        assert vd.answer == PATHOLOGICAL  # the key computation timed out too: normalised string


# ---------------------------------------------------------------------------------------
# caches


def test_cache_hit_counts():
    pairs = [(r"\frac{\pi}{2}", r"\frac{2\pi}{4}"), (r"\sqrt{2}", r"2^{1/2}"), ("x+1", "1+x")]
    with MathChecker(workers=1, timeout=30.0) as mc:
        first = mc.equivalent_many(pairs + pairs)  # duplicates inside one call: checked once
        assert [r.equal for r in first] == [True, True, True] * 2
        assert mc.stats.checked == 3 and mc.stats.cache_hits == 3
        second = mc.equivalent_many(pairs)
        assert [r.how for r in second] == ["cache"] * 3
        assert mc.stats.checked == 3 and mc.stats.cache_hits == 6 and mc.stats.pairs == 9


def test_persistent_cache(tmp_path):
    db = tmp_path / "mv.sqlite"
    pairs = [(r"\frac{\pi}{2}", r"\frac{2\pi}{4}"), (r"\sqrt{2}", "1.5")]
    with MathChecker(workers=1, timeout=30.0, cache_path=db) as mc:
        assert [r.equal for r in mc.equivalent_many(pairs)] == [True, False]
        key = mc.canonical(r"\frac{\sqrt{3}}{2}")
    with MathChecker(workers=1, timeout=30.0, cache_path=db) as mc:
        assert [r.equal for r in mc.equivalent_many(pairs)] == [True, False]
        assert mc.canonical(r"\frac{\sqrt{3}}{2}") == key
        assert mc.stats.checked == 0 and mc.stats.disk_hits == 2
        assert mc._pool is None  # nothing needed a worker
    # a different setting does not reuse the rows
    with MathChecker(workers=1, timeout=30.0, cache_path=db, float_rounding=3) as mc:
        assert mc._disk.get_equiv(pairs) == {}


# ---------------------------------------------------------------------------------------
# MathVerifier


def test_math_verifier_statuses():
    p = Problem("p1", "q", reference=r"The solution ... so $\boxed{\frac{1}{2}}$.")
    texts = [
        r"so \boxed{0.5}",
        "The answer is 1/2",
        r"\boxed{\frac{\sqrt{4}}{4}}",
        r"\boxed{2}",
        "nothing here",
        r"\boxed{}",
        "Final Answer: The final answer is $\\frac12$. I hope it is correct.",
    ]
    with MathVerifier(workers=1, timeout=30.0) as v:
        assert isinstance(v, Verifier)
        vs = v.verify(p, [Sample("p1", i, t) for i, t in enumerate(texts)])
    assert [x.index for x in vs] == list(range(len(texts)))
    assert [x.status.value for x in vs] == [
        "pass",
        "pass",
        "pass",
        "fail",
        "invalid",
        "invalid",
        "pass",
    ]
    assert [x.answer for x in vs] == ["0.5", "0.5", "0.5", "2", None, None, "0.5"]
    assert [x.score for x in vs] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert vs[0].meta["rule"] == "boxed" and vs[1].meta["rule"] == "answer_is"
    assert vs[6].meta["rule"] == "minerva"
    assert all(x.verifier == "math" for x in vs)


def test_math_verifier_batches_and_deduplicates():
    # two problems, 64 samples each drawn from a few distinct answers (a typical vote pool)
    answers_a = [r"\frac{1}{2}", "0.5", r"\frac{2}{3}", r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"]
    answers_b = [r"x^2+1", r"1+x^2", "7"]
    pa, pb = Problem("a", "q", r"\frac{1}{2}"), Problem("b", "q", "x^2+1")
    sa = [Sample("a", i, rf"\boxed{{{answers_a[i % 5]}}}") for i in range(64)]
    sb = [Sample("b", i, rf"\boxed{{{answers_b[i % 3]}}}") for i in range(64)]
    with MathVerifier(workers=2, timeout=30.0) as v:
        va, vb = v.verify_many([(pa, sa), (pb, sb)])
        stats = v.stats
    assert len(va) == len(vb) == 64
    assert sum(x.correct for x in va) == 26  # indices with i % 5 in (0, 1)
    assert sum(x.correct for x in vb) == 43  # i % 3 in (0, 1)
    # math-verify ran once per distinct (gold, candidate) pair whose keys differ
    assert stats["checked"] <= 4
    assert stats["pairs"] == stats["checked"] + stats["fast"] + stats["cache_hits"]


def test_math_verifier_references_and_extractors():
    assert gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gold_answer({"answer": 5}) == "5"
    assert gold_answer(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert gold_answer(None) is None
    assert extract_answer("So 3 then.\n#### 14", "arith") == ("14", "arith")
    assert extract_answer("#### 14 is wrong, 15", "arith") == (None, None)
    assert extract_answer(r"ok \boxed{3} #### 4", "gsm8k") == ("4", "gsm8k_strict")
    assert extract_answer("It is 12.", "gsm8k") == ("12.", "gsm8k_flexible")
    with pytest.raises(ConfigError, match="extractor must be one of"):
        extract_answer("x", "nope")


def test_math_verifier_gsm8k_and_arith_need_no_workers():
    v = make_verifier("arith")
    p = Problem("a", "q", "1234")
    vs = v.verify(p, [Sample("a", 0, "...\n#### 1,234"), Sample("a", 1, "#### 1235"),
                      Sample("a", 2, "no answer")])  # fmt: skip
    assert [x.status.value for x in vs] == ["pass", "fail", "invalid"]
    assert v.name == "arith" and v.checker._pool is None
    v.close()
    g = make_verifier("math:gsm8k")
    vs = g.verify(Problem("g", "q", "x\n#### 72"), [Sample("g", 0, "so 72.")])
    assert vs[0].status is VerdictStatus.PASS and g.checker._pool is None
    g.close()


def test_no_reference_gives_error_verdicts_with_answers():
    with MathVerifier(workers=1) as v:
        (vd,) = v.verify(Problem("p", "q", None), [Sample("p", 0, r"\boxed{0.50}")])
    assert vd.status is VerdictStatus.ERROR and vd.correct is None and vd.answer == "0.5"


def test_bad_candidates_are_verdicts_not_exceptions():
    weird = ["", "\\boxed{\\frac{", "}{}{", "\u0000\u2212", "\\boxed{" + "(" * 500 + "}",
             "\\boxed{1/0}", "\\boxed{\\infty}", "x" * 20000]  # fmt: skip
    with MathVerifier(workers=1, timeout=2.0) as v:
        vs = v.verify(Problem("p", "q", "3"), [Sample("p", i, t) for i, t in enumerate(weird)])
    assert len(vs) == len(weird)
    assert all(x.status.value in ("fail", "invalid", "timeout", "error") for x in vs)


# ---------------------------------------------------------------------------------------
# factory


def test_make_verifier_specs():
    assert split_spec(" rm:/models/a:b ") == ("rm", "/models/a:b")
    v = make_verifier("math:boxed", workers=1, timeout=2.0, not_an_option=1)
    assert v.extractor == "boxed" and v.checker.timeout == 2.0
    v.close()
    with pytest.raises(ConfigError, match="unknown verifier"):
        make_verifier("bogus")
    with pytest.raises(ConfigError, match="rm:PATH"):
        make_verifier("rm")
    with pytest.raises(ConfigError, match="judge:MODEL"):
        make_verifier("judge:")
    with pytest.raises(ConfigError, match="extractor must be one of"):
        make_verifier("math:nope")
    with pytest.raises(ConfigError, match="nested"):
        make_verifier("ensemble:math,ensemble:arith")


def test_make_verifier_ensemble_members():
    pytest.importorskip("ttscale.verifiers.ensemble")
    e = make_verifier("ensemble:math,arith", workers=1)
    try:
        assert [m.name for m in e.members] == ["math", "arith"]
    finally:
        vbase.close_verifier(e)
    assert vbase._split_members("rm:/a,b/c,math") == ["rm:/a,b/c", "math"]


def test_make_verifier_missing_module(monkeypatch):
    monkeypatch.setitem(vbase.VERIFIER_SPECS, "code", "ttscale.verifiers.no_such_module:X")
    with pytest.raises(VerifierError, match="not available"):
        make_verifier("code")


def test_verify_many_falls_back_to_verify():
    class One:
        name = "one"

        def verify(self, problem, samples):
            return [f"{problem.id}:{s.index}" for s in samples]

        def info(self):
            return {}

    out = verify_many(One(), [(Problem("a", "q"), [Sample("a", 0)]), (Problem("b", "q"), [])])
    assert out == [["a:0"], []]


# ---------------------------------------------------------------------------------------
# the timeout pool itself (stdlib targets, so no math-verify start-up)


def test_timeout_pool_outcomes():
    from ttscale.verifiers._procpool import TimeoutPool

    with TimeoutPool("time:sleep", workers=2, timeout=0.5) as pool:
        t0 = time.monotonic()
        out = pool.map([(0.01,), (30,), (0.01,), (0.02,)])
        assert [o.status for o in out] == ["ok", "timeout", "ok", "ok"]
        assert time.monotonic() - t0 < 10 and pool.restarts == 1
    with TimeoutPool("os:_exit", workers=1, timeout=5) as pool:
        (o,) = pool.map([(3,)])
        assert o.status == "crash" and "exit code 3" in o.detail
    with TimeoutPool("builtins:bytearray", workers=1, timeout=20, memory_mb=300) as pool:
        big, small = pool.map([(2 * 10**9,), (10,)])
        assert big.status == "memory" and small.status == "ok" and small.value == bytearray(10)
    with TimeoutPool("builtins:int", workers=1, timeout=5) as pool:
        bad, good = pool.map([("x",), ("7",)])
        assert bad.status == "error" and "ValueError" in bad.detail and good.value == 7
    with pytest.raises(VerifierError, match="failed to start"):
        TimeoutPool("time:sleep", initializer="ttscale.no_such_module:f").map([(0,)])
    with pytest.raises(ConfigError, match="workers"):
        TimeoutPool("time:sleep", workers=0)
