"""The guard's input and output format, shared by guard SFT, the generator loop and evaluation.

Input: chat messages rendered from a prompt file (``configs/prompts/guard.yaml`` by default) with the
taxonomy, the user prompt ``text`` and, for response-level rows, the assistant ``response``.

Output (LlamaGuard-style, see REFERENCE.md): line 1 ``safe`` or ``unsafe``; for ``unsafe`` line 2 the
micro category code (``B5``). Short, parseable, and the probability of the first answer token being
``unsafe`` is a score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.core.config import CONFIGS
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import Taxonomy, categories_block

DEFAULT_GUARD_PROMPT = CONFIGS / "prompts" / "guard.yaml"


class GuardFormatError(ValueError):
    """A guard answer that is not ``safe`` / ``unsafe`` (+ a known micro code)."""


class GuardPrompt:
    """Row (``text``, optional ``response``) -> chat messages; picklable for Ray workers."""

    def __init__(self, taxonomy: Taxonomy, path: str | Path = DEFAULT_GUARD_PROMPT):
        self.prompt = ChatPrompt(path)
        self.categories = categories_block(taxonomy)

    @property
    def digest(self) -> str:
        return self.prompt.digest

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({"text": row["text"], "response": row.get("response") or "",
                                   "categories": self.categories})


def guard_answer(label: str, micro: str | None) -> str:
    """The target answer: ``safe``, or ``unsafe\\n<micro>`` (``unsafe`` alone without a code)."""
    if label == SAFE:
        return SAFE
    if label == UNSAFE:
        return f"{UNSAFE}\n{micro}" if micro else UNSAFE
    raise GuardFormatError(f"label {label!r} is neither {SAFE!r} nor {UNSAFE!r}")


def parse_guard_answer(text: str, micro_codes: set[str] | frozenset[str]) -> tuple[str, str | None]:
    """``"unsafe\\nB5"`` -> ``("unsafe", "B5")``; ``"safe"`` -> ``("safe", None)``.

    The first non-empty line decides the label (case and surrounding punctuation ignored). A code on
    the second line that is not in ``micro_codes`` is reported as ``None`` (the label still counts).
    Raises :class:`GuardFormatError` when the first line is neither word.
    """
    lines = [ln.strip().strip("*`：:.。 ").lower() for ln in (text or "").strip().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or lines[0] not in (SAFE, UNSAFE):
        raise GuardFormatError(f"guard answer does not start with safe/unsafe: {(text or '')[:80]!r}")
    label = lines[0]
    micro = None
    if label == UNSAFE and len(lines) > 1:
        code = lines[1].split(",")[0].strip().upper()
        micro = code if code in micro_codes else None
    return label, micro
