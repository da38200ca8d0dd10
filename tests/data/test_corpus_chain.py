"""The corpus -> RAG chain on a real local Ray: keyword pool (tiny LLM), ingestion, MiniLM embeddings,
FAISS, per-category retrieval, RAG rewriting (tiny LLM). Checks counts, joins and lineage."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.embedder import EMBEDDING, arrow_to_vectors
from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.core.taxonomy import load_taxonomy
from tests.conftest import assert_balanced, long_context_endpoint, write_jsonl

TOPICS = ["有人在网上散布谣言说某种药能治百病", "论坛里有人发帖歧视外地人", "某公司泄露了竞争对手的商业秘密",
          "A post claims a vaccine contains microchips", "Someone doxxed a streamer and posted her address",
          "网友偷拍他人并上传到社交平台", "An app uses its platform power to block rival sellers",
          "有人宣扬暴力并号召线下聚集"]


def _corpus(path):
    records = [{"doc_id": f"c{i}", "content": f"{TOPICS[i % len(TOPICS)]}（第{i}条）", "lang": "zh"}
               for i in range(40)]
    records += ['{"doc_id": "broken', {"doc_id": "no-text"}, {"doc_id": "blank", "content": " \u3000 "},
                {"doc_id": "number", "content": 42}]
    return write_jsonl(path, records)


def _table(rundir, stage, status=OK):
    return [pq.read_table(f.path).to_pylist() for f in rundir.parquet_files(stage, status)]


def _rows(rundir, stage, status=OK):
    return [row for rows in _table(rundir, stage, status) for row in rows]


@pytest.mark.slow
def test_corpus_to_rag_prompts(tmp_path, tiny_models, ray_local):
    recipe = Recipe.model_validate({
        "name": "chain", "run_dir": str(tmp_path / "run"), "seed": 3,
        "models": {"lm": long_context_endpoint(tiny_models["causal-lm"])},
        "stages": {
            "keywords": {"model": "lm", "target_per_category": 22},
            "ingest": {"paths": [str(_corpus(tmp_path / "corpus.jsonl"))],
                       "columns": {"text": "content", "id": "doc_id", "lang": "lang"}},
            "embed": {"model": tiny_models["embedder"], "batch_size": 16},
            "index": {"kind": "flat"},
            "retrieve": {"queries_per_category": 2, "top_k": 100, "sample": 5, "max_text_chars": 120},
            "rag": {"model": "lm", "max_outputs": 4, "min_chars": 2},
        },
    })
    stages = build_stages(recipe)
    assert [s.name for s in stages] == ["keywords", "ingest", "embed", "index", "retrieve", "rag"]
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(stages, rundir)
    for m in manifests.values():
        assert_balanced(m)

    # keyword pool: all 620 seeds kept, expansions pooled, nothing over the target
    tax = load_taxonomy()
    keywords = _rows(rundir, "keywords")
    assert sum(r["method"] == "seed" for r in keywords) == 620
    per_micro = Counter(r["micro"] for r in keywords)
    assert set(per_micro) == set(tax.micro_codes) and all(20 <= n <= 22 for n in per_micro.values())
    assert all(r["model"] == tiny_models["causal-lm"] for r in keywords if r["method"] == "expanded")
    assert manifests["keywords"]["summary"]["per_category"] == dict(sorted(per_micro.items()))

    # ingestion: 4 bad rows, each with its reason
    assert manifests["ingest"]["rows"] == {"in": 44, "out": 40, "out_parents": 40, "dropped": 0, "errored": 4}
    assert manifests["ingest"]["reasons"]["errored"] == {"invalid_json": 1, "missing_text": 1,
                                                          "empty_text": 1, "non_text": 1}
    corpus = {r["id"]: r["text"] for r in _rows(rundir, "ingest")}

    # embeddings: one unit vector per document, keyed by id, no text copied
    emb = [t for t in (pq.read_table(f.path) for f in rundir.parquet_files("embed", OK))]
    assert sorted(i for t in emb for i in t.column("id").to_pylist()) == sorted(corpus)
    assert "text" not in emb[0].column_names
    norms = np.linalg.norm(np.concatenate([arrow_to_vectors(t.column(EMBEDDING)) for t in emb]), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert manifests["index"]["summary"]["ntotal"] == 40

    # retrieval: 31 x 2 queries, 5 texts each, joined back from the corpus by id
    retrieved = _rows(rundir, "retrieve")
    assert manifests["retrieve"]["rows"]["in"] == 62 and len(retrieved) == 62
    pools = {}
    for r in keywords:
        pools.setdefault(r["micro"], set()).add(r["text"])
    for q in retrieved:
        assert q["candidates"] == 40 and len(q["retrieved_ids"]) == 5 == len(set(q["retrieved_ids"]))
        assert q["retrieved_texts"] == [corpus[i][:120] for i in q["retrieved_ids"]]
        assert set(q["keywords"]) <= pools[q["micro"]] and len(q["keywords"]) == 3
        assert q["macro"] == tax.macro_of(q["micro"]) and q["text"].startswith(q["macro_label"])

    # a later run draws exactly the same neighbours (seeded by recipe seed and query id)
    again = {r["id"]: r["retrieved_ids"] for r in stages[4].build({}).take_all()}
    assert again == {q["id"]: q["retrieved_ids"] for q in retrieved}

    # RAG rewriting: unsafe prompts labelled with the query's category, lineage kept
    queries = {q["id"]: q for q in retrieved}
    prompts, failed = _rows(rundir, "rag"), _rows(rundir, "rag", ERROR)
    assert manifests["rag"]["rows"]["in"] == 62
    assert len({p["parent_id"] for p in prompts}) + len(failed) == 62
    for p in prompts:
        q = queries[p["parent_id"]]
        assert (p["label"], p["source"], p["method"]) == ("unsafe", "rag", "rag")
        assert (p["macro"], p["micro"], p["query"]) == (q["macro"], q["micro"], q["text"])
        assert p["keywords"] == q["keywords"] and p["retrieved_ids"] == q["retrieved_ids"]
        assert p["model"] == tiny_models["causal-lm"] and p["raw_output"]
    assert all(f["reason"] in {"unparseable_output", "prompt_too_long", "inference_error"} for f in failed)

    # resume: nothing recomputed
    assert run_stages(build_stages(recipe), rundir) == {name: rundir.read_manifest(name) for name in manifests}
