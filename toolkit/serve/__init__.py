"""``ttscale serve``: test-time strategies behind an OpenAI-compatible endpoint.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client). See :mod:`ttscale.serve.app`.
"""

from ttscale.serve.strategy import RequestError, StrategySpec, parse_preset

__all__ = ["RequestError", "StrategySpec", "parse_preset"]
