"""OpenAI's moderation categories and the mapping of our micro codes onto them (pure, no Ray).

OpenAI's ``/v1/moderations`` answers 13 categories (:data:`OPENAI_CATEGORIES`, the keys of its
``categories``, ``category_scores`` and ``category_applied_input_types``, in the order of its API
reference and of the ``openai`` client's ``types.Moderation``); its moderation models are
:data:`OPENAI_MODELS`. ``configs/taxonomy_openai.yaml`` maps each of the taxonomy's micro codes onto
a list of those categories, with a one-line ``why`` each; an empty list says that no OpenAI category
covers the code (a text flagged with it answers ``unspecified``: :mod:`pipelines.serve.categories`).

The file is checked on load (:func:`parse_openai_mapping`): every micro code of the taxonomy has an
entry, no entry names a code the taxonomy lacks, every target is one of OpenAI's categories (once),
every ``why`` is a non-empty line. A problem is one :class:`OpenAIMappingError` line naming the file and
the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.config import CONFIGS, ConfigError
from pipelines.core.yaml_files import read_yaml_file

#: OpenAI's moderation categories, as its API reference lists them
OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic")
#: OpenAI's moderation model names (the ``openai`` client's ``ModerationModel``)
OPENAI_MODELS: tuple[str, ...] = ("omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest",
                                  "text-moderation-stable")
DEFAULT_OPENAI_MAPPING = CONFIGS / "taxonomy_openai.yaml"


class OpenAIMappingError(ConfigError):
    """The mapping file is malformed, or leaves out or misnames a code or a category."""


@dataclass(frozen=True)
class OpenAIMapping:
    """``targets[code]``: the OpenAI categories micro ``code`` counts in (empty: none);
    ``why[code]``: the file's one-line reason."""

    targets: dict[str, tuple[str, ...]]
    why: dict[str, str]

    def codes_of(self, category: str) -> list[str]:
        """The micro codes that count in OpenAI ``category``."""
        return [code for code, targets in self.targets.items() if category in targets]


def parse_openai_mapping(data: Any, micro_codes: Sequence[str], source: str) -> OpenAIMapping:
    """The mapping in ``data`` (the file's YAML: ``{codes: {A1: {openai: [...], why: "..."}, ...}}``),
    checked against the taxonomy's ``micro_codes`` (see the module docstring); ``source`` names the file in
    errors. Codes keep the taxonomy's order."""
    codes = data.get("codes") if isinstance(data, dict) else None
    if not isinstance(codes, dict):
        raise OpenAIMappingError(f"{source}: expected a mapping `codes:` of micro code -> {{openai: [...], why: ...}}")
    extra = sorted(map(str, set(data) - {"codes"}))
    if extra:
        raise OpenAIMappingError(f"{source}: unknown top-level key(s) {', '.join(extra)} (only `codes`)")
    unknown = [str(code) for code in codes if code not in micro_codes]
    if unknown:
        raise OpenAIMappingError(f"{source}: {unknown[0]} is not a micro code of the taxonomy")
    missing = [code for code in micro_codes if code not in codes]
    if missing:
        raise OpenAIMappingError(f"{source}: micro code {missing[0]} is not mapped (every micro code needs "
                                 f"`openai: [...]` and `why`; unmapped: {', '.join(missing)})")
    targets, why = {}, {}
    for code in micro_codes:
        entry = codes[code]
        if not isinstance(entry, dict) or set(entry) != {"openai", "why"}:
            keys = ", ".join(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise OpenAIMappingError(f"{source}: {code} needs exactly `openai` and `why` (got {keys})")
        listed, reason = entry["openai"], entry["why"]
        if not isinstance(listed, list) or not all(isinstance(t, str) for t in listed):
            raise OpenAIMappingError(f"{source}: {code}: `openai` must be a list of OpenAI categories ([] for none)")
        for target in listed:
            if target not in OPENAI_CATEGORIES:
                raise OpenAIMappingError(f"{source}: {code}: {target!r} is not an OpenAI moderation category "
                                         f"({', '.join(OPENAI_CATEGORIES)})")
        if len(set(listed)) != len(listed):
            raise OpenAIMappingError(f"{source}: {code}: a category is listed twice in {listed}")
        if not isinstance(reason, str) or not reason.strip() or "\n" in reason.strip():
            raise OpenAIMappingError(f"{source}: {code}: `why` must be one non-empty line")
        targets[code], why[code] = tuple(listed), reason.strip()
    return OpenAIMapping(targets=targets, why=why)


def load_openai_mapping(path: str | Path, micro_codes: Sequence[str]) -> OpenAIMapping:
    """Read and check the mapping file ``path`` against the taxonomy's ``micro_codes``."""
    data = read_yaml_file(path, "OpenAI category mapping", OpenAIMappingError)
    return parse_openai_mapping(data, list(micro_codes), str(path))
