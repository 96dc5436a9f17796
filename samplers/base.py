"""The sampler protocol and its in-memory results: every candidate, tokens spent, weights.

A sampler turns problems and a budget into one :class:`SampleResult` per problem. The result
keeps every candidate the sampler drew (kept, pruned, resampled away) with its step, parent
and log-weight, the tokens generated for the problem (discarded ones included) and, for
weighted samplers, per-step diagnostics, so eval code can vote, weight or audit without a run
directory. A :class:`~ttscale.store.SampleStore` passed as ``sink`` receives the same
candidates; it is optional.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ttscale.errors import ConfigError
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, Sample
from ttscale.validation import check_int

__all__ = ["Candidate", "Fate", "SampleResult", "Sampler", "StepInfo"]


class Fate(str, enum.Enum):
    """What a sampler did with a candidate (stored as the ``fate`` column)."""

    KEPT = "kept"  # part of the final pool
    PRUNED = "pruned"  # stopped early at ``pruned_at`` tokens by a pruning rule
    RESAMPLED = "resampled"  # dropped by a resampling step (its descendants replaced it)
    EXTENDED = "extended"  # an intermediate particle a later step continued (an ancestor)


@dataclass(frozen=True)
class Candidate:
    """One trace a sampler drew, with where it came from and what became of it.

    ``step`` is the step that produced it (0 for one-shot samplers), ``parent`` the index of the
    candidate it continues (its ancestor; ``None`` for a fresh trace), ``log_weight`` its
    normalised-or-not log importance weight (natural log; ``None`` for unweighted samplers; the
    sampler documents which), ``pruned_at`` the token count at which it was stopped.
    """

    completion: Completion
    step: int = 0
    parent: int | None = None
    log_weight: float | None = None
    fate: Fate = Fate.KEPT
    pruned_at: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.completion, Completion):
            raise ConfigError(
                f"a Candidate holds a Completion, got {type(self.completion).__name__}"
            )
        check_int("step", self.step, min=0)
        check_int("parent", self.parent, min=0, allow_none=True)
        check_int("pruned_at", self.pruned_at, min=0, allow_none=True)
        if not isinstance(self.fate, Fate):
            try:
                object.__setattr__(self, "fate", Fate(self.fate))
            except ValueError:
                raise ConfigError(
                    f"fate must be one of {[f.value for f in Fate]}, got {self.fate!r}"
                ) from None
        if self.log_weight is not None:
            w = float(self.log_weight)
            # NaN weights become -inf at the boundary (a NaN would poison every normaliser)
            object.__setattr__(self, "log_weight", -math.inf if math.isnan(w) else w)
        if (self.pruned_at is not None) != (self.fate is Fate.PRUNED):
            raise ConfigError("pruned_at is given exactly for candidates whose fate is pruned")

    @property
    def index(self) -> int:
        return self.completion.index

    @property
    def text(self) -> str:
        return self.completion.text

    def to_sample(self, *, iid: bool) -> Sample:
        """The stored form: a :class:`Sample` whose step-wise columns are set unless ``iid``."""
        if iid:
            return Sample.from_completion(self.completion)
        return Sample.from_completion(
            self.completion,
            step=self.step,
            parent=self.parent,
            log_weight=self.log_weight,
            fate=self.fate.value,
            pruned_at=self.pruned_at,
        )


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one step of a weighted sampler (BlackJAX's ``info``).

    ``ancestors[j]`` is the candidate index particle ``j`` continues after resampling,
    ``ess`` the effective sample size before resampling, ``log_ml_increment`` the step's
    log-normaliser increment (natural log).
    """

    step: int
    ancestors: tuple[int, ...] = ()
    ess: float | None = None
    log_ml_increment: float | None = None
    resampled: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleResult:
    """Everything a sampler drew for one problem.

    ``candidates`` is every trace, in index order, whatever its fate; ``generated_tokens`` the
    tokens generated for them (discarded traces included); ``resumed`` how many candidates came
    from the sink rather than the engine (their tokens were spent by an earlier session and are
    included in ``generated_tokens``); ``info`` the sampler's per-problem summary (SMC:
    ``log_ml``, ``particle_steps``, ...); ``iid`` whether the kept candidates are independent draws
    (repeated sampling) or a weighted population (SMC), in which case ``log_weights`` says how to
    combine them.
    """

    problem: Problem
    candidates: tuple[Candidate, ...]
    generated_tokens: int
    prompt_tokens: int = 0
    iid: bool = True
    resumed: int = 0
    steps: tuple[StepInfo, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "steps", tuple(self.steps))
        check_int("generated_tokens", self.generated_tokens, min=0)
        check_int("prompt_tokens", self.prompt_tokens, min=0)

    @property
    def problem_id(self) -> str:
        return self.problem.id

    @property
    def kept(self) -> tuple[Candidate, ...]:
        """The final pool (candidates whose fate is ``kept``)."""
        return tuple(c for c in self.candidates if c.fate is Fate.KEPT)

    @property
    def texts(self) -> list[str]:
        """Texts of the kept candidates."""
        return [c.text for c in self.kept]

    @property
    def completions(self) -> list[Completion]:
        """Completions of the kept candidates (what a verifier checks)."""
        return [c.completion for c in self.kept]

    @property
    def log_weights(self) -> tuple[float, ...] | None:
        """Log-weights of the kept candidates, or ``None`` for an unweighted sampler."""
        ws = [c.log_weight for c in self.kept]
        if all(w is None for w in ws):
            return None
        return tuple(-math.inf if w is None else w for w in ws)


@runtime_checkable
class Sampler(Protocol):
    """Draws candidates for problems within a budget.

    ``budget`` is the sampler's spending unit (samples per problem for repeated sampling; each
    sampler documents its own). ``seed`` is the run seed: candidate ``i`` of problem ``p`` (and
    its step ``t``) gets a seed derived from ``(seed, p, i[, t])``, so a run is reproducible and a
    smaller budget draws a prefix of a larger one. ``sink``: a store that receives every
    candidate as it is drawn (resuming from what it already holds); ``None`` samples in memory.
    Yields one :class:`SampleResult` per problem, in problem order.
    """

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]: ...
