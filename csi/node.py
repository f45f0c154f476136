"""CSI Node service: NVMe/TCP attach with this node's own host identity, format, mount.

The node plugin never touches ZFS. Everything it does to the host goes through two
adapters: NvmeHost (nvme-cli + sysfs) and Mounter (mount tools + statvfs).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any

import grpc

from csi import TOPOLOGY_ZONE_KEY, dhchap, volcaps
from csi.host_identity import HostIdentity
from csi.locks import KeyLocks
from csi.mounter import Mounter, check_mount_flags
from csi.nvme_host import ConnectSpec, NvmeHost, ours, wait_for_device
from zvolt.errors import ZvoltError, already_exists, invalid, not_found, out_of_range, precondition, unavailable
from zvolt.names import split_volume_id, subsystem_nqn, volume_host_id, volume_host_nqn
from zvolt.pb import csi_pb2, csi_pb2_grpc

NodeRPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (
    NodeRPC.STAGE_UNSTAGE_VOLUME,
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.EXPAND_VOLUME,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
)
_PUBLISH_KEYS = ("nqn", "transport", "address", "port")


def _path(value: str, what: str) -> str:
    if not value:
        raise invalid(f"{what} is required")
    if not value.startswith("/") or "\x00" in value or "\n" in value:
        raise invalid(f"{what} {value!r} must be an absolute path")
    return os.path.normpath(value)


def _path_of_volume(value: str, what: str, volume_id: str) -> str:
    """A path where the CO says the volume is (stats, expand). Only an absent field is invalid:
    a path the volume cannot be at (relative, or not there) means the volume does not exist at
    that path, which the spec answers with NOT_FOUND."""
    if not value:
        raise invalid(f"{what} is required")
    if "\x00" in value or "\n" in value:
        raise invalid(f"{what} {value!r} contains control characters")
    path = os.path.normpath(value)
    if not value.startswith("/") or not os.path.lexists(path):
        raise not_found(f"volume {volume_id} does not exist at {value!r} on this node")
    return path


def _nqn_of(volume_id: str) -> str:
    try:
        node, local = split_volume_id(volume_id)
    except ZvoltError:
        raise not_found(f"volume {volume_id!r} does not exist (not a zvolt volume id)") from None
    return subsystem_nqn(node, local)


class NodeService(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(
        self,
        identity: HostIdentity,
        nvme: NvmeHost,
        mounter: Mounter,
        zone: str,
        max_volumes: int = 0,
        ctrl_loss_tmo: int = 600,
        reconnect_delay: int = 10,
        device_timeout: float = 15.0,
        resize_timeout: float = 10.0,
    ) -> None:
        self.identity = identity
        self.nvme = nvme
        self.mounter = mounter
        self.zone = zone
        self.max_volumes = max_volumes
        self.ctrl_loss_tmo = ctrl_loss_tmo
        self.reconnect_delay = reconnect_delay
        self.device_timeout = device_timeout
        self.resize_timeout = resize_timeout
        self.locks = KeyLocks()

    # ------------------------------------------------------------ identity

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.identity.hostnqn,
            max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: self.zone}),
        )

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=NodeRPC(type=t)) for t in CAPABILITIES]
        )

    # ------------------------------------------------------------- attach

    def connect_spec(self, volume_id: str, ctx: Mapping[str, str], secrets: Mapping[str, str]) -> ConnectSpec:
        """How this node connects to a volume's export named by a publish_context (staging, or a
        live move's second path, csi/livepath.py): its own NQN, or the volume's one with keys."""
        missing = [k for k in _PUBLISH_KEYS if not ctx.get(k)]
        if missing:
            raise precondition(
                f"publish_context lacks {', '.join(missing)}: ControllerPublishVolume must succeed first"
            )
        expected = _nqn_of(volume_id)
        if ctx["nqn"] != expected:
            raise invalid(f"publish_context nqn {ctx['nqn']!r} does not belong to volume {volume_id}")
        hostnqn, hostid, keys = self.identity.hostnqn, self.identity.hostid, dhchap.Keys("")
        mode, tls = ctx.get(dhchap.CONTEXT_KEY, ""), ctx.get(dhchap.TLS_CONTEXT_KEY, "")
        if tls and tls != "psk":
            raise invalid(f"publish_context {dhchap.TLS_CONTEXT_KEY}={tls!r} is not a TLS mode this node knows (psk)")
        if mode or tls:
            # The export takes this node under its NQN for this volume, with the volume's keys;
            # kubelet hands them over from the Secret the StorageClass names for node staging.
            keys = dhchap.node_keys(secrets, volume_id, mode, bool(tls))
            local = split_volume_id(volume_id)[1]
            hostnqn = volume_host_nqn(self.identity.hostnqn, local)
            hostid = volume_host_id(self.identity.hostnqn, local)
        return ConnectSpec(
            nqn=expected,
            transport=ctx["transport"],
            address=ctx["address"],
            port=ctx["port"],
            hostnqn=hostnqn,
            hostid=hostid,
            ctrl_loss_tmo=self.ctrl_loss_tmo,
            reconnect_delay=self.reconnect_delay,
            dhchap_secret=keys.key,
            dhchap_ctrl_secret=keys.ctrl_key,
            tls_psk=keys.tls_psk,
        ).validate()

    def _attach(self, spec: ConnectSpec) -> str:
        if not ours(self.nvme.controllers(spec.nqn), spec.hostnqn):
            self.nvme.connect(spec)
        device = wait_for_device(self.nvme, spec.nqn, self.device_timeout)
        if device is None:
            raise unavailable(
                f"connected to {spec.nqn} but its namespace did not appear within {self.device_timeout:.0f}s; retry"
            )
        return device

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        staging = _path(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = request.volume_capability
        volcaps.require([cap], "volume_capability")
        spec = self.connect_spec(request.volume_id, dict(request.publish_context), request.secrets)
        with self.locks.hold(request.volume_id):
            device = self._attach(spec)
            if cap.HasField("block"):
                return csi_pb2.NodeStageVolumeResponse()  # raw block: published straight from the device
            fstype = volcaps.fs_type(cap)
            mounted = self.mounter.mount_info(staging)
            if mounted is not None:
                if os.path.realpath(mounted.source) != os.path.realpath(device):
                    raise already_exists(f"{staging} already has {mounted.source} mounted, not this volume's {device}")
                return csi_pb2.NodeStageVolumeResponse()
            shared_ro = cap.access_mode.mode == volcaps.Mode.MULTI_NODE_READER_ONLY
            found = self.mounter.fs_type(device)
            if found is None:
                if shared_ro:
                    # mkfs on every node that stages it at once would write over each other.
                    raise precondition(f"{device} holds no filesystem and is staged MULTI_NODE_READER_ONLY: "
                                       "there is nothing to read; make the volume from a snapshot or volume "
                                       "that has one (or use it read-write once)")
                self.mounter.mkfs(device, fstype)
            elif found != fstype:
                raise precondition(
                    f"{device} already holds {found}, not the requested {fstype}; zvolt never reformats a volume"
                )
            options = check_mount_flags(cap.mount.mount_flags)
            if fstype == "xfs" and "nouuid" not in options:
                options.append("nouuid")  # clones share their origin's XFS uuid
            if shared_ro:
                # Several nodes mount it at once: not a single write, not even a journal replay
                # (which a plain `ro` mount of ext4 or xfs still does).
                options += ["ro", "noload" if fstype == "ext4" else "norecovery"]
            os.makedirs(staging, mode=0o750, exist_ok=True)
            self.mounter.mount(device, staging, fstype, options)
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        staging = _path(request.staging_target_path, "staging_target_path")
        with self.locks.hold(request.volume_id):
            if self.mounter.mount_info(staging) is not None:
                self.mounter.unmount(staging)
            try:
                nqn = _nqn_of(request.volume_id)
            except ZvoltError:
                return csi_pb2.NodeUnstageVolumeResponse()
            # Only controllers this node's identity opened: never another host's session.
            for ctrl in ours(self.nvme.controllers(nqn), self.identity.hostnqn):
                self.nvme.disconnect(ctrl.name)
            # A TLS volume's PSK was filed under the per-volume NQN (a no-op for other volumes; a
            # host NQN too long for a per-volume form never had one).
            with contextlib.suppress(ZvoltError):
                per_volume = volume_host_nqn(self.identity.hostnqn, split_volume_id(request.volume_id)[1])
                self.nvme.forget_psks(per_volume, nqn)
        return csi_pb2.NodeUnstageVolumeResponse()

    # ------------------------------------------------------------ publish

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        target = _path(request.target_path, "target_path")
        staging = _path(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = request.volume_capability
        volcaps.require([cap], "volume_capability")
        nqn = _nqn_of(request.volume_id)
        readonly = request.readonly or cap.access_mode.mode in volcaps.READ_ONLY
        with self.locks.hold(request.volume_id):
            mounted = self.mounter.mount_info(target)
            if mounted is not None:
                if readonly != ("ro" in mounted.options):
                    raise already_exists(f"{target} is already published with readonly={not readonly}")
                return csi_pb2.NodePublishVolumeResponse()
            if cap.HasField("block"):
                device = self.nvme.namespace_device(nqn)
                if device is None:
                    raise precondition(f"volume {request.volume_id} is not staged on this node (no NVMe device)")
                os.makedirs(os.path.dirname(target), mode=0o750, exist_ok=True)
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
                self.mounter.bind(device, target, readonly)
            else:
                if self.mounter.mount_info(staging) is None:
                    raise precondition(f"volume {request.volume_id} is not staged at {staging}")
                os.makedirs(target, mode=0o750, exist_ok=True)
                self.mounter.bind(staging, target, readonly)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        target = _path(request.target_path, "target_path")
        with self.locks.hold(request.volume_id):
            if self.mounter.mount_info(target) is not None:
                self.mounter.unmount(target)
            if os.path.isdir(target):
                os.rmdir(target)
            elif os.path.lexists(target):
                os.unlink(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -------------------------------------------------------- stats, grow

    def _condition(self, nqn: str) -> csi_pb2.VolumeCondition:
        ctrls = ours(self.nvme.controllers(nqn), self.identity.hostnqn)
        if not ctrls:
            return csi_pb2.VolumeCondition(abnormal=True, message=f"no NVMe controller for {nqn}: volume not attached")
        live = [c for c in ctrls if c.state == "live"]
        if live:
            return csi_pb2.VolumeCondition(abnormal=False, message=f"NVMe/TCP controller {live[0].name} is live")
        ctrl = ctrls[0]
        return csi_pb2.VolumeCondition(
            abnormal=True,
            message=(
                f"NVMe/TCP controller {ctrl.name} is {ctrl.state}: the path to the storage node is down; "
                f"I/O waits for reconnection (gives up after ctrl_loss_tmo={self.ctrl_loss_tmo}s)"
            ),
        )

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.volume_path:
            raise invalid("volume_path is required")
        nqn = _nqn_of(request.volume_id)
        path = _path_of_volume(request.volume_path, "volume_path", request.volume_id)
        if self.mounter.mount_info(path) is None:
            raise not_found(f"volume {request.volume_id} is not published at {path}")
        usage: list[csi_pb2.VolumeUsage] = []
        if self.mounter.is_block_device(path):
            usage.append(csi_pb2.VolumeUsage(total=self.mounter.block_size(path), unit=csi_pb2.VolumeUsage.BYTES))
        else:
            st = self.mounter.stats(path)
            usage.append(
                csi_pb2.VolumeUsage(
                    available=st.available_bytes,
                    total=st.total_bytes,
                    used=st.used_bytes,
                    unit=csi_pb2.VolumeUsage.BYTES,
                )
            )
            usage.append(
                csi_pb2.VolumeUsage(
                    available=st.free_inodes,
                    total=st.total_inodes,
                    used=st.used_inodes,
                    unit=csi_pb2.VolumeUsage.INODES,
                )
            )
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=self._condition(nqn))

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.volume_path:
            raise invalid("volume_path is required")
        required = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
        limit = request.capacity_range.limit_bytes if request.HasField("capacity_range") else 0
        if required < 0 or limit < 0:
            raise invalid("capacity_range values must not be negative")
        if request.HasField("volume_capability"):
            volcaps.check_structure(request.volume_capability)
        nqn = _nqn_of(request.volume_id)
        path = _path_of_volume(request.volume_path, "volume_path", request.volume_id)
        with self.locks.hold(request.volume_id):
            device = self.nvme.namespace_device(nqn)
            if device is None:
                raise not_found(f"volume {request.volume_id} is not attached on this node")
            for ctrl in ours(self.nvme.controllers(nqn), self.identity.hostnqn):
                if ctrl.state == "live":
                    self.nvme.rescan(ctrl.name)
            deadline = time.monotonic() + self.resize_timeout
            size = self.nvme.device_size(device)
            while required and size < required and time.monotonic() < deadline:
                time.sleep(0.1)
                size = self.nvme.device_size(device)
            if required and size < required:
                raise out_of_range(f"{device} is {size} bytes after rescan, less than the required {required}")
            block = (request.HasField("volume_capability") and request.volume_capability.HasField("block")) or (
                self.mounter.is_block_device(path)
            )
            if not block:
                fstype = self.mounter.fs_type(device)
                if fstype not in ("ext4", "xfs"):
                    raise precondition(f"{device} holds {fstype or 'no filesystem'}; cannot grow it")
                self.mounter.grow(device, path, fstype)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)
