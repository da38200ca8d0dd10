"""Issue 28, item 11: every candidate of the loop is accounted for. A candidate the classifier gave no
usable answer for (a ``loop2_label`` error row: it never reaches scoring), one the scorer gave no
score, one whose seed is not among the pairs stage's inputs (an orphan): each is in exactly one of a
pair, its seed's unpaired level counts, or ineligible with its reason; the report's ineligible
column counts them. Pure functions on pyarrow tables (no Ray), and the report over a run directory
written with pyarrow."""

from __future__ import annotations

import ast
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.config import CONFIGS
from pipelines.core.rows import DROPPED, ERROR, OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.taxonomy import DEFAULT_TAXONOMY
from pipelines.loop.generate import RewritePrompt
from pipelines.loop.levels import L1, L2, L3, L4
from pipelines.loop.pairs import _GROUP, candidate_markers, seed_markers, seed_pairs

PROMPT = RewritePrompt(str(CONFIGS / "prompts" / "loop_rewrite_unsafe.yaml"),
                       str(CONFIGS / "prompts" / "loop_rewrite_safe.yaml"), str(DEFAULT_TAXONOMY))
GUARD_LEVEL = {"level": pa.string()}  # a guard-evaluation row's level: "prompt", not a difficulty level


def _seeds() -> pa.Table:
    rows = [make_row(id=s, text=f"种子 {s}", label="unsafe", macro="D", micro="D5") for s in ("s1", "s2", "s3", "s4")]
    splits = ["train", "train", "train", "test"]
    return to_table([{**r, "split": sp} for r, sp in zip(rows, splits)], {"split": pa.string()})


def _candidate(cid: str, seed: str, **fields) -> dict:
    return make_row(id=cid, parent_id=seed, text=f"候选 {cid}", label="unsafe", macro="D", micro="D5",
                    source="gen", iteration=1, **fields)


def _scored_ok() -> pa.Table:
    levels = {"c1": ("s1", L1, "safe", 4), "c2": ("s1", L4, "unsafe", 5), "c3": ("s1", L2, "safe", 1),
              "c4": ("s1", L3, "unsafe", 2), "c10": ("gone", L1, "safe", 4), "c11": ("gone", L4, "unsafe", 4),
              "c9": ("s4", L1, "safe", 5)}
    return to_table([{**_candidate(c, s), "level": lv, "pred_label": p, "quality": q}
                     for c, (s, lv, p, q) in levels.items()],
                    {"quality": pa.int32(), "pred_label": pa.string(), "level": pa.string()})


def _scored_error() -> pa.Table:
    return to_table([{**_candidate("c5", "s1", status=ERROR, reason="unparseable_score"), "pred_label": "safe"}],
                    {"quality": pa.int32(), "pred_label": pa.string(), "level": pa.string()})


def _label_error() -> pa.Table:
    rows = [_candidate("c6", "s1", status=ERROR, reason="unparseable_output"),
            _candidate("c7", "s2", status=ERROR, reason="unparseable_output"),
            _candidate("c8", "s2", status=ERROR, reason="inference_error")]
    return to_table([{**r, "level": "prompt"} for r in rows], {**GUARD_LEVEL, "pred_label": pa.string()})


def _markers() -> pa.Table:
    from pipelines.loop.pairs import NO_PREDICTION, NO_SCORE

    return pa.concat_tables([
        seed_markers(_seeds()), candidate_markers(_scored_ok()),
        candidate_markers(_scored_error(), ineligible=NO_SCORE),
        candidate_markers(_label_error(), ineligible=NO_PREDICTION)])


CANDIDATES = 11  # c1-c11: scored, unscored, unlabelled, held-out seed, orphans


def _run(max_pairs: int | None) -> list[dict]:
    """seed_pairs over every group, as the stage's groupby calls it."""
    markers = _markers()
    groups = sorted(set(markers.column(_GROUP).to_pylist()))
    out = [seed_pairs(markers.filter(pa.compute.equal(markers.column(_GROUP), g)), seed=0, max_pairs=max_pairs,
                      split="train", iteration=2, prompt=PROMPT) for g in groups]
    return pa.concat_tables(out).to_pylist()


def _adds_up(acc: dict) -> bool:
    return acc["candidates"] == acc["paired"] + sum(acc["unpaired"].values()) + sum(acc["ineligible"].values())


@pytest.mark.parametrize("max_pairs,paired,unpaired", [(1, 2, {L2: 1, L3: 1}), (None, 4, {})])
def test_every_candidate_is_paired_unpaired_or_ineligible(max_pairs, paired, unpaired):
    from pipelines.loop.pairs import ORPHAN, accounting_totals

    rows = _run(max_pairs)
    per_seed = {r["parent_id"]: json.loads(r["accounting"]) for r in rows}
    assert all(_adds_up(acc) for acc in per_seed.values())
    s1 = per_seed["s1"]
    assert (s1["candidates"], s1["paired"], s1["unpaired"]) == (6, paired, unpaired)
    assert s1["ineligible"] == {"no_score:unparseable_score": 1, "no_prediction:unparseable_output": 1}
    assert per_seed["s2"]["ineligible"] == {"no_prediction:unparseable_output": 1, "no_prediction:inference_error": 1}
    assert per_seed["s3"]["candidates"] == 0
    assert per_seed["s4"]["ineligible"] == {"held_out_seed": 1}
    # the orphans get a row the stage does not write (its parent is no input row) but counts
    assert [(r["status"], json.loads(r["accounting"])["ineligible"]) for r in rows if r["parent_id"] == "gone"] == \
        [(ORPHAN, {"orphan": 2})]
    totals = accounting_totals(rows)
    assert totals["candidates"] == CANDIDATES and _adds_up(totals)
    assert totals["paired"] == paired and totals["seeds"] == 4
    assert totals["ineligible"] == {"no_score:unparseable_score": 1, "no_prediction:unparseable_output": 2,
                                    "no_prediction:inference_error": 1, "held_out_seed": 1, "orphan": 2}


def test_no_pair_reasons_see_the_classifier_errors():
    rows = {r["parent_id"]: r for r in _run(1) if r["status"] == DROPPED}
    # s2's candidates all lack a prediction: they exist, none is eligible (was: no_candidates)
    assert rows["s2"]["reason"] == "no_eligible_candidates"
    assert rows["s3"]["reason"] == "no_candidates"
    assert rows["s4"]["reason"] == "held_out_split"
    pairs = [r for r in _run(1) if r["status"] == OK]
    assert [(r["chosen_id"], r["rejected_id"]) for r in pairs] == [("c1", "c2")]
    assert ast.literal_eval(pairs[0]["levels"]) == {L1: 1, L2: 1, L3: 1, L4: 1, "ineligible": 2}


def _write(rundir: RunDir, stage: str, status: str, table: pa.Table) -> None:
    path = rundir._fs_path(stage, f"status={status}")
    rundir.fs.create_dir(path, recursive=True)
    pq.write_table(table.drop_columns(["status"]), f"{path}/part-0.parquet")


def test_the_report_counts_classifier_errors_as_ineligible(tmp_path):
    from pipelines.loop.report import LoopReportStage

    rundir = RunDir(str(tmp_path / "run"))
    _write(rundir, "loop2_score", OK, _scored_ok())
    _write(rundir, "loop2_score", ERROR, _scored_error())
    _write(rundir, "loop2_label", ERROR, _label_error())
    stage = LoopReportStage(["loop2_label", "loop2_score", "loop2_pairs"], systems=[],
                            taxonomy_path=str(DEFAULT_TAXONOMY))
    levels = stage.report(rundir)["levels"]
    # 1 unscored + 3 without a prediction; the scored ones by level (L1: c1, c9, c10)
    assert levels["total"] == {L1: 3, L2: 1, L3: 1, L4: 2, "ineligible": 4}
    assert levels["by_micro"] == {"D5": levels["total"]}


def test_the_report_shows_the_pairs_accounting(tmp_path):
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.loop.pairs import ACCOUNTING, accounting_totals
    from pipelines.loop.report import LoopReportStage, markdown

    rundir = RunDir(str(tmp_path / "run"))
    _write(rundir, "loop2_score", OK, _scored_ok())
    totals = accounting_totals(_run(1))
    rundir.write_text(f"loop2_pairs/{ACCOUNTING}", json.dumps(totals))
    report = LoopReportStage(["loop2_label", "loop2_score", "loop2_pairs"], systems=[],
                             taxonomy_path=str(DEFAULT_TAXONOMY)).report(rundir)
    assert report["pairs"]["accounting"] == totals
    assert f"{CANDIDATES} candidates = 2 in pairs" in markdown(report, load_taxonomy(DEFAULT_TAXONOMY))
    assert report["labelling"] is None  # loop2_label wrote no report here

    # C1's threshold, calibrated on the train seeds: the report says which and where it came from
    calibration = {"from": "loop2_calibrate", "rows": 40, "gold_unsafe": 22, "f1": 0.71, "threshold": 0.62}
    rundir.write_text("loop2_label/report/metrics.json", json.dumps(
        {"settings": {"threshold": 0.62, "threshold_calibration": calibration}}))
    report = LoopReportStage(["loop2_label", "loop2_score", "loop2_pairs"], systems=[],
                             taxonomy_path=str(DEFAULT_TAXONOMY)).report(rundir)
    assert report["labelling"] == {"threshold": 0.62, "calibration": calibration}
    assert ("P(unsafe) >= 0.620, the best-F1 threshold on `loop2_calibrate` (40 rows, 22 unsafe; F1 0.710"
            in markdown(report, load_taxonomy(DEFAULT_TAXONOMY)))

    # a one-iteration loop has no pairs stage: an earlier run's folder in the run directory is not its
    one_iteration = LoopReportStage(["loop0_train_c0", "loop0_eval_c0"], systems=[],
                                    taxonomy_path=str(DEFAULT_TAXONOMY)).report(rundir)
    assert one_iteration["pairs"]["accounting"] is None
    assert "candidates =" not in markdown(one_iteration, load_taxonomy(DEFAULT_TAXONOMY))


from tests.loop.test_loop_units import loop_recipe  # noqa: E402,F401  (the fixture)


def test_the_pairs_stage_reads_the_labelling_errors(loop_recipe):  # noqa: F811  (the fixture imported above)
    from pipelines.construction import build_stages, load_recipe

    stages = {s.name: s for s in build_stages(load_recipe(loop_recipe))}
    assert stages["loop2_pairs"].requires == ("loop2_score", "loop2_label")
    assert stages["loop2_pairs"].labelled == "loop2_label"
