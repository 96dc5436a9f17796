"""CLI commands on run directories: import, export, info, check, merge."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add ``import``, ``export``, ``info``, ``check`` and ``merge`` to ``app``."""

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
        from ttscale.paths import check_writable_dir
        from ttscale.store.jsonio import import_jsonl, sidecar_path

        check_writable_dir(out, "--out")  # before reading (and validating) the samples
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
        for name in store.score_sets():
            rec = store.score_set_record(name)
            how = f"recorded: {(rec.get('config') or {}).get('how', 'how not recorded')}" if rec else "no record"
            console.print(f"score set {name}: {len(store.scored_keys(name))} values ({how})")
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
                "use: the run's default verdict set)."
            ),
        ] = None,
        no_verdicts: Annotated[
            bool, typer.Option("--no-verdicts", help="Export answers/correctness as sampled.")
        ] = False,
    ) -> None:
        """Export a run's samples as JSONL (the import schema), plus OUT.manifest.json metadata."""
        from ttscale.cli.analysis_cmds import describe_verdicts
        from ttscale.errors import ConfigError
        from ttscale.paths import check_writable_file
        from ttscale.store import SampleStore
        from ttscale.store.jsonio import export_jsonl, sidecar_path

        if no_verdicts and verifier is not None:
            raise ConfigError("give either --verifier NAME or --no-verdicts, not both")
        if out is not None:
            check_writable_file(out, "--out", parents=False)  # before reading the run
        store = SampleStore.open(run)
        store.problem_ids()  # a damaged problems.parquet is reported now, not exported around
        chosen = None if no_verdicts else store.choose_verdicts(verifier)
        said = describe_verdicts(chosen) if chosen else "verdicts: none (--no-verdicts)"
        if out is None:
            n = export_jsonl(store, sys.stdout, verifier=verifier, use_verdicts=not no_verdicts)
            typer.echo(f"exported {n} samples; {said}", err=True)  # after: an error stays one line
            return
        tmp = out.with_name(f".{out.name}.tmp")
        side = sidecar_path(out)
        with open(tmp, "w", encoding="utf-8") as f:
            n = export_jsonl(
                store, f, verifier=verifier, use_verdicts=not no_verdicts, manifest_out=side
            )
        tmp.replace(out)
        sets = f"; score sets: {', '.join(store.score_sets())}" if store.score_sets() else ""
        typer.echo(f"exported {n} samples to {out} (metadata: {side.name}); {said}{sets}", err=True)

    @app.command("info")
    def info_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    ) -> None:
        """Show a run's provenance, size and verifiers."""
        import json

        from rich.console import Console
        from rich.table import Table

        from ttscale.errors import StoreError
        from ttscale.runkinds import describe_kind
        from ttscale.store import SampleStore

        store = SampleStore.open(run)
        m = store.manifest
        counts = store.counts()
        try:
            recorded: str = f"{len(store.problem_ids())} (problems.parquet)"
            damage = None
        except StoreError as err:  # info shows the damage; the analyses refuse in one line
            recorded, damage = f"unreadable: {err}", str(err)
        own = _own_result(store) if damage is None else {"kind": describe_kind(m), "points": None, "why": damage}
        if json_out:
            m["recorded_problems"] = recorded
            m["run_kind"] = own["kind"]
            m["own_result"] = own["points"] if own["points"] is not None else own["why"]
            m["samples"] = sum(counts.values())
            m["problems"] = len(counts)
            m["verified_by"] = store.verifiers()
            m["score_sets_stored"] = {n: len(store.scored_keys(n)) for n in store.score_sets()}
            m["analysis_verdicts"] = store.choose_verdicts(strict=False)
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
        t.add_row("run kind", own["kind"])
        if own["points"] is not None:
            for p in own["points"]:
                a, sm, tk = p["accuracy"], p["samples"], p["tokens"]
                t.add_row(
                    f"result ({p['method']})",
                    f"accuracy {a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}] at "
                    f"{sm['mean']:.2f} [{sm['low']:.2f}, {sm['high']:.2f}] samples and "
                    f"{tk['mean']:,.1f} [{tk['low']:,.1f}, {tk['high']:,.1f}] tokens per problem "
                    f"({round(p['confidence'] * 100)}% CIs)" + _scored_ci(p.get("scored_tokens")),
                )
        elif own["why"]:
            t.add_row("result", own["why"])
        n = list(counts.values())
        t.add_row("problems", f"{len(n)} with samples; recorded: {recorded}")
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
        sets = []
        for name in store.score_sets():  # per-sample scores added after sampling (ttscale certainty)
            cfg = (store.score_set_record(name) or {}).get("config") or {}
            sets.append(f"{name} ({len(store.scored_keys(name))} samples; {cfg.get('how', 'how not recorded')}, "
                        f"model {cfg.get('model')})")  # fmt: skip
        if sets:
            t.add_row("score sets", "; ".join(sets))
        from ttscale.cli.analysis_cmds import describe_verdicts

        t.add_row("analyses use", describe_verdicts(store.choose_verdicts(strict=False)).removeprefix("verdicts: "))
        if isinstance(m.get("accounting"), dict):
            t.add_row("accounting", ", ".join(f"{k}={v}" for k, v in m["accounting"].items()))
        if isinstance(m.get("pruning"), dict):
            from ttscale.cli.sample_cmds import _scored_note

            pr = m["pruning"]
            t.add_row(
                "pruning",
                f"pruned {pr.get('pruned', 0):,} of {pr.get('traces', 0):,} traces with {pr.get('rule')}, "
                f"{pr.get('generated_tokens', 0):,} generated tokens{_scored_note(pr)}",
            )
        Console().print(t)

    @app.command("check")
    def check_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        repair: Annotated[
            bool,
            typer.Option(
                "--repair",
                help="Move damaged files to RUN/damaged/ (never deletes) and restore a damaged "
                "manifest from its backup; then `sample --resume` / `verify` regenerate them.",
            ),
        ] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ) -> None:
        """Read every file of a run (manifest, problems, shards); report and repair damage.

        Exit code 0 when the run is healthy (or fully repaired), 1 when damage remains.
        """
        import json

        from rich.console import Console

        from ttscale.store.check import check_run

        report = check_run(run, repair=repair)
        if json_out:
            typer.echo(json.dumps({
                "run": str(run), "files": report.files, "samples": report.samples,
                "ok": report.ok, "restored_manifest": report.restored_manifest,
                "damage": [{"path": str(d.path), "kind": d.kind, "reason": d.reason,
                            "fix": d.fix, "moved_to": str(d.moved_to) if d.moved_to else None}
                           for d in report.damage],
                "next_steps": list(report.next_steps),
            }, indent=2))  # fmt: skip
            raise typer.Exit(0 if report.ok else 1)
        c = Console(highlight=False, soft_wrap=True)
        for d in report.damage:
            if d.moved_to is not None:
                c.print(f"moved {d.path} -> {d.moved_to} ({d.kind}: {d.reason}); {d.fix}")
            elif d.kind == "manifest" and report.restored_manifest:
                c.print(f"restored {d.path} from its backup ({d.reason})")
            else:
                c.print(f"damaged {d.path} ({d.kind}: {d.reason}); {d.fix}")
        if not report.damage:
            c.print(f"{run}: {report.files} files checked, {report.samples:,} samples, no damage")
            return
        if not report.ok:
            movable = [d for d in report.damage if d.kind != "conflict"]
            hint = f"; run `ttscale check {run} --repair`" if movable and not repair else ""
            typer.echo(
                f"error: {len(report.damage)} problem(s) in {run} ({report.files} files "
                f"checked){hint}",
                err=True,
            )
            raise typer.Exit(1)
        c.print(
            f"{run}: repaired ({report.files} files checked, {report.samples:,} samples readable)"
            + (f"; now run: {' && '.join(report.next_steps)}" if report.next_steps else "")
        )

    @app.command("merge")
    def merge_cmd(
        out: Annotated[Path, typer.Argument(help="Run directory to merge into (created if absent).")],
        runs: Annotated[list[Path], typer.Argument(help="Run directories to merge (e.g. shards).")],
    ) -> None:
        """Merge runs made with the same settings (e.g. --shard workers) into one run directory.

        Samples are keyed by (problem, index): copies of one key with the same content collapse,
        different content is a conflict, reported before anything is written. Verdicts, score
        sets (e.g. exact self-certainty), pruning trace logs and the sessions' token accounting
        are merged too; merging again is a no-op.
        """
        from rich.console import Console

        from ttscale.paths import check_writable_dir
        from ttscale.store import merge_runs

        check_writable_dir(out, "merge target")  # before reading and checking every run
        merged, added = merge_runs(out, runs)
        c = Console(highlight=False, soft_wrap=True)
        for src, n in added.items():
            c.print(f"merged {src}: {n:,} new samples")
        c.print(
            f"run [bold]{merged.path}[/bold]: {len(merged):,} samples, "
            f"{len(merged.counts())} problems with samples, {len(merged.problems())} recorded"
        )


def _scored_ci(ci: dict | None) -> str:
    """A pruning run's self-evaluation scoring cost (a separate column: not generated tokens)."""
    if not ci:
        return ""
    if ci.get("mean") is None:
        return "; self-evaluation scored an unknown number of context tokens besides"
    return (
        f"; self-evaluation scored {ci['mean']:,.1f} [{ci['low']:,.1f}, {ci['high']:,.1f}] context "
        "tokens per problem besides"
    )


def _own_result(store: object) -> dict:
    """The run's kind and, for a non-fixed run, its accuracy at its own cost (or why not)."""
    from ttscale.errors import ConfigError
    from ttscale.runkinds import describe_kind, run_kind, run_points

    m = store.manifest  # type: ignore[attr-defined]
    out: dict = {"kind": describe_kind(m), "points": None, "why": None}
    if run_kind(m) == "fixed":
        out["why"] = f"a curve over k: `ttscale curve {store.path}`"  # type: ignore[attr-defined]
        return out
    try:
        pts = run_points(store, store.pool(), label=store.path.name)  # type: ignore[attr-defined]
    except ConfigError as e:
        out["why"] = str(e)
        return out
    out["points"] = [p.to_dict() for p in pts]
    return out
