"""A small process pool with a wall-clock timeout per task and kill-and-replace on timeout.

``concurrent.futures.ProcessPoolExecutor`` cannot stop one stuck task: ``Future.cancel`` does
nothing once a task runs, and killing its worker breaks the whole executor. Checkers that call
into SymPy need exactly that (an innocent-looking ``3^{3^{15}}`` keeps SymPy busy for seconds,
``2^{2^{40}}`` for ever), and math-verify's own ``signal.alarm`` timeouts only work on the main
thread of the main interpreter. So each worker here is one process talking over a pipe; the
parent keeps a deadline per running task, and a worker past its deadline is killed (SIGKILL to
its process group) and replaced. Workers are fresh interpreters (``python -c``, in their own
session), not forks: safe in a parent with threads, and unlike multiprocessing's ``spawn`` they
never re-import the parent's ``__main__``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from ttscale.errors import VerifierError
from ttscale.validation import check_int, check_number

__all__ = ["Outcome", "TimeoutPool"]

log = logging.getLogger(__name__)

_READY = "__ready__"


@dataclass(frozen=True)
class Outcome:
    """Result of one task: ``status`` is ``ok``, ``timeout``, ``error``, ``memory`` or ``crash``."""

    status: str
    value: Any = None
    detail: str = ""
    seconds: float = 0.0


def _resolve(path: str) -> Callable[..., Any]:
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def _worker_loop(
    conn: Connection, target: str, initializer: str | None, memory_mb: int | None
) -> None:
    """Worker loop: receive ``(task_id, args)``, reply ``(task_id, status, value, detail)``."""
    if memory_mb:
        try:
            import resource

            limit = int(memory_mb) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
            pass
    try:
        if initializer:
            _resolve(initializer)()
        fn = _resolve(target)
    except BaseException as e:  # report and die: the parent turns this into a VerifierError
        conn.send((None, "init_error", None, f"{type(e).__name__}: {e}"))
        return
    conn.send((None, _READY, os.getpid(), ""))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, args = msg
        try:
            value = fn(*args)
            reply = (task_id, "ok", value, "")
        except MemoryError:
            reply = (task_id, "memory", None, "out of memory")
        except Exception as e:
            reply = (task_id, "error", None, f"{type(e).__name__}: {e}"[:500])
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


def _child_main(argv: Sequence[str]) -> None:
    """Entry point of a worker process: ``argv = [fd_in, fd_out, target, initializer, mem_mb]``."""
    for p in json.loads(os.environ.get(_SYSPATH_ENV, "[]")):
        if p not in sys.path:
            sys.path.append(p)
    fd_in, fd_out, target, init, mem = argv
    conn = _DuplexPipe(int(fd_in), int(fd_out))
    _worker_loop(conn, target, init or None, int(mem) or None)  # type: ignore[arg-type]


class _DuplexPipe:
    """Two one-way pipe ``Connection`` objects used as one duplex connection."""

    def __init__(self, fd_read: int, fd_write: int) -> None:
        self.r = Connection(fd_read, writable=False)
        self.w = Connection(fd_write, readable=False)

    def send(self, obj: Any) -> None:
        self.w.send(obj)

    def recv(self) -> Any:
        return self.r.recv()

    def poll(self, timeout: float = 0.0) -> bool:
        return self.r.poll(timeout)

    def fileno(self) -> int:
        return self.r.fileno()

    def close(self) -> None:
        for c in (self.r, self.w):
            try:
                c.close()
            except OSError:
                pass


_SYSPATH_ENV = "TTSCALE_WORKER_SYSPATH"


class _Worker:
    """One checker process, started as ``python -c`` (no fork, no re-import of ``__main__``)."""

    def __init__(self, target: str, initializer: str | None, mem: int | None) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        env[_SYSPATH_ENV] = json.dumps([p for p in sys.path if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        code = "import sys; from ttscale.verifiers._procpool import _child_main; _child_main(sys.argv[1:])"
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    code,
                    str(p2c_r),
                    str(c2p_w),
                    target,
                    initializer or "",
                    str(mem or 0),
                ],
                pass_fds=(p2c_r, c2p_w),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self.conn = _DuplexPipe(c2p_r, p2c_w)
        self.ready = False
        self.spawned = time.monotonic()
        self.task: int | None = None
        self.deadline = float("inf")
        self.started = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exitcode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=2)
            self.conn.close()
        except subprocess.TimeoutExpired:
            self.kill()


class TimeoutPool:
    """``workers`` processes that run ``target(*args)`` with a per-task wall-clock ``timeout``.

    ``target`` and ``initializer`` are ``"module:function"`` paths (importable in the worker).
    The timeout clock of a task starts when it is sent to a ready worker (worker start-up and
    imports never count). ``memory_mb`` caps each worker's address space
    (``RLIMIT_AS``); exceeding it is an outcome ``memory``, not a crash of the caller.
    """

    def __init__(
        self,
        target: str,
        *,
        workers: int = 1,
        timeout: float = 5.0,
        initializer: str | None = None,
        memory_mb: int | None = 4096,
        startup_timeout: float = 120.0,
    ) -> None:
        check_int("workers", workers, min=1)
        check_number("timeout", timeout, low=0.0, low_open=True, unit="seconds")
        self.target = target
        self.initializer = initializer
        self.workers = workers
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.startup_timeout = float(startup_timeout)
        self.restarts = 0
        self._pool: list[_Worker] = []
        self._lock = threading.RLock()
        self._closed = False

    # lifecycle -------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        return _Worker(self.target, self.initializer, self.memory_mb)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            for w in self._pool:
                w.stop()
            self._pool = []
            self._closed = True

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            for w in self._pool:
                w.kill()
        except Exception:
            pass

    # running ---------------------------------------------------------------------------------

    def map(self, tasks: Sequence[tuple[Any, ...]]) -> list[Outcome]:
        """Run every task (a tuple of arguments); outcomes in input order."""
        if not tasks:
            return []
        with self._lock:
            if self._closed:
                raise VerifierError("the checker pool is closed; create a new verifier")
            return self._run(list(tasks))

    def _run(self, tasks: list[tuple[Any, ...]]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(tasks)
        pending: deque[int] = deque(range(len(tasks)))
        while len(self._pool) < min(self.workers, len(tasks)):
            self._pool.append(self._spawn())
        remaining = len(tasks)
        while remaining:
            now = time.monotonic()
            for w in self._pool:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    try:
                        w.conn.send((i, tasks[i]))
                    except (OSError, ValueError) as e:
                        results[i] = Outcome("crash", detail=f"worker pipe broken: {e}")
                        remaining -= 1
                        self._replace(w)
                        continue
                    w.task, w.started, w.deadline = i, now, now + self.timeout
            if not remaining:
                break
            busy_deadline = min(
                (w.deadline for w in self._pool if w.task is not None), default=float("inf")
            )
            for w in self._pool:
                if not w.ready:
                    busy_deadline = min(busy_deadline, w.spawned + self.startup_timeout)
            wait_s = max(0.0, busy_deadline - time.monotonic())
            ready = wait([w.conn.r for w in self._pool], timeout=min(wait_s, 3600.0))
            by_conn = {id(w.conn.r): w for w in self._pool}
            for obj in ready:
                w = by_conn[id(obj)]
                got = self._receive(w, results)
                if got is not None:
                    remaining -= got
            now = time.monotonic()
            for w in list(self._pool):
                if w.task is not None and now >= w.deadline:
                    i = w.task
                    results[i] = Outcome(
                        "timeout",
                        detail=f"no result within {self.timeout:g} s",
                        seconds=now - w.started,
                    )
                    remaining -= 1
                    log.debug("checker task %d timed out; replacing worker pid %s", i, w.pid)
                    self._replace(w)
            if any(not w.ready and now >= w.spawned + self.startup_timeout for w in self._pool):
                self.close()
                raise VerifierError(
                    f"checker workers did not start within {self.startup_timeout:g} s; "
                    "is the machine overloaded?"
                )
        return [r if r is not None else Outcome("crash") for r in results]

    def _receive(self, w: _Worker, results: list[Outcome | None]) -> int | None:
        """Handle a readable worker; returns the number of tasks finished (0 or 1)."""
        try:
            if not w.conn.poll():
                raise EOFError
            task_id, status, value, detail = w.conn.recv()
        except (EOFError, OSError):
            # the worker died: a hard crash (segfault, OOM kill) or an init failure
            try:
                code = w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            if not w.ready:
                self._pool.remove(w)
                w.kill()
                self.close()
                raise VerifierError(f"checker worker failed to start (exit code {code})") from None
            done = 0
            if w.task is not None:
                results[w.task] = Outcome(
                    "crash",
                    detail=f"worker died (exit code {code})",
                    seconds=time.monotonic() - w.started,
                )
                done = 1
            self._replace(w)
            return done
        if status == _READY:
            w.ready = True
            return 0
        if status == "init_error":
            self._pool.remove(w)
            w.kill()
            self.close()
            raise VerifierError(f"checker worker failed to start: {detail}")
        if task_id != w.task:  # a stale reply; cannot happen with one task per worker
            return 0
        results[task_id] = Outcome(status, value, detail, time.monotonic() - w.started)
        w.task, w.deadline = None, float("inf")
        return 1

    def _replace(self, w: _Worker) -> None:
        w.kill()
        idx = self._pool.index(w)
        self._pool[idx] = self._spawn()
        self.restarts += 1
