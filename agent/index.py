"""The persistent index of volumes, snapshots, trash and in-flight intents (SQLite, WAL).

ZFS user properties stay the ground truth; the index exists so that start-up and lists never
walk the pool. Every ZFS change is bracketed: `begin()` records an intent naming the datasets
it will touch, and the transaction that updates the rows also deletes the intent. After a
crash, only the datasets named by leftover intents are re-read from ZFS.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

SCHEMA_VERSION = 1
# Index version N -> the statements that bring it to N + 1, run in place in one transaction
# each at start-up: an agent upgrade never falls back to rebuilding from a full pool listing.
MIGRATIONS: dict[int, tuple[str, ...]] = {}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS volumes(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, dataset TEXT NOT NULL, size INTEGER NOT NULL,
    volblocksize INTEGER NOT NULL, compression TEXT NOT NULL, thick INTEGER NOT NULL,
    source_snapshot TEXT NOT NULL, source_volume TEXT NOT NULL, origin TEXT NOT NULL,
    hosts TEXT NOT NULL, created INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, volume_id TEXT NOT NULL, dataset TEXT NOT NULL,
    size INTEGER NOT NULL, created INTEGER NOT NULL) WITHOUT ROWID;
-- Partial indexes: start-up (published volumes) and capacity (thick volumes) read only the
-- few rows they need, never the whole table, at any pool size.
CREATE INDEX IF NOT EXISTS volumes_published ON volumes(id) WHERE hosts != '';
CREATE INDEX IF NOT EXISTS volumes_thick ON volumes(size) WHERE thick = 1;
-- Covers the full commitment sum (the total's one-time fill, the start-up check).
CREATE INDEX IF NOT EXISTS volumes_size ON volumes(size);
CREATE INDEX IF NOT EXISTS snapshots_name ON snapshots(name);
CREATE INDEX IF NOT EXISTS snapshots_volume ON snapshots(volume_id);
CREATE INDEX IF NOT EXISTS snapshots_dataset ON snapshots(dataset);
-- What a snapshot can come to pin (its referenced bytes when taken), apart from the snapshots
-- table so that no schema version changes: an index without it counts each snapshot at its
-- volume's size. A charge lives exactly as long as its snapshot row (snapshots_deleted below:
-- an older agent deleting a snapshot drops it too); INSERT OR REPLACE of a snapshot row keeps it.
CREATE TABLE IF NOT EXISTS snapshot_charges(id TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
-- Group snapshot membership (agent/group_snapshots.py): snapshot id -> group id, so that a group
-- is found by its id without reading every snapshot. Lives as long as its snapshot row.
CREATE TABLE IF NOT EXISTS snapshot_groups(id TEXT PRIMARY KEY, group_id TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS snapshot_groups_group ON snapshot_groups(group_id);
CREATE TRIGGER IF NOT EXISTS snapshot_groups_follow AFTER DELETE ON snapshots BEGIN
    DELETE FROM snapshot_groups WHERE id = OLD.id; END;
CREATE TABLE IF NOT EXISTS trash(dataset TEXT PRIMARY KEY, origin TEXT NOT NULL, created INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS intents(seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,
    datasets TEXT NOT NULL, created REAL NOT NULL);
-- The pool's commitment (committed_bytes), one row kept by the triggers below in the same
-- transaction as the rows it sums, so that admission reads one row at any pool size. A volume
-- counts its size; a snapshot its charge, or its size while it has none; a charge without its
-- snapshot nothing. Triggers live in the file, so an older agent's writes keep it too; no
-- schema version changes, and an index without the table gets it filled once on open.
-- INSERT OR REPLACE deletes the row it replaces without delete triggers (recursive_triggers
-- is OFF, set on every connection): a BEFORE INSERT trigger takes the old row's part out. A
-- write these miss (UPDATE OR REPLACE, INSERT OR IGNORE of an existing id: none in this code)
-- is found and repaired at start-up (check_total).
CREATE TABLE IF NOT EXISTS commitment_total(one INTEGER PRIMARY KEY CHECK (one = 1), bytes INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS volumes_replaced BEFORE INSERT ON volumes BEGIN
    UPDATE commitment_total SET bytes = bytes - coalesce((SELECT size FROM volumes WHERE id = NEW.id), 0); END;
CREATE TRIGGER IF NOT EXISTS volumes_inserted AFTER INSERT ON volumes BEGIN
    UPDATE commitment_total SET bytes = bytes + NEW.size; END;
CREATE TRIGGER IF NOT EXISTS volumes_resized AFTER UPDATE OF size ON volumes BEGIN
    UPDATE commitment_total SET bytes = bytes - OLD.size + NEW.size; END;
CREATE TRIGGER IF NOT EXISTS volumes_deleted AFTER DELETE ON volumes BEGIN
    UPDATE commitment_total SET bytes = bytes - OLD.size; END;
CREATE TRIGGER IF NOT EXISTS snapshots_replaced BEFORE INSERT ON snapshots BEGIN
    UPDATE commitment_total SET bytes = bytes - coalesce((SELECT coalesce(c.bytes, s.size) FROM snapshots s
        LEFT JOIN snapshot_charges c ON c.id = s.id WHERE s.id = NEW.id), 0); END;
CREATE TRIGGER IF NOT EXISTS snapshots_inserted AFTER INSERT ON snapshots BEGIN
    UPDATE commitment_total
        SET bytes = bytes + coalesce((SELECT bytes FROM snapshot_charges WHERE id = NEW.id), NEW.size); END;
CREATE TRIGGER IF NOT EXISTS snapshots_resized AFTER UPDATE OF id, size ON snapshots BEGIN
    UPDATE commitment_total
        SET bytes = bytes - coalesce((SELECT bytes FROM snapshot_charges WHERE id = OLD.id), OLD.size)
                          + coalesce((SELECT bytes FROM snapshot_charges WHERE id = NEW.id), NEW.size); END;
-- One trigger, not two, for a deleted snapshot: its part must be read while its charge is still
-- there, and SQLite does not promise an order between triggers on the same event. The nested
-- charge delete then finds no snapshot and changes nothing.
DROP TRIGGER IF EXISTS snapshot_charges_follow;
CREATE TRIGGER IF NOT EXISTS snapshots_deleted AFTER DELETE ON snapshots BEGIN
    UPDATE commitment_total
        SET bytes = bytes - coalesce((SELECT bytes FROM snapshot_charges WHERE id = OLD.id), OLD.size);
    DELETE FROM snapshot_charges WHERE id = OLD.id; END;
CREATE TRIGGER IF NOT EXISTS charges_replaced BEFORE INSERT ON snapshot_charges BEGIN
    UPDATE commitment_total SET bytes = bytes - coalesce((SELECT c.bytes - s.size FROM snapshot_charges c
        JOIN snapshots s ON s.id = c.id WHERE c.id = NEW.id), 0); END;
CREATE TRIGGER IF NOT EXISTS charges_inserted AFTER INSERT ON snapshot_charges BEGIN
    UPDATE commitment_total SET bytes = bytes + coalesce((SELECT NEW.bytes - size FROM snapshots WHERE id = NEW.id), 0);
    END;
CREATE TRIGGER IF NOT EXISTS charges_changed AFTER UPDATE OF id, bytes ON snapshot_charges BEGIN
    UPDATE commitment_total SET bytes = bytes + coalesce((SELECT size - OLD.bytes FROM snapshots WHERE id = OLD.id), 0)
                                              + coalesce((SELECT NEW.bytes - size FROM snapshots WHERE id = NEW.id), 0);
    END;
-- Moves between storage nodes (agent/moves.py), apart from the volumes table so that no schema
-- version changes. homes: a held volume whose CSI id names another node (it moved here); it
-- lives as long as its volume row. moves: this node's side of a move out: 'moving' (the volume is
-- still held here, the one true copy) or 'moved' (a tombstone: the target committed).
CREATE TABLE IF NOT EXISTS homes(id TEXT PRIMARY KEY, node TEXT NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS homes_follow AFTER DELETE ON volumes BEGIN
    DELETE FROM homes WHERE id = OLD.id; END;
CREATE TABLE IF NOT EXISTS volume_moves(id TEXT PRIMARY KEY, state TEXT NOT NULL, peer TEXT NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS charges_deleted AFTER DELETE ON snapshot_charges BEGIN
    UPDATE commitment_total SET bytes = bytes + coalesce((SELECT size - OLD.bytes FROM snapshots WHERE id = OLD.id), 0);
    END;
"""
# What commitment_total keeps, summed over every row: its one-time fill and check_total.
_FULL_SUM = ("(SELECT coalesce(sum(size), 0) FROM volumes) + (SELECT coalesce(sum(coalesce(c.bytes, s.size)), 0) "
             "FROM snapshots s LEFT JOIN snapshot_charges c ON c.id = s.id)")


@dataclass
class VolumeRec:
    id: str
    name: str
    dataset: str
    size: int
    volblocksize: int
    compression: str
    thick: bool
    source_snapshot: str = ""
    source_volume: str = ""
    origin: str = ""  # full ZFS name of the origin snapshot ("" if not a clone)
    hosts: list[str] = field(default_factory=list)
    created: int = 0
    home: str = ""  # the node its CSI id names when that is not this node (it moved here)


@dataclass
class SnapshotRec:
    id: str  # "<volume id>@<snap>"
    name: str
    volume_id: str
    dataset: str  # full ZFS snapshot name (moves to trash with its volume)
    size: int
    created: int
    group: str = ""  # group snapshot id when it is a member of one ("" otherwise)


@dataclass
class TrashRec:
    dataset: str
    origin: str
    created: int


@dataclass(frozen=True)
class MoveRec:
    id: str
    state: str  # "moving" | "moved"
    peer: str  # the target node


@dataclass
class Intent:
    seq: int
    op: str
    datasets: list[str]
    created: float


class IndexCorrupt(Exception):
    pass


class IndexTooNew(Exception):
    """Written by a newer agent: not corrupt, and not ours to rebuild or to downgrade."""


def _vol(row: tuple[object, ...]) -> VolumeRec:
    (id_, name, ds, size, vbs, comp, thick, ssnap, svol, origin, hosts, created) = row
    return VolumeRec(str(id_), str(name), str(ds), int(str(size)), int(str(vbs)), str(comp), bool(thick),
                     str(ssnap), str(svol), str(origin), [h for h in str(hosts).split(",") if h], int(str(created)))


def _snap(row: tuple[object, ...]) -> SnapshotRec:
    (id_, name, vol, ds, size, created) = row
    return SnapshotRec(str(id_), str(name), str(vol), str(ds), int(str(size)), int(str(created)))


class Tx:
    """Row changes applied in one SQLite transaction (with the intent that covered them)."""

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._c = cur

    def put_volume(self, v: VolumeRec) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO volumes VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
            (v.id, v.name, v.dataset, v.size, v.volblocksize, v.compression, int(v.thick), v.source_snapshot,
             v.source_volume, v.origin, ",".join(v.hosts), v.created),
        )
        # A record read back without its home (lists) must not drop the row: it goes with its
        # volume row (homes_follow); a replace fires no delete trigger.
        if v.home:
            self._c.execute("INSERT OR REPLACE INTO homes VALUES(?,?)", (v.id, v.home))

    def put_move(self, m: MoveRec) -> None:
        self._c.execute("INSERT OR REPLACE INTO volume_moves VALUES(?,?,?)", (m.id, m.state, m.peer))

    def del_move(self, vid: str) -> None:
        self._c.execute("DELETE FROM volume_moves WHERE id=?", (vid,))

    def del_move_unless_moved(self, vid: str) -> None:
        self._c.execute("DELETE FROM volume_moves WHERE id=? AND state != 'moved'", (vid,))

    def del_volume(self, vid: str) -> None:
        self._c.execute("DELETE FROM volumes WHERE id=?", (vid,))

    def del_volume_dataset(self, dataset: str) -> None:
        self._c.execute("DELETE FROM volumes WHERE dataset=?", (dataset,))

    def put_snapshot(self, s: SnapshotRec) -> None:
        self._c.execute("INSERT OR REPLACE INTO snapshots VALUES(?,?,?,?,?,?)",
                        (s.id, s.name, s.volume_id, s.dataset, s.size, s.created))
        if s.group:
            self._c.execute("INSERT OR REPLACE INTO snapshot_groups VALUES(?,?)", (s.id, s.group))

    def charge_snapshot(self, sid: str, charge: int) -> None:
        self._c.execute("INSERT OR REPLACE INTO snapshot_charges VALUES(?,?)", (sid, charge))

    def del_snapshot(self, sid: str) -> None:
        self._c.execute("DELETE FROM snapshots WHERE id=?", (sid,))

    def del_snapshot_dataset(self, dataset: str) -> None:
        self._c.execute("DELETE FROM snapshots WHERE dataset=?", (dataset,))

    def move_snapshots(self, old_ds: str, new_ds: str) -> None:
        rows = self._c.execute("SELECT id, dataset FROM snapshots WHERE dataset >= ? AND dataset < ?",
                               (old_ds + "@", old_ds + "A")).fetchall()
        for sid, ds in rows:
            self._c.execute("UPDATE snapshots SET dataset=? WHERE id=?", (new_ds + str(ds)[len(old_ds):], sid))

    def move_origins(self, old_ds: str, new_ds: str) -> None:
        """Clones' origins follow a renamed volume's snapshots (ZFS updates `origin` itself)."""
        for table, key in (("volumes", "id"), ("trash", "dataset")):
            rows = self._c.execute(f"SELECT {key}, origin FROM {table} WHERE origin >= ? AND origin < ?",  # noqa: S608
                                   (old_ds + "@", old_ds + "A")).fetchall()
            for k, origin in rows:
                self._c.execute(f"UPDATE {table} SET origin=? WHERE {key}=?",  # noqa: S608
                                (new_ds + str(origin)[len(old_ds):], k))

    def put_trash(self, t: TrashRec) -> None:
        self._c.execute("INSERT OR REPLACE INTO trash VALUES(?,?,?)", (t.dataset, t.origin, t.created))

    def del_trash(self, dataset: str) -> None:
        self._c.execute("DELETE FROM trash WHERE dataset=?", (dataset,))

    def clear(self) -> None:
        """Drop every row (before a rebuild from ZFS)."""
        for table in ("volumes", "snapshots", "snapshot_charges", "snapshot_groups", "trash", "intents", "homes",
                      "volume_moves"):
            self._c.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names

    def done(self, seq: int) -> None:
        self._c.execute("DELETE FROM intents WHERE seq=?", (seq,))


class Index:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "index.sqlite")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an intent must survive power loss, or a half-made dataset could be orphaned.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA cache_size=-4096")
            # The commitment triggers count on REPLACE not firing delete triggers (see _SCHEMA).
            self._db.execute("PRAGMA recursive_triggers=OFF")
            found = self._schema_version()
            if found is not None:
                self._migrate(found)
            self._db.executescript(_SCHEMA)
            if found is None:
                self._db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
            # Once per index (new, or made before the running total existed): the triggers are
            # in place from here on, so one full sum starts it right.
            self._db.execute(f"INSERT INTO commitment_total SELECT 1, {_FULL_SUM} "  # noqa: S608 - fixed SQL
                             "WHERE NOT EXISTS (SELECT 1 FROM commitment_total)")
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise IndexCorrupt(f"index failed its integrity check: {check}")
        except sqlite3.DatabaseError as exc:
            raise IndexCorrupt(f"index {self.path} is unreadable: {exc}") from exc

    def _schema_version(self) -> int | None:
        has_meta = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if has_meta else None
        if row is None:
            return None
        if not str(row[0]).isdigit():
            raise IndexCorrupt(f"index schema {row[0]!r} is not a version number")
        return int(row[0])

    def _migrate(self, found: int) -> None:
        if found > SCHEMA_VERSION:
            raise IndexTooNew(f"index {self.path} has schema {found}, newer than this agent's {SCHEMA_VERSION}: "
                              "run the newer agent, or start with --rebuild-index to rebuild it from ZFS")
        for version in range(found, SCHEMA_VERSION):
            if version not in MIGRATIONS:
                raise IndexCorrupt(f"no migration of index schema {version} to {version + 1}")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version]:
                    self._db.execute(statement)
                self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version + 1),))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    # -- meta -----------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES(?,?)", (key, value))

    # -- intents --------------------------------------------------------------------------

    def begin(self, op: str, datasets: list[str]) -> int:
        with self._lock:
            cur = self._db.execute("INSERT INTO intents(op, datasets, created) VALUES(?,?,?)",
                                   (op, json.dumps(datasets), time.time()))
            return int(cur.lastrowid or 0)

    def intents(self) -> list[Intent]:
        with self._lock:
            rows = self._db.execute("SELECT seq, op, datasets, created FROM intents ORDER BY seq").fetchall()
        return [Intent(int(r[0]), str(r[1]), list(json.loads(r[2])), float(r[3])) for r in rows]

    # -- reads ----------------------------------------------------------------------------

    def volume(self, vid: str) -> VolumeRec | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM volumes WHERE id=?", (vid,)).fetchone()
        return None if row is None else replace(_vol(row), home=self.home(vid))

    def volume_by_dataset(self, dataset: str) -> VolumeRec | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM volumes WHERE dataset=?", (dataset,)).fetchone()
        return None if row is None else _vol(row)

    def volumes(self, after: str = "", limit: int = 1000, published_only: bool = False) -> list[VolumeRec]:
        # `hosts != ''` matches the partial index volumes_published: a page of published
        # volumes costs the page, not a scan of every idle one.
        where = "hosts != '' AND id > ?" if published_only else "id > ?"
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM volumes WHERE {where} ORDER BY id LIMIT ?",  # noqa: S608
                                    (after, limit)).fetchall()
        return [_vol(r) for r in rows]

    def published(self) -> list[VolumeRec]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM volumes WHERE hosts != ''").fetchall()
        return [_vol(r) for r in rows]

    def snapshot(self, sid: str) -> SnapshotRec | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE id=?", (sid,)).fetchone()
        return None if row is None else _snap(row)

    def snapshot_by_name(self, name: str) -> SnapshotRec | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE name=?", (name,)).fetchone()
        return None if row is None else _snap(row)

    def snapshot_by_dataset(self, dataset: str) -> SnapshotRec | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE dataset=?", (dataset,)).fetchone()
        return None if row is None else _snap(row)

    def snapshots(self, after: str = "", limit: int = 1000, volume_id: str = "") -> list[SnapshotRec]:
        with self._lock:
            if volume_id:
                rows = self._db.execute(
                    "SELECT * FROM snapshots WHERE volume_id=? AND id > ? ORDER BY id LIMIT ?",
                    (volume_id, after, limit)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM snapshots WHERE id > ? ORDER BY id LIMIT ?",
                                        (after, limit)).fetchall()
        return [_snap(r) for r in rows]

    def group_members(self, group: str) -> list[SnapshotRec]:
        """The snapshots of one group snapshot: an index lookup, whatever the number of snapshots."""
        with self._lock:
            rows = self._db.execute("SELECT s.* FROM snapshot_groups g JOIN snapshots s ON s.id = g.id "
                                    "WHERE g.group_id=? ORDER BY s.id", (group,)).fetchall()
        return [replace(_snap(r), group=group) for r in rows]

    def snapshots_in(self, dataset: str) -> list[SnapshotRec]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM snapshots WHERE dataset >= ? AND dataset < ?",
                                    (dataset + "@", dataset + "A")).fetchall()
        return [_snap(r) for r in rows]

    def has_clones_of(self, dataset: str) -> bool:
        """Does any indexed volume or trash entry have an origin snapshot of `dataset`?"""
        with self._lock:
            for table in ("volumes", "trash"):
                row = self._db.execute(f"SELECT 1 FROM {table} WHERE origin >= ? AND origin < ? LIMIT 1",  # noqa: S608
                                       (dataset + "@", dataset + "A")).fetchone()
                if row is not None:
                    return True
        return False

    def clones_of(self, dataset: str) -> list[str]:
        """Volume ids (or trash datasets) whose origin is a snapshot of `dataset`."""
        out: list[str] = []
        with self._lock:
            for table, key in (("volumes", "id"), ("trash", "dataset")):
                rows = self._db.execute(f"SELECT {key} FROM {table} WHERE origin >= ? AND origin < ?",  # noqa: S608
                                        (dataset + "@", dataset + "A")).fetchall()
                out += [str(r[0]) for r in rows]
        return out

    def home(self, vid: str) -> str:
        """The node a held volume's CSI id names, "" when it is this node (one key lookup)."""
        with self._lock:
            row = self._db.execute("SELECT node FROM homes WHERE id=?", (vid,)).fetchone()
        return "" if row is None else str(row[0])

    def homes(self) -> dict[str, str]:
        """Held volumes whose id names another node: only volumes that moved here."""
        with self._lock:
            rows = self._db.execute("SELECT id, node FROM homes").fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def move(self, vid: str) -> MoveRec | None:
        with self._lock:
            row = self._db.execute("SELECT id, state, peer FROM volume_moves WHERE id=?", (vid,)).fetchone()
        return None if row is None else MoveRec(str(row[0]), str(row[1]), str(row[2]))

    def moved_away(self) -> set[str]:
        """Tombstones: ids this node created or held that now live on another node."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM volume_moves WHERE state='moved'").fetchall()
        return {str(r[0]) for r in rows}

    def trash(self) -> list[TrashRec]:
        with self._lock:
            rows = self._db.execute("SELECT dataset, origin, created FROM trash ORDER BY dataset").fetchall()
        return [TrashRec(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    def trash_entry(self, dataset: str) -> TrashRec | None:
        with self._lock:
            r = self._db.execute("SELECT dataset, origin, created FROM trash WHERE dataset=?", (dataset,)).fetchone()
        return None if r is None else TrashRec(str(r[0]), str(r[1]), int(r[2]))

    def counts(self) -> tuple[int, int, int]:
        """(volumes, snapshots, published volumes)."""
        with self._lock:
            v = self._db.execute("SELECT count(*) FROM volumes").fetchone()[0]
            s = self._db.execute("SELECT count(*) FROM snapshots").fetchone()[0]
            e = self._db.execute("SELECT count(*) FROM volumes WHERE hosts != ''").fetchone()[0]
        return int(v), int(s), int(e)

    def volume_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM volumes").fetchone()[0])

    def committed_bytes(self) -> int:
        """The pool's commitment (zvolt/commitment.py): every volume's size, a clone's included,
        plus each snapshot's charge (its volume's size when the charge is not known). One row,
        kept by triggers: the same cost at any number of volumes."""
        with self._lock:
            row = self._db.execute("SELECT bytes FROM commitment_total").fetchone()
        return int(row[0])

    def check_total(self) -> tuple[int, int]:
        """(kept, summed): the running total against a full sum over every volume and snapshot,
        and the total set to the sum if they differ. Reads every row: start-up only."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                kept = int(self._db.execute("SELECT bytes FROM commitment_total").fetchone()[0])
                summed = int(self._db.execute(f"SELECT {_FULL_SUM}").fetchone()[0])
                if kept != summed:
                    self._db.execute("UPDATE commitment_total SET bytes=?", (summed,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return kept, summed

    def snapshot_charge(self, sid: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT bytes FROM snapshot_charges WHERE id=?", (sid,)).fetchone()
        return None if row is None else int(row[0])
