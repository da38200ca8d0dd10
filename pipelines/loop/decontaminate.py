"""Decontamination of generated candidates against the labelled set they were generated from.

A candidate that repeats, exactly or nearly, a row of the seed stages is ``dropped``:

- ``test_overlap``: it matches a row of the held-out split. It would put a test prompt (or a
  near copy) into a training set D_train(i), and its test twin would no longer measure
  generalisation;
- ``train_overlap``: it matches a training row (its own seed, or another one): it adds nothing to
  D_train(i) = D_train(0) ∪ D_gen(i) but weight.

"Exactly" is the exact-dedup key (Unicode NFKC, case-folded, :func:`pipelines.data.preprocess.exact_key`);
"nearly" is MinHash LSH at the recipe's near-dedup settings over the candidates and the reference
rows together: a candidate whose cluster holds a reference row is dropped, naming it. One-to-one;
the reference rows are read whole (their ids, keys and signatures, never kept as text).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.rows import DROPPED, LINEAGE, OK, column_or_lineage
from pipelines.core.stage import Stage, read_ok
from pipelines.core.textnorm import normalize_text
from pipelines.data import minhash
from pipelines.data.preprocess import NearDedupConfig, exact_key, with_status

log = logging.getLogger(__name__)

TEST_OVERLAP, TRAIN_OVERLAP = "test_overlap", "train_overlap"


def comparable(text: str) -> str:
    return normalize_text(text or "", "nfkc")


def reference_table(rows: list[dict[str, Any]], test_split: str) -> dict[str, list]:
    """Reference rows -> ids, kinds (test / train) and exact keys."""
    ids, kinds, keys, texts = [], [], [], []
    for r in rows:
        ids.append(r["id"])
        kinds.append("test" if column_or_lineage(r, "split") == test_split else "train")
        text = comparable(r["text"])
        keys.append(exact_key(text, casefold=True))
        texts.append(text)
    return {"id": ids, "kind": kinds, "key": keys, "text": texts}


def find_overlaps(candidates: list[tuple[str, str]], reference: dict[str, list],
                  near: NearDedupConfig | None) -> dict[str, tuple[str, str]]:
    """``{candidate id: (reason, detail)}`` for candidates ``(id, text)`` that repeat a reference row;
    an exact match wins over a near one, a test row over a train row."""
    by_key: dict[str, tuple[str, str]] = {}
    for rid, kind, key in zip(reference["id"], reference["kind"], reference["key"]):
        if key not in by_key or (kind == "test" and by_key[key][1] != "test"):
            by_key[key] = (rid, kind)
    found: dict[str, tuple[str, str]] = {}
    for cid, text in candidates:
        hit = by_key.get(exact_key(comparable(text), casefold=True))
        if hit:
            found[cid] = (TEST_OVERLAP if hit[1] == "test" else TRAIN_OVERLAP, f"same text as {hit[1]} row {hit[0]}")
    if near is None or not candidates or not reference["id"]:
        return found
    a, b = minhash.permutations(near.num_perm, near.seed)
    n_ref = len(reference["id"])
    texts = reference["text"] + [comparable(t) for _, t in candidates]
    sigs = minhash.signatures(texts, a, b, near.ngram)
    bands, rows = (near.bands, near.num_perm // near.bands) if near.bands else \
        minhash.optimal_bands(near.threshold, near.num_perm)
    labels = minhash.duplicate_groups(sigs, bands, rows, near.threshold, verify=near.verify)
    members: dict[int, list[int]] = {}
    for i in range(n_ref):
        members.setdefault(int(labels[i]), []).append(i)
    for j, (cid, _) in enumerate(candidates):
        refs = members.get(int(labels[n_ref + j]))
        if cid in found or not refs:
            continue
        test = [i for i in refs if reference["kind"][i] == "test"]
        i = (test or refs)[0]
        found[cid] = (TEST_OVERLAP if test else TRAIN_OVERLAP,
                      f"near duplicate of {reference['kind'][i]} row {reference['id'][i]}")
    return found


def mark_overlaps(batch: pa.Table, *, overlaps: dict[str, tuple[str, str]]) -> pa.Table:
    ids = batch.column("id").to_pylist()
    hits = [overlaps.get(i) for i in ids]
    return with_status(batch, [DROPPED if h else OK for h in hits], [h[0] if h else "" for h in hits],
                        [h[1] if h else "" for h in hits])


class DecontaminateStage(Stage):
    """``loop<i>_decontaminate``: drop candidates that repeat a row of the seed stages."""

    def __init__(self, name: str, *, inputs: tuple[str, ...], reference: tuple[str, ...], test_split: str,
                 near: NearDedupConfig | None):
        super().__init__(name=name, inputs=inputs, requires=reference)
        self.test_split = test_split
        # the candidates and the reference rows' texts (a reference row's split, where it has one, marks test rows)
        self.reads = {name: frozenset({"id", "text"}) for name in (*inputs, *reference)}
        self.writes = PASSTHROUGH | {LINEAGE}
        self.near = near

    def write(self, inputs: dict, rundir) -> None:
        from pipelines.core.rows import common_rows

        reference_rows: list[dict[str, Any]] = []
        for stage in self.requires:
            for batch in read_ok(rundir, stage).iter_batches(batch_format="pyarrow", batch_size=65536):
                cols = [c for c in ("id", "text", "split", LINEAGE) if c in batch.column_names]
                reference_rows += batch.select(cols).to_pylist()
        reference = reference_table(reference_rows, self.test_split)
        dataset = common_rows(inputs, self.inputs).materialize()  # read once, used by both passes
        candidates = [(r["id"], r["text"]) for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=65536)
                      for r in batch.select(["id", "text"]).to_pylist()]
        overlaps = find_overlaps(candidates, reference, self.near)
        log.info("%s: %d of %d candidates repeat a seed-stage row", self.name, len(overlaps), len(candidates))
        dataset.map_batches(mark_overlaps, batch_format="pyarrow", fn_kwargs={"overlaps": overlaps}) \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def summary(self, rundir) -> dict[str, Any]:
        return {"dropped": rundir.reason_counts(self.name, DROPPED)}

