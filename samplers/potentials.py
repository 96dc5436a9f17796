"""Potentials for step-wise samplers, and the registry behind ``ttscale smc --potential SPEC``.

A potential is any object with ``score(problem, texts, finished) -> log-potentials`` (one float64
per text, natural log, ``-inf`` allowed), or a plain callable with that signature. Specs::

    arith-prm[:AGG]   ArithProcessReward: exact per-line process reward of the bundled arith
                      benchmark (AGG = prod (default), min, last, mean; see verifiers/arith_prm.py)

Factories are imported lazily, so listing the specs loads no model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ttscale.errors import ConfigError
from ttscale.types import Problem

__all__ = [
    "POTENTIAL_SPECS",
    "Potential",
    "check_potential_spec",
    "make_potential",
    "score_potential",
]


@runtime_checkable
class Potential(Protocol):
    """Scores partial texts of one problem: one log-potential per text (float64)."""

    def score(
        self, problem: Problem, texts: Sequence[str], finished: Sequence[bool]
    ) -> Sequence[float] | np.ndarray: ...


#: spec head -> ("module:factory", what its argument is)
POTENTIAL_SPECS: Mapping[str, tuple[str, str]] = {
    "arith-prm": ("ttscale.verifiers.arith_prm:ArithProcessReward", "aggregation"),
}

POTENTIAL_HELP = "arith-prm, arith-prm:AGG (AGG = prod, min, last, mean)"


def check_potential_spec(spec: str) -> tuple[str, str]:
    """``(head, arg)`` of a valid spec; :class:`ConfigError` naming the accepted forms otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"potential spec must be a non-empty string ({POTENTIAL_HELP})")
    head, _, arg = spec.strip().partition(":")
    head, arg = head.strip().lower(), arg.strip()
    if head not in POTENTIAL_SPECS:
        raise ConfigError(f"unknown potential {spec!r}; choose one of: {POTENTIAL_HELP}")
    if head == "arith-prm" and arg:
        from ttscale.validation import check_choice
        from ttscale.verifiers.arith_prm import ARITH_PRM_AGGREGATIONS

        check_choice("arith-prm aggregation", arg, ARITH_PRM_AGGREGATIONS)
    return head, arg


def make_potential(spec: str, **kw: Any) -> Any:
    """Build the potential named by ``spec`` (``kw`` go to its constructor)."""
    head, arg = check_potential_spec(spec)
    path, arg_name = POTENTIAL_SPECS[head]
    mod_name, _, attr = path.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(mod_name), attr)
    opts = dict(kw)
    if arg:
        opts[arg_name] = arg
    return factory(**opts)


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
