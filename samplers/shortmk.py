"""short-m@k live (Hassid et al., 2025): k traces per problem, stop when the first m finish.

Each problem is a program on the engine loop (:mod:`ttscale.samplers.loop`): its ``k`` traces
are submitted at once, one request per trace so each comes back on its own; as soon as ``m`` of
them have finished, the others are aborted (their slots freed, the tokens they had generated
counted), and the answer is the majority among the ``m`` shortest finished traces, ties to the
shortest (:func:`ttscale.select.shortmk.short_mk`). Traces that finish in the same engine poll
(or come back with the abort) are all counted as finished and ranked by length, so:

* on an engine with its own loop where a problem's ``k`` traces run side by side (``batch_size
  >= k``; the Scripted and vLLM engines), traces finish in length order up to the poll
  granularity, and the chosen traces and answer are those of the replay
  (:func:`ttscale.select.shortmk.replay_short`, index order) of the fixed-``k`` run with the
  same seed; tokens spent differ from the replay's lockstep model by what a poll overshoots;
* on an engine with only batch ``generate``, all ``k`` come back together: the same answer,
  and no tokens saved (a warning says so);
* with ``batch_size < k`` a late-starting trace can finish after a longer one, so the live
  choice may differ from the replay (a warning says so).

Runs into a store are not offered yet (the stored traces would be a length-biased subset that
no command reads as such): ``sink`` must be ``None``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest, capabilities_of
from ttscale.errors import ConfigError
from ttscale.samplers.adaptive import AnswerFn
from ttscale.samplers.base import Candidate, SampleResult
from ttscale.samplers.loop import Abort, Program, Scheduler, Submit, Wait
from ttscale.samplers.repeated import RepeatedSampler, plan_requests
from ttscale.samplers.session import unique_problems
from ttscale.select.shortmk import ShortMK, parse_short, short_mk
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams
from ttscale.validation import check_int

__all__ = ["ShortDecision", "ShortMKSampler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShortDecision:
    """One problem: the rule, ``k`` and ``m``, the ``chosen`` trace indices (shortest first),
    the ``answer``, how many traces ``finished`` and were ``aborted``, and the tokens of the
    finished and the aborted traces (``generated_tokens`` is their sum)."""

    problem_id: str
    rule: str
    k: int
    m: int
    chosen: tuple[int, ...]
    answer: Hashable | None
    finished: int
    aborted: int
    finished_tokens: int
    aborted_tokens: int

    @property
    def generated_tokens(self) -> int:
        return self.finished_tokens + self.aborted_tokens


class ShortMKSampler:
    """short-m@k on the engine loop (see the module docstring). ``rule``: a :class:`ShortMK` or
    its spec (``short-3@k``: k = the budget given to :meth:`sample`); ``answer_fn`` gives each
    finished trace's answer (:data:`~ttscale.samplers.adaptive.AnswerFn`). :attr:`decisions`
    holds the last call's :class:`ShortDecision` per problem."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        rule: ShortMK | str,
        answer_fn: AnswerFn,
        *,
        batch_size: int = 512,
        chat: bool | None = None,
        system_prompt: str | None = None,
        progress: bool | None = False,
    ) -> None:
        self.rule = parse_short(rule) if isinstance(rule, str) else rule
        check_int("batch_size", batch_size, min=1)
        self.answer_fn = answer_fn
        self.batch_size = batch_size
        self._rep = RepeatedSampler(
            engine, params, None, batch_size=batch_size, progress=progress, chat=chat,
            system_prompt=system_prompt,
        )  # fmt: skip
        self.engine = engine
        self.params = params
        self.decisions: list[ShortDecision] = []

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """``k`` (the rule's, or ``budget``) traces per problem, stopped at the first ``m``."""
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        if sink is not None:
            raise ConfigError(
                "short-m@k live runs are not stored yet; run it without a sink, or sample a "
                "fixed-n run and replay the rule on it (ttscale replay --rule short-3@k)"
            )
        k = self.rule.size(budget)
        params = self.params if seed is None else self.params.replace(seed=seed)
        if self.batch_size < k:
            log.warning(
                "%s with batch_size %d < k=%d: traces start at different times, so the first m to "
                "finish may not be the m shortest (the replay's order)", self.rule.spec, self.batch_size, k,
            )  # fmt: skip
        if not hasattr(self.engine, "open_loop") or not capabilities_of(self.engine).streaming:
            log.warning(
                "%s: the engine returns a batch at once, so all k traces finish together: the "
                "answer is short-m@k's, but no tokens are saved", self.rule.spec,
            )  # fmt: skip
        return self._sample(unique_problems(problems), k, params)

    def _sample(self, problems: list[Problem], k: int, params: SamplingParams) -> Iterator[SampleResult]:
        self.decisions = []
        session = self._rep._session(None, shard=None, claims=False)
        with session:
            sched: Scheduler[tuple[SampleResult, ShortDecision]] = Scheduler(
                session, params, max_sequences=self.batch_size
            )
            for res, d in sched.run([self.program(p, k) for p in problems]):
                self.decisions.append(d)
                yield res

    def _requests(self, p: Problem, k: int) -> list[GenerationRequest]:
        # one request per trace, so each finishes (or is aborted) on its own
        return plan_requests(
            [p], k, set(), max_per_request=1, messages=self._rep.chat,
            system_prompt=self._rep.system_prompt,
        )  # fmt: skip

    def program(self, p: Problem, k: int) -> Program[tuple[SampleResult, ShortDecision]]:
        """Problem ``p``'s program: submit ``k`` traces, wait until ``m`` have finished, abort
        the rest, vote among the ``m`` shortest finished."""
        m = self.rule.m
        tickets: tuple[int, ...] = yield Submit(tuple(self._requests(p, k)))
        live = set(tickets)
        done: dict[int, Completion] = {}
        while len(done) < m:
            got: dict[int, list[Completion]] = yield Wait(tuple(sorted(live)))
            for t, cs in got.items():
                live.discard(t)
                for c in cs:
                    done[c.index] = c
        aborted_tokens = 0
        n_aborted = 0
        if live:
            res: Any = yield Abort(tuple(sorted(live)))
            aborted_tokens = int(res.tokens)
            for t, cs in res.finished.items():
                live.discard(t)
                for c in cs:
                    done[c.index] = c
            n_aborted = len(live)
        comps = [done[i] for i in sorted(done)]
        answers = list(self.answer_fn(p, comps))
        o = short_mk(answers, [c.num_tokens for c in comps], m)
        chosen = [comps[i] for i in o.chosen]
        d = ShortDecision(
            problem_id=p.id,
            rule=self.rule.spec,
            k=k,
            m=m,
            chosen=tuple(c.index for c in chosen),
            answer=o.answer,
            finished=len(comps),
            aborted=n_aborted,
            finished_tokens=sum(c.num_tokens for c in comps),
            aborted_tokens=aborted_tokens,
        )
        res_ = SampleResult(
            problem=p,
            candidates=tuple(Candidate(c) for c in chosen),
            generated_tokens=d.generated_tokens,
            prompt_tokens=sum(c.prompt_tokens or 0 for c in comps),
            iid=False,
        )
        return res_, d
