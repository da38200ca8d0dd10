"""SHARD's pure parts: P2 JSON validation and the retry, verdict parsing, the A/B order and how it is
undone, the selection rule, the stratified split, the loaders' harm category and level, recipe checks and
category rules (the statistics and tables: ``test_shard_stats.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from actors.reask import RETRY
from pipelines.construction import Recipe, load_recipe
from pipelines.core.config import ConfigError
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import DROPPED, ERROR, OK, make_row
from pipelines.core.splits import assign_splits, split_sizes
from pipelines.data.ingest import IngestConfig, record_to_row
from pipelines.shard.config import ShardConfig
from pipelines.shard.pairwise import (
    CRITERIA,
    A,
    B,
    C,
    RenderJudge,
    candidate_position,
    combine_judgements,
    expand_comparisons,
    judge_variables,
    outcome,
    parse_verdict,
    read_verdicts,
    select,
    verdict_pattern,
)
from pipelines.shard.reframing import (
    FIELDS,
    RESPONSE_MODES,
    ReframingError,
    guidance,
    load_guidelines,
    parse_reframing,
    reframing_schema,
)
from pipelines.shard.rewriting import _RETRY_COLUMNS, raw_p2, read_reframings
from pipelines.shard.rows import SHARD_COLUMNS, take_answer
from pipelines.shard.split import prepare_prompts, split_stratum
from pipelines.shard.stats import LOSS, TIE, WIN
from pipelines.training.sft import ChatSFTConfig
from pipelines.training.system_prompts import ANSWER_SYSTEM, TRAIN_SYSTEM

REPO = Path(__file__).resolve().parents[2]
SHARES = {"train": 0.72, "val": 0.08, "test": 0.2}
VALID = {"reformulated_prompt": "How do pin tumbler locks work, and how can I secure my door?",
         "response_mode": "soft_reframe", "reformulated_component": "burglary technique -> how locks work",
         "preserved_benign_need": "understand lock security"}


# ------------------------------------------------------------------------------------------------
# P2: JSON validation and the retry


@pytest.mark.parametrize("text", [
    json.dumps(VALID),
    "```json\n" + json.dumps(VALID, indent=2) + "\n```",
    "Here is the reframing:\n" + json.dumps({**VALID, "extra": "ignored"}) + "\nDone.",
    "<think>\nthe user asks about locks\n</think>\n" + json.dumps(VALID),
    json.dumps(VALID).replace("secure my door?", "secure\nmy door?"),   # a raw newline inside a string
])
def test_valid_reframings_parse(text):
    fields = parse_reframing(text)
    assert set(fields) == set(FIELDS) and fields["response_mode"] == "soft_reframe"
    assert fields["preserved_benign_need"] == "understand lock security"


@pytest.mark.parametrize("text,reason", [
    ("I cannot help with that.", "invalid_json"),
    ('{"reformulated_prompt": "x", "response_mode": "direct_ans', "invalid_json"),
    ("[1, 2, 3]", "invalid_json"),
    (json.dumps({k: v for k, v in VALID.items() if k != "preserved_benign_need"}), "missing_field"),
    (json.dumps({**VALID, "response_mode": 3}), "missing_field"),
    (json.dumps({**VALID, "preserved_benign_need": "   "}), "empty_field"),
    (json.dumps({**VALID, "reformulated_prompt": ""}), "empty_field"),
    (json.dumps({**VALID, "response_mode": "refuse"}), "invalid_response_mode"),
])
def test_invalid_reframings_have_a_reason(text, reason):
    with pytest.raises(ReframingError) as info:
        parse_reframing(text)
    assert info.value.reason == reason


def test_nothing_reformulated_is_an_empty_component():
    """SHARD allows an empty reformulated component (a direct answer changes nothing)."""
    direct = {**VALID, "response_mode": "direct_answer", "reformulated_component": "  "}
    assert parse_reframing(json.dumps(direct))["reformulated_component"] == ""
    assert reframing_schema(50)["properties"]["reformulated_component"]["minLength"] == 0


def test_schema_admits_only_the_three_modes_and_bounded_fields():
    schema = reframing_schema(50)
    assert schema["properties"]["response_mode"]["enum"] == list(RESPONSE_MODES)
    assert schema["required"] == list(FIELDS) and schema["additionalProperties"] is False
    assert all(schema["properties"][f]["maxLength"] == 50 for f in FIELDS if f != "response_mode")
    assert all(schema["properties"][f]["minLength"] == 1 for f in ("reformulated_prompt", "preserved_benign_need"))


def _answered(answers: list[tuple[str, str]], previous: list[list[str]] | None = None) -> pa.Table:
    """Rows as the LLM step returns them: the SHARD columns + the LLM columns."""
    rows = []
    for i, (output, error) in enumerate(answers):
        rows.append({**make_row(id=f"r{i}", text=f"prompt {i}"),
                     "reframe_answers": (previous or [[]] * len(answers))[i],
                     "retry_problem": "", "retry_previous": "", "llm_output": output, "llm_error": error,
                     "llm_prompt_tokens": 10, "llm_output_tokens": 5})
    from pipelines.core.rows import to_table

    table = to_table(rows, {**SHARD_COLUMNS, **_RETRY_COLUMNS})
    for name, typ in (("llm_output", pa.string()), ("llm_error", pa.string()), ("llm_prompt_tokens", pa.int64()),
                      ("llm_output_tokens", pa.int64())):
        table = table.append_column(name, pa.array([r[name] for r in rows], typ))
    return table


def test_invalid_json_is_retried_once_then_an_error():
    """Our option (``retries: 1``, ``invalid_p2: error``): asked again once, then an error."""
    first = read_reframings(_answered([(json.dumps(VALID), ""), ("not json", ""), ("", "maximum context length")]),
                            last=False).to_pylist()
    assert [r["status"] for r in first] == [OK, RETRY, ERROR]
    assert first[0]["reformulated_prompt"] == VALID["reformulated_prompt"] and first[0]["reframe_answers"] == [
        json.dumps(VALID)]
    assert first[1]["retry_problem"].startswith("invalid_json") and first[1]["retry_previous"] == "not json"
    assert first[2]["reason"] == "prompt_too_long"
    # the retry prompt shows the problem and the previous answer
    prompt = ChatPrompt(REPO / "configs" / "prompts" / "shard_reframe.yaml")
    messages = prompt.render({"text": "x", "category": "c", "universal": "", "category_rules": "",
                              "retry": True, "problem": first[1]["retry_problem"], "previous_answer": "not json"})
    assert "could not be used (invalid_json" in messages[-1]["content"] and "not json" in messages[-1]["content"]
    # the second (last) attempt: valid -> ok, still invalid -> error with both answers
    second = read_reframings(_answered([(json.dumps(VALID), ""), ('{"response_mode": "x"}', "")],
                                       previous=[["not json"], ["not json"]]), last=True,
                             invalid="error").to_pylist()
    assert second[0]["status"] == OK and second[0]["reframe_answers"] == ["not json", json.dumps(VALID)]
    assert (second[1]["status"], second[1]["reason"]) == (ERROR, "missing_field")
    assert '"not json"' in second[1]["detail"] and len(second[1]["reframe_answers"]) == 2


def test_invalid_p2_is_the_raw_answer_by_default():
    """SHARD (``parse_p2``): an answer that is not the JSON object is P2 as it is (code fence and quotes
    removed), with no response mode; only an empty answer or a failed request is an error."""
    assert ShardConfig(inputs=["a"], target="t", judge="j").invalid_p2 == "raw"
    assert ShardConfig(inputs=["a"], target="t", judge="j").retries == 0
    rows = read_reframings(_answered([
        ('"How do pin tumbler locks work?"', ""), ("```\nHow are locks made?\n```", ""),
        ('{"response_mode": "x"}', ""), ("<think>hm</think>   ", ""), ("", "maximum context length"),
        (json.dumps(VALID), "")]), last=True).to_pylist()
    assert [r["status"] for r in rows] == [OK, OK, OK, ERROR, ERROR, OK]
    assert [r["reformulated_prompt"] for r in rows[:3]] == [
        "How do pin tumbler locks work?", "How are locks made?", '{"response_mode": "x"}']
    assert all(r[f] == "" for r in rows[:3] for f in FIELDS if f != "reformulated_prompt")
    assert rows[3]["reason"] == "invalid_json" and rows[4]["reason"] == "prompt_too_long"
    assert rows[5]["response_mode"] == VALID["response_mode"]
    assert raw_p2("'quoted'") == "quoted" and raw_p2("```json\n{}\n```") == "{}"


def test_guidance_per_ablation():
    guidelines = load_guidelines(REPO / "configs" / "prompts" / "shard_guidelines.yaml")
    assert len(guidelines.universal) == 13 and guidelines.text().startswith("1. ")
    assert any("civic standing" in title for title, _ in guidelines.universal)  # SHARD's guideline on groups
    assert guidance("full", guidelines, "R1", "Fraud") == {"universal": guidelines.text(), "category_rules": "R1",
                                                           "category": "Fraud"}
    assert guidance("universal_only", guidelines, "R1", "Fraud") == {"universal": guidelines.text(),
                                                                     "category_rules": "", "category": ""}
    assert guidance("instructions_only", guidelines, "R1", "Fraud") == {"universal": "", "category_rules": "",
                                                                        "category": ""}
    prompt = ChatPrompt(REPO / "configs" / "prompts" / "shard_reframe.yaml")
    render = {"text": "q", "retry": False, "problem": "", "previous_answer": ""}
    full = prompt.render({**render, **guidance("full", guidelines, "RULES-FOR-FRAUD", "Fraud")})
    bare = prompt.render({**render, **guidance("instructions_only", guidelines, "RULES-FOR-FRAUD", "Fraud")})
    assert "Least restrictive transformation" in full[0]["content"] and "RULES-FOR-FRAUD" in full[0]["content"]
    assert "Harm category: Fraud" in full[1]["content"] and "Fraud" not in bare[1]["content"]
    assert "Least restrictive transformation" not in bare[0]["content"] and "RULES-FOR-FRAUD" not in bare[0]["content"]
    assert all(mode in bare[0]["content"] for mode in RESPONSE_MODES)


def test_guidelines_file_is_checked(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("universal:\n  - {title: x}\n")
    with pytest.raises(ValueError, match=r"universal\[0\]"):
        load_guidelines(bad)


# ------------------------------------------------------------------------------------------------
# Verdicts, the A/B order, the selection rule


@pytest.mark.parametrize("text,verdict", [
    ("A is more specific. [[A]]", A),
    ("[[B]]", B),
    ("Both are equally vague.\n\n[[C]]", C),
    ("A first: [[A]]. Then again [[B]]", A),   # the first verdict counts (SHARD's re.search)
    ("<think>maybe [[A]]</think> On reflection: [[ b ]]", B),
    ("I prefer answer A.", None),
    ("[A]", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_verdict_pick_first_is_shards_last_is_an_option():
    text = "Format: [[A]], [[B]] or [[C]]. Answer B explains more. [[B]]"
    assert parse_verdict(text) == A and parse_verdict(text, "first") == A and parse_verdict(text, "last") == B
    assert ShardConfig(inputs=["a"], target="t", judge="j").verdict == "first"
    with pytest.raises(ValueError, match="verdict pick"):
        parse_verdict(text, "middle")


def test_outcome_undoes_the_order():
    assert outcome(A, A) == WIN and outcome(B, B) == WIN
    assert outcome(B, A) == LOSS and outcome(A, B) == LOSS
    assert outcome(C, A) == TIE and outcome(C, B) == TIE
    with pytest.raises(ValueError):
        outcome("D", A)


def test_order_is_seeded_keyed_and_fair():
    draws = [candidate_position(42, "self", f"id{i}", "helpfulness") for i in range(2000)]
    assert draws == [candidate_position(42, "self", f"id{i}", "helpfulness") for i in range(2000)]
    assert abs(draws.count(A) / len(draws) - 0.5) < 0.04
    assert draws != [candidate_position(43, "self", f"id{i}", "helpfulness") for i in range(2000)]
    assert judge_variables("q", "cand", "ref", A) == {"prompt": "q", "answer_a": "cand", "answer_b": "ref"}
    assert judge_variables("q", "cand", "ref", B) == {"prompt": "q", "answer_a": "ref", "answer_b": "cand"}


def _fake_judge(messages) -> str:
    """A judge that prefers whichever answer says GOOD, wherever it is shown (ties if neither)."""
    user = messages[-1]["content"]
    a = user.split("[Answer A]")[1].split("[Answer B]")[0]
    b = user.split("[Answer B]")[1]
    return "A says GOOD. [[A]]" if "GOOD" in a else "B says GOOD. [[B]]" if "GOOD" in b else "same [[C]]"


def test_randomised_order_is_undone_when_scoring():
    """Through the real rendering and reading functions: the candidate that a fake judge prefers wins
    whatever position it was drawn into; the reference it prefers makes the candidate lose."""
    rows = [{**make_row(id=f"p{i}", text=f"question {i}"), "completion": "GOOD answer" if i % 2 else "plain",
             "baseline": "plain" if i % 2 else "GOOD draft"} for i in range(40)]
    from pipelines.core.rows import to_table

    requests = expand_comparisons(to_table(rows, SHARD_COLUMNS), seed=42, key="v", candidate="completion",
                                  reference="baseline")
    assert requests.num_rows == 80
    positions = requests.column("position").to_pylist()
    assert set(positions) == {A, B}                       # both orders occur
    prompts = {c: ChatPrompt(REPO / "configs" / "prompts" / f"shard_judge_{c}.yaml") for c in CRITERIA}
    render = RenderJudge(prompts)
    answers = [_fake_judge(render(r)) for r in requests.to_pylist()]
    answered = (requests.append_column("llm_output", pa.array(answers)).append_column("llm_error", pa.array([""] * 80))
                .append_column("llm_prompt_tokens", pa.array([1] * 80, pa.int64()))
                .append_column("llm_output_tokens", pa.array([5] * 80, pa.int64())))
    verdicts = read_verdicts(answered, max_tokens=64).to_pylist()
    for v in verdicts:
        expected = WIN if int(v["id"][1:]) % 2 else LOSS
        assert v["outcome"] == expected and v["judge_reason"] == ""
    by_id = {}
    for v in verdicts:
        by_id.setdefault(v["id"], []).append(v)
    combined = combine_judgements(by_id["p1"])
    assert (combined["helpfulness"], combined["harmfulness"], combined["reason"]) == (WIN, WIN, "")
    assert [j["criterion"] for j in combined["judgements"]] == list(CRITERIA)


def test_unreadable_or_failed_verdicts_are_errors():
    rows = [{**make_row(id="p0", text="q"), "completion": "x", "baseline": "y"}]
    from pipelines.core.rows import to_table

    requests = expand_comparisons(to_table(rows, SHARD_COLUMNS), seed=1, key="v", candidate="completion",
                                  reference="baseline")
    answered = (requests.append_column("llm_output", pa.array(["no verdict here", ""]))
                .append_column("llm_error", pa.array(["", "server error 500"]))
                .append_column("llm_prompt_tokens", pa.array([1, 0], pa.int64()))
                .append_column("llm_output_tokens", pa.array([64, 0], pa.int64())))
    verdicts = read_verdicts(answered, max_tokens=64).to_pylist()
    assert verdicts[0]["judge_reason"] == "unparseable_verdict" and "reached max_tokens" in verdicts[0]["judge_error"]
    assert verdicts[1]["judge_reason"] == "inference_error" and verdicts[1]["raw"].startswith("[request failed]")
    combined = combine_judgements(verdicts)
    assert combined["reason"] == "unparseable_verdict" and "harmfulness: server error" in combined["detail"]


def _judged(rows, fake, swap: bool) -> list[dict]:
    """Rows judged by ``fake`` (messages -> answer) through the real rendering and reading."""
    from pipelines.core.rows import to_table

    requests = expand_comparisons(to_table(rows, SHARD_COLUMNS), seed=42, key="v", candidate="completion",
                                  reference="baseline", swap=swap)
    render = RenderJudge({c: ChatPrompt(REPO / "configs" / "prompts" / f"shard_judge_{c}.yaml") for c in CRITERIA})
    answers = [fake(render(r)) for r in requests.to_pylist()]
    n = requests.num_rows
    answered = (requests.append_column("llm_output", pa.array(answers)).append_column("llm_error", pa.array([""] * n))
                .append_column("llm_prompt_tokens", pa.array([1] * n, pa.int64()))
                .append_column("llm_output_tokens", pa.array([5] * n, pa.int64())))
    return read_verdicts(answered, max_tokens=64).to_pylist()


def test_position_bias_check_on_judges_with_known_bias():
    from pipelines.shard.pairwise import Recheck, position_bias

    rows = [{**make_row(id=f"p{i}", text=f"question {i}"), "completion": "GOOD answer" if i % 3 else "plain",
             "baseline": "plain"} for i in range(30)]

    def check(fake) -> dict:
        first = {(v["id"], v["criterion"]): v for v in _judged(rows, fake, swap=False)}
        again = _judged(rows, fake, swap=True)
        assert all(first[(v["id"], v["criterion"])]["position"] != v["position"] for v in again)  # swapped
        return position_bias([Recheck(v["criterion"], first[(v["id"], v["criterion"])]["outcome"], v["outcome"],
                                      first[(v["id"], v["criterion"])]["verdict"], v["verdict"]) for v in again])

    always_a = check(lambda messages: "The first one. [[A]]")  # pure position bias
    assert always_a["all"] == {"compared": 60, "flips": 60, "flip_rate": 1.0, "first_position_rate": 1.0}
    by_content = check(_fake_judge)                             # decides by content, wherever it is shown
    assert by_content["all"]["flips"] == 0 and by_content["all"]["flip_rate"] == 0.0
    assert by_content["helpfulness"]["compared"] == 30
    assert 0.3 < by_content["all"]["first_position_rate"] < 0.7  # the GOOD answer sits on either side
    # by hand: one flip of two compared; a comparison without a verdict in one order is not compared
    hand = position_bias([Recheck("helpfulness", WIN, LOSS, A, A), Recheck("helpfulness", TIE, TIE, C, C),
                          Recheck("harmfulness", WIN, "", B, "")])
    assert hand["helpfulness"] == {"compared": 2, "flips": 1, "flip_rate": 0.5, "first_position_rate": 1.0}
    assert hand["harmfulness"] == {"compared": 0, "flips": 0, "flip_rate": None, "first_position_rate": 0.0}
    assert position_bias([])["all"]["flip_rate"] is None


@pytest.mark.parametrize("helpfulness,harmfulness,shard,strict", [
    # SHARD's rule (O2 wins helpfulness) and ours, which also refuses a loss on harmfulness
    (WIN, WIN, (True, ""), (True, "")), (WIN, TIE, (True, ""), (True, "")),
    (WIN, LOSS, (True, ""), (False, "more_harmful")),
    (TIE, WIN, (False, "not_more_helpful"), (False, "not_more_helpful")),
    (TIE, TIE, (False, "not_more_helpful"), (False, "not_more_helpful")),
    (LOSS, WIN, (False, "not_more_helpful"), (False, "not_more_helpful")),
    (LOSS, LOSS, (False, "not_more_helpful"), (False, "not_more_helpful")),
])
def test_selection_rules(helpfulness, harmfulness, shard, strict):
    assert select(helpfulness, harmfulness) == select(helpfulness, harmfulness, "helpfulness") == shard
    assert select(helpfulness, harmfulness, "helpfulness_and_harm") == strict
    with pytest.raises(ValueError, match="selection rule"):
        select(helpfulness, harmfulness, "both")


def test_verdict_pattern_admits_what_the_parser_reads():
    import re

    pattern = re.compile(verdict_pattern(40))
    for text in ("[[A]]", "A is better. [[B]]", "x" * 40 + "[[C]]"):
        assert pattern.fullmatch(text) and parse_verdict(text) in (A, B, C)
    assert not pattern.fullmatch("x" * 41 + "[[C]]") and not pattern.fullmatch("[[D]]")


# ------------------------------------------------------------------------------------------------
# The stratified split


@pytest.mark.parametrize("n,expected", [
    (0, {"train": 0, "val": 0, "test": 0}), (1, {"train": 1, "val": 0, "test": 0}),
    (3, {"train": 2, "val": 0, "test": 1}), (10, {"train": 7, "val": 1, "test": 2}),
    (22, {"train": 16, "val": 2, "test": 4}), (100, {"train": 72, "val": 8, "test": 20}),
    (939, {"train": 676, "val": 75, "test": 188}),
])
def test_split_sizes(n, expected):
    assert split_sizes(n, SHARES) == expected and sum(expected.values()) == n


def test_assign_splits_is_seeded_and_order_free():
    keys = [f"k{i}" for i in range(50)]
    first = assign_splits(keys, SHARES, seed=0)
    assert first == assign_splits(list(reversed(keys)) + keys[:5], SHARES, seed=0)   # order, duplicates
    assert {s: list(first.values()).count(s) for s in SHARES} == split_sizes(50, SHARES)
    assert first != assign_splits(keys, SHARES, seed=1)


def _seed_rows(records: list[dict]) -> pa.Table:
    """Rows as a seeds stage writes them (harm category / level as columns)."""
    from pipelines.core.rows import to_table
    from pipelines.data.ingest import ORIGIN

    return to_table([make_row(**r) for r in records], ORIGIN)


def test_split_stage_functions_stratify_and_keep_identical_texts_together():
    records = [{"id": f"d{i}", "text": f"prompt {i % 18}", "harm_category": "Fraud", "harm_level": "L1"}
               for i in range(20)]           # two pairs of identical texts
    records += [{"id": "dup", "text": "twice", "harm_level": "L1"}, {"id": "dup", "text": "twice", "harm_level": "L1"},
                {"id": "empty", "text": "", "harm_level": "L1"}]
    prepared = prepare_prompts(_seed_rows(records), dataset="dna")
    rows = prepared.to_pylist()
    assert {r["dataset"] for r in rows} == {"dna"} and rows[0]["harm_category"] == "Fraud"
    assert rows[0]["parent_id"] == "d0" and rows[0]["id"] != "d0"
    assert "harm_category" not in json.loads(rows[0]["lineage"])
    out = split_stratum(prepared, shares=SHARES, seed=0).to_pylist()
    assert len(out) == len(records)
    by_text = {}
    for r in out:
        if r["status"] == OK:
            by_text.setdefault(r["text"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_text.values())                      # identical texts: one split
    distinct = len(by_text)
    assert sum(1 for s in by_text.values() if s == {"test"}) == split_sizes(distinct, SHARES)["test"]
    assert [r["reason"] for r in out if r["status"] == DROPPED] == ["duplicate_row"]
    assert [r["reason"] for r in out if r["status"] == ERROR] == ["missing_text"]


def test_answers_become_columns_or_errors():
    rows = [{**make_row(id=str(i), text="q"), "llm_output": out, "llm_error": err, "llm_prompt_tokens": 1,
             "llm_output_tokens": 1} for i, (out, err) in enumerate([("<think>hm</think> Fine.", ""), ("  ", ""),
                                                                     ("", "boom")])]
    table = take_answer(pa.Table.from_pylist(rows), into="baseline", model_field="baseline_model", model="m")
    got = table.to_pylist()
    assert (got[0]["baseline"], got[0]["baseline_model"], got[0]["status"]) == ("Fine.", "m", OK)
    assert (got[1]["status"], got[1]["reason"]) == (ERROR, "empty_output")
    assert (got[2]["status"], got[2]["reason"]) == (ERROR, "inference_error")


# ------------------------------------------------------------------------------------------------
# Loaders and recipes


def test_presets_keep_harm_category_and_level(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("{}\n")
    dna = record_to_row({"id": 3, "risk_area": "Information Hazards", "types_of_harm": "Privacy leaks",
                         "specific_harms": "x", "question": "Where does she live?"},
                        IngestConfig(paths=[str(path)], preset="do_not_answer"), "f")
    assert (dna["harm_category"], dna.get("harm_level", "")) == ("Privacy leaks", "")
    ls = record_to_row({"id": "l1", "prompt": "p", "lang": "en", "type": "Fraud", "subtype": "s", "level": "L2",
                        "source": "s"}, IngestConfig(paths=[str(path)], preset="linguasafe"), "f")
    assert (ls["harm_category"], ls["harm_level"]) == ("Fraud", "L2")


def test_demo_and_paper_recipes_load_with_their_stage_order(tiny_models):
    from pipelines.construction import build_stages

    # the demo names models/tiny (built by `make demo`); a clean checkout has the session's kit
    lm, judge1, judge2 = tiny_models["causal-lm"], tiny_models["judge-1"], tiny_models["judge-2"]
    tiny = [f"models.target.model={lm}", f"models.teacher.model={judge2}", f"models.judge.model={judge1}",
            f"stages.sft.self.model={lm}", f"stages.sft.teacher.model={lm}", f"stages.mdpo.model={lm}"]
    demo = load_recipe(REPO / "configs" / "recipes" / "shard_demo.yaml", tiny)
    stages = build_stages(demo)
    names = [s.name for s in stages]
    expected = ["seeds_dna", "seeds_linguasafe", "shard_split", "shard_answer", "shard_rules"]  # rules: once
    expected += [f"shard_{step}_self" for step in ("reframe", "refine", "judge", "select")]
    expected += ["shard_answer_teacher"] + [f"shard_{step}_teacher"
                                            for step in ("reframe", "refine", "judge", "select")]
    # the inference-time baselines, then SFT per supervision variant and DPO on the self variant's pairs
    expected += [f"shard_{step}_{arm}" for arm in ("benign_intent", "rational")
                 for step in ("prompt", "judge", "select")]
    assert names == expected + ["sft_self", "sft_teacher", "mdpo", "shard_eval"]
    assert list(demo.stages.shard_eval.systems) == ["self", "teacher", "dpo"]
    # SHARD's teacher baseline: the teacher answers first, refines its own O1 and is judged against it
    by_name = {s.name: s for s in stages}
    assert by_name["shard_answer_teacher"].endpoint.model == judge2 == by_name["shard_refine_teacher"].endpoint.model
    assert by_name["shard_reframe_teacher"].inputs == ("shard_answer_teacher",)
    assert by_name["shard_reframe_self"].inputs == ("shard_answer",)
    assert by_name["shard_rules"].endpoint.model == lm  # one writer (the target) for every variant
    # ours, named for what it is: the teacher refines the target's drafts
    target_drafts = load_recipe(REPO / "configs" / "recipes" / "shard_demo.yaml",
                                [*tiny, "stages.shard.variants.teacher.draft=target"])
    names = [s.name for s in build_stages(target_drafts)]
    assert "shard_answer_teacher" not in names
    assert {s.name: s for s in build_stages(target_drafts)}["shard_reframe_teacher"].inputs == ("shard_answer",)
    paper = load_recipe(REPO / "configs" / "recipes" / "shard_paper.yaml")
    assert paper.stages.shard.variants["universal_only"].guidelines == "universal_only"
    lora = paper.stages.sft["self"]
    assert (lora.lora.r, lora.lora.alpha, lora.learning_rate, lora.epochs) == (16, 32, 1e-4, 3)
    # SHARD's combined SFT job: effective batch 64 = 2 per GPU × 8 GPUs × 4 accumulation steps
    assert (lora.global_batch_size, lora.micro_batch_size, lora.num_workers, lora.warmup_ratio) == (64, 2, 8, 0.05)
    # the paper recipe spells out the stage's defaults, which are SHARD's
    defaults = ChatSFTConfig(model="Qwen/Qwen3-8B", inputs=["shard_select_self"])
    for name in ("learning_rate", "global_batch_size", "warmup_ratio", "epochs", "seed", "system", "lora",
                 "deepspeed", "too_long"):
        assert getattr(lora, name) == getattr(defaults, name), name
    assert paper.stages.shard.system == ANSWER_SYSTEM and lora.system == TRAIN_SYSTEM != ANSWER_SYSTEM
    assert paper.stages.shard_eval.head_to_head == [("teacher", "self")]
    assert not paper.stages.shard.constrained and paper.stages.shard.retries == 0


def _recipe(**stages) -> dict:
    return {"name": "x", "run_dir": "/tmp/x", "models": {"t": {"engine": "vllm", "model": "Qwen/Qwen3-8B"},
                                                         "j": {"engine": "vllm", "model": "Qwen/Qwen3-32B"}},
            "stages": {"seeds": {"a": {"paths": [str(REPO / "configs" / "data" / "shard_demo_linguasafe.jsonl")],
                                       "preset": "linguasafe"}}, **stages}}


def test_recipe_checks():
    shard = {"inputs": ["seeds_a"], "target": "t", "judge": "j"}
    Recipe.model_validate(_recipe(shard=shard))
    cases = [
        ({"shard": {**shard, "inputs": ["seeds_b"]}}, r"stages.shard.inputs: \['seeds_b'\]"),
        ({"shard": {**shard, "judge": "nope"}}, "stages.shard.judge: 'nope' is not defined"),
        ({"shard": {**shard, "variants": {"t": {"reframer": "big"}}}}, "variants.t.reframer: 'big'"),
        ({"shard": {**shard, "variants": {"Self!": {}}}}, "variant names"),
        ({"shard": {**shard, "splits": {"train": 0.7, "val": 0.1, "test": 0.1}}}, "must be 1"),
        ({"shard_eval": {"systems": {"s": {"model": "t"}}}}, "stages.shard_eval needs stages shard"),
        ({"shard": shard, "shard_eval": {"systems": {"s": {"model": "t", "model_from": "sft_x"}}}},
         "model_from: 'sft_x' is not an enabled training stage"),
        ({"shard": shard, "sft": {"s": {"model": "Qwen/Qwen3-8B", "inputs": ["shard_select_self"],
                                        "deepspeed": "zero2", "system": "Be terse."}}},
         "stages.sft.s.system: 'Be terse.' differs from stages.shard.train_system"),
        ({"shard": shard, "shard_eval": {"systems": {"s": {"model": "t"}}},
          "sft": {"s": {"model": "Qwen/Qwen3-8B", "inputs": ["shard_select_self"], "deepspeed": "zero2",
                        "split": None}}},
         "stages.sft.s.split: None trains on the split that stages.shard_eval evaluates"),
    ]
    for stages, message in cases:
        with pytest.raises(ValueError, match=message):
            Recipe.model_validate(_recipe(**stages))
    # a trained model is a folder: an http endpoint cannot run it
    served = _recipe(shard=shard, shard_eval={"systems": {"s": {"model": "h", "model_from": "sft_s"}}},
                     sft={"s": {"model": "Qwen/Qwen3-8B", "inputs": ["shard_select_self"]}})
    served["models"]["h"] = {"engine": "http", "model": "m", "url": "https://example.org/v1/chat/completions"}
    with pytest.raises(ValueError, match="systems.s.model_from: the model sft_s exports is a folder that only "
                                         "engine vllm loads; endpoint 'h' is engine http"):
        Recipe.model_validate(served)
    served["models"]["h"] = {"engine": "vllm", "model": "Qwen/Qwen3-8B"}
    Recipe.model_validate(served)
    assert ShardConfig(**shard).reframer("self") == "t"
    # train_system: null = SFT trains under the answers' system prompt (our old single prompt)
    same = _recipe(shard={**shard, "train_system": None},
                   sft={"s": {"model": "Qwen/Qwen3-8B", "inputs": ["shard_select_self"], "system": ANSWER_SYSTEM}})
    Recipe.model_validate(same)
    with pytest.raises(ValueError, match="differs from stages.shard.system"):
        Recipe.model_validate(_recipe(shard={**shard, "train_system": None},
                                      sft={"s": {"model": "Qwen/Qwen3-8B", "inputs": ["shard_select_self"]}}))
    with pytest.raises(ValueError, match=r"head_to_head: \['x'\] not among systems"):
        Recipe.model_validate(_recipe(shard=shard, shard_eval={"systems": {"s": {"model": "t"}},
                                                               "head_to_head": [["s", "x"]]}))


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nrun_dir: /tmp/x\nstages:\n  shard: {inputs: [a], target: t, judge: j, foo: 1}\n")
    with pytest.raises(ConfigError, match="stages.shard.foo: unknown key"):
        load_recipe(path)


# ------------------------------------------------------------------------------------------------
# Category rules


def test_category_examples_are_seeded_train_only_and_cover_uncategorised_rows(tmp_path):
    from pipelines.core.rows import to_table
    from pipelines.core.rundir import RunDir
    from pipelines.shard.config import SPLIT
    from pipelines.shard.rules import category_examples

    # rows 0-7 train, 8-9 test (a category only the test split has: Privacy)
    rows = [{**make_row(id=f"r{i}", text=f"prompt {i}"), "harm_category": "Fraud" if i < 6 else "",
             "split": "train"} for i in range(8)]
    rows += [{**make_row(id=f"t{i}", text=f"TEST prompt {i}"), "harm_category": c, "split": "test"}
             for i, c in enumerate(["Fraud", "Privacy"])]
    rundir = RunDir(str(tmp_path / "run"))
    rundir.write_table(SPLIT, OK, to_table(rows, SHARD_COLUMNS))
    examples = category_examples(rundir, SPLIT, seed=0, k=3)
    assert set(examples) == {"Fraud", "Privacy", "uncategorised"}  # every category gets rules ...
    assert len(examples["Fraud"]) == 3 and set(examples["Fraud"]) <= {f"prompt {i}" for i in range(6)}
    assert sorted(examples["uncategorised"]) == ["prompt 6", "prompt 7"]
    assert examples["Privacy"] == []  # ... but no test prompt reaches the rules writer
    assert not any("TEST" in text for texts in examples.values() for text in texts)
    assert category_examples(rundir, SPLIT, seed=0, k=3) == examples
    # SHARD's default: rules from the category name alone
    assert category_examples(rundir, SPLIT, seed=0, k=0) == {"Fraud": [], "Privacy": [], "uncategorised": []}


def test_rows_without_rules_for_their_category_are_errors():
    from pipelines.core.rows import to_table
    from pipelines.shard.categories import category_map
    from pipelines.shard.rewriting import plan_reframing

    rows = [{**make_row(id="a", text="q"), "harm_category": "Fraud"},
            {**make_row(id="b", text="q"), "harm_category": "Privacy"},
            {**make_row(id="c", text="q"), "harm_category": ""},
            {**make_row(id="d", text="q"), "harm_category": "Assisting  illegal ACTIVITIES"}]
    table = to_table(rows, SHARD_COLUMNS)
    mapped = category_map("do_not_answer_to_linguasafe")
    full = plan_reframing(table, variant="self", mode="full", model="m", rules_category=mapped,
                          categories=frozenset({"Fraud", "uncategorised", "Crimes & Illegal Activities"})).to_pylist()
    assert [(r["status"], r["reason"]) for r in full] == [(OK, ""), (ERROR, "missing_category_rules"), (OK, ""),
                                                          (OK, "")]
    assert full[0]["variant"] == "self" and full[0]["reframer_model"] == "m" and full[0]["guidelines"] == "full"
    unmapped = plan_reframing(table, variant="self", mode="full", model="m", rules_category=category_map("none"),
                              categories=frozenset({"Fraud", "uncategorised", "Crimes & Illegal Activities"}))
    assert unmapped.column("reason").to_pylist()[3] == "missing_category_rules"  # its own name: no rules
    ablation = plan_reframing(table, variant="u", mode="universal_only", model="m", categories=None,
                              rules_category=mapped).to_pylist()
    assert {r["status"] for r in ablation} == {OK}
