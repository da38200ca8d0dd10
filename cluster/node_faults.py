"""Dead nodes on purpose, for the fault tests (``tests/faults``) and ``benchmarks/faults.py``: a
multi-node Ray in one machine (``ray.cluster_utils.Cluster``: a head and worker nodes, each its own
raylet and object store), a worker node killed with SIGKILL while a stage runs on it (as a reclaimed
spot instance dies), and a fresh node added in its place (what the autoscaler does).

Everything here acts on processes this machine's test or benchmark started itself: the nodes of its
own ``Cluster``, never another Ray.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NODE_MEMORY = 256 * 1024**2  # object store per node: small, every node shares this machine's RAM


def start_cluster(head_cpus: int = 2):
    """A ``Cluster`` with a head (``head_cpus`` CPUs, no GPU: the driver's tasks only) and this
    process connected to it; worker nodes are added by the caller."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("a Ray is already connected in this process: node faults need their own "
                           "cluster (run them in their own process: make test-faults)")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "num_gpus": 0,
                                                      "object_store_memory": NODE_MEMORY})
    ray.init(address=c.address)
    return c


def stop_cluster(c) -> None:
    """Disconnect, stop every node, then anything the nodes started that outlived them (a vLLM
    engine process whose actor died with its node can)."""
    import psutil
    import ray

    ours = psutil.Process().children(recursive=True)
    ray.shutdown()
    c.shutdown()
    for proc in ours:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def add_workers(c, n: int, **resources) -> list:
    """``n`` worker nodes with ``resources`` (``num_cpus``, ``num_gpus``), registered when it returns.
    Call it from the main thread (Ray installs signal handlers there)."""
    nodes = [c.add_node(object_store_memory=NODE_MEMORY, **resources) for _ in range(n)]
    c.wait_for_nodes()
    return nodes


def remove_workers(c) -> None:
    for node in list(c.worker_nodes):
        c.remove_node(node, allow_graceful=False)


def hosts(node, title: str) -> bool:
    """Whether a process whose title starts with ``title`` (``VLLM::EngineCore``, ``ray::MapWorker``
    ...) runs on ``node``: a descendant of its raylet, which starts the node's workers and actors."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for proc in raylet.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            if cmdline and cmdline[0].startswith(title):
                return True
    return False


@dataclass
class Kill:
    """What to kill and when: the first worker node that hosts a process titled ``title``, once
    ``ready()`` is true; ``replacement``: the resources of the node added in its place (``None``: no
    replacement). ``before_kill(node)`` runs just before (e.g. to read the node's metrics)."""

    title: str
    ready: Callable[[], bool]
    replacement: dict[str, Any] | None = None
    before_kill: Callable[[Any], None] | None = None
    killed_at: float | None = field(default=None, init=False)


def run_with_kill(c, run: Callable[[], Any], kill: Kill, *, still_running: Callable[[], bool],
                  timeout: float = 900) -> Any:
    """Call ``run()`` in a thread while this (main) thread waits for ``kill``'s moment and kills the
    node. The node must die while the work is unfinished (``still_running()``, checked just before
    the kill). Returns ``run()``'s result; re-raises its exception."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = run()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while thread.is_alive() and kill.killed_at is None and time.time() < deadline:
        if kill.ready():
            victims = [n for n in c.worker_nodes if hosts(n, kill.title)]
            if not victims:
                raise AssertionError(f"no worker node hosts {kill.title!r}")
            if not still_running():
                raise AssertionError("the work finished before the node was killed: give it more rows")
            if kill.before_kill:
                kill.before_kill(victims[0])
            c.remove_node(victims[0], allow_graceful=False)
            kill.killed_at = time.time()
            if kill.replacement is not None:
                add_workers(c, 1, **kill.replacement)
        time.sleep(0.1)
    thread.join(max(1.0, deadline - time.time()))
    if thread.is_alive():
        raise TimeoutError(f"not finished within {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    if kill.killed_at is None:
        raise AssertionError("the node was never killed: the work finished first (give it more rows)")
    return result["value"]
