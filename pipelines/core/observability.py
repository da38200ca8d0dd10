"""chillguard's figures as Ray metrics (``ray.util.metrics``), tagged by run and stage.

Ray exports them with its own metrics on every node's Prometheus endpoint (the metrics export port;
names gain a ``ray_`` prefix there, counters a ``_total`` suffix), so the Ray dashboard's Grafana, a
cluster's Prometheus and ``cluster/grafana_chillguard.json`` see them while a run is going:

- ``chillguard_stage_rows`` (counter; run, stage, status = in / out / dropped / errored): a stage's
  row accounting, added when the stage finishes (its manifest's counts);
- ``chillguard_stage_reason_rows`` (counter; run, stage, status, reason): dropped and errored rows by
  reason;
- ``chillguard_stage_seconds`` (gauge; run, stage): how long the stage took;
- ``chillguard_stage_summary`` (gauge; run, stage, field): every number of the stage's summary (the
  jury's majorities, the adjudicator's votes per judge, abstentions, ties and adjudications, Fleiss'
  kappa, a training stage's final loss, a guard's F1 ...), flattened to dotted field names;
- ``chillguard_llm_tokens`` (counter; run, stage, model, kind = prompt / output): tokens through the LLM
  stages, counted in the Ray workers as answers arrive;
- ``chillguard_train_step``, ``chillguard_train_loss``, ``chillguard_train_beta`` (gauges; run, stage):
  the trainer's rank 0 after every optimizer step (``beta`` is MDPO's β_M, DPO's fixed β).

Workers learn the run and stage from :func:`stage_tags` (set by the runner in the driver, passed with
the work). Metrics are best effort: without an initialised Ray they are not recorded.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

#: the run and stage this driver thread is running (set by :func:`pipelines.core.stage.run_one`;
#: a context variable, so that stages run side by side in threads keep their own)
_CURRENT: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("stage_tags", default=("", ""))


def set_stage(run: str, stage: str) -> None:
    _CURRENT.set((run, stage))


def stage_tags() -> dict[str, str]:
    """``{"run", "stage"}`` of the stage running in this driver thread ("" outside a run): pass them
    to the workers with the work, they tag what the workers count."""
    run, stage = _CURRENT.get()
    return {"run": run, "stage": stage}


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


@functools.cache
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.util import metrics

    return getattr(metrics, kind)(name, description, tag_keys=tag_keys)


def _counter(name: str, description: str, tag_keys: tuple[str, ...]):
    return _metric("Counter", name, description, tag_keys)


def _gauge(name: str, description: str, tag_keys: tuple[str, ...]):
    return _metric("Gauge", name, description, tag_keys)


def flatten(summary: Any, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 2, "c": "x"}, "d": 0.5}`` -> ``{"a.b": 2.0, "d": 0.5}``: the numbers of a nested
    summary (booleans and text left out)."""
    out: dict[str, float] = {}
    if isinstance(summary, dict):
        for key, value in summary.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(summary, (int, float)) and not isinstance(summary, bool) and prefix:
        out[prefix[:-1]] = float(summary)
    return out


def record_stage(run: str, manifest: dict[str, Any]) -> None:
    """A finished stage's counts, reasons, time and summary numbers (driver, from its manifest)."""
    if not _ray_up():
        return
    tags = {"run": run, "stage": manifest["stage"]}
    rows = _counter("chillguard_stage_rows", "rows of a finished stage by status", ("run", "stage", "status"))
    for status in ("in", "out", "dropped", "errored"):
        value = manifest["rows"][status]
        if value:
            rows.inc(value, tags={**tags, "status": status})
    reasons = _counter("chillguard_stage_reason_rows", "dropped / errored rows by reason",
                       ("run", "stage", "status", "reason"))
    for status, counts in manifest["reasons"].items():
        for reason, value in counts.items():
            if value:
                reasons.inc(value, tags={**tags, "status": status, "reason": reason or "?"})
    _gauge("chillguard_stage_seconds", "seconds a stage took", ("run", "stage")).set(manifest["seconds"], tags=tags)
    summary = _gauge("chillguard_stage_summary", "numbers of a stage's summary", ("run", "stage", "field"))
    for field, value in flatten(manifest.get("summary") or {}).items():
        summary.set(value, tags={**tags, "field": field})


def record_tokens(tags: dict[str, str], model: str, prompt: int, output: int) -> None:
    """LLM tokens of a batch of answers (worker side)."""
    if not _ray_up():
        return
    counter = _counter("chillguard_llm_tokens", "LLM tokens by kind", ("run", "stage", "model", "kind"))
    for kind, value in (("prompt", prompt), ("output", output)):
        if value:
            counter.inc(value, tags={"run": tags.get("run", ""), "stage": tags.get("stage", ""),
                                     "model": model, "kind": kind})


def record_training(tags: dict[str, str], metrics: dict[str, Any]) -> None:
    """A training step's step, loss and β_M (trainer rank 0; SFT has no β)."""
    if not _ray_up():
        return
    tags = {"run": tags.get("run", ""), "stage": tags.get("stage", "")}
    for key, name in (("step", "chillguard_train_step"), ("loss", "chillguard_train_loss"),
                      ("beta_m", "chillguard_train_beta")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _gauge(name, f"training {key} (rank 0, every step)", ("run", "stage")).set(float(value), tags=tags)
