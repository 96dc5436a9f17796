"""JSONL import and export of samples.

One sample per line::

    {"problem_id": "gsm8k/12", "index": 0, "text": "...", "answer": "72", "correct": true,
     "logprob": -12.3, "mean_logprob": -0.41, "token_logprobs": [...], "num_tokens": 30,
     "scores": {"rm": 0.8}, ...}

``problem_id`` (string) is required; ``index`` is optional and defaults to the line's position
among the file's lines for that problem. Every other field is optional; unknown fields are kept
in ``meta``. The whole file is validated before anything is written, so a malformed line (reported
with its line number) leaves the run directory as it was.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ttscale.errors import ConfigError, DataError
from ttscale.store.samplestore import SampleStore
from ttscale.types import Sample

__all__ = ["export_jsonl", "import_jsonl", "read_samples_jsonl", "sample_to_json"]

_KNOWN = {
    "problem_id",
    "index",
    "text",
    "answer",
    "correct",
    "logprob",
    "mean_logprob",
    "token_logprobs",
    "token_ids",
    "num_tokens",
    "scores",
    "finish_reason",
    "seed",
    "meta",
}

_CHUNK = 50_000  # samples per shard on import


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _num(v: Any, field: str, lineno: int, *, integer: bool = False) -> Any:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"line {lineno}: {field!r} must be a number, got {v!r}")
    if integer:
        if isinstance(v, float) and not v.is_integer():
            raise DataError(f"line {lineno}: {field!r} must be an integer, got {v!r}")
        return int(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return float(v)


def _parse(obj: Any, lineno: int, auto_index: int) -> Sample:
    if not isinstance(obj, dict):
        raise DataError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
    pid = obj.get("problem_id")
    if not isinstance(pid, str) or not pid:
        raise DataError(f"line {lineno}: 'problem_id' (a non-empty string) is required")
    index = obj.get("index", auto_index)
    if index is None:
        index = auto_index
    index = _num(index, "index", lineno, integer=True)
    if index < 0:
        raise DataError(f"line {lineno}: 'index' must be >= 0, got {index}")
    text = obj.get("text", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DataError(f"line {lineno}: 'text' must be a string")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        else:
            raise DataError(f"line {lineno}: 'answer' must be a string or null, got {answer!r}")
    correct = obj.get("correct")
    if correct is not None and not isinstance(correct, bool):
        if correct in (0, 1):
            correct = bool(correct)
        else:
            raise DataError(f"line {lineno}: 'correct' must be true, false or null, got {correct!r}")
    tl = obj.get("token_logprobs")
    if tl is not None:
        if not isinstance(tl, list):
            raise DataError(f"line {lineno}: 'token_logprobs' must be a list of numbers")
        tl = [_num(x, "token_logprobs", lineno) for x in tl]
        if any(x is None for x in tl):
            raise DataError(f"line {lineno}: 'token_logprobs' must not contain null or NaN")
    tids = obj.get("token_ids")
    if tids is not None:
        if not isinstance(tids, list):
            raise DataError(f"line {lineno}: 'token_ids' must be a list of integers")
        tids = [_num(x, "token_ids", lineno, integer=True) for x in tids]
    scores = obj.get("scores") or {}
    if not isinstance(scores, dict):
        raise DataError(f"line {lineno}: 'scores' must be an object of name -> number")
    scores = {str(k): _num(v, f"scores.{k}", lineno) for k, v in scores.items()}
    scores = {k: v for k, v in scores.items() if v is not None}
    meta = dict(obj.get("meta") or {}) if isinstance(obj.get("meta"), dict) else {}
    if "meta" in obj and not isinstance(obj["meta"], (dict, type(None))):
        meta["meta"] = obj["meta"]
    meta.update({k: v for k, v in obj.items() if k not in _KNOWN})
    fr = obj.get("finish_reason")
    if fr is not None and not isinstance(fr, str):
        raise DataError(f"line {lineno}: 'finish_reason' must be a string")
    try:
        return Sample(
            problem_id=pid,
            index=index,
            text=text,
            token_ids=tids,
            token_logprobs=tl,
            logprob=_num(obj.get("logprob"), "logprob", lineno),
            mean_logprob=_num(obj.get("mean_logprob"), "mean_logprob", lineno),
            num_tokens=_num(obj.get("num_tokens"), "num_tokens", lineno, integer=True),
            finish_reason=fr,
            seed=_num(obj.get("seed"), "seed", lineno, integer=True),
            answer=answer,
            correct=correct,
            scores=scores,
            meta=meta,
        )
    except ConfigError as e:
        raise DataError(f"line {lineno}: {e}") from e


def read_samples_jsonl(path: str | os.PathLike[str]) -> Iterator[Sample]:
    """Parse a samples JSONL file (``.gz`` accepted), yielding :class:`Sample` objects.

    Raises :class:`DataError` naming the line number of the first malformed line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such file: {p}")
    positions: dict[str, int] = {}
    seen: dict[tuple[str, int], int] = {}
    with _open_text(p) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {lineno}: invalid JSON ({e.msg})") from None
            pid = obj.get("problem_id") if isinstance(obj, dict) else None
            auto = positions.get(pid, 0) if isinstance(pid, str) else 0
            try:
                s = _parse(obj, lineno, auto)
            except DataError as e:
                raise DataError(f"{p}: {e}") from None
            positions[s.problem_id] = auto + 1
            if s.key in seen:
                raise DataError(
                    f"{p}: line {lineno}: duplicate (problem_id, index) {s.key} "
                    f"(first on line {seen[s.key]})"
                )
            seen[s.key] = lineno
            yield s


def import_jsonl(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    manifest: dict[str, Any] | None = None,
) -> tuple[SampleStore, int]:
    """Import a samples JSONL file into run directory ``out`` (created if needed).

    The file is fully validated first; then samples are written in shards. Re-importing the same
    file is a no-op (same keys, same content). Returns the store and the number of new samples.
    """
    # pass 1: validate everything (cheap; nothing is kept in memory but keys)
    count = sum(1 for _ in read_samples_jsonl(path))
    m = {"source": {"kind": "jsonl", "path": str(Path(path).resolve()), "samples": count}}
    m.update(manifest or {})
    store = SampleStore.create(out, m, exist_ok=True)
    new = 0
    batch: list[Sample] = []
    for s in read_samples_jsonl(path):
        batch.append(s)
        if len(batch) >= _CHUNK:
            new += store.append(batch)
            batch = []
    if batch:
        new += store.append(batch)
    return store, new


def sample_to_json(s: Sample) -> dict[str, Any]:
    """The JSONL object of one sample (inverse of the import schema)."""
    d: dict[str, Any] = {"problem_id": s.problem_id, "index": s.index, "text": s.text}
    d["answer"] = s.answer
    d["correct"] = s.correct
    for k in ("logprob", "mean_logprob", "num_tokens", "finish_reason", "seed"):
        v = getattr(s, k)
        if v is not None:
            d[k] = v
    if s.token_logprobs is not None:
        d["token_logprobs"] = list(s.token_logprobs)
    if s.token_ids is not None:
        d["token_ids"] = list(s.token_ids)
    if s.scores:
        d["scores"] = dict(s.scores)
    if s.meta:
        clash = {k: v for k, v in s.meta.items() if k in _KNOWN}
        d.update({k: v for k, v in s.meta.items() if k not in _KNOWN})
        if clash:
            d["meta"] = clash
    return d


def export_jsonl(
    store: SampleStore | str | os.PathLike[str],
    out: IO[str],
    *,
    verifier: str | None = None,
) -> int:
    """Write every sample of a run as JSONL to ``out``; returns the number written.

    With ``verifier``, that verifier's answer/correctness/score replace the stored ones.
    """
    st = store if isinstance(store, SampleStore) else SampleStore.open(store)
    verdicts = {}
    if verifier is not None:
        if verifier not in st.verifiers():
            raise ConfigError(f"run {st.path} has no verdicts from verifier {verifier!r}")
        verdicts = {(v.problem_id, v.index): v for v in st.verdicts(verifier)}
    n = 0
    for s in st.samples():
        d = sample_to_json(s)
        v = verdicts.get(s.key)
        if v is not None:
            d["answer"], d["correct"] = v.answer, v.correct
            if v.score is not None:
                d.setdefault("scores", {})[verifier] = v.score
        out.write(json.dumps(d, ensure_ascii=False) + "\n")
        n += 1
    return n
