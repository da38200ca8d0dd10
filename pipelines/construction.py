"""The recipe -> stages driver: the recipe model of every registered stage, its loading, the stages
it enables in run order (the graph of their declared inputs), and running them with resume.

Stage modules register themselves (:func:`pipelines.core.registry.register`) when imported; this
module imports every module of the feature packages (every subpackage of ``pipelines`` but those in
:data:`NO_STAGES`), so a new stage module is found without being listed anywhere.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path

import pipelines
from pipelines.core.config import ConfigError, dump_recipe, read_recipe
from pipelines.core.contracts import ColumnError, check_columns
from pipelines.core.graph import GraphError, cycle_text, order_nodes
from pipelines.core.registry import listed_entries, recipe_model
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, run_stages

log = logging.getLogger(__name__)


#: subpackages that register no stage: the shared layer, the guard protocol, and serving (which imports
#: Ray Serve and FastAPI, which validating a recipe must not pay for)
NO_STAGES = ("core", "guard", "serve")


def _import_stage_modules() -> None:
    for package in pkgutil.iter_modules(pipelines.__path__):
        if package.ispkg and package.name not in NO_STAGES:
            path = [str(Path(pipelines.__path__[0]) / package.name)]
            for module in pkgutil.walk_packages(path, f"pipelines.{package.name}."):
                importlib.import_module(module.name)


_import_stage_modules()

#: the recipe model: name, run_dir, seed, taxonomy, cluster, models and one section per registered stage
Recipe = recipe_model()


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, resolved: bool = False) -> Recipe:
    """Read, override and validate a recipe; raise :class:`pipelines.core.config.ConfigError`
    naming the file and the key. ``resolved``: a run directory's ``recipe.yaml``
    (:func:`pipelines.core.config.as_written`)."""
    return read_recipe(Recipe, path, overrides, resolved=resolved)


def build_stages(recipe: Recipe) -> list[Stage]:
    """The stages the recipe enables, in run order: a topological order of the graph of their
    ``inputs`` and ``requires`` (:func:`pipelines.core.graph.run_order`). They are built section by
    section in the order the recipe lists its sections (:func:`pipelines.core.registry.listed_entries`),
    and that build order breaks the ties: a stage runs as early as its inputs allow, but never before a
    stage built ahead of it that is ready as well. A name that is no enabled stage, or a cycle, is a
    :class:`ConfigError` naming the recipe keys (validation refuses the ones a recipe can write; this
    checks the stages' own graph). So is an edge where a stage reads a column its upstream stage does
    not write (:func:`pipelines.core.contracts.check_columns`, the stages' column contracts)."""
    built: list[tuple[str, Stage]] = [(f"stages.{entry.key}", stage) for entry in listed_entries(recipe.stages)
                                      for stage in entry.build(recipe, entry.section(recipe.stages))]
    section = {stage.name: key for key, stage in built}
    try:
        stages = order_nodes([stage for _, stage in built])
    except GraphError as exc:
        if exc.dangling:
            raise ConfigError(f"recipe {recipe.name}: " + "; ".join(
                f"{section[name]}: stage {name} reads {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} no enabled stage of the recipe"
                for name, missing in exc.dangling.items())) from None
        if exc.cycle:
            keys = ", ".join(dict.fromkeys(section[name] for name in exc.cycle))
            raise ConfigError(f"recipe {recipe.name}: {keys}: the stages' inputs form a cycle "
                              f"({cycle_text(exc.cycle)})") from None
        raise ConfigError(f"recipe {recipe.name}: {exc}") from None
    try:
        check_columns(stages)
    except ColumnError as exc:
        raise ConfigError(f"recipe {recipe.name}: {section[exc.consumer]}: {exc}") from None
    return stages


def run_recipe(recipe: Recipe, stages: list[Stage], *, force: bool = False,
               max_concurrent: int | None = None) -> dict[str, dict]:
    """Run ``stages`` (from :func:`build_stages`) into the recipe's run directory; return manifests.
    ``max_concurrent``: stages side by side (default: ``cluster.max_concurrent_stages`` or its
    default for the recipe's address; see :func:`pipelines.core.stage.run_stages`).

    Stages are built by the caller before it connects to Ray, so template and reference problems
    fail before any cluster work. The run directory is locked for the whole run
    (:meth:`RunDir.lock`; raises :class:`pipelines.core.rundir.RunDirLocked` when another run holds it).
    """
    rundir = RunDir(recipe.run_dir)
    with rundir.lock():
        rundir.write_text("recipe.yaml", dump_recipe(recipe))
        log.info("run directory: %s", recipe.run_dir)
        if max_concurrent is None:
            max_concurrent = recipe.cluster.concurrent_stages()
        return run_stages(stages, rundir, force=force, max_concurrent=max_concurrent)
