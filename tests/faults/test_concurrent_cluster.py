"""Issue 30, item 2, on a multi-node Ray in this machine (``ray.cluster_utils.Cluster``): two independent
guard evaluations run at the same time, each engine on its own worker node, and write the same
predictions as when they run one after the other. The recipe is the benchmark's
(``benchmarks/concurrent_stages.py``); the scheduler's rules on stages without Ray are in
tests/core/test_concurrent_stages.py. Its own Ray cluster, so ``make test-faults``."""

from __future__ import annotations

import threading
import time

import pytest

from benchmarks.concurrent_stages import GPU_NODE, eval_pair_recipe, overlap_seconds, predictions
from benchmarks.jury import generate
from cluster.node_faults import add_workers, hosts, remove_workers, start_cluster, stop_cluster
from pipelines.construction import build_stages
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from tests.conftest import assert_balanced

pytestmark = [pytest.mark.slow, pytest.mark.faults]

ROWS = 48


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster()
    yield c
    stop_cluster(c)


class EnginesPerNode(threading.Thread):
    """Every 0.2 s: how many worker nodes host a vLLM engine at that moment; keeps the most."""

    def __init__(self, c):
        super().__init__(daemon=True)
        self.c, self.most, self.stop = c, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.most = max(self.most, sum(hosts(node, "VLLM::EngineCore") for node in list(self.c.worker_nodes)))
            time.sleep(0.2)


def test_two_evaluations_side_by_side_on_two_nodes(tmp_path, tiny_models, cluster):
    seeds = tmp_path / "rows.jsonl"
    generate(seeds, ROWS, 0)
    add_workers(cluster, 2, **GPU_NODE)  # one logical GPU per node: one engine each
    try:
        runs = {}
        for label, concurrent in (("one_at_a_time", 1), ("side_by_side", 2)):
            recipe = eval_pair_recipe(label, tmp_path / label, seeds, tiny_models)
            stages = build_stages(recipe)
            assert {s.name: s.resources() for s in stages} == {
                "seeds_rows": {}, "guard_eval_a": {"GPU": 1}, "guard_eval_b": {"GPU": 1}}
            watch = EnginesPerNode(cluster)
            watch.start()
            try:
                manifests = run_stages(stages, RunDir(recipe.run_dir), max_concurrent=concurrent)
            finally:
                watch.stop.set()
                watch.join()
            for name in ("guard_eval_a", "guard_eval_b"):
                assert_balanced(manifests[name], RunDir(recipe.run_dir))
                assert manifests[name]["rows"]["in"] == ROWS
            runs[label] = {"engine_nodes": watch.most, "predictions": predictions(recipe.run_dir),
                           "overlap": overlap_seconds(manifests, ["guard_eval_a", "guard_eval_b"])}
        # one at a time: one engine at any moment and no overlap; side by side: an engine on each node at once
        assert runs["one_at_a_time"]["engine_nodes"] == 1 and runs["one_at_a_time"]["overlap"] == 0
        assert runs["side_by_side"]["engine_nodes"] == 2 and runs["side_by_side"]["overlap"] > 0
        assert runs["side_by_side"]["predictions"] == runs["one_at_a_time"]["predictions"]
        assert all(len(p) == ROWS for p in runs["side_by_side"]["predictions"].values())
    finally:
        remove_workers(cluster)
