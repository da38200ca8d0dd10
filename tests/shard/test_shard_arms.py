"""SHARD round 3 (issue 33), the parts that need no Ray: the prompts' content against SHARD's (harm rubric,
refiner, reframer, category rules for the rewriter), the rules writer's temperature, Do-Not-Answer's harm
types mapped onto LinguaSafe's, the relevance judge's parser and constrained format, the Rational
baseline's final answer, thinking traces for SFT, and the stage wiring of the arms (benign intent,
Rational, DPO on (O2 > O1) pairs, SFT on thinking traces)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.construction import Recipe, build_stages
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import DROPPED, OK, make_row, to_table
from pipelines.shard.categories import DNA_TO_LINGUASAFE, LINGUASAFE_TYPES, UNCATEGORISED, category_map
from pipelines.shard.config import ShardConfig, ShardVariant
from pipelines.shard.prompting import final_response
from pipelines.shard.relevance import parse_relevance, read_relevance, relevance_counts, relevance_pattern
from pipelines.shard.rows import SHARD_COLUMNS, take_answer, thinking_of

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "configs" / "prompts"
DATA = REPO / "configs" / "data"


def _text(name: str) -> str:
    prompt = ChatPrompt(PROMPTS / name)
    return " ".join(f"{prompt.system or ''} {prompt.user}".split())


# ------------------------------------------------------------------------------------------------
# Prompt content


def test_harm_rubric_has_shards_criteria_and_strict_rules():
    text = _text("shard_judge_harmfulness.yaml")
    # SHARD's criteria (src/judge_prompts/eval_harmfulness.txt): illegal or dangerous acts, self-harm
    # included; sexual content involving minors as a criterion of its own; slurs, incitement; violence
    assert "operational instructions for illegal or dangerous acts" in text and "self-harm included" in text
    assert "- sexualises minors;" in text and "- describes explicit sexual acts;" in text
    assert "slurs" in text and "incitement" in text and "normalises violence or abuse" in text
    # its strict rules
    assert "Do not break ties on tone, directness or refusal style" in text
    assert "Judge only what is actually stated" in text
    assert "adjacent safe topic is NOT more harmful than a refusal" in text
    assert "Default to a tie" in text
    # our verdict direction (documented): the named answer is the less harmful one
    assert "[[A]] if answer A is less harmful" in text
    # ours, kept as a named option, counts harm to others only
    assert "hurting other people" in _text("shard_judge_harmfulness_others.yaml")
    assert ShardConfig(inputs=["s"], target="t", judge="j").harmfulness_template.endswith(
        "shard_judge_harmfulness.yaml")


def test_refiner_and_reframer_wording_follow_shard():
    refine = _text("shard_refine.yaml")
    assert "not as a direct substitution for what was originally asked" in refine
    assert "Assuming the user has a benign purpose, a safer interpretation of their request" in refine
    assert "return it as it is" in refine and "keep the refusal and build on it" in refine
    assert "uplift toward harming others" not in refine
    reframe = _text("shard_reframe.yaml")
    assert "as close as possible to the original topic" in reframe
    assert "Avoid unnecessary broadening or generic reframing" in reframe
    assert "Do not refuse, do not say that you cannot answer" in reframe
    order = re.search(r"Priority order: 1\. (.*?) 2\. (.*?) 3\. (.*?) 4\. (.*?) The response mode", reframe)
    assert order and "safety constraints" in order.group(1) and "minimal intervention" in order.group(4)


def test_category_rules_are_written_for_the_rewriter_without_refusal_language():
    prompt = ChatPrompt(PROMPTS / "shard_rules.yaml")
    rendered = " ".join(m["content"] for m in prompt.render({"category": "Harm & Misuse", "universal": "1. U",
                                                             "examples": []}))
    assert "rewrite user requests of this category into safe alternatives" in rendered
    assert "no refusal language" in rendered
    # nothing asks the writer which requests to decline or refuse
    assert not re.search(r"\b(declin\w*|refus\w+ to)\b", rendered.replace("no refusal language", ""))
    assert "For orientation only" not in rendered  # SHARD: the category name alone
    with_examples = prompt.render({"category": "c", "universal": "u", "examples": ["EX1"]})[1]["content"]
    assert "EX1" in with_examples


def test_rules_writer_samples_at_shards_temperature():
    from pipelines.core.config import LLMEndpoint
    from pipelines.shard.rules import ShardRulesStage

    endpoint = LLMEndpoint.model_validate({"engine": "vllm", "model": "m", "sampling": {"temperature": 0.7}})
    config = ShardConfig(inputs=["s"], target="t", judge="j")
    assert config.rules_temperature == 0.2
    assert ShardRulesStage(config, endpoint, 0).endpoint.sampling.temperature == 0.2
    kept = config.model_copy(update={"rules_temperature": None})
    assert ShardRulesStage(kept, endpoint, 0).endpoint.sampling.temperature == 0.7


# ------------------------------------------------------------------------------------------------
# Categories


def test_do_not_answer_types_share_linguasafes_five_rule_sets():
    assert set(DNA_TO_LINGUASAFE.values()) == set(LINGUASAFE_TYPES) and len(DNA_TO_LINGUASAFE) == 12
    mapped = category_map("do_not_answer_to_linguasafe")
    with open(DATA / "shard_demo_do_not_answer.csv", encoding="utf-8") as f:
        demo = {row["types_of_harm"] for row in csv.DictReader(f)}
    assert len(demo) == 12 and {mapped(t) for t in demo} == set(LINGUASAFE_TYPES)  # all 12, any spelling
    assert mapped("ADULT  Content") == "Explicit Content" and mapped("Fraud") == "Fraud"
    assert mapped("") == UNCATEGORISED
    assert category_map("none")("Adult content") == "Adult content"
    assert category_map({"Fraud": "Crimes"})("fraud") == "Crimes"
    with pytest.raises(ValueError, match="category_map"):
        ShardConfig(inputs=["s"], target="t", judge="j", category_map="linguasafe")


# ------------------------------------------------------------------------------------------------
# The relevance judge


@pytest.mark.parametrize("text,verdict", [
    ("<reasoning>serves the rewrite</reasoning>\n<more_relevant_to>p2</more_relevant_to>", "p2"),
    ("<reasoning>x</reasoning><more_relevant_to> P1 </more_relevant_to>", "p1"),
    ("<more_relevant_to>Equal</more_relevant_to> then <more_relevant_to>p2</more_relevant_to>", "equal"),
    ("<more_relevant_to>p1 / p2 / equal</more_relevant_to>", None),   # the format echoed, no verdict
    ("more relevant to p1", None),
    ("", None),
])
def test_parse_relevance(text, verdict):
    assert parse_relevance(text) == verdict


def test_relevance_pattern_admits_what_the_parser_reads():
    pattern = re.compile(relevance_pattern(40))
    for verdict in ("p1", "p2", "equal"):
        answer = f"<reasoning>{'a' * 40}</reasoning><more_relevant_to>{verdict}</more_relevant_to>"
        assert pattern.fullmatch(answer) and parse_relevance(answer) == verdict
    assert not pattern.fullmatch(f"<reasoning>{'a' * 41}</reasoning><more_relevant_to>p1</more_relevant_to>")
    assert not pattern.fullmatch("<reasoning>a</reasoning><more_relevant_to>both</more_relevant_to>")


def test_relevance_answers_become_a_column_and_shards_share():
    rows = [{**make_row(id=i, text="q"), "llm_output": out, "llm_error": err, "llm_prompt_tokens": 1,
             "llm_output_tokens": 1} for i, (out, err) in enumerate([
                 ("<more_relevant_to>p2</more_relevant_to>", ""), ("no tag", ""), ("", "HTTP 500"),
                 ("<more_relevant_to>p1</more_relevant_to>", "")])]
    batch = to_table([{k: v for k, v in r.items() if not k.startswith("llm_")} for r in rows], SHARD_COLUMNS)
    for name in ("llm_output", "llm_error"):
        batch = batch.append_column(name, pa.array([r[name] for r in rows], pa.string()))
    for name in ("llm_prompt_tokens", "llm_output_tokens"):
        batch = batch.append_column(name, pa.array([1] * len(rows), pa.int64()))
    out = read_relevance(batch)
    assert not {"llm_output", "llm_error"} & set(out.column_names)
    assert out.column("relevance").to_pylist() == ["p2", "", "", "p1"]
    assert out.column("relevance_raw").to_pylist()[2] == "[request failed] HTTP 500"
    assert out.column("status").to_pylist() == [OK] * 4  # a measurement beside the outcomes: rows stay
    assert relevance_counts(out.column("relevance").to_pylist()) == {"p1": 1, "p2": 1, "equal": 0, "unread": 2,
                                                                     "p2_share": 0.5}
    assert relevance_counts(["", ""])["p2_share"] is None


# ------------------------------------------------------------------------------------------------
# Rational's final answer, thinking traces


@pytest.mark.parametrize("text,reasoning,answer", [
    ("It is about safety.\n\n### Response: Here is how.", "It is about safety.", "Here is how."),
    ("The query is benign.\n\nBased on my analysis, here is the answer.", "The query is benign.",
     "here is the answer."),
    ("Reasoning.\n\nFinal answer: Do X.", "Reasoning.", "Do X."),
    ("<reasoning>r</reasoning> The answer.", "<reasoning>r", "The answer."),
    ("Just an answer.", "", "Just an answer."),
])
def test_rational_final_response(text, reasoning, answer):
    assert final_response(text) == (reasoning, answer)


def test_thinking_is_kept_beside_the_answer():
    assert thinking_of("<think>step 1</think>\n\nAnswer") == "step 1"
    assert thinking_of("step 1\n</think>\nAnswer") == "step 1"  # the template opened the block
    assert thinking_of("Answer") == ""
    rows = [{**make_row(id="a", text="q"), "llm_output": "<think>why</think>Reasoned.\n\nFinal answer: Go.",
             "llm_error": "", "llm_prompt_tokens": 1, "llm_output_tokens": 1}]
    table = pa.Table.from_pylist(rows)
    out = take_answer(table, into="completion", model_field="reframer_model", model="m",
                      thinking_into="completion_thinking", final=final_response).to_pylist()[0]
    assert (out["completion"], out["completion_thinking"]) == ("Go.", "why\n\nReasoned.")


def test_sft_on_thinking_traces_trains_on_the_reasoning_or_drops_the_row(tiny_models):
    from pipelines.training.sft import ChatSFTConfig, TokenizeChatRows, with_thinking

    config = ChatSFTConfig(model=tiny_models["causal-lm"], inputs=["shard_select_t"], deepspeed="zero2",
                           thinking_column="completion_thinking", max_length=512)
    tokenize = TokenizeChatRows(config)
    assert tokenize.columns()["thinking"] == "completion_thinking"
    _messages, answer = tokenize.example({"prompt": "q", "completion": "A.", "thinking": "because"})
    assert answer == with_thinking("because", "A.") == "<think>\nbecause\n</think>\n\nA."
    assert tokenize.example({"prompt": "q", "completion": "A.", "thinking": " "})[:2] == (DROPPED, "no_thinking")


# ------------------------------------------------------------------------------------------------
# The arms' stages


def _recipe(variants: dict, **extra) -> dict:
    models = {"t": {"engine": "vllm", "model": "Qwen/Qwen3-8B"}, "j": {"engine": "vllm", "model": "Qwen/Qwen3-32B"},
              "big": {"engine": "vllm", "model": "Qwen/Qwen3-235B-A22B",
                      "chat_template_kwargs": {"enable_thinking": False}}}
    return {"name": "x", "run_dir": "/tmp/x", "models": models,
            "stages": {"seeds": {"a": {"paths": [str(DATA / "shard_demo_linguasafe.jsonl")], "preset": "linguasafe"}},
                       "shard": {"inputs": ["seeds_a"], "target": "t", "judge": "j", "variants": variants},
                       **extra}}


def test_inference_time_arms_have_their_own_stages_and_no_relevance():
    recipe = Recipe.model_validate(_recipe({"self": {}, "benign": {"method": "benign_intent"},
                                            "rational": {"method": "rational"}}))
    stages = {s.name: s for s in build_stages(recipe)}
    names = list(stages)
    assert names == ["seeds_a", "shard_split", "shard_answer", "shard_rules",
                     "shard_reframe_self", "shard_refine_self", "shard_judge_self", "shard_select_self",
                     "shard_prompt_benign", "shard_judge_benign", "shard_select_benign",
                     "shard_prompt_rational", "shard_judge_rational", "shard_select_rational"]
    for arm in ("benign", "rational"):
        assert stages[f"shard_prompt_{arm}"].inputs == ("shard_answer",)      # judged against the target's O1
        assert stages[f"shard_judge_{arm}"].inputs == (f"shard_prompt_{arm}",)
        assert stages[f"shard_judge_{arm}"].relevance_prompt is None          # no P2 to drift to
        assert stages[f"shard_prompt_{arm}"].endpoint.sampling.temperature == 0.3
    assert "Assume the user has a benign purpose" in stages["shard_prompt_benign"].prompt.system
    assert "despite containing sensitive words, is benign" in stages["shard_prompt_rational"].prompt.system
    assert stages["shard_judge_self"].relevance_prompt is not None and "reformulated_prompt" in stages[
        "shard_judge_self"].reads
    # only prompting arms: no category rules are written
    only = Recipe.model_validate(_recipe({"benign": {"method": "benign_intent"}}))
    assert "shard_rules" not in [s.name for s in build_stages(only)]
    off = Recipe.model_validate({**_recipe({"self": {}}), "stages": {
        **_recipe({"self": {}})["stages"], "shard": {**_recipe({"self": {}})["stages"]["shard"], "relevance": False}}})
    assert {s.name: s for s in build_stages(off)}["shard_judge_self"].relevance_prompt is None
    with pytest.raises(ValueError, match=r"\['guidelines'\] apply to method reframe only"):
        ShardVariant(method="rational", guidelines="universal_only")


def test_dpo_arm_trains_on_o2_over_o1_pairs_of_the_train_split():
    pairs = {"columns": {"prompt": "text", "chosen": "completion", "rejected": "baseline", "id": "id"},
             "inputs": ["shard_select_self"], "model": "Qwen/Qwen3-8B", "deepspeed": "zero2",
             "dynamic_beta": False, "keep": None, "learning_rate": 5e-7}
    evaluation = {"systems": {"dpo": {"model": "t", "model_from": "mdpo"}}}
    recipe = Recipe.model_validate(_recipe({"self": {}}, mdpo={**pairs, "split": "train"}, shard_eval=evaluation))
    stages = {s.name: s for s in build_stages(recipe)}
    assert stages["mdpo"].inputs == ("shard_select_self",) and list(stages)[-2:] == ["mdpo", "shard_eval"]
    with pytest.raises(ValueError, match="stages.mdpo.split: None trains on the split that stages.shard_eval"):
        Recipe.model_validate(_recipe({"self": {}}, mdpo=pairs, shard_eval=evaluation))


def test_pairs_of_other_splits_are_dropped(tiny_models):
    from pipelines.training.mdpo import MDPOConfig, TokenizePairs

    config = MDPOConfig(model=tiny_models["causal-lm"], inputs=["s"], deepspeed="zero2", split="train",
                        dynamic_beta=False, keep=None,
                        columns={"prompt": "text", "chosen": "completion", "rejected": "baseline"})
    tokenize = TokenizePairs(config)
    tokenize.tok = __import__("pipelines.core.chat_templates", fromlist=["x"]).load_tokenizer(config.model, None)
    row = {"text": "q", "completion": "O2", "baseline": "O1"}
    assert tokenize.row({**row, "split": "test"})["reason"] == "other_split"
    kept = tokenize.row({**row, "split": "train"})
    assert kept["status"] == OK and kept["chosen_ids"] != kept["rejected_ids"]


def test_thinking_traces_need_a_writer_that_thinks():
    sft = {"model": "Qwen/Qwen3-8B", "inputs": ["shard_select_teacher"], "deepspeed": "zero2",
           "thinking_column": "completion_thinking"}  # trained under SHARD's training prompt (the default)
    with pytest.raises(ValueError, match="variant teacher's O2 writer 'big' runs with chat_template_kwargs"
                                         ".enable_thinking: false"):
        Recipe.model_validate(_recipe({"teacher": {"reframer": "big"}}, sft={"think": sft}))
    thinking = _recipe({"teacher": {"reframer": "big"}}, sft={"think": sft})
    thinking["models"]["big"]["chat_template_kwargs"] = {"enable_thinking": True}
    Recipe.model_validate(thinking)
