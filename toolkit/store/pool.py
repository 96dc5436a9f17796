"""Pool: the columnar (problems x samples) view of a run that every analysis reads.

Samples of all problems are concatenated into flat float64/int64 arrays of length ``N`` and cut
into problems by ``offsets`` (CSR layout: problem ``p`` owns rows ``offsets[p]:offsets[p+1]``), so
a ragged number of samples per problem costs nothing and loading 1,000 x 1,000 samples creates a
handful of arrays, not a million Python objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttscale.errors import ConfigError
from ttscale.select.answers import is_no_answer

__all__ = ["Pool", "ProblemView"]


@dataclass(frozen=True)
class ProblemView:
    """One problem's slice of a :class:`Pool` (arrays are views, not copies)."""

    problem_id: str
    answer: np.ndarray  # (n,) int64 answer codes into Pool.answer_values; -1 = no answer
    correct: np.ndarray  # (n,) float64: 1 correct, 0 wrong, NaN unknown
    logprob: np.ndarray  # (n,) float64 sum of token log-probs (NaN unknown)
    mean_logprob: np.ndarray  # (n,) float64 mean token log-prob (NaN unknown)
    num_tokens: np.ndarray  # (n,) int64 (-1 unknown)
    text_id: np.ndarray  # (n,) int64: equal ids <=> identical completion texts
    scores: Mapping[str, np.ndarray]  # name -> (n,) float64 (NaN unknown)

    @property
    def n(self) -> int:
        return int(self.answer.shape[0])


@dataclass(frozen=True)
class Pool:
    """Columnar samples of many problems (see module docstring for the layout)."""

    problem_ids: np.ndarray  # (P,) object array of str
    offsets: np.ndarray  # (P+1,) int64
    index: np.ndarray  # (N,) int64 sample index within its problem
    answer: np.ndarray  # (N,) int64 code into answer_values, -1 = no answer (None or blank)
    answer_values: np.ndarray  # (A,) object array of the distinct answer strings
    correct: np.ndarray  # (N,) float64 1/0/NaN
    logprob: np.ndarray  # (N,) float64
    mean_logprob: np.ndarray  # (N,) float64
    num_tokens: np.ndarray  # (N,) int64, -1 unknown
    text_id: np.ndarray  # (N,) int64
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    # problems the run records but holds no sample of (they count in accuracy denominators)
    unsampled: tuple[str, ...] = ()
    # samples per problem the run asked for (None: unknown, e.g. an imported file)
    requested_n: int | None = None
    # (N,) float64 natural-log particle weights of a weighted (SMC) run, else None
    log_weight: np.ndarray | None = None
    # False for a weighted, non-iid population (SMC particles): k-sample estimators refuse it
    iid: bool = True

    def __post_init__(self) -> None:
        n = self.index.shape[0]
        if self.offsets.shape[0] != self.problem_ids.shape[0] + 1:
            raise ConfigError("Pool.offsets must have one more entry than problem_ids")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != n:
            raise ConfigError("Pool.offsets must start at 0 and end at the number of samples")
        for name in ("answer", "correct", "logprob", "mean_logprob", "num_tokens", "text_id"):
            if getattr(self, name).shape[0] != n:
                raise ConfigError(f"Pool.{name} must have {n} entries")
        for k, v in self.scores.items():
            if v.shape[0] != n:
                raise ConfigError(f"Pool.scores[{k!r}] must have {n} entries")
        if self.log_weight is not None and self.log_weight.shape[0] != n:
            raise ConfigError(f"Pool.log_weight must have {n} entries")

    # construction ----------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        problem_ids: Sequence[str],
        n_per_problem: Sequence[int] | np.ndarray,
        *,
        answer: Sequence[Any] | np.ndarray | None = None,
        correct: Sequence[Any] | np.ndarray | None = None,
        logprob: Sequence[float] | np.ndarray | None = None,
        mean_logprob: Sequence[float] | np.ndarray | None = None,
        num_tokens: Sequence[int] | np.ndarray | None = None,
        text: Sequence[str] | np.ndarray | None = None,
        scores: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    ) -> Pool:
        """Build a pool from flat per-sample arrays (problem-major order).

        ``answer`` may hold strings (``None`` = no answer) or integer codes (``-1`` = none).
        ``correct`` may hold bools, 0/1 or ``None``/NaN for unknown.
        """
        counts = np.asarray(n_per_problem, dtype=np.int64)
        if counts.ndim != 1 or len(counts) != len(problem_ids) or (counts < 0).any():
            raise ConfigError("n_per_problem must give a non-negative count per problem")
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        n = int(offsets[-1])
        index = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], counts)

        def floats(x: Any, default: float = np.nan) -> np.ndarray:
            if x is None:
                return np.full(n, default, dtype=np.float64)
            a = np.array([np.nan if v is None else v for v in x] if not isinstance(x, np.ndarray) else x, dtype=np.float64)
            if a.shape != (n,):
                raise ConfigError(f"expected {n} per-sample values, got shape {a.shape}")
            return a

        if answer is None:
            codes, values = np.full(n, -1, dtype=np.int64), np.array([], dtype=object)
        else:
            arr = np.asarray(answer) if isinstance(answer, np.ndarray) else None
            if arr is not None and np.issubdtype(arr.dtype, np.integer):
                codes = arr.astype(np.int64)
                values = np.array([str(v) for v in range(int(codes.max(initial=-1)) + 1)], dtype=object)
            else:
                codes, values = _encode([None if a is None else str(a) for a in answer])
                codes = _drop_no_answers(codes, values)
            if codes.shape != (n,):
                raise ConfigError(f"expected {n} answers, got {codes.shape[0]}")
        if text is None:
            text_id = np.arange(n, dtype=np.int64)
        else:
            text_id, _ = _encode(list(text))
        return cls(
            problem_ids=np.array(list(problem_ids), dtype=object),
            offsets=offsets,
            index=index,
            answer=codes,
            answer_values=values,
            correct=floats(correct),
            logprob=floats(logprob),
            mean_logprob=floats(mean_logprob),
            num_tokens=(
                np.full(n, -1, dtype=np.int64)
                if num_tokens is None
                else np.asarray(num_tokens, dtype=np.int64)
            ),
            text_id=text_id,
            scores={k: floats(v) for k, v in (scores or {}).items()},
        )

    @classmethod
    def from_arrow(
        cls,
        table: pa.Table,
        *,
        answer: pa.ChunkedArray | None = None,
        correct: pa.ChunkedArray | None = None,
        extra_scores: Mapping[str, np.ndarray] | None = None,
        score_names: Sequence[str] | None = None,
        verifier: str | None = None,
        iid: bool = True,
    ) -> Pool:
        """Build from a sample table sorted by (problem_id, index) (what SampleStore.table gives).

        ``iid=False`` marks a weighted population (its ``log_weight`` column is kept)."""
        n = table.num_rows
        pid = table.column("problem_id")
        if n:
            runs = pc.run_end_encode(pid.combine_chunks())
            ends = runs.run_ends.to_numpy().astype(np.int64)
            problem_ids = np.array(runs.values.to_pylist(), dtype=object)
        else:
            ends = np.zeros(0, dtype=np.int64)
            problem_ids = np.array([], dtype=object)
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        ans = answer if answer is not None else table.column("answer")
        enc = pc.dictionary_encode(ans.combine_chunks() if isinstance(ans, pa.ChunkedArray) else ans)
        codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        values = np.array(enc.dictionary.to_pylist(), dtype=object)
        codes = _drop_no_answers(codes, values)
        corr = correct if correct is not None else table.column("correct")
        corr_np = pc.cast(corr, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)

        def col(name: str, dtype: Any, fill: Any) -> np.ndarray:
            if name not in table.column_names:
                return np.full(n, fill, dtype=dtype)
            c = table.column(name)
            return c.fill_null(fill).to_numpy(zero_copy_only=False).astype(dtype)

        if "text_hash" in table.column_names:
            tid = pc.dictionary_encode(table.column("text_hash").combine_chunks()).indices
            text_id = tid.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        elif "text" in table.column_names:
            tid = pc.dictionary_encode(table.column("text").combine_chunks()).indices
            text_id = tid.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            text_id = np.arange(n, dtype=np.int64)
        scores: dict[str, np.ndarray] = {}
        if "scores" in table.column_names and n:
            m = table.column("scores").combine_chunks()
            keys = pc.list_flatten(pc.map_keys(m)) if hasattr(pc, "map_keys") else m.keys
            names = sorted(set(keys.to_pylist())) if len(keys) else []
            if score_names is not None:
                names = [s for s in names if s in set(score_names)]
            for name in names:
                vals = pc.map_lookup(m, pa.scalar(name), "first")
                scores[name] = pc.cast(vals, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        for name, arr in (extra_scores or {}).items():
            if score_names is None or name in score_names:
                if np.isfinite(arr).any():
                    scores[name] = arr
        return cls(
            problem_ids=problem_ids,
            offsets=offsets,
            index=col("index", np.int64, -1),
            answer=codes,
            answer_values=values,
            correct=corr_np,
            logprob=col("logprob", np.float64, np.nan),
            mean_logprob=col("mean_logprob", np.float64, np.nan),
            num_tokens=col("num_tokens", np.int64, -1),
            text_id=text_id,
            scores=scores,
            meta={"verifier": verifier},
            log_weight=(
                col("log_weight", np.float64, -np.inf)
                if "log_weight" in table.column_names and not iid
                else None
            ),
            iid=bool(iid),
        )

    def with_run_info(
        self,
        *,
        verdicts: Mapping[str, Any] | None = None,
        unsampled: Sequence[str] = (),
        requested_n: int | None = None,
    ) -> Pool:
        """A copy that knows its run: the verdict set used, problems without samples, ``n`` asked."""
        import dataclasses

        meta = dict(self.meta)
        if verdicts is not None:
            meta["verdicts"] = dict(verdicts)
        missing = tuple(str(u) for u in unsampled)
        if requested_n is not None and (isinstance(requested_n, bool) or int(requested_n) < 1):
            raise ConfigError(f"requested_n must be an integer >= 1, got {requested_n!r}")
        return dataclasses.replace(
            self,
            meta=meta,
            unsampled=missing,
            requested_n=None if requested_n is None else int(requested_n),
        )

    def row_mask(self, keep: np.ndarray) -> np.ndarray:
        """(N,) bool: the sample rows of the problems where ``keep`` (shape (P,)) is true."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.num_problems,):
            raise ConfigError(f"keep must have one entry per problem ({self.num_problems})")
        return np.repeat(keep, self.n_per_problem)

    def select_problems(self, keep: np.ndarray) -> Pool:
        """The pool restricted to the problems where ``keep`` is true (order kept)."""
        import dataclasses

        keep = np.asarray(keep, dtype=bool)
        rows = self.row_mask(keep)
        counts = self.n_per_problem[keep]
        offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return dataclasses.replace(
            self,
            problem_ids=self.problem_ids[keep],
            offsets=offsets,
            index=self.index[rows],
            answer=self.answer[rows],
            correct=self.correct[rows],
            logprob=self.logprob[rows],
            mean_logprob=self.mean_logprob[rows],
            num_tokens=self.num_tokens[rows],
            text_id=self.text_id[rows],
            scores={k: v[rows] for k, v in self.scores.items()},
            unsampled=(),
            log_weight=None if self.log_weight is None else self.log_weight[rows],
        )

    def sample_shortfall(self) -> dict[str, Any]:
        """How many problems have fewer samples than requested, and how many have none.

        ``requested`` is :attr:`requested_n`, or the largest per-problem count when unknown.
        Returns ``{"requested", "problems" (all, unsampled included), "short" (0 < n <
        requested), "unsampled"}``.
        """
        n_p = self.n_per_problem
        req = self.requested_n if self.requested_n is not None else int(n_p.max(initial=0))
        return {
            "requested": req,
            "requested_known": self.requested_n is not None,
            "problems": self.num_problems + len(self.unsampled),
            "short": int(((n_p > 0) & (n_p < req)).sum()),
            "unsampled": len(self.unsampled) + int((n_p == 0).sum()),
        }

    # access ----------------------------------------------------------------------------------

    @property
    def num_problems(self) -> int:
        return int(self.problem_ids.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.index.shape[0])

    @property
    def n_per_problem(self) -> np.ndarray:
        """(P,) int64 number of samples per problem."""
        return np.diff(self.offsets)

    def correct_counts(self) -> np.ndarray:
        """(P,) int64 number of samples known correct per problem (unknown counts as wrong)."""
        c = np.nan_to_num(self.correct, nan=0.0) > 0.5
        cs = np.concatenate([[0], np.cumsum(c, dtype=np.int64)])
        return cs[self.offsets[1:]] - cs[self.offsets[:-1]]

    def has_correctness(self) -> bool:
        return bool(np.isfinite(self.correct).any())

    def problem(self, p: int) -> ProblemView:
        a, b = int(self.offsets[p]), int(self.offsets[p + 1])
        return ProblemView(
            problem_id=str(self.problem_ids[p]),
            answer=self.answer[a:b],
            correct=self.correct[a:b],
            logprob=self.logprob[a:b],
            mean_logprob=self.mean_logprob[a:b],
            num_tokens=self.num_tokens[a:b],
            text_id=self.text_id[a:b],
            scores={k: v[a:b] for k, v in self.scores.items()},
        )

    def __iter__(self):  # type: ignore[no-untyped-def]
        for p in range(self.num_problems):
            yield self.problem(p)

    def answer_string(self, code: int) -> str | None:
        return None if code < 0 else str(self.answer_values[code])


def _drop_no_answers(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Codes of answers that are no answer (blank strings, :func:`is_no_answer`) -> -1."""
    blank = np.fromiter((is_no_answer(v) for v in values), dtype=bool, count=len(values))
    if not blank.any():
        return codes
    return np.where((codes >= 0) & blank[np.maximum(codes, 0)], -1, codes)


def _encode(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Strings (None allowed) -> (int64 codes with -1 for None, distinct values)."""
    arr = pa.array(values, type=pa.string())
    enc = pc.dictionary_encode(arr)
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, np.array(enc.dictionary.to_pylist(), dtype=object)
