"""The key representation NVMe shares between DH-HMAC-CHAP secrets (DHHC-1) and TLS PSKs
(NVMeTLSkey-1): base64 of the key followed by its CRC-32, little-endian. Each format's prefix,
hash field and key lengths stay with it (agent/dhchap.py, zvolt/tlspsk.py)."""

from __future__ import annotations

import base64
import binascii
import zlib


class KeyFormatError(ValueError):
    pass


def wrap(key: bytes) -> str:
    return base64.b64encode(key + zlib.crc32(key).to_bytes(4, "little")).decode()


def unwrap(text: str, what: str) -> bytes:
    """The key in `text`; KeyFormatError naming `what`, never repeating the text."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise KeyFormatError(f"{what} is not valid base64") from exc
    key, crc = raw[:-4], raw[-4:]
    if zlib.crc32(key).to_bytes(4, "little") != crc:
        raise KeyFormatError(f"{what} CRC does not match its key")
    return key
