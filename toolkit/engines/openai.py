"""OpenAI-compatible HTTP engine (``vllm serve``, SGLang, hosted APIs) over httpx.

One HTTP request per sample by default (``seed`` = the sample's seed), or, with ``n_fanout=True``
on servers that give child ``j`` of an ``n``-request the seed ``seed + j`` (vLLM does), one
request per run of consecutive seeds. Requests are spread over several base URLs (least busy
first, round robin between equals; a retry prefers another server), with at most
``max_concurrency`` in flight. 429, 5xx, timeouts and dropped connections are retried with
exponential backoff and jitter (a ``Retry-After`` header is honoured, up to 300 s); other HTTP
errors fail at once. A request that fails for good stops new work: requests already in flight
finish and are delivered (``on_result``), then :class:`~ttscale.engines.base.GenerationError`
carries every completed request and the finished samples of unfinished ones.

:meth:`OpenAIEngine.open_loop` takes work continuously (:mod:`ttscale.engines.loop`): the same
calls, sent as requests are submitted from one asyncio thread (one ``httpx.AsyncClient`` for
the engine's loops, ``max_concurrency`` calls in flight over all of them), with the same retry
policy; an abort closes the request's connections at once.

Token ids come from vLLM's ``return_tokens_as_token_ids`` (``"token_id:123"`` strings); servers
that do not support it return token strings, and ``token_ids`` is then ``None``.

Capabilities (``engine.capabilities``) follow ``token_prompts``: a vLLM server accepts a token-id
array as ``prompt``, tokenises on ``POST /tokenize`` and reports what it conditioned on
(``return_token_ids``). With ``token_prompts=True`` (declared by the caller) or ``"auto"`` (a probe
of the first server at construction) the engine declares ``token_prefixes`` (requests with token
ids go to ``/completions`` as token arrays), ``scoring`` (``echo`` + ``logprobs`` with
``max_tokens=0``: the server's prompt log-probabilities, untempered), ``streaming``
(``stream=true``; the events carry token ids; an abort closes that request's connection, which a
vLLM server turns into a request abort) and the server's ``logprob_mode`` (as given; a vLLM
server's ``--logprobs-mode``). In ``processed_logprobs`` mode each finished sample is also scored
(one more echo request) for its raw ``target_logprobs``, so both modes are declared; greedy
proposals are one-hot (0). Without ``token_prompts`` none of this is declared and requests with
token ids are refused. ``decode`` needs the model's tokenizer
locally (``tokenizer=``, else the ``root`` that vLLM's ``GET /v1/models`` reports).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ttscale.engines.base import (
    EngineCapabilities,
    GenerationRequest,
    ResultCallback,
    ResultCollector,
    TokenCallback,
    TokenEvent,
    continuation_text,
    seed_runs,
)
from ttscale.engines.loop import BatchLoop, EngineLoop, LoopFailure, LoopResult, hand_over
from ttscale.errors import ConfigError, EngineError
from ttscale.types import Completion, SamplingParams
from ttscale.validation import check_int, check_number

__all__ = ["OpenAIEngine", "parse_retry_after"]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
_TOKEN_ID_PREFIX = "token_id:"
_MAX_RETRY_AFTER = 300.0  # seconds: honour Retry-After, but never park a worker for hours


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class _Call:
    """One HTTP request: samples ``slots[start:start+n]`` of request ``pos``."""

    pos: int
    start: int
    n: int
    seed: int


class _Started(Exception):
    """A streamed response failed after handing out events: not retried (they were used)."""


@dataclass
class _StreamTrace:
    """One streamed sample, owned by the caller's thread."""

    pos: int
    slot: int
    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    prompt: list[int] | None = None
    discarded: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None

    def finish(
        self,
        req: GenerationRequest,
        params: SamplingParams,
        text: str,
        finish_reason: str,
        stop_reason: str | int | None,
        mode: str | None,
    ) -> None:
        lps = tuple(self.lps) if params.logprobs is not None else None
        self.completion = Completion(
            problem_id=req.problem_id,
            index=self.index,
            text=text,
            token_ids=tuple(self.tokens),
            token_logprobs=lps,
            top_logprobs=tuple(self.tops) if lps is not None and params.logprobs else None,
            cumulative_logprob=math.fsum(lps) if lps is not None else None,
            num_tokens=len(self.tokens),
            finish_reason=finish_reason,
            seed=self.seed,
            prompt_token_ids=tuple(self.prompt) if self.prompt is not None else None,
            stop_reason=stop_reason,
            target_logprobs=lps if mode == "raw_logprobs" else None,
            proposal_logprobs=lps if mode == "processed_logprobs" else None,
            discarded_tokens=self.discarded,
        )


def _chunk_tokens(choice: Mapping[str, Any]) -> list[int] | None:
    """The token ids of one streamed event (``token_ids``, else ``token_id:N`` strings)."""
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens is None:
        return [] if not choice.get("text") else None
    ids = [_token_id(t) for t in tokens]
    return None if any(i is None for i in ids) else [i for i in ids if i is not None]


def _top_map(raw: Mapping[str, Any] | None, tok: int, value: float | None) -> dict[int, float]:
    top: dict[int, float] = {}
    for k, v in (raw or {}).items():
        tid = _token_id(k)
        if tid is not None and v is not None:
            top[tid] = float(v)
    if value is not None:
        top.setdefault(tok, value)
    return top


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Attempts:
    """The retry policy of one POST, shared by the blocking (:meth:`OpenAIEngine._post`) and the
    async (:meth:`OpenAIEngine._apost`) paths: which server each attempt goes to (least busy
    first; a retry prefers another), the busy counts and stats, which failures are retried, and
    the backoff before the next attempt (``Retry-After`` honoured)."""

    def __init__(self, engine: OpenAIEngine, path: str, root: bool, retries: int | None) -> None:
        self.engine = engine
        self.path = path
        self.root = root
        self.max_retries = engine.max_retries if retries is None else retries
        self.attempt = 0
        self.server: int | None = None
        self.url = ""
        httpx = engine._httpx
        #: what :meth:`failed` handles (anything else propagates at once)
        self.retried: tuple[type[BaseException], ...] = (
            _Started,
            _Retryable,
            httpx.TimeoutException,
            httpx.TransportError,
        )

    def begin(self) -> str:
        """Pick the server of the next attempt (counted busy until :meth:`end`): its URL."""
        eng = self.engine
        self.server = eng._pick(avoid=self.server if len(eng.base_urls) > 1 else None)
        base = eng.base_urls[self.server]
        with eng._lock:
            eng.stats["requests"] += 1
        self.url = (base.removesuffix("/v1") if self.root else base) + self.path
        return self.url

    def end(self) -> None:
        eng = self.engine
        if self.server is not None:
            with eng._lock:
                eng._busy[self.server] -= 1

    def failed(self, e: BaseException) -> float:
        """The delay before the next attempt after ``e``; raises :class:`EngineError` when ``e``
        is not retried (a stream that handed out events) or the attempts are used up."""
        eng, url = self.engine, self.url
        if isinstance(e, _Started):
            raise EngineError(f"stream from {url} failed after its first tokens: {e}") from e
        last = e if isinstance(e, _Retryable) else _Retryable(f"{type(e).__name__} talking to {url}: {e}")
        if self.attempt >= self.max_retries:
            with eng._lock:
                eng.stats["failures"] += 1
            raise EngineError(f"gave up after {self.max_retries + 1} attempts: {last}") from e
        delay = eng._delay(self.attempt, last.retry_after)
        self.attempt += 1
        with eng._lock:
            eng.stats["retries"] += 1
        log.warning("%s; retry %d/%d in %.2fs", last, self.attempt, self.max_retries, delay)
        return delay


def _json_of(resp: Any, url: str) -> dict:
    try:
        return resp.json()  # type: ignore[no-any-return]
    except ValueError as e:
        raise _Retryable(f"invalid JSON from {url}: {_snippet(resp.text)}") from e


def _sse_choices(line: str) -> list[Mapping[str, Any]] | None:
    """The choices of one server-sent-events line (``[]`` for other lines; ``None`` at the end)."""
    if not line.startswith("data:"):
        return []
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    return list(json.loads(data).get("choices") or [])


class OpenAIEngine:
    """An OpenAI-compatible server (or several) behind the Engine protocol.

    ``model``: the served model name. ``base_urls``: one or more URLs ending in ``/v1``.
    ``chat=True`` sends text prompts to ``/chat/completions`` as a user message (for chat-only
    APIs); ``messages`` requests always use the chat endpoint, and a ``prefix`` there continues
    the assistant message (vLLM's ``continue_final_message``). ``timeout`` is per HTTP request
    in seconds; ``max_retries`` retries after the first attempt; ``backoff=(first, factor, cap)``
    gives attempt ``a``'s delay ``min(cap, first * factor**a)``, jittered to ``[d/2, d]``.
    ``token_ids=True`` asks vLLM for token ids; ``vllm_extras=True`` sends vLLM's sampling fields
    (``top_k``, ``min_p``, ``min_tokens``, ``include_stop_str_in_output``) where they are not
    defaults. ``logprob_mode`` records what the server reports (vLLM's default is raw).
    ``transport`` is an ``httpx`` transport for tests. ``loop``: how :meth:`open_loop` drives
    the server: ``"async"`` (default) sends each request's calls as it is submitted, from one
    asyncio thread; ``"batch"`` gathers what is pending at each poll into one blocking
    :meth:`generate` (a thread per call). Samples are the same either way; on a server that
    shares its CPUs with the client, step-wise samplers (SMC, beam, DVTS) ran faster with
    ``"batch"`` (benchmarks/RESULTS.md, issue 16).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_urls: Sequence[str] | str,
        *,
        api_key: str | None = None,
        chat: bool = False,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: tuple[float, float, float] = (0.5, 2.0, 30.0),
        n_fanout: bool = False,
        token_ids: bool = True,
        vllm_extras: bool = True,
        logprob_mode: str = "raw_logprobs",
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        jitter_seed: int | None = None,
        transport: Any = None,
        token_prompts: bool | Literal["auto"] = False,
        tokenizer: Any = None,
        loop: Literal["async", "batch"] = "async",
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls or not all(
            isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls
        ):
            raise ConfigError(f"base_urls must be http(s) URLs, got {base_urls!r}")
        check_int("max_concurrency", max_concurrency, min=1)
        check_number("timeout", timeout, low=0.0, low_open=True, unit="seconds")
        check_int("max_retries", max_retries, min=0)
        if len(backoff) != 3 or backoff[0] < 0 or backoff[1] < 1 or backoff[2] < backoff[0]:
            raise ConfigError(
                f"backoff must be (first >= 0, factor >= 1, cap >= first), got {backoff!r}"
            )
        try:
            import httpx
        except ImportError as e:  # pragma: no cover - httpx is a core dependency
            raise EngineError("the openai engine needs httpx: pip install httpx") from e
        self.model = model
        self.base_urls = [u.rstrip("/") for u in urls]
        self.chat = chat
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = tuple(float(b) for b in backoff)
        self.n_fanout = n_fanout
        self.token_ids = token_ids
        self.vllm_extras = vllm_extras
        self.logprob_mode = logprob_mode
        self.extra_body = dict(extra_body or {})
        self._httpx = httpx
        hdrs = {"Content-Type": "application/json", **dict(headers or {})}
        if api_key:
            hdrs["Authorization"] = f"Bearer {api_key}"
        # every connection may stay open between calls (httpx keeps 20 by default): with more
        # calls in flight than that, the rest would be closed and opened again for each call
        conns = max_concurrency * len(urls) + 4
        self._limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        self._client = httpx.Client(
            headers=hdrs, timeout=httpx.Timeout(self.timeout), limits=self._limits,
            transport=transport,
        )  # fmt: skip
        self._transport = transport  # for the engine loop's async client (see open_loop)
        self._headers = hdrs
        # the engine loop's event-loop thread and async client, shared by every open loop
        self._runtime: _Runtime | None = None
        self._runtime_users = 0
        self._runtime_lock = threading.Lock()
        self._lock = threading.Lock()
        self._busy = [0] * len(self.base_urls)
        self._turn = 0
        self._jitter = random.Random(jitter_seed)
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._server_version: str | None = None
        self._tokenizer: Any = tokenizer
        self._tokenized: dict[str, list[int]] = {}  # /tokenize answers (bounded, see _tokenize)
        if token_prompts == "auto":
            token_prompts = self.probe_token_prompts()
        elif not isinstance(token_prompts, bool):
            raise ConfigError(f"token_prompts must be True, False or 'auto', got {token_prompts!r}")
        self.token_prompts = token_prompts
        if loop not in ("async", "batch"):
            raise ConfigError(f"loop must be 'async' or 'batch', got {loop!r}")
        self.loop = loop
        # processed mode + scoring: the raw (target) log-probs come from scoring the tokens
        self._both = token_prompts and logprob_mode == "processed_logprobs"
        modes = {logprob_mode, "raw_logprobs"} if self._both else {logprob_mode}
        self.capabilities = EngineCapabilities(
            token_prefixes=token_prompts,
            scoring=token_prompts,
            streaming=token_prompts,
            logprob_modes=frozenset(modes if token_prompts else ()),
        )

    # -- token prompts -----------------------------------------------------------------------------
    @property
    def _root(self) -> str:
        return self.base_urls[0].removesuffix("/v1")

    def probe_token_prompts(self) -> bool:
        """Whether the first server takes token-id prompts, tokenises and echoes prompt
        log-probabilities (what ``token_prompts`` declares): one ``/tokenize`` and one
        ``max_tokens=0`` echo request. Any failure reads as no."""
        try:
            ids = self._post("/tokenize", {"model": self.model, "prompt": "a"}, root=True)["tokens"]
            body = {
                "model": self.model,
                "prompt": ids,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 0,
                "return_tokens_as_token_ids": True,
                "return_token_ids": True,
            }
            (choice,) = self._post("/completions", body, retries=0)["choices"]
            seen = [_token_id(t) for t in (choice.get("logprobs") or {}).get("tokens") or []]
            ok = seen == list(ids) and choice.get("prompt_token_ids") == list(ids)
        except (EngineError, KeyError, TypeError, ValueError) as e:
            log.info("token prompts probe of %s failed: %s", self._root, e)
            return False
        log.info("token prompts probe of %s: %s", self._root, "yes" if ok else "no")
        return ok

    def _require_tokens(self, req: GenerationRequest, what: str) -> None:
        if not self.token_prompts:
            raise ConfigError(
                f"engine 'openai' cannot continue from token ids ({what} for {req.problem_id!r}) "
                "without token prompts; pass token_prompts=True (a vLLM server) or 'auto' to probe"
            )

    def prompt_token_ids(self, req: GenerationRequest) -> list[int]:
        """The token ids a request's context is (the server's ``/tokenize`` for text and chat),
        in the same order as :meth:`ttscale.engines.vllm.VLLMEngine.prompt_token_ids`."""
        self._require_tokens(req, "a token-id context")
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            if req.prefix:
                ids += self._tokenize({"prompt": req.prefix, "add_special_tokens": False})
        elif req.prompt is not None:
            ids = self._tokenize({"prompt": req.prompt + req.prefix})
        else:
            msgs = [dict(m) for m in req.messages or ()]
            body: dict[str, Any] = {"messages": msgs}
            if req.prefix:
                msgs.append({"role": "assistant", "content": req.prefix})
                body.update(continue_final_message=True, add_generation_prompt=False)
            ids = self._tokenize(body)
        return ids + list(req.prefix_token_ids)

    def _tokenize(self, body: dict[str, Any]) -> list[int]:
        """The server's tokenisation (remembered: every sample of a problem shares its prompt)."""
        key = json.dumps(body, sort_keys=True)
        if key in self._tokenized:
            return list(self._tokenized[key])
        data = self._post("/tokenize", {"model": self.model, **body}, root=True)
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise EngineError(f"{self._root}/tokenize returned no tokens")
        ids = [int(t) for t in tokens]
        with self._lock:
            if len(self._tokenized) >= 4096:
                self._tokenized.clear()
            self._tokenized[key] = ids
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens skipped, with the model's tokenizer run locally
        (``tokenizer=``: a name or path for ``transformers.AutoTokenizer``, or an object with
        ``decode``; else the ``root`` of the served model from ``GET /v1/models``)."""
        tok = self._load_tokenizer()
        return str(tok.decode([int(t) for t in token_ids], skip_special_tokens=True))

    def _load_tokenizer(self) -> Any:
        tok = self._tokenizer
        if tok is not None and hasattr(tok, "decode"):
            return tok
        name = tok
        if name is None:
            try:
                resp = self._client.get(f"{self.base_urls[0]}/models")
                models = resp.json().get("data") or []
                name = next((m.get("root") for m in models if m.get("id") == self.model), None) or (
                    models[0].get("root") if models else None
                )
            except (self._httpx.HTTPError, ValueError, AttributeError) as e:
                raise EngineError(f"cannot find the tokenizer of {self.model!r}: {e}") from e
            if not name:
                raise ConfigError(
                    f"the server does not name the tokenizer of {self.model!r}; pass tokenizer="
                )
        try:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(name))
        except Exception as e:
            raise EngineError(f"cannot load tokenizer {name!r}: {e}; pass tokenizer=") from e
        return self._tokenizer

    # -- request bodies --------------------------------------------------------------------------
    def _body(
        self,
        req: GenerationRequest,
        params: SamplingParams,
        n: int,
        seed: int,
        *,
        tokens: bool = False,
    ) -> tuple[str, dict]:
        """``(path, body)`` of one request; ``tokens``: always a token-array completions request
        (streaming), even for chat messages."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.params_for(params).max_tokens,  # the request's own, if any
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
            "seed": seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if self.vllm_extras:
            if params.top_k:
                body["top_k"] = params.top_k
            if params.min_p:
                body["min_p"] = params.min_p
            if params.min_tokens:
                body["min_tokens"] = params.min_tokens
            if params.include_stop_str_in_output:
                body["include_stop_str_in_output"] = True
        if self.token_ids:
            body["return_tokens_as_token_ids"] = True
        if self.token_prompts:
            body["return_token_ids"] = True
        use_tokens = req.has_token_ids or tokens
        use_chat = (req.messages is not None or self.chat) and not use_tokens
        if use_chat:
            msgs = (
                [dict(m) for m in req.messages]
                if req.messages is not None
                else [{"role": "user", "content": req.prompt or ""}]
            )
            if req.prefix:
                msgs.append({"role": "assistant", "content": req.prefix})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = msgs
            if params.logprobs is not None:
                body["logprobs"] = True
                if params.logprobs:
                    body["top_logprobs"] = params.logprobs
            path = "/chat/completions"
        else:
            if use_tokens:
                body["prompt"] = self.prompt_token_ids(req)
            else:
                body["prompt"] = (req.prompt or "") + req.prefix
            if params.logprobs is not None:
                body["logprobs"] = params.logprobs
            path = "/completions"
        body.update(self.extra_body)
        return path, body

    # -- one HTTP request with retries -----------------------------------------------------------
    def _pick(self, avoid: int | None) -> int:
        with self._lock:
            order = sorted(
                range(len(self.base_urls)),
                key=lambda i: (i == avoid, self._busy[i], (i - self._turn) % len(self.base_urls)),
            )
            i = order[0]
            self._busy[i] += 1
            self._turn = (i + 1) % len(self.base_urls)
            return i

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        first, factor, cap = self.backoff
        d = min(cap, first * factor**attempt)
        with self._lock:
            d = d / 2 + self._jitter.random() * d / 2
        if retry_after is None:
            return d
        return max(d, min(retry_after, _MAX_RETRY_AFTER))

    def _post(
        self,
        path: str,
        body: dict,
        *,
        root: bool = False,
        retries: int | None = None,
        stream: Callable[[Any], dict] | None = None,
    ) -> dict:
        """POST with retries. ``root``: ``path`` is under the server root, not ``/v1``.
        ``stream``: read the response with it (a streamed body); retried only while it has
        handed out nothing (it raises :class:`_Started` around a failure after that)."""
        plan = _Attempts(self, path, root, retries)
        while True:
            url = plan.begin()
            try:
                try:
                    if stream is not None:
                        with self._client.stream("POST", url, json=body) as resp:
                            if resp.status_code >= 400:
                                resp.read()
                            self._check_status(resp, url)
                            return stream(resp)
                    resp = self._client.post(url, json=body)
                    self._check_status(resp, url)
                    return _json_of(resp, url)
                finally:
                    plan.end()
            except plan.retried as e:
                delay = plan.failed(e)
            time.sleep(delay)

    async def _apost(
        self,
        client: Any,
        path: str,
        body: dict,
        *,
        stream: Callable[[Any], Any] | None = None,
    ) -> dict:
        """:meth:`_post` on an ``httpx.AsyncClient`` (the engine loop): the same retry policy
        (:class:`_Attempts`); cancelling it (:class:`_Handle`) closes the connection at once,
        which a vLLM server turns into a request abort. ``stream``: an async reader of the
        response."""
        plan = _Attempts(self, path, False, None)
        while True:
            url = plan.begin()
            try:
                try:
                    if stream is not None:
                        async with client.stream("POST", url, json=body) as resp:
                            if resp.status_code >= 400:
                                await resp.aread()
                            self._check_status(resp, url)
                            return await stream(resp)  # type: ignore[no-any-return]
                    resp = await client.post(url, json=body)
                    self._check_status(resp, url)
                    return _json_of(resp, url)
                finally:
                    plan.end()
            except plan.retried as e:
                delay = plan.failed(e)
            await asyncio.sleep(delay)

    @staticmethod
    def _check_status(resp: Any, url: str) -> None:
        if resp.status_code in _RETRY_STATUS:
            raise _Retryable(
                f"HTTP {resp.status_code} from {url}: {_snippet(resp.text)}",
                parse_retry_after(resp.headers.get("retry-after")),
            )
        if resp.status_code >= 400:
            raise EngineError(f"HTTP {resp.status_code} from {url}: {_snippet(resp.text)}")

    def _call(
        self, req: GenerationRequest, call: _Call, params: SamplingParams
    ) -> list[Completion]:
        path, body = self._body(req, params, call.n, call.seed)
        return self._parse_call(req, call, params, self._post(path, body))

    def _parse_call(
        self, req: GenerationRequest, call: _Call, params: SamplingParams, data: dict
    ) -> list[Completion]:
        """The completions of one answered call (:meth:`_call`; the engine loop's calls)."""
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != call.n:
            raise EngineError(f"server returned {len(choices)} choices for n={call.n}")
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        out = []
        for k, choice in enumerate(choices):
            j = call.start + k
            if "prompt_token_ids" not in choice and data.get("prompt_token_ids"):
                choice = {**choice, "prompt_token_ids": data["prompt_token_ids"]}  # chat
            out.append(
                _parse_choice(
                    choice,
                    req,
                    j,
                    req.seed_for(j, params),
                    params,
                    prompt_tokens,
                    usage.get("completion_tokens") if call.n == 1 else None,
                    self._mode(),
                )
            )
        return [self._with_target(c, params) for c in out]

    def _calls(self, pos: int, req: GenerationRequest, params: SamplingParams) -> list[_Call]:
        """The HTTP calls of one request: one per sample, or (``n_fanout``) per seed run."""
        seeds = [req.seed_for(j, params) for j in range(len(req.indices))]
        fan = self.n_fanout and params.temperature > 0.0
        runs = seed_runs(seeds) if fan else [(j, 1) for j in range(len(seeds))]
        return [_Call(pos, start, n, seeds[start]) for start, n in runs]

    def _check_requests(
        self, requests: Sequence[GenerationRequest], on_token: TokenCallback | None
    ) -> None:
        for req in requests:
            if req.has_token_ids:
                self._require_tokens(req, "a request with token ids")
        if on_token is not None and not self.capabilities.streaming:
            raise ConfigError(
                "streaming (on_token=) needs token prompts on the openai engine; pass "
                "token_prompts=True (a vLLM server) or use generate_chunked"
            )

    def _mode(self) -> str | None:
        """The log-probability mode completions carry as target/proposal (None: not declared)."""
        return self.logprob_mode if self.token_prompts else None

    # -- the Engine protocol ---------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[list[Completion]]:
        """Generate; with ``on_token`` (capability ``streaming``) each sample is one
        ``stream=true`` request whose tokens are handed to ``on_token`` on the caller's thread;
        an abort closes that request's connection. A stream is retried only until its first
        event arrives."""
        self._check_requests(requests, on_token)
        if on_token is not None:
            return self._generate_streamed(requests, params, on_result, on_token)
        collector = ResultCollector(requests, on_result)
        calls = [c for pos, req in enumerate(requests) for c in self._calls(pos, req, params)]
        if not calls:
            return []
        error: BaseException | None = None
        # Set by the worker whose call failed, before its thread takes the next queued call:
        # cancelling the futures from this thread alone would race a worker that is already
        # free (it could start, even finish, new calls before this thread wakes up).
        stop = threading.Event()

        def run(call: _Call) -> list[Completion] | None:
            if stop.is_set():
                return None  # the batch already failed: no new work
            try:
                return self._call(requests[call.pos], call, params)
            except BaseException:
                stop.set()
                raise

        # callbacks run on this thread, in completion order
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(calls))) as pool:
            pending: dict[Future[list[Completion] | None], _Call] = {
                pool.submit(run, c): c for c in calls
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    call = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is None:
                        comps = fut.result()
                        if comps is None:
                            continue
                        try:
                            collector.put_many(call.pos, call.start, comps)
                        except BaseException as cb_error:  # on_result raised
                            exc = cb_error
                    if exc is not None and error is None:
                        error = exc
                        stop.set()
                        for other in pending:  # stop new work; in-flight calls finish
                            other.cancel()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            raise collector.failure("openai", error) from error
        return collector.results()

    def _generate_streamed(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        on_result: ResultCallback | None,
        on_token: TokenCallback,
    ) -> list[list[Completion]]:
        collector = ResultCollector(requests, on_result)
        traces = [
            _StreamTrace(pos, j, idx, req.seed_for(j, params))
            for pos, req in enumerate(requests)
            for j, idx in enumerate(req.indices)
        ]
        if not traces:
            return []
        events: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        mode = self._mode()
        error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(traces))) as pool:
            futures = [
                pool.submit(self._stream_call, requests[tr.pos], tr, k, params, events)
                for k, tr in enumerate(traces)
            ]
            open_ = len(traces)
            while open_:
                k, kind, payload = events.get()
                tr = traces[k]
                if kind in ("end", "error"):
                    open_ -= 1
                    if kind == "error" and not tr.done and error is None:
                        error = payload
                        for other in traces:  # stop the others; what finished is kept
                            other.cancel.set()
                    if kind == "end" and not tr.done and error is None:
                        error = EngineError("the stream ended without a finish reason")
                    continue
                if tr.done or error is not None:
                    tr.discarded += len(_chunk_tokens(payload) or ())
                    continue
                try:
                    if self._absorb(requests[tr.pos], tr, payload, params, on_token, mode):
                        tr.cancel.set()
                        assert tr.completion is not None
                        collector.put(tr.pos, tr.slot, self._with_target(tr.completion, params))
                except BaseException as e:  # a malformed event or on_token/on_result raised
                    error = e
                    for other in traces:
                        other.cancel.set()
            for fut in futures:
                fut.result()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            raise collector.failure("openai", error) from error
        return collector.results()

    def _stream_call(
        self,
        req: GenerationRequest,
        tr: _StreamTrace,
        k: int,
        params: SamplingParams,
        events: queue.Queue[tuple[int, str, Any]],
    ) -> None:
        """Worker: one ``stream=true`` request; every choice event goes to ``events``."""

        def read(resp: Any) -> dict:
            started = False
            try:
                for line in resp.iter_lines():
                    if tr.cancel.is_set():
                        return {}  # leaving the block closes the connection: the server aborts
                    choices = _sse_choices(line)
                    if choices is None:
                        break
                    for choice in choices:
                        events.put((k, "chunk", choice))
                        started = True
            except Exception as e:
                if started:
                    raise _Started(str(e)) from e
                raise
            return {}

        try:
            if tr.cancel.is_set():  # the batch already failed: do not start
                events.put((k, "end", None))
                return
            path, body = self._body(req, params, 1, tr.seed, tokens=True)
            body["stream"] = True
            self._post(path, body, stream=read)
            events.put((k, "end", None))
        except BaseException as e:
            events.put((k, "error", e))

    def _absorb(
        self,
        req: GenerationRequest,
        tr: _StreamTrace,
        choice: Mapping[str, Any],
        params: SamplingParams,
        on_token: TokenCallback,
        mode: str | None,
    ) -> bool:
        """Hand one streamed event's tokens to ``on_token``; True when the trace is done."""
        if choice.get("prompt_token_ids"):
            tr.prompt = [int(t) for t in choice["prompt_token_ids"]]
        new = _chunk_tokens(choice)
        if new is None:
            raise EngineError("the server streamed tokens without token ids")
        lp = choice.get("logprobs") or {}
        lps = list(lp.get("token_logprobs") or [])
        tops_raw = list(lp.get("top_logprobs") or [])
        want_lp = params.logprobs is not None
        if want_lp and len(lps) != len(new):
            raise EngineError("the server streamed tokens without their log-probabilities")
        tr.text += choice.get("text") or ""
        finish = choice.get("finish_reason")
        onehot = self._both and params.temperature == 0.0
        for t, tok in enumerate(new):
            tr.tokens.append(tok)
            value = float(lps[t]) if want_lp and lps[t] is not None else None
            top = _top_map(tops_raw[t] if t < len(tops_raw) else None, tok, value)
            if onehot and value is not None:  # greedy proposal: a point mass
                value, top = 0.0, {k: 0.0 if k == tok else -math.inf for k in top}
            if want_lp:
                tr.lps.append(-math.inf if value is None else value)
                tr.tops.append(top)
            last = finish is not None and t == len(new) - 1
            event = TokenEvent(
                request=tr.pos,
                slot=tr.slot,
                index=tr.index,
                token_id=tok,
                num_tokens=len(tr.tokens),
                logprob=value,
                top=top if want_lp and params.logprobs else None,
                finished=last,
            )
            if on_token(event) and not last:
                tr.discarded += len(new) - t - 1
                text = continuation_text(self.decode, req.prefix_token_ids, tr.tokens)
                tr.finish(req, params, text, "abort", None, mode)
                return True
        if finish is None:
            return False
        stop = choice.get("stop_reason")
        tr.finish(
            req, params, tr.text, finish, stop if isinstance(stop, (str, int)) else None, mode
        )
        return True

    # -- scoring ---------------------------------------------------------------------------------
    def score(
        self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, ...]]:
        """Raw log-probabilities of each continuation after its request's context: the server's
        prompt log-probabilities of ``context + continuation`` (``echo`` with ``logprobs`` and
        ``max_tokens=0``), one request per continuation, concurrently."""
        if len(requests) != len(continuations):
            raise ConfigError(
                f"score got {len(requests)} requests but {len(continuations)} continuations"
            )
        for req in requests:
            self._require_tokens(req, "scoring")
        conts = [[int(t) for t in c] for c in continuations]

        def one(req: GenerationRequest, cont: list[int]) -> tuple[float, ...]:
            if not cont:
                return ()
            ctx = self.prompt_token_ids(req)
            if not ctx:
                raise ConfigError(f"nothing to condition on for {req.problem_id!r}: empty prompt")
            return self._score_ids(ctx, cont)

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            futures = [pool.submit(one, r, c) for r, c in zip(requests, conts, strict=True)]
            return [f.result() for f in futures]

    def _score_ids(self, ctx: list[int], cont: list[int]) -> tuple[float, ...]:
        """Prompt log-probabilities of ``cont`` after ``ctx`` (one echo request)."""
        body = {
            "model": self.model,
            "prompt": ctx + cont,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
            "temperature": 0.0,
            "return_tokens_as_token_ids": True,
        }
        (choice,) = self._post("/completions", body)["choices"]
        lp = choice.get("logprobs") or {}
        tokens = [_token_id(t) for t in lp.get("tokens") or []]
        values = list(lp.get("token_logprobs") or [])
        if tokens[: len(ctx) + len(cont)] != ctx + cont or len(values) < len(ctx) + len(cont):
            raise EngineError("the server did not echo the scored tokens")
        tail = values[len(ctx) : len(ctx) + len(cont)]
        if any(v is None for v in tail):
            raise EngineError("the server returned no log-probability for a scored token")
        return tuple(float(v) for v in tail)

    def _with_target(self, comp: Completion, params: SamplingParams) -> Completion:
        """In ``processed_logprobs`` mode: add the raw (target) log-probabilities of the tokens,
        scored after the prompt the server reported (one more request); greedy proposals are
        one-hot (log-prob 0). Other modes: unchanged."""
        if not self._both or comp.token_logprobs is None:
            return comp
        tokens = list(comp.token_ids or ())
        if comp.prompt_token_ids is None:
            raise EngineError("the server did not report the prompt token ids to score")
        target = self._score_ids(list(comp.prompt_token_ids), tokens) if tokens else ()
        if params.temperature != 0.0:
            return replace(comp, target_logprobs=target)
        zeros = tuple(0.0 for _ in tokens)
        tops = comp.top_logprobs
        if tops is not None:
            tops = tuple(
                {k: (0.0 if k == tok else -math.inf) for k in top} | {tok: 0.0}
                for top, tok in zip(tops, tokens, strict=True)
            )
        return replace(
            comp,
            token_logprobs=zeros,
            proposal_logprobs=zeros,
            top_logprobs=tops,
            cumulative_logprob=0.0,
            target_logprobs=target,
        )

    def server_version(self) -> str:
        """The first server's version from vLLM's ``GET /version`` (``"unknown"`` elsewhere)."""
        if self._server_version is None:
            root = self.base_urls[0].removesuffix("/v1")
            try:
                resp = self._client.get(f"{root}/version", timeout=min(self.timeout, 5.0))
                version = resp.json().get("version") if resp.status_code == 200 else None
            except (self._httpx.HTTPError, ValueError, AttributeError):
                version = None
            self._server_version = str(version) if version else "unknown"
        return self._server_version

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self.server_version(),
            "httpx": self._httpx.__version__,
            "model": self.model,
            "base_urls": list(self.base_urls),
            "logprob_mode": self.logprob_mode,
            "chat": self.chat,
            "loop": self.loop,
        }

    # -- the engine loop --------------------------------------------------------------------------
    def open_loop(self, params: SamplingParams) -> EngineLoop:
        """Continuous generation (:mod:`ttscale.engines.loop`): each submitted request's HTTP
        calls (as :meth:`generate` makes them: one per sample, or per seed run with
        ``n_fanout``; ``stream=true`` per sample with ``on_token``) go out at once, at most
        ``max_concurrency`` in flight over every open loop of this engine (the rest queue), and
        a request comes back from the poll after its last call answered; the samples are the
        ones :meth:`generate` returns. ``abort`` cancels a request's calls at once: a queued
        call never starts, a call in flight closes its connection (a vLLM server aborts the
        request) and its retries stop. The calls run on one asyncio thread with one
        ``httpx.AsyncClient`` (one connection pool) shared by the engine's loops. An engine
        built with a test ``transport=`` that is not async, or with ``loop="batch"``, gets the
        batch fallback (:class:`~ttscale.engines.loop.BatchLoop`)."""
        if self.loop == "batch" or (
            self._transport is not None
            and not isinstance(self._transport, self._httpx.AsyncBaseTransport)
        ):
            return BatchLoop(self, params)
        return _OpenAILoop(self, params)

    def _acquire_runtime(self) -> _Runtime:
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = _Runtime(self)
            self._runtime_users += 1
            return self._runtime

    def _release_runtime(self) -> None:
        with self._runtime_lock:
            self._runtime_users -= 1
            rt = self._runtime if self._runtime_users <= 0 else None
            if rt is not None:
                self._runtime, self._runtime_users = None, 0
        if rt is not None:
            rt.close()

    def close(self) -> None:
        with self._runtime_lock:
            rt, self._runtime, self._runtime_users = self._runtime, None, 0
        if rt is not None:
            rt.close()
        self._client.close()

    def __repr__(self) -> str:
        return f"OpenAIEngine({self.model!r}, base_urls={self.base_urls!r})"


def _snippet(text: str, limit: int = 200) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[:limit] + "..."


def _token_id(token: Any) -> int | None:
    if isinstance(token, str) and token.startswith(_TOKEN_ID_PREFIX):
        try:
            return int(token[len(_TOKEN_ID_PREFIX) :])
        except ValueError:
            return None
    return None


def _parse_choice(
    choice: Mapping[str, Any],
    req: GenerationRequest,
    slot: int,
    seed: int,
    params: SamplingParams,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    mode: str | None = None,
) -> Completion:
    """A completions or chat choice -> Completion (token ids only where the server sent them)."""
    if "message" in choice:
        text = (choice.get("message") or {}).get("content") or ""
        entries = ((choice.get("logprobs") or {}).get("content")) or []
        tokens = [e.get("token") for e in entries]
        lps = [e.get("logprob") for e in entries]
        tops_raw = [
            {t.get("token"): t.get("logprob") for t in (e.get("top_logprobs") or [])}
            for e in entries
        ]
        has_lp = choice.get("logprobs") is not None
    else:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        tokens = list(lp.get("tokens") or [])
        lps = list(lp.get("token_logprobs") or [])
        tops_raw = [dict(d or {}) for d in (lp.get("top_logprobs") or [])]
        has_lp = choice.get("logprobs") is not None
    ids = [_token_id(t) for t in tokens]
    token_ids = (
        tuple(i for i in ids if i is not None) if ids and all(i is not None for i in ids) else None
    )
    if token_ids is None and isinstance(choice.get("token_ids"), list):
        token_ids = tuple(int(t) for t in choice["token_ids"])
    prompt_ids = choice.get("prompt_token_ids")
    token_lps: tuple[float, ...] | None = None
    tops: tuple[dict[int, float], ...] | None = None
    if params.logprobs is not None and has_lp:
        token_lps = tuple(-math.inf if v is None else float(v) for v in lps)
        if params.logprobs and token_ids is not None:
            found: list[dict[int, float]] = []
            for t, d in enumerate(tops_raw):
                top: dict[int, float] = {}
                for k, v in d.items():
                    tid = _token_id(k)
                    if tid is not None:
                        top[tid] = float(v)
                top.setdefault(token_ids[t], token_lps[t])
                found.append(top)
            tops = tuple(found) if len(found) == len(token_ids) else None
    num = len(token_ids) if token_ids is not None else (len(tokens) or completion_tokens or 0)
    stop_reason = choice.get("stop_reason")
    return Completion(
        problem_id=req.problem_id,
        index=req.indices[slot],
        text=text,
        token_ids=token_ids,
        token_logprobs=token_lps,
        top_logprobs=tops,
        cumulative_logprob=math.fsum(token_lps)
        if token_lps
        else (0.0 if token_lps is not None else None),
        num_tokens=num,
        finish_reason=choice.get("finish_reason") or "stop",
        seed=seed,
        prompt_tokens=len(prompt_ids) if isinstance(prompt_ids, list) else prompt_tokens,
        stop_reason=stop_reason if isinstance(stop_reason, (str, int)) else None,
        prompt_token_ids=tuple(prompt_ids) if isinstance(prompt_ids, list) else None,
        target_logprobs=token_lps if mode == "raw_logprobs" else None,
        proposal_logprobs=token_lps if mode == "processed_logprobs" else None,
    )


# -- the engine loop -----------------------------------------------------------------------------


class _Runtime:
    """One event-loop thread with one ``httpx.AsyncClient`` and the semaphore that holds every
    open loop of an engine to ``max_concurrency`` calls in flight."""

    def __init__(self, engine: OpenAIEngine) -> None:
        httpx = engine._httpx
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="ttscale-openai-loop", daemon=True
        )
        self.thread.start()

        async def setup() -> tuple[Any, asyncio.Semaphore]:
            client = httpx.AsyncClient(
                headers=engine._headers,
                timeout=httpx.Timeout(engine.timeout),
                limits=engine._limits,
                transport=engine._transport,
            )
            return client, asyncio.Semaphore(engine.max_concurrency)

        self.client, self.slots = self.run(setup()).result()

    def run(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Cancel every call still running, close the client's connections, join the thread."""

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.aclose()

        try:
            self.run(shutdown()).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            if not self.thread.is_alive():
                self.loop.close()


class _Handle:
    """Cancels one call of a loop. On the loop thread, through an anyio cancel scope: httpx's
    clean-up of a cancelled request is shielded from anyio cancellation, but a plain
    ``task.cancel()`` that lands in it leaves the connection taken in the pool (seen with
    httpcore 1.0: later calls then fail with ``PoolTimeout``)."""

    def __init__(self) -> None:
        self.scope: Any = None
        self.cancelled = False
        self.future: Future[None] | None = None

    def cancel(self) -> None:  # on the loop thread
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


@dataclass
class _Ticket:
    """One submitted request in an :class:`_OpenAILoop`."""

    request: GenerationRequest
    on_token: TokenCallback | None
    collector: ResultCollector
    calls: list[_Call]
    traces: list[_StreamTrace]
    handles: list[_Handle] = field(default_factory=list)
    #: tokens each stream has received so far (counted on the loop thread; for abort)
    received: list[int] = field(default_factory=list)


#: how long ``poll(max_steps=K)`` waits for a request to finish: K times this
_STEP_SECONDS = 0.005


class _OpenAILoop:
    """:meth:`OpenAIEngine.open_loop`: the :class:`~ttscale.engines.loop.EngineLoop` contract
    over asyncio HTTP calls. The calls run on the engine's loop thread and put what they get
    (a call's completions, a stream's events, its end or its error) on a queue; :meth:`poll`
    takes them on the caller's thread, where streamed tokens go to ``on_token`` and finished
    requests to ``on_result``."""

    def __init__(self, engine: OpenAIEngine, params: SamplingParams) -> None:
        self.engine = engine
        self.params = params
        self._rt: _Runtime | None = None
        self._next = 0
        self._live: dict[int, _Ticket] = {}
        self._events: queue.Queue[tuple[int, int, str, Any]] = queue.Queue()
        self._finished: list[tuple[int, list[Completion]]] = []
        self._failure: tuple[int, BaseException] | None = None
        self._mode = engine._mode()
        self._handles: list[_Handle] = []  # every call not known to have ended (for close)
        # set on the loop thread by the first call that fails: calls still waiting for a slot
        # do not start (the caller's poll, which then fails the loop, may come later)
        self._stopped = False

    @property
    def in_flight(self) -> int:
        return sum(len(tk.request.indices) for tk in self._live.values())

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> int:
        eng, params = self.engine, self.params
        eng._check_requests([request], on_token)
        if self._rt is None:
            self._rt = eng._acquire_runtime()
        t = self._next
        self._next += 1

        def finished(pos: int, comps: list[Completion], t: int = t) -> None:
            self._finished.append((t, comps))

        collector = ResultCollector([request], finished)
        if on_token is None:
            tk = _Ticket(request, None, collector, eng._calls(0, request, params), [])
            works = [
                functools.partial(self._call, t, k, request, c) for k, c in enumerate(tk.calls)
            ]
        else:
            traces = [
                _StreamTrace(0, j, idx, request.seed_for(j, params))
                for j, idx in enumerate(request.indices)
            ]
            tk = _Ticket(request, on_token, collector, [], traces, received=[0] * len(traces))
            works = [functools.partial(self._stream, t, k, tk) for k in range(len(traces))]
        self._live[t] = tk
        if len(self._handles) > 4 * self.engine.max_concurrency + 64:  # forget ended calls
            self._handles = [h for h in self._handles if h.future is None or not h.future.done()]
        for k, work in enumerate(works):
            h = _Handle()
            tk.handles.append(h)
            self._handles.append(h)
            h.future = self._rt.run(self._guard(h, t, k, work))
        return t

    def _cancel(self, tk: _Ticket, k: int | None = None) -> None:
        """Cancel the ticket's calls (``k``: that one) on the loop thread."""
        rt = self._rt
        if rt is None:
            return
        for h in tk.handles if k is None else [tk.handles[k]]:
            rt.loop.call_soon_threadsafe(h.cancel)

    # -- on the loop thread -------------------------------------------------------------------
    async def _guard(self, h: _Handle, t: int, k: int, work: Callable[[], Any]) -> None:
        """Run one call under its handle's cancel scope; a failure becomes an ``error`` event
        (a cancelled call puts nothing)."""
        import anyio

        if h.cancelled:  # aborted before it started
            return
        with anyio.CancelScope() as scope:
            h.scope = scope
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self._events.put((t, k, "error", e))

    async def _call(self, t: int, k: int, req: GenerationRequest, call: _Call) -> None:
        eng, params, rt = self.engine, self.params, self._rt
        assert rt is not None
        async with rt.slots:
            if self._stopped:  # an earlier call failed: the loop fails, nothing new goes out
                return
            try:
                # a token-id request is tokenised by the server (a blocking call): off the loop
                if req.has_token_ids:
                    path, body = await asyncio.to_thread(eng._body, req, params, call.n, call.seed)
                else:
                    path, body = eng._body(req, params, call.n, call.seed)
                data = await eng._apost(rt.client, path, body)
            except asyncio.CancelledError:
                raise
            except BaseException:
                # a live request's failed plain call fails the loop (streams' errors may not:
                # one after its trace was aborted is dropped), so stop the calls still queued
                if t in self._live:
                    self._stopped = True
                raise
        if eng._both:  # scoring the targets is one more (blocking) request per sample
            comps = await asyncio.to_thread(eng._parse_call, req, call, params, data)
        else:
            comps = eng._parse_call(req, call, params, data)
        self._events.put((t, k, "comps", comps))

    async def _stream(self, t: int, k: int, tk: _Ticket) -> None:
        eng, params, rt = self.engine, self.params, self._rt
        assert rt is not None
        tr = tk.traces[k]

        async def read(resp: Any) -> dict:
            started = False
            try:
                async for line in resp.aiter_lines():
                    choices = _sse_choices(line)
                    if choices is None:
                        break
                    for choice in choices:
                        tk.received[k] += len(_chunk_tokens(choice) or ())
                        self._events.put((t, k, "chunk", choice))
                        started = True
            except Exception as e:
                if started:  # its events were used: not retried
                    raise _Started(str(e)) from e
                raise
            return {}

        async with rt.slots:
            if self._stopped:  # an earlier plain call failed
                return
            path, body = await asyncio.to_thread(
                eng._body, tk.request, params, 1, tr.seed, tokens=True
            )
            body["stream"] = True
            await eng._apost(rt.client, path, body, stream=read)
        self._events.put((t, k, "end", None))

    # -- on the caller's thread ---------------------------------------------------------------
    def poll(self, on_result: LoopResult, max_steps: int | None = None) -> None:
        """Wait until a request finished (``max_steps=K``: or ``K`` x 5 ms passed), then hand
        every finished request to ``on_result``; streamed tokens go to ``on_token`` here."""
        deadline = None if max_steps is None else time.monotonic() + max_steps * _STEP_SECONDS
        while self._live and not self._finished and self._failure is None:
            wait_s = 1.0 if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                break
            try:
                event = self._events.get(timeout=wait_s)
            except queue.Empty:
                rt = self._rt
                if rt is not None and not rt.thread.is_alive():
                    self._failure = (-1, EngineError("the openai engine loop thread died"))
                continue
            self._take(event)
            while self._failure is None:  # and whatever else has arrived
                try:
                    self._take(self._events.get_nowait())
                except queue.Empty:
                    break
        done, self._finished = self._finished, []
        hand_over(done, self._live, on_result)
        if self._failure is not None:
            _, error = self._failure
            partial = {
                t: [c for c in tk.collector._slots[0] if c is not None]
                for t, tk in self._live.items()
            }
            self.close()
            raise LoopFailure(f"openai generation failed: {error}", partial) from error

    def _take(self, event: tuple[int, int, str, Any]) -> None:
        t, k, kind, payload = event
        tk = self._live.get(t)
        if tk is None or self._failure is not None:
            return  # aborted (or the loop failed): dropped
        if kind == "comps":
            tk.collector.put_many(0, tk.calls[k].start, payload)
            return
        if kind == "error" and not tk.traces:
            self._failure = (t, payload)
            return
        tr = tk.traces[k]
        if kind == "end" or kind == "error":
            if not tr.done:
                self._failure = (
                    t,
                    payload if kind == "error" else EngineError("the stream ended without a finish reason"),
                )
            return
        if tr.done:  # events that were on their way when the trace was aborted
            tr.discarded += len(_chunk_tokens(payload) or ())
            return
        assert tk.on_token is not None
        try:
            done = self.engine._absorb(tk.request, tr, payload, self.params, tk.on_token, self._mode)
            if done:
                assert tr.completion is not None
                if tr.completion.finish_reason == "abort":
                    self._cancel(tk, k)  # closes its connection: the server aborts it
                tk.collector.put(0, tr.slot, self.engine._with_target(tr.completion, self.params))
        except EngineError as e:  # a malformed event
            self._failure = (t, e)

    def abort(self, ticket: int) -> int:
        tk = self._live.pop(ticket, None)
        if tk is None:
            return 0
        self._cancel(tk)
        # finished samples, and what the streams received of unfinished ones; a plain call in
        # flight reports nothing before it answers, so its tokens are not known (not counted)
        tokens = sum(
            c.num_tokens + c.discarded_tokens for c in tk.collector._slots[0] if c is not None
        )
        tokens += sum(n for tr, n in zip(tk.traces, tk.received, strict=True) if not tr.done)
        return tokens

    def close(self) -> None:
        """Cancel every call of this loop and wait until they have ended (connections closed)."""
        rt, self._rt = self._rt, None
        running = [h for h in self._handles if h.future is not None and not h.future.done()]
        if rt is not None:
            for h in running:
                rt.loop.call_soon_threadsafe(h.cancel)
            wait([h.future for h in running if h.future is not None], timeout=30)
            self.engine._release_runtime()
        self._handles.clear()
        self._live.clear()
        self._finished.clear()
        self._events = queue.Queue()
        self._failure = None
