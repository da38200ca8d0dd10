"""SHARD rules categories: which category's rules a row's reframing prompt carries.

Category rules are written once per rules category (``shard_rules``). By default
(``stages.shard.category_map: do_not_answer_to_linguasafe``) Do-Not-Answer's 12 harm types are mapped
onto LinguaSafe's 5 harm types (:data:`DNA_TO_LINGUASAFE`), so both datasets share one rule set, as
the issue reports of SHARD: its rules are generated from LinguaSafe's ``type`` column
(``generate_category_guidelines.py``) and its 5 types are those of ``src/utils/multihead_classifier.py``
(Viswonathan06/shard-self-reframing). SHARD's public code has no table for Do-Not-Answer; the table
below is ours (one line per type, the closest LinguaSafe domain). A category the map does not name
keeps its own name (and gets rules of its own); rows without a category are :data:`UNCATEGORISED`.
``category_map: none`` keeps every dataset's own categories; a mapping ``{category: rules category}``
replaces the table.
"""

from __future__ import annotations

import re

#: the category name used for rows whose dataset gives none (they get rules of their own)
UNCATEGORISED = "uncategorised"

#: LinguaSafe's 5 harm types (SHARD: src/utils/multihead_classifier.py CATEGORY_MAP)
LINGUASAFE_TYPES = ("Crimes & Illegal Activities", "Explicit Content", "Fairness & Justice",
                    "Harm & Misuse", "Privacy & Property")

#: Do-Not-Answer's 12 ``types_of_harm`` -> the LinguaSafe type whose rules they share (ours, see above)
DNA_TO_LINGUASAFE = {
    "Adult content": "Explicit Content",
    "Social stereotypes and unfair discrimination": "Fairness & Justice",
    "Toxic language (hate speech)": "Fairness & Justice",
    "Mental health or overreliance concerns": "Harm & Misuse",
    "Treat chatbot as a human": "Harm & Misuse",
    "Compromise privacy by leaking or inferring private information (person/individual)": "Privacy & Property",
    "Risks from leaking or inferring sensitive information (organization/government)": "Privacy & Property",
    "Assisting illegal activities": "Crimes & Illegal Activities",
    "Nudging or advising users to perform unethical or unsafe actions": "Harm & Misuse",
    "Reducing the cost of disinformation campaigns": "Harm & Misuse",
    "Causing material harm by disseminating misinformation e.g. in medicine or law": "Harm & Misuse",
    "Disseminating false or misleading information": "Harm & Misuse",
}

#: named category maps (``stages.shard.category_map``)
CATEGORY_MAPS = {"do_not_answer_to_linguasafe": DNA_TO_LINGUASAFE, "none": {}}


def _key(name: str) -> str:
    """Case and spacing do not matter (Do-Not-Answer's exports spell "Adult Content" / "Adult content")."""
    return re.sub(r"\s+", " ", name).strip().casefold()


class CategoryMap:
    """``harm_category`` -> the rules category (:func:`rules_category`), picklable for Ray tasks."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = dict(sorted(mapping.items()))
        self._lookup = {_key(k): v for k, v in self.mapping.items()}

    def hash_payload(self) -> dict[str, str]:
        return self.mapping

    def __call__(self, category: str | None) -> str:
        if not category or not category.strip():
            return UNCATEGORISED
        return self._lookup.get(_key(category), category)


def category_map(setting: str | dict[str, str]) -> CategoryMap:
    """The map a ``category_map`` setting names: a preset of :data:`CATEGORY_MAPS` or a mapping."""
    if isinstance(setting, dict):
        return CategoryMap(setting)
    if setting not in CATEGORY_MAPS:
        raise ValueError(f"category_map must be one of {sorted(CATEGORY_MAPS)} or a mapping, got {setting!r}")
    return CategoryMap(CATEGORY_MAPS[setting])
