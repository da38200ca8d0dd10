"""A run directory on object storage: `chillguard run` with ``run_dir=s3://...`` against moto's S3
server on 127.0.0.1, pointed at through the environment (``AWS_ENDPOINT_URL``, keys, region) as a
user points a run at MinIO; the embedded local Ray that `chillguard run` starts inherits it.

The recipe is the data chain without LLM calls: the keyword pool from the taxonomy's seeds, the demo
corpus read from the bucket, embeddings (the tiny offline embedder), a FAISS index (written and read through the run
directory's file system), retrieval; the demo seed prompts and preprocessing (normalize, langid,
length filter, dedup, near-dedup). The first run is killed in the middle of ``embed``:
``chillguard status`` says so, the next run refuses the stale lock marker and names it, and once the
marker is deleted it keeps the finished stages (their manifests unchanged) and redoes
the rest. (The LLM stages and assembly write through the
same run directory; assembly's local-only Hugging Face export goes through
:meth:`RunDir.upload`, tested here without Ray, and the rest of it by
tests/labelling/test_assembly.py on a local run directory.)

A missing bucket, refused credentials and a dead endpoint end `chillguard run` (and `status`) with
one line and exit 2 before any Ray starts.

Each run is a `chillguard run` process with its own Ray: a Ray the session started earlier
(``ray_local``) has workers without the server's address in their environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.core.rundir import RunDir
from tests.conftest import PYTHON, REPO, assert_balanced, free_port

BUCKET = "chillguard-runs"
RUN = f"s3://{BUCKET}/runs/s3-demo"
PREFIX = "runs/s3-demo/"
STAGES = ["keywords", "ingest", "seeds_real", "embed", "index", "retrieve", "normalize", "langid",
          "length_filter", "dedup", "near_dedup"]
#: finished before ``embed``, when the first run is killed
BEFORE_EMBED = STAGES[:3]
#: the variables the test sets (and the ones it clears so that a user's own cannot redirect it)
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server in this process on a free port of 127.0.0.1, with an empty bucket; this
    process's environment points at it (restored afterwards). Yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.pop(k, None) for k in S3_ENV}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _objects(client, prefix: str = PREFIX) -> dict[str, tuple[str, object]]:
    """Key -> (ETag, LastModified) of the files under ``prefix`` (pyarrow's folder markers left out)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                out[o["Key"]] = (o["ETag"], o["LastModified"])
    return out


def _recipe(tmp_path: Path, client, embedder: str) -> Path:
    client.upload_file(str(REPO / "configs/data/demo_corpus.jsonl"), BUCKET, "inputs/corpus.jsonl")
    data = {
        "name": "s3-demo", "run_dir": RUN, "seed": 3,
        "cluster": {"include_dashboard": False, "num_cpus": 2, "logical_gpus": 0},
        "stages": {
            "keywords": {"target_per_category": 20},      # the 20 seeds of each category, no model
            "ingest": {"paths": [f"s3://{BUCKET}/inputs/corpus.jsonl"],
                       "columns": {"text": "content", "id": "doc_id", "lang": "lang"}},
            "seeds": {"real": {"paths": [str(REPO / "configs/data/demo_seed_prompts.jsonl")],
                               "columns": {"text": "prompt", "id": "prompt_id", "label": "label",
                                           "macro": "macro", "micro": "micro"},
                               "source": "real", "lang": "zh"}},
            "embed": {"model": embedder, "batch_size": 64},  # the tiny one: loads in a blink
            "index": {"kind": "flat"},
            "retrieve": {"queries_per_category": 1, "top_k": 20, "sample": 3, "max_text_chars": 100},
            "preprocess": {"inputs": ["seeds_real"], "normalize": {"traditional_to_simplified": True},
                           "length_filter": {"min_chars": 4}, "near_dedup": {"threshold": 0.8}},
        },
    }
    path = tmp_path / "recipe.yaml"
    # in the order written: independent stages run in the order the recipe lists them (STAGES)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # its own embedded Ray, which inherits the S3 settings
    return env


def _run(recipe: Path) -> str:
    done = subprocess.run([PYTHON, "-m", "pipelines.cli", "run", str(recipe)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    return out


def _status(capsys) -> dict[str, list[str]]:
    from pipelines.cli import main

    capsys.readouterr()
    assert main(["status", RUN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["stage", "state"]
    return {line.split()[0]: line.split()[1:] for line in lines[2:]}


def test_a_run_dir_uri_takes_no_query_parameters(tmp_path):
    """An endpoint in the URI would be cut by the stage paths appended to it: a recipe error that
    names the variables to set instead."""
    from pipelines.construction import load_recipe
    from pipelines.core.config import ConfigError

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "q", "run_dir": f"{RUN}?endpoint_override=127.0.0.1:9000&scheme=http",
                                    "stages": {"keywords": {"target_per_category": 20}}}))
    with pytest.raises(ConfigError, match=r"run_dir: .*no query parameters.*AWS_ENDPOINT_URL_S3"):
        load_recipe(path)
    assert load_recipe(path, [f"run_dir={RUN}"]).run_dir == RUN


def test_status_and_folder_copies_on_s3_without_ray(tmp_path, s3, capsys):
    """`chillguard status` of a prefix with no run exits 2 and creates nothing; folders that local-only
    libraries write (`datasets.save_to_disk`) go up to the bucket and come back down."""
    from pipelines.cli import main

    run = f"s3://{BUCKET}/runs/copies"
    assert main(["status", run]) == 2
    assert f"{run} does not exist" in capsys.readouterr().err
    assert not _objects(s3, "runs/copies/")
    local = tmp_path / "hf"
    (local / "train").mkdir(parents=True)
    (local / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (local / "train" / "data-00000-of-00001.arrow").write_bytes(bytes(range(256)) * 8)
    rundir = RunDir(run)
    rundir.upload(str(local), "assemble/dataset/hf")
    assert {k: s3.head_object(Bucket=BUCKET, Key=k)["ContentLength"] for k in _objects(s3, "runs/copies/")} == {
        "runs/copies/assemble/dataset/hf/dataset_dict.json": 21,
        "runs/copies/assemble/dataset/hf/train/data-00000-of-00001.arrow": 2048}
    down = rundir.download("assemble/dataset", str(tmp_path / "down"))
    assert down == [str(tmp_path / "down/hf/dataset_dict.json"),
                    str(tmp_path / "down/hf/train/data-00000-of-00001.arrow")]
    assert [Path(f).read_bytes() for f in down] == [(local / "dataset_dict.json").read_bytes(),
                                                   (local / "train/data-00000-of-00001.arrow").read_bytes()]
    assert rundir.download("assemble/dataset", str(tmp_path / "json"), ".json") == [
        str(tmp_path / "json/hf/dataset_dict.json")]
    assert rundir.download("nothing/here", str(tmp_path / "none")) == []


def _unreachable_env() -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # a free port: nothing listens


@pytest.mark.parametrize("case, uri, env, cause", [
    pytest.param("missing bucket", "s3://no-such-bucket/runs/x", lambda: {},
                 r"bucket no-such-bucket does not exist", id="missing-bucket"),
    pytest.param("bad credentials", RUN, lambda: {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"},
                 r"access denied: no or bad credentials", id="bad-credentials"),
    pytest.param("endpoint unreachable", RUN, _unreachable_env,
                 r"cannot reach the S3 endpoint http://127\.0\.0\.1:\d+", id="endpoint-unreachable"),
])
def test_an_unreachable_run_dir_is_one_line_and_exit_2_before_ray(tmp_path, s3, case, uri, env, cause):
    """A missing bucket, credentials the server refuses (moto checks them only with IAM
    authentication on, which applies to the server since it runs in this process) and an endpoint
    where nothing listens: `chillguard run` exits 2 with one line naming the URI and the cause, and
    starts no Ray (RAY_ADDRESS points where nothing listens: connecting would fail otherwise)."""
    from moto.core import enable_iam_authentication

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "unreachable", "run_dir": uri,
                                    "stages": {"keywords": {"target_per_category": 20}}}))
    auth = enable_iam_authentication() if case == "bad credentials" else contextlib.nullcontext()
    with auth:
        done = subprocess.run([PYTHON, "-m", "pipelines.cli", "run", str(path)], cwd=REPO,
                              env={**_env(), **env(), "RAY_ADDRESS": f"127.0.0.1:{free_port()}"},
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    # the whole of stderr: no traceback, no Ray log line
    assert re.fullmatch(rf"error: run directory {re.escape(uri)}: {cause}[^\n]*\n", done.stderr), done.stderr[-3000:]


def test_status_with_refused_credentials_is_one_line_and_exit_2(s3, capsys):
    from moto.core import enable_iam_authentication

    from pipelines.cli import main

    with enable_iam_authentication():  # the server now refuses the fixture's made-up keys
        assert main(["status", RUN]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: run directory {RUN}: access denied: no or bad credentials (AWS_ACCESS_KEY_ID / "
        f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance profile), or no permission on bucket {BUCKET}")


@pytest.mark.slow
def test_run_dir_on_s3_runs_is_killed_resumes_and_reports_status(tmp_path, s3, capsys, tiny_models):
    from pipelines.cli import main

    recipe = _recipe(tmp_path, s3, tiny_models["embedder"])
    rundir = RunDir(RUN, create=False)

    # 1. killed in the middle of `embed` (its marker is in the bucket)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([PYTHON, "-m", "pipelines.cli", "run", str(recipe)], cwd=REPO, env=_env(),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while f"{PREFIX}_running/embed.json" not in _objects(s3):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "embed never started"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    done_before = {name: rundir.read_manifest(name) for name in BEFORE_EMBED}
    assert all(done_before.values()) and rundir.read_manifest("embed") is None
    table = _status(capsys)
    assert table["embed"][0] == "interrupted" and all(table[n][0] == "complete" for n in BEFORE_EMBED)

    # 2. the killed run's lock marker is refused and named (before any Ray starts); deleted, the
    # next run keeps the finished stages and redoes `embed` and everything after it
    assert main(["run", str(recipe)]) == 4
    assert f"{RUN}/.lock" in capsys.readouterr().err
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}.lock")
    second = _run(recipe)
    for name in BEFORE_EMBED:
        assert f"stage {name:<10} up to date, skipped" in second, name
        assert rundir.read_manifest(name) == done_before[name]
    assert "stage embed      running" in second

    manifests = {name: rundir.read_manifest(name) for name in STAGES}
    for name, m in manifests.items():
        assert m is not None and m["status"] == "complete", name
        assert_balanced(m, rundir)   # in = out + dropped + errored, counted from the bucket's files
    rows = {name: m["rows"] for name, m in manifests.items()}
    assert rows["keywords"]["out"] == 620 and rows["retrieve"]["out"] == 31
    assert rows["ingest"]["in"] == 41 and rows["index"]["out"] == rows["embed"]["out"] == rows["ingest"]["out"]
    assert rows["normalize"]["in"] == rows["seeds_real"]["out"]

    # everything is in the bucket: stage files, the FAISS index; no lock, no marker, no
    # scratch left, and nothing written to a local folder named after the URI
    objects = _objects(s3)
    for name in STAGES:
        assert f"{PREFIX}{name}/manifest.json" in objects, name
        assert any(k.startswith(f"{PREFIX}{name}/status=ok/") and k.endswith(".parquet") for k in objects), name
    for key in ("recipe.yaml", "index/index.faiss", "index/index.json"):
        assert PREFIX + key in objects, key
    assert not [k for k in objects if k.startswith((f"{PREFIX}.lock", f"{PREFIX}_running/", f"{PREFIX}_work/"))]
    assert not (REPO / "s3:").exists()

    # the index opens from the bucket: every stored vector finds itself first
    from actors.embedder import EMBEDDING, arrow_to_vectors
    from pipelines.data.vector_index import VectorIndex

    index = VectorIndex.load(RUN)
    embedded = [pq.read_table(f.path, filesystem=rundir.fs) for f in rundir.parquet_files("embed", "ok")]
    ids = [i for t in embedded for i in t.column("id").to_pylist()]
    found, _ = index.search(np.concatenate([arrow_to_vectors(t.column(EMBEDDING)) for t in embedded]), 1)
    assert [hits[0] for hits in found] == ids

    # 3. `chillguard status s3://...`: every stage with the manifest's counts
    table = _status(capsys)
    assert set(table) == set(STAGES)
    for name in STAGES:
        r = rows[name]
        assert table[name][:5] == ["complete", str(r["in"]), str(r["out"]), str(r["dropped"]), str(r["errored"])]
