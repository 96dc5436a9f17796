"""The README's in-memory sampling example, run as written (bundled model, no run directory)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the code below is run by tests/test_readme_example.py -->"


def example() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost its tested example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    return block.group(1)


def test_readme_samples_in_memory_and_votes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example(), "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().split("\n")[:-1]
    assert list(tmp_path.iterdir()) == []  # no run directory, no file at all
    assert len(lines) == 3
    from ttscale.evals import load_problems

    problems = load_problems("arith", limit=3)
    for line, p in zip(lines, problems, strict=True):
        pid, vote, ref, tokens = line.split(" ")
        assert pid == p.id and ref == str(p.reference) and int(tokens) > 0
        # the vote is one of the sampled answers' canonical forms: an integer (or None)
        assert vote == "None" or re.fullmatch(r"-?\d+", vote)
    # the bundled model votes right on most of these easy problems (2 of 3 at seed 0)
    assert sum(line.split(" ")[1] == line.split(" ")[2] for line in lines) >= 2
