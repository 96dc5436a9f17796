"""``ttscale bench list`` / ``bench show``."""

from __future__ import annotations

from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.evals.registry import list_benchmarks

runner = CliRunner()


def test_bench_list_shows_every_benchmark() -> None:
    res = runner.invoke(app, ["bench", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for b in list_benchmarks():
        assert b.name in res.output
    assert "1319" in res.output and "arith" in res.output and "verifier" in res.output


def test_bench_show_arith() -> None:
    res = runner.invoke(app, ["bench", "show", "arith"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "problems (test): 200" in res.output
    assert "verifier: arith" in res.output
    assert "How many" in res.output and "{question}" in res.output


def test_bench_show_train_split_other_index() -> None:
    res = runner.invoke(app, ["bench", "show", "arith", "--split", "train", "--index", "3"])
    assert res.exit_code == 0, res.output
    assert "arith-train-00003" in res.output


def test_bench_show_unknown_is_one_line_exit_1() -> None:
    res = runner.invoke(app, ["bench", "show", "gsm9k"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown benchmark 'gsm9k'" in lines[0] and "gsm8k" in lines[0]


def test_bench_show_not_bundled_still_describes() -> None:
    res = runner.invoke(
        app,
        ["bench", "show", "aime24"],
        env={"TTSCALE_DATA_DIR": "/nonexistent", "HF_DATASETS_OFFLINE": "1"},
    )
    assert res.exit_code == 0, res.output
    assert "not bundled" in res.output


def test_bench_show_custom_file_with_field_mapping(tmp_path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text('{"qid": "q1", "question": "What is 2+2?", "gold": "4"}\n')
    res = runner.invoke(
        app, ["bench", "show", f"custom:{f}", "--field", "id=qid,prompt=question,reference=gold"]
    )
    assert res.exit_code == 0, res.output
    assert "What is 2+2?" in res.output and "problem q1" in res.output
