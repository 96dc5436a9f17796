"""CLI: ``ttscale sample``, ``ttscale run`` (sample, verify, curve) and ``ttscale demo``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import inspect
import json
import shlex
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

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
BudgetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--budget-forcing",
        help="s1 budget forcing: think_end=</think>,min=256,max=1024[,wait=Wait,answer_prefix=...,"
        "answer_tokens=64] (\\n in values is a newline; see README).",
    ),
]
SelfCertaintyOpt = Annotated[
    bool,
    typer.Option(
        "--self-certainty",
        help="Store each sample's exact self-certainty (full next-token distributions; hf "
        "engine, fixed-n and --adaptive runs) as its score 'self_certainty' for curve.",
    ),
]
FlushOpt = Annotated[
    int,
    typer.Option(
        "--flush-every", min=1, hidden=True,
        help="Write a shard after this many finished samples (smaller: less lost to a kill).",
    ),
]


AdaptiveOpt = Annotated[
    Optional[str],
    typer.Option(
        "--adaptive",
        help="Stop each problem early by a rule (esc:window=5, beta:0.95, dirichlet:0.95, "
        "entropy:0.75, majority:0.8, deepconf:0.95, sprt, msprt); N is the budget. Or "
        "short-m@k (short-1@k, short-3@k, short-M@K): N traces side by side, stop at the first m "
        "to finish, majority among them (RUN/shortmk.jsonl).",
    ),
]


AllocateOpt = Annotated[
    Optional[str],
    typer.Option(
        "--allocate",
        help="Spend --budget-total over the problems by a policy (uniform, greedy, gape); N is "
        "the per-problem cap.",
    ),
]
BudgetTotalOpt = Annotated[
    Optional[float],
    typer.Option(
        "--budget-total", help="--allocate: total samples (or tokens, --tokens) for the dataset."
    ),
]
BudgetTokensOpt = Annotated[
    bool, typer.Option("--tokens", help="--allocate: --budget-total counts generated tokens.")
]
StopRuleOpt = Annotated[
    Optional[str],
    typer.Option("--stop-rule", help="--allocate: a stopping rule that closes a problem early."),
]


@dataclass(frozen=True)
class EngineOptions:
    """The options of every sampling command (``sample``, ``run``, ``smc``), defined once.

    A command decorated with :func:`with_options` gets these as Typer options and receives them
    as one object, so an option means the same in every command and is written once.
    """

    model: ModelOpt = None
    benchmark: BenchOpt = None
    out: OutOpt = None
    engine: EngineOpt = EngineKind.auto
    base_url: BaseUrlOpt = None
    engine_opt: EngineOptOpt = None
    temperature: TempOpt = None
    top_p: TopPOpt = None
    top_k: TopKOpt = None
    max_tokens: MaxTokOpt = None
    seed: SeedOpt = None
    stop: StopOpt = None
    logprobs: LogprobsOpt = None
    limit: LimitOpt = None
    split: SplitOpt = None
    resume: ResumeOpt = False
    batch_size: BatchOpt = DEFAULT_BATCH
    chat: ChatOpt = None
    progress: ProgressOpt = True
    shard: ShardOpt = None
    given: tuple[str, ...] = ()  # not an option: what was typed (for the Ctrl-C hint)

    def spec(self, **fields: Any) -> SampleSpec:
        """The :class:`SampleSpec` these options ask for; ``fields`` override or add to it."""
        base: dict[str, Any] = {
            "model": self.model,
            "benchmark": self.benchmark,
            "out": self.out,
            "engine": self.engine,
            "base_url": tuple(self.base_url or ()),
            "engine_opt": tuple(self.engine_opt or ()),
            "sampling": _explicit_sampling(
                self.temperature, self.top_p, self.top_k, self.max_tokens, self.seed, self.stop,
                self.logprobs,
            ),
            "limit": self.limit,
            "split": self.split,
            "resume": self.resume,
            "batch_size": self.batch_size,
            "chat": self.chat,
            "progress": self.progress,
            "shard": self.shard,
            "given": self.given,
        }  # fmt: skip
        return SampleSpec(**{**base, **fields})


@dataclass(frozen=True)
class SampleOptions(EngineOptions):
    """:class:`EngineOptions` plus what ``sample`` and ``run`` share beyond ``smc``."""

    n: NOpt = None
    system_prompt: SystemOpt = None
    throttle: ThrottleOpt = 0.0
    flush_every: FlushOpt = 256
    adaptive: AdaptiveOpt = None
    prune: PruneOpt = None
    allocate: AllocateOpt = None
    budget_total: BudgetTotalOpt = None
    budget_tokens: BudgetTokensOpt = False
    stop_rule: StopRuleOpt = None
    budget_forcing: BudgetOpt = None
    self_certainty: SelfCertaintyOpt = False

    def spec(self, **fields: Any) -> SampleSpec:
        own = {
            "self_certainty": self.self_certainty,
            "allocate": self.allocate,
            "budget_total": self.budget_total,
            "budget_tokens": self.budget_tokens,
            "stop_rule": self.stop_rule,
            "n": self.n,
            "system_prompt": self.system_prompt,
            "throttle": self.throttle,
            "flush_every": self.flush_every,
            "adaptive": self.adaptive,
            "prune": self.prune,
            "budget_forcing": self.budget_forcing,
        }
        return super().spec(**{**own, **fields})


_F = TypeVar("_F", bound=Callable[..., Any])


def with_options(cls: type[EngineOptions], *, own_first: bool = False) -> Callable[[_F], _F]:
    """Give a command the options of the dataclass ``cls`` (each field an ``Annotated`` Typer
    option, but ``given``); the command receives them as one ``cls`` instance in its first
    parameter, with ``given``: the options as typed on the command line. ``own_first``: list
    the command's own options before the shared ones in its help."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f for f in dataclasses.fields(cls) if f.name != "given"]
    names = [f.name for f in fields]
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=hints[f.name])
        for f in fields
    ]  # fmt: skip
    # Typer passes the click context to a parameter annotated with typer.Context
    context = inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

    def decorate(fn: _F) -> _F:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[1:]]
        clash = set(names) & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__} redefines shared options {sorted(clash)}")

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            given = _given_words(kw.pop("_ctx"))
            opts = cls(**{k: kw.pop(k) for k in names}, given=given)
            return fn(opts, **kw)

        all_params = [*own, *shared, context] if own_first else [*shared, *own, context]
        command.__signature__ = inspect.Signature(all_params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in all_params}
        return typing.cast(_F, command)

    return decorate


def _given_words(ctx: Any) -> tuple[str, ...]:
    """Every option given on the command line (or by environment), as words to type again;
    ``--out``, ``--resume`` and testing aids (hidden options) left out."""
    words: list[str] = []
    for p in ctx.command.params:
        if getattr(p, "param_type_name", "") != "option" or p.hidden or p.name in ("out", "resume"):
            continue
        source = ctx.get_parameter_source(p.name)
        if getattr(source, "name", "") not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        words += _option_words(p, ctx.params.get(p.name))
    return tuple(words)


def _option_words(p: Any, value: Any) -> list[str]:
    """``--name value`` (repeated for a multiple option, one word for a flag) as typed."""
    longest = max(p.opts, key=len)
    if p.is_flag:
        if value:
            return [longest]
        return [max(p.secondary_opts, key=len)] if p.secondary_opts else []
    values = value if p.multiple else [value]
    words: list[str] = []
    for v in values or ():
        if v is not None:
            words += [longest, str(v.value if isinstance(v, enum.Enum) else v)]
    return words


@dataclass
class SampleSpec:
    """Everything a sampling command was asked for, before defaults are resolved."""

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
    budget_forcing: str | None = None  # s1 budget forcing settings (samplers.budget spec)
    given: Sequence[str] = ()  # the options as typed, for the Ctrl-C hint (with_options)
    allocate: str | None = None  # allocation policy across problems (ttscale.select.allocation)
    budget_total: float | None = None  # --allocate: dataset budget in samples (or tokens)
    budget_tokens: bool = False  # --allocate: the budget counts generated tokens
    stop_rule: str | None = None  # --allocate: a stopping rule closing problems early
    self_certainty: bool = False  # exact self-certainty per sample (hf engine)


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


@dataclass(frozen=True)
class ResolvedRun:
    """What a sampling command resolved from its options, the benchmark and a resumed run.

    ``sampling``: the sampling settings before ``n`` (benchmark defaults, then the resumed
    run's, then the command line's); ``problems``: the run's problems, ``mine`` this worker's
    (``--shard``); ``old``: the manifest of the run being resumed (``{}`` for a new run);
    ``manifest``: the fields every run records (model, benchmark, split, limit).
    """

    bench: Any
    model: str
    model_note: str
    split: str
    limit: int | None
    problems: list[Any]
    mine: list[Any]
    shard: tuple[int, int] | None
    sampling: dict[str, Any]
    n: int
    out: Path
    old: Mapping[str, Any]
    manifest: dict[str, Any]
    engine_options: dict[str, Any]
    choice: Any

    def build_engine(self, *, call_batch: int | None = None) -> Any:
        """Build the engine (the slow part) and say on stderr which one, for which model."""
        from ttscale.engines import describe_engine, make_engine

        engine = make_engine(self.choice.kind, self.model, **self.engine_options)
        typer.echo(
            describe_engine(
                engine.info(),
                model=self.model,
                model_note=self.model_note,
                reason=self.choice.reason,
                call_batch=call_batch,
            ),
            err=True,
        )
        return engine


def resolve_run(
    spec: SampleSpec,
    *,
    default_n: int = DEFAULT_N,
    out_prefix: str | None = None,
    resume_sampling: bool = True,
) -> ResolvedRun:
    """The one resolution path of ``sample``, ``run`` and ``smc``: benchmark defaults, resume
    settings, problems and shard, output checks and the engine choice, all before anything slow.

    Defaults, lowest first: ``SamplingParams`` defaults, the benchmark's (max_tokens, stop), the
    run's manifest when resuming (its model, benchmark, split, limit and sampling), then what was
    given on the command line. Nothing is created: a command that fails here leaves no trace.
    ``resume_sampling=False``: the resumed run's sampling is not merged in (step-wise samplers
    record their per-step settings there and check their own).
    """
    from ttscale.engines import choose_engine
    from ttscale.evals import get_benchmark
    from ttscale.paths import check_writable_dir, check_writable_file
    from ttscale.samplers.repeated import parse_shard, shard_problems
    from ttscale.store import SampleStore

    shard = parse_shard(spec.shard) if spec.shard is not None else None
    out = spec.out
    old: dict[str, Any] = {}
    if out is not None and (out / "manifest.json").exists():
        if not spec.resume:
            raise ConfigError(
                f"run directory {out} already exists; pass --resume to continue or extend it, "
                "or choose a new --out"
            )
        old = dict(SampleStore.open(out).manifest)
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
    old_n = old_sampling.pop("n", None)
    if resume_sampling:
        base.update(old_sampling)
    base.update(spec.sampling)
    n = spec.n or (int(old_n) if old_n else default_n)
    limit = spec.limit if spec.limit is not None else old.get("limit")
    problems = bench.load(split, limit=limit)
    if not problems:
        raise ConfigError(f"benchmark {bench_name!r} split {split!r} has no problems")
    mine = shard_problems(problems, shard)
    if not mine:
        raise ConfigError(f"shard {spec.shard} of {len(problems)} problems is empty; use fewer shards")
    # every output must be writable before the engine loads (minutes, for a large model)
    if out is None:
        out = _default_out(out_prefix or bench_name)
    check_writable_dir(out, "--out")
    for extra in spec.outputs:
        check_writable_file(extra, "--plot")

    options = {**spec.engine_options, **_parse_engine_opts(spec.engine_opt)}
    if spec.base_url:
        if spec.engine is not EngineKind.openai:
            raise ConfigError("--base-url applies to --engine openai only")
        options["base_urls"] = list(spec.base_url)
    choice = choose_engine(spec.engine.value, str(model))
    manifest = {"model": str(model), "benchmark": bench_name, "split": split, "limit": limit}
    return ResolvedRun(
        bench=bench, model=str(model), model_note=model_note, split=split, limit=limit,
        problems=list(problems), mine=list(mine), shard=shard, sampling=base, n=n, out=out,
        old=old, manifest=manifest, engine_options=options, choice=choice,
    )  # fmt: skip


def run_sample(spec: SampleSpec, *, console: Any = None) -> SampleResult:
    """Resolve (:func:`resolve_run`), check everything cheap, then build the engine and sample.

    Bad input fails before the (slow) engine is built and before a run directory is created.
    """
    from ttscale.samplers import RepeatedSampler
    from ttscale.select.shortmk import is_short_spec, parse_short
    from ttscale.store import SampleStore
    from ttscale.types import SamplingParams

    short = spec.adaptive is not None and is_short_spec(spec.adaptive)
    if spec.adaptive is not None:
        check_rule_name(spec.adaptive, "--adaptive")
        from ttscale.select.adaptive import parse_rule

        # a bad rule fails before anything loads
        if short:
            parse_short(spec.adaptive)
        else:
            parse_rule(spec.adaptive)
        if spec.shard is not None:
            raise ConfigError("--adaptive runs one worker over all problems; drop --shard")
    if spec.adaptive is not None and spec.prune is not None:
        raise ConfigError("give --adaptive (stop each problem early) or --prune (stop traces), not both")
    if spec.allocate is not None:
        from ttscale.cli.allocation_cmds import check_sample_allocate
        from ttscale.samplers.repeated import parse_shard

        # a bad policy fails before anything loads
        check_sample_allocate(spec, parse_shard(spec.shard) if spec.shard is not None else None)
    prune_rule = _check_prune(spec)
    forcing = _check_budget_forcing(spec)
    r = resolve_run(spec)
    base, n, out, problems, manifest = r.sampling, r.n, r.out, r.problems, r.manifest
    if short:
        parse_short(str(spec.adaptive)).size(n)  # k of the budget --n: at least m
    if prune_rule is not None and prune_rule.needs == "top_logprobs" and "logprobs" not in base:
        base["logprobs"] = 20
        typer.echo(
            f"--prune {prune_rule.name} needs top log-probs: sampling with logprobs=20", err=True
        )
    params = SamplingParams.from_dict({**base, "n": n})
    if r.old:
        # fail now, before minutes of engine start-up, on a run made with other settings
        SampleStore.open(out).check_compatible({**manifest, "sampling": params.to_dict()})
        if short:
            from ttscale.samplers.shortmk import check_short_run

            check_short_run(out, r.old, len(SampleStore.open(out)), parse_short(str(spec.adaptive)), n)
    _check_self_certainty(spec, r)
    engine = r.build_engine(call_batch=spec.batch_size)
    try:
        if spec.throttle > 0:
            engine = _Throttled(engine, spec.throttle)
        store = (
            SampleStore.open_or_create(out, manifest)
            if spec.resume
            else SampleStore.create(out, manifest)
        )
        if forcing is not None:
            summary = _run_budget_forcing(engine, params, store, problems, n, forcing, spec)
            info = dict(engine.info())
            if console is not None:
                _print_summary(console, summary, info)
            return SampleResult(store, summary, r.bench, problems, info)
        if prune_rule is not None:
            summary = _run_pruning(
                spec, engine, params, store, problems, n, prune_rule, manifest, r.shard
            )
            info = dict(engine.info())
            if console is not None:
                _print_summary(console, summary, info)
                _print_pruning(console, store)
            return SampleResult(store, summary, r.bench, problems, info)
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
                    spec.budget_tokens, spec.stop_rule, r.bench, spec, manifest,
                )
            elif short:
                from ttscale.cli.replay_cmds import sample_shortmk

                summary = sample_shortmk(
                    engine, params, store, problems, n, str(spec.adaptive), r.bench, spec, manifest
                )
            elif spec.adaptive is not None:
                from ttscale.cli.replay_cmds import sample_adaptive

                summary = sample_adaptive(
                    engine, params, store, problems, n, spec.adaptive, r.bench, spec, manifest
                )
            else:
                summary = sampler.run(problems, n=n, shard=r.shard)
        except KeyboardInterrupt:
            _report_interrupt(spec, out, r.mine, n)
            raise typer.Exit(130) from None
        info = dict(engine.info())
    finally:
        engine.close()
    if console is not None:
        _print_summary(console, summary, info)
    return SampleResult(store, summary, r.bench, problems, info)


def _check_self_certainty(spec: SampleSpec, r: ResolvedRun) -> None:
    """``--self-certainty``: refused (one line, naming the fix) where the engine cannot see the
    whole next-token distribution or the run kind builds traces from several generations; a
    resumed run keeps the choice it was made with, so no run holds exact values for only some
    samples."""
    fix = "or sample without it and score the run afterwards with `ttscale certainty RUN --model PATH`"
    old = bool((r.old.get("engine") or {}).get("self_certainty")) if r.old else None
    if old is not None and r.old.get("engine") and old != spec.self_certainty:
        raise ConfigError(
            f"run {r.out} was sampled {'with' if old else 'without'} --self-certainty; resume it "
            f"the same way (`ttscale certainty {r.out} --model PATH` scores a run afterwards)"
        )
    if not spec.self_certainty:
        return
    if r.choice.kind != "hf":
        raise ConfigError(
            f"--self-certainty needs the whole next-token distribution, which the {r.choice.kind} "
            f"engine does not give: use --engine hf, {fix}"
        )
    other = [o for o, v in (("--prune", spec.prune), ("--budget-forcing", spec.budget_forcing),
                            ("--allocate", spec.allocate)) if v is not None]  # fmt: skip
    if other:
        raise ConfigError(f"--self-certainty is stored for fixed-n and --adaptive runs, not with {other[0]}; {fix}")
    r.engine_options["self_certainty"] = True


def _check_budget_forcing(spec: SampleSpec) -> Any:
    """The ``--budget-forcing`` settings (parsed before anything slow), or ``None``."""
    if spec.budget_forcing is None:
        return None
    from ttscale.samplers.budget import parse_budget_forcing

    forcing = parse_budget_forcing(spec.budget_forcing)
    clash = [o for o, v in (("--adaptive", spec.adaptive), ("--prune", spec.prune), ("--shard", spec.shard))
             if v]  # fmt: skip
    if clash:
        raise ConfigError(f"--budget-forcing runs alone: drop {', '.join(clash)}")
    return forcing


def _run_budget_forcing(
    engine: Any, params: Any, store: Any, problems: Sequence[Any], n: int, forcing: Any, spec: SampleSpec
) -> Any:
    """``sample --budget-forcing``: a :class:`BudgetForcingSampler` run into ``store``."""
    from ttscale.samplers.budget import BUDGET_FILE, BudgetForcingSampler
    from ttscale.samplers.repeated import RepeatedSampler, SamplingSummary

    chat = RepeatedSampler(engine, params, chat=spec.chat).chat  # the engine's template, if any
    sampler = BudgetForcingSampler(
        engine, params, forcing, batch_size=spec.batch_size, chat=chat, system_prompt=spec.system_prompt
    )
    typer.echo(
        "budget forcing: chat messages (the model's template), the thinking as the reply's prefix"
        if chat else "budget forcing: plain prompts, the thinking appended",
        err=True,
    )
    typer.echo(
        f"budget forcing: think_end={forcing.think_end!r}, thinking {forcing.min_thinking}.."
        f"{forcing.max_thinking} tokens (cue {forcing.wait!r}, at most {forcing.max_waits}), answer "
        f"{forcing.answer_tokens} tokens after {forcing.answer_prefix!r}",
        err=True,
    )
    before = len(store)  # a resume skips what is stored
    t0 = time.perf_counter()
    results = list(sampler.sample(problems, n, seed=params.seed, sink=store))
    wall = time.perf_counter() - t0
    store.refresh()
    tr = sampler.traces
    typer.echo(
        f"budget forcing: {sum(t.waits > 0 for t in tr)} of {len(tr)} traces got a cue, "
        f"{sum(t.forced_end for t in tr)} were cut at the maximum; per trace: {store.path / BUDGET_FILE}",
        err=True,
    )
    return SamplingSummary(
        path=store.path, problems=len(problems), n=n, requested=len(problems) * n, skipped=before,
        generated=len(store) - before, stored=len(store), generated_tokens=sum(r.generated_tokens for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results), wall_seconds=wall,
        accounting=store.accounting(),
    )  # fmt: skip


def _check_prune(spec: SampleSpec) -> Any:
    """The ``--prune`` rule (parsed before anything slow), or ``None``."""
    if spec.prune is None:
        return None
    from ttscale.samplers.pruning import parse_prune_rule

    check_rule_name(spec.prune, "--prune")
    return parse_prune_rule(spec.prune)


def _run_pruning(
    spec: SampleSpec,
    engine: Any,
    params: Any,
    store: Any,
    problems: Sequence[Any],
    n: int,
    rule: Any,
    manifest: Mapping[str, Any],
    shard: tuple[int, int] | None = None,
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
    traces = tokens = prompt = skipped = 0
    try:
        for res in sampler.sample(problems, n, seed=params.seed, sink=store, shard=shard):
            traces += len(res.candidates) - res.resumed
            skipped += res.resumed
            # stored traces read back on resume were accounted by the call that drew them
            tokens += res.generated_tokens - int(res.info.get("resumed_tokens", 0))
            prompt += res.prompt_tokens
    except KeyboardInterrupt:
        _report_interrupt(spec, Path(store.path), problems, n)
        raise typer.Exit(130) from None
    store.refresh()
    return SamplingSummary(
        path=store.path,
        problems=len(problems),
        n=n,
        requested=traces + skipped,
        skipped=skipped,
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
        f"traces included{_scored_note(info)}); what was pruned, when and why: "
        f"{store.path / 'pruning.jsonl'}"
    )


def _scored_note(info: Any) -> str:
    """The self-evaluation's scoring cost, kept apart from the generated tokens."""
    if not str(info.get("rule") or "").startswith("selfeval") or "scored_tokens" not in info:
        return ""
    n = info["scored_tokens"]
    count = "an unknown number of" if n is None else f"{n:,}"
    return f"; self-evaluation scored {count} context tokens besides"


def check_rule_name(spec: str, option: str) -> None:
    """One line for a rule given to the wrong option or unknown: every rule, with its option.

    ``option``: ``--adaptive`` (stopping rules), ``--prune`` (pruning rules) or ``--rule``
    (``replay``, which takes both).
    """
    from ttscale.samplers.pruning import PRUNE_RULES
    from ttscale.select.adaptive import RULE_NAMES

    name = str(spec).strip().partition(":")[0].strip().lower()
    if name.startswith("short-"):
        if option == "--prune":
            raise ConfigError(
                f"{spec} is a stopping rule (it stops a problem at its first m finished traces): "
                f"give it as --adaptive {spec}"
            )
        return  # parse_short says what is wrong with it, if anything
    if option == "--adaptive" and name in PRUNE_RULES:
        raise ConfigError(
            f"{name} is a pruning rule (it stops traces mid-generation): give it as --prune {spec}"
        )
    if option == "--prune" and name in RULE_NAMES:
        raise ConfigError(
            f"{name} is a stopping rule (it stops sampling a problem early): give it as "
            f"--adaptive {spec}"
        )
    if name not in RULE_NAMES and name not in PRUNE_RULES:
        kind = {"--adaptive": "adaptive ", "--prune": "pruning "}.get(option, "")
        stopping = f"stopping rules (--adaptive): {', '.join(RULE_NAMES)}, short-M@k"
        pruning = f"pruning rules (--prune): {', '.join(PRUNE_RULES)}"
        both = f"{pruning}; {stopping}" if option == "--prune" else f"{stopping}; {pruning}"
        raise ConfigError(f"unknown {kind}rule {name!r} in {option} {spec!r}; {both}")


def resume_command(command: str, out: Path, given: Sequence[str] = ()) -> str:
    """The command that continues a run: the options ``given`` (as typed; see
    :func:`with_options`), then ``--out OUT --resume``, shell-quoted."""
    return shlex.join(["ttscale", command, *given, "--out", str(out), "--resume"])


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
    hint = resume_command(spec.command, out, spec.given)
    typer.echo(f"interrupted: {saved}; continue with: {hint}", err=True)


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
    verifier: str | None = None,
    methods: Sequence[str] | None = None,
    spec: SampleSpec | None = None,
) -> dict[str, Any]:
    """Verify (the benchmark's checker unless ``verifier``), then the curves: table, JSON, plot.

    A fixed-n run gets coverage@k and majority@k (or ``methods``) here; an adaptive or pruned
    run is reported by ``ttscale curve`` itself (its own accuracy at its own cost is that
    command's business); a ``--shard`` worker verifies its shard and leaves the curve for when
    every shard is in.
    """
    from ttscale.cli.verify_cmds import report_interrupt
    from ttscale.pipeline import verify_and_curve
    from ttscale.verifiers.runner import VerifyInterrupted, verify_store

    shard = spec.shard if spec is not None else None
    live_kind = spec is not None and (
        spec.adaptive is not None or spec.prune is not None or spec.allocate is not None
    )
    vspec = verifier or res.benchmark.verifier
    partial = shard is not None and not _all_sampled(res.store, res.summary.n)
    try:
        if partial or live_kind:
            from ttscale.samplers.repeated import parse_shard

            vsum = verify_store(
                res.store, vspec, isolation=isolation,
                shard=parse_shard(shard) if partial and shard is not None else None,
                on_model=lambda line: typer.echo(line, err=True),
                set_default=True, set_default_by="run",
            )  # fmt: skip
            _print_verified(console, vsum)
            if partial:
                console.print(
                    f"shard {shard} is sampled and verified; the curve needs every shard: once "
                    f"they are all in, [bold]ttscale curve {res.store.path}[/bold]"
                )
            else:
                _curve_command(res.store.path, ks=ks, plot=plot, methods=methods)
                console.print(f"run:  [bold]{res.store.path}[/bold]")
            return {}
        out = verify_and_curve(
            res.store,
            vspec,
            n=res.summary.n,
            ks=ks,
            plot=plot or True,
            label=res.benchmark.name,
            isolation=isolation,
            on_model=lambda line: typer.echo(line, err=True),
            methods=methods,
        )
        _print_verified(console, out.verify)
    except VerifyInterrupted as e:
        report_interrupt(e, res.store.path)
        raise typer.Exit(130) from None
    _print_curve(console, out.report)
    console.print(f"plot: [bold]{out.plot}[/bold]")
    console.print(f"run:  [bold]{res.store.path}[/bold]")
    return out.table()


def _print_verified(console: Any, vsum: Mapping[str, Any]) -> None:
    acc = vsum.get("accuracy")
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted((vsum.get("by_status") or {}).items()))
    console.print(
        f"verified {vsum.get('verified', 0):,} samples with [bold]{verifier_label(vsum)}[/bold]"
        + (f": {acc:.1%} correct" if acc is not None else "")
        + (f" ({statuses})" if statuses else "")
    )
    d = vsum.get("default") or {}
    was = f", was {d['previous']}" if d.get("changed") and d.get("previous") else ""
    if d.get("name"):
        console.print(f"default verdict set of the run: [bold]{d['name']}[/bold] (set by run{was})")


def verifier_label(vsum: Mapping[str, Any]) -> str:
    """The verifier as the user wrote it (``arith-prm:last``), not its verdict-set name."""
    return str(vsum.get("requested_spec") or vsum.get("spec") or vsum["verifier"])


def _all_sampled(store: Any, n: int) -> bool:
    """Whether every problem of the run holds its ``n`` samples (all shards are in)."""
    counts = store.counts()
    ids = store.problem_ids()
    return bool(ids) and all(counts.get(pid, 0) >= n for pid in ids)


def _curve_command(
    run: Path, *, ks: Sequence[int] | None, plot: Path | None, methods: Sequence[str] | None
) -> None:
    """Report a run the way ``ttscale curve RUN`` does (one code path for its run kind)."""
    import typer.main

    from ttscale.cli.app import app

    args = [str(run), "--plot", str(plot or Path(run) / "coverage.png")]
    if ks:
        args += ["--k", ",".join(map(str, ks))]
    if methods:
        args += ["--methods", ",".join(methods)]
    curve = typer.main.get_command(app).commands["curve"]  # type: ignore[attr-defined]
    curve.main(args, prog_name="ttscale curve", standalone_mode=False)


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
    sc = report.meta.get("self_certainty")
    if sc:  # which values the self-certainty rows read (exact or the top-k approximation)
        console.print(f"self-certainty: {'exact' if sc.get('exact') else 'top-k approximation'}, {sc.get('source')}")


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


VerifierOpt = Annotated[
    Optional[str],
    typer.Option(
        "--verifier",
        help="Verifier spec, as for `ttscale verify` (math, arith, arith-prm:last, rm:PATH, ...) "
        "[the benchmark's].",
    ),
]
MethodsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--methods",
        help="Comma-separated, as for `ttscale curve`: coverage,majority,weighted,best_of_n,"
        "max_probability,pc,rpc,deepconf [coverage,majority].",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    """Add ``sample``, ``run`` and ``demo`` to ``app``."""

    @app.command("sample", cls=_Command)
    @with_options(SampleOptions)
    def sample_cmd(opts: SampleOptions) -> None:
        """Draw N samples per problem of a benchmark into a run directory (resumable).

        Several workers may share one run directory (each takes problems no other worker holds)
        or split the problems with --shard i/N. With --adaptive RULE each problem stops on its
        own once the rule says its answer is settled (RUN/adaptive.jsonl records where and why).
        """
        run_sample(opts.spec(), console=_console())

    @app.command("run", cls=_Command)
    @with_options(SampleOptions)
    def run_cmd(
        opts: SampleOptions,
        k: Annotated[
            Optional[str],
            typer.Option("--k", help="Budgets for the curve, e.g. 1,2,4,8 (default: powers of 2)."),
        ] = None,
        plot: Annotated[
            Optional[Path], typer.Option("--plot", help="Plot file [RUN/coverage.png].")
        ] = None,
        isolation: IsolationOpt = IsolationChoice.auto,
        verifier: VerifierOpt = None,
        methods: MethodsOpt = None,
    ) -> None:
        """Sample, verify (the benchmark's checker, or --verifier), and print/plot the curves.

        Without --model/--benchmark it runs the bundled model on the bundled arith benchmark;
        any other benchmark needs --model. An --adaptive or --prune run is reported as
        `ttscale curve RUN` reports it; a --shard worker verifies its shard, and the curve
        follows once every shard is in.
        """
        from ttscale.cli.analysis_cmds import _int_list, _method_list

        benchmark = opts.benchmark
        if opts.model is None and not opts.resume:
            # the bundled default: the small arith model on the arith benchmark (run_sample
            # refuses any other benchmark without --model)
            benchmark = benchmark or "arith"
        ks = _int_list(k, "--k")  # a bad list fails now, not after sampling
        method_list = _method_list(methods) if methods is not None else None
        if method_list is not None:
            from ttscale.analysis import METHODS

            unknown = [m for m in method_list if m not in METHODS]
            if unknown or not method_list:
                raise ConfigError(
                    f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}"
                )
        spec = opts.spec(
            benchmark=benchmark, command="run", outputs=(plot,) if plot is not None else ()
        )
        if verifier is not None:
            from ttscale.verifiers.base import check_spec

            check_spec(verifier)  # a typo fails before sampling, not after it
        vspec = verifier or (default_verifier_spec(benchmark) if benchmark else None)
        if vspec is not None:
            from ttscale.verifiers.base import split_spec
            from ttscale.verifiers.sandbox import resolve_isolation

            if split_spec(vspec)[0] == "code":
                resolve_isolation(isolation.value)  # fail before sampling, not after it
        console = _console()
        res = run_sample(spec, console=console)
        _verify_and_curve(
            res, console=console, ks=ks, plot=plot, isolation=isolation.value,
            verifier=verifier, methods=method_list, spec=spec,
        )  # fmt: skip

    @app.command("demo", cls=_Command)
    def demo_cmd(
        ctx: typer.Context,
        out: OutOpt = None,
        engine: EngineOpt = EngineKind.auto,
        limit: Annotated[
            int, typer.Option("--limit", min=1, help="Use the first P arith test problems.")
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
        console.print(f"ttscale demo: bundled model {model} on {limit} arith problems x n={n}")
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
            limit=limit,
            progress=progress,
            command="run",  # demo has no --resume; `run` (taking demo's options) continues it
            given=_given_words(ctx),
        )
        res = run_sample(spec, console=console)
        table = _verify_and_curve(res, console=console, ks=None, plot=None)
        cov, maj, ks = table["coverage"], table["majority"], table["ks"]
        console.print(
            f"coverage@k grows from {cov[0]:.2f} at k=1 to {cov[-1]:.2f} at k={ks[-1]}; "
            f"majority@k goes from {maj[0]:.2f} to {maj[-1]:.2f} (best {max(maj):.2f}). "
            f"Done in {time.perf_counter() - t0:.0f}s."
        )
