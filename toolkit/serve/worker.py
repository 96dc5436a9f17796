"""The server's engine thread: every HTTP request is a program on ONE scheduler and engine.

:class:`Worker` owns the engine. A request becomes a per-problem program
(:mod:`ttscale.samplers.loop`) that is put into an :class:`Inbox`, a live, thread-safe source the
scheduler admits programs from while it runs; so concurrent requests are problems in flight
together and their samples share the engine's batches. A client that goes away cancels its
program: its requests leave the engine at once (their slots freed, their tokens counted).

Requests may differ in sampling settings (temperature, ``max_tokens``, ``stop``): an engine loop
serves one setting, so :class:`LaneLoop` keeps one loop per setting ("lane") on the same engine
and routes each request by the lane its program tagged it with. Seeds are per request: the
program wrapper gives every sample the seed ``step_seed(request seed, problem id, index, step)``,
as the library derives them from a run seed, so a request's answer does not depend on what else
is in flight.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest, TokenCallback
from ttscale.engines.loop import EngineLoop, LoopResult, open_loop
from ttscale.samplers.loop import Abort, Program, Scheduler, Submit, Wait
from ttscale.samplers.session import SamplingSession
from ttscale.seeding import step_seed
from ttscale.types import Completion, SamplingParams

__all__ = ["Budget", "Inbox", "Job", "LaneLoop", "Outcome", "Worker"]

log = logging.getLogger(__name__)

_LANE = "ttscale.serve.lane"
#: engine steps per poll at most (where the loop allows it): how long a cancel may wait
POLL_STEPS = 16


def _takes_max_steps(loop: Any) -> bool:
    try:
        return "max_steps" in inspect.signature(loop.poll).parameters
    except (TypeError, ValueError):
        return False


class LaneLoop:
    """An :class:`~ttscale.engines.loop.EngineLoop` over one engine for several sampling
    settings: one inner loop per setting, opened when first used; a request goes to the loop
    named by its ``meta`` lane. vLLM loops of one engine share one step loop, so a step hands
    every lane's outputs to their own handlers."""

    def __init__(self, engine: Engine, lanes: Callable[[int], SamplingParams]) -> None:
        self.engine = engine
        self._params_of = lanes
        self._loops: dict[int, EngineLoop] = {}
        self._tickets: dict[int, tuple[int, int]] = {}  # our ticket -> (lane, inner ticket)
        self._back: dict[tuple[int, int], int] = {}
        self._next = 0

    def _loop(self, lane: int) -> EngineLoop:
        loop = self._loops.get(lane)
        if loop is None:
            loop = open_loop(self.engine, self._params_of(lane))
            shared = next(iter(self._loops.values()), None)
            if shared is not None and hasattr(loop, "steps") and hasattr(shared, "steps"):
                # vLLM: one LLMEngine, so one step loop for all lanes (a step of one lane
                # would otherwise drop the outputs of another's requests)
                loop.steps = shared.steps
            self._loops[lane] = loop
        return loop

    @property
    def in_flight(self) -> int:
        return sum(loop.in_flight for loop in self._loops.values())

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> int:
        lane = int(request.meta.get(_LANE, 0))
        loop = self._loop(lane)
        inner = loop.submit(request) if on_token is None else loop.submit(request, on_token=on_token)
        t = self._next
        self._next += 1
        self._tickets[t] = (lane, inner)
        self._back[(lane, inner)] = t
        return t

    def poll(self, on_result: LoopResult) -> None:
        def cb(lane: int) -> LoopResult:
            def deliver(inner: int, comps: list[Completion]) -> None:
                t = self._back.pop((lane, inner), None)
                if t is not None:
                    del self._tickets[t]
                    on_result(t, comps)

            return deliver

        for lane, loop in list(self._loops.items()):
            if loop.in_flight:
                if _takes_max_steps(loop):
                    # bounded, so cancels and new requests are seen between engine steps
                    loop.poll(cb(lane), max_steps=POLL_STEPS)  # type: ignore[call-arg]
                else:
                    loop.poll(cb(lane))

    def abort(self, ticket: int) -> int:
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return 0
        self._back.pop(entry, None)
        lane, inner = entry
        return self._loops[lane].abort(inner)

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._tickets.clear()
        self._back.clear()


@dataclass(frozen=True)
class Budget:
    """Limits of one request besides its sample budget: ``max_total_tokens`` generated tokens
    (aborted ones included) and ``deadline_s`` seconds from admission. Both are checked as
    samples arrive; when one is reached the samples still in flight are aborted and the program
    stops with what it has."""

    max_total_tokens: int | None = None
    deadline_s: float | None = None


@dataclass
class Outcome:
    """What a request's program produced: the inner program's ``result`` (``None`` when a
    limit stopped it), every completion it received, in arrival order, the tokens of its
    aborted traces, and ``stopped`` (``None``, ``"max_total_tokens"`` or ``"deadline"``)."""

    result: Any
    completions: list[Completion]
    aborted_tokens: int
    stopped: str | None
    wall_seconds: float


@dataclass
class Job:
    """One request's program as the worker runs it: ``inner`` program (its requests'
    contexts are replaced by ``context``: ``{"prompt": ...}`` or ``{"messages": ...}``),
    ``lane`` (sampling settings), per-request ``seed``, limits, and ``done(outcome or error)``
    called on the worker thread when it ends (not when it is cancelled)."""

    inner: Program[Any]
    context: Mapping[str, Any]
    lane: int
    seed: int
    budget: Budget
    done: Callable[[Outcome | BaseException], None]
    handle: int = -1
    cancelled: bool = field(default=False)

    def program(self) -> Program[None]:
        """The wrapper the scheduler runs (see the module docstring)."""
        t0 = time.monotonic()
        got: list[Completion] = []
        held: set[int] = set()
        aborted = 0
        tokens = 0
        inner = self.inner
        value: Any = None
        stopped: str | None = None

        def over() -> str | None:
            b = self.budget
            if b.max_total_tokens is not None and tokens >= b.max_total_tokens:
                return "max_total_tokens"
            if b.deadline_s is not None and time.monotonic() - t0 >= b.deadline_s:
                return "deadline"
            return None

        def take(answer: Mapping[int, list[Completion]]) -> None:
            nonlocal tokens
            for t, comps in answer.items():
                held.discard(t)
                got.extend(comps)
                tokens += sum(c.num_tokens + c.discarded_tokens for c in comps)

        try:
            while True:
                try:
                    cmd = inner.send(value)
                except StopIteration as stop:
                    self.done(Outcome(stop.value, got, aborted, None, time.monotonic() - t0))
                    return
                if isinstance(cmd, Submit):
                    reqs = tuple(self._rewrite(r) for r in cmd.requests)
                    # the command as the program gave it (on_token: a pruning rule watches
                    # its traces), with the request's context and seeds
                    value = yield dataclasses.replace(cmd, requests=reqs)
                    held.update(value)
                elif isinstance(cmd, Wait):
                    want = tuple(sorted(held)) if cmd.tickets is None else cmd.tickets
                    answer: dict[int, list[Completion]] = {}
                    # one at a time, so a limit is checked as each request arrives
                    while True:
                        part = yield Wait(tuple(t for t in want if t not in answer))
                        answer.update(part)
                        take(part)
                        stopped = over()
                        if stopped or not cmd.all or len(answer) == len(want):
                            break
                    if stopped:
                        break
                    value = answer
                elif isinstance(cmd, Abort):
                    res = yield cmd
                    for t in cmd.tickets:
                        held.discard(t)
                    take(res.finished)
                    aborted += res.tokens
                    value = res
                else:
                    value = yield cmd
            # a limit was reached: what is still in flight is no longer wanted
            inner.close()
            if held:
                res = yield Abort(tuple(sorted(held)))
                take(res.finished)
                aborted += res.tokens
            self.done(Outcome(None, got, aborted, stopped, time.monotonic() - t0))
        except GeneratorExit:
            inner.close()
            raise
        except Exception as e:  # a failing program fails its request, never the server
            log.debug("request program failed", exc_info=True)
            self.done(e)

    def _rewrite(self, r: GenerationRequest) -> GenerationRequest:
        seeds = tuple(step_seed(self.seed, r.problem_id, i, r.step) for i in r.indices)
        ctx: dict[str, Any] = {"prompt": None, "messages": None, "prompt_token_ids": None}
        ctx.update(self.context)
        return dataclasses.replace(r, seeds=seeds, meta={**r.meta, _LANE: self.lane}, **ctx)


class Inbox:
    """A live program source for :meth:`Scheduler.run`: ``put`` from any thread, ``None`` when
    nothing is waiting (the scheduler goes on with what it has), ``wait_idle`` sleeps while the
    scheduler has nothing to do, ``cancelled`` hands over the positions of programs to stop."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._cancel: list[Job] = []
        self._closed = False
        self._admitted = 0

    def put(self, job: Job) -> None:
        with self._cv:
            self._queue.append(job)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cv:
            job.cancelled = True
            if job.handle < 0:
                # not admitted yet: it is skipped when its turn comes
                return
            self._cancel.append(job)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __iter__(self) -> Iterator[Program[None] | None]:
        return self

    def __next__(self) -> Program[None] | None:
        with self._cv:
            while self._queue:
                job = self._queue.popleft()
                if job.cancelled:
                    continue
                job.handle = self._admitted
                self._admitted += 1
                return job.program()
            if self._closed:
                raise StopIteration
            return None

    def cancelled(self) -> list[int]:
        with self._cv:
            out = [j.handle for j in self._cancel]
            self._cancel.clear()
            return out

    def wait_idle(self) -> None:
        with self._cv:
            if not self._queue and not self._cancel and not self._closed:
                self._cv.wait(timeout=1.0)


class Worker:
    """The engine thread (see the module docstring). ``base``: the server's sampling settings;
    :meth:`lane` gives the lane of a request's settings; ``max_sequences``: samples in the
    engine at once (all requests together)."""

    def __init__(self, engine: Engine, base: SamplingParams, *, max_sequences: int = 256) -> None:
        self.engine = engine
        self.base = base
        self.max_sequences = max_sequences
        self._lanes: dict[SamplingParams, int] = {}
        self._params: list[SamplingParams] = []
        self._lock = threading.Lock()
        self.inbox = Inbox()
        self.session = SamplingSession(engine, None)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._live_jobs: dict[int, Job] = {}
        self._current: _CountingLoop | None = None
        #: engine polls and samples dispatched (the mean batch size of the benchmark)
        self.polls = 0
        self.batch_samples = 0

    def lane(self, params: SamplingParams) -> int:
        key = params.replace(seed=0)
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = len(self._params)
                self._params.append(key)
            return lane

    def _lane_params(self, lane: int) -> SamplingParams:
        with self._lock:
            return self._params[lane]

    def engine_in_flight(self) -> int:
        """Samples in the engine now (all lanes)."""
        loop = self._current
        return 0 if loop is None else loop.in_flight

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ttscale-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        done = job.done

        def finished(out: Outcome | BaseException) -> None:
            with self._lock:
                self._live_jobs.pop(id(job), None)
            done(out)

        job.done = finished
        with self._lock:
            self._live_jobs[id(job)] = job
        self.inbox.put(job)

    def _fail_live(self, error: BaseException) -> None:
        with self._lock:
            jobs = [j for j in self._live_jobs.values() if j.handle >= 0]
        for j in jobs:
            if not j.cancelled:
                j.done(error)

    def cancel(self, job: Job) -> None:
        with self._lock:
            self._live_jobs.pop(id(job), None)
        self.inbox.cancel(job)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.inbox.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping:
            loop = self._current = _CountingLoop(LaneLoop(self.engine, self._lane_params), self)
            sched: Scheduler[None] = Scheduler(
                self.session, self.base, max_sequences=self.max_sequences, loop=loop
            )
            try:
                for _ in sched.run(self.inbox):
                    pass
                return
            except Exception as e:
                # an engine failure fails the requests in flight (their programs are gone);
                # the server goes on with a fresh scheduler
                log.exception("the engine failed; requests in flight are failed")
                self._fail_live(e)
            finally:
                loop.close()


class _CountingLoop:
    """Counts polls and the samples in the engine at each poll (the mean batch size)."""

    def __init__(self, inner: LaneLoop, worker: Worker) -> None:
        self.inner = inner
        self.worker = worker

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> int:
        return self.inner.submit(request, on_token)

    def poll(self, on_result: LoopResult) -> None:
        self.worker.polls += 1
        self.worker.batch_samples += self.inner.in_flight
        self.inner.poll(on_result)

    def abort(self, ticket: int) -> int:
        return self.inner.abort(ticket)

    def close(self) -> None:
        self.inner.close()

