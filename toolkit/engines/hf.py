"""Transformers engine: our own batched sampling loop with one random stream per sample.

``model.generate`` draws all rows of a batch from one global random stream, so a sample would
depend on its batch mates. Here each sample owns a ``torch.Generator`` seeded with its
per-(problem, index) seed and draws one uniform per step; the token is found by inverting the
CDF of the processed distribution. The forward pass is batched with a KV cache (prompt prefilled
once per distinct prompt, then the cache rows are repeated for its samples), and log-probabilities
come from the same logits that were sampled from, in float64.

Capabilities: exact token prefixes (``prompt_token_ids``/``prefix_token_ids`` are fed as ids),
``score`` (one forward pass over prompt + continuation per batch), both log-probability modes on
every completion (``target_logprobs`` raw, ``proposal_logprobs`` processed), and streaming with
per-trace abort (``on_token`` is checked per row at every decoding step).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttscale.engines._text import find_stop
from ttscale.engines.base import (
    LOGPROB_MODES,
    EngineCapabilities,
    GenerationError,
    GenerationRequest,
    ResultCallback,
    ResultCollector,
    TokenCallback,
    TokenEvent,
    continuation_text,
)
from ttscale.errors import ConfigError, EngineError, EngineUnavailable
from ttscale.types import Completion, FinishReason, SamplingParams
from ttscale.validation import check_choice, check_int

__all__ = ["HFEngine", "process_logprobs_torch"]

log = logging.getLogger(__name__)

_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_SCORE_LOGITS_BYTES = 1 << 30  # kept float32 logits per scoring pass


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise EngineUnavailable(
            "the hf engine needs torch and transformers: pip install 'ttscale[hf]'"
        ) from e
    return torch


def process_logprobs_torch(
    logprobs: Any, params: SamplingParams, suppress: Sequence[int] = ()
) -> Any:
    """Batched sampling distribution in log space: ``(B, V)`` float64 -> ``(B, V)``, ``-inf`` removed.

    Same maths and order as :func:`ttscale.engines.scripted.process_logprobs` (vLLM's order):
    suppress -> temperature -> min-p -> top-k -> top-p, renormalising after each filter;
    ``temperature == 0`` is a one-hot on the argmax.
    """
    torch = _import_torch()
    lp = logprobs.clone()
    if len(suppress):
        lp[:, list(suppress)] = -math.inf
    if params.temperature == 0.0:
        out = torch.full_like(lp, -math.inf)
        out.scatter_(1, lp.argmax(dim=1, keepdim=True), 0.0)
        return out
    lp = lp / params.temperature
    lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    if params.min_p > 0.0:
        cut = lp.max(dim=1, keepdim=True).values + math.log(params.min_p)
        lp = lp.masked_fill(lp < cut, -math.inf)
        lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    if 0 < params.top_k < lp.shape[1]:
        kth = torch.topk(lp, params.top_k, dim=1).values[:, -1:]
        lp = lp.masked_fill(lp < kth, -math.inf)
        lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    if params.top_p < 1.0:
        srt, order = torch.sort(lp, dim=1, descending=True, stable=True)
        probs = srt.exp()
        before = probs.cumsum(dim=1) - probs
        srt = srt.masked_fill(before >= params.top_p, -math.inf)
        lp = torch.full_like(lp, -math.inf).scatter(1, order, srt)
        lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    return lp


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _cpu_threads(torch: Any, model: Any, threads: int | None) -> int:
    """Set and return torch's CPU threads (see :class:`HFEngine`, ``threads``)."""
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return int(torch.get_num_threads())
    if threads is None:
        from ttscale.engines.selection import cpu_threads_for

        threads = cpu_threads_for(sum(p.numel() for p in model.parameters()), _usable_cpus())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("torch CPU threads set to %d", threads)
    return threads


@dataclass
class _Row:
    """One sample being generated."""

    request: int
    slot: int
    index: int
    seed: int
    prompt: list[int]
    generator: Any
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    proposal: list[float] = field(default_factory=list)
    tops: list[dict[int, float]] = field(default_factory=list)
    certainty: list[float] = field(default_factory=list)  # per-position KL(U || p), if asked
    checked: int = 0  # characters of decoded text already searched for stop strings
    done: bool = False
    text: str | None = None
    finish: str = FinishReason.LENGTH.value
    stop_reason: str | None = None


class HFEngine:
    """transformers causal LM with per-sample seeds, exact log-probabilities and a KV cache.

    ``model``: a local model folder (or a Hugging Face id in the local cache); ``gguf_file``: a
    GGUF file name inside that folder (or a path), dequantised by transformers on load.
    ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"``; ``dtype``: ``"auto"`` (float32 on CPU,
    bfloat16/float16 on CUDA), ``"float32"``, ``"float16"``, ``"bfloat16"``. ``batch_size``:
    samples decoded together; ``None`` (default) decodes all samples of one ``generate`` call
    together, so the caller's batch is the engine's (``RepeatedSampler(batch_size=...)``, the
    CLI's ``--batch-size``). Lower it for large vocabularies: each decoded row holds a few
    float64 vectors of vocabulary size. ``threads``: torch CPU threads; ``None`` keeps
    ``OMP_NUM_THREADS`` when set, else uses one thread per 25 M parameters, at least 1 and at
    most the usable CPUs minus one (a small model gains nothing from more threads, and on a
    busy machine OpenMP threads that outnumber free cores are many times slower). Threads are
    a process-wide torch setting. ``logprob_mode``: ``"raw_logprobs"`` (the model's distribution,
    vLLM's default) or ``"processed_logprobs"`` (after temperature, min-p, top-k, top-p).
    ``self_certainty``: give every completion its exact self-certainty, from the full raw
    distribution of each generated token (:attr:`Completion.self_certainty`; a mean over the
    vocabulary per decoded token, small next to the forward pass).
    ``chat_template`` overrides the tokenizer's template for ``messages`` requests.
    Samples are reproducible per seed; batch composition can move float32 logits by ~1e-6, which
    in rare near-ties can change a sampled token.
    """

    name = "hf"
    capabilities = EngineCapabilities(
        token_prefixes=True, scoring=True, streaming=True, logprob_modes=frozenset(LOGPROB_MODES)
    )

    def __init__(
        self,
        model: str | Path,
        *,
        gguf_file: str | None = None,
        tokenizer: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        logprob_mode: str = "raw_logprobs",
        self_certainty: bool = False,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        threads: int | None = None,
    ) -> None:
        check_choice("logprob_mode", logprob_mode, _LOGPROB_MODES)
        check_choice("dtype", dtype, _DTYPES)
        if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
        check_int("batch_size", batch_size, min=1, allow_none=True)
        check_int("threads", threads, min=1, allow_none=True)
        torch = _import_torch()
        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover
            raise EngineUnavailable(
                "the hf engine needs transformers: pip install 'ttscale[hf]'"
            ) from e

        model_dir = str(model)
        if gguf_file is not None and Path(gguf_file).is_absolute():
            model_dir, gguf_file = str(Path(gguf_file).parent), Path(gguf_file).name
        if (
            gguf_file is not None
            and Path(model_dir).is_dir()
            and not (Path(model_dir) / gguf_file).exists()
        ):
            raise ConfigError(f"GGUF file {gguf_file} not found in {model_dir}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA GPU; use device='cpu'")
        if dtype == "auto":
            if str(device).startswith("cuda"):
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dtype = "float32"
        self.model_name = str(model) if gguf_file is None else f"{model_dir}/{gguf_file}"
        self.device = str(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.logprob_mode = logprob_mode
        self.self_certainty = bool(self_certainty)
        self._transformers_version = transformers.__version__
        self._torch_version = torch.__version__
        t0 = time.perf_counter()
        extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file is not None:
            extra["gguf_file"] = gguf_file
        try:
            tok: Any = AutoTokenizer.from_pretrained(str(tokenizer or model_dir), **extra)
            lm: Any = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype), **extra
            )
        except (OSError, ValueError) as e:
            raise EngineError(f"could not load model {self.model_name}: {e}".splitlines()[0]) from e
        self.tokenizer: Any = tok
        self.model: Any = lm.to(self.device).eval()
        self.threads: int | None = None
        if self.device == "cpu":
            self.threads = _cpu_threads(torch, self.model, threads)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        eos: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            val = getattr(src, "eos_token_id", None)
            if isinstance(val, int):
                eos.add(val)
            elif isinstance(val, (list, tuple)):
                eos.update(int(v) for v in val)
        self.eos_token_ids = tuple(sorted(eos))
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        head = self.model.get_output_embeddings()
        self._vocab = int(
            head.weight.shape[0] if head is not None else self.model.config.vocab_size
        )
        log.info(
            "HFEngine loaded %s on %s (%s) in %.1fs",
            self.model_name,
            self.device,
            dtype,
            time.perf_counter() - t0,
        )

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids the model conditions on: ``prompt + prefix`` (tokenised with special tokens,
        as vLLM does for text prompts), or the chat-templated ``messages`` plus ``prefix``
        (tokenised without adding special tokens: the template writes them), or
        ``prompt_token_ids`` as given plus the tokenised ``prefix``; then ``prefix_token_ids``."""
        ids = self._context_ids(request)
        bad = [
            t
            for t in request.prefix_token_ids + (request.prompt_token_ids or ())
            if t >= self._vocab
        ]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary ({self._vocab} ids)")
        return ids + list(request.prefix_token_ids)

    def _context_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            extra = []
            if request.prefix:
                extra = self.tokenizer(request.prefix, add_special_tokens=False)["input_ids"]
            return list(request.prompt_token_ids) + list(extra)
        if request.prompt is not None:
            return list(self.tokenizer(request.prompt + request.prefix)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"model {self.model_name} has no chat template; pass chat_template= or use prompt="
            )
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in request.messages or ()], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text + request.prefix, add_special_tokens=False)["input_ids"])

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_result: ResultCallback | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[list[Completion]]:
        torch = _import_torch()
        collector = ResultCollector(requests, on_result)
        prompts = [self.prompt_token_ids(r) for r in requests]
        rows = [
            (pos, j, idx, req.seed_for(j, params))
            for pos, req in enumerate(requests)
            for j, idx in enumerate(req.indices)
        ]
        # samples of one prompt side by side, similar lengths together: less padding, one prefill
        rows.sort(key=lambda r: (len(prompts[r[0]]), tuple(prompts[r[0]]), r[0], r[1]))

        def finished(row: _Row) -> None:
            collector.put(
                row.request, row.slot, self._completion(requests[row.request], row, params)
            )

        try:
            with torch.inference_mode():
                step = self.batch_size or max(len(rows), 1)
                for start in range(0, len(rows), step):
                    batch = [
                        _Row(
                            pos,
                            j,
                            idx,
                            seed,
                            prompts[pos],
                            torch.Generator().manual_seed(seed),
                        )
                        for pos, j, idx, seed in rows[start : start + step]
                    ]
                    self._decode_batch(batch, requests, prompts, params, finished, on_token)
        except GenerationError:
            raise
        except Exception as e:
            raise collector.failure(self.name, e) from e
        return collector.results()

    def _decode_batch(
        self,
        batch: list[_Row],
        requests: Sequence[GenerationRequest],
        prompts: list[list[int]],
        params: SamplingParams,
        finished: Callable[[_Row], None],
        on_token: TokenCallback | None,
    ) -> None:
        torch = _import_torch()
        from transformers import DynamicCache

        dev = self.device
        # prefill each distinct prompt once, then repeat its cache rows for its samples
        distinct: dict[int, int] = {}
        for first in batch:
            distinct.setdefault(first.request, len(distinct))
        uniq = list(distinct)
        width = max(len(prompts[p]) for p in uniq)
        ids = torch.full((len(uniq), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(uniq), width), dtype=torch.long)
        for i, p in enumerate(uniq):
            n = len(prompts[p])
            if n == 0:
                raise ConfigError("empty prompt: the tokenizer produced no tokens")
            ids[i, width - n :] = torch.tensor(prompts[p])
            mask[i, width - n :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        prefill = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "past_key_values": cache,
            "use_cache": True,
        }
        try:  # only the last position's logits are needed: skip the (L, V) prompt logits
            out = self.model(**prefill, logits_to_keep=1)
        except TypeError:  # models whose forward has no logits_to_keep
            out = self.model(**prefill)
        cache = out.past_key_values
        expand = torch.tensor([distinct[r.request] for r in batch], device=dev)
        cache.batch_select_indices(expand)
        logits = out.logits[:, -1, :].index_select(0, expand)
        mask = mask.index_select(0, expand)
        next_pos = mask.sum(dim=1)
        # rows aligned with the cache; a finished row becomes None and stays (its outputs are
        # ignored) until a quarter of the rows are finished: compacting the cache copies every
        # live row's keys and values, which at every step would cost more than the dead rows
        active: list[_Row | None] = list(batch)
        eos = set(self.eos_token_ids)
        k = min(params.logprobs or 0, logits.shape[-1])
        caps = {r.request: requests[r.request].params_for(params).max_tokens for r in batch}
        for t in range(max(caps.values())):
            raw = torch.log_softmax(logits.to(torch.float64), dim=1)
            # exact self-certainty needs the whole distribution, which only this loop has:
            # KL(U || p) = -log V - mean_j log p_j over the logits' V entries (raw, untempered)
            cert = (-math.log(raw.shape[1]) - raw.mean(dim=1)).tolist() if self.self_certainty else None
            suppress = self.eos_token_ids if t < params.min_tokens else ()
            proc = process_logprobs_torch(raw, params, suppress)
            u = torch.cat(
                [
                    torch.rand(1, generator=r.generator, dtype=torch.float64)
                    if r is not None
                    else torch.zeros(1, dtype=torch.float64)
                    for r in active
                ]
            )
            cdf = proc.exp().cumsum(dim=1)
            target = (u.to(dev) * cdf[:, -1]).unsqueeze(1)
            tokens = (
                torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
            )
            reported = raw if self.logprob_mode == "raw_logprobs" else proc
            raw_lp = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            proc_lp = proc.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            chosen_lp = raw_lp if self.logprob_mode == "raw_logprobs" else proc_lp
            if k:
                top_v, top_i = torch.topk(reported, k, dim=1)
                top_v, top_i = top_v.tolist(), top_i.tolist()
            tok_list = tokens.tolist()
            for b, row in enumerate(active):
                if row is None:
                    continue
                tok = int(tok_list[b])
                row.token_ids.append(tok)
                row.logprobs.append(float(chosen_lp[b]))
                row.target.append(float(raw_lp[b]))
                row.proposal.append(float(proc_lp[b]))
                if cert is not None:
                    row.certainty.append(float(cert[b]))
                if k:
                    top = dict(zip(top_i[b], top_v[b], strict=True))
                    top[tok] = float(chosen_lp[b])
                    row.tops.append(top)
                if tok in eos and t >= params.min_tokens:
                    row.finish = FinishReason.STOP.value
                    row.done = True
                elif params.stop and t + 1 > params.min_tokens:
                    self._check_stop(row, requests[row.request], params)
                if not row.done and t + 1 == caps[row.request]:  # the request's own cap
                    row.finish, row.done = FinishReason.LENGTH.value, True
                if on_token is not None:
                    event = TokenEvent(
                        request=row.request,
                        slot=row.slot,
                        index=row.index,
                        token_id=tok,
                        num_tokens=t + 1,
                        logprob=float(chosen_lp[b]) if params.logprobs is not None else None,
                        top=row.tops[-1] if k else None,
                        finished=row.done,
                    )
                    if on_token(event) and not row.done:
                        row.finish, row.done = FinishReason.ABORT.value, True
                if row.done:
                    finished(row)
                    active[b] = None
            keep = [b for b, r in enumerate(active) if r is not None]
            if not keep:
                return
            if 4 * (len(active) - len(keep)) >= len(active):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                tokens, mask, next_pos = tokens[sel], mask[sel], next_pos[sel]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], 1)
            out = self.model(
                input_ids=tokens.unsqueeze(1),
                attention_mask=mask,
                position_ids=next_pos.unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens skipped (as :attr:`Completion.text`)."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def _text(self, req: GenerationRequest, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, after the request's token prefix if it has one."""
        return continuation_text(self.decode, req.prefix_token_ids, token_ids)

    def _check_stop(self, row: _Row, req: GenerationRequest, params: SamplingParams) -> None:
        if params.min_tokens and len(row.token_ids) == params.min_tokens + 1:
            # first check: a stop string must end after the text of the first min_tokens tokens
            row.checked = len(self._text(req, row.token_ids[: params.min_tokens]))
        text = self._text(req, row.token_ids)
        hit = find_stop(text, params.stop, start=row.checked)
        row.checked = len(text)
        if hit is None:
            return
        pos, stop = hit
        row.text = text[: pos + (len(stop) if params.include_stop_str_in_output else 0)]
        row.finish, row.stop_reason, row.done = FinishReason.STOP.value, stop, True

    def _completion(self, req: GenerationRequest, row: _Row, params: SamplingParams) -> Completion:
        text = row.text
        if text is None:
            text = self._text(req, row.token_ids)
        want = params.logprobs is not None
        return Completion(
            problem_id=req.problem_id,
            index=row.index,
            text=text,
            token_ids=tuple(row.token_ids),
            token_logprobs=tuple(row.logprobs) if want else None,
            top_logprobs=tuple(row.tops) if want and params.logprobs else None,
            cumulative_logprob=math.fsum(row.logprobs) if want else None,
            num_tokens=len(row.token_ids),
            finish_reason=row.finish,
            seed=row.seed,
            prompt_tokens=len(row.prompt),
            stop_reason=row.stop_reason,
            prompt_token_ids=tuple(row.prompt),
            target_logprobs=tuple(row.target) if want else None,
            proposal_logprobs=tuple(row.proposal) if want else None,
            self_certainty=math.fsum(row.certainty) / len(row.certainty) if row.certainty else None,
        )

    # -- scoring ---------------------------------------------------------------------------------
    def score(
        self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, ...]]:
        """Raw log-probabilities of each continuation after its request's context: one forward
        pass over ``context + continuation`` per batch (left-padded, as the prefill of
        ``generate``; logits only for the continuation's positions), log-softmax in float64.

        A batch holds at most ``batch_size`` requests and about 1 GiB of kept logits
        (``rows x longest continuation x vocabulary`` float32), so scoring long continuations
        over a large vocabulary runs in several passes rather than running out of memory.
        """
        if len(requests) != len(continuations):
            raise ConfigError(
                f"score got {len(requests)} requests but {len(continuations)} continuations"
            )
        torch = _import_torch()
        conts = [[int(t) for t in c] for c in continuations]
        for c in conts:
            bad = [t for t in c if not 0 <= t < self._vocab]
            if bad:
                raise ConfigError(
                    f"token id {bad[0]} is outside the vocabulary ({self._vocab} ids)"
                )
        contexts = [self.prompt_token_ids(r) for r in requests]
        out: list[tuple[float, ...]] = [()] * len(requests)
        try:
            with torch.inference_mode():
                for part in self._score_batches(conts):
                    for i, lps in zip(part, self._score_batch(contexts, conts, part), strict=True):
                        out[i] = lps
        except (ConfigError, EngineError):
            raise
        except Exception as e:
            raise EngineError(f"hf scoring failed: {e}".splitlines()[0]) from e
        return out

    def _score_batches(self, conts: list[list[int]]) -> list[list[int]]:
        """Positions of the non-empty continuations, grouped into batches (see :meth:`score`)."""
        budget = _SCORE_LOGITS_BYTES // (4 * self._vocab)  # kept logit rows per batch
        limit = self.batch_size or len(conts)
        batches: list[list[int]] = []
        part: list[int] = []
        longest = 0
        for i, c in enumerate(conts):
            if not c:
                continue
            grown = max(longest, len(c) + 1)
            if part and (len(part) >= limit or (len(part) + 1) * grown > budget):
                batches.append(part)
                part, grown = [], len(c) + 1
            part.append(i)
            longest = grown
        if part:
            batches.append(part)
        return batches

    def _score_batch(
        self, contexts: list[list[int]], conts: list[list[int]], part: list[int]
    ) -> list[tuple[float, ...]]:
        torch = _import_torch()
        full = [contexts[i] + conts[i] for i in part]
        width = max(len(f) for f in full)
        ids = torch.full((len(part), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for b, f in enumerate(full):
            ids[b, width - len(f) :] = torch.tensor(f)
            mask[b, width - len(f) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # left padding: every row ends at the last position, so the logits that predict the
        # continuations are among the last (longest continuation + 1)
        keep = max(len(conts[i]) for i in part) + 1
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        try:
            logits = self.model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # models whose forward has no logits_to_keep
            logits = self.model(**inputs).logits
        kept = logits.shape[1]
        results = []
        for b, i in enumerate(part):
            n = len(conts[i])
            rows = logits[b, kept - n - 1 : kept - 1]
            target = torch.tensor(conts[i], device=rows.device).unsqueeze(1)
            lps: list[float] = []
            for s in range(0, n, 512):  # float64 log-softmax a slice at a time
                lp = torch.log_softmax(rows[s : s + 512].to(torch.float64), dim=-1)
                lps.extend(float(x) for x in lp.gather(1, target[s : s + 512]).squeeze(1).tolist())
            results.append(tuple(lps))
        return results

    def score_next(self, requests: Sequence[GenerationRequest], token_ids: Sequence[int]) -> Any:
        """Log-probabilities of each of ``token_ids`` as the next token after each request's
        context (:func:`~ttscale.engines.base.score_next`): one distribution per request, from
        the very pass :meth:`score` makes for the one-token continuation ``token_ids[0]`` (its
        row at the context's end), so the values are those of :meth:`score`, one pass per
        context instead of one per token. ``context_tokens``: the context's length."""
        from ttscale.engines.base import NextTokenScores

        torch = _import_torch()
        cands = [int(t) for t in token_ids]
        bad = [t for t in cands if not 0 <= t < self._vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary ({self._vocab} ids)")
        contexts = [self.prompt_token_ids(r) for r in requests]
        if not cands:
            return [NextTokenScores((), 0) for _ in requests]
        conts = [cands[:1] for _ in requests]
        out: list[Any] = [None] * len(requests)
        try:
            with torch.inference_mode():
                for part in self._score_batches(conts):
                    full = [contexts[i] + conts[i] for i in part]
                    width = max(len(f) for f in full)
                    ids = torch.full((len(part), width), self._pad_id, dtype=torch.long)
                    mask = torch.zeros((len(part), width), dtype=torch.long)
                    for b, f in enumerate(full):
                        ids[b, width - len(f) :] = torch.tensor(f)
                        mask[b, width - len(f) :] = 1
                    ids, mask = ids.to(self.device), mask.to(self.device)
                    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
                    try:
                        logits = self.model(**inputs, logits_to_keep=2).logits
                    except TypeError:  # models whose forward has no logits_to_keep
                        logits = self.model(**inputs).logits
                    # the row at the context's end predicts the next token (left padding)
                    lp = torch.log_softmax(logits[:, -2].to(torch.float64), dim=-1)
                    picked = lp[:, torch.tensor(cands, device=lp.device)].tolist()
                    for b, i in enumerate(part):
                        out[i] = NextTokenScores(
                            tuple(float(x) for x in picked[b]), len(contexts[i])
                        )
        except (ConfigError, EngineError):
            raise
        except Exception as e:
            raise EngineError(f"hf scoring failed: {e}".splitlines()[0]) from e
        return out

    # -- provenance ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self._transformers_version,
            "torch": self._torch_version,
            "model": self.model_name,
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "logprob_mode": self.logprob_mode,
            **({"self_certainty": True} if self.self_certainty else {}),
        }

    def close(self) -> None:
        self.model = None

    def __repr__(self) -> str:
        return f"HFEngine({self.model_name!r}, device={self.device!r}, dtype={self.dtype!r})"
