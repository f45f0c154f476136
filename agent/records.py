"""Where things live in ZFS and how ZFS properties map to index records (and back).

ZFS user properties are the ground truth: every field of a record can be recovered from the
properties of its own dataset, which is what lets recovery re-read just one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.index import MoveRec, SnapshotRec, TrashRec, Tx, VolumeRec
from agent.zfs import Zfs
from zvolt import names

HIDDEN_PREFIX = "h"  # implicit snapshots made for clone-from-volume: "h<clone id>"
# A move between nodes (agent/moves.py), in user properties so that recovery and a rebuilt index
# know it. Target: HOME (the node its CSI id names), STATE = INCOMING until the one `zfs set` of
# the commit makes it HELD. Source: MOVING_TO while it streams, MOVED_TO once the target committed.
HOME = "zvolt:home"
STATE = "zvolt:state"
INCOMING = "incoming"
HELD = "held"
MOVE_FROM = "zvolt:move-from"
MOVING_TO = "zvolt:moving-to"
MOVED_TO = "zvolt:moved-to"


@dataclass(frozen=True)
class Layout:
    parent: str

    @property
    def volumes_root(self) -> str:
        return f"{self.parent}/v"

    @property
    def trash_root(self) -> str:
        return f"{self.parent}/trash"

    def volume(self, vid: str) -> str:
        return f"{self.volumes_root}/{names.check_id(vid)}"

    def trash(self, vid: str, n: int) -> str:
        return f"{self.trash_root}/{names.check_id(vid)}-{n}"

    def is_trash(self, dataset: str) -> bool:
        return dataset.startswith(self.trash_root + "/")

    def is_volume(self, dataset: str) -> bool:
        return dataset.startswith(self.volumes_root + "/") and "@" not in dataset


def is_hidden_snapshot(snapshot: str) -> bool:
    return snapshot.partition("@")[2].startswith(HIDDEN_PREFIX)


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value or "")
    except ValueError:
        return default


def _user(props: dict[str, str], key: str) -> str:
    value = props.get(key, "-")
    return "" if value == "-" else value


def hosts_value(hosts: list[str]) -> str:
    return ",".join(sorted(hosts)) or "-"


Record = VolumeRec | SnapshotRec | TrashRec


def from_props(layout: Layout, name: str, props: dict[str, str]) -> Record | None:
    """The index record for one dataset, or None if it is not a user-visible zvolt object."""
    if "@" in name:
        if props.get("defer_destroy") == "on" or is_hidden_snapshot(name) or _user(props, "zvolt:hidden"):
            return None
        if _user(props, STATE) == INCOMING or _user(props, MOVED_TO):
            return None  # its volume's (user properties are inherited): arriving, or left
        vid = _user(props, "zvolt:volume") or _user(props, "zvolt:id")
        sname = _user(props, "zvolt:name")
        if not vid or not sname:
            return None
        snap = name.partition("@")[2]
        return SnapshotRec(id=f"{vid}@{snap}", name=sname, volume_id=vid, dataset=name,
                           size=_int(props.get("volsize")), created=_int(props.get("zvolt:created")),
                           group=_user(props, "zvolt:group"))
    origin = props.get("origin", "-")
    origin = "" if origin in ("-", "") else origin
    if layout.is_trash(name):
        return TrashRec(dataset=name, origin=origin, created=_int(props.get("zvolt:created")))
    if not layout.is_volume(name):
        return None
    vid = name.rsplit("/", 1)[1]
    if _user(props, "zvolt:id") != vid:
        return None  # not made by zvolt (or a half-made dataset without its properties)
    if _user(props, STATE) == INCOMING or _user(props, MOVED_TO):
        return None  # not servable here: arriving, or left for another node
    hosts = [h for h in _user(props, "zvolt:hosts").split(",") if h]
    return VolumeRec(
        id=vid, name=_user(props, "zvolt:name"), dataset=name, size=_int(props.get("volsize")),
        volblocksize=_int(props.get("volblocksize"), 16384), compression=props.get("compression", "lz4"),
        thick=_user(props, "zvolt:thick") == "1", source_snapshot=_user(props, "zvolt:source-snapshot"),
        source_volume=_user(props, "zvolt:source-volume"), origin=origin, hosts=sorted(hosts),
        created=_int(props.get("zvolt:created")), home=_user(props, HOME),
    )


def move_of(layout: Layout, name: str, props: dict[str, str]) -> MoveRec | None:
    """The source side of a move that a volume's properties record, if any."""
    if "@" in name or not layout.is_volume(name):
        return None
    vid = name.rsplit("/", 1)[1]
    if _user(props, MOVED_TO):
        return MoveRec(vid, "moved", _user(props, MOVED_TO))
    if _user(props, MOVING_TO):
        return MoveRec(vid, "moving", _user(props, MOVING_TO))
    return None


def put(tx: Tx, rec: Record) -> None:
    if isinstance(rec, VolumeRec):
        tx.put_volume(rec)
    elif isinstance(rec, SnapshotRec):
        tx.put_snapshot(rec)
    else:
        tx.put_trash(rec)


def refresh(tx: Tx, zfs: Zfs, layout: Layout, dataset: str) -> Record | None:
    """Make the index rows of one dataset match what ZFS says about it (scoped read)."""
    props = zfs.get_props(dataset)
    if "@" in dataset:
        tx.del_snapshot_dataset(dataset)
    elif layout.is_trash(dataset):
        tx.del_trash(dataset)
    else:
        tx.del_volume_dataset(dataset)
    if props is None:
        return None
    rec = from_props(layout, dataset, props)
    if rec is not None:
        put(tx, rec)
    move = move_of(layout, dataset, props)
    if move is not None:
        tx.put_move(move)
    elif isinstance(rec, VolumeRec):
        # Held here with no move under way; a stale "moving" row goes (an aborted move). A
        # tombstone stays: the data it named may be destroyed, and then nothing else says so.
        tx.del_move_unless_moved(rec.id)
    return rec
