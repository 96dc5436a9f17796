"""``ttscale check``: find damaged files of a run directory and move them aside.

A run directory can be damaged from outside: a disk filling up, a copy cut short, a file
truncated by hand. Every file is then checked by reading it completely: the manifest (JSON with
the run format), the problems file and every sample and verdict shard (Parquet with the store's
schema), and the per-session accounting files. Samples under one key with different content in
two shards (a stray shard from another run) are reported too.

With ``repair=True`` damaged files are *moved* to ``RUN/damaged/`` (never deleted) and a damaged
manifest is restored from ``manifest.backup.json``, the copy written with every manifest update.
Samples are keyed and seeded by ``(problem_id, index)``, so after a repair
``ttscale sample --out RUN --resume`` regenerates exactly the samples the damaged shards held,
identical to the lost ones, and ``ttscale verify RUN`` re-checks samples whose verdicts were lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ttscale.errors import StoreError
from ttscale.store.samplestore import (
    FORMAT_NAME,
    MANIFEST_BACKUP,
    PROBLEM_SCHEMA,
    SAMPLE_SCHEMA,
    SCORE_SCHEMA,
    VERDICT_SCHEMA,
    _brief,
)

__all__ = ["CheckReport", "Damage", "check_run"]

log = logging.getLogger(__name__)

DAMAGED_DIR = "damaged"


@dataclass(frozen=True)
class Damage:
    """One damaged file: what it is, why it is unreadable, and what brings its content back."""

    path: Path
    kind: str  # manifest | problems | samples | verdicts | scores | accounting | conflict
    reason: str
    fix: str
    moved_to: Path | None = None  # where --repair put it (None: not moved)


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_run` found (and, with ``repair``, did)."""

    run: Path
    files: int  # files checked
    samples: int  # rows in readable sample shards
    damage: tuple[Damage, ...] = ()
    restored_manifest: bool = False
    next_steps: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No damage left (nothing found, or everything found was repaired)."""
        return all(d.moved_to is not None or (d.kind == "manifest" and self.restored_manifest)
                   for d in self.damage)  # fmt: skip


def _manifest_problem(path: Path) -> str | None:
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return _brief(e)
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        return "not a ttscale run manifest"
    return None


def _parquet_problem(path: Path, schema: pa.Schema) -> tuple[str | None, pa.Table | None]:
    try:
        t = pq.read_table(path, schema=schema)
    except (pa.ArrowException, OSError, ValueError) as e:
        return _brief(e, path), None
    for key in [n for n in ("problem_id", "index", "id") if n in schema.names]:
        if t.column(key).null_count:
            return f"null values in key column {key!r}", None
    return None, t


def _aside(run: Path, path: Path) -> Path:
    """Move ``path`` to ``RUN/damaged/<its path in the run>`` (a free name; never overwrites)."""
    rel = path.relative_to(run)
    dest = run / DAMAGED_DIR / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    k = 1
    while dest.exists():
        dest = run / DAMAGED_DIR / rel.with_name(f"{rel.name}.{k}")
        k += 1
    os.replace(path, dest)
    return dest


def check_run(run: str | os.PathLike[str], *, repair: bool = False) -> CheckReport:
    """Read every file of run directory ``run``; report (and with ``repair`` move aside) damage."""
    run = Path(run)
    if not run.is_dir():
        raise StoreError(f"{run} is not a directory; give a ttscale run directory")
    manifest, backup = run / "manifest.json", run / MANIFEST_BACKUP
    if not manifest.exists() and not backup.exists() and not (run / "samples").is_dir():
        raise StoreError(f"{run} is not a ttscale run directory (no manifest.json, no samples/)")
    damage: list[Damage] = []
    files = 0
    restored = False
    steps: list[str] = []

    def found(path: Path, kind: str, reason: str, fix: str, *, movable: bool = True) -> None:
        fix = fix.replace("RUN", str(run))
        moved = _aside(run, path) if repair and movable and path.exists() else None
        damage.append(Damage(path, kind, reason, fix, moved))
        log.info("%s: %s", path, reason)

    # manifest
    files += 1
    why = _manifest_problem(manifest)
    if why is not None:
        good_backup = _manifest_problem(backup) is None
        fix = (
            "--repair restores it from manifest.backup.json (the last good copy)"
            if good_backup
            else "no good backup; copy manifest.json from another worker's run or re-import"
        )
        if repair and good_backup:
            if manifest.exists():
                found(manifest, "manifest", why, fix)
            else:
                damage.append(Damage(manifest, "manifest", why, fix))
            shutil.copyfile(backup, manifest)
            restored = True
        else:
            damage.append(Damage(manifest, "manifest", why, fix))

    # problems
    problems = run / "problems.parquet"
    if problems.exists():
        files += 1
        why, _ = _parquet_problem(problems, PROBLEM_SCHEMA)
        if why is not None:
            found(problems, "problems", why, "`ttscale sample --out RUN --resume` records them again")
            steps.append(f"ttscale sample --out {run} --resume")

    # samples, with conflicts between readable shards
    samples = 0
    owner: dict[tuple[str, int], tuple[str, str]] = {}
    for f in sorted((run / "samples").glob("part-*.parquet")):
        files += 1
        why, t = _parquet_problem(f, SAMPLE_SCHEMA)
        if why is not None or t is None:
            found(f, "samples", why or "unreadable",
                  "`ttscale sample --out RUN --resume` regenerates its samples")  # fmt: skip
            steps.append(f"ttscale sample --out {run} --resume")
            continue
        samples += t.num_rows
        for pid, i, h in zip(t.column("problem_id").to_pylist(), t.column("index").to_pylist(),
                             t.column("content_hash").to_pylist(), strict=True):  # fmt: skip
            prev = owner.setdefault((pid, i), (h, f.name))
            if prev[0] != h:
                damage.append(Damage(
                    f, "conflict",
                    f"sample ({pid!r}, {i}) differs from the one in {prev[1]} (a shard of another "
                    "run?)",
                    "move the shard that does not belong to this run out of samples/ by hand",
                ))  # fmt: skip
                break

    # verdicts
    vdir = run / "verdicts"
    for f in sorted(vdir.glob("[!.]*/part-*.parquet")) if vdir.is_dir() else []:
        files += 1
        why, _ = _parquet_problem(f, VERDICT_SCHEMA)
        if why is not None:
            found(f, "verdicts", why,
                  f"`ttscale verify RUN` with verifier {f.parent.name} re-checks its samples")  # fmt: skip
            steps.append(f"ttscale verify {run}")

    # score sets (ttscale certainty): a lost shard is recomputed by the next pass
    sdir = run / "scores"
    for f in sorted(sdir.glob("[!.]*/part-*.parquet")) if sdir.is_dir() else []:
        files += 1
        why, _ = _parquet_problem(f, SCORE_SCHEMA)
        if why is not None:
            found(f, "scores", why,
                  f"`ttscale certainty RUN --name {f.parent.name}` scores its samples again")  # fmt: skip
            steps.append(f"ttscale certainty {run} --name {f.parent.name}")

    # per-session accounting
    adir = run / "accounting"
    for f in sorted(adir.glob("*.json")) if adir.is_dir() else []:
        files += 1
        try:
            ok = isinstance(json.loads(f.read_text()), dict)
            why = None if ok else "not a JSON object"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            why = _brief(e)
        if why is not None:
            found(f, "accounting", why, "one session's token accounting is lost (no samples are)")

    return CheckReport(
        run=run,
        files=files,
        samples=samples,
        damage=tuple(damage),
        restored_manifest=restored,
        next_steps=tuple(dict.fromkeys(steps)),
    )
