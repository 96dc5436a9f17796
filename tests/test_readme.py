"""Every Python block of the README runs as written.

The blocks run top to bottom in one namespace (a reader following the README in one session), in
a temporary directory, on the bundled model and data. A block whose first line is
``# requires: WHAT`` (a GPU, a download) is skipped with that reason. An expression statement
whose trailing comment is a Python literal (``... .mean()   # 0.6389``, ``...   # True (exact
here)``) is checked against it: floats to the digits shown, everything else by equality.

Every block that loads the bundled model shares one transformers engine (``make_engine("hf",
bundled)`` returns it; its ``close`` waits for the end of the module), so the model loads once.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Block:
    index: int
    line: int  # 1-based line of the first code line in README.md
    code: str

    @property
    def requires(self) -> str | None:
        first = self.code.lstrip().split("\n", 1)[0]
        m = re.match(r"#\s*requires:\s*(.+)", first)
        return m.group(1).strip() if m else None

    @property
    def id(self) -> str:
        return f"block{self.index}-line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The ```python fenced blocks of ``text``, in order."""
    blocks = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"README.md:{i + 1}: a ```python block is never closed")
            blocks.append(Block(len(blocks), start + 1, "\n".join(lines[start:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())

# --- expected values written as trailing comments ----------------------------------------------


def _comment_literal(comment: str) -> tuple[bool, Any]:
    """(True, value) when the comment (without ``#``) is a Python literal, optionally followed by
    a parenthesised remark; else (False, None)."""
    text = comment.strip()
    for candidate in (text, text.split(" (", 1)[0].strip()):
        if not candidate:
            continue
        try:
            return True, ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return False, None


def _decimals(literal_text: str) -> int | None:
    m = re.fullmatch(r"-?\d+\.(\d+)", literal_text.strip())
    return len(m.group(1)) if m else None


@dataclass
class Check:
    line: int  # README line
    text: str  # the comment
    expected: Any
    decimals: int | None


def instrument(block: Block) -> tuple[ast.Module, list[Check]]:
    """The block's AST with every checkable expression statement stored for comparison."""
    tree = ast.parse(block.code, filename=f"README.md:{block.line}")
    src = block.code.split("\n")
    checks: list[Check] = []
    body: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and stmt.end_lineno is not None:
            # end_col_offset counts UTF-8 bytes
            tail = src[stmt.end_lineno - 1].encode()[stmt.end_col_offset:].decode()
            if "#" in tail:
                comment = tail.split("#", 1)[1]
                ok, value = _comment_literal(comment)
                if ok:
                    checks.append(Check(block.line + stmt.end_lineno - 1, comment.strip(), value,
                                        _decimals(comment.split(" (", 1)[0])))
                    target = ast.Subscript(
                        value=ast.Name("__readme_values__", ast.Load()),
                        slice=ast.Constant(len(checks) - 1), ctx=ast.Store(),
                    )
                    stmt = ast.copy_location(ast.Assign(targets=[target], value=stmt.value), stmt)
        body.append(stmt)
    tree.body = body
    ast.fix_missing_locations(tree)
    # line numbers point into README.md
    ast.increment_lineno(tree, block.line - 1)
    return tree, checks


def _matches(value: Any, check: Check) -> bool:
    if check.decimals is not None and isinstance(value, (float, np.floating)):
        return round(float(value), check.decimals) == check.expected
    if isinstance(value, np.generic):
        value = value.item()
    return bool(value == check.expected)


# --- one session: namespace, temporary directory, one shared bundled-model engine ----------


@dataclass
class Session:
    root: Path
    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "readme"})
    done: int = 0  # blocks run so far (in order)
    failed: str | None = None
    outputs: dict[int, str] = field(default_factory=dict)
    files_written: dict[int, list[str]] = field(default_factory=dict)
    names: dict[int, dict[str, Any]] = field(default_factory=dict)  # the namespace after a block

    def run_through(self, index: int) -> None:
        while self.done <= index:
            block = BLOCKS[self.done]
            self.done += 1
            if block.requires is not None:
                continue
            if self.failed is not None:
                pytest.fail(f"an earlier README block failed ({self.failed}); this one needs it")
            before = _files(self.root)
            tree, checks = instrument(block)
            values: dict[int, Any] = {}
            self.namespace["__readme_values__"] = values
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(tree, "README.md", "exec"), self.namespace)
            except BaseException:
                self.failed = block.id
                raise
            self.outputs[block.index] = out.getvalue()
            self.files_written[block.index] = sorted(_files(self.root) - before)
            self.names[block.index] = dict(self.namespace)  # later blocks may rebind a name
            wrong = [f"README.md:{c.line}: got {values[i]!r}, the comment says {c.text!r}"
                     for i, c in enumerate(checks) if not _matches(values[i], c)]
            if wrong:
                self.failed = block.id
                raise AssertionError("\n".join(wrong))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    pytest.importorskip("transformers")
    import ttscale
    import ttscale.engines
    from ttscale.evals import default_model_path

    bundled = Path(default_model_path()).resolve()
    real_make_engine = ttscale.engines.make_engine
    shared: list[Any] = []

    def make_engine(kind: str, model: Any = None, *args: Any, **kwargs: Any) -> Any:
        if kind != "hf" or model is None or Path(model).resolve() != bundled or args or kwargs:
            return real_make_engine(kind, model, *args, **kwargs)
        if not shared:
            engine = real_make_engine(kind, model)
            shared.append((engine, engine.close))
            engine.close = lambda: None  # closed once, at the end of the module
        return shared[0][0]

    root = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(ttscale.engines, "make_engine", make_engine)
        mp.setattr(ttscale, "make_engine", make_engine, raising=False)
        yield Session(root)
    for _engine, close in shared:
        close()


# --- the tests -------------------------------------------------------------------------------


def test_the_readme_has_python_blocks_and_each_says_what_it_requires() -> None:
    assert len(BLOCKS) >= 8
    for b in BLOCKS:
        ast.parse(b.code, filename=f"README.md:{b.line}")  # every block is valid Python
        if b.requires is not None:
            assert re.match(r"(gpu|download)\b", b.requires), (b.id, b.requires)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, session: Session) -> None:
    if block.requires is not None:
        pytest.skip(f"README.md:{block.line} requires {block.requires}")
    session.run_through(block.index)


def _block_with(text: str) -> Block:
    (block,) = [b for b in BLOCKS if text in b.code]
    return block


def test_readme_samples_in_memory_and_votes(session: Session) -> None:
    """The in-memory sampling example: three problems, a vote each, and no file written."""
    block = _block_with("no store: nothing is written")
    session.run_through(block.index)
    assert session.files_written[block.index] == []  # no run directory, no file at all
    lines = session.outputs[block.index].split("\n")[:-1]
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


def test_readme_python_api_block_makes_the_runs_it_analyses(session: Session) -> None:
    block = _block_with("ttscale.pass_at_k(")
    session.run_through(block.index)
    ns = session.names[block.index]
    # the curve is recomputed from the stored samples: coverage@16 is the share of problems with
    # a correct sample, majority@1 the share of correct samples
    pool = ns["pool"]
    per_problem = np.add.reduceat(np.asarray(pool.correct, dtype=float), pool.offsets[:-1])
    cov = ns["report"].curves["coverage"]
    assert cov.mean[list(cov.ks).index(16)] == pytest.approx(np.mean(per_problem > 0))
    maj = ns["report"].curves["majority"]
    assert maj.mean[list(maj.ks).index(1)] == pytest.approx(np.mean(pool.correct))
    assert {"runs/arith/manifest.json", "curve.png", "compare.png"} <= set(
        session.files_written[block.index]
    )


# --- the checker itself ----------------------------------------------------------------------


def test_trailing_comment_literals_are_checked() -> None:
    code = 'x = 2\nx / 3   # 0.6667\nx == 2   # True (a remark)\nx   # 3\nx   # just words\n'
    tree, checks = instrument(Block(0, 10, code))
    assert [(c.line, c.expected, c.decimals) for c in checks] == [
        (11, 0.6667, 4), (12, True, None), (13, 3, None)
    ]
    values: dict[int, Any] = {}
    exec(compile(tree, "README.md", "exec"), {"__readme_values__": values})
    assert [_matches(values[i], c) for i, c in enumerate(checks)] == [True, True, False]
    assert Block(0, 1, "# requires: gpu (CUDA vLLM)\nimport x\n").requires == "gpu (CUDA vLLM)"
    assert readme_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n") == [Block(0, 3, "x = 1\n")]


# --- the docs the README points to ---------------------------------------------------------

ROOT = README.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve_and_sections_cited_exist(page: Path) -> None:
    text = page.read_text()
    # the project's own docs only: the design notes these pages came from are not in the repo
    assert "ALGORITHMS.md" not in text and "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to missing {target}"
    algorithms = (ROOT / "docs" / "algorithms.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", algorithms, re.M))
    for section in re.findall(r"algorithms\.md\)? §(\d+(?:\.\d+)?)", text):
        assert section in headings, f"{page.name} cites docs/algorithms.md §{section}"


def test_the_readme_links_every_docs_page() -> None:
    text = README.read_text()
    assert DOCS and all(f"](docs/{p.name})" in text for p in DOCS)


def _algorithms_headings() -> set[str]:
    text = (ROOT / "docs" / "algorithms.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, re.M))


def test_code_cites_the_docs_in_the_repository() -> None:
    """Every file of the repository cites docs/ pages (never the design notes they came from),
    and every section of docs/algorithms.md it cites exists."""
    import subprocess

    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    headings = _algorithms_headings()
    wrong = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".cfg", ".txt") or name == "tests/test_readme.py":
            continue
        text = path.read_text(errors="replace")
        for old in ("ALGORITHMS.md", "DESIGN.md", "STYLE.md"):
            if old in text:
                wrong.append(f"{name} cites {old}: cite docs/ instead")
        for m in re.finditer(r"docs/algorithms\.md\)?,?\s*(?:sections?\s*|§\s*)?([\d][\d.,/\s§-]*)",
                             text):
            for section in re.findall(r"\d+(?:\.\d+)?", m.group(1)):
                if section not in headings:
                    wrong.append(f"{name} cites docs/algorithms.md {section}: no such section")
    assert not wrong, "\n".join(wrong)
