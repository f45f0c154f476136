"""The ZFS adapter: the only place that calls libzfs_core or builds `zfs`/`udevadm` argv.

Mutations go through pyzfs (single ioctls, ~2x faster than the CLI). pyzfs cannot set
properties after creation, so volmode/volsize/user-property changes take `zfs set`. Reads are
always scoped to one dataset (never `zfs list -r` of the pool on a request path); the only
recursive listing is `walk()`, used by the explicit slow index rebuild.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from zvolt import names

# Index (enum) properties must be given to lzc_create/lzc_clone as numbers (lab.md).
VOLMODE_INDEX = {"default": 0, "geom": 1, "dev": 2, "none": 3}
# libzfs_core takes index properties as numbers (zio_compress enum); keys = volprops.COMPRESSION.
COMPRESSION_INDEX = {"on": 1, "off": 2, "lzjb": 3, "gzip": 10, "zle": 14, "lz4": 15, "zstd": 16}
USER_PREFIX = "zvolt:"
# Properties read for one dataset when the index is refreshed from ZFS.
READ_PROPS = (
    "type",
    "volsize",
    "volblocksize",
    "compression",
    "refreservation",
    "origin",
    "defer_destroy",
    "used",
    "volmode",
    "zvolt:id",
    "zvolt:name",
    "zvolt:created",
    "zvolt:thick",
    "zvolt:source-snapshot",
    "zvolt:source-volume",
    "zvolt:hosts",
    "zvolt:hidden",
    "zvolt:volume",
    "zvolt:size",
    "zvolt:group",
    "zvolt:home",
    "zvolt:state",
    "zvolt:moving-to",
    "zvolt:moved-to",
)


# The one cipher zvolt creates, and how a key is handed to ZFS (hex on stdin: an operator can
# load the same key by hand with the value kept in the Kubernetes Secret).
ENCRYPTION = "aes-256-gcm"
KEY_BYTES = 32
ENCRYPTION_PROPS = {"encryption": ENCRYPTION, "keyformat": "hex", "keylocation": "prompt"}
# ZFS's answer when a key is wrong (`zfs load-key`) or missing for a change that needs it
# (`zfs set volsize`: "permission denied"). A clone or snapshot needs no key.
EKEY = errno.EACCES


class ZfsError(Exception):
    """A ZFS operation failed; `errno` says why (ENOENT, EEXIST, EBUSY, ...)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Space:
    available: int
    used: int


class Zfs(Protocol):
    """What the agent needs from ZFS. Implemented by LibZfs (real) and fakes.FakeZfs."""

    def exists(self, name: str) -> bool: ...
    def create_filesystem(self, name: str) -> None: ...
    def create_volume(self, name: str, size: int, props: Mapping[str, int | str], key: bytes = b"") -> None: ...
    def snapshot(self, snapshots: Sequence[str], user_props: Mapping[str, str]) -> None: ...
    def clone(self, name: str, origin: str, props: Mapping[str, int | str]) -> None: ...
    def destroy(self, name: str) -> None: ...
    def destroy_snapshots(self, snapshots: Sequence[str], defer: bool) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def promote(self, name: str) -> None: ...
    def set_props(self, name: str, props: Mapping[str, str]) -> None: ...
    def get_props(self, name: str, props: Sequence[str] = READ_PROPS) -> dict[str, str] | None: ...
    def snapshots_of(self, name: str) -> list[str]: ...
    def with_snapshots(self, name: str, props: Sequence[str]) -> dict[str, dict[str, str]]: ...
    def clones_of(self, snapshot: str) -> list[str]: ...
    def space(self, name: str) -> Space: ...
    def walk(self, parent: str) -> Iterator[dict[str, str]]: ...
    def device_path(self, name: str) -> str: ...
    def device_ready(self, name: str) -> bool: ...
    def settle(self) -> None: ...
    # Native encryption: `key` is the 32-byte wrapping key; it travels on stdin, never in argv.
    def load_key(self, root: str, key: bytes, noop: bool = False) -> None: ...
    def unload_key(self, root: str) -> None: ...
    def change_key(self, root: str, key: bytes) -> None: ...


@runtime_checkable
class Streams(Protocol):
    """`zfs send` / `zfs receive` between two file descriptors (a move: agent/moves.py). Both block
    until the stream ends; a failure raises ZfsError with ZFS's own words."""

    def send(self, snapshot: str, base: str, sink: int) -> None: ...
    def receive(self, dataset: str, props: Mapping[str, str], exclude: Sequence[str], source: int) -> None: ...


@runtime_checkable
class BatchProps(Protocol):
    """An adapter that sets the same properties on many datasets in one call (LibZfs: one `zfs set`)."""

    def set_props_many(self, names: Sequence[str], props: Mapping[str, str]) -> None: ...


def set_props_many(zfs: Zfs, names: Sequence[str], props: Mapping[str, str]) -> None:
    """Set `props` on every dataset in `names`: in one call when the adapter can batch, else one each.

    Raises ZfsError if any dataset failed; the others may have been set (`zfs set` goes on past a
    dataset it cannot open or set), so a caller retries the failed ones one by one."""
    if isinstance(zfs, BatchProps):
        zfs.set_props_many(names, props)
        return
    for name in names:
        zfs.set_props(name, props)


@runtime_checkable
class BatchGet(Protocol):
    """An adapter that reads properties of many datasets in one call (LibZfs: one `zfs get`)."""

    def get_props_many(self, names: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]: ...


def get_props_many(zfs: Zfs, names: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]:
    """dataset -> {property: value} for those of `names` that exist: one call when the adapter can
    batch, else one read each (fakes)."""
    if isinstance(zfs, BatchGet):
        return zfs.get_props_many(names, props)
    found = {name: zfs.get_props(name, props) for name in names}
    return {name: got for name, got in found.items() if got is not None}


def check_full_name(name: str) -> str:
    """Validate a dataset or snapshot name before it reaches ioctl or argv."""
    ds, sep, snap = name.partition("@")
    names.check_dataset(ds)
    if sep:
        names.check_id(snap, "snapshot name")
    return name


def _native_props(props: Mapping[str, int | str]) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for key, value in props.items():
        if key == "volmode":
            out[b"volmode"] = VOLMODE_INDEX[str(value)]
        elif key == "compression":
            out[b"compression"] = COMPRESSION_INDEX[str(value)]
        elif isinstance(value, int):
            out[key.encode()] = value
        else:
            out[key.encode()] = value.encode()
    return out


def _errno_of(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    if isinstance(err, int):
        return err
    # SnapshotDestructionFailure and friends carry a list of per-item errors.
    for sub in getattr(exc, "errors", None) or []:
        sub_err = getattr(sub, "errno", None)
        if isinstance(sub_err, int):
            return sub_err
    return errno.EIO


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    """pyzfs errors carry dataset names as bytes; users must read names, never b'...' reprs."""
    message = getattr(exc, "message", None) or getattr(exc, "strerror", None) or type(exc).__name__
    name = getattr(exc, "name", None)
    return f"{_text(message)}: {_text(name)}" if name else _text(message)


def _key_text(key: bytes) -> str:
    if len(key) != KEY_BYTES:
        # The length only: a key's bytes never go into a message.
        raise ZfsError(errno.EINVAL, f"an encryption key must be {KEY_BYTES} bytes, not {len(key)}")
    return key.hex()


def _prop_args(props: Mapping[str, str]) -> list[str]:
    for key, value in props.items():
        if not key.replace(":", "").replace("-", "").replace("_", "").isalnum() or "\n" in value:
            raise ZfsError(errno.EINVAL, f"refusing property {key!r}")
    return [f"{k}={v}" for k, v in props.items()]


class LibZfs:
    """Real ZFS: libzfs_core for mutations, the `zfs` CLI for property changes and scoped reads."""

    def __init__(self, zfs_bin: str = "zfs", udevadm_bin: str = "udevadm", timeout: float = 120.0) -> None:
        import libzfs_core

        self._lzc: Any = libzfs_core
        self._zfs = zfs_bin
        self._udevadm = udevadm_bin
        self._timeout = timeout

    # -- mutations (pyzfs) ------------------------------------------------------------

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._lzc, fn)(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, NotImplementedError):
                raise
            raise ZfsError(_errno_of(exc), f"{fn}: {_describe(exc)}") from exc

    def exists(self, name: str) -> bool:
        return bool(self._call("lzc_exists", check_full_name(name).encode()))

    def create_filesystem(self, name: str) -> None:
        self._call("lzc_create", check_full_name(name).encode(), ds_type="zfs", props={})

    def create_volume(self, name: str, size: int, props: Mapping[str, int | str], key: bytes = b"") -> None:
        if key:
            # pyzfs wants the encryption properties as enum numbers and cannot load a key from a
            # pipe: an encrypted volume takes the CLI, with its key on stdin.
            opts = _prop_args({k: str(v) for k, v in {**props, **ENCRYPTION_PROPS}.items()})
            self._run(["create", "-s", "-V", str(size), *[a for o in opts for a in ("-o", o)], check_full_name(name)],
                      stdin=_key_text(key))
            return
        native = _native_props(props)
        native[b"volsize"] = size
        self._call("lzc_create", check_full_name(name).encode(), ds_type="zvol", props=native)

    def snapshot(self, snapshots: Sequence[str], user_props: Mapping[str, str]) -> None:
        snaps = [check_full_name(s).encode() for s in snapshots]
        self._call("lzc_snapshot", snaps, props={k.encode(): v.encode() for k, v in user_props.items()})

    def clone(self, name: str, origin: str, props: Mapping[str, int | str]) -> None:
        try:
            self._call("lzc_clone", check_full_name(name).encode(), check_full_name(origin).encode(),
                       props=_native_props(props))
        except ZfsError:
            # A clone whose props were rejected can be left behind (lab.md): don't leak it.
            if self.exists(name):
                self.destroy(name)
            raise

    def destroy(self, name: str) -> None:
        self._call("lzc_destroy", check_full_name(name).encode())

    def destroy_snapshots(self, snapshots: Sequence[str], defer: bool) -> None:
        self._call("lzc_destroy_snaps", [check_full_name(s).encode() for s in snapshots], defer)

    def rename(self, old: str, new: str) -> None:
        try:
            self._call("lzc_rename", check_full_name(old).encode(), check_full_name(new).encode())
        except NotImplementedError:
            self._run(["rename", old, new])

    def promote(self, name: str) -> None:
        self._call("lzc_promote", check_full_name(name).encode())

    # -- CLI: property changes and scoped reads ------------------------------------------

    def _run(self, args: list[str], timeout: float | None = None, stdin: str | None = None) -> str:
        timeout = self._timeout if timeout is None else timeout
        try:
            proc = subprocess.run([self._zfs, *args], capture_output=True, text=True, timeout=timeout, check=False,
                                  input=stdin)
        except subprocess.TimeoutExpired as exc:
            raise ZfsError(errno.ETIMEDOUT, f"zfs {args[0]} timed out after {timeout}s") from exc
        if proc.returncode != 0:
            msg = proc.stderr.strip()
            err = errno.EIO
            if "already loaded" in msg or "already unloaded" in msg:
                err = errno.EALREADY
            elif "does not exist" in msg:
                err = errno.ENOENT
            elif "busy" in msg:
                err = errno.EBUSY
            elif "Incorrect key" in msg or "permission denied" in msg:
                # ZFS 2.3: a wrong key to load-key; a change (volsize) with the key unloaded.
                err = EKEY
            elif "exists" in msg:
                err = errno.EEXIST
            raise ZfsError(err, f"zfs {args[0]}: {msg}")
        return proc.stdout

    def set_props(self, name: str, props: Mapping[str, str]) -> None:
        self._run(["set", *_prop_args(props), check_full_name(name)])

    def set_props_many(self, names: Sequence[str], props: Mapping[str, str]) -> None:
        """One `zfs set` for many datasets (ZFS 2.x takes several; checked on 2.3.2 in the lab).

        Each dataset is still its own ioctl and sync task inside the one process: what this saves
        is a process start and libzfs init per dataset (lab, TCG: 10 volumes volmode=none 5.7 s one
        process each vs 2.8 s in one call). A dataset that fails does not stop the others; the call
        then fails with every refusal in its message."""
        if not names:
            return
        # The time limit is per dataset, as when each had its own process.
        self._run(["set", *_prop_args(props), *[check_full_name(n) for n in names]],
                  timeout=self._timeout * len(names))

    def get_props(self, name: str, props: Sequence[str] = READ_PROPS) -> dict[str, str] | None:
        try:
            out = self._run(["get", "-H", "-p", "-o", "property,value", ",".join(props), check_full_name(name)])
        except ZfsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        result: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition("\t")
            result[key] = value
        return result

    def get_props_many(self, names: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]:
        """One `zfs get -Hp` of just these datasets (the usage of a page of volumes).

        A dataset that does not exist is left out: `zfs get` reports it on stderr, exits 1 and
        still prints every other one. Any other complaint fails the call."""
        if not names:
            return {}
        argv = [self._zfs, "get", "-H", "-p", "-o", "name,property,value", ",".join(props),
                *[check_full_name(n) for n in names]]
        timeout = self._timeout + len(names) * 0.1
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ZfsError(errno.ETIMEDOUT, f"zfs get of {len(names)} datasets timed out after {timeout}s") from exc
        result: dict[str, dict[str, str]] = {}
        for line in proc.stdout.splitlines():
            name, _, rest = line.partition("\t")
            prop, _, value = rest.partition("\t")
            result.setdefault(name, {})[prop] = value
        other = [line for line in proc.stderr.splitlines() if line.strip() and "does not exist" not in line]
        if proc.returncode != 0 and other:
            raise ZfsError(errno.EIO, f"zfs get: {' '.join(other)[-500:]}")
        return result

    def snapshots_of(self, name: str) -> list[str]:
        try:
            out = self._run(["list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", check_full_name(name)])
        except ZfsError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        return [line for line in out.splitlines() if line]

    def with_snapshots(self, name: str, props: Sequence[str]) -> dict[str, dict[str, str]]:
        """The dataset and each of its snapshots, with `props` (a user property not set reads
        "-"), in one `zfs list`; {} when the dataset does not exist. Where a move's steps read
        what they are at: one process instead of a list and a read per snapshot."""
        cols = ("name", *props)
        try:
            out = self._run(["list", "-H", "-p", "-d", "1", "-t", "filesystem,volume,snapshot", "-o", ",".join(cols),
                             check_full_name(name)])
        except ZfsError as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise
        found: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            values = line.split("\t")
            if values[0] == name or values[0].startswith(name + "@"):  # not a child filesystem's
                found[values[0]] = dict(zip(props, values[1:], strict=False))
        return found

    def clones_of(self, snapshot: str) -> list[str]:
        props = self.get_props(snapshot, ("clones",))
        value = (props or {}).get("clones", "")
        return [c for c in value.split(",") if c and c != "-"]

    def space(self, name: str) -> Space:
        props = self.get_props(name, ("available", "used"))
        if props is None:
            raise ZfsError(errno.ENOENT, f"dataset {name} does not exist")
        return Space(available=int(props["available"]), used=int(props["used"]))

    def walk(self, parent: str) -> Iterator[dict[str, str]]:
        cols = ("name", *READ_PROPS)
        args = [self._zfs, "list", "-H", "-p", "-r", "-t", "volume,snapshot", "-o", ",".join(cols),
                check_full_name(parent)]
        with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                values = line.rstrip("\n").split("\t")
                yield dict(zip(cols, values, strict=False))
            proc.wait()
            if proc.returncode != 0 and proc.stderr is not None:
                raise ZfsError(errno.EIO, f"zfs list: {proc.stderr.read().strip()}")

    # -- encryption keys (CLI: the key goes to stdin; argv and logs only ever see the dataset) ----

    def load_key(self, root: str, key: bytes, noop: bool = False) -> None:
        """Load the wrapping key of encryption root `root`; `noop` only checks it is the right one."""
        self._run(["load-key", *(["-n"] if noop else []), check_full_name(root)], stdin=_key_text(key))

    def unload_key(self, root: str) -> None:
        self._run(["unload-key", check_full_name(root)])

    def change_key(self, root: str, key: bytes) -> None:
        """Re-wrap the root's master key with `key` (its current key must be loaded): no data is copied."""
        opts = [a for k, v in ENCRYPTION_PROPS.items() if k != "encryption" for a in ("-o", f"{k}={v}")]
        self._run(["change-key", *opts, check_full_name(root)], stdin=_key_text(key))

    # -- streams (a move between nodes) ----------------------------------------------------

    def send(self, snapshot: str, base: str, sink: int) -> None:
        """`zfs send -R` of the volume up to `snapshot` (its snapshots and properties with it),
        from `base` on (-I: every snapshot in between) when given, written to fd `sink`."""
        argv = [self._zfs, "send", "-R", *(["-I", check_full_name(base)] if base else []), check_full_name(snapshot)]
        self._stream(argv, stdin=None, stdout=sink)

    def receive(self, dataset: str, props: Mapping[str, str], exclude: Sequence[str], source: int) -> None:
        """`zfs receive` of a stream from fd `source` into `dataset`, with `props` set (-o) and the
        sender's `exclude` properties left out (-x)."""
        opts = [a for o in _prop_args(props) for a in ("-o", o)]
        _prop_args(dict.fromkeys(exclude, ""))  # the same check of each name
        opts += [a for x in exclude for a in ("-x", x)]
        self._stream([self._zfs, "receive", *opts, check_full_name(dataset)], stdin=source, stdout=None)

    def _stream(self, argv: list[str], stdin: int | None, stdout: int | None) -> None:
        # No time limit of its own: the socket at the other end has one (a dead peer ends it).
        proc = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                              stdout=stdout if stdout is not None else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()[-1000:]
            err = errno.EEXIST if "exists" in msg else errno.ENOENT if "does not exist" in msg else errno.EIO
            raise ZfsError(err, f"zfs {argv[1]}: {msg or f'exit {proc.returncode}'}")

    # -- devices ---------------------------------------------------------------------------

    def device_path(self, name: str) -> str:
        return "/dev/zvol/" + check_full_name(name)

    def device_ready(self, name: str) -> bool:
        return os.path.exists(self.device_path(name))

    def settle(self) -> None:
        subprocess.run([self._udevadm, "settle", "--timeout=30"], capture_output=True, timeout=60, check=False)


def retry_busy(op: Any, zfs: Zfs, attempts: int = 6) -> None:
    """Run op(); on EBUSY (udev still has a fresh zvol open) settle udev and retry."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            op()
            return
        except ZfsError as exc:
            if exc.errno != errno.EBUSY or attempt == attempts - 1:
                raise
            zfs.settle()
            time.sleep(delay)
            delay *= 2
