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
            int, typer.Option(min=1, help="Subsets per problem and k for RPC (one Weibull fit each).")
        ] = 50,
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

    from ttscale import scaling

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

    from ttscale.imperfect import plot_verifier_utility, verifier_utility

    if not weak or not strong:
        raise ConfigError("--run needs --weak and --strong verifier names (see `ttscale info RUN`)")
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


def math_ceil(x: float) -> int:
    import math

    return max(1, math.ceil(x))
