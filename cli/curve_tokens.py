"""``ttscale curve`` over runs of several kinds, and ``--x tokens``: one table, one plot.

Fixed-n runs are curves: method accuracy at each budget ``k``, at ``k`` samples and
``tokens(k) = k · mean tokens per sample`` per problem (mean over problems). Every other run
kind is one point per method (:func:`ttscale.runkinds.run_points`): an adaptive or pruned run's
majority, an SMC or search run's weighted vote and highest weight, at the samples and tokens it
spent per problem. The x axis is samples per problem (``--x k``) or generated tokens per
problem (``--x tokens``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from ttscale.errors import ConfigError


def _fmt_ci(d: dict[str, float], fmt: str = ".3f") -> str:
    return f"{d['mean']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def _scored_part(ci: dict[str, Any] | None) -> str:
    """A selfeval pruning run's scoring cost: a column of its own, never in its tokens."""
    if not ci:
        return ""
    what = "an unknown number of" if ci.get("mean") is None else _fmt_ci(ci, ",.1f")
    return f"; self-evaluation scored {what} context tokens per problem besides its tokens"


def curve_mixed(
    runs: Sequence[Path],
    stores: Sequence[Any],
    pools: Sequence[Any],
    names: Sequence[tuple[str, dict[str, Any]]],
    *,
    compute: Callable[[Any, str], Any],
    x_axis: str,
    tie: str,
    confidence: float,
    n_boot: int,
    seed: int,
    plot: Path | None,
    json_out: bool,
) -> None:
    """Check every run, compute, then print one table (and write one plot).

    ``compute(pool, label)`` gives a fixed-n run's :class:`~ttscale.analysis.CurveReport`.
    Every run's prerequisites (correctness, token counts) are checked before any computation.
    """
    from ttscale.metrics.tokens import expected_tokens_at_k
    from ttscale.runkinds import KIND_LABELS, run_kind, run_points

    kinds = [run_kind(s.manifest) for s in stores]
    multi = len(runs) > 1
    for run, pool, kind in zip(runs, pools, kinds, strict=True):
        where = f"{run}: " if multi else ""
        if not pool.has_correctness():
            raise ConfigError(f"{run} has no correctness labels: verify it first (`ttscale verify {run}`)")
        if kind == "fixed" and x_axis == "tokens":
            try:
                expected_tokens_at_k(pool, [1])  # every token count known, before the computation
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
    curves: list[dict[str, Any]] = []  # label, run, report, samples, tokens
    points = []
    for run, store, pool, kind, (label, differs) in zip(runs, stores, pools, kinds, names, strict=True):
        if kind == "fixed":
            report = compute(pool, label)
            try:
                toks = [float(t) for t in expected_tokens_at_k(pool, report.ks)]
            except ConfigError:
                toks = None  # --x k: a pool without token counts still has its curve
            curves.append({"run": run, "label": label, "differs": differs, "report": report, "tokens": toks})
        else:
            try:
                points += run_points(store, pool, label=label, tie=tie, confidence=confidence,
                                     n_boot=n_boot, seed=seed)  # fmt: skip
            except ConfigError as e:
                raise ConfigError(f"{run}: {e}" if str(run) not in str(e) else str(e)) from None
            if x_axis == "tokens" and points and points[-1].tokens[0] != points[-1].tokens[0]:
                raise ConfigError(
                    f"{run}: the tokens axis needs every sample's token count; this run has samples "
                    "without num_tokens (use --x k)"
                )
    differ = sorted({k for _, d in names for k in d}) + (["kind"] if len(set(kinds)) > 1 else [])
    if plot is not None:
        _plot(curves, points, plot, x_axis, confidence, differ)
    if json_out:
        out: dict[str, Any] = {
            "x": "tokens" if x_axis == "tokens" else "k",
            "confidence": confidence,
            "runs": [
                {"run": str(c["run"]), "label": c["label"], "kind": "fixed", "differs": c["differs"],
                 **c["report"].to_dict(), "samples": c["report"].ks.tolist(), "tokens": c["tokens"]}
                for c in curves
            ],
            "points": [
                {"run": str(runs[[lab for lab, _ in names].index(p.label)]), **p.to_dict()}
                for p in points
            ],
            # which verdict set scored each run, and why
            "verdicts": [
                {"label": lb, **(pl.meta.get("verdicts") or {})}
                for (lb, _), pl in zip(names, pools, strict=True)
            ],
        }  # fmt: skip
        if plot is not None:
            out["plot"] = str(plot)
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ttscale.cli.analysis_cmds import _SHORT, _fit_line, curve_notes

    console = Console(highlight=False)
    pct = round(confidence * 100)
    methods: list[str] = []
    for c in curves:
        methods += [m for m in c["report"].curves if m not in methods]
    for p in points:
        if p.method not in methods:
            methods.append(p.method)
    what = f"{len(runs)} runs" if multi else Text(runs[0].name).plain
    label_w = min(max(len(lab) for lab, _ in names), 40)
    # the richest cells that fit the terminal: every value with its [lo, hi] CI, else means only
    wide_w = label_w + 8 + 20 + 26 + sum(max(len(_SHORT.get(m, m)), 20) for m in methods) + 3 * (4 + len(methods)) + 1
    wide = wide_w <= console.width
    t = Table(title=f"accuracy at each run's cost per problem ({what}; {pct}% bootstrap CIs over problems)")
    t.add_column("run", min_width=label_w)
    t.add_column("kind", no_wrap=True)
    t.add_column("samples/problem", justify="right", no_wrap=True)
    t.add_column("tokens/problem", justify="right", no_wrap=True)

    def _ci(mean: float, lo: float, hi: float, fmt: str = ".3f") -> str:
        return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if wide else f"{mean:{fmt}}"

    for m in methods:
        t.add_column(_SHORT.get(m, m), justify="right", no_wrap=True)
    first = True
    for c in curves:
        rep = c["report"]
        if not first:
            t.add_section()
        first = False
        for j, k in enumerate(rep.ks.tolist()):
            cells = []
            for m in methods:
                mc = rep.curves.get(m)
                if mc is None or mc.mean[j] != mc.mean[j]:
                    cells.append("-")
                else:
                    cells.append(_ci(mc.mean[j], mc.low[j], mc.high[j]))
            tok = "-" if c["tokens"] is None else f"{c['tokens'][j]:,.1f}"
            t.add_row(Text(c["label"]) if j == 0 else "", "fixed-n" if j == 0 else "", f"k = {k}", tok, *cells)
    by_run: dict[str, list[Any]] = {}
    for p in points:
        by_run.setdefault(p.label, []).append(p)
    for label, pts in by_run.items():
        if not first:
            t.add_section()
        first = False
        p0 = pts[0]
        cells = []
        for m in methods:
            hit = [p for p in pts if p.method == m]
            cells.append(_ci(*hit[0].accuracy) if hit else "-")
        tk, sm = p0.tokens, p0.samples
        tok = "unknown" if tk[0] != tk[0] else _ci(tk[0], tk[1], tk[2], ",.1f")
        t.add_row(Text(label), KIND_LABELS[p0.kind], _ci(sm[0], sm[1], sm[2], ",.2f"), tok, *cells)
    console.print(t)
    if not wide:
        console.print(f"[dim]CIs left out to fit {console.width} columns; see --json or a wider terminal[/dim]")
    console.print(
        "fixed-n: k samples per problem at k x the mean tokens of a sample; adaptive, allocated: the answer "
        "it chose at the samples it drew; pruned: majority over kept traces, every trace started "
        "counted; short-m@k: majority over the first m traces to finish, the k traces started and "
        "their tokens (aborted ones' included) counted; SMC/search: particles, every particle-step's "
        "tokens counted"
    )
    for c in curves:
        lines = curve_notes(c["report"]) + ([_fit_line(c["report"])] if c["report"].fit is not None else [])
        for line in lines:
            console.print(Text(f"{c['label']}: {line}" if multi else line))
    from ttscale.cli.analysis_cmds import describe_verdicts

    for label, pts in by_run.items():
        d = pts[0].detail
        console.print(Text(f"{label}: {describe_verdicts(d.get('verdicts'))}" if multi else describe_verdicts(d.get("verdicts"))))
        console.print(Text(f"{label}: {d.get('run_kind')}"
                           + (f"; samples used {_fmt_ci(d['samples_used'], '.2f')}"
                              if "samples_used" in d else "")
                           + _scored_part(d.get("scored_tokens"))))  # fmt: skip
    for run, (label, _) in zip(runs, names, strict=True):
        if multi and label != run.name:
            console.print(Text(f"{label}: {run}"))
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _plot(
    curves: list[dict[str, Any]], points: list[Any], path: Path, x_axis: str, confidence: float,
    differ: list[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    from ttscale.analysis import _LABELS
    from ttscale.runkinds import KIND_LABELS

    tokens = x_axis == "tokens"
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.2, 4.8), dpi=120)
    i = 0
    xs: list[float] = []
    for c in curves:
        rep = c["report"]
        x = c["tokens"] if tokens else [float(k) for k in rep.ks]
        if x is None:
            continue
        for name, mc in rep.curves.items():
            col = colors(i % 10)
            lab = _LABELS.get(name, name) + (" (oracle selection)" if mc.oracle else "")
            ax.plot(x, mc.mean, color=col, marker="o", ms=4, lw=1.5,
                    label=f"{c['label']}: {lab}" if len(curves) + len(points) > 1 else lab)
            ax.fill_between(x, mc.low, mc.high, color=col, alpha=0.15, lw=0)
            xs += list(x)
            i += 1
    # points: one colour (and one legend entry) per run, one marker per method
    method_marker = {"majority": "o", "weighted_vote": "D", "max_weight": "s"}
    run_color: dict[str, Any] = {}
    for p in points:
        if p.label not in run_color:
            run_color[p.label] = colors(i % 10)
            i += 1
        col = run_color[p.label]
        x, (xlo, xhi) = (p.tokens[0], p.tokens[1:]) if tokens else (p.samples[0], p.samples[1:])
        y, ylo, yhi = p.accuracy
        first = sum(q.label == p.label for q in points[: points.index(p)]) == 0
        ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]],
                    color=col, marker=method_marker.get(p.method, "*"), ms=8, ls="none", capsize=3,
                    mfc="white" if p.method == "max_weight" else col, mew=1.5,
                    label=f"{p.label} ({KIND_LABELS[p.kind]})" if first else None)  # fmt: skip
        xs += [xlo, xhi, x]
    from matplotlib.lines import Line2D

    shown = sorted({p.method for p in points}, key=list(method_marker).index)
    handles, labels = ax.get_legend_handles_labels()
    for m in shown if len(shown) > 1 else ():  # which marker is which method
        handles.append(Line2D([], [], color="grey", marker=method_marker[m], ls="none",
                              mfc="white" if m == "max_weight" else "grey"))  # fmt: skip
        labels.append(f"marker: {m}")
    ax.set_xscale("log", base=2 if not tokens else 10)
    pos = [v for v in xs if v > 0]
    if pos:
        lo, hi = min(pos), max(pos)
        # a range of a decade or two gets at most one decade tick: label values in between
        if hi / lo < 10:
            ax.xaxis.set_major_locator(LogLocator(base=2 if not tokens else 10, subs=(1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 7.0)))
        elif tokens and hi / lo < 1000:
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.set_xlim(lo / 1.25, hi * 1.25)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("generated tokens per problem" if tokens else "samples per problem")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    pct = round(confidence * 100)
    what = f": runs differ in {', '.join(d.rsplit('.', 1)[-1] for d in differ)}" if differ else ""
    ax.set_title(
        f"accuracy vs {'tokens' if tokens else 'samples'} per problem{what}\n"
        f"bands and bars: {pct}% bootstrap CIs over problems", fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
