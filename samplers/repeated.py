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

Several workers may share the work of one run directory, on one machine or many:

* ``shard=(i, N)`` samples only every N-th problem (positions ``i, i + N, ...`` of the problem
  list; :func:`shard_problems`), a deterministic partition that needs no coordination (a SLURM
  array, one worker per inference server); the shards' samples merge without conflict because
  every sample is keyed and seeded by ``(problem_id, index)``;
* without a shard, workers on one directory take turns per problem through advisory claims
  (:mod:`ttscale.store.claims`), so two ``sample --resume`` processes do not generate the same samples;
* each session keeps its accounting in its own file (``accounting/<session>.json``, see
  :meth:`SampleStore.accounting`), so no worker's tokens are lost to another's manifest write.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Container, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttscale.engines.base import Engine, GenerationError, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.store import SampleStore
from ttscale.store.claims import ProblemClaims
from ttscale.types import Completion, Problem, Sample, SamplingParams
from ttscale.validation import check_int, check_number

__all__ = ["RepeatedSampler", "SamplingSummary", "parse_shard", "plan_requests", "shard_problems"]

log = logging.getLogger(__name__)

_COUNT_KEYS = ("samples", "generated_tokens", "prompt_tokens")
# how long a worker waits between looks at problems another worker has claimed
_CLAIM_POLL_SECONDS = 0.25


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N`` (a :class:`ConfigError` otherwise)."""
    i, sep, n = text.partition("/")
    try:
        if not sep:
            raise ValueError
        shard = (int(i), int(n))
    except ValueError:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    check_shard(shard)
    return shard


def check_shard(shard: tuple[int, int]) -> None:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard i/N needs N >= 1 and 0 <= i < N, got {i}/{n}")


def shard_problems(problems: Sequence[Problem], shard: tuple[int, int] | None) -> list[Problem]:
    """Shard ``i/N`` of ``problems``: the problems at positions ``i, i + N, i + 2N, ...``.

    Deterministic and balanced (shard sizes differ by at most one), and stable when a run grows
    with a larger ``--limit`` (positions of the first problems do not change). The N shards are
    disjoint and together hold every problem.
    """
    if shard is None:
        return list(problems)
    check_shard(shard)
    i, n = shard
    return list(problems)[i::n]


@dataclass(frozen=True)
class SamplingSummary:
    """What one :meth:`RepeatedSampler.run` call did.

    ``generated`` samples were drawn in this call, ``skipped`` were already stored, ``stored``
    is the store's total afterwards. Token counts and ``wall_seconds`` cover this call only;
    ``accounting`` is the run's cumulative record (:meth:`SampleStore.accounting`, summed over
    every session, resumes and concurrent workers included). ``store_seconds`` is the time spent writing shards, on a
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
    have: Container[tuple[str, int]],
    *,
    max_per_request: int,
    messages: bool = False,
    system_prompt: str | None = None,
) -> list[GenerationRequest]:
    """Requests for the indices ``0..n-1`` of each problem that are not in ``have``.

    ``have``: stored ``(problem_id, index)`` keys (a set, or a :class:`SampleStore` itself).

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
        self.on_flush(batch, self.store)
        self.store_seconds += time.perf_counter() - t

    def flush(self) -> None:
        """Write what is buffered and wait until every shard so far is durable."""
        with self._lock:
            batch, self._buf = self._buf, []
            self._last = time.monotonic()
        if batch:
            self._submit(batch)
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

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
    :class:`~ttscale.errors.StoreError` is raised here. Several samplers (threads, processes or
    machines) may share one store directory; see :meth:`run` for ``shard`` and ``claims``.
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
        check_int("batch_size", batch_size, min=1)
        check_int("flush_every", flush_every, min=1)
        check_int("max_per_request", max_per_request, min=1, allow_none=True)
        check_number("flush_seconds", flush_seconds, low=0.0, low_open=True)
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

    def run(
        self,
        problems: Sequence[Problem],
        n: int | None = None,
        *,
        shard: tuple[int, int] | None = None,
        claims: bool = True,
    ) -> SamplingSummary:
        """Make sure samples ``0..n-1`` (default ``params.n``) of every problem are stored.

        Only missing keys are generated, so calling it again resumes a killed run, and a larger
        ``n`` extends a finished one. ``shard=(i, N)`` samples only shard ``i`` of ``N`` of the
        problems (:func:`shard_problems`); every problem is still recorded in the run.
        ``claims``: claim each problem before sampling it (:mod:`ttscale.store.claims`), so workers
        sharing the run directory do not duplicate work; a worker whose remaining problems are
        all claimed by others waits for them and returns once they are stored. Returns a
        :class:`SamplingSummary` (its counts cover this worker's problems).
        """
        n = self.params.n if n is None else n
        check_int("n", n, min=1)
        problems = list(problems)
        ids = [p.id for p in problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError(f"problem ids must be unique, {dup!r} appears twice")
        mine = shard_problems(problems, shard)
        store = self.store
        store.write_problems(problems)
        self._start_session(store, n)
        session = _Session(store, self.engine_info.get("engine"), shard)

        initial_missing = {p.id: len(_missing(store, p.id, n)) for p in mine}
        todo = sum(initial_missing.values())
        requested = len(mine) * n
        log.info(
            "sampling %d problems x n=%d into %s%s: %d stored, %d to generate",
            len(mine),
            n,
            store.path,
            f" (shard {shard[0]}/{shard[1]})" if shard else "",
            requested - todo,
            todo,
        )

        t0 = time.perf_counter()
        bar = _Progress(
            (sys.stderr.isatty() if self.progress is None else self.progress) and todo > 0,
            problems=len(mine),
            samples=requested,
            done_problems=sum(1 for v in initial_missing.values() if v == 0),
        )
        bar.advance(requested - todo, 0, 0.0)
        state = dict.fromkeys(_COUNT_KEYS, 0)
        claim = ProblemClaims(store.path) if claims else None
        # per problem: samples planned in this session and not yet durable; its claim is released
        # when that reaches 0, never earlier (another worker would regenerate them)
        outstanding: dict[str, int] = {}
        out_lock = threading.Lock()

        def on_flush(batch: list[Completion], st: SampleStore) -> None:
            # runs on the writer thread: store the shard, account it, release finished problems
            session.store_batch(st, batch)
            with out_lock:
                state["samples"] += len(batch)
                state["generated_tokens"] += sum(c.num_tokens for c in batch)
                state["prompt_tokens"] += sum(c.prompt_tokens or 0 for c in batch)
                for c in batch:
                    left = outstanding.get(c.problem_id, 0) - 1
                    if left > 0:
                        outstanding[c.problem_id] = left
                    else:
                        outstanding.pop(c.problem_id, None)
                        if claim is not None:
                            claim.release(c.problem_id)

        writer = _Writer(
            store,
            flush_every=self.flush_every,
            flush_seconds=self.flush_seconds,
            background=self.background_writes,
            on_flush=on_flush,
        )
        tokens_seen = 0
        cb_lock = threading.Lock()  # engines may call on_result from their own threads
        remaining = dict(initial_missing)

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

        queue: deque[Problem] = deque(p for p in mine if initial_missing[p.id] > 0)
        waiting: list[Problem] = []
        planned: deque[GenerationRequest] = deque()
        planned_size = 0

        def plan_more() -> None:
            """Claim queued problems and plan their missing samples, up to one engine batch."""
            nonlocal planned_size
            while queue and planned_size < self.batch_size:
                claimed: list[Problem] = []
                budget = planned_size
                while queue and budget < self.batch_size:
                    p = queue.popleft()
                    if claim is not None and not claim.try_claim(p.id):
                        waiting.append(p)  # another worker is on it; look again later
                        continue
                    claimed.append(p)
                    budget += initial_missing[p.id]
                if claim is not None and claimed:
                    store.refresh()  # after claiming: see what other workers stored meanwhile
                for p in claimed:
                    reqs = plan_requests(
                        [p],
                        n,
                        store,
                        max_per_request=self.max_per_request,
                        messages=self.chat,
                        system_prompt=self.system_prompt,
                    )
                    k = sum(len(r.indices) for r in reqs)
                    if remaining[p.id] > k:  # another worker stored some of them meanwhile
                        with cb_lock:
                            done = remaining[p.id] - k
                            remaining[p.id] = k
                            bar.advance(done, int(k == 0), 0.0)
                    if k == 0:
                        if claim is not None:
                            claim.release(p.id)
                        continue
                    with out_lock:
                        outstanding[p.id] = outstanding.get(p.id, 0) + k
                    planned.extend(reqs)
                    planned_size += k

        def next_group() -> list[GenerationRequest]:
            nonlocal planned_size
            while True:
                plan_more()
                if planned:
                    break
                if not waiting:
                    return []
                # only problems other workers hold are left: make our own work durable (which
                # releases our claims, so no two workers ever wait on each other), then wait
                writer.flush()
                log.info("waiting for %d problems other workers are sampling", len(waiting))
                time.sleep(_CLAIM_POLL_SECONDS)
                queue.extend(waiting)
                waiting.clear()
            group: list[GenerationRequest] = []
            size = 0
            while planned and (not group or size + len(planned[0].indices) <= self.batch_size):
                r = planned.popleft()
                group.append(r)
                size += len(r.indices)
            planned_size -= size
            return group

        try:
            while group := next_group():
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
            # keep every completed sample (Ctrl-C included); a write error must not hide the
            # original exception
            try:
                writer.close()
                session.write()
            except Exception:
                log.exception("could not store completed samples after a failure")
            raise
        finally:
            bar.close()
            if claim is not None:
                claim.close()
        writer.close()
        session.write()

        wall = time.perf_counter() - t0
        store.refresh()
        stored_mine = sum(n - len(_missing(store, p.id, n)) for p in mine)
        summary = SamplingSummary(
            path=store.path,
            problems=len(mine),
            n=n,
            requested=requested,
            skipped=max(0, stored_mine - state["samples"]),
            generated=state["samples"],
            stored=len(store),
            generated_tokens=state["generated_tokens"],
            prompt_tokens=state["prompt_tokens"],
            wall_seconds=wall,
            accounting=store.accounting(),
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

    def _start_session(self, store: SampleStore, n: int) -> None:
        """Record engine, sampling settings and problems in the manifest (one locked update)."""
        name = self.engine_info.get("engine")
        num_problems = len(store.problems())
        legacy_stored = len(store) if not store.sessions() else None

        def start(m: dict[str, Any]) -> None:
            engines_used = list(m.get("engines_used") or [])
            if name and name not in engines_used:
                if engines_used:
                    log.warning(
                        "run %s was sampled with engine %s and now continues with %s; samples "
                        "of different engines are not identical for the same seeds",
                        store.path,
                        engines_used,
                        name,
                    )
                engines_used.append(name)
            old_n = int((m.get("sampling") or {}).get("n") or 0)
            fields: dict[str, Any] = {
                **self.extra_manifest,
                "engine": self.engine_info,
                "engines_used": engines_used,
                "logprob_mode": self.engine_info.get("logprob_mode"),
                "sampling": self.params.replace(n=max(n, old_n)).to_dict(),
                "seed": self.params.seed,
                "num_problems": num_problems,
                "chat": self.chat,
            }
            for k, v in fields.items():
                if isinstance(v, Mapping) and isinstance(m.get(k), dict):
                    m[k] = {**m[k], **v}
                else:
                    m[k] = v
            legacy = m.get("accounting")
            if legacy_stored is not None and isinstance(legacy, dict):
                m["accounting"] = _reconciled(store, legacy, legacy_stored)

        store.modify_manifest(start)


class _Session:
    """One sampling session's accounting, in ``RUN/accounting/<session>.json`` (its own file).

    Before a shard is renamed into place the record announces it as ``pending`` (with its
    counts); after the rename the counts move to ``committed``. A reader counts a pending shard
    only if it exists (:meth:`SampleStore.accounting`), so a session killed at any instant is
    accounted for exactly the samples it stored, with no reconciliation guesswork, and workers
    sharing a run never write each other's records.
    """

    def __init__(self, store: SampleStore, engine: Any, shard: tuple[int, int] | None) -> None:
        host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.id = f"{stamp}-{host or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.store = store
        self.t0 = time.perf_counter()
        self.committed = dict.fromkeys(_COUNT_KEYS, 0)
        self.meta = {
            "session": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "engine": engine,
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        }
        self._lock = threading.Lock()
        self.write()  # the session counts from its start, even if it is killed at once

    def write(self, pending: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            record = {
                **self.meta,
                "committed": dict(self.committed),
                "pending": dict(pending) if pending else None,
                "wall_seconds": round(time.perf_counter() - self.t0, 3),
            }
            self.store.write_session(self.id, record)

    def store_batch(self, store: SampleStore, batch: Sequence[Completion]) -> int:
        counts = {
            "samples": len(batch),
            "generated_tokens": sum(c.num_tokens for c in batch),
            "prompt_tokens": sum(c.prompt_tokens or 0 for c in batch),
        }

        def announce(shard: str, rows: list[dict[str, Any]]) -> None:
            self.write({"shard": shard, **counts})

        new = store.append((Sample.from_completion(c) for c in batch), before_commit=announce)
        # (a batch already stored entirely by another worker writes no shard: counted directly)
        with self._lock:
            for k, v in counts.items():
                self.committed[k] += v
        self.write()
        return new


def _missing(store: SampleStore, problem_id: str, n: int) -> list[int]:
    return [i for i in range(n) if (problem_id, i) not in store]


def _reconciled(store: SampleStore, acct: dict[str, Any], stored: int) -> dict[str, Any]:
    """Account samples that reached the store after the last accounting update (old runs).

    Runs made before sessions kept their own accounting files updated the manifest's accounting
    after a shard was durable, so a process killed between the two left stored samples
    unaccounted. Every accounted sample is stored, hence the unaccounted generated tokens are
    exactly the stored tokens minus the accounted ones (prompt tokens and wall time of those
    samples are not recoverable and stay uncounted).
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
    acct = dict(acct)
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
