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
    ) -> None:
        check_int("batch_size", batch_size, min=1)
        self.engine = engine
        self.forcing = forcing or BudgetForcing()
        f = self.forcing
        stops = tuple(dict.fromkeys((*params.stop, f.think_end)))
        self.params = params.replace(stop=stops, include_stop_str_in_output=False)
        self.batch_size = batch_size
        self.traces: list[ForcedTrace] = []

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
        if sink is not None:
            if len(sink):
                raise ConfigError(f"{sink.path} already holds samples; budget forcing needs a new run directory")
            open_sink(
                sink, unique, engine_info=info, params=params, n=budget, chat=False, iid=True,
                extra={"budget_forcing": asdict(self.forcing)},
            )  # fmt: skip
        return self._sample(list(unique), budget, params, sink, info)

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
            for res, recs in sched.run([self.program(p, budget) for p in problems]):
                self.traces.extend(recs)
                yield res
        if sink is not None:
            _write(sink, self.traces)

    def program(self, p: Problem, budget: int) -> Program[tuple[SampleResult, list[ForcedTrace]]]:
        """Problem ``p``'s program: its ``budget`` traces advance segment by segment together."""
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
                GenerationRequest(
                    problem_id=p.id, prompt=p.prompt, prefix=thinking[i], indices=(i,), step=segs[i],
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
            GenerationRequest(
                problem_id=p.id, prompt=p.prompt, prefix=head[i], indices=(i,), step=segs[i],
                max_tokens=f.answer_tokens, meta={"phase": "answer"},
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
        yield Keep(tuple(cands))  # the merged traces (their segments were counted, not stored)
        res = SampleResult(
            problem=p, candidates=tuple(cands), generated_tokens=sum(c.completion.num_tokens for c in cands),
            prompt_tokens=sum(c.completion.prompt_tokens or 0 for c in cands), iid=True,
        )  # fmt: skip
        return res, recs


def _write(sink: SampleStore, traces: Sequence[ForcedTrace]) -> None:
    """``RUN/budget_forcing.jsonl``: one line per trace (written atomically)."""
    path = sink.path / BUDGET_FILE
    fd, tmp = tempfile.mkstemp(dir=sink.path, prefix=".budget-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for t in traces:
                fh.write(json.dumps(asdict(t), sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
