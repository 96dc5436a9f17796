"""Potentials for step-wise samplers, and the registry behind ``ttscale smc --potential SPEC``.

A potential is any object with ``score(problem, texts, finished) -> log-potentials`` (one float64
per text, natural log, ``-inf`` allowed), or a plain callable with that signature. Specs::

    arith-prm[:AGG]   ArithProcessReward: exact per-line process reward of the bundled arith
                      benchmark (AGG = prod (default), min, last, mean; see verifiers/arith_prm.py)

Factories are imported lazily, so listing the specs loads no model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ttscale.errors import ConfigError
from ttscale.types import Problem

__all__ = [
    "POTENTIAL_SPECS",
    "Potential",
    "make_potential",
    "register_potential",
    "score_potential",
]


@runtime_checkable
class Potential(Protocol):
    """Scores partial texts of one problem: one log-potential per text (float64)."""

    def score(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool]
    ) -> Sequence[float] | np.ndarray: ...


#: ``head -> factory(arg, **options) -> potential`` (``--potential HEAD[:ARG]``)
POTENTIAL_SPECS: dict[str, Callable[..., Any]] = {}

POTENTIAL_HELP = "arith-prm, arith-prm:AGG (AGG = prod, min, last, mean)"


def register_potential(head: str, factory: Callable[..., Any]) -> None:
    """Make ``--potential HEAD[:ARG]`` build ``factory(ARG, **options)``."""
    if not head or ":" in head:
        raise ConfigError(f"a potential spec head is a non-empty name without ':', got {head!r}")
    POTENTIAL_SPECS[head.lower()] = factory


def _arith_prm(arg: str, **options: Any) -> Any:
    from ttscale.verifiers.arith_prm import arith_prm_potential

    return arith_prm_potential(arg, **options)


register_potential("arith-prm", _arith_prm)


def make_potential(spec: str, **options: Any) -> Any:
    """Build the potential named by ``spec`` (``options`` go to its factory)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"potential spec must be a non-empty string ({POTENTIAL_HELP})")
    head, _, arg = spec.strip().partition(":")
    head = head.strip().lower()
    if head not in POTENTIAL_SPECS:
        raise ConfigError(f"unknown potential {spec!r}; choose one of: {POTENTIAL_HELP}")
    return POTENTIAL_SPECS[head](arg.strip(), **options)


def score_potential(
    potential: Any, problem: Problem, texts: Sequence[str], finished: Sequence[bool]
) -> np.ndarray:
    """``potential.score(...)`` (or ``potential(...)``) as a float64 array, NaN -> ``-inf``.

    Raises :class:`ConfigError` when it does not return one value per text.
    """
    fn = getattr(potential, "score", None)
    if not callable(fn):
        if not callable(potential):
            raise ConfigError(
                f"a potential has score(problem, texts, finished) or is callable, got "
                f"{type(potential).__name__}"
            )
        fn = potential
    out = np.asarray(fn(problem, list(texts), list(finished)), dtype=np.float64).reshape(-1)
    if out.shape != (len(texts),):
        raise ConfigError(f"a potential returned {out.size} values for {len(texts)} texts")
    return np.where(np.isnan(out), -np.inf, out)
