"""The FAISS index over corpus vectors, persisted in the run directory with its id map.

Layout of the ``index`` stage folder::

    index/index.faiss             the serialised FAISS index (inner product on normalised vectors)
    index/index.json              kind, factory string, dimension, size, build parameters and timings
    index/status=ok/*.parquet     the id map: ``position`` (FAISS label) -> corpus ``id``
    index/status=error/*.parquet  vectors that could not be indexed (NaN, zero norm), with reason

The build runs as one Ray task with declared CPUs (not in the driver). It streams only ``id`` and
``embedding`` from the embedding output - never texts - into one float32 matrix, trains the
quantizer on a seeded random sample (IVF / IVF-PQ) and adds the vectors in chunks.
:meth:`VectorIndex.load` opens an index written by this or an earlier run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from actors.embedder import EMBEDDING, arrow_to_vectors
from pipelines.core.config import OPERATIONAL, Strict
from pipelines.core.registry import register
from pipelines.core.rows import ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage


class IndexConfig(Strict):
    """The FAISS index over the corpus vectors (inner product on normalised vectors = cosine)."""

    kind: Literal["flat", "ivf", "hnsw", "ivfpq"] = Field(
        "flat", description="flat: exact (small corpora); ivf / hnsw / ivfpq: approximate")
    nlist: int | None = Field(None, ge=1, description="ivf/ivfpq lists; default 4*sqrt(n)")
    nprobe: int = Field(32, ge=1, description="ivf/ivfpq lists searched per query")
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(256, ge=1)
    pq_m: int = Field(32, ge=1, description="ivfpq sub-quantizers; must divide the dimension")
    pq_bits: int = Field(8, ge=1, le=16)
    refine: bool = Field(True, description="ivfpq: re-rank candidates with exact vectors")
    train_size: int = Field(100_000, ge=1, description="vectors sampled to train ivf/ivfpq")
    num_cpus: float = Field(1, gt=0, description="CPU slots the build task reserves",
                            json_schema_extra=OPERATIONAL)
    threads: int | None = Field(None, ge=1, description="FAISS threads; default: all cores",
                                json_schema_extra=OPERATIONAL)

log = logging.getLogger(__name__)

INDEX_FILE, META_FILE = "index.faiss", "index.json"
ADD_CHUNK = 65536


def default_nlist(n: int) -> int:
    """IVF list count: 4*sqrt(n), at most n/39 so each centroid gets FAISS's minimum of 39
    training points, at least 1."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def factory_string(config: IndexConfig, dim: int, n: int) -> str:
    """The ``faiss.index_factory`` description for ``config`` over ``n`` vectors of ``dim``."""
    if config.kind == "flat":
        return "Flat"
    if config.kind == "hnsw":
        return f"HNSW{config.hnsw_m},Flat"
    nlist = config.nlist or default_nlist(n)
    if config.kind == "ivf":
        return f"IVF{nlist},Flat"
    if dim % config.pq_m:
        raise ValueError(f"index.pq_m={config.pq_m} must divide the embedding dimension {dim}")
    return f"IVF{nlist},PQ{config.pq_m}x{config.pq_bits}" + (",RFlat" if config.refine else "")


def set_search_params(index: Any, kind: str, nprobe: int, ef_search: int, k_factor: int = 4) -> None:
    """Apply the search-time knobs, which the index file does not store: ``nprobe`` (ivf, ivfpq),
    ``efSearch`` (hnsw), and for ivfpq with refinement ``k_factor`` (PQ candidates per result that
    are re-ranked with exact vectors)."""
    import faiss

    space = faiss.ParameterSpace()
    if kind in ("ivf", "ivfpq"):
        space.set_index_parameter(index, "nprobe", nprobe)
    elif kind == "hnsw":
        space.set_index_parameter(index, "efSearch", ef_search)
    if kind == "ivfpq" and isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        space.set_index_parameter(index, "k_factor_rf", k_factor)


def build_faiss(vectors: np.ndarray, config: IndexConfig, seed: int) -> tuple[Any, dict[str, float]]:
    """Train (when the kind needs it) and fill a FAISS index; returns it and timings in seconds."""
    import faiss

    n, dim = vectors.shape
    description = factory_string(config, dim, n)
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    if config.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = config.ef_construction
    timings = {"train_seconds": 0.0}
    if not index.is_trained:
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        take = min(n, config.train_size)
        sample = vectors[np.sort(rng.choice(n, size=take, replace=False))] if take < n else vectors
        index.train(sample)
        timings["train_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        index.add(vectors[start:start + ADD_CHUNK])
    timings["add_seconds"] = time.perf_counter() - t0
    set_search_params(index, config.kind, config.nprobe, config.ef_search)
    return index, timings


def invalid_vectors(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask of rows that cannot be indexed: non-finite values or (near) zero norm."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1)
    return ~finite | (norms < 1e-6)


def _gather(rundir: RunDir, source_stage: str, expected: int) -> tuple[np.ndarray, list[str]]:
    """Stream ``id`` + ``embedding`` of the source stage's ok rows into one matrix."""
    vectors: np.ndarray | None = None
    ids: list[str] = []
    filled = 0
    for batch in rundir.iter_batches(source_stage, OK, ["id", EMBEDDING]):
        chunk = arrow_to_vectors(batch.column(EMBEDDING))
        if vectors is None:
            vectors = np.empty((max(expected, len(chunk)), chunk.shape[1]), dtype=np.float32)
        if filled + len(chunk) > len(vectors):  # more rows than the manifest said: grow
            vectors = np.concatenate([vectors, np.empty_like(vectors[: filled + len(chunk) - len(vectors)])])
        vectors[filled:filled + len(chunk)] = chunk
        ids.extend(batch.column("id").to_pylist())
        filled += len(chunk)
        if filled % (10 * ADD_CHUNK) < len(chunk):
            log.info("index: gathered %d / %d vectors", filled, expected)
    if vectors is None:
        raise ValueError(f"index: stage {source_stage} has no vectors")
    return vectors[:filled], ids


def build_and_save(run_root: str, stage: str, source_stage: str, expected: int, config: IndexConfig,
                   seed: int) -> dict[str, Any]:
    """Build the index from ``source_stage``'s vectors and write the ``stage`` folder (see module
    docstring). Runs inside a Ray task; returns the metadata it wrote."""
    import faiss

    # Ray pins OMP_NUM_THREADS to the task's CPU count; FAISS gets its own knob (default: all cores).
    faiss.omp_set_num_threads(config.threads or os.cpu_count() or 1)
    rundir = RunDir(run_root)
    t0 = time.perf_counter()
    vectors, ids = _gather(rundir, source_stage, expected)
    gather_seconds = time.perf_counter() - t0
    bad = invalid_vectors(vectors)
    if bad.any():
        bad_ids = [i for i, b in zip(ids, bad) if b]
        rundir.write_table(stage, ERROR, pa.table({
            "id": bad_ids, "status": [ERROR] * len(bad_ids),
            "reason": ["invalid_vector"] * len(bad_ids),
            "detail": ["non-finite values or zero norm"] * len(bad_ids)}))
        vectors = vectors[~bad]
        ids = [i for i, b in zip(ids, bad) if not b]
    if not ids:
        raise ValueError("index: no valid vectors to index")
    index, timings = build_faiss(vectors, config, seed)
    rundir.write_table(stage, OK, pa.table({
        "id": pa.array(ids, pa.string()), "position": pa.array(np.arange(len(ids)), pa.int64()),
        "status": [OK] * len(ids), "reason": [""] * len(ids), "detail": [""] * len(ids)}))
    rundir.write_bytes(f"{stage}/{INDEX_FILE}", faiss.serialize_index(index).tobytes())
    meta = {
        "kind": config.kind, "factory": factory_string(config, vectors.shape[1], len(ids)),
        "metric": "inner_product", "dim": int(vectors.shape[1]), "ntotal": int(index.ntotal),
        "nprobe": config.nprobe, "ef_search": config.ef_search, "seed": seed,
        "gather_seconds": round(gather_seconds, 3),
        **{k: round(v, 3) for k, v in timings.items()},
    }
    rundir.write_text(f"{stage}/{META_FILE}", json.dumps(meta, indent=2))
    log.info("index: %s over %d vectors (dim %d) built in %.1fs", meta["factory"], meta["ntotal"],
             meta["dim"], timings["train_seconds"] + timings["add_seconds"])
    return meta


@dataclass
class VectorIndex:
    """A loaded index and its id map; :meth:`search` answers in corpus ids."""

    index: Any
    ids: np.ndarray  # position -> corpus id (object array of str)
    meta: dict[str, Any]

    @classmethod
    def load(cls, run_root: str, stage: str = "index", config: IndexConfig | None = None) -> VectorIndex:
        """Open the index a run wrote (``run_root`` is that run's directory, local or URI)."""
        import faiss

        rundir = RunDir(run_root, create=False)  # a reader (a search actor, a later run): writes nothing
        meta = json.loads(rundir.read_text(f"{stage}/{META_FILE}") or "null")
        if meta is None:
            raise FileNotFoundError(f"no index in {rundir.uri(stage)} (missing {META_FILE})")
        index = faiss.deserialize_index(np.frombuffer(rundir.read_bytes(f"{stage}/{INDEX_FILE}"),
                                                      dtype=np.uint8))
        positions, ids = [], []
        for batch in rundir.iter_batches(stage, OK, ["position", "id"]):
            positions.append(batch.column("position").to_numpy())
            ids.extend(batch.column("id").to_pylist())
        id_map = np.empty(len(ids), dtype=object)
        id_map[np.concatenate(positions)] = ids
        if len(id_map) != index.ntotal:
            raise ValueError(f"index {rundir.uri(stage)}: id map has {len(id_map)} entries, "
                             f"index {index.ntotal}")
        if config is not None:  # the caller's search knobs win over the ones used at build time
            meta = {**meta, "nprobe": config.nprobe, "ef_search": config.ef_search}
        set_search_params(index, meta["kind"], meta["nprobe"], meta["ef_search"])
        return cls(index=index, ids=id_map, meta=meta)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` corpus ids (best first) and scores per query; fewer when the index is small."""
        k = min(k, int(self.index.ntotal))
        scores, positions = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        results = [[self.ids[p] for p in row if p >= 0] for row in positions]
        return results, scores


class IndexStage(Stage):
    """Builds the index in one Ray task (declared CPUs) from the ``embed`` stage's vectors."""

    name = "index"
    inputs = ("embed",)
    reads = frozenset({"id", "embedding"})
    writes = frozenset({"id", "position"})  # the vectors' positions in the index (VectorIndex.load)

    def __init__(self, config: IndexConfig, seed: int):
        super().__init__(config)
        self.seed = seed

    def write(self, inputs: dict, rundir: RunDir) -> None:
        import ray

        expected = rundir.count_rows("embed", OK)
        task = ray.remote(build_and_save).options(num_cpus=self.config.num_cpus, max_retries=0)
        ray.get(task.remote(rundir.root, self.name, "embed", expected, self.config, self.seed))

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        return json.loads(rundir.read_text(f"{self.name}/{META_FILE}") or "{}")


register("index", config=IndexConfig, needs=("embed",),
         build=lambda recipe, config: [IndexStage(config, recipe.seed)])
