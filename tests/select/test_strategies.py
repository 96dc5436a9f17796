"""The strategy vocabulary (levels 1-3): RPC as a level-3 strategy, pruning rules at level 2."""

from __future__ import annotations

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.samplers.pruning import DeepConfOnline, LowProb
from ttscale.select.strategies import (
    SelectionStrategy,
    Strategy,
    get_strategy,
    parse_strategy,
    register_strategy,
    strategies,
)

# docs/algorithms.md 2.7: answers, text ids and mean log-probs of eight paths
ANSWERS = [12, 12, 7, 7, 7, 3, 7, 12]
TEXTS = ["t0", "t0", "t2", "t3", "t4", "t5", "t6", "t7"]
ELL = [-0.05, -0.05, -0.40, -0.45, -0.50, -1.20, -2.30, -0.90]


def test_rpc_strategy_prunes_and_selects_as_in_the_worked_example() -> None:
    s, rpc = parse_strategy("rpc")
    assert s.level == 3 and isinstance(rpc, SelectionStrategy)
    # reasoning pruning removes paths 5, 6, 7 (posterior pi1 < 0.5 and p < mean 0.578120)
    assert np.flatnonzero(rpc.pruned(ELL)).tolist() == [5, 6, 7]
    res = rpc.select(ANSWERS, mean_logprobs=ELL, texts=TEXTS)
    # cluster scores 12: 0.951229 (t0 once), 7: 1.914479, 3: 0 -> 7 with 0.668065
    assert res.answer == 7 and res.method == "rpc"
    conf = dict(zip(res.answers, res.confidence, strict=True))
    assert conf[7] == pytest.approx(0.668065, abs=1e-6)
    assert conf[12] == pytest.approx(0.331935, abs=1e-6) and conf[3] == 0.0
    # majority at level 3 on the same paths: 7 (4 votes of 8)
    _, sc = parse_strategy("majority:tie=first", level=3)
    assert sc.select(ANSWERS).answer == 7 and sc.spec() == "majority:tie=first"


def test_levels_and_names() -> None:
    names2 = [s.name for s in strategies(2)]
    assert names2 == ["deepconf-online", "lowprob", "selfeval"]
    assert {"rpc", "majority", "pc", "deepconf"} <= {s.name for s in strategies(3)}
    s, rule = parse_strategy("deepconf-online:eta=90,warmup=8,window=64")
    assert s.level == 2 and rule == DeepConfOnline(90, 8, 64)
    assert parse_strategy("lowprob:-2", level=2)[1] == LowProb(-2.0)


def test_a_name_at_two_levels_needs_a_level() -> None:
    # "majority" is a level-1 stopping rule (leader's share) and a level-3 selection rule
    with pytest.raises(ConfigError, match="exists at levels 1, 3"):
        get_strategy("majority")
    assert get_strategy("majority", level=1).level == 1
    assert get_strategy("majority", level=3).level == 3


def test_level_one_holds_the_stopping_rules() -> None:
    from ttscale.select.adaptive import RULE_NAMES, parse_rule

    assert [s.name for s in strategies(1)] == list(RULE_NAMES)
    s, rule = parse_strategy("beta:0.9", level=1)
    assert rule == parse_rule("beta:0.9") and s.level == 1
    for st in strategies(1):
        assert st.build(st.example) == parse_rule(st.example)  # every example parses


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown strategy 'nope'"),
        ("rpc:fit", "is not one of"),
        ("pc:fit=fast", "fit= applies to rpc only"),
        ("lowprob:threshold=x", "is not a float"),
    ],
)
def test_bad_strategy_specs(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_strategy(spec)


def test_missing_input_is_named() -> None:
    _, rpc = parse_strategy("rpc")
    with pytest.raises(ConfigError, match="needs mean_logprobs"):
        rpc.select(ANSWERS)


def test_register_a_user_strategy() -> None:
    mine = Strategy("my-rule", 2, "a user's pruning rule", "my-rule:x=1", lambda spec: spec.upper())
    register_strategy(mine)
    try:
        assert parse_strategy("my-rule:x=1") == (mine, "MY-RULE:X=1")
        with pytest.raises(ConfigError, match="a level-2 strategy named 'my-rule' exists"):
            register_strategy(mine)
    finally:
        from ttscale.select import strategies as mod

        del mod._REGISTRY[(2, "my-rule")]
