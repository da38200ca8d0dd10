"""answers_to_rows: LLM answers -> output rows or error rows (pure, no Ray)."""

import pyarrow as pa

from pipelines.core.parsing import classify_llm_error
from pipelines.data.rewrite import RewriteConfig, answers_to_rows
from tests.conftest import REPO

TEMPLATE = str(REPO / "configs/prompts/rewrite_to_prompts.yaml")


def _batch(rows):
    base = {"id": "", "text": "src", "lang": "zh", "macro": "A", "micro": "A1",
            "llm_output": "", "llm_error": ""}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def test_fan_out_errors_and_lineage():
    config = RewriteConfig(model="m", template=TEMPLATE, output="list", max_outputs=2, min_chars=2)
    table = answers_to_rows(_batch([
        {"id": "p1", "llm_output": "问题一；问题二；问题三"},
        {"id": "p2", "llm_output": "；；\n"},
        {"id": "p3", "llm_error": "This model's maximum context length is 1024 tokens. However..."},
        {"id": "p4", "llm_error": "RuntimeError: engine hiccup"},
    ]), config=config, model="tiny")
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    errors = {r["parent_id"]: r for r in rows if r["status"] == "error"}
    assert [r["text"] for r in ok] == ["问题一", "问题二"]  # max_outputs=2
    assert {r["parent_id"] for r in ok} == {"p1"}
    assert all(r["label"] == "unsafe" and r["micro"] == "A1" and r["model"] == "tiny" for r in ok)
    assert len({r["id"] for r in ok}) == 2
    assert errors["p2"]["reason"] == "unparseable_output"
    assert errors["p3"]["reason"] == "prompt_too_long"
    assert errors["p4"]["reason"] == "inference_error"
    # every input row is accounted for: produced output or exactly one error row
    assert {r["parent_id"] for r in ok} | set(errors) == {"p1", "p2", "p3", "p4"}
    assert table.schema.field("iteration").type == pa.int32()


def test_text_mode_keeps_whole_answer():
    config = RewriteConfig(model="m", template=TEMPLATE, output="text", min_chars=3)
    rows = answers_to_rows(_batch([{"id": "a", "llm_output": "<think>hm</think>整段作为一个提示；不拆分"},
                                   {"id": "b", "llm_output": "no"}]), config=config, model="x").to_pylist()
    assert rows[0]["text"] == "整段作为一个提示；不拆分" and rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error" and rows[1]["reason"] == "unparseable_output"


def test_classify_llm_error():
    assert classify_llm_error("prompt is too long") == "prompt_too_long"
    assert classify_llm_error("Bad request") == "inference_error"
