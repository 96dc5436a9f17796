"""Verifier ensembles: z-scored member scores combined per candidate, run cheap-first (ALGORITHMS 8).

Each member ``m`` scores the candidates ``j`` of a problem, giving ``R[m, j]`` (a member verdict
without a score, e.g. an ERROR, is NaN). Scores are z-normalised per member,
``Z[m, j] = (R[m, j] - mu_m) / sigma_m`` (population std; ``mu_m, sigma_m`` from
``reference_scores`` when given, else from that member's scores on this problem's candidates;
``sigma_m = 0`` only centres), then aggregated per candidate with ``mean``, ``median``, ``min``,
``mean - lam * std`` or ``mean - lam * var`` (``ttscale.select.ensemble``). A candidate's NaN members are
left out of its aggregate; all NaN gives a NaN score and an ERROR verdict.

Cost-aware cascade. Members run in order of their ``cost`` attribute (default 1.0; cheapest first,
stable). Consecutive members of equal cost form a *level*. With ``margin`` set, after every level
but the last the candidates are grouped into answer clusters (same ``answer``; a candidate with no
answer, ``None`` or blank as everywhere, is a cluster of its own) and, using the aggregate over the members run so far,

    best(c) = max_{j in c} A_partial(j),   top = max_c best(c),
    c stays in contention  <=>  best(c) >= top - margin.

Later (more expensive) levels score only candidates of clusters in contention. A candidate dropped
this way gets score ``-inf`` (it lost to the cheap members by more than ``margin``), status SCORED,
``meta["pruned_after"]`` (the level) and ``meta["partial_score"]``. ``margin=None`` (default) runs
every member on every candidate. ``margin`` is in aggregate units (z-units when normalising). When
normalising without ``reference_scores``, a later member's z-scores are computed over the
candidates it scored, so supply reference scores to keep scales fixed across problems.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ttscale.errors import ConfigError, VerifierError
from ttscale.select.answers import is_no_answer
from ttscale.select.ensemble import ENSEMBLE_METHODS, aggregate_ensemble, znormalize
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.validation import check_choice, check_number

__all__ = ["EnsembleVerifier"]

logger = logging.getLogger(__name__)

_NORMALIZE = ("zscore", None)
_ORDERS = ("cost", "given")


def _cost(member: Any) -> float:
    c = getattr(member, "cost", 1.0)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ConfigError(f"verifier {getattr(member, 'name', member)!r} has an invalid cost {c!r}")
    return float(c)


def _unique_names(names: Sequence[str]) -> list[str]:
    """Names as given, a repeat getting the first free ``name#2``, ``name#3``, ..."""
    used: set[str] = set()
    out = []
    for nm in names:
        cand, k = nm, 1
        while cand in used:
            k += 1
            cand = f"{nm}#{k}"
        used.add(cand)
        out.append(cand)
    return out


class _Problem:
    """Per-problem working state of one ensemble call."""

    def __init__(self, n: int, members: int, answers: list[str | None]) -> None:
        self.n = n
        self.raw = np.full((members, n), np.nan, dtype=np.float64)  # member x candidate scores
        self.answers = answers
        self.active = np.ones(n, dtype=bool)  # still in contention
        self.pruned_after: dict[int, tuple[int, float]] = {}  # index -> (level, partial score)


class EnsembleVerifier:
    """Combine several verifiers' scores into one (a :class:`~ttscale.verifiers.base.Verifier`).

    ``reference_scores``: per member (a mapping by member name, or a sequence aligned with
    ``members`` as given), the scores it gave on a calibration set; their mean and population std
    z-normalise that member. Verdicts carry the ensemble score, the candidate's answer, and in
    ``meta`` the members' raw scores (``members``) and z-scores (``z``) by name.
    """

    def __init__(
        self,
        members: Sequence[Any],
        *,
        aggregation: str = "mean",
        lam: float = 1.0,
        normalize: str | None = "zscore",
        reference_scores: Mapping[str, Sequence[float]] | Sequence[Sequence[float]] | None = None,
        order: str = "cost",
        margin: float | None = None,
        name: str = "ensemble",
    ) -> None:
        members = list(members)
        if not members:
            raise ConfigError("an ensemble needs at least one member verifier")
        for m in members:
            if not callable(getattr(m, "verify", None)) or not isinstance(
                getattr(m, "name", None), str
            ):
                raise ConfigError(
                    f"ensemble member {m!r} is not a verifier (needs name and verify())"
                )
        names = _unique_names([m.name for m in members])
        check_choice("aggregation", aggregation, ENSEMBLE_METHODS)
        check_number("lam", lam, low=0.0, finite=True)
        check_choice("normalize", normalize, _NORMALIZE)
        check_choice("order", order, _ORDERS)
        check_number("margin", margin, low=0.0, allow_none=True)
        if reference_scores is not None and normalize is None:
            raise ConfigError(
                "reference_scores are used for z-normalisation; set normalize='zscore'"
            )
        costs = [_cost(m) for m in members]
        run = (
            sorted(range(len(members)), key=lambda i: costs[i])
            if order == "cost"
            else list(range(len(members)))
        )
        #: Members in the order they run, and their names in the ensemble (unique: a repeated
        #: name gets ``#2``, ``#3``, ... in the order given).
        self.members = [members[i] for i in run]
        self.member_names = [names[i] for i in run]
        self.costs = [costs[i] for i in run]
        self.aggregation = aggregation
        self.lam = float(lam)
        self.normalize = normalize
        self.order = order
        self.margin = None if margin is None else float(margin)
        self.name = name
        #: Declared cost of the whole ensemble (for nesting ensembles): the members' total.
        self.cost = float(sum(costs))
        self._reference = self._reference_matrix(reference_scores, names, run)
        # Level boundaries: runs of equal cost in the running order.
        self._levels: list[list[int]] = []
        for k, c in enumerate(self.costs):
            if self._levels and self.costs[self._levels[-1][0]] == c:
                self._levels[-1].append(k)
            else:
                self._levels.append([k])
        #: How many candidates each member (by name) was asked to score, over the verifier's life.
        self.scored_counts: dict[str, int] = {nm: 0 for nm in self.member_names}
        self.pruned_count = 0

    @staticmethod
    def _reference_matrix(
        reference: Mapping[str, Sequence[float]] | Sequence[Sequence[float]] | None,
        names: Sequence[str],
        run: Sequence[int],
    ) -> np.ndarray | None:
        if reference is None:
            return None
        if isinstance(reference, Mapping):
            missing = [nm for nm in names if nm not in reference]
            if missing:
                raise ConfigError(f"reference_scores has no scores for members {missing}")
            rows = [list(reference[names[i]]) for i in run]
        else:
            given = list(reference)
            if len(given) != len(names):
                raise ConfigError(
                    f"reference_scores has {len(given)} rows for {len(names)} members; one per member"
                )
            rows = [list(given[i]) for i in run]
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), np.nan, dtype=np.float64)
        for k, r in enumerate(rows):
            if not r:
                raise ConfigError(f"reference_scores for member {names[run[k]]!r} is empty")
            out[k, : len(r)] = np.asarray(r, dtype=np.float64)
        return out

    # ------------------------------------------------------------------ maths

    def _normalised(self, raw: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """``raw`` (len(rows) x candidates) on a common scale (z-scores or as is)."""
        if self.normalize is None:
            return raw
        ref = None if self._reference is None else self._reference[list(rows)]
        with warnings.catch_warnings():
            # A member that scored nothing here is an all-NaN row: "mean of empty slice".
            warnings.simplefilter("ignore", RuntimeWarning)
            return znormalize(raw, ref)

    def _combine(self, z: np.ndarray) -> np.ndarray:
        """Aggregate each column over its non-NaN rows; an all-NaN column gives NaN."""
        out = np.full(z.shape[1], np.nan, dtype=np.float64)
        if z.shape[1] == 0:
            return out
        complete = ~np.isnan(z).any(axis=0)
        if complete.any():
            out[complete] = aggregate_ensemble(z[:, complete], self.aggregation, lam=self.lam)  # type: ignore[arg-type]
        for j in np.flatnonzero(~complete):
            col = z[~np.isnan(z[:, j]), j]
            if col.size:
                out[j] = aggregate_ensemble(col[:, None], self.aggregation, lam=self.lam)[0]  # type: ignore[arg-type]
        return out

    # ------------------------------------------------------------------ verification

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in order (status SCORED, or ERROR when no member scored it)."""
        return self.verify_many([(problem, samples)])[0]

    def verify_many(self, items: Sequence[tuple[Problem, Sequence[Sample]]]) -> list[list[Verdict]]:
        """:meth:`verify` for several problems: each member is called once per level, with the
        candidates still in contention of every problem (its ``verify_many`` when it has one)."""
        from ttscale.verifiers.base import verify_many

        M = len(self.members)
        states = [_Problem(len(samples), M, [s.answer for s in samples]) for _, samples in items]
        done: list[int] = []
        for level_no, level in enumerate(self._levels):
            idxs = [np.flatnonzero(st.active) for st in states]
            batch = [
                (problem, [samples[i] for i in idx])
                for (problem, samples), idx in zip(items, idxs, strict=True)
            ]
            for k in level:
                member = self.members[k]
                results = verify_many(member, batch)
                for (_, subset), verdicts, idx, st in zip(
                    batch, results, idxs, states, strict=True
                ):
                    if len(verdicts) != len(subset):
                        raise VerifierError(
                            f"ensemble member {member.name!r} returned {len(verdicts)} verdicts "
                            f"for {len(subset)} samples"
                        )
                    self.scored_counts[self.member_names[k]] += len(subset)
                    for i, v in zip(idx, verdicts, strict=True):
                        st.raw[k, i] = np.nan if v.score is None else float(v.score)
                        if st.answers[i] is None and v.answer is not None:
                            st.answers[i] = v.answer
                done.append(k)
            if self.margin is not None and level_no < len(self._levels) - 1:
                for st, idx in zip(states, idxs, strict=True):
                    if not idx.size:
                        continue
                    partial = np.full(st.n, np.nan)
                    partial[idx] = self._combine(
                        self._normalised(st.raw[np.ix_(np.asarray(done, dtype=np.intp), idx)], done)
                    )
                    for i in self._out_of_contention(idx, partial, st.answers):
                        st.active[i] = False
                        st.pruned_after[i] = (level_no, float(partial[i]))
        return [
            self._finish(problem, samples, st)
            for (problem, samples), st in zip(items, states, strict=True)
        ]

    def _finish(self, problem: Problem, samples: Sequence[Sample], st: _Problem) -> list[Verdict]:
        M = len(self.members)
        final = np.full(st.n, np.nan)
        idx = np.flatnonzero(st.active)
        z = np.full((M, st.n), np.nan)
        if idx.size:
            z[:, idx] = self._normalised(st.raw[:, idx], list(range(M)))
            final[idx] = self._combine(z[:, idx])
        self.pruned_count += len(st.pruned_after)
        return [
            self._verdict(
                problem, s, st.answers[j], st.raw[:, j], z[:, j], final[j], st.pruned_after.get(j)
            )
            for j, s in enumerate(samples)
        ]

    def _out_of_contention(
        self, idx: np.ndarray, partial: np.ndarray, answers: Sequence[str | None]
    ) -> list[int]:
        """Candidates in ``idx`` whose cluster's best partial score is below ``top - margin``."""
        clusters: dict[Any, list[int]] = {}
        for i in idx:
            key = ("alone", int(i)) if is_no_answer(answers[i]) else ("answer", answers[i])
            clusters.setdefault(key, []).append(int(i))
        best = {}
        for key, members in clusters.items():
            vals = partial[members]
            best[key] = float(np.nanmax(vals)) if not np.isnan(vals).all() else -math.inf
        top = max(best.values())
        if not math.isfinite(top):
            return []  # nothing scored yet: keep everyone
        assert self.margin is not None
        return [i for key, ms in clusters.items() if best[key] < top - self.margin for i in ms]

    def _verdict(
        self,
        problem: Problem,
        sample: Sample,
        answer: str | None,
        raw: np.ndarray,
        z: np.ndarray,
        score: float,
        pruned: tuple[int, float] | None,
    ) -> Verdict:
        names = self.member_names
        meta: dict[str, Any] = {
            "members": {
                nm: (None if np.isnan(x) else float(x)) for nm, x in zip(names, raw, strict=True)
            },
            "z": {nm: (None if np.isnan(x) else float(x)) for nm, x in zip(names, z, strict=True)},
        }
        base = dict(problem_id=problem.id, index=sample.index, verifier=self.name, answer=answer)
        if pruned is not None:
            level, partial = pruned
            meta.update(pruned_after=level, partial_score=partial)
            return Verdict(
                status=VerdictStatus.SCORED,
                score=-math.inf,
                detail=(
                    f"out of contention after level {level} (cluster best {partial:.4g} "
                    f"< top - margin); expensive members skipped"
                ),
                meta=meta,
                **base,
            )
        if np.isnan(score):
            return Verdict(
                status=VerdictStatus.ERROR,
                score=math.nan,
                detail="no ensemble member produced a score for this candidate",
                meta=meta,
                **base,
            )
        return Verdict(status=VerdictStatus.SCORED, score=float(score), meta=meta, **base)

    def info(self) -> dict[str, Any]:
        """Provenance: members (in running order) with their info, the rule, and call counts."""
        members = []
        for m, nm, c in zip(self.members, self.member_names, self.costs, strict=True):
            try:
                mi = dict(m.info()) if callable(getattr(m, "info", None)) else {}
            except Exception as e:  # provenance must not break a run
                mi = {"error": str(e)}
            members.append({"name": nm, "cost": c, "info": mi})
        return {
            "verifier": "ensemble",
            "name": self.name,
            "members": members,
            "aggregation": self.aggregation,
            "lam": self.lam,
            "normalize": self.normalize,
            "reference_scores": self._reference is not None,
            "order": self.order,
            "margin": self.margin,
            "levels": [[self.member_names[k] for k in lv] for lv in self._levels],
            "scored_counts": dict(self.scored_counts),
            "pruned_count": self.pruned_count,
            "cost": self.cost,
        }

    def close(self) -> None:
        for m in self.members:
            close = getattr(m, "close", None)
            if callable(close):
                close()
