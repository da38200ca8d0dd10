"""What a user watching a run sees without Ray: `chillguard status` on a run in progress, and the
flattening of stage summaries into metric fields (the metrics themselves are scraped in the tests
that run stages on the local Ray: actors/test_llm_stage.py, training/test_training.py, serve/)."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.observability import flatten
from pipelines.core.rundir import RUNNING, RunDir
from pipelines.core.stage import status_table


def test_flatten_keeps_the_numbers_of_a_nested_summary():
    summary = {"safe": 3, "tie_rate": 0.25, "fleiss_kappa": None, "ok": True, "model": "m",
               "judges": {"judge1": {"valid_votes": 10, "abstentions": 2}}, "per_macro_f1": {"A": 0.5}}
    assert flatten(summary) == {"safe": 3.0, "tie_rate": 0.25, "judges.judge1.valid_votes": 10.0,
                                "judges.judge1.abstentions": 2.0, "per_macro_f1.A": 0.5}
    assert flatten(None) == {} and flatten(7) == {}


def _rows(path, n: int) -> None:
    path.mkdir(parents=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(n)]}), path / "part-0.parquet")


def test_status_of_a_run_in_progress(tmp_path):
    run = tmp_path / "run"
    rundir = RunDir(str(run))
    rundir.write_text("recipe.yaml", "name: x\n")
    rundir.write_manifest("ingest", {"stage": "ingest", "status": "complete", "started_at": "2026-01-01T00:00:00",
                                     "finished_at": "2026-01-01T00:00:05", "seconds": 5.0,
                                     "rows": {"in": 9, "out": 9, "out_parents": 9, "dropped": 0, "errored": 0}})
    # a data stage that has written some blocks
    rundir.mark_running("embed")
    _rows(run / "embed" / "status=ok", 4)
    _rows(run / "embed" / "status=error", 1)
    # a training stage logging steps in its scratch folder
    rundir.mark_running("guard_sft")
    logs = run / "_work" / "guard_sft" / "abc" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n"
                                        + json.dumps({"step": 2, "loss": 1.25}) + "\n")
    # a stage whose process is gone: interrupted
    dead = subprocess.Popen(["true"])
    dead.wait()
    rundir.write_text(f"{RUNNING}/jury.json", json.dumps({"stage": "jury", "started_at": "2026-01-01T00:00:06+00:00",
                                                         "host": __import__("socket").gethostname(),
                                                         "pid": dead.pid}))
    lines = {line.split()[0]: line.split() for line in status_table(rundir).splitlines()[2:]}
    assert lines["ingest"][1:6] == ["complete", "9", "9", "0", "0"]
    assert lines["embed"][1:5] == ["running", "4", "0", "1"]  # out, dropped, errored so far
    assert lines["guard_sft"][1] == "running" and "step 2 loss 1.2500" in " ".join(lines["guard_sft"])
    assert lines["jury"][1] == "interrupted"
    assert set(rundir.running()) == {"embed", "guard_sft", "jury"}
    rundir.clear_running("embed")
    assert "embed" not in rundir.running()


def test_grafana_dashboard_shows_metrics_that_exist():
    """Every series the dashboard queries is one chillguard records (Ray prefixes ``ray_``; counters
    gain ``_total``, histograms ``_bucket`` / ``_sum`` / ``_count``)."""
    import re

    from tests.conftest import REPO

    dashboard = json.loads((REPO / "cluster" / "grafana_chillguard.json").read_text())
    sources = "".join((REPO / p).read_text()
                      for p in ("pipelines/core/observability.py", "pipelines/serve/observability.py"))
    defined = set(re.findall(r'"(chillguard_[a-z_]+)"', sources))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for series in re.findall(r"ray_(chillguard_[a-z_]+)", target["expr"]):
                queried.add(re.sub(r"_(total|bucket|sum|count)$", "", series))
    assert queried <= defined, queried - defined
    assert {"chillguard_stage_rows", "chillguard_llm_tokens", "chillguard_train_beta",
            "chillguard_serve_latency_s"} <= queried
