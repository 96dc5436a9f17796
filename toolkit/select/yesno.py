"""Yes/no scoring from next-token log-probabilities (LLM judges, rerankers; docs/algorithms.md 9.2).

``P(yes) = softmax([z_no, z_yes])[1] = sigmoid(z_yes − z_no)``: the probability of "yes" restricted
to the two answer tokens. Full-vocabulary log-probs give the same value, because the log-partition
cancels in the difference. The raw ``exp(lp_yes)`` is a different score (not restricted to the two
tokens) and is exposed separately.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["raw_yes_probability", "yes_probability"]


def yes_probability(
    lp_yes: ArrayLike, lp_no: ArrayLike, *, fallback: float = float("nan")
) -> NDArray[np.float64]:
    """``sigmoid(lp_yes − lp_no)``, elementwise over broadcastable inputs (logits or log-probs).

    A token absent from the returned top-k has log-prob ``−inf``: only "no" missing gives 1, only
    "yes" missing gives 0, both missing is undefined and gives ``fallback`` (NaN by default, so
    callers can count them). Returns a float64 array (0-d for scalar inputs).
    """
    y = np.asarray(lp_yes, dtype=np.float64)
    n = np.asarray(lp_no, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = y - n  # ±inf when one side is missing; NaN when both are
        e = np.exp(-np.abs(d))
        # stable logistic on both sides of 0; at d = ±inf, e = 0 gives exactly 1 or 0
        p = np.where(d >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    undefined = np.isneginf(y) & np.isneginf(n)
    return np.where(undefined | np.isnan(d), fallback, p)


def raw_yes_probability(lp_yes: ArrayLike) -> NDArray[np.float64]:
    """``exp(lp_yes)``: the full-vocabulary probability of the "yes" token (0 if absent)."""
    return np.exp(np.asarray(lp_yes, dtype=np.float64))
