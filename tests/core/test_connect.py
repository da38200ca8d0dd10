"""cluster/connect.py: what the embedded Ray's workers get (in a subprocess: the suite's own Ray is up)."""

from __future__ import annotations

import logging
import subprocess

import pytest

from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.slow

SCRIPT = """
import logging
import ray
from cluster.connect import PLACEMENT_GROUP_CLEANER_LOG, connect
from pipelines.core.config import ClusterConfig

connect(ClusterConfig(num_cpus=1, logical_gpus=0, include_dashboard=False))

@ray.remote
def level():
    return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOG).getEffectiveLevel()

print("level", ray.get(level.remote()))
ray.shutdown()
"""


def test_without_the_dashboard_workers_keep_the_placement_group_cleaner_to_errors():
    """Without the dashboard there is no State API, and Ray Train's placement-group cleaner warns once a
    second that it cannot ask it (11 lines in 10 s of training, measured): the workers get a setup hook
    that keeps that logger to errors."""
    done = subprocess.run([PYTHON, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"level {logging.ERROR}" in done.stdout.splitlines()
