"""A read-only publish must be read-only where kubelet finds it: in the host's mount namespace,
not only in the node plugin's container (csi/mounter.py SystemMounter.bind)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from csi.mounter import SystemMounter
from csi.runner import Result
from zvolt.errors import ZvoltError


class Recorder:
    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.argvs: list[list[str]] = []
        self.fail = list(fail)  # an argv whose last word is one of these exits 32, as mount does

    def __call__(self, argv: Sequence[str], timeout: float) -> Result:
        self.argvs.append(list(argv))
        return Result(32, "", "mount: failed") if argv[-1] in self.fail else Result(0, "", "")


@pytest.mark.parametrize("kind", ["filesystem", "block"])
def test_read_only_bind_binds_the_target_from_a_mount_already_read_only(tmp_path: Path, kind: str) -> None:
    # A remount read-only (what `mount --bind -o ro` does after the bind) is not propagated:
    # the target's own bind must copy the read-only flag from its source mount instead.
    source = tmp_path / "stage"
    if kind == "filesystem":
        source.mkdir()
    else:
        source.write_bytes(b"")  # stands for /dev/nvme0n1
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    rec = Recorder()
    SystemMounter(runner=rec, scratch_dir=str(scratch_dir)).bind(str(source), "/kubelet/target", readonly=True)
    assert len(rec.argvs) == 3, rec.argvs
    ro, bind, umount = rec.argvs
    scratch = ro[-1]
    assert ro == ["mount", "--bind", "-o", "ro", "--", str(source), scratch]
    assert Path(scratch).parent == scratch_dir
    assert bind == ["mount", "--bind", "--", scratch, "/kubelet/target"]
    assert umount == ["umount", "--", scratch]
    assert list(scratch_dir.iterdir()) == []  # the scratch point is gone


def test_read_write_bind_is_one_plain_bind(tmp_path: Path) -> None:
    rec = Recorder()
    SystemMounter(runner=rec, scratch_dir=str(tmp_path)).bind("/stage", "/target", readonly=False)
    assert rec.argvs == [["mount", "--bind", "--", "/stage", "/target"]]


def test_failed_read_only_bind_leaves_no_scratch_mount(tmp_path: Path) -> None:
    (tmp_path / "stage").mkdir()
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    rec = Recorder(fail=["/target"])
    with pytest.raises(ZvoltError) as err:
        SystemMounter(runner=rec, scratch_dir=str(scratch_dir)).bind(str(tmp_path / "stage"), "/target", readonly=True)
    assert "bind mount" in err.value.message
    assert rec.argvs[-1][:2] == ["umount", "--"]  # the scratch point unmounted after the failure
    assert list(scratch_dir.iterdir()) == []
