"""The house's import rules (ARCHITECTURE.md): every module belongs to a room, rooms sit on layers, and
a module imports from its own room or from rooms of a lower layer, never sideways or up. Imports
inside functions count too (a lazy import still ties the rooms together); only annotations under
``if TYPE_CHECKING:`` are left out, since they never run."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: room -> layer. 0: the shared core; 1: the guard protocol and the Ray plumbing; 2: the features;
#: 3: what composes features (the loop, SHARD); 4: serving and the recipe driver; 5: the command line
LAYERS = {
    "pipelines": 0, "pipelines.core": 0,
    "pipelines.guard": 1, "actors": 1, "cluster": 1,
    "pipelines.data": 2, "pipelines.labelling": 2, "pipelines.training": 2, "pipelines.evaluation": 2,
    "pipelines.loop": 3, "pipelines.shard": 3,
    "pipelines.serve": 4, "pipelines.construction": 4,
    "pipelines.cli": 5,
}
PACKAGES = ("pipelines", "actors", "cluster")


def room(module: str) -> str:
    """``pipelines.evaluation.compare`` -> ``pipelines.evaluation``; ``actors.llm`` -> ``actors``;
    ``pipelines.cli`` -> ``pipelines.cli``."""
    parts = module.split(".")
    if parts[0] != "pipelines":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "pipelines"


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of our packages in ``path`` (relative imports resolved are
    not used here: the house writes absolute ones)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return out


def violations() -> list[str]:
    found = []
    for module, path in modules().items():
        here = room(module)
        for line, target in imports(path):
            there = room(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                found.append(f"{path.relative_to(REPO)}:{line}: {here} (layer {LAYERS[here]}) imports {target} "
                             f"({there}, layer {LAYERS[there]})")
    return found


def test_every_module_is_in_a_known_room():
    unknown = sorted({room(m) for m in modules()} - set(LAYERS))
    assert not unknown, f"rooms without a layer (add them to LAYERS and ARCHITECTURE.md): {unknown}"


def test_no_import_runs_sideways_or_up():
    assert violations() == []


def test_the_rule_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: core importing a feature, and a lazy one inside a function."""
    fake = tmp_path / "pipelines" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from pipelines.loop.report import eval_stage\n")
    (fake / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from pipelines.data.embedding import EmbedConfig\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations() == ["pipelines/core/bad.py:2: pipelines.core (layer 0) imports pipelines.loop.report "
                            "(pipelines.loop, layer 3)"]


@pytest.mark.parametrize("module,expected", [("pipelines.evaluation.compare", "pipelines.evaluation"),
                                             ("actors.llm", "actors"), ("pipelines.cli", "pipelines.cli"),
                                             ("pipelines", "pipelines")])
def test_rooms(module, expected):
    assert room(module) == expected
