"""MathVerifier: extract the final answer, canonicalise it, and check it against the reference.

For GSM8K, MATH/MATH-500, AIME and the bundled ``arith`` benchmark. Per sample:

1. extract the raw answer with the chosen extractor (``None`` -> verdict ``INVALID``);
2. map it to its canonical voting key (:meth:`MathChecker.canonical`), stored as the
   verdict's ``answer``;
3. compare with the problem's reference: equal keys pass at once, otherwise math-verify
   decides in a worker process (``PASS``/``FAIL``; ``TIMEOUT`` when the check ran out of time).

``verify_many`` batches all problems: answers and (gold, candidate) pairs are deduplicated
before anything is parsed, and checks run in parallel worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError
from ttscale.types import Problem, Sample, Verdict, VerdictStatus
from ttscale.verifiers.extract import (
    answer_is,
    final_hash_integer,
    gsm8k_flexible,
    gsm8k_strict,
    last_boxed,
    last_number,
    minerva_answer,
    normalize_final_answer,
)
from ttscale.verifiers.mathcheck import MathChecker

__all__ = ["EXTRACTORS", "MathVerifier", "default_extractor", "extract_answer", "gold_answer"]

log = logging.getLogger(__name__)

EXTRACTORS = ("auto", "boxed", "gsm8k", "minerva", "last_number", "arith")


def _minerva_normalised(text: str) -> str | None:
    a = minerva_answer(text)
    if a is None:
        return None
    return normalize_final_answer(a) or None


# Each extractor is an ordered list of (rule name, function); the first rule that finds an
# answer wins and its name is recorded in the verdict's meta.
_RULES: dict[str, tuple[tuple[str, Callable[[str], str | None]], ...]] = {
    "boxed": (("boxed", last_boxed),),
    "gsm8k": (
        ("gsm8k_strict", gsm8k_strict),
        ("answer_is", answer_is),
        ("boxed", last_boxed),
        ("gsm8k_flexible", gsm8k_flexible),
    ),
    "minerva": (("minerva", _minerva_normalised), ("boxed", last_boxed)),
    "last_number": (("last_number", last_number),),
    "arith": (("arith", final_hash_integer),),
    "auto": (
        ("boxed", last_boxed),
        ("minerva", _minerva_normalised),
        ("gsm8k_strict", gsm8k_strict),
        ("answer_is", answer_is),
        ("last_number", last_number),
    ),
}


def extract_answer(text: str | None, extractor: str = "auto") -> tuple[str | None, str | None]:
    """``(raw answer, rule)`` for ``text``; ``(None, None)`` when no rule finds an answer.

    Extractors: ``boxed`` (last ``\\boxed{}``); ``gsm8k`` (``#### x``, then "The answer is x",
    then ``\\boxed``, then the last number); ``minerva`` ("Final Answer: The final answer is x",
    Minerva-normalised, then ``\\boxed``); ``last_number``; ``arith`` (the last ``#### x``
    line); ``auto`` (``\\boxed``, Minerva, ``####``, "The answer is", last number). An empty
    extraction (``\\boxed{}``) counts as no answer.
    """
    if extractor not in _RULES:
        raise ConfigError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
    if not text:
        return None, None
    for rule, fn in _RULES[extractor]:
        a = fn(text)
        if a is not None and a.strip():
            return a.strip(), rule
    return None, None


def gold_answer(reference: Any) -> str | None:
    """The gold answer string from a problem's ``reference``.

    A number is printed; a mapping contributes its ``"answer"`` entry; a string holding a
    worked solution is reduced to its ``#### x`` answer (GSM8K) or its last ``\\boxed{}``
    (MATH); any other string is used as it is.
    """
    if reference is None or isinstance(reference, bool):
        return None
    if isinstance(reference, (int, float)):
        return str(reference)
    if isinstance(reference, Mapping):
        for key in ("answer", "final_answer", "target"):
            if key in reference:
                return gold_answer(reference[key])
        return None
    if isinstance(reference, (list, tuple)) and len(reference) == 1:
        return gold_answer(reference[0])
    if not isinstance(reference, str):
        return None
    s = reference.strip()
    if "####" in s:
        a = final_hash_integer(s) or gsm8k_strict(s)
        if a is not None:
            return a
    if "\\boxed" in s or "\\fbox" in s:
        a = last_boxed(s)
        if a:
            return a
    return s or None


def default_extractor(benchmark: str | None) -> str:
    """The extractor that suits a benchmark name: ``arith`` for the bundled task, else ``auto``.

    ttscale's GSM8K/MATH/AIME prompts ask for ``\\boxed{}``, and ``auto`` also reads
    ``#### x``, Minerva and "The answer is" outputs of few-shot prompts.
    """
    return "arith" if (benchmark or "").lower().startswith("arith") else "auto"


class MathVerifier:
    """Final-answer checking for math benchmarks (a :class:`~ttscale.verifiers.base.Verifier`).

    ``extractor``: see :func:`extract_answer`. ``workers``: math-verify worker processes;
    ``timeout``: wall-clock seconds per equivalence check (a check past it is ``TIMEOUT``, and
    its worker is killed and replaced). ``cache_size``/``cache_path``: result cache (memory /
    SQLite file). ``float_rounding``, ``numeric_precision``, ``strict``: math-verify settings.

    Verdicts: ``PASS`` (score 1) / ``FAIL`` (score 0) with the canonical answer; ``INVALID``
    (no answer extracted; answer ``None``, score 0, ``correct=False``); ``TIMEOUT`` /
    ``ERROR`` (the check did not finish; ``correct=False``, no score). A problem without a
    reference gets ``ERROR`` verdicts that still carry the extracted answer, for voting.
    ``meta`` holds the raw extraction (``raw``) and the rule that found it (``rule``).
    """

    cost = 0.1  # cheap next to reward models and judges (EnsembleVerifier orders by cost)

    def __init__(
        self,
        extractor: str = "auto",
        *,
        workers: int = 1,
        timeout: float = 5.0,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        cache_size: int = 100_000,
        cache_path: str | Path | None = None,
        memory_mb: int | None = 4096,
        name: str | None = None,
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ConfigError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
        self.extractor = extractor
        self.name = name or ("arith" if extractor == "arith" else "math")
        self.checker = MathChecker(
            workers=workers,
            timeout=timeout,
            float_rounding=float_rounding,
            numeric_precision=numeric_precision,
            strict=strict,
            cache_size=cache_size,
            cache_path=cache_path,
            memory_mb=memory_mb,
        )

    # protocol --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "class": "MathVerifier",
            "name": self.name,
            "extractor": self.extractor,
            **self.checker.info(),
        }

    def close(self) -> None:
        self.checker.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        return self.checker.stats.as_dict()

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        return self.verify_many([(problem, samples)])[0]

    def verify_many(self, items: Sequence[tuple[Problem, Sequence[Sample]]]) -> list[list[Verdict]]:
        """Verdicts for several problems at once (answers and pairs deduplicated across all)."""
        golds: list[str | None] = [gold_answer(p.reference) for p, _ in items]
        extracted: list[list[tuple[str | None, str | None]]] = [
            [extract_answer(getattr(s, "text", "") or "", self.extractor) for s in samples]
            for _, samples in items
        ]
        # voting keys for every distinct answer and gold
        distinct = list(
            dict.fromkeys(
                [g for g in golds if g is not None]
                + [a for row in extracted for a, _ in row if a is not None]
            )
        )
        keys = dict(zip(distinct, self.checker.canonical_many(distinct), strict=True))
        # equivalence checks where the keys differ
        pairs = list(
            dict.fromkeys(
                (g, a)
                for g, row in zip(golds, extracted, strict=True)
                if g is not None
                for a, _ in row
                if a is not None and keys[a] != keys[g] and not self.checker.parse_timed_out(a)
            )
        )
        checks = dict(zip(pairs, self.checker.equivalent_many(pairs), strict=True))
        out: list[list[Verdict]] = []
        for (problem, samples), gold, row in zip(items, golds, extracted, strict=True):
            verdicts = []
            for s, (raw, rule) in zip(samples, row, strict=True):
                verdicts.append(self._verdict(problem, s, gold, raw, rule, keys, checks))
            out.append(verdicts)
        return out

    def _verdict(
        self,
        problem: Problem,
        sample: Sample,
        gold: str | None,
        raw: str | None,
        rule: str | None,
        keys: Mapping[str, str],
        checks: Mapping[tuple[str, str], Any],
    ) -> Verdict:
        pid, idx = problem.id, int(sample.index)
        if raw is None:
            return Verdict(
                pid, idx, VerdictStatus.INVALID, self.name, answer=None, correct=False,
                score=0.0, detail="no answer found",
            )  # fmt: skip
        key = keys[raw]
        meta = {"raw": raw, "rule": rule}
        if gold is None:
            return Verdict(
                pid, idx, VerdictStatus.ERROR, self.name, answer=key, correct=None,
                detail="problem has no reference answer", meta=meta,
            )  # fmt: skip
        if key == keys[gold]:
            return Verdict(
                pid, idx, VerdictStatus.PASS, self.name, answer=key, correct=True, score=1.0,
                meta={**meta, "how": "key"},
            )  # fmt: skip
        r = checks.get((gold, raw))
        if r is None:  # the answer could not even be parsed in time
            return Verdict(
                pid, idx, VerdictStatus.TIMEOUT, self.name, answer=key, correct=False,
                detail=f"parsing the answer took longer than {self.checker.timeout:g} s",
                meta={**meta, "how": "parse"},
            )  # fmt: skip
        meta["how"] = r.how
        if r.status == "ok":
            status = VerdictStatus.PASS if r.equal else VerdictStatus.FAIL
            return Verdict(
                pid, idx, status, self.name, answer=key, correct=bool(r.equal),
                score=1.0 if r.equal else 0.0, meta=meta,
            )  # fmt: skip
        status = VerdictStatus.TIMEOUT if r.status == "timeout" else VerdictStatus.ERROR
        return Verdict(
            pid, idx, status, self.name, answer=key, correct=False,
            detail=f"equivalence check {r.status}: {r.detail}"[:300], meta=meta,
        )  # fmt: skip
