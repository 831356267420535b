"""Header and file-name text made safe to print: control characters escaped, length capped.

DICOM text comes from whoever wrote the file; printed raw, an ESC sequence recolours or retitles
the operator's terminal, a newline forges a table line and a 10 kB description buries the report.
Everything medidiff shows from a header (inspect, report.txt, report.json) goes through ``clean_text``.
"""

from __future__ import annotations

import unicodedata

MAX_TEXT = 64  # DICOM LO values are at most 64 characters; longer ones are cut
ELLIPSIS = "..."
# Unicode categories that move the cursor or reorder text: controls, formats (bidi overrides),
# line/paragraph separators, surrogates, unassigned code points.
UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"}
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if unicodedata.category(char) not in UNSAFE_CATEGORIES:
        return char
    if char in SHORT_ESCAPES:
        return SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean_text(value, limit: int = MAX_TEXT) -> str:
    """``value`` as one printable line: unsafe characters escaped (``\\x1b``), cut to ``limit`` characters."""
    text = "".join(_escape(c) for c in str(value).strip())
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)] + ELLIPSIS


def exception_text(exc: BaseException, file, limit: int = 200) -> str:
    """``exc`` as ``Type: message`` with ``file``'s path and name replaced by ``<file>`` (paths may name patients)."""
    message = str(exc).replace(str(file), "<file>").replace(getattr(file, "name", str(file)), "<file>")
    return clean_text(f"{type(exc).__name__}: {message}", limit)
