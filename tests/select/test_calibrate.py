"""K-fold calibration (issue 18): the choice never sees the held-out fold."""

from __future__ import annotations

import numpy as np
import pytest

from ttscale.allocation import Streams, streams_of
from ttscale.calibrate import _choose, calibrate, fold_ids, parse_target
from ttscale.errors import ConfigError
from ttscale.store.pool import Pool


def pool(seed: int = 0, P: int = 24, n: int = 8) -> Pool:
    rng = np.random.default_rng(seed)
    answers, correct, toks = [], [], []
    for _ in range(P):
        pr = rng.dirichlet([0.7] * 3)
        a = rng.choice(3, size=n, p=pr)
        answers += [str(x) for x in a]
        correct += [bool(x == 0) for x in a]
        toks += [int(t) for t in rng.integers(5, 50, size=n)]
    return Pool.from_arrays([f"p{i}" for i in range(P)], [n] * P, answer=answers, correct=correct, num_tokens=toks)


def scramble(streams: Streams, rows: np.ndarray, seed: int) -> Streams:
    """The same streams with the problems ``rows`` replaced by unrelated answers/correctness."""
    rng = np.random.default_rng(seed)
    new_orders = []
    for order in streams.orders:
        o = list(order)
        for r in rows:
            ans, _, tk = o[r]
            fresh = [str(x) for x in rng.integers(0, 2, size=len(ans))]
            o[r] = (fresh, {"0": float(rng.integers(0, 2)), "1": float(rng.integers(0, 2))},
                    [int(x) for x in rng.integers(1, 200, size=len(tk))])
        new_orders.append(tuple(o))
    return Streams(streams.problem_ids, tuple(new_orders), streams.cap, streams.has_tokens, streams.order, streams.seed)


@pytest.mark.parametrize("target", ["within:0.5", "tokens:0.4"])
def test_calibration_never_sees_the_held_out_fold(target: str) -> None:
    s = streams_of(pool(), orders=1, seed=0)
    rules = {"beta": ["beta:0.6", "beta:0.8", "beta:0.95"], "majority": ["majority:0.5", "majority:0.7"]}
    base = calibrate(s, k=3, target=target, rules=rules, policies=["greedy"], seed=4, n_boot=50)
    folds = np.array(base["folds"])
    changed_held_out = False
    for f in range(3):
        # scrambling fold f changes nothing that fold f's parameter was chosen from
        other = calibrate(scramble(s, np.flatnonzero(folds == f), seed=f), k=3, target=target, rules=rules,
                          policies=["greedy"], seed=4, n_boot=50)
        for fam in base["families"]:
            assert other["families"][fam]["chosen"][f] == base["families"][fam]["chosen"][f], (fam, f)
            changed_held_out |= other["families"][fam]["held_out_accuracy"] != base["families"][fam]["held_out_accuracy"]
    assert changed_held_out  # the held-out numbers do come from the held-out fold


def test_folds_and_choice() -> None:
    f = fold_ids(10, 3, seed=1)
    assert sorted(np.bincount(f).tolist()) == [3, 3, 4]
    assert np.array_equal(f, fold_ids(10, 3, seed=1)) and not np.array_equal(f, fold_ids(10, 3, seed=2))
    acc, cost = np.array([0.70, 0.74, 0.75]), np.array([10.0, 20.0, 40.0])
    # within 0.5 points of 0.75: 0.745 -> only the last; within 2 points: 0.73 -> the cheaper 0.74
    assert _choose(parse_target("within:0.5"), acc, cost, 0.75, 40.0) == 2
    assert _choose(parse_target("within:2"), acc, cost, 0.75, 40.0) == 1
    # at most 0.5 x 40 tokens: the most accurate of the first two
    assert _choose(parse_target("tokens:0.5"), acc, cost, 0.75, 40.0) == 1
    with pytest.raises(ConfigError, match="within:X"):
        parse_target("bogus:1")
    with pytest.raises(ConfigError, match="K >= 2"):
        fold_ids(10, 1, 0)


def test_held_out_folds_cover_every_problem_once() -> None:
    d = calibrate(pool(), k=5, rules={"beta": ["beta:0.7", "beta:0.9"]}, seed=0, n_boot=50)
    assert len(d["families"]["beta"]["chosen"]) == 5 and d["problems"] == 24
    # held-out accuracy pools the folds: equal to the mean of the chosen rule per fold
    from ttscale.calibrate import _rule_outcomes

    s = streams_of(pool(), orders=1, seed=0)
    acc, _ = _rule_outcomes(s, ["beta:threshold=0.7", "beta:threshold=0.9"], True)
    folds = np.array(d["folds"])
    want = np.mean([acc[["beta:threshold=0.7", "beta:threshold=0.9"].index(d["families"]["beta"]["chosen"][folds[i]]), i]
                    for i in range(24)])
    assert d["families"]["beta"]["held_out_accuracy"]["mean"] == pytest.approx(want)
