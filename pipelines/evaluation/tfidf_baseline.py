"""The floor a trained guard must beat, ``baseline_<name>``: TF-IDF over character n-grams and a
logistic regression (scikit-learn), trained on labelled rows and evaluated like a guard.

A guard fine-tuned from a pretrained backbone earns its GPU hours only where it beats this; the
comparison stage (:mod:`pipelines.evaluation.compare`) takes the stage as a cell beside guard
evaluations, so it gets the same F1 interval and McNemar tests on the same rows.

Rows. Training rows are the ``train`` stages' rows of ``train_split`` with a gold label; evaluated
rows are the ``inputs`` stages' rows of ``split``, read by guard evaluation's own rule
(:func:`~pipelines.evaluation.guard_eval.to_eval_rows`: other splits dropped, rows without a gold
label as input errors), so the same input gives the same evaluated rows as a guard's; the rows of a
stage read only for training are ``dropped`` (``training_input``). A row id in both is refused: a floor
trained on its test rows is no floor.

Score. ``score`` is the regression's P(unsafe); a row is predicted unsafe iff ``score >= threshold``.
Character n-grams need no word segmentation, which Chinese text would otherwise need.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.core.config import Strict
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.registry import References, register
from pipelines.core.reports import fmt
from pipelines.core.rows import DROPPED, ERROR, OK, SAFE, UNSAFE, to_table, union_all
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage
from pipelines.core.taxonomy import load_taxonomy
from pipelines.evaluation.guard_eval import EVAL_COLUMNS, REPORT_DIR, scored_rows, to_eval_rows
from pipelines.evaluation.metrics import evaluate

log = logging.getLogger(__name__)

#: the ``guard`` column of its rows and the ``adapter`` of its settings
ADAPTER = "tfidf_lr"


class TfidfBaselineConfig(Strict):
    """TF-IDF + logistic regression trained on ``train`` and evaluated on ``inputs``
    (``stages.baseline.<name>``, stage ``baseline_<name>``)."""

    train: list[str] = Field(min_length=1, description="row stages with the labelled training rows")
    train_split: str | None = Field("train", description="the split of `train` to fit on (null: every row)")
    inputs: list[str] = Field(min_length=1, description="row stages with the labelled rows to evaluate")
    split: str | None = Field("test", description="the split of `inputs` to evaluate (null: every row)")
    analyzer: Literal["char", "char_wb", "word"] = Field("char", description="TfidfVectorizer's analyzer")
    ngram_range: tuple[int, int] = Field((1, 3), description="shortest and longest n-gram")
    max_features: int | None = Field(200_000, ge=1, description="the most frequent n-grams kept (null: all)")
    C: float = Field(1.0, gt=0, description="inverse regularisation strength of the regression")
    class_weight: Literal["balanced"] | None = Field(None, description="`balanced` reweights the rarer class")
    threshold: float = Field(0.5, gt=0, lt=1, description="unsafe iff P(unsafe) >= threshold")
    seed: int = Field(0, description="of the regression's solver")

    @model_validator(mode="after")
    def _ngrams(self) -> TfidfBaselineConfig:
        low, high = self.ngram_range
        if not 1 <= low <= high:
            raise ValueError(f"ngram_range {list(self.ngram_range)}: need 1 <= shortest <= longest")
        return self


class BaselineError(ValueError):
    """The baseline cannot be trained or would not be a floor."""


def fit_tfidf_lr(texts: list[str], labels: list[str], config: TfidfBaselineConfig):
    """The fitted scikit-learn pipeline (vectorizer -> regression) on these rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    classes = set(labels)
    if classes != {SAFE, UNSAFE}:
        raise BaselineError(f"training rows need both labels, got only {sorted(classes) or 'none'}")
    model = make_pipeline(
        TfidfVectorizer(analyzer=config.analyzer, ngram_range=tuple(config.ngram_range),
                        max_features=config.max_features, sublinear_tf=True),
        LogisticRegression(C=config.C, class_weight=config.class_weight, max_iter=2000,
                           random_state=config.seed))
    model.fit(texts, [label == UNSAFE for label in labels])
    return model


def predict_rows(rows: list[dict], model, threshold: float) -> list[dict]:
    """Evaluation rows (``ok``, from :func:`to_eval_rows`) -> prediction rows: ``score`` = P(unsafe)."""
    if not rows:
        return []
    scores = model.predict_proba([r["text"] for r in rows])[:, 1]
    out = []
    for row, score in zip(rows, scores):
        label = UNSAFE if score >= threshold else SAFE
        out.append({**row, "guard": ADAPTER, "guard_model": ADAPTER, "answer_label": label, "pred_label": label,
                    "pred_micro": "", "pred_categories": [], "pred_raw_label": label, "score": float(score),
                    "raw_output": ""})
    return out


def _eval_rows(datasets: list, split: str | None) -> pa.Table:
    rows = union_all([d.map_batches(to_eval_rows, batch_format="pyarrow",
                                    fn_kwargs={"split": split, "level": "prompt"})
                      for d in datasets])
    tables = [t for t in rows.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(tables, promote_options="default") if tables else to_table([], EVAL_COLUMNS)


class TfidfBaselineStage(Stage):
    """``baseline_<name>``: fit on the training rows, write evaluation rows and a guard-style report."""

    name = "baseline"
    needs_rows = True

    def __init__(self, key: str, config: TfidfBaselineConfig, taxonomy_path: str):
        super().__init__(config, name=f"baseline_{key}", inputs=dict.fromkeys([*config.train, *config.inputs]))
        self.taxonomy = load_taxonomy(taxonomy_path)  # the report's per-category figures name the categories
        self.reads = frozenset({"id", "text", "label"})  # labelled rows, read as a guard evaluation reads them
        self.writes = PASSTHROUGH | (frozenset(EVAL_COLUMNS) - {"response"})  # prompt-level evaluation rows

    def write(self, inputs: dict, rundir: RunDir) -> None:
        c: TfidfBaselineConfig = self.config
        fitted = {n: _eval_rows([inputs[n]], c.train_split).to_pylist() for n in c.train}
        train = [r for rows in fitted.values() for r in rows if r["status"] == OK]
        # rows of a stage that is only read for training leave as dropped: every input row is accounted for
        train_only = [{**r, "status": DROPPED, "reason": "training_input",
                       "detail": f"a row of {n}, read to fit the baseline (labelled rows of split {c.train_split})"}
                      for n, rows in fitted.items() if n not in c.inputs for r in rows]
        rows = _eval_rows([inputs[n] for n in c.inputs], c.split).to_pylist()
        pending = [r for r in rows if r["status"] == OK]
        leaked = sorted({r["id"] for r in train} & {r["id"] for r in pending})
        if leaked:
            raise BaselineError(f"stage {self.name}: {len(leaked)} evaluated row(s) are also training rows "
                                f"(first: {leaked[0]!r}): check train_split and split")
        model = fit_tfidf_lr([r["text"] for r in train], [r["label"] for r in train], c)
        log.info("stage %s: fitted on %d rows (%d unsafe), %d n-grams", self.name, len(train),
                 sum(r["label"] == UNSAFE for r in train), len(model[0].vocabulary_))
        out = [r for r in rows if r["status"] != OK] + train_only + predict_rows(pending, model, c.threshold)
        rundir.write_table(self.name, OK, to_table([r for r in out if r["status"] == OK], EVAL_COLUMNS))
        for status in sorted({r["status"] for r in out} - {OK}):
            rundir.write_table(self.name, status, to_table([r for r in out if r["status"] == status], EVAL_COLUMNS))
        self._write_report(rundir, trained_rows=len(train), features=len(model[0].vocabulary_))

    def _write_report(self, rundir: RunDir, *, trained_rows: int, features: int) -> None:
        taxonomy = self.taxonomy
        c: TfidfBaselineConfig = self.config
        rows = scored_rows(rundir, self.name)
        metrics = {
            "settings": {"stage": self.name, "adapter": ADAPTER, "model": ADAPTER, "model_from": None,
                         "level": "prompt", "inputs": list(c.inputs), "split": c.split, "score": True,
                         "threshold": c.threshold, "train": list(c.train), "train_split": c.train_split,
                         "trained_rows": trained_rows, "features": features},
            "rows": {"evaluated": rows.num_rows, "errored": rundir.reason_counts(self.name, ERROR)},
            **evaluate(rows.column("label").to_pylist(), rows.column("pred_label").to_pylist(),
                       rows.column("micro").to_pylist(), taxonomy),
        }
        base = f"{self.name}/{REPORT_DIR}"
        rundir.write_text(f"{base}/metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
        o = metrics["overall"]
        rundir.write_text(f"{base}/report.md", "\n".join([
            f"# {self.name}: TF-IDF ({c.analyzer} {c.ngram_range[0]}-{c.ngram_range[1]}-grams) + logistic regression",
            "", f"Trained on {trained_rows} rows of {', '.join(c.train)} (split {c.train_split}), {features} n-grams; "
            f"evaluated on {rows.num_rows} rows of {', '.join(c.inputs)} (split {c.split}); unsafe iff "
            f"P(unsafe) >= {c.threshold}.", "",
            "| rows | precision | recall | F1 |", "|---|---|---|---|",
            f"| {o['rows']} | {fmt(o['precision'])} | {fmt(o['recall'])} | {fmt(o['f1'])} |", ""]))
        self._summary = {"trained_rows": trained_rows, "features": features, "rows_evaluated": rows.num_rows,
                         "f1": metrics["overall"]["f1"], "report": f"{REPORT_DIR}/report.md"}
        log.info("stage %s: F1 %s on %d rows", self.name, fmt(metrics["overall"]["f1"]), rows.num_rows)

    def summary(self, rundir: RunDir) -> dict[str, Any] | None:
        return getattr(self, "_summary", None)


def _check(sections: dict[str, TfidfBaselineConfig], refs: References) -> dict[str, str | None]:
    for key, config in sections.items():
        refs.check_inputs(f"stages.baseline.{key}.train", config.train)
        refs.check_inputs(f"stages.baseline.{key}.inputs", config.inputs)
    return {}


register("baseline", config=TfidfBaselineConfig, keyed=True, check=_check,
         evaluations=lambda sections: [f"baseline_{key}" for key in sections],
         build=lambda recipe, sections: [TfidfBaselineStage(key, config, recipe.taxonomy)
                                         for key, config in sections.items()],
         description="TF-IDF + logistic regression floors, trained and evaluated like a guard; each is stage "
         "baseline_<key>")
