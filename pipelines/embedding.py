"""The embedding stage: every ingested document -> one normalised vector, keyed by the row id."""

from __future__ import annotations

from typing import Any

from actors.embedder import embed
from pipelines.config import EmbedConfig
from pipelines.stage import Stage


class EmbedStage(Stage):
    """Reads ``id`` and ``text`` of the ingestion output; writes ``id`` + ``embedding`` (texts are not
    copied: retrieval joins them back by id)."""

    name = "embed"
    inputs = ("ingest",)

    def __init__(self, config: EmbedConfig):
        super().__init__(config)

    def hash_payload(self) -> Any:
        # Throughput knobs do not change the vectors; keep them out of the hash so that retuning
        # batch sizes or actor counts does not recompute the stage.
        return self.config.model_dump(mode="json", include={"model", "max_seq_length"})

    def build(self, inputs: dict) -> Any:
        return embed(inputs["ingest"], self.config)
