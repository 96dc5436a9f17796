"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resolve_model(arg: str | None, tmp: Path) -> str:
    """The model to benchmark: ``arg`` if given, else the bundled model, else a tiny random Llama."""
    if arg:
        return arg
    from ttscale.evals import default_model_path

    bundled = Path(default_model_path())
    if (bundled / "config.json").is_file():
        return str(bundled)
    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_llama

    return str(build_tiny_llama(tmp / "tiny"))
