"""SHARD stage ``shard_judge_<v>``: O2 against O1, pairwise.

The judge compares O2 (candidate) with O1 (reference) for helpfulness and harmfulness, A/B
order drawn per comparison (:mod:`pipelines.shard.pairwise`): ``helpfulness`` / ``harmfulness`` are
O2's win / tie / loss; every judgement is kept in ``judgements``. The judge samples at
``judge_sampling`` (SHARD's construction judge: temperature 0.1) and its verdict is the ``verdict``
(first, SHARD's) ``[[X]]`` of its answer. With ``position_check: n``, n of them are judged again with
the answers swapped (``position_check.json``: the share that flips). For a reframed variant with
``relevance: true`` (SHARD's relevance judge, :mod:`pipelines.shard.relevance`) a first pass asks the
judge whether O2 serves P1 or P2 more (column ``relevance``: p1 / p2 / equal).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines.core.config import LLMEndpoint
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import ERROR, OK, error_detail, shuffle_partitions, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.splits import hash_rank
from pipelines.core.stage import Stage, col, run_pass
from pipelines.shard.config import REFRAME, ShardConfig, with_sampling
from pipelines.shard.pairwise import (
    HARMFULNESS,
    HELPFULNESS,
    JUDGED_COLUMNS,
    Recheck,
    combine_judgements,
    judge,
    position_bias,
    verdict_pattern,
)
from pipelines.shard.relevance import judge_relevance, relevance_counts, relevance_pattern
from pipelines.shard.rows import SHARD_COLUMNS
from pipelines.shard.stats import OUTCOMES, win_tie_loss

#: the position-bias check's report in a judge stage's folder
POSITION_CHECK = "position_check.json"


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


def relevance_summary(rundir: RunDir, stage: str, by: str = "split") -> dict[str, Any]:
    """The relevance verdicts per value of ``by`` and overall (:func:`relevance_counts`)."""
    values: dict[str, list[str]] = {}
    for batch in rundir.iter_batches(stage, OK, [by, "relevance"]):
        for key, verdict in zip(batch.column(by).to_pylist(), batch.column("relevance").to_pylist()):
            values.setdefault(key, []).append(verdict or "")
    return {"all": relevance_counts([v for vs in values.values() for v in vs]),
            f"by_{by}": {key: relevance_counts(vs) for key, vs in sorted(values.items())}}


class ShardJudgeStage(Stage):
    """O2 (candidate) against O1 (reference), both criteria; and, for a reframed variant, SHARD's
    relevance verdict."""

    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(name=f"shard_judge_{variant}", inputs=(config.o2_stage(variant),))
        self.variant = variant
        # SHARD judges relevance where there is a P2 (a reframed variant)
        self.relevance_prompt = (ChatPrompt(config.relevance_template)
                                 if config.relevance and config.method(variant) == REFRAME else None)
        self.relevance_constraint = ({"regex": relevance_pattern(config.explanation_chars)}
                                     if config.constrained and self.relevance_prompt is not None else None)
        p2 = {"reformulated_prompt"} if self.relevance_prompt is not None else set()
        self.reads = frozenset({"id", "text", "completion", "baseline", *p2})  # P1, O2 against O1 (and P2)
        self.writes = PASSTHROUGH | {"judge_model", HELPFULNESS, HARMFULNESS, "judgements",
                                     *({"relevance", "relevance_raw"} if p2 else ())}
        self.endpoint = with_sampling(endpoint, config.judge_sampling)  # SHARD's construction judge: 0.1
        self.prompts = judge_prompts(config)
        self.verdict_constraint = judge_constraint(config)
        self.verdict_pick = config.verdict
        self.order_seed = config.order_seed
        self.position_sample = config.position_check  # rows judged again with the answers swapped

    def build(self, inputs: dict) -> Any:
        rows = inputs[self.inputs[0]]
        judged = judge(rows, self.endpoint, self.prompts, self.verdict_constraint, seed=self.order_seed,
                       key=self.variant, candidate="completion", reference="baseline", pick=self.verdict_pick)
        return judged.groupby("id", num_partitions=shuffle_partitions(2 * rows.count())).map_groups(
            finish_comparison, batch_format="pyarrow", fn_kwargs={"model": self.endpoint.model})

    def write(self, inputs: dict, rundir: RunDir) -> None:
        if self.relevance_prompt is not None:  # a pass of its own before the pairwise judgements
            rows = inputs[self.inputs[0]]
            relevance = run_pass(self, rundir, "relevance", lambda: judge_relevance(
                rows, self.endpoint, self.relevance_prompt, self.relevance_constraint))
            inputs = {**inputs, self.inputs[0]: relevance if relevance is not None else rows}
        super().write(inputs, rundir)
        if self.position_sample:
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
        sample = set(sorted(first,
                            key=lambda rid: hash_rank(self.order_seed, rid))[:self.position_sample])
        if not sample:
            return {"rows": 0, **position_bias([])}
        rows = ray.data.read_parquet(rundir.partition_uri(self.name, OK), partitioning=None) \
            .filter(expr=col("id").is_in(sorted(sample))).drop_columns(["judgements"])
        swapped = judge(rows, self.endpoint, self.prompts, self.verdict_constraint, seed=self.order_seed,
                        key=self.variant, candidate="completion", reference="baseline", swap=True,
                        pick=self.verdict_pick)
        checks = [Recheck(r["criterion"], first[r["id"]][r["criterion"]]["outcome"], r["outcome"],
                          first[r["id"]][r["criterion"]]["verdict"], r["verdict"])
                  for batch in swapped.iter_batches(batch_format="pyarrow")
                  for r in batch.select(["id", "criterion", "outcome", "verdict"]).to_pylist()]
        return {"rows": len(sample), **position_bias(checks)}

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        """The inference-time result: O2 against O1 per dataset over every prompt (SHARD's inference-time
        comparison), per split, SHARD's relevance verdicts (reframed variants), and the position-bias
        check when it ran."""
        check = rundir.read_text(f"{self.name}/{POSITION_CHECK}")
        return {"o2_vs_o1_by_dataset": outcome_summary(rundir, self.name, "dataset"),
                "o2_vs_o1_by_split": outcome_summary(rundir, self.name),
                "relevance": relevance_summary(rundir, self.name) if self.relevance_prompt is not None else None,
                "position_check": json.loads(check) if check else None}
