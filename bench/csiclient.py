"""Thin CSI gRPC client for the bench: the calls the suites time, with sensible request defaults."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from zvolt.pb import csi_pb2, csi_pb2_grpc
from zvolt.rpc import RECONNECT_OPTIONS

T = TypeVar("T")
GiB = 1 << 30


def mount_capability(fstype: str = "ext4") -> Any:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fstype),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class Csi:
    def __init__(self, controller: str | None = None, node: str | None = None, timeout: float = 300) -> None:
        self.timeout = timeout
        self._channels: list[grpc.Channel] = []
        self.controller: Any = None
        self.node: Any = None
        self.identity: Any = None
        if controller:
            ch = grpc.insecure_channel(controller, options=RECONNECT_OPTIONS)
            self._channels.append(ch)
            self.controller = csi_pb2_grpc.ControllerStub(ch)
            self.identity = csi_pb2_grpc.IdentityStub(ch)
        if node:
            ch = grpc.insecure_channel(node, options=RECONNECT_OPTIONS)
            self._channels.append(ch)
            self.node = csi_pb2_grpc.NodeStub(ch)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def probe(self) -> Any:
        return self.identity.Probe(csi_pb2.ProbeRequest(), timeout=self.timeout)

    def create_volume(self, name: str, size: int = GiB, *, snapshot_id: str = "", volume_id: str = "") -> Any:
        src = None
        if snapshot_id:
            snap = csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
            src = csi_pb2.VolumeContentSource(snapshot=snap)
        elif volume_id:
            src = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_capability()],
            volume_content_source=src,
        )
        return self.controller.CreateVolume(req, timeout=self.timeout).volume

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=self.timeout)

    def create_snapshot(self, name: str, volume_id: str) -> Any:
        req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
        return self.controller.CreateSnapshot(req, timeout=self.timeout).snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=self.timeout)

    def list_volumes(self, max_entries: int, token: str = "") -> Any:
        req = csi_pb2.ListVolumesRequest(max_entries=max_entries, starting_token=token)
        return self.controller.ListVolumes(req, timeout=self.timeout)

    def wait_agents(self, timeout: float = 60.0) -> float:
        """Seconds until a controller call that reaches the agents succeeds again (after an agent restart)."""
        t0 = time.perf_counter()
        while True:
            try:
                self.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=1), timeout=10)
                return time.perf_counter() - t0
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.perf_counter() - t0 > timeout:
                    raise
            time.sleep(0.1)

    def publish(self, volume_id: str, node_id: str) -> dict[str, str]:
        req = csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=mount_capability(), readonly=False
        )
        return dict(self.controller.ControllerPublishVolume(req, timeout=self.timeout).publish_context)

    def unpublish(self, volume_id: str, node_id: str) -> None:
        req = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id)
        self.controller.ControllerUnpublishVolume(req, timeout=self.timeout)

    def node_id(self) -> str:
        """The node plugin's own id (zvolt uses the node's host NQN), what ControllerPublish needs."""
        return str(self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=self.timeout).node_id)

    def stage(self, volume_id: str, context: dict[str, str], path: str) -> None:
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=context, staging_target_path=path, volume_capability=mount_capability()
        )
        self.node.NodeStageVolume(req, timeout=self.timeout)

    def unstage(self, volume_id: str, path: str) -> None:
        req = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=path)
        self.node.NodeUnstageVolume(req, timeout=self.timeout)
