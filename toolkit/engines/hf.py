"""Transformers engine: our own batched sampling loop with one random stream per sample.

``model.generate`` draws all rows of a batch from one global random stream, so a sample would
depend on its batch mates. Here each sample owns a ``torch.Generator`` seeded with its
per-(problem, index) seed and draws one uniform per step; the token is found by inverting the
CDF of the processed distribution. The forward pass is batched with a KV cache (prompt prefilled
once per distinct prompt, then the cache rows are repeated for its samples), and log-probabilities
come from the same logits that were sampled from, in float64.

:meth:`HFEngine.open_loop` runs the same decoding step on one running batch that requests join
and leave between steps (:mod:`ttscale.engines.loop`), with the prefix caches of finished steps
kept for the requests that continue them.

Capabilities: exact token prefixes (``prompt_token_ids``/``prefix_token_ids`` are fed as ids),
``score`` (one forward pass over prompt + continuation per batch), both log-probability modes on
every completion (``target_logprobs`` raw, ``proposal_logprobs`` processed), and streaming with
per-trace abort (``on_token`` is checked per row at every decoding step).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttscale.engines._text import find_stop
from ttscale.engines.base import (
    CONTINUATION_WINDOW,
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
    logprobs: Any,
    params: SamplingParams,
    suppress: Sequence[int] = (),
    rows: Sequence[bool] | None = None,
) -> Any:
    """Batched sampling distribution in log space: ``(B, V)`` float64 -> ``(B, V)``, ``-inf`` removed.

    Same maths and order as :func:`ttscale.engines.scripted.process_logprobs` (vLLM's order):
    suppress -> temperature -> min-p -> top-k -> top-p, renormalising after each filter;
    ``temperature == 0`` is a one-hot on the argmax. ``rows``: suppress only in the rows marked
    ``True`` (rows of one batch at different steps of ``min_tokens``); every operation is per
    row, so a row's result does not depend on the others.
    """
    torch = _import_torch()
    lp = logprobs.clone()
    if len(suppress):
        if rows is None:
            lp[:, list(suppress)] = -math.inf
        elif any(rows):
            which = torch.tensor([b for b, r in enumerate(rows) if r], device=lp.device)
            lp[which.unsqueeze(1), torch.tensor(list(suppress), device=lp.device)] = -math.inf
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

    request: int  # generate: its request's position; the loop: its ticket
    slot: int
    index: int
    seed: int
    prompt: list[int]
    generator: Any
    req: GenerationRequest
    cap: int  # the request's own max_tokens
    on_token: TokenCallback | None = None
    event_request: int = 0  # TokenEvent.request of its events
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    proposal: list[float] = field(default_factory=list)
    tops: list[dict[int, float]] = field(default_factory=list)
    certainty: list[float] = field(default_factory=list)  # per-position KL(U || p), if asked
    checked: int = 0  # characters of decoded text already searched for stop strings
    head: str | None = None  # the decoded tail of its token prefix (see continuation_text)
    done: bool = False
    text: str | None = None
    finish: str = FinishReason.LENGTH.value
    stop_reason: str | None = None


@dataclass(frozen=True)
class _Prefix:
    """A finished row's KV cache: ``tokens`` real tokens in ``mask.shape[0]`` columns (masked
    columns may sit between them), one ``(heads, columns, dim)`` tensor per layer."""

    tokens: int
    mask: Any
    keys: list[Any]  # per layer ``(rows, heads, columns, dim)``: row ``row`` from column ``first``
    values: list[Any]
    row: int = 0
    first: int = 0

    def kv(self, name: str, layer: int) -> Any:
        return getattr(self, name)[layer][self.row, :, self.first :]


class _PrefixStore:
    """KV caches of rows that ended at a stop string or a token cap, by their token sequence
    (prompt and generated tokens fed so far), so a request that continues one (a step-wise
    sampler's next step: the same prompt and prefix plus the step's last token) prefills only
    what follows. The oldest are dropped once they hold more columns than the running batch
    (at least ``minimum``)."""

    def __init__(self, minimum: int = 4096) -> None:
        self.minimum = minimum
        self._items: OrderedDict[tuple[int, ...], _Prefix] = OrderedDict()
        self._columns = 0
        #: prompts that extended a stored prefix, and the prompt tokens they did not prefill
        self.hits = 0
        self.saved_tokens = 0

    def put(self, key: tuple[int, ...], prefix: _Prefix, budget: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._columns -= old.mask.shape[0]
        self._items[key] = prefix
        self._columns += prefix.mask.shape[0]
        while self._columns > max(self.minimum, budget) and len(self._items) > 1:
            _, gone = self._items.popitem(last=False)
            self._columns -= gone.mask.shape[0]

    def find(self, prompt: tuple[int, ...], longest_tail: int = 4) -> _Prefix | None:
        """The stored prefix that ``prompt`` extends by 1 to ``longest_tail`` tokens."""
        for cut in range(1, min(longest_tail, len(prompt) - 1) + 1):
            hit = self._items.get(prompt[:-cut])
            if hit is not None:
                self._items.move_to_end(prompt[:-cut])
                self.hits += 1
                self.saved_tokens += hit.tokens
                return hit
        return None

    def clear(self) -> None:
        self._items.clear()
        self._columns = 0


def _fast_decode(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` for a list of Python ints. Where the
    tokenizer keeps transformers' own ``decode``, which converts its input (``to_py_obj``, a
    Python-level walk over every id) and then calls ``_decode``, call ``_decode`` directly: the
    same text, without the walk (the stop-string check decodes each row at every token)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if getattr(type(tokenizer), "decode", None) is PreTrainedTokenizerBase.decode and callable(
        getattr(tokenizer, "_decode", None)
    ):
        return lambda ids: tokenizer._decode(token_ids=ids, skip_special_tokens=True)  # type: ignore[no-any-return]
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[no-any-return]


class _Slots:
    """Our own KV cache for a running batch: per layer one preallocated ``(rows, heads, columns,
    dim)`` tensor of keys and one of values, and the ``(rows, columns)`` attention mask.

    Every row's tokens end at column :attr:`end` (right-aligned; masked columns before and
    between them), and a decoding step writes each row's new keys and values in place at that
    column: a step copies nothing (``DynamicCache`` concatenates the whole cache at every step),
    a row that joins is written into a free slot (one a row left) instead of a merged copy of
    the batch, and the model attends only to the columns from :attr:`start`, the first one a
    live row uses. The tensors are copied only to grow, or to move the used columns back to
    the left when the right edge is reached (:meth:`_Batch._fit`). Allocated zeroed: a slot's
    stale columns are masked, and masked finite values weigh exactly zero."""

    def __init__(self, keys: list[Any], values: list[Any], mask: Any) -> None:
        self.keys, self.values, self.mask = keys, values, mask
        self.start = 0  # the first column a live row uses
        self.end = 0  # the column the next decoding step writes

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def write(self, layer: int, keys: Any, values: Any) -> tuple[Any, Any]:
        """A forward's new keys and values of ``layer``, at :attr:`end`; what it attends to."""
        q, b = keys.shape[2], keys.shape[0]
        k, v = self.keys[layer], self.values[layer]
        k[:b, :, self.end : self.end + q] = keys
        v[:b, :, self.end : self.end + q] = values
        return k[:b, :, self.start : self.end + q], v[:b, :, self.start : self.end + q]


@functools.cache
def _slot_layer_class() -> Any:
    from transformers.cache_utils import DynamicLayer

    class _SlotLayer(DynamicLayer):  # type: ignore[misc]
        """One attention layer's view of :class:`_Slots` for the model's forward: ``update``
        writes in place, and the past length the mask builder reads is ``end - start``."""

        def __init__(self, slots: _Slots, layer: int) -> None:
            super().__init__()
            self.slots, self.layer = slots, layer
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            self.keys, self.values = self.slots.write(self.layer, key_states, value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.slots.end - self.slots.start

    return _SlotLayer


def _plain_cache(cache: Any) -> bool:
    """Whether every layer of a model's cache is a plain full-attention ``DynamicLayer`` (what
    :class:`_Slots` stands in for; sliding-window or other layers keep the model's own)."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = list(getattr(cache, "layers", None) or ())
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class _Batch:
    """Rows decoded together, for ``generate`` (one batch at a time) and the engine loop (one
    batch that rows join and leave between steps).

    State: the rows, one per slot of the KV cache (``None`` where a row finished or was aborted:
    the slot is free, its outputs ignored, until a joining row takes it or the batch is
    compacted), the cache (:class:`_Slots`; for a model whose cache layers are not plain, the
    model's own ``DynamicCache``, with which rows cannot join a running batch), each row's next
    position id, and the logits of each row's next token (sampled by the next :meth:`step`).
    """

    def __init__(self, engine: HFEngine, prefixes: _PrefixStore | None = None) -> None:
        self.engine = engine
        #: where rows that end at a stop string or a cap leave their KV cache (the loop's)
        self.prefixes = prefixes
        self.rows: list[_Row | None] = []
        self.slots: _Slots | None = None
        self.cache: Any = None  # what the model's forward gets as past_key_values
        self.first: list[int] = []  # per slot: the first column its row uses
        self.own_mask: Any = None  # the attention mask, with the model's own cache
        self.next_pos: Any = None
        self.logits: Any = None
        #: cache copies made to grow or move the columns, and row compactions (tests read them)
        self.relayouts = 0
        self.compactions = 0

    @property
    def live(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def mask(self) -> Any:
        """The attention mask of the rows in use, from the first column a live row uses."""
        if self.slots is None:
            return self.own_mask
        s = self.slots
        return s.mask[: len(self.rows), s.start : s.end]

    def clear(self) -> None:
        self.rows, self.slots, self.cache, self.first = [], None, None, []
        self.own_mask, self.next_pos, self.logits = None, None, None

    def admit(self, rows: Sequence[_Row]) -> None:
        """Prefill ``rows``' prompts (each distinct prompt once; its cache rows are repeated for
        its samples) and add the rows to the batch, in free slots first. With
        :attr:`prefixes`, a prompt that extends a stored prefix prefills only the tokens after
        it."""
        fresh: list[_Row] = []
        reused: list[_Row] = []
        past: dict[tuple[int, ...], _Prefix] = {}
        for r in rows:
            key = tuple(r.prompt)
            hit = past.get(key) or (self.prefixes.find(key) if self.prefixes else None)
            if hit is None:
                fresh.append(r)
            else:
                past[key] = hit
                reused.append(r)
        for group in (fresh, reused):
            if group:
                cache, mask, logits, expand = self._prefill(group, past)
                if self.cache is not None and not self.live:
                    self.clear()
                if self.cache is None and not _plain_cache(cache):
                    cache.batch_select_indices(expand)
                    self.rows, self.cache = list(group), cache
                    self.own_mask = mask.index_select(0, expand)
                    self.next_pos = self.own_mask.sum(dim=1)
                    self.logits = logits.index_select(0, expand)
                elif self.slots is None and self.cache is not None:
                    raise EngineError(
                        "the hf engine loop needs a plain KV cache; "
                        f"{type(self.cache.layers[0]).__name__} layers cannot join a running "
                        "batch (use generate, or another engine)"
                    )
                else:
                    self._place(group, cache, mask, logits, expand)

    def _prefill(
        self, rows: Sequence[_Row], past: dict[tuple[int, ...], _Prefix]
    ) -> tuple[Any, Any, Any, Any]:
        """One forward over the distinct prompts of ``rows`` (after their stored prefix, where
        ``past`` has one): their cache, attention mask and next-token logits, one per distinct
        prompt, and for each row the index of its prompt."""
        torch = _import_torch()
        from transformers import DynamicCache

        eng, dev = self.engine, self.engine.device
        distinct: dict[tuple[int, ...], int] = {}
        for r in rows:
            distinct.setdefault(tuple(r.prompt), len(distinct))
        uniq = list(distinct)
        if any(not p for p in uniq):
            raise ConfigError("empty prompt: the tokenizer produced no tokens")
        pre = [past.get(p) for p in uniq]
        tails = [p[x.tokens :] if x is not None else p for p, x in zip(uniq, pre, strict=True)]
        done = [x.tokens if x is not None else 0 for x in pre]
        width = max(len(t) for t in tails)
        pw = max((x.mask.shape[0] for x in pre if x is not None), default=0)
        ids = torch.full((len(uniq), width), eng._pad_id, dtype=torch.long)
        mask = torch.zeros((len(uniq), pw + width), dtype=torch.long)
        positions = torch.zeros((len(uniq), width), dtype=torch.long)
        for i, t in enumerate(tails):
            ids[i, width - len(t) :] = torch.tensor(t)
            mask[i, pw + width - len(t) :] = 1
            positions[i, width - len(t) :] = torch.arange(done[i], done[i] + len(t))
        cache = DynamicCache()
        if pw:
            # the stored prefixes, right-aligned (left-padded with masked zeros), then the rest
            layers = []
            for layer in range(len(next(x for x in pre if x is not None).keys)):
                kv = []
                for name in ("keys", "values"):
                    ref = getattr(next(x for x in pre if x is not None), name)[layer]
                    out = ref.new_zeros((len(uniq), ref.shape[1], pw, ref.shape[3]))
                    for i, x in enumerate(pre):
                        if x is not None:
                            n = x.mask.shape[0]
                            out[i, :, pw - n :] = x.kv(name, layer)
                    kv.append(out)
                layers.append((kv[0], kv[1]))
            cache = DynamicCache(ddp_cache_data=layers)
            for i, x in enumerate(pre):
                if x is not None:
                    mask[i, pw - x.mask.shape[0] : pw] = x.mask
        ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
        prefill = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "past_key_values": cache,
            "use_cache": True,
        }
        try:  # only the last position's logits are needed: skip the (L, V) prompt logits
            out = eng.model(**prefill, logits_to_keep=1)
        except TypeError:  # models whose forward has no logits_to_keep
            out = eng.model(**prefill)
        expand = torch.tensor([distinct[tuple(r.prompt)] for r in rows], device=dev)
        return out.past_key_values, mask, out.logits[:, -1, :], expand

    def _place(self, rows: list[_Row], cache: Any, mask: Any, logits: Any, expand: Any) -> None:
        """Write prefilled ``rows`` (their distinct prompts' ``cache``, ``mask`` and ``logits``,
        ``expand`` picking each row's) into free slots, then new ones: each ends at the
        running rows' last column. Copies only the new rows, unless the cache must grow."""
        torch = _import_torch()
        n, width = len(rows), int(mask.shape[1])
        free = [b for b, r in enumerate(self.rows) if r is None][:n]
        used = len(self.rows)
        at = free + list(range(used, used + n - len(free)))
        # room: rows up to the last slot taken, ``width`` columns left of the end, and as many
        # right of it as the longest of the new rows may still generate
        self._fit(max(at) + 1, width, max(r.cap for r in rows) + 1, cache)
        s = self.slots
        assert s is not None
        dev = s.mask.device
        idx = torch.tensor(at, device=dev)
        left = s.end - width
        for layer, (k, v) in enumerate(zip(s.keys, s.values, strict=True)):
            src = cache.layers[layer]
            k[idx, :, left : s.end] = src.keys.index_select(0, expand)
            v[idx, :, left : s.end] = src.values.index_select(0, expand)
        rm = mask.index_select(0, expand)
        s.mask[idx] = 0
        s.mask[idx, left : s.end] = rm
        starts = (left + rm.argmax(dim=1)).tolist()
        grow = len(at) - len(free)
        self.rows.extend([None] * grow)
        self.first.extend([0] * grow)
        if grow:
            pad = torch.zeros(grow, dtype=torch.long, device=dev)
            self.next_pos = pad if self.next_pos is None else torch.cat([self.next_pos, pad])
            room = logits.new_zeros((grow, logits.shape[1]))
            self.logits = room if self.logits is None else torch.cat([self.logits, room])
        self.next_pos[idx] = rm.sum(dim=1)
        self.logits[idx] = logits.index_select(0, expand)
        for b, row, f in zip(at, rows, starts, strict=True):
            self.rows[b], self.first[b] = row, f
        s.start = min(self.first[b] for b, r in enumerate(self.rows) if r is not None)

    def _fit(self, rows: int, left: int, right: int, like: Any = None) -> None:
        """Make the cache hold ``rows`` slots, ``left`` columns up to :attr:`_Slots.end` and
        ``right`` from it: nothing if it does, else one copy of the used columns into new
        tensors (to grow) or to the left of the same ones. ``like``: a prefill's cache, for
        the shapes of the first allocation."""
        torch = _import_torch()
        s = self.slots
        if s is not None and rows <= s.rows and left <= s.end and s.end + right <= s.columns:
            return
        used = 0 if s is None else s.end - s.start
        end = max(used, left)
        n_rows = rows if s is None else max(rows, s.rows if rows <= s.rows else 2 * s.rows)
        # once it must change, room for twice ``right``: joining rows reserve their whole cap,
        # so an exact fit would be copied again at almost every admission
        # (a first allocation too in the engine loop, whose rows join later; generate's one
        # batch never grows, so it allocates what it needs)
        first_room = 2 * right if self.prefixes is not None else right
        n_cols = end + first_room if s is None else max(s.columns, end + 2 * right)
        if s is None or n_rows > s.rows or n_cols > s.columns:
            refs = [layer.keys for layer in like.layers] if s is None else s.keys
            shapes = [(n_rows, r.shape[1], n_cols, r.shape[3]) for r in refs]
            new = _Slots(
                [r.new_zeros(shape) for r, shape in zip(refs, shapes, strict=True)],
                [r.new_zeros(shape) for r, shape in zip(refs, shapes, strict=True)],
                torch.zeros((n_rows, n_cols), dtype=torch.long, device=refs[0].device),
            )
        else:
            new = s  # move the used columns left, within the same tensors
        if s is not None:
            b = len(self.rows)
            self.relayouts += 1
            for old_t, new_t in zip(s.keys + s.values, new.keys + new.values, strict=True):
                new_t[:b, :, end - used : end] = old_t[:b, :, s.start : s.end].clone()
            kept = s.mask[:b, s.start : s.end].clone()
            if new is s:  # no stale mask outside the moved columns
                new.mask[:b] = 0
            new.mask[:b, end - used : end] = kept
            shift = end - s.end
            self.first = [f + shift for f in self.first]
        new.start, new.end = end - used, end
        self.slots = new
        self.cache = self._forward_cache(new)

    @staticmethod
    def _forward_cache(slots: _Slots) -> Any:
        from transformers.cache_utils import Cache

        layer = _slot_layer_class()
        return Cache(layers=[layer(slots, i) for i in range(len(slots.keys))])

    def _compact(self, tokens: Any) -> Any:
        """Move the live rows to the first slots (one copy of their used columns), when at
        least half the slots are free; ``tokens`` (one per slot) is selected alike and
        returned. Free slots at the end are dropped without a copy."""
        torch = _import_torch()
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
            self.first.pop()
        b = len(self.rows)
        live = self.live
        tokens, self.next_pos, self.logits = tokens[:b], self.next_pos[:b], self.logits[:b]
        if self.slots is None or 2 * live > b or b < 8:
            return tokens
        s = self.slots
        live_slots = [i for i, r in enumerate(self.rows) if r is not None]
        keep = torch.tensor(live_slots, device=s.mask.device)
        for t in s.keys + s.values:
            t[:live, :, s.start : s.end] = t[:b, :, s.start : s.end].index_select(0, keep)
        s.mask[:live] = s.mask[:b].index_select(0, keep)
        self.first = [self.first[i] for i in keep.tolist()]
        self.rows = [r for r in self.rows if r is not None]
        self.next_pos = self.next_pos.index_select(0, keep)
        self.logits = self.logits.index_select(0, keep)
        self.compactions += 1
        return tokens.index_select(0, keep)

    def drop(self, which: Callable[[_Row], bool]) -> None:
        """Remove the rows ``which`` selects (aborted by the caller) before the next step."""
        for b, r in enumerate(self.rows):
            if r is not None and which(r):
                self.rows[b] = None
        if not self.live:
            self.clear()
        elif self.slots is not None:
            self.slots.start = min(self.first[b] for b, r in enumerate(self.rows) if r is not None)

    def _store(self, ended: list[tuple[int, _Row]]) -> None:
        """Keep the caches of ``ended`` rows (what was fed: the prompt and every generated token
        but the last) in :attr:`prefixes`: a copy of their used columns."""
        torch = _import_torch()
        assert self.prefixes is not None
        s = self.slots
        if s is None:
            return  # the model's own cache: no reuse
        idx = torch.tensor([b for b, _ in ended], device=s.mask.device)
        lo = min(self.first[b] for b, _ in ended)
        masks = s.mask[:, lo : s.end].index_select(0, idx)
        keys = [t[:, :, lo : s.end].index_select(0, idx) for t in s.keys]
        values = [t[:, :, lo : s.end].index_select(0, idx) for t in s.values]
        budget = len(self.rows) * (s.end - s.start)
        for i, (b, row) in enumerate(ended):
            f = self.first[b] - lo
            fed = tuple(row.prompt) + tuple(row.token_ids[:-1])
            self.prefixes.put(fed, _Prefix(len(fed), masks[i, f:], keys, values, i, f), budget)

    def step(self, params: SamplingParams, finished: Callable[[_Row], None]) -> None:
        """Sample one token for every row from its pending logits, then run the model on them.

        Each row draws one uniform from its own generator and inverts the CDF of its processed
        distribution, so its tokens depend only on its seed and its logits; a row at step ``t``
        (its tokens so far) follows ``min_tokens``, stop strings and its request's cap as
        ``generate`` does. Rows that end are handed to ``finished`` and leave the batch.
        """
        torch = _import_torch()
        eng, dev, rows = self.engine, self.engine.device, self.rows
        raw = torch.log_softmax(self.logits.to(torch.float64), dim=1)
        # exact self-certainty needs the whole distribution, which only this loop has:
        # KL(U || p) = -log V - mean_j log p_j over the logits' V entries (raw, untempered)
        cert = (-math.log(raw.shape[1]) - raw.mean(dim=1)).tolist() if eng.self_certainty else None
        early = None
        if params.min_tokens:
            early = [r is not None and len(r.token_ids) < params.min_tokens for r in rows]
        proc = process_logprobs_torch(raw, params, eng.eos_token_ids if early else (), early)
        u = torch.cat(
            [
                torch.rand(1, generator=r.generator, dtype=torch.float64)
                if r is not None
                else torch.zeros(1, dtype=torch.float64)
                for r in rows
            ]
        )
        cdf = proc.exp().cumsum(dim=1)
        target = (u.to(dev) * cdf[:, -1]).unsqueeze(1)
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
        reported = raw if eng.logprob_mode == "raw_logprobs" else proc
        raw_lp = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        proc_lp = proc.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        chosen_lp = raw_lp if eng.logprob_mode == "raw_logprobs" else proc_lp
        k = min(params.logprobs or 0, raw.shape[-1])
        if k:
            top_v, top_i = torch.topk(reported, k, dim=1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        eos = eng.eos_token_ids
        tok_list = tokens.tolist()
        ended: list[tuple[int, _Row]] = []  # rows that may be continued: their caches are kept
        for b, row in enumerate(rows):
            if row is None:
                continue
            t = len(row.token_ids)
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
                eng._check_stop(row, row.req, params)
            if not row.done and t + 1 == row.cap:  # the request's own cap
                row.finish, row.done = FinishReason.LENGTH.value, True
            if row.on_token is not None:
                event = TokenEvent(
                    request=row.event_request,
                    slot=row.slot,
                    index=row.index,
                    token_id=tok,
                    num_tokens=t + 1,
                    logprob=float(chosen_lp[b]) if params.logprobs is not None else None,
                    top=row.tops[-1] if k else None,
                    finished=row.done,
                )
                if row.on_token(event) and not row.done:
                    row.finish, row.done = FinishReason.ABORT.value, True
            if row.done:
                rows[b] = None
                if self.prefixes is not None and row.finish != FinishReason.ABORT.value and (
                    row.stop_reason is not None or tok not in eos
                ):
                    ended.append((b, row))
                finished(row)
        if ended:
            self._store(ended)
        if not self.live:
            self.clear()
            return
        tokens = self._compact(tokens)
        b = len(self.rows)
        if self.slots is not None:
            self.slots.start = min(f for f, r in zip(self.first, self.rows, strict=True) if r)
            self._fit(b, 0, 1)
            s = self.slots
            s.mask[:b, s.end] = 1
            mask = s.mask[:b, s.start : s.end + 1]
        else:
            ones = torch.ones((b, 1), dtype=self.own_mask.dtype, device=dev)
            mask = self.own_mask = torch.cat([self.own_mask, ones], 1)
        out = eng.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=self.next_pos.unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
        )
        if self.slots is not None:
            self.slots.end += 1  # every layer wrote its column in place
        else:
            self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1


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
        #: tokenised prompts (:meth:`_encode`)
        self._encoded: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._decode_ids = _fast_decode(tok)
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

    def _encode(self, text: str, special: bool = True) -> list[int]:
        """The tokenizer's ids of ``text``, remembered (a step-wise sampler submits the same
        prompt for every particle and step); at most 4,096 texts are kept."""
        memo = self._encoded
        ids = memo.get((text, special))
        if ids is None:
            if len(memo) >= 4096:
                memo.clear()
            ids = memo[(text, special)] = tuple(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        return list(ids)

    def _context_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            extra: list[int] = []
            if request.prefix:
                extra = self._encode(request.prefix, special=False)
            return list(request.prompt_token_ids) + extra
        if request.prompt is not None:
            return self._encode(request.prompt + request.prefix)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"model {self.model_name} has no chat template; pass chat_template= or use prompt="
            )
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in request.messages or ()], tokenize=False, add_generation_prompt=True
        )
        return self._encode(text + request.prefix, special=False)

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
        caps = [r.params_for(params).max_tokens for r in requests]
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
                            requests[pos],
                            caps[pos],
                            on_token,
                            pos,
                        )
                        for pos, j, idx, seed in rows[start : start + step]
                    ]
                    self._decode_batch(batch, params, finished)
        except GenerationError:
            raise
        except Exception as e:
            raise collector.failure(self.name, e) from e
        return collector.results()

    def _decode_batch(
        self, rows: list[_Row], params: SamplingParams, finished: Callable[[_Row], None]
    ) -> None:
        """Decode ``rows`` together until every one has ended."""
        batch = _Batch(self)
        batch.admit(rows)
        while batch.live:
            batch.step(params, finished)

    def open_loop(
        self,
        params: SamplingParams,
        *,
        prefix_reuse: bool = True,
        admit_share: float = 0.5,
        admit_wait: int = 8,
    ) -> _HFLoop:
        """Continuous generation (:mod:`ttscale.engines.loop`) on one running batch: a submitted
        request's samples join the batch at the next :meth:`~_HFLoop.poll` (their prompts
        prefilled together, each distinct prompt once, and written into free slots of the
        running cache, :class:`_Slots`), rows leave it as they end, and a request comes back as
        soon as its last sample ended. A
        sample draws from its own seeded generator, so it is the one ``generate`` returns (up to
        the ~1e-6 float32 effects of batch composition). ``batch_size`` caps the rows decoded
        together; further samples wait in a queue.

        ``prefix_reuse``: a row that ends at a stop string or a token cap leaves its KV cache
        behind (the oldest dropped once they hold more tokens than the running batch), and a
        request whose prompt continues one by up to 4 tokens (a step-wise sampler's next step)
        prefills only those tokens. Its logits then come from the cache built step by step
        rather than from one prefill: the same float32 effects as batch composition.

        Admission: samples submitted while the batch runs join it together, before the step at
        which they are at least ``admit_share`` of its live rows or the oldest has waited
        ``admit_wait`` steps (at once when the batch is empty): each admission costs a prefill
        forward and a copy of the new rows into the cache, so one per group rather than one per
        poll. Which step a sample joins at does not change what it draws."""
        return _HFLoop(self, params, prefix_reuse, admit_share, admit_wait)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens skipped (as :attr:`Completion.text`)."""
        return str(self._decode_ids([int(t) for t in token_ids]))

    def _text(self, req: GenerationRequest, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, after the request's token prefix if it has one."""
        return continuation_text(self.decode, req.prefix_token_ids, token_ids)

    def _row_text(self, row: _Row, req: GenerationRequest, token_ids: Sequence[int]) -> str:
        """:meth:`_text` for a row being decoded: its prefix's decoded tail is decoded once."""
        if req.prefix_token_ids and row.head is None:
            row.head = self.decode(list(req.prefix_token_ids[-CONTINUATION_WINDOW:]))
        return continuation_text(self.decode, req.prefix_token_ids, token_ids, head=row.head)

    def _check_stop(self, row: _Row, req: GenerationRequest, params: SamplingParams) -> None:
        if params.min_tokens and len(row.token_ids) == params.min_tokens + 1:
            # first check: a stop string must end after the text of the first min_tokens tokens
            row.checked = len(self._row_text(row, req, row.token_ids[: params.min_tokens]))
        text = self._row_text(row, req, row.token_ids)
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
            text = self._row_text(row, req, row.token_ids)
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

    def _padded_logits(self, full: list[list[int]], keep: int) -> Any:
        """One forward pass over the token sequences ``full``, left-padded into one batch; the
        logits of the last ``keep`` positions (all of them for models without
        ``logits_to_keep``)."""
        torch = _import_torch()
        width = max(len(f) for f in full)
        ids = torch.full((len(full), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(full), width), dtype=torch.long)
        for b, f in enumerate(full):
            ids[b, width - len(f) :] = torch.tensor(f)
            mask[b, width - len(f) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        try:
            return self.model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # models whose forward has no logits_to_keep
            return self.model(**inputs).logits

    def _score_batch(
        self, contexts: list[list[int]], conts: list[list[int]], part: list[int]
    ) -> list[tuple[float, ...]]:
        torch = _import_torch()
        # left padding: every row ends at the last position, so the logits that predict the
        # continuations are among the last (longest continuation + 1)
        keep = max(len(conts[i]) for i in part) + 1
        logits = self._padded_logits([contexts[i] + conts[i] for i in part], keep)
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
                    logits = self._padded_logits([contexts[i] + conts[i] for i in part], 2)
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


@dataclass
class _Ticket:
    """A request submitted to the loop: its rows (queued, running or ended) and its results."""

    request: GenerationRequest
    rows: list[_Row]
    collector: ResultCollector


class _HFLoop:
    """:meth:`HFEngine.open_loop`: the :class:`~ttscale.engines.loop.EngineLoop` contract on one
    running :class:`_Batch`. ``poll`` decodes steps until a request has finished (or
    ``max_steps`` steps), admitting queued samples before a step (as many as ``batch_size``
    allows) when the batch is empty, when they are at least ``admit_share`` of its live rows,
    or when the oldest has waited ``admit_wait`` steps; ``abort`` takes a request's rows out of
    the batch at once."""

    def __init__(
        self,
        engine: HFEngine,
        params: SamplingParams,
        prefix_reuse: bool = True,
        admit_share: float = 0.5,
        admit_wait: int = 8,
    ) -> None:
        if admit_share < 0 or admit_wait < 0:
            raise ConfigError(
                f"admit_share ({admit_share}) and admit_wait ({admit_wait}) must be >= 0"
            )
        self.engine = engine
        self.params = params
        # Admitting rows costs a prefill forward and writing the rows into the cache, about as much
        # as a decoding step of the whole batch on a small model; step-wise samplers submit a
        # few rows at almost every poll, so rows that arrive while a batch runs are gathered
        # and join together (a row waits at most admit_wait steps: never starved)
        self.admit_share = admit_share
        self.admit_wait = admit_wait
        self._waiting_since: int | None = None  # self.steps when the queue last became non-empty
        #: finished rows' caches that later requests may extend (``None``: no reuse)
        self.prefixes = _PrefixStore() if prefix_reuse else None
        self._batch = _Batch(engine, self.prefixes)
        self._next = 0
        self._live: dict[int, _Ticket] = {}
        self._queue: list[_Row] = []  # samples not yet in the batch, in submission order
        self._done: list[tuple[int, list[Completion]]] = []
        #: decoding steps and prefill groups so far (tests and benchmarks read them)
        self.steps = 0
        self.admissions = 0

    @property
    def in_flight(self) -> int:
        return sum(len(tk.request.indices) for tk in self._live.values())

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> int:
        torch = _import_torch()
        eng, params = self.engine, self.params
        prompt = eng.prompt_token_ids(request)
        if not prompt:
            raise ConfigError("empty prompt: the tokenizer produced no tokens")
        t = self._next
        self._next += 1

        def finished(pos: int, comps: list[Completion], t: int = t) -> None:
            self._done.append((t, comps))

        # the request's own cap (checked as params_for checks it, without a SamplingParams
        # per request: step-wise samplers submit thousands)
        cap = request.max_tokens or params.max_tokens
        if cap < params.min_tokens:
            raise ConfigError(f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({cap})")
        rows = [
            _Row(
                t,
                j,
                idx,
                seed,
                prompt,
                torch.Generator().manual_seed(seed),
                request,
                cap,
                on_token,
                0,
            )
            for j, idx in enumerate(request.indices)
            for seed in (request.seed_for(j, params),)
        ]
        self._live[t] = _Ticket(request, rows, ResultCollector([request], finished))
        if not self._queue:
            self._waiting_since = self.steps
        self._queue.extend(rows)
        return t

    def _finished(self, row: _Row) -> None:
        tk = self._live.get(row.request)
        if tk is not None:
            tk.collector.put(0, row.slot, self.engine._completion(row.req, row, self.params))

    def _admit(self) -> None:
        if not self._queue:
            return
        live = self._batch.live
        waited = self.steps - (self._waiting_since or 0)
        if live and len(self._queue) < self.admit_share * live and waited < self.admit_wait:
            return  # gather more (see __init__)
        room = len(self._queue)
        if self.engine.batch_size is not None:
            room = min(room, self.engine.batch_size - live)
        if room <= 0:
            return
        rows, self._queue = self._queue[:room], self._queue[room:]
        self._batch.admit(rows)
        self.admissions += 1
        if not self._queue:
            self._waiting_since = None

    def poll(
        self, on_result: Callable[[int, list[Completion]], None], max_steps: int | None = None
    ) -> None:
        from ttscale.engines.loop import LoopFailure

        torch = _import_torch()
        steps = 0
        try:
            with torch.inference_mode():
                # max_steps: return after that many steps even if nothing finished, so a caller
                # (ttscale.serve) can act on cancels while long requests run
                while not self._done and self._live and (max_steps is None or steps < max_steps):
                    self._admit()
                    self._batch.step(self.params, self._finished)
                    steps += 1
                    self.steps += 1
        except Exception as e:
            partial = {
                t: [c for c in tk.collector._slots[0] if c is not None]
                for t, tk in self._live.items()
                if t not in {d for d, _ in self._done}
            }
            self._hand_over(on_result)
            self.close()
            raise LoopFailure(f"hf generation failed: {e}".splitlines()[0], partial) from e
        self._hand_over(on_result)

    def _hand_over(self, on_result: Callable[[int, list[Completion]], None]) -> None:
        from ttscale.engines.loop import hand_over

        done, self._done = self._done, []
        hand_over(done, self._live, on_result)

    def abort(self, ticket: int) -> int:
        tk = self._live.pop(ticket, None)
        if tk is None:
            return 0
        self._queue = [r for r in self._queue if r.request != ticket]
        if not self._queue:
            self._waiting_since = None
        self._batch.drop(lambda r: r.request == ticket)
        self._done = [(t, c) for t, c in self._done if t != ticket]
        # every token generated for it, samples that had already ended included
        return sum(len(r.token_ids) for r in tk.rows)

    def close(self) -> None:
        self._batch.clear()
        if self.prefixes is not None:
            self.prefixes.clear()
        self._queue.clear()
        self._waiting_since = None
        self._live.clear()
        self._done.clear()
