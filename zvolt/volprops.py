"""ZFS volume properties a user may choose: one rule for the controller (StorageClass
parameters), the agent (what it gives ZFS) and the chart (values.schema.json, checked by a test).

Compression is limited to the algorithms libzfs_core takes by index at create time (the agent
sets properties through pyzfs, which cannot take gzip-N or zstd-N levels).
"""

from __future__ import annotations

from zvolt.errors import invalid

COMPRESSION = ("on", "off", "lzjb", "gzip", "zle", "lz4", "zstd")
DEFAULT_COMPRESSION = "lz4"
VOLBLOCKSIZE_MIN = 4096
VOLBLOCKSIZE_MAX = 128 * 1024
DEFAULT_VOLBLOCKSIZE = 16 * 1024


def check_volblocksize(value: int) -> int:
    if value < VOLBLOCKSIZE_MIN or value > VOLBLOCKSIZE_MAX or value & (value - 1):
        raise invalid(f"volblocksize {value} must be a power of two from 4K to 128K")
    return value


def check_compression(value: str) -> str:
    if value not in COMPRESSION:
        raise invalid(f"compression {value!r} is not one of {', '.join(COMPRESSION)}")
    return value


def round_up(value: int, align: int) -> int:
    """The smallest multiple of `align` (> 0) that is >= `value`: ZFS refuses a volsize that is
    not a multiple of the volblocksize, so every size zvolt asks for is rounded up by this."""
    return -(-value // align) * align
