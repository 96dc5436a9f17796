"""Fixtures: a ttscale server on 127.0.0.1 and a free port, in a thread of the test process
(a uvicorn ``Server`` handle, stopped by the fixture), over a scripted engine whose answers
depend on the sample's seed, so votes, seeds and ``n`` have something to decide."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("prometheus_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answer_of(seed: int) -> str:
    """The scripted model's answer for a sample seed: 7 most often, then 8, then 9."""
    r = seed % 10
    return "7" if r < 5 else ("8" if r < 8 else "9")


#: a request whose prompt says "gate" holds the engine thread until this is set (429 tests)
GATE = threading.Event()


def responder(request: Any, index: int, seed: int, params: Any) -> str:
    text = str(request.prompt or request.messages)
    # "slow" prompts give long texts, so a request stays in the engine for many polls
    if "slow" in text:
        return "x" * 4000 + " The answer is \\boxed{7}"
    if "gate" in text:
        GATE.wait(30)
    return f"Thinking {seed % 97}. The answer is \\boxed{{{answer_of(seed)}}}"


class PacedScripted:
    """A scripted engine whose loop takes about 5 ms per poll (4 tokens), like a real
    engine's step, so a long request stays in flight long enough to be cancelled."""

    def __new__(cls, *args: Any, **kw: Any) -> Any:
        from ttscale.engines.scripted import ScriptedEngine

        class _Paced(ScriptedEngine):
            def open_loop(self, params: Any, *, tokens_per_poll: int = 4) -> Any:
                loop = super().open_loop(params, tokens_per_poll=tokens_per_poll)
                inner = loop.poll

                def poll(on_result: Any, max_steps: int | None = None) -> None:
                    time.sleep(0.005 * (max_steps or 1))  # 5 ms per engine step
                    inner(on_result, max_steps=max_steps)

                loop.poll = poll  # type: ignore[method-assign]
                return loop

        return _Paced(*args, **kw)


@dataclass
class Served:
    url: str
    app: Any
    engine: Any
    server: Any

    @property
    def service(self) -> Any:
        return self.app.state.service


def start(config: Any, engine: Any) -> Served:
    import uvicorn

    from ttscale.serve.app import build_app

    app = build_app(config, engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > 30 or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    served = Served(f"http://127.0.0.1:{port}", app, engine, server)
    served._thread = thread  # type: ignore[attr-defined]
    return served


def stop(served: Served) -> None:
    served.server.should_exit = True
    served._thread.join(30)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    from ttscale.serve.app import ServeConfig
    from ttscale.serve.strategy import parse_preset
    from ttscale.types import SamplingParams

    presets = dict(
        [
            parse_preset("sc8=strategy=repeated;rule=majority;budget=8;verifier=math"),
            parse_preset("adaptive=strategy=adaptive;rule=beta:0.95;budget=32;verifier=math"),
        ]
    )
    engine = PacedScripted(responder)
    config = ServeConfig(
        model="scripted", presets=presets, params=SamplingParams(max_tokens=8192, seed=0),
        api_key="sekrit", max_concurrency=4, chat=False,
    )
    s = start(config, engine)
    try:
        yield s
    finally:
        stop(s)
