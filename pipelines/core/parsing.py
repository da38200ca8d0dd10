"""Parsing LLM answers. Pure functions, unit-tested on Chinese and English cases."""

from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SEPARATORS = re.compile(r"[;；\n]+")
# A list marker at the start of a piece, and only a marker: "1. ", "1) ", "- ", "* " need the space
# after them (so "-3度" and "*args" keep their text); "1." / "1)" / "1:" may be glued to text but
# never to a digit ("3.5倍", "10:30开会" are numbers, not markers); "1、", "(1)", "（1）", "①",
# "•", "Prompt 1:", "提示1：" are markers whatever follows.
_NUMBERING = re.compile(
    r"^\s*(?:[-*]\s+|[•·]\s*|\d{1,3}[.)．:：）](?!\d)\s*|\d{1,3}、\s*|[(（]\d{1,3}[)）]\s*|[①-⑳]\s*|"
    r"(?:prompt|question|提示词?|问题)\s*\d{0,3}\s*[.:：]\s*)", re.IGNORECASE)
# Quote pairs that may wrap a whole piece; a quote that opens or closes only part of it is text.
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」", "『": "』", "`": "`"}


def strip_thinking(text: str) -> str:
    """The answer without its reasoning: ``<think>...</think>`` blocks are removed; a lone closing
    ``</think>`` (a chat template that opened ``<think>`` in the prompt) means everything up to the
    last one is reasoning; an unclosed ``<think>`` means no answer was given after it."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def _unquote(piece: str) -> str:
    """``piece`` without one pair of quotes that wraps all of it (“躺平”是什么意思？ keeps its quotes)."""
    if len(piece) >= 2 and _QUOTE_PAIRS.get(piece[0]) == piece[-1]:
        return piece[1:-1].strip()
    return piece


def clean_piece(piece: str) -> str:
    """One prompt of a rewriter answer without its list marker (:data:`_NUMBERING`) and without
    quotes that wrap the whole of it; quotes and numbers that belong to the text stay."""
    piece = piece.strip()
    previous = None
    while previous != piece:  # numbering and quotes can nest: '1. "What ..."'
        previous = piece
        piece = _unquote(_NUMBERING.sub("", piece, count=1).strip())
    return piece


def split_prompts(text: str, *, min_chars: int = 1) -> list[str]:
    """Split a rewriter answer into prompts.

    Separators are ASCII and full-width semicolons and newlines; numbering, bullets and quotes are
    removed; a leading preamble ("Here are the prompts:", "以下是改写：") and pieces shorter than
    ``min_chars`` are dropped. Order is kept; duplicates within one answer are removed. An answer
    written as a list (every line after an optional preamble starts with a marker: ``1.``, ``-``,
    ``①`` ...) is split at its lines only: semicolons inside an item are its text (Qwen2.5 numbers its
    rewrites of ToxiCN posts, which hold semicolons of their own).
    """
    body = strip_thinking(text)
    lines = [line for line in body.splitlines() if line.strip()]
    items = lines[1:] if lines and lines[0].rstrip().endswith((":", "：")) else lines
    if len(items) >= 2 and all(_NUMBERING.match(line) for line in items):
        pieces = [clean_piece(line) for line in lines]
    else:
        pieces = [clean_piece(p) for p in _SEPARATORS.split(body)]
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


# How instruct models open a refusal, in English and Chinese. Only the opening counts: a refusal
# phrase inside a text (a translated apology, a quoted "I can't") is content.
_REFUSAL_OPENING = re.compile(
    r"^\W{0,3}(?:i(?:'m| am)? sorry|sorry,|i (?:can(?:no|')t|won't|will not|am unable|'m unable|must decline)|"
    r"as an ai|i apologi[sz]e|unfortunately,? i|"
    r"(?:很|非常)?抱歉|对不起|我(?:不能|无法|不会|拒绝)|作为(?:一个)?(?:ai|人工智能|语言模型|AI助手)|"
    r"(?:本|该)?(?:内容|请求|问题)(?:涉及|包含)[^，。]{0,20}(?:无法|不能|不便))", re.IGNORECASE)


def looks_like_refusal(answer: str) -> bool:
    """Whether an answer opens as a refusal ("I'm sorry, I can't…", "抱歉，我无法…", "作为AI…")."""
    return bool(_REFUSAL_OPENING.match(strip_thinking(answer)))


# A label an instruct model puts before its translation: "Translation:", "译文：", "翻译如下："
_TRANSLATION_LABEL = re.compile(r"^\s*(?:translation|translated text|译文|翻译|中文翻译|翻译结果)(?:如下)?\s*[:：]\s*",
                                re.IGNORECASE)


def parse_translation(answer: str, source: str) -> tuple[str | None, str]:
    """An LLM's translation answer -> (translation, "") or (None, reason): ``empty_answer`` or
    ``refused`` (an answer that opens as a refusal when the source text itself does not). The
    reasoning, a leading "Translation:"/"译文：" label and quotes wrapping the whole answer go."""
    text = strip_thinking(answer)
    text = _unquote(_TRANSLATION_LABEL.sub("", text, count=1).strip())
    if not text:
        return None, "empty_answer"
    if looks_like_refusal(text) and not looks_like_refusal(source):
        return None, "refused"
    return text, ""


def classify_llm_error(message: str) -> str:
    """Short reason code for a failed request (``prompt_too_long`` or ``inference_error``)."""
    lowered = message.lower()
    if "maximum context length" in lowered or "longer than the maximum" in lowered or \
            "too long" in lowered:
        return "prompt_too_long"
    return "inference_error"
