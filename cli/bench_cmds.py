"""``ttscale bench list`` and ``ttscale bench show NAME``: the benchmark registry."""

from __future__ import annotations

from typing import Annotated

import typer

bench_app = typer.Typer(
    name="bench",
    help="List the benchmarks and show one (size, prompt template, a sample problem).",
    no_args_is_help=True,
)


@bench_app.command("list")
def list_cmd() -> None:
    """Table of the registered benchmarks: name, problems, verifier, source."""
    from rich.console import Console
    from rich.table import Table

    from ttscale.evals.registry import list_benchmarks

    table = Table(title="benchmarks", caption="custom:PATH reads your own JSONL/JSON/Parquet file")
    for col in ("name", "problems", "verifier", "data", "source"):
        table.add_column(col, overflow="fold")
    for b in list_benchmarks():
        table.add_row(
            b.name,
            "?" if b.size is None else str(b.size),
            b.verifier,
            "bundled" if b.bundled else "download",
            b.source,
        )
    Console().print(table)


@bench_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="benchmark name (see `ttscale bench list`)")],
    split: Annotated[
        str | None, typer.Option(help="split to load (default: the benchmark's)")
    ] = None,
    path: Annotated[str | None, typer.Option(help="read the data from this local file")] = None,
    index: Annotated[int, typer.Option(min=0, help="which problem to show")] = 0,
    field: Annotated[
        str | None,
        typer.Option(
            help="custom:PATH field mapping, e.g. id=qid,prompt=question,reference=answer"
        ),
    ] = None,
) -> None:
    """Description, size, template, default sampling and one sample problem of NAME."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.text import Text

    from ttscale.errors import TtscaleError
    from ttscale.evals.registry import get_benchmark

    console = Console()
    try:
        bench = (
            get_benchmark(name, fields=field) if name.startswith("custom:") else get_benchmark(name)
        )
    except TtscaleError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    console.print(f"[bold]{escape(bench.name)}[/bold]: {escape(bench.description)}")
    console.print(
        escape(
            f"verifier: {bench.verifier}   splits: {', '.join(bench.splits)}   source: {bench.source}"
        )
    )
    console.print(
        escape(
            f"licence: {bench.license}   max_tokens: {bench.max_tokens}   stop: {list(bench.stop)}"
        )
    )
    console.print(
        Panel(Text(bench.template.template), title=f"prompt template ({bench.template.name})")
    )
    try:
        problems = bench.load(split, path=path)
    except TtscaleError as e:
        console.print(
            escape(f"problems: {'?' if bench.size is None else bench.size} (not loaded: {e})")
        )
        return
    console.print(f"problems ({split or bench.default_split}): {len(problems)}")
    if not problems:
        return
    p = problems[min(index, len(problems) - 1)]
    console.print(Panel(Text(p.prompt), title=escape(f"problem {p.id}: prompt")))
    console.print(Panel(Text(str(p.reference)), title="reference"))
    if p.meta:
        keys = ", ".join(
            f"{k}={v!r}"
            for k, v in p.meta.items()
            if isinstance(v, int | float | str) and len(str(v)) < 40
        )
        if keys:
            console.print(escape(f"meta: {keys}"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(bench_app, name="bench")
