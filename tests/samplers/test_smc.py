"""SMCSampler: exactness on an enumerable target, unbiased log_ml, FK/PF parity, float traps.

The target is enumerated exactly: the toy model over the alphabet ``"ab"`` (plus EOS), at most
3 tokens, one token per step; every terminal sequence ``y`` (chars then EOS, or 3 chars) has
``p(y)`` from the engine's own scoring, and the target is ``p(y)·exp(φ(y))``. Proposals are drawn
at temperature 0.7, so the proposal correction is exercised.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from ttscale.engines.base import GenerationRequest
from ttscale.engines.scripted import EOS_TOKEN_ID, ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers import Fate
from ttscale.samplers.potentials import (
    LikelihoodTempering,
    SumPotential,
    fk_increments,
    pf_log_weights,
)
from ttscale.samplers.smc import SMCSampler, SMCState, reweight, select_answer
from ttscale.types import Problem, SamplingParams

ALPHA = "ab"
H = 3  # tokens per particle in all
PROB = Problem("p0", "q:")
TEMP = 0.7


def _engine() -> ScriptedEngine:
    return ScriptedEngine(alphabet=ALPHA, order=2, eos_logprob=math.log(0.3))


def _terminals() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for k in range(H):
        for chars in itertools.product(ALPHA, repeat=k):
            out.append(("".join(chars), (*map(ord, chars), EOS_TOKEN_ID)))
    for chars in itertools.product(ALPHA, repeat=H):
        out.append(("".join(chars), tuple(map(ord, chars))))
    return out


def _log_p(eng: ScriptedEngine) -> dict[str, float]:
    terms = _terminals()
    reqs = [GenerationRequest(problem_id=PROB.id, prompt=PROB.prompt) for _ in terms]
    scores = eng.score(reqs, [ids for _, ids in terms])
    return {text: math.fsum(s) for (text, _), s in zip(terms, scores, strict=True)}


def reward(text: str) -> float:
    """An FK reward of a prefix in [0, 1]."""
    return (text.count("a") + 0.5 * text.endswith("b")) / H


def log_potential(problem: Problem, texts: list[str], finished: list[bool]) -> list[float]:
    """A prefix log-potential that depends on the text and on being finished."""
    return [
        0.9 * t.count("a") - 0.6 * t.count("b") + (0.4 if f else 0.0)
        for t, f in zip(texts, finished, strict=True)
    ]


def _target(shaping: str, lam: float) -> dict[str, float]:
    lp = _log_p(_engine())
    if shaping == "none":
        phi = {y: log_potential(PROB, [y], [True])[0] for y in lp}
    else:  # immediate and difference both target p(y)·exp(λ r(y))
        phi = {y: lam * reward(y) for y in lp}
    logt = {y: lp[y] + phi[y] for y in lp}
    return logt


def _sampler(shaping: str, scheme: str, ess: float = 1.0, **kw: object) -> SMCSampler:
    pot = log_potential if shaping == "none" else (lambda p, t, f: [reward(x) for x in t])
    return SMCSampler(
        _engine(),
        pot,
        SamplingParams(temperature=TEMP, max_tokens=H),
        shaping=shaping,
        lam=2.0,
        resample=scheme,
        ess_threshold=ess,
        step_stop=(),
        tokens_per_step=1,
        progress=False,
        **kw,  # type: ignore[arg-type]
    )


def _run(s: SMCSampler, n: int, seed: int):  # type: ignore[no-untyped-def]
    return next(iter(s.sample([PROB], n, seed=seed)))


def _weighted(res) -> dict[str, float]:  # type: ignore[no-untyped-def]
    kept = res.kept
    lw = np.array([c.log_weight for c in kept])
    w = np.exp(lw - lw.max())
    w /= w.sum()
    out: dict[str, float] = {}
    for c, wi in zip(kept, w, strict=True):
        out[c.text] = out.get(c.text, 0.0) + float(wi)
    return out


def _tv(a: dict[str, float], b: dict[str, float]) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)


CASES = [
    ("none", "multinomial", 1.0, True),
    ("none", "stratified", 1.0, True),
    ("none", "systematic", 0.5, True),
    ("none", "residual", 1.0, True),
    ("difference", "systematic", 1.0, True),
    ("immediate", "multinomial", 1.0, True),
    ("immediate", "residual", 0.7, False),
    ("none", "systematic", 1.0, False),
]


@pytest.mark.parametrize(("shaping", "scheme", "ess", "resample_finished"), CASES)
def test_log_ml_unbiased_for_z(
    shaping: str, scheme: str, ess: float, resample_finished: bool
) -> None:
    logt = _target(shaping, 2.0)
    z = math.fsum(math.exp(v) for v in logt.values())
    s = _sampler(shaping, scheme, ess, resample_finished=resample_finished)
    est = np.array([math.exp(_run(s, 4, seed).info["log_ml"]) for seed in range(300)])
    se = est.std(ddof=1) / math.sqrt(est.size)
    # unbiased: the mean of exp(log_ml) over independent runs is within 4 standard errors of Z
    assert abs(est.mean() - z) < 4 * se, (est.mean(), z, se)
    assert se < 0.1 * z  # the test has power: the SE is small against Z


@pytest.mark.parametrize(
    ("shaping", "scheme"),
    [
        ("none", "systematic"),
        ("difference", "stratified"),
        ("immediate", "multinomial"),
        ("none", "residual"),
    ],
)
def test_weighted_particles_converge_to_target(shaping: str, scheme: str) -> None:
    logt = _target(shaping, 2.0)
    z = math.fsum(math.exp(v) for v in logt.values())
    target = {y: math.exp(v) / z for y, v in logt.items()}
    s = _sampler(shaping, scheme)
    runs = {n: [_weighted(_run(s, n, seed)) for seed in range(6)] for n in (8, 64, 512)}
    tv = {n: float(np.mean([_tv(m, target) for m in ms])) for n, ms in runs.items()}
    # Monte Carlo error shrinks like 1/sqrt(N): 8x the particles, ~2.8x smaller TV
    assert tv[64] < 0.6 * tv[8] and tv[512] < 0.6 * tv[64], tv
    # and it shrinks towards the target (no bias): the 6 runs at N=512 pooled are within 0.05
    pooled = {y: float(np.mean([m.get(y, 0.0) for m in runs[512]])) for y in target}
    assert _tv(pooled, target) < 0.05, (_tv(pooled, target), tv)


def test_proposal_correction_is_needed() -> None:
    # without the correction the particles target the tempered proposal, not p·exp(φ):
    # the same runs with the correction disabled are far off
    logt = _target("none", 0.0)
    z = math.fsum(math.exp(v) for v in logt.values())
    target = {y: math.exp(v) / z for y, v in logt.items()}
    s = _sampler("none", "systematic")
    s.params = s.params.replace(temperature=0.4)  # a proposal far from the target

    def pooled_tv() -> float:
        runs = [_weighted(_run(s, 512, seed)) for seed in range(6)]
        return _tv({y: float(np.mean([m.get(y, 0.0) for m in runs])) for y in target}, target)

    s.correct_proposal = False
    tv_off = pooled_tv()
    s.correct_proposal = True
    tv_on = pooled_tv()
    assert tv_on < 0.05 and tv_off > 3 * tv_on, (tv_on, tv_off)


def test_likelihood_tempering_targets_p_beta() -> None:
    beta = 2.0
    lp = _log_p(_engine())
    z = math.fsum(math.exp(beta * v) for v in lp.values())
    s = SMCSampler(
        _engine(),
        SumPotential(LikelihoodTempering(beta), lambda p, t, f: [0.0] * len(t)),
        SamplingParams(temperature=TEMP, max_tokens=H),
        ess_threshold=1.0,
        step_stop=(),
        tokens_per_step=1,
        progress=False,
    )
    est = np.array([math.exp(_run(s, 4, seed).info["log_ml"]) for seed in range(300)])
    se = est.std(ddof=1) / math.sqrt(est.size)
    assert abs(est.mean() - z) < 4 * se, (est.mean(), z, se)


def test_lineage_fates_accounting_and_absorbing() -> None:
    s = _sampler("none", "multinomial")
    res = _run(s, 6, 3)
    by_index = {c.index: c for c in res.candidates}
    kept = res.kept
    assert kept and all(c.fate is Fate.KEPT for c in kept)
    # every parent exists, belongs to the previous step and is marked extended
    for c in res.candidates:
        if c.parent is not None:
            assert by_index[c.parent].step == c.step - 1
            assert by_index[c.parent].fate is Fate.EXTENDED
            assert c.text.startswith(by_index[c.parent].text)
    # accounting: every generated token (resampled-away particles included), one per step
    assert res.generated_tokens == sum(c.completion.num_tokens for c in res.candidates)
    assert res.info["particle_steps"] == len(res.candidates) == res.generated_tokens
    # final weights of the kept particles carry log_ml: LSE(l) - log N
    lw = np.array([c.log_weight for c in kept])
    assert math.isclose(
        float(np.log(np.exp(lw).sum())) - math.log(6),
        res.info["log_ml"],
        rel_tol=1e-12,
        abs_tol=1e-12,
    )
    # absorbing: a finished particle (EOS) is never a parent
    for c in res.candidates:
        if c.completion.finish_reason == "stop":
            assert c.index not in {d.parent for d in res.candidates}
    assert len(res.info["ess"]) == res.info["steps"] and all(
        1 <= e <= 6 + 1e-9 for e in res.info["ess"]
    )


def test_reproducible_and_seed_dependent() -> None:
    s = _sampler("difference", "systematic")
    a, b, c = _run(s, 8, 11), _run(s, 8, 11), _run(s, 8, 12)
    assert [x.text for x in a.candidates] == [x.text for x in b.candidates]
    assert a.info["log_ml"] == b.info["log_ml"]
    assert [x.text for x in a.candidates] != [x.text for x in c.candidates]


def test_all_minus_inf_is_a_clear_outcome() -> None:
    s = SMCSampler(
        _engine(),
        lambda p, t, f: [-math.inf] * len(t),
        SamplingParams(max_tokens=H),
        step_stop=(),
        tokens_per_step=1,
        progress=False,
    )
    res = _run(s, 4, 0)
    assert res.info["degenerate"] is True
    assert res.info["log_ml"] == -math.inf
    assert res.info["steps"] == 1  # stopped at once
    assert all(c.log_weight == -math.inf for c in res.kept)
    assert not any(math.isnan(e) for e in res.info["ess"])


def test_nan_potential_is_minus_inf_and_plus_inf_refused() -> None:
    s = SMCSampler(
        _engine(),
        lambda p, t, f: [math.nan if "a" in x else 0.0 for x in t],
        SamplingParams(max_tokens=H),
        step_stop=(),
        tokens_per_step=1,
        progress=False,
    )
    res = _run(s, 16, 0)
    assert all("a" not in c.text for c in res.kept if c.log_weight > -math.inf)
    # never resampling: a dead particle (weight -inf after a NaN) stays but is never extended
    s.ess_threshold = 0.0
    res = _run(s, 16, 0)
    parents = {c.parent for c in res.candidates}
    dead = [c for c in res.candidates if "a" in c.text]
    assert dead and all(c.index not in parents for c in dead)
    assert all(c.log_weight == -math.inf for c in res.kept if "a" in c.text)
    bad = SMCSampler(
        _engine(),
        lambda p, t, f: [math.inf] * len(t),
        SamplingParams(max_tokens=H),
        step_stop=(),
        tokens_per_step=1,
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"\+inf"):
        _run(bad, 2, 0)


def test_reweight_pure_step_vector() -> None:
    # docs/algorithms.md 6.2 vector: l = [-1.2, -0.3, -2.5, -0.3] -> ESS 2.910192, LSE - log N = -0.763079
    st = SMCState.initial(4)
    new, info = reweight(st, np.array([-1.2, -0.3, -2.5, -0.3]), rng=0, ess_threshold=0.5)
    assert info.ess == pytest.approx(2.910192, abs=1e-6)
    assert not info.resampled  # 2.91 >= 0.5 * 4
    assert new.log_ml == pytest.approx(-0.763079, abs=1e-6)
    # increment LSE(after) - LSE(before) from uniform start (LSE = log 4): -0.763079
    assert info.log_ml_increment == pytest.approx(-0.763079, abs=1e-6)
    new2, info2 = reweight(st, np.array([-1.2, -0.3, -2.5, -0.3]), rng=0, ess_threshold=1.0)
    assert info2.resampled
    # the reset keeps the total: every weight is LSE(l) - log N
    assert np.allclose(new2.log_weights, -0.763079, atol=1e-6)
    assert new2.log_ml == pytest.approx(-0.763079, abs=1e-6)


def test_reweight_finished_excluded_from_resampling() -> None:
    st = SMCState.initial(4)
    st = replace(st, finished=np.array([True, False, False, True]), cand=np.arange(4))
    new, info = reweight(
        st, np.array([0.0, -50.0, 0.0, 0.0]), rng=1, ess_threshold=1.0, resample_finished=False
    )
    assert info.resampled
    assert info.ancestors[0] == 0 and info.ancestors[3] == 3  # finished slots untouched
    assert info.ancestors[1] == 2 and info.ancestors[2] == 2  # the live pair resampled
    assert new.log_weights[0] == 0.0 and new.log_weights[3] == 0.0
    # live total kept: LSE(-50, 0) - log 2 on both live slots
    assert new.log_weights[1] == pytest.approx(float(np.logaddexp(-50.0, 0.0)) - math.log(2))


def test_pf_parity_vector() -> None:
    # docs/algorithms.md 6.3: r = [0.9, 0.6, 0.2, 0.6]
    lw = pf_log_weights([0.9, 0.6, 0.2, 0.6])
    assert lw == pytest.approx([2.197225, 0.405465, -1.386294, 0.405465], abs=1e-6)
    w = np.exp(lw - lw.max())
    assert w / w.sum() == pytest.approx([0.734694, 0.122449, 0.020408, 0.122449], abs=1e-6)
    lw2 = pf_log_weights([0.9, 0.6, 0.2, 0.6], temperature=0.5)
    w2 = np.exp(lw2 - lw2.max())
    assert w2 / w2.sum() == pytest.approx([0.946676, 0.026297, 0.000730, 0.026297], abs=1e-6)
    assert pf_log_weights([1.0])[0] == pytest.approx(36.043653, abs=1e-6)
    assert pf_log_weights([1.0], eps=1e-7)[0] == pytest.approx(16.118096, abs=1e-6)
    assert pf_log_weights([0.0])[0] == pytest.approx(-36.043653, abs=1e-6)
    assert pf_log_weights([0.5])[0] == 0.0
    with pytest.raises(ConfigError):
        pf_log_weights([1.2])


def test_fk_parity_vector() -> None:
    # docs/algorithms.md 6.4: lam = 2, r_prev = 0, r = [0.2, 0.8, 0.5, 0.1]
    lam, z, no = 2.0, np.zeros(4), np.zeros(4, bool)
    r1 = np.array([0.2, 0.8, 0.5, 0.1])
    for mode in ("immediate", "difference", "max", "sum"):
        lw, _ = fk_increments(mode, lam, r1, z, z, no)
        assert np.exp(lw) == pytest.approx([1.491825, 4.953032, 2.718282, 1.221403], abs=1e-6)
    w = np.exp(lw) / np.exp(lw).sum()
    assert w == pytest.approx([0.143658, 0.476962, 0.261762, 0.117617], abs=1e-6)
    a = np.array([1, 1, 2, 0])
    r_prev, log_pi = r1[a], lw[a]  # after ancestors [1, 1, 2, 0]
    assert np.exp(log_pi) == pytest.approx([4.953032, 4.953032, 2.718282, 1.491825], abs=1e-6)
    r2 = np.array([0.9, 0.7, 0.4, 0.3])
    d, _ = fk_increments("difference", lam, r2, r_prev, log_pi, no)
    assert np.exp(d) == pytest.approx([1.221403, 0.818731, 0.818731, 1.221403], abs=1e-6)
    m, _ = fk_increments("max", lam, r2, r_prev, log_pi, no)
    assert np.exp(m) == pytest.approx([6.049647, 4.953032, 2.718282, 1.822119], abs=1e-6)
    fin, _ = fk_increments("immediate", lam, r2, r_prev, log_pi, np.ones(4, bool))
    assert np.exp(fin) == pytest.approx([1.221403, 0.818731, 0.818731, 1.221403], abs=1e-6)
    # a zero-weight particle stays zero at its final correction (never +inf or NaN)
    dead, _ = fk_increments("sum", lam, r2, r_prev, np.full(4, -np.inf), np.ones(4, bool))
    assert np.all(np.isneginf(dead))


def test_pf_mode_runs_and_selects() -> None:
    s = SMCSampler(
        _engine(),
        lambda p, t, f: [min(1.0, reward(x)) for x in t],
        SamplingParams(max_tokens=H),
        shaping="pf",
        step_stop=(),
        tokens_per_step=1,
        progress=False,
        answer_fn=lambda t: t[:1] or None,
        select="argmax",
    )
    res = _run(s, 8, 0)
    assert res.info["log_ml"] is None  # PF weights are not an importance-sampling estimate
    assert all(i.resampled for i in res.steps[:-1])  # every step until all are finished
    best = max(res.kept, key=lambda c: c.log_weight)
    assert res.info["answer"] == (best.text[:1] or None)


def test_select_answer_rules() -> None:
    s = _sampler("none", "systematic")
    res = _run(s, 32, 5)
    fn = lambda t: t[:1] or None  # noqa: E731
    kept = res.kept
    tot: dict[str | None, float] = {}
    for c in kept:
        if fn(c.text) is not None:
            tot[fn(c.text)] = tot.get(fn(c.text), 0.0) + math.exp(c.log_weight)
    assert select_answer(res, "vote", fn) == max(tot, key=tot.__getitem__)
    assert select_answer(res, "argmax", fn) == fn(max(kept, key=lambda c: c.log_weight).text)
    assert select_answer(res, "sample", fn, seed=1) in tot


def test_step_stop_newline_steps() -> None:
    eng = ScriptedEngine(alphabet="ab\n", order=2, eos_logprob=math.log(0.05))
    s = SMCSampler(
        eng,
        lambda p, t, f: [0.0] * len(t),
        SamplingParams(max_tokens=30),
        step_stop=("\n",),
        tokens_per_step=10,
        progress=False,
    )
    res = _run(s, 4, 2)
    by = {c.index: c for c in res.candidates}
    for c in res.candidates:
        before = by[c.parent].text if c.parent is not None else ""
        step_text = c.text[len(before) :]
        # a step ends at its first newline (kept in the text), EOS, or 10 tokens
        assert "\n" not in step_text[:-1]
        assert c.completion.num_tokens <= 10
    assert any(c.text.endswith("\n") for c in res.candidates)


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        SMCSampler(_engine(), log_potential, SamplingParams(temperature=0.0))
    with pytest.raises(ConfigError, match=r"token_prefixes|continue exactly"):
        SMCSampler(_NoPrefix(), log_potential)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resample"):
        SMCSampler(_engine(), log_potential, resample="bogus")
    with pytest.raises(ConfigError, match="shaping"):
        SMCSampler(_engine(), log_potential, shaping="bogus")
    with pytest.raises(ConfigError, match="potential"):
        SMCSampler(_engine(), 3)


class _NoPrefix:
    name = "noprefix"

    def info(self) -> dict[str, str]:
        return {"engine": "noprefix"}


def _path_texts(y: str) -> list[str]:
    """The particle's text after each of its steps (one token each; EOS adds no text)."""
    texts = [y[: k + 1] for k in range(len(y))]
    return [*texts, y] if len(y) < H else texts


@pytest.mark.parametrize("shaping", ["max", "sum"])
def test_fk_max_and_sum_targets(shaping: str) -> None:
    # max targets p(y)·exp(λ max(0, max_t r_t)), sum targets p(y)·exp(λ Σ_t r_t) (6.4's final
    # correction), with r_t the reward of the prefix after step t
    lam = 2.0
    lp = _log_p(_engine())
    rs = {y: [reward(t) for t in _path_texts(y)] for y in lp}
    phi = {y: lam * (max(0.0, *r) if shaping == "max" else math.fsum(r)) for y, r in rs.items()}
    z = math.fsum(math.exp(lp[y] + phi[y]) for y in lp)
    target = {y: math.exp(lp[y] + phi[y]) / z for y in lp}
    s = _sampler(shaping, "systematic")
    est = np.array([math.exp(_run(s, 4, seed).info["log_ml"]) for seed in range(300)])
    se = est.std(ddof=1) / math.sqrt(est.size)
    assert abs(est.mean() - z) < 4 * se, (est.mean(), z, se)
    runs = [_weighted(_run(s, 512, seed)) for seed in range(6)]
    pooled = {y: float(np.mean([m.get(y, 0.0) for m in runs])) for y in target}
    assert _tv(pooled, target) < 0.05


class _FakeVerifier:
    name = "fake"

    def __init__(self, make: object) -> None:
        self.make = make
        self.calls = 0

    def verify(self, problem: Problem, samples: list) -> list:  # type: ignore[type-arg]
        self.calls += 1
        return [self.make(problem, s) for s in samples]  # type: ignore[operator]

    def info(self) -> dict[str, str]:
        return {"class": "fake"}


def test_verifier_potential_reads_prm_judge_orm_verdicts() -> None:
    from ttscale.samplers.potentials import VerifierPotential
    from ttscale.types import Verdict

    def prm(problem: Problem, s: object) -> Verdict:
        text = s.text  # type: ignore[attr-defined]
        if not text:
            return Verdict(problem.id, s.index, "invalid", "fake")  # type: ignore[attr-defined]
        p = 0.25 if "b" in text else 0.8
        return Verdict(
            problem.id,
            s.index,
            "scored",
            "fake",
            score=p,  # type: ignore[attr-defined]
            meta={"prob": p, "logit": math.log(p / (1 - p))},
        )

    v = _FakeVerifier(prm)
    texts, fin = ["a", "ab", ""], [False, True, False]
    assert VerifierPotential(v).score(PROB, texts, fin) == pytest.approx(
        [math.log(0.8), math.log(0.25), 0.0]
    )
    assert v.calls == 1  # one batched call for all prefixes
    assert VerifierPotential(v, value="prob").score(PROB, texts, fin) == pytest.approx(
        [0.8, 0.25, 0.0]
    )
    assert VerifierPotential(v, value="logit", missing=-math.inf).score(
        PROB, texts, fin
    ) == pytest.approx([math.log(4), math.log(1 / 3), -math.inf])

    def judge(problem: Problem, s: object) -> Verdict:
        return Verdict(problem.id, s.index, "scored", "j", score=3.0, meta={"p_yes": 0.6})  # type: ignore[attr-defined]

    assert VerifierPotential(_FakeVerifier(judge)).score(PROB, ["x"], [True])[0] == pytest.approx(
        math.log(0.6)
    )

    def exact(problem: Problem, s: object) -> Verdict:
        ok = "a" in s.text  # type: ignore[attr-defined]
        return Verdict(problem.id, s.index, "pass" if ok else "fail", "m", correct=ok)  # type: ignore[attr-defined]

    got = VerifierPotential(_FakeVerifier(exact)).score(PROB, ["a", "b"], [True, True])
    assert got[0] == 0.0 and got[1] == -math.inf
    with pytest.raises(ConfigError):
        VerifierPotential(object())


def test_verifier_potential_drives_smc() -> None:
    # an exact 0/1 verifier as the final potential: every kept particle with weight is accepted
    from ttscale.samplers.potentials import VerifierPotential
    from ttscale.types import Verdict

    def exact(problem: Problem, s: object) -> Verdict:
        ok = "b" not in s.text  # type: ignore[attr-defined]
        return Verdict(problem.id, s.index, "pass" if ok else "fail", "m", correct=ok)  # type: ignore[attr-defined]

    s = SMCSampler(
        _engine(),
        VerifierPotential(_FakeVerifier(exact)),
        SamplingParams(temperature=TEMP, max_tokens=H),
        step_stop=(),
        tokens_per_step=1,
        ess_threshold=1.0,
        progress=False,
    )
    lp = _log_p(_engine())
    z = math.fsum(math.exp(v) for y, v in lp.items() if "b" not in y)
    est = np.array([math.exp(_run(s, 4, seed).info["log_ml"]) for seed in range(200)])
    se = est.std(ddof=1) / math.sqrt(est.size)
    assert abs(est.mean() - z) < 4 * se, (est.mean(), z, se)
    res = _run(s, 8, 0)
    assert all("b" not in c.text for c in res.kept if c.log_weight > -math.inf)


def test_lineage_figure_draws_every_particle_step() -> None:
    from ttscale.samplers.smc import lineage_figure

    res = _run(_sampler("none", "multinomial"), 6, 3)
    fig = lineage_figure(res)
    ax_ess, ax_lin = fig.axes
    # one marker per particle-step (+3 empty legend handles), one segment per parent link
    assert len(ax_lin.collections) == len(res.candidates) + 3
    assert len(ax_lin.lines) == sum(c.parent is not None for c in res.candidates)
    assert list(ax_ess.lines[0].get_ydata()) == res.info["ess"]


def test_custom_resampler_hook_and_dead_particles_never_drawn() -> None:
    # a deterministic selector (the hook step-level search uses): every slot copies the best
    def best(rng: object, weights: np.ndarray, num: int) -> np.ndarray:
        return np.full(num, int(np.argmax(weights)))

    st = SMCState.initial(4)
    new, info = reweight(
        st, np.array([-1.0, 0.5, -math.inf, 0.2]), rng=0, scheme=best, ess_threshold=1.0
    )
    assert info.ancestors == (1, 1, 1, 1)
    assert np.allclose(new.log_weights, float(np.logaddexp.reduce([-1.0, 0.5, 0.2])) - math.log(4))
    with pytest.raises(ConfigError, match="ancestors"):
        reweight(st, np.zeros(4), rng=0, scheme=lambda r, w, n: [0], ess_threshold=1.0)
    # float trap: zero-weight (-inf) particles at the end are never drawn, whatever the scheme
    inc = np.array([-1e-300, 0.0, 0.0, -math.inf, -math.inf, -math.inf])
    for scheme in ("multinomial", "stratified", "systematic", "residual"):
        for seed in range(200):
            _, info = reweight(SMCState.initial(6), inc, rng=seed, scheme=scheme, ess_threshold=1.0)
            assert max(info.ancestors) <= 2, (scheme, seed, info.ancestors)
    s = SMCSampler(
        _engine(), log_potential, SamplingParams(temperature=TEMP, max_tokens=H),
        resample=best, step_stop=(), tokens_per_step=1, ess_threshold=1.0, progress=False,
    )  # fmt: skip
    res = _run(s, 4, 0)
    assert s.config()["resample"] == "best"
    assert all(len(set(i.ancestors)) == 1 for i in res.steps if i.resampled)


def test_particle_text_is_the_text_of_its_tokens() -> None:
    # a stop string ending inside a multi-character token: the engine trims its text to "x\n",
    # the particle keeps the token (text "x\ny") and continues after it, so its text is "x\nyz"
    from ttscale.engines.base import EngineCapabilities
    from ttscale.types import Completion

    class Words:
        name = "words"
        capabilities = EngineCapabilities(token_prefixes=True)

        def info(self) -> dict[str, str]:
            return {"engine": "words"}

        def decode(self, ids: list[int]) -> str:
            return "".join({1: "x\ny", 2: "z"}[int(t)] for t in ids)

        def generate(self, requests, params, on_result=None):  # type: ignore[no-untyped-def]
            out = []
            for r in requests:  # one completion per requested index (the engine contract)
                if not r.prefix_token_ids:
                    cs = [Completion(r.problem_id, i, "x\n", token_ids=(1,), finish_reason="stop",
                                     stop_reason="\n") for i in r.indices]  # fmt: skip
                else:
                    cs = [Completion(r.problem_id, i, "z", token_ids=(2,)) for i in r.indices]
                out.append(cs)
            return out

    s = SMCSampler(Words(), lambda p, t, f: [0.0] * len(t), SamplingParams(max_tokens=4),  # type: ignore[arg-type]
                   step_stop=("\n",), progress=False)  # fmt: skip
    res = _run(s, 2, 0)
    assert [c.text for c in res.kept] == ["x\nyz", "x\nyz"]


def test_sampler_contract_suite() -> None:
    from ttscale.testing import check_sampler

    def make(engine):  # type: ignore[no-untyped-def]
        return SMCSampler(
            engine, lambda p, t, f: [len(x) * 0.1 for x in t],
            SamplingParams(temperature=0.9, max_tokens=12), step_stop=(" ",), tokens_per_step=4,
            progress=False,
        )  # fmt: skip

    # a problem the engine failed in is journaled and resumed from its finished steps
    ran = check_sampler(make)
    assert ran == ["results", "reproducible", "prefix", "accounting", "sink", "salvage", "resume"]


def test_sink_resume_reads_back_the_same_population(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ttscale.store import SampleStore

    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    s = _sampler("difference", "residual")
    probs = [PROB, Problem("p1", "r:")]
    first = list(s.sample(probs, 6, seed=4, sink=store))
    calls = len(s.engine.calls)  # type: ignore[attr-defined]
    again = list(s.sample(probs, 6, seed=4, sink=SampleStore.open(store.path)))
    assert len(s.engine.calls) == calls  # type: ignore[attr-defined]  # nothing regenerated
    for a, b in zip(first, again, strict=True):
        assert b.resumed == len(a.candidates)
        assert [(c.index, c.text, c.fate, c.parent) for c in a.candidates] == [
            (c.index, c.text, c.fate, c.parent) for c in b.candidates
        ]
        assert b.info["log_ml"] == pytest.approx(a.info["log_ml"], abs=1e-12)
        assert b.generated_tokens == a.generated_tokens
    assert store.manifest["iid"] is False


def _two_problem_run() -> tuple[SMCSampler, list[Problem]]:
    # the reproduction: alphabet "ab", N=4, temperature 0.7, one token per step
    s = SMCSampler(
        _engine(), log_potential, SamplingParams(temperature=TEMP, max_tokens=4),
        step_stop=(), tokens_per_step=1, progress=False,
    )  # fmt: skip
    return s, [PROB, Problem("p1", "r:")]


@pytest.mark.parametrize("which", [1, 2])
def test_killed_between_storing_and_marking_done_resumes_without_double_counting(
    tmp_path, monkeypatch, which: int  # type: ignore[no-untyped-def]
) -> None:
    from ttscale.samplers.stepwise import StepRun
    from ttscale.store import SampleStore

    s, probs = _two_problem_run()
    full = list(s.sample(probs, 4, seed=1))
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    mark = StepRun.mark_done
    calls = {"n": 0}

    def killed(self, ids):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == which:
            raise KeyboardInterrupt  # after problem `which`'s particles are stored
        mark(self, ids)

    monkeypatch.setattr(StepRun, "mark_done", killed)
    with pytest.raises(KeyboardInterrupt):
        list(s.sample(probs, 4, seed=1, sink=store))
    monkeypatch.setattr(StepRun, "mark_done", mark)
    resumed = list(s.sample(probs, 4, seed=1, sink=SampleStore.open(store.path)))
    run = SampleStore.open(store.path)
    # every particle-step stored once, every generated token accounted once
    assert len(run) == sum(len(r.candidates) for r in full)
    assert run.accounting()["samples"] == len(run)
    assert run.accounting()["generated_tokens"] == sum(r.generated_tokens for r in full)
    # the stored-but-unmarked problem is read back, not rerun
    assert resumed[which - 1].resumed == len(full[which - 1].candidates)
    for a, b in zip(full, resumed, strict=True):
        assert [(c.index, c.text, c.fate, c.parent) for c in a.candidates] == [
            (c.index, c.text, c.fate, c.parent) for c in b.candidates
        ]
    assert sorted(run.manifest["smc_done"]["4"]) == ["p0", "p1"]


@pytest.mark.parametrize("in_flight", [1, None])
def test_failure_inside_a_problem_is_journaled_and_resumed_step_for_step(tmp_path, in_flight) -> None:  # type: ignore[no-untyped-def]
    # in_flight=1: the problems run one after another and the failure hits the second alone;
    # None: both are in flight, the failure hits both, and both resume from their journals
    from ttscale.engines.base import GenerationError
    from ttscale.samplers.stepwise import salvaged_keys
    from ttscale.store import SampleStore

    s, probs = _two_problem_run()
    full = list(s.sample(probs, 4, seed=1))
    total = sum(r.generated_tokens for r in full)
    # fail inside the second problem, after some of its particle-steps
    cut = len(full[0].candidates) + len(full[1].candidates) // 2
    failing = SMCSampler(
        ScriptedEngine(alphabet=ALPHA, order=2, eos_logprob=math.log(0.3), fail_after=cut),
        log_potential, SamplingParams(temperature=TEMP, max_tokens=4),
        step_stop=(), tokens_per_step=1, progress=False, max_problems=in_flight,
    )  # fmt: skip
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    with pytest.raises(GenerationError):
        list(failing.sample(probs, 4, seed=1, sink=store))
    journaled = salvaged_keys(store)
    if in_flight == 1:
        assert journaled and {pid for pid, _ in journaled} == {"p1"}
        # the interrupted attempt's tokens are not in the accounting until the problem is stored
        assert SampleStore.open(store.path).accounting()["generated_tokens"] == full[0].generated_tokens
    else:
        assert {pid for pid, _ in journaled} == {"p0", "p1"}
        # the engine generated `cut` particle-steps: those handed over are journaled, those
        # still in flight when it failed are lost, their tokens counted as discarded (at most
        # their whole length), since the loop hands over only finished requests
        made = [(r.problem_id, i) for r, _ in failing.engine.calls for i in r.indices][:cut]  # type: ignore[attr-defined]
        assert journaled <= set(made) and journaled
        length = {(r.problem_id, c.index): c.completion.num_tokens for r in full for c in r.candidates}
        lost = SampleStore.open(store.path).accounting()["generated_tokens"]
        assert lost <= sum(length[k] for k in set(made) - journaled)
    s2, _ = _two_problem_run()
    resumed = list(s2.sample(probs, 4, seed=1, sink=SampleStore.open(store.path)))
    asked = {(r.problem_id, i) for r, _ in s2.engine.calls for i in r.indices}  # type: ignore[attr-defined]
    assert not asked & journaled  # nothing the failed attempt finished is generated again
    if in_flight == 1:
        assert resumed[1].resumed == len(journaled)
    else:
        assert [r.resumed for r in resumed] == [
            sum(pid == r.problem_id for pid, _ in journaled) for r in resumed
        ]
    for a, b in zip(full, resumed, strict=True):
        assert [(c.index, c.text, c.fate, c.parent, c.log_weight) for c in a.candidates] == [
            (c.index, c.text, c.fate, c.parent, c.log_weight) for c in b.candidates
        ]
        assert b.info["log_ml"] == pytest.approx(a.info["log_ml"], abs=1e-12)
    run = SampleStore.open(store.path)
    assert run.accounting()["generated_tokens"] == total + (0 if in_flight == 1 else lost)
    assert len(run) == sum(len(r.candidates) for r in full)
    assert not salvaged_keys(run)  # the journal goes once the problem is stored


class _BatchOnly(ScriptedEngine):
    """The scripted engine without its own engine loop (the scheduler coalesces into calls)."""

    open_loop = None


def test_one_engine_call_per_step_with_per_request_token_caps() -> None:
    # particles of different lengths near max_tokens share one call: each request carries its
    # own cap (GenerationRequest.max_tokens) instead of one call per distinct cap. An engine
    # with batch generate only (the engine loop coalesces what is pending into one call)
    eng = _BatchOnly()
    calls: list[list[GenerationRequest]] = []
    inner = eng.generate

    def counting(requests, params, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(requests))
        return inner(requests, params, **kw)

    eng.generate = counting  # type: ignore[method-assign]
    s = SMCSampler(eng, lambda p, t, f: [0.0] * len(t), SamplingParams(max_tokens=9),
                   step_stop=(" ",), tokens_per_step=4, progress=False)  # fmt: skip
    (res,) = list(s.sample([PROB], 8, seed=3))
    assert len(calls) == res.info["steps"]
    # a call where a capped particle goes with others (before: one call per distinct cap)
    assert any(len({r.max_tokens for r in call}) >= 2 for call in calls)
    for call in calls:
        for r in call:
            assert r.max_tokens is None or r.max_tokens == 9 - len(r.prefix_token_ids) < 4
    assert all(c.completion.num_tokens <= 4 for c in res.candidates)
    assert all(len(c.text) <= 9 for c in res.kept)  # one character per toy token
    # the continuous loop honours each request's cap too: the same particles
    s2 = SMCSampler(ScriptedEngine(), lambda p, t, f: [0.0] * len(t), SamplingParams(max_tokens=9),
                    step_stop=(" ",), tokens_per_step=4, progress=False)  # fmt: skip
    (res2,) = list(s2.sample([PROB], 8, seed=3))
    assert [(c.index, c.text, c.log_weight) for c in res2.candidates] == [
        (c.index, c.text, c.log_weight) for c in res.candidates
    ]


def test_shaping_objects_own_their_statistics_and_state_holds_the_particles() -> None:
    from ttscale.samplers.smc import FKSteering, LogPotential, make_shaping

    # a user-written shaping (the log-potential one, by hand) runs the same SMC as "none"
    class MyShaping:
        name = "mine"
        replaces_weights = False

        def initial(self, n):  # type: ignore[no-untyped-def]
            return {"last": np.zeros(n)}

        def step(self, values, stats, finished):  # type: ignore[no-untyped-def]
            return values - stats["last"], {"last": values}

    a = _run(_sampler("none", "systematic", 0.5), 6, 2)
    s = _sampler("none", "systematic", 0.5)
    s2 = SMCSampler(s.engine, log_potential, s.params, shaping=MyShaping(), ess_threshold=0.5,  # type: ignore[arg-type]
                    step_stop=(), tokens_per_step=1, progress=False)  # fmt: skip
    b = _run(s2, 6, 2)
    assert [(c.index, c.text, c.fate, c.log_weight) for c in a.candidates] == [
        (c.index, c.text, c.fate, c.log_weight) for c in b.candidates
    ]
    assert s2.config()["shaping"] == "mine"
    assert isinstance(make_shaping("none"), LogPotential)
    assert make_shaping("max", lam=2.0) == FKSteering("max", 2.0)
    with pytest.raises(ConfigError, match="shaping"):
        SMCSampler(s.engine, log_potential, s.params, shaping=object())  # type: ignore[arg-type]
    # resampling gathers every field at once: particles, weights, shaping statistics
    st = SMCState.initial(3, FKSteering("sum", 1.0))
    texts = np.empty(3, object)
    texts[:] = ["x", "y", "z"]
    toks = np.empty(3, object)
    toks[:] = [(1,), (2,), (3,)]
    st = replace(st, texts=texts, tokens=toks, stats={"r_prev": np.array([0.1, 0.2, 0.3]),
                                                       "log_pi": np.zeros(3)})  # fmt: skip
    g = st.take(np.array([2, 2, 0]))
    assert list(g.texts) == ["z", "z", "x"] and list(g.tokens) == [(3,), (3,), (1,)]
    assert g.stats["r_prev"].tolist() == [0.3, 0.3, 0.1]


def test_a_journal_is_replayed_only_by_the_engine_that_made_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ttscale.engines.base import GenerationError
    from ttscale.samplers.stepwise import StepRun
    from ttscale.store import SampleStore

    params = SamplingParams(temperature=TEMP, max_tokens=4)
    kw: dict[str, object] = {"step_stop": (), "tokens_per_step": 1, "progress": False}
    # batch generate only: every sample made before the failure is handed over (on the
    # continuous loop a request still in flight when the engine fails is lost)
    failing = _BatchOnly(alphabet=ALPHA, order=2, fail_after=5)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    with pytest.raises(GenerationError):
        list(SMCSampler(failing, log_potential, params, **kw).sample([PROB], 4, seed=1, sink=store))  # type: ignore[arg-type]
    same = StepRun(store, "smc", 4, "SMC", _engine().info())
    assert len(same.journal(PROB.id)) == 5
    other = ScriptedEngine(alphabet=ALPHA, order=3)
    assert StepRun(store, "smc", 4, "SMC", other.info()).journal(PROB.id) == {}
    (res,) = list(SMCSampler(other, log_potential, params, **kw).sample([PROB], 4, seed=1, sink=SampleStore.open(store.path)))  # type: ignore[arg-type]
    assert res.resumed == 0  # rerun from its start with the new model


def test_per_request_caps_on_a_real_model(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    # HF: particles with different remaining budgets share each step's call, each capped by its
    # own max_tokens; no particle ever holds more than max_tokens tokens
    pytest.importorskip("torch")
    from ttscale.engines.hf import HFEngine

    class _BatchOnlyHF(HFEngine):  # its generate calls are counted (its own loop has none)
        open_loop = None  # type: ignore[assignment]

    eng = _BatchOnlyHF(tiny_model_dir, batch_size=8)
    calls: list[list[GenerationRequest]] = []
    inner = eng.generate

    def counting(requests, params, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(requests))
        return inner(requests, params, **kw)

    eng.generate = counting  # type: ignore[method-assign]
    s = SMCSampler(eng, lambda p, t, f: [0.0] * len(t), SamplingParams(max_tokens=7, seed=2),
                   step_stop=(), tokens_per_step=3, progress=False)  # fmt: skip
    (res,) = list(s.sample([Problem("p", "1 + 2 =")], 4, seed=2))
    assert len(calls) == res.info["steps"]
    assert {r.max_tokens for call in calls for r in call} - {None} == {1}  # 3 + 3 + 1
    by = {c.index: c for c in res.candidates}
    for c in res.kept:
        ids: tuple[int, ...] = ()
        node = c
        while True:
            ids = tuple(node.completion.token_ids or ()) + ids
            if node.parent is None:
                break
            node = by[node.parent]
        assert len(ids) <= 7 and c.text == eng.decode(ids)
    # the hf engine loop caps each request alike: the same particles
    s2 = SMCSampler(HFEngine(tiny_model_dir, batch_size=8), lambda p, t, f: [0.0] * len(t),
                    SamplingParams(max_tokens=7, seed=2), step_stop=(), tokens_per_step=3,
                    progress=False)  # fmt: skip
    (res2,) = list(s2.sample([Problem("p", "1 + 2 =")], 4, seed=2))
    assert [(c.index, c.text, c.parent) for c in res2.candidates] == [
        (c.index, c.text, c.parent) for c in res.candidates
    ]


@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
def test_results_do_not_depend_on_problems_in_flight(ess_threshold: float) -> None:
    # every problem's particles share the engine loop; requests come back in an order that
    # depends on what else is in flight, but seeds are per (problem, candidate, step) and
    # resampling per problem: one problem at a time and all at once give the same run
    probs = [Problem(f"q{k}", f"{k}:") for k in range(5)]

    def run(**kw: object) -> list:  # type: ignore[type-arg]
        s = SMCSampler(
            ScriptedEngine(alphabet=ALPHA, order=2, eos_logprob=math.log(0.3)), log_potential,
            SamplingParams(temperature=TEMP, max_tokens=6), ess_threshold=ess_threshold, step_stop=(),
            tokens_per_step=2, progress=False, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        return list(s.sample(probs, 4, seed=7))

    one = run(max_problems=1)
    for many in (run(), run(max_problems=3, batch_size=5)):
        assert [r.problem_id for r in many] == [p.id for p in probs]
        for a, b in zip(one, many, strict=True):
            assert [(c.index, c.text, c.fate, c.parent, c.log_weight) for c in a.candidates] == [
                (c.index, c.text, c.fate, c.parent, c.log_weight) for c in b.candidates
            ]
            assert a.info["final_log_weights"] == b.info["final_log_weights"]
            assert a.info["ancestors"] == b.info["ancestors"]
            assert a.generated_tokens == b.generated_tokens
            assert a.info["log_ml"] == b.info["log_ml"]


class _OnePerIndex(_BatchOnly):
    """An engine that answers a request of several indices as that many one-index requests
    (what SMC sent before particles with one prefix were grouped): the reference."""

    def generate(self, requests, params, on_result=None, **kw):  # type: ignore[no-untyped-def]
        single = [replace(r, indices=(i,)) for r in requests for i in r.indices]
        got = iter(super().generate(single, params, **kw))
        out = [[next(got)[0] for _ in r.indices] for r in requests]
        for k, comps in enumerate(out):
            if on_result is not None:
                on_result(k, comps)
        return out


@pytest.mark.parametrize("ess_threshold", [0.0, 1.0])
def test_particles_with_one_prefix_share_a_request_and_the_results_are_the_same(
    ess_threshold: float,
) -> None:
    # step 0 is one request of N indices per problem, and after resampling the copies of an
    # ancestor (consecutive slots, one prefix) are one request: the same particles, weights and
    # log_ml as one request per particle, since seeds are per (problem, candidate, step)
    probs = [Problem(f"q{k}", f"{k}:") for k in range(3)]
    seen: list[GenerationRequest] = []

    def run(eng: ScriptedEngine) -> list:  # type: ignore[type-arg]
        s = SMCSampler(
            eng, log_potential, SamplingParams(temperature=TEMP, max_tokens=6),
            ess_threshold=ess_threshold, step_stop=(), tokens_per_step=2, progress=False,
        )  # fmt: skip
        return list(s.sample(probs, 6, seed=11))

    grouped_eng = _BatchOnly(alphabet=ALPHA, order=2, eos_logprob=math.log(0.3))
    inner = grouped_eng.generate

    def recording(requests, params, **kw):  # type: ignore[no-untyped-def]
        seen.extend(requests)
        return inner(requests, params, **kw)

    grouped_eng.generate = recording  # type: ignore[method-assign]
    grouped = run(grouped_eng)
    reference = run(_OnePerIndex(alphabet=ALPHA, order=2, eos_logprob=math.log(0.3)))
    for a, b in zip(reference, grouped, strict=True):
        assert [(c.index, c.text, c.fate, c.parent, c.log_weight) for c in a.candidates] == [
            (c.index, c.text, c.fate, c.parent, c.log_weight) for c in b.candidates
        ]
        assert a.info["ancestors"] == b.info["ancestors"]
        assert a.info["log_ml"] == b.info["log_ml"]
        assert a.generated_tokens == b.generated_tokens
    first = [r for r in seen if r.step == 0]
    assert sorted((r.problem_id, r.indices) for r in first) == [(p.id, tuple(range(6))) for p in probs]
    later = [r for r in seen if r.step > 0]
    for r in later:  # a request's indices are consecutive slots of one step
        assert list(r.indices) == list(range(r.indices[0], r.indices[0] + len(r.indices)))
    if ess_threshold == 1.0:  # resampled every step: copies of one ancestor went together
        assert any(len(r.indices) > 1 for r in later)
    # and each request holds every particle of its step with that prefix in adjacent slots
    by_step: dict[tuple[str, int], list[GenerationRequest]] = {}
    for r in later:
        by_step.setdefault((r.problem_id, r.step), []).append(r)
    for reqs in by_step.values():
        reqs.sort(key=lambda r: r.indices[0])
        for x, y in itertools.pairwise(reqs):
            if x.indices[-1] + 1 == y.indices[0]:
                assert x.prefix_token_ids != y.prefix_token_ids
