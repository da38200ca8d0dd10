"""SHARD stage ``shard_prompt_<v>``: the inference-time baselines that answer P1 directly (no reframing).

A variant with ``method: benign_intent`` or ``method: rational`` (:mod:`pipelines.shard.config`)
writes its O2 (``completion``) in one request per prompt, under a system prompt, and is judged
against O1 like a reframed variant (``shard_judge_<v>``: its row in the inference-time report):

- ``benign_intent``: SHARD's benign-intent prompting baseline, a system prompt that assumes a benign
  purpose (``configs/prompts/shard_benign_intent.yaml``);
- ``rational``: the Rational baseline (Self-Check Reasoning, arXiv 2503.05021) as SHARD runs it: the
  model reasons about the request under the compliance-mode system prompt
  (``configs/prompts/shard_rational.yaml``), and O2 is the final answer after its reasoning
  (:func:`final_response`); the reasoning is kept in ``completion_thinking``.

Both sample at ``rewrite_temperature`` (SHARD: 0.3 for these runs). There is no P2, so no relevance
judgement.
"""

from __future__ import annotations

import re
from typing import Any

from actors.llm import chat
from pipelines.core.config import LLMEndpoint
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.prompts import ChatPrompt
from pipelines.core.stage import Stage
from pipelines.shard.config import BENIGN_INTENT, RATIONAL, ShardConfig
from pipelines.shard.rows import take_answer

#: where Rational's reasoning ends and its answer starts, tried in order (SHARD's
#: scripts/rational_baseline/rational_inference_vllm.py, extract_final_response)
RESPONSE_SEPARATOR = "### Response:"
_TRANSITIONS = (
    r"\n\n(?:Based on (?:my )?(?:reasoning|analysis|the above|this analysis),?\s*)",
    r"\n\n(?:In conclusion[,:]?\s*)",
    r"\n\n(?:Final (?:response|answer)[:\s]+)",
    r"\n\n(?:Therefore[,:]?\s*I (?:will|can|should|must))",
    r"\n\n(?:Given (?:the above|this)[,:]?\s*)",
    r"\n\n(?:Response[:\s]+)",
    r"</(?:reasoning|think|scratchpad|rationale|analysis)>\s*",
)


def final_response(text: str) -> tuple[str, str]:
    """A Rational answer -> (reasoning, final answer): the text after ``### Response:``, else after the
    first of SHARD's transition patterns that matches (their order decides, as in SHARD); with none, the
    whole text is the answer and the reasoning is empty."""
    t = (text or "").strip()
    if RESPONSE_SEPARATOR in t:
        head, tail = t.split(RESPONSE_SEPARATOR, 1)
        return head.strip(), tail.strip()
    for pattern in _TRANSITIONS:
        m = re.search(pattern, t, flags=re.IGNORECASE | re.DOTALL)
        if m:
            return t[:m.start()].strip(), t[m.end():].strip()
    return "", t


class RenderPrompt:
    def __init__(self, prompt: ChatPrompt):
        self.prompt = prompt

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({"text": row["text"]})


class ShardPromptStage(Stage):
    """O2 of a prompting baseline: the variant's model answers P1 under the method's system prompt."""

    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(name=f"shard_prompt_{variant}", inputs=(config.answer_stage(variant),))
        self.method = config.method(variant)
        if self.method not in (BENIGN_INTENT, RATIONAL):
            raise ValueError(f"variant {variant}: method {self.method!r} is not a prompting baseline")
        self.reads = frozenset({"id", "text"})
        self.writes = PASSTHROUGH | {"completion", "completion_thinking", "reframer_model", "variant"}
        self.variant = variant
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.benign_intent_template if self.method == BENIGN_INTENT
                                 else config.rational_template)

    def build(self, inputs: dict) -> Any:
        return chat(inputs[self.inputs[0]], self.endpoint, RenderPrompt(self.prompt)).map_batches(
            take_answer, batch_format="pyarrow", fn_kwargs={
                "into": "completion", "model_field": "reframer_model", "model": self.endpoint.model,
                "fields": {"variant": self.variant}, "thinking_into": "completion_thinking",
                "final": final_response if self.method == RATIONAL else None})
