"""Reward-model verifiers: outcome (ORM) and process (PRM) reward models on transformers or vLLM.

Scores follow one convention. A model's output for a candidate (ORM) or a step (PRM) is turned
into the **log-odds of the positive class** ``r`` (natural log):

* one label: ``r = z`` (the single logit; the usual scalar reward head);
* ``L >= 2`` labels: ``r = z_pos - logsumexp(z_others)``, i.e. ``log p_pos - log(1 - p_pos)`` under
  a softmax (for two labels simply ``z_pos - z_neg``);
* causal-LM PRM (Math-Shepherd "+"/"-" convention): ``r = z_good - z_bad``, the two next-token
  logits read at a step tag.

``P(positive) = sigmoid(r)``. ``score_map="raw"`` reports ``r``, ``score_map="sigmoid"`` reports
``sigmoid(r)`` in ``[0, 1]`` (what weighted voting needs, ALGORITHMS 9.1). PRM step
probabilities ``s_t = sigmoid(r_t)`` are aggregated with ``last``, ``min`` or ``prod``
(``exp(sum_t log max(s_t, eps))``, in log space); the raw PRM score is the log-odds of the
aggregate.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ttscale.errors import ConfigError, VerifierError
from ttscale.select.aggregate import PRM_AGGREGATIONS
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.validation import check_choice, check_int, check_number

__all__ = [
    "PRM_AGGREGATIONS",
    "RewardModelVerifier",
    "aggregate_step_scores",
    "log_odds_from_logits",
    "split_steps",
]

logger = logging.getLogger(__name__)

_KINDS = ("orm", "prm")
_SCORE_MAPS = ("raw", "sigmoid")
_BACKENDS = ("hf", "vllm")
_PRM_HEADS = ("token_classification", "causal_lm")
_INPUT_FORMATS = ("auto", "chat", "concat")
_DEFAULT_MAX_LENGTH = 4096


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    """``1 / (1 + exp(-x))`` computed as ``exp(-log1p(exp(-x)))``: no overflow, relative precision."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))


def _logit(p: float, eps: float) -> float:
    q = min(max(float(p), eps), 1.0 - eps)
    return math.log(q) - math.log1p(-q)


def split_steps(text: str, separator: str = "\n\n") -> list[str]:
    """Split a response into reasoning steps at ``separator``; blank pieces are dropped."""
    if not separator:
        raise ConfigError("step_separator must be a non-empty string, got ''")
    return [piece for piece in text.split(separator) if piece.strip()]


def aggregate_step_scores(
    step_scores: Sequence[float] | np.ndarray,
    prm_aggregation: str = "last",
    *,
    eps: float = 1e-6,
) -> float:
    """Aggregate one solution's PRM step probabilities ``s_1..s_T`` (each in ``[0, 1]``).

    ``last``: ``s_T``; ``min``: ``min_t s_t``; ``prod``: ``exp(sum_t log max(s_t, eps))`` (log space,
    every step clipped away from 0 so long solutions do not underflow). No steps -> NaN. The
    maths is :func:`ttscale.select.aggregate.prm_aggregate`'s (one solution).
    """
    from ttscale.select.aggregate import prm_aggregate

    check_choice("prm_aggregation", prm_aggregation, PRM_AGGREGATIONS)
    steps = [np.asarray(step_scores, dtype=np.float64)]
    return float(prm_aggregate(steps, prm_aggregation, eps=eps)[0])  # type: ignore[arg-type]


def log_odds_from_logits(logits: np.ndarray, positive_label: int = -1) -> np.ndarray:
    """Log-odds of the positive class from classification logits of shape ``(..., L)``.

    ``L == 1``: the logit itself. ``L >= 2``: ``z_pos - logsumexp(z_others)``. Returns float64 of
    shape ``(...)``.
    """
    z = np.asarray(logits, dtype=np.float64)
    num_labels = z.shape[-1]
    if num_labels == 1:
        return z[..., 0]
    pos = positive_label % num_labels
    others = np.delete(z, pos, axis=-1)
    m = others.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(others - m).sum(axis=-1, keepdims=True)))[..., 0]
    return z[..., pos] - lse


@dataclass(frozen=True)
class _Encoded:
    """One model input: token ids, the positions to read (PRM tags) and what truncation cut."""

    ids: list[int]
    read_at: tuple[int, ...]
    truncated_tokens: int
    steps_dropped: int = 0


class RewardModelVerifier:
    """Score candidates with a reward model (a :class:`~ttscale.verifiers.base.Verifier`).

    ORM (``kind="orm"``): an ``AutoModelForSequenceClassification`` head scores the pair
    (problem prompt, response). PRM (``kind="prm"``): the response is split into steps at
    ``step_separator``; a step tag token (``step_tag``, one token in the model's vocabulary) is
    inserted after every step and the model's output at each tag position is the step's score:

    * ``prm_head="token_classification"``: ``AutoModelForTokenClassification`` logits at the tag;
    * ``prm_head="causal_lm"``: ``AutoModelForCausalLM`` next-token logits at the tag, positive
      token ``good_token`` vs negative ``bad_token`` (Math-Shepherd's "+"/"-" convention).

    Input text. ``input_format="concat"``: ``prompt + response`` tokenized with the tokenizer's
    special tokens; ``"chat"``: the tokenizer's chat template over a user turn (prompt) and an
    assistant turn (response); ``"auto"`` (default): chat when the tokenizer has a template. A PRM
    input is built from token pieces, so tag positions are exact: ``ids(prefix) + ids(step_1) +
    [tag] + ids(sep + step_2) + [tag] + ...`` where the prefix is the prompt (or the chat template
    up to the assistant turn) and each step keeps the separator that preceded it.

    Truncation (``max_length`` tokens) is from the **left**: the beginning of the prompt is dropped
    first (a leading BOS token is kept), because the ORM reads the last token and the PRM the
    tags in the response. A PRM step whose tag is cut away is not scored (``steps_dropped`` in the
    verdict's meta). Batches are right-padded so absolute-position models see the same positions
    as unbatched inputs; the sequence-classification head pools at the last non-pad token.

    Verdicts: status ``SCORED`` with ``score`` (``score_map``), ``meta`` holding ``logit`` (log-odds)
    and ``prob`` (``sigmoid``) and, for PRMs, ``step_scores`` (per-step probabilities); a
    candidate that cannot be scored (a PRM response with no steps, every step truncated) gets
    status ``INVALID`` and no score. ``answer`` is the sample's answer (the voting key).

    ``backend="vllm"`` runs the model with vLLM's pooling runner (``LLM(runner="pooling")``,
    ``LLM.classify`` for ORMs, ``LLM.encode(pooling_task="token_classify")`` for token-classification
    PRMs) on the same token ids; ``prm_head="causal_lm"`` is HF-only.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        kind: str = "orm",
        device: str = "cpu",
        batch_size: int = 8,
        step_separator: str = "\n\n",
        prm_aggregation: str = "last",
        score_map: str | None = None,
        max_length: int | None = None,
        backend: str = "hf",
        input_format: str = "auto",
        prm_head: str = "token_classification",
        step_tag: str | None = None,
        good_token: str = "+",
        bad_token: str = "-",
        positive_label: int | str = -1,
        dtype: str = "float32",
        eps: float = 1e-6,
        name: str | None = None,
        cost: float = 1.0,
        trust_remote_code: bool = False,
        vllm_options: Mapping[str, Any] | None = None,
    ) -> None:
        _choice("kind", kind, _KINDS)
        _choice("backend", backend, _BACKENDS)
        _choice("input_format", input_format, _INPUT_FORMATS)
        _choice("prm_head", prm_head, _PRM_HEADS)
        _choice("prm_aggregation", prm_aggregation, PRM_AGGREGATIONS)
        if score_map is None:
            # An ORM's reward is conventionally the raw logit; PRM step scores are probabilities.
            score_map = "raw" if kind == "orm" else "sigmoid"
        _choice("score_map", score_map, _SCORE_MAPS)
        check_int("batch_size", batch_size, min=1)
        check_int("max_length", max_length, min=2, allow_none=True)
        if not step_separator:
            raise ConfigError("step_separator must be a non-empty string, got ''")
        check_number("eps", eps, low=0.0, high=0.5, low_open=True, high_open=True)
        check_number("cost", cost, low=0.0, finite=True)
        if kind == "prm" and not step_tag:
            raise ConfigError(
                "kind='prm' needs step_tag= (one token the PRM was trained to score after each step, "
                "e.g. 'ки' for Math-Shepherd)"
            )
        if backend == "vllm" and kind == "prm" and prm_head == "causal_lm":
            raise ConfigError(
                "backend='vllm' supports PRMs with prm_head='token_classification' only"
            )
        self.model_path = os.fspath(model_path)
        self.kind = kind
        self.device = device
        self.batch_size = batch_size
        self.step_separator = step_separator
        self.prm_aggregation = prm_aggregation
        self.score_map = score_map
        self.backend = backend
        self.input_format = input_format
        self.prm_head = prm_head
        self.step_tag = step_tag
        self.good_token = good_token
        self.bad_token = bad_token
        self.dtype = dtype
        self.eps = float(eps)
        self.cost = float(cost)
        self.trust_remote_code = trust_remote_code
        self.vllm_options = dict(vllm_options or {})
        self.name = (
            name or f"{kind}:{os.path.basename(self.model_path.rstrip('/')) or self.model_path}"
        )
        self.truncated_count = 0
        self._model: Any = None
        self._llm: Any = None
        self._load(positive_label, max_length)

    # ------------------------------------------------------------------ loading

    def _load(self, positive_label: int | str, max_length: int | None) -> None:
        try:
            from transformers import AutoConfig, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise VerifierError(
                "RewardModelVerifier needs transformers: pip install 'ttscale[hf]'"
            ) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, trust_remote_code=self.trust_remote_code
            )
            config = AutoConfig.from_pretrained(
                self.model_path, trust_remote_code=self.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise VerifierError(f"cannot load reward model {self.model_path!r}: {e}") from e
        self._use_chat = self.input_format == "chat" or (
            self.input_format == "auto" and bool(getattr(self.tokenizer, "chat_template", None))
        )
        if self.input_format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"input_format='chat' but the tokenizer of {self.model_path!r} has no chat template"
            )
        # A causal-LM PRM reads two columns of its LM head (bad_token, good_token).
        causal = self.kind == "prm" and self.prm_head == "causal_lm"
        self.num_labels = 2 if causal else int(getattr(config, "num_labels", 1) or 1)
        self.positive_label = self._resolve_label(config, positive_label)
        self.max_length = max_length or self._default_max_length(config)
        self._tag_id: int | None = None
        self._good_id: int | None = None
        self._bad_id: int | None = None
        if self.kind == "prm":
            self._tag_id = self._single_token_id(self.step_tag or "", "step_tag")
            if self.prm_head == "causal_lm":
                self._good_id = self._single_token_id(self.good_token, "good_token")
                self._bad_id = self._single_token_id(self.bad_token, "bad_token")
        if self.backend == "vllm":
            self._load_vllm()
        else:
            self._load_hf()

    def _resolve_label(self, config: Any, positive_label: int | str) -> int:
        if self.kind == "prm" and self.prm_head == "causal_lm":
            return 1  # the LM's logits are read as the columns [bad_token, good_token]
        n = self.num_labels
        if isinstance(positive_label, str):
            label2id = {
                str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()
            }
            if positive_label not in label2id:
                raise ConfigError(
                    f"positive_label {positive_label!r} is not a label of {self.model_path!r}; "
                    f"labels: {sorted(label2id)}"
                )
            return label2id[positive_label]
        if isinstance(positive_label, bool) or not isinstance(positive_label, int):
            raise ConfigError(
                f"positive_label must be an int or a label name, got {positive_label!r}"
            )
        if not (-n <= positive_label < n):
            raise ConfigError(
                f"positive_label must be in [-{n}, {n}) for a {n}-label head, got {positive_label}"
            )
        return positive_label % n

    def _default_max_length(self, config: Any) -> int:
        candidates = [getattr(config, "max_position_embeddings", None)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 1_000_000:
            candidates.append(tok_max)
        vals = [int(c) for c in candidates if isinstance(c, int) and c > 1]
        return min(vals) if vals else _DEFAULT_MAX_LENGTH

    def _single_token_id(self, text: str, what: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(
                f"{what} {text!r} is {len(ids)} tokens for the tokenizer of {self.model_path!r}; "
                f"pick a string that is exactly one token"
            )
        return int(ids[0])

    def _load_hf(self) -> None:
        import torch
        import transformers

        cls: Any
        if self.kind == "orm":
            cls = transformers.AutoModelForSequenceClassification
        elif self.prm_head == "token_classification":
            cls = transformers.AutoModelForTokenClassification
        else:
            cls = transformers.AutoModelForCausalLM
        torch_dtype = getattr(torch, self.dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(
                f"dtype must name a torch dtype (float32, bfloat16, ...), got {self.dtype!r}"
            )
        try:
            model = cls.from_pretrained(
                self.model_path, dtype=torch_dtype, trust_remote_code=self.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise VerifierError(f"cannot load reward model {self.model_path!r}: {e}") from e
        model.to(self.device)
        model.eval()
        self._pad_id = self._pad_token_id()
        if self.kind == "orm":
            text_config = model.config.get_text_config()
            if getattr(text_config, "pad_token_id", None) is None:
                # The head pools at the rightmost token != pad_token_id; without one it refuses
                # batches. A sequence ending in this token would pool one token earlier.
                logger.warning(
                    "reward model %s has no pad_token_id; using token %d for batching",
                    self.model_path,
                    self._pad_id,
                )
                text_config.pad_token_id = self._pad_id
                model.config.pad_token_id = self._pad_id
            self._pad_id = int(text_config.pad_token_id)
        self._model = model

    def _pad_token_id(self) -> int:
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if isinstance(v, int):
                return v
        return 0

    def _load_vllm(self) -> None:
        # vLLM is started through the engines package (its one home), with its CPU settings
        from ttscale.engines.vllm import VLLMPooler
        from ttscale.errors import EngineError

        self._pad_id = self._pad_token_id()
        try:
            self._llm = VLLMPooler(
                self.model_path,
                dtype=self.dtype,
                max_model_len=self.max_length,
                trust_remote_code=self.trust_remote_code,
                **self.vllm_options,  # e.g. gpu_memory_utilization, tensor_parallel_size
            )
        except EngineError as e:
            raise VerifierError(f"reward model {self.model_path!r}: {e}") from e

    # ------------------------------------------------------------------ encoding

    def _prefix_ids(self, prompt: str) -> list[int]:
        if self._use_chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def _encode_orm(self, prompt: str, response: str) -> _Encoded:
        if self._use_chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        else:
            ids = list(self.tokenizer.encode(prompt + response, add_special_tokens=True))
        ids, cut, _ = self._truncate_left(ids)
        return _Encoded(ids=ids, read_at=(len(ids) - 1,), truncated_tokens=cut)

    def _encode_prm(self, prompt: str, steps: Sequence[str]) -> _Encoded:
        ids = self._prefix_ids(prompt)
        tags: list[int] = []
        for t, step in enumerate(steps):
            piece = step if t == 0 else self.step_separator + step
            ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            tags.append(len(ids))
            ids.append(int(self._tag_id))  # type: ignore[arg-type]
        ids, cut, head = self._truncate_left(ids)
        # A tag at old position p is now at p - cut unless it fell into the cut-away span.
        kept = tuple(p - cut for p in tags if p - cut >= head)
        return _Encoded(
            ids=ids, read_at=kept, truncated_tokens=cut, steps_dropped=len(tags) - len(kept)
        )

    def _truncate_left(self, ids: list[int]) -> tuple[list[int], int, int]:
        """Keep at most ``max_length`` tokens: a leading BOS and the last ones.

        Returns ``(ids, cut, head)``: ``cut`` tokens were removed right after the first ``head``
        (1 when a BOS was kept, else 0), so a kept old position ``p`` is now ``p - cut``.
        """
        n = len(ids)
        if n <= self.max_length:
            return ids, 0, 0
        self.truncated_count += 1
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and ids[0] == bos:
            keep = self.max_length - 1
            return [ids[0], *ids[n - keep :]], n - keep - 1, 1
        return ids[n - self.max_length :], n - self.max_length, 0

    # ------------------------------------------------------------------ forward passes

    def _forward_hf(self, batch: Sequence[_Encoded]) -> list[np.ndarray]:
        """Per input: the logits at its ``read_at`` positions, shape ``(len(read_at), L)``."""
        import torch

        width = max(len(e.ids) for e in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, e in enumerate(batch):
            input_ids[b, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[b, : len(e.ids)] = 1
        input_ids = input_ids.to(self.device)
        mask = mask.to(self.device)
        with torch.inference_mode():
            out = self._model(input_ids=input_ids, attention_mask=mask)
        logits = out.logits.float().cpu().numpy().astype(np.float64)
        if self.kind == "orm":
            return [logits[b][None, :] for b in range(len(batch))]
        result = []
        for b, e in enumerate(batch):
            at = list(e.read_at)
            rows = logits[b, at, :]
            if self.prm_head == "causal_lm":
                rows = rows[:, [self._bad_id, self._good_id]]
            result.append(rows)
        return result

    def _forward_vllm(self, batch: Sequence[_Encoded]) -> list[np.ndarray]:
        ids = [list(e.ids) for e in batch]
        if self.kind == "orm":
            return [row[None, :] for row in self._llm.classify(ids)]
        return [data[list(e.read_at), :] for data, e in zip(self._llm.token_classify(ids), batch, strict=True)]

    def _log_odds(self, encoded: Sequence[_Encoded]) -> list[np.ndarray]:
        """Log-odds of the positive class at every read position, per input (float64)."""
        out: list[np.ndarray] = []
        positive = self.positive_label
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            todo = [e for e in chunk if e.read_at]
            rows: list[np.ndarray] = []
            if todo:
                rows = (
                    self._forward_vllm(todo) if self.backend == "vllm" else self._forward_hf(todo)
                )
            logits = iter(rows)
            for e in chunk:
                if not e.read_at:
                    out.append(np.zeros(0, dtype=np.float64))
                else:
                    out.append(log_odds_from_logits(next(logits), positive))
        return out

    # ------------------------------------------------------------------ public API

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """ORM log-odds ``r`` for each (prompt, response) pair; float64 of shape ``(n,)``."""
        if self.kind != "orm":
            raise ConfigError("score_texts is for kind='orm'; use step_scores for a PRM")
        if len(prompts) != len(responses):
            raise ConfigError(f"got {len(prompts)} prompts but {len(responses)} responses")
        enc = [self._encode_orm(p, r) for p, r in zip(prompts, responses, strict=True)]
        return np.array([float(x[0]) for x in self._log_odds(enc)], dtype=np.float64)

    def step_scores(self, prompt: str, responses: Sequence[str]) -> list[np.ndarray]:
        """PRM step probabilities ``s_t = sigmoid(r_t)`` for each response (steps kept after truncation)."""
        if self.kind != "prm":
            raise ConfigError("step_scores is for kind='prm'; use score_texts for an ORM")
        enc = [self._encode_prm(prompt, split_steps(r, self.step_separator)) for r in responses]
        return [_sigmoid(x) for x in self._log_odds(enc)]

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in order: status SCORED with the mapped reward as ``score``."""
        return self.verify_many([(problem, samples)])[0]

    def verify_many(self, items: Sequence[tuple[Problem, Sequence[Sample]]]) -> list[list[Verdict]]:
        """:meth:`verify` for several problems, their candidates batched together."""
        flat = [(p, s) for p, samples in items for s in samples]
        if self.kind == "orm":
            enc = [self._encode_orm(p.prompt, s.text) for p, s in flat]
        else:
            enc = [
                self._encode_prm(p.prompt, split_steps(s.text, self.step_separator))
                for p, s in flat
            ]
        try:
            scores = self._log_odds(enc)
        except (RuntimeError, ValueError) as e:
            raise VerifierError(f"reward model {self.name} failed: {e}") from e
        verdicts = iter(
            self._verdict(p, s, e, r) for (p, s), e, r in zip(flat, enc, scores, strict=True)
        )
        return [[next(verdicts) for _ in samples] for _, samples in items]

    def _verdict(self, problem: Problem, sample: Sample, enc: _Encoded, r: np.ndarray) -> Verdict:
        meta: dict[str, Any] = {}
        if enc.truncated_tokens:
            meta["truncated_tokens"] = enc.truncated_tokens
        if self.kind == "prm":
            meta["steps_dropped"] = enc.steps_dropped
        if r.size == 0:
            detail = (
                "no steps to score (empty response)"
                if not enc.steps_dropped
                else "every step was truncated away; raise max_length"
            )
            return Verdict(
                problem_id=problem.id,
                index=sample.index,
                status=VerdictStatus.INVALID,
                verifier=self.name,
                answer=sample.answer,
                detail=detail,
                meta=meta,
            )
        if self.kind == "orm":
            logit = float(r[0])
            prob = float(_sigmoid(logit))
        else:
            probs = _sigmoid(r)
            meta["step_scores"] = [float(x) for x in probs]
            prob = aggregate_step_scores(probs, self.prm_aggregation, eps=self.eps)
            if self.prm_aggregation == "last":
                logit = float(r[-1])
            elif self.prm_aggregation == "min":
                logit = float(r.min())  # logit is monotone: logit(min s) == min logit(s)
            else:
                logit = _logit(prob, self.eps)
        meta["logit"] = logit
        meta["prob"] = prob
        return Verdict(
            problem_id=problem.id,
            index=sample.index,
            status=VerdictStatus.SCORED,
            verifier=self.name,
            answer=sample.answer,
            score=logit if self.score_map == "raw" else prob,
            meta=meta,
        )

    def info(self) -> dict[str, Any]:
        """Provenance for the run manifest."""
        return {
            "verifier": "reward_model",
            "name": self.name,
            "model": self.model_path,
            "kind": self.kind,
            "backend": self.backend,
            "num_labels": self.num_labels,
            "positive_label": self.positive_label,
            "score_map": self.score_map,
            "input_format": "chat" if self._use_chat else "concat",
            "max_length": self.max_length,
            "truncation": "left",
            "truncated_count": self.truncated_count,
            "prm_head": self.prm_head if self.kind == "prm" else None,
            "prm_aggregation": self.prm_aggregation if self.kind == "prm" else None,
            "step_separator": self.step_separator if self.kind == "prm" else None,
            "step_tag": self.step_tag if self.kind == "prm" else None,
            "cost": self.cost,
        }

    def close(self) -> None:
        """Release the model (and shut vLLM's engine process down)."""
        self._model = None
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    check_choice(name, value, allowed)
