"""Benchmarks: the registry and loaders, prompt templates, the bundled ``arith`` task and model."""

from ttscale.evals.arith import check as check_arith
from ttscale.evals.arith import extract_arith_answer
from ttscale.evals.registry import (
    Benchmark,
    get_benchmark,
    list_benchmarks,
    load_problems,
    register_benchmark,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "Benchmark",
    "check_arith",
    "default_model_path",
    "extract_arith_answer",
    "get_benchmark",
    "list_benchmarks",
    "load_problems",
    "register_benchmark",
]


def default_model_path() -> str:
    """Directory of the bundled default model (a tiny Llama trained on ``arith``)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "model")


DEFAULT_MODEL_DIR = default_model_path()
