"""Agent zones must agree with what node plugins report, or no topology requirement matches."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import kubernetes
import pytest

from csi.agents import kubernetes_pod_lister


class FakeCoreV1:
    def __init__(self) -> None:
        self.node_reads = 0

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        pod = SimpleNamespace(
            status=SimpleNamespace(phase="Running", pod_ip="10.0.0.5"),
            spec=SimpleNamespace(node_name="storage-a"),
        )
        pending = SimpleNamespace(
            status=SimpleNamespace(phase="Pending", pod_ip=""), spec=SimpleNamespace(node_name="")
        )
        return SimpleNamespace(items=[pod, pending])

    def read_node(self, name: str) -> Any:
        self.node_reads += 1
        return SimpleNamespace(metadata=SimpleNamespace(labels={"topology.kubernetes.io/zone": "eu-1a"}))


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCoreV1:
    api = FakeCoreV1()
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda: api)
    return api


def test_agents_take_the_configured_zone_by_default(core: FakeCoreV1) -> None:
    assert kubernetes_pod_lister("default")("zvolt", "app=agent") == [("storage-a", "10.0.0.5", "default")]
    assert core.node_reads == 0


def test_node_label_zone_only_when_asked(core: FakeCoreV1) -> None:
    found = kubernetes_pod_lister("default", zone_from_node_label=True)("zvolt", "app=agent")
    assert found == [("storage-a", "10.0.0.5", "eu-1a")]
    assert core.node_reads == 1
