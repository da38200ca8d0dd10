"""Dataset assembly: stratified split, enforced train/test disjointness, statistics, card, exports."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.construction import Recipe, build_stages, load_recipe
from pipelines.core.config import ConfigError
from pipelines.core.rows import OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.labelling.assembly import (
    ROWS_PER_SPLIT_PARTITION,
    TEST,
    TRAIN,
    assign_split,
    enforce_disjoint,
    split_partitions,
    text_key,
    to_dataset_rows,
)
from tests.conftest import write_jsonl


def _labelled(n_per_stratum: dict[tuple[str, str], int]) -> list[dict]:
    rows = []
    for (micro, label), n in n_per_stratum.items():
        for i in range(n):
            rows.append({"id": f"{micro}-{label}-{i}", "prompt": f"{micro} {label} 第{i}条提示词 text {i}",
                         "label": label, "micro": micro, "macro": micro[0]})
    return rows


def test_assign_split_is_stratified_stable_and_keeps_identical_texts_together():
    texts = [f"text {i}" for i in range(10)] + ["text 3", "TEXT 3 "]  # two copies of "text 3"
    rows = [make_row(id=f"r{i}", text=t, label="unsafe", micro="A1", split="") for i, t in enumerate(texts)]
    table = to_dataset_rows(to_table(rows, {"split": pa.string()}), external=None)
    first = assign_split(table, test_share=0.3, seed=0)
    split = dict(zip(first.column("id").to_pylist(), first.column("split").to_pylist()))
    assert Counter(split[f"r{i}"] for i in range(10))[TEST] == 3      # round(0.3 * 10 distinct)
    assert split["r3"] == split["r10"] == split["r11"]                 # same normalised text
    reversed_table = table.take(list(range(table.num_rows))[::-1])
    again = assign_split(reversed_table, test_share=0.3, seed=0)
    assert dict(zip(again.column("id").to_pylist(), again.column("split").to_pylist())) == split
    other = assign_split(table, test_share=0.3, seed=1)
    assert dict(zip(other.column("id").to_pylist(), other.column("split").to_pylist())) != split


def test_the_stratum_shuffle_has_no_more_partitions_than_rows_or_strata_need():
    assert split_partitions(0, 31) == split_partitions(31, 31) == 1
    assert split_partitions(ROWS_PER_SPLIT_PARTITION + 1, 31) == 2
    assert split_partitions(10**9, 31) == 64                  # (31 codes + none) x (safe, unsafe)


def test_enforce_disjoint_drops_train_rows_that_overlap_test():
    rows = [make_row(id="a", text="x", label="safe", split=TRAIN),
            make_row(id="b", text="Y", label="safe", split=TRAIN),
            make_row(id="c", text="z", label="safe", split=TRAIN),
            make_row(id="t", text="y", label="safe", split=TEST)]
    table = to_table([{**r, "text_key": text_key(r["text"])} for r in rows],
                     {"split": pa.string(), "text_key": pa.string()})
    out = enforce_disjoint(table, test_ids=frozenset({"t", "a"}), test_keys=frozenset({text_key("y")}))
    status = dict(zip(out.column("id").to_pylist(), out.column("status").to_pylist()))
    assert status == {"a": "dropped", "b": "dropped", "c": "ok", "t": "ok"}
    assert set(out.column("reason").to_pylist()) == {"overlaps_test", ""}


def _recipe(tmp_path, internal, external, **assemble) -> Recipe:
    return Recipe.model_validate({
        "name": "assemble-test", "run_dir": str(tmp_path / "run"), "seed": 3,
        "stages": {
            "seeds": {
                "built": {"paths": [str(internal)], "columns": {"text": "prompt", "id": "id", "label": "label",
                                                                 "micro": "micro", "macro": "macro"},
                          "source": "rag"},
                "public": {"paths": [str(external)], "columns": {"text": "prompt", "id": "id", "label": "label"},
                           "label_map": {"harmful": "unsafe", "benign": "safe"}, "source": "external"},
            },
            "assemble": {"inputs": ["seeds_built"], "external": ["seeds_public"], "test_share": 0.25,
                         "licenses": {"external": "CC-BY-4.0 (example)"}, **assemble},
        },
    })


@pytest.mark.slow
def test_assembly_on_local_ray(tmp_path, ray_local):
    strata = {("A1", "unsafe"): 8, ("A1", "safe"): 4, ("B2", "unsafe"): 12, ("C3", "unsafe"): 1, ("D1", "safe"): 6}
    internal_rows = _labelled(strata)
    # an external row whose text equals an internal one, one with an unknown label
    external_rows = [{"id": f"ext-{i}", "prompt": f"public prompt {i}", "label": "harmful" if i % 2 else "benign"}
                     for i in range(6)]
    external_rows.append({"id": "ext-copy", "prompt": internal_rows[0]["prompt"].upper(), "label": "harmful"})
    external_rows.append({"id": "ext-bad", "prompt": "no label here", "label": "???"})
    internal = write_jsonl(tmp_path / "built.jsonl", internal_rows)
    external = write_jsonl(tmp_path / "public.jsonl", external_rows)
    recipe = _recipe(tmp_path, internal, external)
    manifests = run_stages(build_stages(recipe), RunDir(recipe.run_dir))

    m = manifests["assemble"]["rows"]
    assert manifests["seeds_public"]["rows"]["errored"] == 1            # unknown label: ingest error
    assert m["in"] == len(internal_rows) + 7 == m["out"] + m["dropped"] + m["errored"]
    rundir = RunDir(recipe.run_dir)
    table = pq.read_table(rundir.partition_uri("assemble", OK))
    rows = table.to_pylist()
    train = [r for r in rows if r["split"] == TRAIN]
    test = [r for r in rows if r["split"] == TEST]
    # disjoint by id and by normalised text
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {text_key(r["text"]) for r in train} & {text_key(r["text"]) for r in test}
    # external rows: train only
    assert all(r["split"] == TRAIN for r in rows if r["source"] == "external")
    # stratified: round(0.25 * n) of each stratum in test
    per = defaultdict(Counter)
    for r in rows:
        if r["source"] != "external":
            per[(r["micro"], r["label"])][r["split"]] += 1
    for stratum, n in strata.items():
        assert per[stratum][TEST] == int(0.25 * n + 0.5), stratum
        assert per[stratum][TEST] + per[stratum][TRAIN] == n

    # the external copy of a test text is dropped, or kept if its twin went to train
    twin_split = next(r["split"] for r in rows if r["id"] == internal_rows[0]["id"])
    dropped = pq.read_table(rundir.partition_uri("assemble", "dropped")).to_pylist() if m["dropped"] else []
    if twin_split == TEST:
        assert [d["id"] for d in dropped] == ["ext-copy"] and dropped[0]["reason"] == "overlaps_test"
    else:
        assert m["dropped"] == 0

    # exports: Parquet per split, HF dataset, stats, card
    import datasets

    hf = datasets.load_from_disk(rundir.uri("assemble", "dataset", "hf"))
    assert hf[TRAIN].num_rows == len(train) and hf[TEST].num_rows == len(test)
    assert {"votes", "decision", "lineage", "split"} <= set(hf[TRAIN].column_names)
    assert pq.read_table(rundir.uri("assemble", "dataset", "data", TEST)).num_rows == len(test)
    stats = json.loads(rundir.read_text("assemble/dataset/stats.json"))
    assert stats["rows"] == {TRAIN: len(train), TEST: len(test)}
    assert stats["by_source"]["external"][TRAIN] == {
        "safe": sum(r["label"] == "safe" for r in train if r["source"] == "external"),
        "unsafe": sum(r["label"] == "unsafe" for r in train if r["source"] == "external")}
    assert stats["by_micro"]["B2"][TEST]["unsafe"] == 3
    card = rundir.read_text("assemble/dataset/README.md")
    for needle in ("## Taxonomy", "A1", "## Sources and counts", "## How labels were decided",
                   "## Licence notes", "CC-BY-4.0 (example)", "## Fields", "votes"):
        assert needle in card
    assert "| external |" in rundir.read_text("assemble/dataset/stats.md")


def test_assembly_config_is_validated(tmp_path):
    data = {"name": "x", "run_dir": str(tmp_path / "run"),
            "stages": {"seeds": {"a": {"paths": [str(write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}]))]}},
                       "assemble": {"inputs": ["seeds_a"], "external": ["pe"]}}}
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"stages.assemble.external: \['pe'\]"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="in both inputs and external"):
        load_recipe(recipe, ["stages.assemble.external=[seeds_a]"])
    with pytest.raises(ConfigError, match="stages.assemble.test_share"):
        load_recipe(recipe, ["stages.assemble.external=[]", "stages.assemble.test_share=1.5"])
    with pytest.raises(ConfigError, match=r"stages.assemble.inputs: \['adjudicate'\]"):
        load_recipe(recipe, ["stages.assemble.external=[]", "stages.assemble.inputs=[adjudicate]"])
