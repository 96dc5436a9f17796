"""Math answer equivalence (math-verify in worker processes) and canonical voting keys.

Two questions are answered here:

* ``equivalent(gold, candidate)``: is the candidate answer string equal to the gold one?
  Plain numbers (``"1,234"``, ``"0.5"``, ``"-3."``, ``"1/2"``, ``"\\frac{1}{2}"``) are compared
  exactly in Python (the fast path); everything else goes to Hugging Face math-verify
  (``verify(parse(gold), parse(candidate))``, gold first: the relation is asymmetric and not
  transitive). Each math-verify call runs in a worker process with a wall-clock timeout; a
  worker past its deadline is killed and replaced and the pair's status is ``timeout``.
* ``canonical(answer)``: the voting key. Equivalent spellings share one key: numbers map to
  a canonical decimal (``"0.5"`` for ``"1/2"``, ``"\\frac{1}{2}"``, ``"0.50"``) or ``"p/q"`` when
  the decimal does not terminate; other answers to the string of their parsed SymPy object
  (``"sqrt(3)/2"``); when parsing fails, to the Minerva-normalised string.

Fast-path semantics follow math-verify's numeric rule: exact rational equality, except that
when either side is written as a decimal both are rounded to ``float_rounding`` places
(half-even) first, so ``"0.50000001"`` equals ``"1/2"`` at the default 6 places.

Results are cached by ``(gold, candidate)`` (in-memory LRU, optionally persisted to SQLite
keyed by the math-verify version and settings).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from ttscale.errors import VerifierError
from ttscale.validation import check_int, check_number
from ttscale.verifiers.extract import _unify_minus, normalize_final_answer, normalize_number

__all__ = [
    "CheckerStats",
    "EquivResult",
    "MathChecker",
    "NumericAnswer",
    "canonical_number",
    "fast_equal",
    "math_verify_version",
    "numeric_answer",
]

log = logging.getLogger(__name__)

# Bump when the canonical-key rules change, so persisted keys are not reused.
_CANON_VERSION = 1


# ---------------------------------------------------------------------------------------
# numbers (fast path)


@dataclass(frozen=True)
class NumericAnswer:
    """An answer that is a plain number: its exact value and whether it was written as a decimal."""

    value: Fraction
    decimal: bool


_FRAC_BRACED = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?[0-9]+)\}\{([+-]?[0-9]+)\}$")
_FRAC_SHORT = re.compile(r"^([+-]?)\\[dt]?frac([0-9])([0-9])$")
_SLASH = re.compile(r"^([+-]?)([0-9]+)/([0-9]+)$")


def numeric_answer(s: str | None) -> NumericAnswer | None:
    """Parse a plain number: ``"1,234.5"``, ``"-3."``, ``"$5"``, ``"1/2"``, ``"\\frac{1}{2}"``, ``"\\dfrac12"``.

    Returns ``None`` for anything else (including a zero denominator).
    """
    if s is None:
        return None
    t = _unify_minus(str(s)).strip()
    if len(t) >= 2 and t[0] == "$" and t[-1] == "$":
        t = t[1:-1]
    t = t.replace(" ", "").replace("\\!", "").replace("\\,", "")
    if t.startswith("\\boxed{") and t.endswith("}"):
        t = t[7:-1]
    for rx in (_FRAC_BRACED, _FRAC_SHORT, _SLASH):
        m = rx.match(t)
        if m:
            num, den = int(m.group(2)), int(m.group(3))
            if den == 0:
                return None
            v = Fraction(num, den)
            return NumericAnswer(-v if m.group(1) == "-" else v, decimal=False)
    n = normalize_number(t)
    if n is None:
        return None
    return NumericAnswer(Fraction(Decimal(n)), decimal=("." in t or "e" in t.lower()))


def canonical_number(v: Fraction) -> str:
    """``Fraction`` -> canonical string: a terminating decimal (``"0.5"``, ``"-3"``) or ``"p/q"``."""
    den = v.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{v.numerator}/{v.denominator}"
    d = Decimal(v.numerator) / Decimal(v.denominator)
    # exact: a denominator of 2^a 5^b needs at most max(a, b) decimal places
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


def fast_equal(gold: str, candidate: str, float_rounding: int = 6) -> bool | None:
    """Numeric equality when both are plain numbers, else ``None`` (ask math-verify).

    Exact comparison of rationals; when either side is written as a decimal, both are first
    rounded to ``float_rounding`` places (half-even), as math-verify does for floats.
    """
    g, c = numeric_answer(gold), numeric_answer(candidate)
    if g is None or c is None:
        return None
    if g.value == c.value:
        return True
    if g.decimal or c.decimal:
        return round(g.value, float_rounding) == round(c.value, float_rounding)
    return False


# ---------------------------------------------------------------------------------------
# worker side (runs inside checker processes; also usable in-process)

_WORKER_STATE: dict[str, Any] = {}


def _worker_init() -> None:
    """Import math-verify and silence its once-per-process 'timeout disabled' warning."""
    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _WORKER_STATE["parse_cache"] = OrderedDict()


def _mv_input(s: str) -> str:
    """What math-verify parses: the answer in ``$...$`` unless it already has delimiters."""
    s = s.strip()
    if "$" in s or "\\(" in s or "\\[" in s or "\\boxed" in s:
        return s
    return f"${s}$"


def _parse(s: str, signal_timeout: int | None) -> list[Any]:
    from math_verify import parse

    cache: OrderedDict[str, list[Any]] = _WORKER_STATE.setdefault("parse_cache", OrderedDict())
    key = s
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    out = parse(_mv_input(s), parsing_timeout=signal_timeout)  # type: ignore[arg-type]
    cache[key] = out
    if len(cache) > 4096:
        cache.popitem(last=False)
    return out


def _sympy_key(objs: Sequence[Any]) -> str | None:
    """Canonical string of the first SymPy object in a math-verify parse, or ``None``."""
    import sympy

    expr = next((o for o in objs if not isinstance(o, str)), None)
    if expr is None:
        return None
    # "x = 5" votes with "5" (math-verify also unwraps an assignment against a plain gold)
    if isinstance(expr, sympy.Eq) and isinstance(expr.lhs, sympy.Symbol):
        expr = expr.rhs
    if isinstance(expr, sympy.Symbol):
        return None  # \text{...} answers become a product of letters; keep the string
    if isinstance(expr, sympy.Basic):
        expr = expr.doit()
        if expr.is_Rational:
            return canonical_number(Fraction(int(expr.p), int(expr.q)))
        if expr.is_Float:
            return canonical_number(Fraction(Decimal(str(expr))))
    return str(expr)


_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")


def _worker_task(kind: str, a: str, b: str, cfg: dict[str, Any]) -> Any:
    """One checker task. ``kind`` is ``"eq"`` (a=gold, b=candidate) or ``"key"`` (a=answer)."""
    sig = cfg.get("signal_timeout")
    if kind == "eq":
        from math_verify import verify

        gold = _parse(a, sig)
        cand = _parse(b, sig)
        if not gold or not cand:
            return False
        return bool(
            verify(
                gold,
                cand,
                float_rounding=cfg["float_rounding"],
                numeric_precision=cfg["numeric_precision"],
                strict=cfg["strict"],
                timeout_seconds=sig,  # type: ignore[arg-type]
            )
        )
    if kind == "key":
        if _WORD_RE.search(_LATEX_CMD_RE.sub(" ", a)):
            # prose ("Monday", "10 dollars") parses as a product of one-letter symbols
            return None
        return _sympy_key(_parse(a, sig))
    raise ValueError(f"unknown task kind {kind!r}")


# ---------------------------------------------------------------------------------------
# parent side


def math_verify_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("math-verify")
    except Exception:
        return None


@dataclass(frozen=True)
class EquivResult:
    """Outcome of one equivalence check.

    ``status``: ``ok`` (``equal`` is the answer), ``timeout``, ``error`` (the checker failed:
    ``equal`` is ``False``); ``how``: ``fast`` (numeric), ``math-verify``, ``cache``.
    """

    equal: bool
    status: str = "ok"
    how: str = "math-verify"
    detail: str = ""


@dataclass
class CheckerStats:
    """Counters since the checker was created."""

    pairs: int = 0  # equivalence checks asked for
    fast: int = 0  # answered by the numeric fast path
    cache_hits: int = 0  # answered from the cache (memory or disk)
    disk_hits: int = 0
    checked: int = 0  # sent to math-verify
    timeouts: int = 0
    errors: int = 0
    keys: int = 0
    key_cache_hits: int = 0
    worker_restarts: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


class _LRU:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.d: OrderedDict[Any, Any] = OrderedDict()

    def get(self, k: Any) -> Any:
        v = self.d.get(k)
        if v is not None:
            self.d.move_to_end(k)
        return v

    def put(self, k: Any, v: Any) -> None:
        if self.maxsize <= 0:
            return
        self.d[k] = v
        self.d.move_to_end(k)
        while len(self.d) > self.maxsize:
            self.d.popitem(last=False)

    def __len__(self) -> int:
        return len(self.d)


class _DiskCache:
    """SQLite store of finished checks; rows are keyed by the checker configuration."""

    def __init__(self, path: str | Path, cfg_key: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg_key
        self.db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        with self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS equiv (cfg TEXT, gold TEXT, cand TEXT, equal INTEGER,"
                " PRIMARY KEY (cfg, gold, cand))"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS keys (cfg TEXT, answer TEXT, key TEXT,"
                " PRIMARY KEY (cfg, answer))"
            )

    def get_equiv(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        out: dict[tuple[str, str], bool] = {}
        for g, c in pairs:
            row = self.db.execute(
                "SELECT equal FROM equiv WHERE cfg=? AND gold=? AND cand=?", (self.cfg, g, c)
            ).fetchone()
            if row is not None:
                out[(g, c)] = bool(row[0])
        return out

    def put_equiv(self, items: Iterable[tuple[str, str, bool]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO equiv VALUES (?, ?, ?, ?)",
                [(self.cfg, g, c, int(e)) for g, c, e in items],
            )

    def get_keys(self, answers: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for a in answers:
            row = self.db.execute(
                "SELECT key FROM keys WHERE cfg=? AND answer=?", (self.cfg, a)
            ).fetchone()
            if row is not None:
                out[a] = row[0]
        return out

    def put_keys(self, items: Iterable[tuple[str, str]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO keys VALUES (?, ?, ?)",
                [(self.cfg, a, k) for a, k in items],
            )

    def close(self) -> None:
        self.db.close()


class MathChecker:
    """Equivalence checks and voting keys for math answers (see the module docstring).

    ``workers``: checker processes (``0`` runs math-verify in this process, protected only by
    math-verify's own ``signal.alarm`` timeout on the main thread; for debugging).
    ``timeout``: seconds of wall-clock time per check. ``cache_size``: in-memory entries
    (0 disables); ``cache_path``: an SQLite file that keeps results across runs.
    ``float_rounding``/``numeric_precision``/``strict``: passed to ``math_verify.verify``.
    """

    def __init__(
        self,
        *,
        workers: int = 1,
        timeout: float = 5.0,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        cache_size: int = 100_000,
        cache_path: str | Path | None = None,
        memory_mb: int | None = 4096,
    ) -> None:
        check_int("workers", workers, min=0)
        check_number("timeout", timeout, low=0.0, low_open=True, unit="seconds")
        check_int("float_rounding", float_rounding, min=0)
        check_int("cache_size", cache_size, min=0)
        self.workers = workers
        self.timeout = float(timeout)
        self.float_rounding = float_rounding
        self.numeric_precision = int(numeric_precision)
        self.strict = bool(strict)
        self.memory_mb = memory_mb
        self.version = math_verify_version()
        self.stats = CheckerStats()
        self._eq_cache = _LRU(cache_size)
        self._key_cache = _LRU(cache_size)
        self._cfg = {
            "float_rounding": self.float_rounding,
            "numeric_precision": self.numeric_precision,
            "strict": self.strict,
            "signal_timeout": None,
        }
        cfg_key = (
            f"mv={self.version};r={self.float_rounding};p={self.numeric_precision};"
            f"s={int(self.strict)};c={_CANON_VERSION}"
        )
        self._disk = _DiskCache(cache_path, cfg_key) if cache_path is not None else None
        self._pool: Any = None
        self._lock = threading.RLock()
        # answers whose parse ran out of time (an equivalence check would parse them again)
        self._parse_timeouts = _LRU(cache_size)

    # lifecycle -------------------------------------------------------------------------------

    def _require_math_verify(self) -> None:
        if self.version is None:
            raise VerifierError(
                "math-verify is not installed; pip install 'math-verify[antlr4_13_2]' "
                "(or ttscale[math])"
            )

    def _get_pool(self) -> Any:
        if self._pool is None:
            self._require_math_verify()
            from ttscale.verifiers._procpool import TimeoutPool

            self._pool = TimeoutPool(
                "ttscale.verifiers.mathcheck:_worker_task",
                workers=self.workers,
                timeout=self.timeout,
                initializer="ttscale.verifiers.mathcheck:_worker_init",
                memory_mb=self.memory_mb,
            )
        return self._pool

    def close(self) -> None:
        """Stop the worker processes and close the disk cache (idempotent)."""
        with self._lock:
            if self._pool is not None:
                self.stats.worker_restarts = self._pool.restarts
                self._pool.close()
                self._pool = None
            if self._disk is not None:
                self._disk.close()
                self._disk = None

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        return {
            "math_verify": self.version,
            "float_rounding": self.float_rounding,
            "numeric_precision": self.numeric_precision,
            "strict": self.strict,
            "timeout_s": self.timeout,
            "workers": self.workers,
            "canonical_version": _CANON_VERSION,
        }

    # running tasks ---------------------------------------------------------------------------

    def _run_tasks(self, tasks: list[tuple[str, str, str]]) -> list[tuple[str, Any, str]]:
        """Run ``(kind, a, b)`` tasks; returns ``(status, value, detail)`` per task."""
        if not tasks:
            return []
        if self.workers == 0:
            return [self._run_inline(t) for t in tasks]
        pool = self._get_pool()
        outs = pool.map([(k, a, b, self._cfg) for k, a, b in tasks])
        self.stats.worker_restarts = pool.restarts
        res = []
        for o in outs:
            status = o.status if o.status in ("ok", "timeout") else "error"
            res.append((status, o.value, o.detail or o.status))
        return res

    def _run_inline(self, task: tuple[str, str, str]) -> tuple[str, Any, str]:
        self._require_math_verify()
        if "parse_cache" not in _WORKER_STATE:
            _worker_init()
        cfg = dict(self._cfg)
        if threading.current_thread() is threading.main_thread():
            cfg["signal_timeout"] = max(1, round(self.timeout))
        try:
            return ("ok", _worker_task(task[0], task[1], task[2], cfg), "")
        except Exception as e:  # math-verify raises only with raise_on_error; be safe
            return ("error", None, f"{type(e).__name__}: {e}")

    # equivalence -----------------------------------------------------------------------------

    def equivalent(self, gold: str, candidate: str) -> EquivResult:
        """Is ``candidate`` equivalent to ``gold``? (gold first: the check is asymmetric)."""
        return self.equivalent_many([(gold, candidate)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[EquivResult]:
        """Check many ``(gold, candidate)`` pairs; duplicates are checked once."""
        with self._lock:
            return self._equivalent_many(pairs)

    def _equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[EquivResult]:
        results: dict[tuple[str, str], EquivResult] = {}
        todo: list[tuple[str, str]] = []
        for g, c in pairs:
            self.stats.pairs += 1
            k = (g, c)
            if k in results:
                self.stats.cache_hits += 1
                continue
            hit = self._eq_cache.get(k)
            if hit is not None:
                self.stats.cache_hits += 1
                results[k] = EquivResult(hit.equal, hit.status, "cache", hit.detail)
                continue
            f = fast_equal(g, c, self.float_rounding)
            if f is not None:
                self.stats.fast += 1
                r = EquivResult(f, "ok", "fast")
                results[k] = r
                self._eq_cache.put(k, r)
                continue
            if not g.strip() or not c.strip():
                r = EquivResult(False, "ok", "fast", "empty answer")
                results[k] = r
                continue
            results[k] = None  # type: ignore[assignment]  # placeholder keeps order, dedups
            todo.append(k)
        if todo and self._disk is not None:
            disk = self._disk.get_equiv(todo)
            for k, e in disk.items():
                r = EquivResult(e, "ok", "cache")
                results[k] = r
                self._eq_cache.put(k, r)
                self.stats.cache_hits += 1
                self.stats.disk_hits += 1
            todo = [k for k in todo if k not in disk]
        if todo:
            outs = self._run_tasks([("eq", g, c) for g, c in todo])
            persist = []
            for k, (status, value, detail) in zip(todo, outs, strict=True):
                self.stats.checked += 1
                if status == "ok":
                    r = EquivResult(bool(value), "ok", "math-verify")
                    persist.append((k[0], k[1], bool(value)))
                elif status == "timeout":
                    self.stats.timeouts += 1
                    r = EquivResult(False, "timeout", "math-verify", detail)
                else:
                    self.stats.errors += 1
                    r = EquivResult(False, "error", "math-verify", detail)
                results[k] = r
                # timeouts are cached in memory too: a pathological pair costs one timeout
                self._eq_cache.put(k, r)
            if persist and self._disk is not None:
                self._disk.put_equiv(persist)
        return [results[(g, c)] for g, c in pairs]

    def parse_timed_out(self, answer: str) -> bool:
        """Whether computing the key of ``answer`` ran out of time (it cannot be parsed in time,
        so an equivalence check on it would time out as well)."""
        return self._parse_timeouts.get(answer) is not None

    # voting keys -----------------------------------------------------------------------------

    def canonical(self, answer: str) -> str:
        """The voting key of ``answer`` (equivalent spellings share it)."""
        return self.canonical_many([answer])[0]

    def canonical_many(self, answers: Sequence[str]) -> list[str]:
        """Voting keys of many answers; each distinct answer is parsed at most once."""
        with self._lock:
            return self._canonical_many(answers)

    def _canonical_many(self, answers: Sequence[str]) -> list[str]:
        keys: dict[str, str] = {}
        todo: list[str] = []
        for a in answers:
            self.stats.keys += 1
            if a in keys:
                self.stats.key_cache_hits += 1
                continue
            hit = self._key_cache.get(a)
            if hit is not None:
                self.stats.key_cache_hits += 1
                keys[a] = hit
                continue
            n = numeric_answer(a)
            if n is not None:
                keys[a] = canonical_number(n.value)
                self._key_cache.put(a, keys[a])
                continue
            keys[a] = ""  # placeholder
            todo.append(a)
        if todo and self._disk is not None:
            disk = self._disk.get_keys(todo)
            for a, k in disk.items():
                keys[a] = k
                self._key_cache.put(a, k)
                self.stats.key_cache_hits += 1
            todo = [a for a in todo if a not in disk]
        if todo:
            can_parse = self.version is not None
            outs = (
                self._run_tasks([("key", a, "") for a in todo])
                if can_parse
                else [("error", None, "math-verify not installed")] * len(todo)
            )
            persist = []
            for a, (status, value, detail) in zip(todo, outs, strict=True):
                if status == "ok" and value:
                    k = str(value)
                    persist.append((a, k))
                else:
                    k = _string_key(a)
                    if status == "ok":
                        persist.append((a, k))
                    elif status == "timeout":
                        self.stats.timeouts += 1
                        self._parse_timeouts.put(a, detail)
                keys[a] = k
                self._key_cache.put(a, k)
            if persist and self._disk is not None:
                self._disk.put_keys(persist)
        return [keys[a] for a in answers]


def _string_key(answer: str) -> str:
    """Fallback voting key: the Minerva-normalised string (the stripped answer if that is empty)."""
    k = normalize_final_answer(answer)
    return k if k else answer.strip()
