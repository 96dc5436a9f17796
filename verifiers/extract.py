"""Answer extraction from model output and answer-string normalisation (pure functions).

Every extractor maps a response text to the raw answer string, or ``None`` when the
response contains no answer of that form (never a sentinel such as ``"[invalid]"``).
Normalisers map an answer string to a canonical form. The extractors follow the reference
harnesses (docs/algorithms.md §10.1-10.3) where those are right and fix their known pitfalls:

* ``The answer is (...).``: lm-eval's trailing ``.`` is a wildcard, so "The answer is 72"
  at the end of a text gives ``"7"``; :func:`answer_is` gives ``"72"``.
* GSM8K flexible-extract can pick up a run of punctuation (``"..."``); ours needs a digit.
* Minerva's ``Final Answer: ... I hope it is correct.`` fails when the text ends right
  after the answer; :func:`minerva_answer` accepts the end of the line instead.
* lm-eval's ``remove_boxed`` asserts on ``\\fbox{7}``; :func:`last_boxed` returns ``"7"``.
* Minus signs written as U+2212 ("−") are kept as minus signs.
* Minerva's normalisation deletes unit words as substrings (``\\left`` loses its ``ft``);
  :func:`normalize_final_answer` removes them only as whole words.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "answer_is",
    "final_hash_integer",
    "gsm8k_flexible",
    "gsm8k_strict",
    "last_boxed",
    "last_number",
    "minerva_answer",
    "normalize_final_answer",
    "normalize_number",
    "strip_latex_wrappers",
]

# Unicode dashes that models and tokenisers emit for a minus sign.
_MINUS_CHARS = "\u2212\u2012\u2013\u2014\ufe63\uff0d"
_MINUS_TRANS = str.maketrans({c: "-" for c in _MINUS_CHARS})


def _unify_minus(text: str) -> str:
    return text.translate(_MINUS_TRANS)


# ---------------------------------------------------------------------------------------
# \boxed{...}


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\\boxed\s")


def _match_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``; ``None`` if unbalanced.

    Escaped braces (``\\{``, ``\\}``) do not count, so ``\\boxed{\\{1,2\\}}`` and
    ``\\boxed{\\left\\{ x \\right.}`` close where a reader expects.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (also consumes "\\\\")
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, ``\\boxed ...`` or ``\\fbox{...}`` in ``text``.

    The braced forms are matched by brace counting; an unbalanced (truncated) box gives
    ``None``. The space form ``\\boxed 5$`` runs to the next ``$`` or end of line. An
    empty box gives ``""``; no box gives ``None``. The last box *by position* wins (lm-eval
    prefers any ``\\boxed `` space form over a later braced box).
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if m.group(0).endswith("{"):
        close = _match_brace(text, m.end() - 1)
        if close is None:
            return None
        return text[m.end() : close].strip()
    rest = text[m.end() :]
    end = len(rest)
    for stop in ("$", "\n"):
        j = rest.find(stop)
        if j != -1:
            end = min(end, j)
    return rest[:end].strip()


# ---------------------------------------------------------------------------------------
# GSM8K-style extractors

_NUMBER_CHARS = r"[0-9.,]"
_STRICT_RE = re.compile(r"####\s*\$?\s*(-?[0-9.,]+)")
# lm-eval flexible-extract: (-?[$0-9.,]{2,})|(-?[0-9]+), last match.
_FLEX_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def gsm8k_strict(text: str) -> str | None:
    """First ``#### <number>`` (lm-eval ``strict-match``), as written (``"1,234.5"``, ``"-3."``).

    Also accepts ``####72``, ``#### $72`` and Unicode minus signs, which the lm-eval
    regex rejects.
    """
    m = _STRICT_RE.search(_unify_minus(text or ""))
    if m is None:
        return None
    ans = m.group(1).strip()
    return ans if re.search(r"[0-9]", ans) else None


def gsm8k_flexible(text: str) -> str | None:
    """Last number-like token (lm-eval ``flexible-extract``), as written (``"12."``, ``"$5"``).

    Unlike the reference regex, a match must contain a digit: ``"Wait..."`` gives no
    answer instead of ``"..."``.
    """
    for m in reversed(list(_FLEX_RE.finditer(_unify_minus(text or "")))):
        tok = m.group(1) or m.group(2)
        if tok and re.search(r"[0-9]", tok):
            return tok.strip()
    return None


# A number as written in prose: optional sign and $, thousands groups or plain digits,
# optional decimals. Used by answer_is and last_number.
_PROSE_NUMBER = r"(?:-?\$?\s?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\$?\.[0-9]+)"
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_LEAD_NUMBER_RE = re.compile(
    r"(?:\\\(|\$(?=\s?-?[0-9.]))?\s*(?:\\boxed\{)?\s*("
    + _PROSE_NUMBER
    + r"(?:\s*/\s*[0-9]+)?)(?![0-9^_{\\]|/[0-9])"
)
_LEAD_MATH_RE = re.compile(r"\$([^$\n]{1,300})\$|\\\((.{1,300}?)\\\)")


def answer_is(text: str) -> str | None:
    """The answer after the last ``The answer is`` (gsm8k-cot style).

    A number (``"72"``, ``"1,234.5"``, ``"$18"``, ``"1/2"``) is taken without a sentence-ending
    period: lm-eval's ``The answer is (\\-?[0-9\\.\\,]+).`` makes that final ``.`` a wildcard, so
    "The answer is 72" at the end of a text gives ``"7"`` there and ``"72"`` here. Otherwise a
    math span right after the phrase (``$\\frac{1}{2}$``, ``\\(x+1\\)``) is taken. We use the
    last occurrence (the final answer of a self-correcting chain); case is ignored.
    """
    t = _unify_minus(text or "")
    for m in reversed(list(_ANSWER_IS_RE.finditer(t))):
        rest = t[m.end() : m.end() + 400]
        n = _LEAD_NUMBER_RE.match(rest)
        if n is not None:
            return n.group(1).replace(" ", "")
        mm = _LEAD_MATH_RE.match(rest)
        if mm is not None:
            ans = (mm.group(1) or mm.group(2) or "").strip().rstrip(".").strip()
            if ans:
                return ans
    return None


_LAST_NUMBER_RE = re.compile(r"(?<![0-9A-Za-z_.])(" + _PROSE_NUMBER + r")(?![0-9])")
_FRACTION_RE = re.compile(r"(?<![0-9A-Za-z_.])(-?[0-9]+\s*/\s*[0-9]+)(?![0-9/])")


_HASH_INTEGER_LINE = re.compile(
    r"^[ \t]*####[ \t]*(-?[0-9][0-9,]*)[ \t]*\.?[ \t]*$", re.MULTILINE
)


def final_hash_integer(text: str | None) -> str | None:
    """The integer on the last ``#### x`` line of ``text``, canonicalised, or ``None``.

    The answer format of the bundled ``arith`` benchmark (and GSM8K's references). Thousands
    separators are removed and the value re-printed (``"#### 0,014"`` -> ``"14"``); a ``####``
    line without an integer does not count.
    """
    if not text:
        return None
    matches = _HASH_INTEGER_LINE.findall(text)
    if not matches:
        return None
    digits = matches[-1].replace(",", "")
    if digits in ("", "-"):
        return None
    return str(int(digits))


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written (sign, ``$``, thousands commas, decimals kept).

    A plain fraction ``a/b`` counts as one number when it is last. Returns ``None`` when
    the text has no digit.
    """
    t = _unify_minus(text or "")
    best: tuple[int, str] | None = None
    for rx in (_LAST_NUMBER_RE, _FRACTION_RE):
        for m in rx.finditer(t):
            # the later-ending match wins; at equal end, the longer (fraction) one
            key = (m.end(1), m.group(1))
            if (
                best is None
                or key[0] > best[0]
                or (key[0] == best[0] and len(key[1]) > len(best[1]))
            ):
                best = key
    return None if best is None else best[1].replace(" ", "")


# ---------------------------------------------------------------------------------------
# Minerva "Final Answer: The final answer is X. I hope it is correct."

_MINERVA_RE = re.compile(
    r"Final Answer:\s*The final answer is\s*(.*?)\s*\.?\s*(?:I hope it is correct\.?|$)",
    re.MULTILINE,
)


def minerva_answer(text: str) -> str | None:
    """``X`` from the first ``Final Answer: The final answer is X. I hope it is correct.``

    When the line ends without the closing sentence (the model stopped right after the
    answer) the rest of the line is taken, minus a final period. lm-eval returns
    ``[invalidanswer]`` there. Empty answers give ``None``.
    """
    m = _MINERVA_RE.search(text or "")
    if m is None:
        return None
    ans = m.group(1).strip()
    return ans or None


# ---------------------------------------------------------------------------------------
# Normalisers


_THOUSANDS_RE = re.compile(r"^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?$")
_PLAIN_NUMBER_RE = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")


def normalize_number(s: str | int | float | None) -> str | None:
    """Canonical decimal string of a plain number, or ``None`` if ``s`` is not one.

    Handles thousands separators (only in groups of three: ``"1,234"`` but not ``"1,2"``),
    a leading ``$``/``\\$``, surrounding ``$...$``, a trailing period, ``+``/Unicode minus,
    trailing zeros (``"3.50" -> "3.5"``, ``"3.0" -> "3"``) and ``-0``. Exact (``Decimal``),
    so ``"0.1"`` stays ``"0.1"``.
    """
    if s is None or isinstance(s, bool):
        return None
    if isinstance(s, int):
        return str(s)
    if isinstance(s, float):
        if s != s or s in (float("inf"), float("-inf")):
            return None
        s = repr(s)
    t = _unify_minus(str(s)).strip()
    if t.startswith("$") and t.endswith("$") and len(t) >= 2:
        t = t[1:-1].strip()
    t = t.replace("\\$", "$").replace("\\!", "").replace("{,}", ",").replace(" ", "")
    sign = ""
    if t[:1] in "+-" and t:
        sign, t = ("-" if t[0] == "-" else ""), t[1:]
    if t.startswith("$"):
        t = t[1:]
    if t[:1] in "+-" and t and not sign:  # "$-5"
        sign, t = ("-" if t[0] == "-" else ""), t[1:]
    if t.endswith(".") and t[:-1] and t[-2].isdigit():
        t = t[:-1]
    if not t:
        return None
    if "," in t:
        if not _THOUSANDS_RE.match(t):
            return None
        t = t.replace(",", "")
    if not _PLAIN_NUMBER_RE.match(t):
        return None
    try:
        d = Decimal(sign + t)
    except InvalidOperation:
        return None
    return _decimal_str(d)


def _decimal_str(d: Decimal) -> str:
    """``Decimal`` -> canonical fixed-point string without trailing zeros; ``-0`` -> ``0``."""
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out


# Minerva normalisation (Lewkowycz et al. 2022, App. D), reimplemented with whole-word
# unit removal and brace-matched unwrapping.
_UNIT_WORDS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples",
)  # fmt: skip
_UNIT_RE = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(_UNIT_WORDS) + r")(?![A-Za-z])")
_REMOVED_LITERALS = (
    "\\ldots", "\\dots", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}",
    "\\;", ",\\!", "{,}", '"',
)  # fmt: skip
_WRAPPERS = ("\\text", "\\textbf", "\\mathrm", "\\mbox", "\\overline", "\\boxed", "\\fbox")


def strip_latex_wrappers(s: str, wrappers: tuple[str, ...] = _WRAPPERS) -> str:
    """Replace every ``\\cmd{X}`` with ``X`` for the given commands (brace-matched, nested OK)."""
    out = s
    changed = True
    while changed:
        changed = False
        for cmd in wrappers:
            for m in re.finditer(re.escape(cmd) + r"\s*\{", out):
                close = _match_brace(out, m.end() - 1)
                if close is None:
                    continue
                out = out[: m.start()] + out[m.end() : close] + out[close + 1 :]
                changed = True
                break
    return out


def _fix_frac_sqrt(s: str) -> str:
    r"""``\frac23 -> \frac{2}{3}``, ``\frac2{3} -> \frac{2}{3}``, ``\sqrt3 -> \sqrt{3}``."""

    def arg(i: int) -> tuple[str, int] | None:
        while i < len(s) and s[i] == " ":
            i += 1
        if i >= len(s):
            return None
        if s[i] == "{":
            close = _match_brace(s, i)
            if close is None:
                return None
            return s[i + 1 : close], close + 1
        if s[i] == "\\":
            m = re.match(r"\\[A-Za-z]+", s[i:])
            if m:
                return m.group(0), i + m.end()
        return s[i], i + 1

    out: list[str] = []
    i = 0
    while i < len(s):
        m = re.match(r"\\(d|t)?frac(?![A-Za-z])", s[i:])
        if m:
            a = arg(i + m.end())
            b = a and arg(a[1])
            if a and b:
                out.append(f"\\frac{{{a[0]}}}{{{b[0]}}}")
                i = b[1]
                continue
        m = re.match(r"\\sqrt(?![A-Za-z])", s[i:])
        if m and i + m.end() < len(s) and s[i + m.end()] not in "{[":
            a = arg(i + m.end())
            if a:
                out.append(f"\\sqrt{{{a[0]}}}")
                i = a[1]
                continue
        out.append(s[i])
        i += 1
    return "".join(out)


def normalize_final_answer(answer: str) -> str:
    """Minerva-style normal form of a final answer string (Lewkowycz et al. 2022, App. D).

    Keeps what follows the last ``=``; drops articles, units, ``\\text{}``-style wrappers,
    degree signs, ``$`` delimiters, spaces; writes ``\\frac23`` as ``\\frac{2}{3}`` and
    ``\\sqrt3`` as ``\\sqrt{3}``; removes thousands separators from integers.
    """
    s = _unify_minus(answer or "")
    s = s.split("=")[-1]
    # articles and units only as whole words (the reference deletes substrings)
    s = re.sub(r"(?<![A-Za-z\\])(?:an|a)\s+", "", s)
    s = _UNIT_RE.sub("", s)
    s = s.replace("\\mbox", "\\text").replace(",\\text{and}", ",").replace("\\text{and}", ",")
    s = s.replace("\\text{m}", "\\text{}").replace(".$", "$").replace("\\$", "")
    for lit in _REMOVED_LITERALS:
        s = s.replace(lit, "")
    s = s.replace("\\ ", "").replace("\\,", "").replace("\\!", "").replace(" ", "")
    m = re.search(r"\$(.*?)\$", s, re.DOTALL)
    if m is not None:  # keep only the first $...$ group
        s = m.group(1)
    s = strip_latex_wrappers(s)
    s = _fix_frac_sqrt(s)
    s = s.replace("$", "")
    if _THOUSANDS_RE.match(s) and "." not in s:
        s = s.replace(",", "")
    return s.strip()
