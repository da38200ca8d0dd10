"""The trained-model artifact: what a training stage exports and where, and how another stage of the
same run uses it (``model_from: <stage>``).

A training stage writes its final Hugging Face model to ``RUN_DIR/<stage>/model/`` (:data:`MODEL_DIR`).
An evaluation stage names that stage and an endpoint under
``models:`` whose engine settings and sampling it runs the model with; the folder replaces the
endpoint's ``model`` when the stage runs (it does not exist when the recipe is loaded). The stage's
config hash holds a placeholder instead of the path, and the training stage is in its ``requires``,
so retraining re-evaluates.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core.config import LLMEndpoint, is_uri
from pipelines.core.rundir import RunDir

MODEL_DIR = "model"  # RUN_DIR/<training stage>/model: where the stage puts the exported model

# What a stage's manifest declares under ``exports`` (:meth:`pipelines.core.stage.Stage.exports`), for
# the tools that read a finished run without rebuilding its stages (``chillguard serve RUN_DIR``):
#: a trained guard: ``{"folder", "template", "taxonomy", "chat_template_kwargs"}``
GUARD_MODEL = "guard_model"
#: a guard evaluation: ``{"model_from", "threshold" (None: decided by the answer), "constrained",
#: "engine_kwargs"}``
GUARD_EVALUATION = "guard_evaluation"
#: calibrated decision thresholds: ``{"file"}``, a JSON file under the stage's folder mapping each
#: system to ``{"threshold", "model_from", "stage"}``
THRESHOLDS = "thresholds"


class TrainedModelError(RuntimeError):
    """The model a ``model_from`` names cannot be loaded (no export, a run directory in a bucket)."""


def trained_model_endpoint(endpoint: LLMEndpoint, rundir: RunDir, model_from: str | None,
                           stage: str) -> LLMEndpoint:
    """``endpoint``, with ``RUN_DIR/<model_from>/model`` as its ``model`` when ``model_from`` is set.

    vLLM and the tokenizer load the folder by path, so the run directory must be local (or a shared
    file system mounted at the same path on every node)."""
    if not model_from:
        return endpoint
    if is_uri(rundir.root):
        raise TrainedModelError(f"stage {stage}: model_from needs a local (or shared) run directory; vLLM "
                                f"and the tokenizer load {rundir.uri(model_from, MODEL_DIR)} by path")
    folder = Path(rundir.uri(model_from, MODEL_DIR))
    if not (folder / "config.json").is_file():
        raise TrainedModelError(f"stage {stage}: model_from {model_from}: {folder} holds no Hugging Face "
                                "model (config.json); did the training stage export it?")
    return endpoint.model_copy(update={"model": str(folder.resolve())})


def model_from_endpoint(endpoint: LLMEndpoint, model_from: str | None) -> LLMEndpoint:
    """The endpoint a stage holds until it runs: with ``model_from``, its ``model`` is ``<stage>/model``, a
    placeholder for the folder :func:`trained_model_endpoint` puts there at run time. So the stage's config
    hash names the training stage and not the recipe's stand-in model (the folder's contents are an input
    through the training stage's fingerprint)."""
    if not model_from:
        return endpoint
    return endpoint.model_copy(update={"model": f"<{model_from}>/{MODEL_DIR}"})
