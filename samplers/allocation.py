"""Budget allocation across problems, live: a total budget spent where it changes answers.

:class:`AllocationSampler` runs an allocation policy (:mod:`ttscale.select.allocation`) on an
engine: every round the policy picks the open problems that get one more sample each, and the
samples of all picked problems share engine calls of up to ``batch_size`` samples (one call per
round when it fits). The decision loop is :func:`ttscale.select.allocation.allocate`, the same
function the offline replay (:func:`ttscale.allocation.replay_allocation`) runs over stored
streams. Sample ``i`` of problem ``p`` is seeded by ``(seed, p, i)`` as in every repeated
sampler, so a live run draws exactly the first samples of the fixed-``n`` run with the same
seed, and the index-order replay of that full run gives every problem the same samples and
answer.

Answers come from ``answer_fn`` (an extractor, or a verifier's canonical answer); correctness
is never used to allocate. With a sink the run directory gets ``allocation.jsonl`` (one line
per problem: samples, tokens, answer, why it closed) and the manifest an ``allocation`` entry
with the policy, budget and cap. A killed run resumes: stored samples are read back instead
of being drawn again, and the policy, seeing the same answers, makes the same choices.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.samplers.adaptive import AnswerFn, _Have, read_decision_rows, write_decision_rows
from ttscale.samplers.base import Candidate, SampleResult
from ttscale.samplers.repeated import RepeatedSampler, _stored_completions, plan_requests
from ttscale.samplers.session import open_sink, unique_problems
from ttscale.select.adaptive import StopRule, parse_rule
from ttscale.select.allocation import AllocationPolicy, allocate, parse_policy
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams
from ttscale.validation import check_int

__all__ = ["ALLOCATION_FILE", "AllocationDecision", "AllocationSampler", "read_allocation"]

ALLOCATION_FILE = "allocation.jsonl"


@dataclass(frozen=True)
class AllocationDecision:
    """What one problem got: ``samples`` and their ``tokens``, its ``answer``, whether a
    stopping rule ``stopped`` it, and ``reason`` it closed (``cap``, ``budget`` or the rule's)."""

    problem_id: str
    policy: str
    samples: int
    tokens: int
    answer: Hashable | None
    stopped: bool
    reason: str


class AllocationSampler:
    """Spend ``budget_total`` samples (or generated tokens, ``tokens=True``) over a set of
    problems by ``policy`` (an :class:`AllocationPolicy` or its spec); at most ``n`` samples a
    problem (the ``n`` of :meth:`sample`). ``stop``: a stopping rule that closes a problem
    early. ``round_size``: problems served per round (default the policy's). Implements the
    :class:`~ttscale.samplers.base.Sampler` protocol; :attr:`decisions` holds the last call's
    :class:`AllocationDecision` per problem."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        policy: AllocationPolicy | str,
        answer_fn: AnswerFn,
        *,
        budget_total: float,
        tokens: bool = False,
        stop: StopRule | str | None = None,
        round_size: int | None = None,
        batch_size: int = 512,
        chat: bool | None = None,
        system_prompt: str | None = None,
        progress: bool | None = False,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        self.stop = parse_rule(stop) if isinstance(stop, str) else stop
        if self.stop is not None and (self.stop.needs_confidences or self.stop.name == "esc"):
            raise ConfigError(f"--stop {self.stop.name} does not fit allocation (one sample per problem and round); choose beta, majority, sprt, ...")
        if not budget_total > 0:
            raise ConfigError(f"--budget-total must be positive, got {budget_total}")
        check_int("batch_size", batch_size, min=1)
        check_int("round_size", round_size, min=1, allow_none=True)
        self.budget_total = float(budget_total)
        self.tokens = tokens
        self.round_size = round_size
        self.answer_fn = answer_fn
        self.batch_size = batch_size
        self._rep = RepeatedSampler(
            engine, params, None, batch_size=batch_size, progress=progress, chat=chat,
            system_prompt=system_prompt, manifest=manifest,
        )
        self.engine = engine
        self.params = params
        self.decisions: list[AllocationDecision] = []
        self.engine_calls = 0

    def sample(
        self,
        problems: Sequence[Problem],
        n: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """Allocate the budget over ``problems`` with at most ``n`` samples each."""
        check_int("n", n, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        params = self.params if seed is None else self.params.replace(seed=seed)
        unique = unique_problems(problems)
        rep = self._rep
        if sink is not None:
            entry = {
                "policy": self.policy.spec, "budget_total": self.budget_total,
                "unit": "tokens" if self.tokens else "samples", "max_samples": n,
                "stop": None if self.stop is None else self.stop.spec,
            }
            open_sink(
                sink, unique, engine_info=rep.engine_info, params=params, n=n, chat=rep.chat,
                iid=True, compatible=rep.extra_manifest, extra={**rep.extra_manifest, "allocation": entry},
            )
        return self._sample(unique, n, params, sink)

    def _sample(
        self, problems: list[Problem], cap: int, params: SamplingParams, sink: SampleStore | None
    ) -> Iterator[SampleResult]:
        stored = _stored_completions(sink, problems, cap) if sink is not None else {}
        comps: dict[str, list[Completion]] = {p.id: [] for p in problems}
        self.decisions = []
        self.engine_calls = 0
        session = self._rep._session(sink, shard=None, claims=False)
        session.show_progress(False, remaining={p.id: cap for p in problems}, samples=len(problems) * cap)

        def draw(chosen: list[int]) -> list[tuple[Hashable | None, int]]:
            picked = [problems[i] for i in chosen]
            got: dict[tuple[str, int], Completion] = {}
            todo = []
            for p in picked:
                key = (p.id, len(comps[p.id]))
                if key in stored:
                    got[key] = stored[key]
                else:
                    todo.append(p)
            # one sample per chosen problem, at most batch_size of them in one engine call (the
            # session claims nothing: an allocation decides over all problems at once)
            reqs = [r for p in todo for r in self._plan(p, len(comps[p.id]), stored)]
            for lo in range(0, len(reqs), self.batch_size):
                self.engine_calls += 1
                for cs in session.generate(reqs[lo : lo + self.batch_size], params):
                    for c in cs:
                        got[(c.problem_id, c.index)] = c
            out: list[tuple[Hashable | None, int]] = []
            for p in picked:
                c = got[(p.id, len(comps[p.id]))]
                comps[p.id].append(c)
                ans = self.answer_fn(p, [c])[0]
                out.append((ans, int(c.num_tokens)))
            return out

        with session:
            states = allocate(
                self.policy, len(problems), draw, budget=self.budget_total, tokens=self.tokens,
                cap=cap, stop=self.stop, round_size=self.round_size,
            )
        results = []
        for p, s in zip(problems, states, strict=True):
            ans, _ = s.answer()
            used = comps[p.id][: s.samples]
            self.decisions.append(AllocationDecision(
                problem_id=p.id, policy=self.policy.spec, samples=s.samples, tokens=sum(s.tokens),
                answer=ans, stopped=s.stopped, reason=s.reason,
            ))
            results.append(SampleResult(
                problem=p,
                candidates=tuple(Candidate(c) for c in used),
                generated_tokens=sum(c.num_tokens for c in comps[p.id]),
                prompt_tokens=sum(c.prompt_tokens or 0 for c in comps[p.id]),
                iid=True,
                resumed=sum(1 for c in comps[p.id] if (c.problem_id, c.index) in stored),
            ))
        if sink is not None:
            _write_decisions(sink, self.decisions)
        yield from results

    def _plan(self, p: Problem, i: int, stored: Mapping[tuple[str, int], Completion]) -> list[GenerationRequest]:
        return plan_requests(
            [p], i + 1, _Have(i, i + 1, stored), max_per_request=self._rep.max_per_request,
            messages=self._rep.chat, system_prompt=self._rep.system_prompt,
        )


def _write_decisions(sink: SampleStore, decisions: Sequence[AllocationDecision]) -> None:
    """``RUN/allocation.jsonl``: one line per problem (written atomically, replacing the last)."""
    write_decision_rows(sink, ALLOCATION_FILE, decisions)


def read_allocation(path: os.PathLike[str] | str) -> list[dict[str, Any]]:
    """The rows of a run's ``allocation.jsonl`` (empty if the run has none)."""
    return read_decision_rows(path, ALLOCATION_FILE)
