"""Which strategy a request runs: presets, the request's fields, and their precedence.

A strategy is a set of fields (:data:`FIELDS`). Each field is taken from the first of these that
sets it: ``X-TTScale-<Field>`` headers, the body's ``ttscale`` object, the body's flat aliases
(``ttscale_<field>``; lm-evaluation-harness copies ``--gen_kwargs`` to the top level of the body),
the preset named by ``model``, the server's default. Bad values are :class:`RequestError`
(an OpenAI-shaped 400 that names the field).

Strategies: ``repeated`` (``budget`` independent samples, then the selection rule ``rule`` of
:data:`ttscale.select.rules.RULES`, e.g. ``majority``, ``rpc``, ``best_of_n``, with options as
``ttscale select`` takes them: ``majority:tie=first``), ``adaptive`` (stop each request by the
adaptive rule ``rule`` of :mod:`ttscale.select.adaptive`, e.g. ``beta:0.95``, ``esc:window=5``,
at most ``budget`` samples), ``pruning`` (``budget`` traces, stopped mid-generation by the
pruning rule ``rule`` of :mod:`ttscale.samplers.pruning`, ``deepconf-online`` or ``lowprob``;
the answer is the majority over the traces it kept), ``smc`` (``budget`` particles weighted by
the potential ``potential``, FK steering as ``ttscale smc`` runs it by default; ``rule``: ``vote``,
the largest total weight, or ``argmax``, the heaviest particle), ``beam``, ``dvts`` and
``best_of_n`` (step-level search of :mod:`ttscale.samplers.search` with width
:data:`SEARCH_WIDTH`, ranked by the potential; ``rule`` as for ``smc``, over the final pool),
``shortmk`` (short-m@k, :mod:`ttscale.samplers.shortmk`: ``budget`` traces side by side, the
request stops when the first ``m`` finish, majority among them, ties to the shortest; ``rule``
``short-3@k``, ``short-1@k`` or ``short-M@K``) and
``none`` (the bare model: plain
pass-through, ``n`` samples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ttscale.errors import ConfigError

__all__ = [
    "FIELDS",
    "REQUEST_VERIFIERS",
    "STRATEGIES",
    "RequestError",
    "StrategySpec",
    "parse_preset",
    "resolve",
]

#: strategies the server runs on its scheduler
#: step-level searches (ttscale.samplers.search), each a strategy of its own
SEARCHES = ("beam", "dvts", "best_of_n")
#: the search width M (beams per kept node, DVTS subtree size), as ``ttscale smc --search``'s default
SEARCH_WIDTH = 4
STRATEGIES = ("repeated", "adaptive", "pruning", "shortmk", "smc", *SEARCHES, "none")
#: strategies of the library that the server does not run yet (a clear 400, not a silent swap)
NOT_SERVED: tuple[str, ...] = ()
#: verifier heads a request may name; the others read files, load models or run code, so only
#: a preset (set by whoever started the server) may use them
REQUEST_VERIFIERS = ("math", "arith")
#: potential heads a request may name (the others load models, call servers or import code)
REQUEST_POTENTIALS = ("arith-prm",)
#: how SMC picks its answer from the weighted final population (ttscale.samplers.smc.select_answer)
SMC_RULES = ("vote", "argmax")
MAX_BUDGET = 1024
#: the rule a strategy gets when no layer names one
DEFAULT_RULES = {
    "repeated": "majority", "adaptive": "beta:0.95", "pruning": "deepconf-online", "shortmk": "short-3@k", "smc": "vote",
    "beam": "vote", "dvts": "vote", "best_of_n": "vote", "none": "majority",
}
#: pruning rules a server runs: selfeval scores each trace with extra engine calls from inside
#: the engine loop, which the server's one engine thread cannot make
SERVED_PRUNE_RULES = ("deepconf-online", "lowprob")


class RequestError(Exception):
    """A client error, sent as an OpenAI-shaped error body."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class StrategySpec:
    """A resolved strategy: ``strategy`` name, its ``rule`` spec, ``budget`` samples, the
    ``verifier`` spec that gives answers (and scores), limits, and whether the response lists
    every candidate."""

    strategy: str = "repeated"
    rule: str = "majority"
    budget: int = 8
    verifier: str = "math"
    #: the SMC potential spec (``arith-prm``; paths and code only from a preset)
    potential: str | None = None
    return_candidates: bool = False
    max_total_tokens: int | None = None
    deadline_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELDS = tuple(f.name for f in fields(StrategySpec))


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.strip().lower() in ("1", "true", "yes", "on")
    raise RequestError(f"{name} must be true or false, got {v!r}", param=name)


def _as_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        x = int(v)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be an integer, got {v!r}", param=name) from None
    if x < lo or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be {rng}, got {x}", param=name)
    return x


def _check_field(name: str, v: Any, *, from_request: bool) -> Any:
    """The value of field ``name`` checked and converted (``param`` names it on error)."""
    if name not in FIELDS:
        raise RequestError(
            f"unknown ttscale field {name!r}; the fields are {', '.join(FIELDS)}", param=f"ttscale.{name}"
        )
    if name == "strategy":
        s = str(v).strip().lower()
        if s in NOT_SERVED:
            raise RequestError(
                f"strategy {s!r} is not served yet; served: {', '.join(STRATEGIES)}", param="ttscale.strategy"
            )
        if s not in STRATEGIES:
            raise RequestError(
                f"unknown strategy {s!r}; choose one of {', '.join(STRATEGIES)}", param="ttscale.strategy"
            )
        return s
    if name == "budget":
        return _as_int("ttscale.budget", v, 1, MAX_BUDGET)
    if name == "max_total_tokens":
        return None if v is None else _as_int("ttscale.max_total_tokens", v, 1)
    if name == "deadline_s":
        if v is None:
            return None
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RequestError(f"ttscale.deadline_s must be a number, got {v!r}", param="ttscale.deadline_s") from None
        if not (math.isfinite(x) and x > 0):
            raise RequestError(f"ttscale.deadline_s must be > 0, got {v!r}", param="ttscale.deadline_s")
        return x
    if name == "potential" and v is None:
        return None
    if name == "return_candidates":
        return _as_bool("ttscale.return_candidates", v)
    if not isinstance(v, str) or not v.strip():
        raise RequestError(f"ttscale.{name} must be a non-empty string, got {v!r}", param=f"ttscale.{name}")
    v = v.strip()
    if name == "potential" and from_request:
        head = v.partition(":")[0].strip().lower()
        if head not in REQUEST_POTENTIALS:
            raise RequestError(
                f"potential {v!r} may only be set by a server preset (a request may name "
                f"{', '.join(REQUEST_POTENTIALS)})",
                param="ttscale.potential",
            )
    if name == "verifier" and from_request:
        head = v.partition(":")[0].strip().lower()
        if head not in REQUEST_VERIFIERS:
            raise RequestError(
                f"verifier {v!r} may only be set by a server preset (a request may name "
                f"{', '.join(REQUEST_VERIFIERS)})",
                param="ttscale.verifier",
            )
    return v


def parse_preset(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=SPEC`` -> ``(NAME, fields)``. SPEC is a JSON object (``{"strategy": "adaptive",
    "rule": "beta:0.95", "budget": 16}``) or ``key=value`` pairs separated by ``;``
    (``strategy=repeated;rule=majority;budget=8;verifier=arith``). A preset may name any
    verifier (paths included). Raises :class:`ConfigError`."""
    name, eq, spec = text.partition("=")
    name = name.strip()
    if not eq or not name or not spec.strip():
        raise ConfigError(f"--preset must look like NAME=SPEC, got {text!r}")
    spec = spec.strip()
    raw: dict[str, Any]
    if spec.startswith("{"):
        try:
            raw = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--preset {name}: SPEC is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--preset {name}: SPEC must be a JSON object")
    else:
        raw = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            k, eq2, v = part.partition("=")
            if not eq2:
                raise ConfigError(f"--preset {name}: {part!r} is not key=value (fields: {', '.join(FIELDS)})")
            raw[k.strip()] = v.strip()
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = _check_field(k, v, from_request=False)
        except RequestError as e:
            raise ConfigError(f"--preset {name}: {e.message}") from None
    if "strategy" in out and "rule" not in out:
        out["rule"] = DEFAULT_RULES[out["strategy"]]
    try:
        check_rule(replace(StrategySpec(), **out))
    except RequestError as e:
        raise ConfigError(f"--preset {name}: {e.message}") from None
    return name, out


def check_rule(spec: StrategySpec) -> None:
    """Parse the rule and verifier specs now, so a bad one is a 400 (or a one-line CLI error)."""
    try:
        if spec.strategy == "repeated":
            from ttscale.select.strategies import parse_strategy

            parse_strategy(spec.rule, level=3)
        elif spec.strategy == "adaptive":
            from ttscale.select.adaptive import parse_rule

            parse_rule(spec.rule).usable(spec.budget)
        elif spec.strategy == "shortmk":
            from ttscale.select.shortmk import parse_short

            parse_short(spec.rule).size(spec.budget)
        elif spec.strategy == "pruning":
            from ttscale.samplers.pruning import parse_prune_rule

            head = spec.rule.partition(":")[0].strip()
            if head not in SERVED_PRUNE_RULES:
                raise ConfigError(
                    f"the server runs the pruning rules {', '.join(SERVED_PRUNE_RULES)}"
                    + (" (selfeval needs engine calls the server cannot make)" if head.startswith("selfeval") else "")
                )
            parse_prune_rule(spec.rule)
        elif (spec.strategy == "smc" or spec.strategy in SEARCHES) and spec.rule not in SMC_RULES:
            raise ConfigError(f"{spec.strategy} picks its answer by {' or '.join(SMC_RULES)}")
    except ConfigError as e:
        raise RequestError(f"bad ttscale.rule {spec.rule!r}: {e}", param="ttscale.rule") from None
    if (spec.strategy == "smc" or spec.strategy in SEARCHES) and spec.potential is None:
        raise RequestError(
            f"strategy {spec.strategy!r} needs a potential (a request may name {', '.join(REQUEST_POTENTIALS)}; "
            "others through a preset)",
            param="ttscale.potential",
        )
    if spec.strategy == "smc" or spec.strategy in SEARCHES:
        # a population or search cut part-way has no answer yet: stopping them early is not served
        for name in ("max_total_tokens", "deadline_s"):
            if getattr(spec, name) is not None:
                raise RequestError(
                    f"ttscale.{name} is not served with strategy {spec.strategy!r} (a population or "
                    "search cut part-way has no answer); lower the budget instead",
                    param=f"ttscale.{name}",
                )
    if spec.strategy in ("beam", "dvts") and spec.budget % SEARCH_WIDTH:
        raise RequestError(
            f"{spec.strategy} needs a budget divisible by its width {SEARCH_WIDTH}, got {spec.budget}",
            param="ttscale.budget",
        )
    if spec.strategy != "none":
        from ttscale.verifiers.base import check_spec

        try:
            check_spec(spec.verifier)
        except ConfigError as e:
            raise RequestError(f"bad ttscale.verifier {spec.verifier!r}: {e}", param="ttscale.verifier") from None


_HEADER = "x-ttscale-"


def resolve(
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    presets: Mapping[str, Mapping[str, Any]],
    default: StrategySpec,
    model: str,
) -> tuple[StrategySpec, str]:
    """The request's strategy and the preset it started from (``""``: the server default;
    ``"none"``: the bare model). See the module docstring for the precedence."""
    name = body.get("model")
    layers: list[dict[str, Any]] = []
    preset = ""
    if isinstance(name, str) and name in presets:
        preset = name
        layers.append(dict(presets[name]))
    elif name == model:
        preset = "none"
        layers.append({"strategy": "none"})
    flat = {k[len("ttscale_"):]: v for k, v in body.items() if k.startswith("ttscale_")}
    layers.append({k: _check_field(k, v, from_request=True) for k, v in flat.items()})
    obj = body.get("ttscale")
    if obj is not None:
        if not isinstance(obj, Mapping):
            raise RequestError("ttscale must be an object", param="ttscale")
        layers.append({k: _check_field(k, v, from_request=True) for k, v in obj.items()})
    hdr: dict[str, Any] = {}
    for k, v in headers.items():
        k = k.lower()
        if k.startswith(_HEADER):
            key = k[len(_HEADER):].replace("-", "_")
            hdr[key] = _check_field(key, v, from_request=True)
    layers.append(hdr)
    merged = default.to_dict()
    for layer in layers:
        merged.update(layer)
    if merged["strategy"] != default.strategy and not any("rule" in layer for layer in layers):
        merged["rule"] = DEFAULT_RULES[merged["strategy"]]
    last_rule = max((i for i, layer in enumerate(layers) if "rule" in layer), default=-1)
    if last_rule >= 0:
        # a layer after the last one naming a rule changed the strategy (e.g. a request over a
        # preset): that rule was for another strategy, so the new strategy's default applies
        before = default.strategy
        for layer in layers[: last_rule + 1]:
            before = layer.get("strategy", before)
        if before != merged["strategy"]:
            merged["rule"] = DEFAULT_RULES[merged["strategy"]]
    if merged["strategy"] == "none" and any("budget" in layer for layer in layers[1 if preset else 0:]):
        raise RequestError(
            "ttscale.budget has no effect on the bare model (strategy 'none': n plain samples); "
            "name a strategy or a preset",
            param="ttscale.budget",
        )
    spec = StrategySpec(**merged)
    check_rule(spec)
    return spec, preset
