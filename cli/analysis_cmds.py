"""CLI commands for analysis: curve, fit, verifier-utility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ttscale.errors import ConfigError


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


_SHORT = {"coverage": "coverage", "majority": "majority", "weighted": "weighted", "bon": "best-of-N",
          "ppl": "PPL", "pc": "PC", "rpc": "RPC", "deepconf": "DeepConf"}


def print_curve_table(report, console=None) -> None:  # type: ignore[no-untyped-def]
    """A rich table: one row per k, one column per method.

    Up to three methods show ``mean [low, high]``; more show ``mean ±half-width`` to fit a terminal
    (the exact, asymmetric bounds are in ``--json``).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    pct = round(report.confidence * 100)
    wide = len(report.curves) <= 3
    t = Table(title=f"accuracy at budget k ({report.n_problems} problems, {pct}% bootstrap CI)")
    t.add_column("k", justify="right", style="bold")
    for name in report.curves:
        t.add_column(_SHORT.get(name, name), justify="right", no_wrap=True)
    for j, k in enumerate(report.ks.tolist()):
        row = [str(k)]
        for c in report.curves.values():
            m, lo, hi = c.mean[j], c.low[j], c.high[j]
            if m != m:  # NaN: no problem has k samples
                row.append("-")
                continue
            mark = "*" if c.estimator and c.estimator[j].startswith("mc") else ""
            row.append(f"{m:.3f}{mark} [{lo:.3f}, {hi:.3f}]" if wide else f"{m:.3f}{mark} ±{(hi - lo) / 2:.3f}")
        t.add_row(*row)
    console.print(t)
    if any(e.startswith("mc") for c in report.curves.values() for e in c.estimator):
        console.print("[dim]* Monte-Carlo estimate over random subsets (seeded)[/dim]")
    if "rpc_fit" in report.meta:
        console.print(f"RPC Weibull fit: {report.meta['rpc_fit']} (--rpc-fit fast|reference)")
    if report.fit is not None:
        f, b = report.fit.fit, report.fit
        console.print(
            f"coverage fit ({f.method}): c(k) = exp(a·k^b), a = {f.a:.4f} "
            f"[{b.a_low:.4f}, {b.a_high:.4f}], b = {f.b:.4f} [{b.b_low:.4f}, {b.b_high:.4f}]"
        )


def register(app: typer.Typer) -> None:
    """Add ``curve``, ``fit`` and ``verifier-utility`` to ``app``."""

    @app.command("curve")
    def curve_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory.")],
        methods: Annotated[
            str,
            typer.Option(help="Comma-separated: coverage,majority,weighted,bon,ppl,pc,rpc,deepconf."),
        ] = "coverage,majority",
        k: Annotated[
            Optional[str], typer.Option("--k", help="Budgets, e.g. 1,2,4,8 (default: powers of 2).")
        ] = None,
        verifier: Annotated[
            Optional[str], typer.Option(help="Whose answers/correctness to use (default: latest).")
        ] = None,
        score: Annotated[Optional[str], typer.Option(help="Score used by weighted/bon.")] = None,
        score_mapping: Annotated[
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
        tie: Annotated[str, typer.Option(help="expected|first|random tie rule.")] = "expected",
        deepconf_eta: Annotated[
            float, typer.Option(min=0.0, max=100.0, help="DeepConf: percent of traces kept.")
        ] = 10.0,
        deepconf_window: Annotated[
            int, typer.Option(min=1, help="DeepConf: sliding-window length in tokens.")
        ] = 2048,
        seed: Annotated[int, typer.Option(min=0)] = 0,
    ) -> None:
        """Coverage and selection accuracy at each budget k, with CIs, fit and plot."""
        from ttscale.analysis import compute_curves, plot_curves, run_confidences
        from ttscale.store import SampleStore

        store = SampleStore.open(run)
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        pool = store.pool(verifier)
        conf = (
            run_confidences(store, window=deepconf_window) if "deepconf" in method_list else None
        )
        report = compute_curves(
            pool,
            method_list,
            _int_list(k, "--k"),
            score=score,
            score_mapping=score_mapping,
            confidences=conf,
            deepconf_eta=deepconf_eta,
            confidence=confidence,
            n_boot=n_boot,
            n_draws=draws,
            rpc_draws=rpc_draws,
            rpc_fit=rpc_fit,
            tie=tie,
            seed=seed,
            fit=fit,
        )
        if plot is not None:
            plot_curves(report, plot, title=f"{run.name}: {report.n_problems} problems")
        if json_out:
            d = report.to_dict()
            d["run"] = str(run)
            if plot is not None:
                d["plot"] = str(plot)
            typer.echo(json.dumps(d, indent=2))
            return
        print_curve_table(report)
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
        verifier: Annotated[Optional[str], typer.Option()] = None,
        n_boot: Annotated[int, typer.Option(min=10)] = 1000,
        seed: Annotated[int, typer.Option(min=0)] = 0,
        json_out: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Fit the exponentiated power law c(k) = exp(a k^b) to a run's coverage curve."""
        from rich.console import Console

        from ttscale.analysis import default_ks
        from ttscale.scaling import bootstrap_power_law
        from ttscale.store import SampleStore

        pool = SampleStore.open(run).pool(verifier)
        if not pool.has_correctness():
            raise ConfigError("the run has no correctness labels; run `ttscale verify RUN` first")
        n_p = pool.n_per_problem
        ks = _int_list(k, "--k") or default_ks(int(n_p.min())).tolist()
        bs = bootstrap_power_law(
            n_p, pool.correct_counts(), ks, method=method, n_boot=n_boot, seed=seed  # type: ignore[arg-type]
        )
        f = bs.fit
        out: dict = {
            "method": f.method, "a": f.a, "b": f.b,
            "a_ci": [bs.a_low, bs.a_high], "b_ci": [bs.b_low, bs.b_high], "points": f.n_points,
        }
        if target is not None:
            out["target"] = target
            out["samples_needed"] = f.samples_needed(target)
        ext = _int_list(extrapolate, "--extrapolate")
        if ext:
            lo, hi = bs.predict_interval(ext)
            out["extrapolation"] = [
                {"k": kk, "coverage": float(f.predict(kk)), "ci": [float(a), float(b)]}
                for kk, a, b in zip(ext, lo, hi, strict=True)
            ]
        if json_out:
            typer.echo(json.dumps(out, indent=2))
            return
        c = Console()
        c.print(
            f"c(k) = exp(a·k^b) [{f.method}, {f.n_points} points]: a = {f.a:.4f} "
            f"[{bs.a_low:.4f}, {bs.a_high:.4f}], b = {f.b:.4f} [{bs.b_low:.4f}, {bs.b_high:.4f}]"
        )
        if target is not None:
            c.print(f"samples needed for coverage {target:g}: {math_ceil(out['samples_needed'])}")
        for e in out.get("extrapolation", []):
            c.print(f"k = {e['k']}: coverage {e['coverage']:.4f} [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}]")

    @app.command("verifier-utility")
    def verifier_utility_cmd(
        r: Annotated[
            Optional[str], typer.Option(help="Per-type success rates, e.g. 0.87,0.13.")
        ] = None,
        priors: Annotated[Optional[str], typer.Option(help="Type priors, e.g. 0.58,0.42.")] = None,
        completeness: Annotated[float, typer.Option("--c", min=0.0, max=1.0)] = 1.0,
        soundness: Annotated[float, typer.Option("--s", min=0.0, max=1.0)] = 0.75,
        v_fp: Annotated[float, typer.Option(help="Utility of a false positive (< 0).")] = -1.0,
        max_k: Annotated[int, typer.Option(min=1)] = 15,
        mode: Annotated[str, typer.Option(help="exact or notebook.")] = "exact",
        run: Annotated[
            Optional[Path],
            typer.Option(help="Empirical mode: a run verified by --weak and --strong verifiers."),
        ] = None,
        weak: Annotated[Optional[str], typer.Option(help="Weak verifier name (e.g. visible tests).")] = None,
        strong: Annotated[Optional[str], typer.Option(help="Ground-truth verifier name.")] = None,
        cost_ratio: Annotated[float, typer.Option(min=0.0, help="C/B cost of a false positive.")] = 1.0,
        json_out: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Utility of resampling with an imperfect verifier and the optimal number of samples."""
        import numpy as np
        from rich.console import Console

        from ttscale import scaling

        if run is not None:
            out = _empirical_utility(run, weak, strong, cost_ratio, max_k)
        else:
            rr = [float(x) for x in (r or "0.87,0.13").split(",")]
            pp = [float(x) for x in (priors or "0.58,0.42").split(",")]
            if len(rr) != len(pp):
                raise ConfigError("--r and --priors must have the same number of entries")
            u = scaling.two_type_utility(
                max_k, r=rr, priors=pp, c=completeness, s=soundness, v_fp=v_fp, mode=mode  # type: ignore[arg-type]
            )
            ceil = scaling.accuracy_ceiling(np.asarray(rr), completeness, soundness)
            out = {
                "k": list(range(1, max_k + 1)),
                "utility": [float(x) for x in u],
                "optimal_k": scaling.optimal_k(u),
                "accuracy_ceiling": [float(x) for x in np.atleast_1d(ceil)],
                "mode": mode,
            }
        if json_out:
            typer.echo(json.dumps(out, indent=2))
            return
        c = Console()
        for kk, uu in zip(out["k"], out["utility"], strict=True):
            c.print(f"K = {kk:>4}: utility {uu:+.4f}")
        c.print(f"optimal K = {out['optimal_k']} (0 = abstain)")
        if "accuracy_ceiling" in out:
            c.print(f"accuracy ceiling per type: {', '.join(f'{x:.4f}' for x in out['accuracy_ceiling'])}")
        if "rates" in out:
            c.print(f"weak verifier: {out['rates']}")


def math_ceil(x: float) -> int:
    import math

    return max(1, math.ceil(x))


def _empirical_utility(run: Path, weak: str | None, strong: str | None, cost_ratio: float, max_k: int) -> dict:
    import numpy as np

    from ttscale import scaling
    from ttscale.store import SampleStore

    if not weak or not strong:
        raise ConfigError("--run needs --weak and --strong verifier names")
    store = SampleStore.open(run)
    pw, ps = store.pool(weak), store.pool(strong)
    w = np.nan_to_num(pw.correct, nan=0.0) > 0.5
    s = np.nan_to_num(ps.correct, nan=0.0) > 0.5
    off = pw.offsets
    n = np.diff(off)
    cs = lambda x: np.add.reduceat(x.astype(np.int64), off[:-1]) if x.size else np.zeros(0, np.int64)  # noqa: E731
    m_tp, m_fp = cs(w & s), cs(w & ~s)
    ks = np.arange(1, min(max_k, int(n.min())) + 1)
    u = scaling.empirical_reward_at_k(n, m_tp, m_fp, ks, cost_ratio)
    rates = scaling.verifier_rates(w, s)
    return {
        "k": ks.tolist(),
        "utility": [float(x) for x in u],
        "optimal_k": scaling.optimal_k(u, ks),
        "rates": {
            "false_positive_rate": rates.false_positive_rate,
            "false_negative_rate": rates.false_negative_rate,
            "soundness": rates.soundness,
            "completeness": rates.completeness,
        },
    }
