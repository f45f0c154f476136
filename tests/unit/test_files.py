"""Identity and key files: private, atomic, and durable (file and directory entry fsynced)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from zvolt.files import write_private_json


def test_private_json_is_fsynced_with_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "host-identity.json"
    write_private_json(target, {"hostnqn": "nqn.x"})
    assert synced == ["file", "dir"]  # data first, then the rename's directory entry
    assert json.loads(target.read_text()) == {"hostnqn": "nqn.x"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["host-identity.json"]  # no temp file left
