"""Collect deleted storage once nothing depends on it any more.

A deleted volume whose snapshots still had clones was renamed into the trash; a deleted
snapshot with clones was marked for deferred destroy (ZFS removes it with its last clone).
When a clone goes, its origin chain is walked upwards: hidden snapshots made for that clone
are destroyed and trash volumes left without snapshots are destroyed, and so on up the chain.
"""

from __future__ import annotations

import logging
import threading

from agent.index import Index
from agent.records import Layout, is_hidden_snapshot
from agent.zfs import Zfs, ZfsError, retry_busy

_log = logging.getLogger("zvolt.agent.gc")


class Collector:
    def __init__(self, zfs: Zfs, index: Index, layout: Layout) -> None:
        self.zfs = zfs
        self.index = index
        self.layout = layout
        self._mu = threading.Lock()

    def release_origin(self, origin: str) -> None:
        """A clone of `origin` is gone: drop what existed only for it, up the chain."""
        with self._mu:
            while origin:
                dataset = origin.partition("@")[0]
                if is_hidden_snapshot(origin) and not self.zfs.clones_of(origin):
                    # defer=True: if another clone appeared meanwhile, ZFS keeps it until that one goes.
                    self.zfs.destroy_snapshots([origin], defer=True)
                if not self.layout.is_trash(dataset):
                    return
                origin = self._collect(dataset) or ""

    def _collect(self, dataset: str) -> str | None:
        """Destroy one trash volume if none of its snapshots remain; returns its origin if destroyed."""
        entry = self.index.trash_entry(dataset)
        if not self.zfs.exists(dataset):
            if entry is not None:
                with self.index.tx() as tx:
                    tx.del_trash(dataset)
            return entry.origin if entry else None
        leftovers = self.zfs.snapshots_of(dataset)
        # Hidden snapshots without clones serve nobody: clear them so the volume can go.
        idle = [s for s in leftovers if is_hidden_snapshot(s) and not self.zfs.clones_of(s)]
        if idle:
            self.zfs.destroy_snapshots(idle, defer=True)
            leftovers = self.zfs.snapshots_of(dataset)
        if leftovers:
            return None
        origin = entry.origin if entry else ""
        seq = self.index.begin("gc", [dataset])
        retry_busy(lambda: self.zfs.destroy(dataset), self.zfs)
        with self.index.tx() as tx:
            tx.del_trash(dataset)
            tx.done(seq)
        _log.info("collected deleted volume", extra={"fields": {"dataset": dataset}})
        return origin or None

    def sweep(self) -> int:
        """Try every trash entry (few: only deleted volumes that still had clones). Returns collected."""
        collected = 0
        for entry in self.index.trash():
            try:
                with self._mu:
                    origin = self._collect(entry.dataset)
                if origin is not None or not self.zfs.exists(entry.dataset):
                    collected += 1
                if origin:
                    self.release_origin(origin)
            except ZfsError as exc:
                _log.warning("gc of %s failed: %s", entry.dataset, exc)
        return collected
