"""Sequential Monte Carlo over partial generations (docs/algorithms.md 6.1-6.4): :class:`SMCSampler`.

Particles are partial generations of one problem. Each step extends every live particle to its
next step boundary (a stop string such as ``"\\n"``, EOS, or ``tokens_per_step`` tokens; one
token per step works) with requests on token prefixes that **share the engine with every other
problem in flight** (each problem is a program on the engine loop, :mod:`ttscale.samplers.loop`),
scores the new prefixes with a potential, updates the weights and resamples when the schedule
says so.

Weights (natural log, float64). For particle ``i`` extended by step ``s_t``:

* **incremental** log-weight ``α_t = [log γ_t(s_{1:t}) − log γ_{t−1}(s_{1:t−1})] + log p(s_t|·)
  − log q(s_t|·)``: the potential's change (per ``shaping``, :mod:`ttscale.samplers.potentials`)
  plus the **proposal correction** ``Σ target − Σ proposal`` over the step's tokens (raw minus
  processed log-probs; zero when they agree, e.g. temperature 1 without filters);
* **cumulative** log-weight ``ℓ_i += α_t``. After resampling every particle's ``ℓ`` is set to
  ``LSE(ℓ) − log N`` (LLaMPPL's convention: the total is kept), so at any time
  ``log_ml = LSE(ℓ) − log N`` is the running estimate of ``log Z`` and the per-step increment is
  ``LSE(ℓ_after) − LSE(ℓ_before)``.

Finished particles (EOS, ``max_tokens`` in all, or ``max_steps``) are **absorbing**: kept, weight
frozen, never extended. A particle whose weight is 0 (``-inf``) is not extended either (no
later step can give it weight); it stays in the population until resampling drops it. By default they **take part in resampling** (``resample_finished=True``:
an absorbing state is an identity move with incremental weight 0, so this is plain SMC and
finished particles can be copied or dropped); with ``False`` only live particles are resampled,
among themselves, their total weight kept (finished ones are untouched). Both are unbiased for
``Z``; the tests check each.

All weights ``-inf`` is a clear outcome: ``info["degenerate"]`` is true, ``log_ml`` is ``-inf``,
the loop stops, no NaN appears.

The pure part of a step is :func:`reweight`, ``(state, increments) -> (state, info)`` in the
BlackJAX way; the sampler adds the engine call and the potential around it.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ttscale.engines.base import (
    Engine,
    capabilities_of,
    require_capabilities,
)
from ttscale.errors import ConfigError
from ttscale.particles.logspace import ess as ess_of
from ttscale.particles.logspace import log_normalize, logsumexp
from ttscale.particles.resampling import RESAMPLERS, Resampler, resample
from ttscale.samplers.base import Candidate, Fate, SampleResult, StepInfo
from ttscale.samplers.loop import Program, Scheduler
from ttscale.samplers.potentials import (
    SHAPINGS,
    as_potential,
    evaluate,
    fk_increments,
    pf_log_weights,
)
from ttscale.samplers.session import SamplingSession, open_sink, rich_progress, unique_problems
from ttscale.samplers.stepwise import (
    StepRun,
    ends_trace,
    extend,
    step_request,
    step_text,
    stored_problem,
)
from ttscale.seeding import SeedLike, as_generator, problem_seed
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams
from ttscale.validation import check_choice, check_int, check_number

__all__ = [
    "SELECTIONS",
    "SMCSampler",
    "SMCState",
    "FKSteering",
    "LogPotential",
    "ParticleFilter",
    "Shaping",
    "lineage_figure",
    "make_shaping",
    "plot_lineage",
    "reweight",
    "select_answer",
]

log = logging.getLogger(__name__)

#: final-answer rules over a weighted population
SELECTIONS = ("argmax", "sample", "vote")


@dataclass(frozen=True)
class SMCState:
    """The population after a step: one entry per particle slot (arrays of shape ``(N,)``).

    ``log_weights``: cumulative ``ℓ`` (see the module docstring); ``finished``: absorbing;
    ``cand``: the candidate index each slot holds (its latest step's candidate); ``log_ml``: the
    running ``log Ẑ``; ``stats``: the shaping's own per-particle statistics (:class:`Shaping`);
    ``target_lp``: cumulative raw log-probability of each prefix; the particles themselves:
    ``texts`` (text so far), ``tokens`` (token ids so far, tuples) and ``steps`` (steps taken).
    A step is ``state -> state``; resampling is one index gather of every field (:meth:`take`).
    """

    log_weights: NDArray[np.float64]
    finished: NDArray[np.bool_]
    cand: NDArray[np.int64]
    log_ml: float = 0.0
    stats: Mapping[str, NDArray[np.float64]] = field(default_factory=dict)
    target_lp: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    texts: NDArray[np.object_] = field(default_factory=lambda: np.zeros(0, object))
    tokens: NDArray[np.object_] = field(default_factory=lambda: np.zeros(0, object))
    steps: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def initial(cls, n: int, shaping: Shaping | None = None) -> SMCState:
        """``n`` empty particles of weight 1 (``ℓ = 0``), with ``shaping``'s statistics."""
        texts = np.empty(n, dtype=object)
        texts[:] = ""
        tokens = np.empty(n, dtype=object)
        tokens[:] = [() for _ in range(n)]
        return cls(
            np.zeros(n, dtype=np.float64),
            np.zeros(n, bool),
            np.full(n, -1, np.int64),
            0.0,
            dict(shaping.initial(n)) if shaping is not None else {},
            np.zeros(n, dtype=np.float64),
            texts,
            tokens,
            np.zeros(n, np.int64),
        )

    def take(self, ancestors: NDArray[np.int64]) -> SMCState:
        """The population rearranged by ``ancestors`` (weights untouched): one gather."""
        a = np.asarray(ancestors, dtype=np.int64)
        n = self.log_weights.size

        def g(x: NDArray[Any]) -> NDArray[Any]:
            return x[a] if x.size == n else x  # an empty optional field stays empty

        return replace(
            self,
            log_weights=self.log_weights[a],
            finished=self.finished[a],
            cand=self.cand[a],
            stats={k: g(v) for k, v in self.stats.items()},
            target_lp=g(self.target_lp),
            texts=g(self.texts),
            tokens=g(self.tokens),
            steps=g(self.steps),
        )


# ---- shaping: how potential values become incremental weights ---------------------------------


class Shaping(Protocol):
    """How a potential's values become incremental log-weights (``shaping``), with the
    per-particle statistics it carries between steps (resampled with the particles).

    ``step(values, stats, finished)`` gets the values of the particles just extended, their
    statistics and whether each is now finished, and returns their incremental log-weights and
    new statistics. ``replaces_weights``: the value *is* the new log-weight (Puri's particle
    filter: no proposal correction, no ``log Ẑ``).
    """

    @property
    def name(self) -> str: ...

    @property
    def replaces_weights(self) -> bool: ...

    def initial(self, n: int) -> Mapping[str, NDArray[np.float64]]: ...

    def step(
        self,
        values: NDArray[np.float64],
        stats: Mapping[str, NDArray[np.float64]],
        finished: NDArray[np.bool_],
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]: ...


@dataclass(frozen=True)
class LogPotential:
    """``none``: values are cumulative log-potentials ``log G_t``; the increment is
    ``log G_t − log G_{t−1}`` (statistic ``log_g``, the last value)."""

    name = "none"
    replaces_weights = False

    def initial(self, n: int) -> dict[str, NDArray[np.float64]]:
        return {"log_g": np.zeros(n)}

    def step(
        self,
        values: NDArray[np.float64],
        stats: Mapping[str, NDArray[np.float64]],
        finished: NDArray[np.bool_],
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]:
        with np.errstate(invalid="ignore"):
            d = values - stats["log_g"]
        return np.where(np.isnan(d), -np.inf, d), {"log_g": np.asarray(values, np.float64)}


@dataclass(frozen=True)
class FKSteering:
    """Feynman-Kac steering of a reward with strength ``lam`` (``immediate``, ``difference``,
    ``max``, ``sum``; :func:`~ttscale.samplers.potentials.fk_increments`); statistics ``r_prev``
    (the carried ``r̃``) and ``log_pi`` (the sum of the particle's FK log-increments)."""

    name: str
    lam: float = 1.0
    replaces_weights = False

    def __post_init__(self) -> None:
        check_choice("shaping", self.name, ("immediate", "difference", "max", "sum"))

    def initial(self, n: int) -> dict[str, NDArray[np.float64]]:
        return {"r_prev": np.zeros(n), "log_pi": np.zeros(n)}

    def step(
        self,
        values: NDArray[np.float64],
        stats: Mapping[str, NDArray[np.float64]],
        finished: NDArray[np.bool_],
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]:
        w, tilde = fk_increments(
            self.name, self.lam, values, stats["r_prev"], stats["log_pi"], finished
        )
        return w, {"r_prev": tilde, "log_pi": stats["log_pi"] + w}


@dataclass(frozen=True)
class ParticleFilter:
    """``pf``: Puri et al.'s particle filter: a particle's log-weight is replaced by
    ``logit(r)/temperature`` (:func:`~ttscale.samplers.potentials.pf_log_weights`)."""

    temperature: float = 1.0
    name = "pf"
    replaces_weights = True

    def initial(self, n: int) -> dict[str, NDArray[np.float64]]:
        return {}

    def step(
        self,
        values: NDArray[np.float64],
        stats: Mapping[str, NDArray[np.float64]],
        finished: NDArray[np.bool_],
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]:
        return pf_log_weights(values, temperature=self.temperature), {}


def make_shaping(name: str, *, lam: float = 1.0, pf_temperature: float = 1.0) -> Shaping:
    """The :class:`Shaping` named ``name`` (one of :data:`SHAPINGS`)."""
    check_choice("shaping", name, SHAPINGS)
    if name == "none":
        return LogPotential()
    if name == "pf":
        return ParticleFilter(pf_temperature)
    return FKSteering(name, lam)


def reweight(
    state: SMCState,
    increments: NDArray[np.float64],
    *,
    rng: SeedLike,
    scheme: str | Resampler = "systematic",
    ess_threshold: float = 0.5,
    resample_finished: bool = True,
    replace_weights: bool = False,
    step: int = 0,
    allow_resample: bool = True,
) -> tuple[SMCState, StepInfo]:
    """The pure weighting and resampling part of one SMC step: ``(state, info)``.

    ``increments[i]`` is particle ``i``'s incremental log-weight ``α_t`` (ignored for particles
    already finished before this step: pass 0) — or, with ``replace_weights`` (Puri's particle
    filter), its new log-weight outright. Then ``ESS`` of the cumulative weights; if
    ``ESS < ess_threshold·N`` (``ess_threshold=1`` resamples every step, even at ESS = N;
    ``0`` never) and
    ``allow_resample``, ancestors are drawn with ``scheme`` (a name in
    :data:`~ttscale.particles.resampling.RESAMPLERS`, or any ``(rng, weights, num) -> ancestors``
    callable, e.g. a deterministic top-k selection for beam search) and weights reset to
    ``LSE(ℓ) − log N`` (of the resampled set when ``resample_finished`` is false). ``info``:
    ancestors (slot indices; identity when not resampled), ``ess`` (before resampling),
    ``log_ml_increment`` and ``extra["degenerate"]`` (every weight ``-inf``).
    """
    n = state.log_weights.size
    inc = np.asarray(increments, dtype=np.float64)
    inc = np.where(np.isnan(inc), -np.inf, inc)
    before = float(logsumexp(state.log_weights))
    if replace_weights:
        lw = inc.copy()
    else:
        with np.errstate(invalid="ignore"):
            lw = state.log_weights + inc
        lw = np.where(np.isnan(lw), -np.inf, lw)
    after = float(logsumexp(lw))
    if replace_weights:
        d_log_ml = math.nan
        log_ml = math.nan
    elif after == -math.inf:
        d_log_ml = -math.inf
        log_ml = -math.inf
    else:
        d_log_ml = after - before if before > -math.inf else -math.inf
        log_ml = after - math.log(n)
    ess = ess_of(lw)
    degenerate = after == -math.inf
    new = replace(state, log_weights=lw, log_ml=log_ml)
    ancestors = np.arange(n, dtype=np.int64)
    resampled = False
    if allow_resample and not degenerate and (ess_threshold >= 1.0 or ess < ess_threshold * n):
        g = as_generator(rng)
        if resample_finished:
            norm = log_normalize(lw)
            ancestors = _draw(scheme, g, norm.weights, n)
            new = new.take(ancestors)
            if not replace_weights:
                new = replace(new, log_weights=np.full(n, after - math.log(n)))
            resampled = True
        else:
            live = np.flatnonzero(~state.finished)
            if live.size and float(logsumexp(lw[live])) > -math.inf:
                sub = lw[live]
                pick = _draw(scheme, g, log_normalize(sub).weights, live.size)
                ancestors[live] = live[pick]
                new = new.take(ancestors)
                if not replace_weights:
                    w = new.log_weights.copy()
                    w[live] = float(logsumexp(sub)) - math.log(live.size)
                    new = replace(new, log_weights=w)
                resampled = True
    info = StepInfo(
        step=step,
        ancestors=tuple(int(a) for a in ancestors),
        ess=ess,
        log_ml_increment=d_log_ml,
        resampled=resampled,
        extra={"degenerate": degenerate},
    )
    return new, info


def same_prefix_runs(live: NDArray[np.int64], tokens: NDArray[np.object_]) -> list[list[int]]:
    """``live`` (ascending slots) cut into runs of consecutive slots whose particles hold the
    same token prefix; the runs, concatenated, are ``live``."""
    runs: list[list[int]] = []
    for j in live.tolist():
        if runs and runs[-1][-1] == j - 1:
            prev = tokens[j - 1]
            # copies made by resampling share one tuple, so ``is`` decides most cases at once
            if prev is tokens[j] or prev == tokens[j]:
                runs[-1].append(j)
                continue
        runs.append([j])
    return runs


def _draw(
    scheme: str | Resampler, g: np.random.Generator, weights: NDArray[np.float64], num: int
) -> NDArray[np.int64]:
    if isinstance(scheme, str):
        return resample(scheme, g, weights, num)
    out = np.asarray(scheme(g, weights, num), dtype=np.int64).reshape(-1)
    if out.size != num or np.any(out < 0) or np.any(out >= weights.size):
        raise ConfigError(
            f"resampler {getattr(scheme, '__name__', scheme)!r} returned {out.size} ancestors "
            f"(need {num} indices in [0, {weights.size}))"
        )
    return out


class SMCSampler:
    """Sequential Monte Carlo with ``budget`` particles per problem (the ``Sampler`` protocol).

    ``potential``: an object with ``score(problem, texts, finished)`` or such a callable
    (:mod:`ttscale.samplers.potentials`); ``shaping`` how its values become weights
    (:data:`~ttscale.samplers.potentials.SHAPINGS`: ``none`` = log-potentials, ``immediate`` /
    ``difference`` / ``max`` / ``sum`` = FK steering of a reward with strength ``lam``, ``pf`` =
    Puri et al.'s particle filter with softmax temperature ``pf_temperature``).

    Steps: ``step_stop`` strings end a step (kept in the step's text; ``()`` for none),
    ``tokens_per_step`` caps a step's tokens (``1`` = token-level SMC), ``params.max_tokens``
    caps a particle's tokens in all, ``max_steps`` its steps. ``params`` are the proposal's
    sampling settings (temperature, top-p, ...); with settings other than plain sampling at
    temperature 1 the engine must return both raw and processed log-probs (capabilities
    ``raw_logprobs`` and ``processed_logprobs``) for the proposal correction.

    Resampling: ``resample`` scheme (multinomial, stratified, systematic, residual, or a
    callable ``(rng, weights, num) -> ancestors``: the hook for step-level search), when
    ``ESS < ess_threshold·N`` (``1.0`` = every step; ``pf`` always resamples every step).
    ``resample_finished``: whether finished particles take part (module docstring).

    ``select``: the final answer rule used by :func:`select_answer` when ``answer_fn`` is given
    (``argmax`` weight, a ``sample`` from the weights, weighted ``vote``); the answer goes into
    ``result.info["answer"]``.

    Engine: each problem is a program on the engine loop (:mod:`ttscale.samplers.loop`), so
    the particles of every problem in flight share the engine (vLLM: one continuous stream of
    requests; batch-only engines: what is pending goes in one call); resampling stays per
    problem. ``batch_size``: most particle-steps in the engine at once (default 512);
    ``max_problems``: problems in flight (default: as many as keep it full). Results do not
    depend on either (seeds per problem, candidate and step; resampling per problem).

    Budget accounting: ``result.generated_tokens`` counts every token the engine generated for
    the problem (particles resampled away included); ``info["particle_steps"]`` the particle
    extensions. Stored runs (``sink``) keep every particle-step as a candidate with ``step``,
    ``parent``, cumulative ``log_weight`` at creation and ``fate`` (``kept`` for the final
    population with its final log-weight, ``extended`` for ancestors, ``resampled`` for dropped
    lines); the run is marked ``iid=False``. A problem's candidates are stored once it is done
    (their fates are known only then, so they go in one shard) and it is recorded in
    ``manifest["smc_done"]``; a problem with stored samples counts as done, so a run killed
    between the two is read back, not rerun or counted twice. A problem that fails part-way
    (engine error, Ctrl-C) has its finished particle-steps journaled; a resume replays them
    (seeds are per problem, candidate and step, so the replay is the uninterrupted run) and
    generates only the rest; their tokens reach the run's accounting once, with the problem
    (:mod:`ttscale.samplers.stepwise`).
    """

    def __init__(
        self,
        engine: Engine,
        potential: Any,
        params: SamplingParams | None = None,
        *,
        shaping: str | Shaping = "none",
        lam: float = 1.0,
        pf_temperature: float = 1.0,
        resample: str | Resampler = "systematic",
        ess_threshold: float = 0.5,
        resample_finished: bool = True,
        step_stop: Sequence[str] = ("\n",),
        tokens_per_step: int = 256,
        max_steps: int = 64,
        chat: bool = False,
        select: str = "vote",
        answer_fn: Callable[[str], str | None] | None = None,
        progress: bool | None = None,
        manifest: Mapping[str, Any] | None = None,
        flush_every: int = 512,
        batch_size: int | None = None,
        max_problems: int | None = None,
    ) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(shaping, str):
            check_choice("shaping", shaping, SHAPINGS)
        elif not callable(getattr(shaping, "step", None)):
            raise ConfigError("shaping must be a name in SHAPINGS or a Shaping object (step, initial)")
        if isinstance(resample, str):
            check_choice("resample", resample, tuple(RESAMPLERS))
        elif not callable(resample):
            raise ConfigError("resample must be a scheme name or a callable (rng, weights, num)")
        check_choice("select", select, SELECTIONS)
        check_number("lam", lam)
        check_number("ess_threshold", ess_threshold, low=0.0, high=1.0)
        check_int("tokens_per_step", tokens_per_step, min=1)
        check_int("max_steps", max_steps, min=1)
        check_int("batch_size", batch_size, min=1, allow_none=True)
        check_int("max_problems", max_problems, min=1, allow_none=True)
        if params.temperature == 0.0:
            raise ConfigError(
                "SMC needs a stochastic proposal: temperature must be > 0 (greedy decoding has "
                "no importance weights)"
            )
        if params.n != 1:
            raise ConfigError("SMCSampler draws one continuation per particle: params.n must be 1")
        require_capabilities(engine, "token_prefixes", by="SMCSampler")
        plain = (
            params.temperature == 1.0
            and params.top_p == 1.0
            and params.top_k == 0
            and params.min_p == 0.0
            and params.min_tokens == 0
        )
        caps = capabilities_of(engine)
        self.correct_proposal = caps.has("raw_logprobs") and caps.has("processed_logprobs")
        if not plain and not self.correct_proposal:
            require_capabilities(engine, "raw_logprobs", "processed_logprobs", by="SMCSampler")
        potential = as_potential(potential)
        if getattr(potential, "uses_logprobs", False):
            # a likelihood-tempering term needs log p of every prefix, from raw log-probs
            require_capabilities(engine, "raw_logprobs", by="a likelihood-tempering potential")
        if isinstance(step_stop, str):
            step_stop = (step_stop,)
        self.engine = engine
        self.potential = potential
        self.params = params.replace(logprobs=0 if params.logprobs is None else params.logprobs)
        self.lam = float(lam)
        self.pf_temperature = float(pf_temperature)
        check_number("pf_temperature", pf_temperature, low=0.0, low_open=True)
        #: the shaping object (owns its statistics); ``shaping`` is its name
        self.shaper: Shaping = (
            make_shaping(shaping, lam=self.lam, pf_temperature=self.pf_temperature)
            if isinstance(shaping, str)
            else shaping
        )
        self.shaping = self.shaper.name
        self.scheme = resample
        self.ess_threshold = 1.0 if self.shaper.replaces_weights else float(ess_threshold)
        self.resample_finished = bool(resample_finished)
        self.step_stop = tuple(step_stop)
        self.tokens_per_step = tokens_per_step
        self.max_steps = max_steps
        self.chat = bool(chat)
        self.select = select
        self.answer_fn = answer_fn
        self.progress = progress
        self.extra_manifest = dict(manifest or {})
        self.flush_every = flush_every
        #: most particle-steps in the engine at once, all problems together (``None``: 512)
        self.batch_size = batch_size
        #: problems in flight at once (``None``: as many as keep ``batch_size`` steps queued)
        self.max_problems = max_problems
        self.engine_info = dict(engine.info())

    # ---- configuration for the manifest ------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The SMC settings recorded in a run's manifest (``smc``)."""
        return {
            "shaping": self.shaping,
            "lambda": self.lam,
            "pf_temperature": self.pf_temperature,
            "resample": self.scheme
            if isinstance(self.scheme, str)
            else getattr(self.scheme, "__name__", "custom"),
            "ess_threshold": self.ess_threshold,
            "resample_finished": self.resample_finished,
            "step_stop": list(self.step_stop),
            "tokens_per_step": self.tokens_per_step,
            "max_steps": self.max_steps,
            "select": self.select,
            "proposal_correction": self.correct_proposal,
            "potential": getattr(self.potential, "name", type(self.potential).__name__),
        }

    # ---- the Sampler protocol ----------------------------------------------------------------

    def sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        seed: int | None = None,
        sink: SampleStore | None = None,
    ) -> Iterator[SampleResult]:
        """Run SMC with ``budget`` particles on each problem; one :class:`SampleResult` each.

        ``seed``: the run seed (default ``params.seed``): particle ``j``'s extension at step
        ``t`` is seeded by ``(seed, problem, candidate index t·N + j, t)`` and the resampling
        generator by ``(seed, problem)``, so a run is reproducible. ``sink``: a store receiving
        every particle-step; problems it already stored are read back, a problem left unfinished
        resumes from its journaled steps, the others are sampled.
        """
        check_int("budget", budget, min=1)
        check_int("seed", seed, min=0, allow_none=True)
        params = self.params if seed is None else self.params.replace(seed=seed)
        problems = unique_problems(problems)
        if sink is not None:
            extra = {**self.extra_manifest, "smc": {**self.config(), "particles": budget}}
            # how an answer is picked does not change the particles
            StepRun(sink, "smc", budget, "SMC").check_same(extra["smc"], ignore=("select",))
            open_sink(
                sink, problems, engine_info=self.engine_info, params=params, n=budget,
                chat=self.chat, iid=False, extra=extra,
            )
        return self._sample(problems, budget, params, sink)

    def _sample(
        self,
        problems: Sequence[Problem],
        budget: int,
        params: SamplingParams,
        sink: SampleStore | None,
    ) -> Iterator[SampleResult]:
        run = (
            StepRun(sink, "smc", budget, "SMC", self.engine_info) if sink is not None else None
        )
        done = run.done() if run is not None else set()
        show = sys.stderr.isatty() if self.progress is None else bool(self.progress)
        session = SamplingSession(
            self.engine, sink, engine_info=self.engine_info, flush_every=self.flush_every
        )
        # the session's bar counts samples; SMC's unit is the problem (steps vary), so its own
        bar = _ProblemBar(show, total=len(problems), done=sum(p.id in done for p in problems))
        # problems started and not yet stored: their journal and what the engine handed over
        started: dict[str, tuple[Mapping[tuple[str, int], Completion], dict[Any, Completion]]] = {}
        with session, bar:
            sched: Scheduler[SampleResult] = Scheduler(
                session, self.step_params(params), max_sequences=self.batch_size or 512,
                max_problems=self.max_problems,
            )  # fmt: skip
            programs = [self._problem(p, budget, params, session, run, done, started) for p in problems]
            try:
                for result in sched.run(programs):
                    if not result.info.get("resumed"):
                        bar.advance(result)
                    yield result
            except BaseException:
                # keep what the engine finished for the problems in flight: a resume replays it
                if run is not None:
                    for pid, (replay, seen) in started.items():
                        run.salvage(pid, {**replay, **seen}.values())
                raise

    def _problem(
        self,
        problem: Problem,
        budget: int,
        params: SamplingParams,
        session: SamplingSession,
        run: StepRun | None,
        done: set[str],
        started: dict[str, tuple[Mapping[tuple[str, int], Completion], dict[Any, Completion]]],
    ) -> Program[SampleResult]:
        """One problem of a run: read back if stored, else :meth:`program` (resuming from its
        journal), its particle-steps stored in one shard and the problem marked done."""
        return (
            yield from stored_problem(
                problem, session, run, done, started,
                lambda replay, seen: self.program(problem, budget, params, replay=replay, seen=seen),
                lambda: self._resumed(problem, run),
            )
        )  # fmt: skip

    def step_params(self, params: SamplingParams) -> SamplingParams:
        """The sampling settings of every particle-step request of a run with ``params``."""
        # ``params.stop`` ends a particle's solution; a step ends at either kind of stop
        final_stop = tuple(x for x in params.stop if x not in self.step_stop)
        return params.replace(
            n=1,
            max_tokens=min(self.tokens_per_step, params.max_tokens),
            stop=self.step_stop + final_stop,
            include_stop_str_in_output=True,
            logprobs=params.logprobs if params.logprobs is not None else 0,
        )

    def run_problem(
        self,
        problem: Problem,
        n: int,
        params: SamplingParams,
        session: SamplingSession | None = None,
        *,
        replay: Mapping[tuple[str, int], Completion] | None = None,
        seen: dict[tuple[str, int], Completion] | None = None,
    ) -> SampleResult:
        """SMC with ``n`` particles on one problem alone (in memory unless ``session`` stores;
        :meth:`program` is the same on a shared engine loop)."""
        session = session or SamplingSession(self.engine, None, engine_info=self.engine_info)
        sched: Scheduler[SampleResult] = Scheduler(
            session, self.step_params(params), max_sequences=self.batch_size or 512
        )
        (result,) = sched.run([self.program(problem, n, params, replay=replay, seen=seen)])
        return result

    def program(
        self,
        problem: Problem,
        n: int,
        params: SamplingParams,
        *,
        replay: Mapping[tuple[str, int], Completion] | None = None,
        seen: dict[tuple[str, int], Completion] | None = None,
    ) -> Program[SampleResult]:
        """SMC with ``n`` particles on one problem, as a program on the engine loop
        (:mod:`ttscale.samplers.loop`; its scheduler's params are :meth:`step_params`): each
        step submits the live particles' extensions and waits for all of them, then weighs and
        resamples this problem's population alone, so problems in flight share the engine's
        calls and none waits for another's step.

        ``replay``: particle-steps an interrupted attempt finished (taken instead of generated);
        ``seen`` receives every particle-step the engine hands over (for salvage).
        """
        replay = replay or {}
        rng = np.random.default_rng(problem_seed(params.seed, problem.id) ^ 0x5EC)
        final_stop = tuple(x for x in params.stop if x not in self.step_stop)
        step_params = self.step_params(params)
        decode = getattr(self.engine, "decode", None)
        shaper = self.shaper
        state = SMCState.initial(n, shaper)
        cands: list[Candidate] = []
        infos: list[StepInfo] = []
        tokens = prompt_tokens = particle_steps = replayed = replayed_tokens = 0
        degenerate = False
        for t in range(self.max_steps):
            # a particle of weight 0 (-inf) can never regain weight: it is not extended
            live = np.flatnonzero(~state.finished & (state.log_weights > -math.inf))
            if live.size == 0:
                break
            # particles in consecutive slots with the same prefix (all of them at step 0, the
            # copies of one ancestor after resampling) go as one request: the same samples
            # (seeds are per problem, candidate and step), one fan-out on the engine
            runs = same_prefix_runs(live, state.tokens)
            reqs = [
                step_request(
                    problem,
                    chat=self.chat,
                    indices=tuple(t * n + int(j) for j in run),
                    step=t,
                    prefix_ids=state.tokens[run[0]],
                )
                for run in runs
            ]
            # a step's token cap: tokens_per_step, less near the particle's length limit
            caps = [
                min(step_params.max_tokens, params.max_tokens - len(state.tokens[run[0]]))
                for run in runs
            ]
            steps = yield from extend(
                reqs, step_params, caps, replay=replay, seen=seen,
                engine=self.engine_info.get("engine"),
            )  # fmt: skip
            outs = [c for g in steps for c in g]  # in the order of ``live``
            for comp in outs:
                if (problem.id, comp.index) in replay:
                    replayed += 1
                    replayed_tokens += comp.num_tokens
            particle_steps += len(live)
            tokens += sum(c.num_tokens for c in outs)
            prompt_tokens += sum(c.prompt_tokens or 0 for c in outs)
            pre, correction = self._extended(state, live, outs, params, decode, final_stop)
            fin = pre.finished[live]
            values = evaluate(
                self.potential, problem, list(pre.texts[live]), fin.tolist(), pre.target_lp[live]
            )
            inc_live, stats_live = shaper.step(
                values, {k: v[live] for k, v in state.stats.items()}, fin
            )
            stats = {k: v.copy() for k, v in state.stats.items()}
            for k, v in stats_live.items():
                stats[k][live] = v
            if shaper.replaces_weights:  # the new log-weight outright; others keep theirs
                inc = state.log_weights.copy()
                inc[live] = inc_live
                cum = inc
            else:
                inc = np.zeros(n)
                with np.errstate(invalid="ignore"):
                    inc[live] = inc_live + correction
                    inc = np.where(np.isnan(inc), -np.inf, inc)
                    cum = state.log_weights + inc
            cand = state.cand.copy()
            for j, comp in zip(live, outs, strict=True):
                idx = t * n + int(j)
                parent = int(state.cand[j]) if state.cand[j] >= 0 else None
                cands.append(
                    Candidate(
                        replace(comp, index=idx, text=str(pre.texts[j])),
                        step=t,
                        parent=parent,
                        log_weight=float(cum[j]),
                        fate=Fate.RESAMPLED,
                    )
                )
                cand[j] = idx
            state, info = reweight(
                replace(pre, cand=cand, stats=stats),
                inc,
                rng=rng,
                scheme=self.scheme,
                ess_threshold=self.ess_threshold,
                resample_finished=self.resample_finished,
                replace_weights=shaper.replaces_weights,
                step=t,
                allow_resample=not bool(pre.finished.all()),
            )
            infos.append(info)
            if info.extra.get("degenerate"):
                degenerate = True
                break
        return self._result(
            problem,
            state,
            cands,
            infos,
            tokens,
            prompt_tokens,
            particle_steps,
            degenerate,
            params,
            (replayed, replayed_tokens),
        )

    def _extended(
        self,
        state: SMCState,
        live: NDArray[np.int64],
        outs: Sequence[Completion],
        params: SamplingParams,
        decode: Callable[[Sequence[int]], str] | None,
        final_stop: Sequence[str] = (),
    ) -> tuple[SMCState, NDArray[np.float64]]:
        """The population with the ``live`` particles extended by their step ``outs`` (texts,
        tokens, steps, raw log-probability, finished), and the steps' proposal corrections.
        A step that ended at one of ``final_stop`` (the user's ``stop``) ends its particle."""
        texts, toks = state.texts.copy(), state.tokens.copy()
        steps, target_lp = state.steps.copy(), state.target_lp.copy()
        finished = state.finished.copy()
        correction = np.zeros(len(live))
        for k, (j, comp) in enumerate(zip(live, outs, strict=True)):
            texts[j] = texts[j] + step_text(decode, toks[j], comp)
            toks[j] = toks[j] + tuple(comp.token_ids or ())
            steps[j] += 1
            tgt, prop = comp.target_logprobs, comp.proposal_logprobs
            if tgt is not None:
                target_lp[j] += math.fsum(tgt)
            if self.correct_proposal and tgt is not None and prop is not None:
                with np.errstate(invalid="ignore"):
                    c = math.fsum(tgt) - math.fsum(prop)
                correction[k] = -math.inf if math.isnan(c) else c
            finished[j] = (
                ends_trace(comp, final_stop)
                or len(toks[j]) >= params.max_tokens
                or steps[j] >= self.max_steps
            )
        new = replace(
            state, texts=texts, tokens=toks, steps=steps, target_lp=target_lp, finished=finished
        )
        return new, correction

    def _result(
        self,
        problem: Problem,
        state: SMCState,
        cands: list[Candidate],
        infos: list[StepInfo],
        tokens: int,
        prompt_tokens: int,
        particle_steps: int,
        degenerate: bool,
        params: SamplingParams,
        replayed: tuple[int, int] = (0, 0),
    ) -> SampleResult:
        # final population: unique candidates, the weights of slots holding one summed
        final: dict[int, float] = {}
        for c, w in zip(state.cand.tolist(), state.log_weights.tolist(), strict=True):
            final[c] = float(np.logaddexp(final[c], w)) if c in final else float(w)
        parents = {c.parent for c in cands if c.parent is not None}
        out: list[Candidate] = []
        for c in cands:
            if c.index in final:
                out.append(replace(c, fate=Fate.KEPT, log_weight=final[c.index]))
            elif c.index in parents:
                out.append(replace(c, fate=Fate.EXTENDED))
            else:
                out.append(c)
        out.sort(key=lambda c: c.index)
        info: dict[str, Any] = {
            "log_ml": None if self.shaper.replaces_weights else float(state.log_ml),
            "ess": [i.ess for i in infos],
            "resampled": [i.step for i in infos if i.resampled],
            "ancestors": [list(i.ancestors) for i in infos],
            "particle_steps": particle_steps,
            "steps": len(infos),
            "degenerate": degenerate,
            "final_indices": state.cand.tolist(),
            "final_log_weights": state.log_weights.tolist(),
        }
        if replayed[0]:  # particle-steps an interrupted attempt generated, replayed from its journal
            info["replayed_tokens"] = replayed[1]
        result = SampleResult(
            problem=problem,
            candidates=tuple(out),
            generated_tokens=tokens,
            prompt_tokens=prompt_tokens,
            iid=False,
            resumed=replayed[0],
            steps=tuple(infos),
            info=info,
        )
        if self.answer_fn is not None:
            info["answer"] = select_answer(
                result, self.select, self.answer_fn, seed=problem_seed(params.seed, problem.id)
            )
        return result

    def _resumed(self, problem: Problem, run: StepRun) -> SampleResult:
        cands, tokens = run.stored(problem.id)
        kept = [c for c in cands if c.fate is Fate.KEPT]
        lw = [c.log_weight if c.log_weight is not None else -math.inf for c in kept]
        log_ml = None
        if not self.shaper.replaces_weights and kept:
            log_ml = float(logsumexp(lw)) - math.log(run.budget)
        return SampleResult(
            problem=problem,
            candidates=tuple(cands),
            generated_tokens=tokens,
            iid=False,
            resumed=len(cands),
            info={"log_ml": log_ml, "particle_steps": len(cands), "resumed": True},
        )


class _ProblemBar:
    """A rich progress bar over problems (particle-steps, tokens, mean ESS), or nothing."""

    def __init__(self, enabled: bool, *, total: int, done: int) -> None:
        self._p: Any = None
        self.steps = self.tokens = 0
        if not enabled or total == done:
            return
        self._p = rich_progress(
            "smc", "problems", "{task.fields[steps]} particle-steps, {task.fields[tokens]} tokens"
        )
        self._task = self._p.add_task("smc", total=total, completed=done, steps="0", tokens="0")

    def __enter__(self) -> _ProblemBar:
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()

    def advance(self, result: SampleResult) -> None:
        self.steps += int(result.info.get("particle_steps", 0))
        self.tokens += result.generated_tokens
        if self._p is not None:
            self._p.update(
                self._task, advance=1, steps=f"{self.steps:,}", tokens=f"{self.tokens:,}"
            )


def select_answer(
    result: SampleResult,
    rule: str,
    answer_fn: Callable[[str], str | None],
    *,
    seed: SeedLike = 0,
) -> str | None:
    """The final answer of a weighted population.

    ``argmax``: the answer of the kept particle with the largest log-weight (first in index
    order on ties); ``sample``: of a particle drawn from the normalised weights (seeded);
    ``vote``: the answer with the largest total normalised weight
    (:func:`ttscale.select.aggregate.weighted_vote`, ties to the answer seen first). Particles
    without an answer do not vote; all weights ``-inf`` gives ``None``.
    """
    check_choice("rule", rule, SELECTIONS)
    from ttscale.select.aggregate import best_of_n, weighted_vote

    kept = result.kept
    if not kept:
        return None
    lw = np.array([-math.inf if c.log_weight is None else c.log_weight for c in kept])
    if float(logsumexp(lw)) == -math.inf:
        return None
    answers = [answer_fn(c.text) for c in kept]
    if rule == "sample":
        w = log_normalize(lw).weights
        k = int(as_generator(seed).choice(len(kept), p=w))
        return answers[k]
    if rule == "argmax":
        return best_of_n(answers, lw, tie="first").answer  # type: ignore[return-value]
    w = log_normalize(lw).weights
    return weighted_vote(answers, w, tie="first").answer  # type: ignore[return-value]


def lineage_figure(result: SampleResult) -> Any:
    """A two-panel matplotlib ``Figure`` of one problem's SMC run.

    Top: the ESS before resampling at each step (filled markers where the step resampled; the
    ``N`` line for reference). Bottom: the particle lineage, one row per particle slot, one
    column per step; a segment joins each particle-step to its parent; colours give the fate
    (kept = the final population, extended = an ancestor, resampled = a dropped line).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cands = result.candidates
    if not cands:
        raise ConfigError(f"no particles to plot for problem {result.problem_id!r}")
    n = len(result.info.get("final_indices") or ()) or max(sum(1 for c in cands if c.step == 0), 1)
    by = {c.index: c for c in cands}
    colours = {Fate.KEPT: "tab:green", Fate.EXTENDED: "0.55", Fate.RESAMPLED: "tab:red"}
    fig, (ax_ess, ax_lin) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2]}
    )
    ess = [s.ess for s in result.steps]
    if ess:
        steps = [s.step for s in result.steps]
        ax_ess.plot(steps, ess, color="tab:blue", lw=1.2)
        res = [(s.step, s.ess) for s in result.steps if s.resampled]
        ax_ess.scatter(
            [s for s, _ in res], [e for _, e in res], color="tab:blue", zorder=3, label="resampled"
        )
        ax_ess.axhline(n, color="0.7", lw=0.8, ls="--")
        if res:
            ax_ess.legend(loc="lower left", fontsize=8)
    else:
        ax_ess.text(0.5, 0.5, "no per-step diagnostics (resumed run)", ha="center", va="center",
                    transform=ax_ess.transAxes)  # fmt: skip
    ax_ess.set_ylabel("ESS")
    ax_ess.set_ylim(0, n * 1.05)
    for c in cands:
        slot = c.index - c.step * n
        if c.parent is not None and c.parent in by:
            p = by[c.parent]
            ax_lin.plot(
                [p.step, c.step], [p.index - p.step * n, slot], color=colours[c.fate], lw=0.8,
                alpha=0.8,
            )  # fmt: skip
        ax_lin.scatter([c.step], [slot], s=14, color=colours[c.fate], zorder=3)
    for fate, col in colours.items():
        ax_lin.scatter([], [], s=14, color=col, label=fate.value)
    ax_lin.legend(loc="best", fontsize=8)
    ax_lin.set_xlabel("step")
    ax_lin.set_ylabel("particle slot")
    log_ml = result.info.get("log_ml")
    title = f"{result.problem_id}: {n} particles"
    if isinstance(log_ml, float):
        title += f", log Z estimate {log_ml:.3f}"
    ax_ess.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_lineage(result: SampleResult, path: str | Any) -> Any:
    """Save :func:`lineage_figure` of ``result`` to ``path`` (PNG, SVG, ... by suffix)."""
    import matplotlib.pyplot as plt

    fig = lineage_figure(result)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
