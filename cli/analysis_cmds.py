"""CLI commands for analysis: curve, fit, verifier-utility."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttscale.errors import ConfigError
from ttscale.select import DEFAULT_TIE


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


class _ShortLabels(Mapping[str, str]):
    """Table headings: the oracle and each rule's label from the rule registry.

    Built on first use, so that loading the CLI does not import the aggregators (numpy).
    """

    _d: dict[str, str] | None = None

    def _labels(self) -> dict[str, str]:
        if self._d is None:
            from ttscale.select.rules import ORACLE, RULES

            self._d = {ORACLE: ORACLE, **{r.name: r.label for r in RULES.values()}}
        return self._d

    def __getitem__(self, key: str) -> str:
        return self._labels()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels())

    def __len__(self) -> int:
        return len(self._labels())


_SHORT = _ShortLabels()


def _method_list(text: str) -> list[str]:
    """``--methods`` -> the method names (checked against the registry by compute_curves)."""
    return [m for m in (x.strip() for x in text.split(",")) if m]


def print_curve_table(report, console=None) -> None:  # type: ignore[no-untyped-def]
    """A rich table: one row per k, one column per method.

    Cells show ``mean [low, high]`` (one interval style in every table), or only the mean where
    the table would not fit the terminal (the bounds are in ``--json``).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    pct = round(report.confidence * 100)
    k_width = len(str(int(report.ks.max())))
    fmt = _cell_format(list(report.curves), k_width + 3, console.width, "wide")
    wide = fmt == "wide"
    t = Table(title=f"accuracy at budget k ({report.n_problems} problems, [{pct}% bootstrap CI])")
    t.add_column("k", justify="right", style="bold", min_width=k_width)
    for name, c in report.curves.items():
        head = _SHORT.get(name, name) + (" (oracle)" if c.oracle else "")
        t.add_column(head, justify="right", no_wrap=True)
    for j, k in enumerate(report.ks.tolist()):
        row = [str(k)]
        for c in report.curves.values():
            m, lo, hi = c.mean[j], c.low[j], c.high[j]
            if m != m:  # NaN: no problem has k samples
                row.append("-")
                continue
            mark = "*" if c.estimator and c.estimator[j].startswith("mc") else ""
            row.append(f"{m:.3f}{mark} [{lo:.3f}, {hi:.3f}]" if wide else f"{m:.3f}{mark}")
        t.add_row(*row)
    console.print(t)
    if any(e.startswith("mc") for c in report.curves.values() for e in c.estimator):
        console.print("[dim]* Monte-Carlo estimate over random subsets (seeded)[/dim]")
    if fmt == "mean":
        console.print(f"[dim]CIs left out to fit {console.width} columns; see --json or a wider terminal[/dim]")
    for name, c in report.curves.items():
        if c.oracle:
            console.print(
                f"{_SHORT.get(name, name)} is oracle selection ({c.oracle}): it equals coverage, "
                "not what a deployed selector would reach; choose another --score"
            )
    for line in curve_notes(report):
        console.print(line)
    if "rpc_fit" in report.meta:
        console.print(f"RPC Weibull fit: {report.meta['rpc_fit']} (--rpc-fit fast|reference)")
    if report.fit is not None:
        console.print(_fit_line(report))


def print_runs_table(labels, reports, console=None) -> None:  # type: ignore[no-untyped-def]
    """Several runs in one rich table: a section of rows (one per k) per run, one column per method.

    Cells show ``mean [low, high]``, or only the mean where that is too wide for the terminal
    (the bounds are in ``--json``).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    pct = round(reports[0].confidence * 100)
    methods: list[str] = []
    for r in reports:
        methods += [m for m in r.curves if m not in methods]
    k_width = max(len(str(int(r.ks.max()))) for r in reports)
    fmt = _cell_format(methods, max(map(len, labels)) + k_width + 6, console.width, "wide")
    t = Table(title=f"accuracy at budget k ({len(reports)} runs, [{pct}% bootstrap CI])")
    t.add_column("run", no_wrap=True)
    t.add_column("k", justify="right", style="bold", min_width=k_width)
    for name in methods:
        t.add_column(_SHORT.get(name, name), justify="right", no_wrap=True)
    mc = False
    for i, (label, report) in enumerate(zip(labels, reports, strict=True)):
        if i:
            t.add_section()
        for j, k in enumerate(report.ks.tolist()):
            row: list[Any] = [Text(label) if j == 0 else "", str(k)]  # Text: no markup in labels
            for name in methods:
                c = report.curves.get(name)
                if c is None or c.mean[j] != c.mean[j]:
                    row.append("-")
                    continue
                mark = "*" if c.estimator and c.estimator[j].startswith("mc") else ""
                mc = mc or bool(mark)
                ci = f" [{c.low[j]:.3f}, {c.high[j]:.3f}]" if fmt == "wide" else ""
                row.append(f"{c.mean[j]:.3f}{mark}{ci}")
            t.add_row(*row)
    console.print(t)
    if mc:
        console.print("[dim]* Monte-Carlo estimate over random subsets (seeded)[/dim]")
    if fmt == "mean":
        console.print(f"[dim]CIs left out to fit {console.width} columns; see --json or a wider terminal[/dim]")
    for label, report in zip(labels, reports, strict=True):
        if report.fit is not None:
            console.print(Text(f"{label}: {_fit_line(report)}"))


_CELL_WIDTH = {"wide": len("0.000* [0.000, 0.000]"), "mean": len("0.000*")}


def _cell_format(methods: list[str], other_width: int, width: int, preferred: str) -> str:
    """The richest cell format (``wide`` > ``mean``) whose table fits ``width`` columns.

    ``other_width``: the width the non-method columns take, borders and padding included.
    """
    order = ["wide", "mean"]
    for fmt in order[order.index(preferred):]:
        cols = sum(max(len(_SHORT.get(m, m)), _CELL_WIDTH[fmt]) + 3 for m in methods)
        if other_width + cols + 1 <= width:
            return fmt
    return "mean"


def _fit_line(report) -> str:  # type: ignore[no-untyped-def]
    f, b = report.fit.fit, report.fit
    return (
        f"coverage fit ({f.method}): c(k) = exp(a·k^b), a = {f.a:.4f} "
        f"[{b.a_low:.4f}, {b.a_high:.4f}], b = {f.b:.4f} [{b.b_low:.4f}, {b.b_high:.4f}]; "
        f"R² = {f.r2:.4f}, RMSE = {f.rmse:.4f} on {f.n_points} points"
    )


class _ProgressBars:
    """Rich progress bars on stderr, one per task (method, fit bootstrap), or nothing.

    ``enabled=None`` shows them when stderr is a terminal (transient: they vanish when done);
    ``True`` forces them (the final state is printed where stderr is not a terminal).
    """

    def __init__(self, enabled: bool | None) -> None:
        import sys

        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._p: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressBars:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = Console(stderr=True)
            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=console.is_terminal,
            )
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()

    def reporter(self, prefix: str | None = None) -> Callable[[str, int, int], None] | None:
        """A ``progress(task, done, total)`` callback for ``compute_curves`` (None when disabled)."""
        if self._p is None:
            return None

        def report(task: str, done: int, total: int) -> None:
            key = f"{prefix}: {task}" if prefix else task
            if key not in self._tasks:
                unit = "replicates" if "bootstrap" in task else "problems"
                self._tasks[key] = self._p.add_task(key, total=total, unit=unit)
            self._p.update(self._tasks[key], completed=done, total=total)

        return report


def describe_verdicts(v: dict | None) -> str:
    """``"math = math:last_number (config 1a2b..., the run's default; other verdict sets: boxed)"``."""
    if v and v.get("undecided"):
        return f"verdicts: none chosen ({v['undecided']})"
    if not v or v.get("name") is None:
        return "verdicts: none (answers and correctness stored with the samples)"
    spec = v.get("spec") or "configuration not recorded"
    fp = f", config {v['fingerprint']}" if v.get("fingerprint") else ""
    others = f"; other verdict sets: {', '.join(v['others'])}" if v.get("others") else ""
    return f"verdicts: {v['name']} = {spec}{fp} ({v.get('chosen_by')}){others}"


def curve_notes(report) -> list[str]:  # type: ignore[no-untyped-def]
    """Lines saying which verdicts were used, what happened to short problems and which
    self-certainty values (exact or approximate) the self-certainty methods read."""
    lines = [describe_verdicts(report.meta.get("verdicts"))]
    sc = report.meta.get("self_certainty")
    if sc:
        what = "exact" if sc.get("exact") else "top-k approximation"
        line = f"self-certainty: {what}, {sc.get('source') or sc.get('how')}"
        if sc.get("why"):
            line += f" ({sc['why']})"
        if "borda_power" in report.meta:
            line += f"; Borda power {report.meta['borda_power']:g}"
        lines.append(line)
    ms = report.meta.get("missing_samples") or {}
    short, none = int(ms.get("short", 0)), int(ms.get("unsampled", 0))
    if short or none:
        req = ms.get("requested")
        req_s = f"the {req} requested" if ms.get("requested_known") else f"{req} (the most any has)"
        what = {
            "count": "counted as unsolved beyond their samples (--missing drop leaves them out)",
            "drop": f"left out: {report.n_problems} problems analysed (--missing count keeps them)",
            "skip": "left out at each k beyond their samples (--missing count keeps them)",
        }[ms.get("policy", "count")]
        lines.append(
            f"{short + none} of {ms.get('problems')} problems have fewer samples than {req_s} "
            f"({none} have none): {what}"
        )
    return lines


def register(app: typer.Typer) -> None:
    """Add ``curve``, ``fit`` and ``verifier-utility`` to ``app``."""

    @app.command("curve")
    def curve_cmd(
        runs: Annotated[
            list[Path],
            typer.Argument(
                help="Run directories; several are overlaid in one table and plot.",
                metavar="RUN...",
            ),
        ],
        methods: Annotated[
            Optional[str],
            typer.Option(
                help="Comma-separated: coverage,majority,weighted,best_of_n,max_probability,pc,rpc,"
                "deepconf,self_certainty,self_certainty_borda,cisc,cisc_score "
                "[default: coverage,majority; a weighted (SMC) run reports its weighted results].",
                show_default=False,
            ),
        ] = None,
        k: Annotated[
            Optional[str], typer.Option("--k", help="Budgets, e.g. 1,2,4,8 (default: powers of 2).")
        ] = None,
        verifier: Annotated[
            Optional[str],
            typer.Option(help="Whose answers/correctness to use (default: each run's default verdict set)."),
        ] = None,
        allow_mixed_verifiers: Annotated[
            bool,
            typer.Option(
                "--allow-mixed-verifiers",
                help="Overlay runs scored by different verifiers, each run's verdict set named in "
                "the table and legend (refused otherwise).",
            ),
        ] = False,
        score: Annotated[Optional[str], typer.Option(help="Score used by weighted/best_of_n.")] = None,
        score_map: Annotated[
            str, typer.Option(help="identity|sigmoid|exp: map scores to vote weights.")
        ] = "identity",
        fit: Annotated[bool, typer.Option("--fit", help="Fit c(k) = exp(a k^b) to coverage.")] = False,
        plot: Annotated[Optional[Path], typer.Option(help="Write a PNG plot here.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
        confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="CI level.")] = 0.95,
        n_boot: Annotated[int, typer.Option(min=10, help="Bootstrap replicates.")] = 1000,
        draws: Annotated[int, typer.Option(min=10, help="Monte-Carlo subsets per problem and k.")] = 1000,
        rpc_draws: Annotated[
            int, typer.Option(min=1, help="Subsets per problem and k for RPC (a Weibull fit each where pruning matters).")
        ] = 50,
        rpc_fit: Annotated[
            str,
            typer.Option(
                help="RPC Weibull fit: fast (all subsets in one batched pass) or reference "
                "(the authors' optimiser, ~10 ms a fit)."
            ),
        ] = "fast",
        tie: Annotated[str, typer.Option(help="expected|first|random tie rule.")] = DEFAULT_TIE,
        deepconf_eta: Annotated[
            float, typer.Option(min=0.0, max=100.0, help="DeepConf: percent of traces kept.")
        ] = 10.0,
        cisc_temperature: Annotated[
            float,
            typer.Option(min=0.0, help="cisc, cisc_score: softmax temperature T over the confidences "
                         "(ours; the paper tunes it per model)."),
        ] = 1.0,
        borda_power: Annotated[
            float,
            typer.Option(min=0.0, help="self_certainty_borda: rank r of k gets (k - r + 1)^P votes "
                         "(the authors' default 0.5; 0 = majority, large = best-of-N)."),
        ] = 0.5,
        deepconf_window: Annotated[
            int, typer.Option(min=1, help="DeepConf: sliding-window length in tokens.")
        ] = 2048,
        seed: Annotated[int, typer.Option(min=0, help="Seed of every random draw (subsets, bootstrap).")] = 0,
        x_axis: Annotated[
            str,
            typer.Option(
                "--x",
                help="x axis: k (samples per problem) or tokens (generated tokens per problem; "
                "pruning runs appear as points).",
            ),
        ] = "k",
        missing: Annotated[
            str,
            typer.Option(
                help="Problems with fewer samples than requested (or none): count (as unsolved "
                "beyond their samples), drop (leave them out) or skip (per k)."
            ),
        ] = "count",
        progress: Annotated[
            Optional[bool],
            typer.Option(
                "--progress/--no-progress",
                help="Progress bars on stderr for each method and the fit's bootstrap "
                "(default: on a terminal).",
                show_default=False,
            ),
        ] = None,
        allocate: Annotated[
            Optional[str],
            typer.Option("--allocate", help="Accuracy against the dataset budget (1x to the full pool) "
                         "for allocation policies next to uniform SC, e.g. 'greedy;gape:a=0.5' "
                         "(--x tokens: token budgets)."),
        ] = None,
        stop_rule: Annotated[
            Optional[str], typer.Option("--stop-rule", help="--allocate: a stopping rule closing problems early.")
        ] = None,
        orders: Annotated[
            Optional[int], typer.Option("--orders", min=1, help="--allocate: seeded random orders per problem [1].")
        ] = None,
        max_samples: Annotated[
            Optional[int], typer.Option("--max-samples", min=1, help="--allocate: per-problem cap [fewest samples].")
        ] = None,
    ) -> None:
        """Coverage and selection accuracy at each budget k, with CIs, fit and plot."""
        if allocate is not None:
            from ttscale.cli.allocation_cmds import curve_allocate

            if x_axis not in ("k", "tokens"):
                raise ConfigError(f"--x must be k or tokens, got {x_axis!r}")
            curve_allocate(runs, allocate, tokens=x_axis == "tokens", stop=stop_rule, orders=orders,
                           seed=seed, max_samples=max_samples, verifier=verifier, plot=plot,
                           json_out=json_out, confidence=confidence, n_boot=n_boot)
            return
        from ttscale.analysis import (
            MISSING_POLICIES,
            check_prerequisites,
            compute_curves,
            plot_curves,
            run_confidences,
            run_labels,
        )
        from ttscale.paths import check_writable_file
        from ttscale.store import SampleStore

        if plot is not None:
            check_writable_file(plot, "--plot")  # before the (possibly long) computation
        if missing not in MISSING_POLICIES:
            raise ConfigError(f"--missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
        method_list = _method_list(methods or "coverage,majority")
        ks = _int_list(k, "--k")
        stores = [SampleStore.open(run) for run in runs]
        pools = [store.pool(verifier) for store in stores]
        multi = len(runs) > 1
        names = run_labels([s.manifest for s in stores], runs) if multi else [(runs[0].name, {})]
        if multi:
            from ttscale.cli.verify_cmds import overlay_verdict_labels

            names = overlay_verdict_labels(
                runs, pools, names, allow_mixed=allow_mixed_verifiers,
                manifests=[s.manifest for s in stores],
            )  # fmt: skip
        if x_axis not in ("k", "tokens"):
            raise ConfigError(f"--x must be k or tokens, got {x_axis!r}")
        from ttscale.runkinds import kind_refusal, run_kind

        kinds = [run_kind(s.manifest) for s in stores]
        if multi and len(set(kinds)) > 1:
            # runs of several kinds: manifest fields mean different things per kind (a search
            # run's max_tokens is a step's), so each run goes by its folder name
            names = [(label, {}) for label, _ in run_labels([{}] * len(runs), runs)]
        if x_axis == "tokens" or any(kd != "fixed" for kd in kinds):
            from ttscale.cli.curve_tokens import curve_mixed

            if all(kd != "fixed" for kd in kinds):
                # k-sample options mean nothing for a run that is one point
                asked = [o for o, v in (("--methods", methods), ("--k", k), ("--fit", fit or None)) if v]
                if asked:
                    bad = next(r for r, kd in zip(runs, kinds, strict=True) if kd != "fixed")
                    what = f"{', '.join(asked)} (k-sample curves)"
                    raise ConfigError(kind_refusal(kinds[runs.index(bad)], what, bad))

            def compute(pool: Any, label: str) -> Any:
                conf = None
                store = stores[[id(p) for p in pools].index(id(pool))]
                if _top_methods(method_list):
                    conf = run_confidences(store, window=deepconf_window)
                cert = _certainties(store, pool, method_list)
                check_prerequisites(pool, method_list, score=score, confidences=conf,
                                    certainties=None if cert is None else cert.values)  # fmt: skip
                return compute_curves(
                    pool, method_list, ks, score=score, score_map=score_map, confidences=conf,
                    certainties=None if cert is None else cert.values,
                    certainty_source=None if cert is None else cert.to_dict(),
                    borda_power=borda_power, cisc_temperature=cisc_temperature,
                    deepconf_eta=deepconf_eta, confidence=confidence, n_boot=n_boot,
                    n_draws=draws, rpc_draws=rpc_draws, rpc_fit=rpc_fit, tie=tie, seed=seed,
                    fit=fit, missing=missing,
                )

            curve_mixed(
                runs, stores, pools, names, compute=compute, x_axis=x_axis, tie=tie,
                confidence=confidence, n_boot=n_boot, seed=seed, plot=plot, json_out=json_out,
            )
            return
        # every run's inputs are checked before any curve is computed (a missing log-prob in
        # the last run must not cost the user the first runs' minutes)
        for run, store, pool in zip(runs, stores, pools, strict=True):
            where = f"{run}: " if multi else ""
            # a run with no top log-probs at all is reported now; others once computed below
            no_top = bool(_top_methods(method_list)) and not _has_top_logprobs(store)
            try:
                check_prerequisites(pool, method_list, score=score, check_confidences=no_top)
                if ks and pool.num_problems and max(ks) > int(pool.n_per_problem.max()):
                    raise ConfigError(
                        f"k={max(ks)} exceeds the largest number of samples per problem "
                        f"({int(pool.n_per_problem.max())})"
                    )
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
        confs = [
            run_confidences(store, window=deepconf_window) if _top_methods(method_list) else None
            for store in stores
        ]
        certs = [_certainties(store, pool, method_list) for store, pool in zip(stores, pools, strict=True)]
        for run, pool, conf, cert in zip(runs, pools, confs, certs, strict=True):
            try:
                check_prerequisites(pool, method_list, score=score, confidences=conf,
                                    certainties=None if cert is None else cert.values)  # fmt: skip
            except ConfigError as e:
                raise ConfigError(f"{run}: {e}" if multi else str(e)) from None
        reports = []
        with _ProgressBars(progress) as bars:
            for (label, _), pool, conf, cert in zip(names, pools, confs, certs, strict=True):
                report = compute_curves(
                    pool,
                    method_list,
                    ks,
                    score=score,
                    score_map=score_map,
                    confidences=conf,
                    certainties=None if cert is None else cert.values,
                    certainty_source=None if cert is None else cert.to_dict(),
                    borda_power=borda_power,
                    cisc_temperature=cisc_temperature,
                    deepconf_eta=deepconf_eta,
                    confidence=confidence,
                    n_boot=n_boot,
                    n_draws=draws,
                    rpc_draws=rpc_draws,
                    rpc_fit=rpc_fit,
                    tie=tie,
                    seed=seed,
                    fit=fit,
                    missing=missing,
                    progress=bars.reporter(label if multi else None),
                )
                reports.append(report)
        if plot is not None:
            if multi:
                diff = sorted({f.rsplit(".", 1)[-1] for _, d in names for f in d})
                plot_curves(
                    {label: r for (label, _), r in zip(names, reports, strict=True)}, plot,
                    title=f"{len(runs)} runs" + (f" differing in {', '.join(diff)}" if diff else ""),
                )
            else:
                run, report = runs[0], reports[0]
                plot_curves(report, plot, title=f"{run.name}: {report.n_problems} problems")
        if json_out:
            if multi:
                out: dict = {
                    "runs": [
                        {"run": str(run), "label": label, "differs": differs, **r.to_dict()}
                        for run, (label, differs), r in zip(runs, names, reports, strict=True)
                    ]
                }
            else:
                out = reports[0].to_dict()
                out["run"] = str(runs[0])
            if plot is not None:
                out["plot"] = str(plot)
            typer.echo(json.dumps(out, indent=2))
            return
        if multi:
            print_runs_table([label for label, _ in names], reports)
            for run, (label, _), r in zip(runs, names, reports, strict=True):
                if label != run.name:
                    typer.echo(f"{label}: {run}")
                for line in curve_notes(r):
                    typer.echo(f"{label}: {line}")
        else:
            print_curve_table(reports[0])
        if plot is not None:
            typer.echo(f"plot: {plot}")

    @app.command("fit")
    def fit_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        method: Annotated[str, typer.Option(help="loglog (OLS on log(-log c)) or nls.")] = "loglog",
        k: Annotated[Optional[str], typer.Option("--k", help="Budgets used for the fit.")] = None,
        target: Annotated[
            Optional[float],
            typer.Option(min=0.0, max=1.0, help="Report the samples needed to reach this coverage."),
        ] = None,
        extrapolate: Annotated[
            Optional[str], typer.Option(help="Predict coverage at these k, e.g. 1024,4096.")
        ] = None,
        verifier: Annotated[
            Optional[str],
            typer.Option(help="Whose correctness to fit (default: the run's default verdict set)."),
        ] = None,
        n_boot: Annotated[
            int, typer.Option(min=10, help="Bootstrap replicates (over problems) for the CIs.")
        ] = 1000,
        seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap.")] = 0,
        json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
        progress: Annotated[
            Optional[bool],
            typer.Option(
                "--progress/--no-progress",
                help="A progress bar on stderr for the bootstrap (default: on a terminal).",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        """Fit the exponentiated power law c(k) = exp(a k^b) to a run's coverage curve."""
        import math

        from rich.console import Console

        from ttscale.analysis import coverage_counts, default_ks
        from ttscale.metrics.scaling import bootstrap_power_law, compare_fit_methods
        from ttscale.runkinds import kind_refusal, run_kind
        from ttscale.store import SampleStore

        store = SampleStore.open(run)
        kind = run_kind(store.manifest)
        if kind != "fixed":
            raise ConfigError(kind_refusal(kind, "a power-law fit of coverage over k", run))
        pool = store.pool(verifier)
        if not pool.has_correctness():
            raise ConfigError("the run has no correctness labels; run `ttscale verify RUN` first")
        # problems of the run without samples are unsolved (as `curve`'s default --missing count)
        n_p, n_c = coverage_counts(pool, "count")
        ks = _int_list(k, "--k") or default_ks(int(n_p.min())).tolist()
        with _ProgressBars(progress) as bars:
            report = bars.reporter()
            bs = bootstrap_power_law(
                n_p, n_c, ks, method=method, n_boot=n_boot, seed=seed,  # type: ignore[arg-type]
                progress=None if report is None else (lambda d, t: report("fit bootstrap", d, t)),
            )
        f = bs.fit
        k_obs = max(ks)  # the largest budget whose coverage was observed (and fitted)
        out: dict = {
            "method": f.method, "a": f.a, "b": f.b,
            "a_ci": [bs.a_low, bs.a_high], "b_ci": [bs.b_low, bs.b_high], "points": f.n_points,
            "missing_samples": {**pool.sample_shortfall(), "policy": "count"},
            "verdicts": pool.meta.get("verdicts"),
            "goodness_of_fit": {
                "r2": None if math.isnan(f.r2) else f.r2, "rmse": f.rmse,
                "max_abs_error": f.max_abs_error, "scale": "coverage",
            },
            "k_max_observed": k_obs,
            "confidence": bs.confidence, "n_boot": n_boot, "seed": seed,
            "bootstrap_failed": bs.n_failed,
        }
        if target is not None:
            out["target"] = target
            out["samples_needed"] = f.samples_needed(target)
            lo, hi, never = bs.samples_needed_interval(target)
            out["samples_needed_ci"] = [_finite(lo), _finite(hi)]
            out["samples_needed_never_fraction"] = never
            out["extrapolation_ratio"] = out["samples_needed"] / k_obs
        ext = _int_list(extrapolate, "--extrapolate")
        if ext:
            lo_c, hi_c = bs.predict_interval(ext)
            out["extrapolation"] = [
                {"k": kk, "coverage": float(f.predict(kk)), "ci": [float(a), float(b)],
                 "extrapolation_ratio": kk / k_obs}
                for kk, a, b in zip(ext, lo_c, hi_c, strict=True)
            ]
        cmp_ = compare_fit_methods(f.ks, f.coverage, at=ext or (), target=target)
        out["methods_compared"] = cmp_.to_dict()
        if json_out:
            typer.echo(json.dumps(out, indent=2))
            return
        c = Console(markup=False)  # "[loglog, 5 points]" is text, not a rich style tag
        pct = round(bs.confidence * 100)
        ms = out["missing_samples"]
        if ms["unsampled"]:
            c.print(f"{ms['unsampled']} of {ms['problems']} problems have no samples: fitted as unsolved")
        c.print(describe_verdicts(out["verdicts"]))
        c.print(
            f"c(k) = exp(a·k^b) [{f.method}, {f.n_points} points]: a = {f.a:.4f} "
            f"[{bs.a_low:.4f}, {bs.a_high:.4f}], b = {f.b:.4f} [{bs.b_low:.4f}, {bs.b_high:.4f}]"
        )
        r2 = "n/a (constant coverage)" if math.isnan(f.r2) else f"{f.r2:.4f}"
        c.print(
            f"goodness of fit on the {f.n_points} fitted points (coverage scale): R² = {r2}, "
            f"RMSE = {f.rmse:.4f}, max |error| = {f.max_abs_error:.4f}"
        )
        if target is not None:
            needed = out["samples_needed"]
            lo, hi, never = bs.samples_needed_interval(target)
            ci = f"{math_ceil(lo)}-{'never' if math.isinf(hi) else math_ceil(hi)}"
            c.print(
                f"samples needed for coverage {target:g}: {math_ceil(needed)} "
                f"({pct}% CI {ci}; bootstrap over problems, {n_boot} replicates, seed {seed}"
                + (f"; {never:.0%} of replicates never reach it" if never else "")
                + ")"
            )
            c.print(_extrapolation_note(needed, k_obs))
        for e in out.get("extrapolation", []):
            c.print(
                f"k = {e['k']}: coverage {e['coverage']:.4f} [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}]; "
                + _extrapolation_note(e["k"], k_obs)
            )
        c.print(_comparison_note(cmp_, f.method))

    @app.command("verifier-utility")
    def verifier_utility_cmd(
        r: Annotated[
            Optional[str],
            typer.Option(help="Analytical: per-type success rates r_j, e.g. 0.87,0.13 (the paper's)."),
        ] = None,
        priors: Annotated[
            Optional[str],
            typer.Option(help="Analytical: type priors p_j summing to 1, e.g. 0.58,0.42 (the paper's)."),
        ] = None,
        completeness: Annotated[
            Optional[float],
            typer.Option("--c", min=0.0, max=1.0,
                         help="Analytical: completeness c = P(accept | correct) (default 1)."),
        ] = None,
        soundness: Annotated[
            Optional[float],
            typer.Option("--s", min=0.0, max=1.0,
                         help="Analytical: soundness s = P(reject | wrong) (default 0.75)."),
        ] = None,
        v_fp: Annotated[
            Optional[float],
            typer.Option(help="Analytical: utility of a false positive, a correct answer being "
                              "worth 1 (default -1; with --run use --cost-ratio)."),
        ] = None,
        max_k: Annotated[
            Optional[int],
            typer.Option(min=1, help="Largest budget K (default: 15, or with --run the largest "
                                     "per-problem sample count)."),
        ] = None,
        mode: Annotated[
            str,
            typer.Option(help="Two-type model formula: exact (expected utility of the mixture) or "
                              "notebook (the authors' notebook, for the paper's numbers)."),
        ] = "exact",
        run: Annotated[
            Optional[Path],
            typer.Option(help="Empirical mode: a run verified by --weak and --strong verifiers."),
        ] = None,
        weak: Annotated[
            Optional[str],
            typer.Option(help="Weak verifier name (the one resampling stops on), e.g. code-visible."),
        ] = None,
        strong: Annotated[
            Optional[str],
            typer.Option(help="Strong verifier name taken as the truth, e.g. code or code-plus."),
        ] = None,
        cost_ratio: Annotated[
            Optional[float],
            typer.Option(min=0.0, help="With --run: cost/benefit ratio C/B; a false positive is "
                                       "worth -C/B (default 1)."),
        ] = None,
        drop_false_negatives: Annotated[
            bool,
            typer.Option("--drop-false-negatives",
                         help="With --run: leave out tasks whose strong pass rate exceeds the weak "
                              "one, as the paper does (default: keep; listed either way)."),
        ] = False,
        empty: Annotated[
            str,
            typer.Option(help="With --run: problems with no sample checked by both verifiers: "
                              "drop (default; listed), zero (reward 0) or error."),
        ] = "drop",
        fit: Annotated[
            bool,
            typer.Option("--fit", help="With --run: fit the two-type model (the paper's and "
                                       "ttscale's pooled estimators) and show its utility."),
        ] = False,
        easy_threshold: Annotated[
            float,
            typer.Option(min=0.0, max=0.999,
                         help="With --fit: a task is easy when its strong pass rate exceeds this."),
        ] = 0.5,
        plot: Annotated[
            Optional[Path],
            typer.Option(help="With --run: write a PNG of the empirical curve (and fitted models)."),
        ] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    ) -> None:
        """Utility of resampling with an imperfect verifier and the optimal number of samples."""
        if mode not in ("exact", "notebook"):
            raise ConfigError(f"--mode must be exact or notebook, got {mode!r}")
        if run is not None:
            given = [name for name, v in (("--r", r), ("--priors", priors), ("--c", completeness),
                                          ("--s", soundness), ("--v-fp", v_fp)) if v is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} describe the analytical model; with --run the model is "
                    "fitted from the run (--fit) and a false positive costs --cost-ratio"
                )
            _empirical_utility_cli(
                run, weak, strong, 1.0 if cost_ratio is None else cost_ratio, max_k,
                drop_false_negatives, empty, fit, mode, easy_threshold, plot, json_out,
            )
            return
        given = [name for name, v in (("--weak", weak), ("--strong", strong),
                                      ("--cost-ratio", cost_ratio), ("--plot", plot)) if v is not None]
        given += [name for name, v in (("--drop-false-negatives", drop_false_negatives),
                                       ("--fit", fit)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} need --run RUN (the empirical mode)")
        _analytical_utility_cli(r, priors, completeness, soundness, v_fp, max_k, mode, json_out)


_MODE_NOTE = {
    "exact": "exact: EV_k = sum_j p_j beta_j^(k-1) (p_correct_j + V_fp p_fp_j); "
             "--mode notebook reproduces the paper's notebook",
    "notebook": "notebook: the authors' notebook formula (product of posterior averages), "
                "the paper's numbers; --mode exact is the mixture's expected utility",
}


def _float_list(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def _analytical_utility_cli(
    r: str | None, priors: str | None, completeness: float | None, soundness: float | None,
    v_fp: float | None, max_k: int | None, mode: str, json_out: bool,
) -> None:
    import numpy as np
    from rich.console import Console

    from ttscale.metrics import scaling

    rr = _float_list(r or "0.87,0.13", "--r")
    pp = _float_list(priors or "0.58,0.42", "--priors")
    if len(rr) != len(pp):
        raise ConfigError("--r and --priors must have the same number of entries")
    c_ = 1.0 if completeness is None else completeness
    s_ = 0.75 if soundness is None else soundness
    v = -1.0 if v_fp is None else v_fp
    K = 15 if max_k is None else max_k
    u = scaling.two_type_utility(K, r=rr, priors=pp, c=c_, s=s_, v_fp=v, mode=mode)  # type: ignore[arg-type]
    ceil = scaling.accuracy_ceiling(np.asarray(rr), c_, s_)
    out = {
        "source": "analytical",
        "mode": mode,
        "model": {"r": rr, "priors": pp, "c": c_, "s": s_, "v_fp": v, "v_correct": 1.0},
        "k": list(range(1, K + 1)),
        "utility": [float(x) for x in u],
        "optimal_k": scaling.optimal_k(u),
        "accuracy_ceiling": [float(x) for x in np.atleast_1d(ceil)],
    }
    if json_out:
        typer.echo(json.dumps(out, indent=2))
        return
    con = Console(highlight=False, markup=False)
    con.print(f"two-type model, mode {_MODE_NOTE[mode]}")
    con.print(
        f"assumed: r = {', '.join(f'{x:g}' for x in rr)}; priors = {', '.join(f'{x:g}' for x in pp)}; "
        f"c = {c_:g}; s = {s_:g}; V_fp = {v:g}; V_correct = 1"
    )
    for kk, uu in zip(out["k"], out["utility"], strict=True):  # type: ignore[call-overload]
        con.print(f"K = {kk:>4}: utility {uu:+.4f}")
    con.print(f"optimal K = {out['optimal_k']} (0 = abstain)")
    con.print(f"accuracy ceiling per type: {', '.join(f'{x:.4f}' for x in out['accuracy_ceiling'])}")  # type: ignore[union-attr]


def _empirical_utility_cli(
    run: Path, weak: str | None, strong: str | None, cost_ratio: float, max_k: int | None,
    drop_false_negatives: bool, empty: str, fit: bool, mode: str, threshold: float,
    plot: Path | None, json_out: bool,
) -> None:
    from rich.console import Console

    from ttscale.metrics.imperfect import plot_verifier_utility, verifier_utility

    if not weak or not strong:
        raise ConfigError("--run needs --weak and --strong verifier names (see `ttscale info RUN`)")
    from ttscale.runkinds import kind_refusal, run_kind
    from ttscale.store import SampleStore

    kind = run_kind(SampleStore.open(run).manifest)
    if kind != "fixed":  # resampling until the weak verifier accepts draws iid samples
        raise ConfigError(kind_refusal(kind, "the utility of resampling until --weak accepts", run))
    if plot is not None:
        from ttscale.paths import check_writable_file

        check_writable_file(plot, "--plot")  # before the whole computation
    if empty not in ("drop", "zero", "error"):
        raise ConfigError(f"--empty must be drop, zero or error, got {empty!r}")
    rep = verifier_utility(
        run, weak, strong, cost_ratio=cost_ratio, max_k=max_k,
        drop_false_negatives=drop_false_negatives, empty=empty, fit=fit,  # type: ignore[arg-type]
        mode=mode, threshold=threshold,  # type: ignore[arg-type]
    )
    if plot is not None:
        plot_verifier_utility(rep, plot, title=f"{run.name}: {weak} vs {strong}")
    out = rep.to_dict()
    out["run"] = str(run)
    if plot is not None:
        out["plot"] = str(plot)
    if json_out:
        typer.echo(json.dumps(out, indent=2))
        return
    con = Console(highlight=False, markup=False)
    con.print(
        f"empirical utility of resampling until {weak} accepts, judged by {strong}: "
        f"{out['n_tasks']} tasks; C/B = {cost_ratio:g} (correct +1, false positive "
        f"{-cost_ratio:g}, abstain 0)"
    )
    names = list(rep.fits)
    if names:
        con.print(f"fitted two-type model, mode {_MODE_NOTE[mode]}")
    for i, (kk, uu) in enumerate(zip(out["k"], out["utility"], strict=True)):
        extra = "".join(f"   {n} model {rep.model_utility[n][i]:+.4f}" for n in names)
        con.print(f"K = {kk:>4}: utility {uu:+.4f}{extra}")
    con.print(f"optimal K = {out['optimal_k']} (0 = abstain)")
    fn = out["false_negative_tasks"]
    ids = ", ".join(fn["ids"][:20]) + (" ..." if fn["count"] > 20 else "")
    how = "dropped" if fn["dropped"] else "kept; --drop-false-negatives leaves them out as the paper does"
    con.print(
        f"false-negative tasks (strong pass rate > weak pass rate): {fn['count']} ({how})"
        + (f": {ids}" if fn["count"] else "")
    )
    em = out["empty_tasks"]
    if em["count"]:
        eids = ", ".join(em["ids"][:20]) + (" ..." if em["count"] > 20 else "")
        what = {"drop": "left out", "zero": "counted as reward 0"}[em["policy"]]
        con.print(f"problems with no sample checked by both verifiers: {em['count']} ({what}): {eids}")
    if out["excluded_samples"]:
        con.print(
            f"samples left out (checked by one verifier only, or an error verdict): "
            f"{out['excluded_samples']}"
        )
    rt = out["rates"]
    con.print(
        "weak verifier vs strong: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in rt.items())
    )
    for n in names:
        f = out["fits"][n]
        r_e = "undefined" if f["r_easy"] is None else f"{f['r_easy']:.4f}"
        r_h = "undefined" if f["r_hard"] is None else f"{f['r_hard']:.4f}"
        c_note = " (assumed)" if n == "paper" else ""
        con.print(
            f"fit [{n}]: r_easy = {r_e}, r_hard = {r_h}, p_easy = {f['p_easy']:.4f}, "
            f"c = {f['completeness']:.4f}{c_note}, s = {f['soundness']:.4f}; "
            f"model optimal K = {f['optimal_k']}"
            + (f" ({'; '.join(f['notes'])})" if f["notes"] else "")
        )
    if plot is not None:
        con.print(f"plot: {plot}")


def _has_top_logprobs(store) -> bool:  # type: ignore[no-untyped-def]
    """Whether any sample of the run carries per-token top log-probs (cheap: a null count)."""
    col = store.table(["top_logprobs"]).column("top_logprobs")
    return bool(col.null_count < len(col))


def _finite(x: float) -> float | None:
    import math

    return x if math.isfinite(x) else None


def _extrapolation_note(k: float, k_obs: int) -> str:
    """Where ``k`` lies against the largest observed budget, in words."""
    ratio = k / k_obs
    if ratio <= 1.0:
        return f"within the observed budgets (k <= {k_obs}): an interpolation"
    note = f"extrapolated {ratio:.3g}x beyond the largest observed k ({k_obs})"
    if ratio > 10:
        note += "; more than 10x beyond the data, treat as a rough guide"
    return note


def _comparison_note(cmp_, used: str) -> str:  # type: ignore[no-untyped-def]
    """One line: do the loglog and NLS fits agree, and which one to trust."""
    if len(cmp_.fits) < 2:
        return f"only {cmp_.recommended} could be fitted: {cmp_.reason}"
    where = f"at k = {cmp_.gap_k:.4g}"
    if not cmp_.disagree:
        return (
            f"loglog and nls fits agree (largest coverage gap {cmp_.max_gap:.4f} {where}); "
            f"{cmp_.recommended} is slightly better: {cmp_.reason}"
        )
    line = f"loglog and nls fits DISAGREE (coverage gap up to {cmp_.max_gap:.4f} {where}"
    if len(cmp_.samples_needed) == 2:
        sn = cmp_.samples_needed
        fmt = {m: "never" if v == float("inf") else str(math_ceil(v)) for m, v in sn.items()}
        line += f"; samples needed: loglog {fmt['loglog']}, nls {fmt['nls']}"
    line += f"); trust {cmp_.recommended}: {cmp_.reason}"
    if cmp_.recommended != used:
        line += f" (rerun with --method {cmp_.recommended})"
    return line


def math_ceil(x: float) -> int:
    import math

    return max(1, math.ceil(x))


def _top_methods(methods: Sequence[str]) -> list[str]:
    """The methods that read DeepConf trace confidences from per-token top log-probs (the
    self-certainty methods read their own values: :func:`_certainties`)."""
    from ttscale.select.rules import RULES

    return [m for m in methods if m in RULES and "top_logprobs" in RULES[m].inputs
            and not m.startswith("self_certainty")]  # fmt: skip


def _certainties(store: Any, pool: Any, methods: Sequence[str]) -> Any:
    """Per-sample self-certainties when a self-certainty method is asked: exact where the run
    stores them for every sample, else the top-k approximation; which one is said on stderr
    now and in the table's notes / the JSON's ``meta.self_certainty``."""
    if not any(m.startswith("self_certainty") for m in methods):
        return None
    from ttscale.select.certainty import pool_certainties

    cert = pool_certainties(store, pool)
    typer.echo(cert.describe(), err=True)
    return cert
