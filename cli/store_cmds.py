"""CLI commands on run directories: import, export, info."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add ``import``, ``export`` and ``info`` to ``app``."""

    @app.command("import")
    def import_cmd(
        samples: Annotated[Path, typer.Argument(help="Samples JSONL file (.jsonl or .jsonl.gz).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create or extend.")],
        model: Annotated[Optional[str], typer.Option(help="Model name to record.")] = None,
        benchmark: Annotated[Optional[str], typer.Option(help="Benchmark name to record.")] = None,
    ) -> None:
        """Import samples from JSONL into a run directory (validated first; nothing half-written)."""
        from rich.console import Console

        from ttscale.store.jsonio import import_jsonl

        manifest = {k: v for k, v in {"model": model, "benchmark": benchmark}.items() if v}
        store, new = import_jsonl(samples, out, manifest=manifest)
        Console().print(
            f"imported [bold]{new}[/bold] new samples into [bold]{store.path}[/bold] "
            f"({len(store)} samples, {len(store.counts())} problems)"
        )

    @app.command("export")
    def export_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        out: Annotated[
            Optional[Path], typer.Option("--out", "-o", help="Output JSONL (default: stdout).")
        ] = None,
        verifier: Annotated[
            Optional[str], typer.Option(help="Use this verifier's answers and correctness.")
        ] = None,
    ) -> None:
        """Export a run's samples as JSONL (the import schema)."""
        from ttscale.store import SampleStore
        from ttscale.store.jsonio import export_jsonl

        store = SampleStore.open(run)
        if out is None:
            export_jsonl(store, sys.stdout, verifier=verifier)
            return
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            n = export_jsonl(store, f, verifier=verifier)
        tmp.replace(out)
        typer.echo(f"exported {n} samples to {out}", err=True)

    @app.command("info")
    def info_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    ) -> None:
        """Show a run's provenance, size and verifiers."""
        import json

        from rich.console import Console
        from rich.table import Table

        from ttscale.store import SampleStore

        store = SampleStore.open(run)
        m = store.manifest
        counts = store.counts()
        if json_out:
            m["samples"] = sum(counts.values())
            m["problems"] = len(counts)
            m["verified_by"] = store.verifiers()
            typer.echo(json.dumps(m, indent=2, sort_keys=True))
            return
        t = Table(title=str(store.path), show_header=False)
        t.add_column("field", style="bold")
        t.add_column("value")
        for key in ("created", "model", "benchmark", "ttscale_version", "git_sha"):
            if m.get(key) is not None:
                t.add_row(key, str(m[key]))
        if isinstance(m.get("engine"), dict):
            e = m["engine"]
            t.add_row("engine", ", ".join(f"{k}={v}" for k, v in e.items()))
        if isinstance(m.get("sampling"), dict):
            t.add_row("sampling", ", ".join(f"{k}={v}" for k, v in m["sampling"].items()))
        n = list(counts.values())
        t.add_row("problems", str(len(n)))
        t.add_row(
            "samples",
            f"{sum(n)} (per problem: min {min(n)}, max {max(n)})" if n else "0",
        )
        details = m.get("verifiers") if isinstance(m.get("verifiers"), dict) else {}
        names = []
        for v in store.verifiers():
            iso = (details.get(v) or {}).get("isolation")
            names.append(f"{v} (isolation: {iso})" if iso else v)
        t.add_row("verifiers", ", ".join(names) or "none")
        if isinstance(m.get("accounting"), dict):
            t.add_row("accounting", ", ".join(f"{k}={v}" for k, v in m["accounting"].items()))
        Console().print(t)
