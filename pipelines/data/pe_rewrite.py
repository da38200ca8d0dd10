"""Prompt-engineering (PE) rewriting of real seed prompts (CHILLGuard §3.1, Appendix C.2).

1. Each seed gets a rewriting method drawn (seeded by the recipe seed and its id) from the catalogue's
   methods for its label and macro category: benign methods for safe seeds, the macro's own methods
   for unsafe ones. A share of the seeds is kept as original prompts instead (``keep_original``, per
   label; the paper keeps 3,697 of 46,742, 3,100 of them safe); those are not rewritten.
2. The other seeds are grouped by (label, macro, method), ordered by id and cut into groups of
   ``group_size`` (3); one LLM request per group asks for exactly one rewrite per input, separated by
   semicolons (``configs/prompts/pe_rewrite.yaml``).
3. The answer is split like every rewriter answer; rewrite ``i`` belongs to seed ``i`` of the group
   (``parent_id``), inherits its label and categories, and records the group (``group_id``,
   ``parent_ids``), ``method``, ``model`` and how many rewrites were expected and parsed. Extra
   rewrites are cut; a seed left without one is an ``error`` row (``missing_rewrite``), as is every
   seed of a failed or unparseable request. A seed whose label or macro has no method is an
   ``error`` row too (``no_method``). The manifest summary counts groups with the wrong count.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import Field

from actors.llm import chat
from pipelines.core.config import CONFIGS, ExistingPath, LLMEndpoint, Strict
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.parsing import classify_llm_error, clean_piece, split_prompts, strip_thinking
from pipelines.core.prompts import ChatPrompt, RenderRow
from pipelines.core.registry import References, register
from pipelines.core.rows import (
    ERROR,
    LINEAGE,
    OK,
    common_rows,
    content_id,
    error_detail,
    keyed_rng,
    make_row,
    shuffle_partitions,
    to_table,
)
from pipelines.core.stage import Stage
from pipelines.core.taxonomy import load_taxonomy
from pipelines.data.methods import MethodsError, load_methods


class PEConfig(Strict):
    """Prompt-engineering rewriting of labelled seed prompts (3 seeds in, 3 rewrites out)."""

    model: str = Field(description="endpoint under `models:`")
    inputs: list[str] = Field(min_length=1, description="seed stages (seeds_<key>) to rewrite")
    methods: ExistingPath = Field(str(CONFIGS / "rewriting_methods.yaml"), validate_default=True)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "pe_rewrite.yaml"), validate_default=True)
    group_size: int = Field(3, ge=1, description="seeds per request (one rewrite each)")
    keep_original: dict[Literal["safe", "unsafe"], Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="share of seeds kept as original prompts, per label")
    min_chars: int = Field(4, ge=1)

PE_LINEAGE = {
    LINEAGE: pa.string(), "group_id": pa.string(), "parent_ids": pa.list_(pa.string()),
    "outputs_expected": pa.int32(), "outputs_parsed": pa.int32(), "model": pa.string(),
    "raw_output": pa.string(),
}
_SEED = "seed"  # role of a row that goes to rewriting


def assign_methods(batch: pa.Table, *, config: PEConfig, seed: int, taxonomy_path: str) -> pa.Table:
    """Per row: keep as original (ok), send to rewriting (role seed, method drawn), or error."""
    catalogue = load_methods(config.methods, taxonomy_path)
    out = []
    for row in batch.to_pylist():
        row = make_row(**row)  # status columns start as ok
        rng = keyed_rng(seed, "pe", row["id"])
        if rng.random() < config.keep_original.get(row["label"], 0.0):
            out.append({**row, "method": "original", "source": row["source"] or "real",
                        "parent_id": row["id"], "role": "original"})
            continue
        try:
            methods = catalogue.for_seed(row["label"], row["macro"])
        except MethodsError as exc:
            out.append({**row, "parent_id": row["id"], "role": "error", "status": ERROR,
                        "reason": "no_method", "detail": str(exc)})
            continue
        out.append({**row, "method": methods[int(rng.integers(len(methods)))].name, "role": _SEED})
    return to_table(out, {**PE_LINEAGE, "role": pa.string()})


def make_groups(group: pa.Table, *, group_size: int, taxonomy_path: str, methods_path: str) -> pa.Table:
    """One (label, macro, method) group of seeds -> requests of ``group_size`` seeds, by id order."""
    taxonomy, catalogue = load_taxonomy(taxonomy_path), load_methods(methods_path, taxonomy_path)
    rows = sorted(group.to_pylist(), key=lambda r: r["id"])
    requests = []
    for start in range(0, len(rows), group_size):
        members = rows[start:start + group_size]
        first = members[0]
        method = catalogue.get(first["method"])
        requests.append({
            "id": content_id(*(m["id"] for m in members), first["method"]),
            "label": first["label"], "macro": first["macro"], "method": first["method"],
            "macro_label": taxonomy.macro(first["macro"]).zh if first["macro"] else "",
            "method_name": method.zh, "method_description": method.description,
            "texts": [m["text"] for m in members], "parent_ids": [m["id"] for m in members],
            "micros": [m["micro"] for m in members], "langs": [m["lang"] for m in members],
            "lineages": [m[LINEAGE] for m in members], "sources": [m["source"] for m in members],
        })
    return pa.Table.from_pylist(requests)


def rewrites_in(answer: str, expected: int, min_chars: int) -> list[str]:
    """The rewrites in a PE answer: split at semicolons and newlines when several were asked for; the
    whole answer when one was (real posts hold semicolons: Qwen2.5 rewrote a ToxiCN post of three
    clauses joined by ``；`` in quotes, and a split kept only the first clause)."""
    if expected > 1:
        return split_prompts(answer, min_chars=min_chars)
    whole = clean_piece(strip_thinking(answer)).rstrip(";；").strip()
    return [whole] if len(whole) >= min_chars else []


def answers_to_rewrites(batch: pa.Table, *, config: PEConfig, model: str) -> pa.Table:
    out = []
    for req in batch.to_pylist():
        expected = len(req["parent_ids"])
        pieces = [] if req["llm_error"] else rewrites_in(req["llm_output"], expected, config.min_chars)
        common = dict(label=req["label"], macro=req["macro"], method=req["method"], source="pe",
                      group_id=req["id"], parent_ids=req["parent_ids"], outputs_expected=expected,
                      outputs_parsed=len(pieces), model=model, raw_output=req["llm_output"])
        for i, parent in enumerate(req["parent_ids"]):
            seed_fields = dict(micro=req["micros"][i], lang=req["langs"][i], parent_id=parent,
                               **{LINEAGE: req["lineages"][i]})
            if i < len(pieces):
                out.append(make_row(id=content_id(pieces[i], parent, req["method"]), text=pieces[i],
                                    **common, **seed_fields))
                continue
            if req["llm_error"]:
                reason, detail = classify_llm_error(req["llm_error"]), req["llm_error"]
            elif not pieces:
                reason, detail = "unparseable_output", f"no rewrite in: {req['llm_output']!r}"
            else:
                reason, detail = "missing_rewrite", f"{len(pieces)} rewrites for {expected} inputs"
            out.append(make_row(id=parent, text=req["texts"][i], status=ERROR, reason=reason,
                                detail=error_detail(detail), **common, **seed_fields))
    return to_table(out, PE_LINEAGE)


def _finish_direct_rows(batch: pa.Table) -> pa.Table:
    """Kept originals and method errors, in the stage's output schema."""
    return to_table(batch.drop_columns(["role"]).to_pylist(), PE_LINEAGE)


class PERewriteStage(Stage):
    name = "pe"
    fan_out = True
    reads = frozenset({"id", "text", "label"})  # the label picks the seeds kept and the methods
    # a rewrite keeps its seed's label, categories and lineage
    writes = PASSTHROUGH | frozenset(PE_LINEAGE)

    def __init__(self, config: PEConfig, endpoint: LLMEndpoint, taxonomy_path: str, seed: int):
        super().__init__(config, inputs=config.inputs)
        self.endpoint = endpoint
        self.taxonomy_path = taxonomy_path  # read again by the Ray tasks
        self.taxonomy = load_taxonomy(taxonomy_path)  # the macro names it renders
        self.methods = load_methods(config.methods, taxonomy_path)  # the catalogue's content
        self.seed = seed
        self.prompt = ChatPrompt(config.template)

    def build(self, inputs: dict) -> Any:
        rows = common_rows(inputs, self.inputs)
        assigned = rows.map_batches(assign_methods, batch_format="pyarrow", fn_kwargs={
            "config": self.config, "seed": self.seed, "taxonomy_path": self.taxonomy_path}).materialize()
        direct = assigned.filter(lambda r: r["role"] != _SEED).map_batches(
            _finish_direct_rows, batch_format="pyarrow")
        seeds = assigned.filter(lambda r: r["role"] == _SEED)
        groups = seeds.groupby(["label", "macro", "method"], num_partitions=shuffle_partitions(seeds.count())) \
            .map_groups(make_groups, batch_format="pyarrow", fn_kwargs={
                "group_size": self.config.group_size, "taxonomy_path": self.taxonomy_path,
                "methods_path": self.config.methods})
        answers = chat(groups, self.endpoint, RenderRow(self.prompt))
        rewrites = answers.map_batches(answers_to_rewrites, batch_format="pyarrow",
                                       fn_kwargs={"config": self.config, "model": self.endpoint.model})
        return direct.union(rewrites)

    def summary(self, rundir) -> dict[str, Any]:
        groups: dict[str, tuple[int, int]] = {}
        for status in (OK, ERROR):
            for gid, exp, got in zip(rundir.column_values(self.name, status, "group_id"),
                                     rundir.column_values(self.name, status, "outputs_expected"),
                                     rundir.column_values(self.name, status, "outputs_parsed")):
                if gid:
                    groups[gid] = (exp, got)
        counts = Counter("exact" if got == exp else ("too_few" if got < exp else "too_many")
                         for exp, got in groups.values())
        methods = Counter(rundir.column_values(self.name, OK, "method"))
        return {"groups": len(groups), "output_counts": dict(counts), "rows_by_method": dict(methods)}


def _check(config: PEConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.pe.inputs", config.inputs)
    return {"stages.pe.model": config.model}


register("pe", config=PEConfig, provides="rows", check=_check,
         build=lambda recipe, config: [PERewriteStage(config, recipe.models[config.model], recipe.taxonomy,
                                                      recipe.seed)])
