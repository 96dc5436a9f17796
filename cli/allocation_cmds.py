"""``--allocate`` and ``--calibrate``: budget allocation across problems in ``replay``,
``curve`` and ``sample`` (the commands' option wiring lives with each command; the work is here)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from ttscale.errors import ConfigError


def _fmt(ci: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    if ci is None or ci.get("mean") is None:
        return "-"
    return f"{ci['mean'] * scale:.{digits}f} [{ci['low'] * scale:.{digits}f}, {ci['high'] * scale:.{digits}f}]"


def _budget(budget_total: float | None, tokens: bool) -> float:
    if budget_total is None:
        raise ConfigError("--allocate needs --budget-total N (samples, or generated tokens with --tokens)")
    if not budget_total > 0:
        raise ConfigError(f"--budget-total must be positive, got {budget_total:g}")
    return float(budget_total)


def _n_orders(orders: int | None, order: str | None) -> int | None:
    if order is not None and order != "index":
        raise ConfigError(f"--order takes only 'index' (random orders: --orders N), got {order!r}")
    if order == "index" and orders is not None:
        raise ConfigError("--order index and --orders N exclude each other; pass one")
    if orders is None and order is None:
        typer.echo(
            "note: replaying one seeded random order per problem; --order index replays the live "
            "order, --orders N averages over N orders",
            err=True,
        )
    return orders if orders is not None else (None if order == "index" else 1)


def replay_allocate(
    run: Path, policy: str, budget_total: float | None, *, tokens: bool, stop: str | None,
    orders: int | None, order: str | None, seed: int, max_samples: int | None, verifier: str | None,
    round_size: int | None, per_problem: bool, json_out: bool,
) -> None:
    """``ttscale replay RUN --allocate POLICY --budget-total N [--tokens]``."""
    from ttscale.allocation import replay_allocation
    from ttscale.select.adaptive import parse_rule
    from ttscale.select.allocation import parse_policy
    from ttscale.store import SampleStore

    pol = parse_policy(policy)  # before reading the run
    rule = parse_rule(stop) if stop else None
    budget = _budget(budget_total, tokens)
    n_orders = _n_orders(orders, order)
    pool = SampleStore.open(run).pool(verifier)
    rep = replay_allocation(pool, pol, budget, tokens=tokens, stop=rule, orders=n_orders, seed=seed,
                            max_samples=max_samples, round_size=round_size)
    d = rep.to_dict(per_problem=per_problem)
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    unit = d["unit"]
    how = "index order" if d["order"] == "index" else f"{d['orders']} random orders"
    typer.echo(
        f"{run}: {d['problems']} problems, total budget {budget:,.0f} {unit}, at most {d['max_samples']} "
        f"samples a problem, {how}"
        + (f", stopping rule {d['stop']}" if d["stop"] else "")
    )
    _print_blocks(d)


def _print_blocks(d: Mapping[str, Any]) -> None:
    tok = d["tokens_total"] is not None
    for name, block in ((d["policy"], d), ("uniform", d["uniform"]), (d["full"]["policy"], d["full"])):
        line = f"  {name:20s} accuracy {_fmt(block['accuracy'])}  samples {block['samples_total']:,.0f}"
        if tok:
            line += f"  tokens {block['tokens_total']:,.0f}"
        typer.echo(line)
    typer.echo(f"  vs uniform at the same budget: {_fmt(d['accuracy_delta_uniform'], 100, 2)} points")
    line = f"  vs {d['full']['policy']}: {_fmt(d['accuracy_delta_full'], 100, 2)} points, samples {_fmt(d['sample_ratio'], 1, 3)}x"
    if d["token_ratio"]["mean"] is not None:
        line += f", tokens {_fmt(d['token_ratio'], 1, 3)}x"
    typer.echo(line)


def curve_allocate(
    runs: Sequence[Path], policies: str, *, tokens: bool, stop: str | None, orders: int | None,
    seed: int, max_samples: int | None, verifier: str | None, plot: Path | None, json_out: bool,
    confidence: float, n_boot: int,
) -> None:
    """``ttscale curve RUN --allocate POLICY[;POLICY...]``: accuracy against the dataset budget."""
    from ttscale.allocation import allocation_curve
    from ttscale.select.adaptive import parse_rule
    from ttscale.select.allocation import parse_policy
    from ttscale.store import SampleStore

    if len(runs) != 1:
        raise ConfigError("--allocate draws the curve of one run; pass one run directory")
    specs = [parse_policy(p).spec for p in _split_policies(policies)]
    rule = parse_rule(stop) if stop else None
    if plot is not None:
        from ttscale.paths import check_writable_file

        check_writable_file(plot, "--plot")
    pool = SampleStore.open(runs[0]).pool(verifier)
    cur = allocation_curve(pool, specs, tokens=tokens, stop=rule, orders=orders or 1, seed=seed,
                           max_samples=max_samples, confidence=confidence, n_boot=n_boot)
    if json_out:
        typer.echo(json.dumps(cur, indent=2))
    else:
        _print_curve(runs[0], cur)
    if plot is not None:
        plot_allocation_curve(cur, plot)
        typer.echo(f"plot: {plot}", err=True)


def _split_policies(text: str) -> list[str]:
    # policies are separated by ';' (',' separates a policy's parameters)
    parts = [p.strip() for p in text.split(";")]
    if not all(parts):
        raise ConfigError(f"empty policy in --allocate {text!r}; separate policies with ';'")
    return parts


def _print_curve(run: Path, cur: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    P = cur["problems"]
    t = Table(title=f"{run}: accuracy against the dataset budget ({P} problems, at most "
                    f"{cur['max_samples']} samples each, {cur['orders']} orders"
                    + (f", stop {cur['stop']}" if cur["stop"] else "") + ")")
    unit = cur["unit"]
    t.add_column(f"budget ({unit})", justify="right")
    t.add_column("x problems", justify="right")
    for spec in cur["curves"]:
        t.add_column(spec, justify="right")
    for i, b in enumerate(cur["budgets"]):
        per = cur["curves"]["uniform"][i]["samples_total"] / P
        row = [f"{b:,.0f}", f"{per:.1f}"]
        for spec in cur["curves"]:
            row.append(_fmt(cur["curves"][spec][i]["accuracy"], digits=3))
        t.add_row(*row)
    console = Console()
    console.print(t)
    full = cur["full"]
    console.print(f"{full['policy']} (every sample up to the cap): accuracy {_fmt(full['accuracy'])}")


def plot_allocation_curve(cur: Mapping[str, Any], path: Path) -> None:
    """Accuracy against the dataset budget, one line with a CI band per policy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = cur["budgets"]
    for spec, pts in cur["curves"].items():
        m = [p["accuracy"]["mean"] for p in pts]
        lo = [p["accuracy"]["low"] for p in pts]
        hi = [p["accuracy"]["high"] for p in pts]
        ax.plot(xs, m, marker="o", ms=3, label=spec)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.axhline(cur["full"]["accuracy"]["mean"], color="grey", ls="--", lw=1, label=cur["full"]["policy"])
    ax.set_xscale("log")
    ax.set_xlabel(f"dataset budget ({cur['unit']})")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_allocate(
    engine: Any, params: Any, store: Any, problems: Sequence[Any], n: int, policy: str,
    budget_total: float | None, tokens: bool, stop: str | None, bench: Any, spec: Any,
    manifest: Mapping[str, Any],
) -> Any:
    """``ttscale sample --allocate POLICY --budget-total N [--tokens]``: the allocation sampler
    into ``store`` (``n``: the per-problem cap), answers from the benchmark's verifier."""
    from ttscale.samplers.adaptive import verifier_answers
    from ttscale.samplers.allocation import AllocationSampler
    from ttscale.samplers.repeated import SamplingSummary
    from ttscale.verifiers.base import close_verifier, make_verifier

    budget = _budget(budget_total, tokens)
    verifier = make_verifier(bench.verifier)
    try:
        sampler = AllocationSampler(
            engine, params, policy, verifier_answers(verifier), budget_total=budget, tokens=tokens,
            stop=stop, batch_size=spec.batch_size, chat=spec.chat, system_prompt=spec.system_prompt,
            progress=False, manifest=manifest,
        )
        typer.echo(
            f"allocate: policy {sampler.policy.spec}, total budget {budget:,.0f} "
            f"{'tokens' if tokens else 'samples'} over {len(problems)} problems, at most {n} a problem"
            + (f", stopping rule {sampler.stop.spec}" if sampler.stop else "")
            + f", answers from the {bench.verifier} verifier, ties to the first-seen answer",
            err=True,
        )
        t0 = time.perf_counter()
        results = list(sampler.sample(problems, n, seed=params.seed, sink=store))
        wall = time.perf_counter() - t0
    finally:
        close_verifier(verifier)
    store.refresh()
    used = sum(d.samples for d in sampler.decisions)
    resumed = sum(r.resumed for r in results)
    typer.echo(
        f"allocate: {used:,} samples over {len(results)} problems in {sampler.engine_calls} engine "
        f"calls ({sum(d.tokens for d in sampler.decisions):,} tokens); decisions in "
        f"{store.path / 'allocation.jsonl'}",
        err=True,
    )
    return SamplingSummary(
        path=store.path, problems=len(problems), n=n, requested=used, skipped=resumed,
        generated=used - resumed, stored=len(store),
        generated_tokens=sum(r.generated_tokens for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results), wall_seconds=wall,
        accounting=store.accounting(),
    )


def check_sample_allocate(spec: Any, shard: Any) -> None:
    """Refuse bad ``sample --allocate`` options before a model loads."""
    from ttscale.select.adaptive import parse_rule
    from ttscale.select.allocation import parse_policy

    parse_policy(spec.allocate)
    _budget(spec.budget_total, spec.budget_tokens)
    if spec.stop_rule:
        parse_rule(spec.stop_rule)
    if shard is not None:
        raise ConfigError("--allocate decides over all problems at once; drop --shard")
    if spec.adaptive is not None or spec.prune is not None:
        raise ConfigError("--allocate takes a per-problem stopping rule as --stop-rule; drop --adaptive/--prune")


def replay_calibrate(
    run: Path, k: int, *, target: str, rule: str | None, allocate: str | None, orders: int | None,
    order: str | None, seed: int, max_samples: int | None, verifier: str | None, json_out: bool,
) -> None:
    """``ttscale replay RUN --calibrate K [--target within:0.5|tokens:0.1] [--rule R] [--allocate P]``."""
    from ttscale.calibrate import DEFAULT_FAMILIES, calibrate, parse_target
    from ttscale.select.adaptive import parse_rule
    from ttscale.select.allocation import parse_policy
    from ttscale.store import SampleStore

    tgt = parse_target(target)
    rules: dict[str, list[str]] | None = None
    policies: list[str] = []
    if rule is not None:
        parts = _split_policies(rule)
        if len(parts) == 1 and parts[0].strip().lower() in DEFAULT_FAMILIES:
            rules = {parts[0].strip().lower(): DEFAULT_FAMILIES[parts[0].strip().lower()]}
        else:
            specs = [parse_rule(x).spec for x in parts]
            rules = {parse_rule(parts[0]).name: specs}
    if allocate is not None:
        policies = [parse_policy(x).spec for x in _split_policies(allocate)]
    if rules is None and not policies:
        rules, policies = dict(DEFAULT_FAMILIES), ["uniform", "greedy", "gape"]
    n_orders = _n_orders(orders, order)
    pool = SampleStore.open(run).pool(verifier)
    d = calibrate(pool, k=k, target=tgt, rules=rules or {}, policies=policies, orders=n_orders, seed=seed,
                  max_samples=max_samples)
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{run}: {k}-fold calibration (seed {seed}) for {d['target']}, {d['problems']} problems, "
                    f"held-out folds pooled; SC@{d['max_samples']} accuracy {_fmt(d['sc_full'], digits=3)}")
    for col in ("family", "chosen on the other folds", "held-out accuracy", "Δ vs SC (points)", f"{d['cost']} ratio"):
        t.add_column(col)
    for fam, f in d["families"].items():
        chosen = sorted(set(f["chosen"]), key=f["chosen"].index)
        t.add_row(fam, "; ".join(chosen), _fmt(f["held_out_accuracy"], digits=3),
                  _fmt(f["delta_vs_sc_full_points"], digits=2), _fmt(f["cost_ratio"], digits=3))
    Console().print(t)
