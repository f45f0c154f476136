"""The pyzfs adapter turns libzfs_core errors into ZfsError with readable text and errno."""

from __future__ import annotations

import errno
import sys
import types
from typing import Any

import pytest

from agent.zfs import LibZfs, ZfsError


class DatasetNotFound(Exception):
    """Shaped like pyzfs' ZFSError subclasses: errno, message, and the name as bytes."""

    def __init__(self, name: bytes) -> None:
        super().__init__(name)
        self.errno = errno.ENOENT
        self.message = "Dataset not found"
        self.name = name

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.message}: {self.name!r}"


def _fake_lzc(monkeypatch: pytest.MonkeyPatch, **fns: Any) -> None:
    mod = types.ModuleType("libzfs_core")
    for key, fn in fns.items():
        setattr(mod, key, fn)
    monkeypatch.setitem(sys.modules, "libzfs_core", mod)


def test_pyzfs_error_keeps_errno_and_shows_names_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def lzc_clone(name: bytes, origin: bytes, props: Any = None) -> None:
        raise DatasetNotFound(origin)

    _fake_lzc(monkeypatch, lzc_clone=lzc_clone, lzc_exists=lambda name: False)
    with pytest.raises(ZfsError) as err:
        LibZfs().clone("tank/zvolt/v/new", "tank/zvolt/v/old@s1", {})
    assert err.value.errno == errno.ENOENT
    assert str(err.value) == "lzc_clone: Dataset not found: tank/zvolt/v/old@s1"


def _fake_zfs_cli(tmp_path: Any, stdout: str, stderr: str = "", code: int = 0) -> str:
    """A `zfs` that records its argv and answers as given."""
    script = tmp_path / "zfs"
    script.write_text("#!/bin/sh\n"
                      f"printf '%s\\n' \"$@\" > {tmp_path}/argv\n"
                      f"printf {stdout!r}\n"  # as the format: its escapes become tabs and newlines
                      f"printf {stderr!r} >&2\n"
                      f"exit {code}\n")
    script.chmod(0o755)
    return str(script)


def test_with_snapshots_is_one_list_of_the_dataset_and_its_snapshots(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _fake_lzc(monkeypatch)
    out = ("tank/v/a\t-\toff\n"
           "tank/v/a@s1\t-\toff\n"
           "tank/v/a@zmv000001\t1\toff\n"
           "tank/v/a/child\t-\toff\n")  # -d 1 would also list a child filesystem: not ours
    zfs = LibZfs(zfs_bin=_fake_zfs_cli(tmp_path, out))
    got = zfs.with_snapshots("tank/v/a", ("zvolt:move-final", "encryption"))
    assert got == {"tank/v/a": {"zvolt:move-final": "-", "encryption": "off"},
                   "tank/v/a@s1": {"zvolt:move-final": "-", "encryption": "off"},
                   "tank/v/a@zmv000001": {"zvolt:move-final": "1", "encryption": "off"}}
    argv = (tmp_path / "argv").read_text().split()
    assert argv == ["list", "-H", "-p", "-d", "1", "-t", "filesystem,volume,snapshot", "-o",
                    "name,zvolt:move-final,encryption", "tank/v/a"]


def test_with_snapshots_of_a_missing_dataset_is_empty_and_other_failures_raise(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _fake_lzc(monkeypatch)
    gone = LibZfs(zfs_bin=_fake_zfs_cli(tmp_path, "", "cannot open 'tank/v/a': dataset does not exist\n", 1))
    assert gone.with_snapshots("tank/v/a", ("encryption",)) == {}
    broken = LibZfs(zfs_bin=_fake_zfs_cli(tmp_path, "", "internal error: out of memory\n", 1))
    with pytest.raises(ZfsError):
        broken.with_snapshots("tank/v/a", ("encryption",))
