"""Parameter validation: one place, one message format.

Every check raises :class:`~ttscale.errors.ConfigError` with one line
``"<name> must be <constraint>, got <value>"``, for example::

    n must be an integer >= 1, got 0
    batch_size must be an integer in [1, 64], got 65
    top_p must be in (0, 1], got 2
    timeout must be > 0 seconds, got -1
    tie must be one of expected, first, random, got 'best'

Choices are declared once, as a ``Literal`` type; :func:`choices` derives the tuple of its
strings, so a type and its runtime check cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, get_args

from ttscale.errors import ConfigError

# no numpy import: ttscale.types uses this module and `import ttscale` must stay light

__all__ = ["check_choice", "check_int", "check_number", "choices", "describe"]


def describe(value: Any) -> str:
    """A value as messages show it: numbers plainly (``2``, ``0.5``, ``inf``), the rest by repr."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # numpy scalars print as plain numbers too (their repr is np.float64(2.0))
        return str(value.item() if hasattr(value, "item") else value)
    return repr(value)


def choices(literal: Any) -> tuple[str, ...]:
    """The strings of a ``Literal[...]`` type, in declaration order."""
    values = get_args(literal)
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"expected a Literal of strings, got {literal!r}")
    return values


def check_choice(name: str, value: Any, options: Iterable[Any]) -> Any:
    """``value`` if it is one of ``options``; else ``"<name> must be one of a, b, got 'x'"``."""
    opts = tuple(options)
    try:
        ok = value in opts
    except TypeError:  # unhashable or incomparable: not one of the options
        ok = False
    if not ok:
        shown = ", ".join("None" if o is None else str(o) for o in opts)
        raise ConfigError(f"{name} must be one of {shown}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    # numpy integers are numbers.Integral; bools (Python's and numpy's) are not integers here
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(
    name: str,
    value: Any,
    *,
    min: int | None = None,
    max: int | None = None,
    allow_none: bool = False,
) -> Any:
    """``int(value)`` if it is an integer (not a bool) in ``[min, max]`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if _is_int(value) and (min is None or value >= min) and (max is None or value <= max):
        return int(value)
    if min is not None and max is not None:
        rng = f" in [{min}, {max}]"
    elif min is not None:
        rng = f" >= {min}"
    elif max is not None:
        rng = f" <= {max}"
    else:
        rng = ""
    tail = " or None" if allow_none else ""
    raise ConfigError(f"{name} must be an integer{rng}{tail}, got {describe(value)}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = False,
    unit: str = "",
    allow_none: bool = False,
) -> Any:
    """``float(value)`` if it is a real number (not a bool, not NaN) within the bounds.

    ``low_open``/``high_open`` exclude the bound; ``finite`` also rejects infinities; ``unit`` is
    named after the range (``"timeout must be > 0 seconds"``).
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = not math.isnan(v) and not (finite and math.isinf(v))
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if ok:
            return v
    if low is not None and high is not None:
        rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        rng = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rng = f"{'<' if high_open else '<='} {high:g}"
    else:
        rng = "a number"
    if finite and (low is None or high is None):
        rng = f"a finite number {rng}" if rng != "a number" else "a finite number"
    what = rng + (f" {unit}" if unit else "") + (" or None" if allow_none else "")
    raise ConfigError(f"{name} must be {what}, got {describe(value)}")
