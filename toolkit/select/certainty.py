"""Self-certainty (Kang et al., 2025, "Scalable Best-of-N Selection for Large Language Models via
Self-Certainty", arXiv 2502.18581): a trace's confidence from its own next-token distributions.

Per generated token ``i`` with next-token distribution ``p_i`` over a vocabulary of ``V`` tokens,
``KL(U || p_i) = -log V - (1/V) * sum_j log p_ij``; a trace's self-certainty is the mean of this
over its tokens (higher = more certain). It is used

* for best-of-N (:func:`certainty_best_of_n`: the trace with the highest self-certainty), and
* for Borda voting (:func:`borda_vote`): traces ranked by self-certainty, rank ``r`` (1 = most
  certain) of ``N`` gives its answer ``(N - r + 1) ** power`` votes; the answer with the most
  votes wins, ties to the first-seen answer. ``power`` defaults to 0.5, the reference's default
  (checked in ``src/voting_from_list.py`` of github.com/backprop07/Self-Certainty, commit
  68d3fea: ``confidence_with_file(..., power=0.5)`` and ``--power`` default 0.5); ``curve
  --borda-power`` and ``compute_curves(borda_power=)`` set it (0 = majority vote; large values
  approach best-of-N).

How it is computed:

* **exact** (:func:`self_certainty`, from full log-prob rows; :func:`exact_self_certainty` runs
  the forward pass on an :class:`~ttscale.engines.hf.HFEngine`): every ``log p_ij``;
* **exact, stored per sample**: ``ttscale certainty RUN`` (:func:`score_certainties`, a scoring
  pass on an hf model whose tokenizer is the run's) writes score set :data:`SCORE_NAME` under
  ``RUN/scores/``; ``sample --engine hf --self-certainty`` stores the decode loop's own value as
  each sample's ``scores["self_certainty"]``. :func:`pool_certainties` is the one place that
  chooses for ``curve``/``ttscale run``: those exact values when every sample has one, else the
  approximation below, and says which (:class:`RunCertainties`);
* **top-k approximation** (:func:`self_certainty_topk`, method name
  :data:`TOPK_APPROXIMATION`), for engines that return only the top-k log-probs per position:
  the listed ``k`` log-probs are exact and the rest of the mass ``R = 1 - sum(top)`` is spread
  evenly over the other ``V - k`` tokens. Spreading evenly maximises ``sum_j log p_ij`` for the
  given tail mass (Jensen), so the approximation is a *lower bound* of the exact value; its
  error on the bundled model is measured in ``tests/select/test_certainty.py`` (and in
  ``benchmarks/RESULTS.md``).

What was checked against the authors' code (github.com/backprop07/Self-Certainty,
``src/confidence_list.py`` and ``src/voting_from_list.py``): the per-position formula
``-(1/V) * sum_j (log p_ij + log V)`` over the full logits dimension, the mean over output
tokens, the Borda weights ``(N - rank) ** power`` with rank 0 = most certain (stable sort on
ties) and the first-seen grouping of equal answers. One difference, on purpose: the reference
takes the logits at the output's own positions (the distributions *after* each output token,
including the one after the last and excluding the one that produced the first); here the
distribution each generated token was drawn from is used (the prompt's last position through
the output's second to last). Their numbers (AIME/MATH accuracies on Llama/Qwen) are not
reproducible here.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.validation import check_int, check_number

__all__ = [
    "DEFAULT_BORDA_POWER",
    "EXACT",
    "SCORE_NAME",
    "TOPK_APPROXIMATION",
    "RunCertainties",
    "borda_vote",
    "certainty_best_of_n",
    "exact_self_certainty",
    "pool_certainties",
    "score_certainties",
    "self_certainty",
    "self_certainty_topk",
]

#: The reference's default Borda power (``voting_from_list.py``).
DEFAULT_BORDA_POWER = 0.5
#: How a self-certainty was computed (named in every output that reports one).
EXACT = "exact (full next-token distributions)"
TOPK_APPROXIMATION = "top-k approximation (tail mass spread evenly over the unlisted tokens; a lower bound)"


def self_certainty(logprob_rows: NDArray[Any] | Sequence[Sequence[float]]) -> float:
    """Exact self-certainty from full log-prob rows, shape ``(tokens, V)`` (natural log,
    normalised per row): ``mean_i [-log V - mean_j log p_ij]`` in float64. An empty trace has
    none (NaN)."""
    a = np.asarray(logprob_rows, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError("self_certainty needs a (tokens, vocabulary) array of log-probs")
    if a.shape[0] == 0:
        return math.nan
    v = a.shape[1]
    return float(np.mean(-math.log(v) - a.mean(axis=1)))


def self_certainty_topk(top_logprobs: Sequence[Mapping[Any, float] | None], vocab_size: int) -> float:
    """Self-certainty from the top-k log-probs of each position (:data:`TOPK_APPROXIMATION`).

    ``top_logprobs``: per generated token, token -> log-prob of the top-k candidates (positions
    without any are skipped); ``vocab_size``: ``V``. A position whose listed mass is (numerically)
    all of it gives the unlisted tokens a tail of 1e-300, i.e. a very large KL, as the exact
    value would be for a near one-hot distribution."""
    check_int("vocab_size", vocab_size, min=2)
    vals: list[float] = []
    for top in top_logprobs:
        if not top:
            continue
        lps = np.fromiter((float(x) for x in top.values()), dtype=np.float64)
        k = lps.size
        if k > vocab_size:
            raise ConfigError(f"{k} top log-probs at one position but a vocabulary of {vocab_size}")
        total = float(np.sum(lps))
        rest = vocab_size - k
        if rest:
            tail = max(-math.expm1(float(np.logaddexp.reduce(lps))), 1e-300)
            total += rest * math.log(tail / rest)
        vals.append(-math.log(vocab_size) - total / vocab_size)
    return float(np.mean(vals)) if vals else math.nan


def exact_self_certainty(engine: Any, requests: Sequence[Any], token_ids: Sequence[Sequence[int]]) -> list[float]:
    """Exact self-certainty of each generated ``token_ids`` after its request's prompt, from a
    forward pass of the :class:`~ttscale.engines.hf.HFEngine` ``engine``'s model (raw logits,
    log-softmax in float64; the distribution that produced each token). One pass per trace."""
    from ttscale.engines.hf import HFEngine, _import_torch

    if not isinstance(engine, HFEngine):
        raise ConfigError(
            "exact self-certainty needs the whole next-token distribution: use the hf engine, or "
            "the top-k approximation (self_certainty_topk) on stored top log-probs"
        )
    if len(requests) != len(token_ids):
        raise ConfigError("exact_self_certainty needs one token list per request")
    torch = _import_torch()
    out: list[float] = []
    with torch.inference_mode():
        for req, toks in zip(requests, token_ids, strict=True):
            toks = [int(t) for t in toks]
            if not toks:
                out.append(math.nan)
                continue
            ctx = engine.prompt_token_ids(req)
            ids = torch.tensor([ctx + toks], dtype=torch.long, device=engine.device)
            logits = engine.model(input_ids=ids).logits[0]
            rows = logits[len(ctx) - 1 : len(ctx) - 1 + len(toks)].to(torch.float64)
            lp = torch.log_softmax(rows, dim=-1).cpu().numpy()
            out.append(self_certainty(lp))
    return out


def certainty_best_of_n(answers: Sequence[Hashable | None], certainties: Sequence[float]) -> tuple[Hashable | None, int]:
    """The answer of the most self-certain trace and its position (ties: the first; NaN never
    wins unless all are NaN, then the first trace)."""
    c = np.asarray(certainties, dtype=np.float64)
    if c.shape != (len(answers),) or not len(answers):
        raise ConfigError("certainty_best_of_n needs one certainty per answer (at least one)")
    c = np.where(np.isnan(c), -np.inf, c)
    i = int(np.argmax(c))
    return answers[i], i


def borda_vote(
    answers: Sequence[Hashable | None], certainties: Sequence[float], *, power: float = DEFAULT_BORDA_POWER
) -> tuple[Hashable | None, dict[Hashable, float]]:
    """Borda voting by self-certainty (see the module docstring): the chosen answer and every
    answer's votes. Traces without an answer take their rank but give no votes; a trace with NaN
    certainty ranks last."""
    check_number("power", power, low=0.0, finite=True)
    n = len(answers)
    c = np.asarray(certainties, dtype=np.float64)
    if c.shape != (n,):
        raise ConfigError("borda_vote needs one certainty per answer")
    # most certain first; equal certainties keep index order (a stable sort, as the reference)
    order = np.argsort(-np.where(np.isnan(c), -np.inf, c), kind="stable")
    weight = np.empty(n, dtype=np.float64)
    weight[order] = np.arange(n, 0, -1, dtype=np.float64) ** power
    votes: dict[Hashable, float] = {}
    for a, w in zip(answers, weight, strict=True):
        if a is not None:
            votes[a] = votes.get(a, 0.0) + float(w)
    if not votes:
        return None, votes
    best = max(votes.values())
    return next(a for a, v in votes.items() if v == best), votes


# -- the registry's rules (``curve --methods self_certainty,self_certainty_borda``) ---------------


def borda_weights(certainties: NDArray[Any] | Sequence[float], power: float = DEFAULT_BORDA_POWER) -> NDArray[np.float64]:
    """Each trace's Borda weight ``(N - r + 1) ** power``, rank ``r`` 1 = most certain (stable on
    ties; NaN ranks last)."""
    check_number("power", power, low=0.0, finite=True)
    c = np.asarray(certainties, dtype=np.float64)
    n = c.size
    order = np.argsort(-np.where(np.isnan(c), -np.inf, c), kind="stable")
    w = np.empty(n, dtype=np.float64)
    w[order] = np.arange(n, 0, -1, dtype=np.float64) ** power
    return w


def self_certainty_borda_labels(
    labels: Any, certainties: Any, *, power: float = DEFAULT_BORDA_POWER, n_clusters: int | None = None,
    tie: str = "expected", seed: Any = None,
) -> Any:
    """Borda vote by self-certainty over cluster ``labels`` (``-1`` = no answer): an
    :class:`~ttscale.select.aggregate.AggregateResult` named ``self_certainty_borda``."""
    from ttscale.select import aggregate as agg

    lab, n_cl = agg._as_labels(labels, n_clusters)
    c = np.asarray(certainties, dtype=np.float64)
    if c.shape != lab.shape:
        raise ConfigError("self_certainty_borda needs one certainty per sample")
    return agg._vote(
        lab, n_cl, borda_weights(c, power), lab >= 0, None, tie=tie, seed=seed,
        method="self_certainty_borda", options={"power": power},
    )  # fmt: skip


def self_certainty_borda(
    answers: Sequence[Hashable | None], certainties: Any, *, power: float = DEFAULT_BORDA_POWER,
    equivalence: Any = None, tie: str = "expected", seed: Any = None,
) -> Any:
    """:func:`self_certainty_borda_labels` over raw answers (``None`` = no answer)."""
    from ttscale.select import aggregate as agg

    cl = agg.cluster_answers(answers, equivalence)
    res = self_certainty_borda_labels(cl.labels, certainties, power=power, n_clusters=cl.n_clusters, tie=tie, seed=seed)
    return agg._with_answers(res, cl)


def self_certainty_best_labels(labels: Any, certainties: Any, **kw: Any) -> Any:
    """Best-of-N by self-certainty (``best_of_n_labels`` with the certainties as scores)."""
    import dataclasses

    from ttscale.select import aggregate as agg

    return dataclasses.replace(agg.best_of_n_labels(labels, certainties, **kw), method="self_certainty")


def self_certainty_best(answers: Sequence[Hashable | None], certainties: Any, **kw: Any) -> Any:
    """Best-of-N by self-certainty over raw answers."""
    import dataclasses

    from ttscale.select import aggregate as agg

    return dataclasses.replace(agg.best_of_n(answers, certainties, **kw), method="self_certainty")


def run_certainties(
    store: Any, vocab_size: int | None = None, *, engine: Any = None
) -> tuple[NDArray[np.float64], int]:
    """Per-sample self-certainty of a stored run (pool order) and the vocabulary size used.

    With ``engine`` (an :class:`~ttscale.engines.hf.HFEngine` on the run's model): exact, from a
    forward pass over each sample's prompt and stored ``token_ids`` (:func:`exact_self_certainty`;
    plain-prompt runs). Otherwise the top-k approximation (:data:`TOPK_APPROXIMATION`) from the
    stored top log-probs, with ``vocab_size``, else the ``vocab_size`` of the run's model's
    ``config.json`` when the model is a local folder; NaN for samples without top log-probs."""
    import json
    from pathlib import Path

    if engine is not None:
        return _run_certainties_exact(store, engine)

    if vocab_size is None:
        model = ((store.manifest.get("engine") or {}).get("model")) or store.manifest.get("model")
        cfg = Path(str(model)) / "config.json" if model else None
        try:
            vocab_size = int(json.loads(cfg.read_text(encoding="utf-8"))["vocab_size"]) if cfg else None
        except (OSError, ValueError, KeyError, TypeError):
            vocab_size = None
        if vocab_size is None:
            raise ConfigError(
                f"self-certainty needs the model's vocabulary size, and the run's model {model!r} "
                "is not a local folder with a config.json; pass vocab_size (Python API)"
            )
    t = store.table(["top_logprobs"])
    tops = t.column("top_logprobs").to_pylist()
    out = np.full(len(tops), np.nan)
    for i, x in enumerate(tops):
        if x:
            out[i] = self_certainty_topk([dict(p) for p in x], vocab_size)
    return out, vocab_size


def _run_certainties_exact(store: Any, engine: Any) -> tuple[NDArray[np.float64], int]:
    from ttscale.engines.base import GenerationRequest

    if store.manifest.get("chat"):
        raise ConfigError("exact self-certainty of a chat run is not supported; use the top-k approximation")
    prompts = {p.id: p.prompt for p in store.problems()}
    t = store.table(["token_ids"])
    pids = t.column("problem_id").to_pylist()
    ids = t.column("token_ids").to_pylist()
    if any(x is None for x in ids):
        raise ConfigError("exact self-certainty needs the stored token ids of every sample")
    reqs = [GenerationRequest(problem_id=str(pid), prompt=prompts[str(pid)]) for pid in pids]
    out = np.asarray(exact_self_certainty(engine, reqs, ids), dtype=np.float64)
    return out, int(engine.model.config.vocab_size)


# -- exact values stored per sample, and the one place that chooses exact or approximate ---------

#: The name under which exact self-certainty is stored: the score set ``ttscale certainty``
#: writes (``RUN/scores/self_certainty/``) and the per-sample score ``sample --self-certainty``
#: records on the hf engine (``Sample.scores["self_certainty"]``).
SCORE_NAME = "self_certainty"


@dataclass(frozen=True)
class RunCertainties:
    """Per-sample self-certainties of a pool (pool order) and where they came from.

    ``how``: :data:`EXACT` or :data:`TOPK_APPROXIMATION`; ``source``: one phrase naming the
    stored values used (a score set and its model, the values stored at sampling, or the stored
    top log-probs and the vocabulary size); ``why``: for the approximation, why no exact values
    were used (None when none were stored at all)."""

    values: NDArray[np.float64]
    how: str
    source: str
    vocab_size: int | None = None
    why: str | None = None

    @property
    def exact(self) -> bool:
        return self.how == EXACT

    def describe(self) -> str:
        """One line for the CLI's output (table notes, stderr)."""
        line = f"self-certainty: {'exact' if self.exact else 'top-k approximation'}, {self.source}"
        return line + (f" ({self.why})" if self.why else "")

    def to_dict(self) -> dict[str, Any]:
        return {"how": self.how, "exact": self.exact, "source": self.source,
                "vocab_size": self.vocab_size, "why": self.why}  # fmt: skip


def _pool_keys(pool: Any) -> list[tuple[str, int]]:
    counts = np.diff(np.asarray(pool.offsets))
    pids = np.repeat(np.asarray(pool.problem_ids, dtype=object), counts)
    return [(str(p), int(i)) for p, i in zip(pids.tolist(), np.asarray(pool.index).tolist(), strict=True)]


def pool_certainties(
    store: Any, pool: Any, *, vocab_size: int | None = None, name: str = SCORE_NAME
) -> RunCertainties:
    """Self-certainty of every sample of ``pool`` (a pool of ``store``), exact where stored.

    The exact values are used when every sample of the pool has one, from the score set
    ``name`` (``ttscale certainty``; preferred, it was asked for after sampling) or else from the
    values recorded at sampling (``sample --self-certainty`` on the hf engine). Otherwise the
    top-k approximation from the stored top log-probs (:func:`run_certainties`), with ``why``
    saying which exact values were incomplete. Never a mix of the two."""
    keys = _pool_keys(pool)
    why: list[str] = []
    if name in store.score_sets():
        t = store.score_table(name)
        got = dict(zip(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True),
                       t.column("score").to_pylist(), strict=True))  # fmt: skip
        missing = sum(k not in got for k in keys)
        cfg = (store.score_set_record(name) or {}).get("config") or {}
        if not missing:
            vals = np.array([np.nan if got[k] is None else got[k] for k in keys], dtype=np.float64)
            src = f"score set {name!r} ({cfg.get('how', 'how not recorded')}, model {cfg.get('model')})"
            return RunCertainties(vals, EXACT, src, cfg.get("vocab_size"))
        why.append(f"score set {name!r} lacks {missing} of {len(keys)} samples: complete it with "
                   f"`ttscale certainty {store.path} --model PATH`")  # fmt: skip
    if name in getattr(pool, "scores", {}) or _sampled_exact(store):
        t = store.table(["scores"])
        got = {}
        for pid, idx, sc in zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(),
                                t.column("scores").to_pylist(), strict=True):  # fmt: skip
            v = dict(sc or ()).get(name)
            if v is not None:
                got[(pid, idx)] = v
        missing = sum(k not in got for k in keys)
        if got and not missing:
            vals = np.array([got[k] for k in keys], dtype=np.float64)
            eng = (store.manifest.get("engine") or {}).get("engine", "hf")
            return RunCertainties(vals, EXACT, f"stored at sampling ({eng} engine, the run's model)")
        if got or _sampled_exact(store):
            why.append(f"{missing} of {len(keys)} samples have no value stored at sampling")
    tops = store.table(["top_logprobs"]).column("top_logprobs")
    if tops.null_count == len(tops):
        # nothing to approximate from: NaN values, which the prerequisite check names
        src = "no exact values and no stored top log-probs"
        return RunCertainties(np.full(len(keys), np.nan), TOPK_APPROXIMATION, src, None, "; ".join(why) or None)
    approx, vocab = run_certainties(store, vocab_size)
    by_key = dict(zip(_store_keys(store), approx.tolist(), strict=True))
    vals = np.array([by_key.get(k, np.nan) for k in keys], dtype=np.float64)
    src = f"from the stored top log-probs, vocabulary {vocab}"
    return RunCertainties(vals, TOPK_APPROXIMATION, src, vocab, "; ".join(why) or None)


def _sampled_exact(store: Any) -> bool:
    return bool((store.manifest.get("engine") or {}).get("self_certainty"))


def _store_keys(store: Any) -> list[tuple[str, int]]:
    t = store.table(["index"])
    return list(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True))


def _check_tokenizer(store: Any, engine: Any, samples: Sequence[Any]) -> None:
    """Refuse a scoring model whose tokenizer is not the one that made the run's token ids:
    the run's model's vocabulary (when it is a local folder) must equal the scoring model's, and
    the scoring tokenizer must decode each sample's ids to its stored text (a prefix of it where
    a stop string cut the text; whitespace ignored, as detokenisers differ in it)."""
    from pathlib import Path

    fix = "score with the run's model (or one sharing its tokenizer): --model PATH"
    run_model = store.manifest.get("model") or (store.manifest.get("engine") or {}).get("model")
    folder = Path(str(run_model)) if run_model else None
    if folder is not None and folder.is_dir() and folder.resolve() != Path(str(engine.model_name)).resolve():
        try:
            from transformers import AutoTokenizer

            theirs = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
        except Exception:
            theirs = None
        if theirs is not None and theirs != engine.tokenizer.get_vocab():
            raise ConfigError(
                f"the tokenizer of {engine.model_name} is not the run's ({run_model}): its token ids "
                f"mean other tokens; {fix}"
            )
    vocab = int(engine.model.config.vocab_size)
    for s in samples:
        toks = list(s.token_ids or ())
        if any(not 0 <= t < vocab for t in toks):
            raise ConfigError(
                f"sample ({s.problem_id}, {s.index}) has token ids outside the vocabulary of "
                f"{engine.model_name} ({vocab}); {fix}"
            )
        want = "".join(s.text.split())
        got = "".join(engine.decode(toks).split())
        if want and not got.startswith(want):
            raise ConfigError(
                f"the tokenizer of {engine.model_name} decodes sample ({s.problem_id}, {s.index}) "
                f"to other text than the run stored ({got[:30]!r} vs {want[:30]!r}); {fix}"
            )


def score_certainties(
    store: Any, engine: Any, *, name: str = SCORE_NAME, force: bool = False, chunk: int = 64,
    progress: Any = None,
) -> dict[str, Any]:
    """Exact self-certainty of every stored sample of ``store`` from a scoring pass on the
    :class:`~ttscale.engines.hf.HFEngine` ``engine`` (:func:`exact_self_certainty`, one forward
    pass per trace), stored as score set ``name`` (``RUN/scores/<name>/``).

    Resumable: samples the set already holds (same configuration) are skipped, and each
    ``chunk`` of samples is written as one shard atomically, so a killed pass loses at most the
    chunk in flight and never duplicates a value. The set's record says how and with which
    model. Refused: another engine, a chat run, samples without token ids, a model whose
    tokenizer is not the run's (:func:`_check_tokenizer`), or a set made by another
    configuration unless ``force`` (the old one is moved aside). Returns a summary dict."""
    from pathlib import Path

    from ttscale.engines.base import GenerationRequest
    from ttscale.engines.hf import HFEngine

    check_int("chunk", chunk, min=1)
    if not isinstance(engine, HFEngine):
        raise ConfigError("exact self-certainty needs the whole next-token distribution: score with the hf engine")
    if store.manifest.get("chat"):
        raise ConfigError("exact self-certainty of a chat run is not supported yet; curve uses the top-k approximation")
    from ttscale.runkinds import run_kind

    kind = run_kind(store.manifest)
    if kind in ("smc", "search"):
        # each row's token_ids are one step's own tokens after its parent's text, not a trace
        raise ConfigError(f"exact self-certainty of a {kind} run is not supported: its rows are steps, not traces")
    samples = list(store.samples())
    if any(s.token_ids is None for s in samples):
        raise ConfigError("exact self-certainty needs the stored token ids of every sample (this run has none)")
    _check_tokenizer(store, engine, samples)
    config = {
        "kind": "self_certainty", "how": EXACT, "model": str(Path(str(engine.model_name)).resolve())
        if Path(str(engine.model_name)).exists() else str(engine.model_name),
        "dtype": str(engine.dtype), "vocab_size": int(engine.model.config.vocab_size),
        "positions": "the distribution each generated token was drawn from",
    }  # fmt: skip
    status = store.claim_score_set(name, config, replace=force)
    fp = (store.score_set_record(name) or {}).get("fingerprint")
    done = store.scored_keys(name) if status == "same" else set()
    todo = [s for s in samples if (s.problem_id, s.index) not in done]
    prompts = {p.id: p.prompt for p in store.problems()}
    written = 0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        reqs = [GenerationRequest(problem_id=s.problem_id, prompt=prompts[s.problem_id]) for s in part]
        vals = exact_self_certainty(engine, reqs, [s.token_ids for s in part])
        written += store.add_scores(
            name, [(s.problem_id, s.index, v, {"tokens": len(s.token_ids or ())}) for s, v in zip(part, vals, strict=True)],
            fingerprint=fp,
        )  # fmt: skip
        if progress is not None:
            progress(written, len(todo))
    return {"set": name, "status": status, "samples": len(samples), "already": len(samples) - len(todo),
            "scored": written, "config": config}  # fmt: skip
