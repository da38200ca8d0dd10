"""The human audit against labels people already gave: answer a ``chillguard audit export`` of a run
whose rows come from a human-labelled set (ToxiCN, ChineseHarm-Bench: ``seeds`` with their preset)
with those labels, written exactly as Label Studio's JSON export writes an annotated project, then
read it back with ``chillguard audit import``'s code.

    chillguard run configs/recipes/real_eval.yaml run_dir=runs/real_audit \\
        stages.seeds.toxicn_jury.sample=0.03 stages.jury.cascade=true --until adjudicate
    chillguard audit export runs/real_audit --stage jury --n 60
    python benchmarks/audit_dataset_labels.py runs/real_audit

The "annotator" is the source dataset's annotators: each task gets one annotation whose label is the
row's label before the jury (``source_label``: the human label the preset read) and, for an unsafe
row, the micro code the set's ``micro_map`` gives it (ToxiCN: from the target group; untargeted toxic
posts have none). So the report measures the jury against people, under the dataset's definition of
harm, not chillguard's 31-category policy (docs/real_models.md says where they meet). The export is
written to ``RUN_DIR/audit/dataset_labels_export.json`` and holds the rows' texts: keep the run
directory private (NonCommercial / NoDerivatives licences; never commit it).

With ``--labels HAND.json`` the annotator is a person who labelled the exported texts by hand instead
(``{"annotator": ..., "labels": {row_id: [label, micro or null]}}``, every exported row labelled): the
export is written as ``hand_labels_export.json`` under Label Studio user 2, the audit report goes to
``RUN_DIR/audit/hand/``, and the report adds the hand labels against the dataset's own labels
(agreement and kappa, the micro code where both say unsafe), so the annotator can be checked against
the people who labelled the set. Keep the labels file private too: it names the rows of a set whose
licence forbids derivatives.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Label Studio's user ids in the export (an export names users by id): the dataset's annotators, a hand labeller
DATASET_ANNOTATOR, HAND_ANNOTATOR = 1, 2


def annotation(aid: int, task_id: int, label: str, micro: str | None, at: str,
               user: int = DATASET_ANNOTATOR) -> dict:
    """One annotation as Label Studio's JSON export writes it (the Annotation model's fields)."""
    from pipelines.labelling.audit_sample import LABEL_CONTROL, MICRO_CONTROL, TEXT_OBJECT

    result = [{"id": f"{aid}-{control}", "type": "choices", "value": {"choices": [value]}, "origin": "manual",
               "to_name": TEXT_OBJECT, "from_name": control}
              for control, value in ((LABEL_CONTROL, label), (MICRO_CONTROL, micro)) if value]
    return {"id": aid, "completed_by": user, "result": result, "was_cancelled": False,
            "ground_truth": False, "created_at": at, "updated_at": at, "draft_created_at": None, "lead_time": None,
            "prediction": {}, "result_count": len(result), "unique_id": f"user{user}-{aid}", "import_id": None,
            "last_action": None, "bulk_created": False, "task": task_id, "project": 1,
            "updated_by": user, "parent_prediction": None, "parent_annotation": None,
            "last_created_by": None}


def dataset_export(tasks: list[dict], human: dict[str, tuple[str, str | None]],
                   user: int = DATASET_ANNOTATOR) -> list[dict]:
    """The exported tasks, numbered as Label Studio numbers them on import, each annotated by ``user``
    with ``human[row_id]`` = (label, micro)."""
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out = []
    for tid, imported in enumerate(tasks, start=1):
        label, micro = human[imported["data"]["row_id"]]
        out.append({"id": tid, "annotations": [annotation(tid, tid, label, micro, at, user)],
                    "file_upload": "tasks.json",
                    "drafts": [], "predictions": [tid] if imported.get("predictions") else [],
                    "data": imported["data"], "meta": {}, "created_at": at, "updated_at": at, "inner_id": tid,
                    "total_annotations": 1, "cancelled_annotations": 0,
                    "total_predictions": len(imported.get("predictions") or []), "comment_count": 0,
                    "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
                    "updated_by": None, "comment_authors": []})
    return out


def read_hand_labels(path: str, row_ids: list[str]) -> tuple[str, dict[str, tuple[str, str | None]]]:
    """The hand labeller's name and ``{row_id: (label, micro)}`` from ``--labels``; every exported row
    must be labelled ``safe`` or ``unsafe`` (one line naming the first that is not)."""
    from pipelines.core.rows import SAFE, UNSAFE

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        raise SystemExit(f"error: {path} has no 'labels' object ({{row_id: [label, micro]}})")
    out = {}
    for row_id in row_ids:
        value = labels.get(row_id)
        if not isinstance(value, list) or len(value) != 2 or value[0] not in (SAFE, UNSAFE):
            raise SystemExit(f"error: {path}: row {row_id} needs [\"safe\" or \"unsafe\", micro or null], "
                             f"got {value!r}")
        out[row_id] = (value[0], value[1] if value[0] == UNSAFE else None)
    return str(data.get("annotator") or "unnamed"), out


def against_dataset(hand: dict[str, tuple[str, str | None]],
                    dataset: dict[str, tuple[str, str | None]]) -> dict:
    """The hand labels against the dataset's: agreement (Wilson) and kappa on the binary label, and
    the micro code's agreement on rows both call unsafe and both give a code."""
    from pipelines.core.rows import UNSAFE
    from pipelines.labelling.audit_report import agreement_figures, wilson

    ids = sorted(hand)
    coded = [i for i in ids if hand[i][0] == dataset[i][0] == UNSAFE and hand[i][1] and dataset[i][1]]
    return {**agreement_figures([(hand[i][0], dataset[i][0]) for i in ids]),
            "confusion": {f"hand_{h}/dataset_{d}": sum(hand[i][0] == h and dataset[i][0] == d for i in ids)
                          for h in ("safe", "unsafe") for d in ("safe", "unsafe")},
            "micro": wilson(sum(hand[i][1] == dataset[i][1] for i in coded), len(coded))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", help="the exported tasks (default: RUN_DIR/audit/tasks.json)")
    parser.add_argument("--labels", help="hand labels of the exported rows (JSON, see the module docstring); "
                                         "default: annotate with the dataset's own labels")
    args = parser.parse_args()

    from pipelines.core.rows import OK, SAFE, UNSAFE
    from pipelines.core.rundir import RunDir
    from pipelines.labelling.audit_report import import_audit, interval_text, report_markdown
    from pipelines.labelling.audit_sample import AUDIT_DIR, SAMPLE_RECORD

    rundir = RunDir(args.run_dir, create=False)
    stage = json.loads(rundir.read_text(SAMPLE_RECORD))["stage"]
    dataset = {}
    for batch in rundir.iter_batches(stage, OK, ["id", "source_label", "micro"]):
        for row in batch.to_pylist():
            if row["source_label"] in (SAFE, UNSAFE):
                dataset[row["id"]] = (row["source_label"],
                                      (row["micro"] or None) if row["source_label"] == UNSAFE else None)
    audit_dir = Path(args.run_dir) / AUDIT_DIR
    tasks_path = Path(args.tasks) if args.tasks else audit_dir / "tasks.json"
    tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    row_ids = [t["data"]["row_id"] for t in tasks]
    unlabelled = [i for i in row_ids if i not in dataset]
    if unlabelled:
        raise SystemExit(f"error: {len(unlabelled)} exported rows carry no human label (source_label), first "
                         f"{unlabelled[0]}: the run's rows must come from a labelled set")
    if args.labels:
        annotator, hand = read_hand_labels(args.labels, row_ids)
        export, out = audit_dir / "hand_labels_export.json", audit_dir / "hand"
        export.write_text(json.dumps(dataset_export(tasks, hand, HAND_ANNOTATOR), ensure_ascii=False, indent=1),
                          encoding="utf-8")
        report = import_audit(args.run_dir, str(export), out=str(out))
        versus = against_dataset(hand, dataset)
        report = {**report, "annotator": annotator, "hand_vs_dataset": versus}
        (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        markdown = report_markdown(report) + "\n".join([
            "", "## The hand labels against the dataset's own labels", "", f"Annotator: {annotator}.", "",
            f"- agreement: {interval_text(versus['agreement'])}", f"- Cohen's kappa: {interval_text(versus['kappa'])}",
            f"- micro code where both say unsafe and both give one: {interval_text(versus['micro'])}", "",
            "| hand \\ dataset | safe | unsafe |", "|---|---|---|",
            *(f"| {h} | " + " | ".join(str(versus["confusion"][f"hand_{h}/dataset_{d}"]) for d in ("safe", "unsafe"))
              + " |" for h in ("safe", "unsafe")), ""])
        (out / "report.md").write_text(markdown, encoding="utf-8")
        print(markdown)
        print(f"export: {export}; report: {out}/report.md")
        return
    export = audit_dir / "dataset_labels_export.json"
    export.write_text(json.dumps(dataset_export(tasks, dataset), ensure_ascii=False, indent=1), encoding="utf-8")
    report = import_audit(args.run_dir, str(export))
    print(report_markdown(report))
    print(f"export: {export}; report: {audit_dir}/report.md")


if __name__ == "__main__":
    main()
