"""Attachments Kubernetes no longer wants: find them, and clear them safely.

A volume is published to a host NQN on its storage node. Kubernetes wants that publish while
a VolumeAttachment for the volume's PV and that host's node exists (attaching, attached or
detaching). Anything else is stale: a worker deleted from the cluster, a reimaged worker's old
identity, an attach whose VolumeAttachment was removed by hand. A stale publish keeps a host
on the subsystem's allow list and, for single-node volumes, blocks every attach elsewhere.

No wrong detach, by construction:
- agents are listed before Kubernetes, and a VolumeAttachment always exists before the
  attacher calls ControllerPublish, so a publish seen on an agent has its VolumeAttachment
  in the later Kubernetes listing unless Kubernetes really let it go;
- a publish must be found stale in two passes in a row;
- the unpublish runs under the controller's volume lock after one more Kubernetes listing,
  and only in the replica whose csi-attacher holds the leader lease, so it is serialized with
  every ControllerPublish that could race it;
- when in doubt (the node's current identity unknown), the publish is kept.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from csi.agents import AgentClient, AgentPool, fan_out
from zvolt import kubeconfig
from zvolt.errors import ZvoltError
from zvolt.names import node_of_host_nqn
from zvolt.pb import agent_pb2

_log = logging.getLogger("zvolt.csi.attachments")
PAGE = 1000


@dataclass(frozen=True, order=True)
class Publish:
    volume_id: str  # CSI volume id, <storage node>/<id>
    host: str  # host NQN on the subsystem's allow list


@dataclass(frozen=True)
class KubeAttachments:
    """What Kubernetes attaches now."""

    # CSI volume handle -> nodes that have a VolumeAttachment for it
    nodes_by_volume: Mapping[str, frozenset[str]]
    # node name -> the node id (host NQN) its CSINode reports for this driver now
    node_ids: Mapping[str, str]


def node_of(host: str, kube: KubeAttachments) -> str | None:
    """The Kubernetes node a host NQN belongs to: the one whose CSINode reports it, else the
    node name the NQN carries (zvolt host NQNs do, see csi/host_identity.py)."""
    for node, node_id in kube.node_ids.items():
        if node_id == host:
            return node
    return node_of_host_nqn(host)


def wanted(pub: Publish, kube: KubeAttachments) -> bool:
    for node in kube.nodes_by_volume.get(pub.volume_id, frozenset()):
        current = kube.node_ids.get(node)
        if current == pub.host:
            return True
        if current is None and node_of_host_nqn(pub.host) in (node, None):
            return True  # the node's identity is unknown right now: keep rather than guess
    return False


def find_stale(publishes: Iterable[Publish], kube: KubeAttachments) -> list[Publish]:
    return sorted(p for p in publishes if not wanted(p, kube))


def list_publishes(pool: AgentPool) -> tuple[list[Publish], dict[str, str]]:
    """Every (volume, host) published on every reachable agent, and the agents that could not
    answer (name -> why). Pages through published volumes only, all agents at once."""
    def one(agent: AgentClient) -> list[Publish]:
        found: list[Publish] = []
        token = ""
        while True:
            resp = agent.call("ListVolumes", agent_pb2.ListVolumesRequest(
                max_entries=PAGE, starting_token=token, published_only=True))
            # The CSI id names the volume's home, which a moved volume left (csi/locator.py).
            found += [Publish(f"{v.home_node or agent.name}/{v.id}", h)
                      for v in resp.volumes for h in v.published_hosts]
            token = resp.next_token
            if not token:
                return found

    agents = pool.all()
    publishes: list[Publish] = []
    failed: dict[str, str] = {}
    for agent, result in zip(agents, fan_out(agents, one), strict=True):
        if isinstance(result, ZvoltError):
            failed[agent.name] = result.message
        else:
            publishes += result
    return sorted(publishes), failed


# () -> what Kubernetes attaches now; raises when the API server cannot be read.
AttachmentLister = Callable[[], KubeAttachments]
# (volume id, host) -> None: the controller's unpublish of one host, under its volume lock;
# it calls back `still_stale()` under that lock before touching the agent.
Unpublisher = Callable[[Publish, Callable[[], bool]], bool]


@dataclass
class Reconciler:
    pool: AgentPool
    kube: AttachmentLister
    unpublish: Unpublisher
    is_leader: Callable[[], bool] = lambda: True
    confirmations: int = 2
    _seen: dict[Publish, int] = field(default_factory=dict)

    def stale(self) -> tuple[list[Publish], dict[str, str]]:
        """One look: (stale publishes, agents that could not answer). Agents first (see above)."""
        publishes, failed = list_publishes(self.pool)
        return find_stale(publishes, self.kube()), failed

    def pass_once(self) -> list[Publish]:
        """Count each stale publish; clear those stale `confirmations` passes in a row. Returns
        what was cleared."""
        stale, failed = self.stale()
        for name, why in failed.items():
            # Its publishes are unknown this pass: neither counted nor forgotten.
            _log.warning("attachment reconcile skipped a storage node", extra={"fields": {"node": name, "error": why}})
        down = {f"{name}/" for name in failed}
        self._seen = {p: n for p, n in self._seen.items() if any(p.volume_id.startswith(d) for d in down)} | {
            p: self._seen.get(p, 0) + 1 for p in stale}
        due = [p for p, n in sorted(self._seen.items()) if n >= self.confirmations]
        if not due or not self.is_leader():
            return []
        cleared = []
        for pub in due:
            if self.unpublish(pub, lambda pub=pub: not wanted(pub, self.kube())):  # type: ignore[misc]
                cleared.append(pub)
                _log.warning("cleared a stale attachment (no VolumeAttachment wants it)",
                             extra={"fields": {"volume_id": pub.volume_id, "host_nqn": pub.host}})
            self._seen.pop(pub, None)
        return cleared

    def run(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                self.pass_once()
            except Exception:
                _log.exception("attachment reconcile pass failed; next pass in %.0fs", interval)


_LEASE_NAME = re.compile(r"[^a-zA-Z0-9-]")


def lease_name(driver: str) -> str:
    """The csi-attacher's leader lease for this driver (csi-lib-utils' naming)."""
    name = _LEASE_NAME.sub("-", f"external-attacher-leader-{driver}")
    return name + "X" if name.endswith("-") else name


def lease_identity(hostname: str) -> str:
    name = _LEASE_NAME.sub("-", hostname)
    return name + "X" if name.endswith("-") else name


def kubernetes_attachments(driver: str, namespace: str, hostname: str,
                           now: Callable[[], float] = time.time) -> tuple[AttachmentLister, Callable[[], bool]]:
    """(lister of what Kubernetes attaches for `driver`, "is this pod's attacher the leader")."""
    from kubernetes import client

    kubeconfig.load()
    storage = client.StorageV1Api()
    core = client.CoreV1Api()
    coordination = client.CoordinationV1Api()

    def lister() -> KubeAttachments:
        handles = {pv.metadata.name: pv.spec.csi.volume_handle
                   for pv in core.list_persistent_volume().items
                   if pv.spec.csi is not None and pv.spec.csi.driver == driver}
        nodes: dict[str, set[str]] = {}
        for va in storage.list_volume_attachment().items:
            pv = va.spec.source.persistent_volume_name
            if va.spec.attacher != driver or pv is None:
                continue
            handle = handles.get(pv)
            if handle is None:
                continue
            nodes.setdefault(handle, set()).add(va.spec.node_name)
        node_ids = {}
        for csinode in storage.list_csi_node().items:
            for d in csinode.spec.drivers or []:
                if d.name == driver and d.node_id:
                    node_ids[csinode.metadata.name] = d.node_id
        return KubeAttachments({h: frozenset(n) for h, n in nodes.items()}, node_ids)

    def is_leader() -> bool:
        try:
            lease = coordination.read_namespaced_lease(lease_name(driver), namespace)
        except client.ApiException:
            return False
        spec = lease.spec
        if spec.holder_identity != lease_identity(hostname) or spec.renew_time is None:
            return False
        return bool(spec.renew_time.timestamp() + (spec.lease_duration_seconds or 0) > now())

    return lister, is_leader
