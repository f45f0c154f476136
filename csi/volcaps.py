"""CSI VolumeCapability checks shared by the controller and the node plugin."""

from __future__ import annotations

from collections.abc import Iterable

from csi.mounter import SUPPORTED_FS, check_mount_flags
from zvolt.errors import ZvoltError, invalid
from zvolt.pb import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode

SINGLE_NODE = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)
READ_ONLY = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
MULTI_NODE_WRITERS = frozenset({Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER})
DEFAULT_FS = "ext4"


def check_structure(cap: csi_pb2.VolumeCapability, what: str = "volume capability") -> None:
    """Malformed capabilities are INVALID_ARGUMENT everywhere."""
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise invalid(f"{what}: access_mode is required")
    if cap.access_mode.mode not in Mode.Mode.values():
        raise invalid(f"{what}: access mode {cap.access_mode.mode} is unknown")
    if cap.WhichOneof("access_type") is None:
        raise invalid(f"{what}: access_type (block or mount) is required")


def unsupported(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why zvolt cannot serve this (well-formed) capability, or None when it can."""
    mode = cap.access_mode.mode
    if cap.HasField("mount"):
        if mode in MULTI_NODE_WRITERS:
            return (
                f"access mode {Mode.Mode.Name(mode)} is refused for filesystem volumes: ext4/xfs mounted "
                "read-write on several nodes at once corrupt each other; use a single-node mode, "
                "MULTI_NODE_READER_ONLY, or a raw block volume"
            )
        if cap.mount.fs_type and cap.mount.fs_type not in SUPPORTED_FS:
            return f"filesystem {cap.mount.fs_type!r} is not supported (supported: {', '.join(SUPPORTED_FS)})"
        if cap.mount.volume_mount_group:
            return "volume_mount_group is not supported"
        try:
            check_mount_flags(cap.mount.mount_flags)
        except ZvoltError as err:
            return err.message
    return None


def require(caps: Iterable[csi_pb2.VolumeCapability], what: str = "volume_capabilities") -> None:
    """Structure and support both: for calls where an unsupported capability is an error."""
    for cap in caps:
        check_structure(cap, what)
        reason = unsupported(cap)
        if reason:
            raise invalid(reason)


def fs_type(cap: csi_pb2.VolumeCapability, default: str = DEFAULT_FS) -> str:
    return cap.mount.fs_type or default
