"""Issue 30, item 4: a stage's identity and its config hash come from declared data.

A stage is given its name, inputs and requires by its constructor (``Stage.__init__``), and nothing
renames or rewires it afterwards. Its default config hash is every instance attribute but the ones the
base (or the stage, saying why) declares ``unhashed``, each made plain data by one function
(``pipelines.core.config.hash_value``): a kept setting is hashed without anyone listing it, an attribute
of a type that has no hash is an error naming it, and operational fields stay out through their marker.
No Ray: stages are built and hashed, never run.
"""

from __future__ import annotations

import ast
import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from pipelines.construction import build_stages, load_recipe
from pipelines.core.config import is_operational
from pipelines.core.stage import Stage
from tests.conftest import REPO
from tests.core.test_contracts import RECIPES, shipped

PIPELINES = REPO / "pipelines"
IDENTITY = ("name", "inputs", "requires")
PERTURBED = "<perturbed>"


# --- constructor identity ------------------------------------------------------------------------


class Plain(Stage):
    name = "plain"
    inputs = ("a",)
    requires = ("b",)


class Nameless(Stage):
    pass


def test_the_constructor_sets_name_inputs_and_requires():
    given = Plain(None, name="plain_x", inputs=["c", "d"], requires=("e",))
    assert (given.name, given.inputs, given.requires) == ("plain_x", ("c", "d"), ("e",))
    default = Plain(None)
    assert (default.name, default.inputs, default.requires) == ("plain", ("a",), ("b",))
    assert (Plain.name, Plain.inputs, Plain.requires) == ("plain", ("a",), ("b",))  # the class keeps its defaults
    assert Nameless(None, name="n").name == "n"
    with pytest.raises(TypeError, match="Nameless has no default name"):
        Nameless(None)


def test_stages_built_under_another_name_are_given_it():
    from pipelines.core.config import CONFIGS, LLMEndpoint
    from pipelines.core.taxonomy import DEFAULT_TAXONOMY
    from pipelines.data.preprocess import PreprocessSteps, build_steps
    from pipelines.evaluation.guard_eval import GuardEvalConfig, GuardEvalStage
    from pipelines.training.sft import GuardSFTConfig, GuardSFTStage

    steps = build_steps(PreprocessSteps(), ("loop1_generate",), {}, prefix="loop1_")
    assert [s.name for s in steps] == [f"loop1_{type(s).name}" for s in steps] and len(steps) > 1
    assert [s.inputs for s in steps] == [("loop1_generate",), *((s.name,) for s in steps[:-1])]
    sft = GuardSFTStage(GuardSFTConfig(model="Qwen/Qwen3-0.6B", inputs=["seeds_x"]), str(DEFAULT_TAXONOMY),
                        name="loop0_train_c0")
    assert (sft.name, sft.inputs) == ("loop0_train_c0", ("seeds_x",))
    http = LLMEndpoint(engine="http", model="m", url="http://127.0.0.1:1/v1/chat/completions")
    config = GuardEvalConfig(inputs=["seeds_x"], model="g", model_from="loop0_train_c0", score=False,
                             template=str(CONFIGS / "prompts" / "guard.yaml"))
    evaluation = GuardEvalStage("c0", config, http, str(DEFAULT_TAXONOMY), name="loop0_eval_c0")
    assert (evaluation.name, evaluation.requires) == ("loop0_eval_c0", ("loop0_train_c0",))
    assert GuardEvalStage("c0", config, http, str(DEFAULT_TAXONOMY)).name == "guard_eval_c0"
    # the model a training stage exports is known at run time: the stage holds, and hashes, a placeholder
    assert evaluation.endpoint.model == "<loop0_train_c0>/model"


def _stage_classes() -> dict[tuple[str, str], type[Stage]]:
    """Every stage class, by ``(module, class name)``: ``pipelines.construction`` imports every module that
    registers stages."""
    found, todo = {}, [Stage]
    while todo:
        cls = todo.pop()
        found[(cls.__module__, cls.__qualname__)] = cls
        todo += cls.__subclasses__()
    return found


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PIPELINES.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        yield module, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _assigned_attributes(node: ast.AST) -> Iterator[ast.Attribute]:
    for sub in ast.walk(node):
        targets = sub.targets if isinstance(sub, ast.Assign) else \
            [sub.target] if isinstance(sub, ast.AugAssign | ast.AnnAssign) else []
        for target in targets:
            for element in ast.walk(target):  # tuple targets: a.name, b.x = ...
                if isinstance(element, ast.Attribute) and isinstance(element.ctx, ast.Store):
                    yield element


def test_nothing_renames_or_rewires_a_stage_after_it_is_built():
    """No ``x.name = ...`` / ``x.inputs`` / ``x.requires`` in ``pipelines/`` but on ``self`` inside
    ``__init__``, and in a stage class not even there: only ``Stage.__init__`` sets them."""
    found, stages = [], _stage_classes()
    for module, tree in _modules():
        methods = {id(a): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for a in _assigned_attributes(f)}
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            if stages.get((module, cls.name)) not in (None, Stage):
                found += [f"{module}.{cls.name}:{a.lineno} sets self.{a.attr}"
                          for a in _assigned_attributes(cls) if a.attr in IDENTITY]
        for a in _assigned_attributes(tree):
            if a.attr in IDENTITY and not (isinstance(a.value, ast.Name) and a.value.id == "self"
                                           and methods.get(id(a)) == "__init__"):
                found.append(f"{module}:{a.lineno} sets {ast.unparse(a)}")
    assert not found, "identity set outside the constructor:\n" + "\n".join(found)
    assert len(stages) > 30  # the check saw the stage classes


def test_state_a_stage_sets_while_it_runs_is_declared_unhashed():
    """An attribute assigned outside ``__init__`` is runtime state (a summary, a count): it must be in the
    class's ``unhashed``, or a hash taken after the stage ran would differ from the one before."""
    found, stages = [], _stage_classes()
    for module, tree in _modules():
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            obj = stages.get((module, cls.name))
            if obj is None:
                continue
            for method in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"):
                for a in _assigned_attributes(method):
                    if isinstance(a.value, ast.Name) and a.value.id == "self" and a.attr not in obj.unhashed:
                        found.append(f"{module}.{cls.name}.{method.name}:{a.lineno} sets self.{a.attr}")
    assert not found, "runtime state that is not unhashed:\n" + "\n".join(found)


# --- the default hash ----------------------------------------------------------------------------


class Holder(Stage):
    name = "holder"


def test_an_attribute_of_a_type_without_a_hash_is_an_error_naming_it():
    stage = Holder(None)
    stage.lock = threading.Lock()
    with pytest.raises(TypeError, match=r"stage holder: attribute lock is a _thread\.lock, which has no config hash"):
        stage.config_hash()
    nested = Holder(None)
    nested.things = {"a": [1, object()]}
    with pytest.raises(TypeError, match=r"stage holder: attribute things\['a'\]\[1\] is a builtins\.object"):
        nested.config_hash()


def test_the_default_hash_covers_attributes_and_leaves_identity_and_runtime_state_out():
    from pipelines.data.vector_index import IndexConfig

    stage = Holder(IndexConfig(kind="ivf"), name="h", inputs=("a",))
    stage.seed, stage.prompt = 3, _Digest("d1")
    payload = stage.hash_payload()
    assert set(payload) == {"config", "seed", "prompt"}
    assert payload["prompt"] == "d1" and payload["seed"] == 3 and payload["config"]["kind"] == "ivf"
    assert "num_cpus" not in payload["config"]  # operational
    before = stage.config_hash()
    stage.run_key, stage._summary, stage.reads = "k", {"rows": 1}, frozenset({"id"})
    assert stage.config_hash() == before
    renamed = Holder(IndexConfig(kind="ivf"), name="other", inputs=("b",))
    renamed.seed, renamed.prompt = 3, _Digest("d1")
    assert renamed.hash_payload() == payload  # the name enters config_hash() beside the payload
    stage.prompt = _Digest("d2")
    assert stage.config_hash() != before


class _Digest:
    def __init__(self, digest: str):
        self.digest = digest

    def hash_payload(self) -> str:
        return self.digest


def _models(value: Any, keys: tuple = ()) -> Iterator[tuple[tuple, BaseModel]]:
    """The pydantic models an attribute holds (itself, or in a dict / list / tuple: the keys to reach it),
    without a hash of their own (``hash_payload``: hashed by what that returns, e.g. the taxonomy's digest)."""
    if callable(getattr(value, "hash_payload", None)):
        return
    if isinstance(value, BaseModel):
        yield keys, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _models(item, (*keys, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _models(item, (*keys, i))


def _fields(model: BaseModel, path: str) -> Iterator[tuple[str, bool, BaseModel]]:
    """``(field path, operational, the model with that field perturbed)`` for every field, nested too."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        yield f"{path}.{name}", is_operational(field), model.model_copy(update={name: PERTURBED})
        if isinstance(value, BaseModel) and not is_operational(field):
            for sub, operational, changed in _fields(value, f"{path}.{name}"):
                yield sub, operational, model.model_copy(update={name: changed})


def _replace(value: Any, path: tuple, new: Any) -> Any:
    """``value`` with the item at ``path`` (keys / indexes into dicts, lists, tuples) replaced by ``new``."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, key: _replace(value[key], rest, new)}
    items = list(value)
    items[key] = _replace(items[key], rest, new)
    return type(value)(items)


class _Rehashed:
    """``original`` with another hash: what it does is the original's (an override may use it)."""

    def __init__(self, original: Any):
        self._original = original

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def hash_payload(self) -> str:
        return PERTURBED


def _hashed_objects(value: Any, keys: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """The objects with a ``hash_payload()`` an attribute holds (itself, or in a dict / list / tuple)."""
    if callable(getattr(value, "hash_payload", None)):
        yield keys, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _hashed_objects(item, (*keys, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _hashed_objects(item, (*keys, i))


def _variants(stage: Stage) -> Iterator[tuple[str, bool, Stage]]:
    """Every hashed attribute of ``stage`` perturbed in turn: ``(what, operational, perturbed stage)``.
    A plain value (a seed, a count, a name) becomes another; an object hashed by its ``hash_payload()`` (a
    prompt, the taxonomy, a guard adapter) hashes as another; a config (or an endpoint, or one inside a
    dict or list) has one field perturbed at a time, at every depth."""
    for attr, value in vars(stage).items():
        if attr in stage.unhashed:
            continue
        if value is None or isinstance(value, str | int | float | bool):
            changed = copy.copy(stage)
            setattr(changed, attr, PERTURBED)
            yield attr, False, changed
            continue
        for keys, obj in _hashed_objects(value):
            changed = copy.copy(stage)
            setattr(changed, attr, _replace(value, keys, _Rehashed(obj)))
            yield attr + "".join(f"[{k!r}]" for k in keys), False, changed
        for keys, model in _models(value):
            for field, operational, perturbed in _fields(model, attr + "".join(f"[{k!r}]" for k in keys)):
                changed = copy.copy(stage)
                setattr(changed, attr, _replace(value, keys, perturbed))
                yield field, operational, changed


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic: a perturbed field holds a str
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_stage_hashes_every_setting_it_keeps_and_no_operational_one(path, tmp_path, monkeypatch):
    stages = build_stages(load_recipe(shipped(path, tmp_path, monkeypatch)))
    wrong, checked = [], 0
    for stage in stages:
        base = stage.config_hash()  # raises on an attribute without a hash
        for what, operational, changed in _variants(stage):
            checked += 1
            moved = changed.config_hash() != base
            if moved == operational:
                wrong.append(f"{stage.name}: {what} ({'operational' if operational else 'a setting'}) "
                             f"{'moves' if moved else 'does not move'} the hash")
    assert not wrong, f"{path.name}:\n" + "\n".join(wrong)
    assert checked > 10 * len(stages)


def test_operational_fields_of_a_shipped_stage_exist_to_be_checked(tmp_path, monkeypatch):
    """The check above sees operational fields (endpoints' concurrency, training's checkpoint period)."""
    stages = build_stages(load_recipe(shipped(REPO / "configs/recipes/demo.yaml", tmp_path, monkeypatch)))
    operational = {what.rsplit(".", 1)[-1] for stage in stages for what, op, _ in _variants(stage) if op}
    assert {"concurrency", "batch_size", "checkpoint_every_steps", "mode"} <= operational
