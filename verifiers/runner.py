"""Verify a stored run from Python: :func:`verify_store` (what ``ttscale verify`` runs).

Eval code that sampled into a :class:`~ttscale.store.SampleStore` (or has a run directory)
checks it with one call; verdicts are stored as a verdict set of the run, resumably, exactly as
the CLI stores them::

    from ttscale.verifiers import verify_store
    summary = verify_store("runs/gsm8k", "math")   # or a verifier object
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError, StoreError
from ttscale.store import SampleStore
from ttscale.types import Sample

__all__ = [
    "VerifyInterrupted",
    "default_verifier_spec",
    "extractor_choice",
    "model_lines",
    "verify_store",
]

log = logging.getLogger(__name__)

# Columns a verifier may read; token-level arrays stay on disk (math/code need only text).
_SAMPLE_COLUMNS = ("text", "answer", "scores", "meta", "finish_reason", "num_tokens", "logprob",
                   "mean_logprob", "seed")  # fmt: skip


def _store_name(name: str) -> str:
    """A verifier name usable as a folder of the run (``rm:/a/b`` -> ``rm-_a_b``)."""
    s = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name.replace(":", "-")).lstrip(".")
    return s or "verifier"


def default_verifier_spec(benchmark: str | None) -> str:
    """The verifier a run's benchmark asks for (the registry's), ``math`` when unknown."""
    if benchmark:
        try:
            from ttscale.evals.registry import get_benchmark

            return get_benchmark(benchmark).verifier
        except Exception:  # an unregistered or custom benchmark: fall back to math
            pass
    return "math"


def model_lines(verifier: Any) -> list[str]:
    """One line per model a verifier loaded (judge engines, reward models; ensemble members)."""
    from ttscale.engines import describe_engine

    out: list[str] = []
    for member in getattr(verifier, "members", None) or [verifier]:
        engine = getattr(member, "engine", None)
        if engine is not None and callable(getattr(engine, "info", None)):
            note = f"judge of {getattr(member, 'name', 'judge')}"
            out.append(describe_engine(dict(engine.info()), model_note=note))
        elif getattr(member, "model_path", None) is not None:
            import transformers

            dtype = getattr(member, "dtype", "?")
            out.append(
                f"reward model: {member.model_path} (transformers {transformers.__version__}, "
                f"{getattr(member, 'device', '?')}, {dtype}), verifier {member.name}"
            )
    return out


class VerifyInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`verify_store`; the batches finished so far are stored.

    ``new``: verdicts written in this call; ``verified``: samples verified by ``verifier`` in
    all; ``command``: the ``ttscale verify`` line that continues.
    """

    def __init__(self, verifier: str, new: int, verified: int, command: str) -> None:
        super().__init__(f"interrupted after {new} new verdicts of {verifier}")
        self.verifier = verifier
        self.new = new
        self.verified = verified
        self.command = command


def verify_store(
    run: SampleStore | str | os.PathLike[str],
    spec: str | Any | None = None,
    *,
    workers: int = 1,
    timeout: float = 5.0,
    extractor: str | None = None,
    name: str | None = None,
    force: bool = False,
    batch: int = 4096,
    cache: str | os.PathLike[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
    isolation: str = "auto",
    shard: tuple[int, int] | None = None,
    on_model: Callable[[str], None] | None = None,
    set_default: bool = False,
    set_default_by: str = "--set-default",
) -> dict[str, Any]:
    """Verify every not-yet-verified sample of a stored run; store the verdicts; return a summary.

    ``run``: a run directory or an open :class:`~ttscale.store.SampleStore`. ``spec``: a
    verifier spec (``math``, ``code``, ``rm:PATH``, ...; see :mod:`ttscale.verifiers.base`;
    default: the one the run's benchmark names, else ``math``) or a verifier object (used as is
    and not closed; its ``name`` attribute, else its class name, names the verdict set).

    Resumable and idempotent: keys already verified by this verifier name are skipped (unless
    ``force``), and verdicts are written one shard per ``batch`` samples, so an interrupted call
    keeps its finished batches (:class:`VerifyInterrupted` says how many). ``shard=(i, N)``
    verifies only the problems at positions ``i, i + N, ...`` of the run's sorted problem ids,
    so N workers can verify one run together. ``on_batch(written)`` follows progress;
    ``on_model(line)`` receives one line per model the verifier loaded (judges, reward models).

    The run's default verdict set (the one analyses use, :meth:`SampleStore.choose_verdicts`):
    ``set_default`` makes this set the default once it is verified (``set_default_by`` is
    recorded as who set it); otherwise the first set verified on a run becomes its default and
    a recorded default is never changed (:meth:`SampleStore.settle_default_verdicts`).

    The summary: ``verifier`` (verdict-set name), ``spec``, ``fingerprint``, ``new``,
    ``skipped``, ``verified``, ``by_status``, ``accuracy`` (``None`` for score-only verifiers),
    ``default`` (the run's default set afterwards: ``name``, ``previous``, ``changed``, ``set_by``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from ttscale.paths import check_writable_dir
    from ttscale.verifiers.base import close_verifier, make_verifier, split_spec, verify_many

    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    store = run if isinstance(run, SampleStore) else SampleStore.open(run)
    run_path = store.path if isinstance(run, SampleStore) else Path(run)
    check_writable_dir(store.path, "run directory")  # before building the verifier (models...)
    problems = {p.id: p for p in store.problems()}
    if not problems:
        raise StoreError(
            f"run {run_path} records no problems (problems.parquet), so there are no references "
            "to check against; re-import the samples with their problems"
        )
    owned = not (spec is not None and not isinstance(spec, str))
    chose: str | None = None
    if owned:
        if spec is None:
            spec = default_verifier_spec(store.manifest.get("benchmark"))
        assert isinstance(spec, str)
        head, arg = split_spec(spec)
        kw: dict[str, Any] = {"workers": workers, "timeout": timeout}
        if head == "math" and not arg:
            from ttscale.verifiers.math import default_extractor

            kw["extractor"] = extractor or default_extractor(store.manifest.get("benchmark"))
            if extractor is None:  # chosen for the user: say so, and how to choose otherwise
                chose = extractor_choice(kw["extractor"], store.manifest.get("benchmark"))
                log.info("%s", chose)
        elif extractor is not None:
            if head != "math":
                raise ConfigError("--extractor applies to the math verifier only")
            raise ConfigError(
                f"give the extractor once: --verifier {spec} or --extractor {extractor}"
            )
        if cache is not None:
            kw["cache_path"] = Path(cache)
        kw["isolation"] = isolation  # code sandbox; verifiers that run no code ignore it
        verifier = make_verifier(spec, **kw)
    else:
        verifier = spec
        head = str(getattr(verifier, "name", None) or type(verifier).__name__)
        spec = head
    for line in model_lines(verifier):
        if on_model is not None:
            on_model(line)
        else:
            log.info("%s", line)
    try:
        vname = _store_name(name or getattr(verifier, "name", None) or head)
        info0 = dict(verifier.info()) if callable(getattr(verifier, "info", None)) else {}
        # verdicts are keyed by the full configuration: a set made by another one is refused
        # (or moved aside with force) before anything is computed
        claim = store.claim_verdicts(vname, spec=spec, info=info0, replace=force)
        record = store.verdict_record(vname) or {}
        fingerprint = record.get("fingerprint")
        done = set() if force else store.verified_keys(vname)
        t = store.table(list(_SAMPLE_COLUMNS))
        todo_mask = [
            (p, i) not in done
            for p, i in zip(
                t.column("problem_id").to_pylist(), t.column("index").to_pylist(), strict=True
            )
        ]
        t = t.filter(pa.array(todo_mask, type=pa.bool_()))
        missing = sorted(set(pc.unique(t.column("problem_id")).to_pylist()) - set(problems))
        if missing:
            log.warning(
                "%d problem(s) of %s are not recorded in problems.parquet and are skipped: %s",
                len(missing), run_path, ", ".join(missing[:5]),
            )  # fmt: skip
        groups: dict[str, list[Sample]] = {}
        for row in t.to_pylist():
            pid = row["problem_id"]
            if pid not in problems:
                continue
            groups.setdefault(pid, []).append(
                Sample(
                    problem_id=pid,
                    index=int(row["index"]),
                    text=row["text"] or "",
                    answer=row["answer"],
                    scores=dict(row["scores"]) if row["scores"] else {},
                    meta=json.loads(row["meta"]) if row["meta"] else {},
                    finish_reason=row["finish_reason"],
                    num_tokens=row["num_tokens"],
                    logprob=row["logprob"],
                    mean_logprob=row["mean_logprob"],
                    seed=row["seed"],
                )
            )
        written = 0
        items: list[tuple[Any, list[Sample]]] = []
        size = 0

        def flush() -> None:
            nonlocal written, items, size
            if not items:
                return
            verdicts = [v for vs in verify_many(verifier, items) for v in vs]
            written += store.add_verdicts(verdicts, verifier=vname, fingerprint=fingerprint)
            if on_batch is not None:
                on_batch(written)
            items, size = [], 0

        order = sorted(problems)
        if shard is not None:
            mine = set(order[shard[0] :: shard[1]])
            groups = {pid: g for pid, g in groups.items() if pid in mine}
        try:
            for pid in sorted(groups):
                items.append((problems[pid], groups[pid]))
                size += len(groups[pid])
                if size >= batch:
                    flush()
            flush()
        except KeyboardInterrupt:
            if written:  # the first set verified on a run is its default, even cut short
                store.settle_default_verdicts(vname)
            args = f" --name {name}" if name else ""
            args += f" --shard {shard[0]}/{shard[1]}" if shard else ""
            args += " --set-default" if set_default else ""
            raise VerifyInterrupted(
                vname, written, len(done) + written, f"ttscale verify {run_path} --verifier {spec}{args}"
            ) from None
        info = dict(verifier.info()) if callable(getattr(verifier, "info", None)) else {}
        store.update_verdict_record(vname, info)
        if set_default and store.verified_keys(vname):
            default = store.set_default_verdicts(vname, by=set_default_by)
        else:
            default = store.settle_default_verdicts(vname)
    finally:
        if owned:
            close_verifier(verifier)
    vt = store.verdict_table(vname)
    statuses = vt.column("status").to_pylist()
    by_status: dict[str, int] = {}
    for s in statuses:
        by_status[s] = by_status.get(s, 0) + 1
    correct = vt.column("correct").to_pylist()
    n_correct = sum(1 for c in correct if c is True)
    return {
        "run": str(run_path),
        "verifier": vname,
        "spec": record.get("spec"),
        "requested_spec": spec,
        "fingerprint": fingerprint,
        "verdict_set": claim,
        "new": written,
        "skipped": len(done),
        "unrecorded_problems": len(missing),
        "verified": len(statuses),
        "by_status": by_status,
        # accuracy only for verifiers that judge correctness (not for score-only ones)
        "accuracy": (n_correct / len(correct)) if any(c is not None for c in correct) else None,
        "default": default,
        # the extractor chosen for a bare `math` (from the benchmark), in one line; else None
        "chose": chose,
    }


def extractor_choice(chosen: str, benchmark: str | None) -> str:
    """One line: the extractor a bare ``math`` verifier got from the run's benchmark, and the
    exact spec that asks for the other choice."""
    from ttscale.verifiers.math import EXTRACTORS

    if chosen == "arith":
        return (
            f"verifier math with the arith extractor (the default for benchmark {benchmark}); "
            "--verifier math:auto for math's general extractor (\\boxed{}, ####, Minerva, "
            "'The answer is')"
        )
    first, *rest = [f"math:{e}" for e in EXTRACTORS if e != chosen]
    return (
        f"verifier math with the {chosen} extractor (the default for benchmark "
        f"{benchmark or 'unknown'}); another extractor: --verifier {first} (or {', '.join(rest)})"
    )
