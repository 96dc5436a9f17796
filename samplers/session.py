"""The sampling session every sampler runs in: writer, manifest, progress, accounting, salvage.

A sampler is a *policy* (which requests to send, which candidates to keep); everything a run
needs besides that lives here, so a new sampler is a short file:

* **writer**: finished samples are buffered and appended to the store as small atomic shards by
  a background thread (``flush_every`` samples or ``flush_seconds``), so the engine is not kept
  waiting on Parquet and ``fsync``;
* **manifest**: engine, sampling settings, ``iid`` (whether the stored samples are independent
  draws; SMC particles are not) and the caller's fields, in one locked update;
* **accounting at generation time**: every token an engine generated is counted when the engine
  hands it over (:attr:`SamplingSession.generated`), whether the policy keeps the trace or later
  prunes or resamples it away; the durable per-session record
  (``RUN/accounting/<session>.json``) is committed together with each shard, so a run killed at
  any instant is accounted for exactly what it stored (a policy that prunes or resamples
  stores those traces too, with their fate, so the run's accounting covers them);
* **salvage**: whatever an engine finished before it failed (or before Ctrl-C) is stored before
  the exception propagates; samples finished inside a request that did not complete count too;
* **resume**: the store is keyed by ``(problem_id, index)`` and seeds are derived per key, so a
  policy asks :meth:`SampleStore.__contains__` what is missing and a resumed run is
  sample-for-sample identical to an uninterrupted one;
* **claims**: without a shard, workers sharing a run directory take turns per problem
  (:mod:`ttscale.store.claims`); :meth:`SamplingSession.claimed` claims problems, plans their
  requests and releases a claim only once all of its samples are durable.

Without a store (in-memory sampling) the session still counts, checks and salvages; it writes
nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ttscale.engines.base import (
    Engine,
    GenerationError,
    GenerationRequest,
    ResultCallback,
    TokenCallback,
    capabilities_of,
    generate_chunked,
)
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate
from ttscale.store import SampleStore
from ttscale.store.claims import ProblemClaims
from ttscale.types import Completion, Problem, Sample, SamplingParams

__all__ = ["SamplingSession", "start_run"]

log = logging.getLogger(__name__)

_COUNT_KEYS = ("samples", "generated_tokens", "prompt_tokens")
# how long a worker waits between looks at problems another worker has claimed
_CLAIM_POLL_SECONDS = 0.25

#: ``to_sample(completion) -> Sample``: how a policy stores one finished completion (the step,
#: parent, log-weight and fate of a step-wise trace go here).
ToSample = Callable[[Completion], Sample]


def unique_problems(problems: Sequence[Problem]) -> list[Problem]:
    """``problems`` as a list; a :class:`ConfigError` naming the first id that appears twice."""
    problems = list(problems)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"problem ids must be unique, {dup!r} appears twice")
    return problems


def open_sink(
    sink: SampleStore,
    problems: Sequence[Problem],
    *,
    engine_info: Mapping[str, Any],
    params: SamplingParams,
    n: int,
    chat: bool,
    iid: bool,
    extra: Mapping[str, Any] | None = None,
    compatible: Mapping[str, Any] | None = None,
) -> None:
    """What every sampler does with its sink before drawing: refuse a run made with other settings
    (``compatible``, default ``extra``, plus the sampling parameters), record the problems, and
    :func:`start_run`."""
    base = dict(extra or {}) if compatible is None else dict(compatible)
    sink.check_compatible({**base, "sampling": params.to_dict()})
    sink.write_problems(problems)
    start_run(
        sink, engine_info=engine_info, params=params, n=n, chat=chat, iid=iid, extra=extra
    )


def start_run(
    store: SampleStore,
    *,
    engine_info: Mapping[str, Any],
    params: SamplingParams,
    n: int,
    chat: bool,
    iid: bool,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Record engine, sampling settings, ``iid`` and problems in the manifest (one locked update).

    ``n`` is the samples per problem this session makes sure of (the manifest keeps the largest
    ever asked for). A run that was iid and now receives non-iid samples is recorded non-iid.
    """
    name = engine_info.get("engine")
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
            **dict(extra or {}),
            "engine": dict(engine_info),
            "engines_used": engines_used,
            "logprob_mode": engine_info.get("logprob_mode"),
            "sampling": params.replace(n=max(n, old_n)).to_dict(),
            "seed": params.seed,
            "num_problems": num_problems,
            "chat": chat,
            "iid": bool(iid) and m.get("iid", True) is not False,
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


class SamplingSession:
    """One sampler call's machinery around an engine (see the module docstring).

    ``store=None`` samples in memory. ``shard``: recorded in the accounting record. ``claims``:
    take turns per problem with other workers on the same run directory (ignored without a
    store). ``to_sample`` turns a completion into the stored :class:`Sample` (default
    :meth:`Sample.from_completion`); a :class:`~ttscale.samplers.base.Candidate` handed to
    :meth:`keep` is stored with its step, parent, log-weight and fate. :meth:`show_progress`
    starts the progress bar (the caller decides, e.g. only on a terminal).

    Use as a context manager: leaving it normally writes the rest and raises a write error;
    leaving it with an exception (Ctrl-C included) stores every completed sample first and lets
    the original exception propagate.
    """

    def __init__(
        self,
        engine: Engine,
        store: SampleStore | None = None,
        *,
        engine_info: Mapping[str, Any] | None = None,
        flush_every: int = 512,
        flush_seconds: float = 5.0,
        background_writes: bool = True,
        shard: tuple[int, int] | None = None,
        claims: bool = False,
        to_sample: ToSample | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.engine_info = dict(engine.info() if engine_info is None else engine_info)
        self.to_sample: ToSample = to_sample or Sample.from_completion
        #: counted when the engine hands samples over, kept or not (``samples``,
        #: ``generated_tokens``, ``prompt_tokens``)
        self.generated: dict[str, int] = dict.fromkeys(_COUNT_KEYS, 0)
        #: counted once durable in the store (what this session added to the run)
        self.stored: dict[str, int] = dict.fromkeys(_COUNT_KEYS, 0)
        self.t0 = time.perf_counter()
        self._bar = _Progress(False, problems=0, samples=0, done_problems=0)
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()  # engines may call on_result from their own threads
        self._out_lock = threading.Lock()
        # per problem: samples planned in this session and not yet durable; its claim is
        # released when that reaches 0, never earlier (another worker would regenerate them)
        self._outstanding: dict[str, int] = {}
        self._claims: ProblemClaims | None = None
        self._record: _AccountingRecord | None = None
        self._writer: _Writer | None = None
        if store is not None:
            self._claims = ProblemClaims(store.path) if claims else None
            self._record = _AccountingRecord(store, self.engine_info.get("engine"), shard)
            self._writer = _Writer(
                store,
                flush_every=flush_every,
                flush_seconds=flush_seconds,
                background=background_writes,
                on_flush=self._on_flush,
            )

    @property
    def store_seconds(self) -> float:
        """Time spent writing shards (on the writer thread, overlapping generation)."""
        return self._writer.store_seconds if self._writer is not None else 0.0

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.t0

    def show_progress(self, enabled: bool, *, remaining: Mapping[str, int], samples: int) -> None:
        """Start the progress bar: ``remaining`` samples to draw per problem, ``samples`` in all."""
        self._remaining = dict(remaining)
        self.t0 = time.perf_counter()
        todo = sum(self._remaining.values())
        self._bar = _Progress(
            enabled and todo > 0,
            problems=len(self._remaining),
            samples=samples,
            done_problems=sum(1 for v in self._remaining.values() if v == 0),
        )
        self._bar.advance(samples - todo, 0, 0.0)

    # ---- writing -------------------------------------------------------------------------

    def _on_flush(self, batch: list[Completion | Candidate], store: SampleStore) -> None:
        # runs on the writer thread: store the shard, account it, release finished problems
        assert self._record is not None
        comps = [c.completion if isinstance(c, Candidate) else c for c in batch]
        counts = _counts(comps)
        samples = [
            c.to_sample(iid=False) if isinstance(c, Candidate) else self.to_sample(c) for c in batch
        ]
        self._record.store_batch(store, samples, counts)
        with self._out_lock:
            for k, v in counts.items():
                self.stored[k] += v
            for c in comps:
                left = self._outstanding.get(c.problem_id, 0) - 1
                if left > 0:
                    self._outstanding[c.problem_id] = left
                else:
                    self._outstanding.pop(c.problem_id, None)
                    if self._claims is not None:
                        self._claims.release(c.problem_id)

    def keep(self, items: Sequence[Completion | Candidate]) -> None:
        """Hand finished samples (completions, or candidates with their fate) to the writer.

        A no-op in memory. Tokens were already counted by :meth:`generate`.
        """
        if self._writer is not None and items:
            self._writer.add(items)

    def flush(self) -> None:
        """Make every sample handed over so far durable (releases finished claims)."""
        if self._writer is not None:
            self._writer.flush()

    # ---- scheduling with claims ------------------------------------------------------------

    def claimed(
        self,
        problems: Sequence[Problem],
        plan: Callable[[Problem], list[GenerationRequest]],
        *,
        batch_size: int,
        expected: Mapping[str, int],
        waiting: list[Problem],
    ) -> Iterator[tuple[Problem, list[GenerationRequest]]]:
        """The problems of ``problems`` this worker claims, one by one, each with the requests of
        its missing samples (claimed in groups of about ``batch_size`` samples, by
        ``expected[problem.id]``: how many were missing when the session began).

        ``plan(problem)`` gives the requests of the samples still missing (asked after the claim,
        so what another worker stored meanwhile is skipped); a problem with none left is released
        at once and not yielded. Problems another worker holds go to ``waiting``: the caller
        makes its own work durable (releasing its claims, so no two workers wait on each other),
        waits and offers them again. Never blocks, so a caller that runs the yielded problems
        while asking for more (the engine loop) keeps its engine busy.
        """
        claim = self._claims
        queue: deque[Problem] = deque(problems)
        while queue:
            group: list[Problem] = []
            budget = 0
            while queue and budget < batch_size:
                p = queue.popleft()
                if claim is not None and not claim.try_claim(p.id):
                    waiting.append(p)  # another worker is on it; look again later
                    continue
                group.append(p)
                budget += expected[p.id]
            if claim is not None and group and self.store is not None:
                self.store.refresh()  # after claiming: see what other workers stored meanwhile
            for p in group:
                reqs = plan(p)
                k = sum(len(r.indices) for r in reqs)
                with self._lock:
                    left = self._remaining.get(p.id, k)
                    if left > k:  # another worker stored some of them meanwhile
                        self._remaining[p.id] = k
                        self._bar.advance(left - k, int(k == 0), 0.0)
                if k == 0:
                    if claim is not None:
                        claim.release(p.id)
                    continue
                with self._out_lock:
                    self._outstanding[p.id] = self._outstanding.get(p.id, 0) + k
                yield p, reqs

    def wait_for_others(self, waiting: Sequence[Problem]) -> None:
        """Make this worker's samples durable (releasing its claims) and wait a moment for the
        ``waiting`` problems other workers are sampling."""
        self.flush()
        log.info("waiting for %d problems other workers are sampling", len(waiting))
        time.sleep(_CLAIM_POLL_SECONDS)

    # ---- continuous generation (the scheduler's side) ---------------------------------------

    def received(
        self,
        request: GenerationRequest,
        comps: Sequence[Completion],
        *,
        store: bool = True,
        check: bool = True,
    ) -> None:
        """Completions of ``request`` handed over by an engine loop: checked against the
        request, counted in :attr:`generated`, stored unless ``store=False`` (a policy that
        decides later stores through :meth:`keep`) and shown in the progress bar. ``check=False``
        for the finished samples of a request that failed part-way (some of its indices)."""
        if check:
            _check_completions(request, comps)
        with self._lock:
            for k, v in _counts(comps).items():
                self.generated[k] += v
            if store:
                self.keep(comps)
            pid = request.problem_id
            left = self._remaining.get(pid)
            if left is not None:
                self._remaining[pid] = left - len(comps)
            rate = self.generated["generated_tokens"] / max(self.wall_seconds, 1e-9)
            self._bar.advance(len(comps), int(left is not None and left - len(comps) == 0), rate)

    def discarded(self, tokens: int) -> None:
        """Count ``tokens`` an engine generated for traces aborted before they finished (they
        have no completion to store; they count in :attr:`generated` and in the run's accounting
        record all the same)."""
        with self._lock:
            self.generated["generated_tokens"] += int(tokens)
        if self._record is not None and tokens:
            # durable with the next shard's record update (or at the session's end)
            self._record.add_discarded(int(tokens))

    # ---- generation ------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        store: bool = True,
        on_result: ResultCallback | None = None,
        on_token: TokenCallback | None = None,
        chunk_tokens: int | None = None,
    ) -> list[list[Completion]]:
        """``engine.generate`` with accounting, checks, writing and salvage.

        ``on_token`` (see :data:`~ttscale.engines.base.TokenCallback`) streams every token and may
        abort a trace: through the engine's own ``on_token`` when it declares ``streaming`` and
        ``chunk_tokens`` is ``None``, otherwise through
        :func:`~ttscale.engines.base.generate_chunked` in chunks of ``chunk_tokens`` (default 64;
        needs ``token_prefixes``).

        Every completion is counted in :attr:`generated` as the engine hands it over and checked
        against its request (one completion per requested index, in order). ``store=True`` hands
        it to the writer at once (a policy that decides later stores through :meth:`keep`).
        ``on_result`` is called once per request, after that. If the engine fails, every sample
        it finished (in completed requests or not) is counted and stored before the
        :class:`GenerationError` propagates.
        """
        group = list(requests)
        seen: set[int] = set()

        def take(comps: Sequence[Completion]) -> None:
            for k, v in _counts(comps).items():
                self.generated[k] += v
            if store:
                self.keep(comps)

        def callback(pos: int, comps: list[Completion]) -> None:
            with self._lock:
                if pos in seen:
                    return
                seen.add(pos)
                _check_completions(group[pos], comps)
                take(comps)
                pid = group[pos].problem_id
                left = self._remaining.get(pid)
                if left is not None:
                    self._remaining[pid] = left - len(comps)
                rate = self.generated["generated_tokens"] / max(self.wall_seconds, 1e-9)
                self._bar.advance(
                    len(comps), int(left is not None and left - len(comps) == 0), rate
                )
            if on_result is not None:
                on_result(pos, comps)

        try:
            if on_token is None:
                results = self.engine.generate(group, params, on_result=callback)
            elif chunk_tokens is None and capabilities_of(self.engine).streaming:
                results = self.engine.generate(  # type: ignore[call-arg]
                    group, params, on_result=callback, on_token=on_token
                )
            else:
                results = generate_chunked(
                    self.engine,
                    group,
                    params,
                    chunk_tokens=chunk_tokens or 64,
                    on_result=callback,
                    on_token=on_token,
                )
        except GenerationError as e:
            # engines hand finished requests to on_result; this catches any that did not
            for pos, comps in e.completed.items():
                callback(pos, comps)
            # samples finished inside requests that did not complete are valid too
            for pos, comps in getattr(e, "partial", {}).items():
                req = group[pos]
                good = [
                    c for c in comps if c.problem_id == req.problem_id and c.index in req.indices
                ]
                with self._lock:
                    take(good)
            raise
        if len(results) != len(group):
            raise GenerationError(
                f"engine {self.engine_info.get('engine')!r} returned {len(results)} "
                f"results for {len(group)} requests",
                [None] * len(group),
            )
        for pos, comps in enumerate(results):
            callback(pos, comps)
        return [list(c) for c in results]

    # ---- lifetime --------------------------------------------------------------------------

    def __enter__(self) -> SamplingSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self._close_writer()
            else:
                # keep every completed sample (Ctrl-C included); a write error must not hide
                # the original exception
                try:
                    self._close_writer()
                except Exception:
                    log.exception("could not store completed samples after a failure")
        finally:
            self._bar.close()
            if self._claims is not None:
                self._claims.close()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._record is not None:
            self._record.write()


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
        self._buf: list[Completion | Candidate] = []
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="ttscale-writer") if background else None
        )
        self._pending: list[Future[None]] = []
        self.store_seconds = 0.0  # time spent writing shards (off the engine's thread)

    def add(self, completions: Sequence[Completion | Candidate]) -> None:
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

    def _submit(self, batch: list[Completion | Candidate]) -> None:
        if self._pool is None:
            self._write(batch)
        else:
            self._pending = [f for f in self._pending if not f.done() or f.exception()]
            self._pending.append(self._pool.submit(self._write, batch))

    def _write(self, batch: list[Completion | Candidate]) -> None:
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
        self._p = rich_progress(
            "sampling", "samples", "{task.fields[problems]} problems", "{task.fields[tps]} tok/s"
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


def rich_progress(label: str, unit: str, *fields: str) -> Any:
    """A stderr progress bar every sampler shares: ``label``, bar, ``done/total unit``, the
    extra ``fields`` (rich format strings over ``task.fields``), elapsed time and ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


class _AccountingRecord:
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

    def add_discarded(self, tokens: int) -> None:
        """Tokens of aborted traces: no sample to store, generated all the same."""
        with self._lock:
            self.committed["generated_tokens"] += tokens

    def store_batch(
        self, store: SampleStore, samples: Sequence[Sample], counts: Mapping[str, int]
    ) -> int:
        def announce(shard: str, rows: list[dict[str, Any]]) -> None:
            self.write({"shard": shard, **counts})

        new = store.append(samples, before_commit=announce)
        # (a batch already stored entirely by another worker writes no shard: counted directly)
        with self._lock:
            for k, v in counts.items():
                self.committed[k] += v
        self.write()
        return new


def _counts(comps: Sequence[Completion]) -> dict[str, int]:
    return {
        "samples": len(comps),
        # tokens an engine generated past an abort or stop string count too (discarded_tokens)
        "generated_tokens": sum(c.num_tokens + c.discarded_tokens for c in comps),
        "prompt_tokens": sum(c.prompt_tokens or 0 for c in comps),
    }


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
