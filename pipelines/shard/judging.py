"""SHARD stage ``shard_judge_<v>``: O2 against O1, pairwise.

The judge compares O2 (candidate) with O1 (reference) for helpfulness and harmfulness, A/B
order drawn per comparison (:mod:`pipelines.shard.pairwise`): ``helpfulness`` / ``harmfulness`` are
O2's win / tie / loss; every judgement is kept in ``judgements``. The judge samples at
``judge_sampling`` (SHARD's construction judge: temperature 0.1) and its verdict is the ``verdict``
(first, SHARD's) ``[[X]]`` of its answer. With ``position_check: n``, n of them are judged again with
the answers swapped (``position_check.json``: the share that flips).
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
from pipelines.core.stage import Stage, col
from pipelines.shard.config import ShardConfig, with_sampling
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


class ShardJudgeStage(Stage):
    """O2 (candidate) against O1 (reference), both criteria."""

    def __init__(self, config: ShardConfig, variant: str, endpoint: LLMEndpoint):
        # one section for every SHARD stage (ShardConfig): each keeps the settings it uses, its hash
        super().__init__(name=f"shard_judge_{variant}", inputs=(f"shard_refine_{variant}",))
        self.variant = variant
        self.reads = frozenset({"id", "text", "completion", "baseline"})  # P1, O2 against O1
        self.writes = PASSTHROUGH | {"judge_model", HELPFULNESS, HARMFULNESS, "judgements"}
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
        comparison), per split, and the position-bias check when it ran."""
        check = rundir.read_text(f"{self.name}/{POSITION_CHECK}")
        return {"o2_vs_o1_by_dataset": outcome_summary(rundir, self.name, "dataset"),
                "o2_vs_o1_by_split": outcome_summary(rundir, self.name),
                "position_check": json.loads(check) if check else None}
