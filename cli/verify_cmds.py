"""CLI: ``ttscale verify RUN --verifier SPEC``: check a run's samples and store the verdicts."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttscale.verifiers.base import SPEC_HELP as VERIFIER_SPEC_HELP

# Columns a verifier may read; token-level arrays stay on disk (math/code need only text).
_SAMPLE_COLUMNS = ("text", "answer", "scores", "meta", "finish_reason", "num_tokens", "logprob",
                   "mean_logprob", "seed")  # fmt: skip


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


def _store_name(name: str) -> str:
    """A verifier name usable as a folder of the run (``rm:/a/b`` -> ``rm-_a_b``)."""
    s = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name.replace(":", "-")).lstrip(".")
    return s or "verifier"


def default_verifier_spec(benchmark: str | None) -> str:
    """The verifier a run's benchmark asks for (the registry's), ``math`` when unknown."""
    if benchmark:
        try:
            from ttscale.evals.registry import get_benchmark

            return get_benchmark(benchmark).verifier
        except Exception:  # an unregistered or custom benchmark: fall back to math
            pass
    return "math"


def run_verify(
    run: Path,
    spec: str | None,
    *,
    workers: int = 1,
    timeout: float = 5.0,
    extractor: str | None = None,
    name: str | None = None,
    force: bool = False,
    batch: int = 4096,
    cache: Path | None = None,
    on_batch: Any = None,
    isolation: str = "auto",
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Verify every not-yet-verified sample of ``run`` with verifier ``spec``; returns a summary.

    Resumable and idempotent: keys already verified by this verifier name are skipped (unless
    ``force``), and verdicts are written one shard per batch, so an interrupted run keeps its
    finished batches (Ctrl-C says how many and how to continue). ``shard=(i, N)`` verifies only
    the problems at positions ``i, i + N, ...`` of the run's sorted problem ids, so N workers can
    verify one run together.
    """
    import json
    import logging

    import pyarrow.compute as pc

    from ttscale.errors import ConfigError, StoreError
    from ttscale.paths import check_writable_dir
    from ttscale.store import SampleStore
    from ttscale.types import Sample
    from ttscale.verifiers.base import close_verifier, make_verifier, split_spec, verify_many

    log = logging.getLogger("ttscale.cli.verify")
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    store = SampleStore.open(run)
    check_writable_dir(store.path, "run directory")  # before building the verifier (models...)
    problems = {p.id: p for p in store.problems()}
    if not problems:
        raise StoreError(
            f"run {run} records no problems (problems.parquet), so there are no references to "
            "check against; re-import the samples with their problems"
        )
    if spec is None:
        spec = default_verifier_spec(store.manifest.get("benchmark"))
    head, arg = split_spec(spec)
    kw: dict[str, Any] = {"workers": workers, "timeout": timeout}
    if head == "math" and not arg:
        from ttscale.verifiers.math import default_extractor

        kw["extractor"] = extractor or default_extractor(store.manifest.get("benchmark"))
    elif extractor is not None:
        if head != "math":
            raise ConfigError("--extractor applies to the math verifier only")
        raise ConfigError(f"give the extractor once: --verifier {spec} or --extractor {extractor}")
    if cache is not None:
        kw["cache_path"] = cache
    kw["isolation"] = isolation  # code sandbox; verifiers that run no code ignore it
    verifier = make_verifier(spec, **kw)
    for line in _model_lines(verifier):
        typer.echo(line, err=True)
    try:
        vname = _store_name(name or getattr(verifier, "name", None) or head)
        info0 = dict(verifier.info()) if callable(getattr(verifier, "info", None)) else {}
        # verdicts are keyed by the full configuration: a set made by another one is refused
        # (or moved aside with --force) before anything is computed
        claim = store.claim_verdicts(vname, spec=spec, info=info0, replace=force)
        record = store.verdict_record(vname) or {}
        fingerprint = record.get("fingerprint")
        done = set() if force else store.verified_keys(vname)
        t = store.table(list(_SAMPLE_COLUMNS))
        todo_mask = [
            (p, i) not in done
            for p, i in zip(
                t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True
            )
        ]
        import pyarrow as pa

        t = t.filter(pa.array(todo_mask, type=pa.bool_()))
        missing = sorted(set(pc.unique(t.column("problem_id")).to_pylist()) - set(problems))
        if missing:
            log.warning(
                "%d problem(s) of %s are not recorded in problems.parquet and are skipped: %s",
                len(missing), run, ", ".join(missing[:5]),
            )  # fmt: skip
        groups: dict[str, list[Sample]] = {}
        for row in t.to_pylist():
            pid = row["problem_id"]
            if pid not in problems:
                continue
            groups.setdefault(pid, []).append(
                Sample(
                    problem_id=pid,
                    index=int(row["index"]),
                    text=row["text"] or "",
                    answer=row["answer"],
                    scores=dict(row["scores"]) if row["scores"] else {},
                    meta=json.loads(row["meta"]) if row["meta"] else {},
                    finish_reason=row["finish_reason"],
                    num_tokens=row["num_tokens"],
                    logprob=row["logprob"],
                    mean_logprob=row["mean_logprob"],
                    seed=row["seed"],
                )
            )
        written = 0
        items: list[tuple[Any, list[Sample]]] = []
        size = 0

        def flush() -> None:
            nonlocal written, items, size
            if not items:
                return
            verdicts = [v for vs in verify_many(verifier, items) for v in vs]
            written += store.add_verdicts(verdicts, verifier=vname, fingerprint=fingerprint)
            if on_batch is not None:
                on_batch(written)
            items, size = [], 0

        order = sorted(problems)
        if shard is not None:
            mine = set(order[shard[0] :: shard[1]])
            groups = {pid: g for pid, g in groups.items() if pid in mine}
        try:
            for pid in sorted(groups):
                items.append((problems[pid], groups[pid]))
                size += len(groups[pid])
                if size >= batch:
                    flush()
            flush()
        except KeyboardInterrupt:
            shard_arg = f" --shard {shard[0]}/{shard[1]}" if shard else ""
            typer.echo(
                f"interrupted: {written:,} new verdicts of {vname} are stored in {run} "
                f"({len(done) + written:,} samples verified by it); continue with: ttscale verify "
                f"{run} --verifier {spec}{shard_arg}",
                err=True,
            )
            raise typer.Exit(130) from None
        info = dict(verifier.info()) if callable(getattr(verifier, "info", None)) else {}
        store.update_verdict_record(vname, info)
    finally:
        close_verifier(verifier)
    vt = store.verdict_table(vname)
    statuses = vt.column("status").to_pylist()
    by_status: dict[str, int] = {}
    for s in statuses:
        by_status[s] = by_status.get(s, 0) + 1
    correct = vt.column("correct").to_pylist()
    n_correct = sum(1 for c in correct if c is True)
    return {
        "run": str(run),
        "verifier": vname,
        "spec": record.get("spec"),
        "requested_spec": spec,
        "fingerprint": fingerprint,
        "verdict_set": claim,
        "new": written,
        "skipped": len(done),
        "unrecorded_problems": len(missing),
        "verified": len(statuses),
        "by_status": by_status,
        # accuracy only for verifiers that judge correctness (not for score-only ones)
        "accuracy": (n_correct / len(correct)) if any(c is not None for c in correct) else None,
    }


def _model_lines(verifier: Any) -> list[str]:
    """One line per model a verifier loaded (judge engines, reward models; ensemble members)."""
    from ttscale.engines import describe_engine

    out: list[str] = []
    for member in getattr(verifier, "members", None) or [verifier]:
        engine = getattr(member, "engine", None)
        if engine is not None and callable(getattr(engine, "info", None)):
            note = f"judge of {getattr(member, 'name', 'judge')}"
            out.append(describe_engine(dict(engine.info()), model_note=note))
        elif getattr(member, "model_path", None) is not None:
            import transformers

            dtype = getattr(member, "dtype", "?")
            out.append(
                f"reward model: {member.model_path} (transformers {transformers.__version__}, "
                f"{getattr(member, 'device', '?')}, {dtype}), verifier {member.name}"
            )
    return out


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
