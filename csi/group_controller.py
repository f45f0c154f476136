"""CSI GroupController: crash-consistent snapshots of several volumes of one storage node.

The agent of that node takes every member in one ZFS call (agent/group_snapshots.py). Volumes on
different storage nodes are refused: no placement keeps a group's volumes together yet, and
snapshots on two nodes would not be one instant (csi/README.md, "Group snapshots").
Ids: group_snapshot_id "<storage-node>/<group id>"; member i is the ordinary snapshot
"<storage-node>/<volume i>@<group id>". The node is the volumes' home: a member whose volume moved
since is found where it is now (csi/locator.py), one call per such member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from csi.agents import AgentClient, AgentPool, fan_out
from csi.controller import LOOKUP_TIMEOUT, ControllerService
from csi.locator import Locator
from csi.locks import KeyLocks
from zvolt.errors import ZvoltError, invalid, not_found, precondition
from zvolt.names import (
    check_csi_name,
    group_snapshot_id,
    split_group_snapshot_id,
    split_snapshot_id,
    split_volume_id,
)
from zvolt.pb import agent_pb2, csi_pb2, csi_pb2_grpc

RPC = csi_pb2.GroupControllerServiceCapability.RPC
# What external-snapshotter --extra-create-metadata adds to a VolumeGroupSnapshotClass's
# parameters; kept as labels (ZFS user properties `zvolt:label:*`) on every member.
GROUP_METADATA = {
    "csi.storage.k8s.io/volumegroupsnapshot/name": "groupsnapshot-name",
    "csi.storage.k8s.io/volumegroupsnapshot/namespace": "groupsnapshot-namespace",
    "csi.storage.k8s.io/volumegroupsnapshotcontent/name": "groupsnapshotcontent-name",
}


def parse_group_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
    """VolumeGroupSnapshotClass parameters: zvolt takes none of its own."""
    labels: dict[str, str] = {}
    for key, value in parameters.items():
        if key not in GROUP_METADATA:
            raise invalid(f"unknown VolumeGroupSnapshotClass parameter {key!r}: zvolt group snapshots take no "
                          f"parameters (only the sidecar's {', '.join(GROUP_METADATA)})")
        labels[GROUP_METADATA[key]] = value
    return labels


def one_node(volume_ids: Sequence[str]) -> tuple[str, list[str]]:
    """(storage node, local volume ids) of a group's volumes; FAILED_PRECONDITION naming the nodes
    when they are on more than one."""
    by_node: dict[str, list[str]] = {}
    for vid in volume_ids:
        try:
            node, local = split_volume_id(vid)
        except ZvoltError:
            raise not_found(f"source volume {vid!r} does not exist") from None
        by_node.setdefault(node, []).append(local)
    if len(by_node) > 1:
        where = "; ".join(f"{node}: {', '.join(f'{node}/{v}' for v in vids)}" for node, vids in sorted(by_node.items()))
        raise precondition(f"the volumes of a group snapshot must be on one storage node; these are on "
                           f"{len(by_node)} ({where}). Snapshot them separately, or keep the group's volumes on "
                           "one node")
    return next(iter(by_node.items()))


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):  # type: ignore[misc]
    def __init__(self, pool: AgentPool, locks: KeyLocks | None = None, locator: Locator | None = None) -> None:
        self.pool = pool
        self.locks = locks or KeyLocks()
        self.locator = locator or Locator(pool, fan_out, LOOKUP_TIMEOUT)

    @staticmethod
    def _group(home: str, gid: str, created: int,
               found: Sequence[tuple[AgentClient, agent_pb2.Snapshot]]) -> csi_pb2.VolumeGroupSnapshot:
        gsid = group_snapshot_id(home, gid)
        members = []
        for agent, snap in found:
            member = ControllerService._snapshot(agent, snap)
            member.group_snapshot_id = gsid
            members.append(member)
        return csi_pb2.VolumeGroupSnapshot(
            group_snapshot_id=gsid, snapshots=members, creation_time=timestamp_pb2.Timestamp(seconds=created),
            ready_to_use=all(s.ready_to_use for _, s in found),
        )

    def _holder(self, home: str, local: Sequence[str]) -> AgentClient | None:
        """Where the group is, as far as known without a call: the holder of its first listed
        member's volume (moved members are looked up one by one after). None: nobody known."""
        if not local:
            return self.pool.get(home)  # UNAVAILABLE for a node not discovered yet
        try:
            agent: AgentClient = self.locator.holder(home, local[0].partition("@")[0])
        except ZvoltError:
            return None
        return agent

    def _moved_members(self, home: str, local: Sequence[str]) -> list[tuple[AgentClient, agent_pb2.Snapshot]]:
        """Members the home's group does not hold: each asked of its volume's holder now."""
        out = []
        for sid in local:
            try:
                agent, resp = self.locator.call(home, sid.partition("@")[0], "ListSnapshots",
                                                agent_pb2.ListSnapshotsRequest(snapshot_id=sid))
            except ZvoltError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise
                continue
            out += [(agent, snap) for snap in resp.snapshots]
        return out

    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> Any:
        cap = csi_pb2.GroupControllerServiceCapability(
            rpc=RPC(type=RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=[cap])

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> Any:
        name = check_csi_name(request.name, "name")
        if not request.source_volume_ids:
            raise invalid("source_volume_ids is required")
        labels = parse_group_parameters(request.parameters)
        node, local = one_node(request.source_volume_ids)
        with self.locks.hold(f"group:{name}"):
            # Where the first volume is now; a member held elsewhere is refused there by name.
            # A node not discovered yet: UNAVAILABLE (retried), not NOT_FOUND.
            agent, resp = self.locator.call(node, local[0], "CreateSnapshotGroup", agent_pb2.CreateSnapshotGroupRequest(
                name=name, source_volume_ids=local, labels=labels))
        group = resp.group
        return csi_pb2.CreateVolumeGroupSnapshotResponse(
            group_snapshot=self._group(node, group.id, group.created_unix, [(agent, s) for s in group.snapshots]))

    @staticmethod
    def _members(node: str, gid: str, snapshot_ids: Sequence[str], gsid: str) -> list[str]:
        """Local ids of the listed snapshots; INVALID_ARGUMENT for one that is not of this group."""
        local = []
        for sid in snapshot_ids:
            try:
                snode, vid, snap = split_snapshot_id(sid)
            except ZvoltError:
                snode, vid, snap = "", "", ""
            if (snode, snap) != (node, gid):
                raise invalid(f"snapshot {sid!r} is not a member of group snapshot {gsid!r}")
            local.append(f"{vid}@{snap}")
        return local

    @staticmethod
    def _group_id(gsid: str) -> tuple[str, str] | None:
        """(storage node, group id); None for an id zvolt never made (so no such group exists)."""
        if not gsid:
            raise invalid("group_snapshot_id is required")
        try:
            return split_group_snapshot_id(gsid)
        except ZvoltError:
            return None

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> Any:
        gsid = request.group_snapshot_id
        ids = self._group_id(gsid)
        if ids is None:
            raise not_found(f"group snapshot {gsid!r} does not exist")
        node, gid = ids
        local = self._members(node, gid, request.snapshot_ids, gsid)
        found: list[tuple[AgentClient, agent_pb2.Snapshot]] = []
        created = 0
        agent = self._holder(node, local)
        if agent is not None:
            try:
                group = agent.call("GetSnapshotGroup", agent_pb2.GetSnapshotGroupRequest(group_id=gid)).group
                found, created = [(agent, s) for s in group.snapshots], group.created_unix
            except ZvoltError as err:
                if err.code != grpc.StatusCode.NOT_FOUND or not local:
                    raise
        have = {s.id for _, s in found}
        moved = self._moved_members(node, [sid for sid in local if sid not in have])
        if not found and not moved:
            raise not_found(f"group snapshot {gsid!r} does not exist")
        created = min([s.created_unix for _, s in moved] + ([created] if found else []))
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self._group(node, gid, created, found + moved))

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> Any:
        gsid = request.group_snapshot_id
        ids = self._group_id(gsid)
        if ids is None:
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()  # never ours: nothing to delete
        node, gid = ids
        local = self._members(node, gid, request.snapshot_ids, gsid)
        agent = self._holder(node, local)
        with self.locks.hold(f"groupid:{gsid}"):
            if agent is not None:
                try:
                    agent.call("DeleteSnapshotGroup",
                               agent_pb2.DeleteSnapshotGroupRequest(group_id=gid, snapshot_ids=local))
                except ZvoltError as err:
                    if err.code != grpc.StatusCode.NOT_FOUND:
                        raise
            # A member whose volume moved went with it: its holder deletes it (the home answers
            # Moved for it, OK for one its group delete took).
            for sid in local:
                try:
                    self.locator.call(node, sid.partition("@")[0], "DeleteSnapshot",
                                      agent_pb2.DeleteSnapshotRequest(snapshot_id=sid))
                except ZvoltError as err:
                    if err.code != grpc.StatusCode.NOT_FOUND:
                        raise
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()
