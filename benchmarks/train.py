"""Training throughput: guard SFT tokens/s, our DPO and MDPO step times, and TRL's DPOTrainer.

    python benchmarks/train.py [--steps 40] [--hidden 256] [--layers 4]

One random-init Qwen3 model (built here, offline: the tiny-model kit's tokenizer, ``--hidden`` /
``--layers``) and one set of SYNTHETIC rows for every run, on an embedded local Ray:

- SFT: the ``guard_sft`` stage, 2 CPU workers, ZeRO-2, fp32; tokens/s over both workers, the median
  of the steps after the first two (start-up and the first step's allocations excluded);
- DPO and MDPO: the ``mdpo`` stage with ``dynamic_beta`` off and on, otherwise identical (2 workers,
  ZeRO-2, reference model beside the policy, global batch 16, K 12); median step time after the
  first two steps, runs in ABBA order (``--rounds`` pairs), averaged per method. Target: MDPO ≤
  1.05 × DPO;
- TRL (when installed, the ``bench`` extra): ``DPOTrainer`` in the driver process against our DPO
  with one worker on the same cores (``cpus_per_worker`` = all of them), same model, pairs, batch
  (micro 8 × 2 accumulation), β and max length; median step time (TRL's from a step-timing
  callback), ABBA order over ``--rounds``, averaged. Target: ours ≤ TRL (ratio ≤ 1.0).

Prints a table and writes JSON (default ``bench_out/train.json``). On a GPU machine pass
``--gpu`` to train the SFT run on one GPU with ZeRO-2 bf16 (and ``--hidden 2048 --layers 28`` for a
Qwen3-1.7B-sized model); MFU is then reported from 6 × parameters × tokens/s over the GPU's peak
(``--peak-tflops``, default 989 for an H100 SXM in bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))

from benchmarks.report import add_output_args, finish, fresh_dir

WORDS = ["天气", "学习", "音乐", "旅行", "做饭", "电影", "运动", "朋友", "花园", "图书", "城市", "历史"]


def build_model(work: Path, hidden: int, layers: int) -> tuple[str, int]:
    """A random Qwen3 of the requested size with the tiny-model kit's tokenizer; (path, params)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from pipelines.training.tiny_models import build_tiny_models

    kit = build_tiny_models(str(work / "kit"), seed=0)
    tok = AutoTokenizer.from_pretrained(kit["causal-lm"])
    config = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), head_dim=64, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    path = work / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


def write_rows(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    import random

    rng = random.Random(seed)
    guard, pairs = work / "guard.jsonl", work / "pairs.jsonl"
    with open(guard, "w", encoding="utf-8") as f:
        for i in range(n):
            unsafe = rng.random() < 0.5
            text = "".join(rng.choices(WORDS, k=24)) + str(i)
            f.write(json.dumps({"text": text, "label": "unsafe" if unsafe else "safe",
                                "micro": "A4" if unsafe else ""}, ensure_ascii=False) + "\n")
    with open(pairs, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "请谈谈" + "".join(rng.choices(WORDS, k=6)) + str(i),
                                "chosen": "".join(rng.choices(WORDS, k=8)),
                                "rejected": "".join(rng.choices(WORDS, k=8))}, ensure_ascii=False) + "\n")
    return guard, pairs


def steady(history: list[dict], key: str) -> float:
    return statistics.median(h[key] for h in history[2:])


def run_stage(work: Path, name: str, stages: dict) -> list[dict]:
    from pipelines.construction import Recipe, build_stages
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import run_stages

    recipe = Recipe.model_validate({"name": name, "run_dir": str(work / name), "stages": stages})
    t0 = time.perf_counter()
    built = build_stages(recipe)
    run_stages(built, RunDir(recipe.run_dir))
    stage = built[0].name  # the one training stage of this recipe
    history = [json.loads(x) for x in (work / name / stage / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"  {name}: {len(history)} steps in {time.perf_counter() - t0:.0f} s (stage wall time)")
    return history


def abba(a: str, b: str, rounds: int) -> list[str]:
    """Run order a, b, b, a, a, b, ... (``rounds`` pairs), so that drift in the machine's load hits
    both alike."""
    return ([a, b, b, a] * rounds)[:2 * rounds]


def trl_step_seconds(model: str, pairs: Path, steps: int, max_length: int, out: Path) -> float | None:
    """Median step time of TRL's DPOTrainer (one process), or None when TRL is not installed."""
    try:
        import trl
    except ImportError:
        return None
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(model)
    rows = load_dataset("json", data_files=str(pairs), split="train")
    # the same prompt text our trainer sees: the chat template applied to the user turn
    rows = rows.map(lambda r: {"prompt": tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                                 tokenize=False, add_generation_prompt=True)})
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=8,
                         gradient_accumulation_steps=2, learning_rate=5e-6, beta=0.1, max_length=max_length,
                         max_steps=steps, logging_steps=1000, save_strategy="no", report_to="none",
                         use_cpu=True, bf16=False, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                         dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model),
                             ref_model=AutoModelForCausalLM.from_pretrained(model),
                             args=args, train_dataset=rows, processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    print(f"  trl {trl.__version__}: {len(times)} steps")
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="DPO/MDPO pairs of runs (ABBA order)")
    parser.add_argument("--gpu", action="store_true", help="SFT on one GPU, ZeRO-2 bf16 (+ MFU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    add_output_args(parser, "train")
    args = parser.parse_args()

    import ray

    work = fresh_dir(args.workdir)
    model, params = build_model(work, args.hidden, args.layers)
    rows = args.steps * 16
    guard, pairs = write_rows(work, rows, args.seed)
    prompt = work / "guard_prompt.yaml"
    prompt.write_text("user: |\n  {{ text }}\n")
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), num_gpus=1 if args.gpu else 0,
             include_dashboard=False, log_to_driver=False)
    common = {"model": model, "deepspeed": "zero2", "global_batch_size": 16, "max_length": args.max_length,
              "report_every_steps": 1000, "learning_rate": 5e-6}
    sft_workers = 1 if args.gpu else 2
    sft = run_stage(work, "sft", {
        "seeds": {"g": {"paths": [str(guard)], "source": "real",
                        "columns": {"text": "text", "label": "label", "micro": "micro"}}},
        "guard_sft": {**common, "inputs": ["seeds_g"], "template": str(prompt), "num_workers": sft_workers,
                      "micro_batch_size": 16 // sft_workers, "use_gpu": args.gpu, "bf16": args.gpu}})
    pair_stage = {**common, "paths": [str(pairs)], "micro_batch_size": 8, "keep": 12, "use_gpu": False}
    step = {"dpo": [], "mdpo": []}
    for i, name in enumerate(abba("dpo", "mdpo", args.rounds)):
        history = run_stage(work, f"{name}_{i}", {"mdpo": {**pair_stage, "dynamic_beta": name == "mdpo"}})
        step[name].append(steady(history, "step_seconds"))
    # Ours with one worker against TRL's DPOTrainer in this (driver) process, in ABBA order too. The
    # worker gets all the cores TRL's process has (Ray pins a worker's torch threads to its CPU
    # count, so cpus_per_worker 1 would run on one core against TRL's two).
    cores = os.cpu_count() or 1
    one = {"ours": [], "trl": []}
    for i, name in enumerate(abba("ours", "trl", args.rounds)):
        if name == "trl":
            seconds = trl_step_seconds(model, pairs, args.steps, args.max_length, work / f"trl_{i}")
            if seconds is None:
                break
            one["trl"].append(seconds)
        else:
            history = run_stage(work, f"dpo_1worker_{i}", {"mdpo": {
                **pair_stage, "dynamic_beta": False, "num_workers": 1, "cpus_per_worker": cores}})
            one["ours"].append(steady(history, "step_seconds"))
    ray.shutdown()
    trl_step = statistics.mean(one["trl"]) if one["trl"] else None

    sft_tps = steady(sft, "tokens_per_second_per_worker") * sft_workers
    dpo_step, mdpo_step = statistics.mean(step["dpo"]), statistics.mean(step["mdpo"])
    dpo1_step = statistics.mean(one["ours"])
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": args.gpu},
        "model": {"hidden": args.hidden, "layers": args.layers, "parameters": params},
        "steps": args.steps, "max_length": args.max_length,
        "sft_tokens_per_second": sft_tps,
        "dpo_step_seconds": dpo_step, "mdpo_step_seconds": mdpo_step,
        "dpo_step_seconds_per_run": step["dpo"], "mdpo_step_seconds_per_run": step["mdpo"],
        "mdpo_over_dpo": mdpo_step / dpo_step,
        "dpo_1worker_step_seconds": dpo1_step,
        "trl_dpo_step_seconds": trl_step,
        "dpo_1worker_step_seconds_per_run": one["ours"], "trl_dpo_step_seconds_per_run": one["trl"],
        "ours_over_trl": dpo1_step / trl_step if trl_step else None,
    }
    if args.gpu:
        result["mfu"] = 6 * params * sft_tps / (args.peak_tflops * 1e12)
    print(f"\nmodel: Qwen3 random init, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f} M parameters")
    print(f"  guard SFT ({sft_workers} worker(s), ZeRO-2): {sft_tps:,.0f} tokens/s")
    print(f"  DPO  step (2 workers, ZeRO-2, reference model): {dpo_step * 1000:.0f} ms")
    print(f"  MDPO step (same):                              {mdpo_step * 1000:.0f} ms"
          f"  = {mdpo_step / dpo_step:.3f}x DPO")
    print(f"  our DPO step, 1 worker:                        {dpo1_step * 1000:.0f} ms")
    if trl_step:
        print(f"  TRL DPOTrainer step, 1 process:                {trl_step * 1000:.0f} ms"
              f"  -> ours = {dpo1_step / trl_step:.3f}x TRL")
    else:
        print("  TRL not installed (pip install -e '.[bench]'): comparison skipped")
    if args.gpu:
        print(f"  MFU: {result['mfu']:.3f}")
    result["targets"] = {"mdpo <= 1.05x dpo": mdpo_step <= 1.05 * dpo_step}
    if trl_step:
        result["targets"]["our dpo <= trl dpo"] = dpo1_step <= trl_step
    finish(result, args.out)


if __name__ == "__main__":
    main()
