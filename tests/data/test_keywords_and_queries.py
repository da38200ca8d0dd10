"""Pure parts of the keyword pool and of retrieval: parsing, selection, expansion rounds against a
deterministic answer source, the pool's manifest summary, query plans, sampling."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.core.rows import DROPPED, ERROR, OK, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.taxonomy import DEFAULT_TAXONOMY, load_taxonomy
from pipelines.core.textnorm import normalize_text
from pipelines.data.keywords import (
    LINEAGE,
    KeywordPoolStage,
    KeywordsConfig,
    expand_pool,
    expansion_requests,
    normalize_keyword,
    parse_keyword_answer,
    seed_rows,
    select_keywords,
)
from pipelines.data.retrieval import RetrieveConfig, plan_queries, sample_neighbours


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


class FakeModel:
    """A deterministic answer source. Per request it gives ``count`` new keywords named after the
    category, round and request, except: C1 only ever repeats its first seed (never fills up), B1
    answers nothing usable in round 1, and every other category but A1 gives two fewer than asked in
    round 1 plus a repeated seed."""

    def __init__(self, taxonomy):
        self.taxonomy = taxonomy
        self.calls: list[tuple[int, list[dict]]] = []

    def __call__(self, round_no: int, requests: list[dict]) -> list[dict]:
        self.calls.append((round_no, requests))
        answers = []
        for req in requests:
            code, count = req["micro"], req["count"]
            seed = self.taxonomy.seed_keywords(code)[0]
            fresh = [f"{code}词{round_no}{req['request']}{i} | {code} term {round_no}{i}" for i in range(count)]
            if code == "C1":
                lines = [str(seed)]
            elif code == "B1" and round_no == 1:
                lines = ["以下是关键词："]
            elif code != "A1" and round_no == 1:
                lines = fresh[: count - 2] + [str(seed)]
            else:
                lines = fresh
            answers.append({**req, "llm_output": "\n".join(lines), "llm_error": ""})
        return answers


def test_expand_pool_tops_up_short_categories_round_by_round():
    tax = load_taxonomy()
    config = KeywordsConfig(target_per_category=24, max_rounds=3)
    model = FakeModel(tax)
    rows = expand_pool(tax, config, model, "fake")

    # round 1: every category, 4 missing; round 2: all but A1, for what each still misses, told what it
    # already has; round 3: only C1, which never fills up; then the round limit stops it
    (r1, first), (r2, second), (r3, third) = model.calls
    assert (r1, r2, r3) == (1, 2, 3)
    assert [(q["micro"], q["count"], q["existing"]) for q in first] == [(c, 4, "") for c in tax.micro_codes]
    asked = {q["micro"]: q for q in second}
    assert set(asked) == set(tax.micro_codes) - {"A1"}
    assert (asked["B1"]["count"], asked["C1"]["count"], asked["D5"]["count"]) == (4, 4, 2)
    assert asked["D5"]["existing"] == "D5词100 | d5 term 10\nD5词101 | d5 term 11"
    assert asked["B1"]["existing"] == "" and asked["D5"]["seeds"] == [str(k) for k in tax.seed_keywords("D5")]
    assert [(q["micro"], q["count"]) for q in third] == [("C1", 4)]
    assert len({q["id"] for _, qs in model.calls for q in qs}) == sum(len(qs) for _, qs in model.calls)

    kept = Counter(r["micro"] for r in rows if r["status"] == OK)
    assert kept == {code: 20 if code == "C1" else 24 for code in tax.micro_codes}
    assert {r["round"] for r in rows if r["micro"] == "A1" and r["method"] == "expanded"} == {1}
    assert {r["round"] for r in rows if r["micro"] == "D5" and r["status"] == OK} == {0, 1, 2}
    # every answer ends as candidate rows (ok / dropped) or one error row, with its reason
    errors = [r for r in rows if r["status"] == ERROR]
    assert [(e["micro"], e["round"], e["reason"]) for e in errors] == [("B1", 1, "unparseable_output")]
    answered = {q["id"] for _, qs in model.calls for q in qs}
    assert {r["parent_id"] for r in rows if r["method"] == "expanded"} == answered
    # the repeated seed: 29 categories in round 1 (not A1 or B1), C1 again in rounds 2 and 3
    assert Counter(r["reason"] for r in rows if r["status"] == DROPPED) == {"duplicate_keyword": 29 + 2}

    # deterministic: the same answers give the same rows
    assert expand_pool(tax, config, FakeModel(tax), "fake") == rows


def test_summary_reports_rounds_and_categories_still_short(tmp_path):
    # the stage's rows as its write() stores them (one folder per status), read back by summary()
    tax = load_taxonomy()
    config = KeywordsConfig(target_per_category=24, max_rounds=3)
    rows = expand_pool(tax, config, FakeModel(tax), "fake")
    pq.write_to_dataset(to_table(rows, LINEAGE), str(tmp_path / "keywords"), partition_cols=["status"])
    summary = KeywordPoolStage(config, None, str(DEFAULT_TAXONOMY)).summary(RunDir(str(tmp_path)))
    assert summary["per_category"] == {code: 20 if code == "C1" else 24 for code in sorted(tax.micro_codes)}
    assert (summary["target"], summary["rounds"], summary["max_rounds"]) == (24, 3, 3)
    assert summary["requests_per_round"] == {"1": 31, "2": 30, "3": 1}
    assert summary["below_target"] == {"C1": 20}


def test_expand_pool_round_limit_and_seeds_only():
    tax = load_taxonomy()
    one = FakeModel(tax)
    rows = expand_pool(tax, KeywordsConfig(target_per_category=24, max_rounds=1), one, "fake")
    assert len(one.calls) == 1
    assert Counter(r["micro"] for r in rows if r["status"] == OK)["D5"] == 22
    seeds = expand_pool(tax, KeywordsConfig(target_per_category=24), None, "")
    assert len(seeds) == 620 and all(r["method"] == "seed" and r["round"] == 0 for r in seeds)
    # a target the seeds already meet asks nothing
    full = FakeModel(tax)
    assert sum(r["status"] == OK for r in expand_pool(tax, KeywordsConfig(target_per_category=15), full, "f")) == 465
    assert full.calls == []
    with pytest.raises(ValidationError, match="max_rounds"):
        KeywordsConfig(max_rounds=0)


def test_expand_pool_refuses_lost_answers():
    tax = load_taxonomy()
    with pytest.raises(RuntimeError, match="31 requests but answers for 30"):
        expand_pool(tax, KeywordsConfig(target_per_category=24), lambda k, reqs: FakeModel(tax)(k, reqs)[1:], "f")


def test_expansion_requests_ask_only_the_short_categories():
    tax = load_taxonomy()
    pools = seed_rows(tax)
    config = KeywordsConfig(target_per_category=21, requests_per_category=2)
    pools["E2"] = pools["E2"][:19]
    for code in tax.micro_codes:
        select_keywords(pools[code], 21, 32)
    requests = expansion_requests(tax, config, pools, round_no=2)
    assert len(requests) == 62 and {q["round"] for q in requests} == {2}
    assert Counter(q["count"] for q in requests) == {1: 60, 2: 2}
    pools["A1"].append({**pools["A1"][0], "text": "新词", "keyword_en": "", "method": "expanded"})
    select_keywords(pools["A1"], 21, 32)
    assert "A1" not in {q["micro"] for q in expansion_requests(tax, config, pools, round_no=3)}


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
