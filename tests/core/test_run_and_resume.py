"""`chillguard status` of a run directory. (A whole run killed in the middle of a stage and resumed:
tests/loop/test_loop_run.py; `ray job submit` of a whole run: tests/data/test_data_chain_job.py.)"""

from __future__ import annotations

from pipelines.core.rundir import RunDir


def test_status_table_columns_fit_long_stage_names(tmp_path):
    """`chillguard status` keeps its columns apart whatever the stage names (SHARD's run past 14 chars)."""
    from pipelines.core.stage import status_table

    rundir = RunDir(str(tmp_path / "run"))
    rows = {"in": 70, "out": 12, "dropped": 58, "errored": 0, "out_parents": 12}
    for i, name in enumerate(["embed", "guard_eval_demo_guard"]):
        rundir.write_manifest(name, {"status": "complete", "rows": rows, "seconds": 58.2,
                                     "started_at": f"2026-11-26T01:4{i}:00+00:00",
                                     "finished_at": f"2026-11-26T01:4{i}:30+00:00"})
    (tmp_path / "run" / "shard_refine_self").mkdir()      # started, never finished: no manifest
    lines = status_table(rundir).splitlines()
    assert lines[0].split() == ["stage", "state", "in", "out", "dropped", "errored", "seconds", "finished"]
    table = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert table["guard_eval_demo_guard"] == ["complete", "70", "12", "58", "0", "58.2", "2026-11-26T01:41:30+00:00"]
    assert table["embed"][0] == "complete" and table["shard_refine_self"] == ["incomplete"]
    # every row's state starts in the header's "state" column
    column = lines[0].index("state")
    assert all(line[column:].startswith(("complete", "incomplete")) for line in lines[2:])
