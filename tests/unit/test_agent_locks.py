"""Per-volume locks: conflicting calls get ABORTED, independent volumes run in parallel."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from agent.fakes import make_node
from agent.locks import VolumeLocks
from agent.volumes import VolumeSpec
from zvolt.errors import ZvoltError

GiB = 1 << 30


def test_exclusive_conflicts_and_shared_coexist() -> None:
    locks = VolumeLocks()
    with locks.hold(["va"]):
        with pytest.raises(ZvoltError) as err, locks.hold(["va"]):
            pass
        assert err.value.code == grpc.StatusCode.ABORTED
        with pytest.raises(ZvoltError), locks.hold([], shared=["va"]):
            pass
        with locks.hold(["vb"]):  # another volume is free
            pass
    with locks.hold([], shared=["va"]), locks.hold([], shared=["va"]), pytest.raises(ZvoltError), locks.hold(["va"]):
        pass
    assert locks.busy() == 0


def test_all_or_nothing() -> None:
    locks = VolumeLocks()
    with locks.hold(["vb"]):
        with pytest.raises(ZvoltError), locks.hold(["va", "vb"]):
            pass
        with locks.hold(["va"]):  # va was released when vb failed
            pass
    assert locks.busy() == 0


def test_concurrent_mutation_of_one_volume_is_aborted(tmp_path: Path) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    vol = node.volumes.create_volume(VolumeSpec(name="busy", size=GiB))
    other = node.volumes.create_volume(VolumeSpec(name="free", size=GiB))
    entered = threading.Event()
    release = threading.Event()
    real = node.zfs.set_props

    def slow_set(name: str, props: dict[str, str]) -> None:
        if name == vol.dataset:
            entered.set()
            release.wait(10)
        real(name, props)

    node.zfs.set_props = slow_set  # type: ignore[assignment,method-assign]
    t = threading.Thread(target=node.volumes.expand_volume, args=(vol.id, 2 * GiB))
    t.start()
    assert entered.wait(10)
    try:
        for call in (lambda: node.volumes.delete_volume(vol.id),
                     lambda: node.volumes.expand_volume(vol.id, 3 * GiB),
                     lambda: node.volumes.create_snapshot("snap-busy", vol.id),
                     lambda: node.volumes.publish(vol.id, "nqn.2014-08.org.nvmexpress:uuid:aaaa")):
            with pytest.raises(ZvoltError) as err:
                call()
            assert err.value.code == grpc.StatusCode.ABORTED
        # An independent volume proceeds while the first is held.
        assert node.volumes.expand_volume(other.id, 2 * GiB).size == 2 * GiB
    finally:
        release.set()
        t.join(10)
    assert node.volumes.index.volume(vol.id).size == 2 * GiB  # type: ignore[union-attr]
