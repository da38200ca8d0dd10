"""The TF-IDF + logistic regression floor (``baseline_<name>``) as a recipe runs it on local Ray: fit
on one split, evaluated on another by guard evaluation's row rule, compared beside a guard."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from pipelines.construction import Recipe, build_stages
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.evaluation.tfidf_baseline import TfidfBaselineConfig, fit_tfidf_lr
from tests.conftest import write_jsonl

UNSAFE_WORDS = ["炸药", "诈骗", "偷拍", "毒品", "黑客"]
SAFE_WORDS = ["菜谱", "旅游", "英语", "跑步", "花园"]


def labelled(n: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        unsafe = rng.random() < 0.5
        word = rng.choice(UNSAFE_WORDS if unsafe else SAFE_WORDS)
        rows.append({"id": f"{split}{i}", "text": f"请告诉我关于{word}的事情，第{i}个问题",
                     "label": "unsafe" if unsafe else "safe", "split": split})
    return rows


def recipe(tmp_path, rows: list[dict], train_rows: list[dict] | None = None, **baseline) -> Recipe:
    """Seeds ``lab`` (and ``train``, a stage read only for training, when ``train_rows`` is given)."""
    columns = {"text": "text", "id": "id", "label": "label", "split": "split"}
    seeds = {"lab": {"paths": [str(write_jsonl(tmp_path / "rows.jsonl", rows))], "source": "real", "columns": columns}}
    if train_rows is not None:
        seeds["train"] = {"paths": [str(write_jsonl(tmp_path / "train.jsonl", train_rows))], "source": "real",
                          "columns": columns}
    return Recipe.model_validate({
        "name": "floor", "run_dir": str(tmp_path / "run"),
        "stages": {"seeds": seeds,
                   "baseline": {"tfidf": {"train": ["seeds_train" if train_rows else "seeds_lab"],
                                          "inputs": ["seeds_lab"], **baseline}},
                   "compare": {"floor": {"systems": {"tfidf": {"test": "baseline_tfidf"}}, "resamples": 200}}}})


@pytest.mark.slow
def test_the_floor_fits_on_train_and_is_compared_on_test(tmp_path, ray_local):
    rows = labelled(120, 0, "train") + labelled(60, 1, "test") + [
        {"id": "nolabel", "text": "没有标签", "label": "", "split": "test"}]
    r = recipe(tmp_path, rows)
    manifests = run_stages(build_stages(r), RunDir(r.run_dir))
    m = manifests["baseline_tfidf"]
    # 120 train rows dropped (another split), 60 evaluated; the unlabelled row stopped at the seeds
    assert m["rows"] == {"in": 180, "out": 60, "out_parents": 60, "dropped": 120, "errored": 0}
    assert m["reasons"]["dropped"] == {"other_split": 120}
    assert sum(manifests["seeds_lab"]["reasons"]["errored"].values()) == 1
    assert m["summary"]["trained_rows"] == 120 and m["summary"]["rows_evaluated"] == 60
    rundir = RunDir(r.run_dir)
    scored = {row["id"]: row for row in pq.read_table(rundir.partition_uri("baseline_tfidf", "ok")).to_pylist()}
    # the same fit here gives the same P(unsafe) on every test row
    model = fit_tfidf_lr([x["text"] for x in rows if x["split"] == "train"],
                         [x["label"] for x in rows if x["split"] == "train"],
                         TfidfBaselineConfig(train=["a"], inputs=["a"]))
    test = [x for x in rows if x["split"] == "test" and x["label"]]
    for x, p in zip(test, model.predict_proba([x["text"] for x in test])[:, 1]):
        assert scored[x["id"]]["score"] == pytest.approx(p)
        assert scored[x["id"]]["pred_label"] == ("unsafe" if p >= 0.5 else "safe")
    gold = [x["label"] for x in sorted(test, key=lambda x: x["id"])]
    pred = [scored[x["id"]]["pred_label"] for x in sorted(test, key=lambda x: x["id"])]
    comparison = json.loads(rundir.read_text("compare_floor/report/comparison.json"))
    assert comparison["table2"]["tfidf"]["test"]["f1"] == pytest.approx(f1_score(gold, pred, pos_label="unsafe"))
    assert comparison["table2"]["tfidf"]["test"]["f1"] > 0.9  # the words decide the label: the floor learns them
    assert comparison["table2"]["tfidf"]["test"]["auprc"] is not None  # scored: curves and AUPRC


@pytest.mark.slow
def test_a_stage_read_only_for_training_is_accounted_for(tmp_path, ray_local):
    """Training rows from their own stage (ToxiCN's train file beside its test file): every one of
    them leaves the baseline as dropped, so its rows in = out + dropped + errored."""
    r = recipe(tmp_path, labelled(30, 1, "test"), train_rows=labelled(80, 0, "train") + labelled(5, 2, "val"))
    m = run_stages(build_stages(r), RunDir(r.run_dir))["baseline_tfidf"]
    assert m["rows"]["in"] == 115 and m["rows"]["out"] == 30 and m["reasons"]["dropped"] == {"training_input": 85}
    assert m["summary"]["trained_rows"] == 80  # the train split of that stage only


@pytest.mark.slow
def test_a_floor_trained_on_its_test_rows_is_refused(tmp_path, ray_local):
    rows = labelled(40, 0, "train")
    r = recipe(tmp_path, rows, split="train")
    with pytest.raises(ValueError, match=r"baseline_tfidf: 40 evaluated row\(s\) are also training rows"):
        run_stages(build_stages(r), RunDir(r.run_dir))


def test_the_floor_needs_both_labels_and_sane_ngrams():
    config = TfidfBaselineConfig(train=["a"], inputs=["a"])
    with pytest.raises(ValueError, match=r"training rows need both labels, got only \['safe'\]"):
        fit_tfidf_lr(["a", "b"], ["safe", "safe"], config)
    with pytest.raises(ValueError, match="ngram_range"):
        TfidfBaselineConfig(train=["a"], inputs=["a"], ngram_range=(3, 1))


def test_a_recipe_names_the_floor_and_the_jury_cells_in_a_comparison(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", labelled(4, 0, "test"))
    base = {"name": "c", "run_dir": str(tmp_path / "run"),
            "models": {"j": {"engine": "http", "model": "m", "url": "http://127.0.0.1:1/v1/chat/completions"}},
            "stages": {"seeds": {"lab": {"paths": [str(data)], "columns": {"text": "text", "label": "label"}}},
                       "jury": {"inputs": ["seeds_lab"], "judges": ["j"]}, "adjudicate": {"model": "j"},
                       "baseline": {"tfidf": {"train": ["seeds_lab"], "inputs": ["seeds_lab"]}}}}
    grid = {"floor": {"t": "baseline_tfidf"}, "judge": {"t": "adjudicate:j"}, "jury": {"t": "adjudicate"}}
    ok = Recipe.model_validate({**base, "stages": {**base["stages"], "compare": {"x": {"systems": grid}}}})
    names = [s.name for s in build_stages(ok)]
    assert (names.index("baseline_tfidf") < names.index("compare_x")
            and names.index("adjudicate") < names.index("compare_x"))
    bad = {**grid, "other": {"t": "adjudicate:nobody"}}
    with pytest.raises(ValueError, match=r"systems.other: \['adjudicate:nobody'\] are not guard evaluation"):
        Recipe.model_validate({**base, "stages": {**base["stages"], "compare": {"x": {"systems": bad}}}})
