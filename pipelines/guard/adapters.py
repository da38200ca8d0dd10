"""Guard adapters of guard evaluation (:mod:`pipelines.evaluation.guard_eval`): an adapter turns a row
into the guard's messages and its answer into a :class:`GuardAnswer`:

- ``chillguard``: our prompt and answer format (:mod:`pipelines.guard.format`);
- ``llamaguard``: the plain conversation (the model's own chat template builds its prompt);
  line 1 ``safe`` / ``unsafe``, line 2 comma-separated S-codes;
- ``qwen3guard_strict`` / ``qwen3guard_loose``: the plain conversation; ``Safety: Safe|Unsafe|
  Controversial``, ``Categories: ...``, ``Refusal: Yes|No``; Controversial counts as unsafe
  (strict) or safe (loose).

The scored adapters (:data:`SCORED_ADAPTERS`) answer ``safe`` / ``unsafe`` first, so the first answer
token's probability is a score (:mod:`pipelines.guard.scores`). An answer its adapter cannot
read raises :class:`GuardParseError`; :meth:`GuardAdapter.answer_pattern` is the regex of well-formed
answers that ``constrained: true`` restricts the guard to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipelines.core.parsing import strip_thinking
from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import Taxonomy
from pipelines.guard.format import GuardFormatError, GuardPrompt, parse_guard_answer

GUARD_ADAPTERS = ("chillguard", "llamaguard", "qwen3guard_strict", "qwen3guard_loose")


#: adapters whose first answer token is ``safe`` / ``unsafe``, so its probability is a score
SCORED_ADAPTERS = ("chillguard", "llamaguard")

RESPONSE = "response"  # the level that judges the assistant response


class GuardParseError(ValueError):
    """A guard answer that its adapter cannot read."""


@dataclass(frozen=True)
class GuardAnswer:
    """A guard's answer, read: ``label`` is safe/unsafe after the adapter's mapping."""

    label: str
    categories: tuple[str, ...] = ()
    micro: str = ""          # our taxonomy's code, when the guard speaks our taxonomy
    raw_label: str = ""      # the guard's own verdict word
    refusal: str = ""        # yes / no when the guard reports it


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The plain chat: the user text, plus the assistant response for response-level rows."""
    messages = [{"role": "user", "content": row["text"]}]
    if row.get("response"):
        messages.append({"role": "assistant", "content": row["response"]})
    return messages


def _lines(text: str) -> list[str]:
    return [line.strip() for line in strip_thinking(text or "").splitlines() if line.strip()]


class GuardAdapter:
    """Row -> messages; answer text -> :class:`GuardAnswer`. Instances are pickled to Ray workers."""

    name: ClassVar[str]
    scored: ClassVar[bool] = False  # first answer token is safe / unsafe
    names_micro: ClassVar[bool] = False  # answers with our taxonomy's micro codes (category scored)

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return conversation(row)

    def parse(self, text: str) -> GuardAnswer:
        raise NotImplementedError

    def answer_pattern(self, level: str) -> str:
        """A regex of well-formed answers, for constrained decoding."""
        raise NotImplementedError

    def hash_payload(self) -> dict[str, Any]:
        return {"adapter": self.name}


class ChillGuardAdapter(GuardAdapter):
    """Our guard: the prompt of :class:`GuardPrompt`, answers ``safe`` or ``unsafe\\n<micro>``."""

    name = "chillguard"
    scored = True
    names_micro = True

    def __init__(self, taxonomy: Taxonomy, template: str | Path):
        self.prompt = GuardPrompt(taxonomy, template)
        self.codes = frozenset(taxonomy.micro_codes)
        self.ordered_codes = list(taxonomy.micro_codes)

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt(row)

    def parse(self, text: str) -> GuardAnswer:
        try:
            label, micro = parse_guard_answer(strip_thinking(text or ""), self.codes)
        except GuardFormatError as exc:
            raise GuardParseError(str(exc)) from None
        return GuardAnswer(label=label, categories=(micro,) if micro else (), micro=micro or "", raw_label=label)

    def answer_pattern(self, level: str) -> str:
        return f"({SAFE}|{UNSAFE}\\n({'|'.join(self.ordered_codes)}))"

    def answers(self) -> list[str]:
        """Every well-formed answer, the strings :meth:`answer_pattern` matches: what the served guard's
        one-pass scoring continues a constrained answer towards
        (:func:`pipelines.serve.moderation.continuation_pattern`)."""
        return [SAFE] + [f"{UNSAFE}\n{code}" for code in self.ordered_codes]

    def hash_payload(self) -> dict[str, Any]:
        return {"adapter": self.name, "template_digest": self.prompt.digest, "categories": self.prompt.categories}


_S_CODE = re.compile(r"^S\d{1,2}$")


class LlamaGuardAdapter(GuardAdapter):
    """LlamaGuard-style: line 1 ``safe`` / ``unsafe``, line 2 comma-separated codes (``S1,S10``).

    Codes that are not ``S<number>`` are ignored (the label still counts), as our parser ignores an
    unknown micro code."""

    name = "llamaguard"
    scored = True

    def parse(self, text: str) -> GuardAnswer:
        lines = _lines(text)
        first = lines[0].lower().strip(".:：。*`") if lines else ""
        if first not in (SAFE, UNSAFE):
            raise GuardParseError(f"LlamaGuard answer does not start with safe/unsafe: {(text or '')[:80]!r}")
        codes: tuple[str, ...] = ()
        if first == UNSAFE and len(lines) > 1:
            codes = tuple(c for c in (p.strip().upper() for p in lines[1].split(",")) if _S_CODE.match(c))
        return GuardAnswer(label=first, categories=codes, raw_label=first)

    def answer_pattern(self, level: str) -> str:
        return f"({SAFE}|{UNSAFE}\\nS[0-9]{{1,2}}(,S[0-9]{{1,2}})*)"


_SAFETY = re.compile(r"^safety\s*[:：]\s*(safe|unsafe|controversial)\b", re.IGNORECASE | re.MULTILINE)
_CATEGORIES = re.compile(r"^categories\s*[:：]\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(r"^refusal\s*[:：]\s*(yes|no)\b", re.IGNORECASE | re.MULTILINE)
CONTROVERSIAL = "controversial"


class Qwen3GuardAdapter(GuardAdapter):
    """Qwen3Guard: ``Safety: Safe|Unsafe|Controversial``, ``Categories: a, b`` (``None`` for none),
    and for responses ``Refusal: Yes|No``. ``Controversial`` maps to ``controversial_as``."""

    scored = False

    def __init__(self, name: str, controversial_as: str):
        self.name = name
        self.controversial_as = controversial_as

    def parse(self, text: str) -> GuardAnswer:
        body = "\n".join(_lines(text))
        safety = _SAFETY.search(body)
        if not safety:
            raise GuardParseError(f"Qwen3Guard answer has no 'Safety: Safe|Unsafe|Controversial' line: "
                                  f"{(text or '')[:80]!r}")
        raw = safety.group(1).lower()
        label = self.controversial_as if raw == CONTROVERSIAL else raw
        categories: tuple[str, ...] = ()
        found = _CATEGORIES.search(body)
        if found:
            categories = tuple(c.strip() for c in found.group(1).split(",")
                               if c.strip() and c.strip().lower() != "none")
        refusal = _REFUSAL.search(body)
        return GuardAnswer(label=label, categories=categories, raw_label=raw,
                           refusal=refusal.group(1).lower() if refusal else "")

    def answer_pattern(self, level: str) -> str:
        refusal = "\\nRefusal: (Yes|No)" if level == RESPONSE else ""
        return f"Safety: (Safe|Unsafe|Controversial)\\nCategories: [^\\n]{{1,100}}{refusal}"

    def hash_payload(self) -> dict[str, Any]:
        return {"adapter": self.name, "controversial_as": self.controversial_as}


def make_adapter(name: str, taxonomy: Taxonomy, template: str | Path) -> GuardAdapter:
    """The adapter called ``name`` (one of :data:`GUARD_ADAPTERS`)."""
    if name == "chillguard":
        return ChillGuardAdapter(taxonomy, template)
    if name == "llamaguard":
        return LlamaGuardAdapter()
    if name in ("qwen3guard_strict", "qwen3guard_loose"):
        return Qwen3GuardAdapter(name, UNSAFE if name.endswith("strict") else SAFE)
    raise ValueError(f"unknown guard adapter {name!r}")
