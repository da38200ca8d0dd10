"""Preprocessing: normalisation, length filter, exact and MinHash near-duplicate removal."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import DROPPED, ERROR, OK, make_row, to_common_schema, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.core.textnorm import normalize_text
from pipelines.data import minhash
from pipelines.data.preprocess import (
    NearDedupConfig,
    decide_exact,
    decide_near,
    length_batch,
    normalize_batch,
)
from tests.conftest import write_jsonl


def test_decide_exact_keeps_smallest_id_whatever_the_order():
    ids = ["d3", "d1", "d2", "d9", "d5"]
    keys = ["k", "k", "x", "k", "x"]
    expected = {"d3": "d1", "d9": "d1", "d5": "d2"}
    for _ in range(5):
        order = random.Random(_).sample(range(5), 5)
        assert decide_exact([ids[i] for i in order], [keys[i] for i in order]) == expected


def test_minhash_estimates_jaccard_and_groups_near_duplicates():
    a, b = minhash.permutations(128, seed=1)
    base = "今天我们一起讨论网络安全和个人信息保护的重要性以及如何防范诈骗"
    near = base.replace("诈骗", "骗局")
    other = "完全无关的另一段文字讲的是周末去公园散步和吃饭的安排"
    sigs = minhash.signatures([base, near, other, ""], a, b, n=5)
    truth = len(set(minhash.shingle_hashes(base)) & set(minhash.shingle_hashes(near))) / \
        len(set(minhash.shingle_hashes(base)) | set(minhash.shingle_hashes(near)))
    assert abs(minhash.estimated_jaccard(sigs[0], sigs[1]) - truth) < 0.12
    assert minhash.estimated_jaccard(sigs[0], sigs[2]) < 0.1
    assert (sigs[3] == np.iinfo(np.uint32).max).all()  # empty text: no shingle
    bands, rows = minhash.optimal_bands(0.7, 128)
    assert bands * rows <= 128 and bands > 1
    assert list(minhash.duplicate_groups(sigs[:3], bands, rows, 0.7)) == [0, 0, 2]
    assert minhash.collision_probability(1.0, bands, rows) == 1.0


def test_decide_near_is_order_independent():
    texts = {"b": "有人在论坛上散布关于疫苗的谣言并号召大家转发出去",
             "a": "有人在论坛上散布关于疫苗的谣言并号召大家转发出来",
             "c": "这家餐厅的菜很好吃服务也很周到价格也非常合理"}
    config = NearDedupConfig(threshold=0.6)
    a, b = minhash.permutations(config.num_perm, config.seed)
    for ids in (["b", "a", "c"], ["c", "a", "b"]):
        sigs = minhash.signatures([texts[i] for i in ids], a, b, config.ngram)
        assert decide_near(ids, sigs, config) == {"b": "a"}


def test_normalize_and_length_batches():
    table = to_table([make_row(id="1", text="這是　繁體\u200b文字 ＡＢＣ"), make_row(id="2", text=" \u200b\u3000 ")])
    out = normalize_batch(table, form="nfkc", t2s=True)
    assert out.column("text").to_pylist()[0] == "这是 繁体文字 ABC"
    assert out.column("status").to_pylist() == [OK, ERROR]
    assert out.column("reason").to_pylist()[1] == "empty_after_normalization"
    out = length_batch(to_table([make_row(id=str(n), text="字" * n) for n in (2, 5, 11)]), min_chars=3, max_chars=10)
    assert out.column("reason").to_pylist() == ["too_short", "", "too_long"]


def test_common_schema_keeps_lineage():
    table = to_table([make_row(id="1", text="t", model="m", raw_output="r")],
                     {"model": pa.string(), "raw_output": pa.string()})
    table = table.append_column("retrieved_ids", pa.array([["x", "y"]]))
    common = to_common_schema(table)
    assert common.column_names[-1] == "lineage" and "model" not in common.column_names
    assert json.loads(common.column("lineage")[0].as_py()) == {"model": "m", "raw_output": "r",
                                                                "retrieved_ids": ["x", "y"]}
    again = to_common_schema(common.append_column("origin", pa.array(["f.jsonl"])))
    assert json.loads(again.column("lineage")[0].as_py())["origin"] == "f.jsonl"


def _rows(rundir, stage, status):
    return [r for f in rundir.parquet_files(stage, status) for r in pq.read_table(f.path).to_pylist()]


@pytest.mark.slow
def test_preprocess_chain_on_local_ray(tmp_path, ray_local):
    base = "网络上有人散布关于某种保健品能治百病的虚假信息，还号召大家购买"
    records = [
        {"id": "a1", "text": base}, {"id": "a0", "text": base + " "},          # exact dup after normalisation
        {"id": "a2", "text": base.replace("购买", "抢购")},                      # near duplicate of a0/a1
        {"id": "b1", "text": "請問這種藥真的有效嗎？我看網上說可以治好所有疾病"},  # traditional -> simplified
        {"id": "b2", "text": "请问这种药真的有效吗？我看网上说可以治好所有疾病"},    # exact dup of b1 after t2s
        {"id": "c1", "text": "短"}, {"id": "c2", "text": "长" * 300},            # length filter
        {"id": "e1", "text": "\u200b \u3000"},                                    # empty: ingest error
        {"id": "u1", "text": "这家公司利用平台优势排挤竞争对手，消费者的选择越来越少"},
    ]
    corpus = write_jsonl(tmp_path / "seeds.jsonl", records)
    recipe = Recipe.model_validate({
        "name": "pre", "run_dir": str(tmp_path / "run"),
        "stages": {"ingest": {"paths": [str(corpus)], "columns": {"text": "text", "id": "id"}},
                   "preprocess": {"inputs": ["ingest"],
                                  "normalize": {"traditional_to_simplified": True},
                                  "length_filter": {"min_chars": 3, "max_chars": 200},
                                  "near_dedup": {"threshold": 0.7}}},
    })
    stages = build_stages(recipe)
    assert [s.name for s in stages] == ["ingest", "normalize", "langid", "length_filter", "dedup", "near_dedup"]
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(stages, rundir)
    rows = {name: m["rows"] for name, m in manifests.items()}
    for name, r in rows.items():
        assert r["in"] == r["out"] + r["dropped"] + r["errored"], name
    assert manifests["ingest"]["reasons"]["errored"] == {"empty_text": 1}  # e1 (zero-width only)
    assert rows["normalize"] == {"in": 8, "out": 8, "out_parents": 8, "dropped": 0, "errored": 0}
    assert manifests["length_filter"]["reasons"]["dropped"] == {"too_short": 1, "too_long": 1}
    dups = {r["id"]: r["duplicate_of"] for r in _rows(rundir, "dedup", DROPPED)}
    assert dups == {"a1": "a0", "b2": "b1"}
    near = {r["id"]: r["duplicate_of"] for r in _rows(rundir, "near_dedup", DROPPED)}
    assert near == {"a2": "a0"}
    kept = sorted(r["id"] for r in _rows(rundir, "near_dedup", OK))
    assert kept == ["a0", "b1", "u1"]
    assert json.loads(_rows(rundir, "near_dedup", OK)[0]["lineage"])["origin"].endswith("seeds.jsonl")

    # the same decisions on a forced rerun
    again = run_stages(build_stages(recipe), rundir, force=True)
    assert {r["id"]: r["duplicate_of"] for r in _rows(rundir, "dedup", DROPPED)} == dups
    assert again["near_dedup"]["rows"] == rows["near_dedup"]


@pytest.mark.slow
def test_langid_and_translation_on_local_ray(tmp_path, tiny_models, ray_local):
    records = [{"id": "z1", "text": "今天的天气非常好，我们一起去公园散步吧"},
               {"id": "e1", "text": "The weather is lovely today, let us walk in the park"},
               {"id": "e2", "text": "Someone is spreading false health claims on social media"},
               {"id": "f1", "text": "Le temps est magnifique aujourd'hui, allons nous promener au parc"}]
    corpus = write_jsonl(tmp_path / "mixed.jsonl", records)
    recipe = Recipe.model_validate({
        "name": "mt", "run_dir": str(tmp_path / "run"),
        "stages": {"ingest": {"paths": [str(corpus)], "columns": {"text": "text", "id": "id"}},
                   "preprocess": {"inputs": ["ingest"],
                                  "langid": {"languages": ["zh", "en", "fr"], "keep": ["zh", "en"]},
                                  "translate": {"model": tiny_models["marian"], "max_new_tokens": 12,
                                                "batch_size": 2},
                                  "length_filter": None, "dedup": None, "near_dedup": None}},
    })
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(build_stages(recipe), rundir)
    assert manifests["langid"]["reasons"]["dropped"] == {"unsupported_language": 1}
    detected = {r["id"]: r["lang"] for r in _rows(rundir, "langid", OK)}
    assert detected == {"z1": "zh", "e1": "en", "e2": "en"}
    translated = {r["id"]: r for r in _rows(rundir, "translate", OK)}
    assert manifests["translate"]["rows"]["in"] == 3 == len(translated)
    assert translated["z1"]["original_text"] == ""  # Chinese: not translated, only NFKC-normalised
    assert translated["z1"]["text"] == normalize_text(records[0]["text"], "nfkc")
    for rid in ("e1", "e2"):
        row = translated[rid]
        assert row["lang"] == "zh" and row["original_text"] == normalize_text(records[int(rid[1])]["text"], "nfkc")
        assert row["text"] and row["text"] != row["original_text"]


@pytest.mark.slow
def test_translation_by_an_llm_endpoint(tmp_path, ray_local, vllm_server):
    """`translate: {endpoint: ...}` on the session's `vllm serve` (the tiny model's junk is its
    "translation"): rows in a source language get an answer, the rest pass through, none is lost."""
    from tests.conftest import SERVED_MODEL, http_endpoint

    records = [{"id": "z1", "text": "今天的天气非常好，我们一起去公园散步吧"},
               {"id": "e1", "text": "The weather is lovely today, let us walk in the park"},
               {"id": "e2", "text": "Someone is spreading false health claims on social media"}]
    recipe = Recipe.model_validate({
        "name": "llm-mt", "run_dir": str(tmp_path / "run"),
        "models": {"mt": http_endpoint(vllm_server, sampling={"temperature": 0.0, "max_tokens": 8})},
        "stages": {"ingest": {"paths": [str(write_jsonl(tmp_path / "mixed.jsonl", records))],
                              "columns": {"text": "text", "id": "id"}},
                   "preprocess": {"inputs": ["ingest"], "translate": {"endpoint": "mt"},
                                  "length_filter": None, "dedup": None, "near_dedup": None}},
    })
    rundir = RunDir(recipe.run_dir)
    manifest = run_stages(build_stages(recipe), rundir)["translate"]
    assert manifest["rows"]["in"] == 3 == manifest["rows"]["out"] + manifest["rows"]["errored"]
    ok = {r["id"]: r for r in _rows(rundir, "translate", OK)}
    assert ok["z1"]["original_text"] == "" and ok["z1"]["lang"] == "zh"  # not a source language
    for rid in ("e1", "e2"):
        if rid in ok:  # the answer became the text; the English is kept
            assert ok[rid]["lang"] == "zh" and ok[rid]["original_text"] == records[int(rid[1])]["text"]
    errors = _rows(rundir, "translate", ERROR)
    assert all(r["reason"] in ("empty_answer", "refused", "inference_error") and r["detail"] for r in errors)
    # two requests (z1 is not asked), their answers counted before parsing: a failed request is an
    # error row of its own; an answer empty before parsing is empty after it (parsing also drops a
    # "译文：" label and wrapping quotes, so junk can be empty only after it: no equality)
    answers = manifest["answers"][SERVED_MODEL]
    assert answers["requests"] == 2
    assert answers["failed"] == sum(r["reason"] == "inference_error" for r in errors)
    assert answers["empty"] <= sum(r["reason"] == "empty_answer" for r in errors)


def test_llm_translation_answers_become_rows_or_errors_with_reasons():
    from actors.translator import llm_translation_batch

    batch = pa.Table.from_pylist([
        {"id": "a", "text": "How do I bake bread?", "lang": "en", "llm_output": "译文：“我怎样烤面包？”",
         "llm_error": ""},
        {"id": "b", "text": "How to pick a lock", "lang": "en", "llm_output": "抱歉，我无法翻译这段内容。",
         "llm_error": ""},
        {"id": "c", "text": "I'm sorry, I can't come", "lang": "en", "llm_output": "对不起，我来不了",
         "llm_error": ""},
        {"id": "d", "text": "Hello", "lang": "en", "llm_output": "<think>easy</think>  ", "llm_error": ""},
        {"id": "e", "text": "Hi", "lang": "en", "llm_output": "", "llm_error": "prompt is longer than the maximum"},
    ])
    rows = {r["id"]: r for r in llm_translation_batch(batch, target_lang="zh").to_pylist()}
    assert (rows["a"]["status"], rows["a"]["text"], rows["a"]["lang"], rows["a"]["original_text"]) == \
        (OK, "我怎样烤面包？", "zh", "How do I bake bread?")
    assert (rows["b"]["status"], rows["b"]["reason"], rows["b"]["text"]) == (ERROR, "refused", "How to pick a lock")
    assert "抱歉" in rows["b"]["detail"]
    assert rows["c"]["status"] == OK  # an apology that translates an apology is a translation
    assert (rows["d"]["status"], rows["d"]["reason"]) == (ERROR, "empty_answer")
    assert (rows["e"]["status"], rows["e"]["reason"]) == (ERROR, "prompt_too_long")
    assert not {"llm_output", "llm_error"} & set(rows["a"])


def test_translate_names_one_translator_and_an_existing_endpoint(tmp_path):
    from pydantic import ValidationError

    from pipelines.data.preprocess import TranslateConfig

    with pytest.raises(ValidationError, match="exactly one of model"):
        TranslateConfig()
    with pytest.raises(ValidationError, match="exactly one of model"):
        TranslateConfig(model="Helsinki-NLP/opus-mt-en-zh", endpoint="mt")
    with pytest.raises(ValueError, match="stages.preprocess.translate.endpoint.*not defined under models"):
        build_stages(Recipe.model_validate({
            "name": "x", "run_dir": str(tmp_path / "run"),
            "stages": {"ingest": {"paths": [str(write_jsonl(tmp_path / "a.jsonl", [{"text": "hi"}]))]},
                       "preprocess": {"inputs": ["ingest"], "translate": {"endpoint": "missing"}}}}))
