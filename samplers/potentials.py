"""Potentials for SMC over partial generations, Feynman-Kac shaping and particle-filter weights.

A **potential** scores a batch of partial generations of one problem::

    potential.score(problem, texts, finished) -> one log-potential per text (natural log)

``texts[i]`` is particle ``i``'s generated text so far (prompt excluded), ``finished[i]`` whether
it is complete (EOS or the length limit). A plain callable with that signature is a potential
too (:func:`as_potential`). ``-inf`` means "impossible" (the particle gets weight 0); NaN is
turned into ``-inf`` at this boundary; ``+inf`` is an error.

What a value *means* depends on the sampler's ``shaping`` (:data:`SHAPINGS`):

* ``"none"``: the value is ``log G_t(s_{1:t})``, the cumulative log-potential of the prefix; the
  intermediate target is ``γ_t = p·G_t`` and the final target ``p(y)·G(y)`` (twisted-SMC form,
  docs/algorithms.md 6.1/6.6);
* ``"immediate"``, ``"difference"``, ``"max"``, ``"sum"``: the value is a reward ``r_t`` turned
  into potentials by Feynman-Kac steering with strength ``λ`` (:func:`fk_increments`, 6.4);
* ``"pf"``: the value is a probability ``r_t`` in ``[0, 1]`` (a PRM's P(correct)) and the
  particle's weight is *replaced* by ``logit(r_t)/τ`` at each step (Puri et al., 6.3).

Built in: :class:`VerifierPotential` (any verifier or reward model on the prefix: PRM step
scores, a judge's P(yes), an ORM on the partial text), :class:`LikelihoodTempering`
(``target = p(y)^β``) and :class:`SumPotential`. :data:`POTENTIAL_SPECS` maps CLI spec heads
(``rm:PATH``, ``judge:MODEL``, ``arith-prm[:AGG]``, ...) to factories; other modules may register more
(:func:`register_potential`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.validation import check_choice, check_number

__all__ = [
    "POTENTIAL_SPECS",
    "SHAPINGS",
    "LikelihoodTempering",
    "Potential",
    "SumPotential",
    "VerifierPotential",
    "as_potential",
    "clean_log_potentials",
    "fk_increments",
    "make_potential",
    "pf_log_weights",
    "register_potential",
]

#: how a potential's values become weights (see the module docstring)
SHAPINGS = ("none", "immediate", "difference", "max", "sum", "pf")


@runtime_checkable
class Potential(Protocol):
    """``score(problem, texts, finished)`` -> one log-potential (or reward) per text."""

    def score(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool]
    ) -> Sequence[float] | NDArray[np.float64]: ...


class _CallablePotential:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "potential")

    def score(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool]
    ) -> Sequence[float] | NDArray[np.float64]:
        return self.fn(problem, texts, finished)  # type: ignore[no-any-return]


def as_potential(obj: Any) -> Any:
    """``obj`` if it has ``score``, a wrapper if it is a callable with that signature."""
    if obj is None:
        raise ConfigError("a potential is required (an object with score(), or a callable)")
    if callable(getattr(obj, "score", None)):
        return obj
    if callable(obj):
        return _CallablePotential(obj)
    raise ConfigError(
        f"a potential must have score(problem, texts, finished) or be such a callable, "
        f"got {type(obj).__name__}"
    )


def clean_log_potentials(
    values: ArrayLike, n: int, *, who: str = "potential"
) -> NDArray[np.float64]:
    """Float64 array of ``n`` values; NaN -> ``-inf``; ``+inf`` or a wrong length is an error."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ConfigError(f"{who} returned {arr.size} values for {n} particles")
    if np.any(np.isposinf(arr)):
        raise ConfigError(f"{who} returned +inf; a log-potential must be finite or -inf")
    return np.where(np.isnan(arr), -np.inf, arr)


def evaluate(
    potential: Any,
    problem: Problem,
    texts: Sequence[str],
    finished: Sequence[bool],
    target_logprob: NDArray[np.float64],
) -> NDArray[np.float64]:
    """One batched evaluation; potentials with ``uses_logprobs`` also get the particles'
    cumulative raw (target) log-probabilities ``log p(s_{1:t})``."""
    if getattr(potential, "uses_logprobs", False):
        out = potential.score(problem, texts, finished, target_logprob=target_logprob)
    else:
        out = potential.score(problem, texts, finished)
    return clean_log_potentials(out, len(texts), who=type(potential).__name__)


class SumPotential:
    """``log G = Σ_k log G_k``: the product of several potentials (``-inf`` wins)."""

    def __init__(self, *potentials: Any) -> None:
        if not potentials:
            raise ConfigError("SumPotential needs at least one potential")
        self.potentials = [as_potential(p) for p in potentials]
        self.uses_logprobs = any(getattr(p, "uses_logprobs", False) for p in self.potentials)

    def score(
        self,
        problem: Problem,
        texts: Sequence[str],
        finished: Sequence[bool],
        target_logprob: NDArray[np.float64] | None = None,
    ) -> NDArray[np.float64]:
        lp = np.zeros(len(texts)) if target_logprob is None else target_logprob
        total = np.zeros(len(texts), dtype=np.float64)
        for p in self.potentials:
            total = total + evaluate(p, problem, texts, finished, lp)
        return total


class LikelihoodTempering:
    """``log G_t = (β − 1)·log p(s_{1:t})`` so that the target ``p·G`` is ``p(y)^β``.

    ``log p`` is the raw (untempered) log-probability of the prefix the sampler tracks from the
    engine's target log-probs (the proposal correction is separate: the sampler always weights
    by ``log p − log q``). ``β = 1`` is the identity, ``β → ∞`` favours likely continuations
    (power sampling), ``β < 1`` flattens. Use with ``shaping="none"``.
    """

    uses_logprobs = True

    def __init__(self, beta: float) -> None:
        check_number("beta", beta, low=0.0)
        self.beta = float(beta)

    def score(
        self,
        problem: Problem,
        texts: Sequence[str],
        finished: Sequence[bool],
        target_logprob: NDArray[np.float64] | None = None,
    ) -> NDArray[np.float64]:
        if target_logprob is None:
            raise ConfigError("LikelihoodTempering needs the particles' target log-probabilities")
        return (self.beta - 1.0) * np.asarray(target_logprob, dtype=np.float64)


class VerifierPotential:
    """Any verifier or reward model on the partial text (ttscale's verifier protocol).

    Each prefix becomes a :class:`~ttscale.types.Sample` and is verified in one batched
    ``verify(problem, samples)`` call. ``value`` says which number of the verdict is used:

    * ``"log_prob"`` (default): ``log P(good)`` from the verdict's ``meta["prob"]`` (reward models:
      the PRM step aggregate or the ORM's sigmoid), else ``meta["p_yes"]`` (a judge), else the
      ``score`` when it lies in ``[0, 1]``, else ``correct`` (1/0 → 0/``-inf``);
    * ``"prob"``: that probability itself (for ``shaping="pf"`` or an FK reward in ``[0, 1]``);
    * ``"logit"``: ``meta["logit"]`` (the log-odds), else ``score``;
    * ``"score"``: the verdict's ``score`` as is.

    A verdict that cannot be scored (status ``invalid``/error, no number) gives ``missing``
    (default ``0.0`` in the chosen unit, e.g. an empty first step is neutral; ``-inf`` kills the
    particle).
    """

    _VALUES = ("log_prob", "prob", "logit", "score")

    def __init__(self, verifier: Any, *, value: str = "log_prob", missing: float = 0.0) -> None:
        if not callable(getattr(verifier, "verify", None)):
            raise ConfigError(
                f"VerifierPotential needs a verifier (with verify()), got {type(verifier).__name__}"
            )
        check_choice("value", value, self._VALUES)
        self.verifier = verifier
        self.value = value
        self.missing = float(missing)
        self.name = f"verifier:{getattr(verifier, 'name', type(verifier).__name__)}"

    def _prob(self, v: Any) -> float | None:
        meta = v.meta or {}
        for key in ("prob", "p_yes"):
            if meta.get(key) is not None:
                return float(meta[key])
        if v.score is not None and 0.0 <= v.score <= 1.0:
            return float(v.score)
        if v.correct is not None:
            return 1.0 if v.correct else 0.0
        return None

    def _one(self, v: Any) -> float:
        if v.status in (VerdictStatus.INVALID, VerdictStatus.ERROR):
            return self.missing
        if self.value == "score":
            return self.missing if v.score is None else float(v.score)
        if self.value == "logit":
            meta = v.meta or {}
            if meta.get("logit") is not None:
                return float(meta["logit"])
            return self.missing if v.score is None else float(v.score)
        p = self._prob(v)
        if p is None:
            return self.missing
        if self.value == "prob":
            return p
        return math.log(p) if p > 0 else -math.inf

    def score(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool]
    ) -> NDArray[np.float64]:
        samples = [Sample(problem_id=problem.id, index=i, text=t) for i, t in enumerate(texts)]
        verdicts = self.verifier.verify(problem, samples)
        if len(verdicts) != len(samples):
            raise ConfigError(
                f"verifier {self.name} returned {len(verdicts)} verdicts for {len(samples)} prefixes"
            )
        return np.array([self._one(v) for v in verdicts], dtype=np.float64)

    def close(self) -> None:
        from ttscale.verifiers.base import close_verifier

        close_verifier(self.verifier)


# ---- Feynman-Kac shaping (docs/algorithms.md 6.4) -------------------------------------------------


def fk_increments(
    shaping: str,
    lam: float,
    r: ArrayLike,
    r_prev: ArrayLike,
    log_pi: ArrayLike,
    final: ArrayLike,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """One FK-steering step for the particles just extended: ``(log w, r̃)``.

    ``r``: rewards ``r_t`` of the new prefixes; ``r_prev``: each particle's carried ``r̃_{t−1}``
    (``0`` before the first step, the reference's ``reward_min_value``); ``log_pi``: the sum of
    the particle's earlier FK log-increments (``log Π``); ``final``: whether the prefix is
    complete. Returns the *incremental* log-weights ``log w`` and the new carried ``r̃``:

    * ``difference``: ``log w = λ(r_t − r_prev)``, ``r̃ = r_t`` (telescopes to ``λ r_T``);
    * ``immediate``: ``log w = λ r_t``, ``r̃ = r_t``;
    * ``max``: ``r̃ = max(r_t, r_prev)``, ``log w = λ r̃``;
    * ``sum``: ``r̃ = r_t + r_prev``, ``log w = λ r̃``;
    * at the final step of a particle, ``immediate``/``max``/``sum`` give ``log w = λ r̃ − log Π``
      so that the path's cumulative FK weight is ``λ r̃_T``: the target is
      ``p(y)·exp(λ r(y))`` for ``immediate`` (and ``difference``), ``p(y)·exp(λ max_t r_t)``
      for ``max`` (with ``r_0 = 0`` in the max) and ``p(y)·exp(λ Σ_t r_t)`` for ``sum``.

    ``-inf`` rewards give ``-inf`` weights (never NaN: ``-inf − (-inf)`` is taken as ``-inf``).
    """
    check_choice("shaping", shaping, ("immediate", "difference", "max", "sum"))
    rr = np.asarray(r, dtype=np.float64)
    rp = np.asarray(r_prev, dtype=np.float64)
    lpi = np.asarray(log_pi, dtype=np.float64)
    fin = np.asarray(final, dtype=bool)
    with np.errstate(invalid="ignore"):
        if shaping == "difference":
            logw = lam * (rr - rp)
            tilde = rr
        else:
            if shaping == "immediate":
                tilde = rr
            elif shaping == "max":
                tilde = np.maximum(rr, rp)
            else:
                tilde = rr + rp
            logw = lam * tilde
            # a particle whose FK weight is already 0 (log Π = -inf) stays at 0
            logw = np.where(fin, np.where(np.isneginf(lpi), -np.inf, logw - lpi), logw)
    logw = np.where(np.isnan(logw), -np.inf, logw)
    return logw.astype(np.float64), np.asarray(tilde, dtype=np.float64)


def pf_log_weights(
    r: ArrayLike, *, temperature: float = 1.0, eps: float = float(np.finfo(float).eps)
) -> NDArray[np.float64]:
    """Puri et al.'s particle-filter weights (docs/algorithms.md 6.3): ``logit(clip(r, eps, 1−eps))/τ``.

    Not accumulated: a particle's log-weight is *replaced* by this value each time it is scored
    (finished particles keep their last). ``eps`` defaults to numpy's float eps (the original
    repo; its_hub uses ``1e-7``).
    """
    check_number("temperature", temperature, low=0.0, low_open=True)
    rr = np.asarray(r, dtype=np.float64)
    if np.any(np.isnan(rr)) or np.any((rr < 0) | (rr > 1)):
        raise ConfigError("pf weighting needs rewards in [0, 1] (probabilities, e.g. a PRM's)")
    q = np.clip(rr, eps, 1.0 - eps)
    return (np.log(q) - np.log1p(-q)) / float(temperature)


# ---- spec registry (CLI ``--potential``) ---------------------------------------------------------

#: ``head -> factory(arg, **options) -> potential``; ``options`` carry CLI context
#: (``engine_kind``, ``engine_options``, ``value``). Other modules add entries with
#: :func:`register_potential` (e.g. ``arith-prm``).
POTENTIAL_SPECS: dict[str, Callable[..., Any]] = {}


def register_potential(head: str, factory: Callable[..., Any]) -> None:
    """Make ``--potential HEAD[:ARG]`` build ``factory(ARG, **options)``."""
    if not head or ":" in head:
        raise ConfigError(f"a potential spec head is a non-empty name without ':', got {head!r}")
    POTENTIAL_SPECS[head.lower()] = factory


def _verifier_factory(head: str) -> Callable[..., Any]:
    def make(arg: str, *, value: str = "log_prob", **options: Any) -> VerifierPotential:
        from ttscale.verifiers.base import make_verifier

        spec = f"{head}:{arg}" if arg else head
        return VerifierPotential(make_verifier(spec, **options), value=value)

    return make


register_potential("rm", _verifier_factory("rm"))
register_potential("judge", _verifier_factory("judge"))


def _arith_prm(arg: str, **options: Any) -> Any:
    """``arith-prm[:AGG]``: the exact process reward of the bundled arith benchmark
    (:mod:`ttscale.verifiers.arith_prm`); ``value="prob"`` gives the reward in [0, 1] (FK, pf)."""
    from ttscale.verifiers.arith_prm import arith_prm_potential

    return arith_prm_potential(arg, **options)


register_potential("arith-prm", _arith_prm)


def make_potential(spec: str, **options: Any) -> Any:
    """Build a potential from ``HEAD[:ARG]`` (``rm:PATH``, ``judge:MODEL``, ``module:attr``
    names with ``py:``, and whatever :data:`POTENTIAL_SPECS` holds)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--potential needs a spec, e.g. rm:PATH or judge:MODEL")
    head, _, arg = spec.strip().partition(":")
    head = head.strip().lower()
    if head == "py":
        import importlib

        mod, _, attr = arg.partition(":")
        if not mod or not attr:
            raise ConfigError(f"potential 'py:' takes py:MODULE:NAME, got {spec!r}")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load potential {spec!r}: {e}") from None
        return as_potential(obj() if isinstance(obj, type) else obj)
    if head not in POTENTIAL_SPECS:
        known = ", ".join(sorted([*POTENTIAL_SPECS, "py"]))
        raise ConfigError(f"unknown potential {spec!r}; choose one of: {known}")
    if head in ("rm", "judge") and not arg.strip():
        raise ConfigError(
            f"potential {head!r} needs an argument: {head}:{'PATH' if head == 'rm' else 'MODEL'}"
        )
    return POTENTIAL_SPECS[head](arg.strip(), **options)
