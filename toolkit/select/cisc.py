"""Confidence-informed self-consistency (CISC; Taubenfeld et al., 2025, arXiv 2502.06233).

A weighted majority vote over one question's sampled traces, each trace weighted by the softmax
of the model's own confidences over the question's traces at temperature ``T``:
``w_i = exp(c_i / T) / sum_j exp(c_j / T)``, answer ``argmax_a sum_i w_i 1{a_i = a}``. Two of
the paper's confidence extractions are offered:

* **response probability** (``curve --methods cisc``): the length-normalised sequence
  probability ``c_i = exp(mean token log-prob)`` of the trace (:func:`sequence_confidence`);
* **P(True)** (``curve --methods cisc_score --score NAME``): any per-trace score, e.g. the
  yes/no judge's ``P(yes)`` (``ttscale verify --verifier judge:...``; :mod:`ttscale.select.yesno`)
  asking the model whether its own answer is right.

The per-question normalisation does not change which answer wins, so the vote is the existing
weighted vote with ``exp`` score mapping at temperature ``T`` (:func:`cisc_weights` is the
normalised form). ``T`` matters: small ``T`` approaches best-of-N by confidence, large ``T``
plain self-consistency. What was checked: the formula against the paper's abstract and
summaries of it (softmax over the question's confidences with a temperature). Not checked: the paper tunes ``T``
per model and confidence method on held-out questions and its tuned values were not available
here, so the default ``T = 1.0`` is ours (``--cisc-temperature`` sets it); the paper's P(True)
prompt wording was not available either (the judge's prompt is a setting).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ttscale.errors import ConfigError
from ttscale.validation import check_number

__all__ = [
    "DEFAULT_CISC_TEMPERATURE",
    "cisc_vote",
    "cisc_vote_labels",
    "cisc_weights",
    "sequence_confidence",
]

#: Our default softmax temperature (the paper tunes it per model and method; see the module).
DEFAULT_CISC_TEMPERATURE = 1.0


def sequence_confidence(mean_logprobs: Any) -> NDArray[np.float64]:
    """Length-normalised response probability ``exp(mean token log-prob)`` (float64)."""
    return np.exp(np.asarray(mean_logprobs, dtype=np.float64))


def cisc_weights(confidences: Any, temperature: float = DEFAULT_CISC_TEMPERATURE) -> NDArray[np.float64]:
    """``softmax(c / T)`` over the traces (log-space, float64; NaN confidences get weight 0)."""
    check_number("temperature", temperature, low=0.0, low_open=True, finite=True)
    c = np.asarray(confidences, dtype=np.float64)
    z = np.where(np.isnan(c), -np.inf, c / temperature)
    if not np.isfinite(z).any():
        raise ConfigError("CISC needs at least one finite confidence")
    z = z - z[np.isfinite(z)].max()
    w = np.exp(z)
    return w / w.sum()


def cisc_vote_labels(
    labels: Any, confidences: Any, *, temperature: float = DEFAULT_CISC_TEMPERATURE,
    n_clusters: int | None = None, tie: str = "expected", seed: Any = None,
) -> Any:
    """CISC over cluster ``labels`` (``-1`` = no answer): an
    :class:`~ttscale.select.aggregate.AggregateResult` named ``cisc`` whose ``confidence`` is
    each answer's share of the softmax weight of the answered traces."""
    from ttscale.select import aggregate as agg

    lab, n_cl = agg._as_labels(labels, n_clusters)
    c = np.asarray(confidences, dtype=np.float64)
    if c.shape != lab.shape:
        raise ConfigError("CISC needs one confidence per sample")
    answered = lab >= 0
    if answered.any() and not np.isfinite(c[answered]).all():
        raise ConfigError("CISC needs a finite confidence for every answered sample")
    w = np.zeros(lab.size)
    if answered.any():
        w[answered] = cisc_weights(c[answered], temperature)
    return agg._vote(
        lab, n_cl, w, answered, None, tie=tie, seed=seed, method="cisc",
        options={"temperature": temperature},
    )  # fmt: skip


def cisc_vote(
    answers: Sequence[Hashable | None], confidences: Any, *, temperature: float = DEFAULT_CISC_TEMPERATURE,
    equivalence: Any = None, tie: str = "expected", seed: Any = None,
) -> Any:
    """:func:`cisc_vote_labels` over raw answers (``None`` = no answer)."""
    from ttscale.select import aggregate as agg

    cl = agg.cluster_answers(answers, equivalence)
    res = cisc_vote_labels(cl.labels, confidences, temperature=temperature, n_clusters=cl.n_clusters, tie=tie, seed=seed)
    return agg._with_answers(res, cl)


def cisc_sequence_vote(answers: Sequence[Hashable | None], mean_logprobs: Any, **kw: Any) -> Any:
    """CISC with the response-probability confidence (``exp`` of each trace's mean log-prob)."""
    return cisc_vote(answers, sequence_confidence(mean_logprobs), **kw)


def cisc_sequence_vote_labels(labels: Any, mean_logprobs: Any, **kw: Any) -> Any:
    """:func:`cisc_sequence_vote` over cluster labels."""
    return cisc_vote_labels(labels, sequence_confidence(mean_logprobs), **kw)


def cisc_score_vote(answers: Sequence[Hashable | None], scores: Any, **kw: Any) -> Any:
    """CISC with a score (e.g. the judge's P(True)) as the confidence; named ``cisc_score``."""
    import dataclasses

    return dataclasses.replace(cisc_vote(answers, scores, **kw), method="cisc_score")


def cisc_score_vote_labels(labels: Any, scores: Any, **kw: Any) -> Any:
    """:func:`cisc_score_vote` over cluster labels."""
    import dataclasses

    return dataclasses.replace(cisc_vote_labels(labels, scores, **kw), method="cisc_score")
