"""Guard SFT and LoRA chat SFT through Ray Train + DeepSpeed (2 CPU workers, ZeRO-3 and ZeRO-2) on a
real local Ray: they learn, and bad input stops a trainer before training. (MDPO paused, resumed
and through a killed worker: tests/faults/test_training_faults.py, in `make test-faults`.)"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import f1_score

from cluster.prometheus import metric_sum
from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.guard.format import GuardFormatError, parse_guard_answer
from pipelines.training.train_loop import make_plan
from tests.conftest import MetricsWatcher, answer_loss, wait_for_metric, write_jsonl

# A synthetic guard task: a text is unsafe exactly when it contains a trigger word, whose micro
# category the guard must name.
TRIGGERS = {"炸弹": "A4", "黑客": "C5", "歧视": "B9"}
WORDS = ["天气", "学习", "音乐", "旅行", "做饭", "电影", "运动", "朋友", "花园", "图书"]
CODES = frozenset(["A4", "C5", "B9"])


def guard_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        if rng.random() < 0.5:
            trigger = rng.choice(sorted(TRIGGERS))
            words.insert(rng.randrange(5), trigger)
            rows.append({"text": "".join(words) + str(i + 1000 * seed), "label": "unsafe",
                         "micro": TRIGGERS[trigger]})
        else:
            rows.append({"text": "".join(words) + str(i + 1000 * seed), "label": "safe", "micro": ""})
    return rows


def guard_recipe(tmp_path: Path, model: str, rows: list[dict], **sft) -> Recipe:
    """Seeds -> guard SFT, with a short prompt template."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    columns = {"text": "text", "label": "label", "micro": "micro"}
    prompt = tmp_path / "short_guard.yaml"  # the product template holds the whole taxonomy: long
    prompt.write_text("user: |\n  {{ text }}\n")
    seeds = {"syn": {"paths": [str(write_jsonl(tmp_path / "guard.jsonl", rows))], "source": "real",
                     "columns": columns}}
    stages = {"seeds": seeds,
              "guard_sft": {"model": model, "inputs": ["seeds_syn"], "template": str(prompt),
                            "learning_rate": 1e-3, "global_batch_size": 16, "micro_batch_size": 4,
                            "max_length": 64, **sft}}
    return Recipe.model_validate({"name": "sft", "run_dir": str(tmp_path / "run"), "stages": stages})


def guard_f1(model_dir: str, rows: list[dict]) -> float:
    """F1 (unsafe positive) of greedy answers; a wrong micro code counts as a miss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gold, pred = [], []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["text"]}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        gold.append(int(r["label"] == "unsafe"))
        try:
            label, micro = parse_guard_answer(tok.decode(out[0, ids["input_ids"].shape[1]:],
                                                         skip_special_tokens=True), CODES)
        except GuardFormatError:  # an unparseable answer is always wrong
            pred.append(1 - gold[-1])
            continue
        pred.append(int(label == "unsafe" and micro == r["micro"]))
    return f1_score(gold, pred)


def metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_guard_sft_learns(tmp_path, tiny_models, ray_local):
    """Full-parameter guard SFT under ZeRO-3 (ZeRO-2 trains in the MDPO resume and chat SFT tests),
    the exported model checked through transformers. (A trained guard through the evaluation harness
    on vLLM, ``model_from``: the loop test's C2 evaluation and guard evaluation's own test.)"""
    held_out = guard_rows(80, seed=1)
    recipe = guard_recipe(tmp_path, tiny_models["causal-lm"], guard_rows(320, seed=0), deepspeed="zero3", epochs=3)
    # the dashboard's view while it trains: the trainer's step and loss (rank 0, every step)
    with MetricsWatcher(["ray_chillguard_train_step", "ray_chillguard_train_loss"], run="run",
                        stage="guard_sft") as watched:
        manifests = run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    m = manifests["guard_sft"]
    assert m["rows"] == {"in": 320, "out": 320, "out_parents": 320, "dropped": 0, "errored": 0}
    plan = m["summary"]["plan"]
    # 160 rows per worker, 2 micro-batches of 4 per step (gradient accumulation under ZeRO-3)
    assert plan["accumulation_steps"] == 2 and plan["total_steps"] == 3 * (160 // 8) == 60
    history = metrics(Path(recipe.run_dir), "guard_sft")
    assert [h["step"] for h in history] == list(range(1, 61))
    assert history[-1]["loss"] < history[0]["loss"] / 5
    model_dir = Path(recipe.run_dir) / "guard_sft" / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert list((Path(recipe.run_dir) / "guard_sft" / "logs" / "tensorboard").iterdir())
    assert guard_f1(str(model_dir), held_out) >= 0.9
    assert len(watched.samples) >= 3, watched.samples
    for sample in watched.samples:  # each seen step with the loss logged at that step
        step = int(sample["ray_chillguard_train_step"])
        assert sample["ray_chillguard_train_loss"] == pytest.approx(history[step - 1]["loss"], rel=1e-5)
    # and once it is done, the numbers of its summary from the driver (its final loss among them)
    text = wait_for_metric("ray_chillguard_stage_summary", run="run", stage="guard_sft", field="final_metrics.loss")
    assert metric_sum(text, "ray_chillguard_stage_summary", run="run", stage="guard_sft",
                      field="final_metrics.loss") == pytest.approx(m["summary"]["final_metrics"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_chat_sft_with_lora(tmp_path, tiny_models, ray_local):
    """(prompt -> completion) rows, completion kept in the JSON lineage by an upstream stage;
    LoRA adapters are trained and merged into the exported model, the epoch with the lowest
    validation loss on the held-out split (SHARD's checkpoint choice)."""
    from transformers import AutoModelForCausalLM

    rows = [{"text": f"请用一句话介绍{w}{i}", "answer": f"{w}是一个常见的话题。",
             "split": "val" if i % 5 == 0 else "train"}
            for i, w in enumerate(WORDS * 8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    base = tiny_models["causal-lm"]
    recipe = Recipe.model_validate({
        "name": "chat", "run_dir": str(tmp_path / "run"),
        "stages": {
            "seeds": {"qa": {"paths": [str(data)], "source": "real", "label": "safe",
                             "columns": {"text": "text", "response": "answer", "split": "split"}}},
            # preprocessing folds stage-specific columns (the response) into the JSON lineage
            "preprocess": {"inputs": ["seeds_qa"], "near_dedup": None},
            "sft": {"shard": {"model": base, "inputs": ["dedup"], "deepspeed": "zero2", "split": "train",
                              "val_split": "val", "completion_column": "response", "system": "你是一个有帮助的助手。",
                              "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                              "learning_rate": 5e-3, "epochs": 2, "max_length": 96,
                              # not SHARD's defaults (batch 64, warmup 0.05, seed 42): 4 steps per epoch here
                              "global_batch_size": 16, "warmup_ratio": 0.1, "seed": 0}}}})
    manifests = run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    m = manifests["sft_shard"]
    assert m["rows"] == {"in": 80, "out": 80, "out_parents": 80, "dropped": 0, "errored": 0}  # 64 train + 16 val
    history = metrics(Path(recipe.run_dir), "sft_shard")
    assert len(history) == 2 * 64 // 16 and history[-1]["loss"] < history[0]["loss"]
    validation = m["summary"]["validation"]
    assert validation["rows"] == 16 and [e["epoch"] for e in validation["per_epoch"]] == [0, 1]
    best = min(validation["per_epoch"], key=lambda e: e["val_loss"])
    assert (validation["chosen_epoch"], validation["chosen_val_loss"]) == (best["epoch"], best["val_loss"])
    # the exported model is that epoch's: its loss on the validation rows, recomputed here, is the chosen one
    val_rows = [r for r in pq.read_table(RunDir(recipe.run_dir).partition_uri("sft_shard", OK)).to_pylist()
                if r["part"] == "val"]
    exported = AutoModelForCausalLM.from_pretrained(Path(recipe.run_dir) / "sft_shard" / "model").eval()
    assert answer_loss(exported, val_rows) == pytest.approx(best["val_loss"], rel=1e-3)
    model_dir = Path(recipe.run_dir) / "sft_shard" / "model"
    assert not (model_dir / "adapter_config.json").exists()          # merged: a plain model
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert set(tuned) == set(original)
    changed = {k for k in original if not torch.equal(tuned[k], original[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def preference_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"请谈谈{rng.choice(WORDS)}{i + 1000 * seed}",
             "chosen": f"关于{rng.choice(WORDS)}，这是一个有帮助的回答。", "rejected": "我拒绝回答。"}
            for i in range(n)]


def mdpo_recipe(tmp_path: Path, model: str, pairs: list[dict], **mdpo) -> Recipe:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    return Recipe.model_validate({
        "name": "mdpo", "run_dir": str(tmp_path / "run"),
        "stages": {"mdpo": {"model": model, "paths": [str(data)], "learning_rate": 5e-4,
                            "global_batch_size": 16, "micro_batch_size": 8, "keep": 12,
                            "max_length": 64, **mdpo}}})


@pytest.mark.slow
def test_bad_training_input_fails_before_training(tmp_path, tiny_models, ray_local):
    model = tiny_models["causal-lm"]
    # labels outside the taxonomy
    rows = guard_rows(40, seed=0) + [{"text": "越界的类别", "label": "unsafe", "micro": "Z9"},
                                     {"text": "未知标签", "label": "maybe", "micro": ""}]
    recipe = guard_recipe(tmp_path / "labels", model, rows, epochs=1)
    with pytest.raises(ValueError, match="cannot be trained on.*unknown_micro"):
        run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    assert not Path(recipe.run_dir, "_work", "guard_sft").exists()   # training never started
    rundir = RunDir(recipe.run_dir)
    assert rundir.reason_counts("guard_sft", "error") == {"unknown_micro": 1}
    # seeds already refuse the unknown label; it is in that stage's errors, not lost
    assert rundir.reason_counts("seeds_syn", "error") == {"unknown_label": 1}

    # pairs missing a side
    pairs = preference_pairs(16, seed=0) + [{"prompt": "p", "chosen": "", "rejected": "r"},
                                            {"prompt": "p", "chosen": "c", "rejected": None}]
    recipe = mdpo_recipe(tmp_path / "pairs", model, pairs)
    with pytest.raises(ValueError, match="cannot be trained on"):
        run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    assert RunDir(recipe.run_dir).reason_counts("mdpo", "error") == {"missing_chosen": 1,
                                                                     "missing_rejected": 1}
    # a missing column is named
    recipe = mdpo_recipe(tmp_path / "cols", model, [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['chosen', 'rejected'\]"):
        run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    # an empty dataset (its only row is broken)
    recipe = guard_recipe(tmp_path / "empty", model, [{"text": "", "label": "safe"}])
    with pytest.raises(ValueError, match="guard_sft: its inputs produced no rows"):
        run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    # one too small for a global batch: the plan the stage makes before training refuses it
    recipe = guard_recipe(tmp_path / "small", model, guard_rows(10, seed=0))
    with pytest.raises(ValueError, match="10 training rows do not fill one global batch of 16"):
        make_plan(recipe.stages.guard_sft, 10)
