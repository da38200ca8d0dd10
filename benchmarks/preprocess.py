"""Preprocessing at scale: normalize, langid, length filter, exact dedup, MinHash near-dedup.

    python benchmarks/preprocess.py [--rows 500000] [--compare-docs 100000]

The rows are SYNTHETIC (generated here): Chinese posts of 40-120 characters made of two-character
words from the taxonomy, with planted duplicates - exact copies that differ only in what
normalisation removes (surrounding spaces, full-width letters and digits, zero-width characters),
and near copies with a few characters changed.
The stages are the product's own on an embedded local Ray. Dedup quality is measured against the
planted truth. In the same run, near-dedup throughput is compared with ``datasketch``'s MinHashLSH
on a slice (same texts, 128 permutations, 5-character shingles, same threshold), single process,
against our MinHash/LSH functions in a single process: once with datasketch used one document at a
time, and once in its fastest documented use (``MinHash.bulk`` hashing all documents with one
initialised state, ``LeanMinHash`` in the index); both ratios are reported. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from benchmarks.report import add_output_args, finish, fresh_dir
from pipelines.core.taxonomy import load_taxonomy
from pipelines.core.textnorm import has_cjk

_FULL_WIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)})


def _words() -> list[str]:
    tax = load_taxonomy()
    texts = [kw.zh for code in tax.micro_codes for kw in tax.seed_keywords(code)]
    texts += [c.zh for m in tax.macros for c in (m, *m.micros)]
    return sorted({t[i:i + 2] for t in texts for i in range(len(t) - 1)
                   if has_cjk(t[i]) and has_cjk(t[i + 1])})


def shingle_set(text: str, n: int = 5) -> set[str]:
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def generate(n_rows: int, exact_share: float, near_share: float, seed: int) -> tuple[list[dict], dict]:
    """Rows plus the planted truth: ``exact`` {copy id: original id}, ``near`` {copy id: (original
    id, true Jaccard of the normalised texts)}."""
    rng = np.random.default_rng(seed)
    words = _words()
    n_exact, n_near = int(n_rows * exact_share), int(n_rows * near_share)
    n_base = n_rows - n_exact - n_near
    rows, texts = [], []
    for i in range(n_base):
        target = int(rng.integers(40, 121))
        text = ""
        while len(text) < target:
            text += words[rng.integers(len(words))]
        text = text[:target] + ("，版本" + str(i) if rng.random() < 0.5 else "")  # a few ASCII digits
        texts.append(text)
        rows.append({"id": f"b{i:07d}", "text": text})
    truth = {"exact": {}, "near": {}}
    for j in range(n_exact):
        src = int(rng.integers(n_base))
        text = texts[src]
        variant = j % 3  # variations that normalisation removes
        copy = (f"  {text} " if variant == 0 else text.translate(_FULL_WIDTH) if variant == 1
                else text[:5] + "\u200b" + text[5:])
        cid = f"x{j:07d}"
        rows.append({"id": cid, "text": copy})
        truth["exact"][cid] = rows[src]["id"]
    for j in range(n_near):
        src = int(rng.integers(n_base))
        chars = list(texts[src])
        for _ in range(1 + len(chars) // 80):  # one edit per 80 characters, always a real change
            pos = int(rng.integers(len(chars)))
            new = chars[pos]
            while new == chars[pos]:
                new = words[rng.integers(len(words))][0]
            chars[pos] = new
        copy = "".join(chars)
        cid = f"n{j:07d}"
        rows.append({"id": cid, "text": copy})
        truth["near"][cid] = (rows[src]["id"], jaccard(copy, texts[src]))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], truth


def _query_then_insert(keyed, threshold: float, num_perm: int) -> dict:
    """The dedup rule of both datasketch baselines over ``(id, minhash)`` pairs in id order: query
    each document, then insert it if it had no hit; a document with hits is a duplicate of the
    smallest id among them (comparable to our rule)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    duplicates = {}
    for row_id, m in keyed:
        hits = lsh.query(m)
        if hits:
            duplicates[row_id] = min(hits)
        else:
            lsh.insert(row_id, m)
    return duplicates


def datasketch_dedup(texts: list[str], ids: list[str], threshold: float, num_perm: int) -> tuple[dict, float]:
    """datasketch used one document at a time: a ``MinHash`` per document, built as it is queried."""
    from datasketch import MinHash

    def minhash(text: str) -> MinHash:
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode("utf-8") for s in shingle_set(text)])
        return m

    t0 = time.perf_counter()
    keyed = ((row_id, minhash(text)) for row_id, text in sorted(zip(ids, texts)))
    duplicates = _query_then_insert(keyed, threshold, num_perm)
    return duplicates, time.perf_counter() - t0


def datasketch_bulk_dedup(texts: list[str], ids: list[str], threshold: float,
                          num_perm: int) -> tuple[dict, float]:
    """datasketch's fastest documented use: all signatures with ``MinHash.bulk`` (one initialised
    permutation state for every document), frozen as ``LeanMinHash``; then the same rule."""
    from datasketch import LeanMinHash, MinHash

    t0 = time.perf_counter()
    pairs = sorted(zip(ids, texts))
    minhashes = MinHash.bulk(([s.encode("utf-8") for s in shingle_set(text)] for _, text in pairs),
                             num_perm=num_perm)
    keyed = ((row_id, LeanMinHash(m)) for (row_id, _), m in zip(pairs, minhashes))
    duplicates = _query_then_insert(keyed, threshold, num_perm)
    return duplicates, time.perf_counter() - t0


def ours_dedup(texts: list[str], ids: list[str], threshold: float, num_perm: int) -> tuple[dict, float]:
    from pipelines.data import minhash
    from pipelines.data.preprocess import NearDedupConfig, decide_near

    config = NearDedupConfig(threshold=threshold, num_perm=num_perm)
    t0 = time.perf_counter()
    a, b = minhash.permutations(num_perm, config.seed)
    sigs = minhash.signatures(texts, a, b, config.ngram)
    duplicates = decide_near(ids, sigs, config)
    return duplicates, time.perf_counter() - t0


def near_quality(dropped: dict[str, str], truth: dict, threshold: float, universe: set[str]) -> dict:
    """Recall over planted near copies whose true Jaccard >= threshold and which are in ``universe``
    together with their original (a slice may hold a copy without its original); precision
    over dropped rows: planted copies (exact or near) count as right, anything else is a false
    removal."""
    planted = {cid for cid, (orig, j) in truth["near"].items()
               if j >= threshold and cid in universe and orig in universe}
    found = planted & set(dropped)
    right = {d for d in dropped if d in truth["near"] or d in truth["exact"]}
    return {"planted_above_threshold": len(planted), "found": len(found),
            "recall": len(found) / max(1, len(planted)), "dropped": len(dropped),
            "precision": len(right) / max(1, len(dropped))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--exact-share", type=float, default=0.05)
    parser.add_argument("--near-share", type=float, default=0.05)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--compare-docs", type=int, default=100_000)
    add_output_args(parser, "preprocess")
    args = parser.parse_args()

    work = fresh_dir(args.workdir)
    inputs = work / "rows"
    inputs.mkdir(parents=True)
    t_start = time.perf_counter()
    print(f"generating {args.rows:,} SYNTHETIC rows with planted duplicates ...", flush=True)
    rows, truth = generate(args.rows, args.exact_share, args.near_share, args.seed)
    shards = 8
    for s in range(shards):
        with open(inputs / f"rows-{s}.jsonl", "w", encoding="utf-8") as f:
            for row in rows[s::shards]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # --- the product's stages on local Ray ---
    import ray

    from cluster.connect import connect
    from pipelines.construction import Recipe, build_stages, run_recipe
    from pipelines.core.config import ClusterConfig
    from pipelines.core.rundir import RunDir

    recipe = Recipe.model_validate({
        "name": "bench-preprocess", "run_dir": str(work / "run"), "seed": args.seed,
        "stages": {"ingest": {"paths": [str(inputs)], "format": "jsonl", "normalize": "none",
                              "columns": {"text": "text", "id": "id"}},
                   "preprocess": {"inputs": ["ingest"],
                                  "length_filter": {"min_chars": 10, "max_chars": 1000},
                                  "near_dedup": {"threshold": args.threshold, "num_perm": args.num_perm}}},
    })
    connect(ClusterConfig(include_dashboard=False), None)
    manifests = run_recipe(recipe, build_stages(recipe))
    ray.shutdown()
    rundir = RunDir(recipe.run_dir)
    exact_dropped = dict(zip(rundir.column_values("dedup", "dropped", "id"),
                             rundir.column_values("dedup", "dropped", "duplicate_of")))
    near_dropped = dict(zip(rundir.column_values("near_dedup", "dropped", "id"),
                            rundir.column_values("near_dedup", "dropped", "duplicate_of")))
    exact_found = set(exact_dropped) & set(truth["exact"])
    exact = {"planted": len(truth["exact"]), "found": len(exact_found),
             "recall": len(exact_found) / max(1, len(truth["exact"])),
             "false_removals": len(set(exact_dropped) - set(truth["exact"]))}
    near_universe = {r["id"] for r in rows} - set(exact_dropped)
    near = near_quality(near_dropped, truth, args.threshold, near_universe)

    # --- single-process comparison with datasketch on a slice ---
    sliced = rows[: args.compare_docs]
    from pipelines.core.textnorm import normalize_text

    texts = [normalize_text(r["text"], "nfkc").casefold() for r in sliced]
    ids = [r["id"] for r in sliced]
    print(f"near-dedup on {len(sliced):,} rows: datasketch (per doc, bulk) vs ours (single process) ...",
          flush=True)
    ds_dups, ds_seconds = datasketch_dedup(texts, ids, args.threshold, args.num_perm)
    bulk_dups, bulk_seconds = datasketch_bulk_dedup(texts, ids, args.threshold, args.num_perm)
    our_dups, our_seconds = ours_dedup(texts, ids, args.threshold, args.num_perm)
    universe = set(ids)
    compare = {
        "docs": len(sliced),
        "datasketch": {"seconds": ds_seconds, "docs_per_s": len(sliced) / ds_seconds,
                       **near_quality(ds_dups, truth, args.threshold, universe)},
        "datasketch_bulk": {"seconds": bulk_seconds, "docs_per_s": len(sliced) / bulk_seconds,
                            **near_quality(bulk_dups, truth, args.threshold, universe)},
        "ours": {"seconds": our_seconds, "docs_per_s": len(sliced) / our_seconds,
                 **near_quality(our_dups, truth, args.threshold, universe)},
    }
    compare["throughput_ratio"] = compare["ours"]["docs_per_s"] / compare["datasketch"]["docs_per_s"]
    compare["throughput_ratio_bulk"] = compare["ours"]["docs_per_s"] / compare["datasketch_bulk"]["docs_per_s"]

    stages = {name: {"rows_in": m["rows"]["in"], "ok": m["rows"]["out"], "dropped": m["rows"]["dropped"],
                     "errored": m["rows"]["errored"], "seconds": m["seconds"],
                     "rows_per_s": m["rows"]["in"] / m["seconds"] if m["seconds"] else None,
                     "reasons": m["reasons"]}
              for name, m in manifests.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": {"synthetic": True, "total": len(rows), "planted_exact": len(truth["exact"]),
                 "planted_near": len(truth["near"]),
                 "planted_near_above_threshold": sum(j >= args.threshold for _, j in truth["near"].values())},
        "threshold": args.threshold, "num_perm": args.num_perm,
        "stages": stages, "exact_dedup": exact, "near_dedup": near, "compare_single_process": compare,
        "total_seconds": time.perf_counter() - t_start,
    }
    result["targets"] = {
        "exact dedup finds 100% with no false removals": exact["recall"] == 1.0 and exact["false_removals"] == 0,
        "near-dedup recall >= 0.9": near["recall"] >= 0.9,
        "near-dedup precision >= 0.95": near["precision"] >= 0.95,
        "ours >= 1.0x datasketch (per doc) at equal or better recall": compare["throughput_ratio"] >= 1.0
        and compare["ours"]["recall"] >= compare["datasketch"]["recall"],
        "ours >= 1.0x datasketch (bulk + LeanMinHash) at equal or better recall":
        compare["throughput_ratio_bulk"] >= 1.0
        and compare["ours"]["recall"] >= compare["datasketch_bulk"]["recall"],
    }

    print(f"\nSYNTHETIC rows: {len(rows):,} ({len(truth['exact']):,} planted exact, "
          f"{len(truth['near']):,} planted near copies), {os.cpu_count()} CPUs")
    print(f"{'stage':<14}{'rows in':>10}{'dropped':>9}{'errored':>9}{'seconds':>9}{'rows/s':>10}")
    for name, st in stages.items():
        print(f"{name:<14}{st['rows_in']:>10,}{st['dropped']:>9,}{st['errored']:>9,}{st['seconds']:>9.1f}"
              f"{st['rows_per_s']:>10,.0f}")
    print(f"exact dedup: found {exact['found']:,}/{exact['planted']:,} planted, "
          f"{exact['false_removals']} false removals")
    print(f"near dedup (threshold {args.threshold}): recall {near['recall']:.3f} of "
          f"{near['planted_above_threshold']:,} planted above threshold, precision {near['precision']:.3f}")
    c = compare
    print(f"single process, {c['docs']:,} rows: ours {c['ours']['docs_per_s']:,.0f} docs/s "
          f"(recall {c['ours']['recall']:.3f}, precision {c['ours']['precision']:.3f})")
    for key, label, ratio in (("datasketch", "datasketch, one document at a time", "throughput_ratio"),
                              ("datasketch_bulk", "datasketch, MinHash.bulk + LeanMinHash",
                               "throughput_ratio_bulk")):
        d = c[key]
        print(f"  vs {label}: {d['docs_per_s']:,.0f} docs/s (recall {d['recall']:.3f}, precision "
              f"{d['precision']:.3f}): ours = {c[ratio]:.2f}x")
    finish(result, args.out)


if __name__ == "__main__":
    main()
