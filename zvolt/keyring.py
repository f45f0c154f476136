"""Adapter for the kernel's `.nvme` keyring: the only place that calls add_key(2) or keyctl(2).

NVMe/TCP TLS finds its PSKs there on both ends: the host side looks a PSK up by identity when it
connects with `tls`, and `tlshd` on the target looks up the identity the host sent. Keys are of
the kernel's "psk" type (nvme-keyring module). The keyring is linked into this process's session
keyring once, as tlshd does: only a possessed key may be searched for and invalidated.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Protocol

# Syscall numbers per architecture (add_key, keyctl).
_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}
_KEYCTL_LINK, _KEYCTL_SEARCH, _KEYCTL_INVALIDATE = 8, 10, 21
_KEY_SPEC_SESSION_KEYRING = -3
KEY_TYPE = b"psk"


class KeyringError(OSError):
    pass


class Keyring(Protocol):
    def put(self, description: str, payload: bytes) -> None: ...
    def remove(self, description: str) -> bool: ...
    def has(self, description: str) -> bool: ...


class KernelKeyring:
    """The kernel's `.nvme` keyring, found by name in /proc/keys at first use."""

    def __init__(self, proc_keys: str = "/proc/keys") -> None:
        self._proc_keys = proc_keys
        self._id = 0
        # Unknown architecture: (0, 0), refused at first use, so that a node without TLS volumes runs.
        self._add_key, self._keyctl = _SYSCALLS.get(platform.machine(), (0, 0))
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long

    def _fail(self, what: str) -> KeyringError:
        err = ctypes.get_errno()
        return KeyringError(err, f"{what}: {os.strerror(err)}")

    def _ctl(self, *args: int | bytes) -> int:
        argv = [ctypes.c_long(a) if isinstance(a, int) else ctypes.c_char_p(a) for a in args]
        return int(self._libc.syscall(ctypes.c_long(self._keyctl), *argv))

    def keyring(self) -> int:
        if not self._keyctl:
            raise KeyringError(f"the .nvme keyring adapter does not know the syscalls of {platform.machine()}")
        if not self._id:
            found = 0
            with open(self._proc_keys) as f:
                for line in f:
                    # "<id> <flags> <usage> <timeout> <perm> <uid> <gid> keyring .nvme: <n>"
                    words = line.split()
                    if len(words) >= 9 and words[7] == "keyring" and words[8].rstrip(":") == ".nvme":
                        found = int(words[0], 16)
                        break
            if not found:
                raise KeyringError("the kernel has no .nvme keyring: NVMe/TCP TLS needs CONFIG_NVME_KEYRING "
                                   "(module nvme-keyring, loaded with nvme-tcp or nvmet-tcp)")
            if self._ctl(_KEYCTL_LINK, found, _KEY_SPEC_SESSION_KEYRING) < 0:
                raise self._fail("linking the .nvme keyring into the session keyring")
            self._id = found
        return self._id

    def _search(self, description: str) -> int:
        got = self._ctl(_KEYCTL_SEARCH, self.keyring(), KEY_TYPE, description.encode(), 0)
        if got < 0:
            if ctypes.get_errno() in (2, 126, 128):  # ENOENT, ENOKEY, EKEYREVOKED
                return 0
            raise self._fail(f"searching the .nvme keyring for {description.split(' ')[0]}")
        return got

    def put(self, description: str, payload: bytes) -> None:
        got = self._libc.syscall(ctypes.c_long(self._add_key), ctypes.c_char_p(KEY_TYPE),
                                 ctypes.c_char_p(description.encode()), ctypes.c_char_p(payload),
                                 ctypes.c_size_t(len(payload)), ctypes.c_long(self.keyring()))
        if got < 0:
            raise self._fail("adding a TLS PSK to the .nvme keyring")

    def remove(self, description: str) -> bool:
        key = self._search(description)
        if not key:
            return False
        if self._ctl(_KEYCTL_INVALIDATE, key) < 0:
            raise self._fail("invalidating a TLS PSK in the .nvme keyring")
        return True

    def has(self, description: str) -> bool:
        return self._search(description) != 0


class MemoryKeyring:
    """Keyring in a dict: unit tests."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def put(self, description: str, payload: bytes) -> None:
        self.keys[description] = payload

    def remove(self, description: str) -> bool:
        return self.keys.pop(description, None) is not None

    def has(self, description: str) -> bool:
        return description in self.keys
