"""Budget forcing (Muennighoff et al., 2025, "s1: Simple test-time scaling", arXiv 2501.19393).

Controls how long a reasoning model thinks. Each trace is generated in segments, as a program on
the engine loop (:mod:`ttscale.samplers.loop`), with the end-of-thinking delimiter as a stop
string:

1. thinking: generate until the delimiter (or the end of sequence), at most ``max_thinking``
   thinking tokens in all;
2. if it ended before ``min_thinking`` tokens, the delimiter is suppressed: the continuation cue
   (``"Wait"``) is appended instead and thinking goes on (at most ``max_waits`` times);
3. if it reaches ``max_thinking`` tokens, the end is forced: the delimiter is appended;
4. answer: after the delimiter (and ``answer_prefix``), at most ``answer_tokens`` more tokens.

The delimiter, the cue and the answer prefix are settings (s1 uses its model's end-of-thinking
token, ``"Wait"`` and ``"Final Answer:"``; no model here has a thinking delimiter, so the tests
use the Scripted engine and the bundled arith model with ``"\\n####"``, the line before its
answer, as a synthetic one). Each trace records its thinking tokens, the cues appended and
whether the end was forced (:class:`ForcedTrace`; with a sink, ``budget_forcing.jsonl``).

The delimiter is a stop string for every segment, so an answer that contains it again ends
there. Segments continue the text (``prefix``), so a continuation may be tokenised differently
from how it was generated; tokens counted are the generated ones only (cues and delimiters
appended by the sampler are prompt text). What was checked: the procedure against the paper's
description (suppress the end-of-thinking token and append "Wait" to think longer, append the
delimiter and "Final Answer:" to stop); not checked against their code or numbers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate, SampleResult
from ttscale.samplers.loop import Keep, Program, Scheduler, generate
from ttscale.samplers.session import SamplingSession, open_sink, unique_problems
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams
from ttscale.validation import check_int

__all__ = ["BudgetForcing", "BudgetForcingSampler", "ForcedTrace", "parse_budget_forcing"]

log = logging.getLogger(__name__)

BUDGET_FILE = "budget_forcing.jsonl"


@dataclass(frozen=True)
class BudgetForcing:
    """The settings (see the module docstring)."""

    think_end: str = "</think>"
    min_thinking: int = 0
    max_thinking: int = 1024
    wait: str = "Wait"
    max_waits: int = 8
    answer_prefix: str = ""
    answer_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.think_end:
            raise ConfigError("budget forcing needs an end-of-thinking delimiter (think_end)")
        check_int("min_thinking", self.min_thinking, min=0)
        check_int("max_thinking", self.max_thinking, min=1)
        check_int("max_waits", self.max_waits, min=0)
        check_int("answer_tokens", self.answer_tokens, min=1)
        if self.min_thinking > self.max_thinking:
            raise ConfigError(
                f"min_thinking {self.min_thinking} exceeds max_thinking {self.max_thinking}"
            )


_SPEC_KEYS = {
    "think_end": str, "min": int, "max": int, "wait": str, "max_waits": int, "answer_prefix": str,
    "answer_tokens": int,
}  # fmt: skip
_FIELD = {"min": "min_thinking", "max": "max_thinking"}


def parse_budget_forcing(text: str) -> BudgetForcing:
    """``think_end=</think>,min=256,max=1024[,wait=Wait,max_waits=8,answer_prefix=...,
    answer_tokens=64]`` -> :class:`BudgetForcing`; ``\n`` and ``\t`` in values are newlines and
    tabs (``think_end=\n####``); a value cannot hold a comma. One-line :class:`ConfigError`."""
    kwargs: dict[str, Any] = {}
    for part in (x for x in str(text).split(",") if x.strip()):
        key, eq, value = part.partition("=")  # values verbatim: answer_prefix may be a space
        key = key.strip()
        if not eq or key not in _SPEC_KEYS:
            raise ConfigError(
                f"budget forcing {text!r}: {part!r} is not one of {', '.join(k + '=...' for k in _SPEC_KEYS)}"
            )
        value = value.replace("\\n", "\n").replace("\\t", "\t")
        try:
            kwargs[_FIELD.get(key, key)] = _SPEC_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"budget forcing: {key}={value!r} is not an integer") from None
    if "think_end" not in kwargs:
        raise ConfigError("budget forcing needs the end-of-thinking delimiter: think_end=...")
    return BudgetForcing(**kwargs)


@dataclass(frozen=True)
class ForcedTrace:
    """What budget forcing did to one trace."""

    problem_id: str
    index: int
    thinking_tokens: int
    answer_tokens: int
    waits: int
    forced_end: bool
    segments: int
    thinking: str
    answer: str


class BudgetForcingSampler:
    """``budget`` traces per problem, each thinking between ``min_thinking`` and
    ``max_thinking`` tokens (:class:`BudgetForcing`), then answering. The
    :class:`~ttscale.samplers.base.Sampler` protocol; a trace's text is its thinking, the
    delimiter, the answer prefix and the answer, and its ``num_tokens`` the tokens generated for
    it. :attr:`traces` holds the last call's :class:`ForcedTrace` records."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        forcing: BudgetForcing | None = None,
        *,
        batch_size: int = 512,
        chat: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        check_int("batch_size", batch_size, min=1)
        self.engine = engine
        self.chat = bool(chat)
        self.system_prompt = system_prompt
        self.forcing = forcing or BudgetForcing()
        f = self.forcing
        stops = tuple(dict.fromkeys((*params.stop, f.think_end)))
        self.params = params.replace(stop=stops, include_stop_str_in_output=False)
        self.batch_size = batch_size
        self.traces: list[ForcedTrace] = []
        self._have: set[tuple[str, int]] = set()  # the sink's stored (problem, index) keys
        self._recorded: set[tuple[str, int]] = set()  # and those in its budget file

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        params = self.params if seed is None else self.params.replace(seed=seed)
        unique = unique_problems(problems)
        info = self.engine.info()
        self._have, self._recorded = set(), set()
        todo = list(unique)
        if sink is not None:
            if len(sink):
                self._check_resume(sink, budget)
            open_sink(
                sink, unique, engine_info=info, params=params, n=budget, chat=self.chat, iid=True,
                extra={"budget_forcing": asdict(self.forcing), "system_prompt": self.system_prompt},
            )  # fmt: skip
            self._have = {(s.problem_id, s.index) for s in sink.samples()}
            self._recorded = _keep_records(sink, self._have)
            # a problem is done when every trace is stored and recorded; any other is generated
            # again from its seeds (the same traces), storing and recording only what is missing
            done = self._have & self._recorded
            todo = [p for p in unique if any((p.id, i) not in done for i in range(budget))]
            if len(todo) < len(unique):
                log.info("budget forcing: %d of %d problems already stored", len(unique) - len(todo), len(unique))
        return self._sample(todo, budget, params, sink, info)

    def _check_resume(self, sink: SampleStore, budget: int) -> None:
        """A run resumed with other settings is refused (one line), so no run mixes them."""
        m = sink.manifest
        if "budget_forcing" not in m:
            raise ConfigError(f"{sink.path} is not a budget-forcing run; sample into a new --out")
        old_n = int((m.get("sampling") or {}).get("n") or 0)
        for what, old, new in (
            ("budget forcing settings", m.get("budget_forcing"), asdict(self.forcing)),
            ("chat", bool(m.get("chat", False)), self.chat),
            ("system prompt", m.get("system_prompt"), self.system_prompt),
            ("traces per problem (--n)", old_n, budget),
        ):
            if old != new:
                raise ConfigError(
                    f"{sink.path} was sampled with {what} {old!r}, not {new!r}; resume with the same "
                    "settings or use a new --out"
                )

    def _request(self, p: Problem, **kw: Any) -> GenerationRequest:
        """A segment's request: the raw prompt, or (chat) the user message after the system
        prompt, the engine applying the model's template; ``prefix`` continues the reply."""
        if self.chat:
            msgs: list[dict[str, str]] = []
            if self.system_prompt:
                msgs.append({"role": "system", "content": self.system_prompt})
            msgs.append({"role": "user", "content": p.prompt})
            return GenerationRequest(problem_id=p.id, messages=msgs, **kw)
        return GenerationRequest(problem_id=p.id, prompt=p.prompt, **kw)

    def _sample(
        self, problems: list[Problem], budget: int, params: SamplingParams, sink: SampleStore | None,
        info: dict[str, Any],
    ) -> Iterator[SampleResult]:
        self.traces = []
        session = SamplingSession(self.engine, sink, engine_info=info)
        with session:
            sched: Scheduler[tuple[SampleResult, list[ForcedTrace]]] = Scheduler(
                session, params, max_sequences=self.batch_size
            )
            for res, recs in sched.run([self.program(p, budget, sink) for p in problems]):
                self.traces.extend(recs)
                yield res

    def program(
        self, p: Problem, budget: int, sink: SampleStore | None = None
    ) -> Program[tuple[SampleResult, list[ForcedTrace]]]:
        """Problem ``p``'s program: its ``budget`` traces advance segment by segment together.
        With a sink, its records are appended to the budget file before its samples are stored,
        and only the traces not yet stored (recorded) are stored (recorded): a resume after a kill
        between the two neither loses nor duplicates one."""
        f = self.forcing
        thinking = [""] * budget
        tokens = [0] * budget
        waits = [0] * budget
        segs = [0] * budget
        last: list[Completion | None] = [None] * budget
        open_ = list(range(budget))
        forced: set[int] = set()
        while open_:
            reqs = [
                self._request(
                    p, prefix=thinking[i], indices=(i,), step=segs[i],
                    max_tokens=f.max_thinking - tokens[i], meta={"phase": "thinking"},
                )
                for i in open_
            ]
            got = yield from generate(reqs, store=False)
            still = []
            for i, comps in zip(open_, got, strict=True):
                c = comps[0]
                thinking[i] += c.text
                tokens[i] += c.num_tokens
                segs[i] += 1
                last[i] = c
                if c.finish_reason == "length" or tokens[i] >= f.max_thinking:
                    forced.add(i)  # the budget is spent: the end is forced
                elif tokens[i] < f.min_thinking and waits[i] < f.max_waits:
                    # ended too early: suppress the delimiter, append the cue, think on
                    thinking[i] += f.wait
                    waits[i] += 1
                    still.append(i)
            open_ = still
        head = [thinking[i] + f.think_end + f.answer_prefix for i in range(budget)]
        reqs = [
            self._request(
                p, prefix=head[i], indices=(i,), step=segs[i], max_tokens=f.answer_tokens,
                meta={"phase": "answer"},
            )
            for i in range(budget)
        ]
        answers = yield from generate(reqs, store=False)
        cands: list[Candidate] = []
        recs: list[ForcedTrace] = []
        for i in range(budget):
            a = answers[i][0]
            first = last[i]
            assert first is not None
            total = tokens[i] + a.num_tokens
            comp = Completion(
                problem_id=p.id, index=i, text=head[i] + a.text, num_tokens=total,
                finish_reason=a.finish_reason, seed=first.seed, prompt_tokens=first.prompt_tokens,
            )  # fmt: skip
            cands.append(Candidate(comp))
            recs.append(ForcedTrace(p.id, i, tokens[i], a.num_tokens, waits[i], i in forced,
                                    segs[i] + 1, thinking[i], a.text))  # fmt: skip
        if sink is not None:
            new = [r for r in recs if (p.id, r.index) not in self._recorded]
            _append(sink, new)
            self._recorded.update((p.id, r.index) for r in new)
        # the merged traces (their segments were counted, not stored); stored ones are not again
        keep = tuple(c for c in cands if (p.id, c.completion.index) not in self._have)
        if keep:
            yield Keep(keep)
        res = SampleResult(
            problem=p, candidates=tuple(cands), generated_tokens=sum(c.completion.num_tokens for c in cands),
            prompt_tokens=sum(c.completion.prompt_tokens or 0 for c in cands), iid=True,
        )  # fmt: skip
        return res, recs


def _read_records(sink: SampleStore) -> list[dict[str, Any]]:
    """The budget file's records; a line cut short by a kill is dropped (it is written again)."""
    path = sink.path / BUDGET_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "problem_id" in row and "index" in row:
            out.append(row)
    return out


def _keep_records(sink: SampleStore, have: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Rewrite the budget file (atomically) with one record per stored trace, dropping records
    of traces whose samples were never stored (a kill after the record, before the samples: the
    trace is generated and recorded again) and duplicates; the keys kept."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for row in _read_records(sink):
        key = (str(row["problem_id"]), int(row["index"]))
        if key in have:
            rows.setdefault(key, row)
    path = sink.path / BUDGET_FILE
    if rows or path.exists():
        _write_lines(sink, [json.dumps(r, sort_keys=True) for r in rows.values()])
    return set(rows)


def _append(sink: SampleStore, traces: Sequence[ForcedTrace]) -> None:
    """Append one problem's records to ``RUN/budget_forcing.jsonl`` and make them durable."""
    if not traces:
        return
    with open(sink.path / BUDGET_FILE, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(asdict(t), sort_keys=True) + "\n" for t in traces))
        fh.flush()
        os.fsync(fh.fileno())


def _write_lines(sink: SampleStore, lines: Sequence[str]) -> None:
    """``RUN/budget_forcing.jsonl`` replaced atomically by ``lines``."""
    path = sink.path / BUDGET_FILE
    fd, tmp = tempfile.mkstemp(dir=sink.path, prefix=".budget-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
