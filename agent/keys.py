"""When an encryption key is in the kernel: only while a volume under its root is published or changed.

A volume created encrypted is its own encryption root; its clones share the origin's root and
key (ZFS requires it). A key is loaded for a create, clone or expand and unloaded after it, and
loaded for a publish and unloaded with the last unpublish. ZFS itself tells whether another
volume under the same root is still in use: `zfs unload-key` refuses while any of its zvols is
open (an nvmet namespace holds it), and the key then stays loaded, with a log line saying why.
Operations in flight in this process are counted per root, so one never loses its key to
another's unload.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.keystore import KeyStore, KeyStoreError
from agent.zfs import EKEY, KEY_BYTES, Zfs, ZfsError
from zvolt.errors import ZvoltError, internal, invalid, precondition

_log = logging.getLogger("zvolt.agent.keys")


def check_key(key: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise invalid(f"an encryption key must be {KEY_BYTES} bytes (64 hex characters in the Secret), "
                      f"not {len(key)} bytes")
    return key


class Keys:
    def __init__(self, zfs: Zfs, store: KeyStore | None) -> None:
        self.zfs = zfs
        self.store = store
        self._mu = threading.Lock()
        self._users: dict[str, int] = {}
        self._root_locks: dict[str, threading.Lock] = {}

    def _lock(self, root: str) -> threading.Lock:
        with self._mu:
            return self._root_locks.setdefault(root, threading.Lock())

    def root_of(self, dataset: str) -> str:
        """The encryption root of a volume or snapshot ("" when it is not encrypted): one scoped read."""
        props = self.zfs.get_props(dataset.partition("@")[0], ("encryptionroot",)) or {}
        value = props.get("encryptionroot", "-")
        return "" if value in ("-", "") else value

    def _load(self, root: str, key: bytes, what: str) -> None:
        """Load (or, when loaded already, check) the root's key. A wrong key is the caller's error."""
        try:
            try:
                self.zfs.load_key(root, key)
            except ZfsError as exc:
                if exc.errno != errno.EALREADY:
                    raise
                self.zfs.load_key(root, key, noop=True)  # loaded already: still check it is this key
        except ZfsError as exc:
            if exc.errno == EKEY:
                raise invalid(f"{what}: the encryption key in the Secret is not the key of {root.rsplit('/', 1)[-1]} "
                              "(a branch or restore uses its origin's key)") from exc
            raise internal(f"{what}: loading the encryption key failed: {exc}") from exc

    @contextmanager
    def using(self, root: str, key: bytes, what: str) -> Iterator[None]:
        """The root's key loaded for the duration of one change (create, clone, expand, rotate)."""
        with self._lock(root):
            with self._mu:
                self._users[root] = self._users.get(root, 0) + 1
            try:
                self._load(root, check_key(key), what)
            except BaseException:
                self._drop_user(root)
                raise
        try:
            yield
        finally:
            self._drop_user(root)
            self.release(root)

    def _drop_user(self, root: str) -> None:
        with self._mu:
            left = self._users.get(root, 1) - 1
            if left:
                self._users[root] = left
            else:
                self._users.pop(root, None)

    def release(self, root: str) -> None:
        """Unload the root's key unless something still uses it: a change in flight here, or (ZFS
        says busy) an open zvol under it."""
        with self._lock(root):
            if self._users.get(root):
                return
            try:
                self.zfs.unload_key(root)
            except ZfsError as exc:
                if exc.errno == errno.EBUSY:
                    _log.info("encryption key kept loaded: a volume under its root is still in use",
                              extra={"fields": {"root": root}})
                elif exc.errno not in (errno.EALREADY, errno.ENOENT):
                    _log.warning("encryption key could not be unloaded", extra={"fields": {"root": root,
                                                                                          "error": str(exc)}})
                return
            _log.info("encryption key unloaded", extra={"fields": {"root": root}})

    # -- published volumes ----------------------------------------------------------------

    def _need_store(self, what: str) -> KeyStore:
        if self.store is None:
            raise precondition(f"{what}: this storage node has no key wrapping file (agent --key-wrapping-file), "
                               "so it cannot keep an encrypted volume's key across a reboot; encrypted volumes "
                               "cannot be created or published here")
        return self.store

    def keep(self, vid: str, key: bytes, what: str) -> None:
        """A publish (inside `using`, which loaded and checked the key): kept wrapped for a reboot."""
        self._need_store(what).put(vid, check_key(key))

    def forget(self, vid: str, root: str) -> None:
        """The last unpublish: the entry goes, and the key with it unless the root is still in use."""
        if self.store is not None:
            self.store.remove(vid)
        if root:
            self.release(root)

    def forget_kept(self, vid: str, dataset: str) -> None:
        """`forget` for a volume that may have no entry: the encryption root is read only when it has one."""
        if self.store is not None and self.store.has(vid):
            self.forget(vid, self.root_of(dataset))

    def rewrap(self, root: str, key: bytes, dataset_of: Callable[[str], str]) -> None:
        """After a rotation: the kept entries of published volumes under `root` take the new key
        (one read per kept entry; rotation is rare and never on a publish path)."""
        if self.store is None:
            return
        for vid in self.store.ids():
            dataset = dataset_of(vid)
            if dataset and self.root_of(dataset) == root:
                self.store.put(vid, key)

    def require_store(self, what: str) -> None:
        self._need_store(what)

    def restore(self, vid: str, dataset: str) -> None:
        """Start-up: load the key of one published volume from its wrapped entry. Raises with a
        message for the volume's condition when it cannot."""
        if self.store is None or not self.store.has(vid):
            return  # not encrypted: only encrypted volumes have an entry (a stat, not a ZFS read)
        props = self.zfs.get_props(dataset, ("encryptionroot", "keystatus")) or {}
        root = props.get("encryptionroot", "-")
        if root in ("-", "") or props.get("keystatus") == "available":
            return  # ZFS kept the key: an agent restart, not a reboot
        try:
            key = self.store.get(vid)
        except KeyStoreError as exc:
            raise precondition(str(exc)) from exc
        if key is None:
            raise precondition(f"volume {vid} is encrypted and no key is kept for it on this node; publish it "
                               "again to give its key")
        try:
            with self._lock(root):
                self._load(root, key, f"restoring volume {vid}")
        except ZvoltError as exc:
            raise precondition(exc.message) from exc
        _log.info("encryption key loaded for a published volume", extra={"fields": {"volume": vid, "root": root}})
