"""Renamed keyword arguments: accept the old name for a while, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

from ttscale.errors import ConfigError

__all__ = ["UNSET", "renamed_keyword", "warn_deprecated"]

T = TypeVar("T")

#: Default of a deprecated keyword whose ``None`` is a meaningful value (e.g. "no limit").
UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "UNSET"})()


def warn_deprecated(message: str, *, stacklevel: int = 2) -> None:
    """A ``DeprecationWarning`` attributed ``stacklevel`` frames above the caller (1: the caller)."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def renamed_keyword(
    func: str,
    old: str,
    new: str,
    old_value: Any,
    new_value: T,
    default: T,
    *,
    stacklevel: int = 2,
    unset: Any = None,
) -> T:
    """The value of keyword ``new``, or of its deprecated former name ``old``.

    ``old_value`` is ``unset`` (``None``, or :data:`UNSET` where ``None`` means something) when
    the old keyword was not given. Giving it warns (attributed to the
    caller of ``func`` by default); giving both names with different values is a
    :class:`ConfigError`.
    """
    if old_value is unset:
        return new_value
    if new_value != default and new_value != old_value:
        raise ConfigError(f"{func}: give {new}= only ({old}= is its deprecated former name)")
    warn_deprecated(f"{func}: {old}= is deprecated; use {new}=", stacklevel=stacklevel + 1)
    return old_value  # type: ignore[no-any-return]
