"""A killed driver: `chillguard run` SIGKILLed while `embed` (a resumable stage: one vector per
document, keyed by its id) has written part of its output. The same command again keeps the files the
killed run finished and embeds only the documents they do not hold; every document ends up once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.core.rows import OK
from pipelines.core.rundir import RunDir
from tests.conftest import PYTHON, REPO, assert_balanced, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_killed_driver_resumes_embed_where_it_stopped(tmp_path, tiny_models):
    docs = [{"id": f"d{i}", "text": f"第{i}条帖子 " + "内容" * (i % 9)} for i in range(3000)]
    recipe = {"name": "resume", "run_dir": str(tmp_path / "run"),
              "cluster": {"num_cpus": 2, "include_dashboard": False},
              "stages": {"ingest": {"paths": [str(write_jsonl(tmp_path / "corpus.jsonl", docs))],
                                    "columns": {"text": "text", "id": "id"}},
                         "embed": {"model": tiny_models["embedder"], "batch_size": 16}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [PYTHON, "-m", "pipelines.cli", "run", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rundir = RunDir(recipe["run_dir"])

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while len(rundir.parquet_files("embed", OK)) < 3:  # a few blocks written, most still to do
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "embed wrote nothing"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    assert rundir.read_manifest("embed") is None
    kept = {}
    for info in rundir.parquet_files("embed", OK):  # what the killed run finished (not a half-written file)
        try:
            with rundir.fs.open_input_file(info.path) as f:
                kept[info.path] = pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError):  # being written when the run died: the next run deletes it
            continue
    assert kept and sum(kept.values()) < len(docs)

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resuming an interrupted run: {sum(kept.values())} of {len(docs)} input rows already written" in out
    assert "stage ingest     up to date, skipped" in out
    manifest = rundir.read_manifest("embed")
    assert_balanced(manifest, rundir)
    assert manifest["rows"]["in"] == manifest["rows"]["out"] == len(docs)
    files = {info.path for info in rundir.parquet_files("embed", OK)}
    assert set(kept) <= files                       # the finished files were kept, not rewritten
    ids = Counter(rundir.column_values("embed", OK, "id"))
    assert set(ids) == {d["id"] for d in docs} and max(ids.values()) == 1
