"""CLI: ``ttscale verify RUN --verifier SPEC``: check a run's samples and store the verdicts."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttscale.verifiers.base import SPEC_HELP as VERIFIER_SPEC_HELP


class IsolationChoice(str, Enum):
    """``--isolation``: how the code sandbox isolates untrusted programs."""

    auto = "auto"
    bubblewrap = "bubblewrap"
    process = "process"


IsolationOpt = Annotated[
    IsolationChoice,
    typer.Option(
        "--isolation",
        help="Code sandbox: auto/bubblewrap = bubblewrap namespaces, refusing to run without a "
        "working bubblewrap; process = plain processes, an explicit opt-in for when bubblewrap "
        "cannot be installed (untrusted code can then read your files and reach the network).",
    ),
]


def default_verifier_spec(benchmark: str | None) -> str:
    """The verifier a run's benchmark asks for (see :func:`ttscale.verifiers.runner`)."""
    from ttscale.verifiers.runner import default_verifier_spec as spec_of

    return spec_of(benchmark)


def run_verify(run: Path, spec: str | None, **kw: Any) -> dict[str, Any]:
    """:func:`ttscale.verifiers.verify_store` with the CLI's reporting (model lines, Ctrl-C)."""
    from ttscale.verifiers.runner import VerifyInterrupted, verify_store

    try:
        return verify_store(run, spec, on_model=lambda line: typer.echo(line, err=True), **kw)
    except VerifyInterrupted as e:
        report_interrupt(e, run)
        raise typer.Exit(130) from None


def report_interrupt(e: Any, run: Path) -> None:
    """After Ctrl-C in verification: what is stored and how to continue."""
    typer.echo(
        f"interrupted: {e.new:,} new verdicts of {e.verifier} are stored in {run} "
        f"({e.verified:,} samples verified by it); continue with: {e.command}",
        err=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``verify`` to ``app``."""

    @app.command("verify")
    def verify_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        verifier: Annotated[
            Optional[str],
            typer.Option(
                "--verifier",
                help=f"{VERIFIER_SPEC_HELP} (default: the one the run's benchmark names, else math).",
            ),
        ] = None,
        workers: Annotated[int, typer.Option(min=1, max=512, help="Checker worker processes.")] = 1,
        timeout: Annotated[
            float, typer.Option(min=0.01, help="Seconds per check (math equivalence, programs).")
        ] = 5.0,
        extractor: Annotated[
            Optional[str],
            typer.Option(
                help="Math answer extractor: auto, boxed, gsm8k, minerva, last_number, arith "
                "(default: from the run's benchmark)."
            ),
        ] = None,
        name: Annotated[
            Optional[str], typer.Option(help="Store the verdicts under this verifier name.")
        ] = None,
        force: Annotated[
            bool, typer.Option("--force", help="Re-verify samples that already have verdicts.")
        ] = False,
        batch: Annotated[
            int, typer.Option(min=1, help="Samples per verdict shard (the unit kept on interrupt).")
        ] = 4096,
        cache: Annotated[
            Optional[Path], typer.Option(help="SQLite file caching math checks across runs.")
        ] = None,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print the summary as JSON.")
        ] = False,
        isolation: IsolationOpt = IsolationChoice.auto,
        shard: Annotated[
            Optional[str],
            typer.Option(help="Verify only shard i of N of the problems, e.g. 0/4 (N workers)."),
        ] = None,
    ) -> None:
        """Verify a run's samples; verdicts, answers and scores are added to the run (resumable)."""
        import json

        from rich.console import Console

        from ttscale.samplers.repeated import parse_shard

        summary = run_verify(
            run, verifier, workers=workers, timeout=timeout, extractor=extractor, name=name,
            force=force, batch=batch, cache=cache, isolation=isolation.value,
            shard=parse_shard(shard) if shard is not None else None,
        )  # fmt: skip
        if json_out:
            typer.echo(json.dumps(summary, sort_keys=True))
            return
        acc = summary["accuracy"]
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items()))
        console = Console(highlight=False)
        if summary["verdict_set"] == "replaced":
            console.print(
                f"replaced the verdict set [bold]{summary['verifier']}[/bold] "
                "(its old verdicts are kept under verdicts/.replaced)"
            )
        console.print(
            f"verified [bold]{summary['new']}[/bold] new samples with [bold]{summary['verifier']}"
            f"[/bold] = {summary['spec']} (config {summary['fingerprint']}"
            + (f", requested as {summary['requested_spec']}" if summary["requested_spec"] != summary["spec"] else "")
            + f") ({summary['skipped']} already done); {summary['verified']} verdicts: "
            f"{statuses}" + (f"; accuracy {acc:.4f}" if acc is not None else "")
        )
