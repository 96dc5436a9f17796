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

__all__ = [
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
    "__version__",
]
