"""Preference pairs P(i) of the loop (CHILLGuard §4.3, eq. 9) for the generator's MDPO training.

Fan-out over the seed stages' rows: each training seed gives up to ``max_pairs_per_seed`` pairs of
its own candidates (:func:`pipelines.loop.levels.make_pairs`), ``parent_id`` = the seed's id, or one
``dropped`` row saying why it gave none (``no_candidates``, ``no_eligible_candidates``,
``only_L2_L3``, ``no_valid_pair``); held-out rows are ``dropped`` (``held_out_split``).

A pair row holds what MDPO trains on: ``system`` and ``prompt`` (the generator's messages for the
seed, rendered with the same templates that generated the candidates), ``chosen`` and ``rejected``
(the two candidates' texts), and its lineage: ``chosen_id`` / ``rejected_id``, their levels,
quality scores and the classifier's predictions, and ``pair_type`` (``<L1,L4>``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from pipelines.core.rows import (
    DROPPED, ERROR, LINEAGE, OK, column_or_lineage, content_id, keyed_rng, make_row, shuffle_partitions,
    to_common_schema, to_table, union_all,
)
from pipelines.core.stage import Stage, read_ok
from pipelines.loop.generate import GENERATED, RewritePrompt
from pipelines.loop.levels import make_pairs, no_pair_reason

PAIR_COLUMNS = {
    LINEAGE: pa.string(), "system": pa.string(), "prompt": pa.string(), "chosen": pa.string(),
    "rejected": pa.string(), "chosen_id": pa.string(), "rejected_id": pa.string(),
    "chosen_level": pa.string(), "rejected_level": pa.string(), "pair_type": pa.string(),
    "chosen_quality": pa.int32(), "rejected_quality": pa.int32(), "chosen_pred": pa.string(),
    "rejected_pred": pa.string(), "levels": pa.string(),
}
_GROUP = "_seed"  # the seed id a row belongs to, for the groupby
_KIND = "_kind"   # seed / candidate
_ROLE_COLUMNS = {_GROUP: pa.string(), _KIND: pa.string(), "split": pa.string(), "level": pa.string(),
                 "quality": pa.int32(), "pred_label": pa.string()}


def seed_markers(batch: pa.Table) -> pa.Table:
    """Seed-stage rows -> one marker row per seed (common schema + its split)."""
    splits = [column_or_lineage(r, "split") or "" for r in
              batch.select([c for c in ("split", LINEAGE) if c in batch.column_names]).to_pylist()]
    common = to_common_schema(batch)
    n = batch.num_rows
    return (common.append_column(_GROUP, common.column("id")).append_column(_KIND, pa.array(["seed"] * n))
            .append_column("split", pa.array(splits, pa.string())).append_column("level", pa.array([""] * n))
            .append_column("quality", pa.array([0] * n, pa.int32()))
            .append_column("pred_label", pa.array([""] * n, pa.string())))


def candidate_markers(batch: pa.Table, *, status: str) -> pa.Table:
    """Scored candidates (``ok``: with a level; ``error``: ineligible) -> rows of their seed's group."""
    n = batch.num_rows
    common = to_common_schema(batch)
    level = batch.column("level") if status == OK else pa.array([""] * n, pa.string())
    quality = batch.column("quality").cast(pa.int32()) if status == OK else pa.array([0] * n, pa.int32())
    pred = batch.column("pred_label") if "pred_label" in batch.column_names else pa.array([""] * n, pa.string())
    return (common.append_column(_GROUP, common.column("parent_id")).append_column(_KIND, pa.array(["candidate"] * n))
            .append_column("split", pa.array([""] * n, pa.string())).append_column("level", level)
            .append_column("quality", quality).append_column("pred_label", pred))


def seed_pairs(group: pa.Table, *, seed: int, max_pairs: int | None, split: str | None, iteration: int,
               prompt: RewritePrompt) -> pa.Table:
    """One seed's group (its marker + its candidates) -> its pair rows or one dropped row."""
    rows = group.to_pylist()
    seeds = [r for r in rows if r[_KIND] == "seed"]
    if not seeds:  # candidates of a row that is not among the inputs: the accounting reports them
        return to_table([], PAIR_COLUMNS)
    s = seeds[0]
    base = dict(label=s["label"], macro=s["macro"], micro=s["micro"], lang=s["lang"], source=GENERATED,
                method="loop_pair", parent_id=s["id"], iteration=iteration)
    if split is not None and s["split"] and s["split"] != split:
        return to_table([make_row(id=s["id"], text=s["text"], **base, status=DROPPED, reason="held_out_split",
                                  detail=f"split {s['split']!r}; seeds are {split!r}")], PAIR_COLUMNS)
    candidates = {r["id"]: r for r in rows if r[_KIND] == "candidate"}
    levels = [r["level"] or None for r in candidates.values()]
    level_counts = dict(sorted(Counter(level or "ineligible" for level in levels).items()))
    pairs = make_pairs([(cid, r["level"] or None) for cid, r in candidates.items()], max_pairs,
                       keyed_rng(seed, "loop_pairs", s["id"]))
    if not pairs:
        return to_table([make_row(id=s["id"], text=s["text"], **base, status=DROPPED, reason=no_pair_reason(levels),
                                  detail=f"candidate levels {level_counts}", levels=str(level_counts))],
                        PAIR_COLUMNS)
    messages = prompt({"text": s["text"], "label": s["label"], "micro": s["micro"]})
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next(m["content"] for m in messages if m["role"] == "user")
    out = []
    for p in pairs:
        chosen, rejected = candidates[p.chosen], candidates[p.rejected]
        out.append(make_row(
            id=content_id(p.chosen, p.rejected), text=s["text"], **base, system=system, prompt=user,
            chosen=chosen["text"], rejected=rejected["text"], chosen_id=p.chosen, rejected_id=p.rejected,
            chosen_level=p.chosen_level, rejected_level=p.rejected_level, pair_type=p.type,
            chosen_quality=chosen["quality"], rejected_quality=rejected["quality"],
            chosen_pred=chosen["pred_label"], rejected_pred=rejected["pred_label"], levels=str(level_counts)))
    return to_table(out, PAIR_COLUMNS)


class PairsStage(Stage):
    """``loop<i>_pairs``: MDPO preference pairs from the scored candidates, per seed."""

    fan_out = True

    def __init__(self, name: str, *, inputs: tuple[str, ...], scored: str, prompt: RewritePrompt, seed: int,
                 max_pairs: int | None, seed_split: str | None, iteration: int):
        super().__init__({"max_pairs": max_pairs, "seed": seed, "seed_split": seed_split, "iteration": iteration})
        self.name = name
        self.inputs = inputs
        self.requires = (scored,)
        self.scored = scored
        self.prompt = prompt
        self.seed = seed
        self.max_pairs = max_pairs
        self.seed_split = seed_split
        self.iteration = iteration

    def hash_payload(self) -> Any:
        return {**self.config, **self.prompt.hash_payload()}

    def write(self, inputs: dict, rundir) -> None:
        import ray

        parts = [inputs[n].map_batches(seed_markers, batch_format="pyarrow") for n in self.inputs]
        parts.append(read_ok(rundir, self.scored).map_batches(candidate_markers, batch_format="pyarrow",
                                                              fn_kwargs={"status": OK}))
        if rundir.parquet_files(self.scored, ERROR):
            parts.append(ray.data.read_parquet(rundir.partition_uri(self.scored, ERROR), partitioning=None)
                         .map_batches(candidate_markers, batch_format="pyarrow", fn_kwargs={"status": ERROR}))
        rows = union_all(parts).materialize()
        rows.groupby(_GROUP, num_partitions=shuffle_partitions(rows.count())).map_groups(
            seed_pairs, batch_format="pyarrow", fn_kwargs={
                "seed": self.seed, "max_pairs": self.max_pairs, "split": self.seed_split,
                "iteration": self.iteration, "prompt": self.prompt}) \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def summary(self, rundir) -> dict[str, Any]:
        by_micro: dict[str, Counter] = {}
        for micro, kind in zip(rundir.column_values(self.name, OK, "micro"),
                               rundir.column_values(self.name, OK, "pair_type")):
            by_micro.setdefault(micro or "-", Counter())[kind] += 1
        return {"pairs": rundir.count_rows(self.name, OK),
                "pair_types": dict(sorted(Counter(rundir.column_values(self.name, OK, "pair_type")).items())),
                "seeds_with_pairs": len(set(rundir.column_values(self.name, OK, "parent_id"))),
                "no_pair": rundir.reason_counts(self.name, DROPPED),
                "pair_types_by_micro": {m: dict(c) for m, c in sorted(by_micro.items())}}
