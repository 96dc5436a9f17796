"""Advisory per-problem claims, so workers sharing one run directory do not duplicate work.

Design. The sample store is the only source of truth: samples are keyed by ``(problem_id,
index)`` and their seeds derive from that key, so two workers that generate the same sample
produce the same content, which the store collapses on read. Correctness therefore never depends
on claims; claims only keep workers from *spending* compute on the same problem.

A claim is a POSIX record lock (``fcntl.lockf``) on one byte of ``RUN/claims.lock`` at an offset
derived from a hash of the problem id. Why locks rather than claim files:

* **no stale claims**: the kernel (or the NFS lock manager) drops a process's locks when it exits
  or is killed, even with SIGKILL; there is no heartbeat, lease timeout or PID check to get wrong,
  and a crashed worker's problems are claimable at once;
* **one file descriptor** for any number of claims, and no directory of small files to scan;
* **atomic test-and-claim** in one non-blocking call, on one machine and, where the filesystem
  supports POSIX locks (local disks, NFSv4, Lustre and GPFS with locking on), across machines.

A worker claims a problem before it re-reads the store and plans that problem's missing samples,
and releases the claim only once everything it generated for the problem is durable in a shard;
a second worker that finds the problem claimed moves on to others and comes back to it later (by
then it is either complete or, if its owner died, claimable again). POSIX locks do not exclude
threads of one process and are all dropped when *any* descriptor of the file is closed, so this
module keeps one descriptor per run directory per process and an in-process table of owners.
Where locking is unsupported (``ENOLCK``), claims degrade to always-granted with one warning:
workers may then duplicate work (never corrupt the run); ``--shard i/N`` needs no locks at all.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

__all__ = ["ProblemClaims"]

log = logging.getLogger(__name__)

CLAIMS_FILE = "claims.lock"


class _Shared:
    """One descriptor of ``claims.lock`` per run directory per process, and who holds what."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.users = 0
        self.owners: dict[str, int] = {}  # problem id -> id() of the ProblemClaims holding it
        self.supported = True


_SHARED: dict[str, _Shared] = {}
_GUARD = threading.Lock()


def _offset(problem_id: str) -> int:
    # 62 bits: well inside off_t, so the lock range is valid on every 64-bit platform
    h = hashlib.blake2b(problem_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


class ProblemClaims:
    """Claims on the problems of run directory ``run`` held by this worker (see module doc)."""

    def __init__(self, run: str | os.PathLike[str]) -> None:
        path = Path(run) / CLAIMS_FILE
        self._key = str(path.resolve())
        with _GUARD:
            shared = _SHARED.get(self._key)
            if shared is None:
                shared = _SHARED[self._key] = _Shared(path)
            shared.users += 1
        self._shared = shared
        self._held: set[str] = set()
        self._closed = False

    def try_claim(self, problem_id: str) -> bool:
        """Claim ``problem_id`` if no other worker (process or thread) holds it; never blocks."""
        s = self._shared
        with _GUARD:
            if problem_id in self._held:
                return True
            if problem_id in s.owners:
                return False
            if s.supported:
                try:
                    fcntl.lockf(s.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(problem_id))
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EAGAIN):
                        return False
                    s.supported = False
                    log.warning(
                        "cannot lock %s (%s): workers sharing this run directory may duplicate "
                        "work (never corrupt it); use --shard i/N to split work without locks",
                        self._key,
                        e,
                    )
            s.owners[problem_id] = id(self)
            self._held.add(problem_id)
            return True

    def release(self, problem_id: str) -> None:
        """Release a claim this worker holds (no-op otherwise)."""
        s = self._shared
        with _GUARD:
            if problem_id not in self._held:
                return
            self._held.discard(problem_id)
            s.owners.pop(problem_id, None)
            if s.supported:
                try:
                    fcntl.lockf(s.fd, fcntl.LOCK_UN, 1, _offset(problem_id))
                except OSError as e:  # the lock goes with the descriptor at the latest
                    log.debug("unlock of %s in %s failed: %s", problem_id, self._key, e)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def close(self) -> None:
        """Release every claim; the shared descriptor closes with its last user."""
        if self._closed:
            return
        for pid in list(self._held):
            self.release(pid)
        self._closed = True
        with _GUARD:
            self._shared.users -= 1
            if self._shared.users == 0:
                _SHARED.pop(self._key, None)
                os.close(self._shared.fd)

    def __enter__(self) -> ProblemClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
