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


# Module paths from before the layout was grouped into sub-packages. They stay importable
# (``import ttscale.aggregate``, ``from ttscale import scaling``) and resolve to the very same
# module object, so monkeypatching either name patches both.
_MOVED_MODULES: dict[str, str] = {
    "aggregate": "select.aggregate",
    "confidence": "select.confidence",
    "ensemble": "select.ensemble",
    "rpc": "select.rpc",
    "stopping": "select.stopping",
    "yesno": "select.yesno",
    "stats": "metrics.stats",
    "scaling": "metrics.scaling",
    "pool": "store.pool",
    "jsonio": "store.jsonio",
    "logspace": "particles.logspace",
    "resampling": "particles.resampling",
}


class _MovedModuleFinder:
    """Resolve ``ttscale.<old>`` to ``ttscale.<new>`` (see ``_MOVED_MODULES``)."""

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> object:
        prefix, _, short = fullname.partition(".")
        if prefix != "ttscale" or short not in _MOVED_MODULES:
            return None
        import importlib.util

        loader = _MovedModuleLoader(_MOVED_MODULES[short])
        return importlib.util.spec_from_loader(fullname, loader)  # type: ignore[arg-type]


class _MovedModuleLoader:
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: object) -> None:
        return None  # the default module object; exec_module swaps in the real one

    def exec_module(self, module: object) -> None:
        import importlib
        import sys

        # importlib returns whatever sys.modules holds under the name after exec_module
        sys.modules[module.__name__] = importlib.import_module(f"ttscale.{self.target}")  # type: ignore[attr-defined]


def _install_moved_module_finder() -> None:
    import sys

    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())  # type: ignore[arg-type]


_install_moved_module_finder()

_SUBPACKAGES = frozenset(
    {"engines", "store", "select", "metrics", "particles", "analysis", "testing", "seeding"}
)


def __getattr__(name: str) -> object:
    import importlib

    if name in _MOVED_MODULES or name in _SUBPACKAGES:
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
