"""Self-evaluation pruning replayed on a stored run (the stored token ids scored by the model):
live = replay on the bundled model for keep-top-fraction and the threshold rule, trace by trace
(kept/pruned, cut points, tokens, scored tokens, answers); the CLI and its refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import ConfigError
from ttscale.samplers import RepeatedSampler
from ttscale.samplers.pruning import PruningSampler, SelfEval, SelfEvalTop, replay_pruning
from ttscale.types import SamplingParams

runner = CliRunner()


def _model() -> Path:
    from ttscale.evals import default_model_path

    path = Path(default_model_path())
    if not (path / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    return path


@pytest.fixture(scope="module")
def hf_engine() -> Iterator[Any]:
    from ttscale.engines import make_engine

    engine = make_engine("hf", _model())
    yield engine
    engine.close()


# recording subclasses: every P(no) the rule computes, to check the decisions' margins
@dataclass(frozen=True)
class _TopSeen(SelfEvalTop):
    seen: ClassVar[list[float]] = []

    def p_no(self, lp_no: float, lp_yes: float) -> float:
        p = super().p_no(lp_no, lp_yes)
        self.seen.append(p)
        return p


@dataclass(frozen=True)
class _ThrSeen(SelfEval):
    seen: ClassVar[list[float]] = []

    def p_no(self, lp_no: float, lp_yes: float) -> float:
        p = super().p_no(lp_no, lp_yes)
        self.seen.append(p)
        return p


def _runs(engine: Any, rule: SelfEval, n: int, seed: int) -> tuple[list[Any], list[Any], list[Any]]:
    """The live pruned run, the same traces unpruned in the live run's chunks (a rule that never
    fires, chunked as selfeval is: chunk k of a trace is drawn from seed substream k), and a
    fixed-n run (one random stream per trace: equal to the chunked one up to the first chunk)."""
    import ttscale.evals

    problems = ttscale.evals.load_problems("arith", limit=4)
    params = SamplingParams(temperature=1.0, max_tokens=40, logprobs=0, seed=seed)
    sampler = PruningSampler(engine, params, rule, progress=False)
    live = list(sampler.sample(problems, n, seed=seed))
    never = PruningSampler(
        engine, params, "lowprob:threshold=-1e9,min_tokens=1", chunk_tokens=sampler.chunk_tokens,
        progress=False,
    )
    chunked = list(never.sample(problems, n, seed=seed))
    assert not any(c.pruned_at for r in chunked for c in r.candidates)
    full = list(RepeatedSampler(engine, params, progress=False).sample(problems, n, seed=seed))
    return live, chunked, full


def _replay(rule: SelfEval, engine: Any, pool: list[Any]) -> Any:
    return replay_pruning(
        [c.completion for r in pool for c in r.candidates],
        rule,
        engine=engine,
        problems=[r.problem for r in pool],
    )


def _decisions(live: list[Any], rep: Any) -> None:
    got = [(r.problem_id, c.index, c.pruned_at) for r in live for c in r.candidates]
    assert got == [(p.problem_id, t.index, t.pruned_at) for p in rep.problems for t in p.traces]
    assert rep.pruned > 0 and any(t.pruned_at is None for p in rep.problems for t in p.traces)
    # the self-evaluation scored tokens, as the live run records them apart
    assert rep.scored_tokens == sum(r.info["scored_tokens"] for r in live) > 0
    for r, p in zip(live, rep.problems, strict=True):
        assert r.info["scored_tokens"] == p.scored_tokens


def _exact(live: list[Any], rep: Any, pool: list[Any]) -> None:
    _decisions(live, rep)
    # tokens: kept traces in full, pruned ones cut where live cut them (the live run also
    # counts tokens its chunk generated past the abort: discarded_tokens, an engine artefact)
    live_cut = sum(c.completion.num_tokens for r in live for c in r.candidates)
    assert rep.tokens == live_cut
    assert sum(r.generated_tokens for r in live) == live_cut + sum(
        c.completion.discarded_tokens for r in live for c in r.candidates
    )
    assert rep.full_tokens == sum(c.completion.num_tokens for r in pool for c in r.candidates)
    # the kept traces are the stored ones (same text, hence the same answers); pruned ones are
    # the stored ones cut at the live cut point
    stored = {(r.problem_id, c.index): c.completion for r in pool for c in r.candidates}
    for r in live:
        for c in r.candidates:
            ref = stored[(r.problem_id, c.index)]
            if c.pruned_at is None:
                assert (c.completion.text, c.completion.token_ids) == (ref.text, ref.token_ids)
            else:
                assert c.completion.token_ids == ref.token_ids[: c.pruned_at]


def test_selfeval_top_live_equals_replay_on_the_bundled_model(hf_engine: Any) -> None:
    rule = _TopSeen(checkpoint=8, keep=0.5, yes="Y", no="N")
    _TopSeen.seen.clear()
    live, chunked, full = _runs(hf_engine, rule, n=6, seed=3)
    live_scores = sorted(_TopSeen.seen)
    for pool in (chunked, full):
        _TopSeen.seen.clear()
        rep = _replay(rule, hf_engine, pool)
        # the same prefixes scored to the same numbers (one prompt per call, as live)
        assert sorted(_TopSeen.seen) == live_scores and live_scores
        # one checkpoint, inside the first chunk: a fixed-n run gives the same decisions
        _decisions(live, rep)
        # losers are cut at checkpoint + 1, the token after the ranking is decided
        assert {t.pruned_at for p in rep.problems for t in p.pruned} == {9}
        if pool is chunked:
            _exact(live, rep, pool)
    # margins: distinct scores are apart by far more than float32 batch noise (equal ones come
    # from identical prefixes, which score identically: the lower index goes on)
    gaps = [abs(a - b) for a in live_scores for b in live_scores if a != b]
    assert min(gaps) > 1e-5, min(gaps)


def test_selfeval_threshold_with_every_live_equals_replay(hf_engine: Any) -> None:
    _ThrSeen.seen.clear()
    rule = _ThrSeen(checkpoint=6, every=6, threshold=0.5, yes="Y", no="N")
    live, chunked, _full = _runs(hf_engine, rule, n=5, seed=1)
    # every score clear of the threshold by far more than float32 batch noise
    assert _ThrSeen.seen and all(abs(p - rule.threshold) > 1e-4 for p in _ThrSeen.seen)
    # later checkpoints fall in later chunks: the replay equals live on the run in its chunks
    rep = _replay(rule, hf_engine, chunked)
    _exact(live, rep, chunked)
    # pruned at a checkpoint (6, 12, ...), where the threshold rule decides and stops
    assert all((t.pruned_at or 0) % 6 == 0 for p in rep.problems for t in p.pruned)


def test_replay_refuses_without_engine_token_ids_or_matching_tokenizer(hf_engine: Any) -> None:
    import ttscale.evals
    from ttscale.types import Completion

    probs = ttscale.evals.load_problems("arith", limit=1)
    with pytest.raises(ConfigError, match="--model"):
        replay_pruning([], "selfeval-top:yes=Y,no=N")
    ids = hf_engine.tokenizer.encode("12 + 5", add_special_tokens=False)
    ok = Completion(problem_id=probs[0].id, index=0, text="12 + 5", token_ids=tuple(ids), num_tokens=len(ids))
    bare = Completion(problem_id=probs[0].id, index=0, text="12 + 5", token_ids=None, num_tokens=len(ids))
    other = Completion(problem_id=probs[0].id, index=0, text="hello there", token_ids=tuple(ids), num_tokens=len(ids))
    rule = "selfeval-top:checkpoint=2,keep=0.5,yes=Y,no=N"
    replay_pruning([ok], rule, engine=hf_engine, problems=probs)  # fine
    with pytest.raises(ConfigError, match="has none"):
        replay_pruning([bare], rule, engine=hf_engine, problems=probs)
    with pytest.raises(ConfigError, match="tokenizer does not"):
        replay_pruning([other], rule, engine=hf_engine, problems=probs)
    with pytest.raises(ConfigError, match="prompt"):
        replay_pruning([ok], rule, engine=hf_engine, problems=[])


def test_cli_replay_selfeval_top_equals_the_live_run(tmp_path: Path) -> None:
    model = _model()
    spec = "selfeval-top:checkpoint=16,keep=0.5,yes=Y,no=N"
    common = ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "3", "--n", "6",
              "--max-tokens", "48", "--seed", "0", "--no-progress"]  # fmt: skip
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "live"), "--prune", spec])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "fixed")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["replay", str(tmp_path / "fixed"), "--rule", spec, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    live = json.loads((tmp_path / "live" / "manifest.json").read_text())["pruning"]
    rows = [json.loads(x) for x in (tmp_path / "live" / "pruning.jsonl").read_text().splitlines()]
    assert d["rule"] == live["rule"] and d["pruned"] == live["pruned"] > 0
    assert d["scored_tokens"] == live["scored_tokens"] > 0
    assert str(model) in d["scoring_model"] and "run's own model" in d["scoring_model"]
    # tokens/problem: kept traces in full + pruned ones cut at the live cut point
    from ttscale.store import SampleStore

    live_store = SampleStore.open(tmp_path / "live")
    cut = sum(s.num_tokens for s in live_store.samples())
    assert d["tokens"]["mean"] * d["problems"] == pytest.approx(cut)
    assert sum(r_["pruned_at"] is not None for r_ in rows) == d["pruned"]
    # text output names the scoring model and the scored tokens
    r = runner.invoke(app, ["replay", str(tmp_path / "fixed"), "--rule", spec, "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert "self-evaluation scored tokens" in r.output and f"{live['scored_tokens']}" in r.output
    # the threshold rule with every=: replayed, with a note on the later chunks' seeds
    r = runner.invoke(app, ["replay", str(tmp_path / "fixed"), "--rule", "selfeval:checkpoint=8,every=8,yes=Y,no=N"])
    assert r.exit_code == 0 and "seed substream" in r.output and "scored tokens" in r.output, r.output
    # refusals, one line each: --model for another rule, a pruned run, a run with no local model
    r = runner.invoke(app, ["replay", str(tmp_path / "fixed"), "--rule", "lowprob:threshold=-2", "--model", str(model)])
    assert r.exit_code == 1 and "--model is for the self-evaluation rules" in r.output
    r = runner.invoke(app, ["replay", str(tmp_path / "live"), "--rule", spec])
    assert r.exit_code == 1 and "Traceback" not in r.output
    toy = tmp_path / "toy"
    r = runner.invoke(app, ["sample", "--engine", "scripted", "--benchmark", "arith", "--limit", "2", "--n", "2",
                            "--no-progress", "--out", str(toy)])  # fmt: skip
    assert r.exit_code == 0, r.output
    # the scripted engine's character ids are not the bundled tokenizer's
    r = runner.invoke(app, ["replay", str(toy), "--rule", spec])
    assert r.exit_code == 1 and "tokenizer does not turn the run's token ids" in r.output
    SampleStore.open(toy).modify_manifest(lambda m: m.update(model="someone/remote-model"))
    r = runner.invoke(app, ["replay", str(toy), "--rule", spec])
    assert r.exit_code == 1 and "pass --model PATH" in r.output and len(r.output.strip().splitlines()) == 1


def test_replay_decisions_match_a_hand_computed_reference_on_the_toy_model() -> None:
    """Independent of the live sampler: P(no) from the toy model's own next-token table on each
    stored trace's first `checkpoint` characters, ranked by hand."""
    import math

    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.types import Problem

    eng = ScriptedEngine()
    problems = [Problem(id=f"p{i}", prompt=f"q{i} ", reference="1") for i in range(3)]
    params = SamplingParams(max_tokens=30, logprobs=0, seed=4)
    full = list(RepeatedSampler(eng, params, progress=False).sample(problems, 6, seed=4))
    comps = [c.completion for r in full for c in r.candidates]
    rule = SelfEvalTop(checkpoint=8, keep=0.5, prompt="", yes="y", no="n")
    rep = replay_pruning(comps, rule, engine=eng, problems=problems)
    idx = {ch: 1 + eng.alphabet.index(ch) for ch in "ny"}
    pruned = 0
    for p, r in zip(rep.problems, full, strict=True):
        scores = {}
        for c in r.candidates:
            comp = c.completion
            if comp.num_tokens > 8:
                ctx = r.problem.prompt + eng.decode((comp.token_ids or ())[:8])
                lp = eng._next_logprobs(ctx[-eng.order:])
                scores[c.index] = 1 / (1 + math.exp(lp[idx["y"]] - lp[idx["n"]]))
        ranked = sorted(scores, key=lambda i: (-scores[i], i))
        losers = set(ranked[max(1, math.ceil(0.5 * len(ranked))):])
        long = {c.index for c in r.candidates if c.completion.num_tokens > 9}
        assert {t.index for t in p.pruned} == losers & long
        assert all(t.pruned_at == 9 and t.tokens == 9 for t in p.pruned)
        # every scored trace ran one prompt: question + 8 characters (the toy engine's tokens)
        assert p.scored_tokens == len(scores) * (len(r.problem.prompt) + 8)
        pruned += len(p.pruned)
    assert pruned > 0
    # the threshold rule with every=: stopped at the first checkpoint where P(no) < threshold
    thr = SelfEval(checkpoint=5, every=5, threshold=0.5, prompt="", yes="y", no="n")
    rep = replay_pruning(comps, thr, engine=eng, problems=problems)
    for p, r in zip(rep.problems, full, strict=True):
        for t, c in zip(p.traces, r.candidates, strict=True):
            ids = c.completion.token_ids or ()
            want = None
            for k in range(5, c.completion.num_tokens, 5):  # the last token never prunes
                lp = eng._next_logprobs((r.problem.prompt + eng.decode(ids[:k]))[-eng.order:])
                if 1 / (1 + math.exp(lp[idx["y"]] - lp[idx["n"]])) < 0.5:
                    want = k
                    break
            assert t.pruned_at == want
    assert rep.pruned > 0
