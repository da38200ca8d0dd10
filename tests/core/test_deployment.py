"""The deployment files: ``ray_cluster.yaml`` against Ray's own autoscaler schema, the KubeRay
manifests against the recipes they run (no cluster is started)."""

from __future__ import annotations

import re

import yaml

from pipelines.construction import load_recipe
from tests.conftest import REPO

KUBERAY = REPO / "cluster" / "kuberay"
#: the values only the user can know, allowed in these files and nothing else of the kind
PLACEHOLDERS = {"YOUR_REGISTRY", "YOUR_BUCKET"}


def _strings(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    else:
        yield str(value)


def placeholders(data) -> set[str]:
    """``YOUR_...`` / ``<...>`` / ``CHANGE_ME``-style tokens in the values (comments are not values)."""
    found = set()
    for text in _strings(data):
        found |= set(re.findall(r"YOUR[_-][A-Z_-]+|<[a-z_-]+>|CHANGE_?ME|REPLACE_?ME", text, flags=re.IGNORECASE))
    return found


def test_ray_cluster_yaml_passes_the_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # what `ray up` runs first
    assert placeholders(raw) == set(), "ray_cluster.yaml must work with `ray up` as it is"
    nodes = raw["available_node_types"]
    assert nodes[raw["head_node_type"]]["resources"] == {"CPU": 0}  # work lands on workers
    for name, node in nodes.items():
        disk = node["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
        assert disk >= (800 if name == "gpu_worker" else 100), (name, disk)  # judge weights: 4 x 60-80 GB
        if name != raw["head_node_type"]:  # s3:// run directories: every worker reads and writes the bucket
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}
    # the checkout is mounted and installed from there, not from a made-up URL
    assert raw["file_mounts"] == {"~/chillguard": "."}
    assert any("$HOME/chillguard[gpu]" in c for c in raw["setup_commands"])


def _gpus(group) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_kuberay_manifests_fit_the_recipes():
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == (
        "ray.io/v1", "RayCluster", "ray.io/v1", "RayJob")
    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec  # one cluster, two ways to use it
    assert placeholders(cluster) == {"YOUR_REGISTRY"} and placeholders(job) == PLACEHOLDERS
    assert spec["rayVersion"] == __import__("ray").__version__ and spec["enableInTreeAutoscaling"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 8000} <= ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and len(spec["workerGroupSpecs"]) == 2
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
    gpu, per_pod = groups["gpu"], _gpus(groups["gpu"])
    assert _gpus(groups["cpu"]) == 0 and per_pod == 8

    # the job's recipe loads, and every GPU need of it fits the GPU group
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["chillguard", "run"]
    recipe = load_recipe(REPO / entry[2], [a for a in entry[3:] if "=" in a])
    assert recipe.run_dir.startswith("s3://")
    product = gpu["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    for name, endpoint in recipe.models.items():
        if endpoint.engine != "vllm":
            continue
        assert endpoint.engine_kwargs.get("tensor_parallel_size", 1) <= per_pod, name
        if endpoint.accelerator_type:
            assert endpoint.accelerator_type in product, (name, endpoint.accelerator_type, product)
    trainers = [recipe.stages.loop.classifier, recipe.stages.loop.generator_training]
    for trainer in trainers:
        if trainer.use_gpu:
            assert trainer.num_workers <= gpu["maxReplicas"] * per_pod
    # the served guard's engine fits too
    serve = yaml.safe_load((REPO / "configs" / "serve" / "guard.yaml").read_text())["applications"][0]["args"]
    assert serve["engine"]["accelerator_type"] in product
    assert serve["engine"]["engine_kwargs"].get("tensor_parallel_size", 1) <= per_pod
