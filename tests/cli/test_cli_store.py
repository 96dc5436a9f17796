"""CLI: import / export / info, and user errors as one line with exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from ttscale.cli.app import app

runner = CliRunner()


def test_import_export_info(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(
        json.dumps({"problem_id": "a", "text": "x", "answer": "1", "correct": True}) + "\n"
        + json.dumps({"problem_id": "a", "text": "y", "answer": "2", "correct": False}) + "\n"
    )
    r = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "run"), "--model", "m"])
    assert r.exit_code == 0, r.output
    assert "imported 2 new samples" in r.output
    r = runner.invoke(app, ["info", str(tmp_path / "run"), "--json"])
    info = json.loads(r.output)
    assert info["samples"] == 2 and info["problems"] == 1 and info["model"] == "m"
    out = tmp_path / "e.jsonl"
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["x", "y"]


def test_user_errors_are_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem_id": "a"}\n{"problem_id": 3}\n')
    r = runner.invoke(app, ["import", str(bad), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: {bad}: line 2: 'problem_id' (a non-empty string) is required"
    ]
    r = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "not a ttscale run directory" in r.output


def test_console_script_entry_point(tmp_path):
    # the installed entry point gives the same one-line error, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "ttscale.cli.app", "info", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:")
