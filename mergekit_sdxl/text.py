"""Safe display of text that comes from files: file names, metadata, error messages.

A checkpoint's name or ``__metadata__`` can hold terminal escape sequences (ESC ``[2J``), carriage
returns that overwrite a table row, bidi overrides that reverse what a reader sees, or lone
surrogates (undecodable file names) that make ``print`` raise. :func:`printable` makes every such
character visible as a Python-style escape before anything is printed.
"""

from __future__ import annotations

__all__ = ["printable"]


def _escape(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def printable(s: object) -> str:
    """``s`` (``str()`` of it) with every non-printable character replaced by a visible escape.

    Non-printable is ``not str.isprintable()``: C0/C1 controls (ESC, CR, LF, TAB), DEL, format
    characters such as the bidi overrides U+202A-U+202E and isolates U+2066-U+2069, zero-width
    characters, line/paragraph separators, lone surrogates and unassigned code points. Printable
    text (CJK file names, accents, emoji) is kept. Idempotent: escapes are themselves printable.
    """
    text = s if isinstance(s, str) else str(s)
    if text.isprintable():  # the common case: no copy
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
