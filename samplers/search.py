"""Step-level search with a process reward: beam search, DVTS and best-of-N with step scores.

Three named configurations of one loop (search-and-learn's and its_hub's search family). A
*step* extends a partial solution to its next step boundary (a stop string, ``"\\n"`` by
default, EOS, or ``step_tokens`` tokens) with requests on token prefixes that share the engine
with every other problem in flight (a program per problem on the engine loop); the
potential (``score(problem, texts, finished)`` -> log-potentials, e.g. ``arith-prm``) scores
every new partial solution. With ``budget = N`` and ``width = M``:

* ``beam``: the first step draws ``N`` continuations of the prompt; after each step the finished
  ones go to the pool and the best ``N // M`` unfinished ones (by potential; ties to the lower
  candidate index) are kept (at most ``N`` minus the pool size), each expanded ``M`` ways; the
  rest are pruned. Ends when nothing is left to expand or the pool holds ``N`` solutions.
* ``dvts`` (diverse verifier tree search): ``N // M`` independent subtrees; the first step draws
  ``M`` continuations per subtree; after each step each subtree keeps its single best
  unfinished solution and expands it ``M`` ways. A subtree ends when it has nothing to expand.
* ``best_of_n`` (best-of-N with step scores): ``N`` independent step-wise solutions, nothing pruned;
  every step scored, so the final pool is weighted by the process reward.

Solutions that reach ``max_steps`` steps or ``max_tokens`` generated tokens join the pool as
they are. **Result** (the :class:`~ttscale.samplers.base.Sampler` protocol): every node of the
search tree as a candidate (its whole text so far, its step's tokens, its parent): the pool
``kept`` with ``log_weight`` = the potential of the finished solution (a log-reward, *not* an
importance weight: rank or vote with it), pruned partial solutions ``pruned``, the rest
``extended``; ``generated_tokens`` counts every generated token (pruned branches included),
``steps[t].extra["particle_steps"]`` the continuations drawn at step ``t`` and
``info["particle_steps"]`` their total. With a ``sink`` store every node is stored (step,
parent, log-weight, fate; the run is ``iid=False``) once its problem's search is over, and a
resumed call reads finished problems back (``manifest["search_done"]``). :attr:`timing`
splits wall time into engine, potential and the sampler's own work.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ttscale.engines.base import Engine, GenerationRequest, capabilities_of
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate, Fate, SampleResult, StepInfo
from ttscale.samplers.loop import Program, Scheduler
from ttscale.samplers.potentials import as_potential, clean_log_potentials
from ttscale.samplers.session import SamplingSession, open_sink, unique_problems
from ttscale.samplers.stepwise import (
    StepRun,
    ends_trace,
    extend,
    step_request,
    step_text,
    stored_problem,
)
from ttscale.store import SampleStore
from ttscale.types import Completion, FinishReason, Problem, SamplingParams
from ttscale.validation import check_choice, check_int

__all__ = ["SEARCH_CONFIGS", "SearchSampler", "particle_steps", "select_survivors"]

log = logging.getLogger(__name__)

#: The named search configurations.
SEARCH_CONFIGS = ("beam", "dvts", "best_of_n")


def select_survivors(
    search: str, scores: Sequence[float], groups: Sequence[int], keep: int
) -> list[int]:
    """Positions (ascending) of the unfinished solutions that survive a step.

    ``scores``: the potentials of the step's unfinished solutions; ``groups``: their subtree
    (DVTS); ``keep``: how many survive for ``beam``. ``beam`` keeps the ``keep`` best overall,
    ``dvts`` the best of each group, ``best_of_n`` everything. Ties go to the lower position; ``-inf``
    and NaN rank last (NaN as ``-inf``).
    """
    check_choice("search", search, SEARCH_CONFIGS)
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    n = len(s)
    if search == "best_of_n":
        return list(range(n))
    order = sorted(range(n), key=lambda i: (-s[i], i))
    if search == "beam":
        return sorted(order[:keep])
    best: dict[int, int] = {}
    for i in order:
        best.setdefault(int(groups[i]), i)
    return sorted(best.values())


@dataclass
class _Node:
    """A partial solution: its full text and generated token ids so far."""

    index: int
    parent: int | None
    step: int
    group: int
    text: str
    token_ids: tuple[int, ...]
    num_tokens: int
    finished: bool
    finish_reason: str
    step_completion: Completion  # the engine's completion of this node's step
    score: float = 0.0


@dataclass
class _State:
    """One problem's search: its nodes, frontier, pool, step diagnostics and token count."""

    problem: Problem
    nodes: list[_Node] = field(default_factory=list)
    frontier: list[int] = field(default_factory=list)  # node indices to expand next
    pool: list[int] = field(default_factory=list)  # finished node indices
    pruned: list[int] = field(default_factory=list)
    steps: list[StepInfo] = field(default_factory=list)
    generated: int = 0
    prompt_tokens: int = 0
    step: int = 0
    next_index: int = 0
    done: bool = False


class SearchSampler:
    """Beam search, DVTS or best-of-N with step scores, on a step-wise engine (module docstring).

    ``potential``: an object with ``score(problem, texts, finished)`` or such a callable;
    ``params``: sampling settings (temperature, seed, ...); the step boundary replaces its
    ``stop``/``max_tokens``: ``step_stop`` (default ``("\\n",)``, kept in the text),
    ``step_tokens`` per step (default ``params.max_tokens``); ``max_steps`` and ``max_tokens``
    bound a whole solution; ``width`` is ``M`` (must divide the budget for beam and DVTS);
    ``batch_problems``: problems searched at once (default ``None``: as many as keep
    ``max_sequences`` nodes queued); each problem is a program on the engine loop
    (:mod:`ttscale.samplers.loop`), so the steps of every problem in flight share the engine
    (vLLM: one continuous stream; batch-only engines: what is pending goes in one call) and a
    problem never waits for another's step; ``max_sequences``: most nodes in the engine at once.
    Results do not depend on either (seeds per problem, node and step);
    ``chat``: send the prompt as a user message; ``manifest``: fields for a stored run.
    """

    def __init__(
        self,
        engine: Engine,
        potential: Any,
        params: SamplingParams,
        *,
        search: str = "beam",
        width: int = 4,
        step_stop: Sequence[str] = ("\n",),
        step_tokens: int | None = None,
        max_steps: int = 16,
        max_tokens: int = 256,
        batch_problems: int | None = None,
        max_sequences: int = 512,
        chat: bool = False,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        check_choice("search", search, SEARCH_CONFIGS)
        check_int("width", width, min=1)
        check_int("max_steps", max_steps, min=1)
        check_int("max_tokens", max_tokens, min=1)
        check_int("step_tokens", step_tokens, min=1, allow_none=True)
        check_int("batch_problems", batch_problems, min=1, allow_none=True)
        check_int("max_sequences", max_sequences, min=1)
        stop = tuple(step_stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"step_stop must be non-empty strings, got {step_stop!r}")
        self.engine = engine
        self.potential = as_potential(potential)
        self.search = search
        self.width = 1 if search == "best_of_n" else width
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.batch_problems = batch_problems
        self.max_sequences = max_sequences
        # ``params.stop`` ends a whole solution; a step ends at either kind of stop
        self.final_stop = tuple(x for x in params.stop if x not in stop)
        self.params = params.replace(
            stop=stop + self.final_stop,
            include_stop_str_in_output=True,
            max_tokens=step_tokens if step_tokens is not None else params.max_tokens,
        )
        self.token_prefixes = capabilities_of(engine).token_prefixes
        self.chat = bool(chat)
        self.extra_manifest = dict(manifest or {})
        self.engine_info = dict(engine.info())
        #: seconds spent in the engine, in the potential, and in all (of the last ``sample`` run)
        self.timing: dict[str, float] = {"engine": 0.0, "potential": 0.0, "total": 0.0}

    def info(self) -> dict[str, Any]:
        return {
            "sampler": "search",
            "search": self.search,
            "width": self.width,
            "max_steps": self.max_steps,
            "max_tokens": self.max_tokens,
            "step": {"stop": list(self.params.stop), "tokens": self.params.max_tokens},
        }

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """The :class:`~ttscale.samplers.base.Sampler` protocol: ``budget`` = ``N`` solutions
        per step (beams / particles). Yields one result per problem, in order."""
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        if self.search != "best_of_n" and budget % self.width:
            raise ConfigError(
                f"{self.search} needs a budget divisible by width {self.width}, got {budget}; "
                f"use a multiple of {self.width} or change width"
            )
        params = self.params if seed is None else self.params.replace(seed=seed)
        problems = unique_problems(problems)
        if sink is not None:
            extra = {**self.extra_manifest, "search": {**self.info(), "budget": budget}}
            StepRun(sink, "search", budget, "search").check_same(extra["search"])
            open_sink(
                sink, problems, engine_info=self.engine_info, params=params, n=budget,
                chat=self.chat, iid=False, extra=extra,
            )
        return self._sample(problems, budget, params, sink)

    def _sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        params: SamplingParams,
        sink: SampleStore | None,
    ) -> Iterator[SampleResult]:
        self.timing = {"engine": 0.0, "potential": 0.0, "total": 0.0}
        own = [0.0]  # the sampler's own work per step (the rest of the wall time is the engine's)
        run = (
            StepRun(sink, "search", budget, "search", self.engine_info) if sink is not None else None
        )
        done = run.done() if run is not None else set()
        session = SamplingSession(self.engine, sink, engine_info=self.engine_info)
        # problems started and not yet stored: their journal and what the engine handed over
        started: dict[str, tuple[Mapping[tuple[str, int], Completion], dict[Any, Completion]]] = {}
        t0 = time.perf_counter()
        try:
            with session:
                sched: Scheduler[SampleResult] = Scheduler(
                    session, params, max_sequences=self.max_sequences,
                    max_problems=self.batch_problems,
                )  # fmt: skip
                programs = [
                    self._problem(p, budget, params, session, run, done, started, own)
                    for p in problems
                ]
                try:
                    yield from sched.run(programs)
                except BaseException:
                    # keep what the engine finished for the problems in flight: a resume replays it
                    if run is not None:
                        for pid, (replay, seen) in started.items():
                            run.salvage(pid, {**replay, **seen}.values())
                    raise
        finally:
            total = time.perf_counter() - t0
            self.timing["total"] = total
            self.timing["engine"] = max(0.0, total - self.timing["potential"] - own[0])

    def _problem(
        self,
        problem: Problem,
        budget: int,
        params: SamplingParams,
        session: SamplingSession,
        run: StepRun | None,
        done: set[str],
        started: dict[str, tuple[Mapping[tuple[str, int], Completion], dict[Any, Completion]]],
        own: list[float],
    ) -> Program[SampleResult]:
        """One problem of a run: read back if stored, else :meth:`program` (resuming from its
        journal), its nodes stored in one shard and the problem marked done."""
        return (
            yield from stored_problem(
                problem, session, run, done, started,
                lambda replay, seen: self.program(
                    problem, budget, params, replay=replay, seen=seen, own=own
                ),
                lambda: _resumed(problem, run),
            )
        )  # fmt: skip

    def program(
        self,
        problem: Problem,
        budget: int,
        params: SamplingParams,
        *,
        replay: Mapping[tuple[str, int], Completion] | None = None,
        seen: dict[tuple[str, int], Completion] | None = None,
        own: list[float] | None = None,
    ) -> Program[SampleResult]:
        """The search of one problem, as a program on the engine loop
        (:mod:`ttscale.samplers.loop`; its scheduler's params are ``params``, the step's): each
        step submits the frontier's expansions and waits for all of them, then scores and
        selects this problem's nodes alone, so problems in flight share the engine and none
        waits for another's step. ``replay``: nodes an interrupted attempt generated (taken,
        not generated); ``seen`` receives every node the engine hands over (for salvage)."""
        replay = replay or {}
        st = _State(problem)
        while not st.done:
            if st.step == 0:
                parents: list[tuple[int | None, int, int]] = []
                if self.search == "dvts":
                    parents = [(None, g, self.width) for g in range(budget // self.width)]
                else:
                    parents = [(None, 0, budget)]
            else:
                parents = [(i, st.nodes[i].group, self.width) for i in st.frontier]
            requests: list[GenerationRequest] = []
            for parent, _group, m in parents:
                # a node's candidate index is its position in st.nodes (children are appended
                # in request order below)
                first, st.next_index = st.next_index, st.next_index + m
                requests.append(self._request(st, parent, tuple(range(first, first + m))))
            # a step's token cap: step_tokens, less near a solution's max_tokens
            caps = [
                min(
                    params.max_tokens,
                    self.max_tokens - (st.nodes[par].num_tokens if par is not None else 0),
                )
                for par, _, _ in parents
            ]
            results = yield from extend(
                requests, params, caps, replay=replay, seen=seen,
                engine=self.engine_info.get("engine"),
            )  # fmt: skip
            t_own = time.perf_counter()
            new: list[int] = []
            for (parent, group, _m), comps in zip(parents, results, strict=True):
                for c in comps:
                    st.nodes.append(self._child(st, parent, group, c))
                    new.append(len(st.nodes) - 1)
                    st.generated += c.num_tokens + c.discarded_tokens
                    st.prompt_tokens += c.prompt_tokens or 0
            t0 = time.perf_counter()
            out = self.potential.score(
                st.problem,
                [st.nodes[i].text for i in new],
                [st.nodes[i].finished for i in new],
            )
            scores = clean_log_potentials(out, len(new), who=type(self.potential).__name__)
            t_pot = time.perf_counter() - t0
            self.timing["potential"] += t_pot
            for i, sc in zip(new, scores.tolist(), strict=True):
                st.nodes[i].score = sc
            self._select(st, new, budget)
            if own is not None:
                own[0] += time.perf_counter() - t_own - t_pot
        return self._result(st, replay)

    def _request(
        self, st: _State, parent: int | None, indices: tuple[int, ...]
    ) -> GenerationRequest:
        if parent is None:
            return step_request(st.problem, chat=self.chat, indices=indices, step=0)
        node = st.nodes[parent]
        if self.token_prefixes:
            return step_request(
                st.problem, chat=self.chat, indices=indices, step=st.step,
                prefix_ids=node.token_ids,
            )  # fmt: skip
        return step_request(
            st.problem, chat=self.chat, indices=indices, step=st.step, prefix_text=node.text
        )

    def _child(self, st: _State, parent: int | None, group: int, c: Completion) -> _Node:
        base = st.nodes[parent] if parent is not None else None
        ids = (base.token_ids if base else ()) + tuple(c.token_ids or ())
        n = (base.num_tokens if base else 0) + c.num_tokens
        eos = ends_trace(c, self.final_stop)
        finished = (
            eos
            or st.step + 1 >= self.max_steps
            or n >= self.max_tokens
        )
        return _Node(
            index=c.index,
            parent=parent,
            step=st.step,
            group=group,
            text=(base.text if base else "") + self._step_text(base, c),
            token_ids=ids,
            num_tokens=n,
            finished=finished,
            finish_reason=c.finish_reason if eos or not finished else FinishReason.LENGTH.value,
            step_completion=c,
        )

    def _step_text(self, base: _Node | None, c: Completion) -> str:
        decode = getattr(self.engine, "decode", None) if self.token_prefixes else None
        return step_text(decode, base.token_ids if base else (), c)

    def _select(self, st: _State, new: list[int], budget: int) -> None:
        done = [i for i in new if st.nodes[i].finished]
        open_ = [i for i in new if not st.nodes[i].finished]
        st.pool.extend(done)
        keep = budget // self.width
        if self.search == "beam":
            keep = min(keep, budget - len(st.pool))
        if keep <= 0:
            survivors: list[int] = []
        else:
            pos = select_survivors(
                self.search,
                [st.nodes[i].score for i in open_],
                [st.nodes[i].group for i in open_],
                keep,
            )
            survivors = [open_[j] for j in pos]
        dropped = sorted(set(open_) - set(survivors))
        st.pruned.extend(dropped)
        st.frontier = survivors
        st.steps.append(
            StepInfo(
                step=st.step,
                ancestors=tuple(survivors),
                extra={
                    "particle_steps": len(new),
                    "finished": len(done),
                    "pruned": len(dropped),
                    "best": max((st.nodes[i].score for i in new), default=-math.inf),
                },
            )
        )
        st.step += 1
        if not survivors:
            st.done = True

    def _result(self, st: _State, replay: Mapping[tuple[str, int], Completion]) -> SampleResult:
        # every node is a candidate: its whole text so far and its step's tokens (so the
        # candidates' num_tokens sum to generated_tokens), like SMCSampler's particle-steps
        pool, pruned = set(st.pool), set(st.pruned)
        cands: list[Candidate] = []
        for i, node in enumerate(st.nodes):
            comp = replace(node.step_completion, text=node.text)
            parent = st.nodes[node.parent].index if node.parent is not None else None
            common: dict[str, Any] = {"step": node.step, "parent": parent, "log_weight": node.score}
            if i in pool:
                cands.append(Candidate(replace(comp, finish_reason=node.finish_reason), **common))
            elif i in pruned:
                cands.append(Candidate(comp, fate=Fate.PRUNED, pruned_at=node.num_tokens, **common))
            else:
                cands.append(Candidate(comp, fate=Fate.EXTENDED, **common))
        total_steps = sum(int(s.extra["particle_steps"]) for s in st.steps)
        info: dict[str, Any] = {
            "particle_steps": total_steps, "search": self.search, "width": self.width
        }
        again = [n.step_completion for n in st.nodes if (st.problem.id, n.index) in replay]
        if again:  # nodes an interrupted attempt generated, replayed from its journal
            info["replayed_tokens"] = sum(c.num_tokens + c.discarded_tokens for c in again)
        return SampleResult(
            problem=st.problem,
            candidates=tuple(cands),
            generated_tokens=st.generated,
            prompt_tokens=st.prompt_tokens,
            iid=False,
            resumed=len(again),
            steps=tuple(st.steps),
            info=info,
        )


def _resumed(problem: Problem, run: StepRun) -> SampleResult:
    """A problem whose search a previous call stored, read back from the sink."""
    cands, tokens = run.stored(problem.id)
    return SampleResult(
        problem=problem,
        candidates=tuple(cands),
        generated_tokens=tokens,
        iid=False,
        resumed=len(cands),
        info={"particle_steps": len(cands), "resumed": True},
    )


def particle_steps(result: SampleResult) -> int:
    """The continuations a step-wise result drew, over all its steps (``info["particle_steps"]``
    of a search or SMC result)."""
    return int(result.info.get("particle_steps", 0))
