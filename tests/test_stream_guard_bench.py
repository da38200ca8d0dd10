"""The streaming benchmark's labelled rows: a run's stage as rows, and safe lead-ins before unsafe answers
(pure; no engine is started)."""

from __future__ import annotations

import pytest

from benchmarks.stream_guard import stage_rows, with_lead_ins
from pipelines.core.rows import ERROR, OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.data.ingest import ORIGIN


def _row(id_: str, label: str, response: str) -> dict:
    return {"id": id_, "prompt": "说说你的看法。", "response": response, "label": label,
            **({"unsafe_from": 0} if label == "unsafe" else {})}


def test_lead_ins_put_safe_answers_before_the_unsafe_ones_in_turn():
    rows = [_row("u1", "unsafe", "坏话一"), _row("s1", "safe", "好话一"), _row("u2", "unsafe", "坏话二"),
            _row("s2", "safe", "好话二"), _row("u3", "unsafe", "坏话三")]
    out = with_lead_ins(rows)
    assert [r["response"] for r in out] == ["好话一\n坏话一", "好话一", "好话二\n坏话二", "好话二", "好话一\n坏话三"]
    for row, before in zip(out, rows, strict=True):
        if row["label"] == "unsafe":  # the unsafe part starts where the original answer does
            assert row["response"][row["unsafe_from"]:] == before["response"] and row["unsafe_from"] == 4
    with pytest.raises(SystemExit, match="safe rows"):
        with_lead_ins([_row("u1", "unsafe", "坏话一")])


def test_a_stages_labelled_rows_with_answers_become_benchmark_rows(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    rows = [make_row(id="b", text="说说你的看法。", label="unsafe", response="坏话"),
            make_row(id="a", text="说说你的看法。", label="safe", response="好话"),
            make_row(id="c", text="说说你的看法。", label="safe", response=""),  # no answer: not streamable
            make_row(id="d", text="说说你的看法。", label="", response="没有标签")]
    rundir.write_table("seeds_answers", OK, to_table(rows, ORIGIN))  # as ingestion writes them
    rundir.write_table("seeds_answers", ERROR, to_table([make_row(id="e", status=ERROR, reason="missing_response")],
                                                        ORIGIN))
    rundir.write_manifest("seeds_answers", {"stage": "seeds_answers"})
    assert stage_rows(rundir.root, "seeds_answers") == [
        {"id": "a", "prompt": "说说你的看法。", "response": "好话", "label": "safe"},
        {"id": "b", "prompt": "说说你的看法。", "response": "坏话", "label": "unsafe", "unsafe_from": 0}]
    with pytest.raises(SystemExit, match="no finished stage 'guard_sft'"):
        stage_rows(rundir.root, "guard_sft")
    rundir.write_manifest("seeds_empty", {"stage": "seeds_empty"})
    with pytest.raises(SystemExit, match="'seeds_empty' wrote no rows"):
        stage_rows(rundir.root, "seeds_empty")
    with pytest.raises(SystemExit, match="not a run directory"):
        stage_rows(str(tmp_path), "seeds_answers")


def _per_character(text: str, add_special_tokens: bool, return_offsets_mapping: bool) -> dict:
    """A tokenizer with one token per character (the offsets are all the benchmark reads)."""
    return {"offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_leak_counts_missed_streams_and_text_released_before_a_late_block():
    from benchmarks.stream_guard import quality

    rows = [{"id": "a", "label": "unsafe", "response": "好好好。坏坏坏坏。", "unsafe_from": 4},  # blocked in time
            {"id": "b", "label": "unsafe", "response": "好好。坏坏坏坏坏。", "unsafe_from": 3},  # blocked late
            {"id": "c", "label": "unsafe", "response": "坏坏坏。", "unsafe_from": 0},            # missed
            {"id": "f", "label": "unsafe", "response": "好好好好。坏。", "unsafe_from": 5},        # blocked early
            {"id": "d", "label": "safe", "response": "好好好。"}, {"id": "e", "label": "safe", "response": "好。"}]
    blocked = {"finish_reason": "content_filter"}
    streams = {"a": {**blocked, "text": "好好好。", "moderation": {"judged_tokens": 6}},
               "b": {**blocked, "text": "好好。坏坏", "moderation": {"judged_tokens": 7}},
               "c": {"finish_reason": "stop", "text": "坏坏坏。", "moderation": None},
               "f": {**blocked, "text": "", "moderation": {"judged_tokens": 3}},
               "d": {"finish_reason": "stop", "text": "好好好。", "moderation": None},
               "e": {**blocked, "text": "", "moderation": {"judged_tokens": 1}}}
    q = quality(rows, streams, _per_character)
    assert (q["unsafe_tokens"], q["leaked_tokens"], q["leaked_tokens_missed"], q["leaked_tokens_blocked"]) == \
        (5 + 6 + 4 + 2, 2 + 4, 4, 2)
    assert q["streams_leaking"] == ["b", "c"] and q["missed"] == ["c"] and q["false_blocks"] == ["e"]
    # judged tokens at the block minus the tokens to the end of the first unsafe sentence; f was flagged on
    # its safe lead-in (3 tokens read of the 5 before its unsafe part): counted apart, not as a detection
    assert q["detection_delay_tokens"]["values"] == [6 - 9, 7 - 9] and q["blocked_before_unsafe"] == ["f"]
