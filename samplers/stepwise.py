"""What the step-wise samplers (SMC, step-level search) share: stored runs and step extension.

A step-wise sampler keeps every particle-step (or search node) of a problem as a candidate,
with a fate that is known only once the problem is done. So a problem's candidates reach the
store in one shard, once it is done, and:

* **done** means "stored": a problem is complete when the run holds samples of it (the shard is
  atomic), whatever became of the ``<kind>_done`` marker written after it (a run killed between
  the two is neither rerun nor counted twice);
* **salvage**: if a problem fails part-way (an engine error, Ctrl-C), the steps the engine
  finished are written to a journal (``RUN/partial/<kind>/<budget>/<problem>.json``, whole
  completions: token ids, both log-prob kinds, stop reason, prompt tokens) before the error
  propagates;
* **resume inside a problem**: a resumed run replays the journal instead of asking the engine
  again. Seeds are per (problem, candidate, step) and the resampling generator per problem, so
  the replay is the uninterrupted run, step for step; only what is missing is generated. The
  journaled tokens reach the run's accounting once, with the problem's shard (the interrupted
  session never stored them), so every generated token is counted exactly once.

:func:`extend` is the one step extender, a piece of a per-problem program on the engine loop
(:mod:`ttscale.samplers.loop`), so every problem in flight shares the engine: it submits a
step's requests (:func:`step_request`, with per-request token caps) and waits for them, replays
journaled completions and records what the engine hands over for salvage; :func:`step_text` is the text a step adds and
:func:`ends_trace` says what ends a trace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ttscale.engines.base import GenerationRequest, continuation_text
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate, Fate
from ttscale.samplers.loop import Command, generate
from ttscale.store import SampleStore
from ttscale.types import Completion, FinishReason, Problem, Sample, SamplingParams

__all__ = ["StepRun", "ends_trace", "extend", "salvaged_keys", "step_request", "step_text"]

log = logging.getLogger(__name__)

_PARTIAL = "partial"


def ends_trace(c: Completion, final_stop: Sequence[str] = ()) -> bool:
    """Whether the engine ended the trace itself (not at a step boundary or a token cap).

    ``finish_reason`` ``stop`` with no stop *string* is the end of the sequence: ``stop_reason``
    is ``None`` for the model's EOS token and an ``int`` for another stop token id (vLLM and
    OpenAI-compatible servers report the id of a stop token from the model's generation config,
    e.g. Llama 3's ``<|eot_id|>``). A string is one of the step's stop strings: the step ended,
    the trace goes on -- unless it is one of ``final_stop`` (the user's own ``stop``, which ends
    the whole solution). An aborted or empty step ends the trace too (nothing can follow it).
    """
    if c.finish_reason == FinishReason.ABORT.value or c.num_tokens == 0:
        return True
    if isinstance(c.stop_reason, str) and c.stop_reason in final_stop:
        return True
    return c.finish_reason == FinishReason.STOP.value and not isinstance(c.stop_reason, str)


def step_request(
    problem: Problem,
    *,
    chat: bool,
    indices: tuple[int, ...],
    step: int,
    prefix_ids: Sequence[int] | None = None,
    prefix_text: str = "",
) -> GenerationRequest:
    """The request that extends a partial trace by one step: the prompt (as a user message with
    ``chat``), then the trace so far as exact token ids (``prefix_ids``: an engine with
    ``token_prefixes``) or as text (``prefix_text``, re-tokenised by the engine)."""
    base: dict[str, Any]
    if chat:
        base = {"messages": ({"role": "user", "content": problem.prompt},)}
    else:
        base = {"prompt": problem.prompt}
    if prefix_ids is not None:
        return GenerationRequest(
            problem_id=problem.id, prefix_token_ids=tuple(prefix_ids), indices=indices,
            step=step, **base,
        )  # fmt: skip
    return GenerationRequest(
        problem_id=problem.id, prefix=prefix_text, indices=indices, step=step, **base
    )


def step_text(
    decode: Callable[[Sequence[int]], str] | None, prefix_ids: Sequence[int], c: Completion
) -> str:
    """The text of exactly the tokens a step kept: an engine trims its text after a stop string
    that ends inside a token, but the next step continues after that token (without ``decode``
    or token ids: the engine's text)."""
    if decode is None or c.token_ids is None:
        return c.text
    return continuation_text(decode, prefix_ids, c.token_ids)


def extend(
    requests: Sequence[GenerationRequest],
    params: SamplingParams,
    caps: Sequence[int],
    *,
    replay: Mapping[tuple[str, int], Completion] | None = None,
    seen: dict[tuple[str, int], Completion] | None = None,
    engine: str | None = None,
) -> Generator[Command, Any, list[list[Completion]]]:
    """One step, as part of a program on the engine loop (:mod:`ttscale.samplers.loop`; use
    ``yield from``): the completions of ``requests`` (one list per request, in index order).

    ``caps[k]``: request ``k``'s token cap (sent as its ``max_tokens``, so requests of any cap
    share the engine). Samples found in ``replay`` (a resumed problem's journal) are taken from
    it, not generated; the rest are submitted together (not stored: a step-wise sampler stores
    its candidates once their fates are known) and waited for. Every completion the engine hands
    over is put in ``seen`` as it arrives -- also those an engine that fails had finished -- so
    the caller can salvage them. ``engine`` names the engine in the error raised when it
    ignores a request's ``max_tokens``.
    """
    replay = replay or {}
    out: list[dict[int, Completion]] = [{} for _ in requests]
    todo: list[GenerationRequest] = []
    where: list[int] = []
    for k, req in enumerate(requests):
        missing = []
        for i in req.indices:
            hit = replay.get((req.problem_id, i))
            if hit is None:
                missing.append(i)
            else:
                out[k][i] = hit
        if missing:
            cap = caps[k]
            # a request below the step's cap carries its own max_tokens
            if len(missing) < len(req.indices) or (cap < params.max_tokens and req.max_tokens != cap):
                req = replace(
                    req, indices=tuple(missing),
                    max_tokens=cap if cap < params.max_tokens else req.max_tokens,
                )  # fmt: skip
            todo.append(req)
            where.append(k)

    def record(comps: Iterable[Completion]) -> None:
        if seen is not None:
            for c in comps:
                seen[(c.problem_id, c.index)] = c

    got = yield from generate(todo, store=False, observe=record)
    for k, r, comps in zip(where, todo, got, strict=True):
        cap = r.params_for(params).max_tokens
        if any(c.num_tokens > cap for c in comps):
            raise ConfigError(
                f"engine {engine!r} generated more than a request's max_tokens={cap}; a "
                "step-wise sampler needs engines that honour GenerationRequest.max_tokens"
            )
        for c in comps:
            out[k][c.index] = c
    return [[o[i] for i in req.indices] for o, req in zip(out, requests, strict=True)]


# ---- stored runs -----------------------------------------------------------------------------


@dataclass
class StepRun:
    """A step-wise sampler's run directory at one budget: ``kind`` is its manifest key
    (``smc``, ``search``), ``what`` how messages name it."""

    sink: SampleStore
    kind: str
    budget: int
    what: str
    #: the engine's ``info()``: a journal is replayed only by the engine and model that made it
    engine_info: Mapping[str, Any] = field(default_factory=dict)
    _samples: dict[str, list[Sample]] | None = field(default=None, repr=False)

    def check_same(self, config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> None:
        """A run directory holds one configuration (candidate keys depend on all of it)."""
        old = self.sink.manifest.get(self.kind)
        if not isinstance(old, Mapping):
            if len(self.sink):
                raise ConfigError(
                    f"run directory {self.sink.path} holds samples that are not from "
                    f"{self.what}; use a new --out"
                )
            return
        skip = set(ignore)
        for key, value in config.items():
            if key not in skip and key in old and old[key] != value:
                raise ConfigError(
                    f"run directory {self.sink.path} was made with {self.what} {key} "
                    f"{old[key]!r}, not {value!r}; resume with the same settings or use a new --out"
                )

    def done(self) -> set[str]:
        """Problems stored whole: recorded done, or with samples in the run (a problem's
        candidates are written in one shard once it is done, so any sample means all); a
        stored problem left unmarked by a killed run is marked here."""
        marked = set((self.sink.manifest.get(f"{self.kind}_done") or {}).get(str(self.budget), []))
        stored = set(self.sink.counts())
        if stored - marked:  # killed between storing and marking: complete the record
            self.mark_done(sorted(stored - marked))
        return marked | stored

    def mark_done(self, problem_ids: Sequence[str]) -> None:
        """Record that these problems are stored whole, and drop their journals."""
        key = f"{self.kind}_done"

        def mark(m: dict[str, Any]) -> None:
            done = dict(m.get(key) or {})
            ids = list(done.get(str(self.budget), []))
            ids.extend(i for i in problem_ids if i not in ids)
            done[str(self.budget)] = ids
            m[key] = done

        self.sink.modify_manifest(mark)
        for pid in problem_ids:
            try:
                self._journal_path(pid).unlink()
            except FileNotFoundError:
                pass

    def stored(self, problem_id: str) -> tuple[list[Candidate], int]:
        """A stored problem's candidates (index order) and the tokens they hold."""
        if self._samples is None:  # one read of the run for every problem resumed from it
            self._samples = {}
            for row in self.sink.samples():
                self._samples.setdefault(row.problem_id, []).append(row)
        cands: list[Candidate] = []
        tokens = 0
        for s in sorted(self._samples.get(problem_id, []), key=lambda s: s.index):
            tokens += s.num_tokens or 0
            fate = Fate(s.fate or Fate.KEPT.value)
            cands.append(
                Candidate(
                    s.to_completion(),
                    step=s.step or 0,
                    parent=s.parent,
                    log_weight=s.log_weight,
                    fate=fate,
                    pruned_at=s.pruned_at if fate is Fate.PRUNED else None,
                )
            )
        return cands, tokens

    # ---- the journal of a problem left unfinished --------------------------------------------

    def _journal_path(self, problem_id: str) -> Path:
        digest = hashlib.blake2b(problem_id.encode(), digest_size=12).hexdigest()
        return self.sink.path / _PARTIAL / self.kind / str(self.budget) / f"{digest}.json"

    def journal(self, problem_id: str) -> dict[tuple[str, int], Completion]:
        """The steps an interrupted attempt at ``problem_id`` finished (empty if none)."""
        path = self._journal_path(problem_id)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"the journal {path} of an interrupted problem is damaged ({e}); delete it to "
                "rerun that problem from its start"
            ) from e
        made_by = data.get("engine") or {}
        ours = _engine_key(self.engine_info)
        if made_by != ours:
            log.warning(
                "the journal of problem %r was made by engine %s, not %s: rerunning the problem "
                "from its start", problem_id, made_by, ours,
            )  # fmt: skip
            return {}
        comps = [_completion(d) for d in data.get("completions", [])]
        if comps:
            log.info("resuming problem %r from %d journaled steps", problem_id, len(comps))
        return {(c.problem_id, c.index): c for c in comps if c.problem_id == problem_id}

    def salvage(self, problem_id: str, comps: Iterable[Completion]) -> None:
        """Journal the steps an attempt finished before it failed (atomically)."""
        items = sorted(comps, key=lambda c: c.index)
        if not items:
            return
        path = self._journal_path(problem_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        body = {
            "problem_id": problem_id,
            "engine": _engine_key(self.engine_info),
            "completions": [_plain(c) for c in items],
        }
        tmp.write_text(json.dumps(body))
        tmp.replace(path)
        log.info("journaled %d finished steps of problem %r for resume", len(items), problem_id)


#: what a step-wise problem program is started with: the journal to replay and the dict that
#: receives every particle-step the engine hands over (both None for an in-memory run)
StartProgram = Callable[
    [Mapping[tuple[str, int], Completion] | None, dict[tuple[str, int], Completion] | None],
    Generator[Command, Any, Any],
]


def stored_problem(
    problem: Problem,
    session: Any,
    run: StepRun | None,
    done: set[str],
    started: dict[str, tuple[Mapping[tuple[str, int], Completion], dict[Any, Completion]]],
    start: StartProgram,
    resumed: Callable[[], Any],
) -> Generator[Command, Any, Any]:
    """The one stored-run path of a step-wise problem (SMC and search): read back if the run
    holds it (``resumed()``), else ``start(replay, seen)`` resuming from its journal, its
    candidates stored in one shard and the problem marked done. ``started`` holds the journal
    and the salvage dict of every problem in flight, so a failure can journal them all."""
    if run is None:
        return (yield from start(None, None))
    if problem.id in done:
        return resumed()
    replay = run.journal(problem.id)
    seen: dict[tuple[str, int], Completion] = {}
    started[problem.id] = (replay, seen)
    result = yield from start(replay, seen)
    session.keep(result.candidates)
    session.flush()
    run.mark_done([problem.id])
    del started[problem.id]
    return result


def salvaged_keys(store: SampleStore) -> set[tuple[str, int]]:
    """``(problem_id, index)`` of every journaled step in a run (kept for resume, not yet in its
    samples: a step-wise problem that failed part-way)."""
    root = store.path / _PARTIAL
    out: set[tuple[str, int]] = set()
    for f in sorted(root.rglob("*.json")) if root.is_dir() else []:
        for d in json.loads(f.read_text()).get("completions", []):
            out.add((str(d["problem_id"]), int(d["index"])))
    return out


def _engine_key(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: info.get(k) for k in ("engine", "model", "logprob_mode")}


def _plain(c: Completion) -> dict[str, Any]:
    # Python's JSON round-trips floats exactly (repr) and writes -inf/NaN log-probs as
    # -Infinity/NaN, which it reads back
    d = asdict(c)
    if c.top_logprobs is not None:  # JSON keys are strings; Completion turns them back to ints
        d["top_logprobs"] = [{str(k): v for k, v in t.items()} for t in c.top_logprobs]
    return d


def _completion(d: Mapping[str, Any]) -> Completion:
    return Completion(**d)
