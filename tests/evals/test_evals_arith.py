"""The bundled ``arith`` benchmark: determinism, difficulty grading, checker, split disjointness."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.evals import arith
from ttscale.evals.arith import (
    LEVELS,
    check,
    extract_arith_answer,
    generate_item,
    generate_items,
    generate_problems,
    split_of,
)
from ttscale.evals.registry import load_problems

_LINE = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def _replay(item: arith.ArithItem) -> int:
    """Recompute the answer from the question text alone (an independent reading of it)."""
    words = item.question.split()
    value = int(words[2])
    sentences = item.question.split(". ")
    for s in sentences[1:]:
        if s.startswith("How many"):
            break
        nums = [int(w.strip(".")) for w in s.split() if w.strip(".").isdigit()]
        if "doubles" in s:
            value *= 2
        elif "triples" in s:
            value *= 3
        elif any(v in s for v in ("buys", "finds", "gets")):
            value += nums[0]
        elif any(v in s for v in ("gives away", "loses", "sells")):
            value -= nums[0]
        else:  # pragma: no cover - would mean a sentence the test does not know
            raise AssertionError(f"unknown sentence {s!r}")
    return value


def test_same_seed_same_problems_and_different_seed_differs() -> None:
    a = generate_problems(50, split="test", seed=7)
    b = generate_problems(50, split="test", seed=7)
    c = generate_problems(50, split="test", seed=8)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    # the registry's test split is the same fixed list every time
    assert load_problems("arith") == load_problems("arith")
    assert len(load_problems("arith")) == 200


def test_solution_lines_are_correct_and_answer_matches_question() -> None:
    items = generate_items(300, split="train", seed=3)
    for it in items:
        lines = it.solution.split("\n")
        assert lines[-1] == f"#### {it.answer}"
        steps = lines[:-1]
        assert len(steps) == LEVELS[it.difficulty].steps
        prev = int(it.question.split()[2])
        for line in steps:
            m = _LINE.match(line)
            assert m, line
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == prev
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert 0 < c <= 999
            prev = c
        assert prev == it.answer == _replay(it)
        assert extract_arith_answer(it.solution) == str(it.answer)


def test_difficulty_grading() -> None:
    rng = np.random.default_rng(0)
    maxima = {}
    for d in sorted(LEVELS):
        items = [generate_item(rng, d) for _ in range(400)]
        assert all(len(it.solution.split("\n")) == d + 1 for it in items)
        operands = [int(x) for it in items for x in re.findall(r"\d+", it.question)]
        maxima[d] = max(operands)
        if not LEVELS[d].multiply:
            assert "*" not in "".join(it.solution for it in items)
    # numbers grow with the level; multiplication appears only from level 3
    assert maxima[1] < maxima[2] < maxima[3] <= maxima[5]
    assert any("*" in it.solution for it in [generate_item(rng, 5) for _ in range(50)])
    # equal weights: exactly 40 problems per level in a 200-problem split
    probs = generate_problems(200, split="test", seed=1)
    counts = {d: sum(p.meta["difficulty"] == d for p in probs) for d in LEVELS}
    assert counts == dict.fromkeys(LEVELS, 40)
    weighted = generate_problems(10, split="test", seed=1, difficulties=[1, 5], weights=[3, 2])
    assert sorted(p.meta["difficulty"] for p in weighted) == [1] * 6 + [5] * 4


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="difficulty"):
        generate_item(np.random.default_rng(0), 9)
    with pytest.raises(ConfigError, match="split"):
        generate_items(3, split="validation", seed=0)
    with pytest.raises(ConfigError, match="weights"):
        generate_items(3, seed=0, weights=[1, 2])
    with pytest.raises(ConfigError, match="n must be"):
        generate_items(-1, seed=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 + 7 = 19\n19 - 5 = 14\n#### 14", "14"),
        ("#### 3\n#### 15\n", "15"),  # the last answer line wins
        ("#### 1,234", "1234"),
        ("####  007 ", "7"),
        ("#### -4", "-4"),
        ("#### 14.", "14"),
        ("12 + 7 = 19", None),
        ("#### x", None),
        ("the answer is #### 14 apples", None),  # not on its own line
        ("#### 12\n#### ", "12"),  # an empty last answer line does not count
        ("", None),
        (None, None),
    ],
)
def test_extract(text: str | None, expected: str | None) -> None:
    assert extract_arith_answer(text) == expected


def test_check() -> None:
    assert check("14", "14")
    assert check("14", 14)
    assert check(14, "14")
    assert check("1,234", "1234")
    assert not check("15", "14")
    assert not check(None, "14")
    assert not check("fourteen", "14")


def test_train_and_test_are_disjoint() -> None:
    test = load_problems("arith", "test")
    train = load_problems("arith", "train", n=20_000)
    train_q = {p.meta["question"] for p in train}
    test_q = [p.meta["question"] for p in test]
    assert len(set(test_q)) == len(test_q) == 200
    assert not train_q.intersection(test_q)
    assert all(split_of(q) == "test" for q in test_q)
    assert all(split_of(q) == "train" for q in list(train_q)[:2000])
    # the hash puts about TEST_FRACTION of all questions into test
    rng = np.random.default_rng(5)
    qs = {generate_item(rng, int(rng.integers(1, 6))).question for _ in range(4000)}
    frac = np.mean([split_of(q) == "test" for q in qs])
    assert abs(frac - arith.TEST_FRACTION) < 0.02


def test_registry_test_split_uses_the_documented_mix() -> None:
    probs = load_problems("arith")
    counts = [sum(p.meta["difficulty"] == d for p in probs) for d in sorted(LEVELS)]
    assert counts == [43, 43, 71, 29, 14]  # 200 * (3, 3, 5, 2, 1) / 14, largest remainders
    assert arith.DEFAULT_TEST_WEIGHTS == (3, 3, 5, 2, 1)
