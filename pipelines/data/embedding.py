"""The embedding stage: every ingested document -> one normalised vector, keyed by the row id."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from actors.embedder import EMBEDDING, embed
from pipelines.core.config import ADDED, OPERATIONAL, ModelRef, Strict
from pipelines.core.registry import register
from pipelines.core.stage import Stage


class EmbedConfig(Strict):
    """Sentence-transformers embeddings in a Ray Data actor pool (normalised, for inner product)."""

    model: ModelRef = Field(description="BAAI/bge-m3 at paper scale; a local folder offline")
    batch_size: int = Field(1024, ge=1, description="rows per Ray Data batch sent to one actor",
                            json_schema_extra=OPERATIONAL)
    encode_batch_size: int = Field(64, ge=1, description="sentence-transformers encode batch size",
                                   json_schema_extra=OPERATIONAL)
    concurrency: int = Field(1, ge=1, description="embedding actors", json_schema_extra=OPERATIONAL)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one GPU per actor when the cluster has GPU nodes, else CPU",
        json_schema_extra=OPERATIONAL)
    num_cpus: float = Field(1, gt=0, description="CPU slots each actor reserves", json_schema_extra=OPERATIONAL)
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per CPU actor; default: its num_cpus",
        json_schema_extra=OPERATIONAL)
    max_seq_length: int | None = Field(None, ge=8, description="default: the model's own")
    document_prompt: str | None = Field(
        None, json_schema_extra=ADDED, description="name of the model's sentence-transformers prompt for "
        "corpus documents (EmbeddingGemma: document); default none")
    query_prompt: str | None = Field(
        None, json_schema_extra=ADDED, description="name of its prompt for retrieval queries (EmbeddingGemma: "
        "query); default none")


class EmbedStage(Stage):
    """Reads ``id`` and ``text`` of the ingestion output; writes ``id`` + ``embedding`` (texts are not
    copied: retrieval joins them back by id)."""

    name = "embed"
    inputs = ("ingest",)
    reads = frozenset({"id", "text"})
    writes = frozenset({"id", EMBEDDING})
    resumable = True  # one vector per document, keyed by its id

    def build(self, inputs: dict) -> Any:
        return embed(inputs["ingest"], self.config)


register("embed", config=EmbedConfig, needs=("ingest",),
         build=lambda recipe, config: [EmbedStage(config)])
