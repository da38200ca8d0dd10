"""The stage registry: the one place a stage is declared.

A stage module defines its :class:`~pipelines.core.stage.Stage` classes and its config model, and
registers them with one :func:`register` call: the key of its section under ``stages:``, the config
model, the factory that builds its Stage objects from the recipe, its place in the pipeline (the key it
runs after) and its references to other sections. Everything that used to list stages by hand is
derived from the registry: the ``stages:`` model of recipes (:func:`recipe_model`), the order in which
``build_stages`` builds and the runner runs them (:func:`entries`), the stages a section needs enabled, and the
reference checks (inputs that name row stages running before, endpoints under ``models:``,
``model_from`` naming a training stage).

A section may be keyed (``seeds: {name: ...}`` -> ``seeds_<name>``) and one entry may produce several
Stage objects (``preprocess`` -> one stage per enabled step; ``shard`` -> its per-variant stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from pipelines.core.config import CONFIGS, ClusterConfig, ExistingPath, LLMEndpoint, OutputPath, Strict


@dataclass(frozen=True)
class StageEntry:
    #: the section under ``stages:`` (and the stage name of a single-stage, unkeyed entry)
    key: str
    #: the section's config model (for a keyed entry: the model of one value)
    config: type[Strict]
    #: ``(recipe, section) -> [Stage, ...]``: the stages of an enabled section, in run order
    build: Callable[[Any, Any], list]
    #: the key of the entry it runs after (``None``: first); fixes its place in the run order
    after: str | None
    #: ``stages.<key>`` is a map ``name -> config``; the stages are named ``<key>_<name>``
    keyed: bool = False
    #: sections that must be enabled with it (``stages.<key> needs stages ...``)
    needs: tuple[str, ...] = ()
    #: what later sections may name: ``rows`` (their ``inputs``) or ``model`` (``model_from``)
    provides: Literal["rows", "model"] | None = None
    #: ``section -> names`` of the stages it provides; default ``[key]`` or ``<key>_<name>`` per name
    names: Callable[[Any], list[str]] | None = None
    #: ``(section, refs) -> {recipe key: endpoint name}``: raises on a bad reference, returns the
    #: endpoints under ``models:`` it names (checked after every section's own references)
    check: Callable[[Any, References], dict[str, str | None]] | None = None
    #: the field description of its section in the recipe model
    description: str | None = None

    def section(self, stages: Any) -> Any:
        """Its section of a validated ``stages:`` (``None`` / ``{}`` when disabled)."""
        return getattr(stages, self.key)

    def enabled(self, stages: Any) -> bool:
        return bool(self.section(stages)) if self.keyed else self.section(stages) is not None

    def stage_names(self, stages: Any) -> list[str]:
        section = self.section(stages)
        if self.names is not None:
            return self.names(section)
        return [f"{self.key}_{name}" for name in section] if self.keyed else [self.key]


_ENTRIES: dict[str, StageEntry] = {}


def register(key: str, *, config: type[Strict], build: Callable[[Any, Any], list], after: str | None,
             **options: Any) -> StageEntry:
    """Declare a stage section (see :class:`StageEntry` for the options). Called once per section, at
    the bottom of the module that defines its stages and config."""
    if key in _ENTRIES:
        raise ValueError(f"stage section {key!r} is registered twice")
    entry = StageEntry(key=key, config=config, build=build, after=after, **options)
    _ENTRIES[key] = entry
    return entry


def entries() -> list[StageEntry]:
    """Registered sections in run order: each right after the one it names in ``after`` (followed by
    its own successors); sections placed after the same one run in the order of their keys."""
    children: dict[str | None, list[StageEntry]] = {}
    for entry in _ENTRIES.values():
        if entry.after is not None and entry.after not in _ENTRIES:
            raise ValueError(f"stage section {entry.key!r} runs after {entry.after!r}, which is not registered")
        children.setdefault(entry.after, []).append(entry)
    ordered: list[StageEntry] = []

    def place(after: str | None) -> None:
        for entry in sorted(children.get(after, []), key=lambda e: e.key):
            ordered.append(entry)
            place(entry.key)

    place(None)
    return ordered


@dataclass
class References:
    """What the reference checks of a section see: the recipe and the enabled stages."""

    recipe: Any
    #: enabled stages whose rows later stages can read, in run order
    order: list[str]
    #: enabled training stages (what ``model_from`` may name)
    trained: list[str]

    def before(self, first: str | None) -> list[str]:
        """The row stages that run before stage ``first`` (all of them when it is not one)."""
        return self.order[:self.order.index(first)] if first in self.order else list(self.order)

    def check_inputs(self, where: str, inputs: list[str], before: list[str] | None = None) -> None:
        """``inputs`` name enabled row stages (that run before, when ``before`` is given)."""
        allowed = self.order if before is None else before
        unknown = [n for n in inputs if n not in allowed]
        if unknown:
            kind = "enabled row stages" + ("" if before is None else " that run before it")
            raise ValueError(f"{where}: {unknown} are not {kind} (those are: {allowed or 'none'})")

    def check_trained(self, where: str, stage: str | None, model: str | None = None) -> None:
        """``stage`` (a ``model_from``) is an enabled training stage, and ``model``, the endpoint
        whose settings run its exported folder, is one that loads a folder: engine vllm."""
        if stage is None:
            return
        if stage not in self.trained:
            raise ValueError(f"{where}: {stage!r} is not an enabled training stage "
                             f"(enabled: {self.trained or 'none'})")
        endpoint = self.recipe.models.get(model) if model is not None else None
        if endpoint is not None and endpoint.engine != "vllm":
            raise ValueError(f"{where}: the model {stage} exports is a folder that only engine vllm loads; "
                             f"endpoint {model!r} is engine {endpoint.engine} (name an engine: vllm endpoint "
                             "for its settings)")


def check_references(recipe: Any) -> None:
    """The cross-section checks of a validated recipe; raises ``ValueError`` with the recipe key."""
    enabled = [e for e in entries() if e.enabled(recipe.stages)]
    keys = {e.key for e in enabled}
    for entry in enabled:
        missing = [n for n in entry.needs if n not in keys]
        if missing:
            raise ValueError(f"stages.{entry.key} needs stages {', '.join(missing)}")
    refs = References(recipe,
                      order=[n for e in enabled if e.provides == "rows" for n in e.stage_names(recipe.stages)],
                      trained=[n for e in enabled if e.provides == "model" for n in e.stage_names(recipe.stages)])
    models: dict[str, str | None] = {}
    for entry in enabled:
        if entry.check is not None:
            models.update(entry.check(entry.section(recipe.stages), refs))
    for key, model in models.items():
        if model is not None and model not in recipe.models:
            raise ValueError(f"{key}: {model!r} is not defined under models "
                             f"(defined: {sorted(recipe.models) or 'none'})")


class RecipeRoot(Strict):
    """A whole run: where it writes, how it reaches Ray, which models, which stages (``stages`` is
    added by :func:`recipe_model` from the registry)."""

    name: str
    run_dir: OutputPath
    seed: int = 0
    taxonomy: ExistingPath = Field(str(CONFIGS / "taxonomy.yaml"), validate_default=True)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: dict[str, LLMEndpoint] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_references(self) -> RecipeRoot:
        check_references(self)
        return self


def recipe_model() -> type[RecipeRoot]:
    """The recipe model of the registered sections: ``stages:`` has one optional field per section,
    in run order (a keyed section is a map, empty by default)."""
    fields: dict[str, Any] = {}
    for e in entries():
        if e.keyed:
            fields[e.key] = (dict[str, e.config], Field(default_factory=dict, description=e.description))
        else:
            fields[e.key] = (e.config | None, Field(None, description=e.description))
    stages = create_model("StagesConfig", __base__=Strict, **fields)
    return create_model("Recipe", __base__=RecipeRoot, stages=(stages, Field(default_factory=stages)))
