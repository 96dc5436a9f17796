"""The Sampler protocol, the sampling session and the check_sampler contract suite."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest

from ttscale import Problem, SamplingParams
from ttscale.engines.base import Engine, GenerationError, GenerationRequest
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers import (
    Candidate,
    Fate,
    RepeatedSampler,
    Sampler,
    SampleResult,
    SamplingSession,
)
from ttscale.seeding import sample_seed
from ttscale.store import SampleStore
from ttscale.testing import SamplerContractError, check_sampler
from ttscale.types import Completion

PARAMS = SamplingParams(n=4, max_tokens=10, seed=3)


def problems(k: int) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"question {i}: ") for i in range(k)]


def repeated(engine: Engine) -> RepeatedSampler:
    return RepeatedSampler(engine, PARAMS, progress=False, batch_size=5)


def test_in_memory_sampling_writes_nothing_and_seeds_per_problem_and_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    eng = ScriptedEngine()
    sampler = RepeatedSampler(eng, PARAMS, progress=False)
    assert isinstance(sampler, Sampler)
    out = list(sampler.sample(problems(3), 8, seed=11))
    assert list(tmp_path.iterdir()) == []  # no run directory anywhere
    assert [r.problem_id for r in out] == ["p0", "p1", "p2"]
    for r in out:
        assert isinstance(r, SampleResult) and r.iid and r.resumed == 0
        assert [c.index for c in r.candidates] == list(range(8))
        assert all(c.fate is Fate.KEPT and c.log_weight is None for c in r.candidates)
        assert [c.completion.seed for c in r.candidates] == [
            sample_seed(11, r.problem_id, i) for i in range(8)
        ]
        assert r.generated_tokens == sum(c.completion.num_tokens for c in r.candidates)
        assert r.log_weights is None and len(r.texts) == 8
    # 24 samples, and the engine saw every one exactly once
    assert sorted((q.problem_id, i) for q, _ in eng.calls for i in q.indices) == sorted(
        (f"p{k}", i) for k in range(3) for i in range(8)
    )
    with pytest.raises(FrozenInstanceError):
        out[0].generated_tokens = 0  # type: ignore[misc]


def test_sample_batches_across_problems_and_yields_as_batches_finish() -> None:
    eng = ScriptedEngine()
    sampler = RepeatedSampler(eng, PARAMS, progress=False, batch_size=6)
    it = sampler.sample(problems(4), 3, seed=0)
    first = next(it)
    # batch_size 6 = two problems of 3 in the engine at once: the first result comes before the
    # last problem is sent (p2 may take p1's slot if p1 finishes first; the engine is continuous)
    assert first.problem_id == "p0" and {"p0", "p1"} <= {q.problem_id for q, _ in eng.calls}
    assert "p3" not in {q.problem_id for q, _ in eng.calls}
    rest = list(it)
    assert [r.problem_id for r in rest] == ["p1", "p2", "p3"]


def test_sink_receives_every_sample_and_resumes(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    fresh = list(repeated(ScriptedEngine()).sample(problems(2), 4, seed=5))
    eng = ScriptedEngine(fail_after=5)
    with pytest.raises(GenerationError):
        list(repeated(eng).sample(problems(2), 4, seed=5, sink=store))
    store.refresh()
    assert len(store) == 5  # everything finished before the failure
    assert store.manifest["iid"] is True and store.manifest["sampling"]["seed"] == 5
    eng2 = ScriptedEngine()
    again = list(repeated(eng2).sample(problems(2), 4, seed=5, sink=store))
    assert sum(len(q.indices) for q, _ in eng2.calls) == 3
    assert [r.resumed for r in again] == [4, 1]
    key = lambda rs: [[(c.index, c.text, c.completion.token_ids) for c in r.candidates] for r in rs]  # noqa: E731
    assert key(again) == key(fresh)
    assert store.accounting()["generated_tokens"] == sum(r.generated_tokens for r in fresh)


def test_sample_validates_before_iteration() -> None:
    sampler = RepeatedSampler(ScriptedEngine(), PARAMS)
    with pytest.raises(ConfigError, match="budget"):
        sampler.sample(problems(1), 0, seed=0)  # not only once iterated
    with pytest.raises(ConfigError, match="unique"):
        sampler.sample([Problem("a", "q"), Problem("a", "r")], 2, seed=0)


def test_run_needs_a_store_and_names_sample() -> None:
    with pytest.raises(ConfigError, match=r"use \.sample"):
        RepeatedSampler(ScriptedEngine(), PARAMS).run(problems(1))


def test_session_counts_discarded_tokens_at_generation_time(tmp_path: Path) -> None:
    """A policy that drops what it drew still pays for it: counted, not stored."""
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    req = GenerationRequest(problem_id="p0", prompt="q: ", indices=(0, 1, 2))
    with SamplingSession(ScriptedEngine(), store) as session:
        comps = session.generate([req], PARAMS, store=False)[0]
        session.keep(comps[:1])  # keep one of three
    spent = sum(c.num_tokens for c in comps)
    assert session.generated["generated_tokens"] == spent and session.generated["samples"] == 3
    assert session.stored["samples"] == 1 and len(store) == 1
    assert session.stored["generated_tokens"] == comps[0].num_tokens


def test_session_stores_candidates_with_their_fate(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    req = GenerationRequest(problem_id="p0", prompt="q: ", indices=(0, 1))
    with SamplingSession(ScriptedEngine(), store) as session:
        a, b = session.generate([req], PARAMS, store=False)[0]
        session.keep(
            [Candidate(a, step=1, log_weight=-0.25), Candidate(b, fate=Fate.PRUNED, pruned_at=3)]
        )
    rows = {s.index: s for s in SampleStore.open(store.path).samples()}
    assert (rows[0].fate, rows[0].step, rows[0].log_weight) == ("kept", 1, -0.25)
    assert (rows[1].fate, rows[1].pruned_at) == ("pruned", 3)
    # the pruned trace's tokens are in the run's accounting too
    assert store.accounting()["generated_tokens"] == a.num_tokens + b.num_tokens


def test_candidate_validation() -> None:
    c = Completion(problem_id="p", index=0, text="x", num_tokens=1)
    assert Candidate(c, log_weight=float("nan")).log_weight == -math.inf
    with pytest.raises(ConfigError, match="pruned_at"):
        Candidate(c, fate=Fate.PRUNED)
    with pytest.raises(ConfigError, match="fate must be one of"):
        Candidate(c, fate="lost")  # type: ignore[arg-type]
    pruned = Candidate(c, step=2, parent=1, log_weight=-0.5, fate="pruned", pruned_at=1)  # type: ignore[arg-type]
    s = pruned.to_sample(iid=False)
    assert (s.step, s.parent, s.log_weight, s.fate, s.pruned_at) == (2, 1, -0.5, "pruned", 1)
    r = SampleResult(
        problem=Problem(id="p", prompt="q"),
        candidates=(Candidate(c, log_weight=-1.0), pruned, Candidate(replace(c, index=2))),
        generated_tokens=3,
        iid=False,
    )
    # kept candidates only; a kept candidate without a weight has weight 0 (log -inf)
    assert r.log_weights == (-1.0, -math.inf)


# ---- check_sampler -----------------------------------------------------------------------


def test_check_sampler_passes_on_repeated_sampler() -> None:
    ran = check_sampler(repeated)
    assert ran == ["results", "reproducible", "prefix", "accounting", "sink", "salvage", "resume"]


class _HidesDiscarded:
    """Draws budget + 1 samples and drops the last one (and its tokens) from its results."""

    def __init__(self, engine: Engine) -> None:
        self.inner = repeated(engine)

    def sample(
        self, problems: Sequence[Problem], budget: int, *, seed: int, sink: Any = None
    ) -> Iterator[SampleResult]:
        for r in self.inner.sample(problems, budget + 1, seed=seed, sink=sink):
            kept = r.candidates[:-1]
            yield replace(
                r, candidates=kept, generated_tokens=sum(c.completion.num_tokens for c in kept)
            )


class _Unseeded:
    """Ignores the seed it is given (its_hub's mistake)."""

    calls = 0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def sample(
        self, problems: Sequence[Problem], budget: int, *, seed: int, sink: Any = None
    ) -> Iterator[SampleResult]:
        _Unseeded.calls += 1
        return repeated(self.engine).sample(problems, budget, seed=_Unseeded.calls, sink=sink)


class _StoresAtTheEnd:
    """Writes to the sink only after every problem is sampled (loses work on a failure)."""

    def __init__(self, engine: Engine) -> None:
        self.inner = repeated(engine)

    def sample(
        self, problems: Sequence[Problem], budget: int, *, seed: int, sink: Any = None
    ) -> Iterator[SampleResult]:
        done = list(self.inner.sample(problems, budget, seed=seed))
        if sink is not None:
            sink.write_problems(problems)
            sink.append(c.to_sample(iid=True) for r in done for c in r.candidates)
        return iter(done)


@pytest.mark.parametrize(
    ("make", "check"),
    [(_HidesDiscarded, "accounting"), (_Unseeded, "reproducible"), (_StoresAtTheEnd, "sink")],
)
def test_check_sampler_catches_broken_samplers(make: Any, check: str) -> None:
    with pytest.raises(SamplerContractError, match=rf"check_sampler\[{check}\]"):
        check_sampler(make)


def test_check_sampler_catches_lost_samples_on_failure() -> None:
    with pytest.raises(SamplerContractError, match=r"check_sampler\[salvage\]"):
        check_sampler(_StoresAtTheEnd, skip=("sink",))
