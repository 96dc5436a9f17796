"""Repeated sampling: ``n`` independent samples per problem, streamed into a :class:`SampleStore`.

The sampler is the throughput path of ttscale, so it does three things a loop over problems
would not:

* **batches across problems**: one engine call holds requests for many problems, up to
  ``batch_size`` samples in all, so the engine's scheduler always has work;
* **streams**: finished requests arrive through the engine's ``on_result`` callback, are
  buffered and written as small shards (every ``flush_every`` samples or ``flush_seconds``),
  by a background writer so the engine is not kept waiting on Parquet and ``fsync``; whatever
  completed is flushed before any exception propagates;
* **resumes and extends**: only ``(problem, index)`` keys missing from the store are
  generated. Per-sample seeds (``sample_seed(run_seed, problem_id, index)``, derived by the
  engine from the request's explicit indices) make a resumed or extended run sample-for-sample
  identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttscale.engines.base import Engine, GenerationError, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, Sample, SamplingParams

__all__ = ["RepeatedSampler", "SamplingSummary", "plan_requests"]

log = logging.getLogger(__name__)

_ACCOUNTING_KEYS = ("samples", "generated_tokens", "prompt_tokens", "wall_seconds")


@dataclass(frozen=True)
class SamplingSummary:
    """What one :meth:`RepeatedSampler.run` call did.

    ``generated`` samples were drawn in this call, ``skipped`` were already stored, ``stored``
    is the store's total afterwards. Token counts and ``wall_seconds`` cover this call only;
    ``accounting`` is the run's cumulative record (the manifest's ``accounting``, summed over
    every call, resumes included). ``store_seconds`` is the time spent writing shards, on a
    background thread that overlaps generation (unless ``background_writes=False``).
    """

    path: Path
    problems: int
    n: int
    requested: int
    skipped: int
    generated: int
    stored: int
    generated_tokens: int
    prompt_tokens: int
    wall_seconds: float
    accounting: Mapping[str, Any]
    store_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every requested ``(problem, index)`` key is stored."""
        return self.skipped + self.generated >= self.requested

    @property
    def samples_per_s(self) -> float:
        return self.generated / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0


def plan_requests(
    problems: Sequence[Problem],
    n: int,
    have: set[tuple[str, int]],
    *,
    max_per_request: int,
    messages: bool = False,
    system_prompt: str | None = None,
) -> list[GenerationRequest]:
    """Requests for the indices ``0..n-1`` of each problem that are not in ``have``.

    Problem-major order; a problem's missing indices are cut into runs of consecutive indices of
    at most ``max_per_request`` (consecutive runs let an engine fan one prompt out with seeds
    ``seed, seed + 1, ...``; see :func:`ttscale.seeding.sample_seed`).
    """
    out: list[GenerationRequest] = []
    for p in problems:
        missing = [i for i in range(n) if (p.id, i) not in have]
        if not missing:
            continue
        if messages:
            msgs: list[dict[str, str]] = []
            if system_prompt:
                msgs.append({"role": "system", "content": system_prompt})
            msgs.append({"role": "user", "content": p.prompt})
            kw: dict[str, Any] = {"messages": msgs}
        else:
            kw = {"prompt": p.prompt}
        run: list[int] = []
        for i in missing:
            if run and (i != run[-1] + 1 or len(run) >= max_per_request):
                out.append(GenerationRequest(problem_id=p.id, indices=tuple(run), **kw))
                run = []
            run.append(i)
        out.append(GenerationRequest(problem_id=p.id, indices=tuple(run), **kw))
    return out


def _batches(requests: Sequence[GenerationRequest], batch_size: int) -> list[list[int]]:
    """Positions of ``requests`` grouped into engine calls of at most ``batch_size`` samples."""
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for pos, r in enumerate(requests):
        k = len(r.indices)
        if cur and size + k > batch_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append(pos)
        size += k
    if cur:
        groups.append(cur)
    return groups


class _Writer:
    """Buffers finished samples and appends them to the store in shards, off the engine's thread.

    ``add`` is called from the engine's callback: it only appends to a list and, when the buffer
    is due, hands it to a single background thread (so shards are written in order, one at a
    time). ``close`` writes the rest and waits; a write error is re-raised there or at the next
    ``add``.
    """

    def __init__(
        self,
        store: SampleStore,
        *,
        flush_every: int,
        flush_seconds: float,
        background: bool,
        on_flush: Any,
    ) -> None:
        self.store = store
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.on_flush = on_flush
        self._buf: list[Completion] = []
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="ttscale-writer") if background else None
        )
        self._pending: list[Future[None]] = []
        self.store_seconds = 0.0  # time spent writing shards (off the engine's thread)

    def add(self, completions: Sequence[Completion]) -> None:
        self._raise_failed()
        with self._lock:
            self._buf.extend(completions)
            due = len(self._buf) >= self.flush_every or (
                time.monotonic() - self._last >= self.flush_seconds
            )
            if not due:
                return
            batch, self._buf = self._buf, []
            self._last = time.monotonic()
        self._submit(batch)

    def _submit(self, batch: list[Completion]) -> None:
        if self._pool is None:
            self._write(batch)
        else:
            self._pending = [f for f in self._pending if not f.done() or f.exception()]
            self._pending.append(self._pool.submit(self._write, batch))

    def _write(self, batch: list[Completion]) -> None:
        t = time.perf_counter()
        self.store.append(Sample.from_completion(c) for c in batch)
        self.on_flush(batch)
        self.store_seconds += time.perf_counter() - t

    def _raise_failed(self) -> None:
        for f in self._pending:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def close(self) -> None:
        """Write what is buffered and wait for every pending shard (raises the first error)."""
        with self._lock:
            batch, self._buf = self._buf, []
        if batch:
            self._submit(batch)
        first: BaseException | None = None
        for f in self._pending:
            try:
                f.result()
            except BaseException as e:  # keep waiting for the rest before raising
                first = first or e
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if first is not None:
            raise first


class _Progress:
    """A rich progress bar (problems, samples, tokens/s, ETA), or nothing."""

    def __init__(self, enabled: bool, *, problems: int, samples: int, done_problems: int) -> None:
        self.enabled = enabled
        self._p: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("[bold]sampling"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("samples"),
            TextColumn("{task.fields[problems]} problems"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._total_problems = problems
        self._done_problems = done_problems
        self._task = self._p.add_task(
            "sampling", total=samples, problems=f"{done_problems}/{problems}", tps="-"
        )
        self._p.start()

    def advance(self, samples: int, problems_done: int, tokens_per_s: float) -> None:
        if self._p is None:
            return
        self._done_problems += problems_done
        self._p.update(
            self._task,
            advance=samples,
            problems=f"{self._done_problems}/{self._total_problems}",
            tps=f"{tokens_per_s:,.0f}",
        )

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


class RepeatedSampler:
    """Draw ``n`` samples per problem with ``engine`` and stream them into ``store``.

    ``batch_size``: samples per engine call (requests of many problems together); engines
    without a batch of their own decode each call's samples together (``HFEngine`` by default),
    so this is also their batch;
    ``max_per_request``: most indices of one problem in one request (default ``batch_size``);
    ``flush_every`` / ``flush_seconds``: shard size and age bound of the write buffer (a killed
    run loses at most what was not yet flushed); ``progress``: ``None`` shows a bar only when
    stderr is a terminal; ``chat``: send chat ``messages`` (the model's template is applied by the
    engine) instead of the raw prompt; ``None`` asks the engine (``info()["chat_template"]`` or an
    ``has_chat_template`` attribute). ``manifest`` adds fields (model, benchmark, ...) to the run
    manifest.

    The store must be new or made with the same sampling settings (all but ``n``); otherwise
    :class:`~ttscale.errors.StoreError` is raised here.
    """

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        store: SampleStore,
        *,
        batch_size: int = 512,
        max_per_request: int | None = None,
        flush_every: int = 512,
        flush_seconds: float = 5.0,
        progress: bool | None = None,
        chat: bool | None = None,
        system_prompt: str | None = None,
        background_writes: bool = True,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(params).__name__}")
        for name, value in (("batch_size", batch_size), ("flush_every", flush_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if max_per_request is not None and (
            isinstance(max_per_request, bool)
            or not isinstance(max_per_request, int)
            or max_per_request < 1
        ):
            raise ConfigError(f"max_per_request must be an integer >= 1, got {max_per_request!r}")
        if not flush_seconds > 0:
            raise ConfigError(f"flush_seconds must be > 0, got {flush_seconds}")
        self.engine = engine
        self.params = params
        self.store = store
        self.batch_size = batch_size
        self.max_per_request = max_per_request or batch_size
        self.flush_every = flush_every
        self.flush_seconds = float(flush_seconds)
        self.progress = progress
        self.system_prompt = system_prompt
        self.background_writes = background_writes
        self.extra_manifest = dict(manifest or {})
        self.engine_info = dict(engine.info())
        self.chat = self._detect_chat() if chat is None else bool(chat)
        store.check_compatible({**self.extra_manifest, "sampling": params.to_dict()})

    def _detect_chat(self) -> bool:
        """Whether the engine's model has a chat template (then send ``messages``)."""
        flag = self.engine_info.get("chat_template")
        if flag is None:
            flag = getattr(self.engine, "has_chat_template", None)
        if flag is None:
            # transformers-backed engines expose their tokenizer
            flag = getattr(getattr(self.engine, "tokenizer", None), "chat_template", None)
        return bool(flag)

    def run(self, problems: Sequence[Problem], n: int | None = None) -> SamplingSummary:
        """Make sure samples ``0..n-1`` (default ``params.n``) of every problem are stored.

        Only missing keys are generated, so calling it again resumes a killed run, and a larger
        ``n`` extends a finished one. Returns a :class:`SamplingSummary`.
        """
        n = self.params.n if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an integer >= 1, got {n!r}")
        problems = list(problems)
        ids = [p.id for p in problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError(f"problem ids must be unique, {dup!r} appears twice")
        store = self.store
        store.write_problems(problems)
        have = store.keys()
        m = store.manifest
        base = _reconciled(store, dict(m.get("accounting") or {}), len(have))
        state = {"samples": 0, "generated_tokens": 0, "prompt_tokens": 0}
        old_n = int((m.get("sampling") or {}).get("n") or 0)
        engines_used = list(m.get("engines_used") or [])
        name = self.engine_info.get("engine")
        if name and name not in engines_used:
            if engines_used:
                log.warning(
                    "run %s was sampled with engine %s and now continues with %s; samples of "
                    "different engines are not identical for the same seeds",
                    store.path,
                    engines_used,
                    name,
                )
            engines_used.append(name)
        # one manifest write per session start (the session is counted even if it is killed)
        store.update_manifest(
            **self.extra_manifest,
            engine=self.engine_info,
            engines_used=engines_used,
            logprob_mode=self.engine_info.get("logprob_mode"),
            sampling=self.params.replace(n=max(n, old_n)).to_dict(),
            seed=self.params.seed,
            num_problems=len(store.problems()),
            chat=self.chat,
            accounting=_accounting(base, state, 0.0),
        )

        requests = plan_requests(
            problems,
            n,
            have,
            max_per_request=self.max_per_request,
            messages=self.chat,
            system_prompt=self.system_prompt,
        )
        todo = sum(len(r.indices) for r in requests)
        requested = len(problems) * n
        skipped = requested - todo
        remaining = {p.id: 0 for p in problems}
        for r in requests:
            remaining[r.problem_id] += len(r.indices)
        log.info(
            "sampling %d problems x n=%d into %s: %d stored, %d to generate",
            len(problems),
            n,
            store.path,
            skipped,
            todo,
        )

        t0 = time.perf_counter()
        bar = _Progress(
            (sys.stderr.isatty() if self.progress is None else self.progress) and todo > 0,
            problems=len(problems),
            samples=requested,
            done_problems=sum(1 for v in remaining.values() if v == 0),
        )
        bar.advance(skipped, 0, 0.0)
        acct_lock = threading.Lock()

        last_acct = [time.perf_counter()]

        def on_flush(batch: list[Completion]) -> None:
            # runs on the writer thread once a shard is durable: account only stored samples.
            # The manifest is rewritten at most every flush_seconds (a kill in between is
            # reconciled from the store by the next session, see _reconciled).
            with acct_lock:
                state["samples"] += len(batch)
                state["generated_tokens"] += sum(c.num_tokens for c in batch)
                state["prompt_tokens"] += sum(c.prompt_tokens or 0 for c in batch)
                now = time.perf_counter()
                if now - last_acct[0] >= self.flush_seconds:
                    last_acct[0] = now
                    self._write_accounting(base, state, now - t0)

        writer = _Writer(
            store,
            flush_every=self.flush_every,
            flush_seconds=self.flush_seconds,
            background=self.background_writes,
            on_flush=on_flush,
        )
        tokens_seen = 0
        cb_lock = threading.Lock()  # engines may call on_result from their own threads

        def make_callback(group: list[GenerationRequest], seen: set[int]):
            def on_result(pos: int, comps: list[Completion]) -> None:
                nonlocal tokens_seen
                with cb_lock:
                    if pos in seen:
                        return
                    seen.add(pos)
                    _check_completions(group[pos], comps)
                    writer.add(comps)
                    pid = group[pos].problem_id
                    remaining[pid] -= len(comps)
                    tokens_seen += sum(c.num_tokens for c in comps)
                    rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
                    bar.advance(len(comps), int(remaining[pid] == 0), rate)

            return on_result

        try:
            for positions in _batches(requests, self.batch_size):
                group = [requests[i] for i in positions]
                seen: set[int] = set()
                callback = make_callback(group, seen)
                try:
                    results = self.engine.generate(group, self.params, on_result=callback)
                except GenerationError as e:
                    # engines hand finished requests to on_result; this catches any that did not
                    for pos, comps in e.completed.items():
                        callback(pos, comps)
                    # samples finished inside requests that did not complete are valid too
                    for pos, comps in getattr(e, "partial", {}).items():
                        req = group[pos]
                        good = [
                            c
                            for c in comps
                            if c.problem_id == req.problem_id and c.index in req.indices
                        ]
                        writer.add(good)
                    raise
                if len(results) != len(group):
                    raise GenerationError(
                        f"engine {self.engine_info.get('engine')!r} returned {len(results)} "
                        f"results for {len(group)} requests",
                        [None] * len(group),
                    )
                for pos, comps in enumerate(results):
                    callback(pos, comps)
        except BaseException:
            # keep every completed sample; a write error must not hide the original exception
            try:
                writer.close()
                self._write_accounting(base, state, time.perf_counter() - t0)
            except Exception:
                log.exception("could not store completed samples after a failure")
            raise
        finally:
            bar.close()
        writer.close()

        wall = time.perf_counter() - t0
        acct = self._write_accounting(base, state, wall)
        summary = SamplingSummary(
            path=store.path,
            problems=len(problems),
            n=n,
            requested=requested,
            skipped=skipped,
            generated=state["samples"],
            stored=len(store),
            generated_tokens=state["generated_tokens"],
            prompt_tokens=state["prompt_tokens"],
            wall_seconds=wall,
            accounting=acct,
            store_seconds=writer.store_seconds,
        )
        log.info(
            "sampled %d samples (%d tokens) in %.1fs: %.1f samples/s, %.0f tokens/s",
            summary.generated,
            summary.generated_tokens,
            wall,
            summary.samples_per_s,
            summary.tokens_per_s,
        )
        return summary

    def _write_accounting(
        self, base: Mapping[str, Any], state: Mapping[str, int], wall: float
    ) -> dict[str, Any]:
        acct = _accounting(base, state, wall)
        self.store.update_manifest(accounting=acct)
        return acct


def _accounting(base: Mapping[str, Any], state: Mapping[str, int], wall: float) -> dict[str, Any]:
    """Cumulative accounting: the previous sessions' (``base``) plus this one's."""
    acct: dict[str, Any] = {k: base.get(k, 0) for k in _ACCOUNTING_KEYS}
    acct["samples"] = int(acct["samples"]) + state["samples"]
    acct["generated_tokens"] = int(acct["generated_tokens"]) + state["generated_tokens"]
    acct["prompt_tokens"] = int(acct["prompt_tokens"]) + state["prompt_tokens"]
    acct["wall_seconds"] = round(float(acct["wall_seconds"]) + wall, 3)
    secs = acct["wall_seconds"]
    acct["samples_per_s"] = round(acct["samples"] / secs, 3) if secs > 0 else 0.0
    acct["tokens_per_s"] = round(acct["generated_tokens"] / secs, 3) if secs > 0 else 0.0
    acct["sessions"] = int(base.get("sessions", 0)) + 1
    return acct


def _reconciled(store: SampleStore, acct: dict[str, Any], stored: int) -> dict[str, Any]:
    """Account samples that reached the store after the last accounting update.

    A shard is made durable before the manifest's accounting is updated, so a process killed
    between the two leaves stored samples unaccounted. Every accounted sample is stored, hence the
    unaccounted generated tokens are exactly the stored tokens minus the accounted ones (prompt
    tokens and wall time of those samples are not recoverable and stay uncounted).
    """
    if stored <= int(acct.get("samples", 0)):
        return acct
    t = store.table(["num_tokens"])
    tokens = int(sum(x for x in t.column("num_tokens").to_pylist() if x is not None))
    log.info(
        "accounting %d samples stored after the last accounting update of %s",
        stored - int(acct.get("samples", 0)),
        store.path,
    )
    acct["samples"] = stored
    acct["generated_tokens"] = max(int(acct.get("generated_tokens", 0)), tokens)
    return acct


def _check_completions(req: GenerationRequest, comps: Sequence[Completion]) -> None:
    got = [(c.problem_id, c.index) for c in comps]
    want = [(req.problem_id, i) for i in req.indices]
    if got != want:
        raise GenerationError(
            f"engine returned samples {got[:3]}... for request {want[:3]}...; an engine must "
            "return one completion per requested index, in order",
            [],
        )
