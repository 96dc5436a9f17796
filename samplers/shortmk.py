"""short-m@k live (Hassid et al., 2025): k traces per problem, stop when the first m finish.

Each problem is a program on the engine loop (:mod:`ttscale.samplers.loop`): its ``k`` traces
are submitted at once, one request per trace so each comes back on its own; as soon as ``m`` of
them have finished, the others are aborted (their slots freed, the tokens they had generated
counted), and the answer is the majority among the ``m`` shortest finished traces, ties to the
shortest (:func:`ttscale.select.shortmk.short_mk`). Traces that finish in the same engine poll
(or come back with the abort) are all counted as finished and ranked by length, so:

* on an engine with its own loop where a problem's ``k`` traces run side by side (``batch_size
  >= k``; the Scripted and vLLM engines), traces finish in length order up to the poll
  granularity, and the chosen traces and answer are those of the replay
  (:func:`ttscale.select.shortmk.replay_short`, index order) of the fixed-``k`` run with the
  same seed; tokens spent differ from the replay's lockstep model by what a poll overshoots;
* on an engine with only batch ``generate``, all ``k`` come back together: the same answer,
  and no tokens saved (a warning says so);
* with ``batch_size < k`` a late-starting trace can finish after a longer one, so the live
  choice may differ from the replay (a warning says so).

With a ``sink`` the run is a run of its own kind (``shortmk``, :mod:`ttscale.runkinds`): every
finished trace is stored as it arrives (the first ``m`` and any that finished in the same poll;
aborted traces have no text to store, their tokens go into the run's accounting), the manifest
records the rule (``shortmk``: rule, ``m``, ``k``, budget) and the run is not iid (its traces
are the shortest of each problem's ``k``), and ``RUN/shortmk.jsonl`` holds one decision row per
problem (:class:`ShortDecision`: the finished traces in finish order, the chosen ones, the
answer, the tokens of the finished and the aborted traces). A row is written only once the
problem's finished traces are durable, so a killed run resumes (same rule, same ``--out``)
without losing or duplicating a sample: a problem with a row is taken as it is; a problem
without one runs again with its stored finished traces as the first to finish (they were,
under the length order) and only its other traces generated again with their own seeds. The
one thing a kill can lose is a decided problem's aborted-token count, when the kill falls
between its traces becoming durable and its row being written; the run's accounting still holds
those tokens, and the row says ``resumed`` (traces read back) with ``aborted_tokens`` 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest, capabilities_of
from ttscale.errors import ConfigError
from ttscale.samplers.adaptive import AnswerFn, write_decision_rows
from ttscale.samplers.base import Candidate, SampleResult
from ttscale.samplers.loop import Abort, Program, Scheduler, Submit, Wait
from ttscale.samplers.repeated import RepeatedSampler, _stored_completions, plan_requests
from ttscale.samplers.session import open_sink, unique_problems
from ttscale.select.shortmk import ShortMK, finish_order, parse_short, short_mk
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams
from ttscale.validation import check_int

__all__ = ["SHORTMK_FILE", "ShortDecision", "ShortMKSampler", "check_short_run", "read_short_decisions"]

log = logging.getLogger(__name__)

SHORTMK_FILE = "shortmk.jsonl"

# decision rows are appended at most this often (each append first makes the samples durable)
_ROW_SECONDS = 5.0


@dataclass(frozen=True)
class ShortDecision:
    """One problem: the rule, ``k`` and ``m``, the ``chosen`` trace indices (the first ``m`` of
    ``finish_order``: the finished traces by length, then index), the ``answer``, how many
    traces ``finished`` and were ``aborted``, the tokens of the finished and the aborted traces
    (``generated_tokens`` is their sum), and how many finished traces were ``resumed`` (read
    back from the run instead of generated)."""

    problem_id: str
    rule: str
    k: int
    m: int
    chosen: tuple[int, ...]
    answer: Hashable | None
    finished: int
    aborted: int
    finished_tokens: int
    aborted_tokens: int
    finish_order: tuple[int, ...] = ()
    resumed: int = 0

    @property
    def generated_tokens(self) -> int:
        return self.finished_tokens + self.aborted_tokens

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ShortDecision:
        return cls(
            problem_id=str(row["problem_id"]), rule=str(row["rule"]), k=int(row["k"]), m=int(row["m"]),
            chosen=tuple(int(i) for i in row["chosen"]), answer=row.get("answer"),
            finished=int(row["finished"]), aborted=int(row["aborted"]),
            finished_tokens=int(row["finished_tokens"]), aborted_tokens=int(row["aborted_tokens"]),
            finish_order=tuple(int(i) for i in row["finish_order"]), resumed=int(row.get("resumed", 0)),
        )  # fmt: skip


def read_short_decisions(path: os.PathLike[str] | str) -> list[dict[str, Any]]:
    """The rows of a run's ``shortmk.jsonl``, one per problem (the last written wins). A line
    cut short by a kill during an append is skipped (its problem runs again on resume)."""
    f = Path(path) / SHORTMK_FILE
    if not f.is_file():
        return []
    rows: dict[str, dict[str, Any]] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: skipping a decision row cut short (its problem is decided again)", f)
            continue
        if isinstance(r, dict) and "problem_id" in r:
            rows[r["problem_id"]] = r
    return list(rows.values())


def _append_rows(sink: SampleStore, decisions: Sequence[ShortDecision]) -> None:
    path = Path(sink.path) / SHORTMK_FILE
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line a kill cut short stays a line of its own
                f.write(b"\n")
        for d in decisions:
            row = asdict(d)
            row["answer"] = None if d.answer is None else str(d.answer)
            f.write((json.dumps(row, sort_keys=True) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def check_short_run(
    path: os.PathLike[str] | str, manifest: Mapping[str, Any], stored: int, rule: ShortMK, budget: int
) -> None:
    """A run that short-m@k (``rule`` at ``budget``) may write into: a new one (no samples, no
    other kind), or a short-m@k run of this rule and ``k``; its stored traces are read as the
    first to finish, which only a short-m@k run's are. A :class:`ConfigError` otherwise."""
    from ttscale.runkinds import describe_kind

    entry = manifest.get("shortmk")
    if not entry:
        if stored or any(manifest.get(f) for f in ("adaptive", "allocation", "pruning", "smc", "search")):
            raise ConfigError(
                f"{path} holds a {describe_kind(manifest)} run; short-m@k stores the traces that "
                "finished first, which cannot join it: use a new --out"
            )
        return
    k = rule.size(budget)
    if entry.get("rule") != rule.spec or entry.get("k") != k:
        raise ConfigError(
            f"{path} is a short-m@k run of {entry.get('rule')} with k = {entry.get('k')}, not "
            f"{rule.spec} with k = {k}: resume with the same rule and --n, or use a new --out"
        )


class ShortMKSampler:
    """short-m@k on the engine loop (see the module docstring). ``rule``: a :class:`ShortMK` or
    its spec (``short-3@k``: k = the budget given to :meth:`sample`); ``answer_fn`` gives each
    finished trace's answer (:data:`~ttscale.samplers.adaptive.AnswerFn`). :attr:`decisions`
    holds the last call's :class:`ShortDecision` per problem. ``manifest``: run-level fields
    recorded with a sink (model, benchmark, ...)."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        rule: ShortMK | str,
        answer_fn: AnswerFn,
        *,
        batch_size: int = 512,
        flush_every: int = 512,
        chat: bool | None = None,
        system_prompt: str | None = None,
        progress: bool | None = False,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self.rule = parse_short(rule) if isinstance(rule, str) else rule
        check_int("batch_size", batch_size, min=1)
        self.answer_fn = answer_fn
        self.batch_size = batch_size
        self._rep = RepeatedSampler(
            engine, params, None, batch_size=batch_size, progress=progress, chat=chat,
            system_prompt=system_prompt, manifest=manifest, flush_every=flush_every,
        )  # fmt: skip
        self.engine = engine
        self.params = params
        self.decisions: list[ShortDecision] = []
        # decided in a stored run, row not yet written (programs run without a sink, as the
        # server's, record nothing)
        self._fresh: list[ShortDecision] = []
        self._recording = False

    def manifest_entry(self, budget: int) -> dict[str, Any]:
        """The manifest's ``shortmk`` entry of a run with ``budget`` traces per problem."""
        return {"rule": self.rule.spec, "m": self.rule.m, "k": self.rule.size(budget), "budget": budget}

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """``k`` (the rule's, or ``budget``) traces per problem, stopped at the first ``m``; with
        ``sink``, a stored run that resumes (see the module docstring)."""
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        k = self.rule.size(budget)
        params = self.params if seed is None else self.params.replace(seed=seed)
        unique = unique_problems(problems)
        if sink is not None:
            check_short_run(sink.path, sink.manifest, len(sink), self.rule, budget)
            rep = self._rep
            open_sink(
                sink, unique, engine_info=rep.engine_info, params=params, n=k, chat=rep.chat, iid=False,
                compatible=rep.extra_manifest, extra={**rep.extra_manifest, "shortmk": self.manifest_entry(budget)},
            )  # fmt: skip
        if self.batch_size < k:
            log.warning(
                "%s with batch_size %d < k=%d: traces start at different times, so the first m to "
                "finish may not be the m shortest (the replay's order)", self.rule.spec, self.batch_size, k,
            )  # fmt: skip
        if not hasattr(self.engine, "open_loop") or not capabilities_of(self.engine).streaming:
            log.warning(
                "%s: the engine returns a batch at once, so all k traces finish together: the "
                "answer is short-m@k's, but no tokens are saved", self.rule.spec,
            )  # fmt: skip
        return self._sample(unique, k, params, sink)

    def _sample(
        self, problems: list[Problem], k: int, params: SamplingParams, sink: SampleStore | None
    ) -> Iterator[SampleResult]:
        self.decisions = []
        stored = _stored_completions(sink, problems, k) if sink is not None else {}
        rows: dict[str, ShortDecision] = {}
        if sink is not None:
            for r in read_short_decisions(sink.path):
                d = ShortDecision.from_row(r)
                # a row counts only with every finished trace it names stored
                if d.rule == self.rule.spec and d.k == k and all((d.problem_id, i) in stored for i in d.finish_order):
                    rows[d.problem_id] = d
        session = self._rep._session(sink, shard=None, claims=False)
        session.show_progress(
            self._rep._show_progress(),
            remaining={p.id: 0 if p.id in rows else k - sum((p.id, i) in stored for i in range(k)) for p in problems},
            samples=len(problems) * k,
        )
        programs = [
            self._decided(p, rows[p.id], stored) if p.id in rows else self.program(p, k, stored)
            for p in problems
        ]
        self._fresh = []  # decided by a program (in any order), row not yet written
        self._recording = sink is not None
        last = time.monotonic()
        try:
            with session:
                sched: Scheduler[tuple[SampleResult, ShortDecision]] = Scheduler(
                    session, params, max_sequences=self.batch_size
                )
                for res, d in sched.run(programs):
                    self.decisions.append(d)
                    if sink is not None and self._fresh and time.monotonic() - last >= _ROW_SECONDS:
                        session.flush()  # the rows' traces durable first: a row never names a missing trace
                        _append_rows(sink, self._take_fresh())
                        last = time.monotonic()
                    yield res
        finally:
            self._recording = False
            if sink is not None and self._fresh:
                # leaving the session stored every finished sample (Ctrl-C included)
                _append_rows(sink, self._take_fresh())
        if sink is not None:
            # one clean line per problem, this call's problems in order after any others
            mine = {d.problem_id for d in self.decisions}
            others = [ShortDecision.from_row(r) for r in read_short_decisions(sink.path) if r["problem_id"] not in mine]
            write_decision_rows(sink, SHORTMK_FILE, [*others, *self.decisions])

    def _take_fresh(self) -> list[ShortDecision]:
        out, self._fresh = self._fresh, []
        return out

    def _requests(self, p: Problem, k: int, have: set[tuple[str, int]]) -> list[GenerationRequest]:
        # one request per trace, so each finishes (or is aborted) on its own
        return plan_requests(
            [p], k, have, max_per_request=1, messages=self._rep.chat,
            system_prompt=self._rep.system_prompt,
        )  # fmt: skip

    def _decided(
        self, p: Problem, d: ShortDecision, stored: Mapping[tuple[str, int], Completion]
    ) -> Program[tuple[SampleResult, ShortDecision]]:
        """A problem a resumed run had decided: its row and stored traces, nothing generated."""
        comps = [stored[(p.id, i)] for i in d.finish_order]
        res = SampleResult(
            problem=p,
            candidates=tuple(Candidate(stored[(p.id, i)]) for i in d.chosen),
            generated_tokens=d.generated_tokens,
            prompt_tokens=sum(c.prompt_tokens or 0 for c in comps),
            iid=False,
            resumed=len(d.chosen),
            info={"resumed_tokens": d.generated_tokens},
        )
        return (res, d)
        yield  # unreachable: makes this a program (a generator) that asks for nothing

    def program(
        self, p: Problem, k: int, stored: Mapping[tuple[str, int], Completion] | None = None
    ) -> Program[tuple[SampleResult, ShortDecision]]:
        """Problem ``p``'s program: submit ``k`` traces (those not in ``stored``, which count as
        the first to finish), wait until ``m`` have finished, abort the rest, vote among the
        ``m`` shortest finished."""
        m = self.rule.m
        done: dict[int, Completion] = {
            i: stored[(p.id, i)] for i in range(k) if stored is not None and (p.id, i) in stored
        }
        resumed = len(done)
        aborted_tokens = 0
        n_aborted = 0
        if len(done) < m:
            tickets: tuple[int, ...] = yield Submit(tuple(self._requests(p, k, {(p.id, i) for i in done})))
            live = set(tickets)
            while len(done) < m:
                got: dict[int, list[Completion]] = yield Wait(tuple(sorted(live)))
                for t, cs in got.items():
                    live.discard(t)
                    for c in cs:
                        done[c.index] = c
            if live:
                res: Any = yield Abort(tuple(sorted(live)))
                aborted_tokens = int(res.tokens)
                for t, cs in res.finished.items():
                    live.discard(t)
                    for c in cs:
                        done[c.index] = c
                n_aborted = len(live)
        comps = [done[i] for i in sorted(done)]
        answers = list(self.answer_fn(p, comps))
        o = short_mk(answers, [c.num_tokens for c in comps], m)
        chosen = [comps[i] for i in o.chosen]
        d = ShortDecision(
            problem_id=p.id,
            rule=self.rule.spec,
            k=k,
            m=m,
            chosen=tuple(c.index for c in chosen),
            answer=o.answer,
            finished=len(comps),
            aborted=n_aborted,
            finished_tokens=sum(c.num_tokens for c in comps),
            aborted_tokens=aborted_tokens,
            finish_order=tuple(comps[i].index for i in finish_order([c.num_tokens for c in comps])),
            resumed=resumed,
        )
        if self._recording:
            self._fresh.append(d)
        resumed_tokens = sum(c.num_tokens for c in comps if stored is not None and (p.id, c.index) in stored)
        res_ = SampleResult(
            problem=p,
            candidates=tuple(Candidate(c) for c in chosen),
            generated_tokens=d.generated_tokens,
            prompt_tokens=sum(c.prompt_tokens or 0 for c in comps),
            iid=False,
            resumed=sum(1 for c in chosen if stored is not None and (p.id, c.index) in stored),
            info={"resumed_tokens": resumed_tokens} if resumed_tokens else {},
        )
        return res_, d
