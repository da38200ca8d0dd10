"""The jury's math: verdict parsing, the quorum and strict-majority rule, adjudicator answers,
Fleiss' kappa, the agreement report."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.construction import load_recipe
from pipelines.core.config import ConfigError
from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import load_taxonomy
from pipelines.labelling.voting import (
    AgreementReport,
    agreement_markdown,
    decide,
    fleiss_kappa,
    parse_adjudication,
    parse_code,
    parse_verdict,
)

CODES = load_taxonomy().micro_codes
REPO = Path(__file__).resolve().parents[2]

# Real-looking judge answers -> verdict (None = abstention). Comments say which rule a row pins.
VERDICTS = [
    # --- Chinese: the verdict is the whole answer or opens the line
    ("不安全", UNSAFE), ("安全", SAFE), ("  安全。", SAFE), ("有害", UNSAFE), ("无害", SAFE),
    ("不安全，因为涉及暴力", UNSAFE),               # the explanation after punctuation is not read
    ("不合规", UNSAFE), ("合规", SAFE),
    ("有害，不安全", UNSAFE),                       # the same label twice
    ("「安全」", SAFE), ("> 安全", SAFE),
    # --- Chinese: no spaces, so a verdict word glued to more characters is not a verdict
    ("安全隐患很大", None), ("合规风险高", None), ("安全性较低", None), ("不安全因素很多", None),
    ("安全风险：高", None),                         # a key that is not a verdict key
    ("不是安全的", None), ("我无法判断", None), ("这个问题很复杂，安全与否取决于语境", None),
    # --- Chinese "key: value": read by the value
    ("判断：不安全", UNSAFE), ("结论: 安全", SAFE), ("安全性：不安全", UNSAFE), ("安全性：安全", SAFE),
    ("【判断】：不安全", UNSAFE), ("判断结果：**安全**", SAFE), ("最终判断：不安全。", UNSAFE),
    ("结论是不安全", UNSAFE), ("审核结论：安全\n理由：询问天气，无风险。", SAFE),
    ("分析：用户询问制作爆炸物的方法，属于危险物品类风险。\n结论：不安全", UNSAFE),
    # --- Chinese short sentences whose predicate is the verdict
    ("该内容不安全。", UNSAFE), ("该输入是安全的。", SAFE), ("这条提示词属于不安全内容", UNSAFE),
    ("该请求并不安全，涉及违法犯罪", UNSAFE), ("我认为该内容是安全的", SAFE),
    ("该内容安全隐患很大", None),
    # --- both labels, unresolvable: abstention
    ("安全/不安全", None), ("安全还是不安全，取决于语境", None), ("安全\n不安全", None),
    ("安全，但是有害", None), ("不安全，不过出于学习目的也可以算安全", None),
    ("安全，但需注意隐私", SAFE),                   # a contrast without the other label: kept
    ("判断：安全\n结论：不安全", None),
    ("不安全\n风险评估：高", UNSAFE),                # a verdict key without a verdict decides nothing
    # --- Markdown
    ("**不安全**", UNSAFE), ("## 判断\n**不安全**\n\n该输入试图获取制造爆炸物的方法。", UNSAFE),
    ("- **结论**：安全", SAFE), ("`unsafe`", UNSAFE),
    # --- <think> blocks are removed first; an unclosed one means no answer
    ("<think>可能不安全？再想想</think>安全", SAFE),
    ("<think>\n用户问天气，安全。\n</think>\n\n**安全**", SAFE),
    ("<think>这涉及暴力", None),
    # --- English
    ("unsafe", UNSAFE), ("Safe", SAFE), ("UNSAFE - violence", UNSAFE), ("Verdict: safe", SAFE),
    ("Not safe", UNSAFE), ("harmful", UNSAFE), ("Harmless.", SAFE), ("benign", SAFE),
    ("Safety: Unsafe", UNSAFE), ("**Verdict:** Unsafe", UNSAFE), ("Final answer: SAFE", SAFE),
    ("The prompt is unsafe.", UNSAFE), ("This request is safe.", SAFE), ("This content is not safe.", UNSAFE),
    ("Safeguarding children online is important.", None), ("Safety", None),
    ("I cannot help with that.", None), ("safe or unsafe?", None), ("Safe / Unsafe", None),
    ("unsafe? safe?", None), ("Safe, but harmful to minors.", None), ("The answer is unsafe", UNSAFE),
    ("Unsafe: the prompt asks how to build a weapon.", UNSAFE),
    ("Answer: unsure", None),
    # --- guard-model styles
    ("Safety: Unsafe\nCategories: Violent", UNSAFE),                             # Qwen3Guard
    ("Safety: Safe\nCategories: None", SAFE),
    ("Safety: Unsafe\nCategories: Non-violent Illegal Acts\nRefusal: No", UNSAFE),
    ("Safety: Controversial\nCategories: Politically Sensitive Topics", None),
    ("unsafe\nS1", UNSAFE), ("\n\nunsafe\nS1,S10", UNSAFE), ("\n\nsafe", SAFE),  # LlamaGuard
    # --- JSON, read by its verdict key
    ('{"verdict": "unsafe"}', UNSAFE), ('{"label": "安全"}', SAFE),
    ('```json\n{"verdict": "unsafe", "category": "B3"}\n```', UNSAFE),
    ('{"reason": "涉及暴力，不安全", "verdict": "safe"}', SAFE),
    ('{"safety": "Unsafe", "categories": ["Violent"]}', UNSAFE),
    ('{\n  "判断": "不安全",\n  "理由": "涉及违法犯罪"\n}', UNSAFE),
    ('{"verdict": "safe or unsafe"}', None), ('{"reason": "不安全"}', None), ('{"verdict": 1}', None),
    ('{"verdict": "unsafe", "reason": "不', UNSAFE),    # cut off by max_tokens: still "key: value" lines
    # --- mixed languages
    ("判断：unsafe", UNSAFE), ("Verdict: 不安全", UNSAFE), ("不安全 (unsafe)", UNSAFE), ("Safe（安全）", SAFE),
    ("unsafe A3", UNSAFE), ("不安全 B3", UNSAFE),
    # --- a verdict word as the key of a yes/no answer: an answer about that word (issue 28)
    ("Harmful: No", SAFE), ("Harmful: yes", UNSAFE), ("Harmful request: no", SAFE),
    ("Harmful request: yes\nResponse refusal: no", UNSAFE),                    # WildGuard's format
    ("有害：否", SAFE), ("有害：是", UNSAFE), ("违规：无", SAFE), ("违规：有", UNSAFE),
    ("安全：否", UNSAFE), ("安全：是", SAFE), ("Safe: no", UNSAFE), ("Safe: Yes", SAFE),
    ("unsafe: false", SAFE), ("unsafe: true", UNSAFE), ("Unsafe: None", SAFE),
    ("有害：否（不涉及A6暴力内容）", SAFE), ("有害内容：无", SAFE), ("违规内容：有，涉及诈骗", UNSAFE),
    ("是否有害：否", SAFE), ("是否安全：是", SAFE), ("是否违规：是的", UNSAFE), ("是否包含有害内容：没有", SAFE),
    ("不安全：不是", SAFE), ("无害：是", SAFE), ("合规：否", UNSAFE), ("不合规：否", SAFE),
    ("**Harmful**: No", SAFE), ("- Harmful: no.", SAFE), ("Is it harmful? No", None),
    ("Is it harmful: no", SAFE), ("Harmful prompt: No, it asks about the weather.", SAFE),
    ("Not safe: yes", UNSAFE), ("Benign: true", SAFE), ("Harmless: FALSE", UNSAFE),
    ("Harmful: maybe", None), ("有害：可能", None), ("有害：无法判断", None), ("Harmful: N/A", None),
    ("Safe: unsafe", None), ("有害：无害", None),                               # a verdict as the value
    ("Harmful: no\nUnsafe: yes", None),                                        # they disagree
    ("Harmful: no\n理由：询问天气。", SAFE),
    ('{"harmful": false}', SAFE), ('{"harmful": "yes"}', UNSAFE), ('{"有害": "否"}', SAFE),
    ('{"is_harmful": true}', UNSAFE), ('{"is_safe": "no"}', UNSAFE), ('{"harmfulness": true}', None),
    ('{"unsafe": "maybe"}', None),
    # --- not answers at all
    ("", None), ("   ", None), ("A3", None), ("0.5", None), ("ölkjsdf 安全", None),
]


def test_verdict_table_is_large_and_unique():
    answers = [a for a, _ in VERDICTS]
    assert len(answers) >= 40 and len(set(answers)) == len(answers)


@pytest.mark.parametrize("answer, verdict", VERDICTS)
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


@pytest.mark.parametrize("verdicts, quorum, label, tie, below", [
    ([UNSAFE] * 4, 3, UNSAFE, False, False),                     # 4-0
    ([SAFE] * 4, 3, SAFE, False, False),
    ([UNSAFE, UNSAFE, UNSAFE, SAFE], 3, UNSAFE, False, False),   # 3-1
    ([SAFE, SAFE, SAFE, UNSAFE], 3, SAFE, False, False),
    ([UNSAFE, UNSAFE, SAFE, SAFE], 3, None, True, False),        # 2-2 tie -> adjudicator
    ([UNSAFE, UNSAFE, SAFE, None], 3, UNSAFE, False, False),     # 2-1 of 3 valid: strict majority
    ([UNSAFE, UNSAFE, None, None], 3, None, False, True),        # 2 valid < 3: adjudicator
    ([UNSAFE, None, None, None], 3, None, False, True),          # one vote never decides a row
    ([UNSAFE, SAFE, None, None], 3, None, False, True),          # 1-1 below the quorum
    ([None, None, None, None], 3, None, False, True),            # all abstain
    ([UNSAFE, None, None, None], 1, UNSAFE, False, False),       # quorum 1 set explicitly
    ([UNSAFE, SAFE, None, None], 2, None, True, False),          # 1-1 at quorum 2: a tie
    ([UNSAFE, UNSAFE, None, None], None, None, False, True),     # default: strict majority of 4 = 3
    ([UNSAFE, UNSAFE, None], None, UNSAFE, False, False),        # default: 2 of 3 judges
])
def test_quorum_then_strict_majority_of_valid_votes(verdicts, quorum, label, tie, below):
    outcome = decide(verdicts, min_valid_votes=quorum)
    assert (outcome.label, outcome.tie, outcome.below_quorum) == (label, tie, below)
    assert outcome.valid_votes == sum(v is not None for v in verdicts)


def test_decide_rejects_an_impossible_quorum():
    with pytest.raises(ValueError, match="min_valid_votes"):
        decide([SAFE, SAFE], min_valid_votes=3)
    with pytest.raises(ValueError, match="min_valid_votes"):
        decide([SAFE, SAFE], min_valid_votes=0)


def test_jury_quorum_config():
    paper = REPO / "configs/recipes/chillguard_paper.yaml"
    assert load_recipe(paper).stages.jury.quorum == 3               # 4 judges: strict majority
    assert load_recipe(paper, ["stages.jury.min_valid_votes=1"]).stages.jury.quorum == 1
    assert load_recipe(paper, ["stages.jury.min_valid_votes=4"]).stages.jury.quorum == 4
    assert load_recipe(paper, ["stages.jury.judges=[judge_qwen, judge_glm, judge_yi]"]).stages.jury.quorum == 2
    with pytest.raises(ConfigError, match=r"stages.jury.min_valid_votes: .*5.*4 judges"):
        load_recipe(paper, ["stages.jury.min_valid_votes=5"])
    with pytest.raises(ConfigError, match=r"stages.jury.min_valid_votes: .*greater than or equal to 1"):
        load_recipe(paper, ["stages.jury.min_valid_votes=0"])


def test_parse_code_only_accepts_taxonomy_codes():
    assert parse_code("B3", CODES) == "B3"
    assert parse_code("类别：c2。", CODES) == "C2"
    assert parse_code("A9 or B1", CODES) == "B1"     # A9 does not exist
    assert parse_code("E3", CODES) is None            # E has E1, E2 only
    assert parse_code("A10", CODES) is None
    assert parse_code("no code", CODES) is None
    assert parse_code("This is a 2-step scam, category B3", CODES) == "B3"   # "a 2" is not A2
    assert parse_code("B3 或 C2", CODES) is None      # two codes: cannot tell which
    assert parse_code("B3，即 B3 类", CODES) == "B3"
    assert parse_code("<think>A1? 不，是</think>C2", CODES) == "C2"


@pytest.mark.parametrize("text, code", [
    # codes inside words are not codes (issue 28)
    ("B2B 电商平台", None), ("C2C平台的交易", None), ("e2e 测试", None), ("B5G 网络", None), ("A4纸打印", None),
    ("B2B", None), ("d3d9", None),
    # a code beside Chinese text or punctuation is a code; 类 after it names the category
    ("属于B3", "B3"), ("类别：c2。", "C2"), ("属于B3类", "B3"), ("不安全（C2）", "C2"), ("答案B3，", "B3"),
    ("B2B 平台上的 B3", "B3"),
])
def test_parse_code_whole_tokens(text, code):
    assert parse_code(text, CODES) == code


@pytest.mark.parametrize("answer, need_label, expected", [
    ("安全", True, (SAFE, None, "")),
    ("不安全 B3", True, (UNSAFE, "B3", "")),
    ("unsafe d5", True, (UNSAFE, "D5", "")),
    ("不安全", True, (UNSAFE, None, "adjudicator_invalid_code")),
    ("不安全 A9", True, (UNSAFE, None, "adjudicator_invalid_code")),
    ("不安全 B3 或 C2", True, (UNSAFE, None, "adjudicator_invalid_code")),
    ("B3", True, (None, None, "adjudicator_unparseable")),
    ("嗯……", True, (None, None, "adjudicator_unparseable")),
    ("安全性：不安全 B3", True, (UNSAFE, "B3", "")),
    ("安全隐患很大，B3", True, (None, None, "adjudicator_unparseable")),
    ("Safety: Unsafe\nCategories: B3", True, (UNSAFE, "B3", "")),
    ('{"verdict": "unsafe", "code": "c2"}', True, (UNSAFE, "C2", "")),
    ("安全/不安全 B3", True, (None, None, "adjudicator_unparseable")),
    ("有害：否（不涉及A6暴力内容）", True, (SAFE, None, "")),
    ("有害：是，B3", True, (UNSAFE, "B3", "")),
    ("C2", False, (UNSAFE, "C2", "")),
    ("类别 E2", False, (UNSAFE, "E2", "")),
    ("Z9", False, (UNSAFE, None, "adjudicator_invalid_code")),
    ("This is a 2-step scam: B3", False, (UNSAFE, "B3", "")),
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
    report = AgreementReport(["a", "b", "c", "d"], min_valid_votes=3)
    report.add(label=UNSAFE, votes={"a": UNSAFE, "b": UNSAFE, "c": UNSAFE, "d": SAFE}, decision="majority",
               source="rag", macro="A", source_label=UNSAFE)
    report.add(label=SAFE, votes={"a": UNSAFE, "b": UNSAFE, "c": SAFE, "d": SAFE}, decision="adjudicated",
               source="rag", macro="B", source_label=UNSAFE)
    report.add(label=SAFE, votes={"a": None, "b": None, "c": None, "d": None}, decision="adjudicated",
               source="pe", macro="B", source_label=SAFE)
    # 2-0 with two abstentions: a majority of the valid votes, but below the quorum of 3
    report.add(label=UNSAFE, votes={"a": UNSAFE, "b": UNSAFE, "c": None, "d": None}, decision="adjudicated",
               source="pe", macro="C", source_label=UNSAFE)
    result = report.result()
    assert result["rows"] == 4 and result["min_valid_votes"] == 3
    assert result["judges"]["a"] == {"valid_votes": 3, "abstentions": 1, "abstention_rate": 0.25,
                                     "agreement_with_final": round(2 / 3, 4)}
    assert result["judges"]["d"]["agreement_with_final"] == 0.5
    # kappa over the two fully rated rows, as (safe, unsafe) counts: (1, 3) and (2, 2)
    assert result["fleiss_kappa"] == pytest.approx(fleiss_kappa([[1, 3], [2, 2]]))
    assert result["fleiss_kappa_rows"] == 2
    assert result["tie_rate"] == 0.25 and result["no_valid_vote_rate"] == 0.25
    assert result["below_quorum"] == 2 and result["below_quorum_rate"] == 0.5
    assert result["adjudication_rate"] == 0.75
    assert result["flips"]["source"]["rag"] == {"rows": 2, "flipped": 1, "rate": 0.5}
    assert result["flips"]["macro"]["B"]["flipped"] == 1
    page = agreement_markdown(result)
    assert "Fleiss' kappa" in page and "fewer than 3 valid votes: 0.5" in page


def test_agreement_report_default_quorum_is_a_strict_majority_of_the_judges():
    report = AgreementReport(["a", "b", "c", "d"])
    report.add(label=UNSAFE, votes={"a": UNSAFE, "b": UNSAFE, "c": None, "d": None}, decision="adjudicated",
               source="pe", macro="C", source_label=UNSAFE)
    assert report.result()["min_valid_votes"] == 3 and report.result()["below_quorum"] == 1


def test_the_adjudicate_stage_reports_against_the_jurys_quorum(tmp_path):
    from pipelines.construction import Recipe, build_stages

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "text": "你好", "label": "safe"}\n', encoding="utf-8")
    http = {"engine": "http", "model": "m", "url": "http://127.0.0.1:1/v1/chat/completions"}
    recipe = {"name": "q", "run_dir": str(tmp_path / "run"), "models": {f"j{i}": http for i in range(4)},
              "stages": {"seeds": {"s": {"paths": [str(seeds)]}},
                         "jury": {"inputs": ["seeds_s"], "judges": ["j0", "j1", "j2", "j3"], "min_valid_votes": 4},
                         "adjudicate": {"model": "j0"}}}
    stages = {s.name: s for s in build_stages(Recipe.model_validate(recipe))}
    assert stages["adjudicate"].min_valid_votes == 4
    del recipe["stages"]["jury"]["min_valid_votes"]
    stages = {s.name: s for s in build_stages(Recipe.model_validate(recipe))}
    assert stages["adjudicate"].min_valid_votes == 3
