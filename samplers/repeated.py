"""Repeated sampling: ``n`` independent samples per problem, streamed into a :class:`SampleStore`.

The sampler is the throughput path of ttscale, so it does three things a loop over problems
would not:

* **batches across problems**: one engine call holds requests for many problems, up to
  ``batch_size`` samples in all, so the engine's scheduler always has work;
* **streams**: finished requests arrive through the engine's ``on_result`` callback and are
  written as small shards by the session's background writer
  (:mod:`ttscale.samplers.session`); whatever completed is flushed before any exception
  propagates;
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
import sys
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate, SampleResult
from ttscale.samplers.loop import Program, Scheduler, generate
from ttscale.samplers.session import SamplingSession, open_sink, start_run, unique_problems
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams
from ttscale.validation import check_int, check_number

__all__ = ["RepeatedSampler", "SamplingSummary", "parse_shard", "plan_requests", "shard_problems"]

log = logging.getLogger(__name__)


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


class RepeatedSampler:
    """Draw ``n`` samples per problem with ``engine`` and stream them into ``store``.

    A short policy on :class:`~ttscale.samplers.session.SamplingSession` (which writes, accounts,
    salvages and claims): plan the missing ``(problem, index)`` keys, batch them across problems,
    keep every sample. :meth:`run` fills a store; :meth:`sample` is the
    :class:`~ttscale.samplers.base.Sampler` protocol (in memory, ``store`` may be ``None``).

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
        store: SampleStore | None = None,
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
        if store is not None:
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
        problems = unique_problems(problems)
        mine = shard_problems(problems, shard)
        store = self.store
        if store is None:
            raise ConfigError(
                "RepeatedSampler.run needs a store (RepeatedSampler(engine, params, store)); "
                "use .sample(problems, n) to sample in memory"
            )
        store.write_problems(problems)
        self._start(store, n)
        missing = {p.id: len(_missing(store, p.id, n)) for p in mine}
        todo = sum(missing.values())
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
        session = self._session(store, shard=shard, claims=claims)
        session.show_progress(self._show_progress(), remaining=missing, samples=requested)
        with session:
            queue = [p for p in mine if missing[p.id] > 0]
            while queue:
                # one pass over the problems left: each one this worker claims is a program on
                # the engine loop (its requests join the engine as slots free up); those other
                # workers hold are offered again once this pass's work is durable
                waiting: list[Problem] = []
                sched: Scheduler[None] = Scheduler(
                    session, self.params, max_sequences=self.batch_size
                )
                claimed = session.claimed(
                    queue, lambda p: self._plan(p, n, store), batch_size=self.batch_size,
                    expected=missing, waiting=waiting,
                )  # fmt: skip
                for _ in sched.run(_store_all(reqs) for _, reqs in claimed):
                    pass
                if waiting:
                    session.wait_for_others(waiting)
                queue = waiting

        wall = session.wall_seconds
        store.refresh()
        stored_mine = sum(n - len(_missing(store, p.id, n)) for p in mine)
        done = session.stored
        summary = SamplingSummary(
            path=store.path,
            problems=len(mine),
            n=n,
            requested=requested,
            skipped=max(0, stored_mine - done["samples"]),
            generated=done["samples"],
            stored=len(store),
            generated_tokens=done["generated_tokens"],
            prompt_tokens=done["prompt_tokens"],
            wall_seconds=wall,
            accounting=store.accounting(),
            store_seconds=session.store_seconds,
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

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """The :class:`~ttscale.samplers.base.Sampler` protocol: ``budget`` samples per problem.

        Yields one :class:`SampleResult` per problem, in order, holding its ``budget`` candidates
        (all kept, unweighted, iid). ``seed`` is the run seed (default ``params.seed``): sample
        ``i`` of problem ``p`` is seeded by ``(seed, p, i)``, so a smaller budget gives a prefix
        of a larger one. Each problem is a program on the engine loop
        (:mod:`ttscale.samplers.loop`): requests of many problems are in the engine together (at
        most ``batch_size`` samples), a problem's result is yielded as soon as it and every
        earlier one are done, and the next problems' requests join the engine as slots free up. ``sink``: a store that receives
        every sample (the sampler's own ``store`` is not used); samples already in it are read
        back instead of generated, so an interrupted ``sample`` resumes.
        """
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        params = self.params if seed is None else self.params.replace(seed=seed)
        problems = unique_problems(problems)
        if sink is not None:
            open_sink(
                sink, problems, engine_info=self.engine_info, params=params, n=budget,
                chat=self.chat, iid=True, extra=self.extra_manifest,
            )
        # validated and recorded now; the samples are drawn as the caller iterates
        return self._sample(problems, budget, params, sink)

    def _sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        params: SamplingParams,
        sink: SampleStore | None,
    ) -> Iterator[SampleResult]:
        stored = _stored_completions(sink, problems, budget) if sink is not None else {}
        session = self._session(sink, shard=None, claims=False)
        remaining = {
            p.id: sum(1 for i in range(budget) if (p.id, i) not in stored) for p in problems
        }
        session.show_progress(
            self._show_progress(), remaining=remaining, samples=len(problems) * budget
        )
        with session:
            sched: Scheduler[SampleResult] = Scheduler(
                session, params, max_sequences=self.batch_size
            )
            yield from sched.run(self.program(p, budget, stored) for p in problems)

    def program(
        self, p: Problem, budget: int, have: Mapping[tuple[str, int], Completion]
    ) -> Program[SampleResult]:
        """Problem ``p``'s program (:mod:`ttscale.samplers.loop`): ask for the samples
        ``0..budget-1`` not in ``have`` (resumed), wait for them, return the result."""
        got: dict[int, Completion] = {}
        for comps in (yield from generate(self._plan(p, budget, have))):
            for c in comps:
                got[c.index] = c
        cands = []
        resumed = 0
        for i in range(budget):
            c = got.get(i)
            if c is None:
                c = have[(p.id, i)]
                resumed += 1
            cands.append(Candidate(c))
        return SampleResult(
            problem=p,
            candidates=tuple(cands),
            generated_tokens=sum(c.completion.num_tokens for c in cands),
            prompt_tokens=sum(c.completion.prompt_tokens or 0 for c in cands),
            iid=True,
            resumed=resumed,
        )

    def _plan(
        self, p: Problem, n: int, have: Container[tuple[str, int]]
    ) -> list[GenerationRequest]:
        return plan_requests(
            [p],
            n,
            have,
            max_per_request=self.max_per_request,
            messages=self.chat,
            system_prompt=self.system_prompt,
        )

    def _session(
        self, store: SampleStore | None, *, shard: tuple[int, int] | None, claims: bool
    ) -> SamplingSession:
        return SamplingSession(
            self.engine,
            store,
            engine_info=self.engine_info,
            flush_every=self.flush_every,
            flush_seconds=self.flush_seconds,
            background_writes=self.background_writes,
            shard=shard,
            claims=claims,
        )

    def _show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else bool(self.progress)

    def _start(self, store: SampleStore, n: int) -> None:
        start_run(
            store,
            engine_info=self.engine_info,
            params=self.params,
            n=n,
            chat=self.chat,
            iid=True,
            extra=self.extra_manifest,
        )


def _store_all(requests: list[GenerationRequest]) -> Program[None]:
    """A claimed problem's program in :meth:`RepeatedSampler.run`: its missing samples, stored
    by the session as they arrive."""
    yield from generate(requests)


def _stored_completions(
    sink: SampleStore, problems: Sequence[Problem], budget: int
) -> dict[tuple[str, int], Completion]:
    """The sink's samples ``0..budget-1`` of ``problems`` (one read of the run, or none)."""
    want = {(p.id, i) for p in problems for i in range(budget)}
    if not any(k in sink for k in want):
        return {}
    out: dict[tuple[str, int], Completion] = {}
    for s in sink.samples():
        if s.key in want:
            out[s.key] = s.to_completion()
    return out


def _missing(store: SampleStore, problem_id: str, n: int) -> list[int]:
    return [i for i in range(n) if (problem_id, i) not in store]
