"""Inference engines. Heavy backends (vllm, torch, transformers, httpx) are imported lazily.

``make_engine(kind, model, **options)`` builds one by name; the classes live in
``ttscale.engines.{scripted,hf,vllm,openai}`` and are also importable from here (lazily).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttscale.engines.base import (
    Engine,
    EngineCapabilities,
    GenerationError,
    GenerationRequest,
    ResultCallback,
    ResultCollector,
    TokenCallback,
    TokenEvent,
    generate_chunked,
    require_capabilities,
)
from ttscale.engines.selection import (
    EngineChoice,
    choose_engine,
    cuda_available,
    describe_engine,
    vllm_available,
)
from ttscale.errors import ConfigError

if TYPE_CHECKING:
    from ttscale.engines.hf import HFEngine
    from ttscale.engines.openai import OpenAIEngine
    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.engines.vllm import VLLMEngine

__all__ = [
    "ENGINE_KINDS",
    "Engine",
    "EngineCapabilities",
    "EngineChoice",
    "GenerationError",
    "GenerationRequest",
    "HFEngine",
    "OpenAIEngine",
    "ResultCallback",
    "ResultCollector",
    "ScriptedEngine",
    "TokenCallback",
    "TokenEvent",
    "VLLMEngine",
    "choose_engine",
    "cuda_available",
    "describe_engine",
    "generate_chunked",
    "make_engine",
    "require_capabilities",
    "vllm_available",
]

ENGINE_KINDS = ("auto", "vllm", "openai", "hf", "scripted")

_LAZY = {
    "ScriptedEngine": "ttscale.engines.scripted",
    "HFEngine": "ttscale.engines.hf",
    "VLLMEngine": "ttscale.engines.vllm",
    "OpenAIEngine": "ttscale.engines.openai",
}

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ttscale.engines' has no attribute {name!r}")


def make_engine(
    kind: str = "auto", model: str | os.PathLike[str] | None = None, **options: Any
) -> Engine:
    """Build an engine by name.

    ``kind``: ``"vllm"`` (offline vLLM), ``"hf"`` (transformers), ``"openai"`` (an
    OpenAI-compatible server; pass ``base_urls=``), ``"scripted"`` (the test engine; ``model`` is
    ignored) or ``"auto"``: the rule of :func:`~ttscale.engines.selection.choose_engine` (vLLM
    where it is installed and a GPU is visible, else transformers; a ``.gguf`` file always goes to
    transformers). ``model``: a local model folder, a ``.gguf`` file, or a Hugging Face
    model id already in the local cache (or downloadable); the served model name for ``openai``.
    ``options`` go to the engine's constructor.
    """
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    if kind == "scripted":
        from ttscale.engines.scripted import ScriptedEngine

        return ScriptedEngine(**options)
    if model is None or str(model) == "":
        raise ConfigError(f"engine {kind!r} needs a model (a local folder, .gguf file or model id)")
    if kind == "openai":
        if "base_urls" not in options:
            raise ConfigError("the openai engine needs base_urls= (e.g. http://127.0.0.1:8000/v1)")
        from ttscale.engines.openai import OpenAIEngine

        return OpenAIEngine(str(model), **options)
    model_str = _resolve_model(str(model))
    is_gguf = model_str.endswith(".gguf")
    if kind == "auto":
        choice = choose_engine(kind, model_str)
        log.info("engine %s (%s)", choice.kind, choice.reason)
        kind = choice.kind
    if kind == "hf":
        from ttscale.engines.hf import HFEngine

        if is_gguf and "gguf_file" not in options:
            p = Path(model_str)
            return HFEngine(str(p.parent), gguf_file=p.name, **options)
        return HFEngine(model_str, **options)
    from ttscale.engines.vllm import VLLMEngine

    return VLLMEngine(model_str, **options)


def _resolve_model(model: str) -> str:
    """A local path (expanded) or a Hugging Face model id; ConfigError for a missing path."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    looks_like_id = bool(_HUB_ID.match(model)) and not model.endswith(".gguf")
    if looks_like_id and not _hub_offline():
        return model
    if looks_like_id and _in_hub_cache(model):
        return model
    raise ConfigError(
        f"model path {model} does not exist; give a local model folder or .gguf file"
        + (
            " (HF_HUB_OFFLINE is set, so model ids must be in the local cache)"
            if looks_like_id
            else ""
        )
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    found = try_to_load_from_cache(model_id, "config.json")
    return isinstance(found, str)
