"""The rewriting-methods catalogue and its validation."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipelines.data.methods import DEFAULT_METHODS, MethodsError, load_methods


def test_shipped_catalogue():
    cat = load_methods()
    assert len(cat.benign) >= 10
    assert sorted(cat.unsafe) == ["A", "B", "C", "D", "E"]
    for macro, methods in cat.unsafe.items():
        names = {m.name for m in methods}
        for idea in ("homophonic_substitution", "cultural_allusion", "rhetorical_irony", "semantic_nesting"):
            assert f"{idea}_{macro.lower()}" in names, (macro, idea)
    assert cat.for_seed("safe", "A") == cat.benign
    assert cat.for_seed("unsafe", "D") == cat.unsafe["D"]
    assert cat.get("semantic_nesting_b").zh
    with pytest.raises(MethodsError, match="seed label must be safe or unsafe"):
        cat.for_seed("", "A")
    with pytest.raises(MethodsError, match="unknown rewriting method 'nope'"):
        cat.get("nope")


def _load(tmp_path, data):
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return load_methods(str(path))


@pytest.fixture(scope="module")
def shipped():
    return yaml.safe_load(DEFAULT_METHODS.read_text(encoding="utf-8"))


def test_validation_errors(tmp_path, shipped):
    data = copy.deepcopy(shipped)
    data["unsafe"]["B"][0]["name"] = data["benign"][0]["name"]
    with pytest.raises(MethodsError, match="duplicate method names"):
        _load(tmp_path, data)
    data = copy.deepcopy(shipped)
    del data["unsafe"]["E"]
    with pytest.raises(MethodsError, match="unsafe must list exactly the macros"):
        _load(tmp_path, data)
    data = copy.deepcopy(shipped)
    data["benign"][0]["name"] = "Formal Register"
    with pytest.raises(MethodsError, match="is not snake_case"):
        _load(tmp_path, data)
    data = copy.deepcopy(shipped)
    data["benign"][0]["colour"] = "red"
    with pytest.raises(MethodsError, match="benign.0.colour"):
        _load(tmp_path, data)
