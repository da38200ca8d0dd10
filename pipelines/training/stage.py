"""What every training stage shares: the stage base (:class:`TrainingStage`: its output is a trained
model, it holds its trainer's workers), where it keeps its Ray Train storage and logs, the check of its
rows before training, and the export of the finished model into the run directory
(``RUN_DIR/<stage>/model/``, :data:`~pipelines.core.artifacts.MODEL_DIR`, and ``logs/``)."""

from __future__ import annotations

from typing import Any

from pipelines.core.artifacts import MODEL_DIR
from pipelines.core.config import TrainingConfig, is_uri
from pipelines.core.rows import DROPPED, ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage
from pipelines.training.train_loop import HF_EXPORT, FitResult, TrainingPaused

LOGS_DIR = "logs"


class TrainingStage(Stage):
    """A stage whose output is a trained model (plus its tokenized rows). Its config's operational
    fields (stop_after_steps, checkpoint and report periods) are out of its hash: resuming a paused run
    with other values keeps the run key, and so the checkpoint folder."""

    needs_rows = True
    _summary: dict[str, Any] | None = None

    def summary(self, rundir: RunDir) -> dict[str, Any] | None:
        return self._summary

    def resources(self) -> dict[str, float]:
        """The trainer's workers (their CPUs, and a GPU each when training on GPUs) and one CPU for
        its data feed, as :func:`~pipelines.training.train_loop.fit` asks Ray for them."""
        from pipelines.training.train_loop import default_use_gpu

        c = self.config
        use_gpu = c.use_gpu if c.use_gpu is not None else default_use_gpu()
        return {"CPU": c.num_workers * c.cpus_per_worker + 1, **({"GPU": c.num_workers} if use_gpu else {})}


def finish_training(stage: Stage, rundir: RunDir, result: FitResult, log_dir: str) -> dict[str, Any]:
    """Copy the exported model and the logs into the stage folder; raise :class:`TrainingPaused`
    when the run stopped before its last step."""
    if not result.final:
        raise TrainingPaused(
            f"stage {stage.name}: stopped after step {result.metrics.get('step')} of "
            f"{result.plan.total_steps} (stop_after_steps); run again to continue from there")
    _copy_tree(f"{result.checkpoint_path}/{HF_EXPORT}", rundir.uri(stage.name, MODEL_DIR))
    _copy_tree(log_dir, rundir.uri(stage.name, LOGS_DIR))
    return {"plan": result.plan.as_dict(), "final_metrics": result.metrics,
            "model": rundir.uri(stage.name, MODEL_DIR)}


def read_metrics(rundir: RunDir, stage: str) -> list[dict[str, Any]]:
    """The per-step metrics a training stage logged (``RUN_DIR/<stage>/logs/metrics.jsonl``)."""
    import json

    text = rundir.read_text(f"{stage}/{LOGS_DIR}/metrics.jsonl") or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _copy_tree(src: str, dst: str) -> None:
    """Copy a folder between local paths and/or cloud URIs."""
    import pyarrow.fs as pafs

    src_fs, src_path = pafs.FileSystem.from_uri(src if is_uri(src) else f"file://{src}")
    dst_fs, dst_path = pafs.FileSystem.from_uri(dst if is_uri(dst) else f"file://{dst}")
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def train_dir(stage: Stage, rundir: RunDir) -> tuple[str, str]:
    """(Ray Train storage path, local log folder) in the stage's scratch space, which survives a
    crash and is keyed by the stage's config and inputs (a rerun of the same run resumes)."""
    storage = stage.work_uri(rundir, "ray_train")
    if is_uri(storage):
        import tempfile

        return storage, tempfile.mkdtemp(prefix=f"chillguard-{stage.name}-logs-")
    return storage, stage.work_uri(rundir, LOGS_DIR)


def check_rows(stage: Stage, rundir: RunDir, config: TrainingConfig, held_out: int = 0) -> int:
    """Trainable rows (``ok`` rows but the ``held_out`` validation ones), after refusing to train on
    bad rows unless ``on_bad_rows: skip``."""
    errors = rundir.reason_counts(stage.name, ERROR)
    if errors and config.on_bad_rows == "error":
        raise ValueError(
            f"stage {stage.name}: {sum(errors.values())} rows cannot be trained on ({errors}); "
            f"see {rundir.partition_uri(stage.name, ERROR)}. Fix the data or set on_bad_rows: skip")
    rows = rundir.count_rows(stage.name, OK) - held_out
    if rows == 0:
        raise ValueError(f"stage {stage.name}: no trainable rows (reasons: dropped "
                         f"{rundir.reason_counts(stage.name, DROPPED)}, errors {errors})")
    return rows
