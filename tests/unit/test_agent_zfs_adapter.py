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
