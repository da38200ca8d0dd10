"""Evaluation metrics against scikit-learn on the same predictions, and per category by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import load_taxonomy
from pipelines.evaluation.metrics import (
    NO_CODE,
    UNPARSED,
    Confusion,
    confusion,
    evaluate,
    mean_defined,
    micro_category,
    per_macro_f1,
    per_micro_confusion,
    predicted_category,
    scored_predictions,
)

TAXONOMY = load_taxonomy()


def _sklearn(gold, pred):
    """scikit-learn's binary metrics with unsafe positive; undefined -> None (its nan)."""
    p, r, f, _ = precision_recall_fscore_support(gold, pred, pos_label=UNSAFE, average="binary",
                                                 zero_division=np.nan)
    tn, fp, fn, tp = confusion_matrix(gold, pred, labels=[SAFE, UNSAFE]).ravel()
    def as_none(v):
        return None if math.isnan(v) else float(v)

    return {"precision": as_none(p), "recall": as_none(r), "f1": as_none(f),
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}


def _ours(gold, pred):
    c = confusion(gold, pred)
    return {"precision": c.precision, "recall": c.recall, "f1": c.f1, "tp": c.tp, "fp": c.fp, "fn": c.fn,
            "tn": c.tn}


def _assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key in ours:
        if ours[key] is None or theirs[key] is None:
            assert ours[key] is None and theirs[key] is None, key
        else:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key


@pytest.mark.parametrize("seed", range(25))
def test_binary_metrics_match_sklearn_on_random_predictions(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    p_unsafe = rng.random()
    gold = [UNSAFE if rng.random() < p_unsafe else SAFE for _ in range(n)]
    pred = [g if rng.random() < 0.7 else rng.choice([SAFE, UNSAFE]) for g in gold]
    _assert_same(_ours(gold, pred), _sklearn(gold, pred))
    ours, theirs = confusion(gold, pred).f1, f1_score(gold, pred, pos_label=UNSAFE, zero_division=np.nan)
    assert (ours is None and math.isnan(theirs)) or ours == pytest.approx(theirs)


@pytest.mark.parametrize("gold,pred", [
    ([UNSAFE] * 4, [UNSAFE] * 4),                   # perfect, all positive
    ([SAFE] * 5, [SAFE] * 5),                       # no positives anywhere: P, R, F1 undefined
    ([SAFE] * 3, [UNSAFE, SAFE, SAFE]),             # no gold positive: R undefined, F1 = 0
    ([UNSAFE, UNSAFE], [SAFE, SAFE]),               # nothing predicted unsafe: P undefined, F1 = 0
    ([UNSAFE, SAFE], [SAFE, UNSAFE]),               # all wrong
    ([UNSAFE], [UNSAFE]),                           # one row
    ([UNSAFE, SAFE, UNSAFE, SAFE, SAFE], [UNSAFE, UNSAFE, SAFE, SAFE, SAFE]),
])
def test_binary_metrics_match_sklearn_on_edge_cases(gold, pred):
    _assert_same(_ours(gold, pred), _sklearn(gold, pred))


def test_hand_computed_values_and_conventions():
    # tp=2 fp=1 fn=3 tn=4: P = 2/3, R = 2/5, F1 = 4 / (4 + 1 + 3) = 0.5
    c = Confusion(tp=2, fp=1, fn=3, tn=4)
    assert (c.precision, c.recall, c.f1, c.accuracy) == (pytest.approx(2 / 3), 0.4, 0.5, 0.6)
    assert c.f1 == pytest.approx(2 * c.precision * c.recall / (c.precision + c.recall))
    assert Confusion(tn=7).f1 is None and Confusion(tn=7).precision is None and Confusion(tn=7).recall is None
    assert Confusion(fn=2).f1 == 0.0 and Confusion(fn=2).precision is None
    assert Confusion().accuracy is None
    assert Confusion(1, 2, 3, 4) + Confusion(4, 3, 2, 1) == Confusion(5, 5, 5, 5)
    d = Confusion(tp=1, tn=1).to_dict()
    assert d["rows"] == 2 and d["gold_unsafe"] == 1 and d["gold_safe"] == 1 and d["f1"] == 1.0


def test_bad_labels_and_lengths_are_errors():
    with pytest.raises(ValueError, match="gold label 'harmful'"):
        confusion(["harmful"], [SAFE])
    with pytest.raises(ValueError, match="predicted label ''"):
        confusion([SAFE], [""])
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        confusion([SAFE, SAFE], [SAFE])


def test_per_micro_uses_the_rows_tagged_with_the_category_and_matches_sklearn():
    rng = random.Random(7)
    codes = TAXONOMY.micro_codes
    micro = [rng.choice(codes[:6] + ["", "Z9"]) for _ in range(300)]
    gold = [rng.choice([SAFE, UNSAFE]) for _ in micro]
    pred = [g if rng.random() < 0.6 else rng.choice([SAFE, UNSAFE]) for g in gold]
    per = per_micro_confusion(gold, pred, micro, codes)
    assert list(per) == codes
    for code in codes:
        rows = [i for i, m in enumerate(micro) if m == code]
        if not rows:
            assert per[code] == Confusion() and per[code].f1 is None
            continue
        _assert_same(_ours([gold[i] for i in rows], [pred[i] for i in rows]),
                     _sklearn([gold[i] for i in rows], [pred[i] for i in rows]))
        assert per[code].rows == len(rows)
    assert sum(c.rows for c in per.values()) == sum(m in codes for m in micro)


def test_per_category_and_per_macro_by_hand():
    # A1: 2 unsafe rows, one caught; one safe row wrongly flagged -> tp 1 fp 1 fn 1 -> F1 = 2/4 = 0.5
    # A2: 1 unsafe caught -> F1 = 1; A3: 2 safe rows judged safe -> F1 undefined (excluded from mean)
    # B1: 1 unsafe missed -> F1 = 0; untagged rows count overall only
    rows = [("A1", UNSAFE, UNSAFE), ("A1", UNSAFE, SAFE), ("A1", SAFE, UNSAFE),
            ("A2", UNSAFE, UNSAFE),
            ("A3", SAFE, SAFE), ("A3", SAFE, SAFE),
            ("B1", UNSAFE, SAFE),
            ("", SAFE, UNSAFE), ("", UNSAFE, UNSAFE)]
    micro, gold, pred = map(list, zip(*rows))
    result = evaluate(gold, pred, micro, TAXONOMY)
    per = result["per_micro"]
    assert (per["A1"]["tp"], per["A1"]["fp"], per["A1"]["fn"], per["A1"]["tn"]) == (1, 1, 1, 0)
    assert per["A1"]["f1"] == 0.5 and per["A2"]["f1"] == 1.0 and per["A3"]["f1"] is None
    assert per["B1"]["f1"] == 0.0 and per["C1"]["rows"] == 0 and per["C1"]["f1"] is None
    assert per["A1"]["macro"] == "A"
    macro = result["per_macro"]
    assert macro["A"]["f1"] == pytest.approx((0.5 + 1.0) / 2)            # A3 and A4..A8 undefined
    assert macro["A"]["categories_with_f1"] == 2 and macro["A"]["categories"] == 8
    assert macro["A"]["rows"] == 6
    assert macro["B"]["f1"] == 0.0 and macro["C"]["f1"] is None and macro["C"]["rows"] == 0
    # overall: tp 3 (A1, A2, untagged) fp 2 (A1, untagged) fn 2 (A1, B1) tn 2 (A3 x2)
    o = result["overall"]
    assert (o["tp"], o["fp"], o["fn"], o["tn"], o["rows"]) == (3, 2, 2, 2, 9)
    assert o["f1"] == pytest.approx(6 / 10)
    _assert_same({k: o[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "tn")}, _sklearn(gold, pred))
    assert result["untagged_rows"] == 2


def test_per_macro_mean_and_mean_defined():
    assert mean_defined([None, None]) is None
    assert mean_defined([0.2, None, 0.4]) == pytest.approx(0.3)
    f1 = {code: None for code in TAXONOMY.micro_codes} | {"E1": 0.25, "E2": 0.75, "D7": 1.0}
    macro = per_macro_f1(f1, TAXONOMY)
    assert macro == {"A": None, "B": None, "C": None, "D": 1.0, "E": 0.5}


def test_unusable_answers_count_as_wrong_predictions():
    # None = no usable answer (unparseable, failed request): the opposite of the gold label
    gold = [UNSAFE, UNSAFE, SAFE, SAFE, UNSAFE, SAFE]
    pred = [UNSAFE, None, SAFE, None, SAFE, UNSAFE]
    micro = ["A1", "A1", "A1", "", "B1", "B1"]
    assert scored_predictions(gold, pred) == [UNSAFE, SAFE, SAFE, UNSAFE, SAFE, UNSAFE]
    result = evaluate(gold, pred, micro, TAXONOMY)
    o = result["overall"]
    assert (o["tp"], o["fp"], o["fn"], o["tn"], o["rows"]) == (1, 2, 2, 1, 6)
    assert result["unparsed"] == 2
    _assert_same({k: o[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "tn")},
                 _sklearn(gold, scored_predictions(gold, pred)))
    a1 = result["per_micro"]["A1"]
    assert (a1["tp"], a1["fp"], a1["fn"], a1["tn"]) == (1, 0, 1, 1)          # the A1 junk row is a miss
    with pytest.raises(ValueError, match="gold label ''"):
        scored_predictions([""], [None])


def test_micro_category_by_hand_and_against_sklearn():
    # gold-unsafe rows tagged with a taxonomy code are scored; the safe A1 row and the untagged
    # unsafe row are not. y_true = [A1, A1, A1, A2, B1, B1]
    rows = [("A1", UNSAFE, UNSAFE, "A1"),      # right
            ("A1", UNSAFE, UNSAFE, "A2"),      # wrong code
            ("A1", UNSAFE, SAFE, ""),          # missed: column "safe"
            ("A2", UNSAFE, UNSAFE, "A2"),      # right
            ("B1", UNSAFE, UNSAFE, ""),        # unsafe without a code: column "no_code"
            ("B1", UNSAFE, None, ""),          # no usable answer: column "unparsed"
            ("A1", SAFE, UNSAFE, "A1"),        # gold safe: not scored for the category
            ("", UNSAFE, UNSAFE, "C1")]        # gold untagged: not scored for the category
    micro, gold, pred, pred_micro = map(list, zip(*rows))
    m = micro_category(gold, pred, micro, pred_micro, TAXONOMY.micro_codes)
    y_true = ["A1", "A1", "A1", "A2", "B1", "B1"]
    y_pred = ["A1", "A2", SAFE, "A2", NO_CODE, UNPARSED]
    assert [predicted_category(p, c, set(TAXONOMY.micro_codes)) for p, c in zip(pred[:6], pred_micro[:6])] == y_pred
    assert m["rows"] == 6 and m["correct"] == 2 and m["untagged_unsafe_rows"] == 1
    assert m["accuracy"] == pytest.approx(2 / 6)
    # per code, F1 = 2tp / (2tp + fp + fn): A1 2/(2+0+2), A2 2/(2+1+0), B1 0
    assert m["per_code"] == {"A1": {"rows": 3, "f1": 0.5}, "A2": {"rows": 1, "f1": pytest.approx(2 / 3)},
                             "B1": {"rows": 2, "f1": 0.0}}
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=["A1", "A2", "B1"], average="macro"))
    assert m["accuracy"] == accuracy_score(y_true, y_pred)
    cm = m["confusion"]
    assert cm["gold"] == TAXONOMY.micro_codes and cm["predicted"] == [*TAXONOMY.micro_codes, SAFE, NO_CODE, UNPARSED]
    a1 = cm["counts"][cm["gold"].index("A1")]
    assert {cm["predicted"][j]: n for j, n in enumerate(a1) if n} == {"A1": 1, "A2": 1, SAFE: 1}
    b1 = cm["counts"][cm["gold"].index("B1")]
    assert {cm["predicted"][j]: n for j, n in enumerate(b1) if n} == {NO_CODE: 1, UNPARSED: 1}
    assert sum(map(sum, cm["counts"])) == 6
    # through evaluate: only when the guard names our codes
    assert evaluate(gold, pred, micro, TAXONOMY, pred_micro)["micro_category"] == m
    assert evaluate(gold, pred, micro, TAXONOMY)["micro_category"] is None


@pytest.mark.parametrize("seed", range(10))
def test_micro_category_matches_sklearn_on_random_predictions(seed):
    rng = random.Random(seed)
    codes = TAXONOMY.micro_codes
    micro = [rng.choice(codes[:5] + [""]) for _ in range(rng.randint(1, 80))]
    gold = [rng.choice([SAFE, UNSAFE, UNSAFE]) for _ in micro]
    pred = [rng.choice([SAFE, UNSAFE, UNSAFE, None]) for _ in micro]
    pred_micro = [rng.choice([m, m, rng.choice(codes[:7]), "", "S1"]) for m in micro]
    m = micro_category(gold, pred, micro, pred_micro, codes)
    keep = [i for i, (g, c) in enumerate(zip(gold, micro)) if g == UNSAFE and c in codes]
    y_true = [micro[i] for i in keep]
    y_pred = [UNPARSED if pred[i] is None else SAFE if pred[i] == SAFE
              else pred_micro[i] if pred_micro[i] in codes else NO_CODE for i in keep]
    assert m["rows"] == len(keep)
    if not keep:
        assert m["accuracy"] is None and m["macro_f1"] is None and m["per_code"] == {}
        return
    present = [c for c in codes if c in y_true]
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro",
                                                   zero_division=0.0))
    assert list(m["per_code"]) == present


def test_micro_category_without_gold_unsafe_rows():
    m = micro_category([SAFE, SAFE], [UNSAFE, SAFE], ["A1", "A2"], ["A1", ""], TAXONOMY.micro_codes)
    assert (m["rows"], m["accuracy"], m["macro_f1"], m["per_code"]) == (0, None, None, {})
    assert sum(map(sum, m["confusion"]["counts"])) == 0
