"""The arith process reward: hand-written right and wrong solution lines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.evals.arith import generate_items, generate_problems
from ttscale.samplers.potentials import as_potential, clean_log_potentials, make_potential
from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.verifiers.arith_prm import ArithProcessReward, check_lines, parse_question
from ttscale.verifiers.base import check_spec, make_verifier

Q = (
    "Tom has 12 apples. He buys 7 more. Then he gives away 5. Then he doubles them. "
    "How many apples does Tom have?"
)
PROBLEM = Problem(id="p", prompt=Q + "\n", reference="28", meta={"question": Q})
RIGHT = "12 + 7 = 19\n19 - 5 = 14\n14 * 2 = 28\n#### 28"


def ok(text: str, finished: bool = True) -> list[bool]:
    return [c.ok for c in check_lines(Q, text.split("\n"), finished=finished)]


def test_parse_question_reads_the_start_value_and_every_operation():
    prog = parse_question(Q)
    assert prog is not None
    assert prog.start == 12 and prog.ops == (("+", 7), ("-", 5), ("*", 2))
    assert prog.answer == 28  # (12 + 7 - 5) * 2
    assert parse_question("What is 2 + 2?") is None


def test_parse_question_matches_every_generated_item():
    # the verifier parses the question language on its own; the generator's solution must agree
    for it in generate_items(300, split="train", seed=5):
        prog = parse_question(it.question)
        assert prog is not None, it.question
        assert prog.answer == it.answer
        assert ok_all(it.question, it.solution)


def ok_all(q: str, sol: str) -> bool:
    return all(c.ok for c in check_lines(q, sol.split("\n"), finished=True))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (RIGHT, [True, True, True, True]),
        # arithmetic slip in step 2; step 3 continues from the wrong value consistently (its own
        # arithmetic is right and it starts from the previous result) but the answer line is
        # consistent with it too: only the slip is wrong
        ("12 + 7 = 19\n19 - 5 = 15\n15 * 2 = 30\n#### 30", [True, False, True, True]),
        # operand not the previous result (13 instead of 19); the next line chains from 8
        ("12 + 7 = 19\n13 - 5 = 8\n8 * 2 = 16\n#### 16", [True, False, True, True]),
        # wrong operation from the question (+ 5 instead of - 5), arithmetic right
        ("12 + 7 = 19\n19 + 5 = 24\n24 * 2 = 48\n#### 48", [True, False, True, True]),
        # first operand not the start value
        ("11 + 7 = 18\n18 - 5 = 13\n13 * 2 = 26\n#### 26", [False, True, True, True]),
        # answer before the last step, then nothing more is allowed
        ("12 + 7 = 19\n19 - 5 = 14\n#### 14", [True, True, False]),
        # answer not the last result
        ("12 + 7 = 19\n19 - 5 = 14\n14 * 2 = 28\n#### 27", [True, True, True, False]),
        # one step too many
        (
            "12 + 7 = 19\n19 - 5 = 14\n14 * 2 = 28\n28 + 1 = 29\n#### 29",
            [True, True, True, False, False],
        ),
        # unparsable line, then a line that cannot chain from it (the answer line chains from 28)
        ("12 + 7 = 19\nnineteen minus five\n14 * 2 = 28\n#### 28", [True, False, False, True]),
        # finished without a #### line: a failing final step
        ("12 + 7 = 19\n19 - 5 = 14\n14 * 2 = 28", [True, True, True, False]),
        # lines after the answer
        (RIGHT + "\n1 + 1 = 2", [True, True, True, True, False]),
    ],
)
def test_each_line_is_checked(text, expected):
    assert ok(text) == expected


def test_only_complete_lines_of_an_unfinished_text_are_scored():
    prm = ArithProcessReward()
    # "19 - 5 = 1" is still being written: not scored
    assert prm.step_scores(PROBLEM, "12 + 7 = 19\n19 - 5 = 1", finished=False) == [1.0]
    assert prm.step_scores(PROBLEM, "12 + 7 = 19\n", finished=False) == [1.0]
    assert prm.step_scores(PROBLEM, "12 + 7 = 20\n", finished=False) == [0.0]
    # no complete line yet: reward 1, log-potential 0
    assert prm.reward(PROBLEM, ["12 + 7"], [False]).tolist() == [1.0]


def test_reward_and_log_potential_mapping():
    texts = [RIGHT, "12 + 7 = 19\n19 - 5 = 15\n15 * 2 = 30\n#### 30", "12 + 7 = 20\n20 - 5 = 16\n"]
    fin = [True, True, False]
    # step scores: [1,1,1,1], [1,0,1,1], [0,0] (line 2 is wrong: 20 - 5 != 16)
    prod = ArithProcessReward()
    assert prod.reward(PROBLEM, texts, fin).tolist() == [1.0, 0.0, 0.0]
    assert prod.score(PROBLEM, texts, fin).tolist() == [0.0, -math.inf, -math.inf]
    soft = ArithProcessReward(wrong=0.1)
    # prod with wrong=0.1: 1, 0.1, 0.01; log: 0, log 0.1, 2 log 0.1
    np.testing.assert_allclose(
        soft.score(PROBLEM, texts, fin), [0.0, math.log(0.1), 2 * math.log(0.1)]
    )
    mean = ArithProcessReward(aggregation="mean")
    np.testing.assert_allclose(mean.reward(PROBLEM, texts, fin), [1.0, 0.75, 0.0])
    last = ArithProcessReward(aggregation="last")
    # last complete line of text 2 is "#### 30", consistent with its own previous line
    assert last.reward(PROBLEM, texts, fin).tolist() == [1.0, 1.0, 0.0]


def test_verifier_protocol_step_scores_in_meta():
    prm = make_verifier("arith-prm", workers=4)  # shared CLI options it does not take are dropped
    assert isinstance(prm, ArithProcessReward)
    samples = [
        Sample(problem_id="p", index=0, text=RIGHT),
        Sample(problem_id="p", index=1, text="12 + 7 = 19\n19 - 5 = 15\n15 * 2 = 30\n#### 30"),
        Sample(problem_id="p", index=2, text="12 + 7 = 19"),
    ]
    v = prm.verify(PROBLEM, samples)
    assert [x.status for x in v] == [VerdictStatus.PASS, VerdictStatus.FAIL, VerdictStatus.INVALID]
    assert [x.answer for x in v] == ["28", "30", None]
    assert v[1].meta["step_scores"] == [1.0, 0.0, 1.0, 1.0] and v[1].meta["wrong_steps"] == [1]
    assert v[1].detail == "step 2: 19 - 5 is 14, not 15"
    assert [x.score for x in v] == [1.0, 0.0, 0.0]
    assert make_verifier("arith-prm:mean").aggregation == "mean"


def test_specs_are_validated():
    assert check_spec("arith-prm") == "arith-prm"
    assert check_spec("ARITH-PRM:min") == "arith-prm:min"
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        check_spec("arith-prm:median")
    with pytest.raises(ConfigError, match="wrong"):
        ArithProcessReward(wrong=1.0)


def test_potential_registry_and_bundled_solutions():
    pot = make_potential("arith-prm")
    probs = generate_problems(20, seed=3)
    texts = [p.meta["solution"] for p in probs]
    for p, t in zip(probs, texts, strict=True):
        assert as_potential(pot).score(p, [t, t.replace("=", "= 1")], [True, True]).tolist() == [
            0.0,
            -math.inf,
        ]
    with pytest.raises(ConfigError, match="unknown potential"):
        make_potential("prm")
    assert make_potential("arith-prm:last").aggregation == "last"
    with pytest.raises(ConfigError, match="2 values for 1 particles"):
        clean_log_potentials(
            as_potential(lambda p, t, f: [0.0, 1.0]).score(PROBLEM, ["x"], [False]), 1
        )


def test_prob_value_gives_the_reward_for_fk_shaping():
    pot = make_potential("arith-prm", value="prob")
    texts = [RIGHT, "12 + 7 = 20\n"]
    assert pot.score(PROBLEM, texts, [True, False]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="value must be one of"):
        make_potential("arith-prm", value="odds")
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        make_potential("arith-prm:median")
