"""The loop's pure parts: levels, pair priority, answer parsing, candidate rows, decontamination,
the recipe section and the stages it builds. No Ray, no engine."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.rows import DROPPED, ERROR, OK, make_row, to_table
from pipelines.data.preprocess import NearDedupConfig
from pipelines.loop.decontaminate import TEST_OVERLAP, TRAIN_OVERLAP, find_overlaps, reference_table
from pipelines.loop.generate import answers_to_candidates, parse_candidate, split_seeds
from pipelines.loop.levels import L1, L2, L3, L4, Pair, level_of, make_pairs, no_pair_reason
from pipelines.loop.score import ScoreParseError, answers_to_levels, parse_quality


@pytest.mark.parametrize("gold,pred,quality,level", [
    ("unsafe", "safe", 3, L1), ("unsafe", "safe", 5, L1), ("safe", "unsafe", 2, L2), ("unsafe", "safe", 1, L2),
    ("safe", "safe", 2, L3), ("unsafe", "unsafe", 1, L3), ("safe", "safe", 3, L4), ("unsafe", "unsafe", 4, L4),
    ("safe", None, 4, None), ("safe", "safe", None, None),
])
def test_levels(gold, pred, quality, level):
    assert level_of(gold, pred, quality) == level


def rng(seed=0):
    return np.random.default_rng(seed)


def test_pair_priority_and_one_pair_per_candidate():
    # with max_pairs None: as many pairs as the candidates allow, the best types first. Both L4s
    # on the L1s would leave the L2 and the L3 unpaired; one <L1,L4> lets every candidate pair
    cands = [("a", L1), ("b", L1), ("c", L4), ("d", L3), ("e", L2), ("f", L4)]
    pairs = make_pairs(cands, None, rng())
    used = [x for p in pairs for x in (p.chosen, p.rejected)]
    assert len(used) == len(set(used))  # a candidate is in one pair at most
    assert [p.type for p in pairs] == ["<L1,L4>", "<L1,L3>", "<L2,L4>"]
    assert make_pairs(cands, 1, rng())[0].type == "<L1,L4>"  # the default: the single best pair
    assert [p.type for p in make_pairs(cands, 2, rng())] == ["<L1,L4>", "<L1,L4>"]  # two: the best two


def test_pair_fallbacks_and_no_pair_reasons():
    assert [p.type for p in make_pairs([("a", L1), ("b", L3), ("c", L3)], None, rng())] == ["<L1,L3>"]
    assert [p.type for p in make_pairs([("a", L2), ("b", L4)], None, rng())] == ["<L2,L4>"]
    # <L2,L3> is never used
    assert make_pairs([("a", L2), ("b", L3), ("c", L2), ("d", L3)], None, rng()) == []
    assert no_pair_reason([L2, L3, L2, L3]) == "only_L2_L3"
    # all ineligible (no score or no label), one level only, no candidates
    assert make_pairs([("a", None), ("b", None)], None, rng()) == []
    assert no_pair_reason([None, None]) == "no_eligible_candidates"
    assert make_pairs([("a", L4), ("b", L4), ("c", L3)], None, rng()) == []
    assert no_pair_reason([L4, L4, L3]) == "no_valid_pair"
    assert no_pair_reason([]) == "no_candidates"
    # an ineligible candidate is never paired, even when its id sorts first
    assert make_pairs([("0", None), ("a", L1), ("b", L4)], None, rng()) == [Pair("a", "b", L1, L4)]


def test_ties_inside_a_level_are_broken_by_the_seeded_generator():
    cands = [(f"c{i}", L1) for i in range(4)] + [(f"d{i}", L4) for i in range(4)]
    first = make_pairs(cands, 1, rng(1))
    assert make_pairs(list(reversed(cands)), 1, rng(1)) == first  # input order does not matter
    chosen = {make_pairs(cands, 1, rng(seed))[0].chosen for seed in range(20)}
    assert len(chosen) > 1  # different seeds pick different members of the level
    assert len(make_pairs(cands, None, rng(1))) == 4  # at most k // 2 pairs without a cap


@pytest.mark.parametrize("answer,text", [
    ("新指令：怎样悄悄拿到同事的工资条？", "怎样悄悄拿到同事的工资条？"),
    ("“如何评价某地的饮食习惯？”", "如何评价某地的饮食习惯？"),
    ("<think>想一想</think>\n\n请介绍一下本地的传统节日。", "请介绍一下本地的传统节日。"),
    ("   \n", ""), ("<think>没有想完", ""),
])
def test_parse_candidate(answer, text):
    assert parse_candidate(answer) == text


@pytest.mark.parametrize("answer,score", [("4", 4), ("评分：5分", 5), (" 1\n", 1), ("<think>3 or 4</think>2", 2),
                                          ("４", 4), ("评分：3.0", 3), ("想了想</think>5", 5)])
def test_parse_quality(answer, score):
    assert parse_quality(answer) == score


# signs are read, never dropped (issue 28: "-3" was read as 3); out of range is never guessed
@pytest.mark.parametrize("answer", ["", "很好", "6", "0", "3 或 4", "4/5", "-3", "−3", "－4", "评分：-2分", "4.5",
                                    "1-5分：4"])
def test_unparseable_quality(answer):
    with pytest.raises(ScoreParseError):
        parse_quality(answer)


def seed_batch(rows):
    return to_table([make_row(**r) for r in rows], {"split": pa.string()})


def test_seed_rows_and_candidates_account_for_k_per_seed():
    batch = seed_batch([
        dict(id="s1", text="怎么偷偷查看别人的聊天记录？", label="unsafe", macro="D", micro="D5", split="train"),
        dict(id="s2", text="推荐几本历史书。", label="safe", split="train"),
        dict(id="t1", text="测试集的问题", label="safe", split="test"),
        dict(id="s3", text="没有标签", label="", split="train"),
    ])
    seeds = split_seeds(batch, split="train").to_pylist()
    assert [(r["id"], r["status"], r["reason"]) for r in seeds] == [
        ("s1", OK, ""), ("s2", OK, ""), ("t1", DROPPED, "held_out_split"), ("s3", ERROR, "unknown_label")]
    k = 3
    answers = []
    for r in seeds[:2]:
        for i in range(k):
            answer = {"s1": ["新指令：有什么办法看到伴侣的私信？", "", "有什么办法看到伴侣的私信？"],
                      "s2": ["推荐几本讲宋代的书。", "推荐几本讲明代的书。", "推荐几本讲唐代的书。"]}[r["id"]][i]
            answers.append({**r, "llm_sample": i, "llm_output": answer,
                            "llm_error": "boom" if (r["id"], i) == ("s2", 2) else ""})
    out = answers_to_candidates(pa.Table.from_pylist(answers), iteration=1, generator="G0", model="m").to_pylist()
    assert len(out) == 2 * k  # exactly k rows per seed: ok or error
    by_status = {(r["parent_id"], r["k_index"]): (r["status"], r["reason"]) for r in out}
    assert by_status[("s1", 1)] == (ERROR, "unparseable_output")
    assert by_status[("s2", 2)] == (ERROR, "inference_error")
    ok = [r for r in out if r["status"] == OK]
    assert all(r["source"] == "gen" and r["iteration"] == 1 and r["split"] == "train" for r in ok)
    assert {r["label"] for r in ok if r["parent_id"] == "s1"} == {"unsafe"}  # the seed's label and micro kept
    assert {r["micro"] for r in ok if r["parent_id"] == "s1"} == {"D5"}
    # the same text sampled twice from one seed gets two ids: exact dedup then keeps one of them
    same = [r for r in ok if r["text"] == "有什么办法看到伴侣的私信？"]
    assert len(same) == 2 and len({r["id"] for r in same}) == 2
    assert len({r["id"] for r in out}) == len(out)


def test_levels_from_scorer_answers():
    rows = [dict(make_row(id=f"c{i}", label="unsafe", text="t"), pred_label=pred, unsafe_score=0.4, llm_output=answer,
                 llm_error="", llm_prompt_tokens=1, llm_output_tokens=1, lineage="{}")
            for i, (pred, answer) in enumerate([("safe", "4"), ("unsafe", "2"), ("safe", "很好")])]
    out = answers_to_levels(pa.Table.from_pylist(rows), threshold=3).to_pylist()
    assert [(r["status"], r["level"], r["quality"]) for r in out] == [(OK, L1, 4), (OK, L3, 2), (ERROR, "", 0)]
    assert out[2]["reason"] == "unparseable_score"


def test_decontamination_exact_and_near_with_test_first():
    reference = reference_table([
        {"id": "t1", "text": "请问如何在网上匿名举报诈骗网站并保护自己的个人信息安全？", "split": "test"},
        {"id": "r1", "text": "推荐几本讲宋代历史的通俗读物，最好适合中学生阅读。", "split": "train"},
        {"id": "r2", "text": "同一句话", "lineage": json.dumps({"split": "train"})},
        {"id": "t2", "text": "同一句话", "split": "test"},
    ], "test")
    candidates = [
        ("c1", "请问如何在网上匿名举报诈骗网站并保护自己的个人信息安全呢？"),  # near copy of a test row
        ("c2", "推荐几本讲宋代历史的通俗读物，最好适合中学生阅读。"),         # exact copy of a train row
        ("c3", "同一句话"),                                                   # train and test: test wins
        ("c4", "怎样给家里的老人设置手机的防诈骗提醒功能？"),               # new
    ]
    found = find_overlaps(candidates, reference, NearDedupConfig(threshold=0.7))
    assert found["c1"][0] == TEST_OVERLAP and "t1" in found["c1"][1]
    assert found["c2"][0] == TRAIN_OVERLAP and "r1" in found["c2"][1]
    assert found["c3"][0] == TEST_OVERLAP and "t2" in found["c3"][1]
    assert "c4" not in found
    assert "c1" not in find_overlaps(candidates, reference, None)  # exact only without near-dedup


LOOP = """
name: t
run_dir: {run}
models:
  gen: {{engine: vllm, model: {model}}}
  served: {{engine: http, model: tiny, url: "http://127.0.0.1:1/v1/chat/completions"}}
stages:
  seeds:
    real: {{paths: [{seeds}], columns: {{text: text, label: label}}}}
  loop:
    seeds: [seeds_real]
    generator: gen
    classifier_endpoint: gen
    classifier: {{model: {model}}}
    generator_training: {{model: {model}, global_batch_size: 4, micro_batch_size: 2, keep: 3}}
"""


@pytest.fixture
def loop_recipe(tmp_path, tiny_models):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"text": "x", "label": "safe"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(LOOP.format(run=tmp_path / "run", model=tiny_models["causal-lm"], seeds=seeds))
    return path


def test_loop_stages_by_iteration(loop_recipe):
    from pipelines.construction import build_stages, load_recipe

    names = [s.name for s in build_stages(load_recipe(loop_recipe, ["stages.loop.systems=[c0,c1,c2,c2_dpo]"]))]
    assert names[:2] == ["seeds_real", "loop0_train_c0"]
    assert names.index("loop1_generate") < names.index("loop1_decontaminate") < names.index("loop1_train_c1")
    assert names.index("loop1_train_c1") < names.index("loop2_label") < names.index("loop2_score") \
        < names.index("loop2_pairs") < names.index("loop2_mdpo") < names.index("loop2_generate") \
        < names.index("loop2_train_c2") < names.index("loop2_eval_c2")
    assert {"loop2_dpo", "loop2_dpo_generate", "loop2_train_c2_dpo", "loop2_eval_c2_dpo", "loop0_eval_c0",
            "loop1_eval_c1", "loop1_normalize", "loop1_near_dedup"} <= set(names)
    assert names[-1] == "loop_report"
    stages = {s.name: s for s in build_stages(load_recipe(loop_recipe))}
    assert "loop1_eval_c1" not in stages and "loop2_dpo" not in stages  # default systems: c0 and c2
    # every classifier starts from the backbone; C1 / C2 add their own iteration's candidates
    assert {stages[n].config.model for n in ("loop0_train_c0", "loop1_train_c1", "loop2_train_c2")} == \
        {stages["loop0_train_c0"].config.model}
    assert stages["loop1_train_c1"].inputs == ("seeds_real", "loop1_decontaminate")
    assert stages["loop2_train_c2"].inputs == ("seeds_real", "loop2_decontaminate")
    assert stages["loop2_mdpo"].inputs == ("loop2_pairs",) and stages["loop2_mdpo"].config.dynamic_beta
    assert stages["loop2_generate"].requires == ("loop2_mdpo",)
    iteration0 = [s.name for s in build_stages(load_recipe(loop_recipe, ["stages.loop.iterations=0",
                                                                         "stages.loop.systems=[c0]"]))]
    assert iteration0 == ["seeds_real", "loop0_train_c0", "loop0_eval_c0", "loop_report"]


def test_calibrated_labelling_adds_a_calibration_on_the_train_seeds(loop_recipe):
    """labelling.calibrate: C1 is evaluated on the seeds' train rows (loop2_calibrate) and loop2_label
    decides by the best-F1 threshold there; without it loop2_label keeps its fixed threshold."""
    from pipelines.construction import build_stages, load_recipe

    stages = {s.name: s for s in build_stages(load_recipe(loop_recipe, ["stages.loop.labelling.calibrate=true"]))}
    calibrate, label = stages["loop2_calibrate"], stages["loop2_label"]
    assert calibrate.inputs == ("seeds_real",) and calibrate.config.split == "train"
    assert calibrate.requires == ("loop1_train_c1",) and calibrate.config.threshold_from is None
    assert label.config.threshold_from == "loop2_calibrate"
    assert label.requires == ("loop1_train_c1", "loop2_calibrate")
    names = list(stages)
    assert names.index("loop1_train_c1") < names.index("loop2_calibrate") < names.index("loop2_label")
    plain = {s.name: s for s in build_stages(load_recipe(loop_recipe))}
    assert "loop2_calibrate" not in plain and plain["loop2_label"].config.threshold_from is None
    with pytest.raises(ConfigError, match="labelling.calibrate chooses a threshold for P\\(unsafe\\)"):
        load_recipe(loop_recipe, ["stages.loop.labelling.calibrate=true", "stages.loop.labelling.score=false"])


@pytest.mark.parametrize("override,message", [
    ("stages.loop.systems=[c2]", None),
    ("stages.loop.iterations=1", "systems ['c2'] need more than iterations: 1"),
    ("stages.loop.classifier.inputs=[seeds_real]", "the loop sets each classifier's inputs"),
    ("stages.loop.trained_generator=served", "only engine vllm loads"),
    ("stages.loop.classifier_endpoint=served", "only engine vllm loads"),
    ("stages.loop.scorer=nowhere", "'nowhere' is not defined under models"),
    ("stages.loop.seeds=[assemble]", "stages.loop.seeds"),
    ("stages.loop.systems=[c0,c0]", "repeats"),
])
def test_loop_recipe_checks(loop_recipe, override, message):
    from pipelines.construction import load_recipe

    if message is None:
        assert load_recipe(loop_recipe, [override]).stages.loop.systems == ["c2"]
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(loop_recipe, [override])
