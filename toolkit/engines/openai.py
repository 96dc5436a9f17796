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

import email.utils
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
    ``transport`` is an ``httpx`` transport for tests.
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
        self._client = httpx.Client(
            headers=hdrs,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=max_concurrency * len(urls) + 4),
            transport=transport,
        )
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
        httpx = self._httpx
        last = None
        server: int | None = None
        max_retries = self.max_retries if retries is None else retries
        for attempt in range(max_retries + 1):
            server = self._pick(avoid=server if len(self.base_urls) > 1 else None)
            base = self.base_urls[server]
            url = (base.removesuffix("/v1") if root else base) + path
            try:
                with self._lock:
                    self.stats["requests"] += 1
                if stream is not None:
                    with self._client.stream("POST", url, json=body) as resp:
                        if resp.status_code >= 400:
                            resp.read()
                        self._check_status(resp, url)
                        return stream(resp)
                resp = self._client.post(url, json=body)
                self._check_status(resp, url)
                try:
                    return resp.json()
                except ValueError as e:
                    raise _Retryable(f"invalid JSON from {url}: {_snippet(resp.text)}") from e
            except _Started as e:
                raise EngineError(f"stream from {url} failed after its first tokens: {e}") from e
            except _Retryable as e:
                last = e
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = _Retryable(f"{type(e).__name__} talking to {url}: {e}")
            finally:
                with self._lock:
                    self._busy[server] -= 1
            if attempt < max_retries:
                delay = self._delay(attempt, last.retry_after)
                with self._lock:
                    self.stats["retries"] += 1
                log.warning("%s; retry %d/%d in %.2fs", last, attempt + 1, max_retries, delay)
                time.sleep(delay)
        with self._lock:
            self.stats["failures"] += 1
        raise EngineError(f"gave up after {max_retries + 1} attempts: {last}")

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
        data = self._post(path, body)
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
        for req in requests:
            if req.has_token_ids:
                self._require_tokens(req, "a request with token ids")
        if on_token is not None:
            if not self.capabilities.streaming:
                raise ConfigError(
                    "streaming (on_token=) needs token prompts on the openai engine; pass "
                    "token_prompts=True (a vLLM server) or use generate_chunked"
                )
            return self._generate_streamed(requests, params, on_result, on_token)
        collector = ResultCollector(requests, on_result)
        calls: list[_Call] = []
        for pos, req in enumerate(requests):
            seeds = [req.seed_for(j, params) for j in range(len(req.indices))]
            fan = self.n_fanout and params.temperature > 0.0
            runs = seed_runs(seeds) if fan else [(j, 1) for j in range(len(seeds))]
            calls.extend(_Call(pos, start, n, seeds[start]) for start, n in runs)
        if not calls:
            return []
        error: BaseException | None = None
        # callbacks run on this thread, in completion order
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(calls))) as pool:
            pending: dict[Future[list[Completion]], _Call] = {
                pool.submit(self._call, requests[c.pos], c, params): c for c in calls
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    call = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is None:
                        try:
                            collector.put_many(call.pos, call.start, fut.result())
                        except BaseException as cb_error:  # on_result raised
                            exc = cb_error
                    if exc is not None and error is None:
                        error = exc
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
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    for choice in json.loads(data).get("choices") or []:
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
        }

    def close(self) -> None:
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
