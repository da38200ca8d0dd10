"""SHARD evaluation (stage ``shard_eval``): fine-tuned models against the target's baseline answers.

1. Reads ``shard_answer`` (P1 with the target's O1 and the split) and keeps the rows of ``split``
   (test by default; the others are ``dropped``, ``other_split``).
2. Each system of ``stages.shard_eval.systems`` answers P1 under the same system prompt as O1: an
   endpoint, or with ``model_from: sft_<key>`` the model that training stage exported
   (:mod:`pipelines.core.artifacts`). One pass per system, kept in the stage's scratch folder, so a crash
   resumes after the last finished system.
3. The judge of ``stages.shard`` (or ``judge``) compares every system's answer (candidate) with O1
   (reference) for helpfulness and harmfulness, A/B order drawn per comparison, in one pass.
4. One row per prompt: ``results`` holds each system's answer, outcomes and judgements; a prompt on
   which a system's request or verdict failed is an ``error`` row naming the system, so the ``ok``
   rows are a paired sample (every system judged on every prompt).
5. ``report/``: ``metrics.json``, ``report.md`` and ``outcomes.png`` (:mod:`pipelines.shard.stats`):
   win / tie / loss per system and criterion, win rate ``W / (W + L)`` with a Wilson interval, the
   exact binomial test against 0.5 on non-ties, per dataset; between every two systems (self- vs
   teacher-supervision) McNemar's test on the paired per-prompt win indicators: the systems answer
   the same prompts, so the comparison is paired. Each p-value is stored and shown with its test.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from actors.llm import chat
from pipelines.core.artifacts import model_from_endpoint, trained_model_endpoint
from pipelines.core.config import LLMEndpoint, Strict, names_matching
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.registry import References, register
from pipelines.core.reports import png_bytes
from pipelines.core.rows import (
    DROPPED,
    ERROR,
    OK,
    SCHEMA_FIELDS,
    error_detail,
    shuffle_partitions,
    to_table,
    union_all,
)
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, col, run_pass
from pipelines.core.statistics import MCNEMAR_EXACT_BELOW, mcnemar
from pipelines.shard.answer import AnswerMessages
from pipelines.shard.config import ANSWER, ShardConfig
from pipelines.shard.judging import judge_constraint, judge_prompts
from pipelines.shard.pairwise import (
    CRITERIA,
    HARMFULNESS,
    HELPFULNESS,
    JUDGED_COLUMNS,
    JUDGEMENT,
    combine_judgements,
    judge,
)
from pipelines.shard.rows import SHARD_COLUMNS, take_answer
from pipelines.shard.stats import BINOMIAL_TEST, WIN, win_tie_loss


class ShardEvalSystem(Strict):
    """One system compared with the baseline answers O1 on the test split."""

    model: str = Field(description="endpoint under `models:` (with model_from: engine settings and sampling)")
    model_from: str | None = Field(None, description="evaluate the model this training stage exported "
                                   "(sft_<key>); unset: the endpoint's own model")


class ShardEvalConfig(Strict):
    """Pairwise evaluation (``pipelines/shard_eval.py``): each system answers the prompts of ``split``;
    the judge compares each answer with the target's baseline O1 for helpfulness and harmfulness;
    win / tie / loss, win rate (Wilson CI), binomial test; McNemar (paired) between systems."""

    systems: dict[str, ShardEvalSystem] = Field(min_length=1)
    split: str = Field("test", description="the split of shard_answer evaluated; other rows are dropped")
    judge: str | None = Field(None, description="endpoint under `models:`; default: stages.shard.judge")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the Wilson intervals")

    @field_validator("systems")
    @classmethod
    def _system_names(cls, value: dict[str, ShardEvalSystem]) -> dict[str, ShardEvalSystem]:
        return names_matching(value, r"[A-Za-z0-9_.-]+", "system names")

log = logging.getLogger(__name__)

REPORT_DIR = "report"
RESULT = pa.struct([("system", pa.string()), ("model", pa.string()), ("answer", pa.string()),
                    ("helpfulness", pa.string()), ("harmfulness", pa.string()),
                    ("judgements", pa.list_(JUDGEMENT))])
EVAL_COLUMNS = {**SHARD_COLUMNS, "results": pa.list_(RESULT)}
#: columns of one system's answer to one prompt (long format, before judging)
_CANDIDATE = {"system": pa.string(), "system_model": pa.string(), "system_answer": pa.string()}


def keep_split(batch: pa.Table, *, split: str) -> pa.Table:
    """``shard_answer`` rows -> rows to evaluate (``ok``) or ``dropped`` (``other_split``)."""
    out = []
    for row in batch.to_pylist():
        if row["split"] != split:
            row.update(status=DROPPED, reason="other_split", detail=f"split {row['split']!r}, evaluating {split!r}")
        else:
            row.update(status=OK, reason="", detail="")
        out.append(row)
    return to_table(out, SHARD_COLUMNS)


def unjudged(batch: pa.Table) -> pa.Table:
    """Answers that failed (never judged) with the judgement columns empty, so that they share one
    schema with the judged rows they are grouped with."""
    for name in JUDGED_COLUMNS:
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.array([""] * batch.num_rows, pa.string()))
    return batch


def finish_prompt(group: pa.Table, *, systems: list[str], judge_model: str) -> pa.Table:
    """All rows of one prompt (each system's answer, or its judgements) -> one row with ``results``;
    ``error`` when a system has no answer or no verdict (reason and system named in the detail)."""
    rows = group.to_pylist()
    base = {k: v for k, v in rows[0].items() if k in SCHEMA_FIELDS or k in EVAL_COLUMNS}
    results, problems = [], []
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        failed = [r for r in mine if r["status"] == ERROR]  # its answer failed: never judged
        if not mine:
            problems.append(("missing_system", f"{system}: no answer row"))
            continue
        if failed:
            problems.append((failed[0]["reason"], f"{system}: {failed[0]['detail']}"))
            results.append({"system": system, "model": failed[0]["system_model"], "answer": "",
                            "helpfulness": "", "harmfulness": "", "judgements": []})
            continue
        verdict = combine_judgements(mine)
        if verdict["reason"]:
            problems.append((verdict["reason"], f"{system}: {verdict['detail']}"))
        results.append({"system": system, "model": mine[0]["system_model"], "answer": mine[0]["system_answer"],
                        HELPFULNESS: verdict[HELPFULNESS], HARMFULNESS: verdict[HARMFULNESS],
                        "judgements": verdict["judgements"]})
    row = {**base, "results": results, "judge_model": judge_model, "helpfulness": "", "harmfulness": "",
           "judgements": [],
           "status": ERROR if problems else OK, "reason": problems[0][0] if problems else "",
           "detail": error_detail("; ".join(d for _, d in problems))}
    return to_table([row], EVAL_COLUMNS)


# ------------------------------------------------------------------------------------------------
# Metrics


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """What the metrics need of an evaluated row (not the answers and judge explanations), so the
    driver holds a few strings per prompt."""
    return {"dataset": row["dataset"], "baseline_model": row["baseline_model"],
            "results": [{k: r[k] for k in ("system", "model", HELPFULNESS, HARMFULNESS)} for r in row["results"]]}


def system_metrics(results: list[dict], datasets: list[str], confidence: float) -> dict[str, Any]:
    """Per criterion: :func:`pipelines.shard.stats.win_tie_loss` overall and per dataset."""
    out: dict[str, Any] = {}
    for criterion in CRITERIA:
        outcomes = [r[criterion] for r in results]
        per_dataset = {}
        for dataset in sorted(set(datasets)):
            per_dataset[dataset] = win_tie_loss([o for o, d in zip(outcomes, datasets) if d == dataset], confidence)
        out[criterion] = {**win_tie_loss(outcomes, confidence), "by_dataset": per_dataset}
    return out


def compare_systems(first: list[dict], second: list[dict], criterion: str) -> dict[str, Any]:
    """Two systems' results on the same prompts (``first[i]`` and ``second[i]`` are prompt ``i``):
    McNemar's test on the paired win indicators (a tie or a loss is not a win), i.e. of ``H0``: both
    systems win on the same share of prompts (``b``: only the first wins, ``c``: only the second)."""
    return {"mcnemar": mcnemar([r[criterion] == WIN for r in first],
                               [r[criterion] == WIN for r in second]).as_dict()}


def evaluation_metrics(rows: list[dict], systems: list[str], confidence: float) -> dict[str, Any]:
    """Metrics over the ``ok`` rows (each with every system's result)."""
    per_system = {s: [next(r for r in row["results"] if r["system"] == s) for row in rows] for s in systems}
    datasets = [row["dataset"] for row in rows]
    comparisons = [{"first": a, "second": b, "criterion": criterion,
                    **compare_systems(per_system[a], per_system[b], criterion)}
                   for a, b in itertools.combinations(systems, 2) for criterion in CRITERIA]
    return {"systems": {s: system_metrics(per_system[s], datasets, confidence) for s in systems},
            "comparisons": comparisons}


# ------------------------------------------------------------------------------------------------
# Report


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    """A p-value to 4 decimals; a smaller one is not rounded to 0."""
    return "n/a" if value is None else "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def _ci(interval: list[float] | None) -> str:
    return "n/a" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _wtl_line(name: str, m: dict) -> str:
    return (f"| {name} | {m['n']} | {m['win']} | {m['tie']} | {m['loss']} | {_f(m['win_rate'])} | "
            f"{_ci(m['win_rate_ci'])} | {_p(m['binomial_p'])} |")


def report_markdown(metrics: dict) -> str:
    s, rows = metrics["settings"], metrics["rows"]
    header = [f"| system | n | win | tie | loss | win rate | Wilson {s['confidence']:.0%} CI | p ({BINOMIAL_TEST}) |",
              "|---|---|---|---|---|---|---|---|"]
    lines = [f"# SHARD evaluation: {', '.join(s['systems'])} against the baseline answers", "",
             f"- baseline: the target's answers O1 (`{s['baseline_model']}`) from `{ANSWER}`",
             f"- judge: `{s['judge_model']}`, pairwise, A/B order drawn per comparison (seed {s['order_seed']})",
             f"- prompts: split `{s['split']}`; {rows['in']} read, {rows['evaluated']} evaluated, "
             f"{rows['errored']} errored, {rows['dropped']} dropped (other splits)",
             "- outcomes are the system's: win = its answer judged more helpful / less harmful than O1",
             f"- win rate = W / (W + L) over non-ties with a Wilson {s['confidence']:.0%} interval; "
             f"p ({BINOMIAL_TEST}) = exact two-sided binomial test of the wins against 0.5 on non-ties", "",
             "| system | model |", "|---|---|", *(f"| {k} | `{v['model']}` |" for k, v in s["systems"].items()), ""]
    for criterion in CRITERIA:
        lines += [f"## {criterion.capitalize()}", "", *header]
        lines += [_wtl_line(name, m[criterion]) for name, m in metrics["systems"].items()]
        lines += ["", "Per dataset:", "", *header]
        for name, m in metrics["systems"].items():
            lines += [_wtl_line(f"{name} / {d}", dm) for d, dm in m[criterion]["by_dataset"].items()]
        lines.append("")
    if metrics["comparisons"]:
        lines += ["## Between systems", "",
                  "The systems answer the same prompts, so they are compared as a paired sample: McNemar's test "
                  "of whether both win on the same share of prompts, on the per-prompt win indicators (a tie "
                  "or a loss is not a win; b: only the first wins, c: only the second). `McNemar exact`: two-sided "
                  f"binomial test of b of b + c at 1/2, used below {MCNEMAR_EXACT_BELOW} discordant pairs; "
                  "`McNemar chi2 cc`: chi-square with continuity correction, (|b - c| - 1)² / (b + c), 1 df.", "",
                  "| first | second | criterion | prompts | first wins | second wins | b | c | test | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in metrics["comparisons"]:
            m = c["mcnemar"]
            lines.append(f"| {c['first']} | {c['second']} | {c['criterion']} | {m['n']} | {m['first_wins']} | "
                         f"{m['second_wins']} | {m['b']} | {m['c']} | {m['test']} | {_p(m['p_value'])} |")
        lines.append("")
    for kind in ("errored", "dropped"):
        if metrics["reasons"][kind]:
            lines += [f"## Rows {kind}", "", *(f"- {r}: {n}" for r, n in metrics["reasons"][kind].items()), ""]
    lines += ["## Chart", "", "![outcomes](outcomes.png)", ""]
    return "\n".join(lines)


def outcomes_chart(metrics: dict) -> bytes:
    """A PNG: per system and criterion a horizontal bar of win / tie / loss shares, the win rate
    and its interval written beside it."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    bars = [(f"{name}\n{criterion}", m[criterion]) for name, m in metrics["systems"].items() for criterion in CRITERIA]
    colours = {"win": "#2a9d8f", "tie": "#c9c9c9", "loss": "#e76f51"}
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.4), dpi=110)
    for y, (_, m) in enumerate(bars):
        left = 0.0
        for kind in ("win", "tie", "loss"):
            share = m["shares"][kind] or 0.0
            ax.barh(y, share, left=left, color=colours[kind], label=kind if y == 0 else None)
            left += share
        ax.text(1.02, y, f"win rate {_f(m['win_rate'], 2)} {_ci(m['win_rate_ci'])}, n={m['n']}",
                va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of prompts (against the baseline O1)")
    ax.set_title(f"SHARD evaluation, split {metrics['settings']['split']}", fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    return png_bytes(fig, bbox_inches="tight")


# ------------------------------------------------------------------------------------------------
# The stage


class ShardEvalStage(Stage):
    name = "shard_eval"
    inputs = (ANSWER,)
    needs_rows = True
    reads = frozenset({"id", "text", "baseline", "split"})  # the prompts of the evaluated split and O1
    writes = PASSTHROUGH | {"results"}

    def __init__(self, config: ShardEvalConfig, shard: ShardConfig, models: dict[str, LLMEndpoint]):
        # the training stages whose models are evaluated run first; retraining re-evaluates
        super().__init__(config, requires=[s.model_from for s in config.systems.values() if s.model_from])
        self.systems = list(config.systems)
        self.endpoints = {name: model_from_endpoint(models[s.model], s.model_from)
                          for name, s in config.systems.items()}
        self.judge_endpoint = models[config.judge or shard.judge]
        # of the SHARD section, what it answers and judges with as shard_judge_<v> does (not the section)
        self.system = shard.system
        self.prompts = judge_prompts(shard)
        self.verdict_constraint = judge_constraint(shard)
        self.order_seed = shard.order_seed

    def _answers(self, rows, rundir: RunDir, name: str):
        endpoint = trained_model_endpoint(self.endpoints[name], rundir, self.config.systems[name].model_from,
                                          self.name)
        return run_pass(self, rundir, f"answer-{name}", lambda: chat(
            rows, endpoint, AnswerMessages(self.system)).map_batches(
                take_answer, batch_format="pyarrow", fn_kwargs={
                    "into": "system_answer", "model_field": "system_model", "model": endpoint.model,
                    "extra": _CANDIDATE, "fields": {"system": name}}))

    def write(self, inputs: dict, rundir: RunDir) -> None:
        rows = inputs[ANSWER].map_batches(keep_split, batch_format="pyarrow", fn_kwargs={"split": self.config.split})
        parts = [rows.filter(expr=col("status") != OK)]
        pending = rows.filter(expr=col("status") == OK)
        prompts = pending.count()
        if prompts:  # nothing to evaluate: start no engine
            answers = [a for name in self.systems if (a := self._answers(pending, rundir, name)) is not None]
            candidates = union_all(answers)
            judged = run_pass(self, rundir, "judge", lambda: judge(
                candidates.filter(expr=col("status") == OK), self.judge_endpoint, self.prompts,
                self.verdict_constraint, seed=self.order_seed, key="eval", candidate="system_answer",
                reference="baseline"))
            failed = candidates.filter(expr=col("status") != OK).map_batches(unjudged, batch_format="pyarrow")
            both = union_all([failed, judged]) if judged is not None else failed
            partitions = shuffle_partitions(2 * len(self.systems) * prompts)
            parts.append(both.groupby("id", num_partitions=partitions).map_groups(
                finish_prompt, batch_format="pyarrow",
                fn_kwargs={"systems": self.systems, "judge_model": self.judge_endpoint.model}))
        union_all([p.map_batches(_eval_schema, batch_format="pyarrow") for p in parts]) \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])
        self.write_report(rundir)

    def metrics(self, rundir: RunDir) -> dict[str, Any]:
        rows = [compact_row(r)
                for batch in rundir.iter_batches(self.name, OK, ["dataset", "results", "baseline_model"])
                for r in batch.to_pylist()]
        reasons = {"errored": rundir.reason_counts(self.name, ERROR),
                   "dropped": rundir.reason_counts(self.name, DROPPED)}
        errored, dropped = sum(reasons["errored"].values()), sum(reasons["dropped"].values())
        models = {}
        for row in rows[:1]:
            models = {r["system"]: r["model"] for r in row["results"]}
        c = self.config
        return {"settings": {
                    "stage": self.name, "split": c.split, "confidence": c.confidence,
                    "judge_model": self.judge_endpoint.model, "order_seed": self.order_seed,
                    "baseline_model": rows[0]["baseline_model"] if rows else None,
                    "systems": {n: {"model": models.get(n, self.endpoints[n].model), "model_from": s.model_from}
                                for n, s in c.systems.items()}},
                "rows": {"in": len(rows) + errored + dropped, "evaluated": len(rows), "errored": errored,
                         "dropped": dropped},
                "reasons": reasons,
                **evaluation_metrics(rows, self.systems, c.confidence)}

    def write_report(self, rundir: RunDir) -> None:
        metrics = self.metrics(rundir)
        base = f"{self.name}/{REPORT_DIR}"
        rundir.write_text(f"{base}/metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
        rundir.write_text(f"{base}/report.md", report_markdown(metrics))
        rundir.write_bytes(f"{base}/outcomes.png", outcomes_chart(metrics))

    def summary(self, rundir: RunDir) -> dict[str, Any] | None:
        text = rundir.read_text(f"{self.name}/{REPORT_DIR}/metrics.json")
        if not text:
            return None
        metrics = json.loads(text)
        short = ("n", "win", "tie", "loss", "win_rate", "win_rate_ci", "binomial_p", "binomial_test")
        return {"rows_evaluated": metrics["rows"]["evaluated"], "report": f"{REPORT_DIR}/report.md",
                "systems": {n: {c: {k: m[c][k] for k in short} for c in CRITERIA}
                            for n, m in metrics["systems"].items()}}


def _eval_schema(batch: pa.Table) -> pa.Table:
    """Rows of every part in the evaluation schema (the dropped rows have no ``results``)."""
    return to_table(batch.to_pylist(), EVAL_COLUMNS)


def _check(config: ShardEvalConfig, refs: References) -> dict[str, str | None]:
    models = {"stages.shard_eval.judge": config.judge}
    for name, system in config.systems.items():
        models[f"stages.shard_eval.systems.{name}.model"] = system.model
        refs.check_trained(f"stages.shard_eval.systems.{name}.model_from", system.model_from,
                           system.model)
    return models


# after the sft_<key> stages whose models it evaluates
register("shard_eval", config=ShardEvalConfig, needs=("shard",), check=_check,
         build=lambda recipe, config: [ShardEvalStage(config, recipe.stages.shard, recipe.models)],
         description="SHARD pairwise evaluation against the baseline answers (stage shard_eval)")
