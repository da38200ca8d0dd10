"""PE rewriting: method assignment, grouping into triples, answer splitting and wrong counts."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from pipelines.core.rows import ERROR, OK, make_row, to_common_schema, to_table
from pipelines.core.taxonomy import DEFAULT_TAXONOMY
from pipelines.data.methods import load_methods
from pipelines.data.pe_rewrite import PEConfig, answers_to_rewrites, assign_methods, make_groups

TAX = str(DEFAULT_TAXONOMY)


@pytest.fixture()
def config(tmp_path):
    return PEConfig(model="g", inputs=["seeds_x"], keep_original={"safe": 0.5})


def _seeds(n=200):
    rows = [make_row(id=f"s{i:03d}", text=f"种子提示{i}", label="safe" if i % 2 else "unsafe",
                     macro="ABCDE"[i % 5], micro="ABCDE"[i % 5] + "1", source="real") for i in range(n)]
    rows.append(make_row(id="x1", text="没有宏观类别", label="unsafe"))
    rows.append(make_row(id="x2", text="没有标签"))
    return to_common_schema(to_table(rows))


def test_assign_methods_is_seeded_and_keeps_a_share(config):
    table = _seeds()
    out = assign_methods(table, config=config, seed=0, taxonomy_path=TAX).to_pylist()
    assert out == assign_methods(table, config=config, seed=0, taxonomy_path=TAX).to_pylist()
    roles = Counter((r["label"], r["role"]) for r in out)
    assert roles[("unsafe", "original")] == 0  # no share configured for unsafe seeds
    assert 30 <= roles[("safe", "original")] <= 70  # ~50% of 100
    catalogue = load_methods()
    for r in out:
        if r["role"] == "seed":
            allowed = catalogue.for_seed(r["label"], r["macro"])
            assert r["method"] in {m.name for m in allowed}
        if r["role"] == "original":
            assert (r["status"], r["method"], r["parent_id"]) == (OK, "original", r["id"])
    errors = {r["id"]: r["reason"] for r in out if r["status"] == ERROR}
    assert errors == {"x1": "no_method", "x2": "no_method"}
    other = assign_methods(table, config=config, seed=1, taxonomy_path=TAX).to_pylist()
    assert [r["method"] for r in other] != [r["method"] for r in out]


def test_make_groups_orders_by_id_and_cuts_triples(config):
    rows = [make_row(id=i, text=f"t{i}", label="unsafe", macro="D", micro="D5", method="concern_trolling",
                     lineage="{}") for i in ("e", "b", "d", "a", "c")]
    table = to_table(rows, {"lineage": pa.string(), "role": pa.string()})
    groups = make_groups(table, group_size=3, taxonomy_path=TAX, methods_path=config.methods).to_pylist()
    assert [g["parent_ids"] for g in groups] == [["a", "b", "c"], ["d", "e"]]
    assert groups[0]["texts"] == ["ta", "tb", "tc"] and groups[0]["macro_label"] == "侵犯他人合法权益"
    assert groups[0]["method_description"] == load_methods().get("concern_trolling").description


def _request(output, error="", parents=("a", "b", "c")):
    return {"id": "g1", "label": "unsafe", "macro": "D", "method": "m", "parent_ids": list(parents),
            "texts": [f"t{p}" for p in parents], "micros": ["D5"] * len(parents),
            "langs": ["zh"] * len(parents), "lineages": ["{}"] * len(parents),
            "llm_output": output, "llm_error": error}


@pytest.mark.parametrize("output, error, ok, reasons", [
    ("第一条改写；第二条改写；第三条改写", "", 3, []),
    ("第一条改写；第二条改写；第三条改写；第四条改写", "", 3, []),                       # extras cut
    ("第一条改写；第二条改写", "", 2, ["missing_rewrite"]),                       # too few
    ("", "", 0, ["unparseable_output"] * 3),
    ("", "maximum context length exceeded", 0, ["prompt_too_long"] * 3),
])
def test_answers_to_rewrites(config, output, error, ok, reasons):
    rows = answers_to_rewrites(pa.Table.from_pylist([_request(output, error)]), config=config,
                               model="gen").to_pylist()
    assert len(rows) == 3  # one row per seed, whatever the answer
    good = [r for r in rows if r["status"] == OK]
    assert len(good) == ok and [r["reason"] for r in rows if r["status"] == ERROR] == reasons
    assert [r["parent_id"] for r in rows] == ["a", "b", "c"]
    for r in good:
        assert (r["source"], r["label"], r["macro"], r["micro"], r["model"]) == ("pe", "unsafe", "D", "D5", "gen")
        assert r["parent_ids"] == ["a", "b", "c"] and r["outputs_expected"] == 3
    assert all(r["outputs_parsed"] == len([p for p in output.split("；") if p]) for r in rows)


@pytest.mark.parametrize("output, text", [
    # the shape of Qwen2.5-Coder-1.5B's answer for a ToxiCN post with semicolons (text written here):
    # one rewrite asked, one given, quoted, clauses joined by ；
    ("“这家店真难吃；服务也差；再也不来了；”", "这家店真难吃；服务也差；再也不来了"),
    ("<think>一条</think>\n1. 这个人说话真难听；还不讲理。", "这个人说话真难听；还不讲理。"),
])
def test_a_one_seed_answer_is_one_rewrite_whatever_its_semicolons(config, output, text):
    rows = answers_to_rewrites(pa.Table.from_pylist([_request(output, parents=("a",))]), config=config,
                               model="gen").to_pylist()
    assert [(r["status"], r["text"], r["outputs_parsed"]) for r in rows] == [(OK, text, 1)]
