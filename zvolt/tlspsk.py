"""NVMe/TCP TLS pre-shared keys: the key format, the retained PSK, and the PSK identity.

One rule for both ends: the agent (target) and the node plugin (host) each turn a volume's
configured PSK into the same retained PSK and file it in the kernel's `.nvme` keyring under the
same identity (zvolt/keyring.py); the kernel hands it to `tlshd`, which does the TLS 1.3
handshake. Nothing else in zvolt derives or names a PSK.

- Configured PSK, in the interchange format of the NVMe/TCP transport spec (what `nvme
  gen-tls-key` prints): ``NVMeTLSkey-1:<hh>:<base64(key || crc32(key) little-endian)>:``, hh 01
  = SHA-256 and a 32-byte key, 02 = SHA-384 and 48 bytes.
- Retained PSK (spec 3.6.1.3): HKDF-Extract with the configured key, then HKDF-Expand-Label
  ("HostNQN", host NQN) to the key's length, so a key given to one host NQN is worth nothing
  under another.
- Identity (spec 3.6.1.3, version 0, retained): ``NVMe0R<hh> <host NQN> <subsystem NQN>``, the
  string the kernel's host side looks up and sends in its ClientHello.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from zvolt import keyformat
from zvolt.names import check_nqn

KEY_LENGTHS = {1: 32, 2: 48}
_HASHES = {1: hashlib.sha256, 2: hashlib.sha384}
_FORMAT = re.compile(r"^NVMeTLSkey-1:(0[12]):([A-Za-z0-9+/]+={0,2}):$")


class PskError(ValueError):
    pass


def encode(key: bytes, hash_id: int = 1) -> str:
    if KEY_LENGTHS.get(hash_id) != len(key):
        raise PskError(f"a TLS PSK with hash {hash_id:02d} is {KEY_LENGTHS.get(hash_id, '32 or 48')} bytes, "
                       f"not {len(key)}")
    return f"NVMeTLSkey-1:{hash_id:02d}:{keyformat.wrap(key)}:"


def decode(psk: str) -> tuple[int, bytes]:
    """(hash id, key) of a configured PSK; PskError, never repeating the key, if it is malformed."""
    m = _FORMAT.fullmatch(psk or "")
    if not m:
        raise PskError("not an NVMeTLSkey-1 PSK")
    try:
        key = keyformat.unwrap(m.group(2), "NVMeTLSkey-1 PSK")
    except keyformat.KeyFormatError as exc:
        raise PskError(str(exc)) from None
    hash_id = int(m.group(1))
    if len(key) != KEY_LENGTHS[hash_id]:
        raise PskError(f"NVMeTLSkey-1 PSK with hash {hash_id:02d} needs a {KEY_LENGTHS[hash_id]}-byte key")
    return hash_id, key


def generate(hash_id: int = 1) -> str:
    return encode(secrets.token_bytes(KEY_LENGTHS[hash_id]), hash_id)


def _expand_label(hash_name: str, prk: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label of TLS 1.3 (RFC 8446 7.1)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def retained(psk: str, host_nqn: str) -> bytes:
    hash_id, key = decode(psk)
    digest = _HASHES[hash_id]
    prk = hmac.new(bytes(digest().digest_size), key, digest).digest()  # HKDF-Extract, zero salt
    return _expand_label(digest().name, prk, b"HostNQN", check_nqn(host_nqn).encode(), len(key))


def identity(psk: str, host_nqn: str, subsystem_nqn: str) -> str:
    return f"NVMe0R{decode(psk)[0]:02d} {check_nqn(host_nqn)} {check_nqn(subsystem_nqn)}"


def identities(host_nqn: str, subsystem_nqn: str) -> list[str]:
    """Every identity a PSK of this host and subsystem can have (one per hash): what a caller
    without the key (a disconnect) removes."""
    return [f"NVMe0R{h:02d} {check_nqn(host_nqn)} {check_nqn(subsystem_nqn)}" for h in sorted(KEY_LENGTHS)]
