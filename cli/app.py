"""The ``ttscale`` command line: wiring only; the logic lives in the Python API."""

from __future__ import annotations

import importlib
import sys

import typer

from ttscale.errors import TtscaleError

app = typer.Typer(
    name="ttscale",
    help="Test-time scaling of language models: sample, verify, vote, and measure scaling.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Each module defines ``register(app)``; one module per command group keeps the wiring apart.
_COMMAND_MODULES = (
    "ttscale.cli.store_cmds",  # import, export, info
    "ttscale.cli.analysis_cmds",  # curve, fit, verifier-utility
    "ttscale.cli.sample_cmds",  # sample, run, demo
    "ttscale.cli.bench_cmds",  # bench list/show
    "ttscale.cli.verify_cmds",  # verify
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (code 1)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except TtscaleError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code if e.exit_code else 2)
        raise


if __name__ == "__main__":
    main()
