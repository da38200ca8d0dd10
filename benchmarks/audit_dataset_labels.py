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
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Label Studio's user id in the export for the dataset's annotators (an export names users by id)
DATASET_ANNOTATOR = 1


def annotation(aid: int, task_id: int, label: str, micro: str | None, at: str) -> dict:
    """One annotation as Label Studio's JSON export writes it (the Annotation model's fields)."""
    from pipelines.labelling.audit_sample import LABEL_CONTROL, MICRO_CONTROL, TEXT_OBJECT

    result = [{"id": f"{aid}-{control}", "type": "choices", "value": {"choices": [value]}, "origin": "manual",
               "to_name": TEXT_OBJECT, "from_name": control}
              for control, value in ((LABEL_CONTROL, label), (MICRO_CONTROL, micro)) if value]
    return {"id": aid, "completed_by": DATASET_ANNOTATOR, "result": result, "was_cancelled": False,
            "ground_truth": False, "created_at": at, "updated_at": at, "draft_created_at": None, "lead_time": None,
            "prediction": {}, "result_count": len(result), "unique_id": f"dataset-{aid}", "import_id": None,
            "last_action": None, "bulk_created": False, "task": task_id, "project": 1,
            "updated_by": DATASET_ANNOTATOR, "parent_prediction": None, "parent_annotation": None,
            "last_created_by": None}


def dataset_export(tasks: list[dict], human: dict[str, tuple[str, str | None]]) -> list[dict]:
    """The exported tasks, numbered as Label Studio numbers them on import, each annotated with
    ``human[row_id]`` = (label, micro)."""
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out = []
    for tid, imported in enumerate(tasks, start=1):
        label, micro = human[imported["data"]["row_id"]]
        out.append({"id": tid, "annotations": [annotation(tid, tid, label, micro, at)], "file_upload": "tasks.json",
                    "drafts": [], "predictions": [tid] if imported.get("predictions") else [],
                    "data": imported["data"], "meta": {}, "created_at": at, "updated_at": at, "inner_id": tid,
                    "total_annotations": 1, "cancelled_annotations": 0,
                    "total_predictions": len(imported.get("predictions") or []), "comment_count": 0,
                    "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
                    "updated_by": None, "comment_authors": []})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", help="the exported tasks (default: RUN_DIR/audit/tasks.json)")
    args = parser.parse_args()

    from pipelines.core.rows import OK, SAFE, UNSAFE
    from pipelines.core.rundir import RunDir
    from pipelines.labelling.audit_report import import_audit, report_markdown
    from pipelines.labelling.audit_sample import AUDIT_DIR, SAMPLE_RECORD

    rundir = RunDir(args.run_dir, create=False)
    stage = json.loads(rundir.read_text(SAMPLE_RECORD))["stage"]
    human = {}
    for batch in rundir.iter_batches(stage, OK, ["id", "source_label", "micro"]):
        for row in batch.to_pylist():
            if row["source_label"] in (SAFE, UNSAFE):
                human[row["id"]] = (row["source_label"],
                                    (row["micro"] or None) if row["source_label"] == UNSAFE else None)
    tasks_path = Path(args.tasks) if args.tasks else Path(args.run_dir) / AUDIT_DIR / "tasks.json"
    tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    unlabelled = [t["data"]["row_id"] for t in tasks if t["data"]["row_id"] not in human]
    if unlabelled:
        raise SystemExit(f"error: {len(unlabelled)} exported rows carry no human label (source_label), first "
                         f"{unlabelled[0]}: the run's rows must come from a labelled set")
    export = Path(args.run_dir) / AUDIT_DIR / "dataset_labels_export.json"
    export.write_text(json.dumps(dataset_export(tasks, human), ensure_ascii=False, indent=1), encoding="utf-8")
    report = import_audit(args.run_dir, str(export))
    print(report_markdown(report))
    print(f"export: {export}; report: {Path(args.run_dir) / AUDIT_DIR}/report.md")


if __name__ == "__main__":
    main()
