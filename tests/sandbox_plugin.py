"""pytest plugin: tests marked ``bubblewrap`` run untrusted code in the bubblewrap sandbox.

Where bubblewrap does not work they are skipped, and the terminal summary says in one line how
many and why. Where the sandbox is required they fail instead: ``TTSCALE_REQUIRE_SANDBOX=1`` or
``CI=true`` (``.ci/run`` sets both), so CI can never pass without having run them.
Loaded by ``tests/conftest.py``; tests/test_verifiers_sandbox.py runs it in a nested pytest.
"""

from __future__ import annotations

import os

import pytest

_SKIP_REASON = "needs a working bubblewrap: "
_STATUS: dict[str, tuple[bool, str]] = {}
_TRUE = ("1", "true", "yes", "on")


def sandbox_required() -> bool:
    """Whether a missing sandbox fails the tests (``TTSCALE_REQUIRE_SANDBOX`` or ``CI`` set true)."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("TTSCALE_REQUIRE_SANDBOX", "CI")
    )


def bubblewrap_status() -> tuple[bool, str]:
    """The sandbox's own self-test, run once per session (only if a marked test runs)."""
    if "status" not in _STATUS:
        from ttscale.verifiers.sandbox import bubblewrap_status as status

        _STATUS["status"] = status()
    return _STATUS["status"]


MISSING_BWRAP = "/nonexistent/ttscale-test/bwrap"


@pytest.fixture
def no_bubblewrap(monkeypatch: pytest.MonkeyPatch) -> str:
    """Simulate a machine without bubblewrap: the sandbox's bwrap lookup (``TTSCALE_BWRAP``)
    points at a binary that does not exist. Returns that path."""
    from ttscale.verifiers import sandbox

    monkeypatch.delenv("TTSCALE_SANDBOX", raising=False)
    monkeypatch.setenv("TTSCALE_BWRAP", MISSING_BWRAP)
    monkeypatch.setattr(sandbox, "_WARNED", False)
    return MISSING_BWRAP


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "bubblewrap: runs programs in the bubblewrap sandbox; skipped where bubblewrap does not "
        "work, a failure instead when TTSCALE_REQUIRE_SANDBOX=1 or CI=true",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("bubblewrap") is None:
        return
    ok, why = bubblewrap_status()
    if ok:
        return
    if sandbox_required():
        pytest.fail(
            f"bubblewrap does not work here ({why}), and this run requires the sandbox tests "
            "(TTSCALE_REQUIRE_SANDBOX=1 or CI=true): install bubblewrap (apt-get install bubblewrap)",
            pytrace=False,
        )
    pytest.skip(_SKIP_REASON + why)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and str(r.longrepr[2]).startswith("Skipped: " + _SKIP_REASON)
    ]
    if skipped:
        why = bubblewrap_status()[1]
        n = len(skipped)
        terminalreporter.write_line(
            f"sandbox: {n} test{'s' if n != 1 else ''} skipped because bubblewrap does not work "
            f"here ({why}); install bubblewrap (apt-get install bubblewrap) to run them "
            "(CI requires them)",
            yellow=True,
        )
