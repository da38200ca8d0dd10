"""QLoRA (``lora.quantize: nf4``, SHARD's sft_qlora.py for targets that do not fit full fine-tuning): a
clear one-line error at recipe validation, before Ray starts, where bitsandbytes is missing; where it is
installed (``pip install 'chillguard[qlora]'``; bitsandbytes 0.50.2 runs 4-bit NF4 on CPU through its
pure-torch path), a real chat SFT on the tiny model with a 4-bit base whose exported model is the
unquantized base with the adapters merged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pipelines.construction import Recipe, build_stages
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from tests.conftest import write_jsonl

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _recipe(tmp_path: Path, base: str, data: Path | None = None) -> dict:
    data = data or write_jsonl(tmp_path / "chat.jsonl", [{"text": "q", "answer": "a"}])
    return {"name": "qlora", "run_dir": str(tmp_path / "run"), "stages": {
        "seeds": {"qa": {"paths": [str(data)], "source": "real", "label": "safe",
                         "columns": {"text": "text", "response": "answer"}}},
        "sft": {"q": {"model": base, "inputs": ["seeds_qa"], "deepspeed": "zero2", "split": None,
                      "completion_column": "response", "learning_rate": 5e-3, "epochs": 1, "max_length": 96,
                      "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "quantize": "nf4"}}}}}


def test_qlora_without_bitsandbytes_is_a_one_line_error(tmp_path, tiny_models, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"lora.quantize: nf4 \(QLoRA\) needs the bitsandbytes package, which is "
                                         r"not installed: pip install 'bitsandbytes>=0.48'"):
        Recipe.model_validate(_recipe(tmp_path, tiny_models["causal-lm"]))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'chillguard[qlora]')")
def test_qlora_trains_adapters_on_a_4bit_base_and_exports_them_merged(tmp_path, tiny_models, ray_local):
    from transformers import AutoModelForCausalLM

    base = tiny_models["causal-lm"]
    rows = [{"text": f"介绍一下话题{i}", "answer": f"话题{i}是一个常见的话题。"} for i in range(32)]
    recipe = Recipe.model_validate(_recipe(tmp_path, base, write_jsonl(tmp_path / "chat.jsonl", rows)))
    # what the workers build: a 4-bit base under trainable float adapters
    from bitsandbytes.nn import Linear4bit

    from pipelines.training.sft import SFT

    model = SFT(recipe.stages.sft["q"]).causal_lm(torch.float32)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    manifests = run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    assert manifests["sft_q"]["rows"]["out"] == 32
    model_dir = Path(recipe.run_dir) / "sft_q" / "model"
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert set(tuned) == set(original)                       # unquantized, adapters merged: a plain model
    assert all(t.dtype == original[k].dtype for k, t in tuned.items())
    changed = {k for k in original if not torch.equal(tuned[k], original[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
