"""The engine protocol: batch-first generation with per-sample seeds and prefix continuation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ttscale.errors import ConfigError, EngineError
from ttscale.seeding import sample_seed
from ttscale.types import Completion, SamplingParams

__all__ = ["Engine", "GenerationError", "GenerationRequest", "ResultCallback", "seed_runs"]

#: ``on_result(position, completions)``: called by ``Engine.generate`` as soon as all samples of
#: ``requests[position]`` are done, before ``generate`` returns (or raises), so a caller can
#: store finished samples even if a later request fails.
ResultCallback = Callable[[int, list[Completion]], None]


@dataclass(frozen=True)
class GenerationRequest:
    """Ask for samples ``indices`` of one problem.

    Exactly one of ``prompt`` (raw text, sent as is) and ``messages`` (chat messages; the engine
    applies the model's chat template) is given. ``prefix`` is text already generated for this
    sample (SMC steps, chunked generation): generation continues after ``prompt + prefix`` and the
    returned completion holds only the new text, tokens and log-probabilities. ``seeds`` overrides
    the derived per-sample seeds (``sample_seed(params.seed, problem_id, index)``).
    """

    problem_id: str
    prompt: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    prefix: str = ""
    indices: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ConfigError("a GenerationRequest needs exactly one of prompt= and messages=")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        if not self.indices:
            raise ConfigError("a GenerationRequest needs at least one sample index")
        if len(set(self.indices)) != len(self.indices):
            raise ConfigError(f"duplicate sample indices in request for {self.problem_id!r}")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
            if len(self.seeds) != len(self.indices):
                raise ConfigError(
                    f"seeds has {len(self.seeds)} entries but indices has {len(self.indices)}"
                )

    def seed_for(self, position: int, params: SamplingParams) -> int:
        """The seed of the ``position``-th requested sample."""
        if self.seeds is not None:
            return self.seeds[position]
        return sample_seed(params.seed, self.problem_id, self.indices[position])


@runtime_checkable
class Engine(Protocol):
    """What every engine provides. ``ttscale.testing.check_engine`` checks the contract.

    ``generate`` returns one list per request, in request order, each with one
    :class:`Completion` per requested index, in the order of ``request.indices``.
    Log-probabilities are natural logs of generated tokens only. ``params.n`` is ignored: the
    request's ``indices`` say which samples to draw. Completed samples are never lost to a later
    failure: ``on_result(position, completions)`` (optional keyword) is called once per request,
    as soon as that request's samples are all done (the bundled engines call it on the caller's
    thread), and a failure raises :class:`GenerationError` whose ``results`` holds every request
    that did complete and ``partial`` the finished samples of those that did not.
    """

    name: str

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
    ) -> list[list[Completion]]: ...

    def info(self) -> dict[str, Any]:
        """Provenance for the run manifest: engine, version, model, logprob_mode, ..."""
        ...

    def close(self) -> None: ...


class GenerationError(EngineError):
    """``generate`` failed part-way; ``results[i]`` is request ``i``'s completions or ``None``.

    Requests with results were also handed to ``on_result`` before this was raised. ``partial``
    maps the position of a request that did *not* complete to the samples of it that did (in
    request order; valid samples a caller may store). The underlying exception is chained as
    ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        results: Sequence[list[Completion] | None],
        partial: Mapping[int, list[Completion]] | None = None,
    ) -> None:
        super().__init__(message)
        self.results: list[list[Completion] | None] = list(results)
        self.partial: dict[int, list[Completion]] = {
            int(k): list(v) for k, v in (partial or {}).items() if v and self.results[k] is None
        }

    @property
    def completed(self) -> dict[int, list[Completion]]:
        """Request position -> completions, for the requests that finished."""
        return {i: r for i, r in enumerate(self.results) if r is not None}


def partial_from_slots(
    slots: Sequence[Sequence[Completion | None]], results: Sequence[list[Completion] | None]
) -> dict[int, list[Completion]]:
    """For engines: the finished samples of unfinished requests (``GenerationError.partial``)."""
    return {
        pos: [c for c in row if c is not None]
        for pos, row in enumerate(slots)
        if results[pos] is None and any(c is not None for c in row)
    }


def generation_failure(
    engine: str,
    error: BaseException,
    results: Sequence[list[Completion] | None],
    slots: Sequence[Sequence[Completion | None]],
) -> GenerationError:
    """For engines: the :class:`GenerationError` to raise when a batch fails part-way.

    It carries every finished request (``results``) and the finished samples of unfinished ones
    (``partial``), so a caller can store them before handling the error.
    """
    done = sum(r is not None for r in results)
    return GenerationError(
        f"{engine} generation failed after {done}/{len(results)} requests: {error}",
        list(results),
        partial_from_slots(slots, results),
    )


def seed_runs(seeds: Sequence[int]) -> list[tuple[int, int]]:
    """Split positions into maximal runs of consecutive seeds: ``[(start, length), ...]``.

    An engine whose ``n``-fan-out seeds child ``j`` with ``seed + j`` (vLLM) draws each run in one
    request. ``seed_runs([5, 6, 7, 2, 3, 9]) == [(0, 3), (3, 2), (5, 1)]``.
    """
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            runs.append((start, i - start))
            start = i
    return runs
