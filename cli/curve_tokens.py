"""``ttscale curve --x tokens``: accuracy against generated tokens.

Fixed-n runs give their curves at ``tokens(k) = k · mean tokens per sample`` (mean over
problems); a run made by a pruning sampler (non-iid, with a ``pruning`` manifest entry) is one
point: majority vote over its kept traces at the tokens it generated per problem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from ttscale.errors import ConfigError


def is_token_point_run(manifest: dict[str, Any]) -> bool:
    """A run shown as one point on the tokens axis (made by a pruning sampler)."""
    return bool(manifest.get("pruning"))


def curve_tokens(
    runs: Sequence[Path],
    stores: Sequence[Any],
    pools: Sequence[Any],
    labels: Sequence[str],
    *,
    compute: Callable[[Any, str], Any],
    tie: str,
    confidence: float,
    n_boot: int,
    seed: int,
    plot: Path | None,
    json_out: bool,
) -> None:
    """Compute and print the tokens axis; ``compute(pool, label)`` gives a fixed-n run's
    :class:`~ttscale.analysis.CurveReport`."""
    from ttscale.metrics.tokens import (
        expected_tokens_at_k,
        run_token_point,
        stored_tokens_per_problem,
    )

    curves: list[tuple[str, Any, Any]] = []  # label, report, tokens per k
    points = []
    for run, store, pool, label in zip(runs, stores, pools, labels, strict=True):
        if not pool.iid:
            if not is_token_point_run(store.manifest):
                raise ConfigError(
                    f"{run} holds a weighted population (SMC particles): it has no place on the "
                    "tokens axis; use `ttscale curve` without --x tokens for its weighted results"
                )
            toks = stored_tokens_per_problem(store, list(pool.problem_ids))
            points.append(
                run_token_point(
                    pool, toks, label=label, tie=tie, confidence=confidence, n_boot=n_boot,
                    seed=seed,
                )
            )
            continue
        try:
            expected_tokens_at_k(pool, [1])  # every token count known, before the computation
        except ConfigError as e:
            raise ConfigError(f"{run}: {e}") from None
        report = compute(pool, label)
        curves.append((label, report, expected_tokens_at_k(pool, report.ks)))
    if plot is not None:
        _plot(curves, points, plot)
    if json_out:
        out: dict[str, Any] = {
            "x": "tokens",
            "runs": [
                {
                    "label": label,
                    **report.to_dict(),
                    "tokens": [float(t) for t in toks],
                }
                for label, report, toks in curves
            ],
            "points": [p.to_dict() for p in points],
            # which verdict set scored each run (pruning points included), and why
            "verdicts": [
                {"label": lb, **(pl.meta.get("verdicts") or {})}
                for lb, pl in zip(labels, pools, strict=True)
            ],
        }
        if plot is not None:
            out["plot"] = str(plot)
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    pct = round(confidence * 100)
    for label, report, toks in curves:
        t = Table(title=f"{label}: accuracy vs generated tokens per problem ({pct}% CIs)")
        t.add_column("k", justify="right")
        t.add_column("tokens", justify="right")
        for c in report.curves.values():
            t.add_column(c.label, justify="right")
        for j, k in enumerate(report.ks):
            cells = [
                f"{c.mean[j]:.3f} [{c.low[j]:.3f}, {c.high[j]:.3f}]" for c in report.curves.values()
            ]
            t.add_row(str(int(k)), f"{toks[j]:,.1f}", *cells)
        console.print(t)
    if points:
        t = Table(title=f"pruning runs: majority over kept traces at the tokens generated ({pct}% CIs)")
        for col in ("run", "problems", "tokens", "accuracy"):
            t.add_column(col, justify="left" if col == "run" else "right")
        for p in points:
            t.add_row(
                p.label,
                str(p.n_problems),
                f"{p.tokens:,.1f} [{p.tokens_low:,.1f}, {p.tokens_high:,.1f}]",
                f"{p.accuracy:.3f} [{p.accuracy_low:.3f}, {p.accuracy_high:.3f}]",
            )
        console.print(t)
    from ttscale.cli.analysis_cmds import describe_verdicts

    for label, pool in zip(labels, pools, strict=True):
        typer.echo(f"{label}: {describe_verdicts(pool.meta.get('verdicts'))}")
    typer.echo(
        "tokens: per problem; fixed-n methods at k cost k x the mean tokens of a sample; "
        "pruning runs count every trace, pruned ones included"
    )
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _plot(curves: list[tuple[str, Any, Any]], points: list[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, report, toks in curves:
        for c in report.curves.values():
            name = c.label if len(curves) == 1 else f"{label}: {c.label}"
            ax.plot(toks, c.mean, marker="o", label=name)
            ax.fill_between(toks, c.low, c.high, alpha=0.15)
    for p in points:
        ax.errorbar(
            [p.tokens], [p.accuracy],
            xerr=[[p.tokens - p.tokens_low], [p.tokens_high - p.tokens]],
            yerr=[[p.accuracy - p.accuracy_low], [p.accuracy_high - p.accuracy]],
            marker="*", markersize=12, linestyle="none", label=f"{p.label} (pruning)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
