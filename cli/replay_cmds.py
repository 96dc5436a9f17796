"""``ttscale replay``: replay a level-1 adaptive rule exactly on a stored run."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttscale.errors import ConfigError
from ttscale.select import DEFAULT_TIE


def register(app: typer.Typer) -> None:
    """Add ``replay`` to ``app``."""

    @app.command("replay")
    def replay_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory (sampled, verified, or imported).")],
        rule: Annotated[
            Optional[str],
            typer.Option(
                "--rule",
                help="Stopping rule: fixed, esc:window=5, beta:0.95, dirichlet:0.95, entropy:0.75, "
                "majority:0.8, deepconf:0.95, sprt:p1=0.8, msprt:alpha=0.05 (any with ,min=K); or a "
                "trace-pruning rule replayed from stored log-probs: deepconf-online:eta=10, "
                "lowprob:threshold=-1.5, or self-evaluation scored by --model: "
                "selfeval:checkpoint=64,threshold=0.5, selfeval-top:checkpoint=64,keep=0.5; or short-m@k (short-1@k, short-3@k, short-M@K): stop "
                "at the first m of k traces to finish (by length), majority among them.",
            ),
        ] = None,
        allocate: Annotated[
            Optional[str],
            typer.Option("--allocate", help="Allocate --budget-total over the problems by a policy: "
                         "uniform, greedy[:lookahead=1], gape[:a=1] (ttscale.select.allocation)."),
        ] = None,
        budget_total: Annotated[
            Optional[float],
            typer.Option("--budget-total", help="--allocate: total samples (or tokens, --tokens) for the dataset."),
        ] = None,
        tokens: Annotated[
            bool, typer.Option("--tokens", help="--allocate: --budget-total counts generated tokens.")
        ] = False,
        stop_rule: Annotated[
            Optional[str],
            typer.Option("--stop-rule", help="--allocate: a stopping rule that closes a problem early (beta:0.95, ...)."),
        ] = None,
        calibrate: Annotated[
            Optional[int],
            typer.Option("--calibrate", min=2, help="K-fold (seeded) choice of each rule's/policy's parameter "
                         "on K-1 folds for --target, reporting the held-out folds."),
        ] = None,
        target: Annotated[
            str,
            typer.Option("--target", help="--calibrate: within:X (points of SC at the full budget) or "
                         "tokens:R (at most R x its tokens)."),
        ] = "within:0.5",
        round_size: Annotated[
            Optional[int],
            typer.Option("--round-size", min=1, help="--allocate: problems served per round [policy's]."),
        ] = None,
        orders: Annotated[
            Optional[int],
            typer.Option("--orders", min=1, help="Average over N seeded random orders per problem."),
        ] = None,
        order: Annotated[
            Optional[str],
            typer.Option("--order", help="'index': replay in stored index order (the live order)."),
        ] = None,
        seed: Annotated[int, typer.Option(min=0, help="Seed of the orders and of random ties.")] = 0,
        max_samples: Annotated[
            Optional[int],
            typer.Option("--max-samples", min=1, help="Budget per problem [fewest samples of any problem]."),
        ] = None,
        tie: Annotated[str, typer.Option(help="Final-vote ties: first|random|expected.")] = DEFAULT_TIE,
        verifier: Annotated[
            Optional[str], typer.Option(help="Whose verdicts give answers and correctness [the run's].")
        ] = None,
        deepconf_window: Annotated[
            int, typer.Option(min=1, help="deepconf rule: sliding-window length in tokens.")
        ] = 2048,
        per_problem: Annotated[
            bool, typer.Option("--per-problem", help="With --json: add each problem's outcome.")
        ] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
        model: Annotated[
            Optional[str],
            typer.Option("--model", "-m", help="selfeval rules: the model that scores the stored token "
                         "prefixes (hf engine) [the run's own, when a local folder]."),
        ] = None,
    ) -> None:
        """Replay an adaptive stopping rule on a stored pool: accuracy, samples and tokens
        against self-consistency at the same budget, with 95% CIs. With --allocate POLICY
        --budget-total N: a dataset budget allocated across the problems, against uniform SC."""
        from ttscale.cli.analysis_cmds import describe_verdicts
        from ttscale.cli.sample_cmds import check_rule_name
        from ttscale.replay import replay, summary_line
        from ttscale.runkinds import kind_refusal, run_kind
        from ttscale.select.adaptive import parse_rule
        from ttscale.store import SampleStore

        kind = run_kind(SampleStore.open(run).manifest)
        if kind in ("pruned", "shortmk", "smc", "search", "allocated") or (
            kind == "adaptive" and (calibrate is not None or allocate is not None)
        ):
            what = "--calibrate" if calibrate is not None else "--allocate" if allocate else "replaying a rule on its samples"
            raise ConfigError(kind_refusal(kind, what, run))
        if calibrate is not None:
            from ttscale.cli.allocation_cmds import replay_calibrate

            replay_calibrate(run, calibrate, target=target, rule=rule, allocate=allocate, orders=orders,
                             order=order, seed=seed, max_samples=max_samples, verifier=verifier,
                             json_out=json_out)
            return
        if allocate is not None:
            if rule is not None:
                raise ConfigError("--rule and --allocate exclude each other; a stopping rule joins an allocation as --stop-rule RULE")
            from ttscale.cli.allocation_cmds import replay_allocate

            replay_allocate(run, allocate, budget_total, tokens=tokens, stop=stop_rule, orders=orders, order=order,
                            seed=seed, max_samples=max_samples, verifier=verifier, round_size=round_size,
                            per_problem=per_problem, json_out=json_out)
            return
        if rule is None:
            raise ConfigError("pass --rule RULE (a stopping rule) or --allocate POLICY --budget-total N")
        if order is not None and order != "index":
            raise ConfigError(f"--order takes only 'index' (random orders: --orders N), got {order!r}")
        if order == "index" and orders is not None:
            raise ConfigError("--order index and --orders N exclude each other; pass one")
        from ttscale.select.shortmk import is_short_spec

        if is_short_spec(rule):
            _replay_short(run, rule, orders, order, max_samples, verifier, seed, json_out)
            return
        check_rule_name(rule, "--rule")  # an unknown rule: one line naming both kinds
        trace_rule = rule.strip().partition(":")[0].strip() in _TRACE_RULES
        if model is not None and rule.strip().partition(":")[0].strip() not in _SCORED_RULES:
            raise ConfigError(f"--model is for the self-evaluation rules ({', '.join(_SCORED_RULES)}); drop it")
        store = SampleStore.open(run)
        if kind == "adaptive":
            if trace_rule:
                raise ConfigError(
                    f"{run} was itself adaptive: it drew only the samples its own rule asked for, so "
                    "a trace-pruning rule cannot be replayed against the full run; replay it on a "
                    "fixed-n run (`ttscale sample --n N`)"
                )
            _replay_adaptive_run(store, run, rule, orders, max_samples, tie, verifier, seed,
                                 deepconf_window, json_out)  # fmt: skip
            return
        if trace_rule:
            _replay_trace_rule(run, rule, orders, max_samples, verifier, seed, json_out, model)
            return
        parsed = parse_rule(rule)  # before reading the run
        pool = store.pool(verifier)
        confs = None
        if parsed.needs_confidences:
            from ttscale.analysis import run_confidences

            confs = run_confidences(store, window=deepconf_window)
        n_orders = orders if orders is not None else (None if order == "index" else 1)
        if orders is None and order is None:
            typer.echo(
                "note: replaying one seeded random order per problem; --order index replays the "
                "live order, --orders N averages over N orders",
                err=True,
            )
        report = replay(
            pool, parsed, orders=n_orders, seed=seed, max_samples=max_samples, tie=tie, confidences=confs
        )
        if json_out:
            out = report.to_dict(per_problem=per_problem)
            typer.echo(json.dumps({**out, "verdicts": pool.meta.get("verdicts")}, indent=2))
            return
        d = report.to_dict()
        typer.echo(describe_verdicts(pool.meta.get("verdicts")))
        typer.echo(
            f"{run}: {d['problems']} problems, budget {report.max_samples}, "
            f"{'index order' if report.order == 'index' else f'{report.orders} random orders'}, tie {tie}"
        )
        typer.echo(summary_line(report))
        for name, block in (("rule", d), ("fixed", d["fixed"])):
            acc = block["accuracy"]
            line = f"  {name:5s} accuracy {acc['mean']:.4f} [{acc['low']:.4f}, {acc['high']:.4f}]"
            if block["tokens"] is not None:
                t = block["tokens"]
                line += f"  tokens/problem {t['mean']:.1f} [{t['low']:.1f}, {t['high']:.1f}]"
            typer.echo(line)


def _replay_adaptive_run(
    store: Any, run: Path, rule: str, orders: int | None, max_samples: int | None, tie: str,
    verifier: str | None, seed: int, deepconf_window: int, json_out: bool,
) -> None:
    """``replay`` on a run made with ``--adaptive``: its own result, and the given rule where it
    can be replayed (see :func:`ttscale.replay.replay_on_adaptive_run`)."""
    from ttscale.replay import replay_on_adaptive_run
    from ttscale.runkinds import run_points
    from ttscale.select.adaptive import parse_rule

    parsed = parse_rule(rule)
    a = store.manifest.get("adaptive") or {}
    budget = int(a.get("budget") or 0)
    if orders is not None:
        raise ConfigError(
            f"{run} was itself adaptive ({a.get('rule')}): its samples are the prefix its own rule "
            "chose, so random orders (--orders) cannot be replayed; drop --orders (index order)"
        )
    if max_samples is not None and max_samples != budget:
        raise ConfigError(
            f"{run} was itself adaptive with budget {budget} per problem: --max-samples "
            f"{max_samples} cannot be replayed; drop --max-samples"
        )
    pool = store.pool(verifier)
    confs = None
    if parsed.needs_confidences:
        from ttscale.analysis import run_confidences

        confs = run_confidences(store, window=deepconf_window)
    d = replay_on_adaptive_run(pool, parsed, budget=budget, tie=tie, confidences=confs, seed=seed)
    own = run_points(store, pool, label=run.name, seed=seed)[0]
    d["run"] = {"rule": a.get("rule"), "budget": budget, **own.to_dict()}
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return

    def ci(b: dict[str, Any], f: str = ".4f") -> str:
        return "n/a" if b["mean"] is None else f"{b['mean']:{f}} [{b['low']:{f}}, {b['high']:{f}}]"

    r = d["run"]
    typer.echo(
        f"{run} was itself adaptive ({a.get('rule')}, budget {budget}): its own result: accuracy "
        f"{ci(r['accuracy'])}, samples/problem {ci(r['samples'], '.2f')}, tokens/problem "
        f"{ci(r['tokens'], '.1f')}"
    )
    typer.echo(
        f"{d['rule']} replayed in index order on {d['replayed']} of {d['problems']} problems: "
        f"accuracy {ci(d['accuracy'])}, samples/problem {ci(d['samples'], '.2f')}"
        + (f", tokens/problem {ci(d['tokens'], '.1f')}" if d["tokens"] else "")
    )
    u = d["undecided"]
    if u["count"]:
        typer.echo(
            f"not replayable on {u['count']} problems ({', '.join(u['ids'][:10])}"
            f"{' ...' if u['count'] > 10 else ''}): the rule would need samples the run did not draw"
        )
    typer.echo(
        "cannot replay on this run: random orders, and fixed@budget (problems stopped early hold "
        "fewer samples); for those, replay on a fixed-n run (`ttscale sample --n N`)"
    )


def _replay_short(
    run: Path, rule: str, orders: int | None, order: str | None, max_samples: int | None,
    verifier: str | None, seed: int, json_out: bool,
) -> None:
    """``replay --rule short-m@k`` on a fixed-n run (:func:`ttscale.select.shortmk.replay_short`)."""
    from ttscale.cli.analysis_cmds import describe_verdicts
    from ttscale.runkinds import kind_refusal, run_kind
    from ttscale.select.shortmk import parse_short, replay_short
    from ttscale.store import SampleStore

    parsed = parse_short(rule)  # before reading the run
    store = SampleStore.open(run)
    kind = run_kind(store.manifest)
    if kind != "fixed":
        raise ConfigError(kind_refusal(kind, "replaying short-m@k (it needs all k traces of a problem)", run))
    pool = store.pool(verifier)
    d = replay_short(pool, parsed, max_samples=max_samples, orders=orders, seed=seed)
    d["verdicts"] = pool.meta.get("verdicts")
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return

    def ci(b: dict[str, Any], f: str) -> str:
        return f"{b['mean']:{f}} [{b['low']:{f}}, {b['high']:{f}}]"

    typer.echo(describe_verdicts(d.get("verdicts")))
    where = "the first k traces in index order" if orders is None else f"{orders} random draws of k"
    typer.echo(
        f"{run}: {d['problems']} problems, {d['rule']} with k = {d['k']} ({where}); finish order "
        f"by generated length; cost model: {d['cost_model']}"
    )
    for name, b in (("rule", d), (d["fixed"]["rule"], d["fixed"])):
        typer.echo(
            f"  {name:11s} accuracy {ci(b['accuracy'], '.4f')}  tokens/problem {ci(b['tokens'], '.1f')}"
            f"  wall steps/problem {ci(b['wall_steps'], '.1f')}"
        )
    typer.echo(
        f"  tokens {d['token_ratio']:.3f}x and wall time {d['wall_ratio']:.3f}x of majority@{d['k']}"
        if d["token_ratio"] is not None and d["wall_ratio"] is not None
        else "  (no tokens in this run)"
    )


# level-2 rules (trace pruning); replayed from per-token log-probs, in stored index order
_TRACE_RULES = ("deepconf-online", "lowprob", "selfeval", "selfeval-top")
# trace-pruning rules that ask the model (a scoring engine from --model)
_SCORED_RULES = ("selfeval", "selfeval-top")


def _scoring_model(run: Path, manifest: dict[str, Any], model: str | None) -> str:
    """--model, else the run's own model when the manifest records a local folder."""
    if model is not None:
        return model
    own = manifest.get("model")
    if isinstance(own, str) and Path(own).is_dir():
        return own
    raise ConfigError(
        f"{run} records no local model folder ({own!r}) to score self-evaluations with; pass "
        "--model PATH (a model with the run's tokenizer)"
    )


def _replay_trace_rule(
    run: Path, rule: str, orders: int | None, max_samples: int | None, verifier: str | None,
    seed: int, json_out: bool, model: str | None = None,
) -> None:
    from ttscale.cli.analysis_cmds import describe_verdicts
    from ttscale.replay import replay_trace_rule
    from ttscale.samplers.pruning import parse_prune_rule
    from ttscale.store import SampleStore

    parsed = parse_prune_rule(rule)  # before reading the run
    if orders is not None:
        raise ConfigError(
            f"{rule.split(':')[0]} is a trace-pruning rule: its warm-up traces are the first ones "
            "in index order, so it replays in stored order only; drop --orders"
        )
    store = SampleStore.open(run)
    engine = None
    scorer_line = None
    if parsed.name in _SCORED_RULES:
        from ttscale.engines import make_engine

        path = _scoring_model(run, dict(store.manifest), model)
        own = "the run's own model" if path == store.manifest.get("model") else "--model"
        scorer_line = f"self-evaluation scored by {path} ({own}, hf engine)"
        typer.echo(scorer_line, err=True)
        if getattr(parsed, "every", 0):
            typer.echo(
                "note: a live run draws each chunk after the first checkpoint from its own seed "
                "substream, so past it a fixed run's traces (and decisions) are not the live run's",
                err=True,
            )
        engine = make_engine("hf", path)
    try:
        d = replay_trace_rule(
            store, rule, max_samples=max_samples, verifier=verifier, seed=seed, engine=engine
        )
    finally:
        if engine is not None:
            engine.close()
    if scorer_line is not None:
        d["scoring_model"] = scorer_line
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(describe_verdicts(d.get("verdicts")))
    typer.echo(
        f"{run}: {d['problems']} problems, trace-pruning rule {d['rule']} replayed in index order: "
        f"{d['pruned']} traces pruned, {d['saved_fraction']:.1%} of the tokens saved"
    )
    if parsed.name in _SCORED_RULES:
        sc = d["scored_tokens"]
        typer.echo(
            "  self-evaluation scored tokens (context, not in tokens/problem): "
            + (f"{sc} ({sc / max(d['problems'], 1):.1f}/problem)" if sc is not None else "unknown")
        )
    for name, block in (("rule", d), ("fixed", d["fixed"])):
        acc, t = block["accuracy"], block["tokens"]
        typer.echo(
            f"  {name:5s} accuracy {acc['mean']:.4f} [{acc['low']:.4f}, {acc['high']:.4f}]"
            f"  tokens/problem {t['mean']:.1f} [{t['low']:.1f}, {t['high']:.1f}]"
        )


def _run_live(
    bench: Any,
    make: Any,
    announce: Any,
    problems: Sequence[Any],
    budget: int,
    seed: int | None,
    store: Any,
) -> tuple[Any, list[Any], float]:
    """Run a live sampler made by ``make(answer_fn)`` (answers from the benchmark's verifier,
    closed afterwards) into ``store``; ``announce(sampler)`` says what it chose first. Returns
    the sampler, its results and the wall time."""
    from ttscale.samplers.adaptive import verifier_answers
    from ttscale.verifiers.base import close_verifier, make_verifier

    verifier = make_verifier(bench.verifier)
    try:
        sampler = make(verifier_answers(verifier))
        typer.echo(announce(sampler), err=True)
        t0 = time.perf_counter()
        results = list(sampler.sample(problems, budget, seed=seed, sink=store))
        wall = time.perf_counter() - t0
    finally:
        close_verifier(verifier)
    store.refresh()
    return sampler, results, wall


def sample_adaptive(
    engine: Any,
    params: Any,
    store: Any,
    problems: Sequence[Any],
    budget: int,
    rule: str,
    bench: Any,
    spec: Any,
    manifest: Mapping[str, Any],
) -> Any:
    """``ttscale sample --adaptive RULE``: the adaptive sampler into ``store``, answers from the
    benchmark's verifier; returns a :class:`~ttscale.samplers.repeated.SamplingSummary`."""
    from ttscale.samplers.adaptive import AdaptiveSampler
    from ttscale.samplers.repeated import SamplingSummary

    def make(answer_fn: Any) -> Any:
        return AdaptiveSampler(
            engine,
            params,
            rule,
            answer_fn,
            batch_size=spec.batch_size,
            chat=spec.chat,
            system_prompt=spec.system_prompt,
            progress=None if spec.progress else False,
            manifest=manifest,
        )

    def announce(sampler: Any) -> str:
        return (
            f"adaptive: rule {sampler.rule.spec}, budget {budget} per problem, answers from the "
            f"{bench.verifier} verifier, ties to the first-seen answer; problems queue their budget, "
            f"lower sample indices first, at most {sampler.batch_size} samples in the engine at once "
            "(--batch-size; samples beyond a stop are kept in the run, not used)"
        )

    sampler, results, wall = _run_live(bench, make, announce, problems, budget, params.seed, store)
    decisions = sampler.decisions
    resumed = sum(r.resumed for r in results)
    drawn = sum(d.drawn for d in decisions)
    stopped = sum(d.stopped for d in decisions)
    used = sum(d.used for d in decisions)
    typer.echo(
        f"adaptive: {stopped} of {len(decisions)} problems stopped early; {used:,} samples used "
        f"of {len(decisions) * budget:,} budgeted ({used / max(1, len(decisions)):.2f} per problem), "
        f"{drawn:,} drawn; decisions in {store.path / 'adaptive.jsonl'}",
        err=True,
    )
    return SamplingSummary(
        path=store.path,
        problems=len(problems),
        n=budget,
        requested=drawn,
        skipped=resumed,
        generated=drawn - resumed,
        stored=len(store),
        generated_tokens=sum(r.generated_tokens for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        wall_seconds=wall,
        accounting=store.accounting(),
    )


def sample_shortmk(
    engine: Any,
    params: Any,
    store: Any,
    problems: Sequence[Any],
    budget: int,
    rule: str,
    bench: Any,
    spec: Any,
    manifest: Mapping[str, Any],
) -> Any:
    """``ttscale sample --adaptive short-3@k``: short-m@k live into ``store`` (a run of kind
    ``shortmk``), answers from the benchmark's verifier; returns a
    :class:`~ttscale.samplers.repeated.SamplingSummary`."""
    from ttscale.samplers.repeated import SamplingSummary
    from ttscale.samplers.shortmk import SHORTMK_FILE, ShortMKSampler

    def make(answer_fn: Any) -> Any:
        return ShortMKSampler(
            engine, params, rule, answer_fn, batch_size=spec.batch_size,
            flush_every=spec.flush_every, chat=spec.chat, system_prompt=spec.system_prompt,
            progress=None if spec.progress else False, manifest=manifest,
        )  # fmt: skip

    def announce(sampler: Any) -> str:
        return (
            f"short-m@k: {sampler.rule.spec}, {sampler.rule.size(budget)} traces per problem side by "
            f"side, stopped when the first {sampler.rule.m} finish (the others aborted, their tokens "
            "counted); majority among them, ties to the shortest; answers from the "
            f"{bench.verifier} verifier"
        )

    sampler, results, wall = _run_live(bench, make, announce, problems, budget, params.seed, store)
    k = sampler.rule.size(budget)
    ds = sampler.decisions
    finished = sum(d.finished for d in ds)
    resumed = sum(d.resumed for d in ds)
    aborted = sum(d.aborted for d in ds)
    typer.echo(
        f"short-m@k: {finished:,} traces finished and {aborted:,} aborted over {len(ds)} problems "
        f"({sum(d.aborted_tokens for d in ds):,} tokens of aborted traces); decisions in "
        f"{store.path / SHORTMK_FILE}",
        err=True,
    )
    return SamplingSummary(
        path=store.path,
        problems=len(problems),
        n=k,
        requested=finished,
        skipped=resumed,
        generated=finished - resumed,
        stored=len(store),
        generated_tokens=sum(r.generated_tokens - int(r.info.get("resumed_tokens", 0)) for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        wall_seconds=wall,
        accounting=store.accounting(),
    )
