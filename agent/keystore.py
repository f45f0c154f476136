"""The keys of published encrypted volumes, kept on the storage node only wrapped.

ZFS keeps a loaded key across an agent restart but not across a reboot, and the controller sends
a volume's key only with a create, publish or expand. So that published volumes come back after
a reboot, each one's key is kept here while it is published: AES-256-GCM under the node wrapping
key (a file the operator provides: the chart mounts it from a Kubernetes Secret), one 0600 file
per volume under the state dir, written and removed durably. One file per volume keeps a publish
O(1) and lets start-up read exactly the published volumes' entries.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from zvolt import names
from zvolt.files import write_private_json

WRAPPING_KEY_BYTES = 32
_NONCE_BYTES = 12
_FORMAT = 1


class KeyStoreError(Exception):
    """A wrapping key or an entry that cannot be used; the message never holds key material."""


def read_wrapping_key(path: str) -> bytes:
    """The node wrapping key: 64 hex characters in a file (`openssl rand -hex 32`)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise KeyStoreError(f"cannot read the key wrapping file {path}: {exc.strerror}") from exc
    if len(text) != 2 * WRAPPING_KEY_BYTES or not all(c in string.hexdigits for c in text):
        raise KeyStoreError(f"the key wrapping file {path} must hold {2 * WRAPPING_KEY_BYTES} hex characters "
                            "(make one with: openssl rand -hex 32)")
    return bytes.fromhex(text)


class KeyStore:
    def __init__(self, state_dir: str, wrapping_key: bytes) -> None:
        if len(wrapping_key) != WRAPPING_KEY_BYTES:
            raise KeyStoreError(f"the node wrapping key must be {WRAPPING_KEY_BYTES} bytes")
        self.dir = Path(state_dir) / "keys"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        # Imported here: a node without encrypted volumes (no wrapping key) needs no cryptography.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(wrapping_key)

    def _path(self, vid: str) -> Path:
        return self.dir / f"{names.check_id(vid)}.json"

    def put(self, vid: str, key: bytes) -> None:
        nonce = os.urandom(_NONCE_BYTES)
        # The volume id is the associated data: an entry copied onto another volume's name fails.
        sealed = self._aead.encrypt(nonce, key, vid.encode())
        write_private_json(self._path(vid), {"format": _FORMAT, "nonce": nonce.hex(), "sealed": sealed.hex()})

    def get(self, vid: str) -> bytes | None:
        """The volume's key, or None when it has no entry. KeyStoreError: unreadable or not
        sealed by this node's wrapping key (a changed or wrong wrapping key)."""
        path = self._path(vid)
        try:
            entry = json.loads(path.read_text())
            nonce, sealed = bytes.fromhex(entry["nonce"]), bytes.fromhex(entry["sealed"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"key entry of volume {vid} is unreadable ({type(exc).__name__})") from exc
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(nonce, sealed, vid.encode())
        except InvalidTag as exc:
            raise KeyStoreError(f"key entry of volume {vid} was not sealed by this node's wrapping key") from exc
        except ValueError as exc:  # a nonce of the wrong size
            raise KeyStoreError(f"key entry of volume {vid} is unreadable ({exc})") from exc

    def ids(self) -> list[str]:
        """Volumes with an entry (one per published encrypted volume)."""
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def has(self, vid: str) -> bool:
        return self._path(vid).exists()

    def remove(self, vid: str) -> None:
        try:
            self._path(vid).unlink()
        except FileNotFoundError:
            return
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the removal must survive a power cut as the write did
        finally:
            os.close(dir_fd)
