"""The agent's operations: look up in the index, then change ZFS/configfs, then commit.

Every mutation is bracketed by an intent (see index.py) and holds per-volume locks (locks.py).
Each is idempotent: a repeat of a completed call returns the same result without touching ZFS.
"""

from __future__ import annotations

import base64
import errno
import re
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

from agent.coalesced import CoalescedReads
from agent.commitment import Admissions
from agent.cordon import Cordon
from agent.dhchap import HostSecrets
from agent.exports import Exports
from agent.gc import Collector
from agent.index import Index, SnapshotRec, TrashRec, VolumeRec
from agent.keys import Keys, check_key
from agent.locks import VolumeLocks
from agent.nvmet import NvmetError
from agent.records import HIDDEN_PREFIX, Layout, hosts_value, is_hidden_snapshot, refresh
from agent.zfs import EKEY, Space, Zfs, ZfsError, get_props_many, retry_busy
from zvolt import commitment, names, volprops
from zvolt.errors import (
    ZvoltError,
    aborted,
    already_exists,
    exhausted,
    internal,
    invalid,
    moved,
    not_found,
    out_of_range,
    precondition,
)

DEFAULT_VOLBLOCKSIZE = volprops.DEFAULT_VOLBLOCKSIZE
DEFAULT_COMPRESSION = volprops.DEFAULT_COMPRESSION
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_PAGE = 5000


@dataclass(frozen=True)
class AgentConfig:
    node: str
    pool: str
    parent: str
    nvme_address: str
    nvme_port: str
    max_volume_size: int = 64 << 40
    # The growth reserve: free space no new volume may take, kept for existing (thin) volumes to
    # grow into: the larger of the two. A new thin volume also needs min_free_bytes above it.
    min_free_bytes: int = 64 << 20
    reserve_fraction: float = 0.05
    # Commitment limit: logical bytes promised may reach this x the pool's size (zvolt/commitment.py).
    commitment_ratio: float = commitment.DEFAULT_RATIO
    # Pool space is refreshed in the background (main loop); a request only reads ZFS itself when
    # the cached value is older than this, so creates do not pay a `zfs get` each.
    capacity_ttl: float = 30.0


@dataclass
class VolumeSpec:
    name: str
    size: int
    volblocksize: int = 0
    compression: str = ""
    thick: bool = False
    source_snapshot: str = ""
    source_volume: str = ""
    encryption_key: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class VolumeState:
    volume: VolumeRec
    used_bytes: int
    healthy: bool
    message: str
    encrypted: bool = False


@dataclass(frozen=True)
class Capacity:
    available: int  # free space above the growth reserve
    total: int
    used: int
    maximum_volume_size: int
    committed: int = 0
    commitment_ratio: float = commitment.DEFAULT_RATIO  # the limit
    commitment_available: int = 0  # logical bytes the limit still admits
    reserve: int = 0


def _check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels become ZFS user properties `zvolt:label:<key>`."""
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key) or len(value) > 1024 or "\n" in value or not value.isprintable():
            raise invalid(f"label {key!r} is not valid (key [A-Za-z0-9._-]{{1,63}}, value printable <=1024)")
    return {f"zvolt:label:{k}": v for k, v in labels.items()}


def _zfs_error(exc: ZfsError, what: str) -> ZvoltError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return exhausted(f"{what}: not enough space in the pool ({exc})")
    if exc.errno == EKEY:
        return precondition(f"{what}: the volume is encrypted and its key is not loaded on the storage node; "
                            "the StorageClass must name the Secret holding its key for this call")
    if exc.errno == errno.ENOENT:
        # A source deleted meanwhile (delete in any order): final for the caller, not a fault.
        return not_found(f"{what}: {exc}")
    return internal(f"{what} failed: {exc}")


_TOKEN_TAG = "zvolt-page:"  # noqa: S105 - a format tag, not a secret


def encode_token(last: str) -> str:
    """Opaque page token: the last id returned, tagged so that random strings are rejected."""
    return base64.urlsafe_b64encode((_TOKEN_TAG + last).encode()).decode()


def decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise aborted(f"starting_token {token[:64]!r} is not valid") from exc
    if not raw.startswith(_TOKEN_TAG):
        raise aborted(f"starting_token {token[:64]!r} is not valid")
    return raw.removeprefix(_TOKEN_TAG)


def page_size(max_entries: int) -> int:
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    return min(max_entries or 1000, _MAX_PAGE)


def snapshot_charge(props: Mapping[str, str] | None, size: int) -> int:
    """What a snapshot can come to pin: all it references when taken (`props` holds its
    `referenced`), once its volume has overwritten every block. Never refused (a backup must not
    fail on overcommit), but counted against what comes next. Unknown (a failed read): the
    volume's size."""
    value = (props or {}).get("referenced", "")
    return int(value) if value.isdigit() else size


@dataclass(frozen=True)
class _DeletePlan:
    """What deleting one volume does to ZFS, decided under its lock before anything changes."""

    vol: VolumeRec
    # False: the index knows no snapshot or clone of it; one destroy is tried without listing.
    listed: bool = False
    idle: tuple[str, ...] = ()  # snapshots nobody reaches: destroyed (deferred) first
    trash: str = ""  # some snapshot must stay: the volume is renamed here instead of destroyed


class Volumes:
    def __init__(self, cfg: AgentConfig, zfs: Zfs, index: Index, exports: Exports,
                 locks: VolumeLocks | None = None, clock: Callable[[], float] = time.time,
                 keys: Keys | None = None) -> None:
        self.cfg = cfg
        self.zfs = zfs
        self.index = index
        self.exports = exports
        self.locks = locks or VolumeLocks()
        self.keys = keys or Keys(zfs, None)
        self.layout = Layout(cfg.parent)
        self.cordon = Cordon(zfs, cfg.parent, cfg.node)
        self.gc = Collector(zfs, index, self.layout)
        exports.attach(index)  # a volume that moved here keeps its first node's NQN
        # Published volumes whose export start-up could not restore: volume id -> why. Their
        # condition says so, and recovery retries them in the background (agent/recovery.py).
        self.unrestored: dict[str, str] = {}
        self._clock = clock
        self._space: tuple[float, Space] | None = None
        self._space_mu = threading.Lock()
        # Snapshot charges taken at once share one `zfs get` (agent/coalesced.py).
        self._referenced = CoalescedReads(lambda datasets: get_props_many(self.zfs, datasets, ("referenced",)))
        self.admissions = Admissions()

    # -- helpers --------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _settle(self, seq: int, datasets: list[str]) -> None:
        """After a failed ZFS step: make the index match ZFS for what the intent named."""
        with self.index.tx() as tx:
            for ds in datasets:
                refresh(tx, self.zfs, self.layout, ds)
            tx.done(seq)

    def space(self) -> Space:
        with self._space_mu:
            now = time.monotonic()
            if self._space is None or now - self._space[0] > self.cfg.capacity_ttl:
                self._space = (now, self.zfs.space(self.cfg.parent))
            return self._space[1]

    def refresh_space(self) -> Space:
        """One scoped `zfs get` of the parent dataset (called periodically, off the request path)."""
        fresh = self.zfs.space(self.cfg.parent)
        with self._space_mu:
            self._space = (time.monotonic(), fresh)
        return fresh

    def _reserve_space(self, size: int) -> None:
        """Account a new refreservation in the cached value until the next refresh."""
        with self._space_mu:
            if self._space is not None:
                at, sp = self._space
                self._space = (at, Space(available=max(sp.available - size, 0), used=sp.used + size))

    def _reserve(self, total: int) -> int:
        return max(self.cfg.min_free_bytes, int(total * self.cfg.reserve_fraction))

    def committed(self) -> int:
        """The index's commitment plus the charges of creates and expansions still in flight."""
        return self.index.committed_bytes() + self.admissions.pending()

    def capacity(self) -> Capacity:
        sp = self.space()
        total = sp.available + sp.used
        reserve = self._reserve(total)
        committed = self.committed()
        ratio = self.cfg.commitment_ratio
        return Capacity(available=max(sp.available - reserve, 0), total=total, used=sp.used,
                        maximum_volume_size=self.cfg.max_volume_size, committed=committed,
                        commitment_ratio=ratio, commitment_available=commitment.headroom(committed, total, ratio),
                        reserve=reserve)

    def _check_fits(self, size: int, thick: bool) -> None:
        sp = self.space()
        total = sp.available + sp.used
        reserve = self._reserve(total)
        free = max(sp.available - reserve, 0)
        # Thin volumes overcommit, but the reserve is for the volumes already there to grow into.
        if free < self.cfg.min_free_bytes:
            raise exhausted(f"growth reserve of storage node {self.cfg.node} reached: {sp.available} bytes free of "
                            f"{total}, and {reserve} bytes are kept for existing volumes to grow into; no new volumes")
        if thick and size > free:
            raise exhausted(f"a thick volume of {size} bytes does not fit on storage node {self.cfg.node}: {free} "
                            f"bytes free above the growth reserve of {reserve} bytes")

    def _commit(self, charge: int, what: str) -> AbstractContextManager[None]:
        """Admit `charge` more logical bytes under the commitment limit for the duration of a call."""
        ratio = self.cfg.commitment_ratio

        def check(committed: int) -> None:
            sp = self.space()
            total = sp.available + sp.used
            if committed + charge > commitment.limit_bytes(ratio, total):
                raise exhausted(commitment.refusal(f"storage node {self.cfg.node}", what, charge, committed, total,
                                                   ratio))

        return self.admissions.admit(charge, self.index.committed_bytes, check)

    def _volume(self, vid: str) -> VolumeRec:
        vol = self.index.volume(names.check_id(vid))
        if vol is None:
            self.not_moved_away(vid)
            raise not_found(f"volume {vid} does not exist")
        return vol

    def not_moved_away(self, vid: str) -> None:
        """Moved (NOT_FOUND naming the node) for an id this node keeps only a tombstone of
        (agent/moves.py `finish`). Checked where a call finds no volume: a silent NOT_FOUND or OK
        there would let a delete orphan the moved copy, or a create make a second volume of the id.
        One key lookup, and only on a miss."""
        move = self.index.move(vid)
        if move is not None and move.state == "moved":
            raise moved(vid, move.peer)

    def home_of(self, vid: str) -> str:
        """The node volume `vid`'s CSI id names, as far as this node knows: itself unless it moved here."""
        return self.index.home(vid) or self.cfg.node

    def not_moving(self, vid: str, what: str) -> None:
        """A volume being moved keeps still until the move commits or is aborted (agent/moves.py):
        a publish would make a second writer, a snapshot or growth could miss the final stream."""
        move = self.index.move(vid)
        if move is not None and move.state == "moving":
            raise precondition(f"{what}: volume {vid} is being moved to storage node {move.peer}; retry when the "
                               "move has finished or was aborted")

    # -- create ---------------------------------------------------------------------------

    def _validate(self, spec: VolumeSpec) -> tuple[int, int, str, dict[str, str]]:
        """(size rounded to the block size, volblocksize, compression, label properties)"""
        names.check_csi_name(spec.name)
        if spec.encryption_key:
            check_key(spec.encryption_key)
            if not (spec.source_snapshot or spec.source_volume):
                self.keys.require_store(f"creating encrypted volume {spec.name!r}")
        if spec.source_snapshot and spec.source_volume:
            raise invalid("give either a source snapshot or a source volume, not both")
        vbs = volprops.check_volblocksize(spec.volblocksize or DEFAULT_VOLBLOCKSIZE)
        compression = volprops.check_compression(spec.compression or DEFAULT_COMPRESSION)
        if spec.size <= 0:
            raise invalid("size_bytes must be positive")
        size = volprops.round_up(spec.size, vbs)
        if size > self.cfg.max_volume_size:
            raise out_of_range(f"size {spec.size} exceeds the maximum volume size {self.cfg.max_volume_size}")
        return size, vbs, compression, _check_labels(spec.labels)

    def _same(self, vol: VolumeRec, spec: VolumeSpec, size: int) -> VolumeRec:
        if vol.name != spec.name:
            raise already_exists(f"volume id {vol.id} is taken by another name")
        if vol.size != size:
            raise already_exists(f"volume {spec.name!r} exists with size {vol.size}, not {size}")
        if vol.source_snapshot != spec.source_snapshot or vol.source_volume != spec.source_volume:
            raise already_exists(f"volume {spec.name!r} exists with a different source")
        if vol.thick != spec.thick:
            raise already_exists(f"volume {spec.name!r} exists with thick={vol.thick}")
        return vol

    def create_volume(self, spec: VolumeSpec) -> VolumeRec:
        size, vbs, compression, label_props = self._validate(spec)
        vid = names.id_for_name(spec.name)
        src_vid = ""
        if spec.source_snapshot:
            src_vid = names.split_local_snapshot_id(spec.source_snapshot)[0]
        elif spec.source_volume:
            src_vid = names.check_id(spec.source_volume, "source volume id")
        with self.locks.hold([vid], shared=[src_vid] if src_vid else []):
            existing = self.index.volume(vid)
            if existing is not None:
                return self._same(existing, spec, size)
            self.not_moved_away(vid)
            ds = self.layout.volume(vid)
            user = {
                "zvolt:id": vid, "zvolt:name": spec.name, "zvolt:created": str(self._now()),
                "zvolt:thick": "1" if spec.thick else "0", "zvolt:hosts": "-", "zvolt:size": str(size),
            }
            user.update(label_props)
            if spec.source_snapshot or spec.source_volume:
                return self._clone(spec, vid, ds, size, user)  # a clone must live by its source, cordoned or not
            if refused := self.cordon.refusal():
                raise exhausted(refused)  # the controller then tries the next node
            self._check_fits(size, spec.thick)
            with self._commit(size, f"volume {spec.name!r}"):
                return self._create(spec, vid, ds, size, vbs, compression, user)

    def _create(self, spec: VolumeSpec, vid: str, ds: str, size: int, vbs: int, compression: str,
                user: dict[str, str]) -> VolumeRec:
        props: dict[str, int | str] = {"volblocksize": vbs, "compression": compression, "volmode": "none", **user}
        if spec.thick:
            props["refreservation"] = size
        seq = self.index.begin("create", [ds])
        try:
            self.zfs.create_volume(ds, size, props, key=spec.encryption_key)
        except ZfsError as exc:
            self._settle(seq, [ds])
            adopted = self.index.volume(vid)
            if exc.errno == errno.EEXIST and adopted is not None:
                return self._same(adopted, spec, size)
            raise _zfs_error(exc, f"creating volume {spec.name!r}") from exc
        rec = VolumeRec(id=vid, name=spec.name, dataset=ds, size=size, volblocksize=vbs, compression=compression,
                        thick=spec.thick, hosts=[], created=int(user["zvolt:created"]))
        rec = self._record_created(rec, seq)
        if spec.encryption_key:
            self.keys.release(ds)  # `zfs create` loaded it; nothing is published under it yet
        return rec

    def _record_created(self, rec: VolumeRec, seq: int) -> VolumeRec:
        """The new volume and the end of its create intent in one transaction; a thick volume's
        refreservation counts against the cached free space at once."""
        with self.index.tx() as tx:
            tx.put_volume(rec)
            tx.done(seq)
        if rec.thick:
            self._reserve_space(rec.size)
        return rec

    def _clone(self, spec: VolumeSpec, vid: str, ds: str, size: int, user: dict[str, str]) -> VolumeRec:
        hidden = ""
        src: VolumeRec | None
        if spec.source_snapshot:
            snap = self.index.snapshot(spec.source_snapshot)
            if snap is None:
                self.not_moved_away(names.split_local_snapshot_id(spec.source_snapshot)[0])
                raise not_found(f"source snapshot {spec.source_snapshot} does not exist")
            origin, base_size = snap.dataset, snap.size
            user["zvolt:source-snapshot"] = spec.source_snapshot
            src = self.index.volume(snap.volume_id)
            if src is not None and src.dataset != snap.dataset.partition("@")[0]:
                src = None  # the snapshot's volume was deleted (trash) and its id reused
        else:
            src = self.index.volume(spec.source_volume)
            if src is None:
                self.not_moved_away(spec.source_volume)
                raise not_found(f"source volume {spec.source_volume} does not exist")
            hidden = f"{src.dataset}@{HIDDEN_PREFIX}{vid}"
            origin, base_size = hidden, src.size
            user["zvolt:source-volume"] = spec.source_volume
        # A clone keeps its origin's volblocksize: sizes must be multiples of that one.
        vbs = src.volblocksize if src is not None else self._volblocksize_of(origin)
        compression = spec.compression or (src.compression if src else DEFAULT_COMPRESSION)
        size = volprops.round_up(size, vbs)
        user["zvolt:size"] = str(size)  # lets recovery finish the grow below after a crash
        if size < base_size:
            raise out_of_range(f"size {size} is smaller than the source's {base_size} bytes")
        self._check_fits(size, spec.thick)
        keyed: AbstractContextManager[None] = nullcontext()
        if spec.encryption_key:
            # ZFS gives a clone its origin's encryption root and key: the key given must be that one.
            root = self.keys.root_of(origin)
            if not root:
                raise invalid(f"volume {spec.name!r}: its source is not encrypted, and a branch or restore keeps its "
                              "source's encryption; use a StorageClass without encryption")
            keyed = self.keys.using(root, spec.encryption_key, f"branching volume {spec.name!r}")
        # A clone can come to own every one of its blocks: it is charged its full size.
        with keyed, self._commit(size, f"clone {spec.name!r}"):
            return self._make_clone(spec, vid, ds, size, vbs, compression, user, origin, base_size, hidden)

    def _make_clone(self, spec: VolumeSpec, vid: str, ds: str, size: int, vbs: int, compression: str,
                    user: dict[str, str], origin: str, base_size: int, hidden: str) -> VolumeRec:
        props: dict[str, int | str] = {"volmode": "none", "compression": compression, **user}
        if spec.thick:
            props["refreservation"] = size
        seq = self.index.begin("clone", [ds, *([hidden] if hidden else [])])
        try:
            if hidden and not self.zfs.exists(hidden):
                self.zfs.snapshot([hidden], {"zvolt:hidden": "1", "zvolt:created": user["zvolt:created"]})
            self.zfs.clone(ds, origin, props)
            if size > base_size:
                grow = {"volsize": str(size)}
                if spec.thick:
                    grow["refreservation"] = str(size)
                self.zfs.set_props(ds, grow)
        except ZfsError as exc:
            self._settle(seq, [ds])
            adopted = self.index.volume(vid)
            if adopted is not None:
                return self._same(adopted, spec, size)
            if hidden:
                self.gc.release_origin(hidden)
            raise _zfs_error(exc, f"cloning volume {spec.name!r}") from exc
        rec = VolumeRec(
            id=vid, name=spec.name, dataset=ds, size=size, volblocksize=vbs, compression=compression,
            thick=spec.thick,
            source_snapshot=spec.source_snapshot, source_volume=spec.source_volume, origin=origin, hosts=[],
            created=int(user["zvolt:created"]),
        )
        return self._record_created(rec, seq)

    def _volblocksize_of(self, snapshot: str) -> int:
        """ZFS reports "-" for a snapshot's volblocksize: ask the volume that holds it (which may
        be a deleted volume kept in the trash for this very snapshot)."""
        holder = snapshot.partition("@")[0]
        props = self.zfs.get_props(holder, ("volblocksize",))
        if props is None:
            raise not_found(f"the source of {snapshot.rpartition('/')[2]} no longer exists")
        value = props.get("volblocksize", "")
        return int(value) if value.isdigit() else DEFAULT_VOLBLOCKSIZE

    # -- delete ---------------------------------------------------------------------------

    def delete_volume(self, vid: str) -> None:
        names.check_id(vid)
        with self.locks.hold([vid]):
            vol = self.index.volume(vid)
            if vol is None:
                self.not_moved_away(vid)
                return
            if vol.hosts:
                raise precondition(f"volume {vid} is still published to {', '.join(vol.hosts)}; unpublish it first")
            self.not_moving(vid, "deleting")
            visible = {s.dataset for s in self.index.snapshots_in(vol.dataset)}
            # Common case first: the index knows of no snapshot or clone, so one destroy with no
            # listing. Busy means children the index does not know (e.g. a leftover hidden
            # snapshot) or udev: nothing changed, so list and plan with what ZFS says.
            plan = _DeletePlan(vol)
            if visible or self.index.has_clones_of(vol.dataset) or not self._delete(plan):
                plan = self._plan_delete(vol, visible)
                self._delete(plan)
        # Outside the volume lock: the walk up the origin chain may destroy more (and takes the
        # collector's lock). A volume moved to the trash is still a clone of its origin.
        if vol.origin and not plan.trash:
            self.gc.release_origin(vol.origin)

    def _plan_delete(self, vol: VolumeRec, visible: set[str]) -> _DeletePlan:
        """List the volume's snapshots (one scoped read) and decide what becomes of each."""
        snaps = self.zfs.snapshots_of(vol.dataset)
        # Neither a user's snapshot nor the origin of a clone: nobody can reach it any more.
        idle = tuple(s for s in snaps if s not in visible and not self.zfs.clones_of(s))
        # Snapshots that must stay keep the volume's blocks: free its name only, by a rename.
        trash = self.layout.trash(vol.id, time.time_ns()) if len(idle) < len(snaps) else ""
        return _DeletePlan(vol, listed=True, idle=idle, trash=trash)

    def _delete(self, plan: _DeletePlan) -> bool:
        """Carry out a delete plan under one intent and commit it to the index.

        Returns False only when the unlisted attempt found the dataset busy (nothing changed)."""
        vol = plan.vol
        moved = [plan.trash] if plan.trash else []
        # The origin is named too: after a crash, recovery drops a hidden snapshot left without clones.
        seq = self.index.begin("delete", [vol.dataset, *moved, *([vol.origin] if vol.origin else [])])
        try:
            if plan.idle:
                self.zfs.destroy_snapshots(list(plan.idle), defer=True)
            if plan.trash:
                self.zfs.rename(vol.dataset, plan.trash)
            elif plan.listed:
                retry_busy(lambda: self.zfs.destroy(vol.dataset), self.zfs)
            else:
                self.zfs.destroy(vol.dataset)
        except ZfsError as exc:
            self._settle(seq, [vol.dataset, *moved])
            if exc.errno == errno.EBUSY and not plan.listed:
                return False
            raise _zfs_error(exc, f"deleting volume {vol.id}") from exc
        with self.index.tx() as tx:
            tx.del_volume(vol.id)
            self.exports.set_home(vol.id, "")
            if plan.trash:
                tx.move_snapshots(vol.dataset, plan.trash)
                tx.move_origins(vol.dataset, plan.trash)
                tx.put_trash(TrashRec(dataset=plan.trash, origin=vol.origin, created=self._now()))
            tx.done(seq)
        return True

    # -- expand ---------------------------------------------------------------------------

    def expand_volume(self, vid: str, size: int, key: bytes = b"") -> VolumeRec:
        names.check_id(vid)
        if size <= 0:
            raise invalid("size_bytes must be positive")
        with self.locks.hold([vid]):
            vol = self._volume(vid)
            self.not_moving(vid, "expanding")
            new = volprops.round_up(size, vol.volblocksize)
            if new <= vol.size:
                return vol  # never shrink: ZFS would accept it even on a connected volume
            if new > self.cfg.max_volume_size:
                raise out_of_range(f"size {size} exceeds the maximum volume size {self.cfg.max_volume_size}")
            if vol.thick:
                self._check_fits(new - vol.size, True)
            root = self.keys.root_of(vol.dataset) if key else ""
            keyed = self.keys.using(root, key, f"expanding volume {vid}") if root else nullcontext()
            with keyed, self._commit(new - vol.size, f"growing volume {vid} from {vol.size} to {new} bytes"):
                return self._grow(vol, vid, new)

    def _grow(self, vol: VolumeRec, vid: str, new: int) -> VolumeRec:
        props = {"volsize": str(new), "zvolt:size": str(new)}
        if vol.thick:
            props["refreservation"] = str(new)
        seq = self.index.begin("expand", [vol.dataset])
        try:
            self.zfs.set_props(vol.dataset, props)
        except ZfsError as exc:
            self._settle(seq, [vol.dataset])
            raise _zfs_error(exc, f"expanding volume {vid}") from exc
        if vol.hosts:
            self.exports.revalidate(vid)
        if vol.thick:
            self._reserve_space(new - vol.size)
        vol.size = new
        with self.index.tx() as tx:
            tx.put_volume(vol)
            tx.done(seq)
        return vol

    # -- modify ---------------------------------------------------------------------------

    def modify_volume(self, vid: str, compression: str = "") -> VolumeRec:
        """Change what ZFS lets change on a live zvol; "" leaves a property as it is. ZFS applies
        a new compression to blocks written from now on; what is on disk stays as it was."""
        names.check_id(vid)
        if compression:
            volprops.check_compression(compression)
        with self.locks.hold([vid]):
            vol = self._volume(vid)
            if not compression or compression == vol.compression:
                return vol
            seq = self.index.begin("modify", [vol.dataset])
            try:
                self.zfs.set_props(vol.dataset, {"compression": compression})
            except ZfsError as exc:
                self._settle(seq, [vol.dataset])
                raise _zfs_error(exc, f"setting compression={compression} on volume {vid}") from exc
            vol.compression = compression
            with self.index.tx() as tx:
                tx.put_volume(vol)
                tx.done(seq)
            return vol

    # -- encryption keys ------------------------------------------------------------------

    def rotate_key(self, vid: str, old_key: bytes, new_key: bytes) -> str:
        """`zfs change-key` of the volume's encryption root (no data copied); returns the root's
        name. Kept keys of published volumes under that root are re-wrapped with the new key."""
        names.check_id(vid)
        check_key(new_key)
        with self.locks.hold([vid]):
            vol = self._volume(vid)
            root = self.keys.root_of(vol.dataset)
            if not root:
                raise invalid(f"volume {vid} is not encrypted")
            what = f"rotating the key of volume {vid}"
            try:
                with self.keys.using(root, old_key, what):
                    self.zfs.change_key(root, new_key)
            except ZvoltError:
                # A repeat after success: the old key no longer opens the root; the new one must.
                with self.keys.using(root, new_key, what):
                    pass
            except ZfsError as exc:
                raise _zfs_error(exc, what) from exc

            def dataset_of(kept: str) -> str:
                rec = self.index.volume(kept)
                return rec.dataset if rec is not None else ""

            self.keys.rewrap(root, new_key, dataset_of)
            return root.rsplit("/", 1)[-1]

    # -- snapshots ------------------------------------------------------------------------

    def create_snapshot(self, name: str, source_volume: str, labels: Mapping[str, str] | None = None) -> SnapshotRec:
        names.check_csi_name(name)
        user_labels = _check_labels(labels or {})
        vid = names.check_id(source_volume, "source volume id")
        snap = names.id_for_name(name, prefix="s")
        sid = f"{vid}@{snap}"
        with self.locks.hold([sid], shared=[vid]):
            existing = self.index.snapshot_by_name(name)
            if existing is not None:
                if existing.volume_id != vid:
                    raise already_exists(f"snapshot {name!r} exists for another volume ({existing.volume_id})")
                return existing
            vol = self._volume(vid)
            self.not_moving(vid, f"snapshot {name!r}")
            ds = f"{vol.dataset}@{snap}"
            created = self._now()
            seq = self.index.begin("snapshot", [ds])
            try:
                self.zfs.snapshot(
                    [ds], {"zvolt:name": name, "zvolt:volume": vid, "zvolt:created": str(created), **user_labels}
                )
            except ZfsError as exc:
                self._settle(seq, [ds])
                adopted = self.index.snapshot(sid)
                if adopted is not None and adopted.name == name:
                    return adopted
                raise _zfs_error(exc, f"creating snapshot {name!r}") from exc
            rec = SnapshotRec(id=sid, name=name, volume_id=vid, dataset=ds, size=vol.size, created=created)
            charge = self._snapshot_charge(ds, vol.size)
            with self.index.tx() as tx:
                tx.put_snapshot(rec)
                tx.charge_snapshot(sid, charge)
                tx.done(seq)
            return rec

    def _snapshot_charge(self, ds: str, size: int) -> int:
        try:
            props = self._referenced.get(ds)
        except ZfsError:
            props = None
        return snapshot_charge(props, size)

    def delete_snapshot(self, sid: str) -> None:
        vid, _ = names.split_local_snapshot_id(sid)
        with self.locks.hold([sid], shared=[vid]):
            rec = self.index.snapshot(sid)
            if rec is None:
                self.not_moved_away(vid)
                return
            seq = self.index.begin("delete-snapshot", [rec.dataset])
            try:
                # defer=True destroys at once when nothing depends on it, else when the last clone goes.
                self.zfs.destroy_snapshots([rec.dataset], defer=True)
            except ZfsError as exc:
                self._settle(seq, [rec.dataset])
                raise _zfs_error(exc, f"deleting snapshot {sid}") from exc
            with self.index.tx() as tx:
                tx.del_snapshot(sid)
                tx.done(seq)
        dataset = rec.dataset.partition("@")[0]
        if self.layout.is_trash(dataset):
            self.gc.release_origin(rec.dataset)

    # -- publish --------------------------------------------------------------------------

    def publish(self, vid: str, host: str, key: bytes = b"", auth: HostSecrets | None = None) -> str:
        """Allow node `host` on the volume; with `auth` (DH-HMAC-CHAP keys, TLS PSK) under its host
        NQN for this volume (names.volume_host_nqn), whose host entry and keyring entry hold them.
        Returns the subsystem NQN."""
        names.check_id(vid)
        names.check_nqn(host)
        store = self.exports.auth
        if (auth is None or not auth.secret) and self.exports.require_auth:
            raise precondition(f"storage node {self.cfg.node} requires DH-HMAC-CHAP (--dhchap): the volume's "
                               "StorageClass must set the parameter dhchap and its node-stage secret (see the chart)")
        if auth is not None and store is None:
            raise precondition(f"storage node {self.cfg.node} keeps no DH-HMAC-CHAP keys or TLS PSKs")
        if auth is not None and auth.secret and store is not None and store.cfg.bidirectional \
                and not auth.ctrl_secret:
            raise precondition(f"storage node {self.cfg.node} requires bidirectional DH-HMAC-CHAP "
                               "(--dhchap-bidirectional): the volume's Secret has no dhchapCtrlKey")
        allowed = names.volume_host_nqn(host, vid) if auth is not None else host
        with self.locks.hold([vid]):
            vol = self._volume(vid)
            same = store is None or auth is None or store.load(allowed) == replace(auth, host=allowed)
            if allowed in vol.hosts and same and self.exports.condition(vid, vol.dataset, vol.hosts)[0]:
                return self.exports.nqn(vid)
            self.not_moving(vid, f"publishing to {host}")
            active = self.zfs.device_ready(vol.dataset)
            # An inactive volume may be encrypted with its key unloaded: one scoped read says so.
            root = self.keys.root_of(vol.dataset) if key or not active else ""
            if root and not key:
                raise invalid(f"volume {vid} is encrypted: publishing it needs its key (StorageClass "
                              "csi.storage.k8s.io/controller-publish-secret-name and -namespace)")
            with self.keys.using(root, key, f"publishing volume {vid}") if root else nullcontext():
                if root:
                    self.keys.keep(vid, key, f"publishing volume {vid}")
                return self._publish(vol, vid, host, allowed, auth, active, root)

    def _publish(self, vol: VolumeRec, vid: str, host: str, allowed: str, auth: HostSecrets | None,
                 active: bool, root: str) -> str:
        # The node's other form goes (a class that turned DH-HMAC-CHAP on or off since).
        hosts = sorted({*(h for h in vol.hosts if names.node_host_nqn(h, vid) != host), allowed})
        seq = self.index.begin("publish", [vol.dataset])
        try:
            if auth is not None and self.exports.auth is not None:
                self.exports.auth.put(replace(auth, host=allowed))
            props = {"zvolt:hosts": hosts_value(hosts)}
            if not active:
                props["volmode"] = "dev"
            self.zfs.set_props(vol.dataset, props)
            self.exports.export(vid, vol.dataset, hosts)
        except (ZfsError, OSError, NvmetError, ZvoltError) as exc:
            self._settle(seq, [vol.dataset])
            if root and not vol.hosts:
                self.keys.forget(vid, "")  # the using() above unloads the key itself
            if isinstance(exc, ZvoltError):
                raise
            raise internal(f"publishing volume {vid} to {host} failed: {exc}") from exc
        replaced = [h for h in vol.hosts if h not in hosts]
        vol.hosts = hosts
        with self.index.tx() as tx:
            tx.put_volume(vol)
            tx.done(seq)
        if self.exports.auth is not None:
            for h in replaced:  # a per-volume NQN's key file outlives its NQN otherwise
                self.exports.auth.forget(h)
        self.unrestored.pop(vid, None)  # the export is whole again
        return self.exports.nqn(vid)

    def unpublish(self, vid: str, host: str) -> None:
        """Revoke node `host` (its NQN, or its per-volume NQN of an authenticated publish)."""
        names.check_id(vid)
        names.check_nqn(host)
        with self.locks.hold([vid]):
            vol = self.index.volume(vid)
            if vol is None:
                self.not_moved_away(vid)
                return
            gone = [h for h in vol.hosts if names.node_host_nqn(h, vid) == names.node_host_nqn(host, vid)]
            if not gone:
                self.exports.set_hosts(vid, vol.hosts)
                return
            hosts = [h for h in vol.hosts if h not in gone]
            seq = self.index.begin("unpublish", [vol.dataset])
            try:
                if hosts:
                    # Revoked before it is recorded: the host's controllers end here, not just
                    # its next connect (the other hosts reconnect; their I/O waits, no error).
                    self.exports.set_hosts(vid, hosts, revoke=True)
                    self.zfs.set_props(vol.dataset, {"zvolt:hosts": hosts_value(hosts)})
                else:
                    # Safe order: the namespace is gone before volmode changes. Unlinking the
                    # subsystem from the port ends its controllers.
                    self.exports.unexport(vid)
                    self.zfs.set_props(vol.dataset, {"zvolt:hosts": "-", "volmode": "none"})
            except (ZfsError, OSError, NvmetError) as exc:
                self._settle(seq, [vol.dataset])
                raise internal(f"unpublishing volume {vid} from {host} failed: {exc}") from exc
            vol.hosts = hosts
            with self.index.tx() as tx:
                tx.put_volume(vol)
                tx.done(seq)
            if self.exports.auth is not None:
                for h in gone:
                    self.exports.auth.forget(h)
            if not hosts:
                self.keys.forget_kept(vid, vol.dataset)

    # -- reads ----------------------------------------------------------------------------

    def get_volume(self, vid: str) -> VolumeState:
        vol = self._volume(vid)
        props = self.zfs.get_props(vol.dataset, ("used", "encryption"))
        if props is None:
            return VolumeState(vol, 0, False, f"dataset {vol.dataset} is missing in ZFS")
        healthy, msg = self.exports.condition(vid, vol.dataset, vol.hosts)
        if vid in self.unrestored:
            healthy, msg = False, f"export not restored after the agent restarted ({self.unrestored[vid]}); retrying"
        return VolumeState(vol, int(props.get("used") or 0), healthy, msg,
                           encrypted=props.get("encryption", "off") not in ("off", "-", ""))

    def list_volumes(self, max_entries: int, token: str, published_only: bool = False) -> tuple[list[VolumeRec], str]:
        limit = page_size(max_entries)
        rows = self.index.volumes(after=decode_token(token), limit=limit + 1, published_only=published_only)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_token(rows[-1].id) if more else ""

    def list_snapshots(self, max_entries: int, token: str, source_volume: str = "",
                       snapshot_id: str = "") -> tuple[list[SnapshotRec], str]:
        limit = page_size(max_entries)
        after = decode_token(token)
        if snapshot_id:
            try:
                snap_vid = names.split_local_snapshot_id(snapshot_id)[0]
            except ZvoltError:
                return [], ""
            rec = self.index.snapshot(snapshot_id)
            if rec is None:
                self.not_moved_away(snap_vid)
            ok = rec is not None and (not source_volume or rec.volume_id == source_volume) and rec.id > after
            return ([rec] if ok and rec else []), ""
        rows = self.index.snapshots(after=after, limit=limit + 1, volume_id=source_volume)
        if source_volume and not rows and self.index.volume(source_volume) is None:
            self.not_moved_away(source_volume)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_token(rows[-1].id) if more else ""

    def snapshot_used(self, rec: SnapshotRec) -> int:
        props = self.zfs.get_props(rec.dataset, ("used",))
        return int((props or {}).get("used") or 0)

    def trash_count(self) -> int:
        return len(self.index.trash())


__all__ = ["AgentConfig", "Capacity", "VolumeSpec", "VolumeState", "Volumes", "is_hidden_snapshot"]
