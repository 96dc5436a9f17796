"""Reward-model ensembles: z-normalisation, aggregators, best-of-N (docs/algorithms.md 8)."""

from __future__ import annotations

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.select.ensemble import (
    aggregate_ensemble,
    argmax_first,
    ensemble_best_of_n,
    znormalize,
)

R = np.array([[1.2, 0.4, 2.5, 0.9], [1.0, 0.6, -0.8, 1.1], [1.4, 0.5, 2.2, 0.7]])

TABLE = [
    ("mean", 1.0, [1.2, 0.5, 1.3, 0.9], 2),
    ("median", 1.0, [1.2, 0.5, 2.2, 0.9], 2),
    ("min", 1.0, [1.0, 0.4, -0.8, 0.7], 0),
    ("mean_minus_std", 1.0, [1.036701, 0.418350, -0.189966, 0.736701], 0),
    ("mean_minus_std", 0.5, [1.118350, 0.459175, 0.555017, 0.818350], 0),
    ("mean_minus_var", 0.5, [1.186667, 0.496667, 0.190000, 0.886667], 0),
]


@pytest.mark.parametrize(("method", "lam", "values", "pick"), TABLE)
def test_aggregator_table(method: str, lam: float, values: list[float], pick: int) -> None:
    got = aggregate_ensemble(R, method, lam=lam)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, values, atol=1e-6)
    assert ensemble_best_of_n(R, method, lam=lam, normalize=False) == pick  # type: ignore[arg-type]


def test_single_member_reduces_to_its_scores() -> None:
    row = R[0]
    for method in ("mean", "median", "min", "mean_minus_std", "mean_minus_var"):
        np.testing.assert_allclose(aggregate_ensemble(row, method), row)  # type: ignore[arg-type]


def test_two_members_median_is_mean() -> None:
    np.testing.assert_allclose(
        aggregate_ensemble(R[:2], "median"), aggregate_ensemble(R[:2], "mean")
    )


def test_znormalize_population_std_and_reference() -> None:
    raw = np.array([[1.0, 2.0, 3.0], [100.0, 300.0, 250.0]])
    z = znormalize(raw)
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1), 1.0)  # ddof = 0
    np.testing.assert_allclose(z[0], [-1.224745, 0.0, 1.224745], atol=1e-6)
    ref = np.array([[0.0, 4.0], [0.0, 400.0]])  # mean 2 / 200, std 2 / 200
    np.testing.assert_allclose(znormalize(raw, ref), [[-0.5, 0.0, 0.5], [-0.5, 0.5, 0.25]])
    # Without normalisation the large-scale member dominates the mean.
    assert ensemble_best_of_n(raw, "mean", normalize=False) == 1
    assert ensemble_best_of_n(raw, "mean", normalize=True) == 2


def test_constant_member_is_only_centred() -> None:
    z = znormalize([[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(z[0], 0.0)


def test_argmax_first_ties_and_nan() -> None:
    assert argmax_first([0.3, 0.7, 0.7]) == 1
    assert argmax_first([np.nan, 0.1, 0.1]) == 1
    with pytest.raises(ConfigError):
        argmax_first([np.nan])
    with pytest.raises(ConfigError):
        argmax_first([])


def test_permutation_equivariance() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((4, 9))
    perm = rng.permutation(9)
    for method in ("mean", "median", "min", "mean_minus_std", "mean_minus_var"):
        a = aggregate_ensemble(znormalize(s), method)  # type: ignore[arg-type]
        b = aggregate_ensemble(znormalize(s[:, perm]), method)  # type: ignore[arg-type]
        np.testing.assert_allclose(a[perm], b, rtol=1e-12)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError):
        aggregate_ensemble(R, "max")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        znormalize(R, np.ones((2, 5)))
    with pytest.raises(ConfigError):
        aggregate_ensemble(np.ones((2, 2, 2)))
