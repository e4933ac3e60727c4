"""Metrics every Arbiter gRPC server exports, declared once, on the server's
own registry (several servers can share a process in tests)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# "_created" series double the exposition size and no dashboard or rule reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry, service: str):
        self.requests = Counter(
            "arbiter_requests", "RPCs handled, by method and final status code.",
            ["service", "method", "code"], registry=registry,
        )
        self.latency = Histogram(
            "arbiter_request_duration_seconds", "Wall time of an RPC in the server.",
            ["service", "method"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "arbiter_batch_size", "Items per model forward pass.",
            ["service"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.batch_latency = Histogram(
            "arbiter_batch_duration_seconds", "Wall time of one model forward pass.",
            ["service"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge(
            "arbiter_queue_depth", "Items waiting for a model batch.", ["service"], registry=registry,
        )
        self.batch_size_cap = Gauge(
            "arbiter_batch_size_cap",
            "Most items per forward pass, as chosen for the version's items up to `tokens` long "
            "(measured with batch_size_policy auto; else max_batch_size).",
            ["service", "model_version", "tokens"], registry=registry,
        )
        # Length buckets with a cap series, per version (removed with it).
        self._cap_buckets: dict[str, set[int]] = {}
        self.active_version = Gauge(
            "arbiter_model_active", "1 for the version that serves requests by default, 0 for other loaded ones.",
            ["service", "model_version"], registry=registry,
        )
        self.service = service
        # Children bound once: a labels() lookup (lock, tuple, dict) per
        # observation is several per request, which a small model's request
        # pays in event-loop time. Keys are the server's methods x status
        # codes: bounded.
        self._rpc_children: dict[tuple[str, grpc.StatusCode], tuple] = {}
        self._batch_size = self.batch_size.labels(service)
        self._batch_latency = self.batch_latency.labels(service)
        self._queue_depth = self.queue_depth.labels(service)

    def record_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One RPC of ``method`` ended with ``code`` after ``seconds``."""
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpc_children[(method, code)] = (
                self.latency.labels(self.service, method), self.requests.labels(self.service, method, code.name))
        children[0].observe(seconds)
        children[1].inc()

    @contextmanager
    def rpc(self, method: str) -> Iterator[list[grpc.StatusCode]]:
        """Times an RPC; the caller stores the final code in ``code[0]``."""
        code = [grpc.StatusCode.OK]
        started = time.perf_counter()
        try:
            yield code
        finally:
            self.record_rpc(method, code[0], time.perf_counter() - started)

    # BatchObserver
    def on_batch(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_latency.observe(seconds)

    def on_queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def on_batch_cap(self, model_version: str, tokens: int, cap: int) -> None:
        self._cap_buckets.setdefault(model_version, set()).add(tokens)
        self.batch_size_cap.labels(self.service, model_version, str(tokens)).set(cap)

    def set_versions(self, active: str | None, loaded: list[str], removed: list[str] = ()) -> None:
        for version in removed:
            try:
                self.active_version.remove(self.service, version)
            except KeyError:
                pass
            for tokens in self._cap_buckets.pop(version, ()):
                self.batch_size_cap.remove(self.service, version, str(tokens))
        for version in loaded:
            self.active_version.labels(self.service, version).set(1 if version == active else 0)


def stop_metrics_endpoint(httpd) -> None:
    """Free the port of a /metrics endpoint started with prometheus_client's
    ``start_http_server`` (``None``: there is none)."""
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()
