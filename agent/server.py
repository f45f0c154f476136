"""The gRPC servicer: request -> validated call into Volumes -> response message.

Every call but GetInfo answers UNAVAILABLE until start-up recovery is done, so a client never
sees a half-restored node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from agent.authz import Authorizer
from agent.dhchap import HostSecrets, host_secrets
from agent.group_snapshots import Group, GroupSnapshots
from agent.index import SnapshotRec, VolumeRec
from agent.metrics import Metrics
from agent.moves import SOURCE, TARGET, Moves
from agent.recovery import Readiness
from agent.usage import Usage, VolumeUsage
from agent.volumes import Volumes, VolumeSpec
from zvolt import names
from zvolt.errors import invalid, precondition, unavailable
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc
from zvolt.rpc import InFlight, RpcInterceptor

MAX_CHECKS = 1000  # volumes per CheckMoves: one `zfs get` of them stays well inside a call's deadline

VERSION = "0.1.0"
_PLACEMENTS = {"held": pb.PLACEMENT_HELD, "moving": pb.PLACEMENT_MOVING, "moved": pb.PLACEMENT_MOVED,
               "incoming": pb.PLACEMENT_INCOMING}


def volume_pb(vol: VolumeRec, nqn: str, home_of: Callable[[str], str]) -> Any:
    """`home_of(vid)`: the node a volume id names (Volumes.home_of); the controller builds CSI ids from it."""
    source = vol.source_snapshot.partition("@")[0] or vol.source_volume
    return pb.Volume(
        id=vol.id, name=vol.name, size_bytes=vol.size, volblocksize=vol.volblocksize, compression=vol.compression,
        thick=vol.thick, encrypted=False, source_snapshot_id=vol.source_snapshot, source_volume_id=vol.source_volume,
        # The nodes' own NQNs: an authenticated volume's per-volume ones are the agent's business.
        published_hosts=[names.node_host_nqn(h, vol.id) for h in vol.hosts], nqn=nqn, created_unix=vol.created,
        home_node=home_of(vol.id),
        source_home_node=home_of(source) if source else "",
    )


def usage_pb(u: VolumeUsage) -> Any:
    return pb.VolumeUsage(volume_id=u.volume_id, name=u.name, pvc_namespace=u.namespace, pvc_name=u.pvc,
                          logical_bytes=u.logical, referenced_bytes=u.referenced, unique_bytes=u.unique,
                          written_bytes=u.written, compress_ratio=u.compress_ratio)


def snapshot_pb(snap: SnapshotRec, home_of: Callable[[str], str], used: int = 0) -> Any:
    return pb.Snapshot(id=snap.id, name=snap.name, source_volume_id=snap.volume_id, size_bytes=snap.size,
                       created_unix=snap.created, ready_to_use=True, used_bytes=used,
                       home_node=home_of(snap.volume_id))


def group_pb(group: Group, home_of: Callable[[str], str]) -> Any:
    return pb.SnapshotGroup(id=group.id, name=group.name,
                            snapshots=[snapshot_pb(m, home_of) for m in group.members], created_unix=group.created)


class AgentServicer(pb_grpc.AgentServicer):  # type: ignore[misc]
    def __init__(self, volumes: Volumes, readiness: Readiness, metrics: Metrics, usage: Usage | None = None,
                 moves: Moves | None = None) -> None:
        self.v = volumes
        self._moves = moves
        self.usage = usage or Usage(volumes)
        self.groups = GroupSnapshots(volumes)
        self.readiness = readiness
        self.metrics = metrics
        self._counts: tuple[int, int, int] | None = None

    def _ready(self) -> None:
        if not self.readiness.ready:
            raise unavailable(f"agent is not ready yet: {self.readiness.reason}")

    def _nqn(self, vid: str) -> str:
        return self.v.exports.nqn(vid)

    def refresh_gauges(self) -> tuple[int, int, int]:
        volumes, snapshots, exports = self.v.index.counts()
        self.metrics.set_counts(volumes, snapshots, exports, self.v.trash_count())
        self._counts = (volumes, snapshots, exports)
        return volumes, snapshots, exports

    def cached_counts(self) -> tuple[int, int, int]:
        """Counts as of the last periodic refresh: counting is O(pool), and every controller
        Probe calls GetInfo on every agent, so GetInfo must not count."""
        return self._counts if self._counts is not None else self.refresh_gauges()

    def refresh_metrics(self) -> None:
        """Gauges that nothing else updates (counts, pool space): called periodically."""
        self.refresh_gauges()
        self.v.refresh_space()
        cap = self.v.capacity()
        self.metrics.set_space(cap.available, cap.used)
        self.metrics.set_commitment(cap.committed, cap.total, cap.commitment_ratio)

    def GetInfo(self, request: Any, context: Any) -> Any:
        volumes, snapshots, exports = self.cached_counts() if self.readiness.ready else (0, 0, 0)
        cfg = self.v.cfg
        return pb.GetInfoResponse(
            node_name=cfg.node, ready=self.readiness.ready, version=VERSION, pool=cfg.pool,
            parent_dataset=cfg.parent, nvme_transport="tcp", nvme_address=cfg.nvme_address,
            nvme_port=cfg.nvme_port, volumes=volumes, snapshots=snapshots, exports=exports,
            startup_seconds=self.readiness.startup_seconds,
            not_ready_reason="" if self.readiness.ready else self.readiness.reason,
        )

    def CreateVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        spec = VolumeSpec(
            name=request.name, size=request.size_bytes, volblocksize=request.volblocksize,
            compression=request.compression, thick=request.thick, source_snapshot=request.source_snapshot_id,
            source_volume=request.source_volume_id, encryption_key=request.encryption_key,
            labels=dict(request.labels),
        )
        vol = self.v.create_volume(spec)
        return pb.CreateVolumeResponse(volume=volume_pb(vol, self._nqn(vol.id), self.v.home_of))

    def DeleteVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        self.v.delete_volume(request.volume_id)
        return pb.DeleteVolumeResponse()

    def ExpandVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        vol = self.v.expand_volume(request.volume_id, request.size_bytes, key=request.encryption_key)
        return pb.ExpandVolumeResponse(volume=volume_pb(vol, self._nqn(vol.id), self.v.home_of))

    def ModifyVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        vol = self.v.modify_volume(request.volume_id, compression=request.compression)
        return pb.ModifyVolumeResponse(volume=volume_pb(vol, self._nqn(vol.id), self.v.home_of))

    def GetVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        if self._moves is None:
            return pb.GetVolumeResponse(volume=self._volume_msg(request.volume_id), placement=pb.PLACEMENT_HELD,
                                        home_node=self.v.cfg.node)
        place = self._moves.placement(request.volume_id)
        if place.state in ("moved", "incoming"):
            return pb.GetVolumeResponse(
                volume=pb.Volume(id=request.volume_id), placement=_PLACEMENTS[place.state], home_node=place.home,
                moved_to=place.peer if place.state == "moved" else "",
                move_from=place.peer if place.state == "incoming" else "",
                move_snapshot=place.snapshot, move_final=place.final)
        return pb.GetVolumeResponse(volume=self._volume_msg(request.volume_id), placement=_PLACEMENTS[place.state],
                                    home_node=place.home, moving_to=place.peer)

    def _volume_msg(self, vid: str) -> Any:
        st = self.v.get_volume(vid)
        msg = volume_pb(st.volume, self._nqn(st.volume.id), self.v.home_of)
        msg.used_bytes = st.used_bytes
        msg.encrypted = st.encrypted
        msg.condition = pb.VOLUME_CONDITION_HEALTHY if st.healthy else pb.VOLUME_CONDITION_ABNORMAL
        msg.condition_message = st.message
        return msg

    # -- moves (agent/moves.py) -----------------------------------------------------------

    def _mover(self) -> Moves:
        self._ready()
        if self._moves is None:
            raise precondition(f"storage node {self.v.cfg.node} has no move port: volumes cannot move to or from it")
        return self._moves

    def SendMove(self, request: Any, context: Any) -> Any:
        plan = self._mover().send(request.volume_id, request.target_node, request.base_snapshot, request.final,
                                  live=request.live)
        return pb.SendMoveResponse(token=plan.token, address=plan.address, snapshot=plan.snapshot,
                                   base_snapshot=plan.base, home_node=plan.home, cntlid_min=plan.cntlid[0],
                                   cntlid_max=plan.cntlid[1])

    def CheckMoves(self, request: Any, context: Any) -> Any:
        if len(request.volume_ids) > MAX_CHECKS:
            raise invalid(f"CheckMoves takes at most {MAX_CHECKS} volumes at once, got {len(request.volume_ids)}")
        checks = self._mover().check(list(request.volume_ids))
        return pb.CheckMovesResponse(checks=[pb.MoveCheck(volume_id=c.volume_id, moving_to=c.moving_to,
                                                          blocked=c.blocked, missing=c.missing) for c in checks])

    def PrepareMove(self, request: Any, context: Any) -> Any:
        hosts = [(pub.host_nqn, _publish_keys(pub)) for pub in request.hosts]
        paths = self._mover().prepare(request.volume_id, request.source_node, hosts,
                                      request.source_cntlid_min or 1)
        return pb.PrepareMoveResponse(paths=[self._path(p.nqn, p.host_nqn, p.tls) for p in paths])

    def _path(self, nqn: str, host_nqn: str, tls: bool) -> Any:
        """Where a host connects to one of this node's exports (PublishVolume's answer)."""
        cfg = self.v.cfg
        return pb.PublishVolumeResponse(nqn=nqn, transport="tcp", address=cfg.nvme_address,
                                        port=self.v.exports.cfg.tls_port if tls else cfg.nvme_port, host_nqn=host_nqn)

    def ReceiveMove(self, request: Any, context: Any) -> Any:
        start = time.monotonic()
        moved = self._mover().receive(request.volume_id, request.home_node, request.source_node, request.address,
                                      request.token, request.snapshot, request.base_snapshot,
                                      rate=request.max_bytes_per_second)
        return pb.ReceiveMoveResponse(bytes=moved, seconds=time.monotonic() - start)

    def CommitMove(self, request: Any, context: Any) -> Any:
        vol = self._mover().commit(request.volume_id, request.source_node)
        return pb.CommitMoveResponse(volume=volume_pb(vol, self._nqn(vol.id), self.v.home_of))

    def FinishMove(self, request: Any, context: Any) -> Any:
        self._mover().finish(request.volume_id, request.target_node)
        return pb.FinishMoveResponse()

    def AbortMove(self, request: Any, context: Any) -> Any:
        role = {pb.MOVE_ROLE_SOURCE: SOURCE, pb.MOVE_ROLE_TARGET: TARGET}.get(request.role, "")
        self._mover().abort(request.volume_id, role)
        return pb.AbortMoveResponse()

    def ListVolumes(self, request: Any, context: Any) -> Any:
        self._ready()
        rows, token = self.v.list_volumes(request.max_entries, request.starting_token, request.published_only)
        return pb.ListVolumesResponse(volumes=[volume_pb(r, self._nqn(r.id), self.v.home_of) for r in rows],
                                      next_token=token)

    def CreateSnapshot(self, request: Any, context: Any) -> Any:
        self._ready()
        snap = self.v.create_snapshot(request.name, request.source_volume_id, dict(request.labels))
        return pb.CreateSnapshotResponse(snapshot=snapshot_pb(snap, self.v.home_of))

    def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        self._ready()
        self.v.delete_snapshot(request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    def ListSnapshots(self, request: Any, context: Any) -> Any:
        self._ready()
        rows, token = self.v.list_snapshots(request.max_entries, request.starting_token,
                                            request.source_volume_id, request.snapshot_id)
        return pb.ListSnapshotsResponse(snapshots=[snapshot_pb(r, self.v.home_of) for r in rows], next_token=token)

    def CreateSnapshotGroup(self, request: Any, context: Any) -> Any:
        self._ready()
        group = self.groups.create(request.name, list(request.source_volume_ids), dict(request.labels))
        return pb.CreateSnapshotGroupResponse(group=group_pb(group, self.v.home_of))

    def GetSnapshotGroup(self, request: Any, context: Any) -> Any:
        self._ready()
        return pb.GetSnapshotGroupResponse(group=group_pb(self.groups.get(request.group_id), self.v.home_of))

    def DeleteSnapshotGroup(self, request: Any, context: Any) -> Any:
        self._ready()
        self.groups.delete(request.group_id, list(request.snapshot_ids))
        return pb.DeleteSnapshotGroupResponse()

    def GetCapacity(self, request: Any, context: Any) -> Any:
        self._ready()
        cap = self.v.capacity()
        cordon = self.v.cordon.state()
        self.metrics.set_space(cap.available, cap.used)
        self.metrics.set_commitment(cap.committed, cap.total, cap.commitment_ratio)
        return pb.GetCapacityResponse(available_bytes=cap.available, total_bytes=cap.total, used_bytes=cap.used,
                                      maximum_volume_size=cap.maximum_volume_size, committed_bytes=cap.committed,
                                      commitment_limit_ratio=cap.commitment_ratio,
                                      commitment_available_bytes=cap.commitment_available, reserve_bytes=cap.reserve,
                                      cordoned=cordon.cordoned, cordon_reason=cordon.reason)

    def SetCordon(self, request: Any, context: Any) -> Any:
        self._ready()
        st = self.v.cordon.set(request.cordoned, request.reason)
        return pb.SetCordonResponse(cordoned=st.cordoned, reason=st.reason)

    def GetUsage(self, request: Any, context: Any) -> Any:
        self._ready()
        missing: list[str] = []
        token = ""
        if request.volume_ids:
            rows, missing = self.usage.of(list(request.volume_ids))
        else:
            rows, token = self.usage.page(request.max_entries, request.starting_token)
        pool = self.usage.pool()
        return pb.GetUsageResponse(
            volumes=[usage_pb(u) for u in rows], next_token=token, not_found_ids=missing,
            pool=pb.PoolUsage(total_bytes=pool.total, used_bytes=pool.used, available_bytes=pool.available,
                              fragmentation_percent=-1 if pool.fragmentation is None else pool.fragmentation),
        )

    def PublishVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        keys = _publish_keys(request)
        nqn = self.v.publish(request.volume_id, request.host_nqn, key=request.encryption_key, auth=keys)
        host = names.volume_host_nqn(request.host_nqn, request.volume_id) if keys is not None else request.host_nqn
        return self._path(nqn, host, bool(request.tls_psk))

    def UnpublishVolume(self, request: Any, context: Any) -> Any:
        self._ready()
        self.v.unpublish(request.volume_id, request.host_nqn)
        return pb.UnpublishVolumeResponse()

    def RotateKey(self, request: Any, context: Any) -> Any:
        self._ready()
        root = self.v.rotate_key(request.volume_id, request.old_key, request.new_key)
        return pb.RotateKeyResponse(encryption_root=root)


def _publish_keys(request: Any) -> HostSecrets | None:
    """The DH-HMAC-CHAP keys and TLS PSK a PublishVolumeRequest carries for its host, if any."""
    if request.dhchap_ctrl_key and not request.dhchap_key:
        raise invalid("dhchap_ctrl_key needs a dhchap_key")
    if not (request.dhchap_key or request.tls_psk):
        return None
    return host_secrets(request.host_nqn, request.dhchap_key, request.dhchap_ctrl_key, request.tls_psk)


def make_server(servicer: AgentServicer, metrics: Metrics, workers: int = 16,
                inflight: InFlight | None = None, authz: Authorizer | None = None) -> grpc.Server:
    # The logging interceptor is outermost, so a refused caller is logged like any other call.
    interceptors: list[grpc.ServerInterceptor] = [RpcInterceptor("agent", on_done=metrics.observe, inflight=inflight)]
    if authz is not None:
        interceptors.append(authz)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         interceptors=interceptors)
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    return server
