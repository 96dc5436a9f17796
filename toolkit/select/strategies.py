"""One vocabulary for adaptive-compute strategies, by level.

* level 1, **how many samples per problem** (stop when the answer is settled: ESC,
  Adaptive-Consistency, DeepConf consensus, SPRT): registered by the adaptive sampler's module
  with :func:`register_strategy`;
* level 2, **trace level, mid-generation** (``deepconf-online``, ``lowprob``, ``selfeval``):
  :mod:`ttscale.samplers.pruning`; ``ttscale sample --prune SPEC``;
* level 3, **selection after the fact**: every rule of :data:`ttscale.select.rules.RULES`,
  among them ``rpc`` (reasoning pruning of low-probability paths, then perplexity consistency;
  docs/algorithms.md 2.5).

A strategy is written ``name[:key=value,...]`` as on the command line. A name may exist at two
levels (``deepconf``: level-3 confidence-filtered vote; a level-1 consensus rule may use the same
word); :func:`parse_strategy` then needs ``level=``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.select.aggregate import AggregateResult
from ttscale.select.rules import RULES, Rule

__all__ = [
    "LEVELS",
    "SelectionStrategy",
    "Strategy",
    "get_strategy",
    "parse_strategy",
    "register_strategy",
    "strategies",
]

#: What each level decides.
LEVELS: dict[int, str] = {
    1: "how many samples per problem (stop when the answer is settled)",
    2: "trace level: stop traces mid-generation",
    3: "selection after the fact",
}


@dataclass(frozen=True)
class Strategy:
    """One named strategy: its ``level`` (1-3), a one-line ``description``, an ``example`` spec
    and ``build(spec) -> object`` (the rule object the samplers or selection code take)."""

    name: str
    level: int
    description: str
    example: str
    build: Callable[[str], Any]

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"strategy level must be one of {sorted(LEVELS)}, got {self.level}")


_REGISTRY: dict[tuple[int, str], Strategy] = {}


def register_strategy(strategy: Strategy, *, replace: bool = False) -> None:
    """Add ``strategy`` (a :class:`ConfigError` if its ``(level, name)`` is taken, unless
    ``replace``)."""
    key = (strategy.level, strategy.name)
    if key in _REGISTRY and not replace:
        raise ConfigError(f"a level-{strategy.level} strategy named {strategy.name!r} exists")
    _REGISTRY[key] = strategy


def strategies(level: int | None = None) -> tuple[Strategy, ...]:
    """Every registered strategy (of ``level``), by level then registration order."""
    _load_builtin()
    out = [s for s in _REGISTRY.values() if level is None or s.level == level]
    return tuple(sorted(out, key=lambda s: s.level))


def get_strategy(name: str, level: int | None = None) -> Strategy:
    """The strategy ``name`` (at ``level``, needed when the name exists at several levels)."""
    _load_builtin()
    found = sorted(
        (s for (lv, n), s in _REGISTRY.items() if n == name and level in (None, lv)),
        key=lambda s: s.level,
    )
    if not found:
        known = ", ".join(sorted({s.name for s in _REGISTRY.values() if level in (None, s.level)}))
        where = f" at level {level}" if level is not None else ""
        raise ConfigError(f"unknown strategy {name!r}{where}; choose from {known}")
    if len(found) > 1:
        levels = ", ".join(str(s.level) for s in found)
        raise ConfigError(f"strategy {name!r} exists at levels {levels}; say which (level=...)")
    return found[0]


def parse_strategy(spec: str, level: int | None = None) -> tuple[Strategy, Any]:
    """``"rpc"``, ``"lowprob:threshold=-1.5"``, ... -> ``(strategy, built rule object)``."""
    name = spec.strip().partition(":")[0].strip()
    s = get_strategy(name, level)
    return s, s.build(spec)


# -- level 3: selection rules ----------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionStrategy:
    """A level-3 strategy: a selection rule of :data:`RULES` with its options (``tie``,
    ``fit`` for RPC, ...), applied to one problem's samples by :meth:`select`."""

    rule: Rule
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return self.rule.name

    def spec(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return self.rule.name + (f":{opts}" if opts else "")

    def select(self, answers: Sequence[Hashable | None], **inputs: Any) -> AggregateResult:
        """``rule.answers_fn(answers, **inputs, **options)``; inputs as the rule needs them
        (``mean_logprobs`` for ``rpc``; ``texts`` optional)."""
        missing = [k for k in self.rule.inputs if k != "answers" and k not in inputs]
        if missing:
            raise ConfigError(f"strategy {self.rule.name!r} needs {', '.join(missing)}")
        args = [inputs.pop(k) for k in self.rule.inputs if k != "answers"]
        return self.rule.answers_fn(answers, *args, **inputs, **dict(self.options))

    def pruned(self, mean_logprobs: ArrayLike) -> NDArray[np.bool_]:
        """RPC only: the reasoning-pruning mask (``True`` = path pruned) over paths with mean
        log-probs ``mean_logprobs`` (docs/algorithms.md 2.5; NaN = no log-prob, never pruned)."""
        if self.rule.name != "rpc":
            raise ConfigError(f"strategy {self.rule.name!r} does not prune reasoning paths")
        from ttscale.select.rpc import weibull_prune

        lp = np.asarray(mean_logprobs, dtype=np.float64)
        ok = np.isfinite(lp)
        out = np.zeros(lp.size, dtype=bool)
        if ok.any():
            out[ok] = weibull_prune(np.exp(lp[ok]), fit=dict(self.options).get("fit", "reference"))
        return out


_SELECTION_OPTIONS: dict[str, Callable[[str], Any]] = {"tie": str, "fit": str, "seed": int}


def _selection_builder(rule: Rule) -> Callable[[str], SelectionStrategy]:
    def build(spec: str) -> SelectionStrategy:
        _, _, rest = spec.partition(":")
        opts: list[tuple[str, Any]] = []
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in _SELECTION_OPTIONS:
                raise ConfigError(
                    f"selection strategy {rule.name!r}: {part!r} is not one of "
                    f"{', '.join(k + '=...' for k in _SELECTION_OPTIONS)}"
                )
            if key == "fit" and rule.name != "rpc":
                raise ConfigError(f"fit= applies to rpc only, not {rule.name!r}")
            try:
                opts.append((key, _SELECTION_OPTIONS[key](value.strip())))
            except ValueError:
                raise ConfigError(f"selection strategy {rule.name!r}: {part!r} is not valid") from None
        return SelectionStrategy(rule, tuple(opts))

    return build


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from ttscale.samplers.pruning import DeepConfOnline, LowProb, SelfEval, parse_prune_rule

    level2 = [
        (DeepConfOnline.name, "DeepConf online: stop a trace whose sliding-window confidence "
         "falls below the warm-up threshold", "deepconf-online:eta=10,warmup=16,window=2048"),
        (LowProb.name, "stop a trace whose running mean log-prob falls below a threshold",
         "lowprob:threshold=-1.5,min_tokens=16"),
        (SelfEval.name, "Manvi et al. self-evaluation: stop a trace when P(no restart) at a "
         "checkpoint is below a threshold", "selfeval:checkpoint=64,threshold=0.5"),
    ]
    for name, desc, example in level2:
        register_strategy(Strategy(name, 2, desc, example, parse_prune_rule))
    from ttscale.select.adaptive import parse_rule

    level1 = [
        ("fixed", "no early stop: every sample of the budget (self-consistency)", "fixed"),
        ("esc", "ESC: stop when a window of samples agrees", "esc:window=5"),
        ("beta", "Adaptive-Consistency: Beta posterior that the leader stays ahead", "beta:0.95"),
        ("dirichlet", "Adaptive-Consistency: Dirichlet posterior of the leader", "dirichlet:0.95"),
        ("entropy", "Adaptive-Consistency: normalised answer entropy below a threshold", "entropy:0.75"),
        ("majority", "Adaptive-Consistency: the leader's share above a threshold", "majority:0.8"),
        ("deepconf", "DeepConf consensus: confidence-weighted share above tau", "deepconf:0.95"),
        ("sprt", "Wald SPRT of leader vs runner-up (ConSol's test, our defaults)", "sprt:p1=0.8"),
        ("msprt", "mixture SPRT (Beta prior) of leader vs runner-up (our defaults)", "msprt:alpha=0.05"),
        ("consol-sprt", "ConSol's SPRT exactly (p1=0.5001): stops 3 votes ahead", "consol-sprt"),
        ("consol-msprt", "ConSol's mSPRT exactly (truncated Beta(1e6,1e6)): stops 3 votes ahead",
         "consol-msprt"),
    ]
    for name, desc, example in level1:
        register_strategy(Strategy(name, 1, desc, example, parse_rule))
    for rule in RULES.values():
        example = "rpc:fit=reference" if rule.name == "rpc" else rule.name
        register_strategy(Strategy(rule.name, 3, rule.description, example, _selection_builder(rule)))
