"""RepeatedSampler: n per problem, batching, streaming shards, resume, extend, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ttscale import Problem, SamplingParams, StoreError
from ttscale.engines.base import GenerationError, GenerationRequest
from ttscale.engines.scripted import ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers import RepeatedSampler
from ttscale.seeding import sample_seed
from ttscale.store import SampleStore
from ttscale.types import Completion

PARAMS = SamplingParams(n=8, max_tokens=12, seed=7)


def problems(k: int) -> list[Problem]:
    return [Problem(id=f"p{i:02d}", prompt=f"question {i}: ") for i in range(k)]


class Counting:
    """Wraps an engine and records each ``generate`` call's requests."""

    def __init__(self, inner: Any, *, call_on_result: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self.generate_calls: list[list[GenerationRequest]] = []
        self.call_on_result = call_on_result

    def generate(self, requests, params, *, on_result=None):  # type: ignore[no-untyped-def]
        self.generate_calls.append(list(requests))
        return self.inner.generate(
            requests, params, on_result=on_result if self.call_on_result else None
        )

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def close(self) -> None:
        pass

    @property
    def requested(self) -> list[tuple[str, int]]:
        return [(r.problem_id, i) for call in self.generate_calls for r in call for i in r.indices]


def new_store(tmp_path: Path, name: str = "run") -> SampleStore:
    return SampleStore.create(tmp_path / name, {"model": "toy", "benchmark": "unit"})


def rows(store: SampleStore) -> list[tuple[str, int, str, tuple[int, ...], int]]:
    t = store.table(["text", "token_ids", "seed"]).to_pylist()
    return [(r["problem_id"], r["index"], r["text"], tuple(r["token_ids"]), r["seed"]) for r in t]


def test_n_samples_per_problem_with_derived_seeds(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    summary = RepeatedSampler(ScriptedEngine(), PARAMS, store, progress=False).run(problems(5))
    assert store.counts() == {f"p{i:02d}": 8 for i in range(5)}
    assert store.keys() == {(f"p{i:02d}", j) for i in range(5) for j in range(8)}
    for s in store.samples():
        assert s.seed == sample_seed(7, s.problem_id, s.index)
        assert s.token_logprobs is not None and len(s.token_logprobs) == s.num_tokens
    assert summary.generated == summary.requested == 40 and summary.skipped == 0
    assert summary.complete and summary.stored == 40
    assert summary.generated_tokens == sum(s.num_tokens for s in store.samples())
    # prompt tokens are counted once per sample (the scripted engine's tokens are characters)
    assert summary.prompt_tokens == sum(8 * len(p.prompt) for p in problems(5))


def test_batches_across_problems(tmp_path: Path) -> None:
    eng = Counting(ScriptedEngine())
    RepeatedSampler(eng, PARAMS, new_store(tmp_path), batch_size=24, progress=False).run(
        problems(10)
    )
    # 10 problems x 8 samples in calls of at most 24 samples: 3 problems per call, 4 calls
    assert [len(c) for c in eng.generate_calls] == [3, 3, 3, 1]
    assert all(sum(len(r.indices) for r in c) <= 24 for c in eng.generate_calls)
    assert sorted(eng.requested) == sorted((f"p{i:02d}", j) for i in range(10) for j in range(8))


def test_max_per_request_splits_a_problem_into_consecutive_runs(tmp_path: Path) -> None:
    eng = Counting(ScriptedEngine())
    RepeatedSampler(
        eng, PARAMS, new_store(tmp_path), batch_size=100, max_per_request=3, progress=False
    ).run(problems(2))
    reqs = [r for c in eng.generate_calls for r in c]
    assert [r.indices for r in reqs] == [(0, 1, 2), (3, 4, 5), (6, 7)] * 2


def test_resume_generates_only_missing_keys(tmp_path: Path) -> None:
    full = new_store(tmp_path, "full")
    RepeatedSampler(ScriptedEngine(), PARAMS, full, progress=False).run(problems(6))

    store = new_store(tmp_path, "partial")
    # a previous session stored some samples: everything of p00, and indices 0, 3..5 of p01
    keep = [
        s
        for s in full.samples()
        if s.problem_id == "p00" or (s.problem_id == "p01" and s.index in (0, 3, 4, 5))
    ]
    store.append(keep)
    # ... made by a version that kept accounting in the manifest, killed between shard and
    # manifest update (today's sessions account each shard before its rename, see test_store)
    store.update_manifest(
        accounting={"samples": 0, "generated_tokens": 0, "prompt_tokens": 0, "sessions": 1}
    )
    eng = Counting(ScriptedEngine())
    summary = RepeatedSampler(eng, PARAMS, store, progress=False).run(problems(6))
    expected_missing = {("p01", i) for i in (1, 2, 6, 7)} | {
        (f"p{i:02d}", j) for i in range(2, 6) for j in range(8)
    }
    assert sorted(eng.requested) == sorted(expected_missing)
    assert summary.skipped == 12 and summary.generated == len(expected_missing)
    # the gap 1..2 and the tail 6..7 of p01 are separate requests of consecutive indices
    assert [r.indices for c in eng.generate_calls for r in c if r.problem_id == "p01"] == [
        (1, 2),
        (6, 7),
    ]
    assert rows(store) == rows(full)
    # samples stored without accounting (a process killed between shard and manifest) are
    # accounted on the next session, token for token
    acct, full_acct = store.manifest["accounting"], full.manifest["accounting"]
    assert acct["samples"] == 48 and acct["sessions"] == 2
    assert acct["generated_tokens"] == full_acct["generated_tokens"]

    # a second resume on a complete run calls the engine not at all
    eng2 = Counting(ScriptedEngine())
    again = RepeatedSampler(eng2, PARAMS, store, progress=False).run(problems(6))
    assert eng2.generate_calls == [] and again.generated == 0 and again.complete


def test_extend_keeps_first_samples_identical(tmp_path: Path) -> None:
    params = SamplingParams(n=64, max_tokens=6, seed=3)
    probs = problems(2)
    store = new_store(tmp_path)
    RepeatedSampler(ScriptedEngine(), params, store, progress=False).run(probs)
    first = rows(store)
    eng = Counting(ScriptedEngine())
    summary = RepeatedSampler(eng, params, store, progress=False).run(probs, n=256)
    assert sorted(eng.requested) == sorted((p.id, i) for p in probs for i in range(64, 256))
    assert summary.skipped == 128 and summary.generated == 384
    extended = rows(store)
    assert [r for r in extended if r[1] < 64] == first
    assert store.manifest["sampling"]["n"] == 256

    # and the extension equals a run that asked for 256 from the start
    fresh = new_store(tmp_path, "fresh")
    RepeatedSampler(ScriptedEngine(), params.replace(n=256), fresh, progress=False).run(probs)
    assert rows(fresh) == extended


class _BatchOnly(ScriptedEngine):
    """The scripted engine without its own engine loop: the scheduler coalesces what is pending
    into ``generate`` calls, which hand over every sample made before a failure."""

    open_loop = None


@pytest.mark.parametrize("background", [True, False])
def test_failure_mid_run_keeps_completed_samples(tmp_path: Path, background: bool) -> None:
    probs = problems(10)
    store = new_store(tmp_path)
    # fails while drawing the 5th sample of the 5th problem: four problems are complete
    eng = _BatchOnly(fail_after=4 * 8 + 4)
    sampler = RepeatedSampler(
        eng,
        PARAMS,
        store,
        batch_size=24,
        flush_every=1000,
        flush_seconds=3600,
        background_writes=background,
        progress=False,
    )
    with pytest.raises(GenerationError):
        sampler.run(probs)
    # nothing was due for a flush, yet everything that completed was written before the raise,
    # including the 4 finished samples of the request that failed (the engine's ``partial``)
    assert store.counts() == {**{f"p{i:02d}": 8 for i in range(4)}, "p04": 4}
    acct = store.manifest["accounting"]
    assert acct["samples"] == 36
    assert acct["generated_tokens"] == sum(s.num_tokens for s in store.samples())

    # resuming completes the run, equal to an uninterrupted one, and the accounting adds up
    RepeatedSampler(ScriptedEngine(), PARAMS, store, progress=False).run(probs)
    full = new_store(tmp_path, "full")
    RepeatedSampler(ScriptedEngine(), PARAMS, full, progress=False).run(probs)
    assert rows(store) == rows(full)
    acct2 = store.manifest["accounting"]
    assert acct2["samples"] == 80 and acct2["sessions"] == 2
    assert acct2["generated_tokens"] == full.manifest["accounting"]["generated_tokens"]
    assert acct2["wall_seconds"] >= acct["wall_seconds"]


def test_failure_on_a_continuous_engine_loses_nothing_finished_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    # run() feeds the engine loop: on an engine with its own loop (requests join and leave
    # as they finish) a failure loses the samples still in flight -- their tokens are counted
    # as discarded -- and keeps every finished one; the resume completes the run exactly
    probs = problems(10)
    store = new_store(tmp_path)
    eng = ScriptedEngine(fail_after=4 * 8 + 4)
    sampler = RepeatedSampler(eng, PARAMS, store, batch_size=24, progress=False)
    with pytest.raises(GenerationError):
        sampler.run(probs)
    kept = {s.key for s in store.samples()}
    made = [(r.problem_id, i) for r, _ in eng.calls for i in r.indices][: 4 * 8 + 4]
    assert kept and kept <= set(made)
    acct = store.manifest["accounting"]
    assert acct["samples"] == len(kept)
    stored_tokens = sum(s.num_tokens for s in store.samples())
    discarded = acct["generated_tokens"] - stored_tokens
    assert discarded >= 0
    RepeatedSampler(ScriptedEngine(), PARAMS, store, progress=False).run(probs)
    full = new_store(tmp_path, "full")
    RepeatedSampler(ScriptedEngine(), PARAMS, full, progress=False).run(probs)
    assert rows(store) == rows(full)
    acct2 = store.manifest["accounting"]
    assert acct2["samples"] == 80
    assert acct2["generated_tokens"] == full.manifest["accounting"]["generated_tokens"] + discarded


def test_partial_samples_of_a_failed_request_are_kept(tmp_path: Path) -> None:
    class Partial(Counting):
        def generate(self, requests, params, *, on_result=None):  # type: ignore[no-untyped-def]
            first = self.inner.generate(requests[:1], params, on_result=on_result)
            half = self.inner.generate(requests[1:2], params)[0][:3]
            raise GenerationError("boom", [first[0], None], {1: half})

    store = new_store(tmp_path)
    with pytest.raises(GenerationError, match="boom"):
        RepeatedSampler(Partial(ScriptedEngine()), PARAMS, store, progress=False).run(problems(2))
    assert store.counts() == {"p00": 8, "p01": 3}
    assert store.indices("p01") == {0, 1, 2}


def test_engine_without_callbacks_is_still_stored(tmp_path: Path) -> None:
    eng = Counting(ScriptedEngine(), call_on_result=False)
    store = new_store(tmp_path)
    RepeatedSampler(eng, PARAMS, store, batch_size=16, progress=False).run(problems(3))
    assert len(store) == 24


def test_streams_in_small_shards(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    RepeatedSampler(
        ScriptedEngine(), PARAMS, store, batch_size=1000, flush_every=16, progress=False
    ).run(problems(8))
    shards = sorted((store.path / "samples").glob("part-*.parquet"))
    # 64 samples, one request (8 samples) at a time, flushed every 16: 4 shards, not 1 or 64
    assert len(shards) == 4
    assert len(store) == 64


def test_chat_models_get_messages(tmp_path: Path) -> None:
    eng = Counting(ScriptedEngine())
    RepeatedSampler(
        eng, PARAMS, new_store(tmp_path), chat=True, system_prompt="Be brief.", progress=False
    ).run(problems(1))
    (req,) = eng.generate_calls[0]
    assert req.prompt is None
    assert list(req.messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 0: "},
    ]

    class ChatInfo(Counting):
        def info(self) -> dict[str, Any]:
            return {**self.inner.info(), "chat_template": True}

    eng2 = ChatInfo(ScriptedEngine())
    s = RepeatedSampler(eng2, PARAMS, new_store(tmp_path, "b"), progress=False)
    assert s.chat
    s.run(problems(1))
    assert eng2.generate_calls[0][0].messages is not None
    eng3 = Counting(ScriptedEngine())
    RepeatedSampler(eng3, PARAMS, new_store(tmp_path, "c"), progress=False).run(problems(1))
    assert eng3.generate_calls[0][0].prompt == "question 0: "


def test_manifest_records_provenance(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    RepeatedSampler(
        ScriptedEngine(logprob_mode="processed_logprobs"),
        PARAMS,
        store,
        progress=False,
        manifest={"benchmark": "unit"},
    ).run(problems(3))
    m = store.manifest
    assert m["engine"]["engine"] == "scripted"
    assert m["logprob_mode"] == "processed_logprobs"
    assert m["sampling"] == PARAMS.to_dict()
    assert m["seed"] == 7 and m["num_problems"] == 3 and m["benchmark"] == "unit"
    a = m["accounting"]
    assert a["samples"] == 24 and a["wall_seconds"] > 0
    assert a["tokens_per_s"] == pytest.approx(a["generated_tokens"] / a["wall_seconds"], rel=1e-3)
    assert [p.id for p in store.problems()] == ["p00", "p01", "p02"]


def test_incompatible_store_is_refused(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    RepeatedSampler(ScriptedEngine(), PARAMS, store, progress=False).run(problems(1))
    with pytest.raises(StoreError, match="temperature"):
        RepeatedSampler(ScriptedEngine(), PARAMS.replace(temperature=0.5), store)
    with pytest.raises(StoreError, match="model"):
        RepeatedSampler(ScriptedEngine(), PARAMS, store, manifest={"model": "other"})
    # n is not a sampling setting that must match: n=16 extends
    RepeatedSampler(ScriptedEngine(), PARAMS.replace(n=16), store, progress=False).run(problems(1))
    assert len(store) == 16


def test_bad_arguments(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    with pytest.raises(ConfigError, match="batch_size"):
        RepeatedSampler(ScriptedEngine(), PARAMS, store, batch_size=0)
    s = RepeatedSampler(ScriptedEngine(), PARAMS, store, progress=False)
    with pytest.raises(ConfigError, match="n must be"):
        s.run(problems(1), n=0)
    with pytest.raises(ConfigError, match="unique"):
        s.run([Problem(id="a", prompt="x"), Problem(id="a", prompt="x")])


def test_an_engine_returning_wrong_samples_is_an_error(tmp_path: Path) -> None:
    class Wrong(Counting):
        def generate(self, requests, params, *, on_result=None):  # type: ignore[no-untyped-def]
            out = self.inner.generate(requests, params)
            return [
                [Completion(problem_id=c.problem_id, index=c.index + 1, text=c.text) for c in comps]
                for comps in out
            ]

    with pytest.raises(GenerationError, match="one completion per requested index"):
        RepeatedSampler(Wrong(ScriptedEngine()), PARAMS, new_store(tmp_path), progress=False).run(
            problems(1)
        )


def test_progress_bar_renders_without_a_terminal(tmp_path: Path, capsys: Any) -> None:
    RepeatedSampler(ScriptedEngine(), PARAMS, new_store(tmp_path), progress=True).run(problems(2))
    err = capsys.readouterr().err
    assert "16/16" in err and "2/2 problems" in err
