"""CLI: ``ttscale verify RUN --verifier SPEC``: check a run's samples and store the verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
        set_default: Annotated[
            bool,
            typer.Option(
                "--set-default",
                help="Make this verdict set the run's default, the one curve, fit, replay, info "
                "and export use (the first set verified on a run becomes its default). "
                "--verifier NAME of a set that already has every verdict just records it.",
            ),
        ] = False,
    ) -> None:
        """Verify a run's samples; verdicts, answers and scores are added to the run (resumable)."""
        import json

        from rich.console import Console

        from ttscale.samplers.repeated import parse_shard

        console = Console(highlight=False)
        if set_default and not force and shard is None and verifier is not None:
            done = _record_default_only(run, verifier, name)
            if done is not None:
                if json_out:
                    typer.echo(json.dumps(done, sort_keys=True))
                    return
                console.print(
                    describe_default(run, done["default"])
                    + f"; nothing re-verified (all {done['verified']:,} samples have verdicts in it)"
                )
                return
        summary = run_verify(
            run, verifier, workers=workers, timeout=timeout, extractor=extractor, name=name,
            force=force, batch=batch, cache=cache, isolation=isolation.value,
            shard=parse_shard(shard) if shard is not None else None, set_default=set_default,
        )  # fmt: skip
        if json_out:
            typer.echo(json.dumps(summary, sort_keys=True))
            return
        acc = summary["accuracy"]
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items()))
        if summary["verdict_set"] == "replaced":
            console.print(
                f"replaced the verdict set [bold]{summary['verifier']}[/bold] "
                "(its old verdicts are kept under verdicts/.replaced)"
            )
        if summary.get("chose"):
            console.print(summary["chose"], markup=False)
        console.print(
            f"verified [bold]{summary['new']}[/bold] new samples with [bold]{summary['verifier']}"
            f"[/bold] = {summary['spec']} (config {summary['fingerprint']}"
            + (f", requested as {summary['requested_spec']}" if summary["requested_spec"] != summary["spec"] else "")
            + f") ({summary['skipped']} already done); {summary['verified']} verdicts: "
            f"{statuses}" + (f"; accuracy {acc:.4f}" if acc is not None else "")
        )
        console.print(describe_default(run, summary["default"], verified=summary["verifier"]))


def _record_default_only(run: Path, verifier: str, name: str | None) -> dict[str, Any] | None:
    """``verify RUN --verifier SET --set-default`` where SET is a verdict set that already holds
    a verdict for every stored sample: record it as the default without building a verifier
    (a reward model or judge need not load to change which set analyses use). ``None`` when
    there is verifying to do."""
    from ttscale.store import SampleStore

    if name is not None and name != verifier:
        return None  # --verifier is a spec to verify with under --name
    store = SampleStore.open(run)
    if verifier not in store.verifiers():
        return None
    verified = store.verified_keys(verifier)
    if not verified or store.keys() - verified:
        return None  # new samples to verify first (with the spec given)
    from ttscale.paths import check_writable_dir

    check_writable_dir(store.path, "run directory")
    rec = store.verdict_record(verifier) or {}
    return {
        "run": str(run), "verifier": verifier, "spec": rec.get("spec"),
        "fingerprint": rec.get("fingerprint"), "new": 0, "verified": len(verified),
        "default": store.set_default_verdicts(verifier, by="--set-default"),
    }  # fmt: skip


def describe_default(run: Path, d: dict[str, Any], *, verified: str | None = None) -> str:
    """One line on the run's default verdict set after ``verify`` (what analyses will use)."""
    if d.get("name") is None and d.get("undecided"):
        return (
            f"the run records no default verdict set and has several: analyses ask for one; "
            f"record it with `ttscale verify {run} --verifier NAME --set-default`"
        )
    if d.get("name") is None:
        return f"{run} has no verdicts yet, so no default verdict set"
    if d.get("changed"):
        was = f", was {d['previous']}" if d.get("previous") else ""
        return (
            f"default verdict set of {run}: {d['name']} (set by {d.get('set_by')}{was}); "
            "analyses use it"
        )
    hint = (
        f"; analyses use it, not {verified} (change with --set-default)"
        if verified is not None and verified != d["name"]
        else "; analyses use it"
    )
    return f"default verdict set of {run}: {d['name']} (unchanged){hint}"


def verdict_set_label(v: Mapping[str, Any] | None) -> str:
    """How an overlay names a run's verdict set: its spec (``name = spec`` when named apart)."""
    if not v or v.get("name") is None:
        return "answers stored with the samples"
    name, spec = str(v["name"]), v.get("spec")
    if not spec:
        return f"{name} (configuration not recorded)"
    return spec if spec == name or spec.startswith(name + ":") else f"{name} = {spec}"


def overlay_verdict_labels(
    runs: Sequence[Path],
    pools: Sequence[Any],
    names: Sequence[tuple[str, dict[str, Any]]],
    *,
    allow_mixed: bool,
    manifests: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """An overlay's run labels, checked for one verifier across the runs.

    Runs scored by different verifier configurations (canonical specs) are refused in one line;
    with ``allow_mixed`` every label names its run's verdict set (table, JSON and plot legend)
    and ``differs`` gains ``"verdicts"``. An imported run whose labels came from a verdict set of
    its source run (the export's sidecar, ``imported_verdicts`` in ``manifests``) counts as that
    set; a run without correctness labels is left to the command's own "verify it first".
    """
    from ttscale.errors import ConfigError

    imported = [(m or {}).get("imported_verdicts") for m in (manifests or [{}] * len(pools))]
    sets = [
        imp if imp and not (p.meta.get("verdicts") or {}).get("name") else p.meta.get("verdicts")
        for p, imp in zip(pools, imported, strict=True)
    ]
    labels = [verdict_set_label(v) for v in sets]
    kinds = {
        (v or {}).get("spec") or labels[i]
        for i, v in enumerate(sets)
        if pools[i].has_correctness()
    }
    if len(kinds) <= 1:
        return list(names)
    if not allow_mixed:
        each = "; ".join(f"{run}: {label}" for run, label in zip(runs, labels, strict=True))
        raise ConfigError(
            f"the runs are scored by different verifiers ({each}), so their accuracies are not "
            "comparable: score them with one (`ttscale verify RUN --verifier SPEC --set-default`), "
            "pick one set in every run with --verifier NAME, or pass --allow-mixed-verifiers to "
            "overlay them with each run's set named"
        )
    return [
        (f"{label} (verdicts {vl})", {**differs, "verdicts": vl})
        for (label, differs), vl in zip(names, labels, strict=True)
    ]
