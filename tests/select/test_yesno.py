"""Yes/no probability from next-token log-probs (docs/algorithms.md 9.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttscale.select.yesno import raw_yes_probability, yes_probability


def test_vectors() -> None:
    assert float(yes_probability(2.0, 0.5)) == pytest.approx(0.8175744762, abs=1e-10)
    assert float(yes_probability(-0.25, -1.60)) == pytest.approx(0.7941296282, abs=1e-10)
    assert float(raw_yes_probability(-0.25)) == pytest.approx(0.7788007831, abs=1e-10)


def test_logits_and_logprobs_agree() -> None:
    z_yes, z_no, log_z = 2.0, 0.5, 7.3  # log-partition cancels
    assert float(yes_probability(z_yes - log_z, z_no - log_z)) == pytest.approx(
        float(yes_probability(z_yes, z_no)), rel=1e-14
    )


def test_missing_tokens() -> None:
    got = yes_probability([-0.1, -np.inf, -np.inf], [-np.inf, -0.1, -np.inf])
    assert got[0] == 1.0
    assert got[1] == 0.0
    assert math.isnan(got[2])
    assert float(yes_probability(-np.inf, -np.inf, fallback=0.5)) == 0.5
    assert float(raw_yes_probability(-np.inf)) == 0.0


def test_extreme_differences_are_stable() -> None:
    p = yes_probability([800.0, -800.0], [0.0, 0.0])
    np.testing.assert_array_equal(p, [1.0, 0.0])
    assert float(yes_probability(-40.0, 0.0)) == pytest.approx(math.exp(-40.0), rel=1e-12)
