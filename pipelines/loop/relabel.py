"""Relabelled rewrites (``stages.loop.relabel: jury``): the recipe's jury labels each iteration's
candidates after preprocessing and decontamination, and the jury's label becomes y* for the levels and
pairs (``loop2_pairs``) instead of the seed's label.

Stages per generation ``<prefix>`` (``loop1``: G0's candidates, ``loop2``: G1's, ``loop2_dpo``: G1
trained with DPO), reading ``<prefix>_decontaminate``:

- ``<prefix>_relabel``: the jury of ``stages.jury`` (its judges, templates, mode, quorum, cascade and
  constraint) over the candidates;
- ``<prefix>_relabel_adjudicate``: when the recipe has ``stages.adjudicate``, its adjudicator settles
  the rows without a majority (and names the micro category of unsafe ones), as in data construction.

The last of them adds the label drift (:func:`pipelines.loop.drift.label_drift`) to its summary.
A candidate the jury could not label has no y*: without an adjudicator, a row without a majority
(a tie, a missed quorum: :data:`NO_MAJORITY`); with one, an adjudication error row (its reason).
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from pipelines.core.rows import ERROR, LINEAGE, OK, column_or_lineage
from pipelines.core.stage import Stage
from pipelines.labelling.jury import AdjudicateStage, JuryStage
from pipelines.loop.drift import label_drift

#: why a candidate has no jury label when the recipe has no adjudicator to settle it
NO_MAJORITY = "no_majority"
_COLUMNS = ("id", "label", "source_label", "micro", "source_micro", "reason", LINEAGE)


def jury_outcome(row: dict[str, Any], status: str) -> tuple[str, str]:
    """``(jury label, "")`` for a candidate the jury (or its adjudicator) labelled, else ``("", why)``:
    an error row's reason, or :data:`NO_MAJORITY` for a jury row left for an adjudicator."""
    if status == ERROR:
        return "", row.get("reason") or ERROR
    return (row["label"], "") if row.get("label") else ("", NO_MAJORITY)


def outcome_rows(rundir, stage: str) -> list[dict[str, Any]]:
    """The relabelled candidates of ``stage`` (ok and error rows) as :func:`label_drift` reads them, plus
    ``why`` (no jury label) and ``text``. The seed's micro is ``source_micro`` on rows the adjudicator
    settled (it may have renamed ``micro``), else ``micro``."""
    out = []
    for status in (OK, ERROR):
        for info in rundir.parquet_files(stage, status):
            with rundir.fs.open_input_file(info.path) as f:
                parquet = pq.ParquetFile(f)
                names = [c for c in (*_COLUMNS, "text") if c in parquet.schema_arrow.names]
                rows = parquet.read(columns=names).to_pylist()
            for r in rows:
                label, why = jury_outcome(r, status)
                settled = status == OK and "source_micro" in r  # only the adjudicator writes it
                out.append({"id": r["id"], "text": r.get("text") or "", "seed_label": r.get("source_label") or "",
                            "jury_label": label, "why": why,
                            "micro": (r["source_micro"] if settled else r.get("micro")) or "",
                            "generator": column_or_lineage(r, "generator") or ""})
    return out


class _DriftSummary:
    """The stage's own summary plus ``drift`` (ids only: texts stay in the run's loop report)."""

    def summary(self, rundir) -> dict[str, Any]:
        own = super().summary(rundir) or {}  # type: ignore[misc]
        return {**own, "drift": label_drift(outcome_rows(rundir, self.name))}  # type: ignore[attr-defined]


class RelabelJuryStage(_DriftSummary, JuryStage):
    """``<prefix>_relabel`` when the recipe has no adjudicator: the jury's label is y*."""


class RelabelAdjudicateStage(_DriftSummary, AdjudicateStage):
    """``<prefix>_relabel_adjudicate``: the adjudicator settles the jury's open rows; its label is y*."""


def relabel_stages(recipe: Any, prefix: str, candidates: str) -> list[Stage]:
    """The relabelling stages of one generation's ``candidates`` stage; the last one gives y*."""
    jury = recipe.stages.jury
    name = f"{prefix}_relabel"
    config = jury.model_copy(update={"inputs": [candidates]})
    adjudicate = recipe.stages.adjudicate
    if adjudicate is None:
        return [RelabelJuryStage(config, recipe.models, recipe.taxonomy, name=name)]
    return [JuryStage(config, recipe.models, recipe.taxonomy, name=name),
            RelabelAdjudicateStage(adjudicate.model_copy(update={"inputs": [name]}), recipe.models[adjudicate.model],
                                   recipe.taxonomy, min_valid_votes=jury.quorum, name=f"{name}_adjudicate")]
