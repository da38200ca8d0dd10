"""FAISS index build, persistence and search on small corpora (real FAISS, real files)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.embedder import EMBEDDING, arrow_to_vectors, vectors_to_arrow
from pipelines.core.rows import ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.data.vector_index import IndexConfig, VectorIndex, build_and_save, factory_string


def _unit(rng, n, dim=64):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embed_output(rundir: RunDir, vectors: np.ndarray, ids: list[str], files: int = 3) -> None:
    """What the embed stage writes: id + embedding in the ok partition, in several files."""
    for f, chunk in enumerate(np.array_split(np.arange(len(ids)), files)):
        rundir.write_table("embed", OK, pa.table({
            "id": [ids[i] for i in chunk], EMBEDDING: vectors_to_arrow(vectors[chunk]),
            "status": [OK] * len(chunk), "reason": [""] * len(chunk), "detail": [""] * len(chunk)}),
            name=f"part-{f}.parquet")


def test_vectors_roundtrip_arrow():
    x = _unit(np.random.default_rng(0), 5, 8)
    assert np.array_equal(arrow_to_vectors(pa.chunked_array([vectors_to_arrow(x)])), x)


def test_flat_index_returns_true_neighbours_by_id(tmp_path):
    rng = np.random.default_rng(0)
    vectors, ids = _unit(rng, 500), [f"doc-{i}" for i in range(500)]
    rundir = RunDir(str(tmp_path / "run"))
    _embed_output(rundir, vectors, ids)
    meta = build_and_save(rundir.root, "index", "embed", 500, IndexConfig(kind="flat"), seed=0)
    assert meta["ntotal"] == 500 and meta["factory"] == "Flat" and meta["dim"] == 64
    assert rundir.count_rows("index", OK) == 500

    index = VectorIndex.load(rundir.root)  # as a later run loads it
    queries = _unit(rng, 20)
    found, scores = index.search(queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert found == [[ids[j] for j in row] for row in truth]
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    found_all, _ = index.search(queries[:1], 10_000)  # k larger than the corpus: everything, once
    assert sorted(found_all[0]) == sorted(ids)


def test_invalid_vectors_go_to_errors(tmp_path):
    rng = np.random.default_rng(1)
    vectors, ids = _unit(rng, 50), [f"d{i}" for i in range(50)]
    vectors[3] = np.nan
    vectors[7] = 0.0
    rundir = RunDir(str(tmp_path / "run"))
    _embed_output(rundir, vectors, ids, files=1)
    build_and_save(rundir.root, "index", "embed", 50, IndexConfig(kind="flat"), seed=0)
    assert rundir.count_rows("index", OK) == 48
    assert sorted(rundir.column_values("index", ERROR, "id")) == ["d3", "d7"]
    assert rundir.reason_counts("index", ERROR) == {"invalid_vector": 2}
    found, _ = VectorIndex.load(rundir.root).search(vectors[:1], 50)
    assert "d3" not in found[0] and "d7" not in found[0] and len(found[0]) == 48


@pytest.mark.parametrize("kind, extra", [("ivf", {"nprobe": 8}), ("hnsw", {}),
                                         ("ivfpq", {"pq_m": 16, "pq_bits": 6, "nprobe": 8})])
def test_approximate_kinds_build_persist_and_recall(tmp_path, kind, extra):
    rng = np.random.default_rng(2)
    centers = _unit(rng, 20)  # clustered data, as real corpora are
    vectors = centers[rng.integers(20, size=3000)] + 0.05 * rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(3000)]
    rundir = RunDir(str(tmp_path / "run"))
    _embed_output(rundir, vectors, ids)
    config = IndexConfig(kind=kind, train_size=2000, **extra)
    meta = build_and_save(rundir.root, "index", "embed", 3000, config, seed=0)
    assert meta["kind"] == kind and meta["ntotal"] == 3000
    index = VectorIndex.load(rundir.root)
    queries = vectors[:50]
    found, _ = index.search(queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & {ids[j] for j in t}) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.8, recall
    assert all(f[0] == ids[i] for i, f in enumerate(found))  # a stored vector finds itself first


def test_factory_strings_and_bad_pq():
    assert factory_string(IndexConfig(kind="ivf"), 384, 480_000) == "IVF2771,Flat"
    assert factory_string(IndexConfig(kind="ivf", nlist=100), 384, 480_000) == "IVF100,Flat"
    assert factory_string(IndexConfig(kind="hnsw", hnsw_m=16), 384, 10) == "HNSW16,Flat"
    assert factory_string(IndexConfig(kind="ivfpq"), 1024, 480_000) == "IVF2771,PQ32x8,RFlat"
    with pytest.raises(ValueError, match="pq_m=48 must divide the embedding dimension 1024"):
        factory_string(IndexConfig(kind="ivfpq", pq_m=48), 1024, 1000)


def test_load_without_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index in"):
        VectorIndex.load(str(tmp_path / "empty-run"))


def test_search_knobs_survive_persistence(tmp_path):
    """nprobe is not stored in the FAISS file: load() applies the build's value, or the caller's."""
    rng = np.random.default_rng(3)
    vectors, ids = _unit(rng, 2000), [f"d{i}" for i in range(2000)]  # no structure: IVF is lossy
    rundir = RunDir(str(tmp_path / "run"))
    _embed_output(rundir, vectors, ids)
    build_and_save(rundir.root, "index", "embed", 2000, IndexConfig(kind="ivf", nlist=16, nprobe=16), seed=0)
    queries = _unit(rng, 30)
    truth = [[ids[j] for j in row] for row in np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    exhaustive, _ = VectorIndex.load(rundir.root).search(queries, 10)  # nprobe = nlist: exact
    assert exhaustive == truth
    narrow, _ = VectorIndex.load(rundir.root, config=IndexConfig(kind="ivf", nprobe=1)).search(queries, 10)
    assert narrow != truth
