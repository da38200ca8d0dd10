"""The categories of a /v1/moderations answer in both schemes, `unspecified`, and which scheme a request
gets (pure: no Ray)."""

from __future__ import annotations

import pytest

from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import load_taxonomy
from pipelines.serve.categories import (
    CHILLGUARD,
    OPENAI,
    SCHEMES,
    UNSPECIFIED,
    category_scores,
    moderation_result,
    openai_category_scores,
    select_categories,
)
from pipelines.serve.moderation import Verdict
from pipelines.serve.openai_mapping import (
    DEFAULT_OPENAI_MAPPING,
    OPENAI_CATEGORIES,
    OPENAI_MODELS,
    load_openai_mapping,
)

TAXONOMY = load_taxonomy()
MAPPING = load_openai_mapping(DEFAULT_OPENAI_MAPPING, TAXONOMY.micro_codes)
OPENAI_KEYS = [*OPENAI_CATEGORIES, UNSPECIFIED]


def verdict(micro: str | None, score: float = 0.9, shares: dict[str, float] | None = None,
            label: str = UNSAFE) -> Verdict:
    shares = {micro: 1.0} if shares is None and micro else (shares or {})
    return Verdict(label=label, score=score, scored=True, micro=micro, shares=shares, raw="")


def flagged(result: dict) -> set[str]:
    return {key for key, on in result["categories"].items() if on}


@pytest.mark.parametrize("code", TAXONOMY.micro_codes)
def test_every_code_maps_and_names_a_category_in_both_schemes(code):
    ours = moderation_result(verdict(code), TAXONOMY)
    assert flagged(ours) == {code, TAXONOMY.macro_of(code)}
    theirs = moderation_result(verdict(code), TAXONOMY, MAPPING)
    assert flagged(theirs) == (set(MAPPING.targets[code]) or {UNSPECIFIED})
    for result in (ours, theirs):
        assert result["flagged"] is True and flagged(result)


def test_openai_answers_carry_all_13_keys_and_unspecified():
    for v in (verdict("B5"), verdict(None), verdict(None, 0.1, label=SAFE), verdict("E1")):
        result = moderation_result(v, TAXONOMY, MAPPING)
        for part in ("categories", "category_scores", "category_applied_input_types"):
            assert list(result[part]) == OPENAI_KEYS, part
        assert all(type(on) is bool for on in result["categories"].values())
        assert all(type(s) is float and 0.0 <= s <= 1.0 for s in result["category_scores"].values())
        assert all(kinds == ["text"] for kinds in result["category_applied_input_types"].values())
        assert result["flagged"] == any(result["categories"].values())


def test_flagged_without_a_code_names_unspecified_in_both_schemes():
    no_code = verdict(None, score=0.7)
    for mapping in (None, MAPPING):
        result = moderation_result(no_code, TAXONOMY, mapping)
        assert result["flagged"] and flagged(result) == {UNSPECIFIED}
        assert result["category_scores"][UNSPECIFIED] == pytest.approx(0.7)  # no code accounts for any of it
    # a code the guard named but OpenAI has no category for (E1): unspecified there, E1 and E in ours
    assert flagged(moderation_result(verdict("E1"), TAXONOMY, MAPPING)) == {UNSPECIFIED}
    assert flagged(moderation_result(verdict("E1"), TAXONOMY)) == {"E1", "E"}
    # a safe verdict names nothing, in either scheme
    safe = verdict(None, score=0.2, label=SAFE)
    assert not flagged(moderation_result(safe, TAXONOMY)) and not flagged(moderation_result(safe, TAXONOMY, MAPPING))


def test_our_scheme_is_unchanged_for_the_codes():
    """Every micro and macro code, as before issue 32, with `unspecified` after them."""
    result = moderation_result(verdict("B5", 0.8, {"B5": 0.5, "B4": 0.25, "A1": 0.125}), TAXONOMY)
    assert list(result["categories"]) == [*TAXONOMY.micro_codes, *TAXONOMY.macro_codes, UNSPECIFIED]
    assert flagged(result) == {"B5", "B"}
    scores = result["category_scores"]
    assert (scores["B5"], scores["B4"], scores["A1"], scores["C1"]) == (0.4, 0.2, 0.1, 0.0)
    assert (scores["B"], scores["A"]) == (0.6, 0.1)
    assert scores[UNSPECIFIED] == pytest.approx(0.8 * 0.125)
    assert category_scores(verdict("B5", 0.8, {"B5": 0.5, "B4": 0.25, "A1": 0.125}), TAXONOMY) == scores


def test_openai_scores_sum_the_shares_of_the_codes_that_count():
    v = verdict("B5", 0.8, {"B5": 0.5, "B4": 0.25, "E1": 0.125})
    scores = openai_category_scores(v, MAPPING)
    assert (scores["hate"], scores["harassment"], scores["illicit"]) == (0.4, 0.2, 0.0)
    # E1 maps to no category: its share stays with unspecified
    assert scores[UNSPECIFIED] == pytest.approx(0.8 * 0.25)
    # D5 counts in harassment and illicit; C1 in illicit
    both = openai_category_scores(verdict("D5", 1.0, {"D5": 0.5, "C1": 0.25}), MAPPING)
    assert (both["harassment"], both["illicit"]) == (0.5, 0.75)
    # never above P(unsafe)
    assert openai_category_scores(verdict("A8", 0.5, {"A8": 0.75, "C5": 0.5}), MAPPING)["illicit"] == 0.5


def test_the_openai_client_reads_openai_keys_by_attribute():
    """The answer as the `openai` client parses it: leniently (its default, `construct_type`) and with
    `_strict_response_validation` (pydantic validation)."""
    pytest.importorskip("openai")
    from openai._models import construct_type
    from openai.types import ModerationCreateResponse

    body = {"id": "modr-1", "model": "omni-moderation-latest",
            "results": [moderation_result(verdict("A4"), TAXONOMY, MAPPING),
                        moderation_result(verdict(None), TAXONOMY, MAPPING)]}
    for parsed in (construct_type(type_=ModerationCreateResponse, value=body),
                   ModerationCreateResponse.model_validate(body)):
        violent, unnamed = parsed.results
        assert violent.flagged and violent.categories.illicit_violent and violent.categories.violence
        assert not violent.categories.hate and not violent.categories.self_harm_intent
        assert violent.category_scores.illicit == 0.9 and violent.category_scores.violence_graphic == 0.0
        assert violent.category_applied_input_types.sexual_minors == ["text"]
        # `unspecified` is an extra (the lenient parse keeps the slashed keys among the extras too)
        assert violent.categories.model_extra[UNSPECIFIED] is False
        assert unnamed.flagged and unnamed.categories.model_extra[UNSPECIFIED] is True
        assert not any(getattr(unnamed.categories, key.replace("/", "_").replace("-", "_"))
                       for key in OPENAI_CATEGORIES)


@pytest.mark.parametrize("model,default,scheme", [
    ("omni-moderation-latest", CHILLGUARD, OPENAI),
    ("text-moderation-stable", CHILLGUARD, OPENAI),
    ("guard", OPENAI, CHILLGUARD),        # the served name keeps our codes whatever the default
    ("guard", CHILLGUARD, CHILLGUARD),
    (None, CHILLGUARD, CHILLGUARD),       # no model, or another name: the server's setting
    (None, OPENAI, OPENAI),
    ("someone-else", CHILLGUARD, CHILLGUARD),
    ("someone-else", OPENAI, OPENAI),
    ("my-alias", CHILLGUARD, OPENAI),     # an alias configured in openai_models
])
def test_which_categories_a_request_gets(model, default, scheme):
    assert scheme in SCHEMES
    assert select_categories(model, served_name="guard", default=default,
                             openai_models=[*OPENAI_MODELS, "my-alias"]) == scheme
