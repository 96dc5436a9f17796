"""Engines that take work continuously: ``submit`` a request, ``poll`` for finished ones,
``abort`` one that is no longer wanted.

:func:`open_loop` gives every engine this interface. An engine with a loop of its own has
``open_loop(params) -> EngineLoop`` (vLLM: requests go into the running ``LLMEngine`` as they
arrive and come back as they finish; HF: samples join one running batch between decoding steps
and leave it as they end; OpenAI: each request's HTTP calls go out as it arrives, within
``max_concurrency``, and it comes back when they have answered; Scripted: the same contract,
simulated token by token for tests); any other engine gets :class:`BatchLoop`, which coalesces
the requests submitted since the last poll into one ``generate`` call. The scheduler
(:mod:`ttscale.samplers.loop`) drives one loop for
all problems in flight.

Contract, checked for every bundled engine by the tests:

* ``submit(request, on_token=None) -> ticket``: queue one :class:`GenerationRequest` (seeds as
  in ``generate``: ``request.seed_for``), so a request's samples are the same whatever else is
  in flight and whenever it is submitted; ``on_token`` streams its tokens and may abort one of
  its traces, as ``generate(..., on_token=)`` does (:data:`~ttscale.engines.base.TokenCallback`;
  ``event.request`` is ``0``);
* ``poll(on_result)``: advance the engine until at least one submitted request has finished
  (nothing happens when none is in flight; a loop may take ``max_steps=K``, as vLLM's and
  Scripted's do, to return after K engine steps even if none finished, so a caller can act on
  cancels between steps; OpenAI's waits K x 5 ms) and call ``on_result(ticket, completions)`` for each
  finished one (completions in ``indices`` order, as ``generate`` returns them); a failure
  raises :class:`LoopFailure` after every finished request was handed over, carrying the
  finished samples of unfinished ones;
* ``abort(ticket) -> tokens``: forget a request at once (its engine slots are freed; it is never
  handed to ``on_result``) and return the tokens the engine generated for it so far, finished
  samples of it included, so a caller accounts for them (``0`` when it had not started);
* ``in_flight``: samples submitted and not yet finished or aborted; ``close()`` aborts them;
* optional: a loop that queues requests itself and can order that queue has ``priorities =
  True`` and takes ``submit(..., priority=int)`` (lower runs first, arrival order among equal
  ones; vLLM's ``priority`` scheduling policy; Scripted records it in ``started``); the
  scheduler passes it only to such loops (it orders its own queue the same way for all). A
  priority changes when a request runs, never its samples.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from ttscale.engines.base import (
    Engine,
    GenerationError,
    GenerationRequest,
    TokenCallback,
    TokenEvent,
    capabilities_of,
    generate_chunked,
)
from ttscale.types import Completion, SamplingParams

__all__ = ["BatchLoop", "EngineLoop", "LoopFailure", "LoopResult", "open_loop"]

log = logging.getLogger(__name__)

#: ``on_result(ticket, completions)``: a submitted request finished.
LoopResult = Callable[[int, list[Completion]], None]


class LoopFailure(GenerationError):
    """The engine failed inside :meth:`EngineLoop.poll`. Finished requests were handed to
    ``on_result`` before; ``by_ticket`` maps an unfinished request's ticket to its finished
    samples (valid samples a caller may store)."""

    def __init__(self, message: str, by_ticket: Mapping[int, list[Completion]]) -> None:
        super().__init__(message, [])
        self.by_ticket: dict[int, list[Completion]] = {
            int(k): list(v) for k, v in by_ticket.items() if v
        }


@runtime_checkable
class EngineLoop(Protocol):
    """One sampling-parameter setting's continuous generation (see the module docstring)."""

    @property
    def in_flight(self) -> int: ...

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> int: ...

    def poll(self, on_result: LoopResult) -> None: ...

    def abort(self, ticket: int) -> int: ...

    def close(self) -> None: ...


def open_loop(engine: Engine, params: SamplingParams) -> EngineLoop:
    """``engine.open_loop(params)`` where the engine has its own loop, else a :class:`BatchLoop`."""
    # looked up on the class: a wrapper that forwards attributes to an inner engine (a recorder,
    # a cache) must not have its own ``generate`` bypassed by the inner engine's loop
    if callable(getattr(type(engine), "open_loop", None)):
        loop = engine.open_loop(params)  # type: ignore[attr-defined]
        if not isinstance(loop, EngineLoop):
            raise TypeError(f"{type(engine).__name__}.open_loop returned {type(loop).__name__}")
        return loop
    return BatchLoop(engine, params)


def hand_over(
    done: Sequence[tuple[int, list[Completion]]],
    live: dict[int, Any],
    on_result: LoopResult,
) -> None:
    """Give each finished request (``(ticket, completions)``) to ``on_result`` and forget it,
    unless it was aborted meanwhile (no longer in ``live``): what every loop's ``poll`` ends
    with."""
    for t, comps in done:
        if live.pop(t, None) is not None:
            on_result(t, comps)


def completion_tokens(comps: Sequence[Completion]) -> int:
    """Tokens an engine generated for ``comps`` (discarded ones past a stop or abort included)."""
    return sum(c.num_tokens + c.discarded_tokens for c in comps)


class BatchLoop:
    """The fallback for engines that only have batch ``generate``: the requests submitted since
    the last poll go to the engine in one call, in submission order (so an engine that batches
    its calls, like HF, decodes them together). ``abort`` of a request not yet polled drops it
    (no tokens); a poll delivers every request of its call. Requests with ``on_token`` go in a
    call of their own: with the engine's ``on_token`` where it declares ``streaming`` and
    ``chunk_tokens`` is ``None``, else through :func:`~ttscale.engines.base.generate_chunked` in
    chunks of ``chunk_tokens`` (default 64)."""

    def __init__(
        self, engine: Engine, params: SamplingParams, *, chunk_tokens: int | None = None
    ) -> None:
        self.engine = engine
        self.params = params
        self.chunk_tokens = chunk_tokens
        self._ids = itertools.count()
        self._queue: dict[int, tuple[GenerationRequest, TokenCallback | None]] = {}

    @property
    def in_flight(self) -> int:
        return sum(len(r.indices) for r, _ in self._queue.values())

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> int:
        t = next(self._ids)
        self._queue[t] = (request, on_token)
        return t

    def poll(self, on_result: LoopResult) -> None:
        if not self._queue:
            return
        queue = dict(self._queue)
        self._queue.clear()
        plain = [t for t, (_, cb) in queue.items() if cb is None]
        streamed = [t for t, (_, cb) in queue.items() if cb is not None]
        for tickets in (plain, streamed):
            if tickets:
                self._call(tickets, [queue[t][0] for t in tickets], [queue[t][1] for t in tickets], on_result)

    def _call(
        self,
        tickets: list[int],
        reqs: list[GenerationRequest],
        callbacks: list[TokenCallback | None],
        on_result: LoopResult,
    ) -> None:
        delivered: set[int] = set()

        def cb(pos: int, comps: list[Completion]) -> None:
            if pos not in delivered:
                delivered.add(pos)
                on_result(tickets[pos], list(comps))

        def route(ev: TokenEvent) -> bool | None:
            f = callbacks[ev.request]
            return None if f is None else f(replace(ev, request=0))

        try:
            if callbacks[0] is None:
                results = self.engine.generate(reqs, self.params, on_result=cb)
            elif self.chunk_tokens is None and capabilities_of(self.engine).streaming:
                results = self.engine.generate(  # type: ignore[call-arg]
                    reqs, self.params, on_result=cb, on_token=route
                )
            else:
                results = generate_chunked(
                    self.engine, reqs, self.params, chunk_tokens=self.chunk_tokens or 64,
                    on_result=cb, on_token=route,
                )
        except GenerationError as e:
            for pos, comps in e.completed.items():
                cb(pos, comps)
            partial = {tickets[pos]: comps for pos, comps in e.partial.items()}
            raise LoopFailure(str(e), partial) from e
        for pos, comps in enumerate(results):
            cb(pos, comps)

    def abort(self, ticket: int) -> int:
        self._queue.pop(ticket, None)
        return 0

    def close(self) -> None:
        self._queue.clear()
