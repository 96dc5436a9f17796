"""Filesystem prerequisites, checked before any expensive step (model load, sampling, curves).

A run that fails to write its output after minutes of model loading or curve computing wastes
the user's time; these checks fail first, with a one-line :class:`~ttscale.errors.ConfigError`
naming the path and the reason. They probe for real (create and remove a small file in the
nearest existing directory) rather than trusting ``os.access``, which is wrong for root, ACLs
and read-only mounts alike. Nothing is left behind: a directory that does not exist yet is not
created by the check.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ttscale.errors import ConfigError

__all__ = ["check_writable_dir", "check_writable_file"]


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe(directory: Path, path: Path, what: str) -> None:
    probe = directory / f".ttscale-write-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"{what} {path} is not writable ({directory}: {reason}); choose a writable location"
        ) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def check_writable_dir(path: str | os.PathLike[str], what: str = "output directory") -> None:
    """Raise :class:`ConfigError` unless directory ``path`` exists writable or can be created."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p} exists and is not a directory; choose another path")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise ConfigError(
            f"{what} {p} cannot be created: {base} is not a directory; choose another path"
        )
    _probe(base, p, what)


def check_writable_file(
    path: str | os.PathLike[str], what: str = "output file", *, parents: bool = True
) -> None:
    """Raise :class:`ConfigError` unless file ``path`` can be written (created or replaced).

    ``parents``: the writer creates missing parent folders (else they must exist).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give a file name")
    if not parents and not p.parent.is_dir():
        raise ConfigError(f"{what} {p}: folder {p.parent} does not exist; create it first")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise ConfigError(
            f"{what} {p} cannot be created: {base} is not a directory; choose another path"
        )
    _probe(base, p, what)
