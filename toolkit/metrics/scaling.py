"""Scaling laws for repeated sampling, and the limits imperfect verifiers put on them.

* Coverage power law (Brown et al. 2024, docs/algorithms.md 1.2): ``c(k) = exp(a·k^b)``, fitted by
  log-log OLS or by non-linear least squares on ``log c``, with problem-bootstrap intervals.
* Imperfect verifiers (Stroebl et al. 2024, docs/algorithms.md 7): resample until a verifier with
  completeness ``c`` and soundness ``s`` accepts; utilities, the accuracy ceiling ``A_∞`` and the
  optimal budget ``K*`` for one or several task types, and the empirical reward-at-k estimator.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ttscale.errors import ConfigError
from ttscale.seeding import SeedLike
from ttscale.validation import check_choice, check_int, check_number, choices

__all__ = [
    "FitComparison",
    "PowerLawBootstrap",
    "PowerLawFit",
    "TwoTypeFit",
    "VerifierRates",
    "accuracy_ceiling",
    "bootstrap_power_law",
    "compare_fit_methods",
    "empirical_reward_at_k",
    "empirical_reward_per_task",
    "false_negative_tasks",
    "fit_two_type",
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

    @property
    def residuals(self) -> NDArray[np.float64]:
        """Observed minus fitted coverage at the fitted points (coverage scale, not log)."""
        return self.coverage - self.predict(self.ks)

    @property
    def rmse(self) -> float:
        """Root-mean-square error of the fitted coverage at the fitted points."""
        return float(np.sqrt(np.mean(self.residuals**2)))

    @property
    def max_abs_error(self) -> float:
        """Largest absolute coverage error at the fitted points."""
        return float(np.max(np.abs(self.residuals)))

    @property
    def r2(self) -> float:
        """``R² = 1 − Σ residual² / Σ (c − mean c)²`` on the coverage scale (NaN if c is constant)."""
        ss_tot = float(np.sum((self.coverage - self.coverage.mean()) ** 2))
        if ss_tot == 0.0:
            return math.nan
        return 1.0 - float(np.sum(self.residuals**2)) / ss_tot

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
    from scipy.optimize import OptimizeWarning, curve_fit

    def model(kk: NDArray[np.float64], a: float, b: float) -> NDArray[np.float64]:
        return a * kk**b

    try:
        with warnings.catch_warnings():
            # the covariance is unused; with exactly two points it cannot be estimated
            warnings.simplefilter("ignore", OptimizeWarning)
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

    def samples_needed_interval(self, target: float) -> tuple[float, float, float]:
        """Bootstrap interval of the budget that reaches coverage ``target``: ``(low, high, never)``.

        Each replicate's budget is ``(log X / a)^(1/b)``; a replicate whose curve never reaches
        ``target`` (``a ≥ 0`` or ``b ≥ 0``) counts as ``inf`` and ``never`` is their fraction.
        ``low``/``high`` are the ``(1 ∓ confidence)/2`` order statistics (``numpy`` methods
        ``"lower"``/``"higher"``: the outer neighbours, so an infinite bound means the interval
        really reaches replicates that never get there).
        """
        if not (0.0 < target < 1.0):
            raise ConfigError(f"target coverage must be in (0, 1), got {target}")
        a, b = self.a_samples, self.b_samples
        ok = (a < 0.0) & (b < 0.0)
        safe_a, safe_b = np.where(ok, a, -1.0), np.where(ok, b, -1.0)
        with np.errstate(over="ignore"):
            vals = np.where(ok, np.exp(np.log(math.log(target) / safe_a) / safe_b), np.inf)
        alpha = (1.0 - self.confidence) / 2.0
        lo = float(np.quantile(vals, alpha, method="lower"))
        hi = float(np.quantile(vals, 1.0 - alpha, method="higher"))
        return lo, hi, float((~ok).mean())


@dataclass(frozen=True)
class FitComparison:
    """The two power-law fits of one coverage curve side by side, and which to trust.

    ``fits`` holds ``"loglog"`` and ``"nls"`` (a fit that failed is absent, its error in
    ``failed``). ``max_gap`` is the largest ``|c_loglog(k) − c_nls(k)|`` over the observed ``k``
    and the budgets asked about, reached at ``gap_k``. ``holdout_error[m]``: fitting method ``m``
    on every point but the largest ``k``, the absolute error of its prediction there (the
    nearest thing to an extrapolation test the data allow; NaN with fewer than 3 points).
    ``samples_needed[m]``: each fit's budget for the target (``inf`` if never reached).
    ``disagree`` when ``max_gap > gap_tol`` or the budgets differ by more than ``ratio_tol``x;
    ``recommended`` is the fit with the smaller hold-out error (else the smaller RMSE), ``reason``
    says why in words.
    """

    fits: dict[str, PowerLawFit]
    failed: dict[str, str]
    max_gap: float
    gap_k: float
    holdout_error: dict[str, float]
    samples_needed: dict[str, float]
    disagree: bool
    recommended: str
    reason: str

    def to_dict(self) -> dict[str, object]:
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "disagree": self.disagree,
            "recommended": self.recommended,
            "reason": self.reason,
            "max_coverage_gap": num(self.max_gap),
            "gap_at_k": num(self.gap_k),
            "fits": {
                m: {
                    "a": f.a,
                    "b": f.b,
                    "r2": num(f.r2),
                    "rmse": f.rmse,
                    "holdout_error": num(self.holdout_error.get(m, math.nan)),
                    **({"samples_needed": num(self.samples_needed[m])} if m in self.samples_needed else {}),
                }
                for m, f in self.fits.items()
            },
            "failed": dict(self.failed),
        }


def compare_fit_methods(
    ks: ArrayLike,
    coverage: ArrayLike,
    *,
    at: ArrayLike = (),
    target: float | None = None,
    gap_tol: float = 0.02,
    ratio_tol: float = 1.25,
) -> FitComparison:
    """Fit ``c(k) = exp(a·k^b)`` by both methods (:func:`fit_power_law`) and compare them.

    ``at``: further budgets the user asks about (extrapolation), included in the gap; ``target``:
    a coverage whose budget each fit predicts. See :class:`FitComparison` for the verdict rule.
    """
    k, cov = _usable_points(ks, coverage)
    fits: dict[str, PowerLawFit] = {}
    failed: dict[str, str] = {}
    for m in ("loglog", "nls"):
        try:
            fits[m] = fit_power_law(k, cov, m)  # type: ignore[arg-type]
        except ConfigError as e:
            failed[m] = str(e)
    if not fits:
        raise ConfigError(f"neither power-law fit succeeded: {failed}")
    needed: dict[str, float] = {}
    if target is not None:
        for m, f in fits.items():
            try:
                needed[m] = f.samples_needed(target)
            except ConfigError:
                needed[m] = math.inf
    grid = np.unique(np.concatenate([k, np.atleast_1d(np.asarray(at, dtype=np.float64)),
                                     [v for v in needed.values() if math.isfinite(v) and v > 0]]))
    max_gap, gap_k = 0.0, math.nan
    if len(fits) == 2:
        gaps = np.abs(fits["loglog"].predict(grid) - fits["nls"].predict(grid))
        i = int(np.argmax(gaps))
        max_gap, gap_k = float(gaps[i]), float(grid[i])
    held: dict[str, float] = {}
    last = k == k.max()
    for m in fits:
        try:
            f = fit_power_law(k[~last], cov[~last], m)  # type: ignore[arg-type]
            held[m] = float(np.max(np.abs(f.predict(k[last]) - cov[last])))
        except ConfigError:
            held[m] = math.nan
    ratio = 1.0
    if len(needed) == 2:
        lo_n, hi_n = sorted(needed.values())
        ratio = math.inf if not math.isfinite(hi_n) or lo_n <= 0 else hi_n / lo_n
    disagree = len(fits) == 2 and (max_gap > gap_tol or ratio > ratio_tol)
    if len(fits) == 1:
        (rec,) = fits
        other = "nls" if rec == "loglog" else "loglog"
        reason = f"{other} failed ({failed[other]})"
    elif all(math.isfinite(held[m]) for m in fits):
        rec = min(fits, key=lambda m: (held[m], m != "loglog"))
        other = "nls" if rec == "loglog" else "loglog"
        reason = (
            f"refitted without its largest k ({k.max():g}), {rec} predicts the coverage there "
            f"within {held[rec]:.4f} ({other}: {held[other]:.4f})"
        )
    else:
        rec = min(fits, key=lambda m: (fits[m].rmse, m != "loglog"))
        other = "nls" if rec == "loglog" else "loglog"
        reason = (
            f"{rec} fits the observed coverage better (RMSE {fits[rec].rmse:.4f} vs "
            f"{fits[other].rmse:.4f}); too few points to test either on a held-out k"
        )
    return FitComparison(fits, failed, max_gap, gap_k, held, needed, disagree, rec, reason)


def bootstrap_power_law(
    n: ArrayLike,
    c: ArrayLike,
    ks: ArrayLike,
    *,
    method: FitMethod = "loglog",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: SeedLike = None,
    progress: Callable[[int, int], None] | None = None,
) -> PowerLawBootstrap:
    """Fit the coverage power law and bootstrap ``(a, b)`` over problems.

    ``n``/``c``: samples drawn and correct per problem (shape ``(problems,)``); ``ks``: the
    budgets (each ``≤ min(n)``). Each replicate resamples problems with replacement, recomputes
    the coverage curve with the unbiased pass@k estimator, and refits. ``progress(done,
    n_boot)``, if given, is called as the replicates are fitted (about 100 times in all).
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
    every = max(1, n_boot // 100)
    for i, row in enumerate(curves):
        if progress is not None and i % every == 0:
            progress(i, n_boot)
        try:
            f = fit_power_law(k, row, method)
        except ConfigError:
            failed += 1
            continue
        a_s.append(f.a)
        b_s.append(f.b)
    if progress is not None:
        progress(n_boot, n_boot)
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
    with np.errstate(divide="ignore", invalid="ignore"):
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


EmptyTasks = Literal["error", "zero", "drop"]


def _reward_counts(
    n: ArrayLike, m_tp: ArrayLike, m_fp: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    nn = np.atleast_1d(np.asarray(n))
    tp = np.atleast_1d(np.asarray(m_tp))
    fp = np.atleast_1d(np.asarray(m_fp))
    nn, tp, fp = np.broadcast_arrays(nn, tp, fp)
    if nn.ndim != 1 or nn.size == 0:
        raise ConfigError("n, m_tp and m_fp must be 1-d per-task counts with at least one task")
    for name, a in (("n", nn), ("m_tp", tp), ("m_fp", fp)):
        if np.any(a != np.round(a)) or np.any(a < 0):
            raise ConfigError(f"{name} must be integer counts >= 0")
    nn, tp, fp = (a.astype(np.int64) for a in (nn, tp, fp))
    if np.any(tp + fp > nn):
        raise ConfigError("per-task counts need m_tp + m_fp <= n")
    return nn, tp, fp


def empirical_reward_per_task(
    n: ArrayLike,
    m_tp: ArrayLike,
    m_fp: ArrayLike,
    ks: ArrayLike,
    cost_ratio: float = 0.0,
) -> NDArray[np.float64]:
    """Per-task expected reward@k, shape ``(tasks, len(ks))`` (see :func:`empirical_reward_at_k`).

    A task with ``n = 0`` samples gets reward 0 at every ``k`` (nothing to accept: it abstains).
    """
    na, tp, fp = _reward_counts(n, m_tp, m_fp)
    ma = tp + fp
    k = _as_ks(ks)
    check_number("cost_ratio", cost_ratio, low=0.0)
    # each task's budget is capped at its own n: past n it has no new sample to draw, so its
    # reward stays flat (never cut every task's curve at the smallest n)
    kmat = np.minimum(k[None, :], na[:, None])  # (tasks, K)
    from scipy.special import gammaln

    f = (na - ma)[:, None].astype(np.float64)
    n2 = na[:, None].astype(np.float64)
    solved = f < kmat  # fewer rejected samples than draws: an accepted one is always among them
    sk = np.where(solved, 0.0, kmat)
    # C(n−m, k)/C(n, k) in log space
    lr = gammaln(f + 1) - gammaln(f - sk + 1) - gammaln(n2 + 1) + gammaln(n2 - sk + 1)
    p_any = np.where(solved, 1.0, -np.expm1(lr))
    value = np.where(ma > 0, (tp - cost_ratio * fp) / np.maximum(ma, 1), 0.0)
    return np.where(ma[:, None] > 0, p_any * value[:, None], 0.0)


def empirical_reward_at_k(
    n: ArrayLike,
    m_tp: ArrayLike,
    m_fp: ArrayLike,
    ks: ArrayLike,
    cost_ratio: float = 0.0,
    *,
    empty: EmptyTasks = "error",
) -> NDArray[np.float64]:
    """Expected reward of "take the first verifier-accepted sample within ``k``", averaged over tasks.

    Per task with ``n`` samples, ``m_tp`` accepted-and-correct and ``m_fp`` accepted-but-wrong
    (``m = m_tp + m_fp``): ``E[reward@k] = (1 − C(n−m, k)/C(n, k)) · (m_tp − C/B·m_fp) / m``,
    with ``k`` capped at the task's own ``n`` (its reward stays flat past ``n``) and ``0`` when
    ``m = 0``: the closed form of the reference notebook's permutation simulation. Returns shape
    ``(len(ks),)``; pass it to :func:`optimal_k` with ``ks`` for ``K*``. The reference averages
    1000 random orders of each task's samples, truncated to the first 200 (``max_samples``);
    for ``k ≤ 200`` that is this expectation plus Monte-Carlo noise, which the closed form avoids.

    ``empty`` says what a task with ``n = 0`` samples means: ``"error"`` (default) raises,
    ``"zero"`` counts it as reward 0 at every ``k`` (what the reference simulation does: no
    sample is ever accepted, "no_solution"), ``"drop"`` leaves it out of the average.
    """
    na, tp, fp = _reward_counts(n, m_tp, m_fp)
    if empty not in ("error", "zero", "drop"):
        raise ConfigError(f"empty must be 'error', 'zero' or 'drop', got {empty!r}")
    per_task = empirical_reward_per_task(na, tp, fp, ks, cost_ratio)
    zero = na == 0
    if zero.any():
        if empty == "error":
            idx = np.flatnonzero(zero).tolist()
            raise ConfigError(
                f"{len(idx)} task(s) have no samples (positions {idx[:10]}); pass empty='drop' "
                "to leave them out or empty='zero' to count them as reward 0"
            )
        if empty == "drop":
            if zero.all():
                raise ConfigError("every task has zero samples; nothing to average")
            per_task = per_task[~zero]
    return per_task.mean(axis=0)


def false_negative_tasks(weak_pass: ArrayLike, strong_pass: ArrayLike) -> NDArray[np.bool_]:
    """Tasks whose weak verifier visibly rejects correct programs, shape ``(tasks,)``.

    ``weak_pass``/``strong_pass``: per task, the number (or rate) of samples that pass the weak
    and the strong verifier. A task is flagged when the strong pass rate exceeds the weak one,
    the reference notebook's rule (``pass_plus_rate > pass_base_rate``): the two-type model
    assumes a weak verifier without false negatives (``c = 1``), so the paper drops such tasks
    before computing curves. The reference takes the union of flagged tasks over all its models
    (14 HumanEval tasks); on one run this flags that run's tasks only.
    """
    w = np.atleast_1d(np.asarray(weak_pass, dtype=np.float64))
    s = np.atleast_1d(np.asarray(strong_pass, dtype=np.float64))
    if w.shape != s.shape or w.ndim != 1:
        raise ConfigError(
            f"weak_pass and strong_pass must be 1-d per-task arrays of one length, got {w.shape} "
            f"and {s.shape}"
        )
    return s > w


TwoTypeEstimator = Literal["paper", "pooled"]


@dataclass(frozen=True)
class TwoTypeFit:
    """Parameters of the two-type model estimated from per-task weak/strong verifier counts.

    ``r = (r_easy, r_hard)`` (NaN for a type with no task), ``priors = (p_easy, p_hard)``,
    ``completeness``/``soundness`` of the weak verifier, the ``threshold`` on a task's strong
    pass rate that separates easy (``> threshold``) from hard tasks, and ``notes`` on anything
    the estimator had to decide (an empty type, a clipped soundness).
    """

    estimator: str
    r: tuple[float, float]
    priors: tuple[float, float]
    completeness: float
    soundness: float
    threshold: float
    n_tasks: int
    notes: tuple[str, ...] = ()

    def utility(
        self,
        K: int,
        v_fp: float,
        *,
        v_correct: float = 1.0,
        mode: Literal["exact", "notebook"] = "exact",
    ) -> NDArray[np.float64]:
        """``U(1..K)`` of the fitted model (:func:`two_type_utility`; empty types left out)."""
        keep = [j for j in range(2) if self.priors[j] > 0]
        return two_type_utility(
            K,
            r=[self.r[j] for j in keep],
            priors=[self.priors[j] for j in keep],
            c=self.completeness,
            s=self.soundness,
            v_fp=v_fp,
            v_correct=v_correct,
            mode=mode,
        )

    def to_dict(self) -> dict[str, object]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "estimator": self.estimator,
            "r_easy": num(self.r[0]),
            "r_hard": num(self.r[1]),
            "p_easy": self.priors[0],
            "p_hard": self.priors[1],
            "completeness": self.completeness,
            "soundness": self.soundness,
            "threshold": self.threshold,
            "n_tasks": self.n_tasks,
            "notes": list(self.notes),
        }


def fit_two_type(
    n: ArrayLike,
    weak: ArrayLike,
    strong: ArrayLike,
    both: ArrayLike,
    *,
    estimator: TwoTypeEstimator = "paper",
    threshold: float = 0.5,
) -> TwoTypeFit:
    """Estimate the two-type model (docs/algorithms.md 7.2) from per-task verifier counts.

    Per task ``i``: ``n_i`` samples, of which ``weak_i`` pass the weak verifier (the one that
    decides when to stop resampling), ``strong_i`` pass the strong one (the truth) and ``both_i``
    pass both. Tasks are split by their strong pass rate ``P_i = strong_i/n_i``: easy when
    ``P_i > threshold`` (0.5 in the paper), hard otherwise; ``p_easy`` is the fraction of easy
    tasks under both estimators.

    ``estimator="paper"`` (the reference ``visualizations.ipynb``): ``r_j`` = mean of ``P_i``
    over the tasks of type ``j``; completeness assumed 1 (unit tests accept correct code);
    with ``B_i = weak_i/n_i`` and ``G_i = both_i/weak_i`` (tasks with ``weak_i > 0``),
    ``s = (1 − mean B − mean P + mean G · mean B) / (1 − mean P)``: the probability of a
    rejected wrong sample with ``P(weak ∧ strong)`` approximated by a product of task means.

    ``estimator="pooled"`` (ttscale): every ratio from counts pooled over samples, so tasks
    weigh by their sample count and the joint is counted, not approximated: ``r_j = Σ strong /
    Σ n`` over type ``j``, ``c = Σ both / Σ strong`` (estimated, not assumed),
    ``s = Σ (n − weak − strong + both) / Σ (n − strong)``. With equal ``n`` per task the ``r_j``
    agree with the paper's; ``s`` differs whenever pass rates vary across tasks.

    Drop false-negative tasks first (:func:`false_negative_tasks`) to match the paper.
    """
    na = np.atleast_1d(np.asarray(n))
    arrs = [np.atleast_1d(np.asarray(x)) for x in (weak, strong, both)]
    if any(a.shape != na.shape for a in arrs) or na.ndim != 1 or na.size == 0:
        raise ConfigError("n, weak, strong and both must be 1-d per-task counts of one length")
    for a in (na, *arrs):
        if np.any(a != np.round(a)) or np.any(a < 0):
            raise ConfigError("per-task counts must be integers >= 0")
    na = na.astype(np.float64)
    w, st, b = (a.astype(np.float64) for a in arrs)
    if np.any(na < 1):
        raise ConfigError("every task needs n >= 1 sample to fit the two-type model; drop empty tasks")
    if np.any(b > np.minimum(w, st)) or np.any(np.maximum(w, st) > na):
        raise ConfigError("per-task counts need both <= weak, strong <= n")
    if not (0.0 <= threshold < 1.0):
        raise ConfigError(f"threshold must be in [0, 1), got {threshold}")
    if estimator not in ("paper", "pooled"):
        raise ConfigError(f"estimator must be 'paper' or 'pooled', got {estimator!r}")
    P = st / na
    easy = P > threshold
    groups = (easy, ~easy)
    priors = (float(easy.mean()), float((~easy).mean()))
    notes: list[str] = []
    for name, g in zip(("easy", "hard"), groups, strict=True):
        if not g.any():
            notes.append(f"no {name} task (strong pass rate {'>' if name == 'easy' else '<='} "
                         f"{threshold:g}): r_{name} undefined, p_{name} = 0")
    if estimator == "paper":
        r = tuple(float(P[g].mean()) if g.any() else math.nan for g in groups)
        c = 1.0
        B = w / na
        denom = 1.0 - float(P.mean())
        has = w > 0
        gb = float((b[has] / w[has]).mean()) * float(B.mean()) if has.any() else 0.0
        num = 1.0 - float(B.mean()) - float(P.mean()) + gb
    else:
        r = tuple(float(st[g].sum() / na[g].sum()) if g.any() else math.nan for g in groups)
        tot_strong = float(st.sum())
        if tot_strong > 0:
            c = float(b.sum()) / tot_strong
        else:
            c = 1.0
            notes.append("no sample passes the strong verifier: completeness undefined, set to 1")
        denom = float((na - st).sum()) / float(na.sum())
        num = float((na - w - st + b).sum()) / float(na.sum())
    if denom <= 0.0:
        raise ConfigError(
            "soundness is undefined: every sample passes the strong verifier (no wrong sample)"
        )
    s = num / denom
    if s < 0.0 or s > 1.0:
        notes.append(f"soundness estimate {s:.6g} clipped to [0, 1]")
        s = min(max(s, 0.0), 1.0)
    return TwoTypeFit(
        estimator=estimator,
        r=(float(r[0]), float(r[1])),
        priors=priors,
        completeness=c,
        soundness=s,
        threshold=threshold,
        n_tasks=int(na.size),
        notes=tuple(notes),
    )


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
