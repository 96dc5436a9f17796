"""JSONL import and export of samples.

One sample per line::

    {"problem_id": "gsm8k/12", "index": 0, "text": "...", "answer": "72", "correct": true,
     "logprob": -12.3, "mean_logprob": -0.41, "token_logprobs": [...], "token_ids": [...],
     "top_logprobs": [{"318": -0.01, "257": -4.7}, ...], "num_tokens": 30,
     "scores": {"rm": 0.8}, ...}

``problem_id`` (string) is required; ``index`` is optional and defaults to the line's position
among the file's lines for that problem. Every other field is optional; unknown fields are kept
in ``meta``. ``top_logprobs`` has one object per generated token mapping token id (a string,
as JSON keys are) to its natural log-prob; lists of ``[id, logprob]`` pairs are accepted too.
The whole file is validated before anything is written, so a malformed line (reported with its
line number) leaves the run directory as it was.

Run-level metadata travels in a sidecar, ``FILE.manifest.json`` (written by :func:`export_jsonl`
with ``manifest_out``, read by :func:`import_jsonl` when present): the model, benchmark,
sampling parameters, engine, logprob mode, the problems (prompts and references) and which
verdict set the exported answers and correctness came from.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from ttscale.errors import ConfigError, DataError
from ttscale.store.samplestore import SCORE_SCHEMA, SampleStore, check_score_record
from ttscale.types import Sample

__all__ = [
    "export_jsonl",
    "import_jsonl",
    "read_samples_jsonl",
    "sample_to_json",
    "sidecar_path",
]

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
    "top_logprobs",
    "num_tokens",
    "scores",
    "finish_reason",
    "seed",
    "meta",
    # step-wise samplers (SMC, search, pruning): lineage, weight and what became of the trace
    "step",
    "parent",
    "log_weight",
    "fate",
    "pruned_at",
    # per-sample score sets (RUN/scores/<set>/, e.g. exact self-certainty): name -> value
    "score_sets",
}

_CHUNK = 50_000  # samples per shard on import

# run-level manifest fields a sidecar carries over on import (what describes the sampling)
_SIDECAR_KEYS = (
    "model", "benchmark", "sampling", "seed", "engine", "engines_used", "logprob_mode", "chat",
    "num_problems", "split", "limit",
    # what kind of run it is: without these an SMC, search, pruning or adaptive run would come
    # back as a fixed-n run, and its particles or cut traces be read as iid draws
    "iid", "smc", "search", "pruning", "adaptive", "shortmk",
)  # fmt: skip


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the run metadata of a samples JSONL file lives: ``FILE.manifest.json``."""
    p = Path(path)
    return p.with_name(p.name + ".manifest.json")


def _parse_top(top: Any, lineno: int) -> tuple[dict[int, float], ...] | None:
    if top is None:
        return None
    if not isinstance(top, list):
        raise DataError(f"line {lineno}: 'top_logprobs' must be a list with one entry per token")
    out: list[dict[int, float]] = []
    for pos in top:
        items = list(pos.items()) if isinstance(pos, dict) else pos
        if not isinstance(items, list):
            raise DataError(
                f"line {lineno}: each 'top_logprobs' entry must be an object of token id -> logprob"
            )
        d: dict[int, float] = {}
        for item in items:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise DataError(f"line {lineno}: 'top_logprobs' pairs must be [token_id, logprob]")
            tid, lp = item
            try:
                tid_i = int(tid)
            except (TypeError, ValueError):
                raise DataError(
                    f"line {lineno}: 'top_logprobs' keys must be integer token ids, got {tid!r}"
                ) from None
            v = _num(lp, "top_logprobs", lineno)
            if v is None:
                raise DataError(f"line {lineno}: 'top_logprobs' must not contain null or NaN")
            d[tid_i] = v
        out.append(d)
    return tuple(out)


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
    top = _parse_top(obj.get("top_logprobs"), lineno)
    scores = obj.get("scores") or {}
    if not isinstance(scores, dict):
        raise DataError(f"line {lineno}: 'scores' must be an object of name -> number")
    scores = {str(k): _num(v, f"scores.{k}", lineno) for k, v in scores.items()}
    scores = {k: v for k, v in scores.items() if v is not None}
    meta = dict(obj.get("meta") or {}) if isinstance(obj.get("meta"), dict) else {}
    if "meta" in obj and not isinstance(obj["meta"], (dict, type(None))):
        meta["meta"] = obj["meta"]
    meta.update({k: v for k, v in obj.items() if k not in _KNOWN})
    fate = obj.get("fate")
    if fate is not None and not isinstance(fate, str):
        raise DataError(f"line {lineno}: 'fate' must be a string or null, got {fate!r}")
    step_kw = {
        "step": _num(obj.get("step"), "step", lineno, integer=True),
        "parent": _num(obj.get("parent"), "parent", lineno, integer=True),
        "log_weight": _num(obj.get("log_weight"), "log_weight", lineno),
        "fate": fate,
        "pruned_at": _num(obj.get("pruned_at"), "pruned_at", lineno, integer=True),
    }
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
            top_logprobs=top,
            logprob=_num(obj.get("logprob"), "logprob", lineno),
            mean_logprob=_num(obj.get("mean_logprob"), "mean_logprob", lineno),
            num_tokens=_num(obj.get("num_tokens"), "num_tokens", lineno, integer=True),
            finish_reason=fr,
            seed=_num(obj.get("seed"), "seed", lineno, integer=True),
            answer=answer,
            correct=correct,
            scores=scores,
            meta=meta,
            **step_kw,
        )
    except ConfigError as e:
        raise DataError(f"line {lineno}: {e}") from e


#: one sample's score-set values: set name -> (score or None, meta or None)
ScoreSetValues = dict[str, tuple[float | None, dict[str, Any] | None]]


def _parse_score_sets(obj: Mapping[str, Any], lineno: int) -> ScoreSetValues:
    raw = obj.get("score_sets")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DataError(f"line {lineno}: 'score_sets' must be an object of set name -> value")
    out: ScoreSetValues = {}
    for name, v in raw.items():
        if not name or "/" in name or name.startswith(".") or not name.isprintable():
            raise DataError(f"line {lineno}: invalid score set name {name!r} in 'score_sets'")
        meta = None
        if isinstance(v, dict):  # {"score": x, "meta": {...}}
            meta = v.get("meta")
            if meta is not None and not isinstance(meta, dict):
                raise DataError(f"line {lineno}: 'score_sets.{name}.meta' must be an object")
            v = v.get("score")
        out[name] = (_num(v, f"score_sets.{name}", lineno), meta)
    return out


def read_samples_jsonl(path: str | os.PathLike[str]) -> Iterator[Sample]:
    """Parse a samples JSONL file (``.gz`` accepted), yielding :class:`Sample` objects.

    Raises :class:`DataError` naming the line number of the first malformed line.
    """
    for s, _ in _read_lines(path):
        yield s


def _read_lines(path: str | os.PathLike[str]) -> Iterator[tuple[Sample, ScoreSetValues]]:
    """:func:`read_samples_jsonl` with each sample's score-set values (``score_sets``)."""
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
                sets = _parse_score_sets(obj, lineno)
            except DataError as e:
                raise DataError(f"{p}: {e}") from None
            positions[s.problem_id] = auto + 1
            if s.key in seen:
                raise DataError(
                    f"{p}: line {lineno}: duplicate (problem_id, index) {s.key} "
                    f"(first on line {seen[s.key]})"
                )
            seen[s.key] = lineno
            yield s, sets


def import_jsonl(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    manifest: dict[str, Any] | None = None,
    sidecar: str | os.PathLike[str] | bool | None = True,
) -> tuple[SampleStore, int]:
    """Import a samples JSONL file into run directory ``out`` (created if needed).

    The file is fully validated first; then samples are written in shards. Re-importing the same
    file is a no-op (same keys, same content). Returns the store and the number of new samples.

    ``sidecar``: the run metadata file (see the module docstring); ``True`` reads
    ``FILE.manifest.json`` when it exists, ``False``/``None`` reads none. Its sampling
    metadata and problems are kept; ``manifest`` entries override it.
    """
    from ttscale.types import Problem

    # pass 1: validate everything (cheap; nothing is kept in memory but keys and set names)
    count = 0
    set_names: set[str] = set()
    for _, sets in _read_lines(path):
        count += 1
        set_names.update(sets)
    side_file = sidecar_path(path) if sidecar is True else (Path(sidecar) if sidecar else None)
    side: dict[str, Any] = {}
    if side_file is not None and (sidecar is not True or side_file.is_file()):
        try:
            side = json.loads(side_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read the run metadata {side_file}: {e}") from None
        if not isinstance(side, dict) or not isinstance(side.get("manifest", {}), dict):
            raise DataError(f"{side_file} is not a ttscale run metadata file")
    m: dict[str, Any] = {
        k: v for k, v in (side.get("manifest") or {}).items() if k in _SIDECAR_KEYS
    }
    m["source"] = {"kind": "jsonl", "path": str(Path(path).resolve()), "samples": count}
    if side:
        m["source"]["metadata"] = str(side_file)
        src = side.get("manifest") or {}
        m["imported_from"] = {k: src.get(k) for k in ("created", "ttscale_version", "git_sha")}
        if side.get("verdicts") is not None:
            # the answers/correctness in the file came from this verdict set of the source run
            m["imported_verdicts"] = side["verdicts"]
    m.update(manifest or {})
    problems: list[Problem] = []
    for i, p in enumerate(side.get("problems") or []):
        if not isinstance(p, dict) or not isinstance(p.get("id"), str):
            raise DataError(f"{side_file}: problem {i} has no string 'id'")
        problems.append(
            Problem(p["id"], str(p.get("prompt") or ""), p.get("reference"), p.get("meta") or {})
        )
    # the score sets the file's lines carry, with the source run's records of them (what
    # computed them); a set the sidecar does not describe comes in unrecorded
    recorded = (side.get("manifest") or {}).get("score_sets")
    set_recs = {n: recorded[n] for n in set_names
                if isinstance(recorded, dict) and isinstance(recorded.get(n), dict)}  # fmt: skip
    for n, rec in set_recs.items():
        check_score_record(n, rec, side_file)
    existed = (Path(out) / "manifest.json").exists()
    if existed:  # checked before anything is written
        old = SampleStore.open(out)
        old.check_compatible(m)  # the file's model/benchmark/sampling must match the run's
        for n in sorted(set_names):
            _check_import_set(old, n, set_recs.get(n), Path(path))
    store = SampleStore.create(out, m, exist_ok=True)
    if existed:
        store.check_compatible(m)
    absent = {k: v for k, v in m.items() if k not in store.manifest}
    if absent:  # an existing run keeps what it records; the file fills in what it lacks
        store.update_manifest(**absent)
    if problems:
        store.write_problems(problems)
    from ttscale.samplers.adaptive import ADAPTIVE_FILE
    from ttscale.samplers.shortmk import SHORTMK_FILE

    for key, name in (("adaptive_decisions", ADAPTIVE_FILE), ("shortmk_decisions", SHORTMK_FILE)):
        decisions = side.get(key)
        if isinstance(decisions, list) and decisions:
            dest = store.path / name
            if not dest.exists():  # an existing run keeps its own record
                tmp = dest.with_name(f".{dest.name}.tmp")
                tmp.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in decisions), encoding="utf-8")
                tmp.replace(dest)
    log_lines = side.get("pruning_log")
    if isinstance(log_lines, list) and log_lines and not (store.path / "pruning.jsonl").exists():
        # as the run's session log too, so a resumed pruning run rebuilds pruning.jsonl with them
        import hashlib

        text = "".join(json.dumps(r) + "\n" for r in log_lines if isinstance(r, dict))
        tag = hashlib.blake2b(str(side_file).encode(), digest_size=6).hexdigest()
        (store.path / "pruning").mkdir(exist_ok=True)
        for dest in (store.path / "pruning" / f"imported-{tag}.jsonl", store.path / "pruning.jsonl"):
            tmp = dest.with_name(f".{dest.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dest)
    for n, rec in sorted(set_recs.items()):
        store.adopt_score_set(n, rec, source=str(side_file))
    new = 0
    batch: list[tuple[Sample, ScoreSetValues]] = []

    def flush() -> int:
        added = store.append([s for s, _ in batch])
        for n in sorted(set_names):
            rows = pa.table(
                {"problem_id": [s.problem_id for s, v in batch if n in v],
                 "index": [s.index for s, v in batch if n in v],
                 # null is how export writes NaN (strict JSON has none): NaN again here, as
                 # `ttscale certainty` stores it, so the round trip keeps every value's bits
                 "score": [math.nan if v[n][0] is None else v[n][0] for _, v in batch if n in v],
                 "meta": [_dump_meta(v[n][1]) for _, v in batch if n in v]},
                schema=SCORE_SCHEMA,
            )  # fmt: skip
            store.copy_scores(n, rows)
        batch.clear()
        return added

    for item in _read_lines(path):
        batch.append(item)
        if len(batch) >= _CHUNK:
            new += flush()
    if batch:
        new += flush()
    return store, new


def _finite(entry: dict[str, Any]) -> dict[str, Any]:
    v = entry.get("score")
    if isinstance(v, float) and math.isnan(v):
        return {**entry, "score": None}  # strict JSON has no NaN (a sample without tokens)
    return entry


def _dump_meta(meta: Mapping[str, Any] | None) -> str | None:
    return json.dumps(dict(meta), sort_keys=True, ensure_ascii=False) if meta else None


def _check_import_set(store: SampleStore, name: str, rec: Mapping[str, Any] | None, path: Path) -> None:
    """Refuse, before anything is written, score-set values that would mix with another
    configuration's in the run imported into (or land on a verdict set's name)."""
    if name in store.verifiers():
        raise DataError(
            f"{path} carries score set {name!r}, a verdict set of {store.path}; import into a new run"
        )
    have = store.score_set_record(name)
    if name in store.score_sets() and (rec is None or (have or {}).get("fingerprint") != rec.get("fingerprint")):
        what = _dumps_cfg(rec)
        raise DataError(
            f"{path} carries score set {name!r} made by {what}, but {store.path} holds it from "
            f"{_dumps_cfg(have)}; import into a new run"
        )


def _dumps_cfg(rec: Mapping[str, Any] | None) -> str:
    if not rec:
        return "an unrecorded configuration"
    return json.dumps(rec.get("config"), sort_keys=True, default=str)


def sample_to_json(s: Sample) -> dict[str, Any]:
    """The JSONL object of one sample (inverse of the import schema)."""
    d: dict[str, Any] = {"problem_id": s.problem_id, "index": s.index, "text": s.text}
    d["answer"] = s.answer
    d["correct"] = s.correct
    for k in ("logprob", "mean_logprob", "num_tokens", "finish_reason", "seed", "step", "parent",
              "log_weight", "fate", "pruned_at"):
        v = getattr(s, k)
        if v is not None:
            d[k] = v
    if s.token_logprobs is not None:
        d["token_logprobs"] = list(s.token_logprobs)
    if s.token_ids is not None:
        d["token_ids"] = list(s.token_ids)
    if s.top_logprobs is not None:
        d["top_logprobs"] = [{str(t): lp for t, lp in pos.items()} for pos in s.top_logprobs]
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
    use_verdicts: bool = True,
    manifest_out: str | os.PathLike[str] | None = None,
) -> int:
    """Write every sample of a run as JSONL to ``out``; returns the number written.

    The answers, correctness and score of a verdict set replace the stored ones: ``verifier``
    names it, else the one analyses use (:meth:`SampleStore.choose_verdicts`: the run's
    recorded default); ``use_verdicts=False`` exports the samples as stored. So export
    then import gives a run that ``curve`` reads as this one. ``manifest_out`` writes the run
    metadata sidecar (see the module docstring).
    """
    st = store if isinstance(store, SampleStore) else SampleStore.open(store)
    verdicts = {}
    chosen = st.choose_verdicts(verifier) if use_verdicts else None
    verifier = chosen["name"] if chosen else None
    if verifier is not None:
        verdicts = {(v.problem_id, v.index): v for v in st.verdicts(verifier)}
    if manifest_out is not None:
        side = {
            "format": "ttscale-jsonl-metadata",
            "manifest": st.manifest,
            "verdicts": (
                {**chosen, "record": st.verdict_record(verifier)} if chosen and verifier else None
            ),
            "problems": [
                {"id": p.id, "prompt": p.prompt, "reference": p.reference, "meta": dict(p.meta)}
                for p in st.problems()
            ],
        }
        from ttscale.samplers.adaptive import ADAPTIVE_FILE, read_decisions

        if (st.path / ADAPTIVE_FILE).is_file():  # an adaptive run's per-problem stopping record
            side["adaptive_decisions"] = read_decisions(st.path)
        from ttscale.samplers.shortmk import SHORTMK_FILE, read_short_decisions

        if (st.path / SHORTMK_FILE).is_file():  # a short-m@k run's choices and aborted tokens
            side["shortmk_decisions"] = read_short_decisions(st.path)
        if (st.path / "pruning.jsonl").is_file():  # a pruning run's trace log: what was cut, why
            from ttscale.store.samplestore import read_trace_log

            side["pruning_log"] = read_trace_log(st.path / "pruning.jsonl")
        mp = Path(manifest_out)
        tmp = mp.with_name(f".{mp.name}.tmp")
        tmp.write_text(json.dumps(side, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
        tmp.replace(mp)
    # every score set's values go with their samples (a float's JSON form reads back to the same
    # bits; null where the set holds NaN or no value); the sidecar's manifest records each set
    score_sets: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for name in st.score_sets():
        t = st.score_table(name)
        score_sets[name] = {
            (pid, i): ({"score": v, "meta": json.loads(mt)} if mt else {"score": v})
            for pid, i, v, mt in zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(),
                                     t.column("score").to_pylist(), t.column("meta").to_pylist(), strict=True)
        }  # fmt: skip
    n = 0
    for s in st.samples():
        d = sample_to_json(s)
        v = verdicts.get(s.key)
        if v is not None:
            d["answer"], d["correct"] = v.answer, v.correct
            if v.score is not None:
                d.setdefault("scores", {})[verifier] = v.score
        sets = {name: _finite(vals[s.key]) for name, vals in score_sets.items() if s.key in vals}
        if sets:
            d["score_sets"] = sets
        out.write(json.dumps(d, ensure_ascii=False) + "\n")
        n += 1
    return n
