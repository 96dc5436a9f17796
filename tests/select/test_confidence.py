"""DeepConf confidence measures (docs/algorithms.md 4.1, 4.3, 4.4)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.select.confidence import (
    bottom_percent_group_confidence,
    deepconf_threshold,
    group_confidences,
    lowest_group_confidence,
    mean_confidence,
    tail_confidence,
    token_confidence,
)

TOP3 = [
    [-0.01, -5.2, -6.0],
    [-0.3, -1.5, -3.0],
    [-1.2, -1.3, -1.4],
    [-0.05, -4.0, -5.5],
    [-0.7, -0.9, -2.5],
    [-0.02, -6.0, -7.1],
]
CONF = [3.737, 1.6, 1.3, 3.183, 1.367, 4.373]


def test_token_confidence_rounded_matches_reference() -> None:
    np.testing.assert_array_equal(token_confidence(TOP3, round_to=3), CONF)


def test_token_confidence_input_forms_agree() -> None:
    as_dicts = [{i: v for i, v in enumerate(row)} for row in TOP3]
    as_objects = [{i: SimpleNamespace(logprob=v) for i, v in enumerate(row)} for row in TOP3]
    exact = -np.mean(TOP3, axis=1)
    np.testing.assert_allclose(token_confidence(as_dicts), exact, rtol=1e-15)
    np.testing.assert_allclose(token_confidence(as_objects), exact, rtol=1e-15)
    np.testing.assert_allclose(token_confidence(np.array(TOP3)), exact, rtol=1e-15)
    assert token_confidence(TOP3)[0] == pytest.approx(3.7366666667)  # unrounded by default


def test_token_confidence_skips_empty_positions() -> None:
    got = token_confidence([{1: -0.5}, None, {}, {2: -1.0, 3: -2.0}])
    np.testing.assert_allclose(got, [0.5, 1.5])
    assert token_confidence([]).shape == (0,)


def test_group_measures_of_worked_example() -> None:
    np.testing.assert_allclose(
        group_confidences(CONF, 3), [2.212333, 2.027667, 1.95, 2.974333], atol=1e-6
    )
    np.testing.assert_array_equal(
        group_confidences(CONF, 3, round_to=3), [2.212, 2.028, 1.95, 2.974]
    )
    assert lowest_group_confidence(CONF, 3) == pytest.approx(1.95)
    assert bottom_percent_group_confidence(CONF, 3, percent=0.5) == pytest.approx(1.9888333333)
    assert tail_confidence(CONF, 2) == pytest.approx(2.87)
    assert mean_confidence(CONF) == pytest.approx(2.5933333333)


def test_sliding_windows_equal_naive_loop() -> None:
    rng = np.random.default_rng(0)
    c = rng.gamma(2.0, 1.0, size=500)
    for w in (1, 7, 64, 500):
        naive = [c[i : i + w].mean() for i in range(len(c) - w + 1)]
        np.testing.assert_allclose(group_confidences(c, w), naive, rtol=1e-10)
        count = max(1, int(0.1 * len(naive)))
        want = np.sort(naive)[:count].mean()
        assert bottom_percent_group_confidence(c, w) == pytest.approx(want, rel=1e-10)


def test_short_and_empty_traces() -> None:
    assert group_confidences([1.0, 2.0], 3).tolist() == [1.5]
    assert lowest_group_confidence([1.0, 2.0], 3) == 1.5
    assert bottom_percent_group_confidence([1.0, 2.0], 3) == 1.5
    assert tail_confidence([1.0, 2.0], 5) == 1.5
    assert group_confidences([], 3).tolist() == [0.0]
    assert lowest_group_confidence([]) == 0.0
    assert bottom_percent_group_confidence([]) == 0.0
    assert tail_confidence([]) == 0.0
    assert mean_confidence([]) == 0.0


def test_deepconf_threshold() -> None:
    warm = [2.1, 1.4, 1.9, 0.6, 1.7, 2.3, 1.1, 0.9, 1.8, 2.0, 1.5, 1.6, 0.8, 2.2, 1.3, 1.2]
    assert deepconf_threshold(warm, 10) == pytest.approx(2.15)  # DeepConf-low
    assert deepconf_threshold(warm, 90) == pytest.approx(0.85)  # DeepConf-high


@pytest.mark.parametrize(
    "call",
    [
        lambda: group_confidences([1.0], 0),
        lambda: bottom_percent_group_confidence([1.0], 3, percent=0.0),
        lambda: deepconf_threshold([1.0], 100),
        lambda: deepconf_threshold([], 10),
        lambda: deepconf_threshold([1.0, math.nan], 10),
        lambda: token_confidence(np.zeros(3)),
    ],
)
def test_bad_arguments_raise(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        call()
