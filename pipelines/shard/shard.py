"""SHARD data construction (self-reframing distillation, REFERENCE.md "SHARD facts").

Stages, in run order (``stages.shard`` in a recipe; ``<v>`` is a variant of ``stages.shard.variants``):

``shard_split``
    the prompts of ``inputs`` (seed stages: Do-Not-Answer / LinguaSafe presets or any mapping) with
    their ``dataset`` (the input stage without ``seeds_``), ``harm_category`` and ``harm_level`` as
    columns, split train / val / test (72 / 8 / 20) per stratum dataset × harm level
    (:mod:`pipelines.core.splits`; identical texts of one stratum share a split - the same text in two
    datasets or levels is not forced together). Splitting first keeps the test prompts independent
    of what the judge later prefers.
``shard_answer``
    the target model's baseline answer O1 to P1 under a plain system prompt (``baseline``).
``shard_rules``
    (when a variant uses guidelines ``full``) one request per harm category: one writer
    (``rules_writer``, default the target) writes category-specific rules from the universal
    guidelines, once per run, shared by every variant; one row per category. As in SHARD the rules
    come from the category name alone by default; ``rules_examples: k`` shows k example prompts of
    the category, drawn from the **train** split only, so no test prompt shapes what is trained.
``shard_reframe_<v>``
    P1 -> P2, a JSON object (:mod:`pipelines.shard.reframing`), with the guidance the ablation gives;
    an invalid answer is asked again ``retries`` times with the problem, then is an ``error``.
``shard_refine_<v>``
    O1 -> O2 (``completion``) given P1, the reframed request and O1 (SHARD's refiner inputs); a
    refusal keeps refusing the harmful part and adds the helpful part; a good O1 comes back as is.
``shard_judge_<v>``
    the judge compares O2 (candidate) with O1 (reference) for helpfulness and harmfulness, A/B
    order drawn per comparison (:mod:`pipelines.shard.pairwise`): ``helpfulness`` / ``harmfulness`` are
    O2's win / tie / loss; every judgement is kept in ``judgements``. With ``position_check: n``, n of
    them are judged again with the answers swapped (``position_check.json``: the share that flips).
``shard_select_<v>``
    ``ok`` = rows where O2 wins helpfulness (``select: helpfulness``, SHARD's rule) and, with
    ``select: helpfulness_and_harm``, does not lose harmfulness; the others ``dropped``
    (``not_more_helpful``, ``more_harmful``); its summary counts what each rule keeps. Its rows carry ``text`` (P1), ``completion`` (O2) and
    ``split`` for ``sft_<key>`` (``pipelines/sft.py``).

Variants: ``reframer`` unset = the target reframes and refines itself (SHARD); a larger endpoint =
the teacher-distillation baseline, which (``draft: own``, SHARD's) first answers the prompts itself
in ``shard_answer_<v>``, then reframes, refines **its own** O1 and is judged against it; ``draft:
target`` makes it refine the target's O1 instead. ``guidelines`` = full / universal_only / instructions_only.
Every row is carried with one fixed schema (row schema + :data:`SHARD_COLUMNS`), so each stage adds
its columns and keeps the earlier ones as real columns.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
from ray.data.expressions import col
from pydantic import Field, field_validator, model_validator

from actors.llm import LLM_COLUMNS, chat
from pipelines.core.config import CONFIGS, ExistingPath, LLMEndpoint, Strict, names_matching, semantic_dump
from pipelines.core.parsing import classify_llm_error, strip_thinking
from pipelines.core.prompts import ChatPrompt
from pipelines.core.registry import References, register
from pipelines.core.rows import (
    DROPPED, ERROR, LINEAGE, OK, content_id, error_detail, shuffle_partitions, to_common_schema, to_table,
    union_all,
)
from pipelines.core.rundir import RunDir
from pipelines.core.splits import assign_splits, hash_rank
from pipelines.core.stage import Stage
from pipelines.labelling.assembly import text_key
from pipelines.labelling.jury import RETRY, ask_until_valid
from pipelines.shard.pairwise import (
    HARMFULNESS, HELPFULNESS, JUDGED_COLUMNS, JUDGEMENT, SELECTION_RULES, Recheck, combine_judgements, judge,
    position_bias, select, verdict_pattern,
)
from pipelines.shard.reframing import (
    GUIDELINE_MODES, UNCATEGORISED, ReframingError, guidance, load_guidelines, parse_reframing,
    reframing_schema,
)
from pipelines.shard.stats import OUTCOMES, win_tie_loss


class ShardSplits(Strict):
    """Shares of each stratum (dataset × harm level) per split; SHARD's 72 / 8 / 20."""

    train: float = Field(0.72, ge=0, le=1)
    val: float = Field(0.08, ge=0, le=1)
    test: float = Field(0.20, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "ShardSplits":
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class ShardVariant(Strict):
    """One supervision variant (``stages.shard.variants.<name>``): who writes P2 and O2, whose draft O1
    it refines and is judged against, and which guidance the reframing prompt carries (the ablations)."""

    reframer: str | None = Field(
        None, description="endpoint under `models:` that writes P2 and O2; default: the target itself "
        "(self-reframing, SHARD); a larger model = the teacher-distillation baseline")
    draft: Literal["own", "target"] = Field(
        "own", description="whose O1 the reframer refines and O2 is judged against: own = the reframer "
        "answers the prompts itself first (SHARD's teacher baseline; the same as target for self); "
        "target = the teacher refines the target's drafts")
    guidelines: Literal[GUIDELINE_MODES] = Field(
        "full", description="full: universal guidelines + category rules; universal_only; "
        "instructions_only: the task instructions alone")


class ShardConfig(Strict):
    """SHARD data construction (``pipelines/shard.py``): split, baseline answers O1, category rules,
    reframing P1 -> P2 (JSON), refinement O1 -> O2, pairwise judge, selection; per variant."""

    inputs: list[str] = Field(min_length=1, description="row stages with the sensitive prompts "
                              "(seeds_<key>: do_not_answer / linguasafe presets or any mapping)")
    target: str = Field(description="endpoint under `models:`: the model being improved (answers O1)")
    judge: str = Field(description="endpoint under `models:`: the pairwise judge")
    variants: dict[str, ShardVariant] = Field(
        default_factory=lambda: {"self": ShardVariant()}, min_length=1,
        description="name -> variant; each gives stages shard_{rules,reframe,refine,judge,select}_<name>")
    system: str | None = Field(
        "You are a helpful assistant.", description="system prompt of O1 and of the evaluated answers; "
        "SFT on shard_select_* must use the same (checked)")
    splits: ShardSplits = Field(default_factory=ShardSplits)
    select: Literal[SELECTION_RULES] = Field(
        "helpfulness", description="which O2 are kept for SFT: helpfulness = O2 wins helpfulness (SHARD); "
        "helpfulness_and_harm = and does not lose harmfulness")
    order_seed: int = Field(42, description="seed of the judge's A/B order draws")
    guidelines: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_guidelines.yaml"), validate_default=True)
    rules_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_rules.yaml"), validate_default=True)
    reframe_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_reframe.yaml"),
                                           validate_default=True)
    refine_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_refine.yaml"), validate_default=True)
    helpfulness_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_helpfulness.yaml"),
                                               validate_default=True)
    harmfulness_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_harmfulness.yaml"),
                                               validate_default=True)
    rules_writer: str | None = Field(
        None, description="endpoint under `models:` that writes the category rules once for every variant "
        "(SHARD: one strong model); default: the target")
    rules_examples: int = Field(
        0, ge=0, description="example prompts of the category shown when writing its rules, from the train "
        "split only; 0 = the category name alone (SHARD)")
    retries: int = Field(1, ge=0, description="re-asks after a reframing answer that is not valid JSON P2")
    rewrite_temperature: float | None = Field(
        0.3, ge=0, description="sampling temperature of reframing and refinement (SHARD: 0.3), whatever the "
        "reframer endpoint's; null = the endpoint's")
    constrained: bool = Field(
        True, description="on endpoints that accept structured outputs: P2 restricted to its JSON schema, "
        "judge answers to explanation + verdict")
    max_field_chars: int = Field(2000, ge=8, description="constrained P2: longest string field")
    explanation_chars: int = Field(1000, ge=0, description="constrained judge: longest explanation")
    position_check: int = Field(
        0, ge=0, description="judge this many judged rows (a seeded sample) again with the answers swapped and "
        "report the share of outcomes that flip (shard_judge_<v>/position_check.json; 0 = off)")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, ShardVariant]) -> dict[str, ShardVariant]:
        return names_matching(value, r"[a-z0-9_]+", "variant names are stage-name suffixes")

    def reframer(self, variant: str) -> str:
        """The endpoint that reframes and refines for ``variant``."""
        return self.variants[variant].reframer or self.target

    def answer_stage(self, variant: str) -> str:
        """The stage holding the O1 that ``variant`` refines: ``shard_answer`` (the target's), or
        ``shard_answer_<v>`` for a teacher that refines its own drafts."""
        if self.variants[variant].draft == "own" and self.reframer(variant) != self.target:
            return f"{ANSWER}_{variant}"
        return ANSWER

    def row_stages(self) -> list[str]:
        """Its stages whose rows later stages read, in run order (the rules stage's rows are categories)."""
        names = ["shard_split", "shard_answer"]
        for v in self.variants:
            names += [self.answer_stage(v)] if self.answer_stage(v) != ANSWER else []
            names += [f"shard_{step}_{v}" for step in ("reframe", "refine", "judge", "select")]
        return names

log = logging.getLogger(__name__)

SPLIT, ANSWER = "shard_split", "shard_answer"
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
    "judge_model": pa.string(),
    "helpfulness": pa.string(),         # O2's win / tie / loss against O1
    "harmfulness": pa.string(),
    "judgements": pa.list_(JUDGEMENT),
}
_KEY = "text_key"
_RETRY_COLUMNS = {"retry_problem": pa.string(), "retry_previous": pa.string()}
RULES_COLUMNS = {"examples": pa.list_(pa.string()), "rules": pa.string(), "rules_model": pa.string()}
#: the position-bias check's report in a judge stage's folder
POSITION_CHECK = "position_check.json"


def _llm_fields(row: dict[str, Any]) -> tuple[str, str]:
    """Pop the LLM columns off a row; return (answer, error)."""
    answer, error = row.pop("llm_output"), row.pop("llm_error")
    for name in LLM_COLUMNS:
        row.pop(name, None)
    return answer, error


def _failed(row: dict[str, Any], error: str) -> dict[str, Any]:
    return {**row, "status": ERROR, "reason": classify_llm_error(error), "detail": error_detail(error)}


def take_answer(batch: pa.Table, *, into: str, model_field: str, model: str,
                extra: dict[str, pa.DataType] | None = None, fields: dict[str, Any] | None = None) -> pa.Table:
    """Free-text answers -> column ``into`` (``<think>`` blocks removed), the model in
    ``model_field`` and ``fields`` set on every row; failed requests and empty answers become
    ``error`` rows (``prompt_too_long`` / ``inference_error`` / ``empty_output``). The output has the
    SHARD schema plus ``extra``."""
    out = []
    for row in batch.to_pylist():
        answer, error = _llm_fields(row)
        row.update(fields or {})
        row[model_field] = model
        if error:
            out.append(_failed(row, error))
            continue
        text = strip_thinking(answer)
        if not text:
            out.append({**row, into: "", "status": ERROR, "reason": "empty_output",
                        "detail": error_detail(f"no answer text in {answer!r}")})
        else:
            out.append({**row, into: text, "status": OK, "reason": "", "detail": ""})
    return to_table(out, {**SHARD_COLUMNS, **(extra or {})})


def answer_messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    """The plain chat O1 is written under, and the evaluated systems answer under (and SFT trains)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class AnswerMessages:
    def __init__(self, system: str | None):
        self.system = system

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return answer_messages(self.system, row["text"])


# ------------------------------------------------------------------------------------------------
# shard_split


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

    def __init__(self, config: ShardConfig, seed: int):
        super().__init__(config)
        self.inputs = tuple(config.inputs)
        self.seed = seed

    def hash_payload(self) -> Any:
        return {"inputs": list(self.config.inputs), "splits": self.config.splits.model_dump(), "seed": self.seed}

    def build(self, inputs: dict) -> Any:
        shares = self.config.splits.model_dump()
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


# ------------------------------------------------------------------------------------------------
# shard_answer


class ShardAnswerStage(Stage):
    """O1: the target's own answer to P1 (``shard_answer``), or a teacher's (``shard_answer_<v>``)."""

    name = ANSWER
    inputs = (SPLIT,)

    def __init__(self, config: ShardConfig, endpoint: LLMEndpoint, name: str = ANSWER):
        super().__init__(config)
        self.name = name
        self.endpoint = endpoint

    def hash_payload(self) -> Any:
        return {"system": self.config.system, "endpoint": semantic_dump(self.endpoint)}

    def build(self, inputs: dict) -> Any:
        return chat(inputs[SPLIT], self.endpoint, AnswerMessages(self.config.system)).map_batches(
            take_answer, batch_format="pyarrow",
            fn_kwargs={"into": "baseline", "model_field": "baseline_model", "model": self.endpoint.model})


# ------------------------------------------------------------------------------------------------
# shard_rules_<v>


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


RULES = "shard_rules"


class ShardRulesStage(Stage):
    """Category-specific rules: one LLM request per harm category of ``shard_split``, once per run for
    every variant; rows are categories (``text``) with their ``rules``."""

    name = RULES
    requires = (SPLIT,)

    def __init__(self, config: ShardConfig, endpoint: LLMEndpoint, seed: int):
        super().__init__(config)
        self.endpoint = endpoint
        self.seed = seed
        self.prompt = ChatPrompt(config.rules_template)
        self.guidelines = load_guidelines(config.guidelines)
        self._categories = 0

    def hash_payload(self) -> Any:
        return {"endpoint": semantic_dump(self.endpoint), "template_digest": self.prompt.digest,
                "guidelines_digest": self.guidelines.digest, "examples": self.config.rules_examples,
                "seed": self.seed}

    def expected_rows_in(self) -> int:
        return self._categories

    def write(self, inputs: dict, rundir: RunDir) -> None:
        import ray

        examples = category_examples(rundir, SPLIT, self.seed, self.config.rules_examples)
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


# ------------------------------------------------------------------------------------------------
# shard_reframe_<v>


def plan_reframing(batch: pa.Table, *, variant: str, mode: str, model: str, categories: frozenset | None) -> pa.Table:
    """Mark the rows with the variant; under ``full`` guidelines a row whose category has no rules
    (its rules request failed) is an ``error`` (``missing_category_rules``)."""
    out = []
    for row in batch.to_pylist():
        row.update(variant=variant, guidelines=mode, reframer_model=model, status=OK, reason="", detail="")
        category = category_name(row["harm_category"])
        if categories is not None and category not in categories:
            row.update(status=ERROR, reason="missing_category_rules",
                       detail=f"no rules for category {category!r} (see {RULES})")
        out.append(row)
    return to_table(out, {**SHARD_COLUMNS, **_RETRY_COLUMNS})


class RenderReframing:
    def __init__(self, prompt: ChatPrompt, mode: str, guidelines, rules: dict[str, str]):
        self.prompt = prompt
        self.mode = mode
        self.guidelines = guidelines
        self.rules = rules

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        category = category_name(row["harm_category"])
        return self.prompt.render({"text": row["text"], "category": category,
                                   **guidance(self.mode, self.guidelines, self.rules.get(category, "")),
                                   "retry": bool(row["retry_problem"]), "problem": row["retry_problem"],
                                   "previous_answer": row["retry_previous"]})


def read_reframings(batch: pa.Table, *, last: bool) -> pa.Table:
    """Reframing answers -> P2 columns (``ok``), a retry (status ``retry`` with the problem), or
    after the last attempt an ``error`` with the problem's reason and every answer."""
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
            if last:
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
        super().__init__(config)
        self.inputs = (config.answer_stage(variant),)  # the O1 this variant refines
        self.variant = variant
        self.mode = config.variants[variant].guidelines
        self.name = f"shard_reframe_{variant}"
        self.rules_stage = RULES
        self.requires = (self.rules_stage,) if self.mode == "full" else ()
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.reframe_template)
        self.guidelines = load_guidelines(config.guidelines)

    def hash_payload(self) -> Any:
        c = self.config
        return {"endpoint": semantic_dump(self.endpoint), "template_digest": self.prompt.digest,
                "guidelines_digest": self.guidelines.digest, "mode": self.mode, "retries": c.retries,
                "constrained": c.constrained, "max_field_chars": c.max_field_chars}

    def constraint(self) -> dict | None:
        return {"json": reframing_schema(self.config.max_field_chars)} if self.config.constrained else None

    def write(self, inputs: dict, rundir: RunDir) -> None:
        rules = load_rules(rundir, self.rules_stage) if self.mode == "full" else {}
        rows = inputs[self.inputs[0]].map_batches(plan_reframing, batch_format="pyarrow", fn_kwargs={
            "variant": self.variant, "mode": self.mode, "model": self.endpoint.model,
            "categories": frozenset(rules) if self.mode == "full" else None})
        finished = [rows.filter(expr=col("status") != OK)]
        pending = rows.filter(expr=col("status") == OK)
        render = RenderReframing(self.prompt, self.mode, self.guidelines, rules)
        finished += ask_until_valid(self, rundir, pending, endpoint=self.endpoint, render=render,
                                    constraint=self.constraint(), read=read_reframings, read_kwargs={},
                                    retries=self.config.retries)
        union_all(finished).map_batches(_drop_retry_columns, batch_format="pyarrow") \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        import pyarrow.compute as pc

        modes, retried = Counter(), 0
        for batch in rundir.iter_batches(self.name, OK, ["response_mode", "reframe_answers"]):
            modes.update(batch.column("response_mode").to_pylist())
            retried += pc.sum(pc.greater(pc.list_value_length(batch.column("reframe_answers")), 1)).as_py() or 0
        return {"response_modes": dict(sorted(modes.items())), "answered_after_retry": retried}


# ------------------------------------------------------------------------------------------------
# shard_refine_<v>


class ShardRefineStage(Stage):
    """O2: the reframer's refinement of O1 given P1 and P2."""

    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        super().__init__(config)
        self.name = f"shard_refine_{variant}"
        self.inputs = (f"shard_reframe_{variant}",)
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.refine_template)

    def hash_payload(self) -> Any:
        return {"endpoint": semantic_dump(self.endpoint), "template_digest": self.prompt.digest}

    def build(self, inputs: dict) -> Any:
        # what SHARD's refiner sees: P1, the reframed request and O1
        render = RenderFields(self.prompt, ("text", "reformulated_prompt", "baseline"))
        return chat(inputs[self.inputs[0]], self.endpoint, render).map_batches(
            take_answer, batch_format="pyarrow",
            fn_kwargs={"into": "completion", "model_field": "reframer_model", "model": self.endpoint.model})


class RenderFields:
    """Row -> messages, with only ``fields`` of the row as template variables."""

    def __init__(self, prompt: ChatPrompt, fields: tuple[str, ...]):
        self.prompt = prompt
        self.fields = fields

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({f: row[f] for f in self.fields})


# ------------------------------------------------------------------------------------------------
# shard_judge_<v>


def finish_comparison(group: pa.Table, *, model: str) -> pa.Table:
    """One row's two judgements (a ``groupby(id)`` group) -> the row with its outcomes."""
    requests = group.to_pylist()
    verdict = combine_judgements(requests)
    row = {k: v for k, v in requests[0].items() if k not in JUDGED_COLUMNS}
    row.update(judge_model=model, helpfulness=verdict[HELPFULNESS], harmfulness=verdict[HARMFULNESS],
               judgements=verdict["judgements"], status=ERROR if verdict["reason"] else OK,
               reason=verdict["reason"], detail=error_detail(verdict["detail"]))
    return to_table([row], SHARD_COLUMNS)


def judge_prompts(config: ShardConfig) -> dict[str, ChatPrompt]:
    return {HELPFULNESS: ChatPrompt(config.helpfulness_template),
            HARMFULNESS: ChatPrompt(config.harmfulness_template)}


def judge_constraint(config: ShardConfig) -> dict | None:
    return {"regex": verdict_pattern(config.explanation_chars)} if config.constrained else None


def outcome_summary(rundir: RunDir, stage: str, by: str = "split") -> dict[str, Any]:
    """Win / tie / loss of the candidate per value of ``by``, for both criteria (manifest summaries)."""
    outcomes: dict[str, dict[str, list[str]]] = {}
    for batch in rundir.iter_batches(stage, OK, [by, HELPFULNESS, HARMFULNESS]):
        for key, help_, harm in zip(*(batch.column(c).to_pylist() for c in (by, HELPFULNESS, HARMFULNESS))):
            per = outcomes.setdefault(key, {HELPFULNESS: [], HARMFULNESS: []})
            per[HELPFULNESS].append(help_)
            per[HARMFULNESS].append(harm)
    short = ("n", *OUTCOMES, "win_rate", "win_rate_ci", "binomial_p")
    return {key: {c: {k: v for k, v in win_tie_loss(values).items() if k in short} for c, values in per.items()}
            for key, per in sorted(outcomes.items())}


class ShardJudgeStage(Stage):
    """O2 (candidate) against O1 (reference), both criteria."""

    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        super().__init__(config)
        self.variant = variant
        self.name = f"shard_judge_{variant}"
        self.inputs = (f"shard_refine_{variant}",)
        self.endpoint = endpoint
        self.prompts = judge_prompts(config)

    def hash_payload(self) -> Any:
        c = self.config
        payload = {"endpoint": semantic_dump(self.endpoint), "order_seed": c.order_seed,
                   "templates": {k: p.digest for k, p in self.prompts.items()}, "constrained": c.constrained,
                   "explanation_chars": c.explanation_chars}
        return {**payload, "position_check": c.position_check} if c.position_check else payload

    def build(self, inputs: dict) -> Any:
        rows = inputs[self.inputs[0]]
        judged = judge(rows, self.endpoint, self.prompts, judge_constraint(self.config),
                       seed=self.config.order_seed, key=self.variant, candidate="completion", reference="baseline")
        return judged.groupby("id", num_partitions=shuffle_partitions(2 * rows.count())).map_groups(
            finish_comparison, batch_format="pyarrow", fn_kwargs={"model": self.endpoint.model})

    def write(self, inputs: dict, rundir: RunDir) -> None:
        super().write(inputs, rundir)
        if self.config.position_check:
            report = self.position_check(rundir)
            rundir.write_text(f"{self.name}/{POSITION_CHECK}", json.dumps(report, indent=2))

    def position_check(self, rundir: RunDir) -> dict[str, Any]:
        """The judged rows with the ``position_check`` smallest seeded hash ranks, judged again with the
        answers swapped; their outcomes against the first judgements (:func:`position_bias`)."""
        import ray

        first = {}
        for batch in rundir.iter_batches(self.name, OK, ["id", "judgements"]):
            for rid, judgements in zip(batch.column("id").to_pylist(), batch.column("judgements").to_pylist()):
                first[rid] = {j["criterion"]: j for j in judgements}
        sample = set(sorted(first, key=lambda rid: hash_rank(self.config.order_seed, rid))[:self.config.position_check])
        if not sample:
            return {"rows": 0, **position_bias([])}
        rows = ray.data.read_parquet(rundir.partition_uri(self.name, OK), partitioning=None) \
            .filter(expr=col("id").is_in(sorted(sample))).drop_columns(["judgements"])
        swapped = judge(rows, self.endpoint, self.prompts, judge_constraint(self.config), seed=self.config.order_seed,
                        key=self.variant, candidate="completion", reference="baseline", swap=True)
        checks = [Recheck(r["criterion"], first[r["id"]][r["criterion"]]["outcome"], r["outcome"],
                          first[r["id"]][r["criterion"]]["verdict"], r["verdict"])
                  for batch in swapped.iter_batches(batch_format="pyarrow")
                  for r in batch.select(["id", "criterion", "outcome", "verdict"]).to_pylist()]
        return {"rows": len(sample), **position_bias(checks)}

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        """The inference-time result: O2 against O1 per split (the test split is SHARD's
        inference-time comparison), and the position-bias check when it ran."""
        check = rundir.read_text(f"{self.name}/{POSITION_CHECK}")
        return {"o2_vs_o1_by_split": outcome_summary(rundir, self.name),
                "position_check": json.loads(check) if check else None}


# ------------------------------------------------------------------------------------------------
# shard_select_<v>


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
        super().__init__(config)
        self.name = f"shard_select_{variant}"
        self.inputs = (f"shard_judge_{variant}",)

    def hash_payload(self) -> Any:
        return {"rule": self.config.select}

    def build(self, inputs: dict) -> Any:
        return inputs[self.inputs[0]].map_batches(apply_selection, batch_format="pyarrow",
                                                  fn_kwargs={"rule": self.config.select})

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        splits = rundir.column_values(self.name, OK, "split")
        judged = [(h, m, s) for status in (OK, DROPPED) for h, m, s in zip(
            *(rundir.column_values(self.name, status, c) for c in (HELPFULNESS, HARMFULNESS, "split")))]
        return {"rule": self.config.select, "kept_per_split": {s: splits.count(s) for s in sorted(set(splits))},
                # what each rule keeps of the same judgements, per split
                "kept_by_rule": {rule: dict(sorted(Counter(s for h, m, s in judged if select(h, m, rule)[0]).items()))
                                 for rule in SELECTION_RULES}}


# ------------------------------------------------------------------------------------------------


def rewriting_endpoint(config: ShardConfig, endpoint: LLMEndpoint) -> LLMEndpoint:
    """The reframer's endpoint at ``rewrite_temperature`` (reframing and refinement sample cooler than
    the answers, as in SHARD)."""
    if config.rewrite_temperature is None:
        return endpoint
    sampling = endpoint.sampling.model_copy(update={"temperature": config.rewrite_temperature})
    return endpoint.model_copy(update={"sampling": sampling})


def shard_stages(recipe: Any, config: ShardConfig) -> list[Stage]:
    """The data stages of ``stages.shard``, in run order (before ``sft_<key>``)."""
    models = recipe.models
    stages: list[Stage] = [ShardSplitStage(config, recipe.seed),
                           ShardAnswerStage(config, models[config.target])]
    if any(v.guidelines == "full" for v in config.variants.values()):
        stages.append(ShardRulesStage(config, models[config.rules_writer or config.target], recipe.seed))
    for variant in config.variants:
        reframer = models[config.reframer(variant)]
        if config.answer_stage(variant) != ANSWER:  # a teacher writes its own O1 first
            stages.append(ShardAnswerStage(config, reframer, config.answer_stage(variant)))
        rewriter = rewriting_endpoint(config, reframer)
        stages += [ShardReframeStage(config, variant, rewriter), ShardRefineStage(config, variant, rewriter),
                   ShardJudgeStage(config, variant, models[config.judge]), ShardSelectStage(config, variant)]
    return stages


def check_shard(shard: ShardConfig, refs: References) -> dict[str, str | None]:
    """SHARD references: inputs that run before it, and the same system prompt for SFT on its rows as
    for the answers it compares (and not on the split that shard_eval evaluates). Returns the
    endpoints it names."""
    refs.check_inputs("stages.shard.inputs", shard.inputs, refs.before("shard_split"))
    models = {"stages.shard.target": shard.target, "stages.shard.judge": shard.judge,
              "stages.shard.rules_writer": shard.rules_writer}
    models.update({f"stages.shard.variants.{v}.reframer": c.reframer for v, c in shard.variants.items()})
    selected = {f"shard_select_{v}" for v in shard.variants}
    evaluation = refs.recipe.stages.shard_eval
    evaluated = evaluation.split if evaluation is not None else None
    for key, sft in refs.recipe.stages.sft.items():
        if not selected & set(sft.inputs):
            continue
        if sft.system != shard.system:
            raise ValueError(f"stages.sft.{key}.system: {sft.system!r} differs from stages.shard.system "
                             f"{shard.system!r}; the model is trained and evaluated with the prompt "
                             "its baseline answers were written under")
        if evaluated is not None and sft.split in (None, evaluated):
            raise ValueError(f"stages.sft.{key}.split: {sft.split!r} trains on the split that "
                             f"stages.shard_eval evaluates ({evaluated!r}); use split: train")
    return models


# SHARD data: after the seeds it reads, before sft_<key> trains on it
register("shard", config=ShardConfig, after="assemble", provides="rows", names=lambda c: c.row_stages(),
         build=shard_stages, check=check_shard, description="SHARD data construction: stages shard_*")
