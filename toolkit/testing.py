"""Contract suites for user-provided components (like scikit-learn's ``check_estimator``).

``check_sampler(make_sampler)`` and ``check_verifier(verifier, problem, candidates)`` do the
same for samplers (seeded prefixes, accounting of discarded tokens, salvage, resume) and
verifiers (one verdict per sample in order, bad candidates as statuses, JSON ``info()``).

``check_engine(engine)`` runs every check of the :class:`~ttscale.engines.Engine` contract
against a live engine and raises :class:`EngineContractError` (an ``AssertionError``) naming the
first check that fails. It needs an engine that samples (``temperature=1`` gives distinct
samples) and a model that does not emit EOS immediately. Beyond the base contract, it checks
every capability the engine declares (``engine.capabilities``), for real: ``token_prefixes``,
``scoring``, ``streaming``, and the log-probability modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttscale.engines.base import (
    Engine,
    EngineCapabilities,
    GenerationRequest,
    TokenEvent,
    capabilities_of,
    continuation_text,
    generate_chunked,
)
from ttscale.errors import ConfigError
from ttscale.seeding import sample_seed
from ttscale.types import Completion, SamplingParams
from ttscale.validation import check_int

__all__ = [
    "BAD_CANDIDATES",
    "ENGINE_CHECKS",
    "SAMPLER_CHECKS",
    "EngineContractError",
    "SamplerContractError",
    "VerifierContractError",
    "check_engine",
    "check_sampler",
    "check_verifier",
]


class EngineContractError(AssertionError):
    """An engine broke its contract; the message names the check."""


@dataclass(frozen=True)
class _Ctx:
    engine: Engine
    prompt: str
    messages: Sequence[Mapping[str, str]] | None
    params: SamplingParams
    tol: float
    strict_prefix: bool
    caps: EngineCapabilities


def _fail(check: str, msg: str) -> EngineContractError:
    return EngineContractError(f"check_engine[{check}]: {msg}")


def _req(ctx: _Ctx, pid: str, indices: Sequence[int], **kw: Any) -> GenerationRequest:
    return GenerationRequest(problem_id=pid, prompt=ctx.prompt, indices=tuple(indices), **kw)


def _run(
    ctx: _Ctx, check: str, requests: Sequence[GenerationRequest], params: SamplingParams
) -> list[list[Completion]]:
    seen: dict[int, list[Completion]] = {}

    def on_result(pos: int, comps: list[Completion]) -> None:
        if pos in seen:
            raise _fail(check, f"on_result called twice for request {pos}")
        seen[pos] = list(comps)

    out = ctx.engine.generate(list(requests), params, on_result=on_result)
    if not isinstance(out, list) or len(out) != len(requests):
        raise _fail(check, f"expected a list of {len(requests)} results, got {type(out).__name__}")
    if sorted(seen) != list(range(len(requests))):
        raise _fail(check, f"on_result saw requests {sorted(seen)}, expected all {len(requests)}")
    for pos, (req, comps) in enumerate(zip(requests, out, strict=True)):
        if len(comps) != len(req.indices):
            raise _fail(
                check, f"request {pos}: {len(comps)} completions for {len(req.indices)} indices"
            )
        if [_key(c) for c in seen[pos]] != [_key(c) for c in comps]:
            raise _fail(check, f"request {pos}: on_result and the return value disagree")
        for j, c in enumerate(comps):
            _check_completion(ctx, check, req, j, c, params)
    return out


def _key(c: Completion) -> tuple[Any, ...]:
    return (c.problem_id, c.index, c.text, c.token_ids)


def _check_completion(
    ctx: _Ctx, check: str, req: GenerationRequest, j: int, c: Completion, params: SamplingParams
) -> None:
    where = f"{req.problem_id}#{req.indices[j]}"
    if not isinstance(c, Completion):
        raise _fail(check, f"{where}: not a Completion but {type(c).__name__}")
    if c.problem_id != req.problem_id or c.index != req.indices[j]:
        raise _fail(check, f"{where}: got ({c.problem_id!r}, {c.index}) out of order")
    if c.seed is not None and c.seed != req.seed_for(j, params):
        raise _fail(check, f"{where}: seed {c.seed} != requested {req.seed_for(j, params)}")
    if c.finish_reason not in ("stop", "length"):
        raise _fail(check, f"{where}: finish_reason {c.finish_reason!r} not 'stop'/'length'")
    if not 0 <= c.num_tokens <= params.max_tokens:
        raise _fail(check, f"{where}: num_tokens {c.num_tokens} outside [0, {params.max_tokens}]")
    if c.token_ids is not None and len(c.token_ids) != c.num_tokens:
        raise _fail(check, f"{where}: {len(c.token_ids)} token ids but num_tokens={c.num_tokens}")
    if params.logprobs is None:
        return
    if c.token_logprobs is None or c.cumulative_logprob is None:
        raise _fail(check, f"{where}: logprobs were asked for but not returned")
    if len(c.token_logprobs) != c.num_tokens:
        raise _fail(check, f"{where}: {len(c.token_logprobs)} logprobs for {c.num_tokens} tokens")
    for t, lp in enumerate(c.token_logprobs):
        if not (lp <= 1e-6) or math.isnan(lp) or lp == -math.inf:
            raise _fail(check, f"{where}: token {t} has log-probability {lp} (want finite <= 0)")
    total = math.fsum(c.token_logprobs)
    if abs(total - c.cumulative_logprob) > ctx.tol * max(1.0, abs(total)):
        raise _fail(
            check, f"{where}: sum of token logprobs {total} != cumulative {c.cumulative_logprob}"
        )
    if params.logprobs > 0:
        if c.top_logprobs is None or len(c.top_logprobs) != c.num_tokens:
            raise _fail(check, f"{where}: top_logprobs missing or of the wrong length")
        for t, top in enumerate(c.top_logprobs):
            if len(top) < params.logprobs:
                raise _fail(check, f"{where}: position {t} has {len(top)} alternatives")
            if any(v > 1e-6 for v in top.values()):
                raise _fail(check, f"{where}: position {t} has a positive log-probability")
            if sum(math.exp(v) for v in top.values()) > 1.0 + 1e-4:
                raise _fail(check, f"{where}: position {t}: top probabilities sum above 1")
            if c.token_ids is not None:
                tok = c.token_ids[t]
                if tok not in top or abs(top[tok] - c.token_logprobs[t]) > 1e-4:
                    raise _fail(
                        check,
                        f"{where}: position {t}: sampled token {tok} missing from "
                        "top_logprobs or with a different value",
                    )


def _same(a: Completion, b: Completion) -> bool:
    if a.text != b.text:
        return False
    return a.token_ids is None or b.token_ids is None or a.token_ids == b.token_ids


# -- the checks ----------------------------------------------------------------------------------


def _check_info(ctx: _Ctx) -> None:
    info = ctx.engine.info()
    if not isinstance(info, dict) or "engine" not in info or "logprob_mode" not in info:
        raise _fail("info", "info() must return a dict with at least 'engine' and 'logprob_mode'")
    if not isinstance(getattr(ctx.engine, "name", None), str):
        raise _fail("info", "the engine needs a string attribute 'name'")
    methods = {"token_prefixes": "decode", "scoring": "score"}
    for cap, method in methods.items():
        if ctx.caps.has(cap) and not callable(getattr(ctx.engine, method, None)):
            raise _fail("info", f"declares {cap!r} but has no {method}() method")


def _check_shapes(ctx: _Ctx) -> None:
    reqs = [_req(ctx, "p0", [0, 1, 2]), _req(ctx, "p1", [5, 2]), _req(ctx, "p2", [7])]
    _run(ctx, "shapes", reqs, ctx.params)
    _run(ctx, "shapes", [], ctx.params)


def _check_reproducible(ctx: _Ctx) -> None:
    reqs = [_req(ctx, "p0", [0, 1, 2, 3]), _req(ctx, "p1", [0, 1])]
    a = _run(ctx, "reproducible", reqs, ctx.params)
    b = _run(ctx, "reproducible", reqs, ctx.params)
    for ra, rb in zip(a, b, strict=True):
        for ca, cb in zip(ra, rb, strict=True):
            if not _same(ca, cb):
                raise _fail(
                    "reproducible", f"{ca.problem_id}#{ca.index}: same seed, different text"
                )
            if ca.token_logprobs and cb.token_logprobs:
                diff = max(
                    abs(x - y) for x, y in zip(ca.token_logprobs, cb.token_logprobs, strict=True)
                )
                if diff > 1e-4:
                    raise _fail(
                        "reproducible", f"{ca.problem_id}#{ca.index}: logprobs moved by {diff}"
                    )
    # a sample depends on (problem, index) only: not on the batch, its position, or other indices
    alone = _run(ctx, "reproducible", [_req(ctx, "p1", [1]), _req(ctx, "p0", [2])], ctx.params)
    if not _same(alone[0][0], a[1][1]) or not _same(alone[1][0], a[0][2]):
        raise _fail("reproducible", "a sample changed when requested alone or in another order")


def _check_distinct(ctx: _Ctx) -> None:
    (comps,) = _run(ctx, "distinct", [_req(ctx, "p0", [0, 1, 2, 3])], ctx.params)
    if len({(c.text, c.token_ids) for c in comps}) < 2:
        raise _fail("distinct", "4 samples at temperature 1 are all identical: are seeds ignored?")


def _check_explicit_seeds(ctx: _Ctx) -> None:
    s3 = sample_seed(ctx.params.seed, "p0", 3)
    derived = _run(ctx, "explicit_seeds", [_req(ctx, "p0", [3])], ctx.params)[0][0]
    (comps,) = _run(ctx, "explicit_seeds", [_req(ctx, "q", [0, 1], seeds=(s3, s3))], ctx.params)
    if comps[0].seed is not None and comps[0].seed != s3:
        raise _fail("explicit_seeds", "an explicit seed was not used")
    if not (_same(comps[0], comps[1]) and _same(comps[0], derived)):
        raise _fail("explicit_seeds", "samples with the same seed (and prompt) differ")


def _long_sample(ctx: _Ctx, check: str, min_chars: int) -> Completion:
    for i in range(8):
        c = _run(ctx, check, [_req(ctx, "p0", [i])], ctx.params)[0][0]
        if len(c.text) >= min_chars:
            return c
    raise _fail(check, f"no sample of {min_chars}+ characters in 8 tries; raise max_tokens")


def _check_stop(ctx: _Ctx) -> None:
    full = _long_sample(ctx, "stop", 5)
    stop = full.text[2:4]
    pos = full.text.find(stop)
    req = _req(ctx, "p0", [full.index])
    for include in (False, True):
        params = ctx.params.replace(stop=(stop,), include_stop_str_in_output=include)
        c = _run(ctx, "stop", [req], params)[0][0]
        want = full.text[: pos + (len(stop) if include else 0)]
        if c.text != want:
            raise _fail("stop", f"stop={stop!r} include={include}: text {c.text!r}, want {want!r}")
        if c.finish_reason != "stop":
            raise _fail("stop", f"stop string hit but finish_reason={c.finish_reason!r}")
        if c.stop_reason is not None and c.stop_reason != stop:
            raise _fail("stop", f"stop_reason {c.stop_reason!r} != {stop!r}")
        if c.num_tokens > full.num_tokens:
            raise _fail("stop", "stopping early produced more tokens than not stopping")


def _check_max_tokens(ctx: _Ctx) -> None:
    full = _long_sample(ctx, "max_tokens", 5)
    m = 3
    short = _run(
        ctx, "max_tokens", [_req(ctx, "p0", [full.index])], ctx.params.replace(max_tokens=m)
    )
    c = short[0][0]
    if c.num_tokens > m:
        raise _fail("max_tokens", f"{c.num_tokens} tokens with max_tokens={m}")
    if full.num_tokens > m and (c.num_tokens != m or c.finish_reason != "length"):
        raise _fail(
            "max_tokens",
            f"cut at max_tokens={m} gave {c.num_tokens} tokens, finish_reason={c.finish_reason!r}",
        )
    if c.token_ids is not None and full.token_ids is not None and c.token_ids != full.token_ids[:m]:
        raise _fail("max_tokens", "a shorter max_tokens changed the tokens sampled")
    if not full.text.startswith(c.text.rstrip("\ufffd")):
        raise _fail("max_tokens", f"{c.text!r} is not a prefix of {full.text!r}")
    # a request's own max_tokens caps that request only, in a call shared with another
    own, other = _run(
        ctx,
        "max_tokens",
        [_req(ctx, "p0", [full.index], max_tokens=m), _req(ctx, "p0", [full.index])],
        ctx.params,
    )
    o = own[0]
    if o.num_tokens > m or (full.num_tokens > m and o.finish_reason != "length"):
        raise _fail(
            "max_tokens",
            f"a request's own max_tokens={m} gave {o.num_tokens} tokens ({o.finish_reason!r})",
        )
    if full.num_tokens > m and other[0].num_tokens <= m:
        raise _fail("max_tokens", "one request's max_tokens capped another request in the call")


def _check_prefix(ctx: _Ctx) -> None:
    greedy = ctx.params.replace(temperature=0.0)
    (g,) = _run(ctx, "prefix", [_req(ctx, "p0", [0, 1])], greedy)
    if not _same(g[0], g[1]):
        raise _fail("prefix", "greedy samples of different indices differ")
    full = g[0]
    if len(full.text) < 2:
        raise _fail("prefix", f"greedy text {full.text!r} too short to test continuation")
    prefix = full.text[: len(full.text) // 2]
    c = _run(ctx, "prefix", [_req(ctx, "p0", [0], prefix=prefix)], greedy)[0][0]
    if c.prompt_tokens is not None and full.prompt_tokens is not None:
        if c.prompt_tokens <= full.prompt_tokens:
            raise _fail("prefix", "the prefix did not lengthen the prompt")
    if ctx.strict_prefix:
        joined = prefix + c.text
        m = min(len(joined), len(full.text))
        ended = full.finish_reason == "stop"
        if joined[:m] != full.text[:m] or (ended and joined != full.text):
            raise _fail(
                "prefix",
                f"greedy continuation of {prefix!r} gave {c.text!r}; full greedy text {full.text!r}",
            )
    elif c.num_tokens == 0:
        raise _fail("prefix", "continuation from a prefix generated nothing")


def _check_top_logprobs(ctx: _Ctx) -> None:
    _run(ctx, "top_logprobs", [_req(ctx, "p0", [0, 1])], ctx.params.replace(logprobs=3))


def _check_chat(ctx: _Ctx) -> None:
    msgs = ctx.messages or [{"role": "user", "content": ctx.prompt}]
    req = GenerationRequest(problem_id="chat", messages=msgs, indices=(0, 1))
    a = _run(ctx, "chat", [req], ctx.params)
    b = _run(ctx, "chat", [req], ctx.params)
    if not all(_same(x, y) for x, y in zip(a[0], b[0], strict=True)):
        raise _fail("chat", "chat samples with the same seed differ")


# -- declared capabilities -----------------------------------------------------------------------


def _check_logprob_modes(ctx: _Ctx) -> None:
    """Declared modes are filled, agree with ``token_logprobs``, and mean what they say:
    at temperature 1 with no filter the proposal is the target, greedy proposals are 0, and a
    lower temperature moves the proposal away from the target."""
    modes = ctx.caps.logprob_modes
    engine_mode = ctx.engine.info().get("logprob_mode")

    def fields(c: Completion) -> dict[str, tuple[float, ...]]:
        got = {"raw_logprobs": c.target_logprobs, "processed_logprobs": c.proposal_logprobs}
        out = {}
        for mode in modes:
            vals = got[mode]
            if vals is None or len(vals) != c.num_tokens:
                raise _fail("logprob_modes", f"declares {mode} but the completion lacks it")
            if any(math.isnan(v) or v > 1e-6 for v in vals):
                raise _fail("logprob_modes", f"{mode} has a value that is NaN or above 0")
            out[mode] = vals
        if engine_mode in out and c.token_logprobs is not None:
            if _maxdiff(out[engine_mode], c.token_logprobs) > 1e-9:
                raise _fail("logprob_modes", f"token_logprobs differ from the {engine_mode} field")
        return out

    (plain,) = _run(ctx, "logprob_modes", [_req(ctx, "p0", [0, 1])], ctx.params)
    for c in plain:
        f = fields(c)
        if len(f) == 2 and _maxdiff(f["raw_logprobs"], f["processed_logprobs"]) > 1e-5:
            raise _fail("logprob_modes", "at temperature 1 with no filter, proposal != target")
    (greedy,) = _run(
        ctx, "logprob_modes", [_req(ctx, "p0", [0])], ctx.params.replace(temperature=0.0)
    )
    f = fields(greedy[0])
    if (
        "processed_logprobs" in f
        and _maxdiff(f["processed_logprobs"], [0.0] * len(greedy[0].token_ids or ())) > 1e-6
    ):
        raise _fail("logprob_modes", "greedy proposal log-probabilities must be 0 (one-hot)")
    if len(modes) == 2:
        (cool,) = _run(
            ctx, "logprob_modes", [_req(ctx, "p0", [0, 1])], ctx.params.replace(temperature=0.5)
        )
        if all(
            _maxdiff(fields(c)["raw_logprobs"], fields(c)["processed_logprobs"]) < 1e-6
            for c in cool
        ):
            raise _fail("logprob_modes", "temperature 0.5 left the proposal equal to the target")


def _maxdiff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def _greedy_full(ctx: _Ctx, check: str) -> Completion:
    greedy = ctx.params.replace(temperature=0.0)
    g = _run(ctx, check, [_req(ctx, "p0", [0])], greedy)[0][0]
    if g.token_ids is None or len(g.token_ids) < 4:
        raise _fail(check, "a greedy sample needs 4+ tokens to test; raise max_tokens")
    return g


def _check_token_prefixes(ctx: _Ctx) -> None:
    engine: Any = ctx.engine
    greedy = ctx.params.replace(temperature=0.0)
    g = _greedy_full(ctx, "token_prefixes")
    assert g.token_ids is not None
    if g.prompt_token_ids is None:
        raise _fail("token_prefixes", "completions must say which prompt tokens they saw")
    if g.finish_reason == "length" and engine.decode(g.token_ids) != g.text:
        raise _fail("token_prefixes", f"decode(token_ids) {engine.decode(g.token_ids)!r} != text")
    h = len(g.token_ids) // 2
    head, rest = g.token_ids[:h], g.token_ids[h:]
    # continue from the exact ids: as text prompt + token prefix, and as prompt token ids
    reqs = [
        _req(ctx, "p0", [0], prefix_token_ids=head),
        GenerationRequest(
            problem_id="p0", prompt_token_ids=g.prompt_token_ids, prefix_token_ids=head
        ),
    ]
    for c in (r[0] for r in _run(ctx, "token_prefixes", reqs, greedy)):
        if c.prompt_token_ids != g.prompt_token_ids + head:
            raise _fail(
                "token_prefixes",
                "a continuation did not condition on exactly prompt ids + prefix ids "
                f"(saw {c.prompt_token_ids}, want {g.prompt_token_ids + head})",
            )
        if tuple(c.token_ids or ())[: len(rest)] != rest:
            raise _fail(
                "token_prefixes",
                f"greedy continuation from token ids gave {c.token_ids}, want {rest} first",
            )
        want = continuation_text(engine.decode, head, c.token_ids or ())
        if c.text != want:
            raise _fail("token_prefixes", f"continuation text {c.text!r}, want {want!r}")
    # a sampled trace continued over chunks with the same seeds is reproducible
    sampled = [_req(ctx, "p0", [0, 1], step=1)]
    a = generate_chunked(ctx.engine, sampled, ctx.params, chunk_tokens=3)
    b = generate_chunked(ctx.engine, sampled, ctx.params, chunk_tokens=3)
    if [_key(c) for c in a[0]] != [_key(c) for c in b[0]]:
        raise _fail("token_prefixes", "chunked sampling with the same seeds is not reproducible")


def _check_chunked(ctx: _Ctx) -> None:
    """Chunked generation equals one call (greedy, so seeds do not matter): a chunk boundary is
    not a length finish, stop strings across chunks are found, min_tokens spans chunks."""
    g = _greedy_full(ctx, "chunked")
    greedy = ctx.params.replace(temperature=0.0)
    stop = g.text[2:4]
    variants = [greedy, greedy.replace(min_tokens=min(5, greedy.max_tokens))]
    if stop.strip():
        variants.append(greedy.replace(stop=(stop,)))
        variants.append(greedy.replace(stop=(stop,), include_stop_str_in_output=True))
    for params in variants:
        one = _run(ctx, "chunked", [_req(ctx, "p0", [0])], params)[0][0]
        for chunk in (1, 3):
            got = generate_chunked(ctx.engine, [_req(ctx, "p0", [0])], params, chunk_tokens=chunk)
            c = got[0][0]
            if (c.token_ids, c.text, c.finish_reason) != (
                one.token_ids,
                one.text,
                one.finish_reason,
            ):
                raise _fail(
                    "chunked",
                    f"chunks of {chunk} (stop={params.stop}, min_tokens={params.min_tokens}) gave "
                    f"{c.text!r} ({c.finish_reason}), one call {one.text!r} ({one.finish_reason})",
                )


def _check_scoring(ctx: _Ctx) -> None:
    engine: Any = ctx.engine
    (comps,) = _run(ctx, "scoring", [_req(ctx, "p0", [0, 1])], ctx.params)
    engine_mode = ctx.engine.info().get("logprob_mode")
    req = _req(ctx, "p0", [0])
    for c in comps:
        ids = c.token_ids or ()
        (whole,) = engine.score([req], [ids])
        if len(whole) != len(ids):
            raise _fail("scoring", f"{len(whole)} scores for {len(ids)} tokens")
        want = c.target_logprobs
        if want is None and engine_mode == "raw_logprobs":
            want = c.token_logprobs
        if want is not None and _maxdiff(whole, want) > 1e-4:
            raise _fail(
                "scoring",
                f"scores differ from the generation's raw log-probabilities by {_maxdiff(whole, want):.2e}",
            )
        h = len(ids) // 2
        split_req = _req(ctx, "p0", [0], prefix_token_ids=ids[:h])
        (tail, empty) = engine.score([split_req, req], [ids[h:], ()])
        if _maxdiff(tail, whole[h:]) > 1e-4 or tuple(empty) != ():
            raise _fail("scoring", "scoring after a token prefix differs from scoring it whole")
        if ids and callable(getattr(engine, "score_next", None)):
            # one next-token distribution: the values of one-token continuations (score)
            cands = list(dict.fromkeys(ids[:3]))
            (nxt,) = engine.score_next([req], cands)
            ones = [v[0] for v in engine.score([req] * len(cands), [[t] for t in cands])]
            if len(nxt.logprobs) != len(cands) or _maxdiff(nxt.logprobs, ones) > 1e-4:
                raise _fail("scoring", "score_next differs from scoring one-token continuations")
    try:
        engine.score([req], [])
    except ConfigError:
        pass
    else:
        raise _fail("scoring", "score() accepted 1 request with 0 continuations")


def _check_streaming(ctx: _Ctx) -> None:
    reqs = [_req(ctx, "p0", [0, 1, 2]), _req(ctx, "p1", [4])]
    base = _run(ctx, "streaming", reqs, ctx.params)
    # token by token, then with tokens handed over in chunks (a request's stream_interval): the
    # caller sees the same events, and an abort ends the trace at the token it was asked on
    for k in (1, 3):
        _check_stream(ctx, [_req(ctx, "p0", [0, 1, 2], stream_interval=k),
                            _req(ctx, "p1", [4], stream_interval=k)], base)  # fmt: skip


def _check_stream(ctx: _Ctx, reqs: list[GenerationRequest], base: Any) -> None:
    seen: dict[tuple[int, int], list[TokenEvent]] = {}

    def record(ev: TokenEvent) -> bool:
        seen.setdefault((ev.request, ev.slot), []).append(ev)
        return False

    out: Any = ctx.engine.generate(reqs, ctx.params, on_token=record)  # type: ignore[call-arg]
    for pos, comps in enumerate(out):
        for j, c in enumerate(comps):
            evs = seen.get((pos, j), [])
            if [e.token_id for e in evs] != list(c.token_ids or ()):
                raise _fail("streaming", f"request {pos} slot {j}: streamed tokens != completion")
            if [e.num_tokens for e in evs] != list(range(1, len(evs) + 1)) or [
                e.finished for e in evs
            ] != [False] * (len(evs) - 1) + [True]:
                raise _fail("streaming", "token counts or the finished flag are wrong")
            if any(e.index != c.index for e in evs):
                raise _fail("streaming", "events carry the wrong sample index")
    victim = next(
        ((p, j) for p, r in enumerate(base) for j, c in enumerate(r) if c.num_tokens > 3), None
    )
    if victim is None:
        raise _fail("streaming", "no sample of 4+ tokens to abort; raise max_tokens")
    after: list[TokenEvent] = []

    def abort(ev: TokenEvent) -> bool:
        if (ev.request, ev.slot) == victim:
            after.append(ev)
            return ev.num_tokens == 3
        return False

    cut: Any = ctx.engine.generate(reqs, ctx.params, on_token=abort)  # type: ignore[call-arg]
    if len(after) != 3:
        raise _fail("streaming", f"the aborted trace got {len(after)} tokens after asking at 3")
    for pos, comps in enumerate(cut):
        for j, c in enumerate(comps):
            ref = base[pos][j]
            if (pos, j) == victim:
                if c.finish_reason != "abort" or c.token_ids != (ref.token_ids or ())[:3]:
                    raise _fail(
                        "streaming", f"aborted trace: {c.finish_reason}, {c.num_tokens} tokens"
                    )
            elif not _same(c, ref) or c.finish_reason != ref.finish_reason:
                raise _fail("streaming", f"aborting one trace changed request {pos} slot {j}")


def _check_loop(ctx: _Ctx) -> None:
    """The engine loop (:func:`~ttscale.engines.loop.open_loop`: the engine's own or the batch
    fallback) hands over what ``generate`` returns, once per request; an aborted request is
    never handed over; with ``streaming``, a streamed request's tokens are its completions'."""
    from ttscale.engines.loop import open_loop

    reqs = [_req(ctx, "p0", [0, 1]), _req(ctx, "p1", [3]), _req(ctx, "p2", [0, 2])]
    want = _run(ctx, "loop", reqs, ctx.params)
    loop = open_loop(ctx.engine, ctx.params)
    got: dict[int, list[Completion]] = {}

    def on_result(t: int, comps: list[Completion]) -> None:
        if t in got:
            raise _fail("loop", f"ticket {t} handed over twice")
        got[t] = list(comps)

    def drain() -> None:
        for _ in range(100_000):
            if not loop.in_flight:
                return
            loop.poll(on_result)
        raise _fail("loop", "poll made no progress")

    try:
        loop.poll(on_result)  # nothing in flight: returns at once
        tickets = [loop.submit(r) for r in reqs]
        gone = loop.submit(_req(ctx, "p3", [0, 1]))
        if loop.in_flight != 7:
            raise _fail("loop", f"in_flight is {loop.in_flight} with 7 samples submitted")
        tokens = loop.abort(gone)
        if not isinstance(tokens, int) or tokens < 0 or loop.in_flight != 5:
            raise _fail("loop", f"abort returned {tokens!r}, in_flight {loop.in_flight} (want 5)")
        drain()
        if sorted(got) != sorted(tickets):
            raise _fail("loop", f"handed over tickets {sorted(got)}, submitted {tickets} (+{gone} aborted)")
        for t, w in zip(tickets, want, strict=True):
            if [(*_key(c), c.finish_reason) for c in got[t]] != [(*_key(c), c.finish_reason) for c in w]:
                raise _fail("loop", f"ticket {t}: the loop's samples differ from generate's")
        if ctx.caps.streaming:
            seen: dict[int, list[int]] = {}

            def record(ev: TokenEvent) -> bool:
                seen.setdefault(ev.slot, []).append(ev.token_id)
                return False

            t = loop.submit(reqs[0], on_token=record)
            drain()
            for j, (c, w) in enumerate(zip(got[t], want[0], strict=True)):
                if not _same(c, w) or seen.get(j) != list(c.token_ids or ()):
                    raise _fail("loop", f"streamed sample {j}: tokens or completion differ")
    finally:
        loop.close()


#: checks that run only when the engine declares the capability named with them
_CAPABILITY_CHECKS = {
    "logprob_modes": None,
    "token_prefixes": "token_prefixes",
    "chunked": "token_prefixes",
    "scoring": "scoring",
    "streaming": "streaming",
}


ENGINE_CHECKS: dict[str, Callable[[_Ctx], None]] = {
    "info": _check_info,
    "shapes": _check_shapes,
    "reproducible": _check_reproducible,
    "distinct": _check_distinct,
    "explicit_seeds": _check_explicit_seeds,
    "stop": _check_stop,
    "max_tokens": _check_max_tokens,
    "prefix": _check_prefix,
    "top_logprobs": _check_top_logprobs,
    "chat": _check_chat,
    "logprob_modes": _check_logprob_modes,
    "token_prefixes": _check_token_prefixes,
    "chunked": _check_chunked,
    "scoring": _check_scoring,
    "streaming": _check_streaming,
    "loop": _check_loop,
}


def _declared(ctx: _Ctx, name: str) -> bool:
    if name not in _CAPABILITY_CHECKS:
        return True
    cap = _CAPABILITY_CHECKS[name]
    return bool(ctx.caps.logprob_modes) if cap is None else ctx.caps.has(cap)


def check_engine(
    engine: Engine,
    *,
    prompt: str = "Once upon a time",
    messages: Sequence[Mapping[str, str]] | None = None,
    max_tokens: int = 24,
    seed: int = 1234,
    tol: float = 1e-6,
    strict_prefix: bool = True,
    skip: Collection[str] = (),
    only: Collection[str] | None = None,
) -> list[str]:
    """Run the engine contract suite; return the names of the checks run.

    Checks (``ENGINE_CHECKS``): ``info``; ``shapes`` (one list per request, one completion per
    index in order, ``on_result`` once per request, consistent token counts, finite logprobs
    whose sum equals ``cumulative_logprob`` within ``tol`` relative); ``reproducible`` (same
    seed, same sample, whatever the batch); ``distinct`` (indices differ at temperature 1);
    ``explicit_seeds``; ``stop`` (text trimmed at the first stop string, ``finish_reason``
    ``stop``); ``max_tokens`` (a shorter budget is a prefix, ``finish_reason`` ``length``);
    ``prefix`` (greedy continuation from half of a greedy text reproduces the rest; with
    ``strict_prefix=False`` only that it generates: subword tokenizers may re-tokenize a prefix
    differently); ``top_logprobs``; ``chat``. Then, for what ``engine.capabilities`` declares
    (a check of an undeclared capability is not run, and not listed): ``logprob_modes`` (every
    declared mode filled; proposal = target at temperature 1, 0 when greedy, different at
    temperature 0.5); ``token_prefixes`` (a greedy trace continued from its exact token ids,
    as prompt text + ids and as prompt ids + ids, conditions on exactly those ids and reproduces
    the rest; chunked sampling with the same seeds is reproducible); ``chunked``
    (:func:`~ttscale.engines.base.generate_chunked` equals one call, with stop strings and
    ``min_tokens``); ``scoring`` (scores equal the generation's raw log-probabilities within
    1e-4, whole or after a token prefix); ``streaming`` (every token streamed, then aborting one
    trace mid-batch cuts it there and leaves the others unchanged). Last, ``loop``: the engine
    loop (:func:`~ttscale.engines.loop.open_loop`) hands over what ``generate`` returns and
    drops an aborted request (streamed too, where declared). ``skip``/``only`` select checks by
    name.
    """
    unknown = set(skip) | set(only or ())
    unknown -= set(ENGINE_CHECKS)
    if unknown:
        raise ConfigError(
            f"unknown engine checks {sorted(unknown)}; known: {sorted(ENGINE_CHECKS)}"
        )
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed, logprobs=0)
    try:
        caps = capabilities_of(engine)
    except ConfigError as e:
        raise _fail("info", str(e)) from e
    ctx = _Ctx(engine, prompt, messages, params, tol, strict_prefix, caps)
    ran = []
    for name, fn in ENGINE_CHECKS.items():
        if name in skip or (only is not None and name not in only) or not _declared(ctx, name):
            continue
        fn(ctx)
        ran.append(name)
    return ran


# ---- samplers --------------------------------------------------------------------------------


class SamplerContractError(AssertionError):
    """A sampler broke its contract; the message names the check."""


class _Recording:
    """Wraps an engine: counts every generated token, and fails after ``fail_after`` samples.

    Requests are passed on one index at a time (with their own seed), so a failure can stop
    mid-request like a real engine's and hand back the samples finished so far as ``partial``.
    """

    def __init__(self, inner: Engine, fail_after: int | None = None) -> None:
        self.inner = inner
        self.fail_after = fail_after
        self.samples = 0
        self.tokens = 0
        self.keys: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:  # capabilities, tokenizer, ... of the inner engine
        return getattr(self.inner, name)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: Callable[[int, list[Completion]], None] | None = None,
        on_token: Callable[[Any], bool | None] | None = None,
    ) -> list[list[Completion]]:
        from dataclasses import replace

        from ttscale.engines.base import GenerationError

        results: list[list[Completion] | None] = [None] * len(requests)
        for pos, req in enumerate(requests):
            comps: list[Completion] = []
            for j, index in enumerate(req.indices):
                if self.fail_after is not None and self.samples >= self.fail_after:
                    raise GenerationError(
                        f"check_sampler: injected failure after {self.samples} samples",
                        results,
                        {pos: comps},
                    )
                one = replace(req, indices=(index,), seeds=(req.seed_for(j, params),))
                kw: dict[str, Any] = {}
                if on_token is not None:  # a streaming sampler: events keep the caller's positions
                    kw["on_token"] = lambda ev, pos=pos, j=j: on_token(
                        replace(ev, request=pos, slot=j)
                    )
                (c,) = self.inner.generate([one], params, **kw)[0]
                comps.append(c)
                self.samples += 1
                self.tokens += c.num_tokens + c.discarded_tokens
                self.keys.append((c.problem_id, c.index))
            results[pos] = comps
            if on_result is not None:
                on_result(pos, comps)
        return [r for r in results if r is not None]

    def info(self) -> dict[str, Any]:
        return dict(self.inner.info())

    def close(self) -> None:
        pass


def _sfail(check: str, msg: str) -> SamplerContractError:
    return SamplerContractError(f"check_sampler[{check}]: {msg}")


def _cand_key(c: Any) -> tuple[Any, ...]:
    comp = c.completion
    return (comp.problem_id, comp.index, c.step, c.parent, comp.text, comp.token_ids, c.fate)


SAMPLER_CHECKS = ("results", "reproducible", "prefix", "accounting", "sink", "salvage", "resume")


def check_sampler(
    make_sampler: Callable[[Engine], Any],
    engine: Engine | None = None,
    *,
    problems: Sequence[Any] | None = None,
    budget: int = 4,
    seed: int = 1234,
    skip: Collection[str] = (),
) -> list[str]:
    """Run the sampler contract suite; return the names of the checks run.

    ``make_sampler(engine)`` builds the sampler under test around ``engine`` (the suite wraps
    the engine to count tokens and inject failures); ``engine`` defaults to the scripted toy
    model. Checks (``SAMPLER_CHECKS``):

    * ``results``: one frozen :class:`~ttscale.samplers.SampleResult` per problem, in order,
      with candidates of that problem and at least one kept;
    * ``reproducible``: the same seed gives the same candidates, another seed others;
    * ``prefix``: for iid results, the candidates of ``budget`` are the first ones of
      ``2 * budget`` (seeds are per (problem, index));
    * ``accounting``: ``generated_tokens`` summed over results equals the tokens the engine
      generated, discarded traces included, and every generated trace is a candidate;
    * ``sink``: a store passed as ``sink`` holds every candidate, and its accounting every token;
    * ``salvage``: an engine failing part-way raises, and the sink keeps every sample the engine
      finished before the failure (none lost; a step-wise sampler may keep the steps of a problem
      left unfinished in its journal, :func:`ttscale.samplers.stepwise.salvaged_keys`);
    * ``resume``: sampling again into that sink generates only what is missing and returns the
      results of an uninterrupted run.
    """
    import tempfile

    from ttscale.engines.base import GenerationError
    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.samplers.base import SampleResult
    from ttscale.store import SampleStore
    from ttscale.types import Problem

    unknown = set(skip) - set(SAMPLER_CHECKS)
    if unknown:
        raise ConfigError(
            f"unknown sampler checks {sorted(unknown)}; known: {list(SAMPLER_CHECKS)}"
        )
    check_int("budget", budget, min=1)
    base = engine if engine is not None else ScriptedEngine()
    probs = list(problems or [Problem(id=f"q{i}", prompt=f"question {i}: ") for i in range(3)])

    def run(eng: Engine, b: int, s: int, sink: Any = None) -> list[SampleResult]:
        return list(make_sampler(eng).sample(probs, b, seed=s, sink=sink))

    ran: list[str] = []
    rec = _Recording(base)
    first = run(rec, budget, seed)
    if "results" not in skip:
        if [r.problem_id for r in first] != [p.id for p in probs]:
            raise _sfail("results", f"problems {[r.problem_id for r in first]}, expected "
                                    f"{[p.id for p in probs]} in order")  # fmt: skip
        for r in first:
            if not isinstance(r, SampleResult):
                raise _sfail("results", f"sample() yielded {type(r).__name__}, not SampleResult")
            if not r.kept:
                raise _sfail("results", f"problem {r.problem_id!r} has no kept candidate")
            if any(c.completion.problem_id != r.problem_id for c in r.candidates):
                raise _sfail("results", f"problem {r.problem_id!r} holds another's candidates")
            try:
                r.candidates = ()  # type: ignore[misc]
            except AttributeError:
                pass
            else:
                raise _sfail("results", "SampleResult is not frozen")
        ran.append("results")
    if "reproducible" not in skip:
        again = run(_Recording(base), budget, seed)
        if [[_cand_key(c) for c in r.candidates] for r in again] != [
            [_cand_key(c) for c in r.candidates] for r in first
        ]:
            raise _sfail("reproducible", "two runs with the same seed drew different candidates")
        other = run(_Recording(base), budget, seed + 1)
        if [[c.text for c in r.candidates] for r in other] == [
            [c.text for c in r.candidates] for r in first
        ]:
            raise _sfail("reproducible", "another seed drew the same candidates")
        ran.append("reproducible")
    if "prefix" not in skip:
        if all(r.iid for r in first):
            bigger = run(_Recording(base), 2 * budget, seed)
            for small, big in zip(first, bigger, strict=True):
                head = [_cand_key(c) for c in big.candidates][: len(small.candidates)]
                if head != [_cand_key(c) for c in small.candidates]:
                    raise _sfail(
                        "prefix",
                        f"problem {small.problem_id!r}: the candidates of budget {budget} are not "
                        f"the first ones of budget {2 * budget}",
                    )
        ran.append("prefix")
    if "accounting" not in skip:
        spent = sum(r.generated_tokens for r in first)
        if spent != rec.tokens:
            raise _sfail("accounting", f"results count {spent} generated tokens, the engine "
                                       f"generated {rec.tokens}")  # fmt: skip
        held = sum(len(r.candidates) for r in first)
        if held != rec.samples:
            raise _sfail("accounting", f"the engine generated {rec.samples} traces but the "
                                       f"results hold {held} candidates")  # fmt: skip
        ran.append("accounting")
    with tempfile.TemporaryDirectory(prefix="ttscale-check-sampler-") as tmp:
        if "sink" not in skip:
            store = SampleStore.create(f"{tmp}/sink", {"model": "check_sampler"})
            rec = _Recording(base)
            run(rec, budget, seed, store)
            stored = store.keys()
            if set(rec.keys) - stored:
                raise _sfail(
                    "sink", f"the sink misses samples {sorted(set(rec.keys) - stored)[:3]}"
                )
            acct = store.accounting().get("generated_tokens")
            if acct != rec.tokens:
                raise _sfail("sink", f"the sink accounts {acct} generated tokens, the engine "
                                     f"generated {rec.tokens}")  # fmt: skip
            ran.append("sink")
        if "salvage" not in skip or "resume" not in skip:
            store = SampleStore.create(f"{tmp}/salvage", {"model": "check_sampler"})
            cut = max(1, rec.samples // 2) if rec.samples > 1 else 0
            failing = _Recording(base, fail_after=cut)
            try:
                run(failing, budget, seed, store)
            except GenerationError:
                pass
            else:
                raise _sfail("salvage", "an engine failure did not propagate")
            store.refresh()
            # a step-wise sampler journals the steps of a problem it was inside (its candidates'
            # fates are known only once the problem is done); a resume replays them
            from ttscale.samplers.stepwise import salvaged_keys

            lost = set(failing.keys) - store.keys() - salvaged_keys(store)
            if "salvage" not in skip:
                if lost:
                    raise _sfail("salvage", f"samples {sorted(lost)[:3]} finished before the "
                                            "failure were not stored")  # fmt: skip
                ran.append("salvage")
            if "resume" not in skip:
                healthy = _Recording(base)
                resumed = run(healthy, budget, seed, store)
                if [[_cand_key(c) for c in r.candidates] for r in resumed] != [
                    [_cand_key(c) for c in r.candidates] for r in first
                ]:
                    raise _sfail("resume", "a resumed run differs from an uninterrupted one")
                twice = set(healthy.keys) & set(failing.keys)
                if twice:
                    raise _sfail("resume", f"resuming generated stored samples again: "
                                           f"{sorted(twice)[:3]}")  # fmt: skip
                ran.append("resume")
    return ran


# ---- verifiers -------------------------------------------------------------------------------


class VerifierContractError(AssertionError):
    """A verifier broke its contract; the message names the check."""


#: candidates no verifier may raise on (empty, whitespace, binary noise, huge, unbalanced)
BAD_CANDIDATES = (
    "",
    "   \n\t",
    "\x00\x01\x02\ufffd",
    "}{)(][ \\boxed{ \\frac{",
    "def f(:\n    return",
    "9" * 5000,
    "answer: " + "x" * 20000,
)


def check_verifier(
    verifier: Any,
    problem: Any,
    candidates: Sequence[str],
    *,
    bad: Sequence[str] = BAD_CANDIDATES,
) -> list[Any]:
    """Run the verifier contract suite on ``problem``; return the verdicts of ``candidates``.

    Checks: ``verify(problem, samples)`` returns one :class:`~ttscale.types.Verdict` per sample,
    in order (same problem id and index, even with indices out of order); a bad candidate
    (``bad``: empty, binary noise, unparsable, huge) is a verdict status, never an exception;
    the same samples give the same verdicts again; ``info()`` is a JSON-serialisable mapping.
    """
    import json

    from ttscale.types import Sample, Verdict, VerdictStatus

    def vfail(msg: str) -> VerifierContractError:
        return VerifierContractError(f"check_verifier: {msg}")

    texts = [*candidates, *bad]
    # indices deliberately not 0..k-1 in order: verdicts follow the samples, not the indices
    idx = [3 * k + 1 for k in range(len(texts))][::-1]
    samples = [
        Sample(problem_id=problem.id, index=i, text=t) for i, t in zip(idx, texts, strict=True)
    ]
    try:
        out = verifier.verify(problem, samples)
    except Exception as e:
        raise vfail(f"verify raised {type(e).__name__}: {e} (a bad candidate must be a "
                    "verdict status)") from e  # fmt: skip
    out = list(out)
    if len(out) != len(samples):
        raise vfail(f"{len(out)} verdicts for {len(samples)} samples")
    for s, v in zip(samples, out, strict=True):
        if not isinstance(v, Verdict):
            raise vfail(f"verify returned {type(v).__name__}, not Verdict")
        if (v.problem_id, v.index) != (s.problem_id, s.index):
            raise vfail(f"verdict for {(v.problem_id, v.index)} where {s.key} was expected "
                        "(one verdict per sample, in order)")  # fmt: skip
        if not isinstance(v.status, VerdictStatus):
            raise vfail(f"status {v.status!r} is not a VerdictStatus")
    again = list(verifier.verify(problem, samples))
    if [(v.status, v.answer, v.correct) for v in again] != [
        (v.status, v.answer, v.correct) for v in out
    ]:
        raise vfail("the same samples got different verdicts on a second call")
    info = verifier.info()
    if not isinstance(info, Mapping):
        raise vfail(f"info() returned {type(info).__name__}, not a mapping")
    try:
        json.dumps(info)
    except (TypeError, ValueError) as e:
        raise vfail(f"info() is not JSON-serialisable ({e})") from e
    return out[: len(candidates)]
