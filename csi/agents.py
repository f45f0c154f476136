"""Connections from the controller to the storage-node agents.

Agents come from a static list (`--agents name=addr,...`) or from Kubernetes (the agent
DaemonSet's pods: storage-node name = pod.spec.nodeName, address = podIP:port, zone =
the node's topology.kubernetes.io/zone label). Channels use mTLS or, for labs, --insecure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from csi import DEFAULT_ZONE
from zvolt import kubeconfig
from zvolt.errors import MOVED_TO_KEY, Moved, ZvoltError, invalid, unavailable
from zvolt.names import check_node
from zvolt.pb import agent_pb2_grpc
from zvolt.rpc import RECONNECT_OPTIONS, parse_endpoint
from zvolt.tlsfiles import TlsFiles as TlsFiles  # re-exported: the controller's settings
from zvolt.tlsfiles import Watched, channel_credentials

ZONE_LABEL = "topology.kubernetes.io/zone"
T = TypeVar("T")


@dataclass(frozen=True)
class AgentEndpoint:
    name: str
    target: str  # grpc target: unix:///path or host:port
    zone: str = DEFAULT_ZONE


def parse_static(spec: str, zone: str = DEFAULT_ZONE) -> list[AgentEndpoint]:
    """`name=addr,name=addr` -> endpoints (names validated, addresses parsed)."""
    endpoints: list[AgentEndpoint] = []
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, addr = item.partition("=")
        if not sep:
            raise invalid(f"agent {item!r} is not name=address")
        check_node(name)
        if name in seen:
            raise invalid(f"agent {name!r} is listed twice")
        seen.add(name)
        try:
            target = parse_endpoint(addr).grpc_target
        except ValueError as err:
            raise invalid(str(err)) from err
        endpoints.append(AgentEndpoint(name=name, target=target, zone=zone))
    if not endpoints:
        raise invalid("no agents given")
    return endpoints


# (namespace, selector) -> [(node_name, pod_ip, node_zone)] for running, addressed pods.
PodLister = Callable[[str, str], list[tuple[str, str, str]]]


def kubernetes_pod_lister(  # pragma: no cover - needs a cluster
    zone: str = DEFAULT_ZONE, zone_from_node_label: bool = False
) -> PodLister:
    """Agent pods as (node, ip, zone). Zones come from the node label only when asked: node
    plugins report the zone they were given (--zone), and a storage node in a zone no worker
    reports would match no topology requirement."""
    from kubernetes import client

    kubeconfig.load()
    api = client.CoreV1Api()

    def list_pods(namespace: str, selector: str) -> list[tuple[str, str, str]]:
        found = []
        for pod in api.list_namespaced_pod(namespace, label_selector=selector).items:
            if pod.status.phase != "Running" or not pod.status.pod_ip or not pod.spec.node_name:
                continue
            node_zone = zone
            if zone_from_node_label:
                try:
                    labels = api.read_node(pod.spec.node_name).metadata.labels or {}
                    node_zone = labels.get(ZONE_LABEL, zone)
                except Exception:  # noqa: S110 - zone is optional; a missing RBAC grant keeps the default
                    pass
            found.append((pod.spec.node_name, pod.status.pod_ip, node_zone))
        return found

    return list_pods


class KubernetesDiscovery:
    def __init__(self, lister: PodLister, namespace: str, selector: str, port: int, ttl: float = 30.0) -> None:
        self.lister, self.namespace, self.selector, self.port, self.ttl = lister, namespace, selector, port, ttl

    def __call__(self) -> list[AgentEndpoint]:
        endpoints = []
        for node, ip, zone in self.lister(self.namespace, self.selector):
            host = f"[{ip}]" if ":" in ip else ip
            endpoints.append(
                AgentEndpoint(name=check_node(node), target=f"{host}:{self.port}", zone=zone or DEFAULT_ZONE)
            )
        return endpoints


def _translate(name: str, err: grpc.RpcError) -> ZvoltError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    trailing = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
    moved_to = trailing.get(MOVED_TO_KEY, "")
    if code == grpc.StatusCode.NOT_FOUND and isinstance(moved_to, str) and moved_to:
        return Moved(moved_to, f"storage node {name}: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not details:
        details = "unreachable"
    return ZvoltError(code, f"storage node {name}: {details}")


class AgentClient:
    """One agent: its stub plus error translation (codes kept, node named in the message)."""

    def __init__(self, endpoint: AgentEndpoint, channel: grpc.Channel, timeout: float) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self.zone = endpoint.zone
        self.stub = agent_pb2_grpc.AgentStub(channel)
        self.timeout = timeout

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise _translate(self.name, err) from None


def fan_out(agents: Sequence[AgentClient], call: Callable[[AgentClient], T]) -> list[T | ZvoltError]:
    """Call every agent at once, so a slow or dead storage node costs one deadline, not one per
    node in turn; an agent's ZvoltError takes the place of its result."""
    def one(agent: AgentClient) -> T | ZvoltError:
        try:
            return call(agent)
        except ZvoltError as err:
            return err

    if len(agents) <= 1:
        return [one(a) for a in agents]
    with ThreadPoolExecutor(max_workers=min(32, len(agents)), thread_name_prefix="fan-out") as pool:
        return list(pool.map(one, agents))


class AgentPool:
    """All known agents. Discovery re-runs at most every `ttl` seconds (or on an unknown name)."""

    def __init__(
        self,
        discover: Callable[[], Iterable[AgentEndpoint]],
        tls: TlsFiles | None,
        timeout: float = 30.0,
        ttl: float = 30.0,
        per_node_names: bool = False,
    ) -> None:
        self._discover = discover
        self._tls = Watched(tls) if tls is not None else None
        # Per-node agent certificates: each agent must present a certificate for its own storage-node
        # name, so one storage node's certificate cannot answer for another (agent/certrequest.py).
        self._per_node_names = per_node_names
        self._timeout = timeout
        self._ttl = ttl
        self._lock = threading.Lock()
        self._clients: dict[str, AgentClient] = {}
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._refreshed = -1.0e9

    def _credentials(self, node: str) -> tuple[grpc.ChannelCredentials, list[tuple[str, str | int]]]:
        assert self._tls is not None
        creds, options = channel_credentials(self._tls)
        named: list[tuple[str, str | int]] = (
            [("grpc.ssl_target_name_override", node)] if self._per_node_names else list(options))
        return creds, [*named, *RECONNECT_OPTIONS]

    def _channel(self, ep: AgentEndpoint) -> grpc.Channel:
        key = (ep.target, ep.name if self._per_node_names else "")
        channel = self._channels.get(key)
        if channel is None:
            if self._tls is None or ep.target.startswith("unix:"):
                channel = grpc.insecure_channel(ep.target, options=RECONNECT_OPTIONS)
            else:
                creds, options = self._credentials(ep.name)
                channel = grpc.secure_channel(ep.target, creds, options=options)
            self._channels[key] = channel
        return channel

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._refreshed < self._ttl:
                return
            if self._tls is not None and self._tls.changed():
                # Rotated certificates (a renewed Secret): new calls get channels made from the
                # new files. The old channels are only forgotten, not closed: a close would
                # cancel calls in flight; they go when their last caller lets go.
                self._channels.clear()
                self._clients.clear()
            endpoints = list(self._discover())
            clients: dict[str, AgentClient] = {}
            for ep in endpoints:
                old = self._clients.get(ep.name)
                clients[ep.name] = (
                    old
                    if old is not None and old.endpoint == ep
                    else AgentClient(ep, self._channel(ep), self._timeout)
                )
            live = {(ep.target, ep.name if self._per_node_names else "") for ep in endpoints}
            for key in [k for k in self._channels if k not in live]:
                self._channels.pop(key).close()
            self._clients = clients
            self._refreshed = time.monotonic()

    def all(self) -> list[AgentClient]:
        self.refresh()
        return [self._clients[name] for name in sorted(self._clients)]

    def find(self, name: str) -> AgentClient | None:
        self.refresh()
        client = self._clients.get(name)
        if client is None:
            self.refresh(force=True)
            client = self._clients.get(name)
        return client

    def get(self, name: str) -> AgentClient:
        client = self.find(name)
        if client is None:
            raise unavailable(f"storage node {name} has no known agent (not discovered yet, or removed); retry later")
        return client

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._clients.clear()
