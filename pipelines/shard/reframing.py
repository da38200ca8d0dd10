"""SHARD prompt reframing: the guidelines, the JSON answer P2 and its validation.

The reframing step rewrites a sensitive prompt P1 into P2, a JSON object with four fields
(:data:`FIELDS`): the reformulated prompt, the response mode (one of :data:`RESPONSE_MODES`: how much
of the request had to be reformulated - none, some, or the request redirected - as in SHARD), the
component that was reformulated (empty when nothing was, as SHARD allows), and the benign need that
is preserved. An answer that is not such
an object is asked again (the stage's ``retries``), then ends in ``error`` with the problem
(:func:`parse_reframing`).

Which guidance the reframing prompt carries is the ablation (:data:`GUIDELINE_MODES`):

- ``full``: the universal guidelines and the category-specific rules of the row's harm category
  (written by an LLM from the universal ones, one request per category);
- ``universal_only``: the universal guidelines only;
- ``instructions_only``: only the task instructions (what the four fields mean).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.core.parsing import strip_thinking
from pipelines.shard.categories import UNCATEGORISED  # noqa: F401  (re-exported: rows without a category)

GUIDELINE_MODES = ("full", "universal_only", "instructions_only")

RESPONSE_MODES = ("direct_answer", "soft_reframe", "acknowledge_and_redirect")
FIELDS = ("reformulated_prompt", "response_mode", "reformulated_component", "preserved_benign_need")
#: fields that may be empty: nothing was reformulated
MAY_BE_EMPTY = ("reformulated_component",)


@dataclass(frozen=True)
class Guidelines:
    """The universal guidelines (``configs/prompts/shard_guidelines.yaml``): titled paragraphs."""

    universal: tuple[tuple[str, str], ...]
    digest: str

    def hash_payload(self) -> str:
        return self.digest

    def text(self) -> str:
        """The guidelines as numbered prompt text."""
        return "\n".join(f"{i}. {title}: {body}" for i, (title, body) in enumerate(self.universal, 1))


def load_guidelines(path: str | Path) -> Guidelines:
    """Read and check the guidelines file: ``universal`` is a non-empty list of ``{title, text}``."""
    import hashlib

    raw = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(raw)
    items = data.get("universal") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"guidelines file {path}: 'universal' must be a non-empty list")
    universal = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"title", "text"} or not all(
                isinstance(item[k], str) and item[k].strip() for k in ("title", "text")):
            raise ValueError(f"guidelines file {path}: universal[{i}] must have a non-empty title and text")
        universal.append((item["title"].strip(), " ".join(item["text"].split())))
    return Guidelines(tuple(universal), hashlib.sha256(raw.encode()).hexdigest()[:16])


def guidance(mode: str, guidelines: Guidelines, category_rules: str = "", category: str = "") -> dict[str, str]:
    """Template variables of the reframing prompt for ablation ``mode``: ``universal``,
    ``category_rules`` and the harm ``category`` are empty where the mode leaves them out (SHARD shows
    the category with its rules only, in mode ``full``)."""
    if mode not in GUIDELINE_MODES:
        raise ValueError(f"guidelines mode must be one of {GUIDELINE_MODES}, got {mode!r}")
    full = mode == "full"
    return {"universal": guidelines.text() if mode != "instructions_only" else "",
            "category_rules": category_rules if full else "", "category": category if full else ""}


def reframing_schema(max_chars: int) -> dict:
    """JSON schema of P2 for constrained decoding; strings are bounded so that an answer always
    closes within the token budget."""
    text = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {"type": "object",
            "properties": {"reformulated_prompt": text, "response_mode": {"enum": list(RESPONSE_MODES)},
                           "reformulated_component": {**text, "minLength": 0}, "preserved_benign_need": text},
            "required": list(FIELDS), "additionalProperties": False}


class ReframingError(ValueError):
    """An answer that is not a valid P2; ``reason`` is a short code for the stage's error rows."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _first_object(text: str) -> dict:
    """The first JSON object in ``text``: code fences and text around it are tolerated; raw control
    characters inside strings too (``strict=False``: models write literal newlines)."""
    start = text.find("{")
    if start < 0:
        raise ReframingError("invalid_json", "no JSON object in the answer")
    try:
        value, _ = json.JSONDecoder(strict=False).raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise ReframingError("invalid_json", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ReframingError("invalid_json", "the JSON value is not an object")
    return value


def parse_reframing(text: str) -> dict[str, str]:
    """A reframing answer -> the four fields (stripped), or :class:`ReframingError` with reason
    ``invalid_json``, ``missing_field`` (a field absent or not a string), ``empty_field`` (any but
    ``reformulated_component``, which is empty when nothing was reformulated) or
    ``invalid_response_mode``. Keys beyond the four are ignored."""
    value = _first_object(strip_thinking(text or ""))
    missing = [f for f in FIELDS if not isinstance(value.get(f), str)]
    if missing:
        raise ReframingError("missing_field", f"fields missing or not strings: {missing}")
    fields = {f: value[f].strip() for f in FIELDS}
    empty = [f for f in FIELDS if not fields[f] and f not in MAY_BE_EMPTY]
    if empty:
        raise ReframingError("empty_field", f"empty fields: {empty}")
    if fields["response_mode"] not in RESPONSE_MODES:
        raise ReframingError("invalid_response_mode",
                             f"response_mode {fields['response_mode']!r} is not one of {RESPONSE_MODES}")
    return fields
