"""Readiness of the storage nodes, for metrics: kept apart from liveness on purpose.

The controller's CSI Probe answers for this process only. If it reported storage readiness,
livenessprobe would restart the controller during a storage outage that a restart cannot fix.
Storage readiness goes to Prometheus instead (`zvolt_csi_storage_node_ready{node}`), refreshed
in the background with all agents asked in parallel under a short deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from csi.agents import AgentClient, AgentPool
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2


def agent_ready(agent: AgentClient, timeout: float) -> bool:
    try:
        return bool(agent.call("GetInfo", agent_pb2.GetInfoRequest(), timeout=timeout).ready)
    except ZvoltError:
        return False


class StorageHealth(Collector):
    def __init__(self, pool: AgentPool, interval: float = 30.0, timeout: float = 5.0) -> None:
        self.pool, self.interval, self.timeout = pool, interval, timeout
        self._last: dict[str, bool] = {}
        self._mu = threading.Lock()
        self._stop = threading.Event()

    def refresh(self) -> dict[str, bool]:
        agents = self.pool.all()
        if not agents:
            result: dict[str, bool] = {}
        else:
            with futures.ThreadPoolExecutor(max_workers=min(16, len(agents))) as ex:
                flags = ex.map(lambda a: agent_ready(a, self.timeout), agents)
                result = {a.name: ok for a, ok in zip(agents, flags, strict=True)}
        with self._mu:
            self._last = result
        return result

    def last(self) -> dict[str, bool]:
        with self._mu:
            return dict(self._last)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.refresh()
                self._stop.wait(self.interval)

        threading.Thread(target=loop, name="storage-health", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "zvolt_csi_storage_node_ready", "1 if the storage node's agent answered ready", labels=["node"]
        )
        for node, ok in sorted(self.last().items()):
            gauge.add_metric([node], 1.0 if ok else 0.0)
        yield gauge
