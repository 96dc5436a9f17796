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
        metadata: Annotated[
            Optional[Path],
            typer.Option(
                help="Run metadata file written by `export --out` (default: SAMPLES.manifest.json "
                "when it exists): sampling settings, engine, problems."
            ),
        ] = None,
    ) -> None:
        """Import samples from JSONL into a run directory (validated first; nothing half-written)."""
        from rich.console import Console

        from ttscale.errors import DataError
        from ttscale.store.jsonio import import_jsonl, sidecar_path

        manifest = {k: v for k, v in {"model": model, "benchmark": benchmark}.items() if v}
        if metadata is not None and not metadata.is_file():
            raise DataError(f"no such metadata file: {metadata}")
        side = metadata if metadata is not None else sidecar_path(samples)
        store, new = import_jsonl(samples, out, manifest=manifest, sidecar=side if side.is_file() else None)
        console = Console()
        console.print(
            f"imported [bold]{new}[/bold] new samples into [bold]{store.path}[/bold] "
            f"({len(store)} samples, {len(store.counts())} problems)"
        )
        if side.is_file():
            m = store.manifest
            kept = [k for k in ("model", "benchmark", "sampling", "engine", "logprob_mode") if k in m]
            console.print(
                f"run metadata from {side}: {', '.join(kept) or 'nothing'}; "
                f"{len(store.problems())} problems recorded"
            )
        else:
            console.print(
                f"no run metadata ({side.name} not found): sampling settings and problems are "
                "not recorded"
            )

    @app.command("export")
    def export_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        out: Annotated[
            Optional[Path], typer.Option("--out", "-o", help="Output JSONL (default: stdout).")
        ] = None,
        verifier: Annotated[
            Optional[str],
            typer.Option(
                help="Use this verdict set's answers and correctness (default: the one analyses "
                "use: the run's default verifier, else the latest)."
            ),
        ] = None,
        no_verdicts: Annotated[
            bool, typer.Option("--no-verdicts", help="Export answers/correctness as sampled.")
        ] = False,
    ) -> None:
        """Export a run's samples as JSONL (the import schema), plus OUT.manifest.json metadata."""
        from ttscale.cli.analysis_cmds import describe_verdicts
        from ttscale.errors import ConfigError
        from ttscale.store import SampleStore
        from ttscale.store.jsonio import export_jsonl, sidecar_path

        if no_verdicts and verifier is not None:
            raise ConfigError("give either --verifier NAME or --no-verdicts, not both")
        store = SampleStore.open(run)
        chosen = None if no_verdicts else store.choose_verdicts(verifier)
        said = describe_verdicts(chosen) if chosen else "verdicts: none (--no-verdicts)"
        if out is None:
            typer.echo(f"exporting with {said}", err=True)
            export_jsonl(store, sys.stdout, verifier=verifier, use_verdicts=not no_verdicts)
            return
        tmp = out.with_name(f".{out.name}.tmp")
        side = sidecar_path(out)
        with open(tmp, "w", encoding="utf-8") as f:
            n = export_jsonl(
                store, f, verifier=verifier, use_verdicts=not no_verdicts, manifest_out=side
            )
        tmp.replace(out)
        typer.echo(f"exported {n} samples to {out} (metadata: {side.name}); {said}", err=True)

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
            m["analysis_verdicts"] = store.choose_verdicts()
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
            d = details.get(v) or {}
            extra = [str(d.get("spec") or "configuration not recorded")]
            if d.get("fingerprint"):
                extra.append(f"config {d['fingerprint']}")
            if d.get("isolation"):
                extra.append(f"isolation: {d['isolation']}")
            names.append(f"{v} = {', '.join(extra)}")
        t.add_row("verifiers", "; ".join(names) or "none")
        from ttscale.cli.analysis_cmds import describe_verdicts

        t.add_row("analyses use", describe_verdicts(store.choose_verdicts()).removeprefix("verdicts: "))
        if isinstance(m.get("accounting"), dict):
            t.add_row("accounting", ", ".join(f"{k}={v}" for k, v in m["accounting"].items()))
        Console().print(t)
