"""Real weights, real labels, small samples (`make test-real`, under 15 min on 2 cores):

- the LLM stages on the 1.5B instruct model (PE rewriting, a two-judge jury whose judges share the
  model and differ by prompt, the adjudicator) parse at least 95 % of its answers;
- guard SFT from the pretrained Gemma 3 270M base (its chat template from the recipe) lowers the
  loss of held-out ToxiCN rows below the backbone's;
- the instruct model as a zero-shot guard ranks ToxiCN's toxic posts above its safe ones (P(unsafe),
  a one-sided Mann-Whitney test), i.e. it is above chance.

Each prints its figures. Samples are drawn from ToxiCN by ``sample`` (a hash of the row id), so the
rows are the same on every machine; nothing derived from the data is written outside tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import ERROR, OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from tests.conftest import REPO, answer_loss, assert_balanced

pytestmark = [pytest.mark.slow, pytest.mark.real]

PROMPTS = REPO / "configs" / "prompts"


def _engine(model: str, **sampling) -> dict:
    return {"engine": "vllm", "model": model, "batch_size": 16,
            "engine_kwargs": {"dtype": "bfloat16", "max_model_len": 4096, "enforce_eager": True,
                              "kv_cache_memory_bytes": 1 << 30, "seed": 0},
            # one process less per engine start (~13 s each here; docs/reference.md "LLM endpoints")
            "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            "sampling": {"temperature": 0.0, "max_tokens": 16, **sampling}}


def _toxicn(data: Path, split: str, share: float) -> dict:
    return {"paths": [str(data / "toxicn" / f"{split}.jsonl")], "preset": "toxicn", "sample": share,
            "sample_seed": 1}


def test_llm_stages_parse_the_instruct_models_answers(tmp_path, real_models, shared_data, ray_local):
    recipe = Recipe.model_validate({
        "name": "real-llm", "run_dir": str(tmp_path / "run"),
        "models": {"rewriter": _engine(real_models["instruct"], temperature=0.7, max_tokens=200),
                   # one model, two judges: they differ by their instructions
                   "judge_a": _engine(real_models["instruct"], max_tokens=8),
                   "judge_b": _engine(real_models["instruct"], max_tokens=8),
                   "adjudicator": _engine(real_models["instruct"], max_tokens=24)},
        "stages": {"seeds": {"toxicn": _toxicn(shared_data, "train", 0.003)},
                   "pe": {"model": "rewriter", "inputs": ["seeds_toxicn"], "keep_original": {"safe": 0.3}},
                   "jury": {"inputs": ["pe"], "judges": ["judge_a", "judge_b"], "mode": "sequential",
                            "constrained": False, "templates": {"judge_b": str(PROMPTS / "judge_intent.yaml")}},
                   "adjudicate": {"model": "adjudicator"}},
    })
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(build_stages(recipe), rundir)
    for m in manifests.values():
        assert_balanced(m, rundir)

    pe = manifests["pe"]
    groups = pe["summary"]["groups"]
    unparsed = pe["reasons"]["errored"].get("unparseable_output", 0)
    exact = pe["summary"]["output_counts"].get("exact", 0)
    jury = manifests["adjudicate"]["summary"]["judges"]
    votes = {j: v["valid_votes"] + v["abstentions"] for j, v in jury.items()}
    adjudicated = manifests["adjudicate"]["rows"]
    figures = {"pe": {"groups": groups, "exact_count": exact, "unparseable_rows": unparsed,
                      "answers": pe["answers"]},
               "jury": {j: {"valid": v["valid_votes"], "votes": votes[j]} for j, v in jury.items()},
               "jury_answers": manifests["jury"]["answers"],
               "adjudicate": {"in": adjudicated["in"], "errored": adjudicated["errored"],
                              "reasons": manifests["adjudicate"]["reasons"]["errored"]}}
    print("real LLM stages:", json.dumps(figures, ensure_ascii=False, indent=1))
    (answers,) = pe["answers"].values()  # one model: the instruct model's answers
    assert groups >= 5 and answers["failed"] == 0 and answers["refusals"] <= 0.05 * answers["requests"]
    # parsed: the answer yields rewrites (unparseable_output: none at all); how many groups got exactly
    # as many rewrites as seeds is the model following the instruction, reported, not asserted
    unparseable_groups = len({r["group_id"] for r in _rows(rundir, "pe", ERROR)
                              if r["reason"] == "unparseable_output"})
    assert unparseable_groups <= 0.05 * groups, figures["pe"]
    for judge, v in jury.items():
        assert votes[judge] >= 20 and v["valid_votes"] / votes[judge] >= 0.95, (judge, v)
    assert adjudicated["errored"] <= 0.05 * max(adjudicated["in"], 1), figures["adjudicate"]


def test_guard_sft_from_the_pretrained_base_lowers_held_out_loss(tmp_path, real_models, shared_data, ray_local):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.core.taxonomy import DEFAULT_TAXONOMY
    from pipelines.training.sft import TokenizeGuardRows

    backbone = real_models["backbone"]
    recipe = Recipe.model_validate({
        "name": "real-sft", "run_dir": str(tmp_path / "run"),
        "stages": {"seeds": {"train": _toxicn(shared_data, "train", 0.008),
                             "held": _toxicn(shared_data, "test", 0.016)},
                   "guard_sft": {"model": backbone, "chat_template": "gemma", "inputs": ["seeds_train"], "split": None,
                                 "template": str(PROMPTS / "guard_compact.yaml"), "deepspeed": "zero2",
                                 "num_workers": 1, "cpus_per_worker": 2, "global_batch_size": 8,
                                 "micro_batch_size": 4, "learning_rate": 5e-5, "epochs": 1, "max_length": 384}},
    })
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(build_stages(recipe), rundir)
    sft = manifests["guard_sft"]
    assert sft["rows"]["out"] >= 60

    held = [r for f in rundir.parquet_files("seeds_held", OK) for r in _read(f.path)]
    tokenize = TokenizeGuardRows(recipe.stages.guard_sft, str(DEFAULT_TAXONOMY))
    tokenize.setup()
    examples = [tokenize.row({**r, "split": ""}) for r in held]
    examples = [e for e in examples if e["status"] == OK]

    def loss(model_dir: str) -> float:
        return answer_loss(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), examples)

    before, after = loss(backbone), loss(str(Path(recipe.run_dir) / "guard_sft" / "model"))
    steps = sft["summary"]["final_metrics"]
    print(f"real guard SFT: {sft['rows']['out']} rows, {len(examples)} held-out; answer-token loss "
          f"{before:.3f} -> {after:.3f}; {steps['tokens_per_second_per_worker']:.0f} tokens/s per worker")
    assert len(examples) >= 30 and after < before


def test_the_instruct_model_as_a_zero_shot_guard_is_above_chance(tmp_path, real_models, shared_data, ray_local):
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    recipe = Recipe.model_validate({
        "name": "real-zero-shot", "run_dir": str(tmp_path / "run"),
        "models": {"guard": _engine(real_models["instruct"], max_tokens=8, logprobs=5)},
        "stages": {"seeds": {"test": _toxicn(shared_data, "test", 0.03)},
                   "guard_eval": {"zero_shot": {"inputs": ["seeds_test"], "split": None, "model": "guard",
                                                "score": True}}},
    })
    rundir = RunDir(recipe.run_dir)
    manifests = run_stages(build_stages(recipe), rundir)
    rows = [r for f in rundir.parquet_files("guard_eval_zero_shot", OK) for r in _read(f.path)]
    scored = [(r["label"], r["score"]) for r in rows if r.get("score") is not None and r["score"] >= 0]
    errors = manifests["guard_eval_zero_shot"]["rows"]["errored"]
    y = [int(label == "unsafe") for label, _ in scored]
    s = [score for _, score in scored]
    auroc = roc_auc_score(y, s)
    p = mannwhitneyu([v for v, t in zip(s, y) if t], [v for v, t in zip(s, y) if not t], alternative="greater").pvalue
    print(f"real zero-shot guard on {len(rows)} ToxiCN test rows ({errors} unreadable): {len(scored)} scored, "
          f"AUROC {auroc:.3f} (one-sided Mann-Whitney p = {p:.2g})")
    assert len(scored) >= 0.95 * (len(rows) + errors) and len(scored) >= 60
    assert p < 0.05 and auroc > 0.5


def _rows(rundir: RunDir, stage: str, status: str) -> list[dict]:
    return [r for f in rundir.parquet_files(stage, status) for r in _read(f.path)]


def _read(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("name", ["real_small", "real_eval"])
def test_the_real_recipes_build_where_the_models_are(name, real_models, shared_data, tiny_models, monkeypatch):
    """Both real-model recipes validate and build their stages against the folders and data here (the
    runs take 50 and 95 minutes here: `make demo-real`, docs/real_models.md "Quality against people").
    real_eval's random-init control is the tiny model: the session's, as a clean clone has no models/tiny."""
    from pipelines.construction import load_recipe

    monkeypatch.setenv("REAL_MODELS", str(Path(real_models["instruct"]).parent))
    monkeypatch.setenv("TINY_MODELS", str(Path(tiny_models["causal-lm"]).parent))
    monkeypatch.setenv("CHILLGUARD_SHARED_DATA", str(shared_data))
    monkeypatch.chdir(REPO)
    stages = {s.name for s in build_stages(load_recipe(REPO / "configs" / "recipes" / f"{name}.yaml"))}
    expected = {"real_small": {"rag", "pe", "translate", "jury", "adjudicate", "assemble", "loop1_train_c1",
                               "loop1_eval_c1", "guard_eval_zero_shot"},
                "real_eval": {"jury", "adjudicate", "loop0_eval_c0", "guard_sft", "baseline_same_rows",
                              "compare_guards", "compare_harm", "compare_jury"}}
    assert expected[name] <= stages, expected[name] - stages
