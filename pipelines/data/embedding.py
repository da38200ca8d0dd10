"""The embedding stage: every ingested document -> one normalised vector, keyed by the row id."""

from __future__ import annotations

from typing import Any

from actors.embedder import embed
from pipelines.core.config import EmbedConfig, semantic_dump
from pipelines.core.stage import Stage


class EmbedStage(Stage):
    """Reads ``id`` and ``text`` of the ingestion output; writes ``id`` + ``embedding`` (texts are not
    copied: retrieval joins them back by id)."""

    name = "embed"
    inputs = ("ingest",)

    def __init__(self, config: EmbedConfig):
        super().__init__(config)

    def hash_payload(self) -> Any:
        # throughput knobs (batch sizes, actors, device, threads) are operational: out of the hash
        return semantic_dump(self.config)

    def build(self, inputs: dict) -> Any:
        return embed(inputs["ingest"], self.config)
