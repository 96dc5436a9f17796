"""Score sets (``RUN/scores/<set>/``): bound to one configuration, extended only by it, replaced
only with ``replace`` (the old shards kept aside), never named like a verdict set; the latest
shard wins per key; the pool sees each set as a score of its name, aligned by key."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ttscale.errors import ConfigError, StoreError
from ttscale.store import SampleStore
from ttscale.types import Problem, Sample, Verdict, VerdictStatus


def _store(tmp_path: Path) -> SampleStore:
    s = SampleStore.create(tmp_path / "run", {"model": "m", "benchmark": "b"})
    s.write_problems([Problem(id="p1", prompt="x"), Problem(id="p2", prompt="y")])
    s.append([Sample(problem_id=p, index=i, text=f"{p}{i}", answer="1", correct=True) for p in ("p2", "p1") for i in (1, 0)])
    return s


def test_claim_extend_replace_and_read(tmp_path: Path) -> None:
    s = _store(tmp_path)
    cfg = {"kind": "self_certainty", "model": "a"}
    assert s.claim_score_set("sc", cfg) == "new"
    fp = s.score_set_record("sc")["fingerprint"]
    assert s.add_scores("sc", [("p1", 0, 1.5, None), ("p2", 1, math.nan, {"tokens": 0})], fingerprint=fp) == 2
    assert s.claim_score_set("sc", cfg) == "same"
    s.add_scores("sc", [("p1", 0, 2.5, None), ("p2", 0, 3.0, None)], fingerprint=fp)  # p1/0 again: latest wins
    assert s.scored_keys("sc") == {("p1", 0), ("p2", 0), ("p2", 1)}
    t = s.score_table("sc")
    assert t.column("score").to_pylist()[:2] == [2.5, 3.0]
    # the pool: a score named after the set, aligned by (problem_id, index); unscored = NaN
    pool = SampleStore.open(s.path).pool()
    got = pool.scores["sc"]
    assert got[0] == 2.5 and math.isnan(got[1]) and got[2] == 3.0 and math.isnan(got[3])
    with pytest.raises(StoreError, match="--force"):
        s.claim_score_set("sc", {"kind": "self_certainty", "model": "b"})
    with pytest.raises(StoreError, match="another configuration"):
        s.add_scores("sc", [("p1", 1, 1.0, None)], fingerprint="0" * 16)
    assert s.claim_score_set("sc", {"kind": "self_certainty", "model": "b"}, replace=True) == "replaced"
    assert s.score_sets() == [] and len(list((s.path / "scores" / ".replaced").iterdir())) == 1
    assert s.score_set_record("sc")["config"]["model"] == "b"


def test_a_score_set_is_never_named_like_a_verdict_set(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.add_verdicts([Verdict(problem_id="p1", index=0, status=VerdictStatus.PASS, verifier="arith", answer="1",
                            correct=True)], verifier="arith")  # fmt: skip
    with pytest.raises(ConfigError, match="verdict set"):
        s.claim_score_set("arith", {"kind": "x"})
    with pytest.raises(ConfigError, match="invalid score set name"):
        s.claim_score_set("../x", {"kind": "x"})
    assert np.isfinite(SampleStore.open(s.path).pool().correct).all()


def test_check_finds_and_repairs_a_damaged_score_shard(tmp_path: Path) -> None:
    from ttscale.store.check import check_run

    s = _store(tmp_path)
    s.claim_score_set("self_certainty", {"kind": "self_certainty"})
    s.add_scores("self_certainty", [("p1", 0, 1.0, None)])
    s.add_scores("self_certainty", [("p1", 1, 2.0, None)])
    bad = sorted((s.path / "scores" / "self_certainty").glob("part-*.parquet"))[1]
    bad.write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="--repair"):
        s.score_table("self_certainty")
    rep = check_run(s.path)
    assert [d.kind for d in rep.damage] == ["scores"]
    assert any("ttscale certainty" in step for step in rep.next_steps)
    check_run(s.path, repair=True)
    # the readable shard stays; the lost sample is the one the next pass scores again
    assert SampleStore.open(s.path).scored_keys("self_certainty") == {("p1", 0)}
