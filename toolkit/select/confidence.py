"""DeepConf confidence measures over token log-probabilities (Fu et al. 2025; docs/algorithms.md section 4).

Token confidence ``C_i = −(1/k)·Σ_j log P_i(j)`` over the top-``k`` log-probabilities returned at
position ``i`` (higher = more peaked = more confident). Trace-level measures average ``C`` over
sliding windows ("groups"), the tail, or the whole trace. All values are float64, natural logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.validation import check_int

__all__ = [
    "DEFAULT_WINDOW",
    "bottom_percent_group_confidence",
    "deepconf_threshold",
    "group_confidences",
    "lowest_group_confidence",
    "mean_confidence",
    "tail_confidence",
    "token_confidence",
]

DEFAULT_WINDOW = 2048  # DeepConf window_size and tail length


def _position_values(entry: Any) -> list[float] | None:
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        vals = list(entry.values())
    else:
        vals = list(entry)
    if not vals:
        return None
    # vLLM Logprob objects carry .logprob; plain floats are used as they are.
    return [float(getattr(v, "logprob", v)) for v in vals]


def token_confidence(
    top_logprobs: Iterable[Mapping[Any, Any] | Sequence[float] | None] | NDArray[np.floating],
    *,
    round_to: int | None = None,
) -> NDArray[np.float64]:
    """Per-position token confidence ``C_i = −mean(top-k log-probs at i)``; shape ``(positions,)``.

    ``top_logprobs`` is one entry per generated position: a mapping token -> log-prob (as in
    ``Completion.top_logprobs``; vLLM ``Logprob`` objects are accepted), a sequence of log-probs,
    or a 2-d array ``(positions, k)``. Every value given for a position is averaged (vLLM may add the
    sampled token as a ``k+1``-th entry). Empty or ``None`` positions are skipped, as in the
    reference. ``round_to=3`` reproduces the reference code's rounding; by default values are
    not rounded.
    """
    if isinstance(top_logprobs, np.ndarray):
        arr = np.asarray(top_logprobs, dtype=np.float64)
        if arr.ndim != 2:
            raise ConfigError(
                f"top_logprobs array must be 2-d (positions, k), got shape {arr.shape}"
            )
        # A position with k = 0 values has nothing to average: skipped, like an empty dict.
        conf = -arr.mean(axis=1) if arr.shape[1] else np.zeros(0, dtype=np.float64)
    else:
        out = []
        for entry in top_logprobs:
            vals = _position_values(entry)
            if vals is not None:
                out.append(-float(np.mean(vals)))
        conf = np.asarray(out, dtype=np.float64)
    if round_to is not None:
        conf = np.round(conf, round_to)
    return conf


def _as_conf(conf: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(conf, dtype=np.float64)
    if arr.ndim != 1:
        raise ConfigError(f"token confidences must be a 1-d array, got shape {arr.shape}")
    return arr


def _check_window(window: int) -> None:
    check_int("window", window, min=1)


def _sliding_means(c: NDArray[np.float64], window: int) -> NDArray[np.float64]:
    # Window sums from one cumulative sum: O(n) instead of O(n·w).
    cs = np.concatenate(([0.0], np.cumsum(c)))
    return (cs[window:] - cs[:-window]) / window


def group_confidences(
    conf: ArrayLike, window: int = DEFAULT_WINDOW, *, round_to: int | None = None
) -> NDArray[np.float64]:
    """Sliding-window means ``C_G`` of token confidences, stride 1, shape ``(n − window + 1,)``.

    If ``n < window`` the result is ``[mean(conf)]`` (never rounded, as in the reference); if
    ``conf`` is empty it is ``[0.0]``. ``round_to=3`` rounds full windows like the reference.
    """
    _check_window(window)
    c = _as_conf(conf)
    if c.size == 0:
        return np.zeros(1, dtype=np.float64)
    if c.size < window:
        return np.asarray([c.mean()], dtype=np.float64)
    means = _sliding_means(c, window)
    return np.round(means, round_to) if round_to is not None else means


def lowest_group_confidence(
    conf: ArrayLike, window: int = DEFAULT_WINDOW, *, round_to: int | None = None
) -> float:
    """``C_least = min_i C_{G_i}`` (DeepConf ``min_conf``); ``0.0`` for an empty trace."""
    return float(np.min(group_confidences(conf, window, round_to=round_to)))


def bottom_percent_group_confidence(
    conf: ArrayLike, window: int = DEFAULT_WINDOW, percent: float = 0.1
) -> float:
    """Mean of the ``max(1, int(percent·#windows))`` smallest window means (unrounded).

    ``percent`` is a fraction in ``(0, 1]`` (DeepConf's ``η_g = 10%`` is ``0.1``). A trace shorter
    than ``window`` gives ``mean(conf)``; an empty trace gives ``0.0``.
    """
    _check_window(window)
    if not (0.0 < percent <= 1.0):
        raise ConfigError(f"percent must be a fraction in (0, 1], got {percent}")
    c = _as_conf(conf)
    if c.size == 0:
        return 0.0
    if c.size < window:
        return float(c.mean())
    means = _sliding_means(c, window)
    count = max(1, int(percent * means.size))
    if count == 1:
        return float(means.min())
    return float(np.partition(means, count - 1)[:count].mean())


def tail_confidence(conf: ArrayLike, tail: int = DEFAULT_WINDOW) -> float:
    """Mean of the last ``tail`` token confidences (all of them if fewer); ``0.0`` if empty."""
    _check_window(tail)
    c = _as_conf(conf)
    return float(c[-tail:].mean()) if c.size else 0.0


def mean_confidence(conf: ArrayLike) -> float:
    """Average trace confidence ``C_avg = mean_i C_i``; ``0.0`` if empty."""
    c = _as_conf(conf)
    return float(c.mean()) if c.size else 0.0


def deepconf_threshold(warmup_min_confs: ArrayLike, eta: float) -> float:
    """Online stopping threshold ``s = Percentile_{100 − η}(warm-up C_least)`` (linear interpolation).

    ``eta`` is the percentage of traces to keep, in ``(0, 100)``: ``eta=10`` is DeepConf-low (90th
    percentile), ``eta=90`` DeepConf-high (10th percentile). A trace stops once a group confidence
    falls strictly below ``s``; a finished trace is kept iff its ``C_least ≥ s``.
    """
    vals = _as_conf(warmup_min_confs)
    if vals.size == 0:
        raise ConfigError("deepconf_threshold needs at least one warm-up confidence, got none")
    if not np.all(np.isfinite(vals)):
        raise ConfigError("warm-up confidences must be finite")
    if not (0.0 < eta < 100.0):
        raise ConfigError(f"eta must be a percentage in (0, 100) (10 = DeepConf-low), got {eta}")
    return float(np.percentile(vals, 100.0 - eta))
