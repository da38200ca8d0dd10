"""Guards side by side (CHILLGuard Tables 1 and 2), ``compare_<name>``: one report over several guard
evaluation stages, with what the paper does not give, uncertainty and paired significance.

The recipe names a grid, ``systems: {system: {benchmark: evaluation stage}}``: each cell is a
finished ``guard_eval_<key>`` or loop evaluation stage (one guard on one labelled set). The stage
has no rows of its own; it reads the cells' evaluation rows (:func:`~pipelines.evaluation.guard_eval.
scored_rows`) and writes ``RUN_DIR/compare_<name>/report/``:

- ``report.md``: Table 2 (systems × benchmarks F1 with a 95 % bootstrap interval, the average of the
  prompt-level and of the response-level benchmarks and the overall average), Table 1 (systems ×
  micro categories F1 on the ``categories`` benchmark, the average per macro category, overall),
  best in **bold** and second best underlined per column; AUPRC / ROC-AUC of the scored systems;
  per benchmark the McNemar p-value of every pair of systems; calibrated thresholds;
- ``comparison.json`` (everything), ``table2_f1.csv``, ``table1_micro_f1.csv``, ``mcnemar.csv``;
- ``table2_f1.png``, ``table1_micro_f1.png`` (heatmaps), ``pr_<benchmark>.png`` / ``roc_<benchmark>.png``
  (one curve per scored system);
- ``thresholds.json``: the calibrated thresholds per system (``chillguard serve`` reads the one of
  the model it serves).

Rows. Within a benchmark the rows are matched by id across systems. The benchmark's rows are the
union of the ids its cells evaluated (their gold labels must agree); a system is scored on all of
them: a row it has no usable answer for, or did not evaluate at all (``missing``), is a miss, as in
guard evaluation (:mod:`pipelines.evaluation.metrics`), and the report says how many.

Uncertainty. Each F1 gets a percentile bootstrap interval over rows (:func:`~pipelines.core.
statistics.bootstrap_f1`; ``resamples`` resamples, seeded with ``seed``), the cells of Table 1 over
the rows of their category. Two systems on the same benchmark are compared with McNemar's test on
per-row correctness (:func:`~pipelines.core.statistics.mcnemar`): paired, since they judged the same
rows.

Thresholds. A scored system (P(unsafe) from its first answer token) decides ``unsafe iff score >= t``.
With ``calibrate``, ``t`` is chosen per system on the rows of one benchmark (a validation set: it is
then left out of the tables) by maximum F1 or as the lowest ``t`` reaching a target precision
(:func:`~pipelines.evaluation.metrics.calibrate_threshold`), and applied to that system's other
benchmarks. Per-macro thresholds (``per_macro: true``) follow a rule a deployed guard could apply,
since a gold label is never known at prediction time: a row's macro category is the one of the code
its answer names (``pred_micro``); each macro's threshold is calibrated on the validation rows whose
answer names a code of that macro, and applied to the rows whose answer does; rows whose answer names
no code (a ``safe`` answer) and macros without a threshold use the overall one. No table depends on a
gold category except through the gold label it is scored against; serving uses the overall threshold.
A system without a score or without a validation cell keeps its evaluation's own decisions.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from itertools import combinations
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.core.artifacts import THRESHOLDS
from pipelines.core.config import Strict
from pipelines.core.registry import References, register
from pipelines.core.registry import evaluation_stages as registry_evaluations
from pipelines.core.reports import fmt, png_bytes
from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage
from pipelines.core.statistics import bootstrap_f1, mcnemar
from pipelines.core.taxonomy import Taxonomy, load_taxonomy
from pipelines.evaluation.guard_eval import REPORT_DIR, SCORED_COLUMNS, scored_rows
from pipelines.evaluation.label_cells import CELL_COLUMNS, is_label_cell, label_cell_refs, label_cell_rows, split_ref
from pipelines.evaluation.metrics import (
    calibrate_threshold,
    confusion,
    curve_metrics,
    curves,
    decision_scores,
    per_macro_f1,
    per_micro_confusion,
    scored_predictions,
)
from pipelines.guard.adapters import RESPONSE

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
#: how per-macro thresholds are chosen and applied (written into the report)
PER_MACRO_RULE = ("by predicted macro: each macro's threshold is calibrated on the validation rows whose answer "
                  "names a code of that macro and applied to the rows whose answer does; rows without a code "
                  "use the overall threshold")
#: Table 2's averages: key, title, the level of the benchmarks averaged (``None``: all)
AVERAGES = (("avg_prompt", "Avg. prompt", "prompt"), ("avg_response", "Avg. response", RESPONSE),
            ("overall_avg", "Overall Avg.", None))


class CompareError(ValueError):
    """The evaluations cannot be compared as configured (different gold labels for one id, mixed
    levels in one benchmark, a missing report)."""


class Calibration(Strict):
    """Choose each scored system's decision threshold on one benchmark (a validation set)."""

    benchmark: str = Field(description="the benchmark of `systems` whose rows choose the thresholds "
                           "(a validation split); it is left out of the tables")
    objective: Literal["max_f1", "precision"] = Field(
        "max_f1", description="max_f1: the threshold with the best F1; precision: the lowest threshold whose "
        "precision reaches target_precision")
    target_precision: float | None = Field(None, gt=0, le=1, description="objective precision: the target")
    per_macro: bool = Field(False, description="also one threshold per macro category, by the category of the "
                            "code the answer names (never the gold one): see the module docstring")

    @model_validator(mode="after")
    def _target(self) -> Calibration:
        if (self.objective == "precision") != (self.target_precision is not None):
            raise ValueError("target_precision goes with objective precision, and only with it")
        return self


class CompareConfig(Strict):
    """Guards side by side (``stages.compare.<name>``, stage ``compare_<name>``): F1 tables with
    bootstrap intervals, McNemar p-values, curves and calibrated thresholds over guard evaluations."""

    systems: dict[str, dict[str, str]] = Field(
        min_length=1, description="system -> {benchmark -> evaluation stage (guard_eval_<key>, loop<i>_eval_<c>)}")
    categories: str | None = Field(
        None, description="the benchmark of the systems × micro categories table (Table 1); default: the "
        "first benchmark named")
    resamples: int = Field(1000, ge=100, description="bootstrap resamples per interval")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the bootstrap intervals")
    seed: int = Field(0, description="of the bootstrap resampling: the same seed gives the same intervals")
    calibrate: Calibration | None = Field(None, description="choose decision thresholds on a validation benchmark")

    @property
    def benchmarks(self) -> list[str]:
        """Every benchmark named, in the order first named."""
        return list(dict.fromkeys(b for cells in self.systems.values() for b in cells))

    @property
    def table_benchmarks(self) -> list[str]:
        """The benchmarks of the tables: all but the calibration one."""
        held = self.calibrate.benchmark if self.calibrate else None
        return [b for b in self.benchmarks if b != held]

    @property
    def category_benchmark(self) -> str:
        return self.categories or self.table_benchmarks[0]

    @model_validator(mode="after")
    def _benchmarks(self) -> CompareConfig:
        empty = [s for s, cells in self.systems.items() if not cells]
        if empty:
            raise ValueError(f"systems {empty} name no benchmark")
        if self.calibrate and self.calibrate.benchmark not in self.benchmarks:
            raise ValueError(f"calibrate.benchmark {self.calibrate.benchmark!r} is not a benchmark of systems "
                             f"({', '.join(self.benchmarks)})")
        if not self.table_benchmarks:
            raise ValueError("every benchmark is the calibration one: nothing left to compare")
        if self.categories is not None and self.categories not in self.table_benchmarks:
            raise ValueError(f"categories {self.categories!r} is not a benchmark of the tables "
                             f"({', '.join(self.table_benchmarks)})")
        return self


# ------------------------------------------------------------------------------------------------
# One benchmark's rows, aligned across systems


class Cell:
    """One system on one benchmark, aligned to the benchmark's rows: gold labels (1 = unsafe), the
    predictions (1 = unsafe; rows without a usable answer or missing count as wrong), decision
    scores (:func:`decision_scores`), whether any row has a real score, and the counts."""

    def __init__(self, stage: str, settings: dict, ids: list[str], gold: dict[str, tuple[str, str]], rows: dict):
        self.stage, self.settings = stage, settings
        labels = [gold[i][0] for i in ids]
        self.micro = [gold[i][1] for i in ids]
        self.pred_micro = [(rows[i].get("pred_micro") or "") if i in rows else "" for i in ids]
        pred = [rows[i]["pred_label"] if i in rows else None for i in ids]
        score = [rows[i]["score"] if i in rows else None for i in ids]
        self.missing = sum(i not in rows for i in ids)
        self.unusable = sum(p is None for p in pred) - self.missing
        self.scored = any(s is not None for s in score)
        self.gold = np.array([g == UNSAFE for g in labels], dtype=np.int8)
        self.labels = labels
        self.pred = np.array([p == UNSAFE for p in scored_predictions(labels, pred)], dtype=np.int8)
        self.decision = np.array(decision_scores(labels, pred, score))
        self.threshold: float | None = settings.get("threshold") if self.scored else None

    def predicted_macros(self, macro_of: dict[str, str]) -> list[str]:
        """Per row, the macro category of the code its answer names (``""`` without one): what a
        deployed guard knows when it decides."""
        return [macro_of.get(m, "") for m in self.pred_micro]

    def apply(self, threshold: float, per_macro: dict[str, float], macro_of: dict[str, str]) -> None:
        """Decide by the calibrated threshold(s): the one of the row's predicted macro category
        (:meth:`predicted_macros`) where there is one, else ``threshold``."""
        t = np.array([per_macro.get(m, threshold) for m in self.predicted_macros(macro_of)])
        self.pred = (self.decision >= t).astype(np.int8)
        self.threshold = threshold


def _read_cell_rows(rundir: RunDir, stage: str) -> tuple[dict, dict]:
    """``(settings, {id: row})`` of one evaluation stage (or label cell: :mod:`~pipelines.evaluation.
    label_cells`); refuses a stage with a repeated id."""
    if is_label_cell(stage):
        try:
            return label_cell_rows(rundir, stage)
        except ValueError as exc:
            raise CompareError(str(exc)) from None
    text = rundir.read_text(f"{stage}/{REPORT_DIR}/metrics.json")
    if text is None:
        raise CompareError(f"{stage} has no {REPORT_DIR}/metrics.json: is it a guard evaluation stage?")
    settings = json.loads(text)["settings"]
    rows: dict[str, dict] = {}
    for row in scored_rows(rundir, stage).to_pylist():
        if row["id"] in rows:
            raise CompareError(f"{stage}: id {row['id']!r} evaluated twice: rows are matched by id")
        rows[row["id"]] = row
    return settings, rows


def align(benchmark: str, read: dict[str, tuple[str, dict, dict]]) -> tuple[list[str], dict[str, Cell], str]:
    """The benchmark's rows (the union of its cells' ids, sorted), each system's :class:`Cell` on them,
    and the level. ``read``: system -> (stage, settings, rows). Gold labels and micro codes must agree
    across cells, and every cell must judge the same level."""
    levels = {settings["level"] for _, settings, _ in read.values()}
    if len(levels) > 1:
        raise CompareError(f"benchmark {benchmark}: its evaluations judge different levels ({sorted(levels)})")
    gold: dict[str, tuple[str, str]] = {}
    for stage, _, rows in read.values():
        for i, row in rows.items():
            mine = (row["label"], row["micro"] or "")
            if gold.setdefault(i, mine) != mine:
                raise CompareError(f"benchmark {benchmark}: row {i!r} is {gold[i]} in one evaluation but {mine} "
                                   f"in {stage}: the cells of a benchmark must evaluate the same labelled rows")
    ids = sorted(gold)
    cells = {system: Cell(stage, settings, ids, gold, rows) for system, (stage, settings, rows) in read.items()}
    return ids, cells, levels.pop()


# ------------------------------------------------------------------------------------------------
# Figures


def f1_figures(gold: np.ndarray, pred: np.ndarray, *, resamples: int, confidence: float, seed: int) -> dict:
    """F1 (with P, R, counts) and its bootstrap interval over these rows."""
    c = confusion([UNSAFE if g else SAFE for g in gold], [UNSAFE if p else SAFE for p in pred])
    ci = bootstrap_f1(gold, pred, resamples=resamples, confidence=confidence, seed=seed)
    return {**c.to_dict(), "kappa": cohen_kappa(gold, pred), "ci": [ci.low, ci.high],
            "ci_undefined_resamples": ci.undefined}


def cohen_kappa(gold: np.ndarray, pred: np.ndarray) -> float | None:
    """Cohen's κ of the predictions with the gold labels, κ = (p_o − p_e) / (1 − p_e) with p_o the
    observed agreement and p_e the agreement expected from the two label distributions (scikit-learn);
    ``None`` where p_e = 1 (both give one and the same class throughout)."""
    from sklearn.metrics import cohen_kappa_score

    gold, pred = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    if len(gold) == 0 or (len(set(gold.tolist())) == 1 and set(gold.tolist()) == set(pred.tolist())):
        return None
    return float(cohen_kappa_score(gold, pred, labels=[0, 1]))


def rank_marks(values: dict[str, float | None]) -> dict[str, str]:
    """``best`` / ``second`` per key: the highest defined value(s), then the next lower one(s)."""
    distinct = sorted({round(v, 12) for v in values.values() if v is not None}, reverse=True)
    marks = {}
    for key, v in values.items():
        if v is not None and distinct and round(v, 12) == distinct[0]:
            marks[key] = "best"
        elif v is not None and len(distinct) > 1 and round(v, 12) == distinct[1]:
            marks[key] = "second"
    return marks


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values, ``None`` if any is undefined or there are none (an average over a
    system's benchmarks is only comparable when it has all of them)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def compare(config: CompareConfig, rundir: RunDir, taxonomy: Taxonomy) -> tuple[dict, dict]:
    """The whole comparison as a JSON-ready dict (module docstring), and the curve points for the
    charts, ``{benchmark: {system: curves}}`` (scored systems, benchmarks with both gold classes)."""
    b_args = {"resamples": config.resamples, "confidence": config.confidence, "seed": config.seed}
    cells: dict[str, dict[str, Cell]] = {}
    benchmarks: dict[str, dict] = {}
    for benchmark in config.benchmarks:
        read = {system: (stage, *_read_cell_rows(rundir, stage))
                for system, grid in config.systems.items() if (stage := grid.get(benchmark))}
        ids, cells[benchmark], level = align(benchmark, read)
        benchmarks[benchmark] = {"level": level, "rows": len(ids),
                                 "gold_unsafe": int(next(iter(cells[benchmark].values())).gold.sum()),
                                 "stages": {s: c.stage for s, c in cells[benchmark].items()}}

    thresholds = calibrate(config, cells, taxonomy) if config.calibrate else {}
    table2: dict[str, dict] = {}
    for system in config.systems:
        row: dict[str, Any] = {}
        for benchmark in config.table_benchmarks:
            cell = cells[benchmark].get(system)
            if cell is None:
                continue
            figures = f1_figures(cell.gold, cell.pred, **b_args)
            row[benchmark] = {**figures, "unusable": cell.unusable, "missing": cell.missing,
                              "threshold": cell.threshold, "stage": cell.stage, "scored": cell.scored,
                              **(curve_metrics(cell.labels, cell.decision.tolist()) if cell.scored
                                 else {"auprc": None, "roc_auc": None})}
        for name, _, level in AVERAGES:
            names = [b for b in config.table_benchmarks if level is None or benchmarks[b]["level"] == level]
            row[name] = _mean([row.get(b, {}).get("f1") for b in names]) if names else None
        table2[system] = row

    columns2 = [*config.table_benchmarks, *(name for name, _, _ in AVERAGES)]
    marks2 = {col: rank_marks({s: _f1(table2[s].get(col)) for s in config.systems}) for col in columns2}
    points = {b: {s: curves(c.labels, c.decision.tolist()) for s, c in cells[b].items() if c.scored}
              for b in config.table_benchmarks}
    report = {
        "settings": {"systems": config.systems, "benchmarks": config.table_benchmarks,
                     "categories": config.category_benchmark, "resamples": config.resamples,
                     "confidence": config.confidence, "seed": config.seed,
                     "calibrate": config.calibrate.model_dump() if config.calibrate else None},
        "benchmarks": benchmarks,
        "table2": table2, "table2_marks": marks2,
        "table1": table1(config, cells[config.category_benchmark], taxonomy, b_args),
        "mcnemar": {b: pairwise_mcnemar(cells[b]) for b in config.table_benchmarks},
        "thresholds": thresholds,
    }
    return report, {b: {s: c for s, c in by_system.items() if c is not None} for b, by_system in points.items()}


def _f1(cell: Any) -> float | None:
    return cell.get("f1") if isinstance(cell, dict) else cell


def table2_columns(report: dict) -> list[tuple[str, str]]:
    """Table 2's columns, ``(key, title)``: the benchmarks, then the averages over the prompt-level and
    the response-level ones where there are such benchmarks, and over all."""
    levels = {report["benchmarks"][b]["level"] for b in report["settings"]["benchmarks"]}
    return [*((b, b) for b in report["settings"]["benchmarks"]),
            *((name, title) for name, title, level in AVERAGES if level is None or level in levels)]


def table1(config: CompareConfig, cells: dict[str, Cell], taxonomy: Taxonomy, b_args: dict) -> dict:
    """Systems × micro categories on one benchmark: F1 per micro category (with its interval, over the
    rows whose gold micro is that category), the mean per macro category of the defined ones, and
    overall F1; with the best / second marks per column."""
    codes = taxonomy.micro_codes
    out: dict[str, dict] = {}
    for system, cell in cells.items():
        gold = [UNSAFE if g else SAFE for g in cell.gold]
        pred = [UNSAFE if p else SAFE for p in cell.pred]
        micros = per_micro_confusion(gold, pred, cell.micro, codes)
        micro_rows = {code: [i for i, m in enumerate(cell.micro) if m == code] for code in codes}
        per_micro = {}
        for code, c in micros.items():
            idx = micro_rows[code]
            ci = bootstrap_f1(cell.gold[idx], cell.pred[idx], **b_args) if idx else None
            per_micro[code] = {"f1": c.f1, "rows": c.rows, "ci": [ci.low, ci.high] if ci else [None, None]}
        out[system] = {"per_micro": per_micro,
                       "per_macro": per_macro_f1({k: v["f1"] for k, v in per_micro.items()}, taxonomy),
                       "overall": confusion(gold, pred).f1}
    columns = {**{code: lambda s, code=code: out[s]["per_micro"][code]["f1"] for code in codes},
               **{f"avg_{m}": lambda s, m=m: out[s]["per_macro"][m] for m in taxonomy.macro_codes},
               "overall": lambda s: out[s]["overall"]}
    return {"benchmark": config.category_benchmark, "systems": out,
            "marks": {col: rank_marks({s: get(s) for s in out}) for col, get in columns.items()}}


def pairwise_mcnemar(cells: dict[str, Cell]) -> dict[str, dict]:
    """McNemar's test on per-row correctness for every pair of systems evaluated on the benchmark."""
    out = {}
    for a, b in combinations(cells, 2):
        test = mcnemar(cells[a].pred == cells[a].gold, cells[b].pred == cells[b].gold)
        out[f"{a} vs {b}"] = {"first": a, "second": b, **test.as_dict()}
    return out


def calibrate(config: CompareConfig, cells: dict[str, dict[str, Cell]], taxonomy: Taxonomy) -> dict[str, dict]:
    """Per scored system with a cell on the calibration benchmark: its threshold(s) there
    (:func:`calibrate_threshold`), applied to its cells on the other benchmarks."""
    c = config.calibrate
    macro_of = {code: taxonomy.macro_of(code) for code in taxonomy.micro_codes}
    out = {}
    for system, val in cells[c.benchmark].items():
        if not val.scored:
            out[system] = {"threshold": None, "reason": "no score: decided by its answers"}
            continue
        args = {"objective": c.objective, "target_precision": c.target_precision}
        overall = calibrate_threshold(val.labels, val.decision.tolist(), **args)
        per_macro: dict[str, dict] = {}
        if c.per_macro:
            macros = val.predicted_macros(macro_of)
            for macro in taxonomy.macro_codes:
                idx = [i for i, m in enumerate(macros) if m == macro]
                if idx:
                    per_macro[macro] = calibrate_threshold([val.labels[i] for i in idx], val.decision[idx].tolist(),
                                                           **args)
        out[system] = {**overall, "stage": val.stage, "model_from": val.settings.get("model_from"),
                       "model": val.settings.get("model"), "evaluation_threshold": val.settings.get("threshold"),
                       "per_macro": per_macro, "per_macro_rule": PER_MACRO_RULE if c.per_macro else None}
        if overall["threshold"] is None:
            out[system]["reason"] = "target not reached on the validation rows: evaluation thresholds kept"
            continue
        by_macro = {m: r["threshold"] for m, r in per_macro.items() if r["threshold"] is not None}
        for benchmark in config.table_benchmarks:
            cell = cells[benchmark].get(system)
            if cell is not None and cell.scored:
                cell.apply(overall["threshold"], by_macro, macro_of)
    return out


# ------------------------------------------------------------------------------------------------
# Writing


def _mark(text: str, mark: str | None) -> str:
    return f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text


def _ci(ci: list) -> str:
    return "" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(report: dict, taxonomy: Taxonomy, charted: set[str]) -> str:
    """``report.md``; ``charted``: the benchmarks with curve charts."""
    s = report["settings"]
    benches = s["benchmarks"]
    t2, m2 = report["table2"], report["table2_marks"]
    columns = table2_columns(report)
    lines = [f"# Guards compared: {', '.join(t2)}", "",
             "- benchmarks: " + ", ".join(f"{b} ({report['benchmarks'][b]['level']}-level, "
                                          f"{report['benchmarks'][b]['rows']} rows)" for b in benches),
             "- F1 with `unsafe` positive; every row of a benchmark is scored for every system (rows are matched "
             "by id; a row without a usable answer, or not evaluated by that system, is a miss)",
             f"- intervals: {s['confidence']:.0%} percentile bootstrap over rows, {s['resamples']} resamples, seed "
             f"{s['seed']}; **bold** best, <u>underlined</u> second per column", "",
             "## F1 per benchmark (Table 2)", "",
             "| system | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for system, row in t2.items():
        cells = []
        for key, _ in columns:
            c = row.get(key)
            if key in benches:
                cells.append("—" if c is None else _mark(fmt(c["f1"]), m2[key].get(system)) + _ci(c["ci"]))
            else:
                cells.append(_mark(fmt(c), m2[key].get(system)))
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "Agreement with the gold labels, accuracy / Cohen's κ (misses count as disagreements):", "",
              "| system | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
    for system, row in t2.items():
        lines.append(f"| {system} | " + " | ".join(
            "—" if b not in row else f"{fmt(row[b]['accuracy'])} / {fmt(row[b]['kappa'])}" for b in benches) + " |")
    lines += ["",
              "Rows a system has no usable answer for (unusable) or did not evaluate (missing), scored as misses:",
              "", "| system | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
    for system, row in t2.items():
        lines.append(f"| {system} | " + " | ".join(
            "—" if b not in row else f"{row[b]['unusable']} / {row[b]['missing']}" for b in benches) + " |")
    scored = [system for system, row in t2.items() if any(c["scored"] for b, c in row.items() if b in benches)]
    if scored:
        lines += ["", "## Scores: AUPRC / ROC-AUC (systems with P(unsafe); n/a: the benchmark has one gold class)", "",
                  "| system | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
        for system in scored:
            row = t2[system]
            lines.append(f"| {system} | " + " | ".join(
                "—" if b not in row or not row[b]["scored"] else f"{fmt(row[b]['auprc'])} / {fmt(row[b]['roc_auc'])}"
                for b in benches) + " |")
        lines += ["", *(f"![{b}: precision–recall](pr_{_slug(b)}.png) ![{b}: ROC](roc_{_slug(b)}.png)"
                        for b in benches if b in charted)]
    t1 = report["table1"]
    macros = taxonomy.macro_codes
    micros_of = {m: [c for c in taxonomy.micro_codes if taxonomy.macro_of(c) == m] for m in macros}
    header = [*(c for m in macros for c in [*micros_of[m], f"Avg. {m}"]), "Overall"]
    lines += ["", f"## F1 per micro category on {t1['benchmark']} (Table 1)", "",
              "| system | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for system, row in t1["systems"].items():
        cells = []
        for m in macros:
            cells += [_mark(fmt(row["per_micro"][c]["f1"], 2), t1["marks"][c].get(system)) for c in micros_of[m]]
            cells.append(_mark(fmt(row["per_macro"][m], 2), t1["marks"][f"avg_{m}"].get(system)))
        cells.append(_mark(fmt(row["overall"], 2), t1["marks"]["overall"].get(system)))
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "Intervals of every cell: `table1_micro_f1.csv`.", "",
              "## Paired tests (McNemar on per-row correctness)", ""]
    for b, pairs in report["mcnemar"].items():
        if pairs:
            lines += [f"### {b}", "", "| pair | only first right | only second right | test | p-value |",
                      "|---|---|---|---|---|",
                      *(f"| {k} | {p['b']} | {p['c']} | {p['test']} | {p['p_value']:.3g} |"
                        for k, p in pairs.items()), ""]
    if report["thresholds"]:
        c = s["calibrate"]
        target = f", target precision {c['target_precision']}" if c["target_precision"] else ""
        lines += ["## Calibrated thresholds", "",
                  f"On {c['benchmark']} ({c['objective']}{target}), applied to the other benchmarks."
                  + (f" Per-macro thresholds {PER_MACRO_RULE}." if c["per_macro"] else ""), "",
                  "| system | threshold | precision | recall | F1 | evaluation's threshold | note |",
                  "|---|---|---|---|---|---|---|"]
        for system, t in report["thresholds"].items():
            lines.append(f"| {system} | {fmt(t.get('threshold'))} | {fmt(t.get('precision'))} | "
                         f"{fmt(t.get('recall'))} | {fmt(t.get('f1'))} | {fmt(t.get('evaluation_threshold'))} | "
                         f"{t.get('reason', '')} |")
        lines.append("")
    lines += ["## Heatmaps", "", "![Table 2](table2_f1.png)", "", "![Table 1](table1_micro_f1.png)", ""]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def heatmap(values: list[list[float | None]], rows: list[str], columns: list[str], title: str) -> bytes:
    """A PNG heatmap of F1 values (rows × columns), the value in each cell, blank where undefined."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    data = np.array([[np.nan if v is None else v for v in r] for r in values], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * len(columns) + 2.5), 0.45 * len(rows) + 1.8), dpi=110)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, j in zip(*np.nonzero(~np.isnan(data))):
        ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="F1")
    fig.tight_layout()
    return png_bytes(fig)


def curve_chart(by_system: dict[str, dict], kind: str, title: str) -> bytes:
    """Precision–recall (``kind`` ``pr``) or ROC (``roc``) curves, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=110)
    for system, c in by_system.items():
        x, y = (c["recall"], c["precision"]) if kind == "pr" else (c["fpr"], c["tpr"])
        ax.plot(x, y, label=system, drawstyle="steps-post" if kind == "pr" else "default")
    ax.set_xlabel("recall" if kind == "pr" else "false positive rate")
    ax.set_ylabel("precision" if kind == "pr" else "true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


class CompareStage(Stage):
    """``compare_<name>``: the comparison report over finished guard evaluation stages."""

    name = "compare"

    def __init__(self, key: str, config: CompareConfig, taxonomy_path: str):
        # a label cell (`adjudicate:judge2`) requires its stage
        super().__init__(config, name=f"compare_{key}", requires=dict.fromkeys(
            split_ref(s)[0] for grid in config.systems.values() for s in grid.values()))
        self.taxonomy = load_taxonomy(taxonomy_path)  # the report's tables and charts name the categories
        # each cell's scored rows: an evaluation's answers, a label cell's votes
        reads: dict[str, frozenset[str]] = {}
        for ref in (s for grid in config.systems.values() for s in grid.values()):
            stage = split_ref(ref)[0]
            reads[stage] = reads.get(stage, frozenset()) | (CELL_COLUMNS if is_label_cell(ref) else SCORED_COLUMNS)
        self.reads = reads

    def exports(self, rundir: RunDir) -> dict[str, Any]:
        return {THRESHOLDS: {"file": f"{REPORT_DIR}/{THRESHOLDS_FILE}"}}

    def write(self, inputs: dict, rundir: RunDir) -> None:
        taxonomy = self.taxonomy
        report, curves_by_benchmark = compare(self.config, rundir, taxonomy)
        base = f"{self.name}/{REPORT_DIR}"
        rundir.write_text(f"{base}/comparison.json", json.dumps(report, indent=2, ensure_ascii=False))
        rundir.write_text(f"{base}/report.md",
                          markdown(report, taxonomy, {b for b, c in curves_by_benchmark.items() if c}))
        rundir.write_text(f"{base}/{THRESHOLDS_FILE}", json.dumps(report["thresholds"], indent=2))
        benches, systems = report["settings"]["benchmarks"], list(report["table2"])
        rundir.write_text(f"{base}/table2_f1.csv", _csv(
            [["system", "benchmark", "level", "rows", "f1", "ci_low", "ci_high", "precision", "recall", "accuracy",
              "kappa", "unusable", "missing", "threshold", "auprc", "roc_auc"]]
            + [[s, b, report["benchmarks"][b]["level"], c["rows"], c["f1"], *c["ci"], c["precision"], c["recall"],
                c["accuracy"], c["kappa"], c["unusable"], c["missing"], c["threshold"], c["auprc"], c["roc_auc"]]
               for s in systems for b in benches if (c := report["table2"][s].get(b))]))
        t1 = report["table1"]
        rundir.write_text(f"{base}/table1_micro_f1.csv", _csv(
            [["system", "micro", "macro", "rows", "f1", "ci_low", "ci_high"]]
            + [[s, code, taxonomy.macro_of(code), m["rows"], m["f1"], *m["ci"]]
               for s, row in t1["systems"].items() for code, m in row["per_micro"].items()]))
        rundir.write_text(f"{base}/mcnemar.csv", _csv(
            [["benchmark", "first", "second", "n", "b", "c", "test", "statistic", "p_value"]]
            + [[b, p["first"], p["second"], p["n"], p["b"], p["c"], p["test"], p["statistic"], p["p_value"]]
               for b, pairs in report["mcnemar"].items() for p in pairs.values()]))
        columns2 = table2_columns(report)
        rundir.write_bytes(f"{base}/table2_f1.png", heatmap(
            [[_f1(report["table2"][s].get(key)) for key, _ in columns2] for s in systems], systems,
            [title for _, title in columns2], f"{self.name}: F1 per benchmark"))
        codes = [*taxonomy.micro_codes, *(f"avg_{m}" for m in taxonomy.macro_codes), "overall"]
        rows1 = list(t1["systems"])
        rundir.write_bytes(f"{base}/table1_micro_f1.png", heatmap(
            [[_table1_value(t1["systems"][s], c) for c in codes] for s in rows1], rows1, codes,
            f"{self.name}: F1 per micro category on {t1['benchmark']}"))
        for b, by_system in curves_by_benchmark.items():
            if by_system:
                rundir.write_bytes(f"{base}/pr_{_slug(b)}.png", curve_chart(by_system, "pr", f"{b}: precision–recall"))
                rundir.write_bytes(f"{base}/roc_{_slug(b)}.png", curve_chart(by_system, "roc", f"{b}: ROC"))
        self._summary = {"f1": {s: {b: _f1(report["table2"][s].get(b)) for b in benches} for s in systems},
                         "thresholds": {s: t.get("threshold") for s, t in report["thresholds"].items()},
                         "report": f"{REPORT_DIR}/report.md"}
        log.info("stage %s: %d systems × %d benchmarks compared", self.name, len(systems), len(benches))

    def summary(self, rundir: RunDir) -> dict[str, Any] | None:
        return getattr(self, "_summary", None)


def _table1_value(row: dict, column: str) -> float | None:
    if column == "overall":
        return row["overall"]
    if column.startswith("avg_"):
        return row["per_macro"][column[4:]]
    return row["per_micro"][column]["f1"]


def evaluation_stages(recipe: Any) -> list[str]:
    """What a comparison cell may name in a recipe: its guard evaluation stages (``guard_eval_<key>``,
    the loop's evaluations), its TF-IDF baselines (``baseline_<key>``) and its jury's label cells."""
    return registry_evaluations(recipe.stages) + label_cell_refs(recipe)


def _check(sections: dict[str, CompareConfig], refs: References) -> dict[str, str | None]:
    known = evaluation_stages(refs.recipe)
    for key, config in sections.items():
        for system, grid in config.systems.items():
            unknown = [s for s in grid.values() if s not in known]
            if unknown:
                raise ValueError(f"stages.compare.{key}.systems.{system}: {unknown} are not guard evaluation "
                                 f"stages of this recipe (those are: {known or 'none'})")
    return {}


register("compare", config=CompareConfig, keyed=True, check=_check,
         build=lambda recipe, sections: [CompareStage(key, config, recipe.taxonomy)
                                         for key, config in sections.items()],
         description="guards side by side: F1 tables, bootstrap intervals, McNemar, curves, calibrated thresholds; "
         "each is stage compare_<key>")
