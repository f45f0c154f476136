"""Group snapshots: several volumes of this node snapshotted in one ZFS call.

One lzc_snapshot of many snapshot names is one ZFS transaction group: every member shows its
volume at the same instant, which is what makes a data volume and a WAL volume a consistent pair.
Each member is an ordinary snapshot "<volume id>@<group id>" (restorable, branchable and deletable
alone); the group is only a user property on each member (`zvolt:group`) and the index rows it
makes (snapshot_groups), so finding a group costs its members, never a walk of all snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.index import SnapshotRec
from agent.volumes import Volumes, _check_labels, _zfs_error, snapshot_charge
from agent.zfs import ZfsError, get_props_many
from zvolt import names
from zvolt.errors import already_exists, invalid, not_found


@dataclass(frozen=True)
class Group:
    id: str  # local group id, also the ZFS snapshot name of every member
    name: str  # CSI name
    members: list[SnapshotRec]
    created: int


def group_id_for(name: str) -> str:
    return names.id_for_name(name, prefix=names.GROUP_PREFIX)


class GroupSnapshots:
    def __init__(self, volumes: Volumes) -> None:
        self.v = volumes
        self.index = volumes.index
        self.zfs = volumes.zfs

    def _same(self, found: list[SnapshotRec], name: str, gid: str, vids: Sequence[str]) -> Group:
        if any(m.name != name for m in found):
            raise already_exists(f"group snapshot id {gid} is taken by another name")
        have = sorted(m.volume_id for m in found)
        if have != sorted(vids):
            raise already_exists(f"group snapshot {name!r} exists with volumes {', '.join(have)}, "
                                 f"not {', '.join(sorted(vids))}")
        return Group(gid, name, found, min(m.created for m in found))

    def create(self, name: str, volume_ids: Sequence[str], labels: Mapping[str, str] | None = None) -> Group:
        """Idempotent by name: the same name and volumes give the same group; the same name with
        other volumes is ALREADY_EXISTS."""
        names.check_csi_name(name)
        user_labels = _check_labels(labels or {})
        if not volume_ids:
            raise invalid("a group snapshot needs at least one source volume")
        vids = [names.check_id(v, "source volume id") for v in volume_ids]
        if len(set(vids)) != len(vids):
            raise invalid(f"source volumes of group snapshot {name!r} repeat: {', '.join(vids)}")
        gid = group_id_for(name)
        sids = [f"{vid}@{gid}" for vid in vids]
        with self.v.locks.hold([gid, *sids], shared=vids):
            found = self.index.group_members(gid)
            if found:
                return self._same(found, name, gid, vids)
            vols = [self.v._volume(vid) for vid in sorted(vids)]
            datasets = [f"{vol.dataset}@{gid}" for vol in vols]
            created = self.v._now()
            seq = self.index.begin("group-snapshot", datasets)
            try:
                # One call, one transaction group: the members are atomic with each other.
                self.zfs.snapshot(datasets, {"zvolt:name": name, "zvolt:group": gid, "zvolt:created": str(created),
                                             **user_labels})
            except ZfsError as exc:
                self.v._settle(seq, datasets)
                adopted = self.index.group_members(gid)
                if adopted:
                    return self._same(adopted, name, gid, vids)
                raise _zfs_error(exc, f"creating group snapshot {name!r}") from exc
            try:
                referenced = get_props_many(self.zfs, datasets, ("referenced",))
            except ZfsError:
                referenced = {}
            members = [SnapshotRec(id=f"{vol.id}@{gid}", name=name, volume_id=vol.id, dataset=ds, size=vol.size,
                                   created=created, group=gid) for vol, ds in zip(vols, datasets, strict=True)]
            with self.index.tx() as tx:
                for rec in members:
                    tx.put_snapshot(rec)
                    tx.charge_snapshot(rec.id, snapshot_charge(referenced.get(rec.dataset), rec.size))
                tx.done(seq)
            return Group(gid, name, members, created)

    def get(self, gid: str) -> Group:
        names.check_group(gid)
        found = self.index.group_members(gid)
        if not found:
            raise not_found(f"group snapshot {gid} does not exist")
        return Group(gid, found[0].name, found, min(m.created for m in found))

    def delete(self, gid: str, snapshot_ids: Sequence[str] = ()) -> None:
        """Delete the listed members (every member when none is listed). Members already gone are
        fine; a listed snapshot that is not of this group is INVALID_ARGUMENT (nothing deleted)."""
        names.check_group(gid)
        for sid in snapshot_ids:
            if names.split_local_snapshot_id(sid)[1] != gid:
                raise invalid(f"snapshot {sid} is not a member of group snapshot {gid}")
        wanted = set(snapshot_ids)
        targets = [m for m in self.index.group_members(gid) if not wanted or m.id in wanted]
        if not targets:
            return
        with self.v.locks.hold([m.id for m in targets], shared=[m.volume_id for m in targets]):
            current = {m.id for m in self.index.group_members(gid)}
            targets = [m for m in targets if m.id in current]
            if not targets:
                return
            datasets = [m.dataset for m in targets]
            seq = self.index.begin("delete-group-snapshot", datasets)
            try:
                # defer=True: a member that a branch still uses goes when its last clone goes.
                self.zfs.destroy_snapshots(datasets, defer=True)
            except ZfsError as exc:
                self.v._settle(seq, datasets)
                raise _zfs_error(exc, f"deleting group snapshot {gid}") from exc
            with self.index.tx() as tx:
                for m in targets:
                    tx.del_snapshot(m.id)
                tx.done(seq)
        for m in targets:
            if self.v.layout.is_trash(m.dataset.partition("@")[0]):
                self.v.gc.release_origin(m.dataset)
