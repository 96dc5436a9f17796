"""SampleStore: a run directory of Parquet shards plus a JSON manifest.

Layout of a run directory::

    RUN/
      manifest.json              provenance: model, engine + version, sampling parameters, seeds,
                                 logprob mode, benchmark, ttscale version, git sha, created time,
                                 token/time accounting
      problems.parquet           id, prompt, reference (JSON), meta (JSON)
      samples/part-*.parquet     one row per (problem_id, index)
      verdicts/<verifier>/part-*.parquet   one row per (problem_id, index) checked by that verifier
      scores/<set>/part-*.parquet          per-sample scores computed after sampling (e.g. exact
                                 self-certainty from a scoring pass); the set's record (how,
                                 with which model) is the manifest's ``score_sets``
      accounting/<session>.json  tokens/samples/time of one sampling session (one writer each)
      manifest.backup.json       the last good manifest (``ttscale check --repair`` restores it)
      claims.lock                advisory per-problem claims of concurrent workers (ttscale.store.claims)
      damaged/                   files ``ttscale check --repair`` moved aside (never deleted)

Every file is written to a temporary name in the same directory and renamed into place, so a
reader never sees half a shard and a killed writer leaves at most a stray ``.tmp`` file (ignored
and cleaned up once it is an hour old, so a concurrent writer's file is never touched). Samples
are keyed by ``(problem_id, index)``: appending a key that is already
stored with the same content is a no-op, with different content a :class:`StoreError`. That makes
resuming a killed run, extending it, and merging shards written by several workers safe.

Several processes (on one machine or many, over a shared filesystem) may write into one run
directory at once: shards have unique names, the manifest is read-modified-written under a lock
(:meth:`SampleStore.modify_manifest`), and each sampling session keeps its token accounting in
its own file under ``accounting/``, summed on read, so no worker's accounting is ever lost.

A file that cannot be read (truncated, empty, garbage, wrong schema) raises a one-line
:class:`StoreError` naming the file and the fix (``ttscale check RUN --repair``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ttscale.errors import ConfigError, StoreError
from ttscale.types import Problem, Sample, Verdict, VerdictStatus

__all__ = ["SAMPLE_SCHEMA", "SCORE_SCHEMA", "VERDICT_SCHEMA", "SampleStore", "merge_runs"]

log = logging.getLogger(__name__)

FORMAT_NAME = "ttscale-run"
FORMAT_VERSION = 1
MANIFEST_BACKUP = "manifest.backup.json"
# a ``.tmp`` file younger than this may belong to a live writer (another worker): leave it alone
_STRAY_TMP_AGE = 3600.0

SAMPLE_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("index", pa.int64()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("token_logprobs", pa.list_(pa.float64())),
        ("top_logprobs", pa.list_(pa.map_(pa.int32(), pa.float64()))),
        ("logprob", pa.float64()),
        ("mean_logprob", pa.float64()),
        ("num_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("seed", pa.int64()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("scores", pa.map_(pa.string(), pa.float64())),
        ("meta", pa.string()),
        ("content_hash", pa.string()),
        # 64-bit hash of the text alone: perplexity consistency counts identical texts once, and
        # reading this column is far cheaper than reading every text
        ("text_hash", pa.int64()),
        # step-wise runs (pruning, SMC): which step made the trace, the trace it continues, its
        # log-weight and what became of it; null for iid samples and in runs made before them
        ("step", pa.int64()),
        ("parent", pa.int64()),
        ("log_weight", pa.float64()),
        ("fate", pa.string()),
        ("pruned_at", pa.int64()),
    ]
)

#: the step-wise columns (absent from older shards; read as null)
STEP_COLUMNS = ("step", "parent", "log_weight", "fate", "pruned_at")

VERDICT_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("index", pa.int64()),
        ("status", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("score", pa.float64()),
        ("detail", pa.string()),
        ("meta", pa.string()),
    ]
)

SCORE_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("index", pa.int64()),
        ("score", pa.float64()),
        ("meta", pa.string()),
    ]
)

PROBLEM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("meta", pa.string()),
    ]
)

# Settings that must match when a run directory is reopened to resume or extend it. ``n`` is
# deliberately absent: a run made with n=64 may be extended to n=256.
_COMPATIBLE_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "min_tokens",
    "stop",
    "seed",
    "logprobs",
)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _dumps(o: Any) -> str:
    return json.dumps(o, sort_keys=True, default=_json_default, ensure_ascii=False)


def _content_hash(row: Mapping[str, Any]) -> str:
    """Hash of a sample's generated content (what makes two copies "the same sample")."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_dumps([row["text"], row["token_ids"], row["seed"], row["finish_reason"]]).encode())
    return h.hexdigest()


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_table(
    path: Path, table: pa.Table, *, before_rename: Callable[[], None] | None = None
) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_manifest(run: Path, m: Mapping[str, Any]) -> None:
    """Write the manifest, then its backup (the last good copy ``ttscale check`` restores)."""
    data = (_dumps(m) + "\n").encode()
    _atomic_write_bytes(run / "manifest.json", data)
    _atomic_write_bytes(run / MANIFEST_BACKUP, data)


def _brief(e: BaseException, path: Path | None = None) -> str:
    """The first line of an exception message, shortened (for one-line errors)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if path is not None:  # the caller names the file already
        text = text.replace(f" '{path}'", "").replace(f" {path}", "")
    return text if len(text) <= 120 else text[:117] + "..."


def damaged_file_error(run: Path, path: Path, e: BaseException) -> StoreError:
    """The one-line error for an unreadable file of run ``run``, naming the file and the fix."""
    try:
        part = path.relative_to(run).parts[0]
    except (ValueError, IndexError):
        part = ""
    repair = f"run `ttscale check {run} --repair`"
    if part in ("samples", "problems.parquet"):
        fix = f"{repair} to move it aside, then `ttscale sample --out {run} --resume` to regenerate it"
    elif part == "verdicts":
        fix = f"{repair} to move it aside, then `ttscale verify {run}` to re-check those samples"
    elif part == "manifest.json":
        fix = f"{repair} to restore it from {MANIFEST_BACKUP}"
    else:
        fix = f"{repair} to move it aside"
    return StoreError(f"{path} is damaged ({_brief(e, path)}); {fix}")


def read_parquet(run: Path, path: Path, **kwargs: Any) -> pa.Table:
    """``pq.read_table(path, **kwargs)``; an unreadable file is a one-line :class:`StoreError`."""
    try:
        return pq.read_table(path, **kwargs)
    except FileNotFoundError as e:
        raise StoreError(
            f"{path} disappeared while reading run {run} ({_brief(e)}); another process moved "
            "it (`ttscale check --repair`?); run the command again"
        ) from e
    except (pa.ArrowException, OSError, ValueError) as e:
        raise damaged_file_error(run, path, e) from e


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Exclusive lock on run directory ``run`` (``RUN/.lock``), across processes and threads.

    POSIX record locks (``lockf``) work across processes on one machine and, on filesystems with
    working locks (NFSv4, Lustre/GPFS with locking on), across machines; the kernel drops them when
    a holder dies, so there are no stale locks. They do not exclude threads of one process, hence
    the per-path thread lock taken first.
    """
    key = str(Path(run).resolve())
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(key, threading.Lock())
    with tlock:
        fd = os.open(Path(run) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except OSError as e:  # no lock support (some network filesystems): say so, go on
                log.warning("cannot lock %s (%s); concurrent manifest updates may race", run, e)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _shard_name() -> str:
    # nanosecond stamp first: names sort in write order, which "latest verdict wins" relies on
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"


def _sample_row(s: Sample) -> dict[str, Any]:
    row = {
        "problem_id": s.problem_id,
        "index": s.index,
        "text": s.text,
        "token_ids": list(s.token_ids) if s.token_ids is not None else None,
        "token_logprobs": list(s.token_logprobs) if s.token_logprobs is not None else None,
        "top_logprobs": (
            [list(d.items()) for d in s.top_logprobs] if s.top_logprobs is not None else None
        ),
        "logprob": s.logprob,
        "mean_logprob": s.mean_logprob,
        "num_tokens": s.num_tokens,
        "finish_reason": s.finish_reason,
        "seed": s.seed,
        "answer": s.answer,
        "correct": s.correct,
        "scores": list(s.scores.items()) if s.scores else None,
        "meta": _dumps(dict(s.meta)) if s.meta else None,
        "step": s.step,
        "parent": s.parent,
        "log_weight": s.log_weight,
        "fate": s.fate,
        "pruned_at": s.pruned_at,
    }
    row["content_hash"] = _content_hash(row)
    row["text_hash"] = _text_hash(s.text)
    return row


def _row_to_sample(row: Mapping[str, Any]) -> Sample:
    top = row.get("top_logprobs")
    scores = row.get("scores")
    meta = row.get("meta")
    return Sample(
        problem_id=row["problem_id"],
        index=int(row["index"]),
        text=row.get("text") or "",
        token_ids=tuple(row["token_ids"]) if row.get("token_ids") is not None else None,
        token_logprobs=(
            tuple(row["token_logprobs"]) if row.get("token_logprobs") is not None else None
        ),
        top_logprobs=tuple(dict(p) for p in top) if top is not None else None,
        logprob=row.get("logprob"),
        mean_logprob=row.get("mean_logprob"),
        num_tokens=row.get("num_tokens"),
        finish_reason=row.get("finish_reason"),
        seed=row.get("seed"),
        answer=row.get("answer"),
        correct=row.get("correct"),
        scores=dict(scores) if scores else {},
        meta=json.loads(meta) if meta else {},
        step=row.get("step"),
        parent=row.get("parent"),
        log_weight=row.get("log_weight"),
        fate=row.get("fate"),
        pruned_at=row.get("pruned_at"),
    )


def _sort_dedupe(table: pa.Table, *, what: str, hash_col: str | None) -> pa.Table:
    """Sort by (problem_id, index) and collapse duplicate keys.

    Duplicates with equal ``hash_col`` collapse to one row; with different hashes they are a
    conflict (:class:`StoreError`). Without ``hash_col`` the last written row wins.
    """
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table, sort_keys=[("problem_id", "ascending"), ("index", "ascending")]
    )
    table = table.take(order)
    n = table.num_rows

    def adjacent(name: str, fn: Any) -> np.ndarray:
        # compare each row with the previous one inside Arrow: no per-row Python objects
        col = table.column(name)
        return np.asarray(fn(col.slice(1), col.slice(0, n - 1)).to_numpy(zero_copy_only=False))

    same = np.zeros(n, dtype=bool)
    same[1:] = adjacent("problem_id", pc.equal) & adjacent("index", pc.equal)
    if not same.any():
        return table
    if hash_col is not None:
        clash = np.zeros(n, dtype=bool)
        clash[1:] = same[1:] & adjacent(hash_col, pc.not_equal)
        if clash.any():
            j = int(np.flatnonzero(clash)[0])
            raise StoreError(
                f"conflicting {what} for key ({table.column('problem_id')[j].as_py()!r}, "
                f"{table.column('index')[j].as_py()}): two shards hold different content under "
                "one key; remove the stray shard or re-run into a new directory"
            )
        keep = ~same
    else:
        # keep the last of each run of equal keys (the sort is stable: later shards come later)
        keep = np.ones(n, dtype=bool)
        keep[:-1] = ~same[1:]
    return table.filter(pa.array(keep))


class SampleStore:
    """A run directory of samples, verdicts and provenance.

    Create with :meth:`create` (new run), :meth:`open` (existing run) or :meth:`open_or_create`
    (resume/extend, checking that the sampling settings match).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise StoreError(
                f"{self.path} is not a ttscale run directory (no manifest.json); "
                "create one with `ttscale sample`/`ttscale import` or SampleStore.create()"
            )
        self._keys: dict[tuple[str, int], str] | None = None
        self._key_files: set[str] = set()
        self._manifest = self._read_manifest()

    # construction ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        manifest: Mapping[str, Any] | None = None,
        *,
        exist_ok: bool = False,
    ) -> SampleStore:
        """Create a new run directory with a manifest holding ``manifest`` plus provenance.

        Safe against workers creating the same directory at once: the check and the manifest
        write happen under the run lock, and with ``exist_ok`` the loser opens the winner's run.
        """
        p = Path(path)
        if (p / "manifest.json").exists():
            if exist_ok:
                return cls(p)
            raise StoreError(f"run directory {p} already exists; pass --resume or a new --out")
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} exists and is not a directory")
        foreign = f"{p} is a non-empty directory that is not a ttscale run; use a new path"
        # (what another worker creating this run right now may have made so far is not foreign)
        being_made = {".lock", "samples", "verdicts", "manifest.json", MANIFEST_BACKUP}
        if p.is_dir() and any(
            f.name not in being_made and not f.name.endswith(".tmp") for f in p.iterdir()
        ):
            raise StoreError(foreign)
        from ttscale import __version__

        p.mkdir(parents=True, exist_ok=True)
        with run_lock(p):
            if (p / "manifest.json").exists():  # another worker was first
                if exist_ok:
                    return cls(p)
                raise StoreError(f"run directory {p} already exists; pass --resume or a new --out")
            if any(f.name != ".lock" for f in p.iterdir()):
                raise StoreError(foreign)
            (p / "samples").mkdir(exist_ok=True)
            (p / "verdicts").mkdir(exist_ok=True)
            m: dict[str, Any] = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "created": _now(),
                "ttscale_version": __version__,
                "git_sha": _git_sha(),
            }
            m.update(dict(manifest or {}))
            _write_manifest(p, m)
        return cls(p)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SampleStore:
        return cls(path)

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike[str], manifest: Mapping[str, Any]
    ) -> SampleStore:
        """Open ``path`` if it is a run made with compatible settings, else create it.

        Compatible means the same model, benchmark and sampling parameters (all but ``n``).
        """
        p = Path(path)
        store = cls.create(p, manifest, exist_ok=True)
        store.check_compatible(manifest)
        return store

    def check_compatible(self, manifest: Mapping[str, Any]) -> None:
        """Raise :class:`StoreError` if ``manifest`` describes a different sampling setup."""
        old = self._manifest
        for key in ("model", "benchmark"):
            if key in manifest and key in old and old[key] != manifest[key]:
                raise StoreError(
                    f"run directory {self.path} was made with {key} {old[key]!r}, not "
                    f"{manifest[key]!r}; use a new --out"
                )
        a, b = old.get("sampling") or {}, manifest.get("sampling") or {}
        for key in _COMPATIBLE_SAMPLING:
            if key in a and key in b and _norm(a[key]) != _norm(b[key]):
                raise StoreError(
                    f"run directory {self.path} was made with different sampling parameters "
                    f"({key} {a[key]!r} != {b[key]!r}); resume with the same parameters or use a "
                    "new --out"
                )

    # manifest --------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        f = self.path / "manifest.json"
        try:
            m = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged_file_error(self.path, f, e) from e
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise damaged_file_error(self.path, f, ValueError("not a ttscale run manifest"))
        return m

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest, with ``accounting`` summed over every sampling session."""
        m = json.loads(_dumps(self._manifest))
        if self.sessions():
            m["accounting"] = self.accounting()
        return m

    def modify_manifest(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Re-read the manifest, let ``fn`` change it in place, write it; all under the run lock.

        Read-modify-write under :func:`run_lock`, so concurrent workers never lose each other's
        updates; the file itself is replaced atomically (readers never see half a manifest).
        """
        with run_lock(self.path):
            m = self._read_manifest()
            fn(m)
            _write_manifest(self.path, m)
        self._manifest = m
        return self.manifest

    def update_manifest(self, **fields: Any) -> None:
        """Merge ``fields`` into the manifest (top-level keys; dicts are merged one level deep)."""

        def merge(m: dict[str, Any]) -> None:
            for k, v in fields.items():
                if isinstance(v, Mapping) and isinstance(m.get(k), dict):
                    m[k] = {**m[k], **v}
                else:
                    m[k] = v

        self.modify_manifest(merge)

    # accounting ------------------------------------------------------------------------------

    def write_session(self, session: str, record: Mapping[str, Any]) -> None:
        """Write sampling session ``session``'s accounting record (only that session writes it)."""
        d = self.path / "accounting"
        d.mkdir(exist_ok=True)
        _atomic_write_bytes(d / f"{session}.json", (_dumps(dict(record)) + "\n").encode())

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Every session's accounting record, by session id (see :meth:`accounting`)."""
        d = self.path / "accounting"
        out: dict[str, dict[str, Any]] = {}
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                rec = json.loads(f.read_text())
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise damaged_file_error(self.path, f, e) from e
            out[f.stem] = rec
        return out

    def accounting(self) -> dict[str, Any]:
        """Token, sample and time accounting of the run, summed over its sampling sessions.

        Each session writes its own ``accounting/<session>.json`` (see
        :class:`~ttscale.samplers.RepeatedSampler`): ``committed`` counts of the shards it has
        made durable, plus a ``pending`` shard announced before its rename, counted only if that
        shard exists. So a worker killed at any point is accounted exactly for what it stored,
        and concurrent workers never overwrite each other's counts. Runs made before sessions
        had their own files keep their totals in the manifest's ``accounting`` (added here).
        ``wall_seconds`` is summed over sessions (worker-seconds).
        """
        legacy = self._manifest.get("accounting")
        totals = {"samples": 0, "generated_tokens": 0, "prompt_tokens": 0, "wall_seconds": 0.0}
        sessions = 0
        if isinstance(legacy, Mapping):
            for k in totals:
                totals[k] += legacy.get(k, 0) or 0
            sessions += int(legacy.get("sessions", 0) or 0)
        recs = self.sessions()
        for rec in recs.values():
            sessions += int(rec.get("sessions", 1) or 0)
            counts = dict(rec.get("committed") or {})
            pending = rec.get("pending")
            if isinstance(pending, Mapping) and (self.path / "samples" / str(pending.get("shard"))).is_file():
                for k in ("samples", "generated_tokens", "prompt_tokens"):
                    counts[k] = counts.get(k, 0) + int(pending.get(k, 0) or 0)
            for k in ("samples", "generated_tokens", "prompt_tokens"):
                totals[k] += int(counts.get(k, 0) or 0)
            totals["wall_seconds"] += float(rec.get("wall_seconds", 0.0) or 0.0)
        if not sessions and not isinstance(legacy, Mapping):
            return {}
        acct: dict[str, Any] = {k: int(v) for k, v in totals.items() if k != "wall_seconds"}
        secs = round(float(totals["wall_seconds"]), 3)
        acct["wall_seconds"] = secs
        acct["samples_per_s"] = round(acct["samples"] / secs, 3) if secs > 0 else 0.0
        acct["tokens_per_s"] = round(acct["generated_tokens"] / secs, 3) if secs > 0 else 0.0
        acct["sessions"] = sessions
        return acct

    # problems --------------------------------------------------------------------------------

    def write_problems(self, problems: Iterable[Problem]) -> None:
        """Record the problems of this run (merged with those already recorded, by id)."""
        new = {p.id: p for p in problems}
        if not new:
            return
        with run_lock(self.path):  # concurrent workers each record the problems they were given
            self._write_problems_locked(new)

    def _write_problems_locked(self, new: dict[str, Problem]) -> None:
        old = {p.id: p for p in self.problems()}
        for pid, p in new.items():
            if pid in old and (old[pid].prompt != p.prompt):
                raise StoreError(
                    f"problem {pid!r} is already recorded in {self.path} with a different prompt"
                )
        if all(pid in old and old[pid] == p for pid, p in new.items()):
            return  # nothing new: no rewrite (workers sharing a run all record the same list)
        merged = {**old, **new}
        ids = sorted(merged)
        table = pa.table(
            {
                "id": ids,
                "prompt": [merged[i].prompt for i in ids],
                "reference": [_dumps(merged[i].reference) for i in ids],
                "meta": [_dumps(dict(merged[i].meta)) for i in ids],
            },
            schema=PROBLEM_SCHEMA,
        )
        _atomic_write_table(self.path / "problems.parquet", table)

    def problems(self) -> list[Problem]:
        """The recorded problems, sorted by id (empty if none were recorded)."""
        f = self.path / "problems.parquet"
        if not f.exists():
            return []
        t = read_parquet(self.path, f, schema=PROBLEM_SCHEMA).to_pylist()
        return [
            Problem(
                id=r["id"],
                prompt=r["prompt"],
                reference=json.loads(r["reference"]) if r["reference"] else None,
                meta=json.loads(r["meta"]) if r["meta"] else {},
            )
            for r in t
        ]

    def problem_ids(self) -> list[str]:
        """Ids of the recorded problems (reads only the id column)."""
        f = self.path / "problems.parquet"
        if not f.exists():
            return []
        return sorted(read_parquet(self.path, f, columns=["id"]).column("id").to_pylist())

    # samples ---------------------------------------------------------------------------------

    def _shards(self, sub: str) -> list[Path]:
        d = self.path / sub
        if not d.is_dir():
            return []
        now = time.time()
        for stray in d.glob(".*.tmp"):
            # a writer killed mid-write; the rename never happened, so nothing refers to it. A
            # young one may be a live writer's (another worker's): leave it alone
            try:
                if now - stray.stat().st_mtime > _STRAY_TMP_AGE:
                    stray.unlink()
            except OSError:
                pass
        return sorted(d.glob("part-*.parquet"))

    def refresh(self) -> None:
        """Pick up shards other processes wrote since this store last read its keys."""
        if self._keys is not None:
            self._load_keys(refresh=True)

    def _load_keys(self, *, refresh: bool = False) -> dict[tuple[str, int], str]:
        if self._keys is None or refresh:
            keys: dict[tuple[str, int], str] = {} if self._keys is None else self._keys
            for f in self._shards("samples"):
                if f.name in self._key_files:
                    continue
                t = read_parquet(
                    self.path, f, columns=["problem_id", "index", "content_hash"],
                    schema=SAMPLE_SCHEMA,
                )  # fmt: skip
                self._key_files.add(f.name)
                for pid, i, h in zip(
                    t.column("problem_id").to_pylist(),
                    t.column("index").to_pylist(),
                    t.column("content_hash").to_pylist(),
                    strict=True,
                ):
                    old = keys.setdefault((pid, i), h)
                    if old != h:
                        raise StoreError(
                            f"conflicting samples for key ({pid!r}, {i}) in {self.path}; "
                            f"remove the stray shard {f.name}"
                        )
            self._keys = keys
        return self._keys

    def append(
        self,
        samples: Iterable[Sample],
        *,
        before_commit: Callable[[str, list[dict[str, Any]]], None] | None = None,
    ) -> int:
        """Write ``samples`` as one new shard; returns how many were new.

        A key already stored (or repeated in ``samples``) with the same content is skipped; with
        different content it raises :class:`StoreError` and nothing is written.
        ``before_commit(shard_name, rows)`` is called once the new rows are written to a temporary
        file and before it is renamed into place (a sampler announces the shard in its
        accounting there, so a kill between the two never loses or double-counts it).
        """
        keys = self._load_keys()
        rows: list[dict[str, Any]] = []
        batch: dict[tuple[str, int], str] = {}
        for s in samples:
            if not isinstance(s, Sample):
                raise ConfigError(f"append() takes Sample objects, got {type(s).__name__}")
            row = _sample_row(s)
            k, h = s.key, row["content_hash"]
            prev = keys.get(k, batch.get(k))
            if prev is not None:
                if prev != h:
                    raise StoreError(
                        f"sample {k} is already stored in {self.path} with different content; "
                        "a run directory must not mix samples from different settings"
                    )
                continue
            batch[k] = h
            rows.append(row)
        if not rows:
            return 0
        table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
        name = _shard_name()
        hook = None
        if before_commit is not None:
            announce = before_commit

            def hook() -> None:
                announce(name, rows)

        _atomic_write_table(self.path / "samples" / name, table, before_rename=hook)
        keys.update(batch)
        self._key_files.add(name)
        return len(rows)

    def __contains__(self, key: object) -> bool:
        """Whether ``(problem_id, index)`` is stored (as of the last read or :meth:`refresh`)."""
        return key in self._load_keys()

    def keys(self) -> set[tuple[str, int]]:
        """All stored ``(problem_id, index)`` keys."""
        return set(self._load_keys())

    def counts(self) -> dict[str, int]:
        """Number of stored samples per problem id."""
        out: dict[str, int] = {}
        for pid, _ in self._load_keys():
            out[pid] = out.get(pid, 0) + 1
        return out

    def indices(self, problem_id: str) -> set[int]:
        return {i for p, i in self._load_keys() if p == problem_id}

    def __len__(self) -> int:
        return len(self._load_keys())

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All samples as one Arrow table, sorted by (problem_id, index), duplicates collapsed.

        Only ``columns`` (plus the key columns) are read from disk.
        """
        cols = None
        if columns is not None:
            unknown = set(columns) - set(SAMPLE_SCHEMA.names)
            if unknown:
                raise ConfigError(
                    f"unknown sample columns {sorted(unknown)}; known: {SAMPLE_SCHEMA.names}"
                )
            cols = list(dict.fromkeys(["problem_id", "index", "content_hash", *columns]))
        shards = self._shards("samples")
        if not shards:
            schema = SAMPLE_SCHEMA if cols is None else pa.schema([SAMPLE_SCHEMA.field(c) for c in cols])
            return schema.empty_table()
        parts = [read_parquet(self.path, f, columns=cols, schema=SAMPLE_SCHEMA) for f in shards]
        t = pa.concat_tables(parts)
        t = _sort_dedupe(t, what="samples", hash_col="content_hash")
        if columns is not None:
            t = t.select(list(dict.fromkeys(["problem_id", "index", *columns])))
        return t

    def samples(self, problem_id: str | None = None) -> Iterator[Sample]:
        """Iterate stored samples as :class:`Sample` objects (convenient, not fast)."""
        t = self.table()
        if problem_id is not None:
            t = t.filter(pc.equal(t.column("problem_id"), problem_id))
        for batch in t.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                yield _row_to_sample(row)

    def merge_from(self, other: SampleStore | str | os.PathLike[str]) -> int:
        """Copy another run's samples (e.g. another worker's) into this one; returns new rows.

        Verdicts, score sets, the other run's session accounting (each session once, so merging
        again adds nothing), pruning trace logs and adaptive / short-m@k / budget-forcing
        decision rows come along.
        """
        o = other if isinstance(other, SampleStore) else SampleStore(other)
        n = self._merge_rows(o)
        # what a run kind records beside its samples: pruning trace logs, stopping decisions
        _merge_pruning_logs(self, [o])
        _merge_decision_rows(self, [o])
        return n

    def _merge_rows(self, o: SampleStore) -> int:
        """:meth:`merge_from` but for the run kinds' logs (``merge_runs`` merges those once, for
        every run at the end)."""
        self.check_compatible(o.manifest)
        self.check_verdict_sets(o)  # before anything is written
        self.check_score_sets(o)
        self.write_problems(o.problems())
        n = self.append(o.samples())
        for verifier in o.verifiers():
            rec = o.verdict_record(verifier)
            fp = None
            if rec is not None and rec.get("fingerprint"):
                if not self._shards(f"verdicts/{verifier}"):
                    recs = dict(self._read_manifest().get("verifiers") or {})
                    recs[verifier] = rec
                    self.update_manifest(verifiers=recs)
                fp = rec["fingerprint"]
            self.add_verdicts(o.verdicts(verifier), verifier=verifier, fingerprint=fp)
        for name in o.score_sets():
            # exact self-certainty and the like: the rows are copied as stored (bit for bit)
            rec = o.score_set_record(name)
            if rec is not None:
                self.adopt_score_set(name, rec, source=str(o.path))
            elif not self._shards(f"scores/{name}"):
                # rows of an unrecorded configuration: a record left here (a claim whose pass
                # wrote nothing) would describe them wrongly
                self._forget_score_set(name)
            self.copy_scores(name, o.score_table(name))
        self._merge_accounting(o)
        return n

    def check_verdict_sets(self, other: SampleStore) -> None:
        """Refuse (``StoreError``) to merge a verdict set that means another configuration here.

        The same verdict set name must mean the same verifier configuration in both runs.
        """
        for verifier in other.verifiers():
            rec = other.verdict_record(verifier)
            if rec is None or not rec.get("fingerprint"):
                continue
            if not self._shards(f"verdicts/{verifier}"):  # nothing here to contradict it
                continue
            mine = self.verdict_record(verifier)
            if (mine or {}).get("fingerprint") != rec["fingerprint"]:
                raise StoreError(
                    f"verdict set {verifier!r} of {other.path} was made by {rec.get('spec')}, "
                    f"but in {self.path} by {(mine or {}).get('spec', 'an unrecorded configuration')}; "
                    "re-verify one of them under another --name before merging"
                )

    def check_score_sets(self, other: SampleStore) -> None:
        """Refuse (``StoreError``) to merge a score set that means another configuration here,
        or whose name is a verdict set's here (or the other way round); like
        :meth:`check_verdict_sets`, before anything is written."""
        for name in other.score_sets():
            if name in self.verifiers():
                raise StoreError(
                    f"{name!r} is a score set of {other.path} but a verdict set of {self.path}; "
                    "re-score one of them under another --name before merging"
                )
            rec = other.score_set_record(name)
            if rec is not None:
                check_score_record(name, rec, other.path)
            if other._shards(f"scores/{name}"):
                self._check_adopt(name, rec, other.path)
        for name in other.verifiers():
            if name in self.score_sets():
                raise StoreError(
                    f"{name!r} is a verdict set of {other.path} but a score set of {self.path}; "
                    "re-verify one of them under another --name before merging"
                )

    def _check_adopt(self, name: str, rec: Mapping[str, Any] | None, source: object) -> None:
        if not self._shards(f"scores/{name}"):  # nothing here to contradict it
            return
        mine = self.score_set_record(name)
        fp, have = (rec or {}).get("fingerprint"), (mine or {}).get("fingerprint")
        if fp is None or fp != have:
            def what(r: Mapping[str, Any] | None) -> str:
                return _dumps(r.get("config")) if r else "a configuration that was never recorded"

            raise StoreError(
                f"score set {name!r} of {source} was made by {what(rec)}, but in {self.path} by "
                f"{what(mine)}; score one of them under another --name before merging"
            )

    def adopt_score_set(self, name: str, rec: Mapping[str, Any], *, source: str = "the source") -> None:
        """Record score set ``name`` as another run recorded it (``rec``: its ``config``,
        ``fingerprint``, ``created``), before copying its rows here (merge, import). A set this
        run holds already must have the same fingerprint (:class:`StoreError` otherwise)."""
        self._check_score_name(name)
        cfg = check_score_record(name, rec, source)
        self._check_adopt(name, rec, source)
        entry = {"config": json.loads(_dumps(dict(cfg))), "fingerprint": rec["fingerprint"],
                 "created": rec.get("created") or _now()}  # fmt: skip

        def record(m: dict[str, Any]) -> None:
            recs = dict(m.get("score_sets") or {})
            if (recs.get(name) or {}).get("fingerprint") == entry["fingerprint"] and self._shards(f"scores/{name}"):
                return  # the same set: keep this run's record (its created time)
            recs[name] = entry
            m["score_sets"] = recs

        self.modify_manifest(record)

    def _forget_score_set(self, name: str) -> None:
        def forget(m: dict[str, Any]) -> None:
            recs = dict(m.get("score_sets") or {})
            if recs.pop(name, None) is not None:
                m["score_sets"] = recs

        self.modify_manifest(forget)

    def copy_scores(self, name: str, table: pa.Table) -> int:
        """Store the rows of a score table (:meth:`score_table` of another run) in set ``name``
        as they are: values, nulls and metadata unchanged. Returns how many were written."""
        self._check_score_name(name)
        table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
        if table.num_rows and self._shards(f"scores/{name}"):
            # rows stored here already, bit for bit, are not written again (merging or importing
            # again adds no shard)
            def rows(t: pa.Table) -> list[tuple[Any, ...]]:
                sc = t.column("score").to_numpy(zero_copy_only=False).astype(np.float64).view(np.int64)
                valid = t.column("score").is_valid().to_numpy(zero_copy_only=False)
                return list(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(),
                                np.where(valid, sc, 0).tolist(), valid.tolist(),
                                t.column("meta").to_pylist(), strict=True))  # fmt: skip

            have = set(rows(self.score_table(name)))
            keep = [r not in have for r in rows(table)]
            table = table.filter(pa.array(keep, type=pa.bool_()))
        if table.num_rows == 0:
            return 0
        d = self.path / "scores" / name
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write_table(d / _shard_name(), table)
        return table.num_rows

    def _merge_accounting(self, o: SampleStore) -> None:
        have = set(self.sessions())
        for sid, rec in o.sessions().items():
            if sid in have:
                continue
            rec = dict(rec)
            pending = rec.pop("pending", None)
            committed = dict(rec.get("committed") or {})
            # the shards are copied under new names here: settle a pending one against the source
            if isinstance(pending, Mapping) and (o.path / "samples" / str(pending.get("shard"))).is_file():
                for k in ("samples", "generated_tokens", "prompt_tokens"):
                    committed[k] = int(committed.get(k, 0) or 0) + int(pending.get(k, 0) or 0)
            self.write_session(sid, {**rec, "committed": committed, "pending": None})
        legacy = o._manifest.get("accounting")
        if isinstance(legacy, Mapping):
            sid = "legacy-" + hashlib.blake2b(str(o.path.resolve()).encode(), digest_size=6).hexdigest()
            if sid not in have:
                self.write_session(sid, {
                    "committed": {k: int(legacy.get(k, 0) or 0)
                                  for k in ("samples", "generated_tokens", "prompt_tokens")},
                    "pending": None,
                    "wall_seconds": float(legacy.get("wall_seconds", 0.0) or 0.0),
                    "sessions": int(legacy.get("sessions", 1) or 0),
                    "merged_from": str(o.path),
                })  # fmt: skip

    # verdicts --------------------------------------------------------------------------------

    def verifiers(self) -> list[str]:
        """Names of the verdict sets stored in this run (folders under ``verdicts/``)."""
        d = self.path / "verdicts"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def verdict_record(self, verifier: str) -> dict[str, Any] | None:
        """The manifest's record of verdict set ``verifier`` (its configuration), if any.

        A record written before verdicts were keyed by configuration has no ``fingerprint``;
        :meth:`claim_verdicts` upgrades it when the configuration it describes is used again.
        """
        recs = self._manifest.get("verifiers")
        rec = recs.get(verifier) if isinstance(recs, dict) else None
        return json.loads(_dumps(rec)) if isinstance(rec, dict) else None

    def claim_verdicts(
        self,
        verifier: str,
        *,
        spec: str,
        info: Mapping[str, Any],
        replace: bool = False,
    ) -> str:
        """Bind verdict set ``verifier`` to the configuration ``(spec, info)`` before writing it.

        Verdicts are keyed by the verifier's full configuration
        (:func:`ttscale.verifiers.base.verifier_config`: canonical spec, extractor, options,
        limits, versions). Returns ``"new"`` (the set did not exist), ``"same"`` (it holds
        verdicts of this configuration; they may be reused) or ``"replaced"``. A set made by a
        different configuration, or whose configuration was never recorded, raises
        :class:`StoreError` unless ``replace``: then its shards are moved aside to
        ``verdicts/.replaced/`` (never deleted) and its record to the manifest's
        ``replaced_verdicts``.
        """
        from ttscale.verifiers.base import config_fingerprint, verifier_config

        self._check_verdict_name(verifier)
        config = verifier_config(spec, info)
        fp = config_fingerprint(config)
        rec = self.verdict_record(verifier)
        has_shards = bool(self._shards(f"verdicts/{verifier}"))
        if rec is not None and not rec.get("fingerprint"):
            # written by an older ttscale: its entry is the flat info() plus the spec given
            old_fp = config_fingerprint(verifier_config(str(rec.get("spec") or spec), rec))
            rec = {**rec, "fingerprint": old_fp, "legacy": True}
        same = rec is not None and rec.get("fingerprint") == fp
        if same or not has_shards:
            # a record without any verdict (claimed, then interrupted) describes nothing
            status = "same" if same and has_shards else "new"
        elif not replace:
            if rec is None:
                what = "a configuration that was never recorded"
            else:
                what = f"{rec.get('spec')} ({_config_diff(rec, config)})"
            raise StoreError(
                f"verdict set {verifier!r} in {self.path} was made by {what}, not "
                f"{config['spec']}; pass --force to replace it (the old verdicts are kept under "
                f"verdicts/.replaced) or --name NAME to store these verdicts apart"
            )
        else:
            self._move_verdicts_aside(verifier, rec)
            status = "replaced"
        given = list((rec or {}).get("specs") or []) if status == "same" else []
        if spec not in given:
            given.append(spec)
        entry = {
            **{k: v for k, v in info.items() if k not in ("specs", "legacy")},
            "spec": config["spec"],
            "specs": given,
            "config": config,
            "fingerprint": fp,
        }
        if status == "same" and rec is not None:
            entry["created"] = rec.get("created") or _now()
            if rec.get("legacy"):
                entry["legacy"] = True  # recorded by a ttscale that did not key verdicts
        else:
            entry["created"] = _now()
        recs = dict(self._read_manifest().get("verifiers") or {})
        recs[verifier] = entry
        self.update_manifest(verifiers=recs)
        return status

    def update_verdict_record(self, verifier: str, info: Mapping[str, Any]) -> None:
        """Refresh the descriptive ``info()`` fields (counters) of a claimed verdict set.

        The configuration (``spec``, ``config``, ``fingerprint``) is left as it was claimed.
        """
        recs = dict(self._read_manifest().get("verifiers") or {})
        rec = dict(recs.get(verifier) or {})
        keep = {k: rec[k] for k in ("spec", "specs", "config", "fingerprint", "created", "legacy") if k in rec}
        recs[verifier] = {**rec, **dict(info), **keep}
        self.update_manifest(verifiers=recs)

    def _move_verdicts_aside(self, verifier: str, rec: Mapping[str, Any] | None) -> None:
        src = self.path / "verdicts" / verifier
        moved = None
        if src.is_dir():
            dest_dir = self.path / "verdicts" / ".replaced"
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / f"{verifier}.{time.time_ns()}"
            os.replace(src, dest)
            moved = str(dest.relative_to(self.path))
            log.warning("moved the old verdicts of %r aside to %s", verifier, moved)
        m = self._read_manifest()
        old = list(m.get("replaced_verdicts") or [])
        old.append({"name": verifier, "moved_to": moved, "record": rec, "replaced": _now()})
        recs = dict(m.get("verifiers") or {})
        recs.pop(verifier, None)
        m["verifiers"], m["replaced_verdicts"] = recs, old
        _atomic_write_bytes(self.path / "manifest.json", (_dumps(m) + "\n").encode())
        self._manifest = m

    @staticmethod
    def _check_verdict_name(verifier: str) -> None:
        if not verifier or "/" in verifier or verifier.startswith("."):
            raise ConfigError(f"invalid verifier name {verifier!r}")

    def add_verdicts(
        self, verdicts: Iterable[Verdict], *, verifier: str, fingerprint: str | None = None
    ) -> int:
        """Store verdicts of ``verifier`` as one new shard; returns how many were written.

        Re-verifying a key overwrites the earlier verdict on read (the latest shard wins).
        ``fingerprint`` (from :meth:`claim_verdicts`) guards against writing into a set that
        another configuration has claimed meanwhile.
        """
        self._check_verdict_name(verifier)
        if fingerprint is not None:
            rec = self.verdict_record(verifier) or {}
            if rec.get("fingerprint") != fingerprint:
                raise StoreError(
                    f"verdict set {verifier!r} in {self.path} belongs to another configuration "
                    f"({rec.get('spec', 'unrecorded')}); use --name NAME to store these apart"
                )
        rows = []
        for v in verdicts:
            rows.append(
                {
                    "problem_id": v.problem_id,
                    "index": v.index,
                    "status": v.status.value,
                    "answer": v.answer,
                    "correct": v.correct,
                    "score": v.score,
                    "detail": v.detail or None,
                    "meta": _dumps(dict(v.meta)) if v.meta else None,
                }
            )
        if not rows:
            return 0
        d = self.path / "verdicts" / verifier
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write_table(d / _shard_name(), pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA))
        return len(rows)

    def verdict_table(self, verifier: str) -> pa.Table:
        shards = self._shards(f"verdicts/{verifier}")
        if not shards:
            return VERDICT_SCHEMA.empty_table()
        t = pa.concat_tables([read_parquet(self.path, f, schema=VERDICT_SCHEMA) for f in shards])
        return _sort_dedupe(t, what="verdicts", hash_col=None)

    def verdicts(self, verifier: str) -> Iterator[Verdict]:
        for r in self.verdict_table(verifier).to_pylist():
            yield Verdict(
                problem_id=r["problem_id"],
                index=int(r["index"]),
                status=VerdictStatus(r["status"]),
                verifier=verifier,
                answer=r["answer"],
                correct=r["correct"],
                score=r["score"],
                detail=r["detail"] or "",
                meta=json.loads(r["meta"]) if r["meta"] else {},
            )

    def verified_keys(self, verifier: str) -> set[tuple[str, int]]:
        t = self.verdict_table(verifier)
        return set(
            zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True)
        )

    # score sets: per-sample scores computed after sampling -------------------------------------

    def score_sets(self) -> list[str]:
        """Names of the score sets stored in this run (folders under ``scores/``)."""
        d = self.path / "scores"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def score_set_record(self, name: str) -> dict[str, Any] | None:
        """The manifest's record of score set ``name`` (what computed it, and how), if any."""
        recs = self._manifest.get("score_sets")
        rec = recs.get(name) if isinstance(recs, dict) else None
        return json.loads(_dumps(rec)) if isinstance(rec, dict) else None

    def claim_score_set(self, name: str, config: Mapping[str, Any], *, replace: bool = False) -> str:
        """Bind score set ``name`` to ``config`` (what computes its scores) before writing it.

        Like :meth:`claim_verdicts`: returns ``"new"``, ``"same"`` (the set holds scores of this
        configuration; they are kept and only missing samples need scoring) or ``"replaced"``
        (``replace``: the old shards move to ``scores/.replaced/``, never deleted). A set made by
        another configuration raises :class:`StoreError` otherwise. ``config`` is recorded with
        its fingerprint under the manifest's ``score_sets``.
        """
        self._check_score_name(name)
        cfg = json.loads(_dumps(dict(config)))
        fp = _score_fingerprint(cfg)
        rec = self.score_set_record(name)
        has = bool(self._shards(f"scores/{name}"))
        same = rec is not None and rec.get("fingerprint") == fp
        if same or not has:
            status = "same" if same and has else "new"
        elif not replace:
            was = (rec or {}).get("config") or "a configuration that was never recorded"
            raise StoreError(
                f"score set {name!r} in {self.path} was made by {_dumps(was)}, not {_dumps(cfg)}; "
                "pass --force to replace it (the old scores are kept under scores/.replaced) or "
                "--name NAME to store these apart"
            )
        else:
            src = self.path / "scores" / name
            dest = self.path / "scores" / ".replaced" / f"{name}.{time.time_ns()}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            log.warning("moved the old scores of %r aside to %s", name, dest.relative_to(self.path))
            status = "replaced"
        created = (rec or {}).get("created") if status == "same" else None

        def record(m: dict[str, Any]) -> None:
            recs = dict(m.get("score_sets") or {})
            recs[name] = {"config": cfg, "fingerprint": fp, "created": created or _now()}
            m["score_sets"] = recs

        self.modify_manifest(record)
        return status

    def _check_score_name(self, name: str) -> None:
        if not name or "/" in name or name.startswith(".") or not name.isprintable():
            raise ConfigError(f"invalid score set name {name!r}")
        if name in self.verifiers():
            raise ConfigError(
                f"{name!r} is a verdict set of {self.path}; give the score set another --name"
            )

    def add_scores(
        self, name: str, rows: Iterable[tuple[str, int, float, Mapping[str, Any] | None]],
        *, fingerprint: str | None = None,
    ) -> int:
        """Store ``(problem_id, index, score, meta)`` rows of score set ``name`` as one new shard
        (atomically: a killed writer leaves none of it); returns how many were written. A key
        scored again overwrites the earlier score on read (the latest shard wins).
        ``fingerprint`` (the set's, from :meth:`claim_score_set`) guards against writing into a
        set that another configuration has claimed meanwhile."""
        self._check_score_name(name)
        if fingerprint is not None:
            rec = self.score_set_record(name) or {}
            if rec.get("fingerprint") != fingerprint:
                raise StoreError(
                    f"score set {name!r} in {self.path} belongs to another configuration; use "
                    "--name NAME to store these apart"
                )
        out = [
            {"problem_id": str(pid), "index": int(idx), "score": float(v),
             "meta": _dumps(dict(meta)) if meta else None}
            for pid, idx, v, meta in rows
        ]  # fmt: skip
        if not out:
            return 0
        d = self.path / "scores" / name
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write_table(d / _shard_name(), pa.Table.from_pylist(out, schema=SCORE_SCHEMA))
        return len(out)

    def score_table(self, name: str) -> pa.Table:
        """Score set ``name``: one row per scored ``(problem_id, index)``, sorted by key."""
        shards = self._shards(f"scores/{name}")
        if not shards:
            return SCORE_SCHEMA.empty_table()
        t = pa.concat_tables([read_parquet(self.path, f, schema=SCORE_SCHEMA) for f in shards])
        return _sort_dedupe(t, what="scores", hash_col=None)

    def scored_keys(self, name: str) -> set[tuple[str, int]]:
        """The ``(problem_id, index)`` keys score set ``name`` holds a score for."""
        t = self.score_table(name)
        return set(zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True))

    # analysis view ---------------------------------------------------------------------------

    def pool(self, verifier: str | None = None, *, score_names: Sequence[str] | None = None):
        """The columnar analysis view (:class:`ttscale.store.pool.Pool`) of this run.

        ``verifier`` chooses whose answers/correctness to use: ``None`` = the run's recorded
        default verdict set (:meth:`choose_verdicts` says the whole rule; a run with several
        sets and no default raises :class:`ConfigError`). ``pool.meta["verdicts"]`` says which
        set was used and why. Scores of every verifier are attached as ``scores["<verifier>"]``,
        and those of every score set (``scores/<set>/``) as ``scores["<set>"]``.
        """
        from ttscale.store.pool import Pool

        cols = ["answer", "correct", "logprob", "mean_logprob", "num_tokens", "text_hash", "scores"]
        iid = self._manifest.get("iid") is not False
        if not iid:
            cols += ["log_weight", "fate"]
        t = self.table(cols)
        if not iid:
            # a weighted population is its final particles: pruned and resampled-away traces
            # stay in the run (and its accounting) but are not part of the pool
            fate = t.column("fate")
            t = t.filter(pc.or_kleene(pc.is_null(fate), pc.equal(fate, "kept")))
        names = self.verifiers()
        chosen = self.choose_verdicts(verifier)
        verifier = chosen["name"]
        extra_scores: dict[str, np.ndarray] = {}
        answer = t.column("answer")
        correct = t.column("correct")
        for name in names:
            vt = self.verdict_table(name)
            if vt.num_rows == 0:
                continue
            joined = t.select(["problem_id", "index"]).join(
                vt, keys=["problem_id", "index"], join_type="left outer"
            )
            joined = joined.take(
                pc.sort_indices(
                    joined, sort_keys=[("problem_id", "ascending"), ("index", "ascending")]
                )
            )
            extra_scores[name] = (
                joined.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
            )
            if name == verifier:
                # a sample this verifier has not checked keeps the answer stored with it
                has = pc.is_valid(joined.column("status"))
                answer = pc.if_else(has, joined.column("answer"), answer)
                correct = pc.if_else(has, joined.column("correct"), correct)
        for name in self.score_sets():
            # a score set (e.g. exact self-certainty from `ttscale certainty`) is a per-sample
            # score like a verifier's; its name is never a verdict set's (claim_score_set)
            st = self.score_table(name)
            if st.num_rows == 0 or name in extra_scores:
                continue
            joined = t.select(["problem_id", "index"]).join(
                st, keys=["problem_id", "index"], join_type="left outer"
            )
            joined = joined.take(
                pc.sort_indices(joined, sort_keys=[("problem_id", "ascending"), ("index", "ascending")])
            )
            extra_scores[name] = joined.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        pool = Pool.from_arrow(
            t,
            answer=answer,
            correct=correct,
            extra_scores=extra_scores,
            score_names=score_names,
            verifier=verifier,
            iid=iid,
        )
        import dataclasses

        from ttscale.runkinds import run_kind

        pool = pool.with_run_info(
            verdicts=chosen,
            unsampled=sorted(set(self.problem_ids()) - set(pool.problem_ids.tolist())),
            requested_n=_requested_n(self._manifest),
        )
        # what made the samples (an adaptive run's are iid draws, but an answer-dependent prefix)
        return dataclasses.replace(pool, meta={**pool.meta, "run_kind": run_kind(self._manifest)})

    # the default verdict set ---------------------------------------------------------------

    def default_verdicts(self) -> str | None:
        """The run's recorded default verdict set (manifest ``default_verifier``), if any."""
        d = self._manifest.get("default_verifier")
        return d if isinstance(d, str) and d else None

    def _has_verdicts(self, name: str) -> bool:
        return bool(self._shards(f"verdicts/{name}"))

    def set_default_verdicts(self, name: str, *, by: str = "set_default_verdicts") -> dict[str, Any]:
        """Make verdict set ``name`` the one analyses use; returns what changed.

        ``by`` says who set it (``"run"``, ``"--set-default"``, ...) and is recorded as the
        manifest's ``default_verifier_set_by``. The set must hold verdicts. Returns ``{"name",
        "previous", "changed", "set_by"}``.
        """
        self._check_verdict_name(name)
        if not self._has_verdicts(name):
            have = [n for n in self.verifiers() if self._has_verdicts(n)]
            raise ConfigError(
                f"run {self.path} has no verdicts in set {name!r} (sets with verdicts: "
                f"{', '.join(have) or 'none'}); verify with it first (`ttscale verify {self.path} "
                f"--verifier SPEC --name {name} --set-default`)"
            )
        previous: list[str | None] = []

        def record(m: dict[str, Any]) -> None:
            previous.append(m.get("default_verifier"))
            m["default_verifier"], m["default_verifier_set_by"] = name, by

        self.modify_manifest(record)
        return {"name": name, "previous": previous[0], "changed": previous[0] != name, "set_by": by}

    def settle_default_verdicts(self, verified: str) -> dict[str, Any]:
        """After verdict set ``verified`` was written: record a default if the run has none.

        The first verdict set verified on a run becomes its default. A run verified before
        defaults were recorded keeps what its analyses used: its only earlier set becomes the
        default; with several earlier sets none is chosen (analyses then ask for
        ``--set-default``). A recorded default is never changed here. Atomic under the run lock,
        so concurrent ``verify --shard`` workers agree. Returns ``{"name", "previous",
        "changed", "set_by"}`` (``name`` ``None`` when still undecided).
        """
        m = self._read_manifest()
        cur = m.get("default_verifier")
        if isinstance(cur, str) and cur:  # recorded: nothing to write (the usual case)
            self._manifest = m
            by = m.get("default_verifier_set_by")
            return {"name": cur, "previous": cur, "changed": False, "set_by": by}
        out: dict[str, Any] = {}

        def settle(m: dict[str, Any]) -> None:
            cur = m.get("default_verifier")
            out.update(previous=cur, set_by=m.get("default_verifier_set_by"), changed=False)
            if isinstance(cur, str) and cur:
                out["name"] = cur
                return
            earlier = [n for n in self.verifiers() if n != verified and self._has_verdicts(n)]
            if not self._has_verdicts(verified) and not earlier:
                out["name"] = None
                return
            if not earlier:
                name, by = verified, "verify as the first set verified on the run"
            elif len(earlier) == 1:
                name, by = earlier[0], f"verify as the run's only set before {verified}"
            else:
                out.update(name=None, undecided=True)
                return
            m["default_verifier"], m["default_verifier_set_by"] = name, by
            out.update(name=name, set_by=by, changed=True)

        self.modify_manifest(settle)
        return out

    def choose_verdicts(self, verifier: str | None = None, *, strict: bool = True) -> dict[str, Any]:
        """Which verdict set an analysis uses, and why (one rule for every analysis).

        ``verifier`` given: that set (a :class:`ConfigError` if absent). Otherwise the run's
        recorded default (:meth:`set_default_verdicts`; set by ``ttscale verify`` on first use,
        by ``ttscale run``, or by ``verify --set-default``); never "the latest written". A run
        without a recorded default (made before defaults were recorded) uses its only verdict
        set, or, with none, the answers and correctness stored with the samples. With several
        sets and no default, or a default whose set holds no verdicts, the choice is the user's:
        a :class:`ConfigError` naming ``--set-default`` (with ``strict=False`` the result has
        ``name`` ``None`` and the reason in ``undecided``, for ``ttscale info``).

        Returns ``{"name", "chosen_by", "spec", "fingerprint", "others"}`` (``spec`` and
        ``fingerprint`` ``None`` when not recorded; ``others``: the run's other sets).
        """
        names = [n for n in self.verifiers() if self._has_verdicts(n)]
        fix = (
            f"pick one with --verifier NAME, or record the run's default with `ttscale verify "
            f"{self.path} --verifier NAME --set-default`"
        )
        undecided = None
        name: str | None = None
        if verifier is not None:
            if verifier not in names:
                raise ConfigError(
                    f"run {self.path} has no verdicts from verifier {verifier!r}; "
                    f"known: {names or 'none'} (run `ttscale verify` first)"
                )
            name, how = verifier, "--verifier"
        else:
            default = self.default_verdicts()
            if default is not None and default in names:
                by = self._manifest.get("default_verifier_set_by")
                name, how = default, "the run's default" + (f", set by {by}" if by else "")
            elif default is not None and names:
                undecided = (
                    f"run {self.path} records default verdict set {default!r}, which holds no "
                    f"verdicts (sets with verdicts: {', '.join(names)}); {fix}"
                )
            elif len(names) == 1:
                name, how = names[0], "the run's only verdict set; no default recorded"
            elif names:
                undecided = (
                    f"run {self.path} has {len(names)} verdict sets ({', '.join(names)}) and no "
                    f"recorded default; {fix}"
                )
            else:
                how = "no verdicts: answers/correctness stored with the samples"
        if undecided is not None:
            if strict:
                raise ConfigError(undecided)
            return {"name": None, "chosen_by": None, "undecided": undecided, "spec": None,
                    "fingerprint": None, "others": names}  # fmt: skip
        rec = self.verdict_record(name) if name is not None else None
        return {
            "name": name,
            "chosen_by": how,
            "spec": (rec or {}).get("spec"),
            "fingerprint": (rec or {}).get("fingerprint"),
            "others": [n for n in names if n != name],
        }


def check_score_record(name: str, rec: Mapping[str, Any], where: object) -> Mapping[str, Any]:
    """The ``config`` of score set ``name``'s record ``rec`` (from run or file ``where``); a
    record whose fingerprint is not its configuration's (edited, damaged) is a
    :class:`StoreError`, raised before a copy of the set writes anything."""
    cfg = rec.get("config")
    if not isinstance(cfg, Mapping) or rec.get("fingerprint") != _score_fingerprint(cfg):
        raise StoreError(
            f"the record of score set {name!r} in {where} does not match its configuration (edited "
            "or damaged); score that run again with `ttscale certainty RUN --model PATH --force`"
        )
    return cfg


def _score_fingerprint(config: Mapping[str, Any]) -> str:
    """A score set's fingerprint: 16 hex digits of SHA-256 over its configuration's JSON."""
    return hashlib.sha256(_dumps(json.loads(_dumps(dict(config)))).encode()).hexdigest()[:16]


def _requested_n(manifest: Mapping[str, Any]) -> int | None:
    """Samples per problem the run asked for (``sampling.n``), if recorded."""
    n = (manifest.get("sampling") or {}).get("n") if isinstance(manifest.get("sampling"), dict) else None
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 1 else None


def _config_diff(rec: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """``"extractor last_number -> boxed"``: the first settings that differ, for error messages."""
    old = (rec.get("config") or {}).get("settings")
    if old is None:
        from ttscale.verifiers.base import verifier_config

        old = verifier_config(str(rec.get("spec") or ""), rec)["settings"]
    new = config.get("settings") or {}
    diffs = [
        f"{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if _dumps(old.get(k)) != _dumps(new.get(k))
    ]
    return ", ".join(diffs[:3]) if diffs else "different spec"


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def merge_runs(
    out: str | os.PathLike[str], runs: Sequence[str | os.PathLike[str]]
) -> tuple[SampleStore, dict[str, int]]:
    """Merge run directories ``runs`` (e.g. ``--shard`` workers') into ``out`` (created if absent).

    Everything is checked before anything is written: the runs must have compatible settings
    (as for a resume), and a key stored with different content in two runs is a conflict
    (:class:`StoreError`). Returns the merged store and the new samples taken from each run.
    """
    if not runs:
        raise ConfigError("give at least one run directory to merge")
    outp = Path(out)
    srcs = [SampleStore.open(r) for r in runs]
    for st in srcs:
        if outp.exists() and st.path.resolve() == outp.resolve():
            raise ConfigError(f"cannot merge run {st.path} into itself")
    target = SampleStore.open(outp) if (outp / "manifest.json").exists() else None
    base = target or srcs[0]
    for st in srcs:
        base.check_compatible(st.manifest)
    seen: dict[tuple[str, int], tuple[str, Path]] = {}
    prompts: dict[str, tuple[str, Path]] = {}
    for st in ([target] if target is not None else []) + srcs:
        t = st.table(["content_hash"])
        for pid, i, h in zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(),
                             t.column("content_hash").to_pylist(), strict=True):  # fmt: skip
            prev = seen.setdefault((pid, i), (h, st.path))
            if prev[0] != h:
                raise StoreError(
                    f"conflicting samples for key ({pid!r}, {i}): {prev[1]} and {st.path} hold "
                    "different content, so they were not made with the same settings; nothing "
                    "was merged"
                )
        for p in st.problems():
            old = prompts.setdefault(p.id, (p.prompt, st.path))
            if old[0] != p.prompt:
                raise StoreError(
                    f"problem {p.id!r} has different prompts in {old[1]} and {st.path}; nothing "
                    "was merged"
                )
    made_by: dict[str, tuple[str, str, Path]] = {}  # verdict set -> (fingerprint, spec, run)
    for st in ([target] if target is not None else []) + srcs:
        for name in st.verifiers():
            rec = st.verdict_record(name) or {}
            fp = str(rec.get("fingerprint") or "")
            if not fp:
                continue
            prev_fp, prev_spec, prev_path = made_by.setdefault(name, (fp, str(rec.get("spec")), st.path))
            if prev_fp != fp:
                raise StoreError(
                    f"verdict set {name!r} was made by {prev_spec} in {prev_path} but by "
                    f"{rec.get('spec')} in {st.path}; re-verify one of them under another --name; "
                    "nothing was merged"
                )
    # score sets (exact self-certainty, ...): as verdict sets, one name means one configuration
    # in every run, and never a verdict set's name; a set some runs lack is still carried
    scored_by: dict[str, tuple[str | None, str, Path]] = {}  # score set -> (fingerprint, config, run)
    everyone = ([target] if target is not None else []) + srcs
    verdict_names = {n: st.path for st in everyone for n in st.verifiers()}
    for st in everyone:
        for name in st.score_sets():
            if name in verdict_names:
                raise StoreError(
                    f"{name!r} is a score set in {st.path} but a verdict set in "
                    f"{verdict_names[name]}; rename one (another --name); nothing was merged"
                )
            if not st._shards(f"scores/{name}"):
                continue
            srec = st.score_set_record(name)
            if srec is not None:
                check_score_record(name, srec, st.path)
            sfp = (srec or {}).get("fingerprint")
            scfg = _dumps(srec.get("config")) if srec else "an unrecorded configuration"
            sprev_fp, sprev_cfg, sprev_path = scored_by.setdefault(name, (sfp, scfg, st.path))
            if sprev_path != st.path and (sprev_fp != sfp or sfp is None):
                raise StoreError(
                    f"score set {name!r} was made by {sprev_cfg} in {sprev_path} but by {scfg} in "
                    f"{st.path}; score one of them under another --name; nothing was merged"
                )
    if target is None:
        skip = ("format", "format_version", "created", "ttscale_version", "git_sha", "accounting")
        m = {k: v for k, v in srcs[0].manifest.items() if k not in skip}
        target = SampleStore.create(outp, {**m, "merged_from": [str(r) for r in runs]})
    # the default verdict set: kept where every run that records one agrees, else dropped, so
    # analyses of the merged run ask which set to use instead of taking one run's choice
    defaults = {
        d: st.manifest.get("default_verifier_set_by")
        for st in ([target] if target is not None else []) + srcs
        if (d := st.default_verdicts()) is not None
    }
    added = {str(st.path): target._merge_rows(st) for st in srcs}
    ns = [int((st.manifest.get("sampling") or {}).get("n") or 0) for st in srcs]

    def widen(m: dict[str, Any]) -> None:
        if isinstance(m.get("sampling"), dict) and ns:
            m["sampling"]["n"] = max([int(m["sampling"].get("n") or 0), *ns])
        m["num_problems"] = len(prompts)
        if len(defaults) == 1:
            ((m["default_verifier"], m["default_verifier_set_by"]),) = defaults.items()
        elif defaults:
            m.pop("default_verifier", None)
            m.pop("default_verifier_set_by", None)
            log.warning(
                "the merged runs record different default verdict sets (%s); %s records none: "
                "choose with `ttscale verify %s --verifier NAME --set-default`",
                ", ".join(sorted(defaults)), outp, outp,
            )

    target.modify_manifest(widen)
    _merge_pruning_logs(target, srcs)
    _merge_decision_rows(target, srcs)
    total = len(target)
    for name in target.score_sets():
        have = len(target.scored_keys(name))
        if have < total:  # curve then uses the approximation, and says why
            log.warning(
                "score set %r of %s covers %d of %d samples (the runs without it had none); "
                "complete it with `ttscale certainty %s --model PATH`", name, outp, have, total, outp,
            )
    return target, added


def read_trace_log(path: Path) -> list[dict[str, Any]]:
    """The lines of a pruning trace log (``pruning.jsonl`` or ``pruning/<session>.jsonl``); a
    line cut by a kill is skipped (its trace was never stored: the sampler redoes it)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "problem_id" in r and "index" in r:
            out.append(r)
    return out


#: the rows a run kind writes beside its samples, and the fields that key a row: the decisions
#: of adaptive (``adaptive.jsonl``: the samples its rule used) and short-m@k runs
#: (``shortmk.jsonl``), one per problem, and budget forcing's records, one per trace
#: (``budget_forcing.jsonl``); ttscale.samplers names the files (a test checks them)
DECISION_FILES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "adaptive.jsonl": ("problem_id",),
    "shortmk.jsonl": ("problem_id",),
    "budget_forcing.jsonl": ("problem_id", "index"),
})


def _decision_rows(path: Path, key: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # cut short by a kill: that problem is decided again on resume
            continue
        if isinstance(r, dict) and all(k in r for k in key):
            rows[tuple(r[k] for k in key)] = r  # the last written wins, as the samplers read them
    return rows


def _merge_decision_rows(target: SampleStore, srcs: Sequence[SampleStore]) -> None:
    """Carry the rows of :data:`DECISION_FILES` into ``target``; a row already there wins for
    its key (merging again adds nothing)."""
    for name, key in DECISION_FILES.items():
        rows = _decision_rows(target.path / name, key)
        new = {k: r for st in srcs for k, r in _decision_rows(st.path / name, key).items() if k not in rows}
        if not new:
            continue
        rows.update(new)
        text = "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows))
        _atomic_write_bytes(target.path / name, text.encode())


def _merge_pruning_logs(target: SampleStore, srcs: Sequence[SampleStore]) -> None:
    """Copy the pruning runs' trace logs (``pruning/<session>.jsonl``, one per sampling session)
    into the merged run and rebuild its ``pruning.jsonl`` and manifest ``pruning`` entry from
    them, as a pruning run's last worker does (what was pruned, when and why, for every trace).

    A source with only ``pruning.jsonl`` (no session logs) contributes that file's lines as one
    log named after the source. Merging again adds nothing."""
    dest = target.path / "pruning"
    copied = False
    for st in srcs:
        logs = sorted((st.path / "pruning").glob("*.jsonl")) if (st.path / "pruning").is_dir() else []
        if not logs and (st.path / "pruning.jsonl").is_file():
            logs = [st.path / "pruning.jsonl"]
        for f in logs:
            lines = [json.dumps(r) for r in read_trace_log(f)]
            if f.parent == st.path:  # the run's whole record, under a name of its own here
                tag = hashlib.blake2b(str(st.path.resolve()).encode(), digest_size=6).hexdigest()
                out = dest / f"merged-{tag}.jsonl"
            else:
                out = dest / f.name
            old = read_trace_log(out) if out.is_file() else []
            have = {json.dumps(r) for r in old}
            new = [x for x in lines if x not in have]
            if not new:
                continue
            dest.mkdir(exist_ok=True)
            text = "".join(json.dumps(r) + "\n" for r in old) + "".join(x + "\n" for x in new)
            _atomic_write_bytes(out, text.encode())
            copied = True
    if not copied:
        return
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for f in sorted(dest.glob("*.jsonl")):
        for r in read_trace_log(f):
            records[(str(r["problem_id"]), int(r["index"]))] = r
    target.refresh()
    stored = target.keys()
    kept = [r for k, r in sorted(records.items()) if k in stored]
    _atomic_write_bytes(target.path / "pruning.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
    thresholds: dict[str, Any] = {}
    for st in [target, *srcs]:
        info = st.manifest.get("pruning")
        if isinstance(info, Mapping):
            thresholds.update({k: v for k, v in dict(info.get("thresholds") or {}).items() if v is not None})

    def put(m: dict[str, Any]) -> None:
        info = dict(m.get("pruning") or {})
        info.update(
            traces=len(kept),
            pruned=sum(r.get("pruned_at") is not None for r in kept),
            generated_tokens=sum(int(r.get("tokens") or 0) for r in kept),
            thresholds=thresholds,
            log="pruning.jsonl",
        )
        # self-evaluation's scored context tokens, summed as a pruning run's last worker does
        # (unknown once a selfeval trace's count is missing or null)
        missing = None if str(info.get("rule") or "").startswith("selfeval") else 0
        counts: list[Any] = [r.get("scored_tokens", missing) for r in kept]
        known = all(n is not None for n in counts)
        info["scored_tokens"] = sum(int(n) for n in counts) if known else None
        m["pruning"] = info

    target.modify_manifest(put)
