"""Pure parts of the keyword pool and of retrieval: parsing, selection, query plans, sampling."""

from __future__ import annotations

from collections import Counter

import pytest

from pipelines.config import RetrieveConfig
from pipelines.keywords import normalize_keyword, parse_keyword_answer, select_keywords, seed_rows
from pipelines.retrieval import plan_queries, sample_neighbours
from pipelines.rows import DROPPED, OK
from pipelines.taxonomy import load_taxonomy
from pipelines.textnorm import normalize_text


@pytest.mark.parametrize("answer, expected", [
    ("人肉搜索 | doxxing\n偷拍 | Covert Filming", [("人肉搜索", "doxxing"), ("偷拍", "covert filming")]),
    ("1. 网络暴力（cyberbullying）；2. 造谣 / rumor mongering", [("网络暴力", "cyberbullying"),
                                                              ("造谣", "rumor mongering")]),
    ("以下是新的关键词：\n- 恶意举报\n- fake reviews", [("恶意举报", ""), ("", "fake reviews")]),
    ("price fixing | 价格操纵", [("价格操纵", "price fixing")]),
    ("<think>list some</think>刷单炒信 | order brushing", [("刷单炒信", "order brushing")]),
    ("ＡＢＣ全角 | ＦＵＬＬ", [("ABC全角", "full")]),
    ("  \n；;  ", []),
])
def test_parse_keyword_answer(answer, expected):
    assert parse_keyword_answer(answer) == expected


def test_normalize_keyword_and_text():
    assert normalize_keyword(" “偷拍。” ") == "偷拍"
    assert normalize_keyword("Covert Filming.") == "covert filming"
    assert normalize_text("a\u200b b\r\n\r\n\r\nc\u3000\u3000d \x07") == "a b\n\nc d"
    assert normalize_text("ＡＢＣ，", "nfkc") == "ABC," and normalize_text("ＡＢＣ，", "nfc") == "ＡＢＣ，"


def _row(text, en="", method="expanded"):
    return {"text": text, "keyword_en": en, "method": method, "status": OK}


def test_select_keywords_reasons_and_order():
    rows = [_row("种子一", "seed one", "seed"), _row("种子二", "seed two", "seed"), _row("种子一"),
            _row("新词"), _row("很长" * 20), _row("坏\ufffd词"), _row("", "english only"), _row("多余")]
    out = select_keywords(rows, target=4, max_chars=32)
    decided = [(r["text"] or r["keyword_en"], r["status"], r.get("reason", "")) for r in out]
    assert decided == [
        ("种子一", OK, ""), ("种子二", OK, ""), ("种子一", DROPPED, "duplicate_keyword"),
        ("新词", OK, ""), ("很长" * 20, DROPPED, "invalid_keyword"), ("坏\ufffd词", DROPPED, "invalid_keyword"),
        ("english only", OK, ""), ("多余", DROPPED, "over_target")]


def test_seed_rows_cover_the_taxonomy():
    pools = seed_rows(load_taxonomy())
    assert len(pools) == 31 and all(len(rows) == 20 for rows in pools.values())
    row = pools["D5"][0]
    assert (row["macro"], row["micro"], row["method"], row["lang"]) == ("D", "D5", "seed", "zh")
    assert row["keyword_en"] and row["id"]


def test_plan_queries_is_seeded_and_shaped():
    tax = load_taxonomy()
    config = RetrieveConfig(queries_per_category=3, keywords_per_query=3)
    pools = {code: [(kw.zh, kw.en) for kw in tax.seed_keywords(code)] for code in tax.micro_codes}
    a = plan_queries(tax, pools, config, seed=7)
    assert plan_queries(tax, pools, config, seed=7) == a
    assert [q["text"] for q in plan_queries(tax, pools, config, seed=8)] != [q["text"] for q in a]
    assert len(a) == 93 and len({q["id"] for q in a}) == 93
    assert Counter(q["micro"] for q in a) == {code: 3 for code in tax.micro_codes}
    for q in a:
        micro = tax.micro(q["micro"])
        assert q["macro"] == tax.macro_of(q["micro"])
        assert q["text"].startswith(f"{tax.macro(q['micro']).zh} {micro.zh} ")
        assert len(q["keywords"]) == 3 and len(set(q["keywords"])) == 3
        assert set(q["keywords"]) <= {kw.zh for kw in micro.keywords}
    english = plan_queries(tax, pools, config.model_copy(update={"lang": "en"}), seed=7)
    assert english[0]["micro"] == "A1"
    assert english[0]["text"].startswith(f"{tax.macro('A').en} {tax.micro('A1').en} ")
    assert set(english[0]["keywords"]) <= {kw.en for kw in tax.seed_keywords("A1")}


def test_sample_neighbours_uniform_and_reproducible():
    candidates = [f"d{i}" for i in range(100)]
    draw = sample_neighbours(candidates, 5, seed=0, key="q1")
    assert draw == sample_neighbours(candidates, 5, seed=0, key="q1")
    assert len(set(draw)) == 5 and set(draw) <= set(candidates)
    assert draw == sorted(draw, key=candidates.index)  # rank order kept
    assert sample_neighbours(candidates[:3], 5, seed=0, key="q1") == candidates[:3]
    # uniform over ranks: across many queries every rank is drawn about equally often
    counts = Counter(d for k in range(4000) for d in sample_neighbours(candidates, 5, seed=0, key=f"q{k}"))
    expected = 4000 * 5 / 100
    assert len(counts) == 100 and max(abs(c - expected) for c in counts.values()) < 0.35 * expected
