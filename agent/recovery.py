"""Start-up: make the index, ZFS and configfs agree again, then declare the agent ready.

Normal path (no pool listing): load the index, re-read from ZFS only the datasets named by
in-flight intents, rebuild the exports of published volumes (configfs is empty after a reboot)
and tear down any export the index does not know as published. Slow path (`rebuild`): walk
the parent dataset once and rebuild the whole index from ZFS user properties, with progress.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.exports import Exports
from agent.index import Index, Intent, VolumeRec
from agent.records import Layout, from_props, is_hidden_snapshot, move_of, put, refresh
from agent.volumes import Volumes
from agent.zfs import Zfs, ZfsError, set_props_many

_log = logging.getLogger("zvolt.agent.recovery")
# Datasets per `zfs set volmode=dev` at start-up: amortizes the process start over many volumes,
# keeps one bad dataset from costing more than its batch a retry one by one.
ACTIVATE_BATCH = 32


@dataclass
class Readiness:
    """Shared by the server (answers UNAVAILABLE until ready) and the recovery thread."""

    ready: bool = False
    reason: str = "start-up recovery has not started"
    started: float = field(default_factory=time.monotonic)
    startup_seconds: float = 0.0
    _mu: threading.Lock = field(default_factory=threading.Lock)

    def set(self, ready: bool, reason: str = "") -> None:
        with self._mu:
            self.ready = ready
            self.reason = reason
            if ready:
                self.startup_seconds = time.monotonic() - self.started


def ensure_layout(zfs: Zfs, layout: Layout) -> bool:
    """Create the parent datasets if missing. Returns True if the volumes root already existed."""
    existed = zfs.exists(layout.volumes_root)
    for ds in (layout.parent, layout.volumes_root, layout.trash_root):
        if not zfs.exists(ds):
            try:
                zfs.create_filesystem(ds)
            except ZfsError as exc:
                if exc.errno != errno.EEXIST:
                    raise
    return existed


def rebuild_index(zfs: Zfs, index: Index, layout: Layout, progress: Callable[[str], None],
                  every: int = 1000) -> int:
    """Slow path: replace the index with what ZFS user properties say. Returns objects indexed."""
    start = time.monotonic()
    progress(f"rebuilding index from ZFS under {layout.parent} (this lists every dataset once)")
    count = 0
    seen = 0
    with index.tx() as tx:
        tx.clear()
        for props in zfs.walk(layout.parent):
            seen += 1
            rec = from_props(layout, props["name"], props)
            if rec is not None:
                put(tx, rec)
                count += 1
            move = move_of(layout, props["name"], props)
            if move is not None:
                tx.put_move(move)
            if seen % every == 0:
                progress(f"rebuild: {seen} datasets read, {count} indexed, {time.monotonic() - start:.1f}s")
    index.set_meta("parent", layout.parent)
    progress(f"rebuild done: {seen} datasets read, {count} indexed in {time.monotonic() - start:.1f}s")
    return count


def trash_move(layout: Layout, intent: Intent) -> tuple[str, str] | None:
    """(volume, trash target) if the intent may have renamed a deleted volume into the trash.

    A "delete" intent names [volume, trash target if it was moved there, origin if a clone]. The
    origin is a snapshot and may itself lie in the trash, so the target is the one dataset in
    the trash without "@". Older agents bracketed the move by a separate "trash" op naming
    exactly [volume, target]: an index such an agent left with one in flight (it died mid-delete,
    then a newer agent starts on its index) must still settle, so that form is read too.
    """
    if intent.op == "trash" and len(intent.datasets) == 2:
        return intent.datasets[0], intent.datasets[1]
    if intent.op == "delete" and intent.datasets:
        for ds in intent.datasets[1:]:
            if "@" not in ds and layout.is_trash(ds):
                return intent.datasets[0], ds
    return None


class Recovery:
    def __init__(self, zfs: Zfs, index: Index, exports: Exports, volumes: Volumes, readiness: Readiness,
                 progress: Callable[[str], None] | None = None) -> None:
        self.zfs = zfs
        self.index = index
        self.exports = exports
        self.volumes = volumes
        self.layout = volumes.layout
        self.readiness = readiness
        self.progress = progress or (lambda line: _log.info(line))

    def _finish_grow(self, rec: VolumeRec) -> None:
        """A create/clone/expand died between the volume and its `zfs set volsize`: finish it."""
        props = self.zfs.get_props(rec.dataset, ("zvolt:size",)) or {}
        want = int(props.get("zvolt:size", "0") or 0) if props.get("zvolt:size", "-").isdigit() else 0
        if want > rec.size:
            grow = {"volsize": str(want)}
            if rec.thick:
                grow["refreservation"] = str(want)
            self.zfs.set_props(rec.dataset, grow)
            rec.size = want

    def settle_intents(self) -> int:
        intents = self.index.intents()
        for intent in intents:
            with self.index.tx() as tx:
                recs = {ds: refresh(tx, self.zfs, self.layout, ds) for ds in intent.datasets}
                for rec in recs.values():
                    if isinstance(rec, VolumeRec):
                        self._finish_grow(rec)
                        tx.put_volume(rec)
                moved = trash_move(self.layout, intent)
                if moved is not None and recs.get(moved[1]) is not None:
                    tx.move_snapshots(*moved)
                    tx.move_origins(*moved)
                tx.done(intent.seq)
            for ds in intent.datasets:
                # A clone-from-volume that died after its hidden snapshot: drop the orphan.
                if "@" in ds and is_hidden_snapshot(ds) and self.zfs.exists(ds) and not self.zfs.clones_of(ds):
                    self.zfs.destroy_snapshots([ds], defer=True)
            _log.info("settled intent", extra={"fields": {"op": intent.op, "datasets": intent.datasets}})
        return len(intents)

    def check_commitment(self) -> None:
        """The commitment total is kept by triggers; a write they do not see (a hand edit, an
        UPDATE OR REPLACE) would skew every admission after it. One full sum here, never on a
        request path, finds and repairs that."""
        kept, summed = self.index.check_total()
        if kept != summed:
            _log.warning("commitment total disagreed with the index; set to the sum of its rows",
                         extra={"fields": {"kept_bytes": kept, "summed_bytes": summed}})

    def _load_keys(self, published: list[VolumeRec]) -> list[VolumeRec]:
        """After a reboot ZFS has no keys: load those of published encrypted volumes (only those) from
        their wrapped entries. A volume whose key cannot be loaded is recorded as not restored and
        left out; the others go on."""
        ready = []
        for vol in published:
            try:
                self.volumes.keys.restore(vol.id, vol.dataset)
            except Exception as exc:  # this volume's alone, as in restore_exports
                self.volumes.unrestored[vol.id] = str(exc)
                _log.error("encryption key not loaded; export not restored",
                           extra={"fields": {"volume": vol.id, "error": str(exc)}})
                continue
            ready.append(vol)
        return ready

    def _restore_one(self, vol: VolumeRec, activated: bool = False) -> bool:
        """Rebuild one export, not yet linked (fenced if a live move froze it); returns whether it
        is a TLS export."""
        if not activated and not self.zfs.device_ready(vol.dataset):
            self.zfs.set_props(vol.dataset, {"volmode": "dev"})
        tls = self.exports.export(vol.id, vol.dataset, vol.hosts, link=False)
        if self._frozen_for_a_move(vol):
            self.exports.fence_unlinked(vol.id, tls)
        return tls

    def _frozen_for_a_move(self, vol: VolumeRec) -> bool:
        """A live move out of here got past its fence (the zvol is frozen read-only) and has not
        ended: its hosts must keep holding their I/O until the move commits or aborts."""
        move = self.index.move(vol.id)
        if move is None or move.state != "moving":
            return False
        return (self.zfs.get_props(vol.dataset, ("readonly",)) or {}).get("readonly") == "on"

    def _activate(self, published: list[VolumeRec]) -> set[str]:
        """volmode=dev on every published zvol whose device node is missing, a batch per `zfs set`
        process instead of one process each. Returns the datasets it was set on; a failed batch
        is left to `_restore_one`, which sets (and so finds the bad one) volume by volume."""
        missing = [v.dataset for v in published if not self.zfs.device_ready(v.dataset)]
        done: set[str] = set()
        for i in range(0, len(missing), ACTIVATE_BATCH):
            batch = missing[i:i + ACTIVATE_BATCH]
            try:
                set_props_many(self.zfs, batch, {"volmode": "dev"})
            except ZfsError as exc:
                _log.warning("batched volmode=dev failed; setting these volumes one by one",
                             extra={"fields": {"datasets": len(batch), "error": str(exc)}})
                continue
            done.update(batch)
        return done

    def restore_exports(self) -> tuple[int, int]:
        """Export every published volume; tear down exports of volumes not published. (restored, removed)

        One volume that cannot be exported (its zvol gone, a device node that never appears, a
        configfs error) must not keep the others offline: it is recorded in `unrestored` (volume
        condition, metric, log) and retried in the background, and the rest are linked."""
        published = self.index.published()
        want = {v.id for v in published}
        removed = 0
        for vid in sorted(self.exports.exported_ids() - want):
            self.exports.unexport(vid)
            vol = self.index.volume(vid)
            if vol is not None:
                self.zfs.set_props(vol.dataset, {"volmode": "none"})
            removed += 1
        self.exports.prune_hosts()
        published = self._load_keys(published)
        activated = self._activate(published)
        restored: dict[str, bool] = {}
        for vol in published:
            try:
                restored[vol.id] = self._restore_one(vol, vol.dataset in activated)
            except Exception as exc:  # any failure is this volume's alone
                self.volumes.unrestored[vol.id] = str(exc)
                _log.error("export not restored; retrying in the background",
                           extra={"fields": {"volume": vol.id, "error": str(exc)}})
                continue
        self.exports.link_all(restored)
        return len(restored), removed

    def retry_unrestored(self) -> int:
        """Try the exports start-up could not restore again (each under its volume's lock, as a
        publish would be). Returns how many are still broken."""
        for vid in sorted(self.volumes.unrestored):
            with self.volumes.locks.hold([vid]):
                vol = self.index.volume(vid)
                if vol is None or not vol.hosts:
                    self.volumes.unrestored.pop(vid, None)  # deleted or unpublished meanwhile
                    continue
                try:
                    self.volumes.keys.restore(vol.id, vol.dataset)  # start-up did it in _load_keys
                    self.exports.link_all({vid: self._restore_one(vol)})
                except Exception as exc:  # as above: this volume only
                    self.volumes.unrestored[vid] = str(exc)
                    continue
                self.volumes.unrestored.pop(vid, None)
                _log.info("export restored after a retry", extra={"fields": {"volume": vid}})
        return len(self.volumes.unrestored)

    def run(self, rebuild: bool = False) -> None:
        try:
            self.readiness.set(False, "checking datasets")
            existed = ensure_layout(self.zfs, self.layout)
            known = self.index.get_meta("parent")
            if rebuild or (known is None and existed):
                self.readiness.set(False, "rebuilding the index from ZFS")
                rebuild_index(self.zfs, self.index, self.layout, self.progress)
            elif known is None:
                self.index.set_meta("parent", self.layout.parent)
            elif known != self.layout.parent:
                raise RuntimeError(f"index belongs to parent {known}, not {self.layout.parent}")
            self.readiness.set(False, "settling in-flight operations")
            settled = self.settle_intents()
            self.exports.attach(self.index)  # homes of volumes that moved here, as settled or rebuilt
            self.check_commitment()
            self.readiness.set(False, "restoring NVMe exports")
            restored, removed = self.restore_exports()
            self.readiness.set(True)
            broken = f", {len(self.volumes.unrestored)} NOT restored (retrying)" if self.volumes.unrestored else ""
            self.progress(f"ready: settled {settled} intents, restored {restored} exports{broken}, removed {removed} "
                          f"stale, in {self.readiness.startup_seconds:.3f}s")
        except Exception as exc:
            _log.exception("start-up recovery failed")
            self.readiness.set(False, f"start-up recovery failed: {exc}")
            raise
        try:
            self.volumes.gc.sweep()
        except Exception:
            _log.exception("garbage collection after start-up failed")
