"""``ttscale serve`` on the in-process vLLM engine (tiny model): concurrent requests with other
sampling settings run in lanes of one engine and step loop, and each request's candidates are
the library's samples with the same seed; a disconnect aborts its vLLM requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Served, start, stop

from ttscale.serve.app import problem_id_of
from ttscale.types import Problem, SamplingParams


@pytest.fixture(scope="module")
def served_vllm(vllm_engine: Any) -> Iterator[Served]:
    from ttscale.serve.app import ServeConfig

    config = ServeConfig(model="tiny", params=SamplingParams(max_tokens=16, seed=0), chat=False)
    s = start(config, vllm_engine)
    try:
        yield s
    finally:
        stop(s)


def library(engine: Any, prompt: str, temperature: float, seed: int, budget: int) -> list[str]:
    from ttscale.samplers import RepeatedSampler

    params = SamplingParams(max_tokens=16, seed=seed, temperature=temperature)
    (res,) = RepeatedSampler(engine, params, chat=False).sample(
        [Problem(id=problem_id_of({"prompt": prompt}), prompt=prompt)], budget
    )
    return [c.completion.text for c in res.candidates]


def test_concurrent_lanes_match_library(served_vllm: Served) -> None:
    client = openai.OpenAI(base_url=served_vllm.url + "/v1", api_key="x", max_retries=0, timeout=300)
    asks = [("abc", 1.0, 3), ("abd", 0.7, 3), ("abe", 1.0, 5), ("abf", 0.5, 7)]
    got: dict[str, list[str]] = {}

    def ask(prompt: str, temperature: float, seed: int) -> None:
        r = client.completions.create(
            model="tiny", prompt=prompt, seed=seed, temperature=temperature,
            extra_body={"ttscale": {"strategy": "repeated", "budget": 3, "return_candidates": True}},
        )
        got[prompt] = [c["text"] for c in r.model_extra["ttscale"]["candidates"]]

    threads = [threading.Thread(target=ask, args=a) for a in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert served_vllm.service.worker.engine_in_flight() == 0
    for prompt, temperature, seed in asks:
        assert got[prompt] == library(served_vllm.engine, prompt, temperature, seed, 3), prompt


def test_disconnect_aborts_vllm_requests(served_vllm: Served) -> None:
    svc = served_vllm.service
    import time

    before = svc.metrics.requests.labels("completions", "repeated", "499")._value.get()
    body = {"model": "tiny", "prompt": "zz", "stream": True, "max_tokens": 200,
            "ttscale": {"strategy": "repeated", "budget": 64}}
    with httpx.Client(timeout=60) as h, h.stream("POST", served_vllm.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()) == ": ttscale started"
        t0 = time.monotonic()
        while not svc.worker.engine_in_flight() and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        assert svc.worker.engine_in_flight() > 0

    t0 = time.monotonic()
    while (svc.in_flight or svc.worker.engine_in_flight()) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert svc.in_flight == 0 and svc.worker.engine_in_flight() == 0
    core = served_vllm.engine.llm.llm_engine
    assert not core.has_unfinished_requests()  # vLLM freed their slots
    assert svc.metrics.requests.labels("completions", "repeated", "499")._value.get() == before + 1
