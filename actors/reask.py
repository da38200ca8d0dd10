"""Asking an LLM again when its answer is unusable: the re-ask loop the adjudicator and SHARD's
rewriters share.

A stage's reader turns each answer into a settled row (``ok`` / ``error``) or a row to ask again
(status :data:`RETRY`, with what was wrong, which the prompt shows on the next attempt). Each attempt
is a scratch pass of the stage (:func:`pipelines.core.stage.run_pass`), so a crashed run reuses the
attempts that finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.llm import chat
from pipelines.core.config import LLMEndpoint
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, col, run_pass

RETRY = "retry"  # transient status of a row that is asked again


def ask_until_valid(stage: Stage, rundir: RunDir, pending, *, endpoint: LLMEndpoint, render,
                    constraint, read: Callable, read_kwargs: dict[str, Any], retries: int) -> list:
    """Ask ``pending`` rows; rows whose answer ``read`` marks :data:`RETRY` are asked again, at most
    ``retries`` more times (``read`` gets ``last=True`` on the final attempt and must then settle
    every row). An attempt with nothing left to ask starts no engine. Returns the settled rows, one
    dataset per attempt."""
    finished = []
    for attempt in range(retries + 1):
        if pending.count() == 0:
            break
        last = attempt == retries
        answered = run_pass(stage, rundir, f"attempt-{attempt}", lambda pending=pending, last=last: chat(
            pending, endpoint, render, constraint).map_batches(
                read, batch_format="pyarrow", fn_kwargs={**read_kwargs, "last": last}))
        if answered is None:
            break
        finished.append(answered.filter(expr=col("status") != RETRY))
        pending = answered.filter(expr=col("status") == RETRY)
    return finished
