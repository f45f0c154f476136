"""Group snapshots on the real stack: PostgreSQL data and WAL on two volumes, one group snapshot
under load, both restored, and a second PostgreSQL must start from the pair.

The volumes go through CSI as kubelet would use them (controller publish, NVMe/TCP stage, mount).
One session commits rows 1, 2, 3... one transaction each (fsync'd WAL on the WAL volume) while
another forces a CHECKPOINT every second (data files and pg_control on the data volume), so both
volumes change all the time. A restored pair is consistent only if both members show one instant:
PostgreSQL then starts with crash recovery and holds exactly the rows 1..N for some N between
what was committed before the snapshot call and what was committed after it. The second test
measures group snapshot latency for 2 and 10 volumes against one bare lzc_snapshot of the same
zvols, in one run.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_csi_lab import Csi, T, mount_cap, uniq  # type: ignore[import-not-found]

from zvolt.pb import csi_pb2, csi_pb2_grpc

pytestmark = pytest.mark.lab

MiB = 1 << 20
PG_BIN = "/usr/lib/postgresql/15/bin"
PARENT = "tank/zvolt/v"
WRITER = "DO $$ BEGIN FOR i IN 1..100000000 LOOP INSERT INTO t VALUES (i); COMMIT; END LOOP; END $$;"


@pytest.fixture(scope="module")
def services(lab: Any) -> Any:
    # All three are this checkout's code (the agent serves the group RPCs): (re)start them from /src.
    lab.start_agent()
    lab.start_controller()
    lab.start_node()
    return lab


@pytest.fixture
def csi(services: Any) -> Iterator[Csi]:
    env = Csi(services)
    try:
        yield env
    finally:
        env.cleanup()


class Pg:
    """A PostgreSQL cluster in the guest, as the postgres user, talking on a unix socket only."""

    def __init__(self, lab: Any, pgdata: str, port: int) -> None:
        self.lab, self.pgdata, self.port = lab, pgdata, port

    def run(self, *argv: str, timeout: float = 300, check: bool = True) -> str:
        # env -C: postgres cannot read root's home, the cwd ssh gives us.
        proc = self.lab.run(["runuser", "-u", "postgres", "--", "env", "-C", "/tmp", *argv], timeout=timeout,
                            check=check)
        return str(proc.stdout)

    def start(self) -> None:
        opts = (f"-p {self.port} -k /tmp -c listen_addresses='' -c shared_buffers=16MB -c max_wal_size=64MB "
                "-c checkpoint_timeout=30s")
        self.run(f"{PG_BIN}/pg_ctl", "-D", self.pgdata, "-l", f"{self.pgdata}/../pg-{self.port}.log", "-w",
                 "-t", "240", "-o", opts, "start")

    def stop(self) -> None:
        self.run(f"{PG_BIN}/pg_ctl", "-D", self.pgdata, "-m", "immediate", "-w", "stop", timeout=120, check=False)

    def sql(self, query: str) -> str:
        return self.run("psql", "-X", "-q", "-h", "/tmp", "-p", str(self.port), "-d", "postgres", "-At",
                        "-v", "ON_ERROR_STOP=1", "-c", query, timeout=120).strip()

    def background(self, query: str, repeat_every: float = 0) -> str:
        """Start `query` in the background (once, or every `repeat_every` s); returns its pid."""
        script = f"/tmp/zvolt-grp-{self.port}-{abs(hash(query))}.sql"
        self.lab.run(["tee", "--", script], input=query)
        self.lab.run(["chmod", "0644", script])
        psql = f"psql -X -q -h /tmp -p {self.port} -d postgres -f {script}"
        # Bounded, so that a loop whose server is gone cannot outlive the test by more than minutes.
        loop = f"for i in $(seq 300); do {psql}; sleep {repeat_every}; done" if repeat_every else psql
        cmd = f"runuser -u postgres -- env -C /tmp sh -c '{loop}' >/dev/null 2>&1 </dev/null & echo $!"
        return str(self.lab.run(["sh", "-c", cmd], timeout=60).stdout.strip())

    def log_tail(self) -> str:
        return str(self.lab.run(["tail", "-n", "30", f"{self.pgdata}/../pg-{self.port}.log"], check=False).stdout)


def attach_pair(csi: Csi, data: csi_pb2.Volume, wal: csi_pb2.Volume) -> tuple[str, str]:
    mounts = []
    for vol in (data, wal):
        att = csi.attach(vol, mount_cap())
        csi.lab.run(["chown", "postgres:postgres", att.target])
        mounts.append(att.target)
    return mounts[0], mounts[1]


def test_postgres_data_and_wal_restore_consistent_from_a_group_snapshot_under_load(csi: Csi) -> None:
    lab = csi.lab
    groups = csi_pb2_grpc.GroupControllerStub(csi.ctl_channel)
    data, wal = csi.create(uniq("pgdata"), 256 * MiB), csi.create(uniq("pgwal"), 256 * MiB)
    data_dir, wal_dir = attach_pair(csi, data, wal)
    primary = Pg(lab, f"{data_dir}/pgdata", 5433)
    restored: Pg | None = None
    pids: list[str] = []
    try:
        primary.run(f"{PG_BIN}/initdb", "-D", primary.pgdata, "--waldir", f"{wal_dir}/pgwal", "-A", "trust")
        primary.start()
        primary.sql("CREATE TABLE t (n bigint PRIMARY KEY)")
        pids.append(primary.background(WRITER))
        pids.append(primary.background("CHECKPOINT", repeat_every=1))
        deadline = time.monotonic() + 300
        while int(primary.sql("SELECT count(*) FROM t")) < 200:
            assert time.monotonic() < deadline, "the writer did not commit 200 rows in 300 s"
            time.sleep(2)

        before = int(primary.sql("SELECT max(n) FROM t"))
        start = time.monotonic()
        req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq("group"),
                                                       source_volume_ids=[data.volume_id, wal.volume_id])
        group = groups.CreateVolumeGroupSnapshot(req, timeout=T).group_snapshot
        took = time.monotonic() - start
        after = int(primary.sql("SELECT max(n) FROM t"))
        assert len(group.snapshots) == 2 and group.ready_to_use

        members = {s.source_volume_id: s for s in group.snapshots}
        copies = []
        for vol in (data, wal):
            source = csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=members[vol.volume_id].snapshot_id))
            copies.append(csi.create(uniq("restore"), 256 * MiB, source=source))
        rdata_dir, rwal_dir = attach_pair(csi, copies[0], copies[1])
        # What a new pod mounting the pair at the old paths would see: pg_wal leads to its own WAL
        # volume, and the old postmaster's pid is not a live process.
        lab.run(["ln", "-sfn", f"{rwal_dir}/pgwal", f"{rdata_dir}/pgdata/pg_wal"])
        lab.run(["rm", "-f", f"{rdata_dir}/pgdata/postmaster.pid"])
        restored = Pg(lab, f"{rdata_dir}/pgdata", 5434)
        try:
            restored.start()
        except Exception as exc:
            raise AssertionError(f"PostgreSQL did not start from the restored pair:\n{restored.log_tail()}") from exc
        count, low, high = (int(x or 0) for x in restored.sql("SELECT count(*), min(n), max(n) FROM t").split("|"))
        print(f"\ngroup snapshot under load: {took:.2f}s via CSI; committed before the call {before}, after {after}; "
              f"restored pair: {count} rows, n in [{low}, {high}]", file=sys.stderr)
        print(f"restored log:\n{restored.log_tail()}", file=sys.stderr)
        assert count == high and low == 1, f"rows are not a prefix: {count} rows, n in [{low}, {high}]"
        assert before <= high <= after, f"restored {high} rows, committed {before} before and {after} after"
        assert int(primary.sql("SELECT max(n) FROM t")) > after, "the writer stopped: the load was not running"

        gsid = group.group_snapshot_id
        groups.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=gsid, snapshot_ids=[s.snapshot_id for s in group.snapshots]), timeout=T)
        listed = csi.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=T).entries
        assert not {e.snapshot.snapshot_id for e in listed} & {s.snapshot_id for s in group.snapshots}
    finally:
        for pid in pids:
            lab.run(["kill", pid], check=False)
        for pg in (restored, primary):
            if pg is not None:
                pg.stop()


GUEST_LZC = """
import json, time, libzfs_core as lzc
out = {{}}
for n in {sizes!r}:
    runs = []
    for i in range({reps}):
        snaps = [f"{parent}/{{v}}@lzcbench{{n}}x{{i}}".encode() for v in {vids!r}[:n]]
        start = time.perf_counter()
        lzc.lzc_snapshot(snaps)
        runs.append(time.perf_counter() - start)
        lzc.lzc_destroy_snaps(snaps, False)
    out[n] = runs
print(json.dumps(out))
"""


@pytest.mark.slow
def test_group_snapshot_latency_against_one_lzc_snapshot(csi: Csi) -> None:
    """Bench (issue 18): CreateVolumeGroupSnapshot through CSI for 2 and 10 volumes against one
    lzc_snapshot of the same zvols in the guest, measured in one run. Prints the ratio."""
    import json

    groups = csi_pb2_grpc.GroupControllerStub(csi.ctl_channel)
    vols = [csi.create(uniq(f"gbench{i}"), 16 * MiB).volume_id for i in range(10)]
    reps = 5
    csi_runs: dict[int, list[float]] = {2: [], 10: []}
    for n in csi_runs:
        for i in range(reps):
            req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=uniq(f"gb{n}-{i}"), source_volume_ids=vols[:n])
            start = time.monotonic()
            group = groups.CreateVolumeGroupSnapshot(req, timeout=T).group_snapshot
            csi_runs[n].append(time.monotonic() - start)
            groups.DeleteVolumeGroupSnapshot(
                csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id), timeout=T)
    local = [v.partition("/")[2] for v in vols]
    raw = csi.lab.py(GUEST_LZC.format(sizes=[2, 10], reps=reps, parent=PARENT, vids=local), timeout=600).stdout
    lzc_runs = {int(k): v for k, v in json.loads(raw).items()}
    lines = []
    for n in (2, 10):
        ours, bare = statistics.median(csi_runs[n]), statistics.median(lzc_runs[n])
        lines.append(f"  {n:>2} volumes: CSI CreateVolumeGroupSnapshot p50 {ours * 1000:.0f} ms, "
                     f"lzc_snapshot p50 {bare * 1000:.0f} ms, ratio {ours / bare:.2f}x")
        assert all(x > 0 for x in csi_runs[n] + lzc_runs[n])
    print("\ngroup snapshot latency (lab, TCG; {} runs each):\n{}".format(reps, "\n".join(lines)), file=sys.stderr)
