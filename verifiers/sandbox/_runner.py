"""In-sandbox driver for :mod:`ttscale.verifiers.sandbox` (stdlib only; never imported by ttscale).

The host compiles this file once and sends the marshalled code object down the job pipe; a
tiny bootstrap (``python -s -S -B -P -c BOOT JOB_FD RESULT_FD``) executes it inside the
sandbox, so no run pays for compiling it. One sandbox runs a *batch* of programs (one program
unless bubblewrap runs as root, see :mod:`ttscale.verifiers.sandbox`) with three roles:

* the **checker** (the first process, trusted) reads the first part of the job (the programs,
  their preludes and stdin, the limits), compiles the programs and forks the zygote; only
  *then* does it read the per-run nonce and the tests, so no program process ever holds them.
  For each program it writes ``S <nonce> i``, starts the program through the zygote, runs the
  tests (or waits for a stdio program), kills whatever the program left behind, and writes
  ``R <nonce> (i, {...})`` (a Python literal) to RESULT_FD.
* the **zygote** (trusted, never runs untrusted code) forks one fresh **program** process per
  program, after importing the program's prelude so that common imports are paid once per
  batch; it reaps the program and, with a helper running under the program's uid, kills every
  process that uid still has and deletes the files it left in ``/tmp``.
* the **program** process (untrusted) sets its rlimits, drops to its own unprivileged uid when
  the sandbox runs as root, executes the candidate program and then answers the checker's
  requests (call a function, read an attribute, iterate, ...) over a pipe pair (fds 3 and 4);
  its stdout and stderr are pipes the checker drains with a size cap.

Values cross between program and checker only through the small codec below, which carries
plain builtin data (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, set,
frozenset, dict, Decimal, Fraction) and opaque handles for every other object. The decoder is
pure Python over bytes and builds nothing else, so no reply can run code in the checker; a
handle compares by identity, so a returned object with a doctored ``__eq__`` cannot pass a test.
Importing little beyond ``os``, ``sys``, ``marshal``, ``select`` and ``resource`` keeps start-up
close to the bare interpreter's.
"""

import os
import sys

_MAX_MSG = 1 << 28  # bytes; a larger reply from the program is a protocol violation
_SIGNAMES = {
    1: "SIGHUP", 2: "SIGINT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS",
    8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2", 13: "SIGPIPE",
    14: "SIGALRM", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ", 31: "SIGSYS",
}


def _read_exact(fd, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return buf


def _read_msg(fd, cap=_MAX_MSG):
    n = int.from_bytes(_read_exact(fd, 8), "big")
    if n > cap:
        raise OverflowError(f"message of {n} bytes exceeds the limit of {cap}")
    return bytes(_read_exact(fd, n))


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        view = view[k:]


def _send(fd, payload):
    _write_all(fd, len(payload).to_bytes(8, "big") + payload)


# --------------------------------------------------------------------------------------
# plain-data codec (both directions)

_SEQ_TAGS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}


def _enc(v, out, other):
    t = type(v)
    if t is str:
        b = v.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(b))
        out.append(b)
    elif t is int:
        b = format(v, "x").encode()  # hex: not subject to the int/str digit limit
        out.append(b"i%d:" % len(b))
        out.append(b)
    elif v is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if v else b"F")
    elif t is float:
        b = v.hex().encode()
        out.append(b"f%d:" % len(b))
        out.append(b)
    elif t in _SEQ_TAGS:
        out.append(b"%s%d:" % (_SEQ_TAGS[t], len(v)))
        for x in v:
            _enc(x, out, other)
    elif t is dict:
        out.append(b"d%d:" % len(v))
        for k, x in v.items():
            _enc(k, out, other)
            _enc(x, out, other)
    elif t is bytes or t is bytearray:
        out.append(b"%s%d:" % (b"b" if t is bytes else b"B", len(v)))
        out.append(bytes(v))
    elif t is complex:
        out.append(b"c")
        _enc(v.real, out, other)
        _enc(v.imag, out, other)
    else:
        kind, payload = other(v)
        if kind == "h":
            out.append(b"h%d:" % payload)
        elif kind == "D":
            b = payload.encode()
            out.append(b"D%d:" % len(b))
            out.append(b)
        elif kind == "Q":
            out.append(b"Q")
            _enc(payload[0], out, other)
            _enc(payload[1], out, other)
        else:
            _enc(payload, out, other)


def _encode(v, other):
    out = []
    _enc(v, out, other)
    return b"".join(out)


class _CodecError(Exception):
    pass


def _num(data, pos):
    j = data.index(b":", pos)
    digits = data[pos:j]
    if not digits.isdigit() or len(digits) > 18:
        raise _CodecError("bad length")
    return int(digits), j + 1


def _dec(data, pos, handle):
    tag = data[pos : pos + 1]
    pos += 1
    if tag == b"N":
        return None, pos
    if tag == b"T":
        return True, pos
    if tag == b"F":
        return False, pos
    if tag == b"c":
        re, pos = _dec(data, pos, handle)
        im, pos = _dec(data, pos, handle)
        if type(re) is not float or type(im) is not float:
            raise _CodecError("bad complex")
        return complex(re, im), pos
    if tag == b"Q":
        num, pos = _dec(data, pos, handle)
        den, pos = _dec(data, pos, handle)
        if type(num) is not int or type(den) is not int or den == 0:
            raise _CodecError("bad fraction")
        from fractions import Fraction

        return Fraction(num, den), pos
    n, pos = _num(data, pos)
    if tag in (b"s", b"i", b"f", b"b", b"B", b"D"):
        raw = data[pos : pos + n]
        if len(raw) != n:
            raise _CodecError("truncated")
        pos += n
        if tag == b"s":
            return raw.decode("utf-8", "surrogatepass"), pos
        if tag == b"b":
            return raw, pos
        if tag == b"B":
            return bytearray(raw), pos
        text = raw.decode("ascii")
        if tag == b"i":
            if not text.lstrip("-").isalnum():
                raise _CodecError("bad int")
            return int(text, 16), pos
        if tag == b"f":
            return float.fromhex(text), pos
        from decimal import Decimal

        return Decimal(text), pos
    if tag == b"h":
        if handle is None:
            raise _CodecError("unexpected handle")
        return handle(n), pos
    if tag == b"d":
        d = {}
        for _ in range(n):
            k, pos = _dec(data, pos, handle)
            d[k], pos = _dec(data, pos, handle)
        return d, pos
    if tag in (b"l", b"t", b"S", b"z"):
        items = []
        for _ in range(n):
            x, pos = _dec(data, pos, handle)
            items.append(x)
        if tag == b"l":
            return items, pos
        if tag == b"t":
            return tuple(items), pos
        return (set(items) if tag == b"S" else frozenset(items)), pos
    raise _CodecError(f"unknown tag {tag!r}")


def _decode(data, handle=None):
    try:
        v, pos = _dec(data, 0, handle)
    except _CodecError:
        raise
    except Exception as e:
        raise _CodecError(f"{type(e).__name__}: {e}") from None
    if pos != len(data):
        raise _CodecError("trailing data")
    return v


# --------------------------------------------------------------------------------------



def _describe(exc):
    """Plain description of an exception raised by the program: [builtin base, type, message]."""
    import builtins

    base = "Exception"
    name = "Exception"
    try:
        for k in type(exc).__mro__:
            if getattr(builtins, getattr(k, "__name__", ""), None) is k and issubclass(
                k, BaseException
            ):
                base = k.__name__
                break
        name = str(type(exc).__name__)
    except BaseException:
        pass
    try:
        msg = str(exc)
    except BaseException:
        msg = "<unprintable message>"
    if type(msg) is not str:
        msg = "<unprintable message>"
    return [str(base), name[:200], msg[:2000]]


def _set_limits(lim):
    import resource

    def setl(which, soft, hard=None):
        try:
            resource.setrlimit(which, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass

    setl(resource.RLIMIT_CORE, 0)
    setl(resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1)
    setl(resource.RLIMIT_AS, lim["memory_bytes"])
    setl(resource.RLIMIT_NPROC, lim["nproc"])
    setl(resource.RLIMIT_FSIZE, lim["fsize_bytes"])
    setl(resource.RLIMIT_NOFILE, lim["nofile"])


def _install_guard(workdir, deny_read):
    """Audit hook for the ``process`` isolation level (no namespaces): best effort only.

    Refuses process creation, signals to other processes, sockets, ctypes, /proc, writes and
    deletions outside the working directory and reads under ``deny_read`` (the user's home,
    the current directory). Python audit hooks are not a security boundary.
    """
    realpath = os.path.realpath
    sep = os.sep
    work = realpath(workdir)
    allow_read = tuple(realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix))
    deny = tuple(realpath(d) for d in deny_read if d)
    blocked = frozenset(
        (
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "subprocess.Popen", "pty.spawn", "socket.connect", "socket.bind", "socket.sendto",
            "socket.sendmsg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        )
    )
    mutating = frozenset(
        (
            "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.chmod",
            "os.chown", "os.truncate", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move",
            "shutil.chown",
        )
    )
    blocked_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"))
    my_pid = os.getpid()
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, roots):
        return any(path == r or path.startswith(r + sep) for r in roots)

    def norm(p):
        if type(p) is int:
            return None
        p = os.fsdecode(os.fspath(p))
        return realpath(str.__str__(p))

    def hook(event, args):
        if type(event) is not str:
            return
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            name = args[0] if args else ""
            if type(name) is str and name.partition(".")[0] in blocked_modules:
                raise PermissionError(f"sandbox: importing {name} is not allowed")
        elif event in ("os.kill", "os.killpg"):
            pid = args[0] if args else 0
            if not (event == "os.kill" and type(pid) is int and pid == my_pid):
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event == "open":
            path = norm(args[0])
            if path is None:
                return
            if path == "/proc" or path.startswith("/proc/"):
                raise PermissionError("sandbox: /proc is not accessible")
            mode = args[1] if len(args) > 1 else "r"
            flags = args[2] if len(args) > 2 and type(args[2]) is int else 0
            writing = (type(mode) is str and any(c in mode for c in "wax+")) or (flags & wflags)
            if writing and not (inside(path, (work,)) or path == os.devnull):
                raise PermissionError(f"sandbox: writing outside the working directory: {path}")
            if inside(path, deny) and not inside(path, allow_read):
                raise PermissionError(f"sandbox: reading {path} is not allowed")
        elif event in mutating:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)):
                    path = norm(a)
                    if path is not None and not inside(path, (work,)):
                        raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)


def _program(code, job, prog, rq_r, rp_w):
    """Runs in the forked program process; never returns."""
    import builtins

    try:
        _set_limits(job["limits"])
        uid = prog.get("uid")
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.umask(0o077)
        workdir = prog["workdir"]
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        os.chdir(workdir)
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        if job.get("guard"):
            _install_guard(workdir, job.get("deny_read") or [])
    except BaseException as e:  # the sandbox could not be set up: tell the checker
        _send(rp_w, b"X" + _encode(_describe(e), None))
        os._exit(70)

    sys.argv = ["main.py"]
    reserve = [bytearray(1 << 22)]  # released on MemoryError so that reporting it can allocate
    ns = {"__name__": "__main__" if prog["mode"] == "stdio" else "solution"}
    ns["__builtins__"] = builtins

    if prog["mode"] == "stdio":
        status = 0
        desc = None
        try:
            exec(code, ns)
        except SystemExit as e:
            c = e.code
            if c is None:
                status = 0
            elif isinstance(c, int):
                status = c & 0xFF
            else:
                try:
                    sys.stderr.write(f"{c}\n")
                except BaseException:
                    pass
                status = 1
        except BaseException as e:
            if isinstance(e, MemoryError):
                reserve.clear()
            ns.clear()
            desc = _describe(e)
            try:
                import traceback

                traceback.print_exception(e)
            except BaseException:
                pass
            status = 1
        try:
            th = sys.modules.get("threading")
            if th is not None:
                th._shutdown()
            import atexit

            atexit._run_exitfuncs()
        except BaseException:
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            _send(rp_w, b"Q" + _encode([status, desc], None))
        except BaseException:
            pass
        os._exit(status)

    # function mode: load the definitions, then serve the checker's requests
    try:
        exec(code, ns)
        load = b"ON"
    except BaseException as e:
        if isinstance(e, MemoryError):
            reserve.clear()
        ns.clear()
        load = b"E" + _encode(_describe(e), None)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        _send(rp_w, load)
    except BaseException:
        os._exit(71)
    if load != b"ON":
        os._exit(0)

    objs = []

    def other(obj):
        t = type(obj)
        mod = getattr(t, "__module__", None)
        if mod == "decimal" and t.__name__ == "Decimal":
            return "D", str(obj)
        if mod == "fractions" and t.__name__ == "Fraction":
            return "Q", (int(obj.numerator), int(obj.denominator))
        for b in (bool, int, float, complex, str, bytes, bytearray):
            if isinstance(obj, b):
                return "v", b(obj)
        for b in (list, tuple, set, frozenset, dict):
            if isinstance(obj, b):
                return "v", b(obj)
        objs.append(obj)
        return "h", len(objs) - 1

    def handle(i):
        return objs[i]

    while True:
        try:
            op, target, args, kwargs = _decode(_read_msg(rq_r), handle)
        except BaseException:
            os._exit(0)
        try:
            if op == "names":
                val = {n: ns[n] for n in args if n in ns}
            else:
                obj = target
                if op == "call":
                    val = obj(*args, **kwargs)
                elif op == "getattr":
                    val = getattr(obj, args[0])
                elif op == "iter":
                    val = list(obj)
                elif op == "len":
                    val = len(obj)
                elif op == "bool":
                    val = bool(obj)
                elif op == "repr":
                    val = repr(obj)
                elif op == "str":
                    val = str(obj)
                elif op == "getitem":
                    val = obj[args[0]]
                elif op == "contains":
                    val = args[0] in obj
                else:
                    raise RuntimeError(f"unknown request {op!r}")
            out = b"O" + _encode(val, other)
        except BaseException as e:
            if isinstance(e, MemoryError):
                reserve.clear()
            try:
                out = b"E" + _encode(_describe(e), None)
            except BaseException:
                os._exit(72)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            _send(rp_w, out)
        except BaseException:
            os._exit(0)


# --------------------------------------------------------------------------------------
# zygote (trusted; forks the program processes)


def _zygote(job, codes, ends, ctl_r, ctl_w):
    import builtins
    import marshal

    for fd in (0, 1, 2):
        try:
            nul = os.open(os.devnull, os.O_RDWR)
            os.dup2(nul, fd)
            os.close(nul)
        except OSError:
            pass
    import resource  # noqa: F401  (every program process sets its limits with it)

    progs = job["programs"]
    warmed = set()
    pids = {}
    while True:
        try:
            op, i, arg = marshal.loads(_read_msg(ctl_r))
        except BaseException:
            os._exit(0)
        prog = progs[i]
        reply = None
        if op == "fork":
            pre = prog.get("prelude") or ""
            if pre not in warmed:  # import what the prompt imports once for the whole batch
                warmed.add(pre)
                _run_prelude(pre, {"__name__": "__ttscale_warm__", "__builtins__": builtins})
            rq_r, rp_w, out_w, err_w = ends.pop(i)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    os.setsid()
                    stdin = prog.get("stdin") or b""
                    if stdin:
                        fd = os.memfd_create("stdin")
                        _write_all(fd, stdin)
                        os.lseek(fd, 0, 0)
                    else:
                        fd = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(fd, 0)
                    os.dup2(out_w, 1)
                    os.dup2(err_w, 2)
                    os.dup2(rq_r, 3)
                    os.dup2(rp_w, 4)
                    os.closerange(5, 1 << 16)
                except BaseException:
                    os._exit(75)
                _program(codes[i], job, prog, 3, 4)
                os._exit(74)  # not reached
            for fd in (rq_r, rp_w, out_w, err_w):
                os.close(fd)
            pids[i] = pid
            reply = pid
        elif op == "wait":
            pid = pids.get(i)
            if pid is not None:
                reply = _wait(pid, arg)
                if reply is not None:
                    del pids[i]
        elif op == "kill":
            pid = pids.pop(i, None)
            uid = prog.get("uid")
            if pid is not None:
                try:
                    os.killpg(pid, 9)  # the program's own session: it and its plain children
                except OSError:
                    pass
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
                reply = _wait(pid, None)
            if uid is not None:
                _kill_uid(uid, prog["workdir"])  # anything of its uid that left the session
        _send(ctl_w, marshal.dumps(reply))


def _wait(pid, seconds):
    """("exit", code) / ("signal", n) for a program process; None if still running after
    ``seconds`` (``None``: block)."""
    import time

    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        flags = 0 if deadline is None else os.WNOHANG
        try:
            got, st = os.waitpid(pid, flags)
        except ChildProcessError:
            return ("exit", -1)
        if got == pid:
            if os.WIFSIGNALED(st):
                return ("signal", os.WTERMSIG(st))
            return ("exit", os.WEXITSTATUS(st))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)


def _kill_uid(uid, workdir):
    """Kill every process of ``uid`` and delete its files in /tmp (as that uid, from a helper)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            # kill(-1) signals every process of this uid but the caller in one pass under the
            # kernel's tasklist lock, and a fork racing with it fails once SIGKILL is pending,
            # so nothing escapes (its return value cannot tell whether anything was found).
            for _ in range(2):
                try:
                    os.kill(-1, 9)
                except OSError:
                    pass
            _rmtree(workdir)
            with os.scandir("/tmp") as it:
                for e in it:
                    try:
                        if e.stat(follow_symlinks=False).st_uid == uid:
                            _rmtree(e.path)
                    except OSError:
                        pass
        finally:
            os._exit(0)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _rmtree(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            with os.scandir(path) as it:
                entries = list(it)
            for e in entries:
                _rmtree(e.path)
            os.rmdir(path)
        else:
            os.unlink(path)
    except (OSError, RecursionError):
        pass


def _nondumpable():
    """prctl(PR_SET_DUMPABLE, 0): programs running under the checker's own uid (no root) must
    not be able to ptrace it (or the zygote, which inherits the flag) and rewrite its memory."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except Exception:  # no ctypes/libc: nothing better to do; documented in sandbox.py
        pass


def _run_prelude(src, ns):
    """Execute the trusted prelude (a HumanEval prompt: imports, helpers, the stub to complete).

    A prompt that ends in an open ``def`` gets a ``pass`` body; one that still does not compile
    or raises is skipped (its names then come from the program)."""
    if not src.strip():
        return True
    code = None
    for text in (src, src.rstrip() + "\n    pass\n"):
        try:
            code = compile(text, "<prelude>", "exec", dont_inherit=True)
            break
        except (SyntaxError, ValueError):
            continue
    if code is None:
        return False
    try:
        exec(code, ns)
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------
# checker (trusted; the sandbox's first process)


def _main(job_fd, res_fd):
    import marshal
    import time

    job = marshal.loads(_read_msg(job_fd))
    progs = job["programs"]
    codes = []
    syntax = {}
    for i, p in enumerate(progs):
        try:
            codes.append(compile(p["source"], "<program>", "exec", dont_inherit=True))
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
            codes.append(None)
            if isinstance(e, SyntaxError):
                syntax[i] = f"{type(e).__name__}: {e.msg} (line {e.lineno})"[:2000]
            else:
                syntax[i] = f"{type(e).__name__}: {e}"[:2000]
    if any(p["mode"] == "stdio" for p in progs):
        import traceback  # noqa: F401  (imported once: stdio programs print tracebacks with it)
    if job.get("nondumpable"):
        _nondumpable()
    import builtins

    # Import what the preludes import before forking: the zygote and every program inherit it.
    for pre in {p.get("prelude") or "" for p in progs}:
        _run_prelude(pre, {"__name__": "__ttscale_warm__", "__builtins__": builtins})
    ends = {}
    mine = {}
    for i in range(len(progs)):
        if i in syntax:
            continue
        rq_r, rq_w = os.pipe()
        rp_r, rp_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ends[i] = (rq_r, rp_w, out_w, err_w)
        mine[i] = (rq_w, rp_r, out_r, err_r)
    ctl_req_r, ctl_req_w = os.pipe()
    ctl_rep_r, ctl_rep_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    zpid = os.fork()
    if zpid == 0:
        try:
            os.close(job_fd)
            os.close(res_fd)
            os.close(ctl_req_w)
            os.close(ctl_rep_r)
            for fds in mine.values():
                for fd in fds:
                    os.close(fd)
        except BaseException:
            os._exit(73)
        _zygote(job, codes, ends, ctl_req_r, ctl_rep_w)
        os._exit(0)
    for fds in ends.values():
        for fd in fds:
            os.close(fd)
    os.close(ctl_req_r)
    os.close(ctl_rep_w)
    # Only now read the nonce and the tests: neither the zygote nor any program process has them.
    nonce = _read_exact(job_fd, 32)
    tests = marshal.loads(_read_msg(job_fd))
    os.close(job_fd)
    for fd in (0, 1, 2):  # the checker never uses stdio again
        try:
            nul = os.open(os.devnull, os.O_RDWR)
            os.dup2(nul, fd)
            os.close(nul)
        except OSError:
            pass

    def zyg(op, i, arg=None):
        _send(ctl_req_w, marshal.dumps((op, i, arg)))
        return marshal.loads(_read_msg(ctl_rep_r))

    timeout = job["timeout_s"]
    cap = job["output_bytes"]
    for i, prog in enumerate(progs):
        _frame(res_fd, nonce, "S", i)
        if i in syntax:
            _frame(res_fd, nonce, "R", (i, {"outcome": "syntax_error", "detail": syntax[i]}))
            continue
        io = _ProgIO(*mine[i], cap)
        t0 = time.monotonic()
        try:
            zyg("fork", i)
            t1 = time.monotonic()
            io.deadline = t1 + timeout
            if prog["mode"] == "stdio":
                result = _run_stdio(io, zyg, i)
            else:
                result = _Checker(io, zyg, i).run(tests[i], prog.get("prelude") or "")
        except BaseException as e:  # a bug or resource failure in the checker itself
            result = {"outcome": "error", "detail": f"checker failed: {type(e).__name__}: {e}"[:2000]}
        t2 = time.monotonic()
        try:
            zyg("kill", i)
        except BaseException:
            pass
        t3 = time.monotonic()
        io.finish()
        result["phases"] = (t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3)
        result["stdout"] = bytes(io.out)
        result["stderr"] = bytes(io.err)
        result["truncated"] = io.truncated
        _frame(res_fd, nonce, "R", (i, result))
    os._exit(0)


def _frame(fd, nonce, kind, payload):
    _write_all(fd, f"{kind} {bytes(nonce).hex()} {payload!r}\n".encode("utf-8", "replace"))


class _Timeout(BaseException):
    pass


class _ProgIO:
    """The checker's ends of one program's pipes: requests, replies, stdout, stderr."""

    def __init__(self, rq_w, rp_r, out_r, err_r, cap):
        import select

        self.select = select
        self.rq_w, self.rp_r, self.out_r, self.err_r = rq_w, rp_r, out_r, err_r
        self.cap = cap
        self.out = bytearray()
        self.err = bytearray()
        self.truncated = False
        self.rbuf = bytearray()
        self.rp_eof = False
        self.deadline = None
        self.open = {out_r, err_r, rp_r}
        for fd in (rq_w, rp_r, out_r, err_r):
            os.set_blocking(fd, False)

    def _pump(self, write=None, want=None, limit=_MAX_MSG):
        """Write ``write`` and/or read one reply message, draining stdout/stderr meanwhile."""
        import time

        view = memoryview(write) if write else None
        while True:
            if want and len(self.rbuf) >= 8:
                n = int.from_bytes(self.rbuf[:8], "big")
                if n > limit:
                    raise OverflowError(f"message of {n} bytes exceeds the limit of {limit}")
                if len(self.rbuf) >= 8 + n:
                    msg = bytes(self.rbuf[8 : 8 + n])
                    del self.rbuf[: 8 + n]
                    return msg
            if want and self.rp_eof:
                raise EOFError
            if not want and not view:
                return None
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout
            poll = self.select.poll()
            for fd in self.open:
                poll.register(fd, self.select.POLLIN)
            if view:
                poll.register(self.rq_w, self.select.POLLOUT)
            for fd, _ev in poll.poll(remaining * 1000):
                if fd == self.rq_w:
                    try:
                        k = os.write(fd, view[: 1 << 16])
                        view = view[k:]
                    except BlockingIOError:
                        pass
                    except OSError:
                        raise EOFError from None
                    continue
                self._read(fd)

    def _read(self, fd):
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.open.discard(fd)
            if fd == self.rp_r:
                self.rp_eof = True
            return
        if fd == self.rp_r:
            self.rbuf += chunk
            return
        buf = self.out if fd == self.out_r else self.err
        room = self.cap - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > room:
            self.truncated = True

    def send(self, payload):
        self._pump(write=len(payload).to_bytes(8, "big") + payload)

    def recv(self, limit=_MAX_MSG):
        return self._pump(want=True, limit=limit)

    def finish(self):
        """After the program was killed: take what is left in stdout/stderr, close everything."""
        import time

        end = time.monotonic() + 0.5
        while (self.out_r in self.open or self.err_r in self.open) and time.monotonic() < end:
            poll = self.select.poll()
            for fd in (self.out_r, self.err_r):
                if fd in self.open:
                    poll.register(fd, self.select.POLLIN)
            events = poll.poll(max(0.0, end - time.monotonic()) * 1000)
            if not events:
                break
            for fd, _ in events:
                self._read(fd)
        for fd in (self.rq_w, self.rp_r, self.out_r, self.err_r):
            try:
                os.close(fd)
            except OSError:
                pass


def _status_text(status):
    """(outcome, detail) for a program process that stopped answering."""
    if status is None:
        return "crash", "the program stopped answering"
    kind, n = status
    if kind == "signal":
        if n == 24:  # SIGXCPU
            return "timeout", "CPU time limit exceeded (SIGXCPU)"
        return "crash", f"the program was killed by {_SIGNAMES.get(n, f'signal {n}')}"
    return "fail", f"the program exited (code {n}) before the tests finished"


def _run_stdio(io, zyg, i):
    res = {"outcome": "completed", "detail": "", "exit_code": None, "signal": None}
    try:
        msg = io.recv(1 << 20)
    except _Timeout:
        return {"outcome": "timeout", "detail": "time limit exceeded"}
    except (EOFError, OverflowError):
        msg = b""
    status = zyg("wait", i, 1.0)
    if status is None:  # the program sent its exit message but did not exit
        return {"outcome": "timeout", "detail": "time limit exceeded"}
    kind, n = status
    if kind == "signal":
        outcome, detail = _status_text(status)
        res.update(outcome=outcome, detail=detail, signal=n)
        return res
    res["exit_code"] = n
    try:
        if msg[:1] == b"Q":
            _status, desc = _decode(msg[1:])
            if desc is not None:
                res["exception"] = _check_desc(desc)
        elif msg[:1] == b"X":
            desc = _check_desc(_decode(msg[1:]))
            res.update(outcome="error", detail=f"sandbox set-up failed: {desc}")
    except (_CodecError, _Protocol, ValueError, TypeError):
        pass  # a program that scribbled on its pipe: judged by exit status and output alone
    return res


def _check_desc(desc):
    if type(desc) is list and len(desc) == 3 and all(type(x) is str for x in desc):
        return desc
    raise _Protocol("malformed exception description")


class _Protocol(Exception):
    """The program process broke the request/reply protocol."""


class _ChildGone(BaseException):
    """The program process died, closed its pipe or ran out of time."""


class _RemoteAbort(BaseException):
    """The program raised SystemExit/KeyboardInterrupt/GeneratorExit during a call."""


class _ArgError(Exception):
    """A test passed a value that cannot be sent to the program process."""


class _Checker:
    """Runs trusted test code against one program process through ``Remote`` proxies."""

    def __init__(self, io, zyg, index):
        self.io = io
        self.zyg = zyg
        self.index = index
        self.gone = None  # (outcome, detail) once the program process has died
        checker = self

        class Remote:
            """An object living in the program process; equality is identity."""

            __slots__ = ("_ttscale_h",)

            def __init__(self, h):
                object.__setattr__(self, "_ttscale_h", h)

            def __call__(self, *args, **kwargs):
                return checker.rpc("call", self, args, kwargs)

            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return checker.rpc("getattr", self, (name,), {})

            def __iter__(self):
                return iter(checker.rpc("iter", self, (), {}, list))

            def __len__(self):
                return checker.rpc("len", self, (), {}, int)

            def __bool__(self):
                return checker.rpc("bool", self, (), {}, bool)

            def __getitem__(self, key):
                return checker.rpc("getitem", self, (key,), {})

            def __contains__(self, item):
                return checker.rpc("contains", self, (item,), {}, bool)

            def __repr__(self):
                return checker.rpc("repr", self, (), {}, str)

            def __str__(self):
                return checker.rpc("str", self, (), {}, str)

        self.Remote = Remote
        self.handles = {}
        self.crc = (0, 1)  # crc32 and adler32 over every reply: the behaviour signature

    # -- transport ------------------------------------------------------------------
    def _other(self, obj):
        if type(obj) is self.Remote:
            return "h", object.__getattribute__(obj, "_ttscale_h")
        t = type(obj)
        mod = getattr(t, "__module__", None)
        if mod == "decimal" and t.__name__ == "Decimal":
            return "D", str(obj)
        if mod == "fractions" and t.__name__ == "Fraction":
            return "Q", (obj.numerator, obj.denominator)
        raise _ArgError(f"cannot pass a {t.__name__} to the program (only plain data)")

    def _handle(self, i):
        r = self.handles.get(i)
        if r is None:
            r = self.handles[i] = self.Remote(i)
        return r

    def _die(self, timeout=False):
        if self.gone is None:
            if timeout:
                self.gone = ("timeout", "time limit exceeded")
            else:
                status = self.zyg("wait", self.index, 1.0)
                self.gone = _status_text(status)
        raise _ChildGone(*self.gone)

    def _recv(self):
        try:
            data = self.io.recv()
        except OverflowError as e:
            raise _Protocol(str(e)) from None
        except EOFError:
            self._die()
        except _Timeout:
            self._die(timeout=True)
        import zlib

        self.crc = (zlib.crc32(data, self.crc[0]), zlib.adler32(data, self.crc[1]))
        tag = data[:1]
        try:
            if tag == b"O":
                return "ok", _decode(data[1:], self._handle)
            if tag == b"E":
                return "exc", _check_desc(_decode(data[1:]))
            if tag == b"X":
                return "setup_error", _check_desc(_decode(data[1:]))
        except _CodecError as e:
            raise _Protocol(f"unreadable reply from the program ({e})") from None
        raise _Protocol("malformed reply from the program")

    def rpc(self, op, target, args, kwargs, want=None):
        if self.gone is not None:
            raise _ChildGone(*self.gone)
        payload = _encode((op, target, args, kwargs), self._other)
        try:
            self.io.send(payload)
        except EOFError:
            self._die()
        except _Timeout:
            self._die(timeout=True)
        tag, val = self._recv()
        if tag == "ok":
            if want is not None and type(val) is not want:
                raise _Protocol(f"{op} returned {type(val).__name__}, expected {want.__name__}")
            return val
        if tag == "exc":
            raise self._exception(val)
        raise _Protocol("unexpected reply from the program")

    @staticmethod
    def _exception(desc):
        import builtins

        base, name, msg = desc
        text = f"{name}: {msg}" if msg else name
        cls = getattr(builtins, base, None)
        if (
            isinstance(cls, type)
            and issubclass(cls, Exception)
            and cls not in (StopIteration, StopAsyncIteration)
        ):
            try:
                exc = cls(text)
            except Exception:
                exc = Exception(text)
        else:
            exc = _RemoteAbort(text)
        exc.ttscale_remote = desc
        return exc

    # -- the test run -----------------------------------------------------------------
    def run(self, tests, prelude):
        import builtins

        try:
            tag, load = self._recv()
        except _ChildGone as g:
            return {"outcome": g.args[0], "detail": f"while loading the program: {g.args[1]}"}
        except _Protocol as e:
            return {"outcome": "fail", "detail": f"protocol violation: {e}"}
        if tag == "setup_error":
            return {"outcome": "error", "detail": f"sandbox set-up failed: {load}"}
        if tag == "exc":
            base, name, msg = load
            text = f"{name}: {msg}" if msg else name
            outcome = "memory" if base == "MemoryError" else "fail"
            return {"outcome": outcome, "detail": f"while loading the program: {text}"}

        ns = {"__name__": "__ttscale_test__", "__builtins__": builtins}
        _run_prelude(prelude, ns)
        sources = {}
        try:
            setup_src = tests.get("setup") or ""
            setup = compile(setup_src, "<test>", "exec", dont_inherit=True)
            sources["<test>"] = setup_src.splitlines()
            cases = []
            for k, src in enumerate(tests.get("cases") or []):
                fname = f"<case {k}>"
                cases.append(compile(src, fname, "exec", dont_inherit=True))
                sources[fname] = src.splitlines()
        except Exception as e:
            return {"outcome": "error", "detail": f"the test code does not compile: {type(e).__name__}: {e}"}

        # Bind the names the tests use that the program defines (trusted prelude names win,
        # except the entry points, which must come from the program).
        wanted = set()
        for c in [setup, *cases]:
            _names(c, wanted)
        entry = set(tests.get("entry_points") or [])
        wanted = tuple(sorted(n for n in wanted if n in entry or n not in ns))
        try:
            found = self.rpc("names", None, wanted, {}, dict)
        except _ChildGone as g:
            return {"outcome": g.args[0], "detail": g.args[1]}
        except Exception as e:
            return {"outcome": "fail", "detail": f"protocol violation: {e}"}
        for k, v in found.items():
            if type(k) is str and k in wanted:
                ns[k] = v
        for k in entry:
            if k not in found:
                ns.pop(k, None)  # the prelude's stub must not stand in for a missing function

        results = []
        try:
            exec(setup, ns)
        except BaseException as e:
            results.append(self._classify(e, sources))
            return self._summary(results, len(cases))
        for code in cases:
            if self.gone is not None:
                results.append({"ok": False, "outcome": self.gone[0], "detail": "not run: " + self.gone[1]})
                continue
            try:
                exec(code, ns)
                results.append({"ok": True, "outcome": "pass", "detail": ""})
            except BaseException as e:
                results.append(self._classify(e, sources))
        return self._summary(results, len(cases))

    def _classify(self, e, sources):
        if isinstance(e, _ChildGone):
            return {"ok": False, "outcome": e.args[0], "detail": e.args[1]}
        if isinstance(e, _Timeout):
            self.gone = ("timeout", "time limit exceeded")
            return {"ok": False, "outcome": "timeout", "detail": "time limit exceeded"}
        if isinstance(e, _Protocol):
            return {"ok": False, "outcome": "fail", "detail": f"protocol violation: {e}"}
        if isinstance(e, _ArgError):
            return {"ok": False, "outcome": "error", "detail": str(e)}
        remote = getattr(e, "ttscale_remote", None)
        if isinstance(e, MemoryError) or (remote is not None and remote[0] == "MemoryError"):
            outcome = "memory"
        else:
            outcome = "fail"
        if remote is not None:
            text = f"{remote[1]}: {remote[2]}" if remote[2] else remote[1]
        else:
            try:
                msg = str(e)
            except Exception:
                msg = ""
            text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        loc = _location(e, sources)
        if loc:
            text = f"{text} [{loc}]"
        return {"ok": False, "outcome": outcome, "detail": text[:2000]}

    def _summary(self, results, n_cases):
        passed = sum(1 for r in results if r["ok"])
        first = next((r for r in results if not r["ok"]), None)
        out = {"cases": results, "passed": passed, "signature": f"{self.crc[0]:08x}{self.crc[1]:08x}"}
        if first is None and len(results) == n_cases:
            out.update(outcome="pass", detail="")
        elif first is None:
            out.update(outcome="error", detail="tests did not run")
        else:
            out.update(outcome=first["outcome"], detail=first["detail"])
        return out


def _names(code, out):
    """Global names a code object (and the code objects nested in it) may look up."""
    out.update(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            _names(c, out)


def _location(e, sources):
    """``test line N: <source>`` for the innermost frame of the test code in the traceback."""
    tb = e.__traceback__
    found = None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if fname in sources:
            found = (fname, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return ""
    fname, line = found
    lines = sources[fname]
    text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    where = "test" if fname == "<test>" else "case"
    return f"{where} line {line}: {text}"[:500]


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]))
