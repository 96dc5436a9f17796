"""Level-1 stopping rules (ttscale.select.adaptive): docs/algorithms.md 5 vectors and hand-computed
stopping points on small answer streams."""

from __future__ import annotations

import math

import pytest

from ttscale.errors import ConfigError
from ttscale.select.adaptive import (
    final_vote,
    msprt_log_ratio,
    parse_rule,
    run_stream,
    sprt_llr,
)


def stops(spec: str, stream: str, confs: list[float] | None = None) -> tuple[int, object, bool]:
    o = run_stream(parse_rule(spec), list(stream), confs)
    return o.used, o.answer, o.stopped


# ---- docs/algorithms.md 5.2 test vectors, through the rule objects ---------------------------------


@pytest.mark.parametrize(
    ("stream", "prob", "stop"),
    [
        ("A", 0.750000, False),
        ("AA", 0.875000, False),
        ("AAAAB", 0.890625, False),
        ("AAAAA", 0.984375, True),
        ("AABC", 0.687500, False),
        ("AAAAAABBC", 0.910156, False),
    ],
)
def test_beta_vectors(stream: str, prob: float, stop: bool) -> None:
    d = parse_rule("beta:0.95").check(list(stream))
    assert d.score == pytest.approx(prob, abs=1e-6)
    assert d.stop is stop


@pytest.mark.parametrize(
    ("counts", "prob"),
    [((3, 1, 1), 0.697702), ((5, 2, 1), 0.817965), ((2, 1, 1), 0.535494), ((8, 1, 1), 0.979379)],
)
def test_dirichlet_vectors(counts: tuple[int, ...], prob: float) -> None:
    stream = "".join(ch * c for ch, c in zip("ABC", counts, strict=False))
    d = parse_rule("dirichlet:0.95").check(list(stream))
    assert d.score == pytest.approx(prob, abs=1e-5)
    assert d.stop is (prob >= 0.95)


def test_entropy_and_majority_vectors() -> None:
    # [A,A,A] -> counts [3,1] -> 0.811278 (no stop); [A x4] -> [4,1] -> 0.721928 (stop)
    assert parse_rule("entropy:0.75").check(list("AAA")).stop is False
    d = parse_rule("entropy:0.75").check(list("AAAA"))
    assert d.stop and d.score == pytest.approx(0.721928, abs=1e-6)
    d = parse_rule("entropy").check(list("AAAAB"))
    assert d.stop and d.score == pytest.approx(0.721928, abs=1e-6)
    d = parse_rule("majority:0.8").check(list("AAAAB"))
    assert d.stop and d.score == pytest.approx(0.8)


# ---- stopping points on answer streams, by hand ------------------------------------------------


def test_esc_checks_whole_windows_only() -> None:
    # w=2: window 1 = "aa" is unanimous -> stop at 2 with "a"
    assert stops("esc:window=2", "aababb") == (2, "a", True)
    # windows "ab", "cc" -> stop at 4 with "c" although "a" was seen first
    assert stops("esc:window=2", "abcc") == (4, "c", True)
    # no unanimous window in 5 samples: ESC uses whole windows only (4), plurality a/b tie ->
    # first seen "a"
    assert stops("esc:window=2", "abbab") == (4, "a", False)
    # a window holding a missing answer is never unanimous
    assert run_stream(parse_rule("esc:2"), [None, None, "x", "x"]).used == 4


def test_beta_stops_at_four_unanimous() -> None:
    # v2 = 0: P = 1 - 0.5^(v1+1): v1 = 3 -> 0.9375 < 0.95, v1 = 4 -> 0.96875
    assert stops("beta:0.95", "aaaaaa") == (4, "a", True)


def test_majority_and_entropy_stopping_points() -> None:
    # shares 1/2, 2/3, 3/4, 4/5 -> first >= 0.8 at 5 samples
    assert stops("majority:0.8", "abaaaa") == (5, "a", True)
    # [2,1] 0.918, [3,1] 0.811, [4,1] 0.722 -> stop at 4
    assert stops("entropy:0.75", "aaaaaa") == (4, "a", True)


def test_sprt_stopping_points() -> None:
    # bound log(0.95/0.05) = log 19 = 2.9444; a leader vote adds log(1.6) = 0.4700:
    # unanimous needs v1 >= 6.26 -> 7 samples
    assert stops("sprt:p1=0.8", "a" * 10) == (7, "a", True)
    # one runner-up vote adds log(0.4) = -0.9163: v1 * 0.4700 >= 3.8607 -> v1 = 9, 10 samples
    assert stops("sprt:p1=0.8", "ab" + "a" * 12) == (10, "a", True)
    assert sprt_llr(9, 1, 0.8) == pytest.approx(9 * math.log(1.6) + math.log(0.4))


def test_msprt_stopping_point() -> None:
    # uniform prior: Lambda = 2^v1 / (v1 + 1) for a unanimous stream; >= 20 first at v1 = 8
    # (v1 = 7: 128/8 = 16; v1 = 8: 256/9 = 28.4)
    assert stops("msprt:alpha=0.05", "a" * 12) == (8, "a", True)
    assert msprt_log_ratio(7, 0) == pytest.approx(math.log(16.0))
    # with a runner-up: v1=3, v2=1 -> 2^4 * B(4, 2) = 16 * 3!1!/5! = 0.8
    assert msprt_log_ratio(3, 1) == pytest.approx(math.log(0.8))


def test_deepconf_consensus_weighted_share_after_warmup() -> None:
    # weights a = 1 + 1, b = 0.05 at k = 3: share 2/2.05 = 0.9756 >= 0.95 -> stop at 3
    assert stops("deepconf:0.95,warmup=3", "aaba", [1.0, 1.0, 0.05, 1.0]) == (3, "a", True)
    # b weighs 0.5: k=3 share 2/2.5 = 0.8, k=4 3/3.5 = 0.857, never >= 0.95 in 4 samples
    o = run_stream(parse_rule("deepconf:0.95,warmup=3"), list("aaba"), [1.0, 1.0, 0.5, 1.0])
    assert (o.used, o.answer, o.stopped) == (4, "a", False)
    # the final vote is weighted: one confident "b" beats two unsure "a"
    o = run_stream(parse_rule("deepconf:0.99,warmup=3"), list("aab"), [0.1, 0.1, 1.0])
    assert o.answer == "b" and not o.stopped
    with pytest.raises(ConfigError, match="confidence"):
        parse_rule("deepconf").check(list("a"))


def test_min_samples_and_fixed() -> None:
    assert stops("beta:0.95,min=6", "a" * 8) == (6, "a", True)
    assert stops("fixed", "abb") == (3, "b", False)
    # no answers at all: the rule never stops and votes None
    o = run_stream(parse_rule("beta"), [None, None, None])
    assert (o.used, o.answer, o.stopped) == (3, None, False)


def test_final_vote_ties() -> None:
    assert final_vote(list("abba")) == ("a", ["a", "b"])
    import numpy as np

    picks = {final_vote(list("abba"), tie="random", rng=np.random.default_rng(s))[0] for s in range(20)}
    assert picks == {"a", "b"}


# ---- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["fixed", "esc:window=5", "esc:3", "beta:0.9", "dirichlet:0.95,top_k=4", "entropy:0.5",
             "majority:0.8,min=3", "deepconf:tau=0.9,warmup=8", "sprt:p1=0.7,alpha=0.01", "msprt:0.1,a=2,b=2"],
)
def test_spec_round_trip(spec: str) -> None:
    r = parse_rule(spec)
    assert parse_rule(r.spec) == r


def test_spec_values() -> None:
    assert parse_rule("esc:3").params == {"window": 3.0}
    assert parse_rule("beta").params == {"threshold": 0.95}
    assert parse_rule(" Majority:0.7 ").params == {"threshold": 0.7, "votes": 0}


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("bogus", "unknown adaptive rule 'bogus'"),
        ("beta:x", "must be a number"),
        ("esc:foo=3", "has no parameter 'foo'"),
        ("esc:window=0", "positive integer"),
        ("esc:window=2.5", "positive integer"),
        ("fixed:3", "takes no value"),
        ("sprt:p1=0.4", "p1 must be in"),
        ("beta:1.5", "threshold must be in"),
        ("msprt:a=0", "must be positive"),
        ("beta:0.9,", "empty parameter"),
    ],
)
def test_spec_errors(spec: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_rule(spec)


def test_esc_budget_below_one_window() -> None:
    with pytest.raises(ConfigError, match="budget of at least 5"):
        run_stream(parse_rule("esc:5"), list("aaa"))


# ---- ConSol's tests as the authors' code sets them (issue 18) ---------------------------------


def _consol_sprt(v1: int, v2: int) -> bool:
    # independent transcription of ConSol's SprtConfidenceModel.test (p0 = 0.5, both bounds)
    p1, alpha, beta = 0.5001, 0.05, 1 - 0.05 - 0.000024
    llr = v1 * math.log(p1 / 0.5) + v2 * math.log((1 - p1) / 0.5)
    return llr >= math.log((1 - beta) / alpha) or llr <= math.log(beta / (1 - alpha))


@pytest.mark.parametrize("spec", ["consol-sprt", "consol-msprt"])
def test_consol_presets_stop_three_votes_ahead(spec: str) -> None:
    # exact enumeration of every (leader, runner-up) count with up to 200 samples: stop iff the
    # leader is 3 votes ahead (a third answer changes nothing: only the top two are tested)
    rule = parse_rule(spec)
    for n in range(1, 201):
        for v2 in range(0, n // 2 + 1):
            v1 = n - v2
            d = rule.check(["a"] * v1 + ["b"] * v2 + ["c"] * min(v2, 1))
            assert d.stop is (v1 - v2 >= 3), (spec, v1, v2, d.score)
            if spec == "consol-sprt":
                assert d.stop is _consol_sprt(v1, v2)
    assert stops(spec, "abab" + "a" * 10) == (7, "a", True)


def test_consol_presets_spell_the_authors_parameters() -> None:
    assert parse_rule("consol-sprt").spec == "sprt:p1=0.5001,alpha=0.05,beta=0.949976,h0=1"
    assert parse_rule("consol-msprt").spec == (
        "msprt:alpha=0.05,a=1000000,b=1000000,beta=0.94994,truncate=1,h0=1"
    )
    # a preset takes overrides like any rule, and the spec parses back to the same rule
    r = parse_rule("consol-sprt:min=4")
    assert r.params["min"] == 4 and parse_rule(r.spec) == r
    # our defaults are not ConSol's: they need 7 unanimous votes
    assert stops("sprt", "a" * 10)[0] == 7


def test_truncated_msprt_against_quadrature() -> None:
    # Lambda = int_{0.5}^1 (2p)^v1 (2(1-p))^v2 prior(p) dp / P_prior(p > 0.5), by quadrature
    from scipy.integrate import quad
    from scipy.stats import beta as beta_dist

    for a, b, v1, v2 in [(2.0, 3.0, 5, 2), (1.0, 1.0, 4, 0), (50.0, 50.0, 9, 3)]:
        num = quad(lambda p, v1=v1, v2=v2, a=a, b=b: (2 * p) ** v1 * (2 * (1 - p)) ** v2 * beta_dist.pdf(p, a, b), 0.5, 1)[0]
        want = math.log(num / beta_dist.sf(0.5, a, b))
        assert msprt_log_ratio(v1, v2, a, b, truncate=True) == pytest.approx(want, rel=1e-7)
    # Wald's bound with a beta term: msprt:beta=0.5 stops where Lambda >= (1 - 0.5)/0.05 = 10
    # (uniform prior, unanimous: 2^v1/(v1+1): v1=6 -> 9.14, v1=7 -> 16)
    assert stops("msprt:alpha=0.05,beta=0.5", "a" * 10) == (7, "a", True)


def test_majority_threshold_decides() -> None:
    # t = 0.8 waits for ceil(1/0.2) = 5 answers; t = 0.6 for ceil(2.5) = 3; t = 0.95 for 20
    assert stops("majority:0.8", "a" * 10) == (5, "a", True)
    assert stops("majority:0.6", "a" * 10) == (3, "a", True)
    assert stops("majority:0.95", "a" * 30) == (20, "a", True)
    assert stops("majority:0.8,votes=2", "a" * 10) == (2, "a", True)
    # missing answers do not count towards the votes
    assert run_stream(parse_rule("majority:0.6"), [None, "a", None, "a", "a"]).used == 5
    assert stops("majority:1,votes=4", "aaaab") == (4, "a", True)
    with pytest.raises(ConfigError, match="votes=K"):
        parse_rule("majority:1")


def test_dirichlet_shortcut_changes_no_stopping_point() -> None:
    # first_stop skips prefixes where the beta bound proves the rule cannot stop; the stopping
    # points must equal a prefix-by-prefix check of the exact rule
    import numpy as np

    rng = np.random.default_rng(3)
    rule = parse_rule("dirichlet:0.9")
    for _ in range(60):
        p = rng.dirichlet([0.8] * 4)
        stream = [str(x) for x in rng.choice(4, size=30, p=p)]
        exact = next((k for k in range(1, 31) if rule.check(stream[:k]).stop), None)
        o = run_stream(rule, stream)
        assert (o.used if o.stopped else None) == exact
