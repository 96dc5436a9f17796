"""The engine protocol: batch-first generation with per-sample seeds, declared capabilities
(token prefixes, scoring, streaming/abort, both log-probability modes) and the shared pieces
engines build on (the result collector, the chunked-generation fallback).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from ttscale.engines._text import find_stop
from ttscale.errors import ConfigError, EngineError
from ttscale.seeding import step_seed, substream_seed
from ttscale.types import Completion, FinishReason, SamplingParams

__all__ = [
    "CAPABILITY_NAMES",
    "LOGPROB_MODES",
    "Engine",
    "EngineCapabilities",
    "GenerationError",
    "GenerationRequest",
    "ResultCallback",
    "ResultCollector",
    "NextTokenScores",
    "ScoringEngine",
    "StreamingEngine",
    "TokenCallback",
    "TokenEvent",
    "TokenPrefixEngine",
    "capabilities_of",
    "check_request_support",
    "continuation_text",
    "generate_chunked",
    "require_capabilities",
    "score_next",
    "seed_runs",
]

#: ``on_result(position, completions)``: called by ``Engine.generate`` as soon as all samples of
#: ``requests[position]`` are done, before ``generate`` returns (or raises), so a caller can
#: store finished samples even if a later request fails.
ResultCallback = Callable[[int, list[Completion]], None]

#: The two log-probability modes, in vLLM's words: ``"raw_logprobs"`` is the model's untempered
#: distribution (the SMC *target*), ``"processed_logprobs"`` the distribution a token was drawn
#: from after ``min_tokens`` EOS suppression, temperature, min-p, top-k and top-p (the *proposal*).
LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")


# -- capabilities ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do beyond plain ``generate``; every engine has ``engine.capabilities``.

    * ``token_prefixes``: honours :attr:`GenerationRequest.prompt_token_ids` and
      :attr:`GenerationRequest.prefix_token_ids` *exactly* (the model conditions on those ids, never
      on a re-tokenisation of their text), fills :attr:`Completion.prompt_token_ids`, and has
      ``decode(token_ids) -> str`` (:class:`TokenPrefixEngine`).
    * ``scoring``: has ``score(requests, continuations)`` (:class:`ScoringEngine`).
    * ``streaming``: ``generate`` takes ``on_token=`` (:class:`StreamingEngine`): every generated
      token of every trace is handed to the callback as it is generated, and the callback can
      abort that one trace without touching the others.
    * ``logprob_modes``: the modes a completion carries when ``params.logprobs is not None``:
      ``"raw_logprobs"`` fills :attr:`Completion.target_logprobs`, ``"processed_logprobs"``
      fills :attr:`Completion.proposal_logprobs` (an engine declaring both returns both in the
      same call, which SMC weights need). Empty: neither is filled (``token_logprobs`` still is).

    The default (all off) is what an engine that predates capabilities gets from
    :func:`capabilities_of`.
    """

    token_prefixes: bool = False
    scoring: bool = False
    streaming: bool = False
    logprob_modes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        modes = frozenset(self.logprob_modes)
        bad = sorted(modes - set(LOGPROB_MODES))
        if bad:
            raise ConfigError(f"unknown logprob modes {bad}; known: {list(LOGPROB_MODES)}")
        object.__setattr__(self, "logprob_modes", modes)

    def has(self, name: str) -> bool:
        """Whether capability ``name`` (one of :data:`CAPABILITY_NAMES`) is declared."""
        if name in LOGPROB_MODES:
            return name in self.logprob_modes
        if name not in CAPABILITY_NAMES:
            raise ConfigError(
                f"unknown engine capability {name!r}; known: {list(CAPABILITY_NAMES)}"
            )
        return bool(getattr(self, name))

    def names(self) -> list[str]:
        """The declared capabilities, as :data:`CAPABILITY_NAMES` entries (for manifests)."""
        return [n for n in CAPABILITY_NAMES if self.has(n)]


#: Capability names accepted by :func:`require_capabilities` and ``EngineCapabilities.has``,
#: with what each means (used in error messages) and the bundled engines that have it.
_CAPABILITY_INFO: dict[str, tuple[str, tuple[str, ...]]] = {
    "token_prefixes": ("continue exactly from token ids", ("hf", "vllm", "scripted", "openai (token_prompts=True)")),
    "scoring": ("score a given continuation", ("hf", "vllm", "scripted", "openai (token_prompts=True)")),
    "streaming": ("stream tokens and abort one trace", ("hf", "vllm", "scripted", "openai")),
    "raw_logprobs": ("return target (raw) log-probabilities", ("hf", "vllm", "scripted", "openai")),
    "processed_logprobs": ("return proposal (processed) log-probabilities", ("hf", "scripted", "vllm (logprobs_mode='processed_logprobs')")),
}
CAPABILITY_NAMES: tuple[str, ...] = tuple(_CAPABILITY_INFO)


def capabilities_of(engine: Any) -> EngineCapabilities:
    """``engine.capabilities``, or no capabilities for an engine that declares none."""
    caps = getattr(engine, "capabilities", None)
    if caps is None:
        return EngineCapabilities()
    if not isinstance(caps, EngineCapabilities):
        raise ConfigError(
            f"engine {getattr(engine, 'name', type(engine).__name__)!r}: capabilities must be an "
            f"EngineCapabilities, got {type(caps).__name__}"
        )
    return caps


def require_capabilities(engine: Any, *needed: str, by: str) -> None:
    """For samplers, at construction: raise a one-line :class:`ConfigError` unless ``engine``
    declares every capability in ``needed`` (names from :data:`CAPABILITY_NAMES`).

    The message names the sampler (``by``), the first missing capability, what it means and the
    bundled engines that have it, e.g. ``SMCSampler needs an engine that can score a given
    continuation (capability 'scoring'); engine 'openai' does not declare it; use the hf, vllm or
    scripted engine``.
    """
    caps = capabilities_of(engine)
    for name in needed:
        if name not in _CAPABILITY_INFO:
            raise ConfigError(
                f"unknown engine capability {name!r}; known: {list(CAPABILITY_NAMES)}"
            )
        if caps.has(name):
            continue
        what, engines = _CAPABILITY_INFO[name]
        label = getattr(engine, "name", type(engine).__name__)
        choices = ", ".join(engines[:-1]) + (" or " if len(engines) > 1 else "") + engines[-1]
        raise ConfigError(
            f"{by} needs an engine that can {what} (capability {name!r}); engine {label!r} "
            f"does not declare it; use the {choices} engine"
        )


def check_request_support(engine: Any, requests: Sequence[GenerationRequest]) -> None:
    """For engines, at the top of ``generate``/``score``: a one-line :class:`ConfigError` for a
    request the engine cannot honour exactly (token ids without capability ``token_prefixes``),
    instead of a silently different context."""
    if capabilities_of(engine).token_prefixes:
        return
    for req in requests:
        if req.has_token_ids:
            label = getattr(engine, "name", type(engine).__name__)
            raise ConfigError(
                f"engine {label!r} cannot continue from token ids (request for "
                f"{req.problem_id!r}); use the hf, vllm or scripted engine, or a text prefix"
            )


# -- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """Ask for samples ``indices`` of one problem (``step`` of a step-wise sampler).

    The context the model conditions on is built from, in order:

    1. exactly one of ``prompt`` (raw text, tokenised with the tokenizer's special tokens, as vLLM
       does), ``messages`` (chat messages; the engine applies the model's chat template) and
       ``prompt_token_ids`` (the prompt already tokenised, e.g. a previous completion's
       :attr:`Completion.prompt_token_ids`; needs capability ``token_prefixes``);
    2. ``prefix``: text already generated for this sample, appended to the prompt *text* before
       tokenisation (so it may be re-tokenised differently from how it was generated);
    3. ``prefix_token_ids``: tokens already generated for this sample, appended *as ids* (the
       exact tokens a previous call returned; needs ``token_prefixes``). An engine without that
       capability raises :class:`ConfigError` for a request that has token ids.

    The returned completion holds only the new text, tokens and log-probabilities. With
    ``prefix_token_ids`` its ``text`` is :func:`continuation_text`: what the new tokens add to the
    decoded prefix, so the texts of successive calls concatenate to the text of the whole trace.
    ``seeds`` overrides the derived per-sample seeds, which are
    ``step_seed(params.seed, problem_id, index, step)`` (step 0 is today's ``sample_seed``).
    ``max_tokens``: this request's token cap in place of ``params.max_tokens`` (a step-wise
    sampler's particles near their length limit share one call with the others).
    ``stream_interval``: with ``on_token``, the engine may hand this request's tokens over in
    chunks of up to this many (vLLM's per-request ``stream_interval``: fewer outputs and
    callbacks per token). Every token still gets its own event, in order; a trace aborted inside
    a chunk ends at the aborting token as always, and the rest of the chunk (generated, never
    seen by the caller) is counted in its :attr:`Completion.discarded_tokens`. Engines that
    stream token by token ignore it.
    """

    problem_id: str
    prompt: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    prefix: str = ""
    indices: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    prompt_token_ids: tuple[int, ...] | None = None
    prefix_token_ids: tuple[int, ...] = ()
    step: int = 0
    max_tokens: int | None = None
    stream_interval: int = 1

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids))
        if given != 1:
            raise ConfigError(
                "a GenerationRequest needs exactly one of prompt=, messages= and prompt_token_ids="
            )
        if self.prompt_token_ids is not None:
            ids = tuple(int(t) for t in self.prompt_token_ids)
            if not ids:
                raise ConfigError(f"prompt_token_ids of {self.problem_id!r} is empty")
            object.__setattr__(self, "prompt_token_ids", ids)
        object.__setattr__(self, "prefix_token_ids", tuple(int(t) for t in self.prefix_token_ids))
        if any(t < 0 for t in (self.prompt_token_ids or ())) or any(
            t < 0 for t in self.prefix_token_ids
        ):
            raise ConfigError(f"token ids must be >= 0 (request for {self.problem_id!r})")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ConfigError(f"step must be an int >= 0, got {self.step!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ConfigError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if (
            isinstance(self.stream_interval, bool)
            or not isinstance(self.stream_interval, int)
            or self.stream_interval < 1
        ):
            raise ConfigError(f"stream_interval must be an int >= 1, got {self.stream_interval!r}")
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

    @property
    def has_token_ids(self) -> bool:
        """Whether the request needs capability ``token_prefixes``."""
        return self.prompt_token_ids is not None or bool(self.prefix_token_ids)

    def params_for(self, params: SamplingParams) -> SamplingParams:
        """``params`` with this request's ``max_tokens``, if it has one."""
        if self.max_tokens is None or self.max_tokens == params.max_tokens:
            return params
        return params.replace(max_tokens=self.max_tokens)

    def seed_for(self, position: int, params: SamplingParams) -> int:
        """The seed of the ``position``-th requested sample."""
        if self.seeds is not None:
            return self.seeds[position]
        return step_seed(params.seed, self.problem_id, self.indices[position], self.step)


# -- streaming -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one trace, handed to an ``on_token`` callback.

    ``request``/``slot``: the trace is sample ``requests[request].indices[slot]`` (= ``index``).
    ``token_id`` is its ``num_tokens``-th generated token (1-based count, over the whole trace:
    in :func:`generate_chunked` it counts every chunk, never the request's own prefix).
    ``logprob`` is that token's log-probability in the engine's ``logprob_mode`` (``None`` when
    ``params.logprobs is None``), ``top`` its top alternatives when ``params.logprobs > 0``.
    ``finished`` is true when the engine's own rules (EOS, stop string, ``max_tokens``) end the
    trace at this token; the callback's answer is then ignored.
    """

    request: int
    slot: int
    index: int
    token_id: int
    num_tokens: int
    logprob: float | None = None
    top: Mapping[int, float] | None = None
    finished: bool = False


#: ``on_token(event) -> abort?``: called once per generated token of every trace, in generation
#: order per trace, on the caller's thread, before ``on_result`` for that trace's request.
#: Returning ``True`` aborts *that trace only*: its completion ends with this token (kept in
#: ``token_ids``, text and log-probabilities), ``finish_reason == "abort"``, and no further
#: callback is made for it; every other trace of the batch continues exactly as if nothing had
#: happened (same tokens, same seeds). ``None``/``False`` continues. A request with
#: ``stream_interval`` > 1 may arrive in chunks: the events of a chunk come one by one as before,
#: and the tokens of the chunk after an aborting one were generated anyway (``discarded_tokens``).
TokenCallback = Callable[[TokenEvent], bool | None]


# -- result bookkeeping ----------------------------------------------------------------------------


class ResultCollector:
    """Per-request result slots, ``on_result`` and partial failures: the bookkeeping every engine
    needs, in one place.

    An engine creates one per ``generate`` call, calls :meth:`put` once per finished sample (in
    any order, from the caller's thread), and returns :meth:`results`; on an error it raises
    :meth:`failure`. As soon as every sample of request ``pos`` is in, ``on_result(pos,
    completions)`` is called (once, completions in ``indices`` order) and the request counts as
    finished, so a failure later keeps it (``GenerationError.results``) and keeps the finished
    samples of unfinished requests (``GenerationError.partial``).
    """

    def __init__(
        self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None
    ) -> None:
        self.requests = list(requests)
        self.on_result = on_result
        self._slots: list[list[Completion | None]] = [[None] * len(r.indices) for r in requests]
        self._remaining = [len(r.indices) for r in requests]
        self._results: list[list[Completion] | None] = [None] * len(requests)

    def put(self, position: int, slot: int, completion: Completion) -> None:
        """Store the sample ``requests[position].indices[slot]``; a slot is filled only once."""
        row = self._slots[position]
        if row[slot] is not None:
            raise EngineError(f"sample {slot} of request {position} was delivered twice")
        want = self.requests[position].indices[slot]
        if completion.index != want:
            raise EngineError(
                f"request {position} slot {slot} expects sample {want}, got {completion.index}"
            )
        row[slot] = completion
        self._remaining[position] -= 1
        if self._remaining[position] == 0:
            comps = [c for c in row if c is not None]
            self._results[position] = comps
            if self.on_result is not None:
                self.on_result(position, comps)

    def put_many(self, position: int, start: int, completions: Sequence[Completion]) -> None:
        """:meth:`put` for consecutive slots ``start, start + 1, ...``."""
        for j, c in enumerate(completions):
            self.put(position, start + j, c)

    def is_finished(self, position: int) -> bool:
        return self._results[position] is not None

    @property
    def done(self) -> bool:
        """Every request finished."""
        return all(r is not None for r in self._results)

    def results(self) -> list[list[Completion]]:
        """One list per request, in request order; :class:`EngineError` if any is missing."""
        missing = [i for i, r in enumerate(self._results) if r is None]
        if missing:
            raise EngineError(f"no result for requests {missing[:5]} ({len(missing)} missing)")
        return [r for r in self._results if r is not None]

    def failure(self, engine: str, error: BaseException) -> GenerationError:
        """The :class:`GenerationError` to raise (``from error``) when the batch fails part-way."""
        return generation_failure(engine, error, self._results, self._slots)


# -- protocols -------------------------------------------------------------------------------------


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
    that did complete and ``partial`` the finished samples of those that did not
    (:class:`ResultCollector` does this bookkeeping).

    ``capabilities`` (:class:`EngineCapabilities`) declares the optional parts; an engine that
    declares a capability implements the matching protocol (:class:`TokenPrefixEngine`,
    :class:`ScoringEngine`, :class:`StreamingEngine`) and ``check_engine`` tests it. Samplers
    check what they need with :func:`require_capabilities` (engines without the attribute are
    read as declaring nothing, by :func:`capabilities_of`), so ``capabilities`` is optional and
    not part of the structural check: an engine written before capabilities is still an Engine.
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


@runtime_checkable
class TokenPrefixEngine(Engine, Protocol):
    """Capability ``token_prefixes``: requests with ``prompt_token_ids``/``prefix_token_ids``.

    ``decode(token_ids)`` is the text of generated token ids, special tokens skipped, exactly as
    the engine writes :attr:`Completion.text` for a trace made of those tokens (before stop-string
    trimming): ``decode(c.token_ids) == c.text`` for a completion that ended by EOS or length
    without a request prefix. Where decoding is prefix-stable, ``decode(a + b)`` starts with
    ``decode(a)``; :func:`continuation_text` handles the tokenizers where it is not.
    """

    def decode(self, token_ids: Sequence[int]) -> str: ...


@runtime_checkable
class ScoringEngine(Engine, Protocol):
    """Capability ``scoring``.

    ``score(requests, continuations)[i][t]`` is ``log p(continuations[i][t] | context_i,
    continuations[i][:t])`` under the model's raw, untempered distribution (natural log,
    float), where ``context_i`` is the context ``requests[i]`` would generate after (prompt,
    prefix, ``prefix_token_ids``; its ``indices``, ``seeds`` and ``step`` are ignored). Batched:
    one result per request, in order, each as long as its continuation (an empty continuation
    gives ``()``); EOS and other special ids in a continuation are scored like any token. Contract
    (checked by ``check_engine``): scoring the ``token_ids`` of a completion returns its
    ``target_logprobs`` (or its ``token_logprobs`` in ``raw_logprobs`` mode) within 1e-4 in
    float32 on CPU. Raises :class:`ConfigError` for token ids outside the vocabulary or
    ``len(requests) != len(continuations)``.
    """

    def score(
        self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, ...]]: ...


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """Capability ``streaming``: ``generate(..., on_token=callback)`` (see :data:`TokenCallback`).

    ``on_token`` is called for every generated token of every trace, as it is generated;
    returning ``True`` aborts that one trace (``finish_reason == "abort"``, the token kept) and
    leaves every other trace exactly as it would have been. With ``on_token=None`` the call is an
    ordinary ``generate``. An engine without this capability has no ``on_token`` parameter:
    callers use :func:`generate_chunked` instead (which needs ``token_prefixes``).
    """

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[list[Completion]]: ...


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


# -- next-token scoring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NextTokenScores:
    """Log-probabilities of candidate next tokens after one request's context.

    ``logprobs[j]`` is ``log p(token_ids[j] | context)`` (raw, as :meth:`ScoringEngine.score`);
    ``context_tokens`` is how many context tokens the engine ran through to score them (the
    context's length once per scoring pass: once where the engine gives the whole next-token
    distribution in one pass, once per candidate where it scores one continuation at a time), so a
    caller can account for the compute scoring took; ``None`` where the engine cannot say.
    """

    logprobs: tuple[float, ...]
    context_tokens: int | None  # None: the engine cannot say how it tokenised the context


def score_next(
    engine: Any, requests: Sequence[GenerationRequest], token_ids: Sequence[int]
) -> list[NextTokenScores]:
    """The log-probabilities of each of ``token_ids`` as the next token after each request's
    context (self-evaluation "Yes"/"No", judges), one result per request.

    An engine with a ``score_next(requests, token_ids)`` method (the same signature, one pass per
    context: the scripted and hf engines) answers in one pass per request; any other scoring
    engine is asked ``score`` once, batched, with one single-token continuation per (request,
    candidate) -- the same values, at one context pass per candidate."""
    cands = [int(t) for t in token_ids]
    native = getattr(engine, "score_next", None)
    if callable(native):
        return list(native(requests, cands))
    if not isinstance(engine, ScoringEngine):
        raise ConfigError(f"engine {getattr(engine, 'name', '?')!r} cannot score tokens")
    flat = [r for r in requests for _ in cands]
    values = engine.score(flat, [[t] for _ in requests for t in cands]) if cands else []
    counter = getattr(engine, "prompt_token_ids", None)
    out = []
    for i, req in enumerate(requests):
        lps = tuple(v[0] for v in values[i * len(cands) : (i + 1) * len(cands)])
        n_ctx = len(counter(req)) * len(cands) if callable(counter) else None
        out.append(NextTokenScores(lps, n_ctx))
    return out


# -- text of token continuations -----------------------------------------------------------------


#: how many prefix tokens :func:`continuation_text` decodes before the new ones
CONTINUATION_WINDOW = 16


def continuation_text(
    decode: Callable[[Sequence[int]], str],
    prefix_ids: Sequence[int],
    new_ids: Sequence[int],
    *,
    window: int = CONTINUATION_WINDOW,
    head: str | None = None,
) -> str:
    """The text ``new_ids`` add after ``prefix_ids``: ``decode(tail + new)`` minus
    ``decode(tail)``, ``tail`` being the last ``window`` prefix tokens (a decoder looks only a
    few tokens back: a word's leading space, an unfinished multi-byte character), so that texts
    of successive continuations concatenate to the text of the whole trace. If ``decode(tail)``
    ends in an unfinished character (``\ufffd``) that ``new_ids`` complete, the completed
    character belongs to the new text. Falls back to ``decode(new)`` when the decoded tail is not
    a prefix of the whole. ``head``: ``decode(tail)`` if the caller has it already (a decoding
    loop asks again at every token of a row, with the same prefix).
    """
    if not prefix_ids:
        return decode(new_ids)
    if not new_ids:
        return ""
    tail = list(prefix_ids[-window:])
    if head is None:
        head = decode(tail)
    full = decode([*tail, *new_ids])
    if full.startswith(head):
        return full[len(head) :]
    stable = head.rstrip("\ufffd")
    if full.startswith(stable):
        return full[len(stable) :]
    return decode(new_ids)


# -- chunked generation: the fallback for streaming/abort ------------------------------------------


@dataclass
class _Trace:
    """One sample being generated chunk by chunk."""

    pos: int
    slot: int
    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    target: list[float] | None = field(default_factory=list)
    proposal: list[float] | None = field(default_factory=list)
    tops: list[dict[int, float]] | None = field(default_factory=list)
    discarded: int = 0
    checked: int = 0  # characters of the text already searched for stop strings
    first: Completion | None = None


def _extend(acc: list[Any] | None, part: Sequence[Any] | None) -> list[Any] | None:
    if acc is None or part is None:
        return None
    acc.extend(part)
    return acc


def generate_chunked(
    engine: Engine,
    requests: Sequence[GenerationRequest],
    params: SamplingParams,
    *,
    chunk_tokens: int,
    on_result: ResultCallback | None = None,
    on_token: TokenCallback | None = None,
) -> list[list[Completion]]:
    """Streaming and abort for any engine with capability ``token_prefixes``: generate in chunks
    of at most ``chunk_tokens`` tokens, each continuing from the exact tokens generated so far.

    Same return value, ``on_result`` and :class:`GenerationError` contract as
    ``Engine.generate``; ``on_token`` as for a streaming engine (:data:`TokenCallback`), except
    that tokens arrive a chunk at a time. Semantics, equal to one unchunked call's:

    * a chunk boundary is not a ``length`` finish: a trace ends with ``length`` only after
      ``params.max_tokens`` tokens in all, with ``stop`` at EOS or a stop string, with ``abort``
      when ``on_token`` asks;
    * stop strings are searched in the text of the whole trace (:func:`continuation_text` over
      the request's ``prefix_token_ids``), so one that spans two chunks is found; the trace ends at
      the token that completes it (text trimmed as ``include_stop_str_in_output`` says, tokens
      after it dropped and counted in ``discarded_tokens``);
    * ``min_tokens`` counts the whole trace: each chunk gets ``min_tokens`` minus the tokens
      already generated, and stop strings count only from the ``min_tokens``-th token on.

    Seeds: chunk ``k`` of a sample whose seed is ``s`` (``request.seed_for``) is drawn with
    ``substream_seed(s, k)``, so a chunked run is reproducible (but not token-identical to an
    unchunked one, whose random stream does not restart). The completion reports ``seed=s``,
    the first chunk's ``prompt_token_ids``, and in ``discarded_tokens`` the tokens generated after
    an abort or a stop string in the same chunk.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    if any(r.max_tokens is not None for r in requests):
        raise ConfigError(
            "chunked generation takes one token cap per call (params.max_tokens); "
            "drop the requests' own max_tokens"
        )
    require_capabilities(engine, "token_prefixes", by="chunked generation")
    decode = engine.decode if isinstance(engine, TokenPrefixEngine) else None
    if decode is None:
        raise ConfigError(
            f"engine {engine.name!r} declares token_prefixes but has no decode(token_ids) method"
        )
    collector = ResultCollector(requests, on_result)
    live = [
        _Trace(pos, j, idx, req.seed_for(j, params))
        for pos, req in enumerate(requests)
        for j, idx in enumerate(req.indices)
    ]
    want_lp = params.logprobs is not None
    generated = 0
    chunk = 0
    try:
        while live:
            max_t = min(chunk_tokens, params.max_tokens - generated)
            sub_params = params.replace(
                n=1,
                max_tokens=max_t,
                min_tokens=min(max(0, params.min_tokens - generated), max_t),
                stop=(),
                include_stop_str_in_output=False,
            )
            sub_requests = [
                _replace_request(
                    requests[tr.pos],
                    prefix_token_ids=requests[tr.pos].prefix_token_ids + tuple(tr.tokens),
                    indices=(tr.index,),
                    seeds=(substream_seed(tr.seed, chunk),),
                )
                for tr in live
            ]
            outs = engine.generate(sub_requests, sub_params)
            if len(outs) != len(live) or any(len(o) != 1 for o in outs):
                raise EngineError(f"engine {engine.name!r} returned the wrong number of samples")
            still: list[_Trace] = []
            for tr, (comp,) in zip(live, outs, strict=True):
                if comp.token_ids is None:
                    raise EngineError(f"engine {engine.name!r} returned no token ids")
                if comp.finish_reason == FinishReason.LENGTH.value and comp.num_tokens != max_t:
                    raise EngineError(
                        f"engine {engine.name!r} ended a chunk of {max_t} tokens with 'length' "
                        f"after {comp.num_tokens}"
                    )
                done = _absorb_chunk(
                    tr, comp, requests[tr.pos], params, decode, want_lp, on_token, collector
                )
                if not done:
                    still.append(tr)
            live = still
            generated += max_t
            chunk += 1
    except ConfigError:
        raise
    except Exception as e:
        raise collector.failure(f"chunked {engine.name}", e) from e
    return collector.results()


def _replace_request(req: GenerationRequest, **changes: Any) -> GenerationRequest:
    return replace(req, **changes)


def _absorb_chunk(
    tr: _Trace,
    comp: Completion,
    req: GenerationRequest,
    params: SamplingParams,
    decode: Callable[[Sequence[int]], str],
    want_lp: bool,
    on_token: TokenCallback | None,
    collector: ResultCollector,
) -> bool:
    """Add one chunk to a trace; deliver the trace if it ended. Returns whether it ended."""
    assert comp.token_ids is not None
    if tr.first is None:
        tr.first = comp
    n_prev = len(tr.tokens)
    new = list(comp.token_ids)
    tr.tokens.extend(new)
    tr.logprobs = _extend(tr.logprobs, comp.token_logprobs if want_lp else None)
    tr.target = _extend(tr.target, comp.target_logprobs if want_lp else None)
    tr.proposal = _extend(tr.proposal, comp.proposal_logprobs if want_lp else None)
    tr.tops = _extend(tr.tops, comp.top_logprobs if want_lp and params.logprobs else None)
    tr.discarded += comp.discarded_tokens

    def text_of(t: int) -> str:
        return continuation_text(decode, req.prefix_token_ids, tr.tokens[:t])

    # where the trace ends in this chunk (a token count), and why
    end, finish, stop_reason = len(tr.tokens), "", None
    if comp.finish_reason != FinishReason.LENGTH.value:
        finish = comp.finish_reason  # EOS (stop) or the engine's own abort
    elif len(tr.tokens) >= params.max_tokens:
        finish = FinishReason.LENGTH.value
    trimmed: str | None = None
    lo = max(n_prev, params.min_tokens)
    if params.stop and len(tr.tokens) > lo:
        base = len(text_of(params.min_tokens)) if params.min_tokens else 0
        start = max(base, tr.checked)
        full = text_of(len(tr.tokens))
        if find_stop(full, params.stop, start) is not None:
            # the first token count whose text holds a stop string (monotone in the count)
            a, b = lo, len(tr.tokens)  # no hit at a (or a is before min_tokens), hit at b
            while b - a > 1:
                mid = (a + b) // 2
                if find_stop(text_of(mid), params.stop, start) is not None:
                    b = mid
                else:
                    a = mid
            text_b = text_of(b)
            hit = find_stop(text_b, params.stop, start)
            assert hit is not None
            end, finish, stop_reason = b, FinishReason.STOP.value, hit[1]
            keep = hit[0] + (len(hit[1]) if params.include_stop_str_in_output else 0)
            trimmed = text_b[:keep]
        else:
            tr.checked = len(full.rstrip("\ufffd"))
    if on_token is not None:
        for t in range(n_prev, end):
            last = t + 1 == end and bool(finish)
            event = TokenEvent(
                request=tr.pos,
                slot=tr.slot,
                index=tr.index,
                token_id=tr.tokens[t],
                num_tokens=t + 1,
                logprob=tr.logprobs[t] if tr.logprobs is not None and want_lp else None,
                top=tr.tops[t] if tr.tops else None,
                finished=last,
            )
            if on_token(event) and not last:
                end, finish, stop_reason, trimmed = t + 1, FinishReason.ABORT.value, None, None
                break
    if not finish:
        return False
    tr.discarded += len(tr.tokens) - end
    del tr.tokens[end:]
    for acc in (tr.logprobs, tr.target, tr.proposal, tr.tops):
        if acc is not None:
            del acc[end:]
    first = tr.first
    collector.put(
        tr.pos,
        tr.slot,
        Completion(
            problem_id=req.problem_id,
            index=tr.index,
            text=trimmed if trimmed is not None else text_of(end),
            token_ids=tuple(tr.tokens),
            token_logprobs=tuple(tr.logprobs) if want_lp and tr.logprobs is not None else None,
            top_logprobs=tuple(tr.tops) if want_lp and params.logprobs and tr.tops else None,
            cumulative_logprob=(
                math.fsum(tr.logprobs) if want_lp and tr.logprobs is not None else None
            ),
            num_tokens=end,
            finish_reason=finish,
            seed=tr.seed,
            prompt_tokens=first.prompt_tokens,
            stop_reason=stop_reason,
            prompt_token_ids=first.prompt_token_ids,
            target_logprobs=tuple(tr.target) if want_lp and tr.target is not None else None,
            proposal_logprobs=tuple(tr.proposal) if want_lp and tr.proposal is not None else None,
            discarded_tokens=tr.discarded,
        ),
    )
    return True
