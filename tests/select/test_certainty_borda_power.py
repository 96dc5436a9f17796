"""The Borda power of ``self_certainty_borda`` through ``compute_curves(borda_power=)``: a small
hand example whose accuracies are worked out by hand, and every k against an independent
enumeration of the k-subsets (ranks taken within each subset, ties share the credit)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ttscale.analysis import compute_curves
from ttscale.errors import ConfigError
from ttscale.store.pool import Pool

ANSWERS = ["a", "b", "b", "c", "x", "x", "y", "y"]
CORRECT = [0, 1, 1, 0, 0, 0, 1, 1]
CERT = np.array([0.9, 0.1, 0.2, 0.5, 0.1, 0.2, 0.9, 0.8])


def _pool() -> Pool:
    return Pool.from_arrays(["p1", "p2"], [4, 4], answer=ANSWERS, correct=CORRECT)


def _independent(k: int, power: float) -> float:
    """Mean over problems of the expected accuracy of the Borda vote over every k-subset."""
    per = []
    for lo in (0, 4):
        accs = []
        for sub in itertools.combinations(range(lo, lo + 4), k):
            order = sorted(sub, key=lambda i: -CERT[i])  # most certain first; no ties here
            votes: dict[str, float] = {}
            for r, i in enumerate(order, start=1):
                votes[ANSWERS[i]] = votes.get(ANSWERS[i], 0.0) + (k - r + 1) ** power
            best = max(votes.values())
            won = [a for a, v in votes.items() if math.isclose(v, best, rel_tol=1e-12)]
            accs.append(np.mean([CORRECT[ANSWERS.index(a)] for a in won]))
        per.append(np.mean(accs))
    return float(np.mean(per))


@pytest.mark.parametrize(("power", "by_hand"), [(0.5, 1.0), (2.0, 0.5), (0.0, 0.75)])
def test_borda_power_by_hand_at_the_full_budget(power: float, by_hand: float) -> None:
    # p1: ranks a (4^p), c (3^p), b (2^p + 1): p=0.5 -> b (2.41 > 2 > 1.73), p=2 -> a (16 > 9 > 5),
    # p=0 -> b (2 votes). p2: y takes ranks 1, 2 and wins for p > 0; p=0 ties 2-2 (half credit)
    rep = compute_curves(_pool(), ["self_certainty_borda"], [4], certainties=CERT, borda_power=power, n_boot=10)
    assert rep.curves["self_certainty_borda"].mean[0] == pytest.approx(by_hand, abs=1e-12)
    assert rep.meta["borda_power"] == power
    assert rep.meta["self_certainty"]["how"].startswith("not stated")


@pytest.mark.parametrize("power", [0.5, 2.0, 0.0])
def test_borda_power_every_k_against_an_enumeration(power: float) -> None:
    rep = compute_curves(_pool(), ["self_certainty_borda"], [1, 2, 3, 4], certainties=CERT,
                         borda_power=power, n_boot=10)  # fmt: skip
    got = rep.curves["self_certainty_borda"].mean
    want = [_independent(k, power) for k in (1, 2, 3, 4)]
    assert got == pytest.approx(want, abs=1e-12)


def test_borda_power_must_be_a_finite_non_negative_number() -> None:
    with pytest.raises(ConfigError, match="borda_power"):
        compute_curves(_pool(), ["self_certainty_borda"], [4], certainties=CERT, borda_power=-1.0)
