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
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from ttscale.engines.base import (
    EngineCapabilities,
    GenerationRequest,
    ResultCallback,
    ResultCollector,
    check_request_support,
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
    capabilities = EngineCapabilities()

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

    # -- request bodies --------------------------------------------------------------------------
    def _body(
        self, req: GenerationRequest, params: SamplingParams, n: int, seed: int
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
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
        use_chat = req.messages is not None or self.chat
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

    def _post(self, path: str, body: dict) -> dict:
        httpx = self._httpx
        last = None
        server: int | None = None
        for attempt in range(self.max_retries + 1):
            server = self._pick(avoid=server if len(self.base_urls) > 1 else None)
            url = self.base_urls[server] + path
            try:
                with self._lock:
                    self.stats["requests"] += 1
                resp = self._client.post(url, json=body)
                if resp.status_code in _RETRY_STATUS:
                    raise _Retryable(
                        f"HTTP {resp.status_code} from {url}: {_snippet(resp.text)}",
                        parse_retry_after(resp.headers.get("retry-after")),
                    )
                if resp.status_code >= 400:
                    raise EngineError(f"HTTP {resp.status_code} from {url}: {_snippet(resp.text)}")
                try:
                    return resp.json()
                except ValueError as e:
                    raise _Retryable(f"invalid JSON from {url}: {_snippet(resp.text)}") from e
            except _Retryable as e:
                last = e
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = _Retryable(f"{type(e).__name__} talking to {url}: {e}")
            finally:
                with self._lock:
                    self._busy[server] -= 1
            if attempt < self.max_retries:
                delay = self._delay(attempt, last.retry_after)
                with self._lock:
                    self.stats["retries"] += 1
                log.warning("%s; retry %d/%d in %.2fs", last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        with self._lock:
            self.stats["failures"] += 1
        raise EngineError(f"gave up after {self.max_retries + 1} attempts: {last}")

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
            out.append(
                _parse_choice(
                    choice,
                    req,
                    j,
                    req.seed_for(j, params),
                    params,
                    prompt_tokens,
                    usage.get("completion_tokens") if call.n == 1 else None,
                )
            )
        return out

    # -- the Engine protocol ---------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
    ) -> list[list[Completion]]:
        check_request_support(self, requests)
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
                    if exc is not None:
                        if error is None:
                            error = exc
                            for other in pending:  # stop new work; in-flight calls finish
                                other.cancel()
                        continue
                    try:  # on_result runs here when this call completes its request
                        collector.put_many(call.pos, call.start, fut.result())
                    except BaseException as cb_error:
                        if error is None:
                            error = cb_error
                        for other in pending:
                            other.cancel()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            raise collector.failure("openai", error) from error
        return collector.results()

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
    num = len(tokens) if tokens else (completion_tokens or 0)
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
        prompt_tokens=prompt_tokens,
        stop_reason=stop_reason if isinstance(stop_reason, (str, int)) else None,
    )
