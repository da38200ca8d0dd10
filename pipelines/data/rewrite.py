"""LLM rewriting: each input row -> one prompt (``output: text``) or several (``output: list``).

The template sees every column of the input row (``text``, ``macro``, ``micro``, ...). Output rows
carry lineage: ``parent_id`` (the input row), ``method``, ``model``, and the raw answer. An input row
whose prompt is too long, whose request failed, or whose answer yields no prompt becomes one
``error`` row with the reason.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from actors.llm import chat
from pipelines.core.config import CONFIGS, ExistingPath, LLMEndpoint, Strict
from pipelines.core.parsing import classify_llm_error, split_prompts, strip_thinking
from pipelines.core.prompts import ChatPrompt, RenderRow
from pipelines.core.registry import register
from pipelines.core.rows import COMMON_COLUMNS, ERROR, content_id, error_detail, make_row, to_table
from pipelines.core.stage import Stage


class RewriteConfig(Strict):
    """An LLM stage that turns each input row into one or more new prompts."""

    model: str = Field(description="name of an endpoint under `models:`")
    template: ExistingPath = Field(description="prompt file (YAML with system/user Jinja)")
    output: Literal["text", "list"] = Field(
        "list", description="text: the whole answer is one prompt; list: split into prompts")
    max_outputs: int = Field(8, ge=1, description="list: keep at most this many prompts per row")
    min_chars: int = Field(4, ge=1, description="pieces shorter than this are discarded")
    source: str = "rag"
    method: str = "rewrite"
    label: Literal["safe", "unsafe"] | None = "unsafe"


class RagConfig(RewriteConfig):
    """RAG rewriting: 5 retrieved texts + labels + keywords -> natural user prompts."""

    template: ExistingPath = Field(str(CONFIGS / "prompts" / "rag_rewrite.yaml"),
                                   validate_default=True)
    max_outputs: int = Field(10, ge=1)
    method: str = "rag"

LINEAGE = {"model": pa.string(), "raw_output": pa.string()}


def answers_to_rows(batch: pa.Table, *, config: RewriteConfig, model: str,
                    carry: dict[str, tuple[str, pa.DataType]] | None = None) -> pa.Table:
    """LLM answers -> output rows (fan-out for ``list``), or one error row per failed input.

    ``carry`` maps lineage columns of the output to the input column they copy, with their type
    (``{"query": ("text", pa.string())}`` keeps the retrieval query of a RAG row)."""
    carry = carry or {}
    out = []
    for row in batch.to_pylist():
        inherited = {k: row.get(k, "") for k in ("lang", "macro", "micro")}
        inherited.update({out_col: row.get(in_col) for out_col, (in_col, _) in carry.items()})
        if config.label is not None:
            inherited["label"] = config.label
        if row["llm_error"]:
            out.append(make_row(id=row["id"], parent_id=row["id"], text=row["text"], model=model,
                                source=config.source, method=config.method, status=ERROR,
                                reason=classify_llm_error(row["llm_error"]),
                                detail=error_detail(row["llm_error"]), **inherited))
            continue
        answer = row["llm_output"]
        if config.output == "list":
            pieces = split_prompts(answer, min_chars=config.min_chars)[: config.max_outputs]
        else:
            piece = strip_thinking(answer)
            pieces = [piece] if len(piece) >= config.min_chars else []
        if not pieces:
            out.append(make_row(id=row["id"], parent_id=row["id"], text=row["text"], model=model,
                                source=config.source, method=config.method, status=ERROR,
                                reason="unparseable_output", raw_output=answer,
                                detail=error_detail(f"no prompt of >= {config.min_chars} chars in: "
                                                    f"{answer!r}"), **inherited))
            continue
        for piece in pieces:
            out.append(make_row(id=content_id(piece, row["id"]), text=piece, parent_id=row["id"],
                                source=config.source, method=config.method, model=model,
                                raw_output=answer, **inherited))
    return to_table(out, {**LINEAGE, **{col: typ for col, (_, typ) in carry.items()}})


class RewriteStage(Stage):
    """Rewrites the ingested documents themselves (one LLM request per document)."""

    name = "rewrite"
    inputs = ("ingest",)
    fan_out = True
    carry: ClassVar[dict[str, tuple[str, pa.DataType]]] = {}
    reads = frozenset({"id", "text"})

    def __init__(self, config: RewriteConfig, endpoint: LLMEndpoint):
        super().__init__(config)
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.template)
        # new prompts in the common schema with the answer's lineage; labelled when the config says so
        self.writes = ((COMMON_COLUMNS - ({"label"} if config.label is None else set()))
                       | frozenset(LINEAGE) | frozenset(self.carry))

    def build(self, inputs: dict) -> Any:
        answers = chat(inputs[self.inputs[0]], self.endpoint, RenderRow(self.prompt))
        return answers.map_batches(answers_to_rows, batch_format="pyarrow",
                                   fn_kwargs={"config": self.config, "model": self.endpoint.model,
                                              "carry": self.carry})


class RagRewriteStage(RewriteStage):
    """RAG prompt construction: each retrieval query (labels, keywords, 5 retrieved texts) -> user
    prompts, labelled ``unsafe`` with the query's macro/micro category, with the query, keywords and
    retrieved ids as lineage."""

    name = "rag"
    inputs = ("retrieve",)
    # the retrieval query's labels, keywords and retrieved texts (rag_rewrite.yaml's variables)
    reads = frozenset({"id", "text", "macro_label", "micro_label", "keywords", "retrieved_texts"})
    carry: ClassVar[dict[str, tuple[str, pa.DataType]]] = {
        "query": ("text", pa.string()), "keywords": ("keywords", pa.list_(pa.string())),
        "retrieved_ids": ("retrieved_ids", pa.list_(pa.string()))}


register("rag", config=RagConfig, needs=("retrieve",), provides="rows",
         build=lambda recipe, config: [RagRewriteStage(config, recipe.models[config.model])],
         check=lambda config, refs: {"stages.rag.model": config.model})
register("rewrite", config=RewriteConfig, needs=("ingest",), provides="rows",
         build=lambda recipe, config: [RewriteStage(config, recipe.models[config.model])],
         check=lambda config, refs: {"stages.rewrite.model": config.model})
