"""The stage registry: the one place a stage is declared.

A stage module defines its :class:`~pipelines.core.stage.Stage` classes and its config model, and
registers them with one :func:`register` call: the key of its section under ``stages:``, the config
model, the factory that builds its Stage objects from the recipe and its references to other sections.
Everything that used to list stages by hand is derived from the registry: the ``stages:`` model of
recipes (:func:`recipe_model`), the stages a section needs enabled, and the reference checks (inputs
that name enabled row stages, endpoints under ``models:``, ``model_from`` naming a training stage).

No section says where it runs: the run order is a topological order of the graph of the stages'
declared inputs (:func:`pipelines.core.graph.run_order`, applied by ``build_stages``), independent
stages in the order the recipe lists their sections (:func:`listed_entries`). Validation refuses
inputs that form a cycle between sections (:func:`check_references`).

A section may be keyed (``seeds: {name: ...}`` -> ``seeds_<name>``) and one entry may produce several
Stage objects (``preprocess`` -> one stage per enabled step; ``shard`` -> its per-variant stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, PrivateAttr, create_model, model_serializer, model_validator

from pipelines.core.config import CONFIGS, ClusterConfig, ExistingPath, LLMEndpoint, OutputPath, Strict
from pipelines.core.graph import GraphError, run_order


@dataclass(frozen=True)
class StageEntry:
    #: the section under ``stages:`` (and the stage name of a single-stage, unkeyed entry)
    key: str
    #: the section's config model (for a keyed entry: the model of one value)
    config: type[Strict]
    #: ``(recipe, section) -> [Stage, ...]``: the stages of an enabled section (this order breaks ties
    #: between its stages in the run order)
    build: Callable[[Any, Any], list]
    #: ``stages.<key>`` is a map ``name -> config``; the stages are named ``<key>_<name>``
    keyed: bool = False
    #: sections that must be enabled with it (``stages.<key> needs stages ...``)
    needs: tuple[str, ...] = ()
    #: what other sections may name: ``rows`` (their ``inputs``) or ``model`` (``model_from``)
    provides: Literal["rows", "model"] | None = None
    #: ``section -> names`` of the stages it provides; default ``[key]`` or ``<key>_<name>`` per name
    names: Callable[[Any], list[str]] | None = None
    #: ``(section, refs) -> {recipe key: endpoint name}``: raises on a bad reference, returns the
    #: endpoints under ``models:`` it names (checked after every section's own references)
    check: Callable[[Any, References], dict[str, str | None]] | None = None
    #: ``section -> names`` of its stages that evaluate a guard on labelled rows (with a
    #: ``report/metrics.json``): what a comparison may name as a cell
    evaluations: Callable[[Any], list[str]] | None = None
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


def register(key: str, *, config: type[Strict], build: Callable[[Any, Any], list], **options: Any) -> StageEntry:
    """Declare a stage section (see :class:`StageEntry` for the options). Called once per section, at
    the bottom of the module that defines its stages and config."""
    if key in _ENTRIES:
        raise ValueError(f"stage section {key!r} is registered twice")
    entry = StageEntry(key=key, config=config, build=build, **options)
    _ENTRIES[key] = entry
    return entry


def entries() -> list[StageEntry]:
    """Registered sections in registration order (the import order of the stage modules; it decides
    nothing about the run order, only where a section's field sits in the recipe model)."""
    return list(_ENTRIES.values())


class StagesBase(Strict):
    """Base of the ``stages:`` model (:func:`recipe_model`): it remembers the order in which the recipe
    lists its sections, which breaks ties in the run order (:func:`listed_entries`), and writes the
    sections back in that order (a run's ``recipe.yaml`` read back keeps its run order)."""

    _listed: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_listing(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        stages = handler(data)
        if isinstance(data, dict):
            stages._listed = tuple(key for key in data if key in cls.model_fields)
        return stages

    @model_serializer(mode="wrap")
    def _dump_as_listed(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        data = handler(self)
        first = [key for key in self._listed if key in data]
        return {**{key: data[key] for key in first}, **{k: v for k, v in data.items() if k not in first}}

    def listed(self) -> tuple[str, ...]:
        """The section keys in the order the recipe lists them."""
        return self._listed


def evaluation_stages(stages: Any) -> list[str]:
    """The guard-evaluation stages of a validated ``stages:`` (each enabled section's ``evaluations``)."""
    return [name for e in listed_entries(stages) if e.evaluations is not None
            for name in e.evaluations(e.section(stages))]


def listed_entries(stages: Any) -> list[StageEntry]:
    """The enabled sections of a validated ``stages:`` in the order the recipe lists them (a section
    enabled afterwards by assignment follows them, in registration order): the order ``build_stages``
    builds them in, which breaks ties in the run order."""
    listed = stages.listed() if isinstance(stages, StagesBase) else ()
    rank = {key: i for i, key in enumerate(listed)}
    enabled = [e for e in entries() if e.enabled(stages)]
    return sorted(enabled, key=lambda e: rank.get(e.key, len(rank)))  # stable: the rest keep theirs


@dataclass
class References:
    """What the reference checks of a section see: the recipe and the enabled stages; it records the
    names each section reads, for the cycle check of :func:`check_references`."""

    recipe: Any
    #: enabled stages whose rows other stages can read (``inputs``), in the order the recipe lists them
    rows: list[str]
    #: enabled training stages (what ``model_from`` may name)
    trained: list[str]
    #: the section whose check runs now (set by :func:`check_references`)
    section: str | None = None
    #: ``section -> [(recipe key, names it reads), ...]``, from :meth:`check_inputs` and :meth:`check_trained`
    reads: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)

    def _read(self, where: str, names: list[str]) -> None:
        if self.section is not None and names:
            self.reads.setdefault(self.section, []).append((where, list(names)))

    def check_inputs(self, where: str, inputs: list[str]) -> None:
        """``inputs`` name enabled row stages. Any of them: the run order follows the inputs, and
        inputs that form a cycle are refused once every section is checked."""
        unknown = [n for n in inputs if n not in self.rows]
        if unknown:
            raise ValueError(f"{where}: {unknown} are not enabled row stages (those are: {self.rows or 'none'})")
        self._read(where, inputs)

    def check_trained(self, where: str, stage: str | None, model: str | None = None) -> None:
        """``stage`` (a ``model_from``) is an enabled training stage, and ``model``, the endpoint
        whose settings run its exported folder, is one that loads a folder: engine vllm."""
        if stage is None:
            return
        if stage not in self.trained:
            raise ValueError(f"{where}: {stage!r} is not an enabled training stage "
                             f"(enabled: {self.trained or 'none'})")
        self._read(where, [stage])
        endpoint = self.recipe.models.get(model) if model is not None else None
        if endpoint is not None and endpoint.engine != "vllm":
            raise ValueError(f"{where}: the model {stage} exports is a folder that only engine vllm loads; "
                             f"endpoint {model!r} is engine {endpoint.engine} (name an engine: vllm endpoint "
                             "for its settings)")


def check_cycles(enabled: list[StageEntry], stages: Any, reads: dict[str, list[tuple[str, list[str]]]]) -> None:
    """Refuse references that form a cycle between sections, in one line naming the recipe keys.

    Validation sees what a recipe writes, without building stages (which reads input files): which
    section's keys name which other section's stages (:class:`References` records them). Every
    section's stages descend from the stages that read its inputs, so a section whose inputs name one
    of its own stages, or sections whose inputs name each other round a loop, make a cycle of
    stages. ``build_stages`` checks the built stages' own graph too
    (:func:`pipelines.core.graph.run_order`), which covers the edges a section makes internally.
    """
    owner = {name: e.key for e in enabled if e.provides for name in e.stage_names(stages)}
    upstream = {e.key: [owner[n] for _, names in reads.get(e.key, []) for n in names if n in owner]
                for e in enabled}
    try:
        run_order(upstream)
    except GraphError as exc:
        if not exc.cycle:
            raise
        clauses = [f"{where} names {', '.join(n for n in names if owner.get(n) == up)}"
                   for up, down in zip(exc.cycle, exc.cycle[1:])
                   for where, names in reads[down] if any(owner.get(n) == up for n in names)]
        raise ValueError(f"the inputs form a cycle ({' -> '.join(f'stages.{key}' for key in exc.cycle)}): "
                         f"{'; '.join(clauses)}") from None


def check_references(recipe: Any) -> None:
    """The cross-section checks of a validated recipe; raises ``ValueError`` with the recipe key."""
    enabled = listed_entries(recipe.stages)
    keys = {e.key for e in enabled}
    for entry in enabled:
        missing = [n for n in entry.needs if n not in keys]
        if missing:
            raise ValueError(f"stages.{entry.key} needs stages {', '.join(missing)}")
    refs = References(recipe,
                      rows=[n for e in enabled if e.provides == "rows" for n in e.stage_names(recipe.stages)],
                      trained=[n for e in enabled if e.provides == "model" for n in e.stage_names(recipe.stages)])
    models: dict[str, str | None] = {}
    for entry in enabled:
        if entry.check is not None:
            refs.section = entry.key
            models.update(entry.check(entry.section(recipe.stages), refs))
    check_cycles(enabled, recipe.stages, refs.reads)
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
    in registration order (a keyed section is a map, empty by default)."""
    fields: dict[str, Any] = {}
    for e in entries():
        if e.keyed:
            fields[e.key] = (dict[str, e.config], Field(default_factory=dict, description=e.description))
        else:
            fields[e.key] = (e.config | None, Field(None, description=e.description))
    stages = create_model("StagesConfig", __base__=StagesBase, **fields)
    return create_model("Recipe", __base__=RecipeRoot, stages=(stages, Field(default_factory=stages)))
