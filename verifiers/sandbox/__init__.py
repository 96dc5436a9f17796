"""Run untrusted Python programs in fresh, isolated processes and report typed outcomes.

Linux only. Every program runs in its own fresh process of the interpreter running ttscale,
started without ``site`` (``-s -S -B -P``: the standard library only, no site-packages), with a
scrubbed environment (``PATH``, ``LANG``/``LC_ALL``, ``PYTHONHASHSEED=0``, ``PYTHONIOENCODING``,
``HOME``/``TMPDIR`` = its private working directory; nothing else from the caller's
environment), rlimits on CPU seconds, address space, processes, file size and open files, and a
wall-clock timeout after which it and every process it started are killed. Two isolation levels,
recorded as :attr:`Sandbox.isolation` (and in :meth:`Sandbox.info`, for the run manifest):

``"bubblewrap"`` (the default: ``isolation="auto"`` uses it when ``bwrap`` passes a self-test
here and otherwise refuses to run anything, see :func:`resolve_isolation`)
    Linux namespaces via bubblewrap: its own empty network namespace (no route anywhere, only
    its own loopback), its own PID, IPC, UTS and cgroup namespaces, a new session,
    ``--die-with-parent``. The file system is read-only ``/usr`` (+ ``/bin``, ``/lib*``
    symlinks), the interpreter's install prefix read-only, a minimal read-only ``/dev`` and a
    size-limited private tmpfs at ``/tmp`` (the only writable place); there is no ``/proc``, no ``/etc``, no home
    directory and no project checkout. When ttscale runs as root, the sandbox keeps only
    CAP_SETUID, CAP_SETGID and CAP_KILL and each program runs under its own random
    unprivileged uid with no capabilities: ``RLIMIT_NPROC`` applies to it, it cannot signal or
    trace the checker or another program, its files are private (umask 077, 0700 working
    directory), and after its run every process of its uid is killed and its files deleted.
    That is what lets up to ``batch_size`` programs share one sandbox (one bubblewrap start,
    one interpreter start and one import of the prompt's modules per batch), each still in a
    fresh process forked from a clean zygote. Without root, bubblewrap's user namespace maps the
    caller's uid only, so every program gets a sandbox of its own, and the checker makes
    itself non-dumpable (``prctl``) so that a program of the same uid cannot ptrace it. The
    first process of a sandbox is its checker; when it ends, the kernel kills everything left
    in the namespace.
``"process"`` (an explicit opt-in only: ``isolation="process"``, ``--isolation process`` on the
CLI or ``TTSCALE_SANDBOX=process``; logged once as a warning)
    A plain subprocess in a temp directory with the same rlimits and environment, plus a
    Python audit hook that refuses process creation (so also fork bombs and daemons), signals
    to other processes, sockets, ``ctypes``, ``/proc``, writes outside the temp directory and
    reads under ``$HOME`` and the current directory. Audit hooks are not a security boundary:
    native code, a module imported before the hook or an interpreter bug can bypass them; the
    host then also kills the process group and every process carrying the run's marker
    variable. Use it for trusted-ish model output only.

Neither level defends against kernel or bubblewrap vulnerabilities, side channels, or CPU and
memory pressure on the host beyond the rlimits (no cgroup limits: a program may keep one core
busy for ``timeout`` seconds and hold ``memory_mb`` of address space in each of up to
``nproc`` processes). bubblewrap does not hide the kernel's identity or the CPU model.

**Test integrity (threat model).** The program is adversarial: it may try to make a wrong
solution look correct. In the sandbox a trusted *checker* forks a *zygote* before it has read
the tests or the per-run random nonce, and the zygote forks each *program* process; the program
executes the candidate code and then answers the checker's requests (call this function, read
that attribute, iterate that object). Test code runs in the checker, so no program process ever
holds the tests, the expected values or the nonce. Values cross back only through a small codec
for plain builtin data; other objects stay behind as opaque handles that compare by identity.
The checker reports per program through a pipe no program holds, each frame tagged with the
nonce, and the host accepts only the exact ``S i``/``R i`` frame sequence. Consequences:
``sys.exit(0)``, ``os._exit(0)``, printing a success marker, patching builtins, modules or the
test helpers (``check``), returning an object whose ``__eq__`` is always true, killing the
checker and writing to any file descriptor all end as non-pass; exit codes never mean pass.
What remains possible is what any black-box test allows: hard-coding answers for inputs the
program can see (the prompt's examples) and behaving differently from call to call. Tests that
pass callables or test-defined objects to the program, or that inspect in-place mutation of
their arguments, are not supported (values are copied; such a case reports ``error``). In
stdio mode the expected output never enters the sandbox; the host compares.
"""

from __future__ import annotations

import ast
import concurrent.futures
import enum
import hmac
import logging
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError, SandboxError
from ttscale.validation import check_int, check_number

# CPython 3.11 keeps the AST constructor's recursion depth in per-interpreter state: two
# threads inside ``ast.parse`` at once (the GIL can switch during object construction) raise
# "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905). The
# verifiers parse frames and test cases from worker threads, so every parse goes through this.
_AST_LOCK = threading.Lock()


def parse_python(source: str, mode: str = "exec") -> ast.AST:
    """``ast.parse`` serialised across threads (see ``_AST_LOCK``)."""
    with _AST_LOCK:
        return ast.parse(source, mode=mode)


def literal_eval(source: str) -> Any:
    """``ast.literal_eval`` serialised across threads (see ``_AST_LOCK``)."""
    return ast.literal_eval(parse_python(source.lstrip(" \t"), mode="eval"))


__all__ = [
    "CaseResult",
    "ExecOutcome",
    "ExecResult",
    "Isolation",
    "Limits",
    "Program",
    "Sandbox",
    "bubblewrap_status",
    "detect_isolation",
    "normalize_output",
    "resolve_isolation",
    "run_many",
]

log = logging.getLogger(__name__)

_RUNNER = Path(__file__).with_name("_runner.py")


class Isolation(str, enum.Enum):
    """How strongly programs are isolated (recorded in the run manifest)."""

    BUBBLEWRAP = "bubblewrap"
    PROCESS = "process"


class ExecOutcome(str, enum.Enum):
    """Typed outcome of running one program against its tests."""

    PASS = "pass"
    FAIL = "fail"  # a failing assertion, an exception, a wrong output, an early exit
    TIMEOUT = "timeout"  # wall clock or CPU limit
    CRASH = "crash"  # killed by a signal
    MEMORY = "memory"  # MemoryError / address-space limit
    SYNTAX_ERROR = "syntax_error"
    ERROR = "error"  # the harness or the test code failed, not the candidate


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program run.

    ``timeout_s`` is wall-clock time from the moment the checker starts the program (interpreter
    start-up is not counted; ``startup_timeout_s`` bounds it separately). ``memory_mb`` is the
    address-space limit of the program process (RLIMIT_AS), ``nproc`` its process limit,
    ``fsize_mb`` the largest file it may write, ``tmpfs_mb`` the size of its private ``/tmp``
    (bubblewrap), ``output_bytes`` how much of stdout/stderr is kept (the rest is drained and
    dropped).
    """

    timeout_s: float = 3.0
    memory_mb: int = 1024
    nproc: int = 64
    fsize_mb: int = 16
    nofile: int = 256
    tmpfs_mb: int = 64
    output_bytes: int = 1 << 20
    startup_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "startup_timeout_s"):
            check_number(name, getattr(self, name), low=0.0, low_open=True, finite=True, unit="seconds")
        for name, lo in (
            ("memory_mb", 32),
            ("nproc", 1),
            ("fsize_mb", 1),
            ("nofile", 16),
            ("tmpfs_mb", 1),
            ("output_bytes", 1),
        ):
            check_int(name, getattr(self, name), min=lo)


@dataclass(frozen=True)
class Program:
    """One untrusted program and the trusted tests to run against it.

    ``mode="function"``: ``source`` is executed (as module ``solution``) in the program process;
    then ``prelude`` and ``setup`` run in the checker, and each entry of ``cases`` is one test
    case (a statement such as ``assert f(1) == 2`` or ``check(f)``) run in the checker. Names
    the tests use that ``source`` defines are bound to proxies of the program's objects; names
    the ``prelude`` defines win, except ``entry_points``, which always come from the program.
    ``mode="stdio"``: ``source`` runs as ``__main__`` with ``stdin`` on standard input; the run
    passes when it exits with status 0 and, if ``expected_stdout`` is given, its output matches
    after :func:`normalize_output`.
    """

    source: str
    mode: str = "function"
    cases: tuple[str, ...] = ()
    setup: str = ""
    prelude: str = ""
    entry_points: tuple[str, ...] = ()
    stdin: str = ""
    expected_stdout: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise ConfigError(f"Program.source must be a string, got {type(self.source).__name__}")
        if self.mode not in ("function", "stdio"):
            raise ConfigError(f"Program.mode must be 'function' or 'stdio', got {self.mode!r}")
        if isinstance(self.cases, str):
            object.__setattr__(self, "cases", (self.cases,))
        object.__setattr__(self, "cases", tuple(self.cases))
        if isinstance(self.entry_points, str):
            object.__setattr__(self, "entry_points", (self.entry_points,))
        object.__setattr__(self, "entry_points", tuple(self.entry_points))
        if self.mode == "function" and not self.cases:
            raise ConfigError("a function-mode Program needs at least one test case")
        for c in self.cases:
            if not isinstance(c, str) or not c.strip():
                raise ConfigError(f"test cases must be non-empty strings, got {c!r}")

    @classmethod
    def humaneval(cls, prompt: str, completion: str, test: str, entry_point: str) -> Program:
        """HumanEval: program ``prompt + completion``; the test defines ``check``, the case is
        ``check(entry_point)`` (the reference harness concatenates the same pieces)."""
        return cls(
            source=prompt + completion,
            cases=(f"check({entry_point})",),
            setup=test,
            prelude=prompt,
            entry_points=(entry_point,),
        )

    @classmethod
    def asserts(cls, source: str, tests: Sequence[str], setup: str = "") -> Program:
        """MBPP style: each assert statement in ``tests`` is one case."""
        return cls(source=source, cases=tuple(tests), setup=setup)

    @classmethod
    def stdio(cls, source: str, stdin: str = "", expected_stdout: str | None = None) -> Program:
        """CodeContests style: run with ``stdin``; compare stdout when ``expected_stdout`` is given."""
        return cls(source=source, mode="stdio", stdin=stdin, expected_stdout=expected_stdout)


@dataclass(frozen=True)
class CaseResult:
    """One test case of a function-mode program."""

    ok: bool
    outcome: ExecOutcome
    detail: str = ""


@dataclass(frozen=True)
class ExecResult:
    """What running one :class:`Program` produced."""

    outcome: ExecOutcome
    detail: str = ""
    cases: tuple[CaseResult, ...] = ()
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    exit_code: int | None = None
    signal: int | None = None
    seconds: float = 0.0
    isolation: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome is ExecOutcome.PASS

    @property
    def cases_passed(self) -> int:
        return sum(1 for c in self.cases if c.ok)


def normalize_output(text: str) -> str:
    """CodeContests-style comparison key: ``\\r\\n`` -> ``\\n``, trailing whitespace removed
    from every line, leading and trailing blank lines dropped."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the sandbox


# The bootstrap reads the runner's marshalled code object from the job pipe and runs it, so
# no sandbox run compiles the runner (marshal data is interpreter-specific: the sandbox runs
# the very interpreter that produced it).
_BOOT = (
    "import marshal,os,sys\n"
    "f=int(sys.argv[1])\n"
    "def r(n):\n"
    " b=b''\n"
    " while len(b)<n:\n"
    "  c=os.read(f,n-len(b))\n"
    "  if not c:raise SystemExit(3)\n"
    "  b+=c\n"
    " return b\n"
    "exec(marshal.loads(r(int.from_bytes(r(8),'big'))),{'__name__':'__main__'})\n"
)


@cache
def _runner_code() -> bytes:
    src = _RUNNER.read_text(encoding="utf-8")
    code = compile(src, "<ttscale-sandbox-runner>", "exec", dont_inherit=True)
    blob = marshal.dumps(code)
    return len(blob).to_bytes(8, "big") + blob


@cache
def _bwrap_supports_size(bwrap: str) -> bool:
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in (out.stdout + out.stderr)


def _interpreter() -> tuple[str, str]:
    """The real interpreter binary (a venv's python is a symlink) and its install prefix."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return python, prefix


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    out = []
    cur = "/"
    for p in parts:
        cur = os.path.join(cur, p)
        out.append(cur)
    return out


class Sandbox:
    """Runs :class:`Program`s, each in a fresh sandboxed process.

    ``isolation``: ``"auto"`` or ``"bubblewrap"`` (bubblewrap when it passes a self-test here,
    else raise :class:`~ttscale.errors.SandboxError`: the sandbox fails closed) or
    ``"process"`` (the weaker fallback, only when asked for; see :func:`resolve_isolation`).
    ``workers`` is the default parallelism of :meth:`run_many`.
    ``batch_size``: with bubblewrap as root, up to this many programs share one sandbox
    (namespaces, tmpfs, checker and zygote), each still in its own fresh process under its own
    uid with its leftovers killed and its files deleted before the next starts; otherwise every
    program gets its own sandbox.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        isolation: str = "auto",
        workers: int | None = None,
        batch_size: int = 16,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        if not isinstance(self.limits, Limits):
            raise ConfigError(f"limits must be a Limits, got {type(limits).__name__}")
        check_int("workers", workers, min=1, allow_none=True)
        check_int("batch_size", batch_size, min=1, max=64)
        self.workers = workers or _default_workers()
        self.batch_size = batch_size
        self._python, self._prefix = _interpreter()
        self._root = os.geteuid() == 0
        self.isolation = resolve_isolation(isolation)
        self._bwrap = _find_bwrap()[0] or "bwrap"

    @property
    def effective_batch_size(self) -> int:
        """Programs per sandbox: ``batch_size`` with bubblewrap as root (per-program uids), else 1."""
        if self.isolation is Isolation.BUBBLEWRAP and self._root:
            return self.batch_size
        return 1

    def info(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "isolation": self.isolation.value,
            "python": self._python,
            "batch_size": self.effective_batch_size,
            "limits": {
                "timeout_s": lim.timeout_s,
                "memory_mb": lim.memory_mb,
                "nproc": lim.nproc,
                "fsize_mb": lim.fsize_mb,
                "nofile": lim.nofile,
                "tmpfs_mb": lim.tmpfs_mb,
                "output_bytes": lim.output_bytes,
            },
        }

    # -- public ----------------------------------------------------------------------
    def run(self, program: Program) -> ExecResult:
        """Run one program; never raises for anything the program does."""
        if not isinstance(program, Program):
            raise ConfigError(f"expected a Program, got {type(program).__name__}")
        return self._execute_batch([program])[0]

    def run_many(self, programs: Iterable[Program], workers: int | None = None) -> list[ExecResult]:
        """Run programs in parallel (threads each driving one sandbox at a time); results in order."""
        progs = list(programs)
        for p in progs:
            if not isinstance(p, Program):
                raise ConfigError(f"expected Programs, got {type(p).__name__}")
        n = workers if workers is not None else self.workers
        check_int("workers", n, min=1)
        if not progs:
            return []
        n = min(n, len(progs))
        size = max(1, min(self.effective_batch_size, math.ceil(len(progs) / n)))
        chunks = [progs[i : i + size] for i in range(0, len(progs), size)]
        if n == 1 or len(chunks) == 1:
            parts = [self._execute_batch(c) for c in chunks]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
                parts = list(ex.map(self._execute_batch, chunks))
        return [r for part in parts for r in part]

    # -- internals -------------------------------------------------------------------
    def _argv(self, job_fd: int, res_fd: int) -> list[str]:
        py = [self._python, "-s", "-S", "-B", "-P", "-c", _BOOT, str(job_fd), str(res_fd)]
        if self.isolation is Isolation.PROCESS:
            return py
        bwrap = self._bwrap
        a = [
            bwrap,
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
        ]
        if self._root:
            # No user namespace: the checker keeps just what it needs to start programs under
            # other uids and to stop them; the programs end with no capabilities.
            a += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL"):
                a += ["--cap-add", cap]
        else:
            a += ["--unshare-user"]
        a += ["--ro-bind", "/usr", "/usr"]
        for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        for p in dict.fromkeys((self._prefix, os.path.dirname(os.path.dirname(self._python)))):
            if p == "/usr" or p.startswith("/usr/"):
                continue
            for anc in _ancestors(p):
                if anc not in ("/usr", "/bin", "/lib", "/lib64", "/sbin"):
                    a += ["--perms", "0755", "--dir", anc]
            a += ["--ro-bind", p, p]
        # /dev is a tmpfs without a size limit: read-only, so nothing can fill it (or /dev/shm)
        a += ["--dev", "/dev", "--remount-ro", "/dev", "--perms", "1777"]
        if _bwrap_supports_size(bwrap):
            a += ["--size", str(self.limits.tmpfs_mb << 20)]
        a += ["--tmpfs", "/tmp", "--chdir", "/tmp"]
        return a + py

    def _execute_batch(self, programs: list[Program]) -> list[ExecResult]:
        """Run ``programs`` in as few sandboxes as it takes (a program that kills its sandbox
        or outlives the host's backstop deadline ends it; the rest go to a fresh one)."""
        out: list[ExecResult] = []
        while len(out) < len(programs):
            got = self._run_sandbox(programs[len(out) :])
            out.extend(got)
        return out

    def _run_sandbox(self, programs: list[Program]) -> list[ExecResult]:
        """One sandbox for ``programs``; returns the results of a non-empty prefix of them."""
        lim = self.limits
        bw = self.isolation is Isolation.BUBBLEWRAP
        run_id = secrets.token_hex(8)
        tmpdir = None if bw else tempfile.mkdtemp(prefix="ttscale-sbx-")
        base: str = "/tmp" if tmpdir is None else tmpdir
        entries = []
        for k, p in enumerate(programs):
            entries.append(
                {
                    "mode": p.mode,
                    "source": p.source,
                    "prelude": p.prelude,
                    "stdin": p.stdin.encode("utf-8") if p.mode == "stdio" else b"",
                    "uid": (1 << 20) + secrets.randbelow(1 << 30) if (bw and self._root) else None,
                    "workdir": os.path.join(base, f"w{k}"),
                }
            )
        part1 = {
            "timeout_s": float(lim.timeout_s),
            "output_bytes": lim.output_bytes,
            "guard": not bw,
            # programs share the checker's uid unless bubblewrap runs as root
            "nondumpable": not (bw and self._root),
            "deny_read": [] if bw else [os.path.expanduser("~"), os.getcwd()],
            "limits": {
                "cpu_s": math.ceil(lim.timeout_s) + 1,
                "memory_bytes": lim.memory_mb << 20,
                "nproc": lim.nproc,
                "fsize_bytes": lim.fsize_mb << 20,
                "nofile": lim.nofile,
            },
            "programs": entries,
        }
        part2 = [
            {"setup": p.setup, "cases": list(p.cases), "entry_points": list(p.entry_points)}
            for p in programs
        ]
        nonce = secrets.token_bytes(32)
        p1 = marshal.dumps(part1)
        p2 = marshal.dumps(part2)
        job = b"".join(
            (_runner_code(), len(p1).to_bytes(8, "big"), p1, nonce, len(p2).to_bytes(8, "big"), p2)
        )
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "HOME": base,
            "TMPDIR": base,
        }
        if not bw:
            env["TTSCALE_SANDBOX_RUN"] = run_id
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            proc = subprocess.Popen(
                self._argv(job_r, res_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(job_r, res_w),
                env=env,
                cwd=tmpdir or "/",
                start_new_session=True,
            )
        except OSError as e:
            for fd in (job_r, job_w, res_r, res_w):
                os.close(fd)
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise SandboxError(f"cannot start the sandbox: {e}") from e
        os.close(job_r)
        os.close(res_w)
        drv = _Driver(proc, job_w, job, res_r, nonce, len(programs), lim)
        try:
            drv.run()
        finally:
            _reap(proc, None if bw else run_id, kill_first=drv.stopped_early)
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
        results = [
            self._interpret(programs[k], payload, seconds)
            for k, (payload, seconds) in enumerate(drv.results)
        ]
        if len(results) < len(programs):
            results.append(self._failure(drv))
        return results

    def _failure(self, drv: _Driver) -> ExecResult:
        """Result for the program that was running when the sandbox stopped without its result."""
        stderr = drv.err.decode("utf-8", "replace")
        common: dict[str, Any] = {"stderr": stderr, "isolation": self.isolation.value}
        if drv.tampered:
            return ExecResult(
                ExecOutcome.FAIL, f"result channel tampered with ({drv.tampered})", **common
            )
        if drv.timed_out:
            if drv.started is None:
                return ExecResult(ExecOutcome.ERROR, "the sandbox did not start in time", **common)
            return ExecResult(
                ExecOutcome.TIMEOUT,
                f"time limit exceeded ({self.limits.timeout_s:g} s)",
                seconds=time.monotonic() - drv.started,
                **common,
            )
        rc = drv.proc.returncode
        if drv.started is None:
            return ExecResult(
                ExecOutcome.ERROR, f"the sandbox failed to start (status {rc}): {_tail(stderr)}", **common
            )
        return ExecResult(
            ExecOutcome.CRASH,
            f"the sandbox died without a result (status {rc}): {_tail(stderr)}",
            exit_code=rc,
            **common,
        )

    def _interpret(self, program: Program, result: Any, seconds: float) -> ExecResult:
        if not isinstance(result, dict) or not isinstance(result.get("outcome"), str):
            return ExecResult(ExecOutcome.ERROR, "malformed result from the checker")
        stdout = _text(result.get("stdout"))
        stderr = _text(result.get("stderr"))
        common: dict[str, Any] = {
            "stdout": stdout,
            "stderr": stderr,
            "output_truncated": bool(result.get("truncated")),
            "seconds": seconds,
            "isolation": self.isolation.value,
        }
        outcome = result["outcome"]
        detail = str(result.get("detail") or "")
        meta: dict[str, Any] = {}
        phases = result.get("phases")
        if isinstance(phases, tuple) and len(phases) == 4:
            meta["phases_s"] = dict(zip(("start", "run", "kill", "drain"), phases, strict=True))
        if isinstance(result.get("signature"), str):
            meta["signature"] = "sig:" + result["signature"]
        common["meta"] = meta
        if program.mode == "stdio" and outcome == "completed":
            return self._stdio_verdict(program, result, common)
        if outcome == "fail" and "before the tests finished" in detail and "MemoryError" in stderr:
            outcome = "memory"
        cases = tuple(
            CaseResult(bool(c.get("ok")), _outcome(c.get("outcome")), str(c.get("detail") or ""))
            for c in result.get("cases") or []
            if isinstance(c, dict)
        )
        return ExecResult(
            _outcome(outcome),
            detail,
            cases=cases,
            signal=result.get("signal"),
            exit_code=result.get("exit_code"),
            **common,
        )

    def _stdio_verdict(
        self, program: Program, result: dict[str, Any], common: dict[str, Any]
    ) -> ExecResult:
        code = result.get("exit_code")
        exc = result.get("exception")
        extra = {"exit_code": code, "signal": result.get("signal"), **common}
        if isinstance(exc, list) and len(exc) == 3:
            text = f"{exc[1]}: {exc[2]}" if exc[2] else str(exc[1])
            outcome = ExecOutcome.MEMORY if exc[0] == "MemoryError" else ExecOutcome.FAIL
            return ExecResult(outcome, text, **extra)
        if code != 0:
            if "MemoryError" in common["stderr"]:
                return ExecResult(ExecOutcome.MEMORY, f"exit status {code}: MemoryError", **extra)
            return ExecResult(
                ExecOutcome.FAIL, f"exit status {code}: {_tail(common['stderr'])}", **extra
            )
        if program.expected_stdout is None:
            return ExecResult(ExecOutcome.PASS, "", **extra)
        if common["output_truncated"]:
            return ExecResult(
                ExecOutcome.FAIL, f"output exceeds {self.limits.output_bytes} bytes", **extra
            )
        got = normalize_output(common["stdout"])
        want = normalize_output(program.expected_stdout)
        if got == want:
            return ExecResult(ExecOutcome.PASS, "", **extra)
        return ExecResult(ExecOutcome.FAIL, f"wrong answer: {_first_diff(got, want)}", **extra)


# ---------------------------------------------------------------------------------------
# process plumbing


class _Driver:
    """Feeds one sandbox its job and follows its ``S``/``R`` frames under deadlines.

    Deadlines: ``startup_timeout_s`` until a program starts; then the program's timeout plus a
    backstop margin (the checker enforces the real limit itself; the backstop only catches a
    checker that hangs). Output of the sandbox itself (bubblewrap's messages) is kept, bounded.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        job_w: int,
        job: bytes,
        res_r: int,
        nonce: bytes,
        n: int,
        lim: Limits,
    ) -> None:
        self.proc = proc
        self.job_w = job_w
        self.job = memoryview(job)
        self.res_r = res_r
        self.want = nonce.hex().encode()
        self.n = n
        self.lim = lim
        self.results: list[tuple[Any, float]] = []
        self.err = bytearray()
        self.out = bytearray()
        self.started: float | None = None  # when the current program started
        self.timed_out = False
        self.tampered = ""
        self.stopped_early = True

    def run(self) -> None:
        lim = self.lim
        proc = self.proc
        assert proc.stdout is not None and proc.stderr is not None  # Popen(stdout=PIPE, ...)
        out_fd = proc.stdout.fileno()
        err_fd = proc.stderr.fileno()
        sel = selectors.DefaultSelector()
        buf = bytearray()
        expect_start = True
        backstop = lim.timeout_s + 2.0 + 0.5 * lim.timeout_s
        deadline = time.monotonic() + lim.startup_timeout_s
        job_open = True
        try:
            for fd in (self.res_r, out_fd, err_fd):
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            os.set_blocking(self.job_w, False)
            sel.register(self.job_w, selectors.EVENT_WRITE)
            res_open = True
            while res_open and len(self.results) < self.n:
                now = time.monotonic()
                if now >= deadline:
                    self.timed_out = True
                    return
                for key, _ in sel.select(deadline - now):
                    fd = key.fd
                    if fd == self.job_w:
                        try:
                            k = os.write(fd, self.job[: 1 << 16])
                            self.job = self.job[k:]
                        except BlockingIOError:
                            continue
                        except OSError:
                            self.job = self.job[:0]
                        if not self.job:
                            sel.unregister(fd)
                            os.close(fd)
                            job_open = False
                        continue
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(fd)
                        if fd == self.res_r:
                            res_open = False
                        continue
                    if fd != self.res_r:
                        target = self.out if fd == out_fd else self.err
                        if len(target) < (1 << 16):
                            target += chunk[: (1 << 16) - len(target)]
                        continue
                    buf += chunk
                    while b"\n" in buf:
                        line, _, rest = bytes(buf).partition(b"\n")
                        buf = bytearray(rest)
                        frame = self._frame(line, expect_start)
                        if frame is None:
                            return
                        if expect_start:
                            self.started = time.monotonic()
                            deadline = self.started + backstop
                        else:
                            self.results.append((frame, time.monotonic() - (self.started or 0.0)))
                            self.started = None
                            deadline = time.monotonic() + lim.startup_timeout_s
                        expect_start = not expect_start
                    if len(buf) > (64 << 20):
                        self.tampered = "oversized frame"
                        return
            self.stopped_early = len(self.results) < self.n
        finally:
            if job_open:
                try:
                    os.close(self.job_w)
                except OSError:
                    pass
            sel.close()
            os.close(self.res_r)

    def _frame(self, line: bytes, expect_start: bool) -> Any:
        """Validate one frame (``S <nonce> i`` or ``R <nonce> (i, {...})``); None = tampered."""
        kind, _, rest = line.partition(b" ")
        tag, _, payload = rest.partition(b" ")
        k = len(self.results)
        if kind != (b"S" if expect_start else b"R") or not hmac.compare_digest(tag, self.want):
            self.tampered = "unexpected frame"
            return None
        try:
            value = literal_eval(payload.decode("utf-8"))
        except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
            self.tampered = "undecodable frame"
            return None
        if expect_start:
            if value != k:
                self.tampered = "frames out of order"
                return None
            return value
        if not (isinstance(value, tuple) and len(value) == 2 and value[0] == k):
            self.tampered = "frames out of order"
            return None
        return value[1]


def _reap(proc: subprocess.Popen[bytes], marker: str | None, *, kill_first: bool) -> None:
    """Kill whatever is left of the run and reap it.

    The process group is killed *before* reaping its leader, so its id cannot have been
    recycled. With bubblewrap the sandbox's pid namespace dies with its first process; in the
    process fallback, processes that left the group are found by the run's marker variable.
    ``kill_first``: the run timed out, kill at once instead of waiting for a clean exit.
    """
    pid = proc.pid
    deadline = time.monotonic() + (0.0 if kill_first else 5.0)
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break  # already reaped
        if info is not None:
            break
        time.sleep(0.001)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
        log.error("sandbox process %d did not exit after SIGKILL", pid)
    if marker is not None:
        _sweep(marker)
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def _sweep(marker: str) -> None:
    """Kill processes whose initial environment carries ``TTSCALE_SANDBOX_RUN=marker``."""
    needle = f"TTSCALE_SANDBOX_RUN={marker}".encode()
    me = os.getpid()
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return
    for p in pids:
        if p == me:
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


def _outcome(value: Any) -> ExecOutcome:
    try:
        return ExecOutcome(value)
    except ValueError:
        return ExecOutcome.ERROR


def _tail(text: str, n: int = 300) -> str:
    text = text.strip()
    return text[-n:] if text else "(no output)"


def _first_diff(got: str, want: str) -> str:
    g = got.split("\n")
    w = want.split("\n")
    for i in range(max(len(g), len(w))):
        a = g[i] if i < len(g) else "<missing>"
        b = w[i] if i < len(w) else "<missing>"
        if a != b:
            return f"line {i + 1}: got {a[:80]!r}, expected {b[:80]!r}"
    return "outputs differ"


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# isolation detection

_DETECT_LOCK = threading.Lock()
_WARNED = False
_LEVELS = ("auto", "bubblewrap", "process")


def _find_bwrap() -> tuple[str | None, str]:
    """The bubblewrap binary (``$TTSCALE_BWRAP`` when set, else ``bwrap`` on ``PATH``) or why none."""
    explicit = os.environ.get("TTSCALE_BWRAP", "").strip()
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return os.path.realpath(explicit), ""
        return None, f"TTSCALE_BWRAP={explicit} is not an executable file"
    found = shutil.which("bwrap")
    if found is None:
        return None, "bwrap not found on PATH"
    return found, ""


@cache
def _bwrap_self_test(bwrap: str) -> tuple[bool, str]:
    """Run one tiny program under the bubblewrap binary ``bwrap``: (works, why not)."""
    sb = Sandbox.__new__(Sandbox)
    sb.limits = Limits(timeout_s=10.0)
    sb.workers = 1
    sb.batch_size = 1
    sb._python, sb._prefix = _interpreter()
    sb.isolation = Isolation.BUBBLEWRAP
    sb._bwrap = bwrap
    sb._root = os.geteuid() == 0
    probe = Program(source="def f():\n    return 41\n", cases=("assert f() + 1 == 42",))
    try:
        r = sb.run(probe)
    except (SandboxError, OSError) as e:
        return False, f"{bwrap}: {e}"
    if r.outcome is ExecOutcome.PASS:
        return True, ""
    return False, f"{bwrap} self-test {r.outcome.value}: {r.detail} {_tail(r.stderr, 200)}".strip()


def bubblewrap_status() -> tuple[bool, str]:
    """Whether the bubblewrap sandbox works here (a self-test, cached per binary), and if not, why.

    The binary is ``$TTSCALE_BWRAP`` when that is set, else ``bwrap`` on ``PATH``.
    """
    bwrap, why = _find_bwrap()
    if bwrap is None:
        return False, why
    with _DETECT_LOCK:
        return _bwrap_self_test(bwrap)


def _warn_process_level(how: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        log.warning(
            "code sandbox: isolation='process' (%s): programs run with rlimits, a temp dir, a "
            "scrubbed environment and audit hooks only, and may read your files and reach the "
            "network; install bubblewrap and use the default isolation for untrusted code",
            how,
        )


def resolve_isolation(isolation: str = "auto") -> Isolation:
    """The isolation level a :class:`Sandbox` built with ``isolation`` gets; fails closed.

    ``"auto"`` and ``"bubblewrap"`` give :attr:`Isolation.BUBBLEWRAP` when bubblewrap passes
    its self-test here and otherwise raise :class:`~ttscale.errors.SandboxError` naming the fix
    (install bubblewrap) and the explicit opt-in. ``"process"`` (or ``"auto"`` with the
    environment variable ``TTSCALE_SANDBOX=process``) is that opt-in: plain processes, logged
    once as a warning.
    """
    if isolation not in _LEVELS:
        raise ConfigError(
            f"isolation must be 'auto', 'bubblewrap' or 'process', got {isolation!r}"
        )
    if isolation == "process":
        _warn_process_level("explicit opt-in")
        return Isolation.PROCESS
    if isolation == "auto":
        forced = os.environ.get("TTSCALE_SANDBOX", "").strip().lower()
        if forced == Isolation.PROCESS.value:
            _warn_process_level("opted in by TTSCALE_SANDBOX=process")
            return Isolation.PROCESS
        if forced not in ("", "auto", Isolation.BUBBLEWRAP.value):
            raise ConfigError(
                f"TTSCALE_SANDBOX must be 'bubblewrap' or 'process', got {forced!r}; unset it "
                "for the default (bubblewrap)"
            )
    ok, why = bubblewrap_status()
    if ok:
        return Isolation.BUBBLEWRAP
    raise SandboxError(
        f"the code sandbox needs bubblewrap, which does not work here ({why}); install it "
        "(apt-get install bubblewrap), or accept running untrusted code without namespace isolation (it can read "
        "your files and reach the network) with isolation='process' (CLI: --isolation process)"
    )


def detect_isolation() -> Isolation:
    """The level ``isolation="auto"`` gives here: bubblewrap, or ``"process"`` when
    ``TTSCALE_SANDBOX=process`` asks for it; raises :class:`~ttscale.errors.SandboxError` when
    bubblewrap does not work (the sandbox never falls back on its own)."""
    return resolve_isolation("auto")


def run_many(
    programs: Iterable[Program],
    workers: int | None = None,
    *,
    limits: Limits | None = None,
    isolation: str = "auto",
) -> list[ExecResult]:
    """Run programs in parallel in a :class:`Sandbox` built with ``limits`` and ``isolation``."""
    return Sandbox(limits, isolation=isolation, workers=workers).run_many(programs)
