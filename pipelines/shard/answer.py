"""SHARD stage ``shard_answer``: the baseline answers O1.

The target model's baseline answer O1 to P1 under a plain system prompt (``baseline``; SHARD's "You
are a helpful assistant."), sampled at ``answer_sampling`` (SHARD's temperature 0.3, top_p 0.9,
repetition penalty 1.1); a teacher that refines its own drafts writes its O1 the same way in
``shard_answer_<v>``. The same plain chat (:func:`answer_messages`) is what the evaluated systems
answer under; SFT trains under ``train_system`` (SHARD's "helpful and safe assistant" prompt).
"""

from __future__ import annotations

from typing import Any

from actors.llm import chat
from pipelines.core.config import LLMEndpoint
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.stage import Stage
from pipelines.shard.config import ANSWER, SPLIT, ShardConfig, with_sampling
from pipelines.shard.rows import take_answer


def answer_messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    """The plain chat O1 is written under, and the evaluated systems answer under."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class AnswerMessages:
    def __init__(self, system: str | None):
        self.system = system

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return answer_messages(self.system, row["text"])


class ShardAnswerStage(Stage):
    """O1: the target's own answer to P1 (``shard_answer``), or a teacher's (``shard_answer_<v>``)."""

    name = ANSWER
    inputs = (SPLIT,)
    reads = frozenset({"id", "text"})
    writes = PASSTHROUGH | {"baseline", "baseline_model"}  # O1

    def __init__(self, config: ShardConfig, endpoint: LLMEndpoint, name: str = ANSWER):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(name=name)
        self.system = config.system
        self.endpoint = with_sampling(endpoint, config.answer_sampling)  # SHARD: 0.3, top_p 0.9

    def build(self, inputs: dict) -> Any:
        return chat(inputs[SPLIT], self.endpoint, AnswerMessages(self.system)).map_batches(
            take_answer, batch_format="pyarrow",
            fn_kwargs={"into": "baseline", "model_field": "baseline_model", "model": self.endpoint.model})
