"""``ttscale smc``: sequential Monte Carlo with a potential, into a run directory (resumable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttscale.cli.sample_cmds import (
    EngineOptions,
    SampleSpec,
    _Command,
    _console,
    resolve_run,
    resume_command,
    verifier_label,
    with_options,
)
from ttscale.errors import ConfigError

__all__ = ["SMCSettings", "register", "run_smc"]

#: what a potential's verdicts are read as, per shaping: log-potentials for ``none``,
#: probabilities (rewards in [0, 1]) for FK steering and the particle filter
_VALUE_FOR_SHAPING = {"none": "log_prob", "pf": "prob"}

#: SMC's own settings, with their defaults and option names; ``--search`` takes none of them
_SMC_ONLY = {
    "fk": ("--fk", "difference"),
    "lam": ("--lambda", 10.0),
    "resample": ("--resample", "systematic"),
    "ess": ("--ess", 0.5),
    "plot_dir": ("--plot-dir", None),
}
DEFAULT_WIDTH = 4


@dataclass(frozen=True)
class SMCSettings:
    """What ``ttscale smc`` adds to the sampling options: the potential and either SMC's
    weighting and resampling or a step-level search. ``None``: not given (the default applies;
    see :data:`_SMC_ONLY`), so an option that does not apply to the chosen method is refused
    rather than silently ignored."""

    potential: str
    particles: int = 16
    fk: str | None = None
    lam: float | None = None
    resample: str | None = None
    ess: float | None = None
    step_stop: tuple[str, ...] = ()
    tokens_per_step: int = 256
    max_steps: int = 64
    verify: bool = True
    plot_dir: Path | None = None
    search: str | None = None
    width: int | None = None

    def check(self) -> None:
        """One line for an option the chosen method does not take, before anything loads."""
        from ttscale.samplers.potentials import SHAPINGS
        from ttscale.samplers.search import SEARCH_CONFIGS
        from ttscale.validation import check_choice

        if self.search is None:
            if self.width is not None:
                raise ConfigError("--width is the expansions per beam of --search beam|dvts; SMC "
                                  "has none: drop --width or add --search")  # fmt: skip
            from ttscale.particles.resampling import RESAMPLERS

            check_choice("--fk", self.value("fk"), SHAPINGS)
            check_choice("--resample", self.value("resample"), tuple(RESAMPLERS))
            return
        if self.search == "bon":
            raise ConfigError(
                "--search bon is spelled best_of_n (as in `curve --methods`): --search best_of_n"
            )
        check_choice("--search", self.search, SEARCH_CONFIGS)
        given = [opt for name, (opt, _) in _SMC_ONLY.items() if getattr(self, name) is not None]
        if given:
            raise ConfigError(
                f"--search {self.search} does not take {', '.join(given)} (SMC's weighting, "
                f"resampling and lineage plots); drop {'it' if len(given) == 1 else 'them'} or "
                "drop --search"
            )
        if self.search == "best_of_n" and self.width is not None:
            raise ConfigError("--search best_of_n draws N independent solutions; drop --width")
        if self.search != "best_of_n" and self.particles % self.width_or_default:
            raise ConfigError(
                f"--search {self.search} needs --particles divisible by --width "
                f"{self.width_or_default}, got {self.particles}"
            )

    @property
    def width_or_default(self) -> int:
        return DEFAULT_WIDTH if self.width is None else self.width

    def value(self, name: str) -> Any:
        """An SMC setting as given, else its default."""
        got = getattr(self, name)
        return _SMC_ONLY[name][1] if got is None else got


def run_smc(spec: SampleSpec, smc: SMCSettings, *, console: Any = None) -> dict[str, Any]:
    """Resolve (:func:`~ttscale.cli.sample_cmds.resolve_run`, as ``sample`` does), check,
    build the engine and the potential, run SMC (or ``smc.search``) per problem, verify.

    ``spec``: the sampling options (``spec.n`` is unused: ``smc.particles`` is the budget);
    ``--batch-size`` caps the particles extended in one engine call (SMC) or sets how many
    problems' steps share one call (search: ``batch_size // particles``, at least one).
    """
    from ttscale.paths import check_writable_dir
    from ttscale.samplers.potentials import make_potential
    from ttscale.samplers.smc import SMCSampler
    from ttscale.store import SampleStore
    from ttscale.types import SamplingParams

    smc.check()
    search = smc.search
    fk, lam = smc.value("fk"), smc.value("lam")
    resample, ess = smc.value("resample"), smc.value("ess")
    # the run's own settings check (_check_same_smc / _check_same_search) covers a resumed
    # run; its recorded sampling is the samplers' per-step one, so it is not merged back
    prefix = f"{spec.benchmark}-{search or 'smc'}" if spec.benchmark else None
    r = resolve_run(spec, default_n=smc.particles, out_prefix=prefix, resume_sampling=False)
    out, problems = r.out, r.mine
    params = SamplingParams.from_dict({"temperature": 1.0, "seed": 0, "logprobs": 0, **r.sampling, "n": 1})
    stops = tuple(smc.step_stop) if smc.step_stop else ("\n",)
    if search is not None and r.old and "smc" in r.old:
        raise ConfigError(f"run directory {out} holds an SMC run, not a search; use a new --out")
    if search is None and r.old:
        # fail before the engine loads on a run made with other SMC settings
        from ttscale.samplers.stepwise import StepRun

        StepRun(SampleStore.open(out), "smc", smc.particles, "SMC").check_same(
            {
                "particles": smc.particles,
                "shaping": fk,
                "lambda": lam,
                "resample": resample,
                "ess_threshold": 1.0 if fk == "pf" else ess,
                "step_stop": list(stops),
                "tokens_per_step": smc.tokens_per_step,
                "max_steps": smc.max_steps,
            },
        )
    if smc.plot_dir is not None:
        check_writable_dir(smc.plot_dir, "--plot-dir")
    value = "log_prob" if search else _VALUE_FOR_SHAPING.get(fk, "prob")
    pot = make_potential(smc.potential, value=value, engine_kind=spec.engine.value)
    particles, width = smc.particles, smc.width_or_default
    if search:
        typer.echo(
            f"potential {smc.potential}: log-potential (log_prob) ranks partial solutions; "
            f"search {search}, N={particles}" + (f", M={width}" if search != "best_of_n" else ""),
            err=True,
        )
    else:
        typer.echo(
            f"potential {smc.potential}: "
            f"{'log-potential' if fk == 'none' else 'reward in [0, 1]'} ({value}), shaping {fk}"
            + (f", lambda {lam:g}" if fk not in ("none", "pf") else ""),
            err=True,
        )
    engine = r.build_engine(call_batch=spec.batch_size)
    manifest = r.manifest
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
                step_tokens=smc.tokens_per_step,
                max_steps=smc.max_steps,
                max_tokens=params.max_tokens,
                batch_problems=max(1, spec.batch_size // particles),
                chat=bool(spec.chat),
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
                tokens_per_step=smc.tokens_per_step,
                max_steps=smc.max_steps,
                chat=bool(spec.chat),
                progress=None if spec.progress else False,
                manifest=manifest,
                batch_size=spec.batch_size,
            )
        store = (
            SampleStore.open_or_create(out, manifest)
            if spec.resume
            else SampleStore.create(out, manifest)
        )
        log_ml: list[float] = []
        tokens = resumed = 0
        try:
            for res in sampler.sample(problems, particles, seed=params.seed, sink=store):
                if smc.plot_dir is not None:
                    from ttscale.samplers.smc import plot_lineage

                    smc.plot_dir.mkdir(parents=True, exist_ok=True)
                    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in res.problem_id)
                    plot_lineage(res, smc.plot_dir / f"{safe}.png")
                if res.info.get("resumed"):
                    resumed += 1  # its tokens were spent (and accounted) by an earlier call
                else:  # less the steps a resumed problem replayed from its journal
                    tokens += res.generated_tokens - int(res.info.get("replayed_tokens", 0))
                if res.info.get("log_ml") is not None:
                    log_ml.append(float(res.info["log_ml"]))
        except KeyboardInterrupt:
            typer.echo(
                f"interrupted: finished problems are stored in {out} (the one left part-way "
                f"is journaled); continue with: {resume_command('smc', out, spec.given)}",
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
    if smc.verify:
        from ttscale.verifiers.runner import verify_store

        vs = verify_store(store, r.bench.verifier)
        summary["verify"] = {k: vs.get(k) for k in ("verifier", "verified", "new")}
        if console is not None:
            console.print(
                f"verified {vs.get('verified', 0):,} particle-steps with [bold]{verifier_label(vs)}"
                f"[/bold]; weighted results: [bold]ttscale curve {out}[/bold]"
            )
    return summary


def register(app: typer.Typer) -> None:
    """Add ``smc`` to ``app``."""

    @app.command("smc", cls=_Command)
    @with_options(EngineOptions, own_first=True)
    def smc_cmd(
        opts: EngineOptions,
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
            Optional[str],
            typer.Option(
                "--fk",
                help="How potential values become weights: none (log-potentials), FK steering "
                "immediate|difference|max|sum of a reward, or pf (Puri et al. particle filter) "
                "[difference].",
            ),
        ] = None,
        lam: Annotated[
            Optional[float], typer.Option("--lambda", help="FK strength lambda [10].")
        ] = None,
        resample: Annotated[
            Optional[str],
            typer.Option(help="multinomial|stratified|systematic|residual [systematic]."),
        ] = None,
        ess: Annotated[
            Optional[float],
            typer.Option(
                "--ess", min=0.0, max=1.0, help="Resample when ESS < ESS·N (1 = every step) [0.5]."
            ),
        ] = None,
        step_stop: Annotated[
            Optional[list[str]],
            typer.Option("--step-stop", help="String ending a step (repeatable) [newline]."),
        ] = None,
        tokens_per_step: Annotated[
            int, typer.Option(min=1, help="Most tokens in one step (1 = token-level SMC).")
        ] = 256,
        max_steps: Annotated[int, typer.Option(min=1, help="Most steps per particle.")] = 64,
        verify: Annotated[
            bool, typer.Option("--verify/--no-verify", help="Verify with the benchmark's checker.")
        ] = True,
        search: Annotated[
            Optional[str],
            typer.Option(
                "--search",
                help="Step-level search instead of SMC: beam (keep the best N/M, expand each M "
                "ways), dvts (N/M independent subtrees) or best_of_n (N solutions scored per "
                "step); takes none of SMC's --fk, --lambda, --resample, --ess, --plot-dir.",
            ),
        ] = None,
        width: Annotated[
            Optional[int],
            typer.Option(
                "--width", "-M", min=1, help=f"M: expansions per kept beam [{DEFAULT_WIDTH}]."
            ),
        ] = None,
        plot_dir: Annotated[
            Optional[Path],
            typer.Option(
                "--plot-dir", help="Write DIR/<problem>.png: ESS per step and particle lineage."
            ),
        ] = None,
    ) -> None:
        """Sequential Monte Carlo over reasoning steps, weighted by a potential (resumable).

        Each step extends every live particle to its next --step-stop (or EOS, a --stop string,
        or --tokens-per-step tokens), scores it with --potential and resamples when the ESS
        falls below --ess·N. `ttscale curve RUN` then reports the weighted results.
        """
        if potential is None:
            raise ConfigError("--potential is required (e.g. rm:PATH, judge:MODEL, arith-prm)")
        settings = SMCSettings(
            potential=potential, particles=particles, fk=fk, lam=lam, resample=resample,
            ess=ess, step_stop=tuple(step_stop or ()), tokens_per_step=tokens_per_step,
            max_steps=max_steps, verify=verify, plot_dir=plot_dir, search=search, width=width,
        )  # fmt: skip
        run_smc(opts.spec(command="smc"), settings, console=_console())
