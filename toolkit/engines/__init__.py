"""Inference engines. Heavy backends (vllm, torch, transformers) are imported lazily."""

from ttscale.engines.base import Engine, GenerationRequest

__all__ = ["Engine", "GenerationRequest"]
