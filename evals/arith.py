"""``arith``: synthetic multi-step integer word problems with worked solutions and exact answers.

A problem starts from a quantity and applies ``steps`` operations (add, subtract, double,
triple), one short sentence each, in a deliberately tiny and regular language::

    Tom has 12 apples. He buys 7 more. Then he gives away 5. How many apples does Tom have?

and its worked solution has one ``a op b = c`` line per step and a final ``#### answer`` line::

    12 + 7 = 19
    19 - 5 = 14
    #### 14

Difficulty levels ``1..MAX_DIFFICULTY`` grade the number of steps (level ``d`` has ``d`` steps)
and the size of the numbers (see :data:`LEVELS`). Generation is deterministic given a seed.

Train and test are disjoint by construction: every question string is assigned to a split by a
keyed hash of its text (:func:`split_of`), and each split's generator rejects questions that
belong to the other one, so no test question can ever appear in any train set, whatever the seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike, as_generator
from ttscale.types import Problem
from ttscale.validation import check_int

__all__ = [
    "ARITH_PROMPT",
    "DEFAULT_TEST_SEED",
    "DEFAULT_TEST_SIZE",
    "DEFAULT_TEST_WEIGHTS",
    "DEFAULT_TRAIN_SEED",
    "DEFAULT_TRAIN_SIZE",
    "LEVELS",
    "MAX_DIFFICULTY",
    "TEST_FRACTION",
    "ArithItem",
    "Level",
    "check",
    "extract_arith_answer",
    "generate_item",
    "generate_items",
    "generate_problems",
    "split_of",
]


@dataclass(frozen=True)
class Level:
    """Generation parameters of one difficulty level (inclusive integer ranges)."""

    steps: int
    start: tuple[int, int]
    operand: tuple[int, int]
    multiply: tuple[int, ...]  # allowed multipliers (empty: no multiplication steps)


#: Difficulty level -> parameters. Level ``d`` has ``d`` steps; numbers grow with the level.
LEVELS: dict[int, Level] = {
    1: Level(steps=1, start=(2, 20), operand=(1, 9), multiply=()),
    2: Level(steps=2, start=(2, 30), operand=(1, 9), multiply=()),
    3: Level(steps=3, start=(5, 50), operand=(1, 20), multiply=(2,)),
    4: Level(steps=4, start=(10, 60), operand=(1, 30), multiply=(2,)),
    5: Level(steps=5, start=(10, 99), operand=(1, 50), multiply=(2, 3)),
}
MAX_DIFFICULTY = max(LEVELS)

#: The prompt sent to the model: the question and a newline; the model writes the solution.
ARITH_PROMPT = "{question}\n"

DEFAULT_TRAIN_SEED = 0
DEFAULT_TEST_SEED = 20240601
DEFAULT_TRAIN_SIZE = 20_000
DEFAULT_TEST_SIZE = 200
#: Difficulty mix of the default test split (levels 1..5; training uses equal weights). Chosen,
#: after training the bundled model, so that its repeated-sampling gap is visible: weight on the
#: middle levels where pass@1 is low but coverage@64 high (see evals/model/TRAINING.md).
DEFAULT_TEST_WEIGHTS: tuple[float, ...] = (3, 3, 5, 2, 1)
#: Fraction of the question space that belongs to the test split (hash buckets).
TEST_FRACTION = 0.1

_MAX_VALUE = 999  # keep every intermediate value at most three digits

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"),
    ("Ann", "she"),
    ("Ben", "he"),
    ("Eva", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Zoe", "she"),
)
_ITEMS: tuple[str, ...] = (
    "apples",
    "pens",
    "cards",
    "coins",
    "books",
    "shells",
    "stamps",
    "marbles",
)
_ADD_VERBS: tuple[str, ...] = ("buys {n} more", "finds {n} more", "gets {n} more")
_SUB_VERBS: tuple[str, ...] = ("gives away {n}", "loses {n}", "sells {n}")
_MUL_VERBS: dict[int, str] = {2: "doubles them", 3: "triples them"}


@dataclass(frozen=True)
class ArithItem:
    """One generated problem: question text, worked solution, integer answer and its level."""

    question: str
    solution: str
    answer: int
    difficulty: int

    @property
    def prompt(self) -> str:
        return ARITH_PROMPT.format(question=self.question)


def split_of(question: str) -> str:
    """The split (``"train"`` or ``"test"``) a question string belongs to.

    A keyed blake2b hash of the text mapped to ``[0, 1)``; ``< TEST_FRACTION`` is test. Stable
    across processes and Python versions.
    """
    h = hashlib.blake2b(question.encode(), digest_size=8, person=b"ttsarith").digest()
    u = int.from_bytes(h, "little") / 2.0**64
    return "test" if u < TEST_FRACTION else "train"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def generate_item(rng: np.random.Generator, difficulty: int) -> ArithItem:
    """Draw one problem of the given difficulty level with ``rng``."""
    if difficulty not in LEVELS:
        raise ConfigError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty!r}")
    level = LEVELS[difficulty]
    name, pron = _PEOPLE[int(rng.integers(len(_PEOPLE)))]
    item = _pick(rng, _ITEMS)
    value = int(rng.integers(level.start[0], level.start[1] + 1))
    sentences = [f"{name} has {value} {item}."]
    lines: list[str] = []
    for step in range(level.steps):
        # Only feasible operations: values stay in 1.._MAX_VALUE (three digits at most).
        ops = []
        if value + level.operand[0] <= _MAX_VALUE:
            ops.append("add")
        if value > level.operand[0]:
            ops.append("sub")
        if level.multiply and value * min(level.multiply) <= _MAX_VALUE and value > 1:
            ops.append("mul")
        op = ops[int(rng.integers(len(ops)))]
        if op == "add":
            hi = min(level.operand[1], _MAX_VALUE - value)
            n = int(rng.integers(level.operand[0], hi + 1))
            verb = _pick(rng, _ADD_VERBS).format(n=n)
            lines.append(f"{value} + {n} = {value + n}")
            value += n
        elif op == "sub":
            hi = min(level.operand[1], value - 1)
            n = int(rng.integers(level.operand[0], hi + 1))
            verb = _pick(rng, _SUB_VERBS).format(n=n)
            lines.append(f"{value} - {n} = {value - n}")
            value -= n
        else:
            factors = [m for m in level.multiply if value * m <= _MAX_VALUE]
            m = factors[int(rng.integers(len(factors)))]
            verb = _MUL_VERBS[m]
            lines.append(f"{value} * {m} = {value * m}")
            value *= m
        subject = pron.capitalize() if step == 0 else f"Then {pron}"
        sentences.append(f"{subject} {verb}.")
    sentences.append(f"How many {item} does {name} have?")
    lines.append(f"#### {value}")
    return ArithItem(
        question=" ".join(sentences), solution="\n".join(lines), answer=value, difficulty=difficulty
    )


def _difficulty_schedule(
    n: int, difficulties: Sequence[int] | None, weights: Sequence[float] | None
) -> list[int]:
    """Levels of the ``n`` problems: proportional to ``weights``, in round-robin order.

    Deterministic (no randomness): level counts are the largest-remainder rounding of
    ``n * weights``, so a test split of 200 with 5 equal weights has exactly 40 per level.
    """
    levels = list(difficulties) if difficulties is not None else sorted(LEVELS)
    for d in levels:
        if d not in LEVELS:
            raise ConfigError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {d!r}")
    w = np.ones(len(levels)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(levels),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(
            f"weights must be {len(levels)} non-negative numbers with a positive sum, got {weights!r}"
        )
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    remaining = dict(zip(levels, counts.tolist(), strict=True))
    schedule: list[int] = []
    while len(schedule) < n:
        for d in levels:
            if remaining[d] > 0:
                schedule.append(d)
                remaining[d] -= 1
    return schedule


def generate_items(
    n: int,
    *,
    split: str = "train",
    seed: SeedLike = None,
    difficulties: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    unique: bool = True,
) -> list[ArithItem]:
    """``n`` problems of ``split`` (``"train"`` or ``"test"``), deterministic given ``seed``.

    Questions of the other split (by :func:`split_of`) are rejected and redrawn; with
    ``unique=True`` duplicates within the returned list are redrawn as well.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"arith split must be 'train' or 'test', got {split!r}")
    check_int("n", n, min=0)
    rng = as_generator(seed)
    seen: set[str] = set()
    out: list[ArithItem] = []
    for difficulty in _difficulty_schedule(n, difficulties, weights):
        for _ in range(100_000):
            item = generate_item(rng, difficulty)
            if split_of(item.question) != split or (unique and item.question in seen):
                continue
            break
        else:  # pragma: no cover - the question space of every level is far larger than needed
            raise ConfigError(f"could not draw {n} distinct {split} problems at level {difficulty}")
        seen.add(item.question)
        out.append(item)
    return out


def generate_problems(
    n: int,
    *,
    split: str = "test",
    seed: SeedLike = None,
    difficulties: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> list[Problem]:
    """:func:`generate_items` as :class:`~ttscale.types.Problem` values.

    ``id`` is ``arith-<split>-<i>``; ``reference`` the answer as a string; ``meta`` holds
    ``difficulty``, ``steps``, ``question`` and the worked ``solution``.
    """
    items = generate_items(n, split=split, seed=seed, difficulties=difficulties, weights=weights)
    width = max(4, len(str(max(n - 1, 0))))
    return [
        Problem(
            id=f"arith-{split}-{i:0{width}d}",
            prompt=it.prompt,
            reference=str(it.answer),
            meta={
                "difficulty": it.difficulty,
                "steps": LEVELS[it.difficulty].steps,
                "question": it.question,
                "solution": it.solution,
            },
        )
        for i, it in enumerate(items)
    ]


def extract_arith_answer(text: str | None) -> str | None:
    """The integer on the last ``#### x`` line of ``text``, canonicalised, or ``None``.

    The benchmark's answer format; the rule itself lives with the other answer extractors
    (:func:`ttscale.verifiers.extract.final_hash_integer`), so verifiers never import benchmarks.
    """
    from ttscale.verifiers.extract import final_hash_integer

    return final_hash_integer(text)


def check(answer: str | int | None, reference: str | int) -> bool:
    """Exact integer equality of an extracted answer and the reference (``None`` is wrong)."""
    if answer is None:
        return False
    try:
        return int(str(answer).replace(",", "").strip()) == int(
            str(reference).replace(",", "").strip()
        )
    except ValueError:
        return False
