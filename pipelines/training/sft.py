"""Supervised fine-tuning stages: guard SFT (CHILLGuard §5.1, Appendix D.3) and chat SFT (SHARD's
self-distillation on P1 -> O2), both through :func:`pipelines.training.train_loop.fit`.

One example = messages rendered with the model's chat template -> an answer followed by the
end-of-turn token; the loss covers the answer tokens only (prompt positions are labelled -100).

- ``guard_sft``: the guard prompt (:mod:`pipelines.guard.format`: instruction + taxonomy + user text,
  or + the assistant response at response level) -> ``safe`` or ``unsafe\n<micro>``; full-parameter.
- ``sft_<key>``: [system] + the row's prompt as the user turn -> the row's completion; full-parameter
  or LoRA (peft; the adapters are merged into the exported model so vLLM loads it by path).

Each stage:

1. reads the rows of its inputs, tokenizes them in Ray Data tasks and writes them as its rows:
   ``ok`` = trainable examples (``input_ids``, ``prompt_len``), ``dropped`` = other splits and
   over-long examples, ``error`` = rows that cannot be trained on (unknown label, micro code outside
   the taxonomy, missing response / prompt / completion);
2. with ``on_bad_rows: error`` (default) any error row stops the stage before training;
3. trains on the ``ok`` rows (streamed to the workers);
4. exports the final model to ``RUN_DIR/<stage>/model/`` (Hugging Face format) and the training
   logs (TensorBoard, ``metrics.jsonl``) to ``RUN_DIR/<stage>/logs/``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.core.artifacts import GUARD_MODEL, MODEL_DIR
from pipelines.core.chat_templates import load_tokenizer
from pipelines.core.config import ADDED, CONFIGS, ExistingPath, Strict, TrainingConfig
from pipelines.core.prompts import prompt_token_ids
from pipelines.core.registry import References, register
from pipelines.core.rows import DROPPED, ERROR, OK, SAFE, STATUS_FIELDS, UNSAFE, column_or_lineage
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, col
from pipelines.core.taxonomy import load_taxonomy
from pipelines.guard.format import GuardPrompt, guard_answer
from pipelines.training.stage import TrainingStage, check_rows, finish_training, read_metrics, train_dir
from pipelines.training.system_prompts import TRAIN_SYSTEM
from pipelines.training.train_loop import Method, fit


class GuardSFTConfig(TrainingConfig):
    """Full-parameter SFT of a causal LM on the guard format (pipelines/guard/format.py): the guard
    prompt -> ``safe`` / ``unsafe\n<micro>``, loss on the answer tokens only."""

    inputs: list[str] = Field(default_factory=lambda: ["assemble"],
                              description="labelled row stages (assemble, seeds_<key>, ...)")
    split: str | None = Field("train", description="keep rows with this split column (None: all)")
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "guard.yaml"), validate_default=True,
                                   description="the guard prompt; evaluate with the same one")
    level: Literal["prompt", "response"] = Field(
        "prompt", description="prompt: judge the user text; response: judge the row's response")


class LoRASettings(Strict):
    """Low-rank adapters (peft) instead of full-parameter training; merged into the exported model."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quantize: Literal["nf4"] | None = Field(
        None, json_schema_extra=ADDED, description="QLoRA, for targets that do not fit full fine-tuning: the "
        "frozen base is loaded in 4-bit NF4 with double quantization (bitsandbytes; SHARD's sft_qlora.py) and the "
        "trained adapters are merged into the unquantized base for export")


#: the package QLoRA needs, and the version it was checked with (4-bit forward and backward, on CPU too)
BITSANDBYTES = "bitsandbytes>=0.48"


def check_lora(lora: LoRASettings | None, deepspeed: str) -> None:
    if lora is not None and deepspeed == "zero3":
        raise ValueError("lora trains with deepspeed: zero2 (the adapters are small; ZeRO-3 "
                         "would shard the frozen base weights it must merge them into)")
    if lora is not None and lora.quantize is not None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"lora.quantize: {lora.quantize} (QLoRA) needs the bitsandbytes package, which is not "
                             f"installed: pip install '{BITSANDBYTES}' (or: pip install 'chillguard[qlora]')")


class ChatSFTConfig(TrainingConfig):
    """SFT of a chat model on (prompt -> completion) rows of earlier stages (SHARD's P1 -> O2):
    the prompt as the user turn (after an optional system prompt), loss on the completion only.

    Defaults are SHARD's combined SFT job (``scripts/slurm/job_sft_pipeline_combined.slurm`` running
    ``scripts/sft_v2.py``, the runs behind its significance tests): LoRA r 16, α 32, dropout 0.05 on
    the attention and MLP projections, ZeRO-2, lr 1e-4, cosine, warmup 0.05, an effective batch of 64
    (``global_batch_size``: micro batch × workers × gradient accumulation), 3 epochs, 2,048 tokens with
    over-long rows truncated, seed 42, under SHARD's "helpful and safe assistant" system prompt."""

    inputs: list[str] = Field(min_length=1, description="row stages with the prompt and completion")
    deepspeed: str = Field("zero2", description="zero2, zero3 (configs/deepspeed/) or a JSON file; SHARD: "
                           "ZeRO-2 (ZeRO-3 for its 27B and 70B targets, with QLoRA for 70B)")
    global_batch_size: int = Field(64, ge=1, description="rows per optimizer step over all workers: micro "
                                   "batch × workers × gradient accumulation (SHARD: 64)")
    learning_rate: float = Field(1e-4, gt=0, description="SHARD's jobs: 1e-4 (its README's 2e-5 is not what "
                                 "its jobs ran)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: int = Field(3, ge=1)
    seed: int = 42
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="a row longer than max_length: truncate = keep the prompt and cut the "
        "answer's tail (SHARD); drop = leave it out (too_long)")
    split: str | None = Field("train", description="keep rows with this split (None: all)")
    val_split: str | None = Field(
        None, description="rows of this split are held out: the validation loss is computed after every "
        "epoch and the exported model is the epoch with the lowest one (SHARD: val)", json_schema_extra=ADDED)
    prompt_column: str = "text"
    completion_column: str = "completion"
    thinking_column: str | None = Field(
        None, json_schema_extra=ADDED, description="train on the reasoning too: the answer is "
        "<think>\\n{thinking}\\n</think>\\n\\n{completion} (SHARD's reasoning SFT); rows whose thinking is empty "
        "are dropped (no_thinking). SHARD: completion_thinking of shard_select_<v> where the teacher thinks")
    system: str | None = Field(TRAIN_SYSTEM, description="system prompt of every training row; SHARD's "
                               "'helpful and safe assistant' prompt (stages.shard.train_system, checked)")
    lora: LoRASettings | None = Field(default_factory=LoRASettings,
                                      description="LoRA adapters (SHARD's r 16, α 32); null = full fine-tuning")

    @model_validator(mode="after")
    def _check_lora(self) -> ChatSFTConfig:
        check_lora(self.lora, self.deepspeed)
        return self

log = logging.getLogger(__name__)

#: ``part``: ``train``, or ``val`` for a held-out validation row (``val_split``)
#: ``truncated_from``: the row's length before it was cut to ``max_length`` (0: whole)
TOKENIZED = {"id": pa.string(), "input_ids": pa.list_(pa.int32()), "prompt_len": pa.int32(),
             "n_tokens": pa.int32(), "part": pa.string(), "truncated_from": pa.int32(), **STATUS_FIELDS}
TRAIN, VAL = "train", "val"


def pick_columns(batch: pa.Table, columns: dict[str, str]) -> pa.Table:
    """``{out name: source name}`` as string columns, each value from the row's column or its JSON
    lineage (:func:`pipelines.data.preprocess.column_or_lineage`), else ``""``."""
    rows = batch.to_pylist()
    return pa.table({name: pa.array(["" if (v := column_or_lineage(r, source)) is None else str(v)
                                     for r in rows], pa.string())
                     for name, source in columns.items()})


class TokenizeExamples:
    """Rows -> (prompt token ids + answer token ids + eos) with a status; a Ray Data map_batches
    callable. Subclasses say which rows are trainable and what their messages and answer are."""

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.tok = None

    def setup(self) -> None:
        self.tok = load_tokenizer(self.config.model, self.config.chat_template)
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {self.config.model} has no eos token to end the answer")

    def example(self, row: dict[str, Any]) -> tuple[list[dict[str, str]], str] | tuple[str, str, str]:
        """(messages, answer), or (status, reason, detail) for a row that is not trained on."""
        raise NotImplementedError

    def row(self, r: dict[str, Any]) -> dict[str, Any]:
        out = {"id": r["id"], "input_ids": [], "prompt_len": 0, "n_tokens": 0, "part": TRAIN, "truncated_from": 0,
               "status": OK, "reason": "", "detail": ""}
        split, val_split = getattr(self.config, "split", None), getattr(self.config, "val_split", None)
        if val_split is not None and r.get("split") == val_split:
            out["part"] = VAL
        elif split is not None and r.get("split") and r["split"] != split:
            return {**out, "status": DROPPED, "reason": "other_split", "detail": r["split"]}
        made = self.example(r)
        if isinstance(made[0], str):
            return {**out, "status": made[0], "reason": made[1], "detail": made[2]}
        messages, answer = made
        prompt_ids = prompt_token_ids(self.tok, messages, self.config.chat_template_kwargs)
        answer_ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        ids, limit = prompt_ids + answer_ids, self.config.max_length
        if len(ids) > limit:
            if getattr(self.config, "too_long", "drop") == "truncate" and len(prompt_ids) < limit:
                # SHARD (sft_v2.py): right truncation, the prompt kept, the answer's tail cut
                return {**out, "input_ids": ids[:limit], "prompt_len": len(prompt_ids), "n_tokens": limit,
                        "truncated_from": len(ids)}
            whole = "" if len(prompt_ids) < limit else f" (the prompt alone has {len(prompt_ids)}: no answer left)"
            return {**out, "status": DROPPED, "reason": "too_long",
                    "detail": f"{len(ids)} tokens > max_length {limit}{whole}"}
        return {**out, "input_ids": ids, "prompt_len": len(prompt_ids), "n_tokens": len(ids)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.tok is None:
            self.setup()
        return pa.Table.from_pylist([self.row(r) for r in batch.to_pylist()], schema=pa.schema(TOKENIZED))


class TokenizeGuardRows(TokenizeExamples):
    """Labelled rows -> the guard prompt and ``safe`` / ``unsafe\n<micro>``."""

    COLUMNS: ClassVar[dict[str, str]] = {n: n for n in ("id", "text", "label", "micro", "split", "response")}

    def __init__(self, config: GuardSFTConfig, taxonomy_path: str):
        super().__init__(config)
        self.taxonomy_path = taxonomy_path

    def setup(self) -> None:
        super().setup()
        taxonomy = load_taxonomy(self.taxonomy_path)
        self.codes = frozenset(taxonomy.micro_codes)
        self.render = GuardPrompt(taxonomy, self.config.template)

    def example(self, r: dict[str, Any]):
        if r["label"] not in (SAFE, UNSAFE):
            return ERROR, "unknown_label", f"label {r['label']!r} is not safe/unsafe"
        if r["micro"] and r["micro"] not in self.codes:
            return ERROR, "unknown_micro", f"micro {r['micro']!r} is not in the taxonomy"
        if not r["text"]:
            return ERROR, "missing_text", "empty text"
        if self.config.level == "response" and not r["response"]:
            return ERROR, "missing_response", "response-level training needs the row's response"
        messages = self.render({"text": r["text"],
                                "response": r["response"] if self.config.level == "response" else ""})
        return messages, guard_answer(r["label"], r["micro"] if r["label"] == UNSAFE else None)


class TokenizeChatRows(TokenizeExamples):
    """(prompt, completion) rows -> [system], user prompt -> completion."""

    def columns(self) -> dict[str, str]:
        thinking = {"thinking": self.config.thinking_column} if self.config.thinking_column else {}
        return {"id": "id", "split": "split", "prompt": self.config.prompt_column,
                "completion": self.config.completion_column, **thinking}

    def example(self, r: dict[str, Any]):
        for name in ("prompt", "completion"):
            if not r[name].strip():
                return ERROR, f"missing_{name}", f"{self.columns()[name]} is empty"
        answer = r["completion"]
        if self.config.thinking_column:
            if not r["thinking"].strip():
                return DROPPED, "no_thinking", f"{self.config.thinking_column} is empty: the writer did not think"
            answer = with_thinking(r["thinking"], answer)
        system = [{"role": "system", "content": self.config.system}] if self.config.system else []
        return system + [{"role": "user", "content": r["prompt"]}], answer


def with_thinking(thinking: str, answer: str) -> str:
    """The answer of a reasoning-trace example, as SHARD's build_reasoning_sft_split.py writes it:
    ``<think>\\n{thinking}\\n</think>\\n\\n{answer}``."""
    return f"<think>\n{thinking.strip()}\n</think>\n\n{answer}"


def pad_right(sequences: list, value: int) -> np.ndarray:
    width = max(len(s) for s in sequences)
    out = np.full((len(sequences), width), value, dtype=np.int64)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s
    return out


def answer_positions(labels):
    """The sequence positions ``t`` whose logits predict an answer token of some row
    (``labels[:, t + 1] != -100`` for any row): the union over the batch, in order."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)


class SFT(Method):
    """Causal-LM SFT with the loss on answer tokens (positions ``>= prompt_len``); full-parameter,
    or LoRA adapters when the config has ``lora`` (merged into the exported model)."""

    def __init__(self, config: TrainingConfig):
        self.config = config

    def build_model(self, dtype):
        return self.causal_lm(dtype)

    def collate(self, batch: dict[str, Any], device) -> dict[str, Any]:
        import torch

        ids = [np.asarray(x) for x in batch["input_ids"]]
        input_ids = pad_right(ids, 0)
        mask = pad_right([np.ones(len(x)) for x in ids], 0)
        labels = pad_right(ids, -100)
        for i, p in enumerate(batch["prompt_len"]):
            labels[i, :int(p)] = -100
        return {k: torch.from_numpy(v).to(device) for k, v in
                (("input_ids", input_ids), ("attention_mask", mask), ("labels", labels))}

    def loss(self, engine, batch: dict[str, Any]):
        """Mean cross-entropy over the answer tokens,

            L = −(1/N) Σ_{(i,t): y_{i,t+1} ≠ −100} log p(y_{i,t+1} | x_{i,≤t}),

        the same value as transformers' causal-LM loss, but the output projection runs only at
        :func:`answer_positions`: a guard's answer is 2-3 tokens of a ~60-token row, and a 262k-token
        vocabulary (Gemma 3) makes the projection most of the model's compute (measured here on
        Gemma 3 270M: 1.5x faster per step in fp32)."""
        import torch.nn.functional as F

        labels = batch["labels"]
        keep = answer_positions(labels)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        logits_to_keep=keep).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=-100)
        return loss, {"loss": float(loss.detach())}

    def validation_weight(self, batch: dict[str, Any]) -> int:
        """The predicted answer tokens (the loss is their mean): the validation loss is the mean over
        every answer token of the validation set."""
        return int((batch["labels"][:, 1:] != -100).sum())


def train_examples(stage: Stage, rundir: RunDir, rows, tokenize: TokenizeExamples,
                   config: TrainingConfig) -> None:
    """Tokenize ``rows`` into the stage's partitions, refuse bad rows, train :class:`SFT` on the
    ``ok`` ones and export the model (shared by the guard and chat SFT stages)."""
    import ray

    rows.map_batches(tokenize, batch_format="pyarrow").write_parquet(rundir.uri(stage.name),
                                                                    partition_cols=["status"])
    held_out = rundir.column_values(stage.name, OK, "part").count(VAL)
    count = check_rows(stage, rundir, config, held_out)
    examples = ray.data.read_parquet(rundir.partition_uri(stage.name, OK), partitioning=None)
    data = (examples.filter(expr=col("part") == TRAIN).select_columns(["id", "input_ids", "prompt_len"])
            # seeded: the same order on every run, so a checkpoint's data position means the same rows
            .random_shuffle(seed=config.seed).repartition(config.num_workers * 4))
    val = None
    if held_out:
        val = examples.filter(expr=col("part") == VAL).select_columns(["input_ids", "prompt_len"])
    elif getattr(config, "val_split", None):
        log.warning("stage %s: no rows of val_split %r: training without validation; the last epoch is exported",
                    stage.name, config.val_split)
    storage, log_dir = train_dir(stage, rundir)
    result = fit(SFT(config), data, rows=count, storage_path=storage, run_name=stage.name, log_dir=log_dir,
                 val_dataset=val)
    stage._summary = finish_training(stage, rundir, result, log_dir)
    if held_out:
        stage._summary["validation"] = {
            "rows": held_out, "per_epoch": [{"epoch": m["epoch"], "step": m["step"], "val_loss": m["val_loss"]}
                                            for m in read_metrics(rundir, stage.name) if "val_loss" in m],
            "chosen_epoch": result.metrics.get("best_epoch"), "chosen_val_loss": result.metrics.get("best_val_loss")}


class GuardSFTStage(TrainingStage):
    name = "guard_sft"
    writes = frozenset(TOKENIZED) - frozenset(STATUS_FIELDS)

    def __init__(self, config: GuardSFTConfig, taxonomy_path: str, *, name: str | None = None):
        from pipelines.core.prompts import ChatPrompt

        super().__init__(config, name=name, inputs=config.inputs)
        self.taxonomy_path = taxonomy_path  # exported with the model
        self.taxonomy = load_taxonomy(taxonomy_path)  # the training prompts name the categories
        self.template = ChatPrompt(config.template)
        # not the split: a row without one is trained on whatever split is selected
        self.reads = frozenset({"id", "text", "label"}) | ({"response"} if config.level == "response" else set())

    def exports(self, rundir: RunDir) -> dict[str, Any]:
        return {GUARD_MODEL: {"folder": MODEL_DIR, "template": str(self.config.template),
                              "taxonomy": self.taxonomy_path,
                              "chat_template_kwargs": dict(self.config.chat_template_kwargs)}}

    def write(self, inputs: dict, rundir: RunDir) -> None:
        from pipelines.core.rows import union_all

        rows = union_all([inputs[n].map_batches(pick_columns, fn_kwargs={"columns": TokenizeGuardRows.COLUMNS},
                                                batch_format="pyarrow") for n in self.inputs])
        train_examples(self, rundir, rows, TokenizeGuardRows(self.config, self.taxonomy_path), self.config)


class ChatSFTStage(TrainingStage):
    """``sft_<key>``: SFT on (prompt -> completion) rows of earlier stages."""

    writes = frozenset(TOKENIZED) - frozenset(STATUS_FIELDS)

    def __init__(self, key: str, config: ChatSFTConfig):
        super().__init__(config, name=f"sft_{key}", inputs=config.inputs)
        self.reads = frozenset({"id", config.prompt_column, config.completion_column,
                                *([config.thinking_column] if config.thinking_column else [])})

    def write(self, inputs: dict, rundir: RunDir) -> None:
        from pipelines.core.rows import union_all

        tokenize = TokenizeChatRows(self.config)
        rows = union_all([inputs[n].map_batches(pick_columns, fn_kwargs={"columns": tokenize.columns()},
                                                batch_format="pyarrow") for n in self.inputs])
        train_examples(self, rundir, rows, tokenize, self.config)
        truncated = sum(n > 0 for n in rundir.column_values(self.name, OK, "truncated_from"))
        self._summary["truncated_rows"] = truncated  # cut to max_length (too_long: truncate)


def _check_guard_sft(config: GuardSFTConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.guard_sft.inputs", config.inputs)
    return {}


def _check_sft(runs: dict[str, ChatSFTConfig], refs: References) -> dict[str, str | None]:
    for key, config in runs.items():
        refs.check_inputs(f"stages.sft.{key}.inputs", config.inputs)
    return {}


register("guard_sft", config=GuardSFTConfig, provides="model", check=_check_guard_sft,
         build=lambda recipe, config: [GuardSFTStage(config, recipe.taxonomy)])
register("sft", config=ChatSFTConfig, keyed=True, provides="model", check=_check_sft,
         build=lambda recipe, runs: [ChatSFTStage(key, config) for key, config in runs.items()],
         description="chat SFT runs on (prompt -> completion) rows; stage sft_<key>")
