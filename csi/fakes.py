"""Fakes behind the CSI driver's seams, for unit tests and the conformance suite.

- FakeAgent: an in-memory zvolt.agent.v1.Agent servicer with the agent contract's
  semantics (idempotent by name, NOT_FOUND/ALREADY_EXISTS/RESOURCE_EXHAUSTED...), served
  over real gRPC by `serve_fake_agent`.
- FakeNvmeHost / FakeMounter: the node plugin's adapters, with observable state.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from csi.mounter import FsStats, MountInfo, check_mount_flags
from csi.nvme_host import ConnectSpec, Controller
from zvolt.errors import ZvoltError, aborted, already_exists, exhausted, internal, not_found, precondition, unavailable
from zvolt.names import id_for_name, subsystem_nqn
from zvolt.pb import agent_pb2, agent_pb2_grpc
from zvolt.rpc import RpcInterceptor

GiB = 1024**3


def _page(items: list[Any], max_entries: int, token: str) -> tuple[list[Any], str]:
    try:
        start = int(token) if token else 0
    except ValueError:
        raise aborted(f"invalid starting_token {token!r}") from None
    if start < 0 or start > len(items):
        raise aborted(f"invalid starting_token {token!r}")
    end = len(items) if max_entries <= 0 else min(len(items), start + max_entries)
    return items[start:end], (str(end) if end < len(items) else "")


@dataclass
class FakeAgentState:
    volumes: dict[str, agent_pb2.Volume] = field(default_factory=dict)
    snapshots: dict[str, agent_pb2.Snapshot] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    snapshot_labels: dict[str, dict[str, str]] = field(default_factory=dict)


class FakeAgent(agent_pb2_grpc.AgentServicer):  # type: ignore[misc]
    def __init__(
        self,
        node_name: str,
        total_bytes: int = 100 * GiB,
        max_volume: int = 0,
        address: str = "10.0.0.1",
        ready: bool = True,
    ) -> None:
        self.node = node_name
        self.total = total_bytes
        self.max_volume = max_volume
        self.address = address
        self.ready = ready
        self.state = FakeAgentState()
        self.lock = threading.Lock()
        self.commitment_ratio = 0.0  # GetCapacity's node limit (tests set it)
        # Tests hold this open to keep a CreateVolume in flight (concurrency cases).
        self.create_gate: threading.Event | None = None
        self.create_entered = threading.Event()

    def _used(self) -> int:
        return sum(v.size_bytes if v.thick else 0 for v in self.state.volumes.values())

    def _vol(self, vid: str) -> agent_pb2.Volume:
        vol = self.state.volumes.get(vid)
        if vol is None:
            raise not_found(f"volume {vid} does not exist")
        return vol

    def GetInfo(self, request: Any, context: Any) -> Any:
        return agent_pb2.GetInfoResponse(
            node_name=self.node, ready=self.ready, nvme_transport="tcp", nvme_address=self.address, nvme_port="4420"
        )

    def CreateVolume(self, request: agent_pb2.CreateVolumeRequest, context: Any) -> Any:
        self.state.calls.append("CreateVolume")
        if self.create_gate is not None:
            self.create_entered.set()
            self.create_gate.wait(10)
        with self.lock:
            vid = id_for_name(request.name)
            existing = self.state.volumes.get(vid)
            if existing is not None:
                if (
                    existing.size_bytes != request.size_bytes
                    or existing.source_snapshot_id != request.source_snapshot_id
                ):
                    raise already_exists(f"volume {request.name!r} exists with other parameters")
                return agent_pb2.CreateVolumeResponse(volume=existing)
            if request.source_snapshot_id and request.source_snapshot_id not in self.state.snapshots:
                raise not_found(f"snapshot {request.source_snapshot_id} does not exist")
            if request.source_volume_id:
                self._vol(request.source_volume_id)
            if self.max_volume and request.size_bytes > self.max_volume:
                raise ZvoltError(grpc.StatusCode.OUT_OF_RANGE, "too big")
            if request.thick and request.size_bytes > self.total - self._used():
                raise exhausted("pool too full")
            vol = agent_pb2.Volume(
                id=vid,
                name=request.name,
                size_bytes=request.size_bytes,
                volblocksize=request.volblocksize or 16384,
                compression=request.compression or "lz4",
                thick=request.thick,
                source_snapshot_id=request.source_snapshot_id,
                source_volume_id=request.source_volume_id,
                nqn=subsystem_nqn(self.node, vid),
                created_unix=int(time.time()),
            )
            self.state.volumes[vid] = vol
            return agent_pb2.CreateVolumeResponse(volume=vol)

    def DeleteVolume(self, request: agent_pb2.DeleteVolumeRequest, context: Any) -> Any:
        with self.lock:
            vol = self._vol(request.volume_id)
            if vol.published_hosts:
                raise precondition(f"volume {vol.id} is still published")
            del self.state.volumes[request.volume_id]
            return agent_pb2.DeleteVolumeResponse()

    def ExpandVolume(self, request: agent_pb2.ExpandVolumeRequest, context: Any) -> Any:
        with self.lock:
            vol = self._vol(request.volume_id)
            if request.size_bytes < vol.size_bytes:
                raise precondition("shrinking is not supported")
            vol.size_bytes = request.size_bytes
            return agent_pb2.ExpandVolumeResponse(volume=vol)

    def ModifyVolume(self, request: agent_pb2.ModifyVolumeRequest, context: Any) -> Any:
        self.state.calls.append("ModifyVolume")
        with self.lock:
            vol = self._vol(request.volume_id)
            if request.compression:
                vol.compression = request.compression
            return agent_pb2.ModifyVolumeResponse(volume=vol)

    def GetVolume(self, request: agent_pb2.GetVolumeRequest, context: Any) -> Any:
        with self.lock:
            return agent_pb2.GetVolumeResponse(volume=self._vol(request.volume_id))

    def ListVolumes(self, request: agent_pb2.ListVolumesRequest, context: Any) -> Any:
        with self.lock:
            items = [self.state.volumes[k] for k in sorted(self.state.volumes)]
        if request.published_only:
            items = [v for v in items if v.published_hosts]
        page, token = _page(items, request.max_entries, request.starting_token)
        return agent_pb2.ListVolumesResponse(volumes=page, next_token=token)

    def CreateSnapshot(self, request: agent_pb2.CreateSnapshotRequest, context: Any) -> Any:
        with self.lock:
            vol = self._vol(request.source_volume_id)
            sid = f"{vol.id}@{id_for_name(request.name, prefix='s')}"
            for snap in self.state.snapshots.values():
                if snap.name == request.name:
                    if snap.id != sid:
                        raise already_exists(f"snapshot {request.name!r} exists for another volume")
                    return agent_pb2.CreateSnapshotResponse(snapshot=snap)
            snap = agent_pb2.Snapshot(
                id=sid,
                name=request.name,
                source_volume_id=vol.id,
                size_bytes=vol.size_bytes,
                created_unix=int(time.time()),
                ready_to_use=True,
            )
            self.state.snapshots[sid] = snap
            self.state.snapshot_labels[sid] = dict(request.labels)
            return agent_pb2.CreateSnapshotResponse(snapshot=snap)

    def DeleteSnapshot(self, request: agent_pb2.DeleteSnapshotRequest, context: Any) -> Any:
        with self.lock:
            if request.snapshot_id not in self.state.snapshots:
                raise not_found(f"snapshot {request.snapshot_id} does not exist")
            del self.state.snapshots[request.snapshot_id]
            return agent_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: agent_pb2.ListSnapshotsRequest, context: Any) -> Any:
        with self.lock:
            items = [
                self.state.snapshots[k]
                for k in sorted(self.state.snapshots)
                if (not request.snapshot_id or k == request.snapshot_id)
                and (
                    not request.source_volume_id or self.state.snapshots[k].source_volume_id == request.source_volume_id
                )
            ]
        page, token = _page(items, request.max_entries, request.starting_token)
        return agent_pb2.ListSnapshotsResponse(snapshots=page, next_token=token)

    def GetCapacity(self, request: Any, context: Any) -> Any:
        if not self.ready:
            raise unavailable("agent is recovering")
        used = self._used()
        with self.lock:
            committed = sum(v.size_bytes for v in self.state.volumes.values())
        # commitment_ratio 0 (the default) answers like an agent that predates commitment limits.
        ratio = self.commitment_ratio
        return agent_pb2.GetCapacityResponse(
            available_bytes=self.total - used,
            total_bytes=self.total,
            used_bytes=used,
            maximum_volume_size=self.max_volume,
            committed_bytes=committed,
            commitment_limit_ratio=ratio,
            commitment_available_bytes=max(int(ratio * self.total) - committed, 0) if ratio else 0,
        )

    def PublishVolume(self, request: agent_pb2.PublishVolumeRequest, context: Any) -> Any:
        with self.lock:
            vol = self._vol(request.volume_id)
            if request.host_nqn not in vol.published_hosts:
                vol.published_hosts.append(request.host_nqn)
            return agent_pb2.PublishVolumeResponse(nqn=vol.nqn, transport="tcp", address=self.address, port="4420")

    def UnpublishVolume(self, request: agent_pb2.UnpublishVolumeRequest, context: Any) -> Any:
        with self.lock:
            vol = self._vol(request.volume_id)
            if request.host_nqn in vol.published_hosts:
                vol.published_hosts.remove(request.host_nqn)
            return agent_pb2.UnpublishVolumeResponse()


def serve_fake_agent(agent: Any, socket_path: str) -> grpc.Server:
    """A real gRPC server for an agent servicer on a unix socket (logging like production)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[RpcInterceptor("fake-agent")])
    agent_pb2_grpc.add_AgentServicer_to_server(agent, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    return server


# ---------------------------------------------------------------- node side


@dataclass
class FakeSubsystem:
    size: int
    pending_size: int = 0  # a resize becomes visible on rescan, like revalidation on a real host


class FakeNvmeHost:
    """Targets known to the fake fabric are `subsystems`; connect makes a controller for one."""

    def __init__(self) -> None:
        self.subsystems: dict[str, FakeSubsystem] = {}
        self.ctrls: dict[str, Controller] = {}  # name -> controller
        self.devices: dict[str, str] = {}  # nqn -> /dev/nvmeXn1
        self.connects: list[ConnectSpec] = []
        self.disconnects: list[str] = []
        self.forgotten: list[tuple[str, str]] = []  # forget_psks calls (hostnqn, nqn)
        self.rescans: list[str] = []
        self.native_multipath = True
        self._next = 0
        self._device_names: dict[str, str] = {}
        # Tests hold this open to keep a NodeStageVolume in flight (concurrency cases).
        self.connect_gate: threading.Event | None = None
        self.connect_entered = threading.Event()

    def add_subsystem(self, nqn: str, size: int) -> None:
        self.subsystems[nqn] = FakeSubsystem(size=size)

    def add_foreign_controller(self, nqn: str, hostnqn: str) -> str:
        """Another host identity's session to the same subsystem (must never be touched)."""
        name = f"nvme{self._next}"
        self._next += 1
        self.ctrls[name] = Controller(name, nqn, hostnqn, "live", "tcp", "traddr=10.0.0.1,trsvcid=4420")
        return name

    def set_state(self, nqn: str, state: str) -> None:
        for name, ctrl in list(self.ctrls.items()):
            if ctrl.subsysnqn == nqn:
                self.ctrls[name] = Controller(name, nqn, ctrl.hostnqn, state, ctrl.transport, ctrl.address)

    def controllers(self, nqn: str) -> list[Controller]:
        return [c for c in self.ctrls.values() if c.subsysnqn == nqn]

    def connect(self, spec: ConnectSpec) -> None:
        spec.validate()
        if self.connect_gate is not None:
            self.connect_entered.set()
            self.connect_gate.wait(10)
        if spec.nqn not in self.subsystems:
            raise internal(f"nvme connect failed: subsystem {spec.nqn} not found at {spec.address}:{spec.port}")
        self.connects.append(spec)
        name = f"nvme{self._next}"
        self._next += 1
        self.ctrls[name] = Controller(name, spec.nqn, spec.hostnqn, "live", "tcp",
                                      f"traddr={spec.address},trsvcid={spec.port}")
        # Same device name on every attach, so data "written" through FakeMounter stays with the volume.
        self.devices[spec.nqn] = self._device_names.setdefault(spec.nqn, f"/dev/nvme{len(self._device_names) + 50}n1")

    def disconnect(self, controller: str) -> None:
        ctrl = self.ctrls.pop(controller)
        self.disconnects.append(controller)
        if not self.controllers(ctrl.subsysnqn):
            self.devices.pop(ctrl.subsysnqn, None)

    def forget_psks(self, hostnqn: str, nqn: str) -> None:
        self.forgotten.append((hostnqn, nqn))

    def namespace_device(self, nqn: str) -> str | None:
        return self.devices.get(nqn)

    def rescan(self, controller: str) -> None:
        self.rescans.append(controller)
        sub = self.subsystems[self.ctrls[controller].subsysnqn]
        if sub.pending_size:
            sub.size, sub.pending_size = sub.pending_size, 0

    def multipath(self) -> bool:
        return self.native_multipath

    def device_size(self, device: str) -> int:
        for nqn, dev in self.devices.items():
            if dev == device:
                return self.subsystems[nqn].size
        return 0


class FakeMounter:
    def __init__(self, device_size: Callable[[str], int]) -> None:
        self.mounts: dict[str, MountInfo] = {}
        self.filesystems: dict[str, str] = {}  # device -> fstype
        self.mkfs_calls: list[tuple[str, str]] = []
        self.grow_calls: list[tuple[str, str, str]] = []
        self.device_size = device_size
        self.fs_stats = FsStats(10 * GiB, 9 * GiB, 1 * GiB, 655360, 655000, 360)

    def mount_info(self, target: str) -> MountInfo | None:
        return self.mounts.get(os.path.normpath(target))

    def mount(self, device: str, target: str, fstype: str, options: Sequence[str]) -> None:
        opts = check_mount_flags(options)
        if self.filesystems.get(device) != fstype:
            raise internal(f"mount: wrong fs type on {device}")
        self.mounts[os.path.normpath(target)] = MountInfo(target, device, fstype, tuple(opts or ["rw"]))

    def bind(self, source: str, target: str, readonly: bool) -> None:
        src = self.mounts.get(os.path.normpath(source))
        fstype = src.fstype if src else "devtmpfs"
        device = src.source if src else source
        self.mounts[os.path.normpath(target)] = MountInfo(target, device, fstype, ("ro",) if readonly else ("rw",))

    def unmount(self, target: str) -> None:
        if os.path.normpath(target) not in self.mounts:
            raise internal(f"umount: {target}: not mounted")
        del self.mounts[os.path.normpath(target)]

    def fs_type(self, device: str) -> str | None:
        return self.filesystems.get(device)

    def mkfs(self, device: str, fstype: str) -> None:
        self.mkfs_calls.append((device, fstype))
        self.filesystems[device] = fstype

    def grow(self, device: str, mountpoint: str, fstype: str) -> None:
        self.grow_calls.append((device, mountpoint, fstype))

    def stats(self, path: str) -> FsStats:
        return self.fs_stats

    def is_block_device(self, path: str) -> bool:
        info = self.mounts.get(os.path.normpath(path))
        return info is not None and info.fstype == "devtmpfs"

    def block_size(self, path: str) -> int:
        info = self.mounts[os.path.normpath(path)]
        return self.device_size(info.source)
