"""What a kubelet publishes about its node, for a suite that has no kubelet yet.

The control plane, the sidecars and zvolt here are real; the kubelets are not (a kubelet in
the lab guest is issue 15). So the harness publishes, as the admin, exactly what kubelet and
node-driver-registrar would: a Node that is Ready (status heartbeats and a Lease in
kube-node-lease, renewed in the background so the node lifecycle controller never evicts),
marked for controller-managed attach/detach, labelled with zvolt's topology segment; for a
worker, the CSINode carrying zvolt's node id (the NVMe host NQN of the real node plugin in the
lab guest); and for an agent pod bound to a storage node, the Running status and pod IP that
controller discovery reads. Anything beyond that (mounting, nvme connect) is not faked: the
scenarios that need it wait for issue 15.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from csi import DRIVER_NAME, TOPOLOGY_ZONE_KEY

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
ATTACH_DETACH_ANNOTATION = "volumes.kubernetes.io/controller-managed-attach-detach"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    zone: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    csi_node_id: str = ""  # set for workers: the node plugin's NodeGetInfo node_id


class Kubelets:
    """Registers stand-in nodes and keeps them Ready until close()."""

    def __init__(self, api: Any, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.heartbeat = heartbeat
        self.nodes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- nodes -----------------------------------------------------------------------

    def register(self, spec: NodeSpec) -> None:
        labels = {"kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux", **spec.labels}
        if spec.csi_node_id:
            labels[TOPOLOGY_ZONE_KEY] = spec.zone  # as the registrar does from NodeGetInfo's topology
        node = client.V1Node(metadata=client.V1ObjectMeta(
            name=spec.name, labels=labels, annotations={ATTACH_DETACH_ANNOTATION: "true"}))
        self.core.create_node(node)
        self.nodes.append(spec.name)
        self._beat(spec.name, first=True)
        if spec.csi_node_id:
            self.storage.create_csi_node(client.V1CSINode(
                metadata=client.V1ObjectMeta(name=spec.name),
                spec=client.V1CSINodeSpec(drivers=[client.V1CSINodeDriver(
                    name=DRIVER_NAME, node_id=spec.csi_node_id, topology_keys=[TOPOLOGY_ZONE_KEY])]),
            ))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kubelet-stand-in", daemon=True)
            self._thread.start()

    def remove(self, name: str) -> None:
        """The node leaves the cluster (its pods are then collected by the pod GC controller)."""
        if name in self.nodes:
            self.nodes.remove(name)
        with contextlib.suppress(ApiException):
            self.core.delete_node(name)
        with contextlib.suppress(ApiException):
            self.leases.delete_namespaced_lease(name, LEASE_NAMESPACE)

    def _beat(self, name: str, first: bool = False) -> None:
        now = _now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "stand-in kubelet of the zvolt k8s suite",
                 "lastHeartbeatTime": now.isoformat(), "lastTransitionTime": now.isoformat()}
        status: dict[str, Any] = {"conditions": [ready]}
        if first:
            resources = {"cpu": "4", "memory": "8Gi", "pods": "110"}
            status.update(capacity=resources, allocatable=resources,
                          addresses=[{"type": "InternalIP", "address": "127.0.0.1"},
                                     {"type": "Hostname", "address": name}])
        self.core.patch_node_status(name, {"status": status})
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, namespace=LEASE_NAMESPACE),
            spec=client.V1LeaseSpec(holder_identity=name, lease_duration_seconds=LEASE_SECONDS, renew_time=now),
        )
        try:
            self.leases.replace_namespaced_lease(name, LEASE_NAMESPACE, lease)
        except ApiException as err:
            if err.status != 404:
                raise
            self.leases.create_namespaced_lease(LEASE_NAMESPACE, lease)

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            for name in list(self.nodes):
                # The API server goes away at session end; otherwise the next beat retries.
                with contextlib.suppress(ApiException):
                    self._beat(name)

    # --- pods ------------------------------------------------------------------------

    def mark_running(self, namespace: str, pod: str, ip: str) -> None:
        """The status kubelet reports once a pod's containers run (what agent discovery reads)."""
        now = _now().isoformat()
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}], "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        }})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
