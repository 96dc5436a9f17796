"""Adaptive repeated sampling (level 1): each problem stops on its own once its answer is settled.

Each problem is a program on the engine loop (:mod:`ttscale.samplers.loop`), with no round
barrier: a problem keeps its next ``round_size`` samples (default: the rule's step, i.e. one
sample, or one ESC window) in flight, plus ``ahead`` more if asked, and asks for more as soon as
the rule has read the ones before; the requests of all running problems share the engine (at
most ``batch_size`` samples at once), so it stays busy while problems drop out. The rule
(:mod:`ttscale.select.adaptive`) reads each problem's answers in index order as the samples
arrive; a problem stops at the first prefix where the rule says so (samples still in flight are
aborted), or at the budget.

Answers are needed online and come from ``answer_fn`` (an extractor, or a verifier's canonical
answer through :func:`verifier_answers`); correctness is never used to stop. Sample ``i`` of
problem ``p`` is seeded by ``(seed, p, i)``, so a live run draws exactly the first samples of
the fixed-``n`` run with the same seed, and the index-order replay
(:func:`ttscale.replay.replay` with ``orders=None``) of that full run stops at the same sample
with the same answer.

Every generated token is counted: ``SampleResult.generated_tokens`` includes samples that
finished beyond the stopping point (only when ``round_size`` exceeds the rule's step or
``ahead`` is not 0), which are stored in the sink but are not candidates of the result, and the
tokens of samples aborted in flight (``AdaptiveDecision.aborted_tokens``; they have no sample to
store). Kept samples and decisions never depend on timing; with ``ahead=0`` and ``round_size`` the
rule's step, neither do the tokens spent (the default queues the whole budget, lower indices
first, and keeps the engine full: on vLLM that is what makes live adaptive faster than SC, ``benchmarks/RESULTS.md``). With a sink, the run directory gets
``adaptive.jsonl`` (one line per problem: samples used and drawn, answer, stopped or not,
why, tokens) and the manifest an ``adaptive`` entry with the rule and budget.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate, SampleResult
from ttscale.samplers.loop import Abort, Program, Scheduler, Spare, Submit, Wait
from ttscale.samplers.repeated import RepeatedSampler, _stored_completions, plan_requests
from ttscale.samplers.session import open_sink, unique_problems
from ttscale.select.adaptive import StopRule, final_vote, first_stop, parse_rule
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, Sample, SamplingParams
from ttscale.validation import check_int

__all__ = ["AdaptiveDecision", "AdaptiveSampler", "AnswerFn", "verifier_answers"]

log = logging.getLogger(__name__)

#: ``answer_fn(problem, completions) -> answers``: one answer (``None``: no answer) per completion.
AnswerFn = Callable[[Problem, Sequence[Completion]], Sequence[Hashable | None]]
#: ``confidence_fn(completions) -> confidences``: one DeepConf trace confidence per completion.
ConfidenceFn = Callable[[Sequence[Completion]], Sequence[float]]

ADAPTIVE_FILE = "adaptive.jsonl"


def verifier_answers(verifier: Any) -> AnswerFn:
    """An :data:`AnswerFn` that takes each completion's canonical answer from ``verifier``
    (``Verdict.answer``; the verdict's correctness is not used)."""

    def fn(problem: Problem, comps: Sequence[Completion]) -> list[Hashable | None]:
        verdicts = verifier.verify(problem, [Sample.from_completion(c) for c in comps])
        return [v.answer for v in verdicts]

    return fn


def deepconf_confidences(window: int = 2048) -> ConfidenceFn:
    """Trace confidences as ``ttscale curve`` and replay compute them (bottom-10% window mean)."""

    def fn(comps: Sequence[Completion]) -> list[float]:
        from ttscale.analysis import trace_confidences

        tops = [None if c.top_logprobs is None else [dict(p) for p in c.top_logprobs] for c in comps]
        return [float(x) for x in trace_confidences(tops, window=window)]

    return fn


@dataclass(frozen=True)
class AdaptiveDecision:
    """What happened to one problem: ``used`` samples decided it, ``drawn`` were generated (or
    resumed), ``answer``, ``stopped`` early or not, ``reason``, ``rounds`` and the tokens of the
    used and of all drawn samples."""

    problem_id: str
    rule: str
    budget: int
    used: int
    drawn: int
    answer: Hashable | None
    stopped: bool
    reason: str
    rounds: int
    used_tokens: int
    generated_tokens: int
    aborted_tokens: int = 0


class _Have:
    """``(problem, index)`` keys a plan should skip: indices below ``start`` or above ``end``
    and whatever the sink already holds."""

    def __init__(self, start: int, end: int, stored: Mapping[tuple[str, int], Completion]) -> None:
        self.start, self.end, self.stored = start, end, stored

    def __contains__(self, key: object) -> bool:
        i = int(key[1])  # type: ignore[index]
        return bool(i < self.start or i >= self.end or key in self.stored)


class AdaptiveSampler:
    """Repeated sampling that stops each problem by ``rule`` (a :class:`StopRule` or its spec).

    ``answer_fn`` gives the answers the rule reads (see :data:`AnswerFn`); ``confidence_fn`` the
    trace confidences of the ``deepconf`` rule (default :func:`deepconf_confidences`, which
    needs top log-probs). ``tie``: the final vote's tie rule at the budget (``first`` or
    ``random``, seeded as the index-order replay with ``seed`` = the run seed). ``batch_size``:
    samples in the engine at once (all problems together; lowest indices first), which changes
    no result: a smaller bound draws fewer samples beyond a stop (with 1, none), but runs the
    engine below its batch (on vLLM CPU, 128 took about the time of 512 and 64 more:
    benchmarks/RESULTS.md); ``round_size``: samples a problem
    keeps in flight beyond those the rule has read (default the rule's step); ``ahead``: more
    samples it draws ahead of that (default ``None``: with ``priority`` (the default) the
    whole budget, each sample queued with its index as priority, so the engine runs every
    problem's samples of lower index first and a problem's queued samples are aborted at no cost
    when it stops; without ``priority``, what it already drew ahead plus its share of the
    engine's spare room; either way the engine stays busy while few problems are undecided, at
    the price of samples drawn beyond the stop, which are counted; ``0``: none, so ``drawn`` and the tokens spent do not depend on
    timing, but a problem's samples come one round at a time; the kept samples and the
    decisions are the same either way). Implements the
    :class:`~ttscale.samplers.base.Sampler` protocol; :attr:`decisions` holds the last call's
    :class:`AdaptiveDecision` per problem.
    """

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        rule: StopRule | str,
        answer_fn: AnswerFn,
        *,
        confidence_fn: ConfidenceFn | None = None,
        tie: str = "first",
        batch_size: int = 512,
        round_size: int | None = None,
        ahead: int | None = None,
        priority: bool = True,
        chat: bool | None = None,
        system_prompt: str | None = None,
        progress: bool | None = False,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self.rule = parse_rule(rule) if isinstance(rule, str) else rule
        if tie not in ("first", "random"):
            raise ConfigError(f"a live adaptive run breaks ties first or random, got {tie!r}")
        check_int("batch_size", batch_size, min=1)
        check_int("round_size", round_size, min=1, allow_none=True)
        check_int("ahead", ahead, min=0, allow_none=True)
        self.ahead = ahead
        self.priority = priority
        self.round_size = round_size or self.rule.step
        self.answer_fn = answer_fn
        self.confidence_fn = confidence_fn or (
            deepconf_confidences() if self.rule.needs_confidences else None
        )
        self.tie = tie
        self.batch_size = batch_size
        # the repeated sampler owns chat detection, prompts and the session settings
        self._rep = RepeatedSampler(
            engine,
            params,
            None,
            batch_size=batch_size,
            progress=progress,
            chat=chat,
            system_prompt=system_prompt,
            manifest=manifest,
        )
        self.engine = engine
        self.params = params
        self.decisions: list[AdaptiveDecision] = []

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """At most ``budget`` samples per problem, fewer where the rule stops (see the class)."""
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        self.rule.usable(budget)  # ESC: at least one window
        params = self.params if seed is None else self.params.replace(seed=seed)
        unique = unique_problems(problems)
        rep = self._rep
        if sink is not None:
            open_sink(
                sink, unique, engine_info=rep.engine_info, params=params, n=budget, chat=rep.chat,
                iid=True, compatible=rep.extra_manifest,
                extra={**rep.extra_manifest, "adaptive": {
                    "rule": self.rule.spec, "budget": budget, "tie": self.tie,
                    # how many samples were in the engine at once (results never depend on it)
                    "batch_size": self.batch_size,
                }},
            )
        return self._sample(unique, budget, params, sink)

    def _sample(
        self, problems: list[Problem], budget: int, params: SamplingParams, sink: SampleStore | None
    ) -> Iterator[SampleResult]:
        limit = self.rule.usable(budget)
        stored = _stored_completions(sink, problems, limit) if sink is not None else {}
        self.decisions = []
        session = self._rep._session(sink, shard=None, claims=False)
        session.show_progress(
            self._rep._show_progress(), remaining={p.id: limit for p in problems}, samples=len(problems) * limit
        )
        with session:
            sched: Scheduler[tuple[SampleResult, AdaptiveDecision]] = Scheduler(
                session, params, max_sequences=self.batch_size
            )
            # a list, so the scheduler shares the engine's spare room among all problems
            programs = [self.program(p, k, budget, params, stored) for k, p in enumerate(problems)]
            for res, d in sched.run(programs):
                self.decisions.append(d)
                yield res
        if sink is not None:
            _write_decisions(sink, self.decisions)

    def program(
        self,
        p: Problem,
        position: int,
        budget: int,
        params: SamplingParams,
        stored: Mapping[tuple[str, int], Completion],
    ) -> Program[tuple[SampleResult, AdaptiveDecision]]:
        """Problem ``p``'s program (:mod:`ttscale.samplers.loop`; ``position``: its place in the
        run, which seeds a random tie): keep ``round_size`` samples beyond the decided prefix in
        flight (plus ``ahead``, or the engine's spare room when ``ahead`` is ``None``), read
        answers in index order as the samples arrive, stop at the first prefix where the rule
        says so and abort the samples still in flight."""
        rule = self.rule
        limit = rule.usable(budget)
        comps: dict[int, Completion] = {}
        answers: list[Hashable | None] = []
        confs: list[float] = []
        decided = 0  # samples 0..decided-1 have been read by the rule
        submitted = 0
        live: set[int] = set()
        rounds = 0
        aborted = 0
        hit = None
        while hit is None and decided < limit:
            if self.ahead is None and self.priority:
                # the whole budget at once, each sample queued behind every problem's samples
                # of lower index: the engine stays full, and runs first what the rules read next
                if submitted < limit:
                    for i in range(limit):
                        if (p.id, i) in stored:
                            comps[i] = stored[(p.id, i)]
                    need = min(limit, self.round_size)
                    first = self._plan(p, 0, need, stored)
                    rest = [(i, r) for i in range(need, limit) for r in self._plan(p, i, i + 1, stored)]
                    if first:
                        live.update((yield Submit(tuple(first), priority=0)))
                    if rest:
                        live.update((yield Submit(
                            tuple(r for _, r in rest), priority=tuple(i for i, _ in rest), ahead=True
                        )))  # fmt: skip
                    rounds += 1 if first or rest else 0
                    submitted = limit
            else:
                if self.ahead is not None:
                    ahead = self.ahead
                else:
                    # what the problem drew ahead so far plus its share of the engine's room
                    # now: the window grows while the engine has room and shrinks as the rule
                    # reads, so the problems in flight fill ``batch_size`` (the share alone, as
                    # the window, held them at about half of it, and the engine ran below its
                    # batch)
                    drawn_ahead = max(0, submitted - decided - self.round_size)
                    ahead = drawn_ahead + (yield Spare())
                end = min(limit, decided + self.round_size + ahead)
                if end > submitted and submitted - decided < self.round_size + ahead:
                    for i in range(submitted, end):
                        if (p.id, i) in stored:
                            comps[i] = stored[(p.id, i)]
                    # the samples the rule reads next go as one request; those drawn ahead one
                    # by one, so each comes back (or is aborted) on its own
                    need = min(end, max(submitted, decided + self.round_size))
                    reqs = self._plan(p, submitted, need, stored) + [
                        r for i in range(need, end) for r in self._plan(p, i, i + 1, stored)
                    ]
                    if reqs:
                        live.update((yield Submit(tuple(reqs))))
                        rounds += 1
                    submitted = end
            if decided not in comps:
                got = yield Wait(tuple(sorted(live)))
                for t, cs in got.items():
                    live.discard(t)
                    for c in cs:
                        comps[c.index] = c
            start = decided
            while decided < submitted and decided in comps:
                decided += 1
            if decided == start:
                continue
            new = [comps[i] for i in range(start, decided)]
            answers.extend(self.answer_fn(p, new))
            if self.confidence_fn is not None:
                confs.extend(float(x) for x in self.confidence_fn(new))
            cf = confs if rule.needs_confidences else None
            hit = first_stop(rule, answers, cf, start, decided)
        if live:
            # the rule has decided: samples still in flight are no longer wanted
            res = yield Abort(tuple(sorted(live)))
            aborted = res.tokens
            for cs in res.finished.values():
                for c in cs:
                    comps[c.index] = c
        drawn = [comps[i] for i in sorted(comps)]
        if hit is not None:
            used, answer, stopped, reason = hit[0], hit[1].answer, True, hit[1].reason
        else:
            cf = confs if rule.needs_confidences else None
            rng = np.random.default_rng([params.seed or 0, position, 0, 1]) if self.tie == "random" else None
            answer, _ = final_vote(answers, cf, tie=self.tie, rng=rng)
            used, stopped, reason = limit, False, "budget"
        d = AdaptiveDecision(
            problem_id=p.id,
            rule=rule.spec,
            budget=budget,
            used=used,
            drawn=len(drawn),
            answer=answer,
            stopped=stopped,
            reason=reason,
            rounds=rounds,
            used_tokens=sum(comps[i].num_tokens for i in range(used)),
            generated_tokens=sum(c.num_tokens for c in drawn) + aborted,
            aborted_tokens=aborted,
        )
        return self._result(p, d, [comps[i] for i in range(used)], drawn, stored), d

    def _plan(self, p: Problem, start: int, end: int, stored: Mapping[tuple[str, int], Completion]) -> list[GenerationRequest]:
        return plan_requests(
            [p],
            end,
            _Have(start, end, stored),
            max_per_request=self._rep.max_per_request,
            messages=self._rep.chat,
            system_prompt=self._rep.system_prompt,
        )

    def _decide(
        self,
        p: Problem,
        budget: int,
        used: int,
        answer: Hashable | None,
        stopped: bool,
        reason: str,
        rounds: int,
        comps: Sequence[Completion],
    ) -> AdaptiveDecision:
        return AdaptiveDecision(
            problem_id=p.id,
            rule=self.rule.spec,
            budget=budget,
            used=used,
            drawn=len(comps),
            answer=answer,
            stopped=stopped,
            reason=reason,
            rounds=rounds,
            used_tokens=sum(c.num_tokens for c in comps[:used]),
            generated_tokens=sum(c.num_tokens for c in comps),
        )

    @staticmethod
    def _result(
        p: Problem,
        d: AdaptiveDecision,
        used: Sequence[Completion],
        drawn: Sequence[Completion],
        stored: Mapping[tuple[str, int], Completion],
    ) -> SampleResult:
        return SampleResult(
            problem=p,
            candidates=tuple(Candidate(c) for c in used),
            generated_tokens=d.generated_tokens,
            prompt_tokens=sum(c.prompt_tokens or 0 for c in drawn),
            iid=True,
            resumed=sum(1 for c in used if (c.problem_id, c.index) in stored),
        )


def _write_decisions(sink: SampleStore, decisions: Sequence[AdaptiveDecision]) -> None:
    """``RUN/adaptive.jsonl``: one line per problem (written atomically, replacing the last)."""
    write_decision_rows(sink, ADAPTIVE_FILE, decisions)


def write_decision_rows(sink: SampleStore, name: str, decisions: Sequence[Any]) -> None:
    """``RUN/<name>``: one JSON line per decision dataclass (its ``answer`` as a string), written
    atomically (a temp file renamed over the last)."""
    path = sink.path / name
    fd, tmp = tempfile.mkstemp(dir=sink.path, prefix=f".{Path(name).stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for d in decisions:
                row = asdict(d)
                row["answer"] = None if d.answer is None else str(d.answer)
                f.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_decision_rows(path: os.PathLike[str] | str, name: str) -> list[dict[str, Any]]:
    """The rows of ``RUN/<name>`` written by :func:`write_decision_rows` (empty if absent)."""
    f = Path(path) / name
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_decisions(path: os.PathLike[str] | str) -> list[dict[str, Any]]:
    """The rows of a run's ``adaptive.jsonl`` (empty if the run has none)."""
    return read_decision_rows(path, ADAPTIVE_FILE)
