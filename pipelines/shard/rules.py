"""SHARD stage ``shard_rules``: category-specific rules for the reframing prompt.

Run when a variant uses guidelines ``full``: one request per rules category (the harm categories
mapped by ``category_map``, :mod:`pipelines.shard.categories`; by default Do-Not-Answer's 12 types
share LinguaSafe's 5 types' rules): one writer (``rules_writer``, default the target) writes
category-specific rules for the rewriter from the universal guidelines, once per run, shared by
every variant, at ``rules_temperature`` (SHARD: 0.2); one row per category. As in SHARD the rules
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
from pipelines.shard.categories import CategoryMap, category_map
from pipelines.shard.config import SPLIT, ShardConfig
from pipelines.shard.reframing import load_guidelines
from pipelines.shard.rows import take_answer

log = logging.getLogger(__name__)

RULES_COLUMNS = {"examples": pa.list_(pa.string()), "rules": pa.string(), "rules_model": pa.string()}
RULES = "shard_rules"


def category_examples(rundir: RunDir, stage: str, seed: int, k: int, split: str = "train",
                      rules_category: CategoryMap | None = None) -> dict[str, list[str]]:
    """Every rules category of ``stage``'s rows (``rules_category`` of the harm category; default:
    no map), with up to ``k`` example prompts of ``split``: those whose ids rank first by a seeded hash
    (streamed: the driver holds ``k`` texts per category). The text of a row of another split is never
    read into an example."""
    category_name = rules_category or CategoryMap({})
    best: dict[str, list[tuple[str, str]]] = {}
    for batch in rundir.iter_batches(stage, OK, ["id", "text", "harm_category", "split"]):
        for rid, text, category, row_split in zip(
                *(batch.column(c).to_pylist() for c in ("id", "text", "harm_category", "split"))):
            ranked = best.setdefault(category_name(category), [])
            if row_split == split and k:
                best[category_name(category)] = sorted([*ranked, (hash_rank(seed, rid), text)])[:k]
    return {category: [text for _, text in ranked] for category, ranked in sorted(best.items())}


def rules_endpoint(config: ShardConfig, endpoint: LLMEndpoint) -> LLMEndpoint:
    """The rules writer at ``rules_temperature`` (SHARD's generate_category_guidelines.py: 0.2), whatever
    the endpoint's; ``None``: the endpoint's."""
    if config.rules_temperature is None:
        return endpoint
    sampling = endpoint.sampling.model_copy(update={"temperature": config.rules_temperature})
    return endpoint.model_copy(update={"sampling": sampling})


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
        self.endpoint = rules_endpoint(config, endpoint)
        self.seed = seed
        self.rules_category = category_map(config.category_map)
        self.prompt = ChatPrompt(config.rules_template)
        self.guidelines = load_guidelines(config.guidelines)
        self.examples = config.rules_examples
        self._categories = 0
        self.reads = {SPLIT: frozenset({"id", "text"})}  # the categories' prompts (examples: of the train split)

    def expected_rows_in(self) -> int:
        return self._categories

    def write(self, inputs: dict, rundir: RunDir) -> None:
        import ray

        examples = category_examples(rundir, SPLIT, self.seed, self.examples, rules_category=self.rules_category)
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
