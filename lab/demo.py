"""The demo: PostgreSQL on a zvolt volume and on an instant branch of it, over NVMe/TCP.

Drives the CSI gRPC API exactly as kubelet and the external-* sidecars would (controller
and node plugin running in the lab guest), runs Debian's PostgreSQL on the volumes in the
worker namespace, and tears everything down again, also on Ctrl-C or a failure.
Run it with `scripts/demo` (the README's first command).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from lab import control
from lab.guest import WORKER_NS, Lab
from lab.paths import Cache
from zvolt.pb import agent_pb2, agent_pb2_grpc, csi_pb2, csi_pb2_grpc

GIB = 1024**3
PG_BIN = "/usr/lib/postgresql/15/bin"
ROWS = 10_000
LOAD_SQL = (
    "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int);"
    "INSERT INTO accounts SELECT g, 'user' || g, 100 FROM generate_series(1, 10000) g;"
    "CHECKPOINT;"
)
TOTALS_SQL = "SELECT count(*), sum(balance) FROM accounts"
VIEW_SQL = (
    "SELECT count(*) || ' rows, ' || count(*) FILTER (WHERE balance = 0) || ' zeroed, extra: ' || "
    "coalesce(string_agg(owner, ',') FILTER (WHERE id < 0), '-') FROM accounts"
)


class Steps:
    """Numbered steps, each printed with how long it took."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.n = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.n += 1
        self.out.write(f"[{time.monotonic() - self.t0:7.1f}s] {self.n:2d}. {title} ... ")
        self.out.flush()
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self.out.write(f"FAILED after {time.monotonic() - start:.2f}s\n")
            self.out.flush()
            raise
        self.out.write(f"{time.monotonic() - start:.2f}s\n")
        self.out.flush()

    def show(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self.out.write(f"{'':14}{line}\n")
        self.out.flush()


@dataclass
class Attached:
    """One volume as kubelet would have it: published to the node, staged, mounted in a pod dir."""

    volume_id: str
    staging: str
    target: str
    cleanups: list[Callable[[], None]] = field(default_factory=list)


class Csi:
    """The calls kubelet and the CSI sidecars make, in their order."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.controller = csi_pb2_grpc.ControllerStub(grpc.insecure_channel(lab.grpc_target("controller")))
        self.node = csi_pb2_grpc.NodeStub(grpc.insecure_channel(lab.grpc_target("node")))
        self.identity = csi_pb2_grpc.IdentityStub(grpc.insecure_channel(lab.grpc_target("controller")))
        self.agent = agent_pb2_grpc.AgentStub(grpc.insecure_channel(lab.grpc_target("agent")))
        self.node_id = ""

    @staticmethod
    def mount_cap() -> Any:
        return csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )

    def create(self, name: str, size: int, source_snapshot: str = "") -> Any:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[self.mount_cap()],
            parameters={"volblocksize": "8K", "compression": "lz4", "csi.storage.k8s.io/fstype": "ext4"},
        )
        if source_snapshot:
            req.volume_content_source.snapshot.snapshot_id = source_snapshot
        return self.controller.CreateVolume(req, timeout=120).volume

    def attach(self, volume: Any, pod: str) -> Attached:
        staging = f"/var/lib/kubelet/plugins/kubernetes.io/csi/csi.zvolt.io/{pod}/globalmount"
        target = f"/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~csi/{pod}/mount"
        att = Attached(volume.volume_id, staging, target)
        published = self.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id=self.node_id, volume_capability=self.mount_cap(),
                volume_context=volume.volume_context,
            ),
            timeout=120,
        )
        att.cleanups.append(lambda: self.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=self.node_id), timeout=120))
        # kubelet creates the staging folder and the target's parent; the plugin does the rest.
        self.lab.run(["mkdir", "-p", staging, target.rsplit("/", 1)[0]])
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, publish_context=published.publish_context,
                staging_target_path=staging, volume_capability=self.mount_cap(),
                volume_context=volume.volume_context,
            ),
            timeout=180,
        )
        att.cleanups.append(lambda: self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging), timeout=180))
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id, publish_context=published.publish_context,
                staging_target_path=staging, target_path=target, volume_capability=self.mount_cap(),
                volume_context=volume.volume_context,
            ),
            timeout=120,
        )
        att.cleanups.append(lambda: self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target), timeout=120))
        return att

    def detach(self, att: Attached) -> None:
        while att.cleanups:
            att.cleanups.pop()()

    def used_bytes(self, volume_id: str) -> int:
        local = volume_id.split("/", 1)[1]
        return int(self.agent.GetVolume(agent_pb2.GetVolumeRequest(volume_id=local), timeout=60).volume.used_bytes)


class Postgres:
    """A PostgreSQL cluster in the worker namespace, data on a mounted zvolt volume."""

    def __init__(self, lab: Lab, mount: str, port: int) -> None:
        self.lab = lab
        self.data = f"{mount}/pgdata"
        self.mount = mount
        self.port = port

    def _as_postgres(self, *argv: str, timeout: float = 180) -> str:
        # env -C: postgres cannot read root's home, the cwd ssh gives us.
        return self.lab.run(
            ["runuser", "-u", "postgres", "--", "env", "-C", "/tmp", *argv], netns=WORKER_NS, timeout=timeout
        ).stdout

    def initdb(self) -> None:
        self.lab.run(["chown", "postgres:postgres", self.mount])
        # initdb must sync: a snapshot holds only what reached the device, and CHECKPOINT
        # does not fsync the files initdb wrote (seen here: a branch with an empty PG_VERSION).
        self._as_postgres(f"{PG_BIN}/initdb", "-D", self.data, "-A", "trust", timeout=300)

    def start(self) -> None:
        self._as_postgres(
            f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", f"{self.mount}/postgres.log", "-w", "-t", "240",
            "-o", f"-p {self.port} -k /tmp -c listen_addresses=''", "start", timeout=300,
        )

    def stop(self) -> None:
        self._as_postgres(f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", timeout=180)

    def sql(self, query: str) -> str:
        return self._as_postgres(
            "psql", "-X", "-q", "-h", "/tmp", "-p", str(self.port), "-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1",
            "-c", query,
        ).strip()


def run_demo(lab: Lab, out: TextIO) -> None:
    s = Steps(out)
    csi = Csi(lab)
    tag = uuid.uuid4().hex[:6]
    with contextlib.ExitStack() as undo:
        with s.step("CSI identity: plugin info and probe (controller + node)"):
            info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
            ready = csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
            node = csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)
            csi.node_id = node.node_id
        s.show(f"driver {info.name} {info.vendor_version}, ready={ready.ready.value}, node id {node.node_id}")

        with s.step("CreateVolume demo-db (1 GiB, thin, 8K volblocksize, lz4)"):
            main_vol = csi.create(f"demo-db-{tag}", GIB)
        undo.callback(lambda: csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=main_vol.volume_id), timeout=120))
        s.show(f"volume id {main_vol.volume_id}")

        with s.step("ControllerPublish + NodeStage (nvme connect, mkfs.ext4, mount) + NodePublish"):
            main_att = csi.attach(main_vol, f"pod-main-{tag}")
        undo.callback(csi.detach, main_att)

        pg_main = Postgres(lab, main_att.target, 5433)
        with s.step("initdb + start PostgreSQL on the volume (worker namespace)"):
            pg_main.initdb()
            pg_main.start()
        undo.callback(pg_main.stop)

        with s.step(f"load {ROWS:,} rows, then CHECKPOINT"):
            pg_main.sql(LOAD_SQL)
            totals = pg_main.sql(TOTALS_SQL)
        s.show(f"main: {totals} (rows|sum of balances)")

        with s.step("CreateSnapshot of demo-db"):
            snap = csi.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(source_volume_id=main_vol.volume_id, name=f"demo-snap-{tag}"),
                timeout=120,
            ).snapshot
        undo.callback(lambda: csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120))
        s.show(f"snapshot id {snap.snapshot_id}, restore size {snap.size_bytes:,} bytes")

        with s.step("CreateVolume demo-branch from the snapshot (a ZFS clone)"):
            branch_vol = csi.create(f"demo-branch-{tag}", GIB, source_snapshot=snap.snapshot_id)
        undo.callback(lambda: csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=branch_vol.volume_id), timeout=120))

        with s.step("attach the branch (publish, stage: no mkfs on a non-blank device, mount)"):
            branch_att = csi.attach(branch_vol, f"pod-branch-{tag}")
        undo.callback(csi.detach, branch_att)

        pg_branch = Postgres(lab, branch_att.target, 5434)
        with s.step("start a second PostgreSQL on the branch (crash recovery from the snapshot)"):
            # The clone carries the source server's lock file; that server is alive on this
            # same host, so PostgreSQL would refuse to start. The file is stale for the copy.
            lab.run(["rm", "-f", f"{pg_branch.data}/postmaster.pid"])
            pg_branch.start()
        undo.callback(pg_branch.stop)

        with s.step("both see the shared rows; writes stay on their own side"):
            pg_branch.sql("UPDATE accounts SET balance = 0 WHERE id <= 100;"
                          "INSERT INTO accounts VALUES (-1, 'branch', 1)")
            pg_main.sql("INSERT INTO accounts VALUES (-2, 'main', 2)")
            main_view, branch_view = pg_main.sql(VIEW_SQL), pg_branch.sql(VIEW_SQL)
        s.show(f"main:   {main_view}")
        s.show(f"branch: {branch_view}")
        if "main" in branch_view or "branch" in main_view:
            raise RuntimeError("a write crossed between the volume and its branch")

        with s.step("space used by the branch vs the source (ZFS used bytes, from the agent)"):
            used_main, used_branch = csi.used_bytes(main_vol.volume_id), csi.used_bytes(branch_vol.volume_id)
        s.show(f"demo-db:     {used_main / 1024**2:8.1f} MiB")
        s.show(f"demo-branch: {used_branch / 1024**2:8.1f} MiB (only the blocks the branch changed)")

        with s.step("clean up: stop PostgreSQL, unpublish, unstage, delete branch, snapshot, volume"):
            undo.close()
    out.write(f"demo finished in {time.monotonic() - s.t0:.1f}s\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab guest running afterwards")
    args = parser.parse_args(argv)
    out = sys.stdout
    cache = Cache.from_env()
    instance = "demo"
    if _host_has_stack():
        out.write("this host has ZFS and nvmet; the demo still runs in the lab guest, never on host pools\n")
    t0 = time.monotonic()
    booted = not control.is_running(cache, instance)
    out.write("starting the lab guest (first run builds the image from Debian packages: ~10-20 min, then cached)\n")
    try:
        lab = control.up(cache, instance, control.UpOptions(), out)
        out.write(f"lab ready in {time.monotonic() - t0:.1f}s: "
                  "agent (storage ns), CSI controller, CSI node (worker ns)\n\n")
        run_demo(lab, out)
        return 0
    except KeyboardInterrupt:
        out.write("\ninterrupted: cleaned up what the demo had created\n")
        return 130
    except (grpc.RpcError, RuntimeError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        out.write(f"\ndemo failed: {detail}\n")
        return 1
    finally:
        if booted and not args.keep_lab:
            control.down(cache, instance, out)


def _host_has_stack() -> bool:
    from pathlib import Path

    return Path("/sys/module/zfs").exists() and Path("/sys/kernel/config/nvmet").exists()


if __name__ == "__main__":
    sys.exit(main())
