"""Per-category retrieval: queries from labels + sampled keywords, top-k neighbours, a uniform sample.

For every micro category the stage plans ``queries_per_category`` queries. Each query is the macro
label, the micro label and ``keywords_per_query`` keywords drawn from that category's pool (the
``keywords`` stage). Queries are embedded with the corpus's embedding model, searched in the FAISS
index (top ``top_k``), and ``sample`` neighbours are drawn uniformly from the hits. All draws use
:func:`pipelines.core.rows.keyed_rng` keyed by the recipe seed and the category / query id, so a rerun
retrieves exactly the same texts. Texts of the sampled ids are then read back from the ingestion
output with a filter; the corpus is never held in memory.

Output: one row per query (``text`` = the query) with ``macro_label``, ``micro_label``, ``keywords``,
``retrieved_ids``, ``retrieved_texts`` and ``candidates`` (how many neighbours were found).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from actors.embedder import EMBEDDING, arrow_to_vectors, embed
from pipelines.core.config import OPERATIONAL, Strict
from pipelines.core.registry import register
from pipelines.core.rows import COMMON_COLUMNS, ERROR, OK, content_id, keyed_rng, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage
from pipelines.core.taxonomy import Taxonomy, load_taxonomy
from pipelines.data.embedding import EmbedConfig


class RetrieveConfig(Strict):
    """Per micro category: queries of macro label + micro label + sampled keywords; top-k; sample."""

    queries_per_category: int = Field(1, ge=1)
    keywords_per_query: int = Field(3, ge=1)
    top_k: int = Field(100, ge=1)
    sample: int = Field(5, ge=1, description="neighbours drawn uniformly from the top-k")
    lang: Literal["zh", "en", "both"] = Field("zh", description="language of labels and keywords")
    search_actors: int = Field(1, ge=1, description="actors that each load the index and search",
                               json_schema_extra=OPERATIONAL)
    max_text_chars: int = Field(1500, ge=16, description="retrieved texts are cut to this length")

    @model_validator(mode="after")
    def _sample_within_top_k(self) -> RetrieveConfig:
        if self.sample > self.top_k:
            raise ValueError(f"sample ({self.sample}) must not exceed top_k ({self.top_k})")
        return self

log = logging.getLogger(__name__)

LINEAGE = {
    "macro_label": pa.string(), "micro_label": pa.string(), "keywords": pa.list_(pa.string()),
    "retrieved_ids": pa.list_(pa.string()), "retrieved_texts": pa.list_(pa.string()),
    "candidates": pa.int32(),
}


def bilingual(zh: str, en: str, lang: str) -> str:
    """The label or keyword in the query language (``both``: ``中文 English``); falls back to the
    side that exists."""
    if lang == "both" and zh and en:
        return f"{zh} {en}"
    if lang == "en":
        return en or zh
    return zh or en


def plan_queries(taxonomy: Taxonomy, pools: dict[str, list[tuple[str, str]]], config: RetrieveConfig,
                 seed: int) -> list[dict[str, Any]]:
    """Every query of the run, in category order: ``queries_per_category`` per micro category, each
    with ``keywords_per_query`` keywords drawn without replacement from the category's pool."""
    queries = []
    for code in taxonomy.micro_codes:
        micro, macro = taxonomy.micro(code), taxonomy.macro(code)
        pool = pools.get(code) or [(kw.zh, kw.en) for kw in micro.keywords]
        macro_label = bilingual(macro.zh, macro.en, config.lang)
        micro_label = bilingual(micro.zh, micro.en, config.lang)
        for i in range(config.queries_per_category):
            rng = keyed_rng(seed, "query", code, str(i))
            picks = rng.choice(len(pool), size=min(config.keywords_per_query, len(pool)), replace=False)
            keywords = [bilingual(*pool[p], config.lang) for p in picks]
            text = " ".join([macro_label, micro_label, *keywords])
            queries.append(make_row(
                id=content_id(text, code, str(i)), text=text, lang=config.lang, macro=macro.code,
                micro=code, source="rag", method="retrieval", macro_label=macro_label,
                micro_label=micro_label, keywords=keywords))
    return queries


def read_keyword_pools(rundir: RunDir, stage: str = "keywords") -> dict[str, list[tuple[str, str]]]:
    """The keyword stage's kept keywords as ``{micro: [(zh, en)]}`` (``zh`` is ``""`` when the
    keyword is English only)."""
    pools: dict[str, list[tuple[str, str]]] = {}
    for batch in rundir.iter_batches(stage, OK, ["micro", "text", "keyword_en", "lang"]):
        for micro, text, en, lang in zip(*(batch.column(c).to_pylist() for c in batch.column_names)):
            pools.setdefault(micro, []).append((text if lang == "zh" else "", en))
    return pools


def sample_neighbours(candidates: list[str], n: int, seed: int, key: str) -> list[str]:
    """``n`` of ``candidates`` drawn uniformly without replacement (all if fewer), kept in rank
    order; the draw depends only on ``seed`` and ``key``."""
    if len(candidates) <= n:
        return list(candidates)
    picks = keyed_rng(seed, "sample", key).choice(len(candidates), size=n, replace=False)
    return [candidates[i] for i in sorted(picks)]


class Searcher:
    """``map_batches`` class: each actor loads the index once and adds the top-k ``candidates``."""

    def __init__(self, run_root: str, index_stage: str, top_k: int):
        from pipelines.data.vector_index import VectorIndex

        self.index = VectorIndex.load(run_root, index_stage)
        self.top_k = top_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        results, _ = self.index.search(arrow_to_vectors(batch.column(EMBEDDING)), self.top_k)
        failed = [s != OK for s in batch.column("status").to_pylist()]
        results = [[] if bad else r for r, bad in zip(results, failed)]
        return batch.drop_columns([EMBEDDING]).append_column(
            "candidate_ids", pa.array(results, pa.list_(pa.string())))


def keep_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("id"), value_set=ids))


class RetrieveStage(Stage):
    name = "retrieve"
    requires = ("keywords", "ingest", "embed", "index")
    # one row per query: its category (no label), keywords and retrieved texts
    writes = (COMMON_COLUMNS - {"label"}) | frozenset(LINEAGE)
    #: the run directory it reads the keyword pools, the corpus and the index from: where, not what (their
    #: manifests are in its input fingerprint)
    unhashed = Stage.unhashed | {"rundir"}

    def __init__(self, config: RetrieveConfig, embed_config: EmbedConfig, taxonomy_path: str,
                 seed: int, run_root: str):
        super().__init__(config)
        self.embed_config = embed_config  # the queries are embedded as the corpus was
        self.taxonomy = load_taxonomy(taxonomy_path)  # the queries (and the rows' labels) name the categories
        self.seed = seed
        self.rundir = RunDir(run_root)
        # the keyword pools, the corpus texts of the hits, the index's ids (the vectors come from its file)
        self.reads = {"keywords": frozenset({"micro", "text", "keyword_en", "lang"}),
                      "ingest": frozenset({"id", "text"}), "index": frozenset({"id", "position"})}

    def expected_rows_in(self) -> int:
        return len(self.taxonomy.micro_codes) * self.config.queries_per_category

    def build(self, inputs: dict) -> Any:
        import ray

        cfg = self.config
        queries = plan_queries(self.taxonomy, read_keyword_pools(self.rundir), cfg, self.seed)
        log.info("retrieve: %d queries, top %d, sample %d", len(queries), cfg.top_k, cfg.sample)
        searched = embed(ray.data.from_items(queries), self.embed_config, corpus=False).map_batches(
            Searcher, fn_constructor_kwargs={"run_root": self.rundir.root, "index_stage": "index",
                                             "top_k": cfg.top_k},
            batch_size=1024, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.search_actors)).take_all()

        for row in searched:
            row["candidates"] = len(row["candidate_ids"])
            row["retrieved_ids"] = sample_neighbours(row.pop("candidate_ids"), cfg.sample, self.seed,
                                                     row["id"])
        needed = pa.array(sorted({i for row in searched for i in row["retrieved_ids"]}), pa.string())
        texts = {}
        if len(needed):
            corpus = ray.data.read_parquet(self.rundir.partition_uri("ingest", OK),
                                           partitioning=None).select_columns(["id", "text"])
            for row in corpus.map_batches(keep_ids, batch_format="pyarrow",
                                          fn_kwargs={"ids": needed}).iter_rows():
                texts[row["id"]] = row["text"]

        rows = []
        for row in searched:
            found = [i for i in row["retrieved_ids"] if i in texts]
            row["retrieved_ids"] = found
            row["retrieved_texts"] = [texts[i][: cfg.max_text_chars] for i in found]
            if row["status"] == OK and not row["candidates"]:
                row.update(status=ERROR, reason="no_neighbours", detail="the index returned no hit")
            elif row["status"] == OK and not found:
                row.update(status=ERROR, reason="missing_corpus_text",
                           detail="none of the sampled ids is in the ingestion output")
            rows.append(row)
        return ray.data.from_arrow(to_table(rows, LINEAGE))


register("retrieve", config=RetrieveConfig, needs=("keywords", "ingest", "embed", "index"),
         build=lambda recipe, config: [RetrieveStage(config, recipe.stages.embed, recipe.taxonomy, recipe.seed,
                                                     recipe.run_dir)])
