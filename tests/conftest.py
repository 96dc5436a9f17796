"""Shared fixtures: a tiny local Llama model, one in-process vLLM engine and one vLLM server;
the ``bubblewrap`` marker for sandbox tests (tests/sandbox_plugin.py).

The heavy fixtures are session-scoped and built only when a collected test asks for them. The
vLLM OpenAI server is launched as soon as collection shows a test needs it, so its start-up
(tens of seconds) overlaps with the tests that run before it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# tests marked `bubblewrap`: skipped (and counted) without a working bubblewrap, failed in CI
pytest_plugins = ("sandbox_plugin",)

_STATE: dict[str, object] = {}

HAVE_TORCH = importlib.util.find_spec("torch") is not None and (
    importlib.util.find_spec("transformers") is not None
)
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _tiny_model() -> Path:
    if "tiny" not in _STATE:
        from tinymodel import build_tiny_llama

        root = Path(tempfile.mkdtemp(prefix="ttscale-tiny-"))
        _STATE["tiny_root"] = root
        _STATE["tiny"] = build_tiny_llama(root / "tiny-llama")
    return _STATE["tiny"]  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server() -> None:
    if "server" in _STATE or not (HAVE_VLLM and HAVE_TORCH):
        return
    model = _tiny_model()
    port = _free_port()
    log_path = Path(_STATE["tiny_root"]) / "vllm-server.log"  # type: ignore[arg-type]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        "--dtype", "float32", "--enforce-eager", "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    _STATE["server"] = (proc, f"http://127.0.0.1:{port}", log_path, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that builds a second in-process vLLM engine (``own_vllm_engine``) runs after every
    # other test: closing it tears down vLLM's process-wide parallel state, which the session
    # engine (``vllm_engine``) needs for its step loop from then on.
    own = [i for i in items if i.get_closest_marker("own_vllm_engine")]
    if own:
        items[:] = [i for i in items if not i.get_closest_marker("own_vllm_engine")] + own


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("vllm_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_server()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    server = _STATE.pop("server", None)
    if server is not None:
        proc, _, _, log = server  # type: ignore[misc]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    root = _STATE.pop("tiny_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A 2-layer random Llama with a char-level tokenizer (one token per character)."""
    if not HAVE_TORCH:
        pytest.skip("needs torch and transformers")
    return _tiny_model()


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path) -> Iterator[object]:
    """One in-process ``VLLMEngine`` on the tiny model (float32, eager: exact logprobs)."""
    if not HAVE_VLLM:
        pytest.skip("needs vllm (vllm-cpu on CPU machines)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from ttscale.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, dtype="float32", enforce_eager=True, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path) -> str:
    """Base URL (``.../v1``) of a real vLLM OpenAI server serving the tiny model as ``tiny``."""
    if not HAVE_VLLM:
        pytest.skip("needs vllm (vllm-cpu on CPU machines)")
    _start_server()
    proc, url, log_path, _ = _STATE["server"]  # type: ignore[misc]
    import httpx

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-3000:]
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return f"{url}/v1"
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail("vLLM server did not become healthy within 400 s")
