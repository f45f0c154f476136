"""Adapter for filesystems and mounts: mount/umount/bind, mkfs, blkid, resize, findmnt, statvfs.

The only module that builds argv for these tools. Mount flags from the CO are checked
against an allow-list first: a flag is one known option (optionally `=value` from a
narrow charset), so no flag can smuggle in extra options or paths.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from csi.runner import Runner, check, subprocess_runner
from zvolt.errors import ZvoltError, invalid

SUPPORTED_FS = ("ext4", "xfs")

# Options a user may reasonably ask for on ext4/xfs. Anything that changes ownership of
# the device, loads keys, points at other paths or re-enables device files is not here.
_FLAG_WORDS = frozenset(
    {
        "ro", "rw", "sync", "async", "dirsync", "atime", "noatime", "diratime", "nodiratime",
        "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
        "nodev", "nosuid", "noexec", "discard", "nodiscard", "barrier", "nobarrier",
        "acl", "noacl", "user_xattr", "nouser_xattr", "noquota", "quota", "usrquota",
        "grpquota", "prjquota", "uquota", "gquota", "pquota", "nouuid", "inode64", "inode32",
        "largeio", "nolargeio", "wsync", "dax", "norecovery", "noload", "data_err=abort",
    }
)  # fmt: skip
_FLAG_KEYS = frozenset(
    {
        "data", "commit", "errors", "barrier", "stripe", "stride", "journal_ioprio",
        "inode_readahead_blks", "max_batch_time", "min_batch_time", "init_itable",
        "allocsize", "logbufs", "logbsize", "sunit", "swidth", "dax",
    }
)  # fmt: skip
_FLAG_VALUE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
# fstrim --verbose: "/mnt: 512 MiB (536870912 bytes) trimmed" (util-linux >= 2.27).
_FSTRIM_BYTES = re.compile(r"\((\d+) bytes\) trimmed")


def check_mount_flags(flags: Sequence[str]) -> list[str]:
    """Validate CO mount flags; returns them as single options (comma lists are split)."""
    options: list[str] = []
    for flag in flags:
        for option in flag.split(","):
            option = option.strip()
            if not option:
                continue
            key, sep, value = option.partition("=")
            if option in _FLAG_WORDS or (sep and key in _FLAG_KEYS and _FLAG_VALUE.fullmatch(value)):
                options.append(option)
                continue
            raise invalid(f"mount flag {option!r} is not allowed (allowed: common ext4/xfs options, e.g. noatime)")
    return options


@dataclass(frozen=True)
class MountInfo:
    target: str
    source: str
    fstype: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class FsStats:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


class Mounter(Protocol):
    def mount_info(self, target: str) -> MountInfo | None: ...
    def mount(self, device: str, target: str, fstype: str, options: Sequence[str]) -> None: ...
    def bind(self, source: str, target: str, readonly: bool) -> None: ...
    def unmount(self, target: str) -> None: ...
    def fs_type(self, device: str) -> str | None: ...
    def mkfs(self, device: str, fstype: str) -> None: ...
    def grow(self, device: str, mountpoint: str, fstype: str) -> None: ...
    def stats(self, path: str) -> FsStats: ...
    def is_block_device(self, path: str) -> bool: ...
    def block_size(self, path: str) -> int: ...


def _abs(path: str, what: str) -> str:
    if not path.startswith("/") or "\x00" in path or "\n" in path or "," in path:
        raise invalid(f"{what} {path!r} must be an absolute path without commas or control characters")
    return os.path.normpath(path)


class SystemMounter:
    def __init__(
        self, runner: Runner = subprocess_runner, timeout: float = 300.0, scratch_dir: str | None = None
    ) -> None:
        self.run = runner
        self.timeout = timeout
        self.scratch_dir = scratch_dir  # for read-only binds; None: the temporary directory

    def _do(self, argv: list[str], what: str) -> str:
        return check(self.run(argv, self.timeout), argv, what).stdout

    def mount_info(self, target: str) -> MountInfo | None:
        target = _abs(target, "path")
        argv = ["findmnt", "--noheadings", "--raw", "--output", "TARGET,SOURCE,FSTYPE,OPTIONS", "--mountpoint", target]
        result = self.run(argv, self.timeout)
        if result.returncode != 0:
            return None
        line = result.stdout.strip().splitlines()[-1].split(" ")
        if len(line) < 4:
            return None
        return MountInfo(target=line[0], source=line[1], fstype=line[2], options=tuple(line[3].split(",")))

    def mount(self, device: str, target: str, fstype: str, options: Sequence[str]) -> None:
        if fstype not in SUPPORTED_FS:
            raise invalid(f"filesystem {fstype!r} is not supported")
        argv = ["mount", "-t", fstype]
        opts = check_mount_flags(options)
        if opts:
            argv += ["-o", ",".join(opts)]
        self._do([*argv, "--", _abs(device, "device"), _abs(target, "target")], "mount")

    def bind(self, source: str, target: str, readonly: bool) -> None:
        source, target = _abs(source, "source"), _abs(target, "target")
        if not readonly:
            self._do(["mount", "--bind", "--", source, target], "bind mount")
            return
        # `mount --bind -o ro` is a bind, then a remount read-only (util-linux < 2.39, as in the
        # image): the remount changes this mount namespace's copy only. Run in the node plugin's
        # container, the copy that mount propagation puts into the host's namespace, which
        # kubelet hands to the pod, stayed read-write (seen on a real kubelet). A bind copies
        # the flags of the mount it binds from, into every propagated copy too: so bind a
        # scratch point read-only first, then the target from it.
        scratch = tempfile.mkdtemp(prefix="zvolt-ro-", dir=self.scratch_dir) if os.path.isdir(source) else None
        if scratch is None:  # a raw block device: a file to bind it onto
            fd, scratch = tempfile.mkstemp(prefix="zvolt-ro-", dir=self.scratch_dir)
            os.close(fd)
        try:
            self._do(["mount", "--bind", "-o", "ro", "--", source, scratch], "bind mount")
            try:
                self._do(["mount", "--bind", "--", scratch, target], "bind mount")
            finally:
                self._do(["umount", "--", scratch], "umount")
        finally:
            with contextlib.suppress(OSError):  # still mounted after a failed umount: the error says so
                if os.path.isdir(scratch):
                    os.rmdir(scratch)
                else:
                    os.unlink(scratch)

    def unmount(self, target: str) -> None:
        self._do(["umount", "--", _abs(target, "target")], "umount")

    def fs_type(self, device: str) -> str | None:
        """Filesystem (or partition table / other signature) on the device; None when blank."""
        argv = ["blkid", "--probe", "--output", "export", "--", _abs(device, "device")]
        result = self.run(argv, self.timeout)
        if result.returncode == 2:  # nothing found: the device is blank
            return None
        check(result, argv, "blkid")
        fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        return fields.get("TYPE") or (f"partition table {fields['PTTYPE']}" if "PTTYPE" in fields else "unknown")

    def mkfs(self, device: str, fstype: str) -> None:
        device = _abs(device, "device")
        # mkfs discards the whole device first (no nodiscard / -K): on a thin zvol that frees
        # nothing and costs little (measured: csi/README.md "Reclaim"), and it tells ext4 the
        # device reads zeros. Lazy init keeps mkfs of big volumes fast.
        if fstype == "ext4":
            argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "--", device]
        elif fstype == "xfs":
            argv = ["mkfs.xfs", "-q", "--", device]
        else:
            raise invalid(f"filesystem {fstype!r} is not supported (ext4, xfs)")
        self._do(argv, f"mkfs.{fstype}")

    def grow(self, device: str, mountpoint: str, fstype: str) -> None:
        if fstype == "ext4":
            self._do(["resize2fs", "--", _abs(device, "device")], "resize2fs")
        elif fstype == "xfs":
            self._do(["xfs_growfs", "--", _abs(mountpoint, "mountpoint")], "xfs_growfs")
        else:
            raise invalid(f"cannot grow filesystem {fstype!r}")

    def filesystems(self) -> list[MountInfo]:
        """Every mounted ext4/xfs filesystem (the periodic trim's view of what is staged)."""
        argv = ["findmnt", "--noheadings", "--raw", "--types", ",".join(SUPPORTED_FS),
                "--output", "TARGET,SOURCE,FSTYPE,OPTIONS"]  # fmt: skip
        result = self.run(argv, self.timeout)
        if result.returncode == 1 and not (result.stdout.strip() or result.stderr.strip()):
            return []  # findmnt: nothing matched
        check(result, argv, "findmnt")
        found = []
        for line in result.stdout.splitlines():
            fields = line.split(" ")
            if len(fields) == 4:
                found.append(MountInfo(target=fields[0], source=fields[1], fstype=fields[2],
                                       options=tuple(fields[3].split(","))))  # fmt: skip
        return found

    def fstrim(self, mountpoint: str) -> int:
        """Discard the filesystem's free space; returns the bytes fstrim reports it discarded."""
        argv = ["fstrim", "--verbose", "--", _abs(mountpoint, "mountpoint")]
        out = self._do(argv, "fstrim")
        match = _FSTRIM_BYTES.search(out)
        if match is None:
            raise ZvoltError(grpc.StatusCode.INTERNAL, f"fstrim printed no byte count: {out.strip()[-200:]!r}")
        return int(match.group(1))

    def stats(self, path: str) -> FsStats:
        st = os.statvfs(_abs(path, "path"))
        total = st.f_blocks * st.f_frsize
        return FsStats(
            total_bytes=total,
            available_bytes=st.f_bavail * st.f_frsize,
            used_bytes=total - st.f_bfree * st.f_frsize,
            total_inodes=st.f_files,
            free_inodes=st.f_ffree,
            used_inodes=st.f_files - st.f_ffree,
        )

    def is_block_device(self, path: str) -> bool:
        return stat.S_ISBLK(os.stat(_abs(path, "path")).st_mode)

    def block_size(self, path: str) -> int:
        fd = os.open(_abs(path, "path"), os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
