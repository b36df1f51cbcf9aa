"""Prometheus metrics for the whole application, kept in one small deployment.

Replicas run in processes of their own, so a `prometheus_client` registry per process would show
only one replica's counts on /metrics. Instead the gateway and every model replica collect their
observations in a `MetricsBuffer` and send them (fire and forget) to this one-replica deployment a
few times a second, and /metrics renders its registry. One call per request instead cost the
metrics replica a quarter of a core at ~100 requests/s on this 2-core machine.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("blip_serve_requests", "HTTP requests by model, route and status",
                                ["model", "route", "status"], registry=self.registry)
        self.latency = Histogram("blip_serve_request_latency_seconds", "Request latency at the gateway",
                                 ["model", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("blip_serve_batch_requests", "Client requests per replica batch",
                                        ["model"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.retries = Counter("blip_serve_retries", "Requests retried because their replica died", ["model"],
                               registry=self.registry)
        self.batch_rows = Histogram("blip_serve_batch_rows", "Images (or texts) per runtime call",
                                    ["model"], buckets=_BATCH_BUCKETS, registry=self.registry)

    def record(self, items: list[tuple[str, tuple]]) -> None:
        """items: (method name, its arguments), as a MetricsBuffer collected them."""
        for name, args in items:
            if name in ("request", "retry", "batch"):
                getattr(self, name)(*args)

    def request(self, model: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(model, route, str(status)).inc()
        self.latency.labels(model, route).observe(seconds)

    def retry(self, model: str) -> None:
        self.retries.labels(model).inc()

    def batch(self, model: str, requests: int, rows: list[int]) -> None:
        self.batch_requests.labels(model).observe(requests)
        for r in rows:
            self.batch_rows.labels(model).observe(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsBuffer:
    """Observations made in one process, sent to the Metrics deployment in one call per `period`
    seconds (the first observation after a send schedules the next one). Call from async code."""

    def __init__(self, handle, period: float = 0.25):
        self.handle, self.period = handle, period
        self.pending: list[tuple[str, tuple]] = []
        self.scheduled = False

    def add(self, name: str, *args) -> None:
        self.pending.append((name, args))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_later(self.period, self.flush)

    def flush(self) -> None:
        items, self.pending, self.scheduled = self.pending, [], False
        if items:
            self.handle.record.remote(items)
