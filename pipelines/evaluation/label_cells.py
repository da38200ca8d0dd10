"""The jury's labels as comparison cells: each judge, and the jury's final decision, scored against
the source rows' own (human) labels like a guard.

A labelling stage keeps each row's label from its source (``source_label``: a person's, for a
human-labelled set read by a preset) beside what the LLMs said. So the comparison stage can put a
judge or the jury in a benchmark's grid next to guards, with the same F1 interval, accuracy, Cohen's
κ and McNemar tests on the same rows (:mod:`pipelines.evaluation.compare`). A cell names:

- ``adjudicate``: the jury's final label (majority, else the adjudicator's); a row the adjudicator
  gave no usable answer for is a miss;
- ``jury:<judge>`` or ``adjudicate:<judge>``: one judge's vote; an abstention (no verdict word) is a
  miss.

Only rows whose source label is ``safe`` / ``unsafe`` are scored (a generated row has no gold label).
The gold micro category is the source's (``source_micro`` after adjudication); the jury's predicted
one is the adjudicator's code of an unsafe row. A judge names no code.

Definitions differ: a source's label follows its annotators' guideline (ToxiCN: toxic language),
the judges follow the taxonomy. The scores say how often they agree, not who is right.
"""

from __future__ import annotations

from typing import Any

from pipelines.core.rows import ERROR, OK, SAFE, UNSAFE
from pipelines.core.rundir import RunDir

#: labelling stages a cell may name, and the separator before a judge's name
LABEL_STAGES = ("jury", "adjudicate")
JUDGE_SEP = ":"
LABELS = (SAFE, UNSAFE)


def split_ref(ref: str) -> tuple[str, str | None]:
    """``'adjudicate:judge2'`` -> ``('adjudicate', 'judge2')``; ``'adjudicate'`` -> ``('adjudicate', None)``."""
    stage, _, judge = ref.partition(JUDGE_SEP)
    return stage, (judge or None)


def is_label_cell(ref: str) -> bool:
    stage, judge = split_ref(ref)
    return stage in LABEL_STAGES and (judge is not None or stage == "adjudicate")


def label_cell_refs(recipe: Any) -> list[str]:
    """The label cells a recipe's jury provides: the final decision and every judge's votes."""
    jury = recipe.stages.jury
    if jury is None:
        return []
    refs = [f"jury{JUDGE_SEP}{j}" for j in jury.judges]
    if recipe.stages.adjudicate is not None:
        refs += ["adjudicate", *(f"adjudicate{JUDGE_SEP}{j}" for j in jury.judges)]
    return refs


def _gold_micro(stage: str) -> str:
    return "source_micro" if stage == "adjudicate" else "micro"


def cell_columns(stage: str) -> tuple[str, ...]:
    """The columns a label cell reads of its stage's rows (its gold label and micro, the votes)."""
    return tuple(dict.fromkeys(["id", "source_label", _gold_micro(stage), "label", "micro", "votes"]))


#: the ones a stage reading a label cell needs (a gold micro code is optional, as in an evaluation)
CELL_COLUMNS = frozenset({"id", "source_label", "label", "votes"})


def _vote(row: dict, judge: str) -> str | None:
    for vote in row.get("votes") or []:
        if vote["judge"] == judge:
            return vote["verdict"] if vote["verdict"] in LABELS else None
    return None


def label_cell_rows(rundir: RunDir, ref: str) -> tuple[dict, dict]:
    """``(settings, {id: row})`` of a label cell, rows in the shape of
    :func:`~pipelines.evaluation.guard_eval.scored_rows` (``pred_label`` ``None``: a miss)."""
    stage, judge = split_ref(ref)
    gold_micro = _gold_micro(stage)
    rows: dict[str, dict] = {}
    columns = list(cell_columns(stage))
    for status in (OK, ERROR):
        for batch in rundir.iter_batches(stage, status, columns):
            for row in batch.to_pylist():
                if row.get("source_label") not in LABELS:
                    continue
                if judge is not None:
                    pred, pred_micro = _vote(row, judge), ""
                else:
                    final = row.get("label") if status == OK else None
                    pred = final if final in LABELS else None
                    pred_micro = (row.get("micro") or "") if pred == UNSAFE else ""
                if row["id"] in rows:
                    raise ValueError(f"{ref}: id {row['id']!r} labelled twice: rows are matched by id")
                rows[row["id"]] = {"id": row["id"], "label": row["source_label"],
                                   "micro": row.get(gold_micro) or "", "pred_label": pred, "pred_micro": pred_micro,
                                   "score": None, "pred_raw_label": pred, "unparsed": "" if pred else "no_verdict"}
    if not rows:
        raise ValueError(f"{ref}: no row of {stage} has a source label safe/unsafe to score against")
    settings = {"stage": ref, "adapter": "judge" if judge else "jury", "model": judge or "jury", "level": "prompt",
                "threshold": None, "score": False, "model_from": None}
    return settings, rows
