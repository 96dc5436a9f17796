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
        (["--preset", "sc=strategy=smc"], "strategy 'smc' is not served yet"),
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
