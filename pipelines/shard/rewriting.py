"""SHARD stages ``shard_reframe_<v>`` and ``shard_refine_<v>``: the reframer rewrites the request, then
the answer.

``shard_reframe_<v>``
    P1 -> P2, a JSON object (:mod:`pipelines.shard.reframing`), with the guidance the ablation gives;
    an invalid answer is asked again ``retries`` times (SHARD: 0) with the problem; one still invalid
    becomes P2 as it is (``invalid_p2: raw``, SHARD's fallback: :func:`raw_p2`, no response mode) or an
    ``error`` (``invalid_p2: error``).
``shard_refine_<v>``
    O1 -> O2 (``completion``) given P1, the reframed request and O1 (SHARD's refiner inputs); a
    refusal keeps refusing the harmful part and adds the helpful part; a good O1 comes back as is.

Both run on the variant's reframer at ``rewrite_temperature`` (:func:`rewriting_endpoint`).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from actors.llm import chat
from actors.reask import RETRY, ask_until_valid
from pipelines.core.config import LLMEndpoint
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.parsing import strip_thinking
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import ERROR, OK, error_detail, to_table, union_all
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, col
from pipelines.shard.categories import CategoryMap, category_map
from pipelines.shard.config import ShardConfig
from pipelines.shard.reframing import (
    FIELDS,
    ReframingError,
    guidance,
    load_guidelines,
    parse_reframing,
    reframing_schema,
)
from pipelines.shard.rows import SHARD_COLUMNS, _failed, _llm_fields, take_answer
from pipelines.shard.rules import RULES, load_rules

_RETRY_COLUMNS = {"retry_problem": pa.string(), "retry_previous": pa.string()}


def rewriting_endpoint(config: ShardConfig, endpoint: LLMEndpoint) -> LLMEndpoint:
    """The reframer's endpoint at ``rewrite_temperature`` (reframing and refinement sample cooler than
    the answers, as in SHARD)."""
    if config.rewrite_temperature is None:
        return endpoint
    sampling = endpoint.sampling.model_copy(update={"temperature": config.rewrite_temperature})
    return endpoint.model_copy(update={"sampling": sampling})


# ------------------------------------------------------------------------------------------------
# shard_reframe_<v>


def plan_reframing(batch: pa.Table, *, variant: str, mode: str, model: str, categories: frozenset | None,
                   rules_category: CategoryMap) -> pa.Table:
    """Mark the rows with the variant; under ``full`` guidelines a row whose rules category
    (``rules_category`` of its harm category) has no rules (its rules request failed) is an ``error``
    (``missing_category_rules``)."""
    out = []
    for row in batch.to_pylist():
        row.update(variant=variant, guidelines=mode, reframer_model=model, status=OK, reason="", detail="")
        category = rules_category(row["harm_category"])
        if categories is not None and category not in categories:
            row.update(status=ERROR, reason="missing_category_rules",
                       detail=f"no rules for category {category!r} (see {RULES})")
        out.append(row)
    return to_table(out, {**SHARD_COLUMNS, **_RETRY_COLUMNS})


class RenderReframing:
    def __init__(self, prompt: ChatPrompt, mode: str, guidelines, rules: dict[str, str], rules_category: CategoryMap):
        self.prompt = prompt
        self.mode = mode
        self.guidelines = guidelines
        self.rules = rules
        self.rules_category = rules_category

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        category = self.rules_category(row["harm_category"])
        return self.prompt.render({"text": row["text"],
                                   **guidance(self.mode, self.guidelines, self.rules.get(category, ""), category),
                                   "retry": bool(row["retry_problem"]), "problem": row["retry_problem"],
                                   "previous_answer": row["retry_previous"]})


def raw_p2(answer: str) -> str:
    """SHARD's fallback P2 (``run_p1_to_p2_guidelines.py``, ``parse_p2``) for an answer that is not the
    JSON object: the answer's text, ``<think>`` blocks, a surrounding code fence and surrounding quotes
    removed (empty: nothing usable)."""
    text = strip_thinking(answer or "").strip()
    lines = text.split("\n")
    if lines and lines[0].strip().startswith("```"):
        lines = lines[1:]
        if lines and lines[-1].strip() == "```":
            lines = lines[:-1]
        text = "\n".join(lines).strip()
    for quote in ('"', "'"):
        if len(text) >= 2 and text[0] == quote and text[-1] == quote:
            text = text[1:-1].strip()
    return text


def read_reframings(batch: pa.Table, *, last: bool, invalid: str = "raw") -> pa.Table:
    """Reframing answers -> P2 columns (``ok``), a retry (status ``retry`` with the problem), or
    after the last attempt: with ``invalid="raw"`` (SHARD) the answer's text as the reformulated prompt
    (:func:`raw_p2`; ``response_mode`` and the other fields empty; an empty text is an ``error``), with
    ``invalid="error"`` an ``error`` with the problem's reason and every answer."""
    out = []
    for row in batch.to_pylist():
        answer, error = _llm_fields(row)
        answers = [*(row["reframe_answers"] or []), f"[request failed] {error}" if error else answer]
        row = {**row, "reframe_answers": answers}
        if error:
            out.append(_failed(row, error))
            continue
        try:
            out.append({**row, **parse_reframing(answer), "status": OK, "reason": "", "detail": "",
                        "retry_problem": "", "retry_previous": ""})
        except ReframingError as exc:
            if last and invalid == "raw" and (text := raw_p2(answer)):
                out.append({**row, **{f: "" for f in FIELDS}, "reformulated_prompt": text, "status": OK,
                            "reason": "", "detail": "", "retry_problem": "", "retry_previous": ""})
            elif last:
                out.append({**row, "status": ERROR, "reason": exc.reason, "detail": error_detail(
                    f"{exc}; answers: {json.dumps(answers, ensure_ascii=False)}")})
            else:
                out.append({**row, "status": RETRY, "retry_problem": f"{exc.reason}: {exc}",
                            "retry_previous": answer[:2000]})
    return to_table(out, {**SHARD_COLUMNS, **_RETRY_COLUMNS})


def _drop_retry_columns(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in _RETRY_COLUMNS if c in batch.column_names])


class ShardReframeStage(Stage):
    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        mode = config.variants[variant].guidelines
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash;
        # it reads the O1 this variant refines, and requires the category rules in mode full
        super().__init__(name=f"shard_reframe_{variant}", inputs=(config.answer_stage(variant),),
                         requires=(RULES,) if mode == "full" else ())
        self.variant = variant
        self.mode = mode
        self.rules_stage = RULES
        self.reads = {self.inputs[0]: frozenset({"id", "text"}),
                      **({self.rules_stage: frozenset({"text", "rules"})} if self.mode == "full" else {})}
        self.writes = PASSTHROUGH | {"variant", "guidelines", "reframer_model", "reformulated_prompt", "response_mode",
                                     "reformulated_component", "preserved_benign_need", "reframe_answers"}  # P2
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.reframe_template)
        self.guidelines = load_guidelines(config.guidelines)
        self.rules_category = category_map(config.category_map)
        self.retries = config.retries
        self.invalid_p2 = config.invalid_p2  # SHARD: the raw answer is P2
        self.constrained = config.constrained
        self.max_field_chars = config.max_field_chars

    def constraint(self) -> dict | None:
        return {"json": reframing_schema(self.max_field_chars)} if self.constrained else None

    def write(self, inputs: dict, rundir: RunDir) -> None:
        rules = load_rules(rundir, self.rules_stage) if self.mode == "full" else {}
        rows = inputs[self.inputs[0]].map_batches(plan_reframing, batch_format="pyarrow", fn_kwargs={
            "variant": self.variant, "mode": self.mode, "model": self.endpoint.model,
            "categories": frozenset(rules) if self.mode == "full" else None, "rules_category": self.rules_category})
        finished = [rows.filter(expr=col("status") != OK)]
        pending = rows.filter(expr=col("status") == OK)
        render = RenderReframing(self.prompt, self.mode, self.guidelines, rules, self.rules_category)
        finished += ask_until_valid(self, rundir, pending, endpoint=self.endpoint, render=render,
                                    constraint=self.constraint(), read=read_reframings,
                                    read_kwargs={"invalid": self.invalid_p2},
                                    retries=self.retries)
        union_all(finished).map_batches(_drop_retry_columns, batch_format="pyarrow") \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        import pyarrow.compute as pc

        modes, retried = Counter(), 0
        for batch in rundir.iter_batches(self.name, OK, ["response_mode", "reframe_answers"]):
            modes.update(batch.column("response_mode").to_pylist())
            retried += pc.sum(pc.greater(pc.list_value_length(batch.column("reframe_answers")), 1)).as_py() or 0
        raw = modes.pop("", 0)  # no response mode: an invalid answer kept as P2 (invalid_p2: raw)
        return {"response_modes": dict(sorted(modes.items())), "answered_after_retry": retried,
                "raw_answer_as_p2": raw}


# ------------------------------------------------------------------------------------------------
# shard_refine_<v>


#: what SHARD's refiner sees: P1, the reframed request P2 and O1
REFINE_FIELDS = ("text", "reformulated_prompt", "baseline")


class ShardRefineStage(Stage):
    """O2: the reframer's refinement of O1 given P1 and P2."""

    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(name=f"shard_refine_{variant}", inputs=(f"shard_reframe_{variant}",))
        self.reads = frozenset({"id", *REFINE_FIELDS})
        self.writes = PASSTHROUGH | {"completion", "completion_thinking", "reframer_model"}  # O2 (+ its reasoning)
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.refine_template)

    def build(self, inputs: dict) -> Any:
        # what SHARD's refiner sees: P1, the reframed request and O1
        render = RenderFields(self.prompt, REFINE_FIELDS)
        return chat(inputs[self.inputs[0]], self.endpoint, render).map_batches(
            take_answer, batch_format="pyarrow",
            fn_kwargs={"into": "completion", "model_field": "reframer_model", "model": self.endpoint.model,
                       "thinking_into": "completion_thinking"})


class RenderFields:
    """Row -> messages, with only ``fields`` of the row as template variables."""

    def __init__(self, prompt: ChatPrompt, fields: tuple[str, ...]):
        self.prompt = prompt
        self.fields = fields

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({f: row[f] for f in self.fields})

