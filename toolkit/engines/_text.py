"""Text helpers shared by the engines that run their own decoding loop (stop strings, chat)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["find_stop", "render_plain_chat"]


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` that ends at or after ``start``.

    Returns ``(position, stop)`` (the stop string begins at ``text[position]``; ties between
    stop strings beginning at the same position go to the longest), or ``None``. ``start`` lets
    an incremental decoder look only at text that can hold a stop string not seen before: pass
    the length of the text already checked.
    """
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s, max(0, start - len(s) + 1))
        if pos < 0:
            continue
        if best is None or pos < best[0] or (pos == best[0] and len(s) > len(best[1])):
            best = (pos, s)
    return best


def render_plain_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """A plain chat rendering for models without a template: ``role: content`` lines."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"
