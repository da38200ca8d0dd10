"""Label calibration: a jury of LLMs votes, an adjudicator settles ties and names the micro category
(CHILLGuard §3.2 "multi-model voting", Appendix C.3).

Two stages:

- ``jury``: every judge endpoint (its own ``ray.data.llm`` processor, concurrency and batch size)
  answers safe/unsafe for every row. ``mode: concurrent`` chains the judges' processors in one
  streaming pass, so all their actor pools run at once; ``mode: sequential`` runs one judge after
  another, each pass written to the stage's scratch folder (a crash resumes after the last finished
  judge). Both give the same votes. Output rows keep every vote (judge, model, raw answer, parsed
  verdict), the source label, and the majority label where there is one (:func:`decide`: at least
  ``min_valid_votes`` valid votes, then a strict majority of them).
- ``adjudicate``: rows without a majority (a tie, or fewer valid votes than the quorum) get the
  adjudicator's label;
  every row whose label is unsafe gets the adjudicator's micro category (one of the 31 codes). An
  unusable answer is asked again ``retries`` times with the reason, then the row goes to ``errors``.
  Writes the agreement report (``agreement.json`` / ``agreement.md``) beside its rows.

Constrained answers: on endpoints that accept vLLM structured outputs, judges may only answer a
verdict word and the adjudicator a verdict and a valid code (``constrained: true``, the default).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from actors.llm import LLM_COLUMNS, chat
from actors.reask import RETRY, ask_until_valid
from pipelines.core.answers import read_answer_stats
from pipelines.core.config import ADDED, CONFIGS, OPERATIONAL, ExistingPath, LLMEndpoint, Strict
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.parsing import classify_llm_error
from pipelines.core.prompts import ChatPrompt, RenderRow
from pipelines.core.registry import References, register
from pipelines.core.rows import (
    ERROR,
    LINEAGE,
    OK,
    SAFE,
    UNSAFE,
    common_rows,
    error_detail,
    to_table,
    union_all,
)
from pipelines.core.rundir import RunDir
from pipelines.core.stage import ANSWERS, Stage, col, engine_gpus, run_pass
from pipelines.core.taxonomy import categories_block, load_taxonomy
from pipelines.labelling.voting import (
    ADJUDICATED,
    MAJORITY,
    VERDICT_CHOICES,
    AgreementReport,
    agreement_markdown,
    decide,
    parse_adjudication,
    parse_verdict,
    settled_label,
    strict_majority,
    votes_before_settling,
)


class JuryConfig(Strict):
    """Label calibration, part 1: every judge votes safe/unsafe on every row."""

    inputs: list[str] = Field(min_length=1, description="row stages to label (e.g. near_dedup)")
    judges: list[str] = Field(min_length=1, description="endpoints under `models:`, one per judge")
    mode: Literal["concurrent", "sequential"] = Field(
        "concurrent", description="concurrent: all judges' actor pools in one streaming pass "
        "(needs a GPU per judge replica at once); sequential: one judge after another (scarce GPUs); "
        "both give the same votes", json_schema_extra=OPERATIONAL)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "judge.yaml"), validate_default=True)
    templates: dict[str, ExistingPath] = Field(
        default_factory=dict, description="a judge's own prompt file instead of template (judge name -> "
        "file): judges that share one model differ by their instructions", json_schema_extra=ADDED)
    constrained: bool = Field(
        True, description="restrict answers to the verdict words on endpoints that accept "
        "structured outputs (fewer abstentions); false lets judges answer freely")
    cascade: bool = Field(
        False, description="ask the judges in their listed order and stop asking a row once the votes "
        "still to come cannot change its label (rows that may need the adjudicator get every vote): "
        "the same labels, votes and adjudications as the full jury, fewer calls. concurrent mode asks "
        "the first judges every row needs at once, then each later judge the rows still open")
    min_valid_votes: int | None = Field(
        None, ge=1, description="quorum: a row with fewer valid votes (abstentions and failed requests "
        "do not count) goes to the adjudicator instead of its majority. Default: a strict majority of "
        "the judges (3 of 4)")

    @field_validator("judges")
    @classmethod
    def _unique_judges(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"judges must be distinct endpoints, got {value}")
        return value

    @field_validator("templates")
    @classmethod
    def _templates_name_judges(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        judges = info.data.get("judges")
        if judges is not None and (unknown := sorted(set(value) - set(judges))):
            raise ValueError(f"templates name {unknown}, which are not judges ({judges})")
        return value

    @field_validator("min_valid_votes")
    @classmethod
    def _quorum_fits_the_jury(cls, value: int | None, info: ValidationInfo) -> int | None:
        judges = info.data.get("judges")  # absent when judges itself is invalid
        if value is not None and judges is not None and value > len(judges):
            raise ValueError(f"{value} valid votes can never be reached with {len(judges)} judges "
                             f"(at most {len(judges)})")
        return value

    @property
    def quorum(self) -> int:
        """``min_valid_votes``, or a strict majority of the judges."""
        return strict_majority(len(self.judges)) if self.min_valid_votes is None else self.min_valid_votes


class AdjudicateConfig(Strict):
    """Label calibration, part 2: ties and rows without a valid vote get the adjudicator's label;
    every unsafe row gets its micro category from the adjudicator."""

    model: str = Field(description="endpoint under `models:` (DeepSeek-V3.2 over http in the paper)")
    inputs: list[str] = Field(default_factory=lambda: ["jury"], min_length=1)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "adjudicate.yaml"), validate_default=True)
    retries: int = Field(1, ge=0, description="re-asks after an unparseable answer or invalid code")
    constrained: bool = Field(True, description="restrict answers to a verdict and the 31 codes "
                              "on endpoints that accept structured outputs")

log = logging.getLogger(__name__)

VOTE = pa.struct([("judge", pa.string()), ("model", pa.string()), ("raw", pa.string()),
                  ("verdict", pa.string())])
#: columns the jury adds to the row schema
JURY_COLUMNS = {LINEAGE: pa.string(), "votes": pa.list_(VOTE), "source_label": pa.string(),
                "decision": pa.string()}
#: and the adjudicator
LABEL_COLUMNS = {**JURY_COLUMNS, "flipped": pa.bool_(), "source_micro": pa.string(),
                 "adjudicator": pa.string(), "adjudicator_answers": pa.list_(pa.string())}
#: new tokens a constrained answer may need: the longest (``不安全 A1``) is 12 bytes, and a byte-level
#: tokenizer may spend a token per byte. Fewer would cut "不安全" to "不" - an abstention.
CONSTRAINED_MIN_TOKENS = 16


def with_room_for_answer(endpoint: LLMEndpoint, constrained: bool) -> LLMEndpoint:
    """The endpoint with ``max_tokens`` raised to :data:`CONSTRAINED_MIN_TOKENS` when answers are
    constrained (a constrained answer stops by itself once complete)."""
    if not constrained or not endpoint.accepts_structured_outputs \
            or endpoint.sampling.max_tokens >= CONSTRAINED_MIN_TOKENS:
        return endpoint
    sampling = endpoint.sampling.model_copy(update={"max_tokens": CONSTRAINED_MIN_TOKENS})
    return endpoint.model_copy(update={"sampling": sampling})


# ------------------------------------------------------------------------------------------------
# Jury


def collect_vote(batch: pa.Table, *, index: int) -> pa.Table:
    """Keep judge ``index``'s raw answer (or request error) in ``_raw_<index>`` / ``_err_<index>``."""
    out = batch.drop_columns([c for c in LLM_COLUMNS if c in batch.column_names])
    return (out.append_column(f"_raw_{index}", batch.column("llm_output"))
            .append_column(f"_err_{index}", batch.column("llm_error")))


def not_asked(batch: pa.Table, *, indices: list[int]) -> pa.Table:
    """Rows the cascade settled before judges ``indices``: their answer columns are null (not asked)."""
    for i in indices:
        batch = (batch.append_column(f"_raw_{i}", pa.nulls(batch.num_rows, pa.string()))
                 .append_column(f"_err_{i}", pa.nulls(batch.num_rows, pa.string())))
    return batch


def _verdicts(row: dict, asked: int) -> list[str | None]:
    return [None if row[f"_err_{i}"] else parse_verdict(row[f"_raw_{i}"]) for i in range(asked)]


def mark_settled(batch: pa.Table, *, asked: int, judges: int, min_valid_votes: int) -> pa.Table:
    """``_settled``: whether the first ``asked`` judges' votes fix the row's label
    (:func:`~pipelines.labelling.voting.settled_label`)."""
    settled = [settled_label(_verdicts(row, asked), judges, min_valid_votes=min_valid_votes) is not None
               for row in batch.select([f"_{k}_{i}" for i in range(asked) for k in ("raw", "err")]).to_pylist()]
    batch = batch.drop_columns([c for c in ("_settled",) if c in batch.column_names])
    return batch.append_column("_settled", pa.array(settled, pa.bool_()))


def finish_votes(batch: pa.Table, *, judges: list[str], models: list[str], min_valid_votes: int) -> pa.Table:
    """Per row: the votes list (the judges asked: all, or with the cascade those before the row's
    label was settled), the majority label (``""`` when the adjudicator must decide)."""
    out = []
    for row in batch.to_pylist():
        votes = []
        row.pop("_settled", None)
        for i, (judge, model) in enumerate(zip(judges, models)):
            error = row.pop(f"_err_{i}")
            raw = row.pop(f"_raw_{i}")
            if raw is None and error is None:  # the cascade did not ask this judge
                continue
            verdict = None if error else parse_verdict(raw)
            votes.append({"judge": judge, "model": model, "raw": f"[request failed] {error}" if error else raw,
                          "verdict": verdict or ""})
        outcome = decide([v["verdict"] or None for v in votes], min_valid_votes=min_valid_votes)
        out.append({**row, "votes": votes, "source_label": row["label"], "label": outcome.label or "",
                    "decision": MAJORITY if outcome.label else "", "status": OK})
    return to_table(out, JURY_COLUMNS)


class JuryStage(Stage):
    name = "jury"
    reads = frozenset({"id", "text"})
    # the rows as they came, labelled by the majority (``""``: for the adjudicator), with every vote
    writes = PASSTHROUGH | frozenset(JURY_COLUMNS) | {"label"}

    def __init__(self, config: JuryConfig, endpoints: dict[str, LLMEndpoint], taxonomy_path: str, *,
                 name: str | None = None):
        super().__init__(config, name=name, inputs=config.inputs)
        self.endpoints = {judge: with_room_for_answer(endpoints[judge], config.constrained)
                          for judge in config.judges}
        self.prompts = {judge: ChatPrompt(config.templates.get(judge, config.template)) for judge in config.judges}
        self.categories = categories_block(load_taxonomy(taxonomy_path))
        # concurrent: one streaming pass writing a row per input row, so an interrupted run keeps what
        # it wrote; sequential (and the cascade) resume per finished judge pass instead (run_pass)
        self.resumable = config.mode == "concurrent" and not config.cascade

    def _vote(self, dataset, index: int, judge: str):
        constraint = {"choice": list(VERDICT_CHOICES)} if self.config.constrained else None
        render = RenderRow(self.prompts[judge], {"categories": self.categories})
        answers = chat(dataset, self.endpoints[judge], render, constraint, role=judge)
        return answers.map_batches(collect_vote, batch_format="pyarrow", fn_kwargs={"index": index})

    def _check_resources(self) -> None:
        """Concurrent judges hold their resources at once: each vLLM replica reserves its GPUs and
        one CPU (Ray Data's default for actors), and the rows' map tasks need a CPU beside them.
        Short of that the pools wait (for an autoscaler, or forever on a fixed cluster): say so."""
        from cluster.connect import require_resources

        replicas = [max(e.concurrency if isinstance(e.concurrency, tuple) else (e.concurrency,))
                    for e in self.endpoints.values() if e.engine == "vllm"]
        needed = {"GPU": sum(engine_gpus(e) for e in self.endpoints.values()), "CPU": sum(replicas) + 1}
        require_resources(needed, "jury mode concurrent (its vLLM judges)",
                          "set stages.jury.mode=sequential, or raise cluster.num_cpus / cluster.logical_gpus")

    def resources(self) -> dict[str, float]:
        """Concurrent judges hold all their engines at once; sequential ones one engine at a time."""
        gpus = [engine_gpus(e) for e in self.endpoints.values()]
        held = sum(gpus) if self.config.mode == "concurrent" else max(gpus, default=0)
        return {"GPU": held} if held else {}

    def write(self, inputs: dict, rundir: RunDir) -> None:
        rows = common_rows(inputs, self.inputs)
        judges = list(self.config.judges)
        if self.config.cascade:
            rows = self._cascade(rows, rundir)
        elif self.config.mode == "concurrent":
            self._check_resources()
            for index, judge in enumerate(judges):
                rows = self._vote(rows, index, judge)
        else:
            for index, judge in enumerate(judges):
                rows = run_pass(self, rundir, f"{index}-{judge}",
                                lambda rows=rows, index=index, judge=judge: self._vote(rows, index, judge))
        models = [self.endpoints[j].model for j in judges]
        rows.map_batches(finish_votes, batch_format="pyarrow",
                         fn_kwargs={"judges": judges, "models": models,
                                    "min_valid_votes": self.config.quorum}) \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def _cascade(self, rows, rundir: RunDir):
        """The judges in order, each asked only the rows whose label is still open
        (:func:`~pipelines.labelling.voting.settled_label`); every pass is a scratch pass. Concurrent
        mode asks the first :func:`~pipelines.labelling.voting.votes_before_settling` judges in one
        streaming pass (every row needs their votes; their pools run at once), sequential mode one
        judge per pass. Returns every row with an answer column per judge (null: not asked)."""
        judges, quorum = list(self.config.judges), self.config.quorum
        first = votes_before_settling(len(judges), min_valid_votes=quorum) if self.config.mode == "concurrent" else 1
        if self.config.mode == "concurrent":
            self._check_resources()

        def chained(rows, upto: int):
            for index in range(upto):
                rows = self._vote(rows, index, judges[index])
            return rows

        open_rows = run_pass(self, rundir, f"0-{first}-first", lambda: chained(rows, first))
        finished = []
        for index in range(first, len(judges)):
            if open_rows is None:
                break
            marked = open_rows.map_batches(mark_settled, batch_format="pyarrow", fn_kwargs={
                "asked": index, "judges": len(judges), "min_valid_votes": quorum})
            finished.append(marked.filter(expr=col("_settled")).map_batches(
                not_asked, batch_format="pyarrow", fn_kwargs={"indices": list(range(index, len(judges)))}))
            pending = marked.filter(expr=~col("_settled"))
            if pending.count() == 0:
                open_rows = None
                break
            open_rows = run_pass(self, rundir, f"{index}-{judges[index]}",
                                 lambda pending=pending, index=index: self._vote(pending, index, judges[index]))
        return union_all([*finished, *([open_rows] if open_rows is not None else [])])

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        labels = rundir.column_values(self.name, OK, "label")
        votes = rundir.column_values(self.name, OK, "votes")
        calls = Counter(v["judge"] for row in votes for v in row)
        answers = read_answer_stats(self.work_uri(rundir, ANSWERS)) or {}
        tokens = {j: {"prompt": answers.get(j, {}).get("prompt_tokens"),
                      "completion": answers.get(j, {}).get("output_tokens")} for j in self.config.judges}
        labelled = len(labels) - labels.count("")
        total = {k: sum(t[k] or 0 for t in tokens.values()) for k in ("prompt", "completion")}
        return {"majority_safe": labels.count(SAFE), "majority_unsafe": labels.count(UNSAFE),
                "to_adjudicator": labels.count(""),
                # what the labels cost: judge calls (the votes asked), and the engines' token counts
                "cost": {"cascade": self.config.cascade, "rows": len(labels),
                         "calls": {j: calls.get(j, 0) for j in self.config.judges},
                         "calls_per_row": sum(calls.values()) / len(labels) if labels else None,
                         "tokens": tokens,
                         "tokens_per_label": {k: v / labelled if labelled else None for k, v in total.items()}}}


# ------------------------------------------------------------------------------------------------
# Adjudication

DECIDE, CATEGORIZE, NONE = "decide", "categorize", "none"
_ADJ = {"adj_task": pa.string(), "adj_retry": pa.bool_(), "adj_previous": pa.string()}


class RenderAdjudication:
    """Row -> adjudicator messages (task, votes, and the unusable previous answer on a retry)."""

    def __init__(self, prompt: ChatPrompt, categories: str):
        self.prompt = prompt
        self.categories = categories

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        votes = [{"judge": v["judge"], "verdict": v["verdict"]} for v in row["votes"]]
        return self.prompt.render({"text": row["text"], "task": row["adj_task"], "votes": votes,
                                   "retry": bool(row["adj_retry"]), "previous_answer": row["adj_previous"],
                                   "categories": self.categories})


class AdjudicationConstraint:
    """Per row: a verdict, with a valid code when unsafe (decide), or a valid code alone
    (categorize)."""

    def __init__(self, codes: list[str]):
        self.codes = "|".join(codes)

    def __call__(self, row: dict[str, Any]) -> dict[str, str]:
        if row["adj_task"] == DECIDE:
            return {"regex": f"(安全|safe|(不安全|unsafe) ({self.codes}))"}
        return {"regex": f"({self.codes})"}


def plan_adjudication(batch: pa.Table) -> pa.Table:
    """``adj_task``: decide (no majority), categorize (majority unsafe) or none (majority safe)."""
    labels = batch.column("label").to_pylist()
    tasks = [DECIDE if not lab else (CATEGORIZE if lab == UNSAFE else NONE) for lab in labels]
    return (batch.append_column("adj_task", pa.array(tasks, pa.string()))
            .append_column("adj_retry", pa.array([False] * len(tasks), pa.bool_()))
            .append_column("adj_previous", pa.array([""] * len(tasks), pa.string())))


def _final(row: dict, *, label: str, micro: str, decision: str, adjudicator: str) -> dict:
    micro_fields = {"micro": micro, "macro": micro[0]} if micro else {}
    return {**row, **micro_fields, "label": label, "decision": decision, "adjudicator": adjudicator,
            "source_micro": row["micro"],
            "flipped": row["source_label"] in (SAFE, UNSAFE) and row["source_label"] != label}


def finish_majority(batch: pa.Table) -> pa.Table:
    """Rows the jury settled as safe: final as they are, ``ok`` (the jury's rows come without their
    status: it is the partition they were read from)."""
    rows = [{**_final(r, label=r["label"], micro="", decision=MAJORITY, adjudicator=""), "status": OK}
            for r in batch.to_pylist()]
    return to_table(rows, {**LABEL_COLUMNS, **_ADJ})


def read_adjudications(batch: pa.Table, *, codes: list[str], model: str, last: bool) -> pa.Table:
    """Adjudicator answers -> final rows, rows to ask again (status ``retry``), or error rows."""
    out = []
    for row in batch.to_pylist():
        answer, error = row.pop("llm_output"), row.pop("llm_error")
        for name in ("llm_prompt_tokens", "llm_output_tokens"):
            row.pop(name, None)
        answers = [*(row.get("adjudicator_answers") or []), f"[request failed] {error}" if error else answer]
        row = {**row, "adjudicator_answers": answers, "adjudicator": model}
        if error:
            out.append({**row, "status": ERROR, "reason": classify_llm_error(error),
                        "detail": error_detail(error)})
            continue
        task = row["adj_task"]
        result = parse_adjudication(answer, need_label=task == DECIDE, codes=codes)
        if not result.problem:
            decision = ADJUDICATED if task == DECIDE else MAJORITY
            out.append({**_final(row, label=result.label, micro=result.micro or "", decision=decision,
                                 adjudicator=model), "status": OK})
        elif last:
            out.append({**row, "status": ERROR, "reason": result.problem,
                        "detail": error_detail(f"answers: {json.dumps(answers, ensure_ascii=False)}")})
        else:
            out.append({**row, "status": RETRY, "adj_retry": True, "adj_previous": answer[:300]})
    return to_table(out, {**LABEL_COLUMNS, **_ADJ})


def _drop_adj(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in _ADJ if c in batch.column_names])


class AdjudicateStage(Stage):
    name = "adjudicate"
    # the jury's rows: its majority label, the votes, the label the rows came with
    reads = frozenset({"id", "text", "label", "votes", "source_label"})
    writes = PASSTHROUGH | frozenset(LABEL_COLUMNS) | {"label", "macro", "micro"}

    def __init__(self, config: AdjudicateConfig, endpoint: LLMEndpoint, taxonomy_path: str, *,
                 min_valid_votes: int | None = None, name: str | None = None):
        super().__init__(config, name=name, inputs=config.inputs)
        self.min_valid_votes = min_valid_votes  # the jury's quorum, for the agreement report
        self.endpoint = with_room_for_answer(endpoint, config.constrained)
        self.prompt = ChatPrompt(config.template)
        taxonomy = load_taxonomy(taxonomy_path)
        self.codes = list(taxonomy.micro_codes)
        self.categories = categories_block(taxonomy)

    def constraint(self) -> AdjudicationConstraint | None:
        return AdjudicationConstraint(self.codes) if self.config.constrained else None

    def write(self, inputs: dict, rundir: RunDir) -> None:
        # inputs without the jury's votes are refused before Ray starts (reads: the column contract)
        rows = union_all([inputs[name] for name in self.inputs]) \
            .map_batches(plan_adjudication, batch_format="pyarrow")
        finished = [rows.filter(expr=col("adj_task") == NONE).map_batches(finish_majority,
                                                                              batch_format="pyarrow")]
        pending = rows.filter(expr=col("adj_task") != NONE)
        render = RenderAdjudication(self.prompt, self.categories)
        finished += ask_until_valid(self, rundir, pending, endpoint=self.endpoint, render=render,
                                    constraint=self.constraint(), read=read_adjudications,
                                    read_kwargs={"codes": self.codes, "model": self.endpoint.model},
                                    retries=self.config.retries)
        final = union_all(finished)
        final.map_batches(_drop_adj, batch_format="pyarrow") \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])
        report = self.agreement(rundir)
        rundir.write_text(f"{self.name}/agreement.json", json.dumps(report, indent=2, ensure_ascii=False))
        rundir.write_text(f"{self.name}/agreement.md", agreement_markdown(report))

    def agreement(self, rundir: RunDir) -> dict:
        report = None
        columns = ["label", "votes", "decision", "source", "macro", "source_label"]
        for batch in rundir.iter_batches(self.name, OK, columns):
            for row in batch.to_pylist():
                if report is None:
                    report = AgreementReport([v["judge"] for v in row["votes"]],
                                             min_valid_votes=self.min_valid_votes)
                report.add(label=row["label"], votes={v["judge"]: v["verdict"] or None for v in row["votes"]},
                           decision=row["decision"], source=row["source"], macro=row["macro"],
                           source_label=row["source_label"])
        return (report or AgreementReport([])).result()

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        report = json.loads(rundir.read_text(f"{self.name}/agreement.json") or "{}")
        labels = rundir.column_values(self.name, OK, "label")
        return {"safe": labels.count(SAFE), "unsafe": labels.count(UNSAFE),
                "fleiss_kappa": report.get("fleiss_kappa"), "tie_rate": report.get("tie_rate"),
                "adjudication_rate": report.get("adjudication_rate"), "ties": report.get("ties"),
                "adjudicated": report.get("adjudicated"),
                # votes per judge: what the dashboard shows (pipelines/core/observability.py)
                "judges": {j: {"valid_votes": v["valid_votes"], "abstentions": v["abstentions"]}
                           for j, v in report.get("judges", {}).items()}}


def _check_jury(config: JuryConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.jury.inputs", config.inputs)
    return {f"stages.jury.judges[{i}]": m for i, m in enumerate(config.judges)}


def _check_adjudicate(config: AdjudicateConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.adjudicate.inputs", config.inputs)
    return {"stages.adjudicate.model": config.model}


register("jury", config=JuryConfig, provides="rows", check=_check_jury,
         build=lambda recipe, config: [JuryStage(config, recipe.models, recipe.taxonomy)])
register("adjudicate", config=AdjudicateConfig, needs=("jury",), provides="rows",
         check=_check_adjudicate,
         build=lambda recipe, config: [AdjudicateStage(config, recipe.models[config.model], recipe.taxonomy,
                                                       min_valid_votes=recipe.stages.jury.quorum)])
