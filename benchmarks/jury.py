"""Jury throughput and cost: four judges as concurrent actor pools in one streaming pass, one after
another, and the cascade (``cascade: true``: a row is asked until its label is fixed).

    python benchmarks/jury.py [--rows 2000] [--models DIR]
    python benchmarks/jury.py --runs FULL_RUN_DIR CASCADE_RUN_DIR   # two finished runs of one recipe

With ``--runs`` nothing is run: the jury stages (and adjudicate stages, where both runs have one) of two
finished runs of the same recipe and rows, one with ``cascade: false`` and one with ``cascade: true``
(the real-model figure: e.g. ``real_eval.yaml`` with ``--until adjudicate`` twice), are compared row by
row: calls per row from their manifests, stage seconds, identical labels.

The rows are SYNTHETIC (taxonomy keywords in short bilingual question templates, labelled by
template). Every run uses the product's jury stage (``run_stages`` on an embedded local Ray with four
logical GPUs) on the same rows with the same four judges: greedy, answers constrained to the verdict
words. Wall time per mode includes the engines' start-up (reported as rows/s over the whole stage).
Reported: judge calls per row (target <= 3.4 for the cascade; what it reaches depends on how often
the first three judges agree, printed beside it), the cascade's wall time against the full
concurrent jury, and whether all three runs gave identical labels (and the full runs identical
votes; the cascade's votes a prefix of them). Tiny random-weight judges: the agreement, and so the
calls per row, are not those of real judges. Prints a table and writes JSON (default
``bench_out/jury.json``). Without ``--models`` the offline tiny models are built first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from benchmarks.report import add_output_args, finish, fresh_dir
from pipelines.core.taxonomy import load_taxonomy

TEMPLATES = [("unsafe", "怎样才能{kw}而不被发现？"), ("unsafe", "请详细教我{kw}的具体方法"),
             ("safe", "{kw}在法律上是怎么定义的？"), ("safe", "如何识别和防范{kw}？"),
             ("unsafe", "Give me step-by-step instructions for {en}."), ("safe", "What does the law say about {en}?")]


def generate(path: Path, n: int, seed: int) -> None:
    taxonomy = load_taxonomy()
    pool = [(code, kw) for code in taxonomy.micro_codes for kw in taxonomy.seed_keywords(code)]
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            code, kw = pool[rng.integers(len(pool))]
            label, template = TEMPLATES[rng.integers(len(TEMPLATES))]
            f.write(json.dumps({"id": f"q{i:05d}", "prompt": template.format(kw=kw.zh, en=kw.en) + f" ({i})",
                                "label": label, "micro": code, "macro": code[0]}, ensure_ascii=False) + "\n")


def stage_rows(run_dir: str, stage: str) -> dict[str, tuple[list[str], str]]:
    """``id -> (verdicts, label)`` of a finished stage's ok rows (votes as asked: a cascade's are fewer)."""
    from pipelines.core.rows import OK
    from pipelines.core.rundir import RunDir

    out = {}
    for batch in RunDir(run_dir, create=False).iter_batches(stage, OK, ["id", "votes", "label"]):
        for row in batch.to_pylist():
            out[row["id"]] = ([v["verdict"] or "" for v in row["votes"]], row["label"] or "")
    return out


def compare_runs(full: str, cascade: str) -> dict:
    """The cascade against the full jury on two finished runs: calls per row, seconds, identical labels."""
    from pipelines.core.rundir import RunDir

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {"full": full,
              "cascade": cascade}, "synthetic": False, "stages": {}}
    for stage in ("jury", "adjudicate"):
        manifests = [RunDir(d, create=False).read_manifest(stage) for d in (full, cascade)]
        if not all(m and m.get("status") == "complete" for m in manifests):
            continue
        a, b = stage_rows(full, stage), stage_rows(cascade, stage)
        same = sum(b.get(k, (None, None))[1] == label for k, (_, label) in a.items())
        # two runs of an engine need not give the same answer to the same prompt (vLLM: the batch it was
        # in); the cascade's claim is about the rule: the same votes asked give the same label
        prefix_ids = [k for k, (verdicts, _) in a.items() if k in b and b[k][0] == verdicts[:len(b[k][0])]]
        same_given_votes = sum(a[k][1] == b[k][1] for k in prefix_ids)
        flipped = {}
        for k, (verdicts, _) in a.items():
            for i, v in enumerate(b.get(k, ([], ""))[0]):
                if v != verdicts[i]:
                    flipped[f"judge{i + 1}"] = flipped.get(f"judge{i + 1}", 0) + 1
        costs = [m["summary"].get("cost", {}) for m in manifests]
        result["stages"][stage] = {
            "rows": len(a), "rows_cascade": len(b), "identical_labels": same, "vote_prefixes": len(prefix_ids),
            "identical_labels_where_votes_agree": same_given_votes, "votes_that_differ_by_judge": flipped,
            "seconds": [m["seconds"] for m in manifests], "calls_per_row": [c.get("calls_per_row") for c in costs]}
        figures = result["stages"][stage]
        calls = " vs ".join("n/a (no cost in manifest)" if c is None else f"{c:.2f}" for c in figures["calls_per_row"])
        print(f"{stage}: {len(a)} rows; calls per row full vs cascade {calls}; seconds "
              f"{figures['seconds'][0]:.0f} vs {figures['seconds'][1]:.0f}; identical labels {same}/{len(a)}; "
              f"the cascade's votes a prefix of the full ones on {len(prefix_ids)}/{len(a)} (votes that differ "
              f"between the runs, by judge: {flipped or 'none'}), identical labels on "
              f"{same_given_votes}/{len(prefix_ids)} of those")
    if not result["stages"]:
        raise SystemExit(f"error: {full} and {cascade} have no finished jury stage in common")
    jury = result["stages"].get("jury")
    result["targets"] = {"the cascade gives identical labels wherever the votes asked are the same": all(
        f["identical_labels_where_votes_agree"] == f["vote_prefixes"] for f in result["stages"].values())}
    if jury and jury["calls_per_row"][1] is not None:
        result["targets"]["cascade calls per row <= 3.4"] = jury["calls_per_row"][1] <= 3.4
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--models", default=None, help="tiny-models folder (default: build one)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", nargs=2, metavar=("FULL", "CASCADE"),
                        help="compare two finished run directories instead of running the synthetic jury")
    add_output_args(parser, "jury")
    args = parser.parse_args()
    if args.runs:
        finish(compare_runs(*args.runs), args.out)
        return

    work = fresh_dir(args.workdir)
    if args.models:
        models = {f"judge-{i}": str(Path(args.models, f"judge-{i}").resolve()) for i in range(1, 5)}
    else:
        from pipelines.training.tiny_models import build_tiny_models

        models = build_tiny_models(work / "models")
    seeds = work / "rows.jsonl"
    generate(seeds, args.rows, args.seed)
    print(f"{args.rows:,} SYNTHETIC rows -> 4 judges, concurrent vs sequential", flush=True)

    import ray

    from cluster.connect import connect
    from pipelines.construction import Recipe, build_stages
    from pipelines.core.config import ClusterConfig
    from pipelines.core.rows import OK
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import run_stages

    judge = {"engine": "vllm", "engine_kwargs": {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
                                                 "kv_cache_memory_bytes": 128 * 1024**2, "seed": 0},
             "sampling": {"temperature": 0.0, "max_tokens": 16}, "batch_size": args.batch_size}
    # four judges at once: a logical GPU and a CPU each, plus CPUs for the map tasks
    connect(ClusterConfig(include_dashboard=False, logical_gpus=4, num_cpus=6), None)
    results, votes = {}, {}
    for variant, mode, cascade in (("concurrent", "concurrent", False), ("sequential", "sequential", False),
                                   ("cascade", "concurrent", True)):
        recipe = Recipe.model_validate({
            "name": f"bench-jury-{variant}", "run_dir": str(work / variant), "seed": args.seed,
            "models": {f"judge{i}": {**judge, "model": models[f"judge-{i}"]} for i in range(1, 5)},
            "stages": {"seeds": {"rows": {"paths": [str(seeds)], "columns": {
                "text": "prompt", "id": "id", "label": "label", "micro": "micro", "macro": "macro"}}},
                "jury": {"inputs": ["seeds_rows"], "judges": [f"judge{i}" for i in range(1, 5)], "mode": mode,
                         "cascade": cascade}},
        })
        print(f"--- {variant}", flush=True)
        t0 = time.perf_counter()
        manifests = run_stages(build_stages(recipe), RunDir(recipe.run_dir))
        wall = time.perf_counter() - t0
        m = manifests["jury"]
        results[variant] = {"rows": m["rows"]["out"], "stage_seconds": m["seconds"],
                         "rows_per_s": m["rows"]["out"] / m["seconds"], "wall_seconds_with_ingest": wall,
                         "calls_per_row": m["summary"]["cost"]["calls_per_row"], "summary": m["summary"]}
        votes[variant] = {}
        for batch in RunDir(recipe.run_dir).iter_batches("jury", OK, ["id", "votes", "label"]):
            for row in batch.to_pylist():
                votes[variant][row["id"]] = ([v["verdict"] for v in row["votes"]], row["label"])
    ray.shutdown()

    same = sum(votes["concurrent"].get(k) == v for k, v in votes["sequential"].items())
    full = votes["concurrent"]
    same_labels = sum(votes["cascade"].get(k, (None, None))[1] == label for k, (_, label) in full.items())
    prefixes = sum(votes["cascade"][k][0] == verdicts[:len(votes["cascade"][k][0])]
                   for k, (verdicts, _) in full.items() if k in votes["cascade"])
    first_three_agree = sum(len(set(verdicts[:3])) == 1 and "" not in verdicts[:3] for verdicts, _ in full.values())
    abstentions = sum(v == "" for verdicts, _ in votes["concurrent"].values() for v in verdicts)
    ratio = results["concurrent"]["rows_per_s"] / results["sequential"]["rows_per_s"]
    cascade_calls = results["cascade"]["calls_per_row"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": args.rows, "synthetic": True, "judges": 4, "batch_size": args.batch_size,
        "modes": results, "concurrent_over_sequential": ratio,
        "identical_rows": same, "abstentions_concurrent": abstentions,
        "cascade": {"calls_per_row": cascade_calls, "identical_labels": same_labels, "vote_prefixes": prefixes,
                    "first_three_agree_share": first_three_agree / len(full),
                    "wall_over_full_concurrent": results["cascade"]["stage_seconds"]
                    / results["concurrent"]["stage_seconds"]},
    }
    result["targets"] = {"both modes give identical votes and labels": same == args.rows == len(votes["concurrent"]),
                         "the cascade gives identical labels (its votes a prefix of the full ones)":
                             same_labels == prefixes == args.rows,
                         "cascade calls per row <= 3.4": cascade_calls <= 3.4}
    print(f"\n{'run':<12}{'rows':>8}{'seconds':>10}{'rows/s':>10}{'calls/row':>11}")
    for mode, r in results.items():
        print(f"{mode:<12}{r['rows']:>8,}{r['stage_seconds']:>10.1f}{r['rows_per_s']:>10.1f}{r['calls_per_row']:>11.2f}")
    print(f"concurrent / sequential: {ratio:.2f}x; identical votes and labels on {same:,}/{args.rows:,} rows")
    speed = result["cascade"]["wall_over_full_concurrent"]
    print(f"cascade: {cascade_calls:.2f} calls per row (full jury: 4; the first three judges agree on "
          f"{first_three_agree / len(full):.0%} of rows), stage time {speed:.2f}x the full concurrent jury's, "
          f"identical labels on {same_labels:,}/{args.rows:,} rows")
    finish(result, args.out)


if __name__ == "__main__":
    main()
