"""Issue 30, item 2: independent stages side by side (``cluster.max_concurrent_stages``).

The runner on stages that write their rows with pyarrow (no Ray): a barrier that only opens when two
stages run at the same time shows they overlap (and that one at a time they do not), declared
resources keep stages that do not fit apart, a failure lets the running stages finish and starts no
new one, resume after it reruns only what did not finish, and each stage thread keeps its own
answer log and metric tags. The multi-node run of two evaluation stages is in
tests/faults/test_concurrent_cluster.py."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.core.answers import answer_log
from pipelines.core.config import ClusterConfig, LLMEndpoint
from pipelines.core.observability import stage_tags
from pipelines.core.rows import OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, engine_gpus, fits, run_stages


class Probe(Stage):
    """A source stage (it requires, reads no rows) that records what it saw while running."""

    unhashed = Stage.unhashed | {"barrier", "log", "failed", "seen"}  # the test's probes, not settings

    def __init__(self, name: str, *, requires: tuple[str, ...] = (), gpus: int = 0,
                 barrier: threading.Barrier | None = None, fail: bool = False, log: list | None = None,
                 failed: threading.Event | None = None):
        super().__init__({"name": name}, name=name, requires=requires)
        self.gpus = gpus
        self.barrier, self.fail, self.log = barrier, fail, log if log is not None else []
        self.failed = failed  # fail: set before raising; otherwise: wait for it (then a moment more)
        self.seen: dict = {}

    def expected_rows_in(self) -> int:
        return 1

    def resources(self) -> dict[str, float]:
        return {"GPU": self.gpus} if self.gpus else {}

    def write(self, inputs: dict, rundir: RunDir) -> None:
        self.log.append(("start", self.name))
        self.seen = {"answer_log": answer_log(), "tags": stage_tags(), "thread": threading.current_thread().name}
        if self.barrier is not None:
            self.barrier.wait()  # BrokenBarrierError when the other stage is not running beside this one
        if self.fail:
            if self.failed is not None:
                self.failed.set()
            raise RuntimeError(f"{self.name} failed")
        if self.failed is not None:  # finish after the other stage's failure has reached the runner
            self.failed.wait(20)
            time.sleep(0.3)
        rundir.write_table(self.name, OK, to_table([make_row(id=f"{self.name}-1", text=self.name)]))
        self.log.append(("end", self.name))


def _pair(barrier: threading.Barrier | None = None, gpus: int = 0, log: list | None = None) -> list[Probe]:
    """source -> (left, right) -> join: left and right are independent."""
    return [Probe("source", log=log), Probe("left", requires=("source",), barrier=barrier, gpus=gpus, log=log),
            Probe("right", requires=("source",), barrier=barrier, gpus=gpus, log=log),
            Probe("join", requires=("left", "right"), log=log)]


def _most_at_once(log: list) -> int:
    running, most = 0, 0
    for event, _ in log:
        running += 1 if event == "start" else -1
        most = max(most, running)
    return most


def test_independent_stages_run_at_the_same_time(tmp_path):
    stages = _pair(threading.Barrier(2, timeout=20))
    manifests = run_stages(stages, RunDir(str(tmp_path / "run")), max_concurrent=2, capacity={})
    assert set(manifests) == {s.name for s in stages}
    assert all(m["status"] == "complete" for m in manifests.values())
    assert stages[1].seen["thread"] != stages[2].seen["thread"]
    # one at a time, the barrier never opens: the first of the two fails waiting for the other
    with pytest.raises(threading.BrokenBarrierError):
        run_stages(_pair(threading.Barrier(2, timeout=1)), RunDir(str(tmp_path / "sequential")), max_concurrent=1)


def test_declared_resources_keep_stages_that_do_not_fit_apart(tmp_path):
    log: list = []
    run_stages(_pair(gpus=1, log=log), RunDir(str(tmp_path / "one")), max_concurrent=2, capacity={"GPU": 1})
    assert _most_at_once(log) == 1  # one engine slot: left and right in turn
    log.clear()
    stages = _pair(threading.Barrier(2, timeout=20), gpus=1, log=log)
    run_stages(stages, RunDir(str(tmp_path / "two")), max_concurrent=2, capacity={"GPU": 2})
    assert _most_at_once(log) == 2
    assert fits({"GPU": 1}, {"GPU": 1}, {"GPU": 2}) and not fits({"GPU": 2}, {"GPU": 1}, {"GPU": 2})
    assert fits({"CPU": 3, "memory": 10}, {}, {"CPU": 4})  # unnamed resources are Ray's to place


def test_same_manifests_side_by_side_and_one_at_a_time(tmp_path):
    keys = ("config_hash", "input_fingerprint", "output_fingerprint", "rows", "reasons", "inputs")
    one = run_stages(_pair(), RunDir(str(tmp_path / "one")), max_concurrent=1)
    both = run_stages(_pair(threading.Barrier(2, timeout=20)), RunDir(str(tmp_path / "both")), max_concurrent=2,
                      capacity={})
    assert {n: {k: m[k] for k in keys} for n, m in one.items()} == \
        {n: {k: m[k] for k in keys} for n, m in both.items()}


def test_a_failure_lets_the_running_stage_finish_starts_nothing_new_and_resumes(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    log: list = []
    barrier = threading.Barrier(2, timeout=20)  # both branches are running when left fails
    failed = threading.Event()                  # and right ends after it
    stages = [Probe("source", log=log),
              Probe("left", requires=("source",), barrier=barrier, fail=True, log=log, failed=failed),
              Probe("right", requires=("source",), barrier=barrier, log=log, failed=failed),
              Probe("after_right", requires=("right",), log=log), Probe("join", requires=("left", "right"), log=log)]
    with pytest.raises(RuntimeError, match="left failed"):
        run_stages(stages, rundir, max_concurrent=2, capacity={})
    assert ("end", "right") in log                        # the running branch finished ...
    assert rundir.read_manifest("right")["status"] == "complete"
    assert ("start", "after_right") not in log            # ... and nothing new started
    assert rundir.read_manifest("left") is None and rundir.read_manifest("join") is None
    # resume: source and right are skipped, the rest runs
    log.clear()
    fixed = [Probe("source", log=log), Probe("left", requires=("source",), log=log),
             Probe("right", requires=("source",), log=log), Probe("after_right", requires=("right",), log=log),
             Probe("join", requires=("left", "right"), log=log)]
    manifests = run_stages(fixed, rundir, max_concurrent=2, capacity={})
    assert {name for event, name in log if event == "start"} == {"left", "after_right", "join"}
    assert all(m["status"] == "complete" for m in manifests.values())


def test_each_stage_thread_keeps_its_answer_log_and_metric_tags(tmp_path):
    from pipelines.core.answers import set_answer_log
    from pipelines.core.observability import set_stage

    set_stage("caller", "mine")
    set_answer_log("caller-log")
    stages = _pair(threading.Barrier(2, timeout=20))
    rundir = RunDir(str(tmp_path / "run"))
    run_stages(stages, rundir, max_concurrent=2, capacity={})
    for stage in stages[1:3]:
        assert stage.seen["tags"] == {"run": rundir.name, "stage": stage.name}
        assert f"/{stage.name}/" in stage.seen["answer_log"]
    # the stage threads did not write over the caller's
    assert stage_tags() == {"run": "caller", "stage": "mine"} and answer_log() == "caller-log"


def test_engine_gpus_and_the_default_concurrency():
    vllm = LLMEndpoint(engine="vllm", model="Qwen/Qwen3-8B", concurrency=(1, 3),
                       engine_kwargs={"tensor_parallel_size": 2})
    http = LLMEndpoint(engine="http", model="m", url="http://localhost:8000/v1/chat/completions")
    assert engine_gpus(vllm) == 6 and engine_gpus(http) == 0
    stage = Probe("x")
    stage.endpoint, stage.judges = vllm, {"a": vllm.model_copy(update={"concurrency": 1}), "b": http}
    assert Stage.resources(stage) == {"GPU": 8}
    assert ClusterConfig().concurrent_stages() == 1
    assert ClusterConfig().concurrent_stages("ray://head:10001") == 4
    assert ClusterConfig(address="auto").concurrent_stages() == 4
    assert ClusterConfig(max_concurrent_stages=2).concurrent_stages("auto") == 2
