"""AdaptiveSampler (level 1) and exact replay: live = replay, token accounting, run records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.replay import replay
from ttscale.samplers import RepeatedSampler, Sampler
from ttscale.samplers.adaptive import AdaptiveSampler, read_decisions
from ttscale.store import SampleStore
from ttscale.store.pool import Pool
from ttscale.types import Problem, SamplingParams


def responder(req, index, seed, params):  # type: ignore[no-untyped-def]
    # a skewed answer distribution decided by the per-sample seed; varying lengths
    h = seed % 10
    ans = "a" if h < 8 else ("b" if h < 9 else "c")
    return "x" * (seed % 7) + ans


def last_char(problem, comps):  # type: ignore[no-untyped-def]
    return [c.text[-1] if c.text else None for c in comps]


PROBLEMS = [Problem(id=f"p{i}", prompt=f"q{i}") for i in range(12)]
PARAMS = SamplingParams(n=16, max_tokens=20)


def full_pool(budget: int = 16) -> tuple[Pool, dict[str, list[int]]]:
    rep = RepeatedSampler(ScriptedEngine(responder), PARAMS)
    results = list(rep.sample(PROBLEMS, budget, seed=3))
    answers, tokens = [], []
    for r in results:
        answers += last_char(r.problem, r.completions)
        tokens += [c.completion.num_tokens for c in r.candidates]
    pool = Pool.from_arrays(
        [p.id for p in PROBLEMS],
        [budget] * len(PROBLEMS),
        answer=answers,
        correct=[a == "a" for a in answers],
        num_tokens=tokens,
    )
    toks = {r.problem_id: [c.completion.num_tokens for c in r.candidates] for r in results}
    return pool, toks


@pytest.mark.parametrize("rule", ["beta:0.95", "esc:window=4", "majority:0.7", "sprt:p1=0.75", "entropy:0.75"])
def test_live_equals_index_order_replay(rule: str) -> None:
    pool, toks = full_pool()
    rep = replay(pool, rule, orders=None, max_samples=16)
    # ahead=0: no sample drawn beyond the stop, so the tokens spent are the replay's too
    sampler = AdaptiveSampler(ScriptedEngine(responder), PARAMS, rule, last_char, batch_size=7, ahead=0)
    assert isinstance(sampler, Sampler)
    results = list(sampler.sample(PROBLEMS, 16, seed=3))
    assert [r.problem_id for r in results] == [p.id for p in PROBLEMS]
    for r, d, pr in zip(results, sampler.decisions, rep.problems, strict=True):
        assert (d.used, d.answer) == (pr.used[0], pr.answers[0]), r.problem_id
        assert len(r.candidates) == d.used
        # the live samples are the fixed run's first samples, tokens and all
        assert [c.completion.num_tokens for c in r.candidates] == toks[r.problem_id][: d.used]
        assert r.generated_tokens == sum(toks[r.problem_id][: d.used]) == pr.tokens
    # the rule saves samples on this skewed stream
    assert sum(d.used for d in sampler.decisions) < 16 * len(PROBLEMS)


def test_rounds_keep_calls_full_and_count_overdrawn_tokens() -> None:
    engine = ScriptedEngine(responder)
    sampler = AdaptiveSampler(
        engine, PARAMS, "beta:0.95", last_char, round_size=4, batch_size=1000, ahead=0
    )
    results = list(sampler.sample(PROBLEMS, 16, seed=3))
    pool, toks = full_pool()
    rep = replay(pool, "beta:0.95", orders=None)
    for r, d, pr in zip(results, sampler.decisions, rep.problems, strict=True):
        assert d.used == pr.used[0]
        # samples are drawn 4 at a time: drawn = used rounded up to a multiple of 4, and the
        # overdrawn samples' tokens are counted
        assert d.drawn == -(-d.used // 4) * 4
        assert r.generated_tokens == sum(toks[r.problem_id][: d.drawn])
        assert len(r.candidates) == d.used
    # one engine call per round, holding exactly the problems still running (4 samples each)
    n_calls = max(d.rounds for d in sampler.decisions)
    running = [sum(1 for d in sampler.decisions if d.rounds > k) for k in range(n_calls)]
    assert running[0] == len(PROBLEMS)
    sizes = [sum(len(req.indices) for req in call) for call in _calls(engine)]
    assert sizes == [4 * k for k in running]


def _calls(engine: ScriptedEngine) -> list[list]:  # type: ignore[type-arg]
    # ScriptedEngine.calls records (request, params) per request; group by the sample indices
    # (each round asks every running problem for the same indices)
    groups: dict[int, list] = {}  # type: ignore[type-arg]
    for req, _ in engine.calls:
        groups.setdefault(req.indices[0], []).append(req)
    return [groups[k] for k in sorted(groups)]


def test_sink_records_decisions_and_resumes(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "run", {"benchmark": "toy"})
    sampler = AdaptiveSampler(ScriptedEngine(responder), PARAMS, "esc:window=4", last_char)
    results = list(sampler.sample(PROBLEMS, 16, seed=3, sink=store))
    rows = read_decisions(store.path)
    assert [r["problem_id"] for r in rows] == [p.id for p in PROBLEMS]
    for row, r in zip(rows, results, strict=True):
        assert row["rule"] == "esc:window=4" and row["used"] == len(r.candidates)
        assert row["reason"] == "budget" or row["reason"].startswith(f"window {row['used'] // 4} ")
    assert store.manifest["adaptive"] == {
        "rule": "esc:window=4", "budget": 16, "tie": "first", "batch_size": sampler.batch_size
    }
    store.refresh()
    assert len(store) == sum(r["drawn"] for r in rows)
    assert store.accounting()["generated_tokens"] == sum(r["generated_tokens"] for r in rows)
    # a second session reads every sample back: nothing is generated, same decisions
    engine = ScriptedEngine(responder)
    again = AdaptiveSampler(engine, PARAMS, "esc:window=4", last_char)
    res2 = list(again.sample(PROBLEMS, 16, seed=3, sink=SampleStore.open(store.path)))
    assert engine.calls == []
    assert [d.used for d in again.decisions] == [r["used"] for r in rows]
    assert all(r.resumed == len(r.candidates) for r in res2)


def test_merge_from_carries_the_decisions(tmp_path: Path) -> None:
    """``SampleStore.merge_from`` (the Python API) carries the stopping record with the samples,
    as ``ttscale merge`` does, for every file a run kind writes beside its samples."""
    from ttscale.samplers.budget import BUDGET_FILE
    from ttscale.samplers.shortmk import SHORTMK_FILE
    from ttscale.store.samplestore import DECISION_FILES

    assert set(DECISION_FILES) == {"adaptive.jsonl", SHORTMK_FILE, BUDGET_FILE}
    whole = SampleStore.create(tmp_path / "whole", {"benchmark": "toy"})
    list(AdaptiveSampler(ScriptedEngine(responder), PARAMS, "beta:0.95", last_char).sample(PROBLEMS, 16, seed=3, sink=whole))
    runs = [SampleStore.create(tmp_path / f"s{i}", {"benchmark": "toy"}) for i in range(2)]
    for run, part in zip(runs, (PROBLEMS[::2], PROBLEMS[1::2]), strict=True):  # two workers' shares
        s = AdaptiveSampler(ScriptedEngine(responder), PARAMS, "beta:0.95", last_char)
        list(s.sample(part, 16, seed=3, sink=run))
    assert 0 < len(read_decisions(runs[0].path)) < len(PROBLEMS)
    shards = {r["problem_id"]: r for run in runs for r in read_decisions(run.path)}
    runs[0].merge_from(runs[1])
    merged = {r["problem_id"]: r for r in read_decisions(runs[0].path)}
    assert merged == shards and len(merged) == len(PROBLEMS)  # every row, as its shard wrote it
    # the decisions are the whole run's (what was drawn ahead depends on who else was in flight)
    fields = ("used", "answer", "stopped", "reason")
    assert {p: [r[f] for f in fields] for p, r in merged.items()} == {
        r["problem_id"]: [r[f] for f in fields] for r in read_decisions(whole.path)
    }
    text = (runs[0].path / "adaptive.jsonl").read_text()
    runs[0].merge_from(runs[1])  # again: nothing added
    assert (runs[0].path / "adaptive.jsonl").read_text() == text


def test_replay_hand_computed_pool() -> None:
    # p0: a a a a b ... (beta stops at 4, "a" correct); p1: a b a b a b (never settles; tie a/b
    # at 6 -> first seen "a", wrong)
    pool = Pool.from_arrays(
        ["p0", "p1"],
        [6, 6],
        answer=list("aaaaba") + list("ababab"),
        correct=[1, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],  # p0 then p1
        num_tokens=[10, 20, 30, 40, 50, 60, 1, 2, 3, 4, 5, 6],
    )
    rep = replay(pool, "beta:0.95", orders=None)
    p0, p1 = rep.problems
    assert (p0.used, p0.answers, p0.correct, p0.tokens) == ((4,), ("a",), 1.0, 100.0)
    assert (p1.used, p1.answers, p1.correct, p1.tokens) == ((6,), ("a",), 0.0, 21.0)
    assert (p0.fixed_tokens, p1.fixed_tokens, p1.fixed_correct) == (210.0, 21.0, 0.0)
    d = rep.to_dict()
    assert d["accuracy"]["mean"] == 0.5 and d["samples"]["mean"] == 5.0
    assert d["tokens"]["mean"] == pytest.approx(60.5) and d["fixed"]["tokens"]["mean"] == pytest.approx(115.5)
    assert d["token_ratio"]["mean"] == pytest.approx(121 / 231)
    # tie=expected averages the tied answers' correctness: (0 + 1) / 2
    assert replay(pool, "beta:0.95", orders=None, tie="expected").problems[1].correct == 0.5
    # --max-samples 4: p1 "abab" tie -> "a"
    assert replay(pool, "fixed", orders=None, max_samples=4).problems[1].tokens == 10.0
    with pytest.raises(ConfigError, match="exceeds"):
        replay(pool, "beta", max_samples=7)


def test_replay_random_orders_are_seeded_permutations() -> None:
    pool, _ = full_pool()
    a = replay(pool, "beta:0.95", orders=5, seed=1)
    b = replay(pool, "beta:0.95", orders=5, seed=1)
    c = replay(pool, "beta:0.95", orders=5, seed=2)
    assert a.to_dict() == b.to_dict()
    assert [p.used for p in a.problems] != [p.used for p in c.problems]
    # each order is a replay of a permuted stream: check one by hand
    from ttscale.select.adaptive import parse_rule, run_stream

    lo, hi = int(pool.offsets[0]), int(pool.offsets[1])
    codes = pool.answer[lo:hi]
    perm = np.random.default_rng([1, 0, 2]).permutation(hi - lo)
    stream = [str(pool.answer_values[c]) for c in codes[perm]]
    assert a.problems[0].used[2] == run_stream(parse_rule("beta:0.95"), stream).used
    # every order's fixed baseline uses the whole budget
    assert all(p.fixed_tokens == pytest.approx(float(pool.num_tokens[int(pool.offsets[i]):int(pool.offsets[i + 1])].sum()))
               for i, p in enumerate(a.problems))


def test_replay_without_token_counts_reports_none() -> None:
    pool = Pool.from_arrays(["p"], [4], answer=list("aaaa"), correct=[1, 1, 1, 1])
    d = replay(pool, "beta", orders=None).to_dict()
    assert d["tokens"] is None and d["token_ratio"]["mean"] is None and d["samples"]["mean"] == 4.0


def test_replay_of_an_imported_jsonl_pool(tmp_path: Path) -> None:
    from ttscale.store import import_jsonl

    rows = [
        {"problem_id": pid, "index": i, "answer": a, "correct": a == "a", "num_tokens": 5}
        for pid, s in (("p0", "aaaab"), ("p1", "abcab"))
        for i, a in enumerate(s)
    ]
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    store, _ = import_jsonl(f, tmp_path / "run")
    rep = replay(store.pool(), "beta:0.95", orders=None)
    assert [p.used[0] for p in rep.problems] == [4, 5]
    assert [p.tokens for p in rep.problems] == [20.0, 25.0]


def test_live_random_ties_match_the_index_order_replay() -> None:
    def two(req, index, seed, params):  # type: ignore[no-untyped-def]
        return "ab"[seed % 2]

    problems = [Problem(id=f"t{i}", prompt="q") for i in range(30)]
    live = AdaptiveSampler(ScriptedEngine(two), PARAMS, "fixed", last_char, tie="random")
    list(live.sample(problems, 4, seed=3))
    answers = []
    for r in RepeatedSampler(ScriptedEngine(two), PARAMS).sample(problems, 4, seed=3):
        answers += last_char(r.problem, r.completions)
    pool = Pool.from_arrays([p.id for p in problems], [4] * 30, answer=answers)
    rep = replay(pool, "fixed", orders=None, tie="random", seed=3, require_correctness=False)
    assert [d.answer for d in live.decisions] == [p.answers[0] for p in rep.problems]
    # ties happen (2-2 splits) and are broken both ways
    tied = [i for i in range(30) if answers[4 * i : 4 * i + 4].count("a") == 2]
    assert {live.decisions[i].answer for i in tied} == {"a", "b"}


def test_deepconf_live_equals_replay_with_stored_confidences(tmp_path: Path) -> None:
    from ttscale.analysis import run_confidences

    params = SamplingParams(n=16, max_tokens=20, logprobs=5)
    store = SampleStore.create(tmp_path / "full", {"benchmark": "toy"})
    rep_sampler = RepeatedSampler(ScriptedEngine(responder), params, store)
    rep_sampler.run(PROBLEMS, 16)
    store.refresh()
    t = store.table(["text", "num_tokens"]).to_pylist()  # the order run_confidences uses
    answers = [r["text"][-1] for r in t]
    ids = list(dict.fromkeys(r["problem_id"] for r in t))
    assert [(r["problem_id"], r["index"]) for r in t] == [(i, k) for i in ids for k in range(16)]
    pool = Pool.from_arrays(ids, [16] * len(ids), answer=answers, num_tokens=[r["num_tokens"] for r in t])
    confs = run_confidences(store)
    assert np.isfinite(confs).all()
    rule = "deepconf:0.9,warmup=4"
    rep = replay(pool, rule, orders=None, confidences=confs, require_correctness=False)
    live = AdaptiveSampler(ScriptedEngine(responder), params, rule, last_char)
    list(live.sample(PROBLEMS, 16, seed=params.seed))
    by_id = {p.problem_id: (p.used[0], p.answers[0]) for p in rep.problems}
    assert [(d.used, d.answer) for d in live.decisions] == [by_id[p.id] for p in PROBLEMS]
    assert any(d.stopped for d in live.decisions) and not all(d.stopped for d in live.decisions)


def test_replay_accuracy_delta_is_paired() -> None:
    # majority:0.6,min=2 stops p0 "aabbbb" at 2 with "a" (wrong; SC picks "b", right): -1;
    # p1 "bbbbbb": both right: 0 -> mean -0.5
    pool = Pool.from_arrays(["p0", "p1"], [6, 6], answer=list("aabbbb") + list("bbbbbb"),
                            correct=[a == "b" for a in "aabbbbbbbbbb"])
    d = replay(pool, "majority:0.6,min=2", orders=None).to_dict()
    assert d["accuracy_delta"]["mean"] == -0.5
    assert d["accuracy"]["mean"] == 0.5 and d["fixed"]["accuracy"]["mean"] == 1.0


# ---- fixes found on the real pools (issue 18) ---------------------------------------------------


def test_replay_refuses_a_pool_without_correctness(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ttscale.cli.app import app
    from ttscale.store import import_jsonl

    rows = [{"problem_id": "p", "index": i, "answer": "a", "correct": None} for i in range(4)]
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    store, _ = import_jsonl(f, tmp_path / "run")
    with pytest.raises(ConfigError, match="verify"):
        replay(store.pool(), "beta", orders=None)
    r = CliRunner().invoke(app, ["replay", str(tmp_path / "run"), "--rule", "beta", "--order", "index"])
    assert r.exit_code == 1 and "ttscale verify RUN" in r.output
    assert "Traceback" not in r.output


def test_esc_and_its_baseline_end_at_the_same_cap() -> None:
    # 12 samples, window 5: ESC can use 10; on a stream where no window is unanimous the rule
    # and SC both use 10 samples and the same tokens (ratio 1, not 0.83)
    stream = list("abababababab")
    pool = Pool.from_arrays(["p"], [12], answer=stream, correct=[a == "a" for a in stream],
                            num_tokens=list(range(1, 13)))
    rep = replay(pool, "esc:window=5", orders=3, seed=0)
    assert rep.max_samples == 10
    d = rep.to_dict()
    assert d["token_ratio"]["mean"] == pytest.approx(1.0)
    assert d["sample_ratio"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert d["accuracy_delta"]["mean"] == 0.0
    assert d["fixed"]["samples"]["mean"] == 10.0


def test_sample_ratio_has_a_bootstrap_ci() -> None:
    pool, _ = full_pool()
    rep = replay(pool, "beta:0.95", orders=4, seed=0)
    r = rep.to_dict()["sample_ratio"]
    used = rep.column("samples")
    assert r["mean"] == pytest.approx(used.sum() / (16 * len(used)))
    # same resampling as the token ratio: problems drawn with replacement, seeded
    idx = np.random.default_rng(0).integers(0, len(used), size=(1000, len(used)))
    ratios = used[idx].sum(axis=1) / (16.0 * len(used))
    assert (r["low"], r["high"]) == pytest.approx((np.quantile(ratios, 0.025), np.quantile(ratios, 0.975)))
    assert r["low"] < r["mean"] < r["high"]


def test_dirichlet_closed_form_matches_quadrature() -> None:
    from ttscale.select.stopping import dirichlet_top_probability, dirichlet_top_probability_exact

    rng = np.random.default_rng(0)
    for _ in range(40):
        k = int(rng.integers(2, 6))
        counts = sorted((int(x) for x in rng.integers(0, 25, size=k)), reverse=True)
        assert dirichlet_top_probability_exact(counts) == pytest.approx(
            dirichlet_top_probability(counts), abs=1e-9
        )


class _Recording(ScriptedEngine):
    """A scripted engine that keeps its engine loops, whose ``started`` says what entered the
    engine in which order."""

    def __init__(self) -> None:
        super().__init__(responder)
        self.loops: list = []  # type: ignore[type-arg]

    def open_loop(self, params, *, tokens_per_poll=4):  # type: ignore[no-untyped-def]
        loop = super().open_loop(params, tokens_per_poll=tokens_per_poll)
        self.loops.append(loop)
        return loop


def test_priority_runs_every_problems_low_indices_first_with_the_same_results() -> None:
    runs = {}
    for name, kw in (("priority", {}), ("spare", {"priority": False}), ("ahead0", {"ahead": 0})):
        engine = _Recording()
        sampler = AdaptiveSampler(engine, PARAMS, "beta:0.95", last_char, batch_size=8, **kw)
        results = list(sampler.sample(PROBLEMS, 16, seed=3))
        started = [s for loop in engine.loops for s in loop.started]
        runs[name] = (results, sampler.decisions, started)
    res, decisions, started = runs["priority"]
    # the whole budget was queued, yet samples entered the engine in index order across
    # problems: no problem's sample i started before another's sample j < i (priority = index)
    firsts = [s[1][0] for s in started]
    assert firsts == sorted(firsts) and [s[2] for s in started] == firsts
    # ... and a problem's queued samples past its stop never started (aborted at no cost)
    for d in decisions:
        mine = [i for pid, idx, _ in started if pid == d.problem_id for i in idx]
        assert mine == list(range(len(mine))) and len(mine) <= 16
        assert len(mine) >= d.used
    # the spare-room window, by contrast, starts some problem's later samples before another's
    # earlier ones (so the check above can fail)
    spare_firsts = [s[1][0] for s in runs["spare"][2]]
    assert spare_firsts != sorted(spare_firsts)
    # results never depend on the order: the same decisions and kept samples in every mode,
    # and every drawn token counted (the replay's tokens with ahead=0, at least those with more)
    sig = {
        n: ([(d.used, d.answer, d.stopped, d.reason) for d in ds],
            [[(c.completion.index, c.completion.text) for c in r.candidates] for r in rs])
        for n, (rs, ds, _) in runs.items()
    }  # fmt: skip
    assert sig["priority"] == sig["spare"] == sig["ahead0"]
    pool, toks = full_pool()
    rep = replay(pool, "beta:0.95", orders=None, max_samples=16)
    for r, d, pr in zip(res, decisions, rep.problems, strict=True):
        assert (d.used, d.answer) == (pr.used[0], pr.answers[0])
        # every token of a started sample counted up to where it stopped (finished ones whole,
        # aborted ones in part), none of a queued sample that never started
        begun = sum(toks[r.problem_id][i] for pid, idx, _ in started if pid == r.problem_id for i in idx)
        assert pr.tokens <= r.generated_tokens == d.generated_tokens <= begun
        assert d.generated_tokens - d.aborted_tokens >= sum(toks[r.problem_id][: d.used])
    assert sum(d.drawn for d in decisions) < 16 * len(PROBLEMS)


class _Peak(ScriptedEngine):
    """A scripted engine whose loops record the most samples they ever held at once."""

    def __init__(self) -> None:
        super().__init__(responder)
        self.peak = 0

    def open_loop(self, params, *, tokens_per_poll=4):  # type: ignore[no-untyped-def]
        loop = super().open_loop(params, tokens_per_poll=tokens_per_poll)
        submit = loop.submit

        def counted(request, on_token=None, priority=0):  # type: ignore[no-untyped-def]
            t = submit(request, on_token, priority)
            self.peak = max(self.peak, loop.in_flight)
            return t

        loop.submit = counted  # type: ignore[method-assign]
        return loop


def test_bound_on_samples_in_flight_changes_no_result_and_cuts_the_overdraw() -> None:
    runs = {}
    for bound in (1, 5, 1000):
        engine = _Peak()
        sampler = AdaptiveSampler(engine, PARAMS, "beta:0.95", last_char, batch_size=bound)
        results = list(sampler.sample(PROBLEMS, 16, seed=3))
        runs[bound] = (results, sampler.decisions, engine.peak)
    # the engine never held more samples than the bound (with 1000, the whole budget at once)
    assert runs[1][2] == 1 and runs[5][2] == 5 and runs[1000][2] == 16 * len(PROBLEMS)
    sig = {
        b: ([(d.used, d.answer, d.stopped, d.reason) for d in ds],
            [[(c.completion.index, c.completion.text) for c in r.candidates] for r in rs])
        for b, (rs, ds, _) in runs.items()
    }  # fmt: skip
    assert sig[1] == sig[5] == sig[1000]
    pool, toks = full_pool()
    rep = replay(pool, "beta:0.95", orders=None, max_samples=16)
    # one sample in flight: a problem's next sample starts only after the rule read the last,
    # so nothing is drawn beyond a stop and the tokens are exactly the replay's
    for r, d, pr in zip(runs[1][0], runs[1][1], rep.problems, strict=True):
        assert d.drawn == d.used == pr.used[0] and d.aborted_tokens == 0
        assert r.generated_tokens == pr.tokens == sum(toks[r.problem_id][: d.used])
    drawn = {b: sum(d.drawn for d in ds) for b, (_, ds, _) in runs.items()}
    tokens = {b: sum(r.generated_tokens for r in rs) for b, (rs, _, _) in runs.items()}
    assert drawn[1] < drawn[5] <= drawn[1000] and tokens[1] < tokens[5] <= tokens[1000]
