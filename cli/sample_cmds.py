"""CLI: ``ttscale sample``, ``ttscale run`` (sample, verify, curve) and ``ttscale demo``."""

from __future__ import annotations

import datetime as _dt
import enum
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core

from ttscale.cli.verify_cmds import IsolationChoice, IsolationOpt, default_verifier_spec
from ttscale.errors import ConfigError


class EngineKind(str, enum.Enum):
    """Inference engines ``--engine`` accepts (``auto``: see ``ttscale.engines.choose_engine``)."""

    auto = "auto"
    vllm = "vllm"
    openai = "openai"
    hf = "hf"
    scripted = "scripted"


DEFAULT_N = 16
DEFAULT_BATCH = 512

# Demo size: about 40 s on the shared 2-core CPU machine (load ~4) with transformers, 3,200
# samples; coverage visibly keeps growing to k=64 while majority vote flattens.
DEMO_PROBLEMS = 50
DEMO_N = 64
DEMO_MAX_TOKENS = 96


class _Command(typer.core.TyperCommand):
    """A command whose out-of-range option values are one-line user errors (exit code 1)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as e:
            # raised inside the group's invoke, which prints TtscaleErrors as one line, exit 1
            raise ConfigError(" ".join(e.format_message().split())) from None


# -- shared option types -----------------------------------------------------------------------

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Model: a local folder, .gguf file or cached model id [the bundled model for arith; "
        "required for any other benchmark].",
    ),
]
BenchOpt = Annotated[
    Optional[str], typer.Option("--benchmark", "-b", help="Benchmark name (ttscale bench list).")
]
NOpt = Annotated[
    Optional[int],
    typer.Option("--n", "-n", min=1, help=f"Samples per problem [default: {DEFAULT_N}]."),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Run directory [default: runs/<benchmark>-<time>]."),
]
EngineOpt = Annotated[
    EngineKind,
    typer.Option(
        "--engine",
        "-e",
        help="Inference engine (auto: vLLM if installed and a GPU is visible, else transformers; "
        "scripted: the test engine).",
    ),
]
BaseUrlOpt = Annotated[
    Optional[list[str]],
    typer.Option("--base-url", help="OpenAI-compatible server URL (repeat to spread load)."),
]
EngineOptOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--engine-opt",
        help="Engine constructor option KEY=VALUE (JSON values), e.g. batch_size=64; repeatable.",
    ),
]
TempOpt = Annotated[
    Optional[float], typer.Option("--temperature", min=0.0, help="Sampling temperature [1.0].")
]
TopPOpt = Annotated[
    Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus mass in (0, 1] [1.0].")
]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=0, help="Top-k (0 = off) [0].")]
MaxTokOpt = Annotated[
    Optional[int],
    typer.Option("--max-tokens", min=1, help="Max generated tokens [benchmark default]."),
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, help="Run seed [0].")]
StopOpt = Annotated[
    Optional[list[str]],
    typer.Option("--stop", help="Stop string (repeatable) [benchmark default]."),
]
LogprobsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--logprobs", min=0, help="Top-K log-probs per token (0 = sampled token only) [0]."
    ),
]
LimitOpt = Annotated[
    Optional[int], typer.Option("--limit", min=1, help="Use the first P problems.")
]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Benchmark split [its default].")]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue (or extend) an existing run directory."),
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        help="Samples per engine call, across problems; also the transformers engine's decode "
        "batch unless --engine-opt batch_size=... sets it.",
    ),
]
ChatOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--chat/--no-chat",
        help="Send chat messages (model's chat template) instead of the raw prompt [auto].",
        show_default=False,
    ),
]
SystemOpt = Annotated[Optional[str], typer.Option("--system-prompt", help="System message (chat).")]
ProgressOpt = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show a progress bar (on a terminal).")
]
ShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--shard",
        help="Sample only shard i of N (problems i, i+N, ...), e.g. 0/4: one worker per shard, "
        "into one run directory or separate ones joined with `ttscale merge`.",
    ),
]
# test hook: seconds of delay per finished request (makes a run slow enough to kill midway)
ThrottleOpt = Annotated[
    float,
    typer.Option(
        "--throttle", min=0.0, hidden=True,
        help="Testing aid: delay each finished request by this many seconds.",
    ),
]
PruneOpt = Annotated[
    Optional[str],
    typer.Option(
        "--prune",
        help="Stop traces mid-generation by a rule: deepconf-online:eta=10,warmup=16,window=2048, "
        "lowprob:threshold=-1.5[,min_tokens=16] or selfeval:checkpoint=64,threshold=0.5 "
        "(see README, 'Pruning traces mid-generation').",
    ),
]
FlushOpt = Annotated[
    int,
    typer.Option(
        "--flush-every", min=1, hidden=True,
        help="Write a shard after this many finished samples (smaller: less lost to a kill).",
    ),
]


@dataclass
class SampleSpec:
    """Everything ``ttscale sample`` was asked for, before defaults are resolved."""

    model: str | None = None
    benchmark: str | None = None
    n: int | None = None
    out: Path | None = None
    engine: EngineKind = EngineKind.auto
    base_url: Sequence[str] = ()
    engine_opt: Sequence[str] = ()
    engine_options: dict[str, Any] = field(default_factory=dict)  # merged under --engine-opt
    sampling: dict[str, Any] = field(default_factory=dict)  # explicit CLI values only
    limit: int | None = None
    split: str | None = None
    resume: bool = False
    batch_size: int = DEFAULT_BATCH
    chat: bool | None = None
    system_prompt: str | None = None
    progress: bool = True
    throttle: float = 0.0
    flush_every: int = 256
    shard: str | None = None
    command: str = "sample"  # the command to name in "continue with ..." after Ctrl-C
    outputs: Sequence[Path] = ()  # further files the command writes (checked before sampling)
    adaptive: str | None = None  # level-1 stopping rule (ttscale.select.adaptive spec)
    prune: str | None = None  # a pruning rule (samplers.pruning): level-2 adaptive compute
    allocate: str | None = None  # allocation policy across problems (ttscale.select.allocation)
    budget_total: float | None = None  # --allocate: dataset budget in samples (or tokens)
    budget_tokens: bool = False  # --allocate: the budget counts generated tokens
    stop_rule: str | None = None  # --allocate: a stopping rule closing problems early


# -- helpers ------------------------------------------------------------------------------------


def _parse_engine_opts(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--engine-opt must look like KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _default_out(prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in prefix)
    return Path("runs") / f"{safe}-{stamp}"


def _explicit_sampling(
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    max_tokens: int | None,
    seed: int | None,
    stop: Sequence[str] | None,
    logprobs: int | None,
) -> dict[str, Any]:
    given = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": tuple(stop) if stop else None,
        "logprobs": logprobs,
    }
    return {k: v for k, v in given.items() if v is not None}


class _Throttled:
    """Test hook: delays each finished request by ``delay`` seconds (``--throttle``)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.name = inner.name

    def generate(self, requests: Any, params: Any, *, on_result: Any = None) -> Any:
        def slow(pos: int, comps: Any) -> None:
            time.sleep(self.delay)
            if on_result is not None:
                on_result(pos, comps)

        return self.inner.generate(requests, params, on_result=slow)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class SampleResult:
    store: Any
    summary: Any
    benchmark: Any
    problems: list[Any]
    engine_info: Mapping[str, Any]


def run_sample(spec: SampleSpec, *, console: Any = None) -> SampleResult:
    """Resolve defaults, check everything cheap, then build the engine and sample.

    Defaults, lowest first: ``SamplingParams`` defaults, the benchmark's (max_tokens, stop), the
    run's manifest when resuming, then what was given on the command line. Bad input fails before
    the (slow) engine is built and before a run directory is created.
    """
    from ttscale.engines import choose_engine, describe_engine, make_engine
    from ttscale.evals import get_benchmark
    from ttscale.paths import check_writable_dir, check_writable_file
    from ttscale.samplers import RepeatedSampler
    from ttscale.samplers.repeated import parse_shard, shard_problems
    from ttscale.store import SampleStore
    from ttscale.types import SamplingParams

    shard = parse_shard(spec.shard) if spec.shard is not None else None
    if spec.adaptive is not None:
        from ttscale.select.adaptive import parse_rule

        parse_rule(spec.adaptive)  # a bad rule fails before anything loads
        if shard is not None:
            raise ConfigError("--adaptive runs one worker over all problems; drop --shard")
    if spec.adaptive is not None and spec.prune is not None:
        raise ConfigError("give --adaptive (stop each problem early) or --prune (stop traces), not both")
    if spec.allocate is not None:
        from ttscale.cli.allocation_cmds import check_sample_allocate

        check_sample_allocate(spec, shard)  # a bad policy fails before anything loads
    prune_rule = _check_prune(spec)
    out = spec.out
    old: dict[str, Any] = {}
    if out is not None and (out / "manifest.json").exists():
        if not spec.resume:
            raise ConfigError(
                f"run directory {out} already exists; pass --resume to continue or extend it, "
                "or choose a new --out"
            )
        old = SampleStore.open(out).manifest
    bench_name = spec.benchmark or old.get("benchmark")
    if not bench_name:
        raise ConfigError("--benchmark is required (see `ttscale bench list`)")
    bench = get_benchmark(bench_name)
    model = spec.model or old.get("model")
    model_note = ""
    if not model:
        model, model_note = _default_model(bench_name)
    elif Path(str(model)).resolve() == _bundled_model_path().resolve():
        model_note = "bundled arith model"
    split = spec.split or old.get("split") or bench.default_split

    base: dict[str, Any] = {"max_tokens": bench.max_tokens, "stop": tuple(bench.stop)}
    old_sampling = dict(old.get("sampling") or {})
    old_sampling.pop("n", None)
    base.update(old_sampling)
    base.update(spec.sampling)
    n = spec.n or (int(old["sampling"]["n"]) if old.get("sampling") else DEFAULT_N)
    if prune_rule is not None and prune_rule.needs == "top_logprobs" and "logprobs" not in base:
        base["logprobs"] = 20
        typer.echo(
            f"--prune {prune_rule.name} needs top log-probs: sampling with logprobs=20", err=True
        )
    params = SamplingParams.from_dict({**base, "n": n})
    limit = spec.limit if spec.limit is not None else old.get("limit")
    problems = bench.load(split, limit=limit)
    if not problems:
        raise ConfigError(f"benchmark {bench_name!r} split {split!r} has no problems")

    manifest = {"model": str(model), "benchmark": bench_name, "split": split, "limit": limit}
    if old:
        # fail now, before minutes of engine start-up, on a run made with other settings
        SampleStore.open(out).check_compatible({**manifest, "sampling": params.to_dict()})
    mine = shard_problems(problems, shard)
    if not mine:
        raise ConfigError(f"shard {spec.shard} of {len(problems)} problems is empty; use fewer shards")
    # every output must be writable before the engine loads (minutes, for a large model)
    if out is None:
        out = _default_out(f"{bench_name}")
    check_writable_dir(out, "--out")
    for extra in spec.outputs:
        check_writable_file(extra, "--plot")

    options = {**spec.engine_options, **_parse_engine_opts(spec.engine_opt)}
    if spec.base_url:
        if spec.engine is not EngineKind.openai:
            raise ConfigError("--base-url applies to --engine openai only")
        options["base_urls"] = list(spec.base_url)
    choice = choose_engine(spec.engine.value, str(model))
    engine = make_engine(choice.kind, model, **options)
    line = describe_engine(
        engine.info(),
        model=str(model),
        model_note=model_note,
        reason=choice.reason,
        call_batch=spec.batch_size,
    )
    typer.echo(line, err=True)
    try:
        if spec.throttle > 0:
            engine = _Throttled(engine, spec.throttle)
        store = (
            SampleStore.open_or_create(out, manifest)
            if spec.resume
            else SampleStore.create(out, manifest)
        )
        if prune_rule is not None:
            summary = _run_pruning(spec, engine, params, store, problems, n, prune_rule, manifest)
            info = dict(engine.info())
            if console is not None:
                _print_summary(console, summary, info)
                _print_pruning(console, store)
            return SampleResult(store, summary, bench, problems, info)
        sampler = RepeatedSampler(
            engine,
            params,
            store,
            batch_size=spec.batch_size,
            flush_every=spec.flush_every,
            progress=None if spec.progress else False,
            chat=spec.chat,
            system_prompt=spec.system_prompt,
            manifest=manifest,
        )
        try:
            if spec.allocate is not None:
                from ttscale.cli.allocation_cmds import sample_allocate

                summary = sample_allocate(
                    engine, params, store, problems, n, spec.allocate, spec.budget_total,
                    spec.budget_tokens, spec.stop_rule, bench, spec, manifest,
                )
            elif spec.adaptive is not None:
                from ttscale.cli.replay_cmds import sample_adaptive

                summary = sample_adaptive(
                    engine, params, store, problems, n, spec.adaptive, bench, spec, manifest
                )
            else:
                summary = sampler.run(problems, n=n, shard=shard)
        except KeyboardInterrupt:
            _report_interrupt(spec, out, mine, n)
            raise typer.Exit(130) from None
        info = dict(engine.info())
    finally:
        engine.close()
    if console is not None:
        _print_summary(console, summary, info)
    return SampleResult(store, summary, bench, problems, info)


def _check_prune(spec: SampleSpec) -> Any:
    """The ``--prune`` rule (parsed before anything slow), or ``None``."""
    if spec.prune is None:
        return None
    from ttscale.samplers.pruning import parse_prune_rule

    rule = parse_prune_rule(spec.prune)
    if spec.resume:
        raise ConfigError("--prune runs do not resume; sample into a new --out")
    if spec.shard is not None:
        raise ConfigError("--prune does not take --shard; run one pruning worker per run directory")
    return rule


def _run_pruning(
    spec: SampleSpec,
    engine: Any,
    params: Any,
    store: Any,
    problems: Sequence[Any],
    n: int,
    rule: Any,
    manifest: Mapping[str, Any],
) -> Any:
    """``sample --prune``: a :class:`PruningSampler` run; returns a ``SamplingSummary``."""
    from ttscale.samplers import RepeatedSampler
    from ttscale.samplers.pruning import PruningSampler
    from ttscale.samplers.repeated import SamplingSummary

    chat = RepeatedSampler(engine, params, chat=spec.chat).chat  # the engine's template, if any
    sampler = PruningSampler(
        engine,
        params,
        rule,
        batch_size=spec.batch_size,
        chat=chat,
        system_prompt=spec.system_prompt,
        progress=None if spec.progress else False,
        manifest=manifest,
    )
    typer.echo(f"pruning traces with {rule.spec()} ({sampler.mode})", err=True)
    t0 = time.perf_counter()
    traces = tokens = prompt = 0
    try:
        for res in sampler.sample(problems, n, seed=params.seed, sink=store):
            traces += len(res.candidates)
            tokens += res.generated_tokens
            prompt += res.prompt_tokens
    except KeyboardInterrupt:
        typer.echo(f"interrupted: pruning runs do not resume; {store.path} is incomplete", err=True)
        raise typer.Exit(130) from None
    store.refresh()
    return SamplingSummary(
        path=store.path,
        problems=len(problems),
        n=n,
        requested=len(problems) * n,
        skipped=0,
        generated=traces,
        stored=len(store),
        generated_tokens=tokens,
        prompt_tokens=prompt,
        wall_seconds=time.perf_counter() - t0,
        accounting=store.accounting(),
    )


def _print_pruning(console: Any, store: Any) -> None:
    info = store.manifest.get("pruning") or {}
    console.print(
        f"pruned [bold]{info.get('pruned', 0):,}[/bold] of {info.get('traces', 0):,} traces with "
        f"{info.get('rule')} ({info.get('generated_tokens', 0):,} generated tokens, pruned "
        f"traces included); what was pruned, when and why: {store.path / 'pruning.jsonl'}"
    )


def _report_interrupt(spec: SampleSpec, out: Path, problems: Sequence[Any], n: int) -> None:
    """After Ctrl-C: what is stored (the sampler flushed every finished sample) and how to go on."""
    from ttscale.store import SampleStore

    ids = {p.id for p in problems}
    try:
        store = SampleStore.open(out)
        have = sum(1 for pid, i in store.keys() if pid in ids and i < n)
        acct = store.accounting()
        saved = (
            f"{have:,} of {len(ids) * n:,} requested samples are stored in {out} "
            f"(run total {len(store):,}, {acct.get('generated_tokens', 0):,} generated tokens "
            "accounted)"
        )
    except Exception as e:  # report the interrupt even if the run cannot be read back
        saved = f"the samples finished so far are stored in {out} (cannot count them: {e})"
    shard = f" --shard {spec.shard}" if spec.shard else ""
    typer.echo(
        f"interrupted: {saved}; continue with: ttscale {spec.command} --out {out} --resume{shard}",
        err=True,
    )


def _print_summary(console: Any, s: Any, info: Mapping[str, Any]) -> None:
    acct = s.accounting
    console.print(
        f"sampled [bold]{s.generated:,}[/bold] new samples ({s.skipped:,} already stored) for "
        f"{s.problems} problems x n={s.n} with {info.get('engine')} in {s.wall_seconds:.1f}s: "
        f"{s.samples_per_s:,.1f} samples/s, {s.tokens_per_s:,.0f} tokens/s"
    )
    console.print(
        f"run total: {acct.get('samples', 0):,} samples, {acct.get('generated_tokens', 0):,} "
        f"generated tokens, {acct.get('wall_seconds', 0):.1f}s"
    )
    if not s.complete:
        console.print("[yellow]run is incomplete; continue it with --resume[/yellow]")
    console.print(f"run: [bold]{s.path}[/bold]")


def _verify_and_curve(
    res: SampleResult,
    *,
    console: Any,
    ks: Sequence[int] | None,
    plot: Path | None,
    isolation: str = "auto",
) -> dict[str, Any]:
    """Verify with the benchmark's checker, then coverage and majority@k: table, JSON, plot."""
    from ttscale.cli.verify_cmds import report_interrupt
    from ttscale.pipeline import verify_and_curve
    from ttscale.verifiers.runner import VerifyInterrupted

    try:
        out = verify_and_curve(
            res.store,
            res.benchmark.verifier,
            n=res.summary.n,
            ks=ks,
            plot=plot or True,
            label=res.benchmark.name,
            isolation=isolation,
            on_model=lambda line: typer.echo(line, err=True),
        )
    except VerifyInterrupted as e:
        report_interrupt(e, res.store.path)
        raise typer.Exit(130) from None
    vsum = out.verify
    acc = vsum.get("accuracy")
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted((vsum.get("by_status") or {}).items()))
    console.print(
        f"verified {vsum.get('verified', 0):,} samples with [bold]{vsum['verifier']}[/bold]"
        + (f": {acc:.1%} correct" if acc is not None else "")
        + (f" ({statuses})" if statuses else "")
    )
    _print_curve(console, out.report)
    console.print(f"plot: [bold]{out.plot}[/bold]")
    console.print(f"run:  [bold]{res.store.path}[/bold]")
    return out.table()


def _print_curve(console: Any, report: Any) -> None:
    """One row per method, one column per k (means; the CIs are in curve.json and the plot)."""
    from rich.table import Table

    pct = round(report.confidence * 100)
    t = Table(
        title=f"fraction of {report.n_problems} problems solved with k samples each",
        caption=(
            "coverage@k: any of k samples correct (pass@k); majority@k: the most frequent answer "
            f"of k is correct. {pct}% bootstrap CIs in curve.json and the plot."
        ),
    )
    t.add_column("method")
    for k in report.ks.tolist():
        t.add_column(f"k={k}", justify="right")
    names = {"coverage": "coverage@k", "majority": "majority@k"}
    for name, c in report.curves.items():
        t.add_row(names.get(name, name), *(f"{v:.3f}" if v == v else "-" for v in c.mean))
    console.print(t)


def _bundled_model_path() -> Path:
    from importlib.resources import files

    return Path(str(files("ttscale.evals") / "model"))


def _bundled_model() -> Path:
    path = _bundled_model_path()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"the bundled model is missing from {path}; train it with "
            "`python -m ttscale.evals.train_arith --out evals/model`"
        )
    return path


def _default_model(benchmark: str) -> tuple[str, str]:
    """The model to use without ``--model``: the bundled one, for ``arith`` only.

    Returns the path and the note printed with it; any other benchmark needs ``--model`` (the
    bundled model only knows arith, so it would score ~0 there without a word).
    """
    if benchmark != "arith":
        raise ConfigError(
            f"--model is required for benchmark {benchmark!r} (the bundled model only solves "
            "arith): give a local model folder, .gguf file or model id"
        )
    return str(_bundled_model()), "bundled arith model, the default for arith without --model"


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# -- commands -----------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add ``sample``, ``run`` and ``demo`` to ``app``."""

    @app.command("sample", cls=_Command)
    def sample_cmd(
        model: ModelOpt = None,
        benchmark: BenchOpt = None,
        n: NOpt = None,
        out: OutOpt = None,
        engine: EngineOpt = EngineKind.auto,
        base_url: BaseUrlOpt = None,
        engine_opt: EngineOptOpt = None,
        temperature: TempOpt = None,
        top_p: TopPOpt = None,
        top_k: TopKOpt = None,
        max_tokens: MaxTokOpt = None,
        seed: SeedOpt = None,
        stop: StopOpt = None,
        logprobs: LogprobsOpt = None,
        limit: LimitOpt = None,
        split: SplitOpt = None,
        resume: ResumeOpt = False,
        batch_size: BatchOpt = DEFAULT_BATCH,
        chat: ChatOpt = None,
        system_prompt: SystemOpt = None,
        progress: ProgressOpt = True,
        shard: ShardOpt = None,
        throttle: ThrottleOpt = 0.0,
        flush_every: FlushOpt = 256,
        adaptive: Annotated[
            Optional[str],
            typer.Option(
                "--adaptive",
                help="Stop each problem early by a rule (esc:window=5, beta:0.95, dirichlet:0.95, "
                "entropy:0.75, majority:0.8, deepconf:0.95, sprt, msprt); N is the budget.",
            ),
        ] = None,
        prune: PruneOpt = None,
        allocate: Annotated[
            Optional[str],
            typer.Option("--allocate", help="Spend --budget-total over the problems by a policy "
                         "(uniform, greedy, gape); N is the per-problem cap."),
        ] = None,
        budget_total: Annotated[
            Optional[float],
            typer.Option("--budget-total", help="--allocate: total samples (or tokens, --tokens) for the dataset."),
        ] = None,
        budget_tokens: Annotated[
            bool, typer.Option("--tokens", help="--allocate: --budget-total counts generated tokens.")
        ] = False,
        stop_rule: Annotated[
            Optional[str],
            typer.Option("--stop-rule", help="--allocate: a stopping rule that closes a problem early."),
        ] = None,
    ) -> None:
        """Draw N samples per problem of a benchmark into a run directory (resumable).

        Several workers may share one run directory (each takes problems no other worker holds)
        or split the problems with --shard i/N. With --adaptive RULE each problem stops on its
        own once the rule says its answer is settled (RUN/adaptive.jsonl records where and why).
        """
        spec = SampleSpec(
            model=model,
            benchmark=benchmark,
            n=n,
            out=out,
            engine=engine,
            base_url=base_url or (),
            engine_opt=engine_opt or (),
            sampling=_explicit_sampling(
                temperature, top_p, top_k, max_tokens, seed, stop, logprobs
            ),
            limit=limit,
            split=split,
            resume=resume,
            batch_size=batch_size,
            chat=chat,
            system_prompt=system_prompt,
            progress=progress,
            throttle=throttle,
            flush_every=flush_every,
            shard=shard,
            adaptive=adaptive,
            prune=prune,
            allocate=allocate,
            budget_total=budget_total,
            budget_tokens=budget_tokens,
            stop_rule=stop_rule,
        )
        run_sample(spec, console=_console())

    @app.command("run", cls=_Command)
    def run_cmd(
        model: ModelOpt = None,
        benchmark: BenchOpt = None,
        n: NOpt = None,
        out: OutOpt = None,
        engine: EngineOpt = EngineKind.auto,
        base_url: BaseUrlOpt = None,
        engine_opt: EngineOptOpt = None,
        temperature: TempOpt = None,
        top_p: TopPOpt = None,
        top_k: TopKOpt = None,
        max_tokens: MaxTokOpt = None,
        seed: SeedOpt = None,
        stop: StopOpt = None,
        logprobs: LogprobsOpt = None,
        limit: LimitOpt = None,
        split: SplitOpt = None,
        resume: ResumeOpt = False,
        batch_size: BatchOpt = DEFAULT_BATCH,
        chat: ChatOpt = None,
        system_prompt: SystemOpt = None,
        progress: ProgressOpt = True,
        k: Annotated[
            Optional[str],
            typer.Option("--k", help="Budgets for the curve, e.g. 1,2,4,8 (default: powers of 2)."),
        ] = None,
        plot: Annotated[
            Optional[Path], typer.Option("--plot", help="Plot file [RUN/coverage.png].")
        ] = None,
        throttle: ThrottleOpt = 0.0,
        flush_every: FlushOpt = 256,
        isolation: IsolationOpt = IsolationChoice.auto,
    ) -> None:
        """Sample, verify with the benchmark's checker, and print/plot coverage vs k.

        Without --model/--benchmark it runs the bundled model on the bundled arith benchmark;
        any other benchmark needs --model.
        """
        if model is None and not resume:
            # the bundled default: the small arith model on the arith benchmark (run_sample
            # refuses any other benchmark without --model)
            benchmark = benchmark or "arith"
        spec = SampleSpec(
            model=model,
            benchmark=benchmark,
            n=n,
            out=out,
            engine=engine,
            base_url=base_url or (),
            engine_opt=engine_opt or (),
            sampling=_explicit_sampling(
                temperature, top_p, top_k, max_tokens, seed, stop, logprobs
            ),
            limit=limit,
            split=split,
            resume=resume,
            batch_size=batch_size,
            chat=chat,
            system_prompt=system_prompt,
            progress=progress,
            throttle=throttle,
            flush_every=flush_every,
        )
        from ttscale.cli.analysis_cmds import _int_list

        ks = _int_list(k, "--k")  # a bad list fails now, not after sampling
        spec.command = "run"
        spec.outputs = (plot,) if plot is not None else ()
        if benchmark is not None:
            from ttscale.verifiers.base import split_spec
            from ttscale.verifiers.sandbox import resolve_isolation

            if split_spec(default_verifier_spec(benchmark))[0] == "code":
                resolve_isolation(isolation.value)  # fail before sampling, not after it
        console = _console()
        res = run_sample(spec, console=console)
        _verify_and_curve(res, console=console, ks=ks, plot=plot, isolation=isolation.value)

    @app.command("demo", cls=_Command)
    def demo_cmd(
        out: OutOpt = None,
        engine: EngineOpt = EngineKind.auto,
        problems: Annotated[
            int, typer.Option("--problems", min=1, help="Number of arith test problems.")
        ] = DEMO_PROBLEMS,
        n: Annotated[int, typer.Option("--n", "-n", min=1, help="Samples per problem.")] = DEMO_N,
        seed: SeedOpt = None,
        progress: ProgressOpt = True,
    ) -> None:
        """The whole pipeline on the bundled model and arith benchmark, on CPU, in about a minute.

        Samples N answers per problem, checks them, and prints coverage (any of k correct) and
        majority vote at k = 1, 2, 4, ... with a plot. The engine is chosen as in `sample` and
        `run` (auto: transformers without a GPU, which starts in seconds on CPU).
        """
        t0 = time.perf_counter()
        console = _console()
        model = _bundled_model()
        console.print(f"ttscale demo: bundled model {model} on {problems} arith problems x n={n}")
        spec = SampleSpec(
            model=str(model),
            benchmark="arith",
            n=n,
            out=out or _default_out("demo"),
            engine=engine,
            sampling={
                "max_tokens": DEMO_MAX_TOKENS,
                **({"seed": seed} if seed is not None else {}),
            },
            limit=problems,
            progress=progress,
        )
        res = run_sample(spec, console=console)
        table = _verify_and_curve(res, console=console, ks=None, plot=None)
        cov, maj, ks = table["coverage"], table["majority"], table["ks"]
        console.print(
            f"coverage@k grows from {cov[0]:.2f} at k=1 to {cov[-1]:.2f} at k={ks[-1]}; "
            f"majority@k goes from {maj[0]:.2f} to {maj[-1]:.2f} (best {max(maj):.2f}). "
            f"Done in {time.perf_counter() - t0:.0f}s."
        )
