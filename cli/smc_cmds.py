"""``ttscale smc``: sequential Monte Carlo with a potential, into a run directory (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttscale.cli.sample_cmds import (
    BenchOpt,
    ChatOpt,
    EngineKind,
    EngineOpt,
    EngineOptOpt,
    LimitOpt,
    MaxTokOpt,
    ModelOpt,
    OutOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    SplitOpt,
    TempOpt,
    TopPOpt,
    _Command,
    _console,
    _default_model,
    _default_out,
    _parse_engine_opts,
)
from ttscale.errors import ConfigError

__all__ = ["register", "run_smc"]

#: what a potential's verdicts are read as, per shaping: log-potentials for ``none``,
#: probabilities (rewards in [0, 1]) for FK steering and the particle filter
_VALUE_FOR_SHAPING = {"none": "log_prob", "pf": "prob"}


def run_smc(
    *,
    model: str | None,
    benchmark: str,
    particles: int,
    potential: str,
    fk: str,
    lam: float,
    resample: str,
    ess: float,
    out: Path | None,
    engine_kind: str = "auto",
    engine_opt: list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    step_stop: list[str] | None = None,
    tokens_per_step: int = 256,
    max_steps: int = 64,
    limit: int | None = None,
    split: str | None = None,
    resume: bool = False,
    chat: bool | None = None,
    verify: bool = True,
    progress: bool = True,
    plot_dir: Path | None = None,
    console: Any = None,
    search: str | None = None,
    width: int = 4,
) -> dict[str, Any]:
    """Resolve, check, build the engine and the potential, run SMC per problem, verify.

    ``search`` (``beam``, ``dvts``, ``bon``) runs step-level search with ``--particles`` beams
    and width ``width`` instead (:class:`~ttscale.samplers.search.SearchSampler`): the
    potential's log-values rank the partial solutions, ``fk``/``resample``/``ess`` do not apply.
    """
    from ttscale.engines import choose_engine, describe_engine, make_engine
    from ttscale.evals import get_benchmark
    from ttscale.paths import check_writable_dir
    from ttscale.samplers.potentials import SHAPINGS, make_potential
    from ttscale.samplers.smc import SMCSampler
    from ttscale.store import SampleStore
    from ttscale.types import SamplingParams
    from ttscale.validation import check_choice

    check_choice("--fk", fk, SHAPINGS)
    if search is not None:
        from ttscale.samplers.search import SEARCH_CONFIGS

        check_choice("--search", search, SEARCH_CONFIGS)
        if plot_dir is not None:
            raise ConfigError(
                "--plot-dir draws SMC's ESS and particle lineage; drop it with --search"
            )
        if search != "bon" and particles % width:
            raise ConfigError(
                f"--search {search} needs --particles divisible by --width {width}, got {particles}"
            )
    if out is not None and (out / "manifest.json").exists() and not resume:
        raise ConfigError(
            f"run directory {out} already exists; pass --resume to continue it, or choose a new --out"
        )
    bench = get_benchmark(benchmark)
    model_note = ""
    if not model:
        model, model_note = _default_model(benchmark)
    split = split or bench.default_split
    problems = bench.load(split, limit=limit)
    if not problems:
        raise ConfigError(f"benchmark {benchmark!r} split {split!r} has no problems")
    params = SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        max_tokens=max_tokens or bench.max_tokens,
        seed=seed or 0,
        logprobs=0,
    )
    stops = tuple(step_stop) if step_stop else ("\n",)
    if search is not None and out is not None and (out / "manifest.json").exists():
        if "smc" in SampleStore.open(out).manifest:
            raise ConfigError(
                f"run directory {out} holds an SMC run, not a search; use a new --out"
            )
    elif out is not None and (out / "manifest.json").exists():
        # fail before the engine loads on a run made with other SMC settings
        from ttscale.samplers.stepwise import StepRun

        StepRun(SampleStore.open(out), "smc", particles, "SMC").check_same(
            {
                "particles": particles,
                "shaping": fk,
                "lambda": lam,
                "resample": resample,
                "ess_threshold": 1.0 if fk == "pf" else ess,
                "step_stop": list(stops),
                "tokens_per_step": tokens_per_step,
                "max_steps": max_steps,
            },
        )
    out = out or _default_out(f"{benchmark}-smc")
    check_writable_dir(out, "--out")
    if plot_dir is not None:
        check_writable_dir(plot_dir, "--plot-dir")
    options = _parse_engine_opts(engine_opt or [])
    choice = choose_engine(engine_kind, str(model))
    value = "log_prob" if search else _VALUE_FOR_SHAPING.get(fk, "prob")
    pot = make_potential(potential, value=value, engine_kind=engine_kind)
    if search:
        typer.echo(
            f"potential {potential}: log-potential (log_prob) ranks partial solutions; "
            f"search {search}, N={particles}" + (f", M={width}" if search != "bon" else ""),
            err=True,
        )
    else:
        typer.echo(
            f"potential {potential}: {'log-potential' if fk == 'none' else 'reward in [0, 1]'} "
            f"({value}), shaping {fk}" + (f", lambda {lam:g}" if fk not in ("none", "pf") else ""),
            err=True,
        )
    engine = make_engine(choice.kind, model, **options)
    typer.echo(
        describe_engine(
            engine.info(), model=str(model), model_note=model_note, reason=choice.reason
        ),
        err=True,
    )
    manifest = {"model": str(model), "benchmark": benchmark, "split": split, "limit": limit}
    try:
        sampler: Any
        if search:
            from ttscale.samplers.search import SearchSampler

            sampler = SearchSampler(
                engine,
                pot,
                params,
                search=search,
                width=width,
                step_stop=stops,
                step_tokens=tokens_per_step,
                max_steps=max_steps,
                max_tokens=params.max_tokens,
                chat=bool(chat),
                manifest=manifest,
            )
        else:
            sampler = SMCSampler(
                engine,
                pot,
                params,
                shaping=fk,
                lam=lam,
                resample=resample,
                ess_threshold=ess,
                step_stop=stops,
                tokens_per_step=tokens_per_step,
                max_steps=max_steps,
                chat=bool(chat),
                progress=None if progress else False,
                manifest=manifest,
            )
        store = (
            SampleStore.open_or_create(out, manifest)
            if resume
            else SampleStore.create(out, manifest)
        )
        log_ml: list[float] = []
        tokens = resumed = 0
        try:
            for res in sampler.sample(problems, particles, seed=params.seed, sink=store):
                if plot_dir is not None:
                    from ttscale.samplers.smc import plot_lineage

                    plot_dir.mkdir(parents=True, exist_ok=True)
                    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in res.problem_id)
                    plot_lineage(res, plot_dir / f"{safe}.png")
                if res.info.get("resumed"):
                    resumed += 1  # its tokens were spent (and accounted) by an earlier call
                else:  # less the steps a resumed problem replayed from its journal
                    tokens += res.generated_tokens - int(res.info.get("replayed_tokens", 0))
                if res.info.get("log_ml") is not None:
                    log_ml.append(float(res.info["log_ml"]))
        except KeyboardInterrupt:
            typer.echo(
                f"interrupted: finished problems are stored in {out} (the one left part-way "
                f"is journaled); continue with "
                f"`ttscale smc ... --out {out} --resume`",
                err=True,
            )
            raise typer.Exit(130) from None
    finally:
        engine.close()
        close = getattr(pot, "close", None)
        if callable(close):
            close()
    summary: dict[str, Any] = {
        "run": str(out),
        "problems": len(problems),
        "particles": particles,
        "resumed_problems": resumed,
        "generated_tokens": tokens,
    }
    if console is not None and search:
        console.print(
            f"search {search}: {len(problems)} problems x {particles} beams ({resumed} resumed), "
            f"{tokens:,} tokens generated in this call"
        )
    elif console is not None:
        console.print(
            f"SMC: {len(problems)} problems x {particles} particles ({resumed} resumed), "
            f"{tokens:,} tokens generated in this call, shaping {fk}, {resample} resampling at "
            f"ESS < {ess:g}·N"
        )
    if verify:
        from ttscale.verifiers.runner import verify_store

        vs = verify_store(store, bench.verifier)
        summary["verify"] = {k: vs.get(k) for k in ("verifier", "verified", "new")}
        if console is not None:
            console.print(
                f"verified {vs.get('verified', 0):,} particle-steps with [bold]{vs['verifier']}"
                f"[/bold]; weighted results: [bold]ttscale curve {out}[/bold]"
            )
    return summary


def register(app: typer.Typer) -> None:
    """Add ``smc`` to ``app``."""

    @app.command("smc", cls=_Command)
    def smc_cmd(
        model: ModelOpt = None,
        benchmark: BenchOpt = None,
        particles: Annotated[
            int, typer.Option("--particles", "-N", min=1, help="Particles per problem.")
        ] = 16,
        potential: Annotated[
            Optional[str],
            typer.Option(
                "--potential",
                help="Potential spec: rm:PATH (reward model / PRM), judge:MODEL, "
                "py:MODULE:NAME, or a registered name (e.g. arith-prm).",
            ),
        ] = None,
        fk: Annotated[
            str,
            typer.Option(
                "--fk",
                help="How potential values become weights: none (log-potentials), FK steering "
                "immediate|difference|max|sum of a reward, or pf (Puri et al. particle filter).",
            ),
        ] = "difference",
        lam: Annotated[float, typer.Option("--lambda", help="FK strength lambda.")] = 10.0,
        resample: Annotated[
            str, typer.Option(help="multinomial|stratified|systematic|residual.")
        ] = "systematic",
        ess: Annotated[
            float,
            typer.Option(
                "--ess", min=0.0, max=1.0, help="Resample when ESS < ESS·N (1 = every step)."
            ),
        ] = 0.5,
        step_stop: Annotated[
            Optional[list[str]],
            typer.Option("--step-stop", help="String ending a step (repeatable) [newline]."),
        ] = None,
        tokens_per_step: Annotated[
            int, typer.Option(min=1, help="Most tokens in one step (1 = token-level SMC).")
        ] = 256,
        max_steps: Annotated[int, typer.Option(min=1, help="Most steps per particle.")] = 64,
        out: OutOpt = None,
        engine: EngineOpt = EngineKind.auto,
        engine_opt: EngineOptOpt = None,
        temperature: TempOpt = None,
        top_p: TopPOpt = None,
        max_tokens: MaxTokOpt = None,
        seed: SeedOpt = None,
        limit: LimitOpt = None,
        split: SplitOpt = None,
        resume: ResumeOpt = False,
        chat: ChatOpt = None,
        verify: Annotated[
            bool, typer.Option("--verify/--no-verify", help="Verify with the benchmark's checker.")
        ] = True,
        progress: ProgressOpt = True,
        search: Annotated[
            Optional[str],
            typer.Option(
                "--search",
                help="Step-level search instead of SMC: beam (keep the best N/M, expand each M "
                "ways), dvts (N/M independent subtrees) or bon (best-of-N with step scores).",
            ),
        ] = None,
        width: Annotated[
            int, typer.Option("--width", "-M", min=1, help="M: expansions per kept beam.")
        ] = 4,
        plot_dir: Annotated[
            Optional[Path],
            typer.Option(
                "--plot-dir", help="Write DIR/<problem>.png: ESS per step and particle lineage."
            ),
        ] = None,
    ) -> None:
        """Sequential Monte Carlo over reasoning steps, weighted by a potential (resumable).

        Each step extends every live particle to its next --step-stop (or EOS, or
        --tokens-per-step tokens), scores it with --potential and resamples when the ESS falls
        below --ess·N. `ttscale curve RUN` then reports the weighted results.
        """
        if potential is None:
            raise ConfigError("--potential is required (e.g. rm:PATH, judge:MODEL, arith-prm)")
        if benchmark is None:
            raise ConfigError("--benchmark is required (see `ttscale bench list`)")
        run_smc(
            model=model,
            benchmark=benchmark,
            particles=particles,
            potential=potential,
            fk=fk,
            lam=lam,
            resample=resample,
            ess=ess,
            out=out,
            engine_kind=engine.value,
            engine_opt=engine_opt,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            step_stop=step_stop,
            tokens_per_step=tokens_per_step,
            max_steps=max_steps,
            limit=limit,
            split=split,
            resume=resume,
            chat=chat,
            verify=verify,
            progress=progress,
            plot_dir=plot_dir,
            console=_console(),
            search=search,
            width=width,
        )
