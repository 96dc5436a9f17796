"""The CLI as a whole: version, usage lines, help on every option, command order, one-line errors."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from ttscale import __version__
from ttscale.cli.app import app

runner = CliRunner()


def _commands():  # type: ignore[no-untyped-def]
    root = typer.main.get_command(app)
    ctx = root.make_context("ttscale", [], resilient_parsing=True)

    def walk(cmd, path):  # type: ignore[no-untyped-def]
        if hasattr(cmd, "commands"):
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), [*path, name])
        else:
            yield path, cmd

    return list(walk(root, []))


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"ttscale {__version__}"


def test_every_option_has_help_text():
    missing = [
        f"{' '.join(path)} {p.opts[0]}"
        for path, cmd in _commands()
        for p in cmd.params
        if type(p).__name__.endswith("Option") and p.name != "help" and not (p.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["verify"], "Usage: ttscale verify [OPTIONS] RUN"),
        (["curve"], "Usage: ttscale curve [OPTIONS] RUN..."),
        (["merge"], "Usage: ttscale merge [OPTIONS] OUT RUNS..."),
        (["bench", "show"], "Usage: ttscale bench show [OPTIONS] NAME"),
    ],
)
def test_usage_lines_name_arguments_in_capitals(args, usage):
    r = runner.invoke(app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == usage
    assert "{" not in r.output.splitlines()[0]


def test_commands_are_listed_in_workflow_order():
    r = runner.invoke(app, ["--help"])
    listed = re.findall(r"^  ([a-z-]+) ", r.output.split("Commands:")[1], flags=re.M)
    assert listed == ["sample", "run", "smc", "demo", "verify", "certainty", "curve", "replay", "fit", "verifier-utility",
                      "import", "export", "info", "check", "merge", "bench", "serve"]


@pytest.mark.parametrize(
    "args",
    [["fit", "somewhere", "--n-boot", "5"], ["curve", "somewhere", "--confidence", "2"],
     ["sample", "--n", "0"], ["verify", "somewhere", "--workers", "0"]],
)
def test_out_of_range_values_are_one_line_errors_in_every_command(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for"), r.output


def test_verify_help_lists_every_verifier_spec():
    from ttscale.verifiers.base import VERIFIER_SPECS

    r = runner.invoke(app, ["verify", "--help"], terminal_width=400)
    for head in VERIFIER_SPECS:
        assert re.search(rf"\b{head}\b", r.output), head
    for spec in ("code:visible", "code:plus=PATH", "math:EXTRACTOR", "rm:PATH", "judge:MODEL"):
        assert spec in " ".join(r.output.split()), spec


def test_run_takes_budgets_as_a_comma_list_and_checks_it_before_sampling(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", "--engine", "scripted", "--model", "toy", "--benchmark", "arith",
                            "--limit", "2", "--n", "2", "--out", str(out), "--k", "1,x"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        "error: --k must be a comma-separated list of integers, got '1,x'"
    )
    assert not (out / "samples").exists()  # nothing was sampled


def test_adaptive_and_prune_are_exclusive(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["sample", "--engine", "scripted", "--model", "toy", "--benchmark", "arith",
                            "--n", "4", "--out", str(out), "--adaptive", "beta:0.95",
                            "--prune", "lowprob:threshold=-1"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        "error: give --adaptive (stop each problem early) or --prune (stop traces), not both"
    )
    assert not out.exists()
