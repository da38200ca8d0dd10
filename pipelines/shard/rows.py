"""SHARD rows: the one schema every SHARD row stage carries, and LLM answers into those rows.

Every row is carried with one fixed schema (row schema + :data:`SHARD_COLUMNS`), so each stage adds
its columns and keeps the earlier ones as real columns. :func:`take_answer` reads free-text answers
into a column; a failed request or an empty answer is an ``error`` row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from actors.llm import LLM_COLUMNS
from pipelines.core.parsing import classify_llm_error, strip_thinking
from pipelines.core.rows import ERROR, LINEAGE, OK, error_detail, to_table
from pipelines.shard.pairwise import JUDGEMENT

#: columns every SHARD row stage writes beside the row schema (empty until the stage that fills them)
SHARD_COLUMNS = {
    LINEAGE: pa.string(),               # upstream lineage (origin file, ...) as JSON
    "dataset": pa.string(),             # input stage without "seeds_"
    "harm_category": pa.string(),
    "harm_level": pa.string(),
    "split": pa.string(),               # train / val / test
    "baseline": pa.string(),            # O1
    "baseline_model": pa.string(),      # not `model`: ray.data.llm reads that as a LoRA name
    "variant": pa.string(),
    "guidelines": pa.string(),
    "reframer_model": pa.string(),
    "reformulated_prompt": pa.string(),  # P2 ...
    "response_mode": pa.string(),
    "reformulated_component": pa.string(),
    "preserved_benign_need": pa.string(),
    "reframe_answers": pa.list_(pa.string()),  # raw reframing answers, retries included
    "completion": pa.string(),          # O2
    "completion_thinking": pa.string(),  # the reasoning the O2 writer produced before O2 ("" if none)
    "judge_model": pa.string(),
    "helpfulness": pa.string(),         # O2's win / tie / loss against O1
    "harmfulness": pa.string(),
    "relevance": pa.string(),           # O2 more relevant to p1 / p2 / equal ("" unjudged or unread)
    "relevance_raw": pa.string(),       # the relevance judge's answer
    "judgements": pa.list_(JUDGEMENT),
}


def _llm_fields(row: dict[str, Any]) -> tuple[str, str]:
    """Pop the LLM columns off a row; return (answer, error)."""
    answer, error = row.pop("llm_output"), row.pop("llm_error")
    for name in LLM_COLUMNS:
        row.pop(name, None)
    return answer, error


def _failed(row: dict[str, Any], error: str) -> dict[str, Any]:
    return {**row, "status": ERROR, "reason": classify_llm_error(error), "detail": error_detail(error)}


def thinking_of(text: str) -> str:
    """The reasoning of an answer: the text of its ``<think>...</think>`` blocks, or everything before
    a lone closing ``</think>`` (a chat template that opened the block in the prompt); ``""`` if none.
    (:func:`pipelines.core.parsing.strip_thinking` is the answer without it.)"""
    text = text or ""
    blocks = re.findall(r"<think>(.*?)</think>", text, re.DOTALL)
    if blocks:
        return "\n\n".join(b.strip() for b in blocks if b.strip())
    if "</think>" in text:
        return text.rsplit("</think>", 1)[0].replace("<think>", "").strip()
    return ""


def take_answer(batch: pa.Table, *, into: str, model_field: str, model: str,
                extra: dict[str, pa.DataType] | None = None, fields: dict[str, Any] | None = None,
                thinking_into: str | None = None, final: Callable[[str], tuple[str, str]] | None = None) -> pa.Table:
    """Free-text answers -> column ``into`` (``<think>`` blocks removed), the model in
    ``model_field`` and ``fields`` set on every row; with ``thinking_into`` the reasoning
    (:func:`thinking_of`) goes to that column; ``final`` splits the answer further into (reasoning,
    final answer) (the Rational baseline), its reasoning appended to the thinking. Failed requests and
    empty answers become ``error`` rows (``prompt_too_long`` / ``inference_error`` / ``empty_output``).
    The output has the SHARD schema plus ``extra``."""
    out = []
    for row in batch.to_pylist():
        answer, error = _llm_fields(row)
        row.update(fields or {})
        row[model_field] = model
        if error:
            out.append(_failed(row, error))
            continue
        text = strip_thinking(answer)
        if thinking_into is not None:
            thinking = thinking_of(answer)
            if final is not None:
                reasoning, text = final(text)
                thinking = "\n\n".join(t for t in (thinking, reasoning) if t)
            row[thinking_into] = thinking
        if not text:
            out.append({**row, into: "", "status": ERROR, "reason": "empty_output",
                        "detail": error_detail(f"no answer text in {answer!r}")})
        else:
            out.append({**row, into: text, "status": OK, "reason": "", "detail": ""})
    return to_table(out, {**SHARD_COLUMNS, **(extra or {})})
