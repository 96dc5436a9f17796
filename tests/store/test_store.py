"""SampleStore: atomic shards, (problem_id, index) keys, dedupe/conflicts, verdicts, Pool view."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from ttscale.errors import ConfigError, StoreError
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample, Verdict


def _samples(pid: str, n: int, start: int = 0) -> list[Sample]:
    return [
        Sample(
            pid,
            i,
            text=f"{pid}-{i}",
            token_ids=[1, 2, i],
            token_logprobs=[-0.5, -0.25, -0.25 * (i + 1)],
            answer=str(i % 3),
            correct=(i % 3 == 0),
            seed=1000 + i,
            scores={"rm": 0.1 * i},
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
def store(tmp_path):
    return SampleStore.create(
        tmp_path / "run", {"model": "tiny", "sampling": {"temperature": 1.0, "n": 8, "seed": 0}}
    )


def test_manifest_records_provenance(store):
    m = store.manifest
    assert m["format"] == "ttscale-run"
    assert m["model"] == "tiny"
    assert m["ttscale_version"]
    assert m["created"].endswith("+00:00")
    store.update_manifest(accounting={"tokens": 5})
    store.update_manifest(accounting={"seconds": 2.0})
    assert SampleStore.open(store.path).manifest["accounting"] == {"tokens": 5, "seconds": 2.0}


def test_append_roundtrip_and_derived_fields(store):
    assert store.append(_samples("p", 3)) == 3
    got = list(store.samples("p"))
    assert [s.index for s in got] == [0, 1, 2]
    s = got[2]
    assert s.token_ids == (1, 2, 2)
    assert s.logprob == pytest.approx(-0.5 - 0.25 - 0.75)
    assert s.mean_logprob == pytest.approx((-0.5 - 0.25 - 0.75) / 3)
    assert s.num_tokens == 3
    assert s.scores == {"rm": pytest.approx(0.2)}
    assert s.answer == "2" and s.correct is False


def test_same_content_is_ignored_and_conflict_is_error(store):
    store.append(_samples("p", 4))
    assert store.append(_samples("p", 4)) == 0  # a resumed run re-sending finished samples
    assert store.append(_samples("p", 6)) == 2
    bad = Sample("p", 1, text="something else", seed=1)
    with pytest.raises(StoreError, match="different content"):
        store.append([bad])
    # nothing of the failed batch was written
    assert len(SampleStore.open(store.path)) == 6
    with pytest.raises(StoreError):
        store.append([Sample("q", 0, text="a"), Sample("q", 0, text="b")])
    assert "q" not in SampleStore.open(store.path).counts()


def test_shards_are_atomic_and_stray_tmp_files_ignored(store):
    store.append(_samples("p", 2))
    d = store.path / "samples"
    # simulate a writer killed between write and rename (two hours ago) ...
    old = d / ".part-x.parquet.deadbeef.tmp"
    old.write_bytes(b"garbage")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    # ... and another worker writing a shard right now: its file must survive our reads
    live = d / ".part-y.parquet.cafe.tmp"
    live.write_bytes(b"half a shard")
    reopened = SampleStore.open(store.path)
    assert len(reopened) == 2
    assert reopened.table().num_rows == 2
    assert list(d.glob("*.tmp")) == [live]


def test_merge_shards_from_several_workers(tmp_path):
    m = {"model": "tiny", "sampling": {"temperature": 1.0, "seed": 0}}
    a = SampleStore.create(tmp_path / "a", m)
    b = SampleStore.create(tmp_path / "b", m)
    a.append(_samples("p", 4))
    b.append(_samples("p", 6, start=2))  # overlaps a on indices 2, 3 with identical content
    b.append(_samples("q", 2))
    merged = SampleStore.create(tmp_path / "m", m)
    merged.merge_from(a)
    merged.merge_from(b)
    assert merged.counts() == {"p": 8, "q": 2}
    # copying shard files directly also works: duplicates collapse on read
    for f in (tmp_path / "b" / "samples").glob("*.parquet"):
        os.link(f, tmp_path / "a" / "samples" / f.name)
    t = SampleStore.open(tmp_path / "a").table(["answer"])
    assert t.num_rows == 10
    keys = list(zip(t["problem_id"].to_pylist(), t["index"].to_pylist(), strict=True))
    assert keys == sorted(set(keys))


def test_conflicting_shards_detected_on_read(tmp_path):
    m = {"sampling": {"seed": 0}}
    a = SampleStore.create(tmp_path / "a", m)
    b = SampleStore.create(tmp_path / "b", m)
    a.append([Sample("p", 0, text="x")])
    b.append([Sample("p", 0, text="y")])
    for f in (tmp_path / "b" / "samples").glob("*.parquet"):
        os.link(f, tmp_path / "a" / "samples" / f.name)
    with pytest.raises(StoreError, match="conflicting"):
        SampleStore.open(tmp_path / "a").table()


def test_open_or_create_checks_sampling_parameters(tmp_path):
    m = {"model": "tiny", "sampling": {"temperature": 1.0, "n": 8, "seed": 0, "stop": ["\n"]}}
    SampleStore.open_or_create(tmp_path / "r", m)
    # n may grow (extend), everything else must match
    SampleStore.open_or_create(tmp_path / "r", {**m, "sampling": {**m["sampling"], "n": 64}})
    with pytest.raises(StoreError, match=r"temperature 1\.0 != 0\.7"):
        SampleStore.open_or_create(tmp_path / "r", {**m, "sampling": {**m["sampling"], "temperature": 0.7}})
    with pytest.raises(StoreError, match="model"):
        SampleStore.open_or_create(tmp_path / "r", {**m, "model": "other"})


def test_create_refuses_foreign_or_existing_dirs(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("hi")
    with pytest.raises(StoreError, match="non-empty"):
        SampleStore.create(tmp_path / "x")
    SampleStore.create(tmp_path / "y")
    with pytest.raises(StoreError, match="already exists"):
        SampleStore.create(tmp_path / "y")
    with pytest.raises(StoreError, match="not a ttscale run"):
        SampleStore.open(tmp_path / "nope")


def test_problems_roundtrip(store):
    store.write_problems([Problem("p1", "2+2?", reference="4", meta={"level": 1})])
    store.write_problems([Problem("p2", "3+3?", reference={"tests": ["assert f()"]})])
    got = {p.id: p for p in store.problems()}
    assert got["p1"].reference == "4" and got["p1"].meta == {"level": 1}
    assert got["p2"].reference == {"tests": ["assert f()"]}
    with pytest.raises(StoreError, match="different prompt"):
        store.write_problems([Problem("p1", "changed")])


def test_verdicts_join_into_pool(store):
    store.append(_samples("p", 4) + _samples("q", 2))
    v = [
        Verdict("p", 0, "pass", "math", answer="A", score=0.9),
        Verdict("p", 1, "fail", "math", answer="B", correct=False, score=0.1),
        Verdict("p", 2, "invalid", "math", answer=None, correct=False),
    ]
    assert store.add_verdicts(v, verifier="math") == 3
    assert store.verified_keys("math") == {("p", 0), ("p", 1), ("p", 2)}
    # a later verdict for the same key wins
    store.add_verdicts([Verdict("p", 1, "pass", "math", answer="A", score=0.8)], verifier="math")
    pool = store.pool("math")
    assert list(pool.problem_ids) == ["p", "q"]
    assert list(pool.offsets) == [0, 4, 6]
    ans = [pool.answer_string(int(c)) for c in pool.answer]
    # p/3 and q/* were not verified: they keep the answers stored with the samples
    assert ans == ["A", "A", None, "0", "0", "1"]
    np.testing.assert_array_equal(pool.correct, [1, 1, 0, 1, 1, 0])
    np.testing.assert_allclose(pool.scores["math"][:3], [0.9, 0.8, np.nan])
    np.testing.assert_allclose(pool.scores["rm"], [0, 0.1, 0.2, 0.3, 0, 0.1])
    np.testing.assert_array_equal(pool.correct_counts(), [3, 1])
    with pytest.raises(ConfigError, match="no verdicts"):
        store.pool("judge")


def test_pool_reads_columns_without_python_objects(store):
    rng = np.random.default_rng(0)
    rows = []
    for p in range(50):
        for i in range(40):
            rows.append(
                Sample(f"p{p:03d}", i, text=str(rng.integers(5)), answer=str(rng.integers(4)),
                       correct=bool(rng.integers(2)), logprob=-float(rng.random()), num_tokens=4)
            )
    store.append(rows)
    pool = store.pool()
    assert pool.num_problems == 50 and pool.num_samples == 2000
    assert pool.answer.dtype == np.int64 and pool.correct.dtype == np.float64
    np.testing.assert_array_equal(pool.n_per_problem, 40)
    view = pool.problem(7)
    assert view.problem_id == "p007" and view.n == 40
    expected = [r.correct for r in rows[7 * 40 : 8 * 40]]
    np.testing.assert_array_equal(view.correct, np.array(expected, dtype=float))
    # text ids identify identical texts
    texts = [r.text for r in rows[7 * 40 : 8 * 40]]
    same = np.equal.outer(view.text_id, view.text_id)
    np.testing.assert_array_equal(same, np.equal.outer(np.array(texts), np.array(texts)))


def test_shard_files_are_plain_parquet(store):
    store.append(_samples("p", 2))
    (f,) = (store.path / "samples").glob("part-*.parquet")
    t = pq.read_table(f)
    assert {"problem_id", "index", "text", "token_logprobs", "answer", "correct"} <= set(t.column_names)
    assert json.loads((store.path / "manifest.json").read_text())["format_version"] == 1


def test_pool_does_not_create_per_sample_python_objects(tmp_path):
    import gc
    import sys

    s = SampleStore.create(tmp_path / "big")
    P, n = 100, 200
    s.append(
        Sample(f"p{p:03d}", i, text=f"t{i % 7}", answer=str(i % 5), correct=i % 3 == 0,
               logprob=-1.0, num_tokens=3, scores={"rm": 0.5})
        for p in range(P) for i in range(n)
    )
    s = SampleStore.open(s.path)
    s.pool()  # warm-up: the first call imports modules
    gc.collect()
    before = sys.getallocatedblocks()
    pool = s.pool()
    after = sys.getallocatedblocks()
    assert pool.num_samples == P * n
    # a few objects per problem and per distinct answer are fine; one per sample (20,000) is not
    assert after - before < 5_000, after - before


def test_verdict_sets_are_claimed_by_configuration(tmp_path):
    from ttscale.types import Verdict, VerdictStatus

    m = {"model": "tiny", "sampling": {"seed": 0}}
    info_a = {"class": "MathVerifier", "extractor": "last_number", "timeout_s": 5.0, "workers": 1}
    info_b = {**info_a, "extractor": "boxed"}
    a = SampleStore.create(tmp_path / "a", m)
    a.append(_samples("p", 2))
    assert a.claim_verdicts("math", spec="math", info=info_a) == "new"
    fp = a.verdict_record("math")["fingerprint"]
    a.add_verdicts([Verdict("p", 0, VerdictStatus.PASS, "math", correct=True)], verifier="math",
                   fingerprint=fp)
    # worker counts are not part of the configuration; the extractor is
    assert a.claim_verdicts("math", spec="math:last_number", info={**info_a, "workers": 8}) == "same"
    with pytest.raises(StoreError, match=r"--force.*--name"):
        a.claim_verdicts("math", spec="math:boxed", info=info_b)
    # a writer holding the old fingerprint cannot add to a set claimed by another configuration
    assert a.claim_verdicts("math", spec="math:boxed", info=info_b, replace=True) == "replaced"
    with pytest.raises(StoreError, match="another configuration"):
        a.add_verdicts([Verdict("p", 1, VerdictStatus.FAIL, "math", correct=False)],
                       verifier="math", fingerprint=fp)
    assert a.verdict_table("math").num_rows == 0  # the old verdicts were moved aside
    assert list((a.path / "verdicts" / ".replaced").iterdir())
    assert a.verifiers() == [] and a.verdict_record("math")["spec"] == "math:boxed"
    assert a.manifest["replaced_verdicts"][0]["record"]["spec"] == "math:last_number"
    # a claimed set without verdicts (an interrupted verify) describes nothing: claimable again
    assert a.claim_verdicts("math", spec="math:last_number", info=info_a) == "new"
    assert a.claim_verdicts("math", spec="math:boxed", info=info_b) == "new"
    a.add_verdicts([Verdict("p", 1, VerdictStatus.FAIL, "math", correct=False)], verifier="math",
                   fingerprint=a.verdict_record("math")["fingerprint"])
    # merging runs whose same-named sets differ in configuration is refused
    b = SampleStore.create(tmp_path / "b", m)
    b.append(_samples("p", 2))
    b.claim_verdicts("math", spec="math:last_number", info=info_a)
    b.add_verdicts([Verdict("p", 1, VerdictStatus.PASS, "math", correct=True)], verifier="math")
    with pytest.raises(StoreError, match="before merging"):
        a.merge_from(b)
    c = SampleStore.create(tmp_path / "c", m)
    c.merge_from(b)
    assert c.verdict_record("math")["fingerprint"] == b.verdict_record("math")["fingerprint"]
    assert c.verdict_table("math").num_rows == 1
