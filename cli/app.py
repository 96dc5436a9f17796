"""The ``ttscale`` command line: wiring only; the logic lives in the Python API."""

from __future__ import annotations

import importlib
from typing import Any

import typer
import typer.core

from ttscale.errors import TtscaleError


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr; return the Exit (code 1) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


class _Group(typer.core.TyperGroup):
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


@app.callback()
def _root(
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
    "ttscale.cli.bench_cmds",  # bench list/show
    "ttscale.cli.verify_cmds",  # verify
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
