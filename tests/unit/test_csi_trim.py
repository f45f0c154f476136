"""The periodic trim: its pure schedule, the staged-volume filter, and the loop on fakes."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from csi.locks import KeyLocks
from csi.main import parser
from csi.mounter import MountInfo, SystemMounter
from csi.runner import Result
from csi.trim import Trimmer, TrimMetrics, TrimSchedule, staged_filesystems, volume_of_nqn
from zvolt.errors import ZvoltError, internal
from zvolt.names import subsystem_nqn

HOUR = 3600.0
NQN_A = subsystem_nqn("storage-0", "vaaaa")
NQN_B = subsystem_nqn("storage-0", "vbbbb")


def test_new_volumes_are_spread_over_the_first_interval() -> None:
    sched = TrimSchedule(HOUR, rng=random.Random(1))
    volumes = [f"storage-0/v{i}" for i in range(200)]
    sched.next(0.0, volumes)
    assert len(sched.due) == 200
    firsts = sorted(sched.due.values())
    assert firsts[0] >= 0 and firsts[-1] <= HOUR
    # Spread, not bunched: every quarter of the interval gets a fair share.
    quarters = [sum(1 for t in firsts if q * HOUR / 4 <= t < (q + 1) * HOUR / 4) for q in range(4)]
    assert min(quarters) > 30, quarters


def test_one_volume_at_a_time_most_overdue_first() -> None:
    sched = TrimSchedule(HOUR, rng=random.Random(2))
    sched.due.update({"n/a": 10.0, "n/b": 5.0, "n/c": 500.0})
    assert sched.next(100.0, ["n/a", "n/b", "n/c"]) == "n/b"
    sched.done("n/b", 100.0)
    assert sched.next(100.0, ["n/a", "n/b", "n/c"]) == "n/a"
    sched.done("n/a", 100.0)
    assert sched.next(100.0, ["n/a", "n/b", "n/c"]) is None
    assert sched.wait(100.0) == pytest.approx(60.0)  # capped: c is due at 500


def test_after_a_trim_the_next_is_one_interval_later_within_jitter() -> None:
    sched = TrimSchedule(HOUR, jitter=0.1, rng=random.Random(3))
    for i in range(100):
        sched.done(f"n/v{i}", 1000.0)
    assert all(1000 + 0.9 * HOUR <= t <= 1000 + 1.1 * HOUR for t in sched.due.values())
    assert len({round(t) for t in sched.due.values()}) > 50  # jittered, not one instant


def test_unstaged_volumes_are_forgotten() -> None:
    sched = TrimSchedule(HOUR)
    sched.due.update({"n/a": 0.0, "n/b": 0.0})
    assert sched.next(1.0, ["n/b"]) == "n/b"
    assert set(sched.due) == {"n/b"}


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TrimSchedule(0)
    with pytest.raises(ValueError):
        TrimSchedule(HOUR, jitter=1.0)


def test_volume_of_nqn_round_trips_only_zvolt_subsystems() -> None:
    assert volume_of_nqn(NQN_A) == "storage-0/vaaaa"
    assert volume_of_nqn("nqn.2014-08.org.nvmexpress:uuid:1234") is None
    assert volume_of_nqn("nqn.2026-11.io.zvolt:storage-0:../etc") is None
    assert volume_of_nqn("nqn.2026-11.io.zvolt:host:worker-0:0f8fad5b-d9cb-469f-a165-70867728950e") is None


def test_staged_filesystems_one_rw_mount_per_zvolt_volume() -> None:
    mounts = [
        MountInfo("/stage/a", "/dev/nvme0n1", "ext4", ("rw", "noatime")),
        MountInfo("/pods/a", "/dev/nvme0n1", "ext4", ("rw", "noatime")),  # bind mount: same fs
        MountInfo("/stage/b", "/dev/nvme1n1", "xfs", ("ro",)),  # read-only: fstrim would fail
        MountInfo("/stage/c", "/dev/nvme2n1", "ext4", ("rw", "discard")),  # online discard already
        MountInfo("/stage/d", "/dev/nvme3n1", "ext4", ("rw",)),  # another vendor's NVMe disk
        MountInfo("/", "/dev/vda", "ext4", ("rw",)),
    ]
    nqns = {"/dev/nvme0n1": NQN_A, "/dev/nvme1n1": NQN_B, "/dev/nvme2n1": NQN_B,
            "/dev/nvme3n1": "nqn.2014-08.org.nvmexpress:uuid:x"}  # fmt: skip
    found = staged_filesystems(mounts, nqns.get)
    assert list(found) == ["storage-0/vaaaa"]
    assert found["storage-0/vaaaa"].mountpoint == "/stage/a"


@dataclass
class FakeTrimHost:
    mounts: list[MountInfo]
    trimmed: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail: bool = False

    def filesystems(self) -> list[MountInfo]:
        return list(self.mounts)

    def mount_info(self, target: str) -> MountInfo | None:
        return next((m for m in self.mounts if m.target == target), None)

    def fstrim(self, mountpoint: str) -> int:
        self.calls.append(mountpoint)
        if self.fail:
            raise internal("fstrim failed (fstrim exit 1): the discard operation is not supported")
        return self.trimmed.get(mountpoint, 0)


def _trimmer(host: FakeTrimHost, locks: KeyLocks, clock: list[float]) -> tuple[Trimmer, CollectorRegistry]:
    registry = CollectorRegistry()
    sched = TrimSchedule(HOUR, rng=random.Random(4))
    nqns = {"/dev/nvme0n1": NQN_A, "/dev/nvme1n1": NQN_B}
    return Trimmer(sched, host, nqns.get, locks, TrimMetrics(registry), clock=lambda: clock[0]), registry


def test_trimmer_trims_each_volume_once_per_interval_and_counts_bytes() -> None:
    host = FakeTrimHost(
        [MountInfo("/stage/a", "/dev/nvme0n1", "ext4", ("rw",)), MountInfo("/stage/b", "/dev/nvme1n1", "xfs", ("rw",))],
        trimmed={"/stage/a": 512 << 20, "/stage/b": 4096},
    )
    clock = [0.0]
    trimmer, registry = _trimmer(host, KeyLocks(), clock)
    for _ in range(3 * 60 * 2):  # three hours of steps, 30 s apart
        trimmer.step()
        clock[0] += 30
    assert sorted(set(host.calls)) == ["/stage/a", "/stage/b"]
    assert 2 <= host.calls.count("/stage/a") <= 3 and 2 <= host.calls.count("/stage/b") <= 3
    total = registry.get_sample_value("zvolt_csi_node_trimmed_bytes_total")
    assert total == host.calls.count("/stage/a") * (512 << 20) + host.calls.count("/stage/b") * 4096
    assert registry.get_sample_value("zvolt_csi_node_trims_total", {"result": "ok"}) == len(host.calls)


def test_trimmer_skips_a_volume_held_by_another_operation() -> None:
    host = FakeTrimHost([MountInfo("/stage/a", "/dev/nvme0n1", "ext4", ("rw",))])
    locks = KeyLocks()
    clock = [0.0]
    trimmer, registry = _trimmer(host, locks, clock)
    trimmer.schedule.due["storage-0/vaaaa"] = 0.0
    with locks.hold("storage-0/vaaaa"):  # e.g. NodeUnstageVolume in progress
        trimmer.step()
    assert host.calls == []
    assert registry.get_sample_value("zvolt_csi_node_trims_total", {"result": "error"}) is None
    # Looked at again soon, not a whole interval later.
    assert trimmer.schedule.due["storage-0/vaaaa"] <= 60.0
    clock[0] = 61.0
    trimmer.step()
    assert host.calls == ["/stage/a"]


def test_trimmer_skips_a_volume_unmounted_before_it_got_the_lock() -> None:
    class Racing(FakeTrimHost):
        def filesystems(self) -> list[MountInfo]:
            seen = super().filesystems()
            self.mounts.clear()  # NodeUnstageVolume finishes right after the mount table was read
            return seen

    host = Racing([MountInfo("/stage/a", "/dev/nvme0n1", "ext4", ("rw",))])
    clock = [0.0]
    trimmer, _ = _trimmer(host, KeyLocks(), clock)
    trimmer.schedule.due["storage-0/vaaaa"] = 0.0
    trimmer.step()
    assert host.calls == []


def test_trimmer_counts_failures_and_keeps_going() -> None:
    host = FakeTrimHost([MountInfo("/stage/a", "/dev/nvme0n1", "ext4", ("rw",))], fail=True)
    clock = [0.0]
    trimmer, registry = _trimmer(host, KeyLocks(), clock)
    trimmer.schedule.due["storage-0/vaaaa"] = 0.0
    trimmer.step()
    trimmer.step()  # not retried in a tight loop: next interval
    assert host.calls == ["/stage/a"]
    assert registry.get_sample_value("zvolt_csi_node_trims_total", {"result": "error"}) == 1


class Recorder:
    def __init__(self, results: dict[str, Result]) -> None:
        self.results = results
        self.argvs: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> Result:
        self.argvs.append(list(argv))
        return self.results.get(argv[0], Result(0, "", ""))


def test_fstrim_and_filesystems_argv_and_parsing() -> None:
    rec = Recorder(
        {
            "fstrim": Result(0, "/stage/a: 512 MiB (536870912 bytes) trimmed\n", ""),
            "findmnt": Result(0, "/stage/a /dev/nvme0n1 ext4 rw,noatime\n/ /dev/vda ext4 rw\n", ""),
        }
    )
    m = SystemMounter(runner=rec)
    assert m.fstrim("/stage/a") == 536870912
    assert m.filesystems() == [
        MountInfo("/stage/a", "/dev/nvme0n1", "ext4", ("rw", "noatime")),
        MountInfo("/", "/dev/vda", "ext4", ("rw",)),
    ]
    assert rec.argvs[0] == ["fstrim", "--verbose", "--", "/stage/a"]
    assert rec.argvs[1] == ["findmnt", "--noheadings", "--raw", "--types", "ext4,xfs",
                            "--output", "TARGET,SOURCE,FSTYPE,OPTIONS"]  # fmt: skip
    none = SystemMounter(runner=Recorder({"findmnt": Result(1, "", "")}))
    assert none.filesystems() == []
    broken = SystemMounter(runner=Recorder({"findmnt": Result(1, "", "findmnt: mutually exclusive arguments")}))
    with pytest.raises(ZvoltError, match="mutually exclusive"):
        broken.filesystems()
    silent = SystemMounter(runner=Recorder({"fstrim": Result(0, "", "")}))
    with pytest.raises(ZvoltError, match="no byte count"):
        silent.fstrim("/stage/a")
    with pytest.raises(ZvoltError):
        m.fstrim("relative")


def test_mkfs_lets_the_device_discard() -> None:
    rec = Recorder({})
    m = SystemMounter(runner=rec)
    m.mkfs("/dev/nvme0n1", "ext4")
    m.mkfs("/dev/nvme0n1", "xfs")
    assert not any("nodiscard" in a for a in rec.argvs[0]) and "-K" not in rec.argvs[1]


def test_trim_interval_flag() -> None:
    assert parser().parse_args(["--mode", "node"]).trim_interval == 3600
    assert parser().parse_args(["--mode", "node", "--trim-interval", "0"]).trim_interval == 0
