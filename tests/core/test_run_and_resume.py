"""Whole runs as users start them: `chillguard run` (killed and resumed) and `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.core.rundir import RunDir
from tests.conftest import PYTHON, REPO, assert_balanced, free_port, stop_group, vllm_endpoint, write_jsonl

BIN = Path(PYTHON).parent


def _recipe(tmp_path: Path, tiny_models) -> Path:
    corpus = write_jsonl(tmp_path / "corpus.jsonl",
                         [{"id": f"d{i}", "body": f"文档{i}：关于网络谣言的报道。report {i}"} for i in range(20)]
                         + [{"id": "bad", "body": ""}, "{not json"])
    data = {
        "name": "resume-test",
        "run_dir": str(tmp_path / "run"),
        "cluster": {"include_dashboard": False, "num_cpus": 2},
        "models": {"rw": vllm_endpoint(tiny_models["causal-lm"])},
        "stages": {
            "ingest": {"paths": [str(corpus)], "columns": {"text": "body", "id": "id"}},
            "rewrite": {"model": "rw", "template": str(REPO / "configs/prompts/rewrite_to_prompts.yaml"),
                        "min_chars": 1},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(tmp_path, tiny_models):
    recipe = _recipe(tmp_path, tiny_models)
    cmd = [PYTHON, "-m", "pipelines.cli", "run", str(recipe)]
    ingest_manifest = tmp_path / "run" / "ingest" / "manifest.json"
    with open(tmp_path / "first.log", "w") as log:
        # own process group: killing it stops the driver and the Ray it started, nothing else
        first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 300
        while not ingest_manifest.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "ingest never finished"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    rundir = RunDir(str(tmp_path / "run"))
    assert rundir.read_manifest("rewrite") is None  # killed before the second stage finished
    ingest_before = json.loads(ingest_manifest.read_text())

    second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "stage ingest     up to date, skipped" in second.stdout + second.stderr

    ingest_after = rundir.read_manifest("ingest")
    assert ingest_after == ingest_before  # not recomputed
    rewrite = rundir.read_manifest("rewrite")
    assert ingest_after["rows"] == {"in": 22, "out": 20, "out_parents": 20, "dropped": 0, "errored": 2}
    assert rewrite["rows"]["in"] == 20
    assert rewrite["rows"]["in"] == (rewrite["rows"]["out_parents"] + rewrite["rows"]["dropped"]
                                     + rewrite["rows"]["errored"])
    # no row lost or duplicated: each input id appears exactly once as a parent or an error
    parents = set(rundir.column_values("rewrite", "ok", "parent_id"))
    failed = rundir.column_values("rewrite", "error", "parent_id")
    assert len(failed) == len(set(failed)) and not parents & set(failed)
    assert parents | set(failed) == {f"d{i}" for i in range(20)}
    ok_ids = rundir.column_values("rewrite", "ok", "id")
    assert len(ok_ids) == len(set(ok_ids))

    status = subprocess.run([PYTHON, "-m", "pipelines.cli", "status", str(tmp_path / "run")],
                            capture_output=True, text=True, check=True).stdout
    assert "ingest" in status and "rewrite" in status and "complete" in status

    # a changed rewrite config recomputes rewrite only
    third = subprocess.run(cmd + ["models.rw.sampling.max_tokens=8"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert rundir.read_manifest("ingest") == ingest_before
    assert rundir.read_manifest("rewrite")["config_hash"] != rewrite["config_hash"]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answers (auth may refuse anonymous requests)
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("Ray head did not start:\n" + log.read_text()[-3000:])
            time.sleep(1)


def _agent_logs(temp_dir: str) -> str:
    """The head's dashboard-agent logs, to explain a refused submission."""
    logs = sorted(Path(temp_dir).glob("session_latest/logs/dashboard_agent*.log"))
    return "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in logs)


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo_data_chain(tmp_path, tiny_models):
    """A Ray head on 127.0.0.1 (token auth, as `ray start` sets up), the demo submitted as a job."""
    gcs_port, dash_port = free_port(), free_port()
    # Every port the head would otherwise take at its fixed default (agent 52365, client 10001, ...):
    # the session's other Ray (the ray_local fixture) already holds those, and a head whose agent
    # cannot bind refuses every job with "No available agent".
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = tempfile.mkdtemp(prefix="cgray")  # short: Ray's socket paths have a length limit
    env = {**_env(), "RAY_AUTH_MODE": "token"}
    head_log = tmp_path / "head.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=6", "--num-gpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--block", "--disable-usage-stats", *own_ports],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash_port}/api/version", head, head_log)
        run_dir = tmp_path / "job-run"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash_port}",
               "--working-dir", str(REPO), "--",
               str(BIN / "chillguard"), "run", "configs/recipes/demo.yaml", f"run_dir={run_dir}",
               f"models.rewriter.model={tiny_models['causal-lm']}",
               f"models.keyword_writer.model={tiny_models['causal-lm']}",
               f"stages.embed.model={tiny_models['embedder']}",
               f"models.adjudicator.model={tiny_models['causal-lm']}",
               # The job runs the data chain (corpus -> RAG, seeds -> PE, preprocessing) and stops
               # there: the jury, adjudication and assembly (test_jury.py), training and evaluation
               # (test_training.py, test_guard_eval.py) are covered in-process, and here they would
               # more than double this test's time (the CI budget).
               "stages.jury=null", "stages.adjudicate=null", "stages.assemble=null",
               "stages.guard_sft=null", "stages.guard_eval={}", f"models.guard.model={tiny_models['causal-lm']}",
               *(f"models.judge{i}.model={tiny_models[f'judge-{i}']}" for i in range(1, 5))]
        for _ in range(24):
            submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            # The dashboard answers before the head's job agent registers: retry only that refusal.
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, (submit.stdout[-4000:] + submit.stderr[-2000:]
                                        + _agent_logs(temp_dir))
        assert "succeeded" in submit.stdout.lower()
        rundir = RunDir(str(run_dir))
        ingest, rag = rundir.read_manifest("ingest"), rundir.read_manifest("rag")
        assert ingest["rows"]["in"] == 41 and ingest["rows"]["errored"] == 3
        assert rundir.read_manifest("index")["summary"]["ntotal"] == 38
        assert rag["rows"]["in"] == rundir.read_manifest("retrieve")["rows"]["out"] == 31
        assert rag["rows"]["in"] == rag["rows"]["out_parents"] + rag["rows"]["errored"]
        pe, near = rundir.read_manifest("pe"), rundir.read_manifest("near_dedup")
        assert rundir.read_manifest("seeds_real")["rows"]["errored"] == 2
        assert pe["rows"]["in"] == 27 and near["status"] == "complete"
        assert rundir.read_manifest("normalize")["rows"]["in"] == rag["rows"]["out"] + pe["rows"]["out"]
        assert_balanced(near)
        assert rundir.read_manifest("jury") is None  # stopped where the recipe was cut
    finally:
        stop_group(head, timeout=15)


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
