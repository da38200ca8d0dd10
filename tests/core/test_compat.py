"""A run directory made by an older version of the code resumes without recomputing a stage.

``tests/fixtures/compat/run/`` was made by commit 4d2a4d1 (after f8dd97a: config hashes derived
from what a stage keeps; the run made before it, by b9967be, recomputed every stage once) from
``tests/fixtures/compat/recipe.yaml`` (ingest + a seed set + the model-free preprocessing steps). Today's
code must find every stage up to date: same config hashes, same input fingerprints, manifests untouched.
A refactor that changes a hash, a stage name or the order of stages fails here. No Ray: skipped stages
read no rows.

A change that recomputes on purpose says so in docs/reference.md (Run directory) and makes the fixture
again, from the repository root (a local Ray, no model, about 30 s)::

    rm -rf tests/fixtures/compat/run
    python -m pipelines.cli run tests/fixtures/compat/recipe.yaml
    rm tests/fixtures/compat/run/.lock   # the run's lock file (its _running/ folder is empty: git skips it)
"""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.construction import build_stages, load_recipe, run_recipe
from pipelines.core import stage as stage_module
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "compat"


def test_run_made_by_older_code_resumes_without_recomputing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    before = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/manifest.json")}
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository root

    def recompute(stage, *args, **kwargs):
        pytest.fail(f"stage {stage.name} was recomputed: its config hash or input fingerprint changed")

    monkeypatch.setattr(stage_module, "run_one", recompute)
    recipe = load_recipe(FIXTURE / "recipe.yaml", [f"run_dir={run_dir}"])
    stages = build_stages(recipe)
    assert [s.name for s in stages] == ["ingest", "seeds_mini", "normalize", "langid", "length_filter",
                                        "dedup", "near_dedup"]
    assert {s.name: s.config_hash() for s in stages} == {n: m["config_hash"] for n, m in before.items()}

    manifests = run_recipe(recipe, stages)

    assert manifests == before
    after = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/manifest.json")}
    assert after == before
