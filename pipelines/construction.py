"""The CHILLGuard data-construction driver: the recipe's stages, in order, with resume."""

from __future__ import annotations

import logging

from pipelines.config import Recipe, dump_recipe
from pipelines.ingest import IngestStage
from pipelines.rewrite import RewriteStage
from pipelines.rundir import RunDir
from pipelines.stage import Stage, run_stages

log = logging.getLogger(__name__)


def build_stages(recipe: Recipe) -> list[Stage]:
    """The stages the recipe enables, in pipeline order."""
    stages: list[Stage] = []
    if recipe.stages.ingest is not None:
        stages.append(IngestStage(recipe.stages.ingest))
    if recipe.stages.rewrite is not None:
        rewrite = recipe.stages.rewrite
        stages.append(RewriteStage(rewrite, recipe.models[rewrite.model]))
    return stages


def run_recipe(recipe: Recipe, stages: list[Stage], *, force: bool = False) -> dict[str, dict]:
    """Run ``stages`` (from :func:`build_stages`) into the recipe's run directory; return manifests.

    Stages are built by the caller before it connects to Ray, so template and reference problems
    fail before any cluster work.
    """
    rundir = RunDir(recipe.run_dir)
    rundir.write_text("recipe.yaml", dump_recipe(recipe))
    log.info("run directory: %s", recipe.run_dir)
    return run_stages(stages, rundir, force=force)
