"""MDPO loss, selection and running mean against numbers computed by hand; the training plan,
schedule and DeepSpeed config; training config errors."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.training.mdpo import MDPOConfig, mdpo_loss, select_closest, update_running_mean
from pipelines.training.sft import GuardSFTConfig
from pipelines.training.train_loop import Plan, deepspeed_config, lr_scheduler, make_plan


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def dpo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Rafailov et al.: mean of −log σ(β·h)."""
    return -torch.nn.functional.logsigmoid(beta * h).mean()


def test_first_step_from_zero_is_dpo():
    # the policy starts as the reference: every log-ratio difference is 0
    h = torch.zeros(16, dtype=torch.float64, requires_grad=True)
    out = mdpo_loss(h, beta=0.1, running_mean=0.0, keep=16)
    assert out.beta_m == pytest.approx(0.1)          # α = σ(0)/σ(0) = 1
    assert out.loss.item() == pytest.approx(math.log(2))
    out.loss.backward()
    h2 = torch.zeros(16, dtype=torch.float64, requires_grad=True)
    dpo_loss(h2, 0.1).backward()
    assert torch.allclose(h.grad, h2.grad)
    # K < batch keeps 12 pairs, but with all gaps 0 the loss value and β are still DPO's
    out12 = mdpo_loss(torch.zeros(16, dtype=torch.float64), beta=0.1, running_mean=0.0, keep=12)
    assert out12.kept == 12 and out12.beta_m == pytest.approx(0.1)
    assert out12.loss.item() == pytest.approx(math.log(2))


def test_gaps_equal_to_running_mean_give_alpha_one():
    beta, rbar = 0.1, 0.37
    h = torch.full((8,), rbar / beta, dtype=torch.float64)
    out = mdpo_loss(h, beta=beta, running_mean=rbar, keep=6)
    assert out.batch_mean == pytest.approx(rbar)
    assert out.beta_m == pytest.approx(beta)


def test_keep_drops_exactly_the_farthest_gaps():
    gaps = torch.tensor([0.1, 5.0, -0.2, 0.05, -4.0, 0.3, 2.0, 0.0])
    mask = select_closest(gaps, 0.0, keep=5)
    # distances² to 0: .01 25 .04 .0025 16 .09 4 0 -> the three largest are 5.0, -4.0, 2.0
    assert mask.tolist() == [True, False, True, True, False, True, False, True]
    assert select_closest(gaps, 0.0, keep=None).all()
    assert select_closest(gaps, 0.0, keep=8).all()
    # around R̄ = 2 the farthest are -4.0, 5.0 and -0.2 (distances² 36, 9, 4.84)
    mask = select_closest(gaps, 2.0, keep=5)
    assert mask.tolist() == [True, False, False, True, False, True, True, True]


def test_loss_by_hand():
    beta, rbar = 0.5, 0.5
    h = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = mdpo_loss(h, beta=beta, running_mean=rbar, keep=3)
    # gaps β·h = .5 1 1.5 2; (gap − .5)² = 0 .25 1 2.25 -> keep the first three; m_B = 1.0
    assert out.mask.tolist() == [True, True, True, False]
    assert out.batch_mean == pytest.approx(1.0)
    beta_m = beta * sig(1.0) / sig(0.5)
    assert out.beta_m == pytest.approx(beta_m)
    expected = -sum(math.log(sig(beta_m * x)) for x in (1.0, 2.0, 3.0)) / 3
    assert out.loss.item() == pytest.approx(expected)
    assert out.global_loss == pytest.approx(expected)
    # β_M is a constant of the step: d loss / d h_i = −(1 − σ(β_M h_i))·β_M / K for kept pairs
    out.loss.backward()
    grads = [-(1 - sig(beta_m * x)) * beta_m / 3 for x in (1.0, 2.0, 3.0)] + [0.0]
    assert h.grad.tolist() == pytest.approx(grads)


def test_beta_m_carries_no_gradient():
    h = torch.tensor([0.3, -0.2, 0.8, 1.5], dtype=torch.float64, requires_grad=True)
    out = mdpo_loss(h, beta=0.1, running_mean=0.02, keep=4)
    assert isinstance(out.beta_m, float)
    out.loss.backward()
    # if β_M depended on h, the gradient would have an extra σ'(m_B) term; it must match the
    # gradient with β_M frozen at its value
    h2 = h.detach().clone().requires_grad_(True)
    (-torch.nn.functional.logsigmoid(out.beta_m * h2).mean()).backward()
    assert torch.allclose(h.grad, h2.grad)


def test_dynamic_off_is_dpo():
    h = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    out = mdpo_loss(h, beta=0.2, running_mean=3.0, keep=2, dynamic=False)
    assert out.kept == 4 and out.beta_m == 0.2
    assert out.loss.item() == pytest.approx(dpo_loss(h, 0.2).item())


def test_rank_shares_average_to_the_global_gradient():
    beta, rbar = 0.1, 0.05
    h = torch.tensor([0.9, -0.4, 2.5, 0.2, 1.1, -3.0, 0.6, 0.0], dtype=torch.float64)
    full = h.clone().requires_grad_(True)
    mdpo_loss(full, beta=beta, running_mean=rbar, keep=6).loss.backward()
    all_gaps = beta * h
    grads = []
    for rank in range(2):
        part = h[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        mdpo_loss(part, beta=beta, running_mean=rbar, keep=6, all_gaps=all_gaps, offset=rank * 4,
                  world=2).loss.backward()
        grads.append(part.grad)
    # DeepSpeed averages the ranks' gradients
    assert torch.allclose(torch.cat(grads) / 2, full.grad)


def test_running_mean_update():
    assert update_running_mean(0.0, 1.0, 0.9) == pytest.approx(0.1)
    assert update_running_mean(0.2, 1.0, 0.9) == pytest.approx(0.28)
    r = 0.0
    for m in (1.0, 1.0, 1.0):
        r = update_running_mean(r, m, 0.9)
    assert r == pytest.approx(1 - 0.9 ** 3)


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps, stepping as DeepSpeed does (optimizer
    step, then scheduler step, once per global batch)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind,expected", [
    # warmup 10 of 100 steps (ratio 0.1): step / 10, then p = (step − 10) / 90
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 99: 0.5 * (1 + math.cos(math.pi * 89 / 90)), 100: 0.0}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 99: 1 / 90, 100: 0.0}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 100: 1.0}),
])
def test_schedule_by_hand(kind, expected):
    optimizer = _optimizer(1e-3)
    lrs = _lrs(lr_scheduler(optimizer, kind=kind, total_steps=100, warmup_ratio=0.1), optimizer, 101)
    assert {step: lrs[step] / 1e-3 for step in expected} == pytest.approx(expected, abs=1e-12)


def test_schedule_without_warmup_and_unknown_kind():
    optimizer = _optimizer(1e-3)
    # int(0.1 · 8) = 0 warmup steps: the first step runs at the full rate
    lrs = _lrs(lr_scheduler(optimizer, kind="cosine", total_steps=8, warmup_ratio=0.1), optimizer, 8)
    assert lrs[0] == pytest.approx(1e-3) and lrs[4] == pytest.approx(0.5e-3)
    with pytest.raises(ValueError, match="lr_scheduler 'step' is not one of"):
        lr_scheduler(_optimizer(), kind="step", total_steps=8, warmup_ratio=0.1)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_resumes_from_its_checkpointed_state(kind):
    """What DeepSpeed does across a restart: ``state_dict`` of optimizer and scheduler saved after
    ``stop`` steps, a fresh optimizer and scheduler built, both states loaded. The rates after the
    restart are the uninterrupted run's, not the schedule started again."""
    import io

    optimizer = _optimizer()
    uninterrupted = _lrs(lr_scheduler(optimizer, kind=kind, total_steps=30, warmup_ratio=0.2), optimizer, 30)
    stop = 9
    optimizer = _optimizer()
    scheduler = lr_scheduler(optimizer, kind=kind, total_steps=30, warmup_ratio=0.2)
    before = _lrs(scheduler, optimizer, stop)
    saved = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    optimizer = _optimizer()
    scheduler = lr_scheduler(optimizer, kind=kind, total_steps=30, warmup_ratio=0.2)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    assert scheduler.last_epoch == stop
    assert before + _lrs(scheduler, optimizer, 30 - stop) == uninterrupted


def test_plan():
    plan = Plan(rows=103, num_workers=2, micro_batch_size=2, accumulation_steps=4, epochs=2)
    # 51 rows per worker, 8 per worker and step (2 × 4): 6 steps of 16 rows, 7 rows left per epoch
    assert (plan.rows_per_worker, plan.steps_per_epoch, plan.total_steps) == (51, 6, 12)
    assert plan.rows_untrained_per_epoch == 7


def test_deepspeed_config_from_recipe(tiny_models):
    cfg = GuardSFTConfig(model=tiny_models["causal-lm"], deepspeed="zero2", num_workers=2,
                         global_batch_size=16, micro_batch_size=2, learning_rate=3e-5, max_grad_norm=0.5)
    ds = deepspeed_config(cfg, use_gpu=False, bf16=False)
    assert ds["zero_optimization"]["stage"] == 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (2, 4, 16)
    assert ds["optimizer"]["params"]["lr"] == 3e-5 and ds["optimizer"]["params"]["torch_adam"]
    assert ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"]
    assert not any(k.startswith("_") for k in ds)
    ds3 = deepspeed_config(cfg.model_copy(update={"deepspeed": "zero3"}), use_gpu=True, bf16=True)
    assert ds3["zero_optimization"]["stage"] == 3 and ds3["bf16"]["enabled"]
    assert not ds3["optimizer"]["params"]["torch_adam"]
    with pytest.raises(ValueError, match="nothing to train on"):
        make_plan(cfg, 15)


def test_training_config_errors(tiny_models, tmp_path):
    model = tiny_models["causal-lm"]
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("{}\n")
    with pytest.raises(ValueError, match="not a multiple"):
        GuardSFTConfig(model=model, global_batch_size=10, micro_batch_size=4, num_workers=2)
    with pytest.raises(ValueError, match="one forward pass"):
        MDPOConfig(model=model, paths=[str(pairs)], global_batch_size=16, micro_batch_size=2, num_workers=2)
    assert MDPOConfig(model=model, paths=[str(pairs)], global_batch_size=16, micro_batch_size=2,
                      num_workers=2, dynamic_beta=False).accumulation_steps == 4
    with pytest.raises(ValueError, match="exceeds"):
        MDPOConfig(model=model, paths=[str(pairs)], keep=20, micro_batch_size=8)
    with pytest.raises(ValueError, match="does not exist"):
        GuardSFTConfig(model=model, deepspeed="zero4.json")
    with pytest.raises(ValueError, match="model path does not exist"):
        GuardSFTConfig(model="./no/such/model")


def test_training_that_cannot_get_a_cpu_for_its_data_fails_fast_on_an_embedded_ray(monkeypatch, caplog):
    """Workers holding every CPU leave none for Ray Data to feed them: the run would hang, idle
    (found with one worker x 2 CPUs on a 2-CPU embedded Ray). Embedded: one error naming the fix,
    before Ray Train starts; a cluster that may autoscale: a warning."""
    import ray

    import cluster.connect
    from pipelines.training.sft import SFT
    from pipelines.training.train_loop import fit

    method = SFT(GuardSFTConfig(model="Qwen/Qwen3-0.6B", num_workers=1, cpus_per_worker=2,
                                global_batch_size=4, micro_batch_size=4, use_gpu=False))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(cluster.connect, "_EMBEDDED", True)
    with pytest.raises(RuntimeError, match=r"training t \(1 workers x 2 CPUs, and one CPU for its data\) needs "
                                           r"\{'CPU': 3\} at once; the cluster has \{'CPU': 2.0\}, and an embedded "
                                           r"Ray does not grow: lower num_workers / cpus_per_worker"):
        fit(method, None, rows=8, storage_path="/nonexistent", run_name="t", log_dir="/nonexistent")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    monkeypatch.setattr("ray.train.torch.TorchTrainer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("started")))
    with pytest.raises(RuntimeError, match="started"):  # enough: it goes on to Ray Train
        fit(method, None, rows=8, storage_path="/nonexistent", run_name="t", log_dir="/nonexistent")
