"""Reclaim on the real stack: deleted data goes back to the pool.

ext4 and xfs volumes are staged by the node plugin, which trims them on its own schedule
(csi/trim.py, started here with a short --trim-interval); the test only deletes a file and waits
for the zvol's `used` to fall. Raw block volumes pass blkdiscard through NVMe/TCP to the zvol.
A snapshot keeps what it references: trimming the origin moves those blocks to the snapshot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_csi_lab import CONFIGFS, Csi, T, block_cap, mount_cap, uniq  # type: ignore[import-not-found]

from zvolt.pb import csi_pb2

pytestmark = pytest.mark.lab

MiB = 1 << 20
GiB = 1 << 30
DATA = 512 * MiB
WANT = int(0.9 * DATA)  # the bar: at least 90% of what was deleted comes back
TRIM_EVERY = 20  # seconds: the node plugin's --trim-interval for this module (default 3600)

WRITE_FILE = """
import os
with open({path!r}, "wb") as f:
    for _ in range({chunks}):
        f.write(os.urandom(4 << 20))  # incompressible: the pool compresses with lz4
    f.flush()
    os.fsync(f.fileno())
os.sync()
"""
WRITE_BLOCK = """
import os
fd = os.open({path!r}, os.O_WRONLY)
for i in range({chunks}):
    os.pwrite(fd, os.urandom(4 << 20), i * (4 << 20))
os.fsync(fd)
os.close(fd)
"""


@pytest.fixture(scope="module")
def services(lab: Any) -> Iterator[Any]:
    if not lab.service_running("agent"):
        lab.start_agent()
    lab.start_controller()
    lab.start_node("--trim-interval", str(TRIM_EVERY))
    try:
        yield lab
    finally:
        lab.start_node()  # back to the standard node plugin for the modules that follow


@pytest.fixture
def csi(services: Any) -> Iterator[Csi]:
    env = Csi(services)
    try:
        yield env
    finally:
        env.cleanup()


def dataset_of(csi: Csi, nqn: str) -> str:
    """The zvol behind the subsystem, read from the namespace the agent exported."""
    path = csi.lab.run(["sh", "-c", f"cat {CONFIGFS}/{nqn}/namespaces/*/device_path"]).stdout.strip()
    assert path.startswith("/dev/zvol/"), path
    return str(path.removeprefix("/dev/zvol/"))


def zget(csi: Csi, name: str, prop: str) -> int:
    # Frees land with the next txg: sync it so `used` is current.
    csi.lab.run(["zpool", "sync", csi.lab.pool], timeout=T)
    return int(csi.lab.run(["zfs", "get", "-H", "-p", "-o", "value", prop, name]).stdout.strip())


def wait_used_below(csi: Csi, ds: str, limit: int, timeout: float) -> tuple[int, float]:
    """Polls the zvol's `used` until it is at most `limit`; returns (used, seconds waited)."""
    start = time.monotonic()
    while True:
        used = zget(csi, ds, "used")
        waited = time.monotonic() - start
        if used <= limit or waited > timeout:
            return used, waited
        time.sleep(2)


def queue_limit(csi: Csi, device: str, attr: str) -> int:
    name = csi.lab.run(["sh", "-c", f"basename $(readlink -f {device})"]).stdout.strip()
    return int(csi.lab.run(["cat", f"/sys/block/{name}/queue/{attr}"]).stdout.strip())


def trim_logs(csi: Csi, volume_id: str) -> list[dict[str, Any]]:
    lines = []
    for line in csi.lab.service_log("node", 400).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "fstrim" and entry.get("volume_id") == volume_id:
            lines.append(entry)
    return lines


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_deleted_file_space_returns_to_the_pool(csi: Csi, fs: str) -> None:
    vol = csi.create(uniq(f"trim-{fs}"), size=GiB)
    att = csi.attach(vol, mount_cap(fs))
    ds = dataset_of(csi, att.nqn)
    device = csi.lab.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", att.staging]).stdout.strip()
    # Discard is advertised end to end: the initiator's namespace and the zvol under nvmet.
    assert queue_limit(csi, device, "discard_max_bytes") > 0
    assert queue_limit(csi, f"/dev/zvol/{ds}", "discard_max_bytes") > 0
    start = time.monotonic()
    csi.py(WRITE_FILE.format(path=f"{att.target}/big.bin", chunks=DATA // (4 * MiB)))
    write_s = time.monotonic() - start
    full = zget(csi, ds, "used")
    assert full >= WANT, f"{full} bytes used after writing {DATA}: the data did not reach the zvol"
    seen = len(trim_logs(csi, vol.volume_id))
    csi.lab.run(["rm", "--", f"{att.target}/big.bin"])
    csi.lab.run(["sync"])
    used, waited = wait_used_below(csi, ds, full - WANT, timeout=6 * TRIM_EVERY)
    freed = full - used
    trims = trim_logs(csi, vol.volume_id)[seen:]  # the plugin's trims since the delete
    print(f"RECLAIM {fs}: used {full} -> {used} bytes, freed {freed / DATA:.1%} of {DATA} in {waited:.1f}s "
          f"after delete (write {write_s:.1f}s); node plugin fstrim runs: "
          f"{[(t['trimmed_bytes'], t['seconds']) for t in trims]}")  # fmt: skip
    assert freed >= WANT, f"only {freed} of {DATA} deleted bytes came back within {waited:.0f}s"
    assert any(t["trimmed_bytes"] >= WANT for t in trims), trims  # the plugin's trim freed it
    csi.detach(att)
    csi.assert_clean(att)


def test_raw_block_discard_frees_the_range(csi: Csi) -> None:
    vol = csi.create(uniq("trim-blk"), size=GiB)
    att = csi.attach(vol, block_cap())
    ds = dataset_of(csi, att.nqn)
    csi.py(WRITE_BLOCK.format(path=att.target, chunks=DATA // (4 * MiB)))
    full = zget(csi, ds, "used")
    assert full >= WANT
    start = time.monotonic()
    csi.lab.run(["blkdiscard", "--offset", "0", "--length", str(DATA), att.target], timeout=T)
    discard_s = time.monotonic() - start
    used, waited = wait_used_below(csi, ds, full - WANT, timeout=60)
    print(f"RECLAIM block: used {full} -> {used} bytes, freed {(full - used) / DATA:.1%} of {DATA}; "
          f"blkdiscard {discard_s:.1f}s, freed {waited:.1f}s later")  # fmt: skip
    assert full - used >= WANT
    csi.detach(att)
    csi.assert_clean(att)


def test_snapshot_keeps_what_a_trim_of_the_origin_frees(csi: Csi) -> None:
    vol = csi.create(uniq("trim-snap"), size=GiB)
    att = csi.attach(vol, block_cap())
    ds = dataset_of(csi, att.nqn)
    csi.py(WRITE_BLOCK.format(path=att.target, chunks=DATA // (4 * MiB)))
    snap = csi.ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=uniq("snap"), source_volume_id=vol.volume_id), timeout=T
    ).snapshot
    csi.snapshots.append(snap.snapshot_id)
    [snap_ds] = csi.lab.run(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", ds]).stdout.split()
    full, snap_before = zget(csi, ds, "used"), zget(csi, snap_ds, "used")
    csi.lab.run(["blkdiscard", "--offset", "0", "--length", str(DATA), att.target], timeout=T)
    used, snap_after = zget(csi, ds, "used"), zget(csi, snap_ds, "used")
    by_dataset = zget(csi, ds, "usedbydataset")
    print(f"RECLAIM snapshot: volume used {full} -> {used}, usedbydataset {by_dataset}, "
          f"snapshot used {snap_before} -> {snap_after}")  # fmt: skip
    # The origin's own blocks went, but the snapshot still references them: nothing is freed.
    assert by_dataset <= full - WANT
    assert used >= full - 16 * MiB
    assert snap_after >= snap_before + WANT
    # A branch of that snapshot: its trim frees what it wrote itself, nothing it shares.
    clone = csi.create(
        uniq("trim-branch"),
        size=GiB,
        source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    catt = csi.attach(clone, block_cap())
    clone_ds = dataset_of(csi, catt.nqn)
    own = 64 * MiB
    csi.py(WRITE_BLOCK.format(path=catt.target, chunks=own // (4 * MiB)))  # over shared blocks
    clone_full, pool_full = zget(csi, clone_ds, "used"), zget(csi, csi.lab.pool, "used")
    csi.lab.run(["blkdiscard", catt.target], timeout=T)  # the whole branch, shared blocks too
    clone_used, pool_used = zget(csi, clone_ds, "used"), zget(csi, csi.lab.pool, "used")
    snap_final = zget(csi, snap_ds, "used")
    print(f"RECLAIM branch: branch used {clone_full} -> {clone_used} after discarding all of it, "
          f"pool used {pool_full} -> {pool_used}, snapshot used {snap_after} -> {snap_final}")  # fmt: skip
    assert clone_full >= int(0.9 * own) and clone_used <= clone_full - int(0.9 * own)
    assert pool_full - pool_used <= own + 16 * MiB  # the 512 MiB the snapshot holds stayed
    assert snap_final >= snap_after - 16 * MiB
    for a in (catt, att):
        csi.detach(a)
        csi.assert_clean(a)
