"""Text normalisation shared by ingestion and the keyword pool. Pure functions."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline, plus zero-width characters and the BOM
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def normalize_text(text: str, form: str = "nfc") -> str:
    """Unicode ``form`` (``nfc``, ``nfkc`` or ``none``), CRLF -> LF, control and zero-width characters
    removed, runs of spaces (including the ideographic space) collapsed to one, blank-line runs to
    one blank line, ends stripped."""
    if form != "none":
        text = unicodedata.normalize(form.upper(), text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)
