"""Mid-generation trace pruning (level 2 of adaptive compute): stop traces that look hopeless.

A :class:`PruneRule` watches every trace token by token through a :class:`TraceMonitor` and says
at which token to stop it, and why. Three rules (docs/algorithms.md sections 3 and 4.3):

* :class:`DeepConfOnline` (``deepconf-online:eta=10,warmup=16,window=2048``): the first
  ``warmup`` traces of a problem run in full; the threshold ``s`` is the ``100 - eta``-th
  percentile of their lowest group confidences; every later trace is stopped at the first token
  where the mean token confidence of its last ``window`` tokens is strictly below ``s`` (a trace
  shorter than ``window`` is never stopped, as in the reference's logits processor);
* :class:`LowProb` (``lowprob:threshold=-1.5,min_tokens=16``): stop a trace once the running
  mean of its token log-probabilities is strictly below ``threshold`` (after ``min_tokens``);
* :class:`SelfEval` (``selfeval:checkpoint=64,threshold=0.5``): Manvi et al.'s early pruning: at
  the checkpoint, ask the model through the same engine (a scoring call) whether it would do
  better starting over, and stop the trace if ``P(no)`` is below ``threshold``. The paper's
  prompt, answer tokens, checkpoint and keep rule are unverified (docs/algorithms.md 3), so all are
  parameters.

:class:`PruningSampler` is the live sampler (the :class:`~ttscale.samplers.base.Sampler`
protocol; each problem is a program on the engine loop, :mod:`ttscale.samplers.loop`, so a
problem's watched traces start as soon as its own warm-up is done, with no barrier across
problems): it streams tokens and aborts traces where the engine declares ``streaming``, and
generates in chunks on token prefixes otherwise (:func:`~ttscale.engines.base.generate_chunked`). Every generated token is
counted, pruned traces included; a pruned trace is kept in the result (and the run) with fate
``pruned`` and the token count at which it was stopped, and the run directory's
``pruning.jsonl`` says what was pruned, when and why.

:func:`replay_pruning` runs the same monitors over stored traces (a run with per-token
log-probabilities): what a live run would have pruned, at which token, and the tokens saved. The
self-evaluation rules replay from the stored token ids with a scoring engine (the live sampler's
own scorer on each trace's prefix), their scored tokens counted apart as a live run counts them.
Because seeds are per (problem, index) and aborting a trace does not change its earlier tokens,
a live run on a streaming engine and the replay of the full run with the same seed agree trace
by trace.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ttscale.engines.base import (
    Engine,
    GenerationRequest,
    ScoringEngine,
    TokenEvent,
    TokenPrefixEngine,
    capabilities_of,
    require_capabilities,
    score_next,
)
from ttscale.engines.loop import BatchLoop, EngineLoop
from ttscale.errors import ConfigError
from ttscale.samplers.base import Candidate, Fate, SampleResult
from ttscale.samplers.loop import Program, Scheduler, generate
from ttscale.samplers.session import SamplingSession, open_sink, unique_problems
from ttscale.select.confidence import (
    DEFAULT_WINDOW,
    deepconf_threshold,
    lowest_group_confidence,
    token_confidence,
)
from ttscale.store import SampleStore
from ttscale.store.pool import Pool
from ttscale.types import Completion, Problem, Sample, SamplingParams
from ttscale.validation import check_int, check_number

__all__ = [
    "PRUNE_RULES",
    "DeepConfOnline",
    "LowProb",
    "PruneRule",
    "PruningReplay",
    "PruningSampler",
    "ProblemPruning",
    "SelfEval",
    "SelfEvalTop",
    "TraceMonitor",
    "TracePruning",
    "parse_prune_rule",
    "replay_pruning",
]

log = logging.getLogger(__name__)

#: Tokens per streamed chunk (vLLM's ``stream_interval``) of a watched trace, by default: the
#: engine hands tokens over every this many (one output and one callback per chunk, not per
#: token); the monitor still reads them one by one and cuts the trace at the token it names, and
#: the chunk's tokens past that point, generated anyway, are counted (``discarded_tokens``).
#: Chosen by measurement on vLLM CPU (benchmarks/RESULTS.md, issue 16: 8 and 16 saved no more time
#: than 4 and generate more tokens past the cuts).
DEFAULT_STREAM_INTERVAL = 4

#: ``scorer(token_ids) -> P(no)``: the self-evaluation score of a partial trace.
Scorer = Callable[[Sequence[int]], float]


class TraceMonitor(Protocol):
    """Watches one trace; :meth:`observe` is called once per generated token, in order.

    ``num_tokens`` is the 1-based count of the token, ``logprob`` its log-probability, ``top`` its
    top-k alternatives (token -> log-prob), ``token_ids`` the trace so far (this token included).
    Returns the reason to stop the trace at this token, or ``None`` to continue.
    """

    def observe(
        self,
        num_tokens: int,
        logprob: float | None,
        top: Mapping[int, float] | None,
        token_ids: Sequence[int],
    ) -> str | None: ...


class PruneRule(Protocol):
    """A pruning rule: its spec, what it needs, and a monitor per trace.

    ``warmup``: traces ``0..warmup-1`` of each problem run in full and set the problem's
    threshold (:meth:`warmup_threshold`); ``needs``: ``"logprobs"`` (sampled-token log-probs),
    ``"top_logprobs"`` (top-k alternatives) or ``"scoring"`` (a scoring engine).
    """

    name: str
    warmup: int
    needs: str

    def spec(self) -> str: ...

    def warmup_threshold(self, warmup: Sequence[Completion]) -> float | None: ...

    def monitor(self, threshold: float | None, scorer: Scorer | None = None) -> TraceMonitor: ...


# -- DeepConf online -----------------------------------------------------------------------------


#: Relative tolerance of "strictly below": values within it of the threshold count as equal
#: (kept). Engines compute log-probs in float32, whose last digits move with the batch a trace
#: is decoded in (~1e-8 in a log-prob, ~1e-6 in a window mean); identical token windows (common
#: in templated answers) then tie with the warm-up threshold, and without a tolerance a live run
#: and its replay could decide such a tie differently.
TIE_TOLERANCE = 1e-6


def _below(value: float, threshold: float) -> bool:
    """``value < threshold`` by more than :data:`TIE_TOLERANCE` (relative, at least absolute)."""
    return value < threshold - TIE_TOLERANCE * max(1.0, abs(threshold))


def _position_confidence(top: Mapping[int, float] | None) -> float | None:
    """DeepConf token confidence of one position (``None``: no alternatives, skipped)."""
    if not top:
        return None
    vals = [float(v) for v in top.values()]
    return -math.fsum(vals) / len(vals)


class _GroupConfMonitor:
    """Stops a trace when the mean confidence of its last ``window`` tokens is ``< threshold``."""

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold = threshold
        self.window = window
        self.confs: deque[float] = deque()
        self.total = 0.0

    def observe(
        self,
        num_tokens: int,
        logprob: float | None,
        top: Mapping[int, float] | None,
        token_ids: Sequence[int],
    ) -> str | None:
        c = _position_confidence(top)
        if c is None:
            return None
        self.confs.append(c)
        self.total += c
        if len(self.confs) > self.window:
            self.total -= self.confs.popleft()
        if len(self.confs) < self.window:
            return None
        mean = self.total / self.window
        if _below(mean, self.threshold):
            return (
                f"group confidence {mean:.4f} < threshold {self.threshold:.4f} "
                f"(window {self.window})"
            )
        return None


@dataclass(frozen=True)
class DeepConfOnline:
    """DeepConf online early stopping (docs/algorithms.md 4.3).

    ``eta``: percentage of traces to keep, in (0, 100) (10 = DeepConf-low, threshold at the 90th
    percentile of the warm-up lowest group confidences; 90 = DeepConf-high); ``warmup``: full
    traces per problem that set the threshold (``N_init``); ``window``: group size ``w`` in tokens.
    Token confidences are unrounded (the reference's logits processor; its post-hoc filter of
    finished traces is not applied: finished traces are kept). "Below" means below by more
    than :data:`TIE_TOLERANCE` (float32 noise), so exact ties with the threshold are kept.
    """

    eta: float = 10.0
    warmup: int = 16
    window: int = DEFAULT_WINDOW
    name = "deepconf-online"
    needs = "top_logprobs"

    def __post_init__(self) -> None:
        eta = check_number("eta", self.eta, low=0.0, high=100.0, low_open=True, high_open=True)
        object.__setattr__(self, "eta", eta)
        check_int("warmup", self.warmup, min=1)
        check_int("window", self.window, min=1)

    def spec(self) -> str:
        return f"{self.name}:eta={self.eta:g},warmup={self.warmup},window={self.window}"

    def lowest_confidence(self, completion: Completion) -> float:
        """``C_least`` of one finished trace (its top-k log-probs, unrounded)."""
        if completion.top_logprobs is None:
            raise ConfigError(
                f"deepconf-online needs top log-probs (trace {completion.problem_id!r}/"
                f"{completion.index}); sample with logprobs >= 1 (e.g. 20)"
            )
        return lowest_group_confidence(token_confidence(completion.top_logprobs), self.window)

    def warmup_threshold(self, warmup: Sequence[Completion]) -> float:
        """``Percentile_{100 - eta}`` of the warm-up traces' lowest group confidences."""
        return deepconf_threshold([self.lowest_confidence(c) for c in warmup], self.eta)

    def monitor(self, threshold: float | None, scorer: Scorer | None = None) -> TraceMonitor:
        if threshold is None:
            raise ConfigError("deepconf-online needs the warm-up threshold")
        return _GroupConfMonitor(threshold, self.window)


# -- low probability -----------------------------------------------------------------------------


class _MeanLogprobMonitor:
    def __init__(self, threshold: float, min_tokens: int) -> None:
        self.threshold = threshold
        self.min_tokens = min_tokens
        self.lps: list[float] = []
        self.total = 0.0

    def observe(
        self,
        num_tokens: int,
        logprob: float | None,
        top: Mapping[int, float] | None,
        token_ids: Sequence[int],
    ) -> str | None:
        if logprob is None:
            return None
        self.lps.append(float(logprob))
        self.total += float(logprob)
        n = len(self.lps)
        if n < self.min_tokens:
            return None
        mean = self.total / n
        if _below(mean, self.threshold):
            return f"mean log-prob {mean:.4f} < threshold {self.threshold:g} after {n} tokens"
        return None


@dataclass(frozen=True)
class LowProb:
    """Stop a trace once the mean log-probability of its tokens so far is ``< threshold``
    (natural log, so ``threshold < 0``; by more than :data:`TIE_TOLERANCE`), checked from the
    ``min_tokens``-th token on."""

    threshold: float
    min_tokens: int = 16
    name = "lowprob"
    needs = "logprobs"
    warmup = 0

    def __post_init__(self) -> None:
        t = check_number("threshold", self.threshold, high=0.0, high_open=True, finite=True)
        object.__setattr__(self, "threshold", t)
        check_int("min_tokens", self.min_tokens, min=1)

    def spec(self) -> str:
        return f"{self.name}:threshold={self.threshold:g},min_tokens={self.min_tokens}"

    def warmup_threshold(self, warmup: Sequence[Completion]) -> float | None:
        return None

    def monitor(self, threshold: float | None, scorer: Scorer | None = None) -> TraceMonitor:
        return _MeanLogprobMonitor(self.threshold, self.min_tokens)


# -- self-evaluation -----------------------------------------------------------------------------

DEFAULT_SELF_EVAL_PROMPT = '\nWould you do better if you started over? ("Yes." or "No.")\n'


class _SelfEvalMonitor:
    def __init__(self, rule: SelfEval, scorer: Scorer) -> None:
        self.rule = rule
        self.scorer = scorer

    def observe(
        self,
        num_tokens: int,
        logprob: float | None,
        top: Mapping[int, float] | None,
        token_ids: Sequence[int],
    ) -> str | None:
        r = self.rule
        due = num_tokens == r.checkpoint or (
            r.every > 0 and num_tokens > r.checkpoint and (num_tokens - r.checkpoint) % r.every == 0
        )
        if not due:
            return None
        p = self.scorer(token_ids)
        if p < r.threshold:
            return f"self-evaluation P(no)={p:.4f} < {r.threshold:g} at token {num_tokens}"
        return None


@dataclass(frozen=True)
class SelfEval:
    """Manvi et al.'s early pruning by generative self-evaluation (docs/algorithms.md 3.3).

    At token ``checkpoint`` (and every ``every`` tokens after it; 0 = only once) the partial
    trace is followed by ``prompt`` and scored with the engine's ``score``: ``P(no)`` is the
    probability of the first token of ``no`` (the model would *not* do better starting over),
    as a two-way softmax against the first token of ``yes`` (``mode="softmax2"``) or as the raw
    probability (``mode="raw"``). A trace with ``P(no) < threshold`` is stopped. A trace that
    ends before the checkpoint is never pruned. All defaults are unverified (docs/algorithms.md, Appendix B.3).
    """

    checkpoint: int = 64
    threshold: float = 0.5
    every: int = 0
    prompt: str = DEFAULT_SELF_EVAL_PROMPT
    yes: str = " Yes"
    no: str = " No"
    mode: str = "softmax2"
    name = "selfeval"
    needs = "scoring"
    warmup = 0

    def __post_init__(self) -> None:
        check_int("checkpoint", self.checkpoint, min=1)
        check_int("every", self.every, min=0)
        check_number("threshold", self.threshold, low=0.0, high=1.0)
        if self.mode not in ("softmax2", "raw"):
            raise ConfigError(f"selfeval mode must be softmax2 or raw, got {self.mode!r}")
        if not self.yes or not self.no or self.yes == self.no:
            raise ConfigError("selfeval needs two different, non-empty answers yes= and no=")

    def spec(self) -> str:
        return (
            f"{self.name}:checkpoint={self.checkpoint},threshold={self.threshold:g},"
            f"every={self.every},mode={self.mode}"
        )

    def warmup_threshold(self, warmup: Sequence[Completion]) -> float | None:
        return None

    def monitor(self, threshold: float | None, scorer: Scorer | None = None) -> TraceMonitor:
        if scorer is None:
            raise ConfigError("selfeval needs a scoring engine to evaluate partial traces")
        return _SelfEvalMonitor(self, scorer)

    def p_no(self, lp_no: float, lp_yes: float) -> float:
        """``P(no)`` from the two answer tokens' log-probabilities."""
        if self.mode == "raw":
            return math.exp(lp_no)
        return 1.0 / (1.0 + math.exp(lp_yes - lp_no))


class _TopGroup:
    """One problem's traces under :class:`SelfEvalTop`: their checkpoint scores, and once every
    watched trace has reported a score or finished, the losers (the bottom of the ranking)."""

    def __init__(self, rule: SelfEvalTop, n: int) -> None:
        self.rule = rule
        self.n = n
        self.scores: dict[int, float] = {}  # trace index -> P(no) at the checkpoint
        self.finished: set[int] = set()
        self.losers: dict[int, str] | None = None

    def report(self, index: int, p_no: float) -> None:
        self.scores[index] = p_no
        self.settle()

    def finish(self, index: int) -> None:
        self.finished.add(index)
        self.settle()

    def settle(self) -> None:
        if self.losers is not None or len(self.finished | set(self.scores)) < self.n:
            return
        self.losers = self.rule.losers(self.scores)


class _TopMonitor:
    def __init__(self, group: _TopGroup, index: int, scorer: Scorer) -> None:
        self.group, self.index, self.scorer = group, index, scorer

    def observe(
        self,
        num_tokens: int,
        logprob: float | None,
        top: Mapping[int, float] | None,
        token_ids: Sequence[int],
    ) -> str | None:
        g = self.group
        if num_tokens == g.rule.checkpoint:
            g.report(self.index, self.scorer(token_ids))
        # decided once every trace reached the checkpoint (or ended): losers stop at their next
        # token, so every pruned trace is cut at checkpoint + 1 whatever order traces report in
        if num_tokens > g.rule.checkpoint and g.losers is not None:
            return g.losers.get(self.index)
        return None


@dataclass(frozen=True)
class SelfEvalTop(SelfEval):
    """Manvi et al.'s keep-top-fraction pruning: every trace of a problem that reaches token
    ``checkpoint`` is scored by self-evaluation (``P(no)``, as :class:`SelfEval`: the model
    would not do better starting over), and once all have reached it (or ended) only the top
    ``keep`` fraction (``ceil(keep * scored)``, at least one; ties to the lower index) continue;
    the others stop at their next token. Traces that end by the checkpoint are kept unscored.
    ``selfeval-top:checkpoint=64,keep=0.5`` (the threshold rule is ``selfeval``). What was
    checked: the rule as the paper describes it (score all partial samples, keep the best
    fraction); the paper's prompt, checkpoint and fraction are unverified (docs/algorithms.md
    3.3), so all are parameters. A resumed run ranks only the traces it generates again."""

    keep: float = 0.5
    name = "selfeval-top"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("keep", self.keep, low=0.0, high=1.0, low_open=True)
        if self.every:
            raise ConfigError("selfeval-top scores once, at the checkpoint: drop every=")

    def spec(self) -> str:
        return f"{self.name}:checkpoint={self.checkpoint},keep={self.keep:g},mode={self.mode}"

    def losers(self, scores: Mapping[int, float]) -> dict[int, str]:
        """The traces (index -> reason) below the kept top fraction of ``scores`` (P(no))."""
        ranked = sorted(scores, key=lambda i: (-scores[i], i))
        n_keep = max(1, math.ceil(self.keep * len(ranked) - 1e-9))
        return {
            i: (
                f"self-evaluation P(no)={scores[i]:.4f} ranked {r + 1} of {len(ranked)} at token "
                f"{self.checkpoint}; the top {n_keep} continue (keep={self.keep:g})"
            )
            for r, i in enumerate(ranked)
            if r >= n_keep
        }

    def group(self, n: int) -> _TopGroup:
        """The shared state of one problem's ``n`` watched traces."""
        return _TopGroup(self, n)

    def monitor(self, threshold: float | None, scorer: Scorer | None = None) -> TraceMonitor:
        raise ConfigError("selfeval-top ranks a problem's traces together: use group(n).monitor")


# -- rule specs ----------------------------------------------------------------------------------

PRUNE_RULES: Mapping[str, type] = {
    "deepconf-online": DeepConfOnline,
    "lowprob": LowProb,
    "selfeval": SelfEval,
    "selfeval-top": SelfEvalTop,
}

_PARAM_TYPES: dict[str, dict[str, Callable[[str], Any]]] = {
    "deepconf-online": {"eta": float, "warmup": int, "window": int},
    "lowprob": {"threshold": float, "min_tokens": int},
    "selfeval": {
        "checkpoint": int,
        "threshold": float,
        "every": int,
        "prompt": str,
        "yes": str,
        "no": str,
        "mode": str,
    },
    "selfeval-top": {
        "checkpoint": int,
        "keep": float,
        "prompt": str,
        "yes": str,
        "no": str,
        "mode": str,
    },
}


def parse_prune_rule(text: str) -> PruneRule:
    """``"deepconf-online:eta=10,warmup=16,window=2048"`` -> the rule (one-line ConfigError).

    ``lowprob:-1.5`` is short for ``lowprob:threshold=-1.5``.
    """
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in PRUNE_RULES:
        raise ConfigError(
            f"unknown pruning rule {name!r} in {text!r}; choose from {', '.join(PRUNE_RULES)} "
            "(e.g. deepconf-online:eta=10,warmup=16,window=2048 or lowprob:threshold=-1.5)"
        )
    types = _PARAM_TYPES[name]
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            if name == "lowprob" and not kwargs:
                key, value = "threshold", part
            else:
                raise ConfigError(
                    f"pruning rule {text!r}: {part!r} is not key=value; keys: {', '.join(types)}"
                )
        key = key.strip()
        if key not in types:
            raise ConfigError(
                f"pruning rule {name!r} has no parameter {key!r}; keys: {', '.join(types)}"
            )
        try:
            kwargs[key] = types[key](value.strip())
        except ValueError:
            raise ConfigError(
                f"pruning rule {name!r}: {key}={value!r} is not a {types[key].__name__}"
            ) from None
    if name == "lowprob" and "threshold" not in kwargs:
        raise ConfigError("lowprob needs a threshold (mean log-prob), e.g. lowprob:threshold=-1.5")
    rule: PruneRule = PRUNE_RULES[name](**kwargs)
    return rule


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracePruning:
    """What a rule did to one trace: stopped at ``pruned_at`` tokens (``None``: ran to its end)
    with ``reason``; ``tokens`` it generated (live) or would generate (replay: ``pruned_at`` or
    its full length), ``full_tokens`` its length unpruned (replay; ``None`` live)."""

    problem_id: str
    index: int
    pruned_at: int | None
    reason: str | None
    tokens: int
    full_tokens: int | None = None
    warmup: bool = False
    #: self-evaluation context tokens scored for this trace (selfeval rules; 0 for the others),
    #: as a live run records them apart from generated tokens; None: the engine cannot say
    scored_tokens: int | None = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem_id": self.problem_id,
            "index": self.index,
            "pruned_at": self.pruned_at,
            "reason": self.reason,
            "tokens": self.tokens,
            "full_tokens": self.full_tokens,
            "warmup": self.warmup,
            "scored_tokens": self.scored_tokens,
        }


@dataclass(frozen=True)
class ProblemPruning:
    """One problem under a rule: its threshold (DeepConf: from the warm-up) and every trace."""

    problem_id: str
    threshold: float | None
    traces: tuple[TracePruning, ...]

    @property
    def pruned(self) -> tuple[TracePruning, ...]:
        return tuple(t for t in self.traces if t.pruned_at is not None)

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.traces)

    @property
    def full_tokens(self) -> int:
        return sum(t.full_tokens if t.full_tokens is not None else t.tokens for t in self.traces)

    @property
    def kept_indices(self) -> tuple[int, ...]:
        return tuple(t.index for t in self.traces if t.pruned_at is None)

    @property
    def scored_tokens(self) -> int | None:
        return _sum_scored(t.scored_tokens for t in self.traces)


@dataclass(frozen=True)
class PruningReplay:
    """:func:`replay_pruning`'s result: per problem, and totals.

    ``tokens``: tokens the rule would have generated; ``full_tokens``: tokens of the stored
    traces (no pruning); ``saved_fraction = 1 - tokens / full_tokens``.
    """

    rule: str
    problems: tuple[ProblemPruning, ...]

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.problems)

    @property
    def full_tokens(self) -> int:
        return sum(p.full_tokens for p in self.problems)

    @property
    def saved_fraction(self) -> float:
        full = self.full_tokens
        return 1.0 - self.tokens / full if full else 0.0

    @property
    def pruned(self) -> int:
        return sum(len(p.pruned) for p in self.problems)

    @property
    def scored_tokens(self) -> int | None:
        """Self-evaluation context tokens (selfeval rules; 0 otherwise), not in ``tokens``."""
        return _sum_scored(p.scored_tokens for p in self.problems)

    def tokens_per_problem(self) -> np.ndarray:
        return np.asarray([p.tokens for p in self.problems], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "tokens": self.tokens,
            "full_tokens": self.full_tokens,
            "saved_fraction": self.saved_fraction,
            "pruned": self.pruned,
            "scored_tokens": self.scored_tokens,
            "problems": [
                {
                    "problem_id": p.problem_id,
                    "threshold": p.threshold,
                    "tokens": p.tokens,
                    "full_tokens": p.full_tokens,
                    "scored_tokens": p.scored_tokens,
                    "traces": [t.to_dict() for t in p.traces],
                }
                for p in self.problems
            ],
        }


# -- replay --------------------------------------------------------------------------------------


def _run_monitor(
    monitor: TraceMonitor,
    token_ids: Sequence[int] | None,
    logprobs: Sequence[float] | None,
    tops: Sequence[Mapping[int, float]] | None,
    n: int,
) -> tuple[int | None, str | None]:
    """Feed a finished trace to a monitor: ``(pruned_at, reason)``; the last token never prunes
    (the engine ended the trace there, so an abort would change nothing)."""
    ids = list(token_ids) if token_ids is not None else [0] * n
    for t in range(n - 1):
        reason = monitor.observe(
            t + 1,
            None if logprobs is None else logprobs[t],
            None if tops is None else tops[t],
            ids[: t + 1],
        )
        if reason is not None:
            return t + 1, reason
    return None, None


def replay_pruning(
    source: SampleStore | str | os.PathLike[str] | Iterable[Sample | Completion],
    rule: PruneRule | str,
    *,
    max_samples: int | None = None,
    engine: Engine | None = None,
    problems: Iterable[Problem] | None = None,
    chat: bool | None = None,
    system_prompt: str | None = None,
) -> PruningReplay:
    """What ``rule`` would have pruned in a stored run, trace by trace, and the tokens saved.

    ``source``: a run (:class:`SampleStore` or its path) or samples/completions carrying per-token
    log-probabilities (``token_logprobs`` for ``lowprob``, ``top_logprobs`` for
    ``deepconf-online``). Traces are replayed in index order per problem (indices
    ``0..max_samples-1`` when given): as in a live run, the first ``rule.warmup`` traces run in
    full and set the threshold.

    ``selfeval`` and ``selfeval-top`` ask the model: they replay from the stored token ids with
    ``engine`` (a scoring engine with the run's tokenizer; the same scorer a live run uses, one
    self-evaluation prompt per call), on ``problems`` (a run's own recorded problems by
    default) sent as a live run would (``chat``/``system_prompt``: the run's manifest's by
    default). ``selfeval`` stops a trace at the checkpoint where ``P(no)`` falls below the
    threshold; ``selfeval-top`` ranks every trace longer than the checkpoint and cuts the losers
    at ``checkpoint + 1`` tokens, where a live run stops them (a loser of exactly that length
    ended there: kept). Each trace's ``scored_tokens`` is the context its evaluations ran
    through, as a live run records it.
    """
    if isinstance(rule, str):
        rule = parse_prune_rule(rule)
    if rule.needs == "scoring" and engine is None:
        raise ConfigError(
            f"{rule.name} asks the model at its checkpoints: replay it with the scoring engine "
            "(engine=...; CLI: --model PATH)"
        )
    check_int("max_samples", max_samples, min=1, allow_none=True)
    if isinstance(source, (str, os.PathLike)):
        source = SampleStore.open(source)
    if isinstance(source, Pool):
        raise ConfigError(
            "a Pool holds no per-token log-probs; pass the run itself (SampleStore or its path)"
        )
    if isinstance(source, SampleStore) and source.manifest.get("pruning"):
        raise ConfigError(
            f"{source.path} was pruned live (its pruned traces are cut); replay a full run "
            "made without --prune"
        )
    store = source if isinstance(source, SampleStore) else None
    items = source.samples() if isinstance(source, SampleStore) else source
    by_problem: dict[str, list[Completion]] = {}
    for it in items:
        c = it if isinstance(it, Completion) else Sample.to_completion(it)
        if max_samples is not None and c.index >= max_samples:
            continue
        by_problem.setdefault(c.problem_id, []).append(c)
    judge: _SelfEvalReplay | None = None
    if isinstance(rule, SelfEval):
        assert engine is not None
        judge = _SelfEvalReplay(engine, rule, store, problems, chat, system_prompt, by_problem)
    problems_out = []
    for pid, comps in by_problem.items():
        comps.sort(key=lambda c: c.index)
        for c in comps:
            _check_trace(rule, c)
        if judge is not None:
            problems_out.append(judge.problem(pid, comps))
            continue
        warm = comps[: rule.warmup]
        threshold = rule.warmup_threshold(warm) if rule.warmup else None
        traces = [
            TracePruning(pid, c.index, None, None, c.num_tokens, c.num_tokens, warmup=True)
            for c in warm
        ]
        for c in comps[rule.warmup :]:
            at, reason = _run_monitor(
                rule.monitor(threshold),
                c.token_ids,
                c.token_logprobs,
                c.top_logprobs,
                c.num_tokens,
            )
            used = c.num_tokens if at is None else at
            traces.append(TracePruning(pid, c.index, at, reason, used, c.num_tokens))
        problems_out.append(ProblemPruning(pid, threshold, tuple(traces)))
    return PruningReplay(rule.spec(), tuple(problems_out))


class _SelfEvalReplay:
    """Self-evaluation rules on stored traces: the live sampler's own scorer
    (:meth:`PruningSampler._scorer`, one :func:`score_next` call per evaluation) on each trace's
    stored token prefix, with the problem's prompt built as the live run builds it."""

    def __init__(
        self,
        engine: Engine,
        rule: SelfEval,
        store: SampleStore | None,
        problems: Iterable[Problem] | None,
        chat: bool | None,
        system_prompt: str | None,
        traces: Mapping[str, Sequence[Completion]],
    ) -> None:
        manifest = store.manifest if store is not None else {}
        if chat is None:
            chat = bool(manifest.get("chat", False))
        if system_prompt is None:
            system_prompt = manifest.get("system_prompt")
        # the live sampler checks the engine (scoring + token prefixes) and the answer tokens
        self.sampler = PruningSampler(
            engine, SamplingParams(), rule, chat=chat, system_prompt=system_prompt, progress=False
        )
        self.rule = rule
        given = list(problems) if problems is not None else (store.problems() if store else [])
        self.problems = {p.id: p for p in given}
        missing = sorted(set(traces) - set(self.problems))
        if missing:
            raise ConfigError(
                f"{rule.name} replay needs each problem's prompt; none for {missing[0]!r} "
                "(pass problems=, or a run that recorded its problems)"
            )
        _check_token_ids(engine, rule, traces)

    def _scorer(self, pid: str, index: int, spent: Callable[[int | None], None]) -> Scorer:
        (req,) = self.sampler._requests(self.problems[pid], [index])
        return self.sampler._scorer(req, spent)

    def problem(self, pid: str, comps: Sequence[Completion]) -> ProblemPruning:
        rule = self.rule
        traces = []
        if isinstance(rule, SelfEvalTop):
            # live: a trace longer than the checkpoint reports P(no) at it (one that ends on the
            # checkpoint token never does); once all have, the losers stop at their next token
            scores: dict[int, float] = {}
            scored: dict[int, int | None] = {}
            for c in comps:
                if c.num_tokens > rule.checkpoint:
                    spent: list[int | None] = []
                    score = self._scorer(pid, c.index, spent.append)
                    scores[c.index] = score(list((c.token_ids or ())[: rule.checkpoint]))
                    scored[c.index] = _sum_scored(spent)
            losers = rule.losers(scores)
            cut = rule.checkpoint + 1
            for c in comps:
                hit = c.index in losers and c.num_tokens > cut
                traces.append(
                    TracePruning(
                        pid,
                        c.index,
                        cut if hit else None,
                        losers[c.index] if hit else None,
                        cut if hit else c.num_tokens,
                        c.num_tokens,
                        scored_tokens=scored.get(c.index, 0),
                    )
                )
            return ProblemPruning(pid, None, tuple(traces))
        for c in comps:
            spent = []
            mon = rule.monitor(None, self._scorer(pid, c.index, spent.append))
            at, reason = _run_monitor(mon, c.token_ids, None, None, c.num_tokens)
            used = c.num_tokens if at is None else at
            traces.append(
                TracePruning(
                    pid, c.index, at, reason, used, c.num_tokens, scored_tokens=_sum_scored(spent)
                )
            )
        return ProblemPruning(pid, None, tuple(traces))


def _check_token_ids(
    engine: Engine, rule: SelfEval, traces: Mapping[str, Sequence[Completion]]
) -> None:
    """Refuse traces without token ids, and an engine whose tokenizer does not turn the stored
    ids back into the stored text (another model's ids would be scored as other words)."""
    decode = getattr(engine, "decode", None)
    assert callable(decode)  # the sampler required token prefixes (decode)
    vocab = None
    tok = getattr(engine, "tokenizer", None)
    if tok is not None:
        try:
            vocab = len(tok)
        except TypeError:
            vocab = None
    for comps in traces.values():
        for c in comps:
            if c.num_tokens == 0:
                continue
            if c.token_ids is None:
                raise ConfigError(
                    f"{rule.name} replays the stored token ids; sample {c.problem_id!r}/{c.index} "
                    "has none (sample again with an engine that returns token ids: hf or vllm)"
                )
            if vocab is not None and max(c.token_ids) >= vocab:
                raise ConfigError(
                    f"the scoring model's tokenizer ({vocab} tokens) does not match the run's token "
                    f"ids (sample {c.problem_id!r}/{c.index} has id {max(c.token_ids)}); pass the "
                    "run's own model"
                )
            # the stored text is the decoded ids (cut at a stop string); whitespace is compared
            # loosely, since engines clean up tokenisation spaces differently
            text = "".join(str(decode(list(c.token_ids))).split())
            if not text.startswith("".join(c.text.split())):
                raise ConfigError(
                    f"the scoring model's tokenizer does not turn the run's token ids back into "
                    f"its text (sample {c.problem_id!r}/{c.index}); pass the run's own model"
                )


def _check_trace(rule: PruneRule, c: Completion) -> None:
    if rule.needs == "top_logprobs" and c.top_logprobs is None and c.num_tokens > 0:
        raise ConfigError(
            f"{rule.name} needs per-token top log-probs; sample {c.problem_id!r}/{c.index} has "
            "none (sample with logprobs >= 1)"
        )
    if rule.needs == "logprobs" and c.token_logprobs is None and c.num_tokens > 0:
        raise ConfigError(
            f"{rule.name} needs per-token log-probs; sample {c.problem_id!r}/{c.index} has none"
        )


# -- live sampler --------------------------------------------------------------------------------


def _first_token(engine: Any, text: str) -> int:
    """The id of the first token of ``text`` (the self-evaluation answer tokens)."""
    enc = getattr(engine, "encode", None)
    tok = getattr(engine, "tokenizer", None)
    if callable(enc):
        ids = list(enc(text))
    elif tok is not None and callable(getattr(tok, "encode", None)):
        ids = list(tok.encode(text, add_special_tokens=False))
    elif getattr(engine, "name", None) == "scripted":
        ids = [ord(ch) for ch in text]
    else:
        raise ConfigError(
            f"selfeval cannot tokenise {text!r} with engine {getattr(engine, 'name', '?')!r}"
        )
    if not ids:
        raise ConfigError(f"selfeval answer {text!r} has no tokens")
    return int(ids[0])


class PruningSampler:
    """Sample ``budget`` traces per problem, stopping traces mid-generation by ``rule``.

    The :class:`~ttscale.samplers.base.Sampler` protocol (``budget`` = traces started per
    problem). Traces ``0..warmup-1`` (DeepConf online) run in full first; the rest are watched
    token by token: through the engine's ``on_token`` where it declares ``streaming`` (handed
    over every ``stream_interval`` tokens where the engine can, as vLLM does: the monitor still
    reads every token in order and the trace is cut where the rule fires; the chunk's tokens past
    that point are generated anyway and counted), in chunks of ``chunk_tokens`` on token
    prefixes otherwise (``selfeval`` always uses chunks ending at its
    checkpoints, so it never calls the engine from inside a generation). Seeds are per (problem,
    index), so trace ``i`` is the same trace (cut where pruned) as in a fixed-n run with the same
    seed on a streaming engine. Every trace is in the result: pruned ones with fate ``pruned``
    and ``pruned_at``; ``generated_tokens`` counts them all (and tokens an engine generated past
    an abort inside a chunk). ``sink`` stores every trace with its fate and writes
    ``pruning.jsonl`` (one line per trace: problem, index, pruned_at, reason) and a ``pruning``
    manifest entry (rule, thresholds, counts). A run resumes per trace (only missing traces are
    generated; the stored warm-up sets the same threshold) and splits into shards like
    :class:`~ttscale.samplers.RepeatedSampler`'s.
    """

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        rule: PruneRule | str,
        *,
        batch_size: int = 512,
        chunk_tokens: int | None = None,
        stream_interval: int = DEFAULT_STREAM_INTERVAL,
        chat: bool = False,
        system_prompt: str | None = None,
        progress: bool | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(params).__name__}")
        self.rule: PruneRule = parse_prune_rule(rule) if isinstance(rule, str) else rule
        check_int("batch_size", batch_size, min=1)
        check_int("chunk_tokens", chunk_tokens, min=1, allow_none=True)
        check_int("stream_interval", stream_interval, min=1)
        by = f"pruning rule {self.rule.name}"
        caps = capabilities_of(engine)
        if self.rule.needs == "scoring":
            require_capabilities(engine, "scoring", "token_prefixes", by=by)
        elif not caps.streaming:
            require_capabilities(engine, "token_prefixes", by=by)
        if self.rule.needs == "top_logprobs" and not params.logprobs:
            raise ConfigError(
                f"{self.rule.name} needs top log-probs: sample with logprobs >= 1 "
                "(SamplingParams(logprobs=20), as DeepConf does)"
            )
        if self.rule.needs == "logprobs" and params.logprobs is None:
            raise ConfigError(f"{self.rule.name} needs log-probs: sample with logprobs=0 or more")
        self.engine = engine
        self.params = params
        self.batch_size = batch_size
        if isinstance(self.rule, SelfEval):
            step = self.rule.every or self.rule.checkpoint
            chunk_tokens = math.gcd(self.rule.checkpoint, step)
        self.chunk_tokens = chunk_tokens
        self.stream_interval = stream_interval
        self.chat = chat
        self.system_prompt = system_prompt
        self.progress = progress
        self.extra_manifest = dict(manifest or {})
        self.engine_info = dict(engine.info())
        self._answer_ids: tuple[int, int] | None = None
        if isinstance(self.rule, SelfEval):
            self._answer_ids = (_first_token(engine, self.rule.no), _first_token(engine, self.rule.yes))
            if self._answer_ids[0] == self._answer_ids[1]:
                raise ConfigError(
                    f"selfeval answers {self.rule.no!r} and {self.rule.yes!r} begin with the same "
                    "token; choose answers whose first tokens differ"
                )

    @property
    def streams(self) -> bool:
        """Whether traces are watched through the engine's token stream (else in chunks on token
        prefixes)."""
        return self.chunk_tokens is None and capabilities_of(self.engine).streaming

    @property
    def mode(self) -> str:
        """``"streaming"``, ``"streaming, in chunks of up to N tokens"`` (``stream_interval``;
        an engine that streams token by token hands over one at a time) or ``"chunked (N
        tokens)"``: how traces are watched."""
        if self.streams:
            k = self.stream_interval
            return "streaming" if k == 1 else f"streaming, in chunks of up to {k} tokens"
        return f"chunked ({self.chunk_tokens or 64} tokens)"

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[SampleResult]:
        """The :class:`~ttscale.samplers.base.Sampler` protocol. With a ``sink`` that already
        holds traces of this rule (a resumed run), only the missing traces are generated: the
        stored warm-up traces set the threshold again (their log-probs are stored exactly), the
        stored traces are read back with their fate (``resumed``). ``shard=(i, N)``: sample
        only shard ``i`` of ``N`` of the problems
        (:func:`~ttscale.samplers.repeated.shard_problems`; all are recorded in the run)."""
        from ttscale.samplers.repeated import shard_problems

        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        params = self.params if seed is None else self.params.replace(seed=seed)
        problems = unique_problems(problems)
        mine = shard_problems(problems, shard)
        if sink is not None:
            old = sink.manifest.get("prune_rule")
            if len(sink) > 0 and old != self.rule.spec():
                raise ConfigError(
                    f"run directory {sink.path} was made with pruning rule {old!r}, not "
                    f"{self.rule.spec()!r}; resume with the same rule or use a new --out"
                    if old
                    else f"run directory {sink.path} holds traces sampled without pruning; "
                    "use a new --out"
                )
            extra = {**self.extra_manifest, "sampler": "pruning", "prune_rule": self.rule.spec()}
            open_sink(
                sink, problems, engine_info=self.engine_info, params=params, n=budget,
                chat=self.chat, iid=False, extra=extra,
            )
        log.info("pruning with %s (%s), %d traces per problem", self.rule.spec(), self.mode, budget)
        return self._sample(mine, budget, params, sink, shard)

    def _requests(
        self, p: Problem, indices: Sequence[int], stream_interval: int = 1
    ) -> list[GenerationRequest]:
        if not indices:
            return []
        kw: dict[str, Any]
        if self.chat:
            msgs: list[dict[str, str]] = []
            if self.system_prompt:
                msgs.append({"role": "system", "content": self.system_prompt})
            msgs.append({"role": "user", "content": p.prompt})
            kw = {"messages": msgs}
        else:
            kw = {"prompt": p.prompt}
        if stream_interval > 1:
            kw["stream_interval"] = stream_interval
        return [GenerationRequest(problem_id=p.id, indices=tuple(indices), **kw)]

    def _scorer(self, req: GenerationRequest, spent: Callable[[int | None], None]) -> Scorer:
        """One trace's self-evaluation: ``P(no)`` of its partial tokens, from one next-token
        distribution of the self-evaluation prompt (:func:`score_next`); ``spent`` gets the
        context tokens each evaluation ran through (None where the engine cannot say)."""
        rule = self.rule
        assert isinstance(rule, SelfEval) and self._answer_ids is not None
        engine = self.engine
        assert isinstance(engine, ScoringEngine) and isinstance(engine, TokenPrefixEngine)
        no_id, yes_id = self._answer_ids

        def score(token_ids: Sequence[int]) -> float:
            partial = engine.decode(token_ids)
            if req.messages is not None:
                msgs = [
                    *req.messages,
                    {"role": "assistant", "content": req.prefix + partial},
                    {"role": "user", "content": rule.prompt.strip()},
                ]
                q = GenerationRequest(problem_id=req.problem_id, messages=msgs)
            else:
                text = (req.prompt or "") + req.prefix + partial + rule.prompt
                q = GenerationRequest(problem_id=req.problem_id, prompt=text)
            (got,) = score_next(engine, [q], [no_id, yes_id])
            spent(got.context_tokens)
            lp_no, lp_yes = got.logprobs
            return rule.p_no(lp_no, lp_yes)

        return score

    def _sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        params: SamplingParams,
        sink: SampleStore | None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[SampleResult]:
        session = SamplingSession(self.engine, sink, engine_info=self.engine_info, shard=shard)
        journal = _TraceLog(sink) if sink is not None else None
        show = sys.stderr.isatty() if self.progress is None else bool(self.progress)
        stored = _stored(sink, {p.id for p in problems}, budget)
        left = {p.id: budget - len(stored.get(p.id, ())) for p in problems}
        session.show_progress(show, remaining=left, samples=len(problems) * budget)
        thresholds: dict[str, float | None] = {}
        warm_n = min(self.rule.warmup, budget)
        # streaming engines watch tokens in their own loop; the others (and selfeval, which
        # scores between chunks) go through the batch loop in chunks on token prefixes
        loop: EngineLoop | None = None
        if not self.streams:
            loop = BatchLoop(self.engine, params, chunk_tokens=self.chunk_tokens or 64)
        with session:
            sched: Scheduler[tuple[SampleResult, float | None, dict[int, str]]] = Scheduler(
                session, params, max_sequences=self.batch_size, loop=loop
            )
            for res, thr, _why in sched.run(
                self.program(p, budget, warm_n, journal, stored.get(p.id, ())) for p in problems
            ):
                thresholds[res.problem_id] = thr
                yield res
        if sink is not None:
            self._record(sink, thresholds)

    def program(
        self,
        p: Problem,
        budget: int,
        warm_n: int,
        journal: _TraceLog | None = None,
        stored: Sequence[Candidate] = (),
    ) -> Program[tuple[SampleResult, float | None, dict[int, str]]]:
        """Problem ``p``'s program (:mod:`ttscale.samplers.loop`): the warm-up traces in full,
        then the rest watched token by token; returns ``(result, threshold, {index: reason})``.
        Every trace is stored with its fate as it arrives, its line in the trace log
        (``journal``) written first; ``stored``: the traces a resumed run already holds (read
        back with their fate, not generated again)."""
        got: dict[int, Completion] = {}
        have = {c.index: c for c in stored}
        prior = journal.records if journal is not None else {}
        reasons: dict[int, tuple[int, str]] = {}
        # context tokens each trace's self-evaluations ran through (None: the engine cannot say);
        # kept apart from generated tokens, as the trace log and manifest keep them
        scored: dict[int, int | None] = {}

        def spend(index: int, n: int | None) -> None:
            old = scored.get(index, 0)
            scored[index] = None if old is None or n is None else old + n

        def store(c: Completion) -> Candidate:
            cand = _candidate(c, reasons.get(c.index))
            if journal is not None:  # the log line first: a stored trace always has its reason
                hit = reasons.get(c.index)
                journal.add(cand, warm_n, hit[1] if hit is not None else None, scored.get(c.index, 0))
            return cand

        def missing(indices: Iterable[int]) -> list[int]:
            return [i for i in indices if i not in have]

        if warm_n:
            warm_reqs = self._requests(p, missing(range(warm_n)))
            for comps in (yield from generate(warm_reqs, stored_as=store)):
                for c in comps:
                    got[c.index] = c
        warm = [got[i] if i in got else have[i].completion for i in range(warm_n)]
        threshold = self.rule.warmup_threshold(warm) if warm_n else None
        # watched traces may stream in chunks: the monitor still sees every token, in order
        reqs = self._requests(
            p, missing(range(warm_n, budget)), self.stream_interval if self.streams else 1
        )
        if reqs:
            monitors: dict[tuple[int, int], TraceMonitor] = {}
            tokens: dict[tuple[int, int], list[int]] = {}
            # keep-top ranks this problem's watched traces together
            group = (
                self.rule.group(sum(len(r.indices) for r in reqs))
                if isinstance(self.rule, SelfEvalTop)
                else None
            )

            def on_token(ev: TokenEvent) -> bool:
                key = (ev.request, ev.slot)
                mon = monitors.get(key)
                if mon is None:
                    req = reqs[ev.request]
                    scorer = (
                        self._scorer(req, functools.partial(spend, ev.index))
                        if isinstance(self.rule, SelfEval)
                        else None
                    )
                    if group is not None:
                        assert scorer is not None
                        mon = _TopMonitor(group, ev.index, scorer)
                    else:
                        mon = self.rule.monitor(threshold, scorer)
                    monitors[key] = mon
                    tokens[key] = []
                tokens[key].append(ev.token_id)
                if ev.finished:
                    if group is not None:
                        group.finish(ev.index)
                    return False
                reason = mon.observe(ev.num_tokens, ev.logprob, ev.top, tokens[key])
                if reason is None:
                    return False
                reasons[ev.index] = (ev.num_tokens, reason)
                monitors[key] = _Done()
                return True

            for comps in (
                yield from generate(
                    reqs,
                    stored_as=store,
                    on_token=on_token,
                )
            ):
                for c in comps:
                    got[c.index] = c
        cands = []
        why: dict[int, str] = {}
        spent = resumed = resumed_tokens = 0
        scored_total: int | None = 0
        for i in range(budget):
            if i in have:
                cand = have[i]
                rec = prior.get((p.id, i), {})
                resumed += 1
                # discarded tokens are not a sample column: the trace log has them
                resumed_tokens += int(rec.get("tokens", cand.completion.num_tokens))
                # a log line from before the count was kept: unknown for a scoring rule
                n_scored = rec.get("scored_tokens", None if isinstance(self.rule, SelfEval) else 0)
                if rec.get("reason"):
                    why[i] = rec["reason"]
            else:
                cand = _candidate(got[i], reasons.get(i))
                spent += cand.completion.num_tokens + cand.completion.discarded_tokens
                n_scored = scored.get(i, 0)
                if cand.pruned_at is not None:
                    why[i] = reasons[i][1]
            scored_total = _add_scored(scored_total, n_scored)
            cands.append(cand)
        res = SampleResult(
            problem=p,
            candidates=tuple(cands),
            generated_tokens=spent + resumed_tokens,
            prompt_tokens=sum(c.completion.prompt_tokens or 0 for c in cands),
            iid=False,
            resumed=resumed,
            # stored traces read back: their tokens were spent by an earlier call
            info={
                **({"resumed_tokens": resumed_tokens} if resumed else {}),
                # self-evaluation context tokens: scoring compute, not generated tokens
                **({"scored_tokens": scored_total} if isinstance(self.rule, SelfEval) else {}),
            },
        )
        return res, threshold, why

    def _record(self, sink: SampleStore, thresholds: Mapping[str, float | None]) -> None:
        """``pruning.jsonl`` (one line per stored trace, from every worker's trace log) and the
        manifest's ``pruning`` entry, rewritten under the run lock (workers on shards each call
        it when they finish; the last one leaves the whole run's record)."""

        def put(m: dict[str, Any]) -> None:
            sink.refresh()
            stored = sink.keys()
            records = [r for k, r in sorted(_TraceLog.read(sink).items()) if k in stored]
            path = sink.path / "pruning.jsonl"
            tmp = path.with_suffix(f".jsonl.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            tmp.replace(path)
            old = dict((m.get("pruning") or {}).get("thresholds") or {})
            old.update({k: v for k, v in thresholds.items() if v is not None})
            m["pruning"] = {
                "rule": self.rule.spec(),
                "mode": self.mode,
                "stream_interval": self.stream_interval if self.streams else None,
                "traces": len(records),
                "pruned": sum(r["pruned_at"] is not None for r in records),
                "generated_tokens": sum(int(r["tokens"]) for r in records),
                # self-evaluation context tokens (selfeval rules), never in generated_tokens;
                # None when an engine could not say how many it scored
                "scored_tokens": _sum_scored(
                    r.get("scored_tokens", None if isinstance(self.rule, SelfEval) else 0)
                    for r in records
                ),
                "thresholds": old,
                "log": "pruning.jsonl",
            }

        sink.modify_manifest(put)


def _stored(
    store: SampleStore | None, problem_ids: set[str], budget: int
) -> dict[str, list[Candidate]]:
    """The traces (indices below ``budget``) a run already holds, per problem (one read)."""
    out: dict[str, list[Candidate]] = {}
    if store is None or not len(store):
        return out
    for s in store.samples():
        if s.problem_id in problem_ids and s.index < budget:
            fate = Fate(s.fate or Fate.KEPT.value)
            pruned = s.pruned_at if fate is Fate.PRUNED else None
            out.setdefault(s.problem_id, []).append(
                Candidate(s.to_completion(), fate=fate, pruned_at=pruned)
            )
    return out


class _TraceLog:
    """This session's trace log, ``RUN/pruning/<session>.jsonl``: one line per trace (problem,
    index, warm-up, pruned_at, reason, tokens generated), written before the trace is handed to
    the store, so every stored trace has its line whenever the run is killed."""

    def __init__(self, sink: SampleStore) -> None:
        self.records = _TraceLog.read(sink)
        d = sink.path / "pruning"
        d.mkdir(exist_ok=True)
        self.path = d / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        self._lock = threading.Lock()  # engines may hand results over from their own threads

    @staticmethod
    def read(sink: SampleStore) -> dict[tuple[str, int], dict[str, Any]]:
        out: dict[tuple[str, int], dict[str, Any]] = {}
        d = sink.path / "pruning"
        for f in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill: its trace is not stored, it is redone
                out[(str(r["problem_id"]), int(r["index"]))] = r
        return out

    def add(self, cand: Candidate, warm_n: int, reason: str | None, scored: int | None = 0) -> None:
        c = cand.completion
        line = json.dumps(
            {
                "problem_id": c.problem_id,
                "index": cand.index,
                "warmup": cand.index < warm_n,
                "pruned_at": cand.pruned_at,
                "reason": reason if cand.pruned_at is not None else None,
                "tokens": c.num_tokens + c.discarded_tokens,
                "scored_tokens": scored,
            }
        )
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _add_scored(total: int | None, n: Any) -> int | None:
    """A running count of scored tokens that stays None once any part is unknown."""
    return None if total is None or n is None else total + int(n)


def _sum_scored(counts: Iterable[Any]) -> int | None:
    total: int | None = 0
    for n in counts:
        total = _add_scored(total, n)
    return total


def _candidate(c: Completion, hit: tuple[int, str] | None) -> Candidate:
    """A finished trace as a candidate: pruned at ``hit[0]`` tokens if the monitor stopped it
    there (the engine ended it by the abort), else kept."""
    if hit is not None and c.num_tokens == hit[0]:
        return Candidate(c, fate=Fate.PRUNED, pruned_at=hit[0])
    return Candidate(c)


class _Done:
    """A monitor for a trace already stopped (the engine may still hand over its last token)."""

    def observe(
        self,
        num_tokens: int,
        logprob: float | None,
        top: Mapping[int, float] | None,
        token_ids: Sequence[int],
    ) -> str | None:
        return None



