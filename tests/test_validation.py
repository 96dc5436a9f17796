"""One place for parameter validation: ranges, choices, one message format."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.validation import check_choice, check_int, check_number, choices, describe


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("n", 0, min=1), "n must be an integer >= 1, got 0"),
        (lambda: check_int("n", True, min=0), "n must be an integer >= 0, got True"),
        (lambda: check_int("n", 2.0, min=1), "n must be an integer >= 1, got 2.0"),
        (lambda: check_int("n", "3", min=1), "n must be an integer >= 1, got '3'"),
        (lambda: check_int("b", 65, min=1, max=64), "b must be an integer in [1, 64], got 65"),
        (lambda: check_int("b", 65, max=64), "b must be an integer <= 64, got 65"),
        (lambda: check_int("m", -1, min=2, allow_none=True), "m must be an integer >= 2 or None, got -1"),
        (lambda: check_number("top_p", 2, low=0.0, high=1.0, low_open=True), "top_p must be in (0, 1], got 2"),
        (lambda: check_number("p", 1.0, low=0, high=1, high_open=True), "p must be in [0, 1), got 1.0"),
        (lambda: check_number("t", -1, low=0, low_open=True, unit="seconds"), "t must be > 0 seconds, got -1"),
        (lambda: check_number("t", float("inf"), low=0, low_open=True, finite=True, unit="seconds"),
         "t must be a finite number > 0 seconds, got inf"),
        (lambda: check_number("x", float("nan"), low=0), "x must be >= 0, got nan"),
        (lambda: check_number("x", np.float64(2.5), high=1), "x must be <= 1, got 2.5"),
        (lambda: check_number("x", False, low=0), "x must be >= 0, got False"),
        (lambda: check_number("x", "a"), "x must be a number, got 'a'"),
        (lambda: check_number("x", "a", finite=True), "x must be a finite number, got 'a'"),
        (lambda: check_choice("tie", "best", ("expected", "first")), "tie must be one of expected, first, got 'best'"),
        (lambda: check_choice("normalize", "l2", ("zscore", None)), "normalize must be one of zscore, None, got 'l2'"),
        (lambda: check_choice("k", ["a"], ("a",)), "k must be one of a, got ['a']"),
    ],
)
def test_one_message_format(call, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value) == message


def test_valid_values_come_back_as_plain_python_numbers() -> None:
    assert check_int("n", np.int64(3), min=1) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("m", None, allow_none=True) is None
    assert check_number("p", np.float32(0.5), low=0, high=1) == 0.5
    assert check_number("p", 1, low=0, high=1) == 1.0  # closed bound included
    assert check_number("x", float("inf"), low=0) == float("inf")  # infinite allowed unless finite=True
    assert check_choice("tie", "first", ("expected", "first")) == "first"
    assert describe(np.float64(0.25)) == "0.25" and describe("x") == "'x'"


def test_choices_come_from_the_literal_so_they_cannot_drift() -> None:
    from ttscale.metrics import at_k, scaling
    from ttscale.select import aggregate, ensemble, stopping

    Mode = Literal["a", "b"]
    assert choices(Mode) == ("a", "b")
    with pytest.raises(TypeError):
        choices(int)
    assert aggregate.TIE_RULES == get_args(aggregate.TieRule)
    assert aggregate.SCORE_MAPPINGS == get_args(aggregate.ScoreMapping)
    assert aggregate.DEEPCONF_MEASURES == get_args(aggregate.ConfidenceMeasure)
    assert aggregate.PRM_AGGREGATIONS == get_args(aggregate.PrmAggregation)
    assert ensemble.ENSEMBLE_METHODS == get_args(ensemble.EnsembleMethod)
    from ttscale.verifiers.reward import PRM_AGGREGATIONS

    assert PRM_AGGREGATIONS is aggregate.PRM_AGGREGATIONS
    # the runtime checks use them: a value outside the Literal gets the one-format message
    with pytest.raises(ConfigError, match="strategy must be one of auto, closed-form, enumerate, mc"):
        at_k.selection_at_k([[0]], [[1]], [1], strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="criterion must be one of beta, dirichlet, entropy"):
        stopping.should_stop(["a"], "vote")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="method must be one of loglog, nls, got 'ols'"):
        scaling.fit_power_law([1, 2, 4], [0.2, 0.3, 0.4], method="ols")  # type: ignore[arg-type]


def test_call_sites_use_the_one_format() -> None:
    from ttscale.metrics.stats import bootstrap_ci
    from ttscale.types import SamplingParams
    from ttscale.verifiers.sandbox import Limits, Sandbox

    with pytest.raises(ConfigError, match=r"^top_p must be in \(0, 1\], got 2$"):
        SamplingParams(top_p=2)
    # a non-number was a bare ValueError from float(); now the same one-line ConfigError
    with pytest.raises(ConfigError, match=r"^top_p must be in \(0, 1\], got 'high'$"):
        SamplingParams(top_p="high")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^n must be an integer >= 1, got 0$"):
        SamplingParams(n=0)
    with pytest.raises(ConfigError, match=r"^logprobs must be an integer >= 0 or None, got -1$"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ConfigError, match=r"^n_boot must be an integer >= 1, got True$"):
        bootstrap_ci(np.ones((3, 2)), n_boot=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^memory_mb must be an integer >= 32, got 8$"):
        Limits(memory_mb=8)
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer in \[1, 64\], got 65$"):
        Sandbox(batch_size=65)
    with pytest.raises(ConfigError, match=r"^workers must be an integer >= 1 or None, got 0$"):
        Sandbox(workers=0)
