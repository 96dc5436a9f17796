"""The verifier protocol and the factory that builds verifiers from CLI specs.

A verifier checks or scores the candidates of one problem::

    verdicts = verifier.verify(problem, samples)   # one Verdict per sample, same order

A candidate that fails, times out, cannot be parsed or cannot be scored is a verdict status
(:class:`~ttscale.types.VerdictStatus`), never an exception; exceptions are for a verifier that
cannot run at all (:class:`~ttscale.errors.VerifierError`) or bad settings
(:class:`~ttscale.errors.ConfigError`). ``info()`` describes the verifier for the run manifest.
A verifier holding processes or models may define ``close()``; :func:`close_verifier` calls it
when present. Verifiers that can batch across problems also define ``verify_many``;
:func:`verify_many` falls back to one ``verify`` call per problem.

Specs (``ttscale verify --verifier SPEC``)::

    math              MathVerifier (answer extraction + math-verify equivalence)
    math:EXTRACTOR    MathVerifier(extractor=EXTRACTOR): auto, boxed, gsm8k, minerva, last_number, arith
    arith             MathVerifier(extractor="arith") for the bundled arithmetic benchmark
    arith-prm[:AGG]   ArithProcessReward: exact per-line process reward for arith (a PRM;
                      AGG = prod, min, last or mean aggregates the step scores)
    code              CodeVerifier (sandboxed execution of the problem's tests)
    code:visible      CodeVerifier(tests="visible"): the prompt's examples only (a weak verifier)
    code:plus=PATH    CodeVerifier(tests="plus", evalplus=PATH): EvalPlus's added tests from a
                      HumanEvalPlus/MbppPlus .jsonl[.gz] (the strong verifier of the fLaws paper)
    code:base=PATH    CodeVerifier(tests="base", evalplus=PATH): EvalPlus's copy of the original tests
    rm:PATH           RewardModelVerifier(PATH)
    judge:MODEL       JudgeVerifier on an engine serving MODEL
    ensemble:A,B,...  EnsembleVerifier over the verifiers built from specs A, B, ...
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ttscale.errors import ConfigError, VerifierError
from ttscale.types import Problem, Sample, Verdict

__all__ = [
    "SPEC_HELP",
    "VERIFIER_SPECS",
    "Verifier",
    "check_spec",
    "canonical_spec",
    "close_verifier",
    "config_fingerprint",
    "make_verifier",
    "split_spec",
    "verifier_config",
    "verify_many",
]


@runtime_checkable
class Verifier(Protocol):
    """What every verifier provides (``close()`` is optional)."""

    name: str

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in the order given. Never raises for a bad candidate."""
        ...

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description (class, settings, versions) for the run manifest."""
        ...


def close_verifier(verifier: Any) -> None:
    """Call ``verifier.close()`` if it has one."""
    close = getattr(verifier, "close", None)
    if callable(close):
        close()


def verify_many(
    verifier: Any, items: Sequence[tuple[Problem, Sequence[Sample]]]
) -> list[list[Verdict]]:
    """Verify several problems at once: the verifier's own ``verify_many`` if it has one
    (it may batch and deduplicate across problems), else ``verify`` per problem."""
    fn = getattr(verifier, "verify_many", None)
    if callable(fn):
        return list(fn(items))
    return [list(verifier.verify(p, s)) for p, s in items]


# ---------------------------------------------------------------------------------------
# configuration identity: what decides whether stored verdicts can be reused

# ``info()`` entries that describe a run of the verifier, not what it decides: counters, worker
# and batch sizes, caches, the servers a judge engine was reached through. Everything else (class, extractor, options, limits, versions of the
# checking code) is part of the configuration that verdicts are keyed by.
_VOLATILE_INFO = frozenset(
    {
        "workers", "batch_size", "cache_path", "cache_size", "stats", "judged_count",
        "missing_counts", "truncated_count", "scored_counts", "pruned_count", "levels",
        "base_urls", "httpx",
    }
)  # fmt: skip


def _strip_volatile(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _strip_volatile(v) for k, v in x.items() if k not in _VOLATILE_INFO}
    if isinstance(x, (list, tuple)):
        return [_strip_volatile(v) for v in x]
    return x


def canonical_spec(spec: str, info: Mapping[str, Any]) -> str:
    """The spec that rebuilds this configuration without context.

    ``math`` on an arith run resolves to the arith extractor, so it is ``arith``; ``math`` with
    ``--extractor last_number`` is ``math:last_number``; ``code`` with the visible tests is
    ``code:visible``. Other specs are returned as given (head lower-cased).
    """
    head, arg = split_spec(spec)
    if info.get("class") == "MathVerifier" and info.get("extractor"):
        ex = str(info["extractor"])
        return "arith" if ex == "arith" else f"math:{ex}"
    if info.get("class") == "CodeVerifier" and info.get("tests"):
        return "code" if info["tests"] == "full" else f"code:{info['tests']}"
    return f"{head}:{arg}" if arg else head


def verifier_config(spec: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration stored verdicts are keyed by: canonical spec + ``info()`` settings.

    ``info`` is the verifier's ``info()`` (a stored manifest entry also works: its ``spec`` and
    bookkeeping fields are ignored). Counters and resource settings that cannot change a
    verdict (workers, batch sizes, caches) are left out; limits and versions stay in.
    """
    settings = {
        k: v
        for k, v in info.items()
        if k not in ("spec", "name", "config", "fingerprint", "specs", "created", "legacy")
    }
    return {"spec": canonical_spec(spec, info), "settings": _strip_volatile(settings)}


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short stable hash of :func:`verifier_config` output (sorted-key JSON, blake2b)."""
    import hashlib
    import json

    text = json.dumps(config, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------
# factory

# spec head -> "module:Class" (imported lazily: torch, transformers, vllm stay unimported)
VERIFIER_SPECS: Mapping[str, str] = {
    "math": "ttscale.verifiers.math:MathVerifier",
    "arith": "ttscale.verifiers.math:MathVerifier",
    "arith-prm": "ttscale.verifiers.arith_prm:ArithProcessReward",
    "code": "ttscale.verifiers.code:CodeVerifier",
    "rm": "ttscale.verifiers.reward:RewardModelVerifier",
    "judge": "ttscale.verifiers.judge:JudgeVerifier",
    "ensemble": "ttscale.verifiers.ensemble:EnsembleVerifier",
}

SPEC_HELP = (
    "math, math:EXTRACTOR, arith, arith-prm[:AGG], code, code:visible, code:plus=PATH, code:base=PATH, rm:PATH, "
    "judge:MODEL, ensemble:A,B,..."
)


def split_spec(spec: str) -> tuple[str, str]:
    """``"rm:/models/x"`` -> ``("rm", "/models/x")``; ``"math"`` -> ``("math", "")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"verifier spec must be a non-empty string ({SPEC_HELP}), got {spec!r}")
    head, sep, arg = spec.strip().partition(":")
    return head.strip().lower(), arg.strip() if sep else ""


def check_spec(spec: str) -> str:
    """Validate a verifier spec's form without building the verifier; returns it normalised.

    What a benchmark's ``verifier`` field and ``--verifier`` go through: the head must be a
    registered verifier and its argument of the form that verifier takes (an extractor name for
    ``math:``, a suite for ``code:``, a model for ``rm:`` / ``judge:``, member specs for
    ``ensemble:``). Raises :class:`ConfigError` with the accepted forms.
    """
    head, arg = split_spec(spec)
    if head not in VERIFIER_SPECS:
        raise ConfigError(f"unknown verifier {spec!r}; choose one of: {SPEC_HELP}")
    if head == "arith" and arg:
        raise ConfigError(f"verifier 'arith' takes no argument, got {spec!r}")
    if head == "arith-prm" and arg:
        from ttscale.validation import check_choice
        from ttscale.verifiers.arith_prm import ARITH_PRM_AGGREGATIONS

        check_choice("arith-prm aggregation", arg, ARITH_PRM_AGGREGATIONS)
    if head == "math" and arg:
        from ttscale.validation import check_choice
        from ttscale.verifiers.math import EXTRACTORS

        check_choice("extractor", arg, EXTRACTORS)
    if head == "code":
        suite, eq, path = arg.partition("=")
        if suite.strip() in ("plus", "base"):
            if not eq or not path.strip():
                raise ConfigError(
                    f"verifier 'code:{suite.strip()}' needs the EvalPlus file: "
                    f"code:{suite.strip()}=PATH (HumanEvalPlus.jsonl.gz or MbppPlus.jsonl.gz)"
                )
        elif arg not in ("", "full", "visible"):
            raise ConfigError(
                "verifier 'code' takes 'code', 'code:full', 'code:visible', 'code:plus=PATH' or "
                f"'code:base=PATH', got {spec!r}"
            )
    if head in ("rm", "judge") and not arg:
        what = "a model path: rm:PATH" if head == "rm" else "a model: judge:MODEL"
        raise ConfigError(f"verifier {head!r} needs {what}")
    if head == "ensemble":
        members = _split_members(arg)
        if not members:
            raise ConfigError("verifier 'ensemble' needs members: ensemble:math,rm:PATH,...")
        if any(split_spec(m)[0] == "ensemble" for m in members):
            raise ConfigError("ensembles cannot be nested; list the members in one ensemble:...")
        for m in members:
            check_spec(m)
    return f"{head}:{arg}" if arg else head


def _load(head: str) -> Callable[..., Any]:
    path = VERIFIER_SPECS[head]
    mod_name, _, cls_name = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise VerifierError(
                f"verifier {head!r} is not available in this ttscale build ({mod_name} missing)"
            ) from e
        raise VerifierError(
            f"verifier {head!r} needs the package {e.name!r}; install it (pip install {e.name})"
        ) from e
    return getattr(mod, cls_name)


def _accepted(cls: Callable[..., Any], kw: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword options ``cls`` accepts (all of them if it takes ``**kwargs``).

    The CLI passes shared options (``workers``, ``timeout``) to whichever verifier it builds;
    a verifier without such a setting simply does not get it.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(kw)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kw)
    return {k: v for k, v in kw.items() if k in params}


def _split_members(arg: str) -> list[str]:
    """Split ``"math,rm:/a,b"`` at commas that start a new spec (``head`` or ``head:...``)."""
    parts: list[str] = []
    for piece in arg.split(","):
        head = piece.strip().partition(":")[0].strip().lower()
        if parts and head not in VERIFIER_SPECS:
            parts[-1] += "," + piece  # a comma inside a path or model name
        else:
            parts.append(piece.strip())
    return [p for p in parts if p]


def make_verifier(spec: str, **kw: Any) -> Any:
    """Build a verifier from a spec string (see the module docstring).

    ``kw`` are options for the verifier's constructor; options it does not take are ignored
    (so one set of CLI options serves every verifier). For ``judge:MODEL``, ``engine=`` (an
    engine object) is used as is, else an engine is made with
    ``make_engine(engine_kind, MODEL, **engine_options)``.
    """
    check_spec(spec)  # every form error is raised there, before anything is loaded
    head, arg = split_spec(spec)
    cls = _load(head)
    opts = dict(kw)
    if head == "arith":
        opts["extractor"] = "arith"
    elif head == "math" and arg:
        opts["extractor"] = arg
    elif head == "arith-prm" and arg:
        opts["aggregation"] = arg
    elif head == "code":
        suite, _, path = arg.partition("=")
        if suite.strip() in ("plus", "base"):
            opts["tests"], opts["evalplus"] = suite.strip(), path.strip()
        elif arg:
            opts["tests"] = arg
    elif head == "rm":
        return cls(arg, **_accepted(cls, kw))
    elif head == "judge":
        engine = opts.pop("engine", None)
        kind = opts.pop("engine_kind", "auto")
        engine_options = dict(opts.pop("engine_options", None) or {})
        if engine is None:
            from ttscale.engines import make_engine

            engine = make_engine(kind, arg, **engine_options)
        return cls(engine, **_accepted(cls, opts))
    elif head == "ensemble":
        members = [make_verifier(m, **kw) for m in _split_members(arg)]
        return cls(members, **_accepted(cls, kw))
    return cls(**_accepted(cls, opts))
