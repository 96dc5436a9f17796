"""JSONL import/export: schema, defaults, line-numbered errors, nothing half-written."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from ttscale.errors import DataError
from ttscale.store import SampleStore
from ttscale.store.jsonio import (
    export_jsonl,
    import_jsonl,
    read_samples_jsonl,
    sample_to_json,
    sidecar_path,
)
from ttscale.types import Sample


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_import_defaults_index_to_file_order_per_problem(tmp_path):
    f = _write(
        tmp_path / "s.jsonl",
        [
            {"problem_id": "a", "text": "x", "answer": "1", "correct": True},
            {"problem_id": "b", "answer": None},
            {"problem_id": "a", "answer": 2, "token_logprobs": [-1.0, -0.5]},
            {"problem_id": "a", "index": 7, "scores": {"rm": 0.25}, "source": "kept"},
        ],
    )
    store, new = import_jsonl(f, tmp_path / "run")
    assert new == 4
    got = {(s.problem_id, s.index): s for s in store.samples()}
    assert set(got) == {("a", 0), ("a", 1), ("a", 7), ("b", 0)}
    assert got[("a", 1)].answer == "2"  # numbers become answer strings
    assert got[("a", 1)].logprob == pytest.approx(-1.5)
    assert got[("a", 1)].mean_logprob == pytest.approx(-0.75)
    assert got[("a", 7)].meta == {"source": "kept"}
    assert got[("b", 0)].answer is None  # never the string "None"


def test_reimport_is_idempotent_and_gz_works(tmp_path):
    rows = [{"problem_id": "a", "text": f"t{i}", "correct": i % 2 == 0} for i in range(5)]
    gz = tmp_path / "s.jsonl.gz"
    with gzip.open(gz, "wt") as g:
        g.write("".join(json.dumps(r) + "\n" for r in rows))
    _, n1 = import_jsonl(gz, tmp_path / "run")
    _, n2 = import_jsonl(gz, tmp_path / "run")
    assert (n1, n2) == (5, 0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ({"text": "no id"}, "line 2: 'problem_id'"),
        ({"problem_id": "a", "index": -1}, "line 2: 'index' must be >= 0"),
        ({"problem_id": "a", "correct": "yes"}, "line 2: 'correct'"),
        ({"problem_id": "a", "token_logprobs": "x"}, "line 2: 'token_logprobs'"),
        ({"problem_id": "a", "scores": {"rm": "high"}}, "line 2: 'scores.rm'"),
        ({"problem_id": "z", "index": 0}, "line 2: duplicate"),
    ],
)
def test_malformed_line_reported_and_nothing_written(tmp_path, bad, message):
    f = _write(tmp_path / "s.jsonl", [{"problem_id": "z", "index": 0}, bad, {"problem_id": "c"}])
    with pytest.raises(DataError, match=message):
        import_jsonl(f, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_malformed_line_does_not_touch_an_existing_run(tmp_path):
    good = _write(tmp_path / "g.jsonl", [{"problem_id": "a", "text": "1"}])
    import_jsonl(good, tmp_path / "run")
    bad = _write(tmp_path / "b.jsonl", [{"problem_id": "b"}, "[1, 2]"])
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        import_jsonl(bad, tmp_path / "run")
    assert SampleStore.open(tmp_path / "run").counts() == {"a": 1}


def test_export_roundtrip(tmp_path):
    rows = [
        {"problem_id": "a", "index": 0, "text": "x", "answer": "1", "correct": True,
         "token_logprobs": [-0.1, -0.2], "num_tokens": 2, "scores": {"rm": 0.5}, "tag": "t"},
        {"problem_id": "b", "index": 3, "text": "", "answer": None, "correct": None},
    ]
    f = _write(tmp_path / "s.jsonl", rows)
    store, _ = import_jsonl(f, tmp_path / "run")
    buf = io.StringIO()
    assert export_jsonl(store, buf) == 2
    out = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert out[0]["tag"] == "t" and out[0]["scores"] == {"rm": 0.5}
    assert out[0]["logprob"] == pytest.approx(-0.3)
    assert out[1] == {"problem_id": "b", "index": 3, "text": "", "answer": None, "correct": None}
    # export -> import gives the same samples
    f2 = _write(tmp_path / "s2.jsonl", [json.dumps(o) for o in out])
    store2, _ = import_jsonl(f2, tmp_path / "run2")
    assert list(store2.samples()) == list(store.samples())


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_samples_jsonl(tmp_path / "nope.jsonl"))


def test_top_logprobs_round_trip_and_validation(tmp_path):
    # objects keyed by token id (strings, as JSON requires) or [id, logprob] pairs
    rows = [
        {"problem_id": "a", "text": "x", "token_ids": [5, 9],
         "top_logprobs": [{"5": -0.1, "7": -2.5}, [[9, -0.3], [1, -1.5]]]},
    ]
    f = _write(tmp_path / "s.jsonl", [json.dumps(r) for r in rows])
    s = next(iter(read_samples_jsonl(f)))
    assert s.top_logprobs == ({5: -0.1, 7: -2.5}, {9: -0.3, 1: -1.5})
    d = sample_to_json(s)
    assert d["top_logprobs"] == [{"5": -0.1, "7": -2.5}, {"9": -0.3, "1": -1.5}]
    assert d["token_ids"] == [5, 9]
    for bad, msg in [
        ({"top_logprobs": {"5": -0.1}}, "one entry per token"),
        ({"top_logprobs": [{"x": -0.1}]}, "integer token ids"),
        ({"top_logprobs": [{"5": None}]}, "null or NaN"),
        ({"top_logprobs": [[[5]]]}, r"\[token_id, logprob\]"),
    ]:
        g = _write(tmp_path / "b.jsonl", [json.dumps({"problem_id": "a", **bad})])
        with pytest.raises(DataError, match=msg):
            list(read_samples_jsonl(g))


def test_sidecar_metadata_and_problems_are_imported(tmp_path):
    from ttscale.types import Problem

    src = SampleStore.create(tmp_path / "src", {"model": "m", "benchmark": "arith",
                                                "sampling": {"n": 2, "temperature": 0.7}})
    src.write_problems([Problem("a", "1+1=?", reference="2"), Problem("b", "2+2=?", reference="4")])
    src.append([Sample("a", 0, "#### 2"), Sample("a", 1, "#### 3")])
    f = tmp_path / "e.jsonl"
    with open(f, "w") as fh:
        export_jsonl(src, fh, manifest_out=sidecar_path(f))
    store, n = import_jsonl(f, tmp_path / "back")
    assert n == 2
    m = store.manifest
    assert m["model"] == "m" and m["sampling"] == {"n": 2, "temperature": 0.7}
    assert [p.id for p in store.problems()] == ["a", "b"]
    # b has no sample: analyses see it (and that 2 samples were requested)
    pool = store.pool()
    assert pool.unsampled == ("b",) and pool.requested_n == 2
    # explicit options win over the sidecar; a broken sidecar is a one-line DataError
    store2, _ = import_jsonl(f, tmp_path / "back2", manifest={"model": "other"})
    assert store2.manifest["model"] == "other"
    sidecar_path(f).write_text("{not json")
    with pytest.raises(DataError, match="cannot read the run metadata"):
        import_jsonl(f, tmp_path / "back3")
    assert not (tmp_path / "back3").exists()
    store4, _ = import_jsonl(f, tmp_path / "back4", sidecar=False)
    assert "model" not in store4.manifest
    # importing into a run made with other settings is refused, not mixed in
    from ttscale.errors import StoreError

    other = SampleStore.create(tmp_path / "other", {"model": "m", "sampling": {"temperature": 1.0}})
    with open(f, "w") as fh:
        export_jsonl(src, fh, manifest_out=sidecar_path(f))
    with pytest.raises(StoreError, match="temperature"):
        import_jsonl(f, other.path)
    assert len(other) == 0
