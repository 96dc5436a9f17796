"""Mid-generation trace pruning: hand-computed decisions, docs/algorithms.md vectors, token
accounting, live = replay, the run directory's record."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from ttscale.engines.base import EngineCapabilities
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers import Fate, RepeatedSampler
from ttscale.samplers.pruning import (
    DeepConfOnline,
    LowProb,
    PruningSampler,
    SelfEval,
    parse_prune_rule,
    replay_pruning,
)
from ttscale.store import SampleStore
from ttscale.types import Completion, Problem, SamplingParams


def _trace(index: int, lps: list[float] | None = None, tops: list[dict[int, float]] | None = None,
           pid: str = "p") -> Completion:
    n = len(lps if lps is not None else tops or [])
    return Completion(
        problem_id=pid,
        index=index,
        text="x" * n,
        token_ids=tuple(range(1, n + 1)),
        token_logprobs=tuple(lps) if lps is not None else None,
        top_logprobs=tuple(tops) if tops is not None else None,
        num_tokens=n,
    )


# -- hand-computed decisions ---------------------------------------------------------------------


def test_lowprob_stops_at_the_first_token_whose_running_mean_is_below() -> None:
    # lps -1, -1, -4, -4, -1, -1; running means -1, -1, -2, -2.5, ...; threshold -2 (strict):
    # token 3 has mean exactly -2 (not below), token 4 mean -2.5 < -2 -> pruned at 4
    rule = LowProb(threshold=-2.0, min_tokens=2)
    rep = replay_pruning([_trace(0, [-1, -1, -4, -4, -1, -1])], rule)
    (t,) = rep.problems[0].traces
    assert t.pruned_at == 4 and t.tokens == 4 and t.full_tokens == 6
    assert "mean log-prob -2.5000" in (t.reason or "")
    # min_tokens=5 delays the check: means at 5 and 6 are -11/5=-2.2 and -12/6=-2, but the
    # last token never prunes (the trace ended there) -> pruned at 5
    rep = replay_pruning([_trace(0, [-1, -1, -4, -4, -1, -1])], LowProb(-2.0, min_tokens=5))
    assert rep.problems[0].traces[0].pruned_at == 5
    # threshold -2.3: no mean is below it before the end -> kept, nothing saved
    rep = replay_pruning([_trace(0, [-1, -1, -4, -4, -1, -1])], LowProb(-2.6, min_tokens=1))
    assert rep.problems[0].traces[0].pruned_at is None and rep.saved_fraction == 0.0


# docs/algorithms.md 4.4: top-3 log-probs at six positions
_TOPS = [[-0.01, -5.2, -6.0], [-0.3, -1.5, -3.0], [-1.2, -1.3, -1.4],
         [-0.05, -4.0, -5.5], [-0.7, -0.9, -2.5], [-0.02, -6.0, -7.1]]


def _tops(rows: list[list[float]]) -> list[dict[int, float]]:
    return [{j + 1: v for j, v in enumerate(r)} for r in rows]


def test_deepconf_group_confidence_vector_and_stop_token() -> None:
    # token confidences 3.7367, 1.6, 1.3, 3.1833, 1.3667, 4.3733; windows (w=3) ending at
    # tokens 3..6: 2.212, 2.028, 1.95, 2.974; lowest group confidence 1.95 (ALGORITHMS 4.4)
    rule = DeepConfOnline(eta=50, warmup=1, window=3)
    assert rule.lowest_confidence(_trace(0, tops=_tops(_TOPS))) == pytest.approx(1.95)
    # threshold 2.0 (set by hand through the monitor): 2.212 and 2.028 pass, 1.95 < 2.0 at
    # token 5 -> stopped there
    mon = rule.monitor(2.0)
    decisions = [mon.observe(t + 1, None, top, []) for t, top in enumerate(_tops(_TOPS))]
    assert [d is not None for d in decisions][:5] == [False, False, False, False, True]
    # at threshold 1.95 exactly nothing is strictly below: never stopped (keep uses >=)
    mon = rule.monitor(1.95)
    assert all(mon.observe(t + 1, None, top, []) is None for t, top in enumerate(_tops(_TOPS)))


def test_deepconf_warmup_threshold_vector() -> None:
    # ALGORITHMS 4.4: 16 warm-up lowest group confidences -> DeepConf-low s = 2.15 (eta 10),
    # DeepConf-high s = 0.85 (eta 90). A one-token trace whose two alternatives both have
    # log-prob -v has C_least = v.
    mins = [2.1, 1.4, 1.9, 0.6, 1.7, 2.3, 1.1, 0.9, 1.8, 2.0, 1.5, 1.6, 0.8, 2.2, 1.3, 1.2]
    warm = [_trace(i, tops=[{1: -v, 2: -v}]) for i, v in enumerate(mins)]
    assert DeepConfOnline(eta=10, warmup=16).warmup_threshold(warm) == pytest.approx(2.15)
    assert DeepConfOnline(eta=90, warmup=16).warmup_threshold(warm) == pytest.approx(0.85)


def test_deepconf_replay_uses_the_first_warmup_traces_for_the_threshold() -> None:
    # warm-up (indices 0, 1): C_least 2.0 and 3.0 -> eta=50 -> median 2.5. Trace 2 has window
    # means (w=2) 3.0, 2.0, ... -> stopped at token 3 (2.0 < 2.5); trace 3 stays above.
    def conf_trace(i: int, confs: list[float]) -> Completion:
        return _trace(i, tops=[{1: -c} for c in confs])

    traces = [
        conf_trace(0, [2.0, 2.0, 2.0]),
        conf_trace(1, [3.0, 3.0]),
        conf_trace(2, [3.0, 3.0, 1.0, 3.0, 3.0]),
        conf_trace(3, [2.5, 2.6, 2.7, 2.5]),
    ]
    rep = replay_pruning(traces, "deepconf-online:eta=50,warmup=2,window=2")
    (prob,) = rep.problems
    assert prob.threshold == pytest.approx(2.5)
    assert [t.pruned_at for t in prob.traces] == [None, None, 3, None]
    assert [t.warmup for t in prob.traces] == [True, True, False, False]
    # tokens: 3 + 2 + 3 (of 5) + 4 = 12 of 14; saved 2/14
    assert rep.tokens == 12 and rep.full_tokens == 14
    assert rep.saved_fraction == pytest.approx(2 / 14)
    assert rep.to_dict()["pruned"] == 1


# -- rule specs ----------------------------------------------------------------------------------


def test_parse_rule_specs() -> None:
    r = parse_prune_rule("deepconf-online:eta=10,warmup=16,window=2048")
    assert isinstance(r, DeepConfOnline) and (r.eta, r.warmup, r.window) == (10.0, 16, 2048)
    assert parse_prune_rule("lowprob:-1.5") == LowProb(-1.5)
    assert parse_prune_rule("lowprob:threshold=-1,min_tokens=4") == LowProb(-1.0, 4)
    s = parse_prune_rule("selfeval:checkpoint=32,threshold=0.3,yes=y,no=n")
    assert isinstance(s, SelfEval) and (s.checkpoint, s.threshold, s.yes, s.no) == (32, 0.3, "y", "n")
    assert parse_prune_rule(r.spec()) == r


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("deepconf:eta=10", "unknown pruning rule 'deepconf'"),
        ("deepconf-online:eta=abc", "eta='abc' is not a float"),
        ("deepconf-online:foo=1", "has no parameter 'foo'"),
        ("deepconf-online:eta=100", "eta"),
        ("lowprob", "lowprob needs a threshold"),
        ("lowprob:threshold=0.5", "threshold"),
        ("selfeval:mode=logit", "mode must be softmax2 or raw"),
    ],
)
def test_bad_rule_specs_are_one_line_errors(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_prune_rule(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- live ---------------------------------------------------------------------------------------

PROBLEMS = [Problem(id=f"p{i}", prompt=f"q{i} ", reference="1") for i in range(3)]


def _first_below(lps: np.ndarray, threshold: float, min_tokens: int) -> int | None:
    """Reference: first 1-based t (not the last token) with mean(lps[:t]) < threshold."""
    means = np.cumsum(lps) / np.arange(1, lps.size + 1)
    for t in range(min_tokens, lps.size):
        if means[t - 1] < threshold:
            return t
    return None


def test_live_lowprob_matches_a_reference_on_the_full_traces_and_counts_every_token() -> None:
    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=40, logprobs=0, seed=3)
    full = {(r.problem_id, c.index): c.completion
            for r in RepeatedSampler(eng, params).sample(PROBLEMS, 8, seed=3) for c in r.candidates}
    rule = LowProb(threshold=-3.2, min_tokens=5)
    live = list(PruningSampler(eng, params, rule).sample(PROBLEMS, 8, seed=3))
    n_pruned = 0
    for res in live:
        assert res.generated_tokens == sum(c.completion.num_tokens for c in res.candidates)
        for c in res.candidates:
            f = full[(res.problem_id, c.index)]
            want = _first_below(np.asarray(f.token_logprobs), -3.2, 5)
            assert c.pruned_at == want
            if want is None:
                assert c.fate is Fate.KEPT and c.completion.token_ids == f.token_ids
            else:
                n_pruned += 1
                assert c.fate is Fate.PRUNED and c.completion.num_tokens == want
                assert c.completion.token_ids == f.token_ids[:want]  # same trace, cut
                assert c.completion.finish_reason == "abort"
        # pruned traces are in the result but not in the kept pool
        assert len(res.kept) == sum(c.pruned_at is None for c in res.candidates)
    assert 0 < n_pruned < 24  # the case exercises both outcomes


@pytest.mark.parametrize("spec", ["lowprob:threshold=-3.2,min_tokens=5",
                                  "deepconf-online:eta=50,warmup=4,window=6"])
def test_live_pruning_equals_replay_of_the_fixed_n_run(spec: str) -> None:
    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=40, logprobs=3, seed=1)
    live = list(PruningSampler(eng, params, spec).sample(PROBLEMS, 10, seed=1))
    full = list(RepeatedSampler(eng, params).sample(PROBLEMS, 10, seed=1))
    rep = replay_pruning([c.completion for r in full for c in r.candidates], spec)
    got = [(r.problem_id, c.index, c.pruned_at) for r in live for c in r.candidates]
    want = [(p.problem_id, t.index, t.pruned_at) for p in rep.problems for t in p.traces]
    assert got == want and rep.pruned > 0
    assert sum(r.generated_tokens for r in live) == rep.tokens < rep.full_tokens


class _NoStreaming:
    """The toy model without streaming: the sampler must fall back to chunked generation."""

    name = "nostream"
    capabilities = EngineCapabilities(token_prefixes=True, logprob_modes=frozenset({"raw_logprobs"}))

    def __init__(self) -> None:
        self.inner = ScriptedEngine()

    def generate(self, requests: Any, params: Any, *, on_result: Any = None) -> Any:
        return self.inner.generate(requests, params, on_result=on_result)

    def decode(self, ids: Any) -> str:
        return self.inner.decode(ids)

    def info(self) -> dict[str, Any]:
        return {"engine": self.name}

    def close(self) -> None:
        pass


def test_chunked_fallback_prunes_like_replay_of_an_unpruned_chunked_run() -> None:
    eng = _NoStreaming()
    params = SamplingParams(max_tokens=30, logprobs=0, seed=2)
    sampler = PruningSampler(eng, params, "lowprob:threshold=-3.2,min_tokens=5", chunk_tokens=7)
    assert sampler.mode == "chunked (7 tokens)"
    live = list(sampler.sample(PROBLEMS, 6, seed=2))
    # the same chunked traces, never pruned (threshold far below any mean), replayed
    nopr = PruningSampler(eng, params, "lowprob:threshold=-1000", chunk_tokens=7)
    full = [c.completion for r in nopr.sample(PROBLEMS, 6, seed=2) for c in r.candidates]
    assert all(c.finish_reason != "abort" for c in full)
    rep = replay_pruning(full, "lowprob:threshold=-3.2,min_tokens=5")
    got = [(r.problem_id, c.index, c.pruned_at) for r in live for c in r.candidates]
    assert got == [(p.problem_id, t.index, t.pruned_at) for p in rep.problems for t in p.traces]
    assert rep.pruned > 0
    # tokens generated past the abort inside a chunk are counted too
    for r in live:
        assert r.generated_tokens == sum(
            c.completion.num_tokens + c.completion.discarded_tokens for c in r.candidates
        )
    assert any(c.completion.discarded_tokens > 0 for r in live for c in r.candidates)


def test_chunked_discarded_tokens_reach_the_run_accounting(tmp_path: Any) -> None:
    eng = _NoStreaming()
    params = SamplingParams(max_tokens=30, logprobs=0, seed=2)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    sampler = PruningSampler(eng, params, "lowprob:threshold=-3.2,min_tokens=5", chunk_tokens=7)
    live = list(sampler.sample(PROBLEMS, 6, seed=2, sink=store))
    total = sum(r.generated_tokens for r in live)
    kept_tokens = sum(c.completion.num_tokens for r in live for c in r.candidates)
    assert total > kept_tokens  # some tokens were generated past an abort inside a chunk
    assert SampleStore.open(store.path).accounting()["generated_tokens"] == total


def test_selfeval_prunes_at_the_checkpoint_by_p_no() -> None:
    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=30, logprobs=0, seed=4)
    # (an empty question: the toy model sees only the last 3 characters, which must vary)
    rule = SelfEval(checkpoint=8, threshold=0.5, prompt="", yes="y", no="n")
    live = list(PruningSampler(eng, params, rule).sample(PROBLEMS, 6, seed=4))
    pruned = 0
    for res in live:
        for c in res.candidates:
            comp = c.completion
            if c.pruned_at is None:
                continue
            pruned += 1
            assert c.pruned_at == 8
            # reference: the toy model's raw next-token log-probs after prompt + partial + prompt
            ctx = res.problem.prompt + eng.decode(comp.token_ids or ()) + ""
            lp = eng._next_logprobs(ctx[-eng.order:])
            idx = {ch: 1 + eng.alphabet.index(ch) for ch in "ny"}
            p_no = 1 / (1 + math.exp(lp[idx["y"]] - lp[idx["n"]]))
            assert p_no < 0.5
    assert pruned > 0
    # a kept trace long enough to be checked had P(no) >= 0.5 on its first 8 tokens; traces
    # that end before the checkpoint are never checked (never pruned)
    checked = 0
    for res in live:
        for c in res.candidates:
            comp = c.completion
            if c.pruned_at is not None or comp.num_tokens <= 8:
                continue
            checked += 1
            ctx = res.problem.prompt + eng.decode((comp.token_ids or ())[:8]) + ""
            lp = eng._next_logprobs(ctx[-eng.order:])
            idx = {ch: 1 + eng.alphabet.index(ch) for ch in "ny"}
            assert 1 / (1 + math.exp(lp[idx["y"]] - lp[idx["n"]])) >= 0.5
    assert checked > 0


def test_selfeval_needs_a_scoring_engine_live_and_in_replay() -> None:
    with pytest.raises(ConfigError, match="capability 'scoring'"):
        PruningSampler(ScriptedEngine({"p": "abc"}), SamplingParams(), "selfeval:yes=y,no=n")
    with pytest.raises(ConfigError, match="replay it with the scoring engine"):
        replay_pruning([], "selfeval")


def test_deepconf_needs_top_logprobs() -> None:
    with pytest.raises(ConfigError, match="top log-probs"):
        PruningSampler(ScriptedEngine(), SamplingParams(logprobs=0), "deepconf-online")
    with pytest.raises(ConfigError, match="top log-probs"):
        replay_pruning([_trace(0, lps=[-1.0])], "deepconf-online:warmup=1")


def test_run_directory_records_what_was_pruned_when_and_why(tmp_path: Any) -> None:
    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=40, logprobs=3, seed=1)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    spec = "deepconf-online:eta=50,warmup=4,window=6"
    live = list(PruningSampler(eng, params, spec).sample(PROBLEMS, 10, seed=1, sink=store))
    run = SampleStore.open(store.path)
    m = run.manifest
    assert m["iid"] is False and m["prune_rule"] == DeepConfOnline(50, 4, 6).spec()
    rows = {s.key: s for s in run.samples()}
    assert len(rows) == 30
    total = sum(r.generated_tokens for r in live)
    assert m["pruning"]["generated_tokens"] == total
    assert run.accounting()["generated_tokens"] == total  # pruned traces' tokens included
    log_lines = [json.loads(x) for x in (store.path / "pruning.jsonl").read_text().splitlines()]
    assert len(log_lines) == 30
    for rec in log_lines:
        s = rows[(rec["problem_id"], rec["index"])]
        assert s.pruned_at == rec["pruned_at"]
        assert s.fate == ("pruned" if rec["pruned_at"] is not None else "kept")
        assert (rec["reason"] is not None) == (rec["pruned_at"] is not None)
        if rec["reason"]:
            assert "group confidence" in rec["reason"]
    assert m["pruning"]["pruned"] == sum(r["pruned_at"] is not None for r in log_lines) > 0
    # the analysis pool holds the kept traces only
    assert run.pool().num_samples == 30 - m["pruning"]["pruned"]
    # replay from the stored run: pruned traces are stored cut, so replay the live decisions
    # of traces that were not pruned only (they are whole): none of them prunes
    # resuming a finished run generates nothing and reads every trace back with its fate
    eng2 = ScriptedEngine()
    again = list(PruningSampler(eng2, params, spec).sample(PROBLEMS, 10, seed=1, sink=run))
    assert not eng2.calls
    assert [[(c.index, c.text, c.fate, c.pruned_at) for c in r.candidates] for r in again] == [
        [(c.index, c.text, c.fate, c.pruned_at) for c in r.candidates] for r in live
    ]
    assert [r.generated_tokens for r in again] == [r.generated_tokens for r in live]
    with pytest.raises(ConfigError, match="made with pruning rule"):
        next(iter(PruningSampler(eng, params, "lowprob:-2").sample(PROBLEMS, 10, seed=1, sink=run)))


def test_pruning_sampler_passes_the_sampler_contract() -> None:
    from ttscale.testing import check_sampler

    params = SamplingParams(max_tokens=24, logprobs=3, seed=0)
    ran = check_sampler(
        lambda eng: PruningSampler(eng, params, "lowprob:threshold=-3.7,min_tokens=3"), budget=6
    )
    assert {"salvage", "resume", "accounting", "sink"} <= set(ran)
    # a resume sets the same threshold from the stored warm-up traces
    ran = check_sampler(
        lambda eng: PruningSampler(eng, params, "deepconf-online:eta=50,warmup=2,window=4"),
        budget=6,
    )
    assert {"salvage", "resume"} <= set(ran)


def test_replay_from_a_stored_run_and_refusals(tmp_path: Any) -> None:
    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=30, logprobs=3, seed=1)
    store = SampleStore.create(tmp_path / "full", {"model": "toy"})
    RepeatedSampler(eng, params, store, progress=False).run(PROBLEMS, 8)
    spec = "lowprob:threshold=-3.2,min_tokens=5"
    from_path = replay_pruning(str(store.path), spec, max_samples=6)
    mem = list(RepeatedSampler(eng, params).sample(PROBLEMS, 6, seed=1))
    want = replay_pruning([c.completion for r in mem for c in r.candidates], spec)
    assert from_path.to_dict() == want.to_dict() and want.pruned > 0
    with pytest.raises(ConfigError, match="a Pool holds no per-token log-probs"):
        replay_pruning(store.pool(), spec)
    pruned = SampleStore.create(tmp_path / "pruned", {"model": "toy"})
    list(PruningSampler(eng, params, spec).sample(PROBLEMS, 4, seed=1, sink=pruned))
    with pytest.raises(ConfigError, match="was pruned live"):
        replay_pruning(SampleStore.open(pruned.path), spec)


def test_live_equals_replay_on_the_bundled_model_with_hf_streaming() -> None:
    import ttscale
    import ttscale.evals
    from ttscale.engines import make_engine

    engine = make_engine("hf", ttscale.evals.default_model_path())
    try:
        problems = ttscale.evals.load_problems("arith", limit=3)
        params = ttscale.SamplingParams(temperature=1.0, max_tokens=64, logprobs=5, seed=0)
        # eta=50 on 3 warm-ups: the threshold is a warm-up trace's own lowest window, which later
        # traces sharing those tokens tie exactly; hf's float32 log-probs move by ~1e-8 with the
        # batch composition, so only the tie tolerance makes live and replay agree here
        spec = "deepconf-online:eta=50,warmup=3,window=6"
        live = list(PruningSampler(engine, params, spec, progress=False).sample(problems, 8, seed=0))
        full = list(RepeatedSampler(engine, params, progress=False).sample(problems, 8, seed=0))
    finally:
        engine.close()
    rep = replay_pruning([c.completion for r in full for c in r.candidates], spec)
    got = [(r.problem_id, c.index, c.pruned_at) for r in live for c in r.candidates]
    assert got == [(p.problem_id, t.index, t.pruned_at) for p in rep.problems for t in p.traces]
    assert rep.pruned > 0
    assert sum(r.generated_tokens for r in live) == rep.tokens


def test_ties_within_float32_noise_are_kept() -> None:
    # threshold 2.0: a window mean 1e-7 below is a tie (kept); 1e-5 below is below (stopped)
    for delta, stopped in [(1e-7, False), (1e-5, True)]:
        mon = DeepConfOnline(eta=50, warmup=1, window=1).monitor(2.0)
        assert (mon.observe(1, None, {1: -(2.0 - delta)}, [1]) is not None) is stopped
        mon = LowProb(-2.0, min_tokens=1).monitor(None)
        assert (mon.observe(1, -(2.0 + 2 * delta), None, [1]) is not None) is stopped


def _keys(results: Any) -> list[list[tuple[Any, ...]]]:
    return [[(c.index, c.text, c.fate, c.pruned_at) for c in r.candidates] for r in results]


@pytest.mark.parametrize("fail_after", [6, 19])  # inside a warm-up; among the watched traces
def test_pruning_run_resumes_after_a_failure_exactly(tmp_path: Any, fail_after: int) -> None:
    from ttscale.engines.base import GenerationError

    params = SamplingParams(max_tokens=40, logprobs=3, seed=1)
    spec = "deepconf-online:eta=50,warmup=4,window=6"
    full = list(PruningSampler(ScriptedEngine(), params, spec).sample(PROBLEMS, 10, seed=1))
    total = sum(r.generated_tokens for r in full)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    failing = ScriptedEngine(fail_after=fail_after)
    with pytest.raises(GenerationError):
        list(PruningSampler(failing, params, spec).sample(PROBLEMS, 10, seed=1, sink=store))
    first = SampleStore.open(store.path)
    assert 0 < len(first) <= fail_after  # what finished before the failure is stored
    before = first.keys()
    # traces in flight when the engine failed are lost with it; the tokens they had generated
    # were spent all the same, so the accounting holds them on top of the stored traces' tokens
    logged = sum(json.loads(x)["tokens"] for f in (first.path / "pruning").glob("*.jsonl")
                 for x in f.read_text().splitlines())  # fmt: skip
    lost = first.accounting()["generated_tokens"] - logged
    assert lost >= 0
    eng = ScriptedEngine()
    again = list(
        PruningSampler(eng, params, spec).sample(PROBLEMS, 10, seed=1, sink=first)
    )
    asked = {(r.problem_id, i) for r, _ in eng.calls for i in r.indices}
    assert not asked & before  # nothing stored is generated again
    assert _keys(again) == _keys(full)
    assert [r.generated_tokens for r in again] == [r.generated_tokens for r in full]
    run = SampleStore.open(store.path)
    assert len(run) == 30 and run.accounting()["generated_tokens"] == total + lost
    lines = [json.loads(x) for x in (run.path / "pruning.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and run.manifest["pruning"]["generated_tokens"] == total
    assert run.manifest["pruning"]["pruned"] == sum(c.pruned_at is not None
                                                    for r in full for c in r.candidates) > 0


def test_pruning_shards_merge_into_the_whole_run(tmp_path: Any) -> None:
    params = SamplingParams(max_tokens=40, logprobs=3, seed=1)
    spec = "lowprob:threshold=-3.2,min_tokens=5"
    full = list(PruningSampler(ScriptedEngine(), params, spec).sample(PROBLEMS, 8, seed=1))
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    got: dict[str, Any] = {}
    for i in range(2):  # two workers on one run directory, one shard each
        s = PruningSampler(ScriptedEngine(), params, spec)
        for r in s.sample(PROBLEMS, 8, seed=1, sink=SampleStore.open(store.path), shard=(i, 2)):
            got[r.problem_id] = r
    assert sorted(got) == [p.id for p in PROBLEMS]
    assert _keys([got[p.id] for p in PROBLEMS]) == _keys(full)
    run = SampleStore.open(store.path)
    total = sum(r.generated_tokens for r in full)
    assert len(run) == 24 and run.accounting()["generated_tokens"] == total
    assert run.manifest["pruning"]["traces"] == 24
    assert run.manifest["pruning"]["generated_tokens"] == total
    assert {a["shard"] for a in run.sessions().values()} == {"0/2", "1/2"}


def test_merge_from_carries_the_pruning_logs(tmp_path: Any) -> None:
    """The Python API's merge (``SampleStore.merge_from``) carries what was pruned, when and
    why, as ``ttscale merge`` does: shard 1's run merged into shard 0's is the whole run."""
    params = SamplingParams(max_tokens=40, logprobs=3, seed=1)
    spec = "lowprob:threshold=-3.2,min_tokens=5"
    full = list(PruningSampler(ScriptedEngine(), params, spec).sample(PROBLEMS, 8, seed=1))
    runs = [SampleStore.create(tmp_path / f"shard{i}", {"model": "toy"}) for i in range(2)]
    for i, run in enumerate(runs):
        list(PruningSampler(ScriptedEngine(), params, spec).sample(PROBLEMS, 8, seed=1, sink=run, shard=(i, 2)))
    runs[0].merge_from(runs[1])
    run = SampleStore.open(runs[0].path)
    total = sum(r.generated_tokens for r in full)
    want = {(r.problem_id, c.index): c.pruned_at for r in full for c in r.candidates}
    lines = [json.loads(x) for x in (run.path / "pruning.jsonl").read_text().splitlines()]
    assert {(x["problem_id"], x["index"]): x["pruned_at"] for x in lines} == want
    assert run.manifest["pruning"]["traces"] == 24 and run.manifest["pruning"]["generated_tokens"] == total
    assert run.manifest["pruning"]["pruned"] == sum(p is not None for p in want.values()) > 0
    runs[0].merge_from(runs[1])  # merging again adds nothing
    assert len((run.path / "pruning.jsonl").read_text().splitlines()) == 24


def test_selfeval_top_keeps_the_top_fraction_by_p_no() -> None:
    from ttscale.samplers.pruning import SelfEvalTop

    eng = ScriptedEngine()
    params = SamplingParams(max_tokens=30, logprobs=0, seed=4)
    rule = parse_prune_rule("selfeval-top:checkpoint=8,keep=0.5,prompt=,yes=y,no=n")
    assert isinstance(rule, SelfEvalTop) and rule.spec() == "selfeval-top:checkpoint=8,keep=0.5,mode=softmax2"
    live = list(PruningSampler(eng, params, rule).sample(PROBLEMS, 6, seed=4))
    idx = {ch: 1 + eng.alphabet.index(ch) for ch in "ny"}
    pruned_any = False
    for res in live:
        scored = {}
        for c in res.candidates:
            comp = c.completion
            if comp.num_tokens <= 8 and c.pruned_at is None:
                continue  # ended by the checkpoint: never scored
            ctx = res.problem.prompt + eng.decode((comp.token_ids or ())[:8])
            lp = eng._next_logprobs(ctx[-eng.order:])
            scored[c.index] = 1 / (1 + math.exp(lp[idx["y"]] - lp[idx["n"]]))
        ranked = sorted(scored, key=lambda i: (-scored[i], i))
        losers = set(ranked[max(1, math.ceil(0.5 * len(ranked))):])
        got = {c.index for c in res.candidates if c.pruned_at is not None}
        # a loser that ended at token 9 anyway cannot be cut
        ended = {c.index for c in res.candidates if c.pruned_at is None and c.completion.num_tokens == 9}
        assert got == losers - ended, res.problem_id
        assert all(c.pruned_at == 9 for c in res.candidates if c.pruned_at is not None)
        pruned_any |= bool(got)
    assert pruned_any
    with pytest.raises(ConfigError, match="keep"):
        parse_prune_rule("selfeval-top:keep=0")
    with pytest.raises(ConfigError, match="drop every"):
        SelfEvalTop(every=4)
