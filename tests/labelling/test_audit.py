"""Human audit: the stratified sample, Label Studio tasks out and its JSON export back in, the report's
figures against hand-computed ones, the one-line errors, and the cost lines of the dataset card.

The run directory is synthetic (jury and adjudicate partitions and manifests written as the stages write
them, no Ray); the export file is written as Label Studio's JSON export writes it (its documented task
format, https://labelstud.io/guide/task_format, and the fields of its export serializer in
label-studio 1.23.2: task ``id``/``data``/``annotations``/``predictions`` as ids, annotations with
``result``, ``was_cancelled``, ``ground_truth``, ``completed_by`` as a user id, timestamps)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.core.rows import OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.taxonomy import DEFAULT_TAXONOMY, load_taxonomy
from pipelines.labelling.assembly import AssembleConfig, dataset_card
from pipelines.labelling.audit_report import binary_kappa, human_answer, kappa
from pipelines.labelling.audit_sample import allocate, draw, label_config, vote_pattern
from pipelines.labelling.jury import JURY_COLUMNS, LABEL_COLUMNS
from pipelines.labelling.label_cost import audit_summary, cost_lines, labelling_cost

JUDGES = ["j1", "j2", "j3", "j4"]
S, U = "safe", "unsafe"
#: group -> (rows, the four verdicts ("" abstains), final label, final micro, how it was decided)
GROUPS = {"U": (10, [U, U, U, U], U, "A1", "majority"),       # unanimous unsafe
          "S": (6, [S, S, S, S], S, "", "majority"),          # unanimous safe
          "M": (4, [U, U, U, S], U, "B2", "majority"),        # 3-1
          "T": (4, [U, U, S, S], U, "C1", "adjudicated"),     # 2-2: the adjudicator
          "Q": (2, [S, S, "", ""], S, "", "adjudicated")}     # 2 valid votes of quorum 3


def _votes(verdicts):
    return [{"judge": j, "model": f"m-{j}", "raw": v or "不知道", "verdict": v} for j, v in zip(JUDGES, verdicts)]


def _run(tmp_path) -> RunDir:
    """A run directory with a finished jury (its majority labels, "" for the adjudicator) and adjudicate
    stage over it (the final labels), as the stages write them."""
    rundir = RunDir(str(tmp_path / "run"))
    jury, final = [], []
    for group, (n, verdicts, label, micro, decision) in GROUPS.items():
        for i in range(n):
            base = make_row(id=f"{group}{i}", text=f"合成的提示词 {group}{i}", label=label, micro="D1", source="rag",
                            votes=_votes(verdicts), source_label=label)
            jury.append({**base, "label": "" if decision == "adjudicated" else label,
                         "decision": "" if decision == "adjudicated" else "majority"})
            final.append({**base, "label": label, "micro": micro, "macro": micro[:1], "decision": decision,
                          "adjudicator": "arbiter", "adjudicator_answers": [], "flipped": False, "source_micro": "D1"})
    rundir.write_table("jury", OK, to_table(jury, JURY_COLUMNS))
    rundir.write_table("adjudicate", OK, to_table(final, LABEL_COLUMNS))
    rundir.write_manifest("jury", {"stage": "jury", "inputs": ["seeds_x"],
                                   "config": {"config": {"judges": JUDGES, "min_valid_votes": None}}})
    rundir.write_manifest("adjudicate", {"stage": "adjudicate", "inputs": ["jury"], "config": {"min_valid_votes": 3}})
    return rundir


# ------------------------------------------------------------------------------------------------
# Sampling


def test_vote_patterns_follow_the_jurys_rule():
    assert vote_pattern([U, U, U, U], judges=4, min_valid_votes=3) == "unanimous"
    assert vote_pattern([U, U, U], judges=4, min_valid_votes=3) == "unanimous"       # the cascade stopped
    assert vote_pattern([U, U, U, S], judges=4, min_valid_votes=3) == "majority"
    assert vote_pattern([U, "", U, U], judges=4, min_valid_votes=3) == "majority"    # an abstention
    assert vote_pattern([U, U, S, S], judges=4, min_valid_votes=3) == "tie"
    assert vote_pattern([S, S, None, ""], judges=4, min_valid_votes=3) == "quorum_missed"
    assert vote_pattern([], judges=4, min_valid_votes=3) == "quorum_missed"


def test_allocation_is_proportional_with_a_floor():
    sizes = {"big": 900, "mid": 90, "small": 8, "tiny": 2, "empty": 0}
    counts = allocate(sizes, 100, floor=5)
    assert counts == {"big": 81, "mid": 12, "small": 5, "tiny": 2}
    # by the docstring: b = (5, 5, 5, 2), R = 83, q = 83 · (895, 85, 3, 0) / 983 = (75.6, 7.2, 0.3, 0),
    # floors 82, the largest remainder (big) one more
    assert sum(counts.values()) == 100 and "empty" not in counts
    assert allocate(sizes, 2000) == {k: v for k, v in sizes.items() if v}       # n >= N: everything
    assert allocate({"a": 10, "b": 10, "c": 10}, 6, floor=5) == {"a": 5, "b": 5, "c": 5}  # the floor wins
    assert allocate({"a": 3, "b": 3}, 3, floor=0) in ({"a": 2, "b": 1}, {"a": 1, "b": 2})


def test_the_draw_is_stratified_and_deterministic_by_seed():
    rows = [{"id": f"r{i}", "pattern": "unanimous" if i < 80 else "tie", "micro": "A1" if i % 2 else ""}
            for i in range(100)]
    sample = draw(rows, 20, seed=1, floor=3)
    strata = {(p, m): sum(r["pattern"] == p and (r["micro"] or "-") == m for r in sample)
              for p in ("unanimous", "tie") for m in ("A1", "-")}
    # b = 3 each, R = 8, q = 8 · (37, 37, 7, 7) / 88 = (3.4, 3.4, 0.6, 0.6): the two ties get the remainders
    assert strata == {("unanimous", "A1"): 6, ("unanimous", "-"): 6, ("tie", "A1"): 4, ("tie", "-"): 4}
    assert [r["id"] for r in draw(rows[::-1], 20, seed=1, floor=3)] == [r["id"] for r in sample]
    assert {r["id"] for r in draw(rows, 20, seed=2, floor=3)} != {r["id"] for r in sample}


def test_label_config_is_xml_with_the_taxonomy_codes():
    root = ET.fromstring(label_config(load_taxonomy()))
    controls = {c.get("name"): [ch.get("value") for ch in c] for c in root.iter("Choices")}
    assert controls["label"] == ["safe", "unsafe"]
    assert controls["micro"] == load_taxonomy().micro_codes and len(controls["micro"]) == 31
    assert {t.get("name"): t.get("value") for t in root.iter("Text")}["text"] == "$text"


# ------------------------------------------------------------------------------------------------
# The round trip


def _result(label=None, micro=None):
    out = []
    for control, value in (("label", label), ("micro", micro)):
        if value:
            out.append({"id": f"r-{control}", "type": "choices", "value": {"choices": [value]}, "origin": "manual",
                        "to_name": "text", "from_name": control})
    return out


def _annotation(aid, task_id, result, *, cancelled=False, ground_truth=False, at="2026-12-06T10:00:00.000000Z"):
    """An annotation as Label Studio's JSON export writes it (Annotation fields, completed_by an id)."""
    return {"id": aid, "completed_by": 1, "result": [] if cancelled else result, "was_cancelled": cancelled,
            "ground_truth": ground_truth, "created_at": at, "updated_at": at, "draft_created_at": None,
            "lead_time": 12.5, "prediction": {}, "result_count": len(result), "unique_id": f"u-{aid}",
            "import_id": None, "last_action": None, "bulk_created": False, "task": task_id, "project": 1,
            "updated_by": 1, "parent_prediction": None, "parent_annotation": None, "last_created_by": None}


#: what the "human" answers per exported row id: (label, micro) per annotation, or a keyword
HUMAN = {**{f"U{i}": [(U, "A1" if i < 8 else "A2")] for i in range(10)},
         "U0": ["gt-old", (S, None)],                          # a ground-truth unsafe A1 wins over a later safe
         "S0": "absent", "S1": [(U, "D1")], **{f"S{i}": [(S, None)] for i in range(2, 6)},
         "M0": [(U, "B2")], "M1": [(U, "B2")], "M2": [(S, None)], "M3": [(None, None)],   # M3: no choice made
         "T0": [(U, "C1")], "T1": [(U, None)], "T2": [(S, None)], "T3": [(S, None)],
         "Q0": "cancelled", "Q1": [(U, "A1"), (S, None)]}      # the later annotation wins


def _label_studio_export(tasks: list[dict]) -> list[dict]:
    """The imported tasks as Label Studio's JSON export returns them, annotated as :data:`HUMAN` says."""
    out, aid = [], 100
    for tid, imported in enumerate(tasks, start=1):
        answer = HUMAN[imported["data"]["row_id"]]
        if answer == "absent":
            continue
        annotations = []
        if answer == "cancelled":
            annotations.append(_annotation(aid, tid, [], cancelled=True))
        else:
            for k, item in enumerate(answer):
                aid += 1
                at = f"2026-12-06T1{k}:00:00.000000Z"
                if item == "gt-old":
                    annotations.append(_annotation(aid, tid, _result(U, "A1"), ground_truth=True,
                                                   at="2026-12-05T09:00:00.000000Z"))
                else:
                    annotations.append(_annotation(aid, tid, _result(*item), at=at))
        out.append({"id": tid, "annotations": annotations, "file_upload": "tasks.json", "drafts": [],
                    "predictions": [tid], "data": imported["data"], "meta": {},
                    "created_at": "2026-12-06T09:00:00.000000Z", "updated_at": "2026-12-06T12:00:00.000000Z",
                    "inner_id": tid, "total_annotations": sum(not a["was_cancelled"] for a in annotations),
                    "cancelled_annotations": sum(a["was_cancelled"] for a in annotations), "total_predictions": 1,
                    "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None,
                    "project": 1, "updated_by": None, "comment_authors": []})
    return out


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half / (1 + z * z / n), centre + half / (1 + z * z / n)


def test_export_then_label_studio_export_back_gives_the_hand_computed_report(tmp_path, capsys):
    rundir = _run(tmp_path)
    assert main(["audit", "export", rundir.root, "--n", "100", "--seed", "3"]) == 0
    tasks = json.loads(rundir.read_text("audit/tasks.json"))
    assert len(tasks) == 26 and {t["data"]["row_id"] for t in tasks} == set(HUMAN)
    by_id = {t["data"]["row_id"]: t for t in tasks}
    # the final label (the adjudicator's for ties) and micro code as a pre-annotation, votes in data
    assert by_id["T0"]["predictions"][0]["result"] == [
        {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [U]}},
        {"from_name": "micro", "to_name": "text", "type": "choices", "value": {"choices": ["C1"]}}]
    assert by_id["T0"]["predictions"][0]["score"] == 0.5 and by_id["T0"]["data"]["pattern"] == "tie"
    assert by_id["Q1"]["data"]["pattern"] == "quorum_missed" and by_id["M0"]["data"]["pattern"] == "majority"
    assert by_id["M0"]["data"]["votes"][3] == {"judge": "j4", "verdict": S}
    assert ET.fromstring(rundir.read_text("audit/label_config.xml")).tag == "View"

    export = tmp_path / "project-1-at-2026-12-06.json"
    export.write_text(json.dumps(_label_studio_export(tasks), ensure_ascii=False))
    assert main(["audit", "import", rundir.root, str(export)]) == 0
    report = json.loads(rundir.read_text("audit/report.json"))
    assert report["accounted"] == {"annotated": 23, "cancelled": 1, "unlabelled": 1, "missing": 1}
    assert report["confusion"] == {"human_safe/final_safe": 5, "human_safe/final_unsafe": 3,
                                   "human_unsafe/final_safe": 1, "human_unsafe/final_unsafe": 14}
    overall = report["overall"]
    assert overall["agreement"]["k"] == 19 and overall["agreement"]["n"] == 23
    assert (overall["agreement"]["low"], overall["agreement"]["high"]) == pytest.approx(_wilson(19, 23))
    # p_o = 19/23; p_e = (15·17 + 8·6) / 23²; κ = (437 − 303) / (529 − 303)
    assert overall["kappa"]["value"] == pytest.approx(134 / 226)
    assert overall["kappa"]["low"] < 134 / 226 < overall["kappa"]["high"]
    assert {p: (f["k"], f["n"]) for p, f in report["per_pattern"].items()} == {
        "unanimous": (14, 15), "majority": (2, 3), "tie": (2, 4), "quorum_missed": (1, 1)}
    judges = {j: (f["agreement"]["k"], f["agreement"]["n"], f["abstentions"]) for j, f in report["per_judge"].items()}
    assert judges == {"j1": (19, 23, 0), "j2": (19, 23, 0), "j3": (18, 22, 1), "j4": (17, 22, 1)}
    assert report["micro"]["both_unsafe"] == 14 and report["micro"]["human_gave_no_code"] == 1
    assert (report["micro"]["accuracy"]["k"], report["micro"]["accuracy"]["n"]) == (11, 13)
    markdown = rundir.read_text("audit/report.md")
    assert "annotated 23, cancelled 1, unlabelled 1, missing 1" in markdown and "0.593 [" in markdown
    assert "agreement" in capsys.readouterr().out


def test_annotation_choice_skips_cancelled_then_prefers_ground_truth_then_latest():
    old, new = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"
    gt = _annotation(1, 1, _result(U, "B1"), ground_truth=True, at=old)
    late = _annotation(2, 1, _result(S), at=new)
    assert human_answer([gt, late]) == ("annotated", U, "B1")
    assert human_answer([_annotation(3, 1, _result(U), at=old), late]) == ("annotated", S, None)
    assert human_answer([_annotation(4, 1, [], cancelled=True, at=new), _annotation(5, 1, _result(U), at=old)]) \
        == ("annotated", U, None)
    assert human_answer([_annotation(6, 1, [], cancelled=True)]) == ("cancelled", None, None)
    assert human_answer([]) == ("missing", None, None)


def test_the_bootstrap_kappa_is_scikit_learns_kappa():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
        assert binary_kappa(a.astype(float), b.astype(float)) == pytest.approx(cohen_kappa_score(a, b))
    same = kappa([S] * 5, [S] * 5)
    assert same["value"] is None and same["low"] is None              # one label only: undefined
    assert kappa([S, U, U, S], [S, U, S, S], seed=1) == kappa([S, U, U, S], [S, U, S, S], seed=1)


def test_a_sample_smaller_than_the_run_keeps_a_floor_per_stratum(tmp_path):
    rundir = _run(tmp_path)
    assert main(["audit", "export", rundir.root, "--n", "10", "--floor", "1", "--out", str(tmp_path / "ls")]) == 0
    record = json.loads(rundir.read_text("audit/sample.json"))
    assert record["sampled"] == 10 and record["rows"] == 26
    assert all(s["sampled"] >= 1 for s in record["strata"].values()) and len(record["strata"]) == 5
    assert len(json.loads((tmp_path / "ls" / "tasks.json").read_text())) == 10


# ------------------------------------------------------------------------------------------------
# Errors: one line each


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_errors_are_one_line(tmp_path, capsys):
    rundir = _run(tmp_path)
    assert "no finished stage 'shard'" in _error(capsys, ["audit", "export", rundir.root, "--stage", "shard"])
    assert "is not a run directory" in _error(capsys, ["audit", "export", str(tmp_path), "--stage", "jury"])
    assert "no audit sample" in _error(capsys, ["audit", "import", rundir.root, str(tmp_path / "x.json")])
    assert main(["audit", "export", rundir.root, "--n", "100"]) == 0
    tasks = json.loads(rundir.read_text("audit/tasks.json"))
    bad = tmp_path / "bad.json"
    for content, message in (("id,text\n1,x", "not JSON"),
                             (json.dumps([{"id": 1, "text": "x", "label": "safe"}]), "not JSON-MIN or CSV"),
                             (json.dumps({"tasks": []}), "expected a JSON list of tasks")):
        bad.write_text(content)
        assert message in _error(capsys, ["audit", "import", rundir.root, str(bad)])
    stray = _label_studio_export(tasks)
    stray[0]["data"] = {**stray[0]["data"], "row_id": "not-a-row"}
    bad.write_text(json.dumps(stray))
    assert "1 task(s) name rows that are not in stage 'jury'" in _error(capsys, ["audit", "import", rundir.root,
                                                                              str(bad)])


# ------------------------------------------------------------------------------------------------
# Cost in the dataset card


def test_the_card_shows_calls_tokens_per_label_and_the_audit():
    jury = {"summary": {"majority_safe": 5, "majority_unsafe": 3, "to_adjudicator": 2,
                        "cost": {"cascade": True, "rows": 10, "calls": {"j1": 10, "j2": 10, "j3": 10, "j4": 4},
                                 "calls_per_row": 3.4,
                                 "tokens": {j: {"prompt": 100 * (i + 1), "completion": 10}
                                            for i, j in enumerate(JUDGES)},
                                 "tokens_per_label": {"prompt": 125.0, "completion": 5.0}}}}
    adjudicate = {"summary": {"safe": 6, "unsafe": 3},
                  "answers": {"arbiter": {"requests": 7, "prompt_tokens": 300, "output_tokens": 14}}}
    cost = labelling_cost(jury, adjudicate)
    # (100 + 200 + 300 + 400 + 300) / 9 accepted labels; (4·10 + 14) / 9
    assert cost["tokens_per_accepted_label"] == {"prompt": pytest.approx(1300 / 9), "completion": pytest.approx(6)}
    assert cost["adjudicator"]["calls"] == 7 and cost["accepted_labels"] == 9
    assert labelling_cost(jury, None)["tokens_per_accepted_label"]["prompt"] == pytest.approx(1000 / 8)
    assert labelling_cost({"summary": {}}, None) is None                          # a run from before the cost
    report = {"accounted": {"annotated": 23}, "intervals": "95 %: Wilson; bootstrap",
              "overall": {"agreement": {"n": 23, "value": 19 / 23, "low": 0.63, "high": 0.93},
                          "kappa": {"n": 23, "value": 0.593, "low": 0.25, "high": 0.86}}}
    stats = {"rows": {"train": 1, "test": 1}, "by_source": {}, "by_micro": {}, "dropped": {}, "errored": {}}
    card = dataset_card(name="d", config=AssembleConfig(inputs=["adjudicate"]), stats=stats,
                        taxonomy_path=str(DEFAULT_TAXONOMY), labelling={"judges": JUDGES},
                        agreement=None, cost=cost, audit=audit_summary(report))
    assert "- judge calls: 3.40 per row over 10 rows (cascade); per judge: j1 10, j2 10, j3 10, j4 4" in card
    assert "- tokens per accepted label (9 labels, judges and adjudicator): prompt 144.4, completion 6.0" in card
    assert "agreement with the final label 0.826 (95 % interval 0.630–0.930), Cohen's kappa 0.593" in card
    plain = dataset_card(name="d", config=AssembleConfig(inputs=["adjudicate"]), stats=stats,
                         taxonomy_path=str(DEFAULT_TAXONOMY), labelling={}, agreement=None)
    assert "## Cost and human audit" not in plain and cost_lines(None, None) == []


def test_hand_labels_against_the_datasets_own_labels(tmp_path):
    """`benchmarks/audit_dataset_labels.py --labels`: every exported row must be hand-labelled, and the
    comparison with the dataset's labels gives hand-computed figures."""
    from benchmarks.audit_dataset_labels import against_dataset, read_hand_labels

    path = tmp_path / "hand.json"
    path.write_text(json.dumps({"annotator": "a", "labels": {"r1": [U, "B1"], "r2": [S, None], "r3": [U, "B5"],
                                                             "r4": [S, "B4"]}}))
    name, hand = read_hand_labels(str(path), ["r1", "r2", "r3", "r4"])
    assert name == "a" and hand["r4"] == (S, None)  # a code goes only with unsafe
    with pytest.raises(SystemExit, match="row r5 needs"):
        read_hand_labels(str(path), ["r1", "r5"])
    dataset = {"r1": (U, "B1"), "r2": (S, None), "r3": (U, "B4"), "r4": (U, "B9")}
    versus = against_dataset(hand, dataset)
    assert versus["agreement"]["value"] == pytest.approx(3 / 4) and versus["agreement"]["n"] == 4
    assert versus["confusion"] == {"hand_safe/dataset_safe": 1, "hand_safe/dataset_unsafe": 1,
                                   "hand_unsafe/dataset_safe": 0, "hand_unsafe/dataset_unsafe": 2}
    # kappa: p_o 3/4, p_e = (2/4)(1/4) + (2/4)(3/4) = 1/2 -> 0.5
    assert versus["kappa"]["value"] == pytest.approx(0.5)
    assert versus["micro"]["value"] == pytest.approx(1 / 2) and versus["micro"]["n"] == 2
