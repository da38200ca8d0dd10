"""The categories a ``/v1/moderations`` answer names: our codes or OpenAI's (pure functions, no Ray).

Two schemes, picked per request by :func:`select_categories`:

- ``chillguard``: every micro and macro code of the taxonomy, and ``unspecified``. Scores: micro
  code ``c`` gets ``score × share(c)`` (``share``: the probability the guard gives to writing ``c`` on
  its code line, :func:`pipelines.serve.moderation.code_shares`); a macro code the sum of its micro
  codes' scores, at most ``score``. Flags: the named micro code and its macro.
- ``openai``: OpenAI's 13 categories (:data:`~pipelines.serve.openai_mapping.OPENAI_CATEGORIES`) and
  ``unspecified``, through the mapping of ``configs/taxonomy_openai.yaml``. Category ``k`` scores
  ``min(score, Σ_{c maps to k} score × share(c))``: the probability of a flag with a code that counts in
  ``k``. Flags: the categories the named code maps to.

In both, ``unspecified`` is flagged iff the text is flagged and no other category of the scheme is: the
guard gave no valid code (the score decided, or the answer had no known code on its code line) or, with
OpenAI's categories, the code maps to none (``openai: []``). Its score is
``score × max(0, 1 − Σ_{c counted} share(c))``, the part of P(unsafe) no category of the scheme accounts
for (counted: every micro code in ours; in OpenAI's the codes that map to at least one category). So in
both schemes ``flagged == any(categories.values())``: a flagged text names at least one category.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pipelines.core.taxonomy import Taxonomy
from pipelines.serve.moderation import Verdict
from pipelines.serve.openai_mapping import OPENAI_CATEGORIES, OpenAIMapping

#: the two category schemes of /v1/moderations
CHILLGUARD, OPENAI = "chillguard", "openai"
SCHEMES = (CHILLGUARD, OPENAI)
#: the category of a flagged text that names no other category of its scheme
UNSPECIFIED = "unspecified"


def select_categories(model: str | None, *, served_name: str, default: str, openai_models: Sequence[str]) -> str:
    """The scheme of one request from the ``model`` it names: one of ``openai_models`` (OpenAI's model
    names and configured aliases) → ``openai``; the served model's name → ``chillguard``; no model or any
    other name → ``default`` (the server's ``categories`` setting)."""
    if model in openai_models:
        return OPENAI
    if model == served_name:
        return CHILLGUARD
    return default


def _unspecified_score(verdict: Verdict, counted: Iterable[str]) -> float:
    """``score × max(0, 1 − Σ_{c in counted} share(c))``."""
    return round(verdict.score * max(0.0, 1.0 - sum(verdict.shares.get(code, 0.0) for code in counted)), 6)


def category_scores(verdict: Verdict, taxonomy: Taxonomy) -> dict[str, float]:
    """Our scheme's scores: every micro code ``score × share``, every macro code the sum of its micro
    codes' (at most ``score``: shares of one position sum to at most 1), then ``unspecified``."""
    micro = {code: round(verdict.score * verdict.shares.get(code, 0.0), 6) for code in taxonomy.micro_codes}
    macro = {m.code: round(min(verdict.score, sum(micro[u.code] for u in m.micros)), 6) for m in taxonomy.macros}
    return {**micro, **macro, UNSPECIFIED: _unspecified_score(verdict, taxonomy.micro_codes)}


def flagged_categories(verdict: Verdict, taxonomy: Taxonomy) -> dict[str, bool]:
    """Our scheme's flags: the named micro code and its macro when the verdict is unsafe; ``unspecified``
    when it is unsafe without a code."""
    named = {verdict.micro, taxonomy.macro_of(verdict.micro)} if verdict.flagged and verdict.micro else set()
    flags = {code: code in named for code in [*taxonomy.micro_codes, *taxonomy.macro_codes]}
    return {**flags, UNSPECIFIED: verdict.flagged and not named}


def openai_category_scores(verdict: Verdict, mapping: OpenAIMapping) -> dict[str, float]:
    """OpenAI's scheme's scores: category ``k`` ``min(score, Σ_{c maps to k} score × share(c))``, then
    ``unspecified`` (the share of no code that maps somewhere)."""
    scores = {category: round(min(verdict.score, sum((verdict.score * verdict.shares.get(code, 0.0)
                                                       for code in mapping.codes_of(category)), 0.0)), 6)
              for category in OPENAI_CATEGORIES}
    mapped = [code for code, targets in mapping.targets.items() if targets]
    return {**scores, UNSPECIFIED: _unspecified_score(verdict, mapped)}


def openai_flagged_categories(verdict: Verdict, mapping: OpenAIMapping) -> dict[str, bool]:
    """OpenAI's scheme's flags: the categories the named code maps to when the verdict is unsafe;
    ``unspecified`` when it is unsafe and that is none (no code, or a code mapped to ``[]``)."""
    named = set(mapping.targets.get(verdict.micro, ())) if verdict.flagged and verdict.micro else set()
    return {**{category: category in named for category in OPENAI_CATEGORIES},
            UNSPECIFIED: verdict.flagged and not named}


def moderation_result(verdict: Verdict, taxonomy: Taxonomy, openai: OpenAIMapping | None = None) -> dict[str, Any]:
    """One entry of the OpenAI moderations ``results`` list: ``flagged``, ``categories``,
    ``category_scores`` and ``category_applied_input_types`` (``["text"]`` for every key), with our codes,
    or with OpenAI's categories through ``openai``, the mapping, when given."""
    if openai is None:
        categories, scores = flagged_categories(verdict, taxonomy), category_scores(verdict, taxonomy)
    else:
        categories, scores = openai_flagged_categories(verdict, openai), openai_category_scores(verdict, openai)
    return {"flagged": verdict.flagged, "categories": categories, "category_scores": scores,
            "category_applied_input_types": {key: ["text"] for key in categories}}
