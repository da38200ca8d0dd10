"""Whole runs as users start them: `chillguard run` killed in the middle of a stage and resumed.
(`ray job submit` of a whole run: tests/data/test_data_chain_job.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pipelines.core.rundir import RunDir
from tests.conftest import PYTHON, REPO, http_endpoint, write_jsonl


def _recipe(tmp_path: Path, url: str) -> Path:
    corpus = write_jsonl(tmp_path / "corpus.jsonl",
                         [{"id": f"d{i}", "body": f"文档{i}：关于网络谣言的报道。report {i}"} for i in range(20)]
                         + [{"id": "bad", "body": ""}, "{not json"])
    data = {
        "name": "resume-test",
        "run_dir": str(tmp_path / "run"),
        "cluster": {"include_dashboard": False, "num_cpus": 2},
        "models": {"rw": http_endpoint(url, sampling={"temperature": 1.0, "max_tokens": 16}, batch_size=8)},
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


class _GateHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        gate = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not gate.opened.is_set():
            gate.held.set()
            gate.opened.wait()
            return  # closed unanswered: the run that sent it was killed meanwhile
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            with urllib.request.urlopen(urllib.request.Request(gate.upstream, data=body, headers=headers),
                                        timeout=300) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Gate(ThreadingHTTPServer):
    """An HTTP pass-through to the session's `vllm serve`, for a kill at a known point: while closed
    it holds every request unanswered (and never forwards it); once opened it forwards them, the
    API key header included."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.upstream = upstream
        self.opened = threading.Event()
        self.held = threading.Event()  # a request arrived while closed
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1/chat/completions"


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(tmp_path, vllm_server):
    gate = _Gate(vllm_server)
    threading.Thread(target=gate.serve_forever, daemon=True).start()
    try:
        _killed_run_resumes(tmp_path, gate)
    finally:
        gate.opened.set()
        gate.shutdown()
        gate.server_close()


def _killed_run_resumes(tmp_path: Path, gate: _Gate) -> None:
    recipe = _recipe(tmp_path, gate.url)
    cmd = [PYTHON, "-m", "pipelines.cli", "run", str(recipe)]
    ingest_manifest = tmp_path / "run" / "ingest" / "manifest.json"
    with open(tmp_path / "first.log", "w") as log:
        # own process group: killing it stops the driver and the Ray it started, nothing else
        first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 300
        while not gate.held.wait(0.5):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "rewrite never sent a request"
        # Rewrite is running: it has sent a request, and the gate holds it unanswered. The stage
        # cannot finish before that request is answered, or fails after aiohttp's 300 s timeout
        # and the retries: killed now, the run stops in the middle of rewrite, after ingest.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    gate.opened.set()
    assert ingest_manifest.exists()
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
