"""What counts as an answer: the one "no answer" rule of every selection and stopping rule.

A sample has **no answer** when its extracted answer is ``None`` or a string that is empty or
only whitespace (an extractor that found nothing, a blank completion). Such a sample still
counts towards the budget (it was drawn and paid for), but it never votes, is never selected,
never makes an ESC window unanimous, and never moves a stopping rule. Every aggregator
(:mod:`ttscale.select.aggregate`), the stopping rules (:mod:`ttscale.select.stopping`) and the
pool that curves are computed from (:class:`ttscale.store.pool.Pool`, code ``-1``) use
:func:`is_no_answer`, so a sample is answered or not in the same way everywhere.

ESC's reference code maps a missing answer to a sentinel that *does* vote (docs/algorithms.md 5.1);
that behaviour is the explicit option ``no_answer="vote"`` of :func:`ttscale.select.stopping.esc_run`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Literal, get_args

__all__ = ["NO_ANSWER_POLICIES", "NoAnswerPolicy", "answered", "is_no_answer"]

NoAnswerPolicy = Literal["skip", "vote"]
"""``"skip"``: samples without an answer do not vote (the rule everywhere); ``"vote"``: every
value votes, ``None`` included (ESC's reference behaviour)."""

NO_ANSWER_POLICIES: tuple[str, ...] = get_args(NoAnswerPolicy)


def is_no_answer(answer: object) -> bool:
    """True for ``None`` and for strings that are empty or whitespace only."""
    return answer is None or (isinstance(answer, str) and not answer.strip())


def answered(answers: Iterable[Hashable | None]) -> list[Hashable]:
    """The answers that are answers (order kept), without the no-answer samples."""
    return [a for a in answers if not is_no_answer(a)]
