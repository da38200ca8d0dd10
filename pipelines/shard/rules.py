"""SHARD stage ``shard_rules``: category-specific rules for the reframing prompt.

Run when a variant uses guidelines ``full``: one request per harm category: one writer
(``rules_writer``, default the target) writes category-specific rules from the universal
guidelines, once per run, shared by every variant; one row per category. As in SHARD the rules
come from the category name alone by default; ``rules_examples: k`` shows k example prompts of
the category, drawn from the **train** split only, so no test prompt shapes what is trained.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from actors.llm import chat
from pipelines.core.config import LLMEndpoint
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import OK, content_id
from pipelines.core.rundir import RunDir
from pipelines.core.splits import hash_rank
from pipelines.core.stage import Stage
from pipelines.shard.config import SPLIT, ShardConfig
from pipelines.shard.reframing import UNCATEGORISED, load_guidelines
from pipelines.shard.rows import take_answer

log = logging.getLogger(__name__)

RULES_COLUMNS = {"examples": pa.list_(pa.string()), "rules": pa.string(), "rules_model": pa.string()}
RULES = "shard_rules"


def category_name(category: str) -> str:
    return category or UNCATEGORISED


def category_examples(rundir: RunDir, stage: str, seed: int, k: int, split: str = "train") -> dict[str, list[str]]:
    """Every harm category of ``stage``'s rows, with up to ``k`` example prompts of ``split``: those
    whose ids rank first by a seeded hash (streamed: the driver holds ``k`` texts per category). The
    text of a row of another split is never read into an example."""
    best: dict[str, list[tuple[str, str]]] = {}
    for batch in rundir.iter_batches(stage, OK, ["id", "text", "harm_category", "split"]):
        for rid, text, category, row_split in zip(
                *(batch.column(c).to_pylist() for c in ("id", "text", "harm_category", "split"))):
            ranked = best.setdefault(category_name(category), [])
            if row_split == split and k:
                best[category_name(category)] = sorted([*ranked, (hash_rank(seed, rid), text)])[:k]
    return {category: [text for _, text in ranked] for category, ranked in sorted(best.items())}


class RenderRules:
    def __init__(self, prompt: ChatPrompt, universal: str):
        self.prompt = prompt
        self.universal = universal

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({"category": row["text"], "examples": list(row["examples"]),
                                   "universal": self.universal})


class ShardRulesStage(Stage):
    """Category-specific rules: one LLM request per harm category of ``shard_split``, once per run for
    every variant; rows are categories (``text``) with their ``rules``."""

    name = RULES
    requires = (SPLIT,)
    writes = frozenset({"id", "text", *RULES_COLUMNS})  # one row per category (text) with its rules
    unhashed = Stage.unhashed | {"_categories"}  # the categories write() found, for the accounting

    def __init__(self, config: ShardConfig, endpoint: LLMEndpoint, seed: int):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__()
        self.endpoint = endpoint
        self.seed = seed
        self.prompt = ChatPrompt(config.rules_template)
        self.guidelines = load_guidelines(config.guidelines)
        self.examples = config.rules_examples
        self._categories = 0
        self.reads = {SPLIT: frozenset({"id", "text"})}  # the categories' prompts (examples: of the train split)

    def expected_rows_in(self) -> int:
        return self._categories

    def write(self, inputs: dict, rundir: RunDir) -> None:
        import ray

        examples = category_examples(rundir, SPLIT, self.seed, self.examples)
        self._categories = len(examples)
        if not examples:
            log.warning("stage %s: %s has no prompts, so no categories to write rules for", self.name, SPLIT)
            return
        items = [{"id": content_id(category), "text": category, "examples": texts}
                 for category, texts in examples.items()]
        rows = ray.data.from_items(items)
        chat(rows, self.endpoint, RenderRules(self.prompt, self.guidelines.text())).map_batches(
            take_answer, batch_format="pyarrow", fn_kwargs={
                "into": "rules", "model_field": "rules_model", "model": self.endpoint.model,
                "extra": RULES_COLUMNS}) \
            .select_columns(["id", "text", *RULES_COLUMNS, "status", "reason", "detail"]) \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])


def load_rules(rundir: RunDir, stage: str) -> dict[str, str]:
    """``{category: rules}`` from a rules stage's ``ok`` rows."""
    rules: dict[str, str] = {}
    for batch in rundir.iter_batches(stage, OK, ["text", "rules"]):
        rules.update(zip(batch.column("text").to_pylist(), batch.column("rules").to_pylist()))
    return rules
