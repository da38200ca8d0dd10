"""Corpus -> index at the paper's scale: ingestion, embedding, FAISS build, 2,480 queries x top-100.

    python benchmarks/corpus_index.py [--docs 480000] [--kind ivf] [--baseline-docs 20000]

The corpus is SYNTHETIC (generated here: bilingual template text around the taxonomy's keywords;
nothing is downloaded). The stages are the product's own (``run_stages`` with the keyword, ingest,
embed, index and retrieve stages on an embedded local Ray), with MiniLM as the embedder. In the
same run, a subprocess times bare ``SentenceTransformer.encode`` on a slice of the same documents,
so the embedding stage is reported as a ratio to it. Recall@100 of the approximate index is measured
against exact inner-product search on a sample of the queries. The driver's peak RSS is taken when
the pipeline finishes, before this script loads anything for its own measurements.
Prints a table and writes JSON (default ``bench_out/corpus_index.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from benchmarks.report import add_output_args, finish
from pipelines.core.taxonomy import load_taxonomy
from pipelines.core.textnorm import has_cjk

TARGETS = {"embed_ratio_min": 0.8, "total_minutes_max": 30, "driver_rss_gib_max": 3.0,
           "query_seconds_max": 10.0, "recall_min": 0.95}

def _lexicons(taxonomy) -> tuple[list[str], list[str]]:
    """Chinese two-character words and English words taken from the taxonomy's names and keywords."""
    zh, en = set(), set()
    texts = [(c.zh, c.en) for m in taxonomy.macros for c in (m, *m.micros)]
    texts += [(kw.zh, kw.en) for code in taxonomy.micro_codes for kw in taxonomy.seed_keywords(code)]
    for z, e in texts:
        zh.update(z[i:i + 2] for i in range(len(z) - 1) if has_cjk(z[i]) and has_cjk(z[i + 1]))
        en.update(w.strip("(),.").lower() for w in e.split() if len(w) > 2)
    return sorted(zh), sorted(en)


def generate_corpus(folder: Path, n_docs: int, shards: int, seed: int) -> dict:
    """Write ``n_docs`` short synthetic posts in ``shards`` JSONL files: 60% Chinese, 40% English,
    each one taxonomy keyword plus random words from the taxonomy's vocabulary (so neighbourhoods
    are graded, not ties between copies), and per shard one malformed line, one empty text and one
    missing text (ingestion errors)."""
    taxonomy = load_taxonomy()
    keywords = [kw for code in taxonomy.micro_codes for kw in taxonomy.seed_keywords(code)]
    zh_words, en_words = _lexicons(taxonomy)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-n_docs // shards)
    written = bad = 0
    for s in range(shards):
        lines = []
        for i in range(min(per_shard, n_docs - written)):
            kw = keywords[rng.integers(len(keywords))]
            if rng.random() < 0.6:
                words = [zh_words[j] for j in rng.integers(len(zh_words), size=int(rng.integers(2, 6)))]
                text, lang = kw.zh + "".join(words) + ("？" if rng.random() < 0.3 else "。"), "zh"
            else:
                words = [en_words[j] for j in rng.integers(len(en_words), size=int(rng.integers(2, 7)))]
                text, lang = " ".join([kw.en, *words]) + ("?" if rng.random() < 0.3 else "."), "en"
            lines.append(json.dumps({"doc_id": f"s{s}-{i}", "content": text, "lang": lang},
                                    ensure_ascii=False))
        written += len(lines)
        lines += ['{"doc_id": "broken', json.dumps({"doc_id": f"s{s}-empty", "content": "  "}),
                  json.dumps({"doc_id": f"s{s}-missing"})]
        bad += 3
        (folder / f"part-{s:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"docs": written, "bad_rows": bad, "shards": shards,
            "vocabulary": {"zh_words": len(zh_words), "en_words": len(en_words)}}


def bare_encode(corpus: Path, model: str, n: int, batch_size: int) -> dict:
    """Bare ``SentenceTransformer.encode`` on the first ``n`` good documents (run in a subprocess)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from pipelines.core.textnorm import normalize_text

    texts = []
    for path in sorted(corpus.glob("*.jsonl")):
        for line in path.open(encoding="utf-8"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record.get("content"), str) and record["content"].strip():
                texts.append(normalize_text(record["content"]))
            if len(texts) >= n:
                break
        if len(texts) >= n:
            break
    torch.set_num_threads(os.cpu_count() or 1)
    st = SentenceTransformer(model, device="cpu")
    st.encode(texts[:256], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    st.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    seconds = time.perf_counter() - t0
    return {"docs": len(texts), "seconds": seconds, "docs_per_s": len(texts) / seconds,
            "torch_threads": torch.get_num_threads()}


def steady_rate(rundir, stage: str) -> dict:
    """Rows/s of a stage between its first and its last output file (file modification times), with
    the time to the first output (actor start-up, model load, first block) reported separately: the
    like-for-like figure for a baseline that loads its model and warms up before the clock starts."""
    import datetime

    import pyarrow.parquet as pq

    files = sorted(rundir.parquet_files(stage, "ok"), key=lambda i: i.mtime_ns)
    rows = [pq.ParquetFile(i.path).metadata.num_rows for i in files]
    times = [i.mtime_ns / 1e9 for i in files]
    started = datetime.datetime.fromisoformat(rundir.read_manifest(stage)["started_at"]).timestamp()
    return {"files": len(files), "to_first_output_s": times[0] - started,
            "rows_per_s": (sum(rows) - rows[0]) / (times[-1] - times[0])}


def recall_at_k(approx: list[list[str]], exact: list[list[str]], k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact)]))


def object_store_spill() -> str:
    """Ray's own line on objects spilled to disk in this session (its memory summary), or what it
    said instead."""
    from ray._private.internal_api import memory_summary

    lines = [line.strip() for line in memory_summary(stats_only=True).splitlines() if "pilled" in line]
    return "; ".join(lines) or "nothing spilled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=480_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--kind", default="ivf", choices=["flat", "ivf", "hnsw", "ivfpq"])
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--baseline-docs", type=int, default=20_000)
    parser.add_argument("--queries-per-category", type=int, default=80)
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per embedding batch")
    parser.add_argument("--encode-batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="sentence-transformers folder (default: MiniLM)")
    parser.add_argument("--object-store-gib", type=float, default=None,
                        help="the embedded Ray's object store (default: Ray's own, 30%% of RAM); 1 = the "
                             "bounded-memory run (spilling to disk allowed)")
    add_output_args(parser, "corpus_index")
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from pipelines.training.tiny_models import offline_minilm_path

    model = args.model or str(offline_minilm_path())
    work = Path(args.workdir).resolve()
    corpus = work / "corpus"
    if args.baseline_only:
        print(json.dumps(bare_encode(corpus, model, args.baseline_docs, args.encode_batch_size)))
        return

    t_start = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    print(f"generating a SYNTHETIC bilingual corpus of {args.docs:,} documents in {corpus} ...", flush=True)
    t0 = time.perf_counter()
    generated = generate_corpus(corpus, args.docs, args.shards, args.seed)
    generated["seconds"] = time.perf_counter() - t0

    print(f"bare SentenceTransformer.encode on {args.baseline_docs:,} documents (subprocess) ...", flush=True)
    out = subprocess.run([sys.executable, __file__, "--baseline-only", "--workdir", str(work),
                          "--baseline-docs", str(args.baseline_docs), "--model", model,
                          "--encode-batch-size", str(args.encode_batch_size)],
                         capture_output=True, text=True, check=True)
    baseline = json.loads(out.stdout.strip().splitlines()[-1])

    import ray

    from cluster.connect import connect
    from pipelines.construction import Recipe, build_stages, run_recipe
    from pipelines.core.config import ClusterConfig

    cores = os.cpu_count() or 1
    recipe = Recipe.model_validate({
        "name": "bench-corpus-index", "run_dir": str(work / "run"), "seed": args.seed,
        "stages": {
            "keywords": {"target_per_category": 20},  # the seeds; no LLM in this benchmark
            "ingest": {"paths": [str(corpus)], "format": "jsonl",
                       "columns": {"text": "content", "id": "doc_id", "lang": "lang"}},
            "embed": {"model": model, "batch_size": args.batch_size,
                      "encode_batch_size": args.encode_batch_size, "torch_threads": cores},
            "index": {"kind": args.kind, "nprobe": args.nprobe},
            "retrieve": {"queries_per_category": args.queries_per_category, "top_k": 100, "sample": 5},
        },
    })
    store = int(args.object_store_gib * 1024**3) if args.object_store_gib else None
    connect(ClusterConfig(include_dashboard=False, object_store_memory=store), None)
    t0 = time.perf_counter()
    manifests = run_recipe(recipe, build_stages(recipe))
    pipeline_seconds = time.perf_counter() - t0
    driver_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    spilled = object_store_spill()
    ray.shutdown()

    # --- measurements of our own (after the RSS reading) ---
    from actors.embedder import EMBEDDING, Embedder, arrow_to_vectors
    from pipelines.core.rundir import RunDir
    from pipelines.data.retrieval import plan_queries, read_keyword_pools
    from pipelines.data.vector_index import VectorIndex, build_faiss

    rundir = RunDir(recipe.run_dir)
    queries = plan_queries(load_taxonomy(), read_keyword_pools(rundir), recipe.stages.retrieve, args.seed)
    embedder = Embedder(recipe.stages.embed, "cpu", corpus=False)
    query_vectors = embedder.encode([q["text"] for q in queries])
    index = VectorIndex.load(recipe.run_dir)
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        approx, _ = index.search(query_vectors, 100)
        timings.append(time.perf_counter() - t0)
    query_seconds = min(timings)

    vectors = np.concatenate([arrow_to_vectors(b.column(EMBEDDING))
                              for b in rundir.iter_batches("embed", "ok", [EMBEDDING])])
    ids = np.array([i for b in rundir.iter_batches("embed", "ok", ["id"]) for i in b.column("id").to_pylist()],
                   dtype=object)
    exact_index, _ = build_faiss(vectors, recipe.stages.index.model_copy(update={"kind": "flat"}), 0)
    sample = np.random.default_rng(args.seed).choice(len(queries), size=min(args.recall_queries, len(queries)),
                                                     replace=False)
    t0 = time.perf_counter()
    _, exact_pos = exact_index.search(query_vectors[sample], 100)
    exact_seconds = time.perf_counter() - t0
    exact = [[ids[p] for p in row] for row in exact_pos]
    recall = recall_at_k([approx[i] for i in sample], exact, 100)

    m = {name: manifests[name] for name in ("ingest", "embed", "index", "retrieve")}
    embed_rate = m["embed"]["rows"]["out"] / m["embed"]["seconds"]
    embed_steady = steady_rate(rundir, "embed")
    result = {
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version()},
        "corpus": {"synthetic": True, **generated},
        "stages": {name: {"rows_in": mm["rows"]["in"], "rows_out": mm["rows"]["out"],
                          "errored": mm["rows"]["errored"], "seconds": mm["seconds"],
                          "rows_per_s": mm["rows"]["in"] / mm["seconds"] if mm["seconds"] else None}
                   for name, mm in m.items()},
        "bare_encode": baseline,
        "embed_ratio_to_bare": embed_rate / baseline["docs_per_s"],
        "embed_steady": embed_steady,
        "embed_steady_ratio_to_bare": embed_steady["rows_per_s"] / baseline["docs_per_s"],
        "index": m["index"]["summary"],
        "queries": {"count": len(queries), "top_k": 100, "search_seconds": query_seconds,
                    "queries_per_s": len(queries) / query_seconds,
                    "exact_seconds_for_sample": exact_seconds, "recall_sample": len(sample),
                    "recall_at_100": recall},
        "pipeline_seconds": pipeline_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "driver_peak_rss_gib": driver_rss_gib,
        "object_store_gib": args.object_store_gib, "object_store_spill": spilled,
    }
    result["targets"] = {
        "embed steady-state ratio >= 0.8": result["embed_steady_ratio_to_bare"] >= TARGETS["embed_ratio_min"],
        "total < 30 min": result["total_seconds"] / 60 < TARGETS["total_minutes_max"],
        "driver RSS < 3 GiB": driver_rss_gib < TARGETS["driver_rss_gib_max"],
        "2,480 queries < 10 s": query_seconds < TARGETS["query_seconds_max"],
        "recall@100 >= 0.95": recall >= TARGETS["recall_min"],
    }

    print(f"\nSYNTHETIC corpus: {generated['docs']:,} documents (+{generated['bad_rows']} malformed rows), "
          f"{cores} CPUs")
    print(f"{'stage':<10}{'rows in':>10}{'errored':>9}{'seconds':>10}{'rows/s':>10}")
    for name, st in result["stages"].items():
        print(f"{name:<10}{st['rows_in']:>10,}{st['errored']:>9}{st['seconds']:>10.1f}{st['rows_per_s']:>10.0f}")
    print(f"bare encode: {baseline['docs_per_s']:.0f} docs/s on {baseline['docs']:,} docs (model loaded and "
          f"warmed up first); embed stage steady state {embed_steady['rows_per_s']:.0f} docs/s = "
          f"{result['embed_steady_ratio_to_bare']:.3f}x (first output after {embed_steady['to_first_output_s']:.0f}s"
          f" of start-up); over the whole stage {embed_rate:.0f} docs/s = {result['embed_ratio_to_bare']:.3f}x")
    idx = result["index"]
    print(f"index {idx['factory']}: train {idx['train_seconds']:.1f}s, add {idx['add_seconds']:.1f}s, "
          f"gather {idx['gather_seconds']:.1f}s")
    print(f"{len(queries):,} queries x top-100: {query_seconds:.2f}s; recall@100 vs exact on "
          f"{len(sample)} queries: {recall:.4f} (exact search of those took {exact_seconds:.2f}s)")
    print(f"pipeline {pipeline_seconds / 60:.1f} min, total {result['total_seconds'] / 60:.1f} min, "
          f"driver peak RSS {driver_rss_gib:.2f} GiB; object store "
          f"{'Ray default' if args.object_store_gib is None else f'{args.object_store_gib:g} GiB'}, {spilled}")
    finish(result, args.out)


if __name__ == "__main__":
    main()
