"""``ttscale serve`` refuses unsafe or malformed settings with one line, before any engine loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "is not a loopback address: give --api-key"),
        (["--preset", "sc"], "--preset must look like NAME=SPEC"),
        (["--preset", "sc=strategy=mcts"], "unknown strategy 'mcts'"),
        (["--preset", "sc=strategy=search"], "unknown strategy 'search'"),
        (["--preset", "sc=strategy=smc"], "strategy 'smc' needs a potential"),
        (["--preset", "sc=rule=nosuch"], "bad ttscale.rule 'nosuch'"),
        (["--preset", "sc=budget=0"], "ttscale.budget must be in [1, 1024]"),
        (["--preset", "sc=budget=8", "--preset", "sc=budget=4"], "--preset sc is given twice"),
    ],
)
def test_bad_serve_options_are_one_line(args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["serve", "--engine", "scripted", *args])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


def test_preset_may_name_a_path_verifier() -> None:
    from ttscale.serve.strategy import parse_preset

    name, fields = parse_preset('rm={"strategy": "repeated", "rule": "best_of_n", "verifier": "rm:/models/rm"}')
    assert name == "rm" and fields["verifier"] == "rm:/models/rm"


def test_serve_command_runs_and_stops(tmp_path: object) -> None:
    """``ttscale serve`` as a user starts it (scripted engine), answered with the openai client,
    stopped by its pid."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    import openai
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttscale.cli.app", "serve", "--engine", "scripted", "--port", str(port),
         "--api-key", "k", "--max-tokens", "8", "--preset", "sc=strategy=repeated;rule=majority;budget=3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 60, "ttscale serve did not start"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["scripted", "sc"]
        r = client.completions.create(model="sc", prompt="hello", seed=1)
        assert r.model_extra["ttscale"]["samples"] == 3
        assert r.usage.completion_tokens == r.model_extra["ttscale"]["tokens"] > 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving 'scripted' on http://127.0.0.1:" in out


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"model": "ad", "ttscale": {"strategy": "repeated"}}, "majority"),  # the preset's rule was for adaptive
        ({"model": "ad", "ttscale": {"strategy": "smc", "potential": "arith-prm"}}, "vote"),
        ({"model": "ad", "ttscale": {"strategy": "repeated", "rule": "rpc"}}, "rpc"),
        ({"model": "ad", "ttscale": {"rule": "esc:window=3"}}, "esc:window=3"),
        ({"model": "ad", "ttscale_strategy": "pruning"}, "deepconf-online"),
    ],
)
def test_a_request_changing_the_strategy_gets_its_default_rule(body: dict[str, object], rule: str) -> None:
    from ttscale.serve.strategy import StrategySpec, parse_preset, resolve

    presets = dict([parse_preset("ad=strategy=adaptive;rule=beta:0.9;budget=16")])
    spec, preset = resolve(body, {}, presets, StrategySpec(), "m")
    assert preset == "ad" and spec.rule == rule and spec.budget == 16
