"""The sample -> verify -> curve pipeline of ``ttscale run`` and ``ttscale demo``, as functions.

Eval code runs the same steps as the CLI without it::

    from ttscale.pipeline import sample_verify_curve
    out = sample_verify_curve(engine, params, problems, "runs/x", verifier="arith")
    out.report.curves["coverage"].mean

:func:`verify_and_curve` does the second half on a run that is already sampled: verify with
:func:`ttscale.verifiers.verify_store`, make the verdict set the run's default, compute
coverage@k and majority@k (:func:`ttscale.analysis.compute_curves`), plot them and write
``curve.json`` into the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError
from ttscale.types import Problem, SamplingParams

__all__ = ["PipelineResult", "power_ks", "sample_verify_curve", "verify_and_curve"]


@dataclass(frozen=True)
class PipelineResult:
    """What :func:`verify_and_curve` made: the verification summary, the curves and files.

    ``verify``: :func:`~ttscale.verifiers.verify_store`'s summary; ``report``: the
    :class:`~ttscale.analysis.CurveReport` of coverage and majority; ``plot`` / ``curve_json``:
    the files written (``plot`` is ``None`` when no plot was asked for); ``sampling``: the
    sampler's :class:`~ttscale.samplers.SamplingSummary` when the pipeline also sampled.
    """

    store: Any
    verify: Mapping[str, Any]
    report: Any
    ks: tuple[int, ...]
    plot: Path | None
    curve_json: Path
    sampling: Any = None

    def table(self) -> dict[str, Any]:
        """Each method's mean per k (coverage and majority by default: what ``ttscale demo``
        summarises), with ``ks`` and ``plot``."""
        means = {name: [float(x) for x in c.mean] for name, c in self.report.curves.items()}
        return {
            "ks": list(self.ks),
            **means,
            "plot": str(self.plot) if self.plot is not None else None,
        }


def power_ks(n: int) -> list[int]:
    """``1, 2, 4, ...`` below ``n``, then ``n``."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def verify_and_curve(
    store: Any,
    verifier: str | Any | None = None,
    *,
    n: int | None = None,
    ks: Sequence[int] | None = None,
    plot: str | os.PathLike[str] | bool = True,
    label: str | None = None,
    isolation: str = "auto",
    on_model: Callable[[str], None] | None = None,
    methods: Sequence[str] | None = None,
) -> PipelineResult:
    """Verify a run, then coverage@k and majority@k (or ``methods``, names as for ``ttscale
    curve``) with bootstrap CIs, a plot and ``curve.json``.

    ``store``: a :class:`~ttscale.store.SampleStore` or run directory. ``verifier``: a spec or a
    verifier object (default: the run's benchmark's). ``n``: samples per problem the curves go
    up to (default: the run's ``sampling.n``); ``ks``: the k values (default
    :func:`power_ks`; values outside ``1..n`` are dropped). ``plot``: a path, ``True`` for
    ``RUN/coverage.png`` or ``False`` for none; its title starts with ``label`` (default: the
    run's benchmark). ``on_model`` receives the lines describing models the verifier loaded.
    """
    from ttscale.analysis import check_prerequisites, compute_curves, plot_curves, run_confidences
    from ttscale.store import SampleStore
    from ttscale.verifiers.runner import verify_store

    if not isinstance(store, SampleStore):
        store = SampleStore.open(store)
    if n is None:
        n = int((store.manifest.get("sampling") or {}).get("n") or 0)
        if n < 1:
            raise ConfigError(f"run {store.path} records no sampling.n; pass n=")
    # the set this run is scored with becomes its default: what later analyses use
    vsum = verify_store(
        store, verifier, isolation=isolation, on_model=on_model, set_default=True, set_default_by="run"
    )
    chosen = sorted({k for k in (ks or power_ks(n)) if 1 <= k <= n})
    names = tuple(methods or ("coverage", "majority"))
    pool = store.pool(vsum["verifier"])
    confs = run_confidences(store) if "deepconf" in names else None
    cert = None
    if any(m.startswith("self_certainty") for m in names):
        from ttscale.select.certainty import pool_certainties

        # exact where the run stores it, else the top-k approximation; the report says which
        cert = pool_certainties(store, pool)
    certainties = None if cert is None else cert.values
    check_prerequisites(pool, names, confidences=confs, certainties=certainties)
    report = compute_curves(
        pool, names, chosen, confidences=confs, certainties=certainties,
        certainty_source=None if cert is None else cert.to_dict(),
    )  # fmt: skip
    plot_path: Path | None = None
    if plot is not False:
        plot_path = store.path / "coverage.png" if plot is True else Path(plot)
        model = "/".join(Path(str(store.manifest.get("model", ""))).parts[-2:])
        label = label or store.manifest.get("benchmark") or "run"
        plot_curves(
            report, plot_path, title=f"{label}, {model}: {report.n_problems} problems x n={n}"
        )
    d = report.to_dict()
    d["run"] = str(store.path)
    # the verifier as it was asked for (``arith-prm:last``), not only its verdict-set name
    d["verifier"] = vsum.get("requested_spec") or vsum.get("spec") or vsum["verifier"]
    d["plot"] = str(plot_path) if plot_path is not None else None
    curve_json = store.path / "curve.json"
    curve_json.write_text(json.dumps(d, indent=2) + "\n")
    return PipelineResult(store, vsum, report, tuple(chosen), plot_path, curve_json)


def sample_verify_curve(
    engine: Any,
    params: SamplingParams,
    problems: Sequence[Problem],
    out: str | os.PathLike[str],
    *,
    verifier: str | Any | None = None,
    n: int | None = None,
    ks: Sequence[int] | None = None,
    plot: str | os.PathLike[str] | bool = True,
    manifest: Mapping[str, Any] | None = None,
    isolation: str = "auto",
    **sampler_options: Any,
) -> PipelineResult:
    """Sample ``n`` (default ``params.n``) answers per problem into run ``out``, then
    :func:`verify_and_curve`. Resumes ``out`` if it exists with the same settings.

    ``sampler_options`` go to :class:`~ttscale.samplers.RepeatedSampler` (``batch_size``,
    ``progress``, ``chat``, ...); ``manifest`` fields (model, benchmark, ...) are recorded.
    """
    from ttscale.samplers import RepeatedSampler
    from ttscale.store import SampleStore

    fields = dict(manifest or {})
    store = SampleStore.open_or_create(out, fields)
    n = params.n if n is None else n
    summary = RepeatedSampler(engine, params, store, manifest=fields, **sampler_options).run(
        problems, n=n
    )
    res = verify_and_curve(store, verifier, n=n, ks=ks, plot=plot, isolation=isolation)
    return PipelineResult(
        res.store, res.verify, res.report, res.ks, res.plot, res.curve_json, sampling=summary
    )
