"""The engine loop: samplers' policies as per-problem programs, run many at a time on one engine.

A sampler's policy for one problem is a *program*: a Python generator that yields commands and
receives their answers, and finally returns the problem's result (usually a
:class:`~ttscale.samplers.base.SampleResult`). The :class:`Scheduler` runs many programs at
once (at most ``max_problems`` in flight), gathers what they ask for, keeps at most
``max_sequences`` samples in the engine at a time, and feeds the engine continuously through an
:class:`~ttscale.engines.loop.EngineLoop` (vLLM: requests join the running engine as they
arrive; engines with only batch ``generate``: what is pending is coalesced into one call).

What a program may ask for (``answer = yield Command``):

* :class:`Submit` ``(requests, store=True, priority=0, ahead=False)`` -> a tuple of tickets, one
  per request, at once (the requests are queued; the program keeps running). Queued requests go
  into the engine lowest ``priority`` first, in submission order among equal ones, and an engine
  loop that can order its own queue (``priorities = True``: vLLM's) gets the priority too;
  ``ahead``: the requests are drawn ahead of need, so they do not count as queued work when the
  scheduler decides whether to admit another program or answers :class:`Spare` (a program may
  queue its whole budget behind everyone's next samples; aborting a queued one costs nothing);
* :class:`Wait` ``(tickets=None, all=False)`` -> ``{ticket: completions}``: blocks until one
  (``all=True``: every one) of ``tickets`` (default: all of the program's outstanding tickets)
  has finished, and hands over every finished one of them; each ticket is handed over once;
* :class:`Abort` ``(tickets)`` -> :class:`Aborted`: the program no longer wants these requests;
  those still in the engine are cancelled at once (their slots freed) and the tokens generated
  for them are counted (in the session and in ``Aborted.tokens``); those that had already
  finished are handed over in ``Aborted.finished`` (they were counted and stored like any);
* :class:`Keep` ``(items)`` -> ``None``: store completions or candidates (with their fate) that
  were submitted with ``store=False``;
* :class:`Spare` ``()`` -> ``int``: how many more samples the engine could take now, per program
  in flight or still to come (when ``run`` is given a list; ``0`` when the engine is full); a
  program may draw ahead with it.

``yield from generate(requests)`` is Submit followed by Wait-for-all, returning one list of
completions per request.

Results do not depend on concurrency: a request's samples are seeded per (problem, index, step)
(:meth:`~ttscale.engines.base.GenerationRequest.seed_for`), so they are the same whatever else is
in flight. The order in which a program's requests *finish* does depend on it; a program whose
decisions must not depend on timing waits for the samples it decides on (e.g. in index order),
as the bundled programs do. Every completion an engine hands over is counted and (unless
``store=False``) stored by the session as it arrives, whether or not its program still wants
it; tokens of aborted traces are counted too.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from ttscale.engines.base import GenerationRequest, TokenCallback, TokenEvent
from ttscale.engines.loop import EngineLoop, LoopFailure, open_loop
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate
from ttscale.samplers.session import SamplingSession
from ttscale.types import Completion, SamplingParams
from ttscale.validation import check_int

__all__ = [
    "Abort",
    "Aborted",
    "Command",
    "Keep",
    "Program",
    "Scheduler",
    "Spare",
    "Submit",
    "Wait",
    "generate",
]

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class Submit:
    """Queue ``requests``; the answer is one ticket per request.

    ``store``: store each completion as it arrives (``False``: the program stores it later with
    :class:`Keep`); ``stored_as(completion)``: what to store instead of the completion (e.g. a
    :class:`~ttscale.samplers.base.Candidate` with its fate), called as it arrives, so an engine
    failure later loses nothing; ``on_token``: stream every token of these requests and abort a
    trace by returning ``True`` (:data:`~ttscale.engines.base.TokenCallback`; ``event.request``
    is the position in ``requests``); ``observe(completions)``: called with every completion of
    these requests the engine hands over, as it arrives, before the program gets it -- also for
    the samples an engine that fails had finished, which no Wait hands over (a step-wise
    sampler journals them for resume); ``priority``: one for all requests or one per request
    (lower goes into the engine first); ``ahead``: drawn ahead of need (see the module docstring).
    """

    requests: tuple[GenerationRequest, ...]
    store: bool = True
    stored_as: Callable[[Completion], Completion | Candidate] | None = None
    on_token: TokenCallback | None = None
    observe: Callable[[list[Completion]], None] | None = None
    priority: int | tuple[int, ...] = 0
    ahead: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        if not isinstance(self.priority, int):
            object.__setattr__(self, "priority", tuple(int(x) for x in self.priority))
            if len(self.priority) != len(self.requests):
                raise ConfigError(
                    f"Submit has {len(self.requests)} requests but {len(self.priority)} "
                    "priorities; give one priority, or one per request"
                )
        for r in self.requests:
            if not isinstance(r, GenerationRequest):
                raise ConfigError(f"Submit takes GenerationRequests, got {type(r).__name__}")


@dataclass(frozen=True)
class Wait:
    """Block until one (``all``: every one) of ``tickets`` (``None``: all outstanding) finished."""

    tickets: tuple[int, ...] | None = None
    all: bool = False

    def __post_init__(self) -> None:
        if self.tickets is not None:
            object.__setattr__(self, "tickets", tuple(self.tickets))


@dataclass(frozen=True)
class Abort:
    """Cancel ``tickets`` (see :class:`Aborted` for the answer)."""

    tickets: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tickets", tuple(self.tickets))


@dataclass(frozen=True)
class Aborted:
    """The answer to :class:`Abort`: ``finished`` tickets that had already ended (handed over
    here instead of by a :class:`Wait`), and ``tokens`` the engine generated for the cancelled
    ones (counted in the session's accounting)."""

    finished: dict[int, list[Completion]] = field(default_factory=dict)
    tokens: int = 0


@dataclass(frozen=True)
class Keep:
    """Store ``items`` (completions, or candidates with their fate)."""

    items: tuple[Completion | Candidate, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))


@dataclass(frozen=True)
class Spare:
    """Ask how many more samples per program in flight the engine could take now."""


Command = Submit | Wait | Abort | Keep | Spare
#: A per-problem program: yields commands, receives their answers, returns its result.
Program = Generator[Command, Any, R]


def generate(
    requests: Sequence[GenerationRequest],
    *,
    store: bool = True,
    stored_as: Callable[[Completion], Completion | Candidate] | None = None,
    on_token: TokenCallback | None = None,
    observe: Callable[[list[Completion]], None] | None = None,
) -> Generator[Command, Any, list[list[Completion]]]:
    """Submit ``requests`` and wait for all of them: one list of completions per request (the
    keywords as for :class:`Submit`)."""
    if not requests:
        return []
    tickets = yield Submit(
        tuple(requests), store=store, stored_as=stored_as, on_token=on_token, observe=observe
    )
    got = yield Wait(tickets, all=True)
    return [got[t] for t in tickets]


@dataclass
class _Ticket:
    prog: _Prog
    request: GenerationRequest
    store: bool
    stored_as: Callable[[Completion], Completion | Candidate] | None = None
    on_token: TokenCallback | None = None
    observe: Callable[[list[Completion]], None] | None = None
    priority: int = 0
    ahead: bool = False
    engine: int | None = None  # the engine loop's ticket once submitted

    def keep(self, session: SamplingSession, comps: list[Completion], *, check: bool = True) -> None:
        session.received(self.request, comps, store=self.store and self.stored_as is None, check=check)
        if self.observe is not None:
            self.observe(comps)
        if self.store and self.stored_as is not None:
            session.keep([self.stored_as(c) for c in comps])


@dataclass
class _Prog:
    pos: int
    gen: Program[Any]
    outstanding: set[int] = field(default_factory=set)  # tickets not yet handed over
    finished: dict[int, list[Completion]] = field(default_factory=dict)  # not yet handed over
    waiting: Wait | None = None
    done: bool = False
    result: Any = None


class Scheduler(Generic[R]):
    """Runs per-problem programs on one engine (see the module docstring).

    ``session``: the :class:`~ttscale.samplers.session.SamplingSession` that counts, stores and
    salvages what the engine hands over; ``params``: the sampling parameters of every request
    (seeds come from ``params.seed``); ``max_problems``: programs in flight (default: as many
    as keep ``max_sequences`` samples queued); ``max_sequences``: samples in the engine at once
    (for an engine with only batch ``generate``, its largest call).
    """

    def __init__(
        self,
        session: SamplingSession,
        params: SamplingParams,
        *,
        max_sequences: int = 512,
        max_problems: int | None = None,
        loop: EngineLoop | None = None,
    ) -> None:
        check_int("max_sequences", max_sequences, min=1)
        check_int("max_problems", max_problems, min=1, allow_none=True)
        self.session = session
        self.params = params
        self.max_sequences = max_sequences
        self.max_problems = max_problems
        self._loop = loop
        self._next_ticket = 0
        self._tickets: dict[int, _Ticket] = {}
        self._by_engine: dict[int, int] = {}
        # tickets not yet in the engine: a heap of (priority, ticket), so the lowest priority
        # goes first and equal ones in submission order; an aborted one stays in the heap until
        # it comes up (lazy deletion) but leaves ``_queued``
        self._pending: list[tuple[int, int]] = []
        self._queued: set[int] = set()
        self._pending_size = 0  # samples queued, those drawn ahead not included
        self._ahead_size = 0  # samples queued that were drawn ahead
        self._in_flight = 0
        self._active: list[_Prog] = []
        self._expected: int | None = None
        self._admitted = 0
        #: engine polls made (how many times the scheduler waited on the engine)
        self.polls = 0

    # ---- the main loop ---------------------------------------------------------------------

    def run(self, programs: Iterable[Program[R]]) -> Iterator[R]:
        """Run ``programs``; yields their results in program order, each as soon as it and every
        earlier one are done. Closing the iterator early (or an error) cancels what is still in
        the engine."""
        loop = self._loop or open_loop(self.session.engine, self.params)
        # how many programs will share the engine (for Spare), when the caller's list says so
        self._expected = len(programs) if isinstance(programs, Sized) else None
        self._admitted = 0
        source = iter(programs)
        exhausted = False
        ready: deque[tuple[_Prog, Any]] = deque()
        results: dict[int, Any] = {}
        emitted = 0
        count = 0
        try:
            while True:
                # a live source (ttscale.serve's inbox) may ask to cancel programs in flight
                cancelled = getattr(source, "cancelled", None)
                if cancelled is not None:
                    for pos in cancelled():
                        self._cancel(pos, loop)
                for p in [p for p in self._active if p.done]:
                    self._active.remove(p)
                    results[p.pos] = p.result
                while emitted in results:
                    yield results.pop(emitted)
                    emitted += 1
                # admit programs while the queue holds less than one engine's worth
                while not exhausted and (
                    self.max_problems is None or len(self._active) < self.max_problems
                ):
                    if self.max_problems is None and self._pending_size >= self.max_sequences:
                        break
                    try:
                        gen = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    if gen is None:  # a live source has nothing to admit now
                        break
                    p = _Prog(count, gen)
                    count += 1
                    self._admitted = count
                    self._active.append(p)
                    self._advance(p, None, loop, ready)
                    self._drain(ready, loop)
                if any(p.done for p in self._active):
                    continue
                if exhausted and not self._active:
                    return
                self._dispatch(loop)
                if not self._in_flight:
                    full = self.max_problems is not None and len(self._active) >= self.max_problems
                    if exhausted or full:
                        stuck = [p.pos for p in self._active if p.waiting is not None]
                        raise ConfigError(
                            f"programs {stuck[:5]} wait for nothing: a Wait names no ticket "
                            "that is outstanding"
                        )
                    idle = getattr(source, "wait_idle", None)
                    if idle is not None and not self._active:
                        idle()  # a live source: sleep until a program (or a cancel) arrives
                    continue
                self.polls += 1
                try:
                    loop.poll(lambda et, comps: self._finished(et, comps, ready))
                except LoopFailure as e:
                    for et, comps in e.by_ticket.items():
                        t = self._by_engine.get(et)
                        if t is not None and comps:
                            tk = self._tickets[t]
                            good = [c for c in comps if c.problem_id == tk.request.problem_id]
                            tk.keep(self.session, good, check=False)
                    raise
                self._drain(ready, loop)
        finally:
            # a stopped run (an error, Ctrl-C, a caller that stops iterating) leaves nothing
            # running in the engine, and what the engine generated for it is counted
            self._abort_all(loop)
            if self._loop is None:
                loop.close()

    def _abort_all(self, loop: EngineLoop) -> None:
        for t in list(self._tickets):
            tk = self._tickets.pop(t)
            if tk.engine is not None:
                self.session.discarded(loop.abort(tk.engine))

    def _cancel(self, pos: int, loop: EngineLoop) -> None:
        """Stop program ``pos`` now (its client went away): its requests leave the engine (the
        tokens generated for them are counted) and its result is ``None``."""
        for p in self._active:
            if p.pos == pos and not p.done:
                if p.outstanding:
                    self._abort(p, tuple(p.outstanding), loop)
                p.gen.close()
                p.waiting, p.done, p.result = None, True, None
                return

    # ---- programs --------------------------------------------------------------------------

    def _drain(self, ready: deque[tuple[_Prog, Any]], loop: EngineLoop) -> None:
        while ready:
            p, value = ready.popleft()
            self._advance(p, value, loop, ready)

    def _advance(
        self, p: _Prog, value: Any, loop: EngineLoop, ready: deque[tuple[_Prog, Any]]
    ) -> None:
        """Run ``p`` until it waits for the engine or returns."""
        while True:
            try:
                cmd = p.gen.send(value)
            except StopIteration as stop:
                p.done, p.result = True, stop.value
                if p.outstanding:
                    # a program that returns with requests outstanding no longer wants them
                    self._abort(p, tuple(p.outstanding), loop)
                return
            if isinstance(cmd, Submit):
                value = tuple(
                    self._submit(p, r, cmd, _at(cmd.on_token, k), _at_priority(cmd.priority, k))
                    for k, r in enumerate(cmd.requests)
                )
            elif isinstance(cmd, Wait):
                want = self._wanted(p, cmd)
                got = {t: p.finished[t] for t in want if t in p.finished}
                if got and (not cmd.all or len(got) == len(want)):
                    value = self._hand_over(p, got)
                    continue
                p.waiting = cmd
                return
            elif isinstance(cmd, Abort):
                value = self._abort(p, cmd.tickets, loop)
            elif isinstance(cmd, Keep):
                self.session.keep(list(cmd.items))
                value = None
            elif isinstance(cmd, Spare):
                busy = self._in_flight + self._pending_size
                # shared by the programs in flight and those still to come (when known), so
                # the first programs admitted do not take the whole engine
                sharing = len(self._active) + max(0, (self._expected or 0) - self._admitted)
                value = max(0, self.max_sequences - busy) // max(1, sharing)
            else:
                raise ConfigError(
                    f"a program yielded {type(cmd).__name__}; it may yield Submit, Wait, Abort, "
                    "Keep or Spare"
                )

    def _wanted(self, p: _Prog, cmd: Wait) -> tuple[int, ...]:
        if cmd.tickets is None:
            want = tuple(sorted(p.outstanding))
        else:
            want = cmd.tickets
            bad = [t for t in want if t not in p.outstanding]
            if bad:
                raise ConfigError(f"Wait for tickets {bad[:5]} that this program does not hold")
        if not want:
            raise ConfigError("a program waits while it has no outstanding request")
        return want

    def _hand_over(self, p: _Prog, got: dict[int, list[Completion]]) -> dict[int, list[Completion]]:
        for t in got:
            del p.finished[t]
            p.outstanding.discard(t)
        return got

    def _submit(
        self,
        p: _Prog,
        request: GenerationRequest,
        cmd: Submit,
        on_token: TokenCallback | None,
        priority: int,
    ) -> int:
        t = self._next_ticket
        self._next_ticket += 1
        self._tickets[t] = _Ticket(
            p, request, cmd.store, cmd.stored_as, on_token, cmd.observe, priority, cmd.ahead
        )
        p.outstanding.add(t)
        heapq.heappush(self._pending, (priority, t))
        self._queued.add(t)
        self._count_queued(len(request.indices), cmd.ahead)
        return t

    def _count_queued(self, n: int, ahead: bool) -> None:
        if ahead:
            self._ahead_size += n
        else:
            self._pending_size += n

    def _abort(self, p: _Prog, tickets: Sequence[int], loop: EngineLoop) -> Aborted:
        finished: dict[int, list[Completion]] = {}
        tokens = 0
        for t in tickets:
            if t not in p.outstanding:
                raise ConfigError(f"Abort of ticket {t}, which this program does not hold")
            p.outstanding.discard(t)
            if t in p.finished:
                finished[t] = p.finished.pop(t)
                continue
            tk = self._tickets.pop(t)
            n = len(tk.request.indices)
            if tk.engine is None:
                self._queued.discard(t)
                self._count_queued(-n, tk.ahead)
            else:
                self._by_engine.pop(tk.engine, None)
                tokens += loop.abort(tk.engine)
                self._in_flight -= n
        if tokens:
            self.session.discarded(tokens)
        return Aborted(finished, tokens)

    # ---- the engine ------------------------------------------------------------------------

    def _dispatch(self, loop: EngineLoop) -> None:
        """Move pending requests into the engine while it has room (at least one when empty)."""
        ordered = bool(getattr(loop, "priorities", False))
        while self._pending:
            t = self._pending[0][1]
            if t not in self._queued:  # aborted while queued
                heapq.heappop(self._pending)
                continue
            tk = self._tickets[t]
            n = len(tk.request.indices)
            if self._in_flight and self._in_flight + n > self.max_sequences:
                return
            heapq.heappop(self._pending)
            self._queued.discard(t)
            self._count_queued(-n, tk.ahead)
            kw: dict[str, Any] = {}
            if tk.on_token is not None:
                kw["on_token"] = tk.on_token
            if ordered:
                kw["priority"] = tk.priority
            tk.engine = loop.submit(tk.request, **kw)
            self._by_engine[tk.engine] = t
            self._in_flight += n

    def _finished(
        self, engine_ticket: int, comps: list[Completion], ready: deque[tuple[_Prog, Any]]
    ) -> None:
        t = self._by_engine.pop(engine_ticket, None)
        if t is None:
            return
        tk = self._tickets.pop(t)
        self._in_flight -= len(tk.request.indices)
        tk.keep(self.session, comps)
        p = tk.prog
        p.finished[t] = comps
        cmd = p.waiting
        if cmd is None:
            return
        want = self._wanted(p, cmd)
        got = {x: p.finished[x] for x in want if x in p.finished}
        if got and (not cmd.all or len(got) == len(want)):
            p.waiting = None
            ready.append((p, self._hand_over(p, got)))


def _at_priority(priority: int | tuple[int, ...], k: int) -> int:
    return priority if isinstance(priority, int) else priority[k]


def _at(on_token: TokenCallback | None, k: int) -> TokenCallback | None:
    """``on_token`` for the ``k``-th request of a Submit (events say ``request=k``)."""
    if on_token is None:
        return None
    f = on_token

    def cb(ev: TokenEvent) -> bool | None:
        # an engine loop's events say request=0 (one request per ticket): no copy per token then
        return f(ev if ev.request == k else replace(ev, request=k))

    return cb
