"""Prometheus metrics of one agent, in its own registry (no global default registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ops = Counter("zvolt_agent_operations", "Agent RPCs by method and status", ["method", "status"],
                           registry=r)
        self.latency = Histogram("zvolt_agent_operation_seconds", "Agent RPC latency by method", ["method"],
                                 buckets=_BUCKETS, registry=r)
        self.volumes = Gauge("zvolt_agent_volumes", "Volumes in the index", registry=r)
        self.snapshots = Gauge("zvolt_agent_snapshots", "Snapshots in the index", registry=r)
        self.exports = Gauge("zvolt_agent_exports", "Published (exported) volumes", registry=r)
        self.trash = Gauge("zvolt_agent_trash", "Deleted volumes kept until their last clone is gone", registry=r)
        self.pool_size = Gauge("zvolt_agent_pool_size_bytes", "Size of the parent dataset's space", registry=r)
        self.pool_used = Gauge("zvolt_agent_pool_used_bytes", "Bytes used under the parent dataset", registry=r)
        self.pool_free = Gauge("zvolt_agent_pool_free_bytes", "Bytes available to the parent dataset", registry=r)
        self.pool_committed = Gauge("zvolt_agent_pool_committed_bytes",
                                    "Logical bytes promised: volume sizes plus what snapshots can pin", registry=r)
        self.pool_commitment = Gauge("zvolt_agent_pool_commitment_ratio", "Committed bytes / pool size", registry=r)
        self.pool_commitment_limit = Gauge("zvolt_agent_pool_commitment_limit_ratio",
                                           "Commitment ratio above which new volumes and growths are refused",
                                           registry=r)
        self.startup = Gauge("zvolt_agent_startup_seconds", "Seconds from start to ready", registry=r)
        self.ready = Gauge("zvolt_agent_ready", "1 once start-up recovery is done", registry=r)
        self.unrestored = Gauge("zvolt_agent_exports_unrestored",
                                "Published volumes whose export could not be restored at start (retried)", registry=r)
        self.pool_fragmentation = Gauge("zvolt_agent_pool_fragmentation_percent",
                                        "Free-space fragmentation of the pool (zpool get fragmentation)", registry=r)
        self.abnormal = Gauge("zvolt_agent_volumes_abnormal",
                              "Published volumes whose condition is abnormal (export differs from what was published)",
                              registry=r)

    def observe(self, method: str, status: str, seconds: float) -> None:
        self.ops.labels(method=method, status=status).inc()
        self.latency.labels(method=method).observe(seconds)

    def set_counts(self, volumes: int, snapshots: int, exports: int, trash: int) -> None:
        self.volumes.set(volumes)
        self.snapshots.set(snapshots)
        self.exports.set(exports)
        self.trash.set(trash)

    def set_space(self, available: int, used: int) -> None:
        self.pool_size.set(available + used)
        self.pool_used.set(used)
        self.pool_free.set(available)

    def set_commitment(self, committed: int, pool_size: int, limit_ratio: float) -> None:
        self.pool_committed.set(committed)
        self.pool_commitment.set(committed / pool_size if pool_size else 0)
        self.pool_commitment_limit.set(limit_ratio)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
