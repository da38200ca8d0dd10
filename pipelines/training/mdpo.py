"""MDPO (CHILLGuard §4.2; the reading in REFERENCE.md) and plain DPO: one loss, one trainer, one stage.

Per pair i of the global batch (all ranks)::

    h_i  = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))
    R_i  = β · h_i                                   (detached)
    kept = the K pairs whose R_i lie closest to the running mean R̄ (squared distance)
    m_B  = mean of R_i over the kept pairs
    β_M  = β · σ(m_B) / σ(R̄)                         (detached: no gradient through β_M)
    loss = mean over kept pairs of −log σ(β_M · h_i)
    R̄   ← γ · R̄ + (1 − γ) · m_B                     (after the step; R̄ starts at 0)

At the start the policy equals the reference, every gap is 0 and σ(0)/σ(0) = 1: the first step is DPO.
With ``dynamic_beta: false`` every pair is kept and β_M = β: plain DPO (Rafailov et al. 2023).

The selection is over the *global* batch, so the trainer all-gathers the (detached) gaps of every
rank before computing the loss; that is why MDPO takes a whole global batch in one forward pass per
rank (no gradient accumulation). Prior art: β-DPO (Wu et al., NeurIPS 2024).

The reference is either a frozen copy of the start model beside the policy (``reference: model``;
under ZeRO-3 it is partitioned like the policy) or precomputed once in Ray Data before training
(``reference: precomputed``; the workers then hold only the policy).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.core.chat_templates import load_tokenizer
from pipelines.core.config import ADDED, ExistingPath, ModelRef, Strict, TrainingConfig
from pipelines.core.prompts import prompt_token_ids
from pipelines.core.registry import References, register
from pipelines.core.rows import DROPPED, ERROR, OK, STATUS_FIELDS, content_id
from pipelines.core.rundir import RunDir, source_fingerprint
from pipelines.training.sft import LoRASettings, check_lora, pad_right
from pipelines.training.stage import TrainingStage, check_rows, finish_training, train_dir
from pipelines.training.train_loop import Method, fit, partitioned_loading


class PairColumns(Strict):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = None
    system: str | None = Field(None, description="a system prompt per pair (before the prompt's user turn)",
                               json_schema_extra=ADDED)


class MDPOSettings(TrainingConfig):
    """Preference optimisation of a generator with MDPO (seed §4.2, REFERENCE.md), or plain DPO
    with ``dynamic_beta: false``. Paper defaults: β 0.1, γ 0.9, K 12 of a global batch of 16,
    lr 2e-7, cosine, warmup 0.1, 1 epoch. (Where the pairs come from: :class:`MDPOConfig`.)"""

    learning_rate: float = Field(2e-7, gt=0)
    beta: float = Field(0.1, gt=0)
    gamma: float = Field(0.9, ge=0, le=1, description="momentum of the running mean gap R̄")
    keep: int | None = Field(12, ge=1, description="K: pairs kept per global batch (None = all)")
    dynamic_beta: bool = Field(True, description="false = plain DPO (same trainer)")
    reference: Literal["model", "precomputed"] = Field(
        "model", description="model: a frozen reference under DeepSpeed beside the policy; "
        "precomputed: reference log-probs computed once in Ray Data before training")
    reference_model: ModelRef | None = Field(None, description="default: the policy's start model")
    apply_chat_template: bool = Field(True, description="wrap the prompt in the chat template (the "
                                      "model's, or chat_template's); false: the prompt column is raw text")
    lora: LoRASettings | None = Field(
        None, json_schema_extra=ADDED, description="train LoRA adapters instead of every weight (merged "
        "into the exported model); with reference: model the frozen reference is a second copy of the base")

    @model_validator(mode="after")
    def _check_lora(self) -> MDPOSettings:
        check_lora(self.lora, self.deepspeed)
        return self

    @model_validator(mode="after")
    def _check_keep(self) -> MDPOSettings:
        if self.keep is not None and self.keep > self.global_batch_size:
            raise ValueError(f"keep (K={self.keep}) exceeds global_batch_size {self.global_batch_size}")
        if self.dynamic_beta and self.accumulation_steps != 1:
            raise ValueError(
                "MDPO selects the K pairs over the whole global batch inside one forward pass: set "
                f"micro_batch_size = global_batch_size / num_workers = "
                f"{self.global_batch_size // self.num_workers} (got accumulation over "
                f"{self.accumulation_steps} micro-batches), or dynamic_beta: false")
        return self


class MDPOConfig(MDPOSettings):
    """``stages.mdpo``: MDPO / DPO on pairs from files (``paths``) or from row stages (``inputs``)."""

    paths: list[ExistingPath] = Field(default_factory=list, description="preference pairs: JSONL / Parquet / CSV")
    inputs: list[str] = Field(default_factory=list, description="row stages whose ok rows are pairs",
                              json_schema_extra=ADDED)
    columns: PairColumns = Field(default_factory=PairColumns)
    split: str | None = Field(None, json_schema_extra=ADDED, description="keep pairs whose `split` column has "
                              "this value, the others are dropped (other_split); None: all (SHARD's DPO arm: train)")

    @model_validator(mode="after")
    def _one_source(self) -> MDPOConfig:
        if bool(self.paths) == bool(self.inputs):
            raise ValueError("give the pairs as paths (files) or inputs (row stages), one of the two")
        return self

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The loss (pure)


@dataclasses.dataclass
class MDPOLoss:
    loss: Any            # scalar tensor (this rank's share, see mdpo_loss)
    beta_m: float        # β_M used for this batch
    batch_mean: float    # m_B: mean gap of the kept pairs
    kept: int            # K actually kept in the global batch
    mask: Any            # bool tensor: this rank's kept pairs
    global_loss: float   # the loss over the whole global batch (for logging)


def select_closest(gaps, running_mean: float, keep: int | None):
    """Boolean mask of the ``keep`` gaps with the smallest ``(R_i − R̄)²`` (ties: lower index
    first); all of them when ``keep`` is None or not smaller than the batch."""
    import torch

    n = gaps.shape[0]
    mask = torch.zeros(n, dtype=torch.bool, device=gaps.device)
    if keep is None or keep >= n:
        mask[:] = True
        return mask
    order = torch.argsort((gaps - running_mean) ** 2, stable=True)
    mask[order[:keep]] = True
    return mask


def mdpo_loss(h, *, beta: float, running_mean: float = 0.0, keep: int | None = None,
              dynamic: bool = True, all_gaps=None, offset: int = 0, world: int = 1) -> MDPOLoss:
    """MDPO loss (module docstring) of the pairs with log-ratio differences ``h`` (with grad).

    Distributed: ``all_gaps`` holds β·h of the whole global batch (detached, ranks in order; this
    rank's pairs at ``offset``). The returned loss is this rank's share
    ``world / K · Σ_{kept ∩ this rank} −log σ(β_M h_i)``, so that averaging gradients over ranks
    (what DeepSpeed does) gives the gradient of the mean over the K kept pairs. With one process
    (``world = 1``, ``all_gaps`` None) it is exactly the mean over the kept pairs.
    ``dynamic=False`` is DPO: all pairs, β_M = β.
    """
    import torch
    import torch.nn.functional as F

    gaps = beta * h.detach()
    all_gaps = gaps if all_gaps is None else all_gaps.detach()
    if dynamic:
        mask_all = select_closest(all_gaps, running_mean, keep)
        batch_mean = float(all_gaps[mask_all].mean())
        beta_m = beta * float(torch.sigmoid(torch.tensor(batch_mean, dtype=torch.float64))
                              / torch.sigmoid(torch.tensor(running_mean, dtype=torch.float64)))
    else:
        mask_all = torch.ones(all_gaps.shape[0], dtype=torch.bool, device=all_gaps.device)
        batch_mean = float(all_gaps.mean())
        beta_m = beta
    mask = mask_all[offset:offset + h.shape[0]]
    kept = int(mask_all.sum())
    per_pair = -F.logsigmoid(beta_m * h)
    loss = (per_pair * mask).sum() * (world / kept)
    global_loss = float(-F.logsigmoid(beta_m / beta * all_gaps[mask_all]).mean())
    return MDPOLoss(loss=loss, beta_m=beta_m, batch_mean=batch_mean, kept=kept, mask=mask,
                    global_loss=global_loss)


def update_running_mean(running_mean: float, batch_mean: float, gamma: float) -> float:
    """``R̄ ← γ·R̄ + (1−γ)·m_B``."""
    return gamma * running_mean + (1.0 - gamma) * batch_mean


# ------------------------------------------------------------------------------------------------
# Tokenized pairs


PAIRS = {"id": pa.string(), "chosen_ids": pa.list_(pa.int32()), "rejected_ids": pa.list_(pa.int32()),
         "prompt_len": pa.int32(), "n_tokens": pa.int32(), **STATUS_FIELDS}
REF = {"ref_chosen_logp": pa.float64(), "ref_rejected_logp": pa.float64()}


class TokenizePairs:
    """(prompt, chosen, rejected) rows -> token ids with a status (Ray Data map_batches callable)."""

    def __init__(self, config: MDPOConfig):
        self.config = config
        self.tok = None

    def row(self, r: dict[str, Any]) -> dict[str, Any]:
        cols = self.config.columns
        prompt, chosen, rejected = (r.get(cols.prompt), r.get(cols.chosen), r.get(cols.rejected))
        raw_id = r.get(cols.id) if cols.id else None
        rid = str(raw_id) if raw_id not in (None, "") else content_id(
            f"{prompt}\x00{chosen}\x00{rejected}")
        out = {"id": rid, "chosen_ids": [], "rejected_ids": [], "prompt_len": 0, "n_tokens": 0,
               "status": OK, "reason": "", "detail": ""}
        split = getattr(self.config, "split", None)
        if split is not None and r.get("split") != split:
            return {**out, "status": DROPPED, "reason": "other_split", "detail": f"split {r.get('split')!r}"}
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                return {**out, "status": ERROR, "reason": f"missing_{name}",
                        "detail": f"{name} is {value!r}"}
        if chosen == rejected:
            return {**out, "status": ERROR, "reason": "identical_pair", "detail": "chosen == rejected"}
        tok = self.tok
        if self.config.apply_chat_template:
            system = r.get(cols.system) if cols.system else None
            messages = (([{"role": "system", "content": system}] if system else [])
                        + [{"role": "user", "content": prompt}])
            prompt_ids = prompt_token_ids(tok, messages, self.config.chat_template_kwargs)
        else:
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        chosen_ids = prompt_ids + tok(chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rejected_ids = prompt_ids + tok(rejected, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        longest = max(len(chosen_ids), len(rejected_ids))
        if longest > self.config.max_length:
            return {**out, "status": DROPPED, "reason": "too_long",
                    "detail": f"{longest} tokens > max_length {self.config.max_length}"}
        return {**out, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                "prompt_len": len(prompt_ids), "n_tokens": len(chosen_ids) + len(rejected_ids)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.tok is None:
            self.tok = load_tokenizer(self.config.model, self.config.chat_template)
        return pa.Table.from_pylist([self.row(r) for r in batch.to_pylist()], schema=pa.schema(PAIRS))


def pair_tensors(batch: dict[str, Any], device) -> dict[str, Any]:
    """Chosen and rejected of B pairs stacked into one batch of 2B right-padded sequences (one
    forward pass for both), with a mask of the completion tokens that the log-probs sum over."""
    import torch

    seqs = [np.asarray(x) for x in batch["chosen_ids"]] + [np.asarray(x) for x in batch["rejected_ids"]]
    input_ids = pad_right(seqs, 0)
    attention = pad_right([np.ones(len(s)) for s in seqs], 0)
    completion = attention.copy()
    prompt_len = np.concatenate([batch["prompt_len"], batch["prompt_len"]]).astype(int)
    for i, p in enumerate(prompt_len):
        completion[i, :p] = 0
    out = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    tensors = {k: torch.from_numpy(v).to(device) for k, v in out.items()}
    for key in REF:
        if key in batch:
            tensors[key] = torch.as_tensor(np.asarray(batch[key], dtype=np.float64), device=device)
    return tensors


def sequence_logps(model, batch: dict[str, Any]):
    """Σ log p(token) over each sequence's completion tokens (fp32 log-softmax)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


class ReferenceLogProbs:
    """Ray Data actor: the reference model's chosen/rejected log-probs of each tokenized pair."""

    def __init__(self, model: str, micro_batch_size: int, bf16: bool):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        # the policy's precision, so that its first log-ratios are ~0 (and bf16 is ~3x faster on AMX CPUs)
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.micro = micro_batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        n = len(batch["id"])
        chosen, rejected = np.zeros(n), np.zeros(n)
        for start in range(0, n, self.micro):
            part = {k: v[start:start + self.micro] for k, v in batch.items()}
            with torch.no_grad():
                logps = sequence_logps(self.model, pair_tensors(part, self.device)).double().cpu().numpy()
            m = len(part["id"])
            chosen[start:start + m], rejected[start:start + m] = logps[:m], logps[m:]
        return {**batch, "ref_chosen_logp": chosen, "ref_rejected_logp": rejected}


# ------------------------------------------------------------------------------------------------
# The trainer


class MDPO(Method):
    """Policy + frozen reference; loss :func:`mdpo_loss`; keeps R̄ across steps (checkpointed)."""

    def __init__(self, config: MDPOConfig):
        self.config: MDPOConfig = config
        self.running_mean = 0.0
        self.reference = None

    def build_model(self, dtype):
        return self.causal_lm(dtype)

    def setup(self, engine, ds_config: dict, dtype) -> None:
        if self.config.reference != "model":
            return
        import deepspeed
        from transformers import AutoModelForCausalLM
        name = self.config.reference_model or self.config.model
        zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
        if zero3:  # partitioned like the policy; no optimizer, never stepped
            ref_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            with partitioned_loading(ref_config):
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            self.reference = deepspeed.initialize(model=model, config=ref_config)[0]
        else:
            self.reference = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(engine.device)
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def collate(self, batch: dict[str, Any], device) -> dict[str, Any]:
        return pair_tensors(batch, device)

    def loss(self, engine, batch: dict[str, Any]):
        import torch
        import torch.distributed as dist

        cfg = self.config
        n = batch["input_ids"].shape[0] // 2
        logps = sequence_logps(engine, batch)
        if self.reference is not None:
            with torch.no_grad():
                ref = sequence_logps(self.reference, batch)
            ref_chosen, ref_rejected = ref[:n], ref[n:]
        else:
            ref_chosen = batch["ref_chosen_logp"].to(logps.dtype)
            ref_rejected = batch["ref_rejected_logp"].to(logps.dtype)
        chosen_ratio, rejected_ratio = logps[:n] - ref_chosen, logps[n:] - ref_rejected
        h = chosen_ratio - rejected_ratio
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        local_gaps = (cfg.beta * h.detach()).contiguous()
        if world > 1:
            all_gaps = torch.empty(world * n, dtype=local_gaps.dtype, device=local_gaps.device)
            dist.all_gather_into_tensor(all_gaps, local_gaps)
        else:
            all_gaps = local_gaps
        out = mdpo_loss(h, beta=cfg.beta, running_mean=self.running_mean, keep=cfg.keep,
                        dynamic=cfg.dynamic_beta, all_gaps=all_gaps, offset=rank * n, world=world)
        metrics = {
            "loss": out.global_loss,
            "beta_m": out.beta_m,
            "running_mean": self.running_mean,
            "batch_mean": out.batch_mean,
            "kept": float(out.kept),
            "reward_accuracy": float((all_gaps > 0).double().mean()),
            "reward_margin": float(all_gaps.mean()),
            "chosen_reward": float(cfg.beta * chosen_ratio.detach().mean()),
            "rejected_reward": float(cfg.beta * rejected_ratio.detach().mean()),
        }
        return out.loss, metrics

    def after_step(self, metrics: dict[str, float]) -> None:
        self.running_mean = update_running_mean(self.running_mean, metrics["batch_mean"], self.config.gamma)

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean = float(state.get("running_mean", 0.0))


# ------------------------------------------------------------------------------------------------
# The stage


def read_pairs(config: MDPOConfig):
    """The pair files as a Ray Dataset; a missing column is an error naming it and the file."""
    import ray

    kinds = {Path(p).suffix.lower() for p in config.paths}
    if kinds <= {".jsonl", ".json"}:
        ds = ray.data.read_json(config.paths, lines=True) if kinds == {".jsonl"} else ray.data.read_json(config.paths)
    elif kinds <= {".parquet"}:
        ds = ray.data.read_parquet(config.paths)
    elif kinds <= {".csv"}:
        ds = ray.data.read_csv(config.paths)
    else:
        raise ValueError(f"stages.mdpo.paths: one format at a time (.jsonl, .parquet or .csv), got {sorted(kinds)}")
    names = set(ds.schema().names)
    check_pair_columns(config, names, f"pair files {config.paths}")
    return ds


def pair_columns(config: MDPOConfig) -> list[str]:
    """The columns ``stages.mdpo.columns`` names: prompt, chosen, rejected and the optional id and system."""
    cols = config.columns
    split = "split" if getattr(config, "split", None) is not None else None
    return [c for c in (cols.prompt, cols.chosen, cols.rejected, cols.id, cols.system, split) if c]


def check_pair_columns(config: MDPOConfig, names: set[str], source: str) -> None:
    missing = [c for c in pair_columns(config) if c not in names]
    if missing:
        raise ValueError(f"stages.mdpo: {source} have no column(s) {missing} (columns: {sorted(names)}); "
                         "map them with stages.mdpo.columns")


class MDPOStage(TrainingStage):
    """``mdpo`` (or a loop's ``loop2_mdpo``): MDPO / DPO of a generator on preference pairs."""

    name = "mdpo"

    def __init__(self, config: MDPOConfig, name: str | None = None):
        super().__init__(config, name=name, inputs=config.inputs)
        # the pair columns as stages.mdpo.columns maps them (pair files are checked when read: read_pairs)
        self.reads = frozenset(pair_columns(config))
        self.writes = frozenset(PAIRS) - frozenset(STATUS_FIELDS)

    def source_fingerprint(self) -> str | None:
        return source_fingerprint(self.config.paths) if self.config.paths else None

    def pairs(self, inputs: dict):
        """The pairs: the ok rows of the input stages, or the files."""
        from pipelines.core.rows import union_all

        cfg = self.config
        if not self.inputs:
            return read_pairs(cfg)
        for name in self.inputs:
            check_pair_columns(cfg, set(inputs[name].schema().names), f"the rows of stage {name}")
        return union_all([inputs[name].select_columns(pair_columns(cfg)) for name in self.inputs])

    def write(self, inputs: dict, rundir: RunDir) -> None:
        import ray

        from pipelines.core.stage import run_pass
        from pipelines.training.train_loop import default_use_gpu, uses_bf16

        cfg = self.config
        self.pairs(inputs).map_batches(TokenizePairs(cfg), batch_format="pyarrow").write_parquet(
            rundir.uri(self.name), partition_cols=["status"])
        rows = check_rows(self, rundir, cfg)
        data = ray.data.read_parquet(rundir.partition_uri(self.name, OK), partitioning=None).select_columns(
            ["id", "chosen_ids", "rejected_ids", "prompt_len"])
        if cfg.reference == "precomputed":
            use_gpu = cfg.use_gpu if cfg.use_gpu is not None else default_use_gpu()
            bf16 = uses_bf16(cfg, use_gpu)
            # a CPU actor gets the trainer's CPUs: Ray gives an actor as many torch threads as CPUs
            data = run_pass(self, rundir, "reference", lambda: data.map_batches(
                ReferenceLogProbs, fn_constructor_args=(cfg.reference_model or cfg.model, cfg.micro_batch_size, bf16),
                batch_size=64, batch_format="numpy", num_gpus=1 if use_gpu else 0,
                num_cpus=1 if use_gpu else cfg.cpus_per_worker,
                compute=ray.data.ActorPoolStrategy(size=cfg.num_workers)))
        data = data.random_shuffle(seed=cfg.seed).repartition(cfg.num_workers * 4)
        storage, log_dir = train_dir(self, rundir)
        result = fit(MDPO(cfg), data, rows=rows, storage_path=storage, run_name=self.name, log_dir=log_dir)
        self._summary = finish_training(self, rundir, result, log_dir)


def _check(config: MDPOConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.mdpo.inputs", config.inputs)
    return {}


register("mdpo", config=MDPOConfig, provides="model", check=_check,
         build=lambda recipe, config: [MDPOStage(config)])
