"""Scaling laws for repeated sampling, and the limits imperfect verifiers put on them.

* Coverage power law (Brown et al. 2024, ALGORITHMS.md 1.2): ``c(k) = exp(a·k^b)``, fitted by
  log-log OLS or by non-linear least squares on ``log c``, with problem-bootstrap intervals.
* Imperfect verifiers (Stroebl et al. 2024, ALGORITHMS.md 7): resample until a verifier with
  completeness ``c`` and soundness ``s`` accepts; utilities, the accuracy ceiling ``A_∞`` and the
  optimal budget ``K*`` for one or several task types, and the empirical reward-at-k estimator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike
from ttscale.validation import check_choice, check_int, check_number, choices

__all__ = [
    "PowerLawBootstrap",
    "PowerLawFit",
    "VerifierRates",
    "accuracy_ceiling",
    "bootstrap_power_law",
    "empirical_reward_at_k",
    "fit_power_law",
    "optimal_k",
    "single_type_utility",
    "two_type_utility",
    "verifier_rates",
]

logger = logging.getLogger(__name__)

FitMethod = Literal["loglog", "nls"]


# ---------------------------------------------------------------------------------------------
# Coverage curves and the exponentiated power law


def _per_problem_pass_at_k(
    n: NDArray[np.int64], c: NDArray[np.int64], ks: NDArray[np.int64]
) -> NDArray[np.float64]:
    """Unbiased pass@k per problem and budget, shape ``(problems, len(ks))`` (every k <= n)."""
    from ttscale.metrics import pass_at_k

    return pass_at_k(n[:, None], c[:, None], ks[None, :])


def _as_counts(n: ArrayLike, c: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    na = np.asarray(n)
    ca = np.asarray(c)
    na, ca = np.broadcast_arrays(na, ca)
    if na.ndim != 1 or na.size == 0:
        raise ConfigError("n and c must be 1-d per-problem counts with at least one problem")
    if np.any(na != np.round(na)) or np.any(ca != np.round(ca)):
        raise ConfigError("n and c must be integer counts")
    na = na.astype(np.int64)
    ca = ca.astype(np.int64)
    if np.any(na < 1) or np.any(ca < 0) or np.any(ca > na):
        raise ConfigError("per-problem counts need n >= 1 and 0 <= c <= n")
    return na, ca


def _as_ks(ks: ArrayLike) -> NDArray[np.int64]:
    k = np.atleast_1d(np.asarray(ks))
    if k.ndim != 1 or k.size == 0 or np.any(k != np.round(k)) or np.any(k < 1):
        raise ConfigError(f"ks must be a non-empty list of integers >= 1, got {ks!r}")
    return k.astype(np.int64)


@dataclass(frozen=True)
class PowerLawFit:
    """Fitted ``c(k) = exp(a·k^b)`` (``a < 0``; ``b < 0`` when coverage grows with ``k``).

    ``ks``/``coverage`` are the points actually used (``0 < c < 1``).
    """

    a: float
    b: float
    method: FitMethod
    ks: NDArray[np.float64] = field(repr=False)
    coverage: NDArray[np.float64] = field(repr=False)

    @property
    def n_points(self) -> int:
        return int(self.ks.size)

    def predict(self, k: ArrayLike) -> NDArray[np.float64]:
        """Predicted coverage ``exp(a·k^b)`` at ``k`` (any ``k > 0``, extrapolation included)."""
        kk = np.asarray(k, dtype=np.float64)
        if np.any(kk <= 0):
            raise ConfigError("k must be > 0 to predict coverage")
        return np.exp(self.a * kk**self.b)

    def samples_needed(self, target: float) -> float:
        """Budget ``k`` (continuous; round up for a sample count) with predicted coverage ``target``.

        Solves ``exp(a·k^b) = X``: ``k = (log X / a)^(1/b)``. A result below 1 means one sample
        already reaches ``target`` under the fit. Raises ``ConfigError`` when the fitted curve
        never reaches ``target`` (``a ≥ 0`` or ``b = 0``) or ``target`` is not in ``(0, 1)``.
        """
        check_number("target", target, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.a >= 0.0 or self.b == 0.0:
            raise ConfigError(
                f"the fitted curve exp({self.a:.4g}·k^{self.b:.4g}) never reaches coverage {target}"
            )
        log_k = math.log(math.log(target) / self.a) / self.b
        if log_k > math.log(np.finfo(np.float64).max):
            raise ConfigError(
                f"the fitted curve exp({self.a:.4g}·k^{self.b:.4g}) reaches coverage {target} "
                "only beyond 1e308 samples"
            )
        return math.exp(log_k)


def _usable_points(
    ks: ArrayLike, coverage: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    k = np.asarray(ks, dtype=np.float64).ravel()
    cov = np.asarray(coverage, dtype=np.float64).ravel()
    if k.shape != cov.shape:
        raise ConfigError(f"ks and coverage must have the same length, got {k.size} and {cov.size}")
    if np.any(~np.isfinite(k)) or np.any(k <= 0):
        raise ConfigError("ks must be finite and > 0")
    keep = np.isfinite(cov) & (cov > 0.0) & (cov < 1.0)
    k, cov = k[keep], cov[keep]
    if np.unique(k).size < 2:
        raise ConfigError(
            "a power-law fit needs coverage strictly between 0 and 1 at >= 2 distinct k, "
            f"got {np.unique(k).size}; use more samples or smaller k"
        )
    return k, cov


def fit_power_law(
    ks: ArrayLike,
    coverage: ArrayLike,
    method: FitMethod = "loglog",
    *,
    p0: tuple[float, float] = (-1.0, -0.5),
) -> PowerLawFit:
    """Fit ``c(k) = exp(a·k^b)`` to a coverage curve.

    ``method="loglog"`` (default): OLS of ``log(−log c) = log(−a) + b·log k``.
    ``method="nls"``: least squares ``min Σ (log c_k − a·k^b)²`` (``scipy.optimize.curve_fit``
    from ``p0``). Points with ``c ≤ 0``, ``c ≥ 1`` or NaN are dropped; at least two distinct
    ``k`` must remain. Use log-spaced ``k`` so the fit is not dominated by large budgets.
    """
    check_choice("method", method, choices(FitMethod))
    k, cov = _usable_points(ks, coverage)
    if method == "loglog":
        x = np.log(k)
        y = np.log(-np.log(cov))
        slope, intercept = np.polyfit(x, y, 1)
        return PowerLawFit(-math.exp(float(intercept)), float(slope), "loglog", k, cov)
    # method == "nls"
    from scipy.optimize import curve_fit

    def model(kk: NDArray[np.float64], a: float, b: float) -> NDArray[np.float64]:
        return a * kk**b

    try:
        popt, _ = curve_fit(model, k, np.log(cov), p0=p0, maxfev=10000)
    except RuntimeError as e:
        raise ConfigError(
            f"the NLS power-law fit did not converge ({e}); try method='loglog'"
        ) from e
    return PowerLawFit(float(popt[0]), float(popt[1]), "nls", k, cov)


@dataclass(frozen=True)
class PowerLawBootstrap:
    """Problem-bootstrap intervals for a power-law fit.

    ``fit``: the fit on all problems. ``a_samples``/``b_samples``: parameters of the replicates
    whose fit succeeded (``n_failed`` did not, e.g. every coverage point was 0 or 1).
    """

    fit: PowerLawFit
    a_low: float
    a_high: float
    b_low: float
    b_high: float
    a_samples: NDArray[np.float64] = field(repr=False)
    b_samples: NDArray[np.float64] = field(repr=False)
    confidence: float
    n_failed: int

    def predict_interval(self, k: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Pointwise percentile band ``(low, high)`` of the predicted coverage at ``k`` (extrapolation)."""
        kk = np.atleast_1d(np.asarray(k, dtype=np.float64))
        curves = np.exp(self.a_samples[:, None] * kk[None, :] ** self.b_samples[:, None])
        alpha = (1.0 - self.confidence) / 2.0
        lo, hi = np.quantile(curves, [alpha, 1.0 - alpha], axis=0)
        return lo, hi


def bootstrap_power_law(
    n: ArrayLike,
    c: ArrayLike,
    ks: ArrayLike,
    *,
    method: FitMethod = "loglog",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: SeedLike = None,
) -> PowerLawBootstrap:
    """Fit the coverage power law and bootstrap ``(a, b)`` over problems.

    ``n``/``c``: samples drawn and correct per problem (shape ``(problems,)``); ``ks``: the
    budgets (each ``≤ min(n)``). Each replicate resamples problems with replacement, recomputes
    the coverage curve with the unbiased pass@k estimator, and refits.
    """
    from ttscale.metrics.stats import _check_confidence, bootstrap_counts

    _check_confidence(confidence)
    na, ca = _as_counts(n, c)
    k = _as_ks(ks)
    if k.max() > na.min():
        raise ConfigError(
            f"k={int(k.max())} exceeds the smallest per-problem sample count {int(na.min())}"
        )
    per_problem = _per_problem_pass_at_k(na, ca, k)  # (problems, K)
    fit = fit_power_law(k, per_problem.mean(axis=0), method)
    counts = bootstrap_counts(na.size, n_boot, seed).astype(np.float64)
    curves = counts @ per_problem / na.size  # (n_boot, K)
    a_s: list[float] = []
    b_s: list[float] = []
    failed = 0
    for row in curves:
        try:
            f = fit_power_law(k, row, method)
        except ConfigError:
            failed += 1
            continue
        a_s.append(f.a)
        b_s.append(f.b)
    if not a_s:
        raise ConfigError(
            "no bootstrap replicate could be fitted; coverage is 0 or 1 at almost every k"
        )
    if failed:
        logger.info("power-law bootstrap: %d of %d replicates could not be fitted", failed, n_boot)
    a_arr = np.asarray(a_s)
    b_arr = np.asarray(b_s)
    alpha = (1.0 - confidence) / 2.0
    a_lo, a_hi = np.quantile(a_arr, [alpha, 1.0 - alpha])
    b_lo, b_hi = np.quantile(b_arr, [alpha, 1.0 - alpha])
    return PowerLawBootstrap(
        fit=fit,
        a_low=float(a_lo),
        a_high=float(a_hi),
        b_low=float(b_lo),
        b_high=float(b_hi),
        a_samples=a_arr,
        b_samples=b_arr,
        confidence=confidence,
        n_failed=failed,
    )


# ---------------------------------------------------------------------------------------------
# Imperfect verifiers (Stroebl, Kapoor, Narayanan 2024)


def _check_prob(name: str, x: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64)
    if np.any(~np.isfinite(arr)) or np.any(arr < 0.0) or np.any(arr > 1.0):
        raise ConfigError(f"{name} must be a probability in [0, 1], got {x!r}")
    return arr


def _attempt_terms(
    r: ArrayLike, c: ArrayLike, s: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per-attempt ``(p_correct, p_fp, β)`` = ``(c·r, (1−r)(1−s), (1−c)·r + s·(1−r))``."""
    rr = _check_prob("r", r)
    cc = _check_prob("completeness c", c)
    ss = _check_prob("soundness s", s)
    return cc * rr, (1.0 - rr) * (1.0 - ss), (1.0 - cc) * rr + ss * (1.0 - rr)


def _as_budgets(K: ArrayLike) -> NDArray[np.float64]:
    kk = np.asarray(K, dtype=np.float64)
    if np.any(np.isnan(kk)) or np.any(kk < 0):
        raise ConfigError(f"K must be >= 0 (np.inf allowed), got {K!r}")
    return kk


def single_type_utility(
    K: ArrayLike, r: float, c: float, s: float, v_fp: float, *, v_correct: float = 1.0
) -> NDArray[np.float64]:
    """Expected utility of resampling up to ``K`` attempts until the verifier accepts (one task type).

    ``U(K) = (1 − β^K)/(1 − β) · (V_correct·c·r + V_fp·(1−r)(1−s))``, ``β = (1−c)r + s(1−r)``;
    ``K`` may be an array and may be ``np.inf``. Abstaining (never accepting) is worth 0.
    """
    pc, pfp, beta = _attempt_terms(r, c, s)
    kk = _as_budgets(K)
    with np.errstate(invalid="ignore", divide="ignore"):
        geo = np.where(
            beta < 1.0,
            np.where(np.isinf(kk), 1.0 / (1.0 - beta), -np.expm1(kk * np.log(beta)) / (1.0 - beta)),
            kk,  # β = 1: the verifier never accepts; each attempt adds 0 anyway
        )
    per = v_correct * pc + v_fp * pfp
    return np.where(per == 0.0, 0.0, geo * per)


def accuracy_ceiling(r: ArrayLike, c: ArrayLike, s: ArrayLike) -> NDArray[np.float64]:
    """``A_∞ = c·r / (1 − β) = c·r / (c·r + (1−r)(1−s))``: accuracy of accepted answers, any budget.

    NaN where the verifier never accepts (``c·r + (1−r)(1−s) = 0``).
    """
    pc, pfp, _ = _attempt_terms(r, c, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pc + pfp > 0, pc / (pc + pfp), np.nan)


def two_type_utility(
    K: int,
    r: Sequence[float] | ArrayLike = (0.87, 0.13),
    priors: Sequence[float] | ArrayLike = (0.58, 0.42),
    c: float | ArrayLike = 1.0,
    s: float | ArrayLike = 0.75,
    v_fp: float = -1.0,
    *,
    v_correct: float = 1.0,
    mode: Literal["exact", "notebook"] = "exact",
) -> NDArray[np.float64]:
    """Cumulative utilities ``U(1..K)`` for a mixture of task types, shape ``(K,)``.

    Types ``j`` (any number; two in the paper) have prior ``p_j`` and success rate ``r_j``;
    ``c``/``s`` may be per type. With ``β_j`` the per-attempt rejection probability:

    * ``mode="exact"``: ``EV_k = Σ_j p_j β_j^{k−1} (V_c·p_correct_j + V_fp·p_fp_j)``;
    * ``mode="notebook"`` (reference notebook, for parity): with posteriors after ``k−1``
      rejections ``π_j(k) ∝ β_j^{k−1} p_j``,
      ``EV_k = (Σ_j π_j p_correct_j·V_c + V_fp Σ_j π_j p_fp_j) · Σ_j β_j^{k−1} π_j``.

    ``U(K) = Σ_{k ≤ K} EV_k``. Defaults are the notebook's.
    """
    check_int("K", K, min=1)
    check_choice("mode", mode, ("exact", "notebook"))
    pri = np.asarray(priors, dtype=np.float64).ravel()
    if np.any(pri < 0) or not math.isclose(float(pri.sum()), 1.0, rel_tol=0, abs_tol=1e-9):
        raise ConfigError(f"priors must be >= 0 and sum to 1, got {priors!r}")
    rr = np.asarray(r, dtype=np.float64).ravel()
    if rr.shape != pri.shape:
        raise ConfigError(
            f"r and priors must have one entry per task type, got {rr.size} and {pri.size}"
        )
    pc, pfp, beta = (np.broadcast_to(t, pri.shape) for t in _attempt_terms(rr, c, s))
    ks = np.arange(K, dtype=np.float64)
    # log-space powers so β = 0 gives β^0 = 1 and β^{k>0} = 0 without warnings
    with np.errstate(divide="ignore"):
        logb = np.log(beta)
    powk = np.exp(np.where(ks[:, None] == 0, 0.0, ks[:, None] * logb[None, :]))  # (K, J): β_j^{k−1}
    gain = v_correct * pc + v_fp * pfp
    if mode == "exact":
        ev = (powk * pri * gain).sum(axis=1)
    else:  # notebook
        joint = powk * pri
        z = joint.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            post = np.where(z > 0, joint / z, 0.0)
        ev = (post * gain).sum(axis=1) * (post * powk).sum(axis=1)
    return np.cumsum(ev)


def optimal_k(utilities: ArrayLike, ks: ArrayLike | None = None) -> int:
    """``K* = argmax_K U(K)`` (first maximum), or ``0`` (abstain) when ``max U < 0``.

    ``utilities[i]`` is ``U(ks[i])``; ``ks`` defaults to ``1..len(utilities)``.
    """
    u = np.asarray(utilities, dtype=np.float64).ravel()
    if u.size == 0 or np.all(np.isnan(u)):
        raise ConfigError("optimal_k needs at least one finite utility")
    kk = np.arange(1, u.size + 1) if ks is None else np.asarray(ks).ravel()
    if kk.shape != u.shape:
        raise ConfigError(f"ks and utilities must have the same length, got {kk.size} and {u.size}")
    i = int(np.nanargmax(u))
    return 0 if u[i] < 0 else int(kk[i])


def empirical_reward_at_k(
    n: ArrayLike,
    m_tp: ArrayLike,
    m_fp: ArrayLike,
    ks: ArrayLike,
    cost_ratio: float = 0.0,
) -> NDArray[np.float64]:
    """Expected reward of "take the first verifier-accepted sample within ``k``", averaged over tasks.

    Per task with ``n`` samples, ``m_tp`` accepted-and-correct and ``m_fp`` accepted-but-wrong
    (``m = m_tp + m_fp``): ``E[reward@k] = (1 − C(n−m, k)/C(n, k)) · (m_tp − C/B·m_fp) / m``,
    with ``k`` capped at ``n`` and ``0`` when ``m = 0`` (the closed form of the reference
    notebook's permutation simulation). Returns shape ``(len(ks),)``; pass it to
    :func:`optimal_k` with ``ks`` for ``K*``.
    """
    nn = np.atleast_1d(np.asarray(n))
    tp = np.atleast_1d(np.asarray(m_tp))
    fp = np.atleast_1d(np.asarray(m_fp))
    nn, tp, fp = np.broadcast_arrays(nn, tp, fp)
    if np.any(tp < 0) or np.any(fp < 0):
        raise ConfigError("m_tp and m_fp must be >= 0")
    na, ma = _as_counts(nn, tp + fp)
    k = _as_ks(ks)
    check_number("cost_ratio", cost_ratio, low=0.0)
    kmat = np.minimum(k[None, :], na[:, None])  # (tasks, K) capped budgets
    from scipy.special import gammaln

    f = (na - ma)[:, None].astype(np.float64)
    n2 = na[:, None].astype(np.float64)
    solved = f < kmat
    sk = np.where(solved, 0.0, kmat)
    lr = gammaln(f + 1) - gammaln(f - sk + 1) - gammaln(n2 + 1) + gammaln(n2 - sk + 1)
    p_any = np.where(solved, 1.0, -np.expm1(lr))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(ma > 0, (tp - cost_ratio * fp) / np.maximum(ma, 1), 0.0)
    return (p_any * value[:, None]).mean(axis=0)


@dataclass(frozen=True)
class VerifierRates:
    """Confusion of a weak verifier against ground truth (e.g. base tests vs EvalPlus tests).

    ``completeness = P(accept | correct) = tp/(tp+fn)``; ``soundness = P(reject | incorrect) =
    tn/(tn+fp)``; ``false_positive_rate = 1 − soundness``; ``false_negative_rate = 1 −
    completeness``; ``precision = P(correct | accept)``. NaN where a denominator is 0.
    """

    tp: int
    fp: int
    fn: int
    tn: int

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    @property
    def completeness(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def soundness(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def false_positive_rate(self) -> float:
        return self._ratio(self.fp, self.fp + self.tn)

    @property
    def false_negative_rate(self) -> float:
        return self._ratio(self.fn, self.fn + self.tp)

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)


def verifier_rates(weak_pass: ArrayLike, strong_pass: ArrayLike) -> VerifierRates:
    """Count verifier outcomes over samples: ``weak_pass`` (the verifier) vs ``strong_pass`` (truth).

    Both are boolean arrays of the same shape (any shape; all samples are pooled).
    """
    w = np.asarray(weak_pass)
    t = np.asarray(strong_pass)
    if w.shape != t.shape:
        raise ConfigError(
            f"weak_pass and strong_pass must have the same shape, got {w.shape} and {t.shape}"
        )
    w = w.astype(bool)
    t = t.astype(bool)
    return VerifierRates(
        tp=int(np.sum(w & t)),
        fp=int(np.sum(w & ~t)),
        fn=int(np.sum(~w & t)),
        tn=int(np.sum(~w & ~t)),
    )
