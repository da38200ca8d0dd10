"""The served guard's own figures, as ``ray.util.metrics``: Ray exports them with its Prometheus
metrics on every node (prefixed ``ray_``), next to Ray Serve's request metrics, so the Ray
dashboard's Grafana and any Prometheus that scrapes the cluster see them.

- ``chillguard_serve_requests`` (counter; route, HTTP status): requests answered.
- ``chillguard_serve_texts`` / ``chillguard_serve_flagged`` (counters): texts judged / flagged unsafe (under
  the request's policy when it has one: a text outside it is not counted flagged);
  the flagged share is their ratio, and ``chillguard_serve_flagged_share`` (gauge) is it since the
  replica started.
- ``chillguard_serve_latency_s`` (histogram; route): request latency in the ingress.
- ``chillguard_serve_batch_size`` (histogram; call): prompts per engine call, by kind of call:
  ``first_token`` and ``continuation`` (``scoring: one_pass``), ``decode`` (``scoring: decode``).
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics:
    """One set per ingress replica, tagged with the served model's name."""

    def __init__(self, model: str):
        tags = {"model": model}
        self._requests = metrics.Counter("chillguard_serve_requests", "guard API requests answered",
                                         tag_keys=("model", "route", "status"))
        self._texts = metrics.Counter("chillguard_serve_texts", "texts judged", tag_keys=("model",))
        self._flagged = metrics.Counter("chillguard_serve_flagged", "texts flagged unsafe", tag_keys=("model",))
        self._share = metrics.Gauge("chillguard_serve_flagged_share",
                                    "share of texts flagged since the replica started", tag_keys=("model",))
        self._latency = metrics.Histogram("chillguard_serve_latency_s", "request latency in the ingress (s)",
                                          boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model", "route"))
        self._batch = metrics.Histogram("chillguard_serve_batch_size", "prompts per engine call",
                                        boundaries=BATCH_BOUNDARIES, tag_keys=("model", "call"))
        for metric in (self._requests, self._texts, self._flagged, self._share, self._latency, self._batch):
            metric.set_default_tags(tags)
        self.texts = self.flagged = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        self._requests.inc(1, tags={"route": route, "status": str(status)})
        self._latency.observe(seconds, tags={"route": route})

    def verdicts(self, verdicts: list) -> None:
        flagged = sum(v.flagged for v in verdicts)
        self.texts += len(verdicts)
        self.flagged += flagged
        self._texts.inc(len(verdicts))
        if flagged:
            self._flagged.inc(flagged)
        self._share.set(self.flagged / self.texts)

    def batch(self, size: int, call: str) -> None:
        self._batch.observe(size, tags={"call": call})
