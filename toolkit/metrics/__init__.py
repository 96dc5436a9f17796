"""Metrics over stored pools: pass@k and coverage, selection@k estimators, statistics, scaling laws.

- ``at_k``: unbiased pass@k, coverage curves and selection@k (any selection rule's expected
  accuracy over random size-``k`` subsets, by closed form, exact enumeration or Monte Carlo);
- ``stats``: bootstrap confidence intervals, paired differences, calibration (ECE);
- ``scaling``: power-law fits of coverage against ``k`` and the imperfect-verifier models.

The names of ``at_k`` are re-exported here (``ttscale.metrics.pass_at_k``); ``stats`` and
``scaling`` are imported explicitly (``from ttscale.metrics import scaling``), so
``import ttscale.metrics`` does not load SciPy.
"""

from ttscale.metrics.at_k import (
    CoverageCurve,
    SelectionResult,
    Selector,
    counts_from_correct,
    coverage_curve,
    pass_at_k,
    selection_at_k,
)

__all__ = [
    "CoverageCurve",
    "SelectionResult",
    "Selector",
    "counts_from_correct",
    "coverage_curve",
    "pass_at_k",
    "selection_at_k",
]
