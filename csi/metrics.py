"""Prometheus metrics of the CSI driver: one counter and one latency histogram per CSI method."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, mode: str) -> None:
        self.registry = CollectorRegistry()
        self.ops = Counter(
            "zvolt_csi_operations",
            "CSI calls by method and status",
            ["mode", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "zvolt_csi_operation_seconds",
            "CSI call latency",
            ["mode", "method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.mode = mode

    def observe(self, method: str, status: str, seconds: float) -> None:
        self.ops.labels(self.mode, method, status).inc()
        self.latency.labels(self.mode, method).observe(seconds)

    def serve(self, listen: str) -> None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--metrics-listen {listen!r} is not HOST:PORT")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
