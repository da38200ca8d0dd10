"""Per-request policy: checking and expanding it, applying it to a verdict, and what the two routes answer
under it, in both category schemes (pure: no Ray)."""

from __future__ import annotations

import pytest

from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import load_taxonomy
from pipelines.serve.categories import UNSPECIFIED, moderation_result
from pipelines.serve.moderation import Verdict, guard_result
from pipelines.serve.openai_mapping import DEFAULT_OPENAI_MAPPING, OPENAI_CATEGORIES, load_openai_mapping
from pipelines.serve.policy import (
    PolicyError,
    apply_policy,
    expand_policy,
    guard_policy_fields,
    moderation_policy_fields,
    parse_policy,
    validate_policy,
)

TAXONOMY = load_taxonomy()
MAPPING = load_openai_mapping(DEFAULT_OPENAI_MAPPING, TAXONOMY.micro_codes)
SCHEMES = {"chillguard": None, "openai": MAPPING}


def verdict(micro: str | None, score: float = 0.9, label: str = UNSAFE) -> Verdict:
    shares = {micro: 0.75, "A1": 0.125} if micro else {}
    return Verdict(label=label, score=score, scored=True, micro=micro, shares=shares, raw="")


def answer(v: Verdict, policy, mapping=None) -> dict:
    """One /v1/moderations result as the ingress builds it."""
    judged = apply_policy(v, policy)
    return {**moderation_result(judged, TAXONOMY, mapping), **moderation_policy_fields(judged, policy)}


def flagged(result: dict) -> set[str]:
    return {key for key, on in result["categories"].items() if on}


def test_a_macro_code_stands_for_its_micro_codes_in_taxonomy_order():
    b = [u.code for u in TAXONOMY.macro("B").micros]
    assert len(b) == 9 and b[0] == "B1"
    assert expand_policy(["B"], TAXONOMY) == tuple(b)
    # micro and macro codes together, repeated, out of order: each micro code once, in taxonomy order
    assert expand_policy(["D2", "B", "A1", "B3", "D2"], TAXONOMY) == ("A1", *b, "D2")
    assert expand_policy([*TAXONOMY.macro_codes], TAXONOMY) == tuple(TAXONOMY.micro_codes)
    assert parse_policy(["E"], TAXONOMY) == ("E1", "E2")
    assert parse_policy(None, TAXONOMY) is None


@pytest.mark.parametrize("value,message,param", [
    (["A", "Z9"], r"^`policy\[1\]`: unknown code 'Z9' \(micro codes A1…E2 or macro codes A, B, C, D, E\)$",
     "policy[1]"),
    (["b5"], r"unknown code 'b5'; did you mean 'B5'\?$", "policy[0]"),
    (["hate"], r"'hate' is an OpenAI category; `policy` takes our codes", "policy[0]"),
    (["A", ""], r"`policy\[1\]`: unknown code ''", "policy[1]"),
    (["A", 3], r"`policy\[1\]` must be a code \(a string\), got int", "policy[1]"),
    ([], r"`policy` is an empty list: .* omit `policy` to count every category", "policy"),
    ("B5", r"`policy` must be a list of micro or macro codes .*, got str", "policy"),
    ({"B": True}, r"got dict", "policy"),
])
def test_a_bad_policy_is_one_line_naming_the_entry(value, message, param):
    with pytest.raises(PolicyError, match=message) as err:
        parse_policy(value, TAXONOMY)
    assert err.value.param == param and "\n" not in err.value.message
    assert validate_policy(["A", "B5"], TAXONOMY) == ["A", "B5"]
    with pytest.raises(PolicyError, match="unknown code 'F1'"):
        expand_policy(["F1"], TAXONOMY)   # expanding checks too


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_code_in_the_policy_is_flagged_as_without_one(scheme):
    mapping = SCHEMES[scheme]
    for policy in (("B5",), parse_policy(["B"], TAXONOMY), parse_policy(["A", "B5"], TAXONOMY)):
        result = answer(verdict("B5"), policy, mapping)
        plain = moderation_result(verdict("B5"), TAXONOMY, mapping)
        assert result["flagged"] is True and result["outside_policy"] is False and result["micro_code"] == "B5"
        assert {k: v for k, v in result.items() if k not in ("outside_policy", "micro_code")} == plain
    assert flagged(answer(verdict("B5"), ("B5",), MAPPING)) == {"hate"}
    assert flagged(answer(verdict("B5"), ("B5",))) == {"B5", "B"}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_code_outside_the_policy_is_reported_not_flagged(scheme):
    mapping = SCHEMES[scheme]
    policy = parse_policy(["A", "C"], TAXONOMY)
    result = answer(verdict("B5"), policy, mapping)
    plain = moderation_result(verdict("B5"), TAXONOMY, mapping)
    assert result["flagged"] is False and result["outside_policy"] is True and result["micro_code"] == "B5"
    # no category flagged (flagged == any(categories) holds); the scores are the guard's, unchanged
    assert not flagged(result) and list(result["categories"]) == list(plain["categories"])
    assert result["category_scores"] == plain["category_scores"]
    key = "B5" if mapping is None else "hate"
    assert result["category_scores"][key] == pytest.approx(0.9 * 0.75) and plain["categories"][key]


def test_guard_answers_outside_the_policy_with_its_label_code_and_score():
    policy = parse_policy(["A"], TAXONOMY)
    judged = apply_policy(verdict("B5", score=0.8), policy)
    result = {**guard_result(judged, TAXONOMY, level="prompt", threshold=0.5, model="g", latency_ms=1.0,
                             prompt_tokens=9), **guard_policy_fields(judged, policy)}
    assert (result["label"], result["flagged"], result["outside_policy"]) == (UNSAFE, False, True)
    assert result["category"]["micro"] == "B5" and result["category"]["macro"] == "B"
    assert result["score"] == 0.8 and result["policy"] == list(policy) and len(policy) == 8
    inside = apply_policy(verdict("A3"), policy)
    assert (inside.flagged, guard_policy_fields(inside, policy)["outside_policy"]) == (True, False)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unsafe_without_a_code_stays_flagged_under_any_policy(scheme):
    """`unspecified`: the guard cannot say the text is outside the policy, so it stays flagged."""
    for policy in (("A1",), parse_policy(["E"], TAXONOMY)):
        result = answer(verdict(None, score=0.7), policy, SCHEMES[scheme])
        assert result["flagged"] is True and result["outside_policy"] is False and result["micro_code"] is None
        assert flagged(result) == {UNSPECIFIED}
        assert apply_policy(verdict(None), policy).flagged


def test_a_code_openai_has_no_category_for_follows_the_policy_in_openai_scheme():
    """E1 answers `unspecified` in OpenAI's keys, but the guard named it: the policy decides on E1."""
    assert flagged(answer(verdict("E1"), ("E1",), MAPPING)) == {UNSPECIFIED}
    out = answer(verdict("E1"), ("A1",), MAPPING)
    assert out["flagged"] is False and out["outside_policy"] is True and out["micro_code"] == "E1"
    assert not flagged(out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_safe_is_not_flagged_and_not_outside(scheme):
    result = answer(verdict(None, score=0.2, label=SAFE), ("A1",), SCHEMES[scheme])
    assert (result["flagged"], result["outside_policy"], result["micro_code"]) == (False, False, None)
    assert not flagged(result)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_policy_is_todays_answer_exactly(scheme):
    mapping = SCHEMES[scheme]
    for v in (verdict("B5"), verdict(None), verdict("E1"), verdict(None, 0.1, label=SAFE)):
        assert apply_policy(v, None) is v and not v.outside_policy
        assert answer(v, None, mapping) == moderation_result(v, TAXONOMY, mapping)
        assert moderation_policy_fields(v, None) == {} == guard_policy_fields(v, None)
        assert v.flagged == (v.label == UNSAFE)


def test_applying_twice_or_a_wider_policy_undoes_nothing_it_should_not():
    policy = ("A1",)
    once = apply_policy(verdict("B5"), policy)
    assert apply_policy(once, policy) == once
    assert apply_policy(once, ("B5",)).flagged   # a verdict re-judged under another policy


def test_the_openai_client_keeps_the_policy_fields():
    pytest.importorskip("openai")
    from openai.types import ModerationCreateResponse

    policy = parse_policy(["A"], TAXONOMY)
    body = {"id": "modr-1", "model": "omni-moderation-latest", "policy": list(policy),
            "results": [answer(verdict("B5"), policy, MAPPING), answer(verdict("A4"), policy, MAPPING)]}
    parsed = ModerationCreateResponse.model_validate(body)
    outside, inside = parsed.results
    assert not outside.flagged and outside.model_extra == {"outside_policy": True, "micro_code": "B5"}
    assert outside.category_scores.hate == pytest.approx(0.9 * 0.75)
    assert not any(getattr(outside.categories, k.replace("/", "_").replace("-", "_")) for k in OPENAI_CATEGORIES)
    assert inside.flagged and inside.categories.violence and inside.model_extra["outside_policy"] is False
    assert parsed.model_extra["policy"] == list(policy)
    assert len(policy) == 8
