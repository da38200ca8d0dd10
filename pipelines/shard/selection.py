"""SHARD stage ``shard_select_<v>``: which O2 are kept for SFT.

``ok`` = rows where O2 wins helpfulness (``select: helpfulness``, SHARD's rule) and, with
``select: helpfulness_and_harm``, does not lose harmfulness; the others ``dropped``
(``not_more_helpful``, ``more_harmful``); its summary counts what each rule keeps. Its rows carry
``text`` (P1), ``completion`` (O2) and ``split`` for ``sft_<key>`` (``pipelines/training/sft.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.rows import DROPPED, OK, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage
from pipelines.shard.config import ShardConfig
from pipelines.shard.pairwise import HARMFULNESS, HELPFULNESS, SELECTION_RULES, select
from pipelines.shard.rows import SHARD_COLUMNS


def apply_selection(batch: pa.Table, *, rule: str) -> pa.Table:
    """:func:`pipelines.shard.pairwise.select` per row under ``rule``: kept rows ``ok``, the others
    ``dropped``."""
    out = []
    for row in batch.to_pylist():
        keep, reason = select(row[HELPFULNESS], row[HARMFULNESS], rule)
        detail = "" if keep else f"helpfulness {row[HELPFULNESS]}, harmfulness {row[HARMFULNESS]}"
        out.append({**row, "status": OK if keep else DROPPED, "reason": reason, "detail": detail})
    return to_table(out, SHARD_COLUMNS)


class ShardSelectStage(Stage):
    def __init__(self, config: ShardConfig, variant: str):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(name=f"shard_select_{variant}", inputs=(f"shard_judge_{variant}",))
        self.reads = frozenset({"id", HELPFULNESS, HARMFULNESS})
        self.writes = PASSTHROUGH
        self.rule = config.select

    def build(self, inputs: dict) -> Any:
        return inputs[self.inputs[0]].map_batches(apply_selection, batch_format="pyarrow",
                                                  fn_kwargs={"rule": self.rule})

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        splits = rundir.column_values(self.name, OK, "split")
        judged = [(h, m, s) for status in (OK, DROPPED) for h, m, s in zip(
            *(rundir.column_values(self.name, status, c) for c in (HELPFULNESS, HARMFULNESS, "split")))]
        return {"rule": self.rule, "kept_per_split": {s: splits.count(s) for s in sorted(set(splits))},
                # what each rule keeps of the same judgements, per split
                "kept_by_rule": {rule: dict(sorted(Counter(s for h, m, s in judged if select(h, m, rule)[0]).items()))
                                 for rule in SELECTION_RULES}}
