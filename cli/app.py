"""The ``ttscale`` command line: wiring only; the logic lives in the Python API."""

from __future__ import annotations

import importlib
from typing import Any

import typer
import typer.core

from ttscale.errors import ConfigError, TtscaleError


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr; return the Exit (code 1) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


# Commands in the order of the workflow: make samples, check them, analyse them, manage runs.
_WORKFLOW_ORDER = (
    "sample", "run", "smc", "demo", "verify", "certainty", "curve", "replay", "fit", "verifier-utility",
    "import", "export", "info", "check", "merge", "bench", "serve",
)  # fmt: skip


def _usage_pieces(param: Any) -> Any:
    """``RUN`` / ``[RUN]`` / ``RUN...`` in usage lines (Typer's default prints ``{run}``)."""

    def pieces(ctx: Any) -> list[str]:
        name = str(param.metavar or param.name.upper())
        if param.nargs != 1 and not name.endswith("..."):
            name += "..."
        return [name if param.required else f"[{name}]"]

    return pieces


def _one_line_bad_values(cmd: Any) -> None:
    """Out-of-range option values become one-line user errors (exit code 1), in every command."""
    parse = cmd.parse_args

    def parse_args(ctx: Any, args: list[str]) -> list[str]:
        try:
            return parse(ctx, args)
        except typer.BadParameter as e:
            # raised inside the group's invoke, which prints TtscaleErrors as one line, exit 1
            raise ConfigError(" ".join(e.format_message().split())) from None

    cmd.parse_args = parse_args
    cmd._ttscale_one_line = True


def _plain_arguments(cmd: Any) -> None:
    """Upper-case argument names (``RUN``), in the usage line and the help's argument list;
    one-line errors for bad option values."""
    for sub in getattr(cmd, "commands", {}).values():
        _plain_arguments(sub)
    if not hasattr(cmd, "commands") and not getattr(cmd, "_ttscale_one_line", False):
        _one_line_bad_values(cmd)
    for param in getattr(cmd, "params", ()):
        if isinstance(param, typer.core.TyperArgument) and not getattr(param, "_ttscale_plain", False):
            if param.metavar is None:
                param.metavar = param.name.upper()
            param.get_usage_pieces = _usage_pieces(param)  # type: ignore[method-assign]
            param._ttscale_plain = True  # type: ignore[attr-defined]


class _Group(typer.core.TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        rank = {n: i for i, n in enumerate(_WORKFLOW_ORDER)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _plain_arguments(cmd)
        return cmd

    # Library errors carry one-line messages meant for users: show them without a traceback.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TtscaleError as e:
            raise fail(" ".join(str(e).split())) from None
        except KeyboardInterrupt:
            # commands that write (sample, run, verify) say what they saved before this point
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None


app = typer.Typer(
    name="ttscale",
    cls=_Group,
    help="Test-time scaling of language models: sample, verify, vote, and measure scaling.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # plain (not boxed) error output, so a user error is exactly one line on stderr
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from ttscale import __version__

        typer.echo(f"ttscale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the ttscale version and exit.",
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Log progress details (and vLLM's and transformers' own start-up output).",
    ),
) -> None:
    """Test-time scaling of language models: sample, verify, vote, and measure scaling."""
    import logging
    import os

    if not verbose:
        # read by huggingface_hub when transformers is first imported: no "Loading weights"
        # bars; vLLM's own logs follow ttscale's level (see ttscale.engines.vllm)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# Each module defines ``register(app)``; one module per command group keeps the wiring apart.
_COMMAND_MODULES = (
    "ttscale.cli.store_cmds",  # import, export, info, check, merge
    "ttscale.cli.analysis_cmds",  # curve, fit, verifier-utility
    "ttscale.cli.sample_cmds",  # sample, run, demo
    "ttscale.cli.smc_cmds",  # smc
    "ttscale.cli.bench_cmds",  # bench list/show
    "ttscale.cli.verify_cmds",  # verify
    "ttscale.cli.certainty_cmds",  # certainty
    "ttscale.cli.replay_cmds",  # replay
    "ttscale.cli.serve_cmds",  # serve
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
