"""The ttscale exception tree.

    TtscaleError                 base of everything ttscale raises on purpose
    ├── ConfigError              a bad parameter or option (also a ValueError)
    │   └── NonIIDPoolError      an iid-only estimator asked of a weighted (SMC) population
    ├── DataError                malformed input data: JSONL lines, benchmark files, store contents
    │   └── StoreError           a sample store that is missing, inconsistent or conflicting
    ├── EngineError              an inference engine failed or cannot be used
    │   └── EngineUnavailable    the engine's package is not installed
    ├── VerifierError            a verifier could not be set up (never raised per candidate)
    │   └── SandboxError         the code sandbox cannot run
    └── DegenerateWeightsError   particle/answer weights are all -inf or NaN where a choice is needed

Every message is one line that names the problem and, where there is one, the fix. The CLI prints
the message of any TtscaleError and exits with code 1, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DegenerateWeightsError",
    "EngineError",
    "EngineUnavailable",
    "NonIIDPoolError",
    "SandboxError",
    "StoreError",
    "TtscaleError",
    "VerifierError",
]


class TtscaleError(Exception):
    """Base class for errors raised by ttscale."""


class ConfigError(TtscaleError, ValueError):
    """An invalid parameter value or option combination."""


class NonIIDPoolError(ConfigError):
    """An estimator that assumes iid samples (pass@k, majority@k, ...) on a weighted population."""


class DataError(TtscaleError, ValueError):
    """Malformed input data (a JSONL line, a benchmark file, a column)."""


class StoreError(DataError):
    """A sample store is missing, inconsistent, or would receive conflicting samples."""


class EngineError(TtscaleError, RuntimeError):
    """An inference engine failed or cannot be used."""


class EngineUnavailable(EngineError, ImportError):
    """The package behind an engine is not installed."""


class VerifierError(TtscaleError, RuntimeError):
    """A verifier cannot be set up. Per-candidate failures are verdict statuses instead."""


class SandboxError(VerifierError):
    """The code-execution sandbox cannot run programs."""


class DegenerateWeightsError(TtscaleError, ArithmeticError):
    """Weights are all -inf (or NaN) where a normalised distribution is required."""
