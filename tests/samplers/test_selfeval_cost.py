"""Self-evaluation pruning: one scoring pass per self-evaluation prompt (the same values as
scoring " Yes" and " No" one at a time), and its scored context tokens counted apart from the
generated tokens, per trace and per run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from ttscale.engines.base import GenerationRequest, score_next
from ttscale.engines.scripted import ScriptedEngine
from ttscale.samplers.pruning import PruningSampler, SelfEval, SelfEvalTop
from ttscale.store import SampleStore
from ttscale.types import Problem, SamplingParams

PROBLEMS = [Problem(id=f"p{i}", prompt=f"q{i} ", reference="1") for i in range(3)]
PARAMS = SamplingParams(max_tokens=30, logprobs=0, seed=4)


def _count_calls(eng: Any) -> dict[str, list[Any]]:
    """Record every scoring call the engine gets (wrapping its bound methods)."""
    calls: dict[str, list[Any]] = {"score": [], "score_next": []}
    score, nxt = eng.score, eng.score_next

    def counted_score(reqs: Any, conts: Any) -> Any:
        calls["score"].append((list(reqs), [list(c) for c in conts]))
        return score(reqs, conts)

    def counted_next(reqs: Any, ids: Any) -> Any:
        calls["score_next"].append((list(reqs), list(ids)))
        return nxt(reqs, ids)

    eng.score, eng.score_next = counted_score, counted_next
    return calls


def test_score_next_gives_the_values_of_one_token_continuations_on_the_toy_model() -> None:
    eng = ScriptedEngine()
    reqs = [GenerationRequest(problem_id="a", prompt="q1 ab"), GenerationRequest(problem_id="b", prompt="zz")]
    ids = [ord("n"), ord("y"), ord("a")]
    got = score_next(eng, reqs, ids)
    for req, g in zip(reqs, got, strict=True):
        old = eng.score([req] * len(ids), [[t] for t in ids])
        assert g.logprobs == tuple(v[0] for v in old)  # exact: the same float64 numbers
        assert g.context_tokens == len(eng.context(req))
    # an engine with only `score` gets the same values from one batched call, one pass per token
    class OnlyScore:
        name = "only-score"

        def __init__(self) -> None:
            self.inner = eng

        def generate(self, *a: Any, **k: Any) -> Any:
            raise AssertionError

        def info(self) -> dict[str, Any]:
            return {}

        def close(self) -> None:
            pass

        def score(self, r: Any, c: Any) -> Any:
            return eng.score(r, c)

        def prompt_token_ids(self, r: GenerationRequest) -> list[int]:
            return [ord(ch) for ch in eng.context(r)]

    fb = score_next(OnlyScore(), reqs, ids)
    assert [f.logprobs for f in fb] == [g.logprobs for g in got]
    assert [f.context_tokens for f in fb] == [3 * len(eng.context(r)) for r in reqs]


def test_score_next_matches_score_on_the_bundled_model() -> None:
    import ttscale.evals
    from ttscale.engines import make_engine

    path = Path(ttscale.evals.default_model_path())
    if not (path / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    engine = make_engine("hf", path)
    try:
        reqs = [
            GenerationRequest(problem_id="a", prompt="12+7=19\nWould you do better?"),
            GenerationRequest(problem_id="b", prompt="3*4="),
        ]
        ids = [int(engine.tokenizer.encode(t, add_special_tokens=False)[0]) for t in (" No", " Yes")]
        for req in reqs:
            # exactly the call selfeval made before: the prompt twice, one answer each
            (lp_no,), (lp_yes,) = engine.score([req, req], [[ids[0]], [ids[1]]])
            (g,) = score_next(engine, [req], ids)
            assert abs(g.logprobs[0] - lp_no) <= 1e-12 and abs(g.logprobs[1] - lp_yes) <= 1e-12
            assert g.context_tokens == len(engine.prompt_token_ids(req))
        # a batch of contexts of different lengths (left padding) gives each its own values,
        # within hf's float32 batch-composition noise (as score's)
        both = score_next(engine, reqs, ids)
        for req, g in zip(reqs, both, strict=True):
            (one,) = score_next(engine, [req], ids)
            assert all(abs(a - b) <= 1e-4 for a, b in zip(g.logprobs, one.logprobs, strict=True))
    finally:
        engine.close()


def _expected_scored(rule: SelfEval, res: Any) -> dict[int, int]:
    """Reference: per trace, the characters (toy tokens) of every self-evaluation prompt its
    checkpoints asked for: question + the partial trace + the rule's prompt. A checkpoint is
    evaluated when the trace reached it and went on (or was cut there); a trace that ends on
    a checkpoint token is not evaluated."""
    out = {}
    for c in res.candidates:
        comp = c.completion
        n = comp.num_tokens
        stops = [t for t in range(1, n + 1) if t == rule.checkpoint or (
            rule.every > 0 and t > rule.checkpoint and (t - rule.checkpoint) % rule.every == 0)]
        seen = [t for t in stops if t < n or (c.pruned_at == t)]
        if isinstance(rule, SelfEvalTop):
            seen = [t for t in range(1, n + 1) if t == rule.checkpoint and (t < n or c.pruned_at == t)]
        out[c.index] = sum(len(res.problem.prompt + "".join(map(chr, (comp.token_ids or ())[:t])) + rule.prompt)
                           for t in seen)
    return out


@pytest.mark.parametrize(
    "rule",
    [
        SelfEval(checkpoint=6, threshold=0.5, every=4, prompt="Q", yes="y", no="n"),
        SelfEvalTop(checkpoint=8, keep=0.5, prompt="Q", yes="y", no="n"),
    ],
    ids=["selfeval", "selfeval-top"],
)
def test_selfeval_scores_once_per_prompt_and_counts_scored_tokens_apart(tmp_path: Path, rule: SelfEval) -> None:
    eng = ScriptedEngine()
    calls = _count_calls(eng)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    live = list(PruningSampler(eng, PARAMS, rule).sample(PROBLEMS, 6, seed=4, sink=store))
    # one next-token pass per self-evaluation, of one prompt, for both answers; no per-answer scoring
    assert calls["score"] == []
    assert calls["score_next"] and all(len(r) == 1 and ids == [ord("n"), ord("y")] for r, ids in calls["score_next"])
    assert sum(r.candidates[0].completion.num_tokens >= 0 for r in live) == len(PROBLEMS)
    rows = {(r["problem_id"], r["index"]): r for r in map(json.loads, (store.path / "pruning.jsonl").read_text().splitlines())}
    total = 0
    for res in live:
        want = _expected_scored(rule, res)
        for i, n in want.items():
            assert rows[(res.problem_id, i)]["scored_tokens"] == n, (res.problem_id, i)
            # generated tokens stay the trace's own tokens, the scoring not mixed in
            c = res.candidates[i].completion
            assert rows[(res.problem_id, i)]["tokens"] == c.num_tokens + c.discarded_tokens
        assert res.info["scored_tokens"] == sum(want.values())
        assert res.generated_tokens == sum(rows[(res.problem_id, i)]["tokens"] for i in want)
        total += sum(want.values())
    # every scoring call's prompt, counted independently from the requests the engine got
    assert total == sum(len(eng.context(r)) for reqs, _ in calls["score_next"] for r in reqs) > 0
    pr = SampleStore.open(store.path).manifest["pruning"]
    assert pr["scored_tokens"] == total
    assert pr["generated_tokens"] == sum(r.generated_tokens for r in live)
    assert math.isfinite(total)


def test_non_scoring_rules_record_zero_scored_tokens(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    list(PruningSampler(ScriptedEngine(), PARAMS, "lowprob:threshold=-3.2,min_tokens=4").sample(
        PROBLEMS, 4, seed=1, sink=store))
    rows = [json.loads(x) for x in (store.path / "pruning.jsonl").read_text().splitlines()]
    assert rows and all(r["scored_tokens"] == 0 for r in rows)
    assert SampleStore.open(store.path).manifest["pruning"]["scored_tokens"] == 0


def test_scored_tokens_survive_a_resume_and_a_merge_of_shards(tmp_path: Path) -> None:
    from ttscale.store.samplestore import merge_runs

    rule = SelfEval(checkpoint=6, threshold=0.5, every=4, prompt="Q", yes="y", no="n")
    whole = list(PruningSampler(ScriptedEngine(), PARAMS, rule).sample(PROBLEMS, 6, seed=4))
    total = sum(r.info["scored_tokens"] for r in whole)
    assert total > 0
    # two workers in run directories of their own, merged
    parts = []
    for i in range(2):
        st = SampleStore.create(tmp_path / f"s{i}", {"model": "toy"})
        list(PruningSampler(ScriptedEngine(), PARAMS, rule).sample(PROBLEMS, 6, seed=4, sink=st, shard=(i, 2)))
        parts.append(st.path)
    merged, _ = merge_runs(tmp_path / "merged", parts)
    assert SampleStore.open(merged.path).manifest["pruning"]["scored_tokens"] == total
    # a resumed run reads the stored traces' counts back from their log lines
    st = SampleStore.open(tmp_path / "s0")
    again = list(PruningSampler(ScriptedEngine(), PARAMS, rule).sample(PROBLEMS, 6, seed=4, sink=st))
    assert sum(r.info["scored_tokens"] for r in again) == total
    assert SampleStore.open(st.path).manifest["pruning"]["scored_tokens"] == total


def test_check_engine_holds_score_next_to_score() -> None:
    from ttscale.engines.base import NextTokenScores
    from ttscale.testing import EngineContractError, check_engine

    assert check_engine(ScriptedEngine(), only=("scoring",)) == ["scoring"]

    class Off(ScriptedEngine):
        def score_next(self, requests: Any, token_ids: Any) -> list[NextTokenScores]:
            good = super().score_next(requests, token_ids)
            return [NextTokenScores(tuple(v + 1e-3 for v in g.logprobs), g.context_tokens) for g in good]

    with pytest.raises(EngineContractError, match="score_next differs"):
        check_engine(Off(), only=("scoring",))
