"""Human audit, part 2: Label Studio's JSON export back in, the jury against the people.

``chillguard audit import RUN_DIR EXPORT.json`` reads a Label Studio JSON export (a list of tasks, each
with Label Studio's ``id``, our ``data`` and its ``annotations``: ``result``, ``was_cancelled``,
``ground_truth``, ``created_at``, ``updated_at``, ``completed_by``, ...), takes one human label per
task (:func:`human_answer`), and writes ``RUN_DIR/audit/report.json`` / ``report.md``:

- every exported row accounted for: annotated, cancelled (every annotation skipped), unlabelled (an
  annotation without a safe/unsafe choice), missing (no annotation, or not in the export file);
- human vs final label: agreement and Cohen's κ (scikit-learn), the confusion matrix;
- agreement per vote pattern; per judge, the judge's valid votes against the human label (agreement, κ);
- micro-code accuracy on the rows both call unsafe.

Intervals (95 %): agreement and accuracy shares by Wilson's score interval (statsmodels
``proportion_confint(method="wilson")``); κ by a percentile bootstrap over rows (seeded,
:data:`BOOTSTRAP_RESAMPLES` resamples, each row's two labels drawn together).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.reports import fmt
from pipelines.core.rows import UNSAFE
from pipelines.core.rundir import RunDir
from pipelines.labelling.audit_sample import (
    AUDIT_DIR,
    LABEL_CONTROL,
    MICRO_CONTROL,
    PATTERNS,
    SAMPLE_RECORD,
    AuditError,
    audit_rows,
    check_stage,
)
from pipelines.labelling.voting import LABELS

REPORT_JSON, REPORT_MD = f"{AUDIT_DIR}/report.json", f"{AUDIT_DIR}/report.md"
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
ANNOTATED, CANCELLED, UNLABELLED, MISSING = "annotated", "cancelled", "unlabelled", "missing"


# ------------------------------------------------------------------------------------------------
# Reading the export


def read_export(text: str, source: str) -> list[dict]:
    """The tasks of a Label Studio JSON export, or a one-line :class:`AuditError`: a JSON list of
    objects, each with ``id``, ``data`` (with our ``row_id``) and ``annotations`` (a list)."""
    try:
        tasks = json.loads(text)
    except ValueError as exc:
        raise AuditError(f"{source} is not a Label Studio JSON export: not JSON ({exc})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise AuditError(f"{source} is not a Label Studio JSON export: expected a JSON list of tasks")
    for t in tasks:
        if not isinstance(t.get("data"), dict) or not isinstance(t.get("annotations"), list) or "id" not in t:
            raise AuditError(f"{source} is not a Label Studio JSON export: a task without id, data or annotations "
                             "(export the project as JSON, not JSON-MIN or CSV)")
        if not t["data"].get("row_id"):
            raise AuditError(f"{source}: task {t['id']} has no data.row_id: its tasks were not written by "
                             "`chillguard audit export`")
    return tasks


def _choices(result: list[dict], control: str) -> list[str]:
    return [c for r in result if r.get("from_name") == control and r.get("type") == "choices"
            for c in (r.get("value") or {}).get("choices", [])]


def human_answer(annotations: list[dict]) -> tuple[str, str | None, str | None]:
    """``(status, label, micro)`` from a task's annotations: cancelled (skipped) ones are left out;
    of the rest a ground-truth annotation wins, then the latest (``updated_at``, then ``created_at``,
    then ``id``): the reviewer's settled answer when there is one, else the last word. Status:
    ``annotated``, ``cancelled`` (only skipped ones), ``unlabelled`` (its result has no single
    safe/unsafe choice), ``missing`` (none)."""
    if not annotations:
        return MISSING, None, None
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return CANCELLED, None, None
    best = max(kept, key=lambda a: (bool(a.get("ground_truth")), a.get("updated_at") or "",
                                    a.get("created_at") or "", str(a.get("id", ""))))
    labels = _choices(best.get("result") or [], LABEL_CONTROL)
    if len(labels) != 1 or labels[0] not in LABELS:
        return UNLABELLED, None, None
    micros = _choices(best.get("result") or [], MICRO_CONTROL)
    return ANNOTATED, labels[0], (micros[0] if len(micros) == 1 and labels[0] == UNSAFE else None)


# ------------------------------------------------------------------------------------------------
# Statistics


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A share with Wilson's score interval (``statsmodels.stats.proportion.proportion_confint``):
    with ``p̂ = k/n`` and ``z`` the normal quantile,
    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``. ``n = 0``: no figure."""
    if n == 0:
        return {"n": 0, "k": 0, "value": None, "low": None, "high": None}
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    return {"n": n, "k": successes, "value": successes / n, "low": float(low), "high": float(high)}


def binary_kappa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's κ of two 0/1 raters along the last axis (vectorised for the bootstrap):
    ``p_o`` = share of rows they agree on, ``p_e = p_a·p_b + (1−p_a)(1−p_b)`` with ``p_a``, ``p_b``
    their shares of 1, ``κ = (p_o − p_e) / (1 − p_e)``; NaN where ``p_e = 1`` (one class only).
    Equals ``sklearn.metrics.cohen_kappa_score`` on two labels (tested)."""
    p_o = (a == b).mean(-1)
    pa, pb = a.mean(-1), b.mean(-1)
    p_e = pa * pb + (1 - pa) * (1 - pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p_e < 1, (p_o - p_e) / np.where(p_e < 1, 1 - p_e, 1), np.nan)


def kappa(first: Sequence[str], second: Sequence[str], *, seed: int = 0,
          resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Cohen's κ of two label lists (``sklearn.metrics.cohen_kappa_score``) with a percentile
    bootstrap interval: ``resamples`` draws of the ``n`` rows with replacement (seeded), κ of each by
    :func:`binary_kappa`; the ``(1 ∓ confidence)/2`` quantiles of the defined ones. κ is undefined
    (``None``) when both raters use one and the same label throughout."""
    n = len(first)
    if n == 0:
        return {"n": 0, "value": None, "low": None, "high": None}
    from sklearn.metrics import cohen_kappa_score

    a = np.array([x == UNSAFE for x in first], dtype=np.float64)
    b = np.array([x == UNSAFE for x in second], dtype=np.float64)
    value = float(cohen_kappa_score(list(first), list(second), labels=list(LABELS))) \
        if not np.isnan(binary_kappa(a, b)) else None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws = binary_kappa(a[idx], b[idx])
    defined = draws[~np.isnan(draws)]
    if value is None or not defined.size:
        return {"n": n, "value": value, "low": None, "high": None}
    low, high = np.quantile(defined, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"n": n, "value": value, "low": float(low), "high": float(high)}


def agreement_figures(pairs: list[tuple[str, str]], *, seed: int = 0) -> dict[str, Any]:
    """``pairs`` of (human, other) labels -> agreement (Wilson) and κ (bootstrap)."""
    return {"agreement": wilson(sum(h == o for h, o in pairs), len(pairs)),
            "kappa": kappa([h for h, _ in pairs], [o for _, o in pairs], seed=seed)}


def audit_statistics(rows: list[dict], *, judges: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """The report's figures from annotated rows (``human``, ``human_micro``, ``label``, ``micro``,
    ``pattern``, ``votes``); rows without a final label (the adjudicator failed) are counted apart."""
    labelled = [r for r in rows if r["label"] in LABELS]
    pairs = [(r["human"], r["label"]) for r in labelled]
    confusion = Counter(f"human_{h}/final_{f}" for h, f in pairs)
    per_pattern = {p: wilson(sum(r["human"] == r["label"] for r in labelled if r["pattern"] == p),
                             sum(r["pattern"] == p for r in labelled)) for p in PATTERNS}
    per_judge = {}
    for judge in judges:
        voted = [(r["human"], v["verdict"]) for r in rows for v in r["votes"]
                 if v["judge"] == judge and v["verdict"] in LABELS]
        asked = sum(v["judge"] == judge for r in rows for v in r["votes"])
        per_judge[judge] = {**agreement_figures(voted, seed=seed), "valid_votes": len(voted),
                            "abstentions": asked - len(voted), "not_asked": len(rows) - asked}
    both_unsafe = [r for r in labelled if r["human"] == UNSAFE and r["label"] == UNSAFE]
    coded = [r for r in both_unsafe if r["human_micro"]]
    return {"rows": len(rows), "without_final_label": len(rows) - len(labelled),
            "overall": agreement_figures(pairs, seed=seed),
            "confusion": {k: confusion.get(k, 0) for k in
                          (f"human_{h}/final_{f}" for h in LABELS for f in LABELS)},
            "per_pattern": per_pattern, "per_judge": per_judge,
            "micro": {"both_unsafe": len(both_unsafe), "human_gave_no_code": len(both_unsafe) - len(coded),
                      "accuracy": wilson(sum(r["human_micro"] == r["micro"] for r in coded), len(coded))}}


# ------------------------------------------------------------------------------------------------
# The command


def import_audit(run_dir: str, export_path: str, *, out: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Read the export, match its tasks to the exported sample, write the report (``out``, default
    ``RUN_DIR/audit``); return it."""
    rundir = RunDir(run_dir, create=False)
    record_text = rundir.read_text(SAMPLE_RECORD) if rundir.exists() else None
    if record_text is None:
        check_stage(rundir, "jury")  # a path that holds no run says so first
        raise AuditError(f"{run_dir} has no audit sample ({SAMPLE_RECORD}): run `chillguard audit export` first")
    record = json.loads(record_text)
    check_stage(rundir, record["stage"])
    path = Path(export_path)
    if not path.is_file():
        raise AuditError(f"{export_path} does not exist")
    tasks = read_export(path.read_text(encoding="utf-8"), export_path)
    rows = {r["id"]: r for r in audit_rows(rundir, record["stage"])}
    unknown = [t["data"]["row_id"] for t in tasks if t["data"]["row_id"] not in rows]
    if unknown:
        raise AuditError(f"{export_path}: {len(unknown)} task(s) name rows that are not in stage "
                         f"{record['stage']!r} of {run_dir} (first: {unknown[0]}): wrong run directory?")
    sampled = set(record["ids"])
    outside = [t["data"]["row_id"] for t in tasks if t["data"]["row_id"] not in sampled]
    if outside:
        raise AuditError(f"{export_path}: {len(outside)} task(s) were not in this run's audit sample "
                         f"(first: {outside[0]}; {SAMPLE_RECORD} is the last export): import the matching file")
    by_row: dict[str, list[dict]] = {}
    for t in tasks:  # a row imported twice into Label Studio: its annotations together
        by_row.setdefault(t["data"]["row_id"], []).extend(t["annotations"])
    accounted, annotated = Counter(), []
    for row_id in record["ids"]:
        status, label, micro = human_answer(by_row.get(row_id, []))
        accounted[status] += 1
        if status == ANNOTATED:
            annotated.append({**rows[row_id], "human": label, "human_micro": micro})
    judges = list(dict.fromkeys(v["judge"] for r in rows.values() for v in r["votes"]))
    report = {"stage": record["stage"], "final_labels_from": record.get("final_labels_from"),
              "export": str(path), "sampled": len(record["ids"]), "tasks_in_export": len(tasks),
              "accounted": {k: accounted.get(k, 0) for k in (ANNOTATED, CANCELLED, UNLABELLED, MISSING)},
              "intervals": f"{CONFIDENCE:.0%}: shares by Wilson's score interval; kappa by a percentile bootstrap "
                           f"over rows ({BOOTSTRAP_RESAMPLES} resamples, seed {seed})",
              **audit_statistics(annotated, judges=judges, seed=seed)}
    text, markdown = json.dumps(report, indent=2, ensure_ascii=False), report_markdown(report)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.json").write_text(text, encoding="utf-8")
        (Path(out) / "report.md").write_text(markdown, encoding="utf-8")
    else:
        rundir.write_text(REPORT_JSON, text)
        rundir.write_text(REPORT_MD, markdown)
    return report


def interval_text(figure: dict[str, Any], digits: int = 3) -> str:
    """``0.912 [0.874, 0.940] (n=300)``; ``n/a`` where undefined."""
    if figure.get("value") is None:
        return f"n/a (n={figure.get('n', 0)})"
    span = f" [{fmt(figure['low'], digits)}, {fmt(figure['high'], digits)}]" if figure.get("low") is not None else ""
    return f"{fmt(figure['value'], digits)}{span} (n={figure['n']})"


def report_markdown(report: dict[str, Any]) -> str:
    acc = report["accounted"]
    lines = ["# Human audit of the jury", "",
             f"Stage `{report['stage']}` (final labels from `{report['final_labels_from']}`), "
             f"export `{report['export']}`.",
             f"Sampled {report['sampled']}: annotated {acc[ANNOTATED]}, cancelled {acc[CANCELLED]}, "
             f"unlabelled {acc[UNLABELLED]}, missing {acc[MISSING]}"
             f"; annotated rows without a final label: {report['without_final_label']}.",
             f"Intervals {report['intervals']}.", "",
             f"- agreement with the final label: {interval_text(report['overall']['agreement'])}",
             f"- Cohen's kappa: {interval_text(report['overall']['kappa'])}", "",
             "| human \\ final | safe | unsafe |", "|---|---|---|"]
    for h in LABELS:
        lines.append(f"| {h} | " + " | ".join(str(report["confusion"][f"human_{h}/final_{f}"]) for f in LABELS) + " |")
    lines += ["", "## Per vote pattern", "", "| pattern | agreement |", "|---|---|"]
    lines += [f"| {p} | {interval_text(f)} |" for p, f in report["per_pattern"].items()]
    lines += ["", "## Per judge (its valid votes against the human label)", "",
              "| judge | agreement | kappa | abstentions | not asked |", "|---|---|---|---|---|"]
    lines += [f"| {j} | {interval_text(f['agreement'])} | {interval_text(f['kappa'])} | {f['abstentions']} | "
              f"{f['not_asked']} |" for j, f in report["per_judge"].items()]
    micro = report["micro"]
    lines += ["", "## Micro code", "",
              f"On the {micro['both_unsafe']} rows both call unsafe ({micro['human_gave_no_code']} without a human "
              f"code): accuracy {interval_text(micro['accuracy'])}.", ""]
    return "\n".join(lines)

