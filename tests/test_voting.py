"""The jury's math: verdict parsing, the strict-majority rule, adjudicator answers, Fleiss' kappa."""

from __future__ import annotations

import pytest

from pipelines.taxonomy import load_taxonomy
from pipelines.voting import (
    SAFE,
    UNSAFE,
    AgreementReport,
    agreement_markdown,
    decide,
    fleiss_kappa,
    parse_adjudication,
    parse_code,
    parse_verdict,
)

CODES = load_taxonomy().micro_codes


@pytest.mark.parametrize("answer, verdict", [
    ("不安全", UNSAFE), ("安全", SAFE), ("  安全。", SAFE), ("不安全，因为涉及暴力", UNSAFE),
    ("判断：不安全", UNSAFE), ("结论: 安全", SAFE), ("**不安全**", UNSAFE), ("「安全」", SAFE),
    ("有害", UNSAFE), ("无害", SAFE),
    ("unsafe", UNSAFE), ("Safe", SAFE), ("UNSAFE - violence", UNSAFE), ("Verdict: safe", SAFE),
    ("Not safe", UNSAFE), ("harmful", UNSAFE),
    ("<think>可能不安全？再想想</think>安全", SAFE),
    ("unsafe A3", UNSAFE),
    ("\n\n安全\n解释：……", SAFE),
])
def test_parse_verdict_chinese_and_english(answer, verdict):
    assert parse_verdict(answer) == verdict


@pytest.mark.parametrize("answer", [
    "", "   ", "我无法判断", "I cannot help with that.", "A3", "这个问题很复杂，安全与否取决于语境",
    "<think>不安全", "0.5", "ölkjsdf 安全",
])
def test_parse_verdict_garbage_is_an_abstention(answer):
    assert parse_verdict(answer) is None


@pytest.mark.parametrize("verdicts, label, tie", [
    ([UNSAFE] * 4, UNSAFE, False),                       # 4-0
    ([SAFE] * 4, SAFE, False),
    ([UNSAFE, UNSAFE, UNSAFE, SAFE], UNSAFE, False),     # 3-1
    ([SAFE, SAFE, SAFE, UNSAFE], SAFE, False),
    ([UNSAFE, UNSAFE, SAFE, SAFE], None, True),          # 2-2 tie -> adjudicator
    ([UNSAFE, UNSAFE, SAFE, None], UNSAFE, False),       # 2-1 of 3 valid: strict majority
    ([UNSAFE, SAFE, None, None], None, True),            # 1-1: tie
    ([UNSAFE, None, None, None], UNSAFE, False),         # 1-0 of 1 valid
    ([None, None, None, None], None, False),             # all abstain -> adjudicator, not a tie
    ([], None, False),
])
def test_strict_majority_of_valid_votes(verdicts, label, tie):
    outcome = decide(verdicts)
    assert outcome.label == label
    assert outcome.tie == tie
    assert outcome.valid_votes == sum(v is not None for v in verdicts)


def test_parse_code_only_accepts_taxonomy_codes():
    assert parse_code("B3", CODES) == "B3"
    assert parse_code("类别：c2。", CODES) == "C2"
    assert parse_code("A9 or B1", CODES) == "B1"     # A9 does not exist
    assert parse_code("E3", CODES) is None            # E has E1, E2 only
    assert parse_code("A10", CODES) is None
    assert parse_code("no code", CODES) is None


@pytest.mark.parametrize("answer, need_label, expected", [
    ("安全", True, (SAFE, None, "")),
    ("不安全 B3", True, (UNSAFE, "B3", "")),
    ("unsafe d5", True, (UNSAFE, "D5", "")),
    ("不安全", True, (UNSAFE, None, "adjudicator_invalid_code")),
    ("不安全 A9", True, (UNSAFE, None, "adjudicator_invalid_code")),
    ("B3", True, (None, None, "adjudicator_unparseable")),
    ("嗯……", True, (None, None, "adjudicator_unparseable")),
    ("C2", False, (UNSAFE, "C2", "")),
    ("类别 E2", False, (UNSAFE, "E2", "")),
    ("Z9", False, (UNSAFE, None, "adjudicator_invalid_code")),
])
def test_parse_adjudication(answer, need_label, expected):
    result = parse_adjudication(answer, need_label=need_label, codes=CODES)
    assert (result.label, result.micro, result.problem) == expected


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) / Wikipedia worked example: 10 items, 14 raters, 5 categories -> kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)


def test_fleiss_kappa_by_hand_for_two_categories():
    # 3 items, 4 raters: (4,0) (0,4) (2,2): P_i = 1, 1, 1/3 -> P̄ = 7/9; p = (1/2, 1/2) -> P̄e = 1/2
    assert fleiss_kappa([[4, 0], [0, 4], [2, 2]]) == pytest.approx((7 / 9 - 0.5) / 0.5)
    assert fleiss_kappa([[4, 0], [4, 0]]) is None    # one category only: undefined
    assert fleiss_kappa([]) is None
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[4, 0], [2, 1]])


def test_agreement_report_counts():
    report = AgreementReport(["a", "b", "c", "d"])
    report.add(label=UNSAFE, votes={"a": UNSAFE, "b": UNSAFE, "c": UNSAFE, "d": SAFE}, decision="majority",
               source="rag", macro="A", source_label=UNSAFE)
    report.add(label=SAFE, votes={"a": UNSAFE, "b": UNSAFE, "c": SAFE, "d": SAFE}, decision="adjudicated",
               source="rag", macro="B", source_label=UNSAFE)
    report.add(label=SAFE, votes={"a": None, "b": None, "c": None, "d": None}, decision="adjudicated",
               source="pe", macro="B", source_label=SAFE)
    result = report.result()
    assert result["rows"] == 3
    assert result["judges"]["a"] == {"valid_votes": 2, "abstentions": 1, "abstention_rate": 0.3333,
                                     "agreement_with_final": 0.5}
    assert result["judges"]["d"]["agreement_with_final"] == 0.5
    # kappa over the two fully rated rows, as (safe, unsafe) counts: (1, 3) and (2, 2)
    assert result["fleiss_kappa"] == pytest.approx(fleiss_kappa([[1, 3], [2, 2]]))
    assert result["fleiss_kappa_rows"] == 2
    assert result["tie_rate"] == 0.3333 and result["no_valid_vote_rate"] == 0.3333
    assert result["adjudication_rate"] == 0.6667
    assert result["flips"]["source"]["rag"] == {"rows": 2, "flipped": 1, "rate": 0.5}
    assert result["flips"]["macro"]["B"]["flipped"] == 1
    assert "Fleiss' kappa" in agreement_markdown(result)
