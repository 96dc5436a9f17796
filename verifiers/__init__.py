"""ttscale.verifiers: check or score candidates (math, code, reward models, judges, ensembles).

``from ttscale.verifiers import MathVerifier, CodeVerifier, make_verifier, verify_store``;
each name is imported on first use, so importing the package stays light (no sandbox, no
reward-model or judge dependencies until they are asked for).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ttscale.verifiers.base import Verifier, close_verifier, make_verifier, verify_many
    from ttscale.verifiers.code import CodeVerifier
    from ttscale.verifiers.ensemble import EnsembleVerifier
    from ttscale.verifiers.judge import JudgeVerifier
    from ttscale.verifiers.math import MathVerifier
    from ttscale.verifiers.reward import RewardModelVerifier
    from ttscale.verifiers.runner import VerifyInterrupted, default_verifier_spec, verify_store

_LAZY = {
    "Verifier": "base",
    "close_verifier": "base",
    "make_verifier": "base",
    "verify_many": "base",
    "CodeVerifier": "code",
    "EnsembleVerifier": "ensemble",
    "JudgeVerifier": "judge",
    "MathVerifier": "math",
    "RewardModelVerifier": "reward",
    "VerifyInterrupted": "runner",
    "default_verifier_spec": "runner",
    "verify_store": "runner",
}

__all__ = [
    "CodeVerifier",
    "EnsembleVerifier",
    "JudgeVerifier",
    "MathVerifier",
    "RewardModelVerifier",
    "Verifier",
    "VerifyInterrupted",
    "close_verifier",
    "default_verifier_spec",
    "make_verifier",
    "verify_many",
    "verify_store",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ttscale.verifiers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ttscale.verifiers.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
