"""Every path that copies a run carries its score sets (``RUN/scores/<set>/``, e.g. the exact
self-certainty of ``ttscale certainty``): ``export``/``import`` round-trip the values to the bit
with their record, so ``curve`` still says "exact"; ``merge`` keeps every value and refuses,
before writing anything, a set name that means two configurations; and ``merge`` carries a
pruning run's trace logs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import StoreError
from ttscale.select.certainty import EXACT, pool_certainties
from ttscale.store import SampleStore, merge_runs
from ttscale.types import Problem, Sample, Verdict, VerdictStatus

runner = CliRunner()
CFG = {"kind": "self_certainty", "how": EXACT, "model": "/models/m", "dtype": "float32",
       "vocab_size": 50, "positions": "generated"}  # fmt: skip
PIDS = ("p0", "p1", "p2")


def _bits(x: float | None) -> bytes | None:
    return None if x is None else struct.pack("<d", x)


def _run(path: Path, indices: range, *, seed: int, cfg: dict | None = CFG, nan_at: tuple | None = None) -> dict:
    """A run of 3 problems with answers, top log-probs (so the approximation exists too) and
    a score set ``self_certainty`` of arbitrary float64 values; returns the values by key."""
    rng = np.random.default_rng(seed)
    st = SampleStore.create(path, {"model": "m", "benchmark": "b", "sampling": {"n": max(indices) + 1, "seed": 0}})
    st.write_problems([Problem(id=p, prompt=f"q{p}", reference="1") for p in PIDS])
    smp = []
    for p in PIDS:
        for i in indices:
            # tokens 1..3 with two listed log-probs each: the top-k approximation is defined
            top = tuple({1: -0.1 - 0.1 * j, 2: -3.0} for j in range(3))
            ans = None if (p, i) == nan_at else str(i % 3)  # no value, no answer: never chosen
            smp.append(Sample(problem_id=p, index=i, text=f"{p}-{i}", answer=ans, correct=i % 3 == 1,
                              token_ids=(1, 1, 2), token_logprobs=(-0.1, -0.2, -0.3), top_logprobs=top,
                              num_tokens=3, seed=i))  # fmt: skip
    st.append(smp)
    vals: dict[tuple[str, int], float] = {}
    if cfg is not None:
        st.claim_score_set("self_certainty", cfg)
        for s in smp:
            # full-precision values (53 random mantissa bits) so that any rounding shows
            vals[s.key] = float(rng.random() * 7.0 + 1e-9 * rng.random())
        if nan_at is not None:
            vals[nan_at] = float("nan")  # a sample without tokens: `ttscale certainty` stores NaN
        rows = [(p, i, v, {"tokens": 3}) for (p, i), v in vals.items()]
        fp = st.score_set_record("self_certainty")["fingerprint"]
        st.add_scores("self_certainty", rows, fingerprint=fp)
    return vals


def _stored(run: Path, name: str = "self_certainty") -> dict:
    t = SampleStore.open(run).score_table(name)
    return dict(zip(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True),
                    t.column("score").to_pylist(), strict=True))  # fmt: skip


def _curve(run: Path) -> dict:
    r = runner.invoke(app, ["curve", str(run), "--methods", "self_certainty,self_certainty_borda", "--k", "1,4",
                            "--n-boot", "10", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_export_import_round_trip_keeps_exact_values_to_the_bit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    vals = _run(src, range(4), seed=1, nan_at=("p1", 2))
    out = tmp_path / "x.jsonl"
    r = runner.invoke(app, ["export", str(src), "--out", str(out), "--no-verdicts"])
    assert r.exit_code == 0, r.output
    # strict JSON on every line (a NaN is written as null), each sample with its value
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
             for x in out.read_text().splitlines()]  # fmt: skip
    assert all("self_certainty" in d["score_sets"] for d in lines)
    nan_line = next(d for d in lines if (d["problem_id"], d["index"]) == ("p1", 2))
    assert nan_line["score_sets"]["self_certainty"] == {"score": None, "meta": {"tokens": 3}}
    r = runner.invoke(app, ["import", str(out), "--out", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    back = SampleStore.open(tmp_path / "back")
    got = _stored(tmp_path / "back")
    assert got.keys() == vals.keys()
    assert {k: _bits(v) for k, v in got.items()} == {k: _bits(v) for k, v in vals.items()}
    assert back.score_set_record("self_certainty") == SampleStore.open(src).score_set_record("self_certainty")
    assert json.loads(back.score_table("self_certainty").column("meta")[0].as_py()) == {"tokens": 3}
    # curve reads the imported run's exact values, as it reads the original's
    a, b = _curve(src), _curve(tmp_path / "back")
    assert b["meta"]["self_certainty"]["exact"] is True and "score set 'self_certainty'" in b["meta"]["self_certainty"]["source"]
    assert a["methods"] == b["methods"]
    # an export made before score sets travelled (no "score_sets" on its lines) still imports,
    # and curve then says it uses the approximation: the check above can fail
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in d.items() if k != "score_sets"}) + "\n" for d in lines))
    (tmp_path / "old.jsonl.manifest.json").write_text((tmp_path / "x.jsonl.manifest.json").read_text())
    assert runner.invoke(app, ["import", str(old), "--out", str(tmp_path / "old")]).exit_code == 0
    st = SampleStore.open(tmp_path / "old")
    assert st.score_sets() == [] and "self_certainty" not in st.manifest.get("score_sets", {})
    assert not pool_certainties(st, st.pool(), vocab_size=50).exact
    # a sidecar whose record was edited (its fingerprint no longer its configuration's): refused
    # before anything is written
    side = json.loads((tmp_path / "x.jsonl.manifest.json").read_text())
    side["manifest"]["score_sets"]["self_certainty"]["config"]["model"] = "/models/edited"
    (tmp_path / "old.jsonl.manifest.json").write_text(json.dumps(side))
    (tmp_path / "old.jsonl").write_text(out.read_text())
    r = runner.invoke(app, ["import", str(tmp_path / "old.jsonl"), "--out", str(tmp_path / "edited")])
    assert r.exit_code == 1 and "does not match its configuration" in r.output
    assert not (tmp_path / "edited" / "manifest.json").exists()
    # importing again is a no-op; into a run holding the set from another configuration: refused
    shards = sorted((tmp_path / "back" / "scores" / "self_certainty").iterdir())
    assert runner.invoke(app, ["import", str(out), "--out", str(tmp_path / "back")]).exit_code == 0
    assert sorted((tmp_path / "back" / "scores" / "self_certainty").iterdir()) == shards
    other = tmp_path / "other"
    _run(other, range(4), seed=1, cfg={**CFG, "model": "/models/another"})
    before = sorted(p.name for p in (other / "scores" / "self_certainty").iterdir())
    r = runner.invoke(app, ["import", str(out), "--out", str(other)])
    assert r.exit_code == 1 and "score set 'self_certainty'" in r.output and "new run" in r.output
    assert sorted(p.name for p in (other / "scores" / "self_certainty").iterdir()) == before


def test_merge_keeps_every_value_and_refuses_two_configurations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    va = _run(a, range(0, 4), seed=2)
    vb = _run(b, range(4, 8), seed=3)
    r = runner.invoke(app, ["merge", str(tmp_path / "m"), str(a), str(b)])
    assert r.exit_code == 0, r.output
    got = _stored(tmp_path / "m")
    assert {k: _bits(v) for k, v in got.items()} == {k: _bits(v) for k, v in {**va, **vb}.items()}
    m = SampleStore.open(tmp_path / "m")
    assert m.score_set_record("self_certainty")["fingerprint"] == SampleStore.open(a).score_set_record("self_certainty")["fingerprint"]
    assert pool_certainties(m, m.pool()).exact
    # merging again adds no value twice (and no other), nor a shard
    shards = sorted((tmp_path / "m" / "scores" / "self_certainty").iterdir())
    merge_runs(tmp_path / "m", [a, b])
    assert _stored(tmp_path / "m") == got
    assert sorted((tmp_path / "m" / "scores" / "self_certainty").iterdir()) == shards

    # the same set name made by another model: refused in one line before anything is written
    c = tmp_path / "c"
    _run(c, range(8, 10), seed=4, cfg={**CFG, "model": "/models/another"})
    r = runner.invoke(app, ["merge", str(tmp_path / "m2"), str(a), str(c)])
    assert r.exit_code == 1 and "score set 'self_certainty'" in r.output and "--name" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m2").exists()
    with pytest.raises(StoreError, match="nothing was merged"):
        merge_runs(tmp_path / "m", [c])
    assert len(SampleStore.open(tmp_path / "m")) == 24  # the target is untouched
    # nor may a score set's name be another run's verdict set
    e = tmp_path / "e"
    _run(e, range(8, 10), seed=6, cfg=None)
    SampleStore.open(e).add_verdicts([Verdict(problem_id="p0", index=8, status=VerdictStatus.PASS,
                                              verifier="self_certainty", answer="2", correct=True)],
                                     verifier="self_certainty")  # fmt: skip
    with pytest.raises(StoreError, match="verdict set"):
        merge_runs(tmp_path / "m", [e])
    assert len(SampleStore.open(tmp_path / "m")) == 24
    # a run without the set merges in: the set is kept, incomplete, and the merge says so
    d = tmp_path / "d"
    _run(d, range(8, 10), seed=5, cfg=None)
    with caplog.at_level("WARNING", logger="ttscale.store.samplestore"):
        merged, _ = merge_runs(tmp_path / "m", [d])
    said = [r.getMessage() for r in caplog.records if "score set" in r.getMessage()]
    assert len(said) == 1 and "'self_certainty'" in said[0] and "24 of 30" in said[0]
    assert "ttscale certainty" in said[0]
    assert _stored(tmp_path / "m") == got
    cert = pool_certainties(merged, merged.pool(), vocab_size=50)
    assert not cert.exact and "lacks 6 of 30" in str(cert.why)


def _pruning_run(path: Path, shard: tuple[int, int] | None) -> Path:
    """A pruning run on the scripted engine (DeepConf online: warm-up traces set a threshold,
    later traces are cut below it), whole or one shard of two."""
    from ttscale.engines.scripted import ScriptedEngine
    from ttscale.samplers.pruning import PruningSampler
    from ttscale.types import SamplingParams

    problems = [Problem(id=f"t{i}", prompt=f"{i}+{i}=", reference=str(2 * i)) for i in range(4)]
    params = SamplingParams(max_tokens=40, logprobs=3, seed=1)
    sink = SampleStore.create(path, {"model": "toy", "sampling": {"n": 6, "seed": 1}})
    sampler = PruningSampler(ScriptedEngine(), params, "deepconf-online:eta=50,warmup=2,window=4")
    for _ in sampler.sample(problems, 6, seed=1, sink=sink, shard=shard):
        pass
    return path


def _by_key(lines: list[str]) -> list[str]:
    return sorted(lines, key=lambda x: (json.loads(x)["problem_id"], json.loads(x)["index"]))


def test_merge_copies_pruning_trace_logs(tmp_path: Path) -> None:
    whole = _pruning_run(tmp_path / "whole", None)
    shards = [_pruning_run(tmp_path / f"s{i}", (i, 2)) for i in range(2)]
    assert SampleStore.open(whole).manifest["pruning"]["pruned"] > 0  # something to record
    merged, _ = merge_runs(tmp_path / "m", shards)
    want = (whole / "pruning.jsonl").read_text().splitlines()
    got = (merged.path / "pruning.jsonl").read_text().splitlines()
    assert _by_key(got) == _by_key(want) and len(got) == len(merged)
    w, g = SampleStore.open(whole).manifest["pruning"], merged.manifest["pruning"]
    for field in ("rule", "traces", "pruned", "generated_tokens", "thresholds"):
        assert g[field] == w[field], field
    assert len(list((merged.path / "pruning").glob("*.jsonl"))) == len(shards)
    merge_runs(tmp_path / "m", shards)  # again: nothing doubled
    assert (merged.path / "pruning.jsonl").read_text().splitlines() == got
    r = runner.invoke(app, ["check", str(merged.path)])
    assert r.exit_code == 0 and "no damage" in r.output


def test_export_import_carries_the_pruning_trace_log(tmp_path: Path) -> None:
    run = _pruning_run(tmp_path / "run", None)
    out = tmp_path / "p.jsonl"
    assert runner.invoke(app, ["export", str(run), "--out", str(out), "--no-verdicts"]).exit_code == 0
    assert runner.invoke(app, ["import", str(out), "--out", str(tmp_path / "back")]).exit_code == 0
    back = SampleStore.open(tmp_path / "back")
    def records(f: Path) -> list[dict]:
        return [json.loads(x) for x in f.read_text().splitlines()]

    assert records(back.path / "pruning.jsonl") == records(run / "pruning.jsonl")
    assert back.manifest["pruning"] == SampleStore.open(run).manifest["pruning"]
    # kept as a session log too: a merge (or a resumed pruning run) rebuilds the same record
    merged, _ = merge_runs(tmp_path / "m", [back.path])
    assert records(merged.path / "pruning.jsonl") == records(run / "pruning.jsonl")
