"""LoRA for every trainer: SFT and MDPO wrap the model the same way and export it merged (a plain
model vLLM loads by path). Training with it runs in the chat-SFT and SHARD tests; here, no Ray."""

import pytest
import torch
from pydantic import ValidationError

from pipelines.training.mdpo import MDPO, MDPOConfig
from tests.conftest import write_jsonl


def test_mdpo_trains_adapters_and_exports_a_merged_model(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_models["causal-lm"]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    config = MDPOConfig(model=base, paths=[str(pairs)], deepspeed="zero2", global_batch_size=4, micro_batch_size=2,
                        keep=4, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    method = MDPO(config)
    model = method.build_model(torch.float32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # as if a step had moved the adapters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    method.export_module(model, None, str(tmp_path / "out"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert set(merged) == set(original) and not (tmp_path / "out" / "adapter_config.json").exists()
    changed = {k for k in original if not torch.equal(merged[k], original[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)

    with pytest.raises(ValidationError, match="lora trains with deepspeed: zero2"):
        MDPOConfig(model=base, paths=[str(pairs)], deepspeed="zero3", global_batch_size=4, micro_batch_size=2,
                   keep=4, lora={"r": 4})


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_sft_loss_projects_only_answer_positions_and_equals_the_full_loss(tiny_models, tmp_path, lora):
    """SFT's loss runs the output projection only where an answer token is predicted; on a right-padded
    batch whose rows have different prompt and answer lengths it equals transformers' own loss, and so
    do its gradients (with and without LoRA adapters)."""
    from pipelines.training.sft import SFT, ChatSFTConfig, answer_positions

    method = SFT(ChatSFTConfig(model=tiny_models["causal-lm"], inputs=["rows"], deepspeed="zero2", lora=lora))
    torch.manual_seed(0)
    model = method.build_model(torch.float32).eval()  # no LoRA dropout: both passes see the same network
    rows = {"input_ids": [list(range(5, 17)), list(range(20, 27)), list(range(30, 39))], "prompt_len": [9, 4, 8]}
    batch = method.collate(rows, torch.device("cpu"))
    assert answer_positions(batch["labels"]).tolist() == [3, 4, 5, 7, 8, 9, 10]

    loss, metrics = method.loss(model, batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    assert metrics["loss"] == pytest.approx(float(reference.detach()), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6)
