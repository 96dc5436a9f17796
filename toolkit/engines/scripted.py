"""A deterministic, dependency-free engine for tests (the engine analogue of httpx's MockTransport).

Two modes:

* **scripted** (``responses=`` a callable or a table): the text of each sample is whatever the
  script says; tokens are characters (``token_id = ord(char)``) and log-probabilities are
  deterministic functions of ``(seed, position, char)``, self-consistent (top alternatives sum to
  at most 1, the sampled token is among them, cumulative = sum).
* **toy language model** (no ``responses``): a character-level model whose next-character
  distribution is a fixed pseudo-random function of the last ``order`` characters of the context.
  Sampling is real (temperature, top-k, top-p, min-p in vLLM's order, per-sample seeds, EOS), so
  seeds, greedy decoding, prefix continuation and raw/processed log-probabilities behave exactly
  like a real engine's, at microseconds per token.

Capabilities (:class:`~ttscale.engines.base.EngineCapabilities`): both modes honour token prefixes
exactly (a token is a character) and stream with per-trace abort (``on_token``); the toy model
also scores continuations exactly and returns both target (raw) and proposal (processed)
log-probabilities. Scripted texts have no model behind them, so they neither score nor carry
target/proposal log-probabilities.

``fail_after=K`` raises :class:`~ttscale.engines.base.GenerationError` once ``K`` samples have
been produced over the engine's lifetime (after handing finished requests to ``on_result``), to
test that samplers keep completed work.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ttscale.engines._text import find_stop, render_plain_chat
from ttscale.engines.base import (
    EngineCapabilities,
    GenerationRequest,
    NextTokenScores,
    ResultCallback,
    ResultCollector,
    TokenCallback,
    TokenEvent,
)
from ttscale.errors import ConfigError, EngineError
from ttscale.types import Completion, FinishReason, SamplingParams
from ttscale.validation import check_choice, check_int

__all__ = ["EOS_TOKEN_ID", "Responder", "ScriptedEngine", "process_logprobs"]

#: ``(request, index, seed, params) -> text``: the continuation of ``prompt + request.prefix``.
Responder = Callable[[GenerationRequest, int, int, SamplingParams], str]

#: Token id of end-of-sequence in both modes (characters are ``ord(c)``, never 0 in text).
EOS_TOKEN_ID = 0

_DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,0123456789"
_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")


def process_logprobs(
    logprobs: np.ndarray, params: SamplingParams, *, suppress: Sequence[int] = ()
) -> np.ndarray:
    """Sampling distribution in log space, shape ``(V,)`` float64, ``-inf`` where removed.

    vLLM's order: ``suppress`` (e.g. EOS before ``min_tokens``) -> temperature -> min-p ->
    top-k -> top-p, renormalising after each filter. ``temperature == 0`` gives a one-hot on the
    argmax (ties to the lowest id).
    """
    lp = np.array(logprobs, dtype=np.float64)
    if len(suppress):
        lp[list(suppress)] = -np.inf
    if params.temperature == 0.0:
        out = np.full_like(lp, -np.inf)
        out[int(np.argmax(lp))] = 0.0
        return out
    lp = lp / params.temperature
    lp -= _logsumexp(lp)
    if params.min_p > 0.0:
        lp[lp < lp.max() + math.log(params.min_p)] = -np.inf
        lp -= _logsumexp(lp)
    if 0 < params.top_k < lp.size:
        kth = np.sort(lp)[-params.top_k]
        lp[lp < kth] = -np.inf
        lp -= _logsumexp(lp)
    if params.top_p < 1.0:
        order = np.argsort(-lp, kind="stable")
        probs = np.exp(lp[order])
        # keep the smallest head whose mass reaches top_p (always at least one token)
        before = np.cumsum(probs) - probs
        drop = order[before >= params.top_p]
        lp[drop] = -np.inf
        lp -= _logsumexp(lp)
    return lp


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.sum(np.exp(x - m))))


def _finish(token_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str, str | None]:
    """Apply stop strings, EOS and ``max_tokens`` to a token stream, as vLLM does.

    Generation ends at the token completing a stop string (text trimmed before it, or after it
    with ``include_stop_str_in_output``; stop strings count only from ``min_tokens`` tokens on),
    at EOS (kept in ``token_ids``, not in the text), or after ``max_tokens`` tokens (``length``).
    """
    text = ""
    for t, tok in enumerate(token_ids[: params.max_tokens]):
        if tok == EOS_TOKEN_ID:
            return token_ids[: t + 1], text, FinishReason.STOP.value, None
        text += chr(tok)
        if params.stop and t + 1 > params.min_tokens:
            hit = find_stop(text, params.stop, start=len(text) - 1)
            if hit is not None:
                keep = hit[0] + (len(hit[1]) if params.include_stop_str_in_output else 0)
                return token_ids[: t + 1], text[:keep], FinishReason.STOP.value, hit[1]
    return token_ids[: params.max_tokens], text, FinishReason.LENGTH.value, None


def _hash_uniforms(*key: object, size: int) -> np.ndarray:
    digest = hashlib.blake2b("\x1f".join(map(str, key)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little")).random(size)


class ScriptedEngine:
    """Deterministic engine: scripted texts, or a character-level toy language model.

    ``responses``: a :data:`Responder` callable, or a table ``problem_id -> text`` /
    ``problem_id -> [text per index]`` (index taken modulo the list length). Table entries are
    whole responses: with a ``prefix`` that the entry starts with, the continuation is the rest.
    Stop strings, ``max_tokens`` (one token per character) and ``min_tokens`` are applied to the
    scripted text as an engine would. Without ``responses`` the toy model generates.

    ``calls`` records every ``(request, params)`` seen, for assertions in tests.
    """

    name = "scripted"
    capabilities = EngineCapabilities(token_prefixes=True, streaming=True)

    def __init__(
        self,
        responses: Responder | Mapping[str, str | Sequence[str]] | None = None,
        *,
        alphabet: str = _DEFAULT_ALPHABET,
        order: int = 3,
        eos_logprob: float = math.log(1 / 24),
        logprob_mode: str = "raw_logprobs",
        chat_template: Callable[[Sequence[Mapping[str, str]]], str] | None = None,
        fail_after: int | None = None,
    ) -> None:
        check_choice("logprob_mode", logprob_mode, _LOGPROB_MODES)
        if not alphabet or len(set(alphabet)) != len(alphabet) or "\x00" in alphabet:
            raise ConfigError("alphabet must be a non-empty string of distinct characters, no NUL")
        check_int("order", order, min=1)
        if not eos_logprob < 0:
            raise ConfigError(f"eos_logprob must be < 0, got {eos_logprob}")
        check_int("fail_after", fail_after, min=0, allow_none=True)
        if responses is not None and not callable(responses) and not isinstance(responses, Mapping):
            raise ConfigError("responses must be a callable or a mapping problem_id -> text(s)")
        if isinstance(responses, Mapping):
            for pid, entry in responses.items():
                ok = isinstance(entry, str) or (
                    isinstance(entry, Sequence) and entry and all(isinstance(x, str) for x in entry)
                )
                if not ok:
                    raise ConfigError(
                        f"scripted response for {pid!r} must be a string or a non-empty list of strings"
                    )
        self.responses = responses
        self.alphabet = alphabet
        self.order = order
        self.eos_logprob = float(eos_logprob)
        self.logprob_mode = logprob_mode
        self.chat_template = chat_template or render_plain_chat
        self.fail_after = fail_after
        self.samples_generated = 0
        self.calls: list[tuple[GenerationRequest, SamplingParams]] = []
        # vocabulary of the toy model: EOS then the alphabet; ids are ord(char)
        self._vocab_ids = np.array([EOS_TOKEN_ID, *(ord(c) for c in alphabet)], dtype=np.int64)
        self._next_logprobs = lru_cache(maxsize=65536)(self._next_logprobs_uncached)
        if responses is None:
            self.capabilities = EngineCapabilities(
                token_prefixes=True,
                scoring=True,
                streaming=True,
                logprob_modes=frozenset(_LOGPROB_MODES),
            )

    # -- public API ------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[list[Completion]]:
        """Samples one after another (each trace is independent, so streaming and aborting one
        trace cannot change another)."""
        collector = ResultCollector(requests, on_result)
        base = params
        for pos, req in enumerate(requests):
            params = req.params_for(base)  # the request's own max_tokens, if any
            self.calls.append((req, params))
            for j, index in enumerate(req.indices):
                if self.fail_after is not None and self.samples_generated >= self.fail_after:
                    error = EngineError(
                        f"scripted failure after {self.samples_generated} samples "
                        f"(fail_after={self.fail_after})"
                    )
                    raise collector.failure(self.name, error) from error
                comp = self._sample(req, index, req.seed_for(j, params), params)
                if on_token is not None:
                    comp = self._stream(comp, pos, j, params, on_token)
                self.samples_generated += 1
                collector.put(pos, j, comp)
        return collector.results()

    def open_loop(self, params: SamplingParams, *, tokens_per_poll: int = 4) -> _ScriptedLoop:
        """Continuous generation (:mod:`ttscale.engines.loop`), simulated: every poll advances
        each request in flight by ``tokens_per_poll`` tokens, and a request finishes once its
        longest sample is complete, so short requests overtake long ones as on a real engine
        (the order requests come back in depends on what else is in flight; their samples do
        not)."""
        check_int("tokens_per_poll", tokens_per_poll, min=1)
        return _ScriptedLoop(self, params, tokens_per_poll)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids: one character per token (``chr``), EOS skipped."""
        return "".join(chr(t) for t in _check_ids(token_ids) if t != EOS_TOKEN_ID)

    def score(
        self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, ...]]:
        """Raw log-probabilities of each continuation under the toy model (exact: the same
        numbers ``generate`` reports as ``target_logprobs``). Scripted texts cannot be scored."""
        if self.responses is not None:
            raise ConfigError(
                "a ScriptedEngine with scripted responses cannot score: it has no model; "
                "use ScriptedEngine() (the toy model)"
            )
        if len(requests) != len(continuations):
            raise ConfigError(
                f"score got {len(requests)} requests but {len(continuations)} continuations"
            )
        index = {int(t): i for i, t in enumerate(self._vocab_ids)}
        out: list[tuple[float, ...]] = []
        for req, cont in zip(requests, continuations, strict=True):
            text = self.context(req)
            lps: list[float] = []
            for tok in _check_ids(cont):
                if tok not in index:
                    raise ConfigError(f"token id {tok} is not in the toy model's vocabulary")
                lps.append(float(self._next_logprobs(text[-self.order :])[index[tok]]))
                if tok != EOS_TOKEN_ID:
                    text += chr(tok)
            out.append(tuple(lps))
        return out

    def score_next(
        self, requests: Sequence[GenerationRequest], token_ids: Sequence[int]
    ) -> list[NextTokenScores]:
        """Log-probabilities of each of ``token_ids`` as the next token after each request's
        context, from one next-token distribution per request (the values :meth:`score` gives
        for one-token continuations); ``context_tokens`` is the context's length (one token per
        character)."""
        if self.responses is not None:
            raise ConfigError(
                "a ScriptedEngine with scripted responses cannot score: it has no model; "
                "use ScriptedEngine() (the toy model)"
            )
        index = {int(t): i for i, t in enumerate(self._vocab_ids)}
        cands = _check_ids(token_ids)
        for tok in cands:
            if tok not in index:
                raise ConfigError(f"token id {tok} is not in the toy model's vocabulary")
        out = []
        for req in requests:
            text = self.context(req)
            lp = self._next_logprobs(text[-self.order :])
            out.append(NextTokenScores(tuple(float(lp[index[t]]) for t in cands), len(text)))
        return out

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": "1",
            "model": "scripted" if self.responses is not None else f"toy-order{self.order}",
            "logprob_mode": self.logprob_mode,
        }

    def close(self) -> None:
        pass

    def context(self, request: GenerationRequest) -> str:
        """The text the model conditions on: prompt (or rendered messages, or decoded prompt
        token ids), then the text prefix, then the decoded prefix token ids."""
        if request.prompt_token_ids is not None:
            head = self.decode(request.prompt_token_ids)
        elif request.prompt is not None:
            head = request.prompt
        else:
            head = self.chat_template(request.messages or ())
        return head + request.prefix + self.decode(request.prefix_token_ids)

    def _stream(
        self, comp: Completion, pos: int, slot: int, params: SamplingParams, on_token: TokenCallback
    ) -> Completion:
        """Hand each token of ``comp`` to ``on_token``; cut the trace where it asks to abort."""
        assert comp.token_ids is not None
        n = comp.num_tokens
        for t, tok in enumerate(comp.token_ids):
            event = TokenEvent(
                request=pos,
                slot=slot,
                index=comp.index,
                token_id=tok,
                num_tokens=t + 1,
                logprob=comp.token_logprobs[t] if comp.token_logprobs is not None else None,
                top=comp.top_logprobs[t] if comp.top_logprobs is not None else None,
                finished=t + 1 == n,
            )
            if on_token(event) and t + 1 < n:
                return _truncate(comp, t + 1, self.decode(comp.token_ids[: t + 1]))
        return comp

    # -- one sample --------------------------------------------------------------------------
    def _sample(
        self, req: GenerationRequest, index: int, seed: int, params: SamplingParams
    ) -> Completion:
        context = self.context(req)
        target: list[float] | None = None
        proposal: list[float] | None = None
        if self.responses is None:
            token_ids, lps, tops, target, proposal = self._toy_generate(context, seed, params)
        else:
            # a scripted response ends with EOS, as a real model's would
            token_ids = [ord(c) for c in self._scripted_text(req, index, seed, params)]
            token_ids.append(EOS_TOKEN_ID)
        token_ids, text, finish, stop_reason = _finish(token_ids, params)
        if self.responses is not None:
            lps, tops = self._scripted_logprobs(token_ids, seed, params)
        else:
            n = len(token_ids)
            lps, tops = lps[:n], tops[:n]
            target, proposal = (target or [])[:n], (proposal or [])[:n]
        want_lp = params.logprobs is not None
        return Completion(
            problem_id=req.problem_id,
            index=index,
            text=text,
            token_ids=tuple(token_ids),
            token_logprobs=tuple(lps) if want_lp else None,
            top_logprobs=tuple(tops) if want_lp and params.logprobs else None,
            cumulative_logprob=math.fsum(lps) if want_lp else None,
            num_tokens=len(token_ids),
            finish_reason=finish,
            seed=seed,
            prompt_tokens=len(context),
            stop_reason=stop_reason,
            prompt_token_ids=tuple(ord(c) for c in context),
            target_logprobs=tuple(target) if want_lp and target is not None else None,
            proposal_logprobs=tuple(proposal) if want_lp and proposal is not None else None,
        )

    def _scripted_text(
        self, req: GenerationRequest, index: int, seed: int, params: SamplingParams
    ) -> str:
        if callable(self.responses):
            text = self.responses(req, index, seed, params)
        else:
            assert self.responses is not None
            if req.problem_id not in self.responses:
                raise ConfigError(f"ScriptedEngine has no scripted response for {req.problem_id!r}")
            entry = self.responses[req.problem_id]
            text = entry if isinstance(entry, str) else entry[index % len(entry)]
            done = req.prefix + self.decode(req.prefix_token_ids)
            if done and text.startswith(done):
                text = text[len(done) :]
        if not isinstance(text, str):
            raise ConfigError(f"a scripted response must be a string, got {type(text).__name__}")
        return text.replace("\x00", "")

    def _scripted_logprobs(
        self, token_ids: Sequence[int], seed: int, params: SamplingParams
    ) -> tuple[list[float], list[dict[int, float]]]:
        k = params.logprobs or 0
        lps: list[float] = []
        tops: list[dict[int, float]] = []
        for t, tok in enumerate(token_ids):
            u = _hash_uniforms("scripted", seed, t, tok, size=1 + k)
            p = 0.05 + 0.95 * float(u[0])  # probability of the scripted token
            lps.append(math.log(p))
            top = {tok: math.log(p)}
            rest = 1.0 - p
            # alternatives take shares of the remaining mass (never more than it)
            alt = ord("a") if tok != ord("a") else ord("b")
            for r in range(k):
                share = rest * (0.25 + 0.5 * float(u[1 + r]))
                while alt in top:
                    alt += 1
                if share > 0.0:
                    top[alt] = math.log(share)
                rest -= share
            tops.append(top)
        return lps, tops

    # -- the toy language model --------------------------------------------------------------
    def _next_logprobs_uncached(self, tail: str) -> np.ndarray:
        """Raw next-token log-probabilities over ``[EOS, *alphabet]`` given the last chars."""
        z = 2.0 * _hash_uniforms("toy", self.order, tail, size=len(self.alphabet))
        z = z - _logsumexp(z)
        eos = self.eos_logprob
        chars = z + math.log1p(-math.exp(eos))
        return np.concatenate([[eos], chars])

    def _toy_generate(
        self, context: str, seed: int, params: SamplingParams
    ) -> tuple[list[int], list[float], list[dict[int, float]], list[float], list[float]]:
        """Tokens, reported log-probabilities, top alternatives, target (raw) and proposal
        (processed) log-probabilities of one toy-model sample."""
        rng = np.random.default_rng(seed)
        k = params.logprobs or 0
        text = context
        token_ids: list[int] = []
        lps: list[float] = []
        tops: list[dict[int, float]] = []
        target: list[float] = []
        proposal: list[float] = []
        for t in range(params.max_tokens):
            raw = self._next_logprobs(text[-self.order :])
            suppress = (0,) if t < params.min_tokens else ()
            proc = process_logprobs(raw, params, suppress=suppress)
            u = rng.random()  # one uniform per step, drawn even when greedy: streams stay aligned
            cdf = np.cumsum(np.exp(proc))
            choice = int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), cdf.size - 1))
            while not math.isfinite(proc[choice]):  # never pick a removed token at a cdf plateau
                choice -= 1
            reported = raw if self.logprob_mode == "raw_logprobs" else proc
            tok = int(self._vocab_ids[choice])
            token_ids.append(tok)
            lps.append(float(reported[choice]))
            target.append(float(raw[choice]))
            proposal.append(float(proc[choice]))
            if k:
                best = np.argsort(-reported, kind="stable")[:k]
                top = {int(self._vocab_ids[b]): float(reported[b]) for b in best}
                top[tok] = float(reported[choice])
                tops.append(top)
            if tok == EOS_TOKEN_ID:
                break
            text += chr(tok)
        return token_ids, lps, tops, target, proposal


def _check_ids(token_ids: Sequence[int]) -> list[int]:
    ids = [int(t) for t in token_ids]
    bad = [t for t in ids if not 0 <= t < 0x110000]
    if bad:
        raise ConfigError(
            f"token id {bad[0]} is not a character (ScriptedEngine tokens are ord(c))"
        )
    return ids


def _truncate(comp: Completion, n: int, text: str) -> Completion:
    """``comp`` cut to its first ``n`` tokens, ended by an abort."""

    def cut(xs: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if xs is None else tuple(xs[:n])

    return Completion(
        problem_id=comp.problem_id,
        index=comp.index,
        text=text,
        token_ids=cut(comp.token_ids),
        token_logprobs=cut(comp.token_logprobs),
        top_logprobs=cut(comp.top_logprobs),
        cumulative_logprob=(
            math.fsum(comp.token_logprobs[:n]) if comp.token_logprobs is not None else None
        ),
        num_tokens=n,
        finish_reason=FinishReason.ABORT.value,
        seed=comp.seed,
        prompt_tokens=comp.prompt_tokens,
        stop_reason=None,
        prompt_token_ids=comp.prompt_token_ids,
        target_logprobs=cut(comp.target_logprobs),
        proposal_logprobs=cut(comp.proposal_logprobs),
        discarded_tokens=comp.discarded_tokens,
    )


class _ScriptedLoop:
    """:meth:`ScriptedEngine.open_loop`: the :class:`~ttscale.engines.loop.EngineLoop` contract."""

    def __init__(self, engine: ScriptedEngine, params: SamplingParams, step: int) -> None:
        self.engine = engine
        self.params = params
        self.step = step
        self._next = 0
        # ticket -> (request, completions, tokens generated so far per sample)
        self._live: dict[int, tuple[GenerationRequest, list[Completion], list[int]]] = {}
        self._failed: tuple[int, list[Completion], EngineError] | None = None
        #: how many polls advanced the engine (tests read it)
        self.polls = 0
        #: ``(problem_id, indices, priority)`` of every request, in the order it entered the
        #: engine (requests run at once here, so the caller's priorities show in this order)
        self.started: list[tuple[str, tuple[int, ...], int]] = []
        #: a caller may order its queue by priority (tests check that it does)
        self.priorities = True

    @property
    def in_flight(self) -> int:
        return sum(len(r.indices) for r, _, _ in self._live.values())

    def submit(
        self, request: GenerationRequest, on_token: TokenCallback | None = None, priority: int = 0
    ) -> int:
        t = self._next
        self._next += 1
        self.started.append((request.problem_id, tuple(request.indices), priority))
        eng = self.engine
        params = request.params_for(self.params)  # the request's own max_tokens, if any
        eng.calls.append((request, params))
        comps: list[Completion] = []
        for j, index in enumerate(request.indices):
            if eng.fail_after is not None and eng.samples_generated >= eng.fail_after:
                error = EngineError(
                    f"scripted failure after {eng.samples_generated} samples "
                    f"(fail_after={eng.fail_after})"
                )
                if self._failed is None:
                    self._failed = (t, comps, error)
                return t
            comp = eng._sample(request, index, request.seed_for(j, params), params)
            if on_token is not None:  # the trace as the callback cuts it (tokens are per trace)
                comp = eng._stream(comp, 0, j, params, on_token)
            comps.append(comp)
            eng.samples_generated += 1
        self._live[t] = (request, comps, [0] * len(comps))
        return t

    def poll(
        self, on_result: Callable[[int, list[Completion]], None], max_steps: int | None = None
    ) -> None:
        from ttscale.engines.loop import LoopFailure

        if self._failed is not None:
            t, part, error = self._failed
            self._failed = None
            raise LoopFailure(f"scripted generation failed: {error}", {t: part}) from error
        steps = 0
        while self._live and (max_steps is None or steps < max_steps):
            steps += 1
            self.polls += 1
            done = []
            for t, (_, comps, made) in self._live.items():
                for j, c in enumerate(comps):
                    made[j] = min(made[j] + self.step, max(1, c.num_tokens + c.discarded_tokens))
                if all(made[j] >= max(1, c.num_tokens + c.discarded_tokens) for j, c in enumerate(comps)):
                    done.append(t)
            for t in done:
                _, comps, _ = self._live.pop(t)
                on_result(t, comps)
            if done:
                return

    def abort(self, ticket: int) -> int:
        entry = self._live.pop(ticket, None)
        if entry is None:
            return 0
        _, comps, made = entry
        return sum(min(m, c.num_tokens + c.discarded_tokens) for m, c in zip(made, comps, strict=True))

    def close(self) -> None:
        self._live.clear()
