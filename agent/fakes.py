"""In-memory ZFS with the refusal semantics measured on the real stack (lab.md).

Used by unit tests, the CSI tests and the large-scale simulation, so it stays lean: one dict
of datasets, no per-object threads. `crash_at` lets a test stop the "process" right before or
right after a chosen mutation to check that intents + recovery converge.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from agent import nvmet
from agent.exports import ExportConfig, Exports
from agent.index import Index
from agent.keys import Keys
from agent.keystore import KeyStore
from agent.moves import Moves
from agent.recovery import Readiness, Recovery
from agent.volumes import AgentConfig, Volumes
from agent.zfs import EKEY, ENCRYPTION_PROPS, KEY_BYTES, READ_PROPS, Space, ZfsError, check_full_name


class Crash(BaseException):
    """Raised by FakeZfs to simulate the agent dying mid-operation (not an Exception on purpose)."""


@dataclass
class _Ds:
    kind: str  # "filesystem" | "volume" | "snapshot"
    props: dict[str, str] = field(default_factory=dict)
    origin: str = ""
    defer: bool = False


class FakeZfs:
    def __init__(self, pool_size: int = 1 << 40) -> None:
        self.ds: dict[str, _Ds] = {}
        self.pool_size = pool_size
        self.calls: list[str] = []
        self.busy_once: set[str] = set()  # names whose next destroy fails with EBUSY (udev race)
        self.crash_at: tuple[str, str] | None = None  # (op, "before" | "after")
        self.fail_set: dict[str, int] = {}  # dataset -> errno its `zfs set` fails with (a bad volume)
        self.settles = 0
        self.snapshot_batches: list[tuple[str, ...]] = []  # one entry per snapshot() call: its names
        # Native encryption: encryption root -> its wrapping key, and the roots whose key is loaded.
        self.keys: dict[str, bytes] = {}
        self.loaded: set[str] = set()
        self._lock = threading.RLock()

    # -- helpers --------------------------------------------------------------------------

    def _hook(self, op: str, when: str) -> None:
        if self.crash_at == (op, when):
            self.crash_at = None
            raise Crash(f"simulated crash {when} {op}")

    def _need(self, name: str) -> _Ds:
        d = self.ds.get(name)
        if d is None:
            raise ZfsError(errno.ENOENT, f"dataset {name} does not exist")
        return d

    def _parent_must_exist(self, name: str) -> None:
        parent = name.rsplit("/", 1)[0]
        if "/" in name and parent not in self.ds and parent != name.split("/")[0]:
            raise ZfsError(errno.ENOENT, f"parent of {name} does not exist")

    def _children(self, name: str) -> list[str]:
        return [n for n in self.ds if n.startswith(name + "/") or n.startswith(name + "@")]

    def _root_of(self, name: str) -> str:
        d = self.ds.get(name.partition("@")[0])
        return d.props.get("encryptionroot", "") if d is not None else ""

    def _need_key(self, name: str, what: str) -> None:
        root = self._root_of(name)
        if root and root not in self.loaded:
            raise ZfsError(EKEY, f"cannot {what} '{name}': permission denied")

    def _used(self) -> int:
        total = 0
        for d in self.ds.values():
            if d.kind == "volume":
                total += int(d.props.get("refreservation", "0") or 0) or int(d.props.get("used", "0"))
        return total

    # -- Zfs protocol ---------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return check_full_name(name) in self.ds

    def create_filesystem(self, name: str) -> None:
        with self._lock:
            check_full_name(name)
            if name in self.ds:
                raise ZfsError(errno.EEXIST, f"{name} exists")
            self._parent_must_exist(name)
            self.ds[name] = _Ds("filesystem")

    def create_volume(self, name: str, size: int, props: Mapping[str, int | str], key: bytes = b"") -> None:
        with self._lock:
            if key and len(key) != KEY_BYTES:
                raise ZfsError(errno.EINVAL, f"an encryption key must be {KEY_BYTES} bytes, not {len(key)}")
            check_full_name(name)
            self.calls.append(f"create {name}")
            self._hook("create_volume", "before")
            if name in self.ds:
                raise ZfsError(errno.EEXIST, f"{name} exists")
            self._parent_must_exist(name)
            p = {k: str(v) for k, v in props.items()}
            p.setdefault("volblocksize", "16384")
            p.setdefault("compression", "lz4")
            p.setdefault("volmode", "default")
            p.setdefault("refreservation", "0")
            p.update(volsize=str(size), used="57344")
            if key:
                p.update(ENCRYPTION_PROPS, encryptionroot=name)
                self.keys[name] = key
                self.loaded.add(name)  # `zfs create` leaves the new key loaded
            self.ds[name] = _Ds("volume", p)
            self.busy_once.add(name)
            self._hook("create_volume", "after")

    def snapshot(self, snapshots: Sequence[str], user_props: Mapping[str, str]) -> None:
        with self._lock:
            for s in snapshots:
                check_full_name(s)
                self.calls.append(f"snapshot {s}")
            self.snapshot_batches.append(tuple(snapshots))
            self._hook("snapshot", "before")
            for s in snapshots:
                if s in self.ds:
                    raise ZfsError(errno.EEXIST, f"{s} exists")
                src = self._need(s.split("@")[0])
                self.ds[s] = _Ds("snapshot", {
                    **dict(user_props), "volsize": src.props.get("volsize", "0"),
                    "volblocksize": src.props.get("volblocksize", "16384"), "used": "0",
                })
            self._hook("snapshot", "after")

    def clone(self, name: str, origin: str, props: Mapping[str, int | str]) -> None:
        with self._lock:
            check_full_name(name)
            self.calls.append(f"clone {origin} {name}")
            self._hook("clone", "before")
            if name in self.ds:
                raise ZfsError(errno.EEXIST, f"{name} exists")
            snap = self._need(origin)
            if snap.kind != "snapshot":
                raise ZfsError(errno.EINVAL, f"{origin} is not a snapshot")
            self._parent_must_exist(name)
            # A clone inherits volblocksize/compression from its origin, volmode from its parent.
            p = {"volsize": snap.props["volsize"], "volblocksize": snap.props["volblocksize"],
                 "compression": "lz4", "volmode": "default", "refreservation": "0", "used": "8192"}
            root = self._root_of(origin)
            if root:  # and its encryption root (and so its key) from its origin
                p.update(ENCRYPTION_PROPS, encryptionroot=root)
            p.update({k: str(v) for k, v in props.items()})
            self.ds[name] = _Ds("volume", p, origin=origin)
            self.busy_once.add(name)
            self._hook("clone", "after")

    def destroy(self, name: str) -> None:
        with self._lock:
            self.calls.append(f"destroy {name}")
            self._hook("destroy", "before")
            d = self._need(check_full_name(name))
            if d.kind == "snapshot":
                raise ZfsError(errno.EINVAL, "lzc_destroy of a snapshot: use destroy_snapshots")
            if self._children(name):
                raise ZfsError(errno.EBUSY, f"{name} has children")
            if name in self.busy_once:
                self.busy_once.discard(name)
                raise ZfsError(errno.EBUSY, f"dataset {name} is busy")
            del self.ds[name]
            if d.origin and d.origin in self.ds:
                o = self.ds[d.origin]
                if o.defer and not self.clones_of(d.origin):
                    del self.ds[d.origin]
            self._hook("destroy", "after")

    def destroy_snapshots(self, snapshots: Sequence[str], defer: bool) -> None:
        with self._lock:
            for s in snapshots:
                self.calls.append(f"destroy_snap {s} defer={defer}")
            self._hook("destroy_snapshots", "before")
            for s in snapshots:
                check_full_name(s)
                d = self.ds.get(s)
                if d is None:
                    continue  # lzc_destroy_snaps ignores snapshots that do not exist
                if self.clones_of(s):
                    if not defer:
                        raise ZfsError(errno.EEXIST, f"snapshot {s} has dependent clones")
                    d.defer = True
                else:
                    del self.ds[s]
            self._hook("destroy_snapshots", "after")

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            check_full_name(old)
            check_full_name(new)
            self.calls.append(f"rename {old} {new}")
            self._hook("rename", "before")
            self._need(old)
            if new in self.ds:
                raise ZfsError(errno.EEXIST, f"{new} exists")
            self._parent_must_exist(new)
            moves = {n: new + n[len(old):] for n in [old, *self._children(old)]}
            for src, dst in moves.items():
                self.ds[dst] = self.ds.pop(src)
            if old in self.keys:  # the encryption root moves with its name
                self.keys[new] = self.keys.pop(old)
                if old in self.loaded:
                    self.loaded.discard(old)
                    self.loaded.add(new)
                for d in self.ds.values():
                    if d.props.get("encryptionroot") == old:
                        d.props["encryptionroot"] = new
            for d in self.ds.values():
                if d.origin in moves:
                    d.origin = moves[d.origin]
            self.busy_once.discard(old)
            self._hook("rename", "after")

    def promote(self, name: str) -> None:
        with self._lock:
            d = self._need(check_full_name(name))
            if not d.origin:
                raise ZfsError(errno.EINVAL, f"{name} is not a clone")
            origin_vol, _, snap = d.origin.partition("@")
            if f"{name}@{snap}" in self.ds:
                raise ZfsError(errno.EEXIST, "conflicting snapshot")
            old_origin = self.ds[origin_vol].origin
            moved = self.ds.pop(d.origin)
            self.ds[f"{name}@{snap}"] = moved
            for other in self.ds.values():
                if other.origin == d.origin:
                    other.origin = f"{name}@{snap}"
            self.ds[origin_vol].origin = f"{name}@{snap}"
            d.origin = old_origin

    def set_props(self, name: str, props: Mapping[str, str]) -> None:
        with self._lock:
            self.calls.append(f"set {name} {','.join(sorted(props))}")
            self._hook("set_props", "before")
            if name in self.fail_set:
                raise ZfsError(self.fail_set[name], f"cannot set property for '{name}': injected failure")
            d = self._need(check_full_name(name))
            if "volsize" in props:
                self._need_key(name, "set property for")
            d.props.update(props)
            if "volsize" in props and d.props.get("refreservation", "0") not in ("0", "none"):
                d.props["refreservation"] = props["volsize"]
            self._hook("set_props", "after")

    def get_props(self, name: str, props: Sequence[str] = READ_PROPS) -> dict[str, str] | None:
        with self._lock:
            d = self.ds.get(check_full_name(name))
            if d is None:
                return None
            out: dict[str, str] = {}
            for p in props:
                if p == "type":
                    out[p] = d.kind
                elif p == "origin":
                    out[p] = d.origin or "-"
                elif p == "defer_destroy":
                    out[p] = "on" if d.defer else "off"
                elif p == "clones":
                    out[p] = ",".join(self.clones_of(name))
                elif p in ("encryptionroot", "keystatus", "encryption"):
                    root = self._root_of(name)
                    value = {"encryptionroot": root, "encryption": "aes-256-gcm" if root else "off",
                             "keystatus": "available" if root in self.loaded else "unavailable"}[p]
                    out[p] = value if root or p == "encryption" else "-"
                elif p == "volblocksize" and d.kind == "snapshot":
                    out[p] = "-"  # as real ZFS reports it (the clone below still inherits it)
                elif ":" in p and d.kind == "snapshot" and p not in d.props:
                    # A user property a snapshot does not set is inherited from its dataset (lab:
                    # `zfs get zvolt:id v@s` -> "inherited from v").
                    head = self.ds.get(name.partition("@")[0])
                    out[p] = head.props.get(p, "-") if head is not None else "-"
                else:
                    out[p] = d.props.get(p, "-")
            return out

    def snapshots_of(self, name: str) -> list[str]:
        with self._lock:
            return sorted(n for n in self.ds if n.startswith(name + "@"))

    def with_snapshots(self, name: str, props: Sequence[str]) -> dict[str, dict[str, str]]:
        with self._lock:
            names = [n for n in (name, *self.snapshots_of(name)) if n in self.ds]
            return {n: self.get_props(n, props) or {} for n in names}

    def clones_of(self, snapshot: str) -> list[str]:
        return sorted(n for n, d in self.ds.items() if d.origin == snapshot)

    def space(self, name: str) -> Space:
        used = self._used()
        return Space(available=max(self.pool_size - used, 0), used=used)

    def walk(self, parent: str) -> Iterator[dict[str, str]]:
        for n in sorted(self.ds):
            if (n.startswith(parent + "/") or n.startswith(parent + "@")) and self.ds[n].kind != "filesystem":
                props = self.get_props(n)
                if props is not None:
                    yield {"name": n, **props}

    def device_path(self, name: str) -> str:
        return "/dev/zvol/" + check_full_name(name)

    def device_ready(self, name: str) -> bool:
        d = self.ds.get(name)
        root = self._root_of(name)
        return d is not None and d.kind == "volume" and d.props.get("volmode") == "dev" and (
            not root or root in self.loaded)

    def settle(self) -> None:
        self.settles += 1
        self.busy_once.clear()

    def load_key(self, root: str, key: bytes, noop: bool = False) -> None:
        with self._lock:
            self.calls.append(f"load-key {root}{' -n' if noop else ''}")
            self._need(check_full_name(root))
            if root not in self.keys:
                raise ZfsError(errno.EINVAL, f"'{root}' is not an encryption root")
            if key != self.keys[root]:
                raise ZfsError(EKEY, f"Key load error: Incorrect key provided for '{root}'.")
            if noop:
                return
            if root in self.loaded:
                raise ZfsError(errno.EALREADY, f"Key load error: Key already loaded for '{root}'.")
            self.loaded.add(root)

    def unload_key(self, root: str) -> None:
        with self._lock:
            self.calls.append(f"unload-key {root}")
            if root not in self.loaded:
                raise ZfsError(errno.EALREADY, f"Key unload error: Key already unloaded for '{root}'.")
            # An active zvol (nvmet holds its device open) keeps its root's key in use.
            if any(d.props.get("encryptionroot") == root and d.props.get("volmode") == "dev" for d in self.ds.values()):
                raise ZfsError(errno.EBUSY, f"Key unload error: '{root}' is busy.")
            self.loaded.discard(root)

    def change_key(self, root: str, key: bytes) -> None:
        with self._lock:
            self.calls.append(f"change-key {root}")
            if root not in self.loaded:
                raise ZfsError(EKEY, f"Key change error: Key must be loaded for '{root}'.")
            self.keys[root] = key

    # -- streams: a JSON stand-in for `zfs send -R [-I base]` (properties and snapshots) ------

    def send(self, snapshot: str, base: str, sink: int) -> None:
        with self._lock:
            self.calls.append(f"send {snapshot} from {base or '-'}")
            self._hook("send", "before")
            ds = check_full_name(snapshot).partition("@")[0]
            vol = self._need(ds)
            self._need(snapshot)
            if base:
                self._need(check_full_name(base))
            snaps = [n for n, d in self.ds.items() if n.startswith(ds + "@") and not d.defer]
            snaps = snaps[:snaps.index(snapshot) + 1]
            if base:
                snaps = snaps[snaps.index(base) + 1:]
            payload = {"base": base.partition("@")[2], "props": vol.props,
                       "snaps": [[n.partition("@")[2], self.ds[n].props] for n in snaps]}
        data = json.dumps(payload).encode() + b"\nEND\n"
        view = memoryview(data)
        while view:
            view = view[os.write(sink, view):]

    def receive(self, dataset: str, props: Mapping[str, str], exclude: Sequence[str], source: int) -> None:
        chunks = []
        while True:
            chunk = os.read(source, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        with self._lock:
            self.calls.append(f"receive {dataset}")
            self._hook("receive", "before")
            if not data.endswith(b"\nEND\n"):
                raise ZfsError(errno.EIO, "cannot receive: incomplete stream")
            payload = json.loads(data[:-5])
            ds = check_full_name(dataset)
            sent = {k: v for k, v in payload["props"].items() if k not in exclude}
            if payload["base"]:
                if f"{ds}@{payload['base']}" not in self.ds:
                    raise ZfsError(errno.ENOENT, f"cannot receive incremental stream: {ds}@{payload['base']} "
                                   "does not exist")
                self.ds[ds].props.update({**sent, **props})
            else:
                if ds in self.ds:
                    raise ZfsError(errno.EEXIST, f"cannot receive new filesystem stream: {ds} exists")
                self._parent_must_exist(ds)
                self.ds[ds] = _Ds("volume", {**sent, **props})
            for snap, snap_props in payload["snaps"]:
                self.ds[f"{ds}@{snap}"] = _Ds("snapshot", dict(snap_props))
            self._hook("receive", "after")

    # -- test helpers ---------------------------------------------------------------------

    def volumes(self, under: str) -> list[str]:
        return sorted(n for n, d in self.ds.items() if d.kind == "volume" and n.startswith(under + "/"))


@dataclass
class FakeNode:
    """A whole agent on fakes: FakeZfs + an emulated configfs tree + an index in `state_dir`."""

    zfs: FakeZfs
    root: nvmet.Root
    index: Index
    volumes: Volumes
    readiness: Readiness
    recovery: Recovery
    moves: Moves

    def restart(self, state_dir: str) -> FakeNode:
        """A new agent process over the same ZFS and configfs (the old index handle is dropped)."""
        self.index.close()
        return make_node(state_dir, self.root.path, zfs=self.zfs, node=self.volumes.cfg.node, recover=True,
                         keystore=self.volumes.keys.store, pool=self.volumes.cfg.pool,
                         move_address=self.moves.address, nvme_address=self.volumes.cfg.nvme_address)


def make_node(state_dir: str, configfs_dir: str, *, zfs: FakeZfs | None = None, node: str = "storage-0",
              pool: str = "tank", recover: bool = True, pool_size: int = 1 << 40,
              keystore: KeyStore | None = None, move_address: str = "127.0.0.1:0",
              nvme_address: str = "10.42.0.1") -> FakeNode:
    zfs = zfs or FakeZfs(pool_size=pool_size)
    if pool not in zfs.ds:
        zfs.ds[pool] = _Ds("filesystem")
    root = nvmet.Root(configfs_dir, emulate=True)
    root.init_tree()
    index = Index(state_dir)
    cfg = AgentConfig(node=node, pool=pool, parent=f"{pool}/zvolt", nvme_address=nvme_address, nvme_port="4420")
    exports = Exports(zfs, root, ExportConfig(node, nvme_address, "4420", device_timeout=1.0))
    volumes = Volumes(cfg, zfs, index, exports, keys=Keys(zfs, keystore))
    readiness = Readiness()
    recovery = Recovery(zfs, index, exports, volumes, readiness)
    if recover:
        recovery.run()
    return FakeNode(zfs, root, index, volumes, readiness, recovery, Moves(volumes, zfs, move_address))
