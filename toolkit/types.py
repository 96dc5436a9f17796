"""Frozen value types: problems, sampling parameters, completions, stored samples and verdicts."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ttscale.errors import ConfigError
from ttscale.validation import check_int, check_number

__all__ = [
    "Completion",
    "FinishReason",
    "Problem",
    "Sample",
    "SamplingParams",
    "Verdict",
    "VerdictStatus",
]


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value) if value else {}


@dataclass(frozen=True)
class Problem:
    """One benchmark item.

    ``prompt`` is the text sent to the model (before any chat template), ``reference`` the gold
    answer or test code (whatever the benchmark's verifier needs), ``meta`` anything else the
    benchmark carries (difficulty, entry point, tests, original fields).
    """

    id: str
    prompt: str
    reference: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"Problem.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.prompt, str):
            raise ConfigError(f"Problem.prompt must be a string, got {type(self.prompt).__name__}")
        object.__setattr__(self, "meta", _frozen_mapping(self.meta))


@dataclass(frozen=True)
class SamplingParams:
    """Sampling configuration, named as in vLLM and validated at construction.

    ``logprobs``: ``None`` asks for no log-probabilities; ``0`` for the sampled token's
    log-probability only (the default: perplexity voting, RPC and token accounting need it);
    ``k > 0`` additionally returns the top-``k`` alternatives per position (DeepConf uses 20).
    ``seed`` is the run seed: the seed of sample ``i`` of problem ``p`` is derived from
    ``(seed, p, i)`` (see :func:`ttscale.seeding.sample_seed`), so ``n=64`` is a prefix of ``n=256``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: int | None = 0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        check_int("n", self.n, min=1)
        check_number("temperature", self.temperature, low=0.0)
        check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_int("top_k", self.top_k, min=0)
        check_number("min_p", self.min_p, low=0.0, high=1.0)
        check_int("max_tokens", self.max_tokens, min=1)
        check_int("min_tokens", self.min_tokens, min=0)
        if self.min_tokens > self.max_tokens:
            raise ConfigError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        check_int("seed", self.seed, min=0)
        check_int("logprobs", self.logprobs, min=0, allow_none=True)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "max_tokens": self.max_tokens,
            "min_tokens": self.min_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
            "logprobs": self.logprobs,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown sampling parameters: {sorted(unknown)}")
        kw = dict(d)
        if "stop" in kw and kw["stop"] is not None:
            kw["stop"] = tuple(kw["stop"])
        return cls(**kw)




class FinishReason(str, enum.Enum):
    """Why a completion ended (vLLM's words, plus ``pruned`` for traces cut by a sampler)."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the engine or client
    PRUNED = "pruned"  # cut short by a pruning/early-stopping rule


@dataclass(frozen=True)
class Completion:
    """One generated response, as returned by an engine.

    ``token_logprobs`` are natural-log probabilities of the generated tokens only (never the
    prompt), in generation order; ``top_logprobs[t]`` maps token id -> log-probability for the
    top alternatives at position ``t`` when they were asked for. ``cumulative_logprob`` is their
    sum. ``seed`` is the per-sample seed the engine used.

    Step-wise fields (filled by engines that declare the matching
    :class:`~ttscale.engines.base.EngineCapabilities`, else ``None``):

    * ``prompt_token_ids``: the exact token ids the model conditioned on before the first
      generated token (tokenised prompt or chat template, then the request's ``prefix``, then its
      ``prefix_token_ids``). ``prompt_tokens == len(prompt_token_ids)`` when both are set.
    * ``target_logprobs``: log-probability of each generated token under the model's raw,
      untempered distribution (``"raw_logprobs"``), whatever the engine's ``logprob_mode``.
    * ``proposal_logprobs``: log-probability of each generated token under the distribution it was
      actually drawn from (``"processed_logprobs"``: after EOS suppression for ``min_tokens``,
      temperature, min-p, top-k, top-p; ``0.0`` everywhere for greedy decoding).
      ``token_logprobs`` equals one of the two (the engine's ``logprob_mode``) when both are set.
    * ``discarded_tokens``: tokens the engine generated for this sample that are not in
      ``token_ids`` (the rest of a chunk after an abort in chunked generation); counted in the
      compute spent, never in the text.
    * ``self_certainty``: the exact self-certainty of the generated tokens (mean ``KL(U || p_i)``
      over the full raw next-token distributions, :mod:`ttscale.select.certainty`), from engines
      that see every distribution and were asked for it (``HFEngine(self_certainty=True)``);
      stored as the sample's ``scores["self_certainty"]``.
    """

    problem_id: str
    index: int
    text: str
    token_ids: tuple[int, ...] | None = None
    token_logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[Mapping[int, float], ...] | None = None
    cumulative_logprob: float | None = None
    num_tokens: int = 0
    finish_reason: str = FinishReason.STOP.value
    seed: int | None = None
    prompt_tokens: int | None = None
    stop_reason: str | int | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    target_logprobs: tuple[float, ...] | None = None
    proposal_logprobs: tuple[float, ...] | None = None
    discarded_tokens: int = 0
    self_certainty: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.problem_id, str) or not self.problem_id:
            raise ConfigError(f"problem_id must be a non-empty string, got {self.problem_id!r}")
        check_int("index", self.index, min=0)
        check_int("discarded_tokens", self.discarded_tokens, min=0)
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        if self.prompt_token_ids is not None:
            ids = tuple(int(t) for t in self.prompt_token_ids)
            object.__setattr__(self, "prompt_token_ids", ids)
            if self.prompt_tokens is None:
                object.__setattr__(self, "prompt_tokens", len(ids))
        for name in ("target_logprobs", "proposal_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(float(x) for x in value)
            object.__setattr__(self, name, value)
            if self.token_ids is not None and len(value) != len(self.token_ids):
                raise ConfigError(
                    f"{name} has {len(value)} entries but token_ids has {len(self.token_ids)}"
                )
        if self.token_logprobs is not None:
            lps = tuple(float(x) for x in self.token_logprobs)
            object.__setattr__(self, "token_logprobs", lps)
            if self.token_ids is not None and len(lps) != len(self.token_ids):
                raise ConfigError(
                    f"token_logprobs has {len(lps)} entries but token_ids has {len(self.token_ids)}"
                )
            if self.cumulative_logprob is None:
                object.__setattr__(self, "cumulative_logprob", math.fsum(lps))
        if self.top_logprobs is not None:
            object.__setattr__(
                self,
                "top_logprobs",
                tuple({int(k): float(v) for k, v in d.items()} for d in self.top_logprobs),
            )
        if self.num_tokens == 0:
            if self.token_ids is not None:
                object.__setattr__(self, "num_tokens", len(self.token_ids))
            elif self.token_logprobs is not None:
                object.__setattr__(self, "num_tokens", len(self.token_logprobs))
        if self.num_tokens < 0:
            raise ConfigError(f"num_tokens must be >= 0, got {self.num_tokens}")
        if isinstance(self.finish_reason, FinishReason):
            object.__setattr__(self, "finish_reason", self.finish_reason.value)

    @property
    def mean_logprob(self) -> float | None:
        """Length-normalised log-probability (mean over generated tokens), or None."""
        if self.cumulative_logprob is None or self.num_tokens == 0:
            return None
        return self.cumulative_logprob / self.num_tokens


#: what a step-wise sampler did with a trace (``Sample.fate``)
SAMPLE_FATES = ("kept", "pruned", "resampled", "extended")


@dataclass(frozen=True)
class Sample:
    """A stored sample: a completion plus what verification added.

    ``answer`` is the extracted (canonical) answer, the voting key; ``None`` means no answer
    could be extracted (never the string ``"None"``). ``correct`` is ``None`` when unknown.
    ``scores`` holds named verifier/reward scores; ``meta`` anything else.

    Step-wise samplers (pruning, SMC) also record ``step`` (the step that produced the trace),
    ``parent`` (the index of the trace it continues), ``log_weight`` (natural log) and ``fate``
    (``kept``, ``pruned`` at ``pruned_at`` tokens, or ``resampled`` away); ``None`` for iid
    samples.
    """

    problem_id: str
    index: int
    text: str = ""
    token_ids: tuple[int, ...] | None = None
    token_logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[Mapping[int, float], ...] | None = None
    logprob: float | None = None
    mean_logprob: float | None = None
    num_tokens: int | None = None
    finish_reason: str | None = None
    seed: int | None = None
    answer: str | None = None
    correct: bool | None = None
    scores: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    step: int | None = None
    parent: int | None = None
    log_weight: float | None = None
    fate: str | None = None
    pruned_at: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.problem_id, str) or not self.problem_id:
            raise ConfigError(f"problem_id must be a non-empty string, got {self.problem_id!r}")
        check_int("index", self.index, min=0)
        check_int("step", self.step, min=0, allow_none=True)
        check_int("parent", self.parent, min=0, allow_none=True)
        check_int("pruned_at", self.pruned_at, min=0, allow_none=True)
        if self.fate is not None and self.fate not in SAMPLE_FATES:
            raise ConfigError(f"fate must be one of {list(SAMPLE_FATES)} or None, got {self.fate!r}")
        if self.log_weight is not None:
            w = float(self.log_weight)
            object.__setattr__(self, "log_weight", -math.inf if math.isnan(w) else w)
        if self.answer is not None and not isinstance(self.answer, str):
            raise ConfigError(f"answer must be a string or None, got {self.answer!r}")
        if self.correct is not None and not isinstance(self.correct, bool):
            raise ConfigError(f"correct must be a bool or None, got {self.correct!r}")
        if self.token_logprobs is not None:
            lps = tuple(float(x) for x in self.token_logprobs)
            object.__setattr__(self, "token_logprobs", lps)
            if self.logprob is None:
                object.__setattr__(self, "logprob", math.fsum(lps))
            if self.num_tokens is None:
                object.__setattr__(self, "num_tokens", len(lps))
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
            if self.num_tokens is None:
                object.__setattr__(self, "num_tokens", len(self.token_ids))
        if self.mean_logprob is None and self.logprob is not None and self.num_tokens:
            object.__setattr__(self, "mean_logprob", self.logprob / self.num_tokens)
        scores = {}
        for k, v in dict(self.scores or {}).items():
            if not isinstance(k, str):
                raise ConfigError(f"score names must be strings, got {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"score {k!r} must be a number, got {v!r}")
            scores[k] = float(v)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "meta", _frozen_mapping(self.meta))

    @classmethod
    def from_completion(cls, c: Completion, **extra: Any) -> Sample:
        if c.self_certainty is not None:
            extra["scores"] = {**dict(extra.get("scores") or {}), "self_certainty": c.self_certainty}
        return cls(
            problem_id=c.problem_id,
            index=c.index,
            text=c.text,
            token_ids=c.token_ids,
            token_logprobs=c.token_logprobs,
            top_logprobs=c.top_logprobs,
            logprob=c.cumulative_logprob,
            mean_logprob=c.mean_logprob,
            num_tokens=c.num_tokens,
            finish_reason=c.finish_reason,
            seed=c.seed,
            **extra,
        )

    def to_completion(self) -> Completion:
        """The completion this sample was made from (text, tokens, log-probs; finish ``stop``
        when none was recorded), e.g. for a sampler's results resumed from a stored run."""
        return Completion(
            problem_id=self.problem_id,
            index=self.index,
            text=self.text,
            token_ids=self.token_ids,
            token_logprobs=self.token_logprobs,
            top_logprobs=self.top_logprobs,
            cumulative_logprob=self.logprob,
            num_tokens=self.num_tokens or 0,
            finish_reason=self.finish_reason or "stop",
            seed=self.seed,
        )

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem_id, self.index)


class VerdictStatus(str, enum.Enum):
    """Outcome of checking one candidate. Failures are statuses, never exceptions."""

    PASS = "pass"  # verified correct
    FAIL = "fail"  # checked and wrong (a failing assertion, a different answer)
    INVALID = "invalid"  # no answer could be extracted / unparsable candidate
    TIMEOUT = "timeout"
    CRASH = "crash"  # killed by a signal or died abnormally
    MEMORY = "memory"  # exceeded its memory limit
    SYNTAX_ERROR = "syntax_error"
    ERROR = "error"  # the checker itself failed on this candidate
    SCORED = "scored"  # a score without a pass/fail judgement (reward models, judges)


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one sample.

    ``answer`` is the canonical answer (the voting key; equivalent answers share it);
    ``correct`` is ``None`` when the verifier only scores; ``score`` is a real-valued score
    (higher is better) when the verifier has one; ``detail`` a short human-readable note.
    """

    problem_id: str
    index: int
    status: VerdictStatus
    verifier: str
    answer: str | None = None
    correct: bool | None = None
    score: float | None = None
    detail: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.status, VerdictStatus):
            try:
                object.__setattr__(self, "status", VerdictStatus(self.status))
            except ValueError as e:
                raise ConfigError(f"unknown verdict status {self.status!r}") from e
        if self.correct is None and self.status is VerdictStatus.PASS:
            object.__setattr__(self, "correct", True)
        if self.correct is True and self.status is not VerdictStatus.PASS:
            raise ConfigError(f"a verdict with status {self.status.value} cannot be correct")
        if self.score is not None:
            object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "meta", _frozen_mapping(self.meta))


def _as_tuple(x: Sequence[Any] | None) -> tuple[Any, ...] | None:
    return None if x is None else tuple(x)
