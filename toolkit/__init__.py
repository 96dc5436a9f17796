"""ttscale: test-time scaling of language models."""

from ttscale.errors import (
    ConfigError,
    DataError,
    DegenerateWeightsError,
    EngineError,
    SandboxError,
    StoreError,
    TtscaleError,
    VerifierError,
)
from ttscale.types import Completion, Problem, Sample, SamplingParams, Verdict, VerdictStatus

__version__ = "0.1.0"

# Names re-exported lazily (module imported on first attribute access) so `import ttscale` stays
# fast: name -> submodule of ttscale. Add entries here rather than eager imports of heavy modules.
_LAZY: dict[str, str] = {
    "AggregateResult": "select.aggregate",
    "best_of_n": "select.aggregate",
    "deepconf_vote": "select.aggregate",
    "majority_vote": "select.aggregate",
    "max_probability": "select.aggregate",
    "perplexity_consistency": "select.aggregate",
    "prm_aggregate": "select.aggregate",
    "weighted_vote": "select.aggregate",
    "coverage_curve": "metrics",
    "pass_at_k": "metrics",
    "selection_at_k": "metrics",
    "SampleStore": "store",
    "Pool": "store.pool",
    "compute_curves": "analysis",
    "plot_curves": "analysis",
    "bootstrap_ci": "metrics.stats",
    "paired_difference": "metrics.stats",
    "fit_power_law": "metrics.scaling",
    "make_engine": "engines",
    "GenerationRequest": "engines",
    "RepeatedSampler": "samplers",
}


_SUBPACKAGES = frozenset(
    {"engines", "store", "select", "metrics", "particles", "analysis", "testing", "seeding"}
)


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f"ttscale.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ttscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ttscale.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AggregateResult",
    "Completion",
    "ConfigError",
    "DataError",
    "DegenerateWeightsError",
    "EngineError",
    "Problem",
    "Sample",
    "SamplingParams",
    "SandboxError",
    "StoreError",
    "TtscaleError",
    "Verdict",
    "VerdictStatus",
    "VerifierError",
    "GenerationRequest",
    "Pool",
    "RepeatedSampler",
    "SampleStore",
    "best_of_n",
    "bootstrap_ci",
    "compute_curves",
    "fit_power_law",
    "make_engine",
    "paired_difference",
    "plot_curves",
    "coverage_curve",
    "deepconf_vote",
    "majority_vote",
    "max_probability",
    "pass_at_k",
    "perplexity_consistency",
    "prm_aggregate",
    "selection_at_k",
    "weighted_vote",
    "__version__",
]
