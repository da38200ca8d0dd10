"""Parsing LLM answers. Pure functions, unit-tested on Chinese and English cases."""

from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SEPARATORS = re.compile(r"[;；\n]+")
# "1.", "1)", "1、", "(1)", "（1）", "①", "-", "*", "•", "Prompt 1:", "提示1："
_NUMBERING = re.compile(
    r"^\s*(?:[-*•·]+\s*|\(?（?\d{1,3}[.)、．:：）]\s*|[①-⑳]\s*|"
    r"(?:prompt|question|提示词?|问题)\s*\d{0,3}\s*[.:：]\s*)", re.IGNORECASE)
_QUOTES = "\"'“”‘’「」『』`"


def strip_thinking(text: str) -> str:
    """Remove ``<think>...</think>`` blocks; an unclosed ``<think>`` means no answer was given."""
    text = _THINK_BLOCK.sub("", text)
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.replace("</think>", "").strip()


def clean_piece(piece: str) -> str:
    piece = piece.strip()
    previous = None
    while previous != piece:  # numbering and quotes can nest: '1. "What ..."'
        previous = piece
        piece = _NUMBERING.sub("", piece, count=1).strip().strip(_QUOTES).strip()
    return piece


def split_prompts(text: str, *, min_chars: int = 1) -> list[str]:
    """Split a rewriter answer into prompts.

    Separators are ASCII and full-width semicolons and newlines; numbering, bullets and quotes are
    removed; a leading preamble ("Here are the prompts:", "以下是改写：") and pieces shorter than
    ``min_chars`` are dropped. Order is kept; duplicates within one answer are removed.
    """
    pieces = [clean_piece(p) for p in _SEPARATORS.split(strip_thinking(text))]
    pieces = [p for p in pieces if p]
    if pieces and pieces[0].endswith((":", "：")):
        pieces = pieces[1:]
    seen: set[str] = set()
    out = []
    for p in pieces:
        if len(p) >= min_chars and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def classify_llm_error(message: str) -> str:
    """Short reason code for a failed request (``prompt_too_long`` or ``inference_error``)."""
    lowered = message.lower()
    if "maximum context length" in lowered or "longer than the maximum" in lowered or \
            "too long" in lowered:
        return "prompt_too_long"
    return "inference_error"
