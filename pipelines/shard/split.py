"""SHARD stage ``shard_split``: the prompts, split train / val / test.

The prompts of ``inputs`` (seed stages: Do-Not-Answer / LinguaSafe presets or any mapping) with
their ``dataset`` (the input stage without ``seeds_``), ``harm_category`` and ``harm_level`` as
columns, split train / val / test (72 / 8 / 20) per stratum dataset × harm level with ``split_seed``
(SHARD's 42; :mod:`pipelines.core.splits`: a seeded hash order, not SHARD's ``random.shuffle``, so the
same seed does not give SHARD's split; identical texts of one stratum share a split - the same text in
two datasets or levels is not forced together). Splitting first keeps the test prompts independent
of what the judge later prefers.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.rows import (
    DROPPED,
    ERROR,
    LINEAGE,
    OK,
    content_id,
    shuffle_partitions,
    to_common_schema,
    to_table,
    union_all,
)
from pipelines.core.rundir import RunDir
from pipelines.core.splits import assign_splits
from pipelines.core.stage import Stage
from pipelines.labelling.assembly import text_key
from pipelines.shard.config import SPLIT, ShardConfig
from pipelines.shard.rows import SHARD_COLUMNS

_KEY = "text_key"


def _pop_text(record: dict[str, Any], name: str) -> str:
    value = record.pop(name, None)
    return "" if value is None else str(value)


def prepare_prompts(batch: pa.Table, *, dataset: str) -> pa.Table:
    """Input rows -> SHARD rows: ``dataset``, ``harm_category`` / ``harm_level`` taken out of the
    lineage (where the loaders keep them), an id unique across datasets (``parent_id`` = the
    source's id); rows without text are ``error`` rows (``missing_text``)."""
    out = []
    for row in to_common_schema(batch).to_pylist():
        lineage = json.loads(row[LINEAGE] or "{}")
        category, level = _pop_text(lineage, "harm_category"), _pop_text(lineage, "harm_level")
        row.update({LINEAGE: json.dumps(lineage, ensure_ascii=False), "dataset": dataset,
                    "harm_category": category, "harm_level": level, "parent_id": row["id"],
                    "id": content_id(row["text"], dataset, row["id"], level), _KEY: text_key(row["text"]),
                    "status": OK, "reason": "", "detail": ""})
        if not row["text"].strip():
            row.update(status=ERROR, reason="missing_text", detail="the prompt is empty")
        out.append(row)
    return to_table(out, {**SHARD_COLUMNS, _KEY: pa.string()})


def split_stratum(group: pa.Table, *, shares: dict[str, float], seed: int) -> pa.Table:
    """One stratum (dataset × harm level): :func:`pipelines.core.splits.assign_splits` over its distinct
    texts; a second row with the same id (the same record twice) is ``dropped`` (``duplicate_row``)."""
    rows = sorted(group.to_pylist(), key=lambda r: r["id"])
    usable = [r for r in rows if r["status"] == OK]
    splits = assign_splits([r[_KEY] for r in usable], shares, seed)
    seen: set[str] = set()
    for row in usable:
        if row["id"] in seen:
            row.update(status=DROPPED, reason="duplicate_row", detail=f"same id as an earlier row: {row['id']}")
        else:
            seen.add(row["id"])
            row["split"] = splits[row[_KEY]]
    return to_table(rows, SHARD_COLUMNS)


class ShardSplitStage(Stage):
    name = SPLIT
    reads = frozenset({"id", "text"})
    # the prompts with their dataset and split (harm category and level where the inputs have them)
    writes = PASSTHROUGH | {LINEAGE, "dataset", "split"}

    def __init__(self, config: ShardConfig):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(inputs=config.inputs)
        self.splits = config.splits
        self.seed = config.split_seed  # SHARD's 42

    def build(self, inputs: dict) -> Any:
        shares = self.splits.model_dump()
        rows = union_all([inputs[name].map_batches(prepare_prompts, batch_format="pyarrow",
                                                   fn_kwargs={"dataset": name.removeprefix("seeds_")})
                          for name in self.inputs])
        partitions = shuffle_partitions(sum(inputs[name].count() for name in self.inputs))
        return rows.groupby(["dataset", "harm_level"], num_partitions=partitions).map_groups(
            split_stratum, batch_format="pyarrow", fn_kwargs={"shares": shares, "seed": self.seed})

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        counts: dict[str, dict[str, int]] = {}
        for batch in rundir.iter_batches(self.name, OK, ["dataset", "split"]):
            for dataset, split in zip(batch.column("dataset").to_pylist(), batch.column("split").to_pylist()):
                counts.setdefault(dataset, {}).setdefault(split, 0)
                counts[dataset][split] += 1
        return {"rows_per_dataset_and_split": counts}
