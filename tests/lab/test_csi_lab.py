"""The CSI driver on the real stack: node plugin in the worker netns, agent in the storage netns.

Controller and node plugin run as the lab's standard services in the guest; the tests talk to
them over the forwarded gRPC ports, exactly like kubelet and the sidecars would, and check the
kernel state (mounts, NVMe controllers, nvmet subsystems) with commands in the guest.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from zvolt.names import split_volume_id, subsystem_nqn
from zvolt.pb import csi_pb2, csi_pb2_grpc

pytestmark = pytest.mark.lab

MiB = 1 << 20
T = 180  # per-RPC deadline: TCG makes everything 10-50x slower than hardware
WORK = "/var/lib/zvolt-lab-csi"
CONFIGFS = "/sys/kernel/config/nvmet/subsystems"
Mode = csi_pb2.VolumeCapability.AccessMode


def mount_cap(fs: str = "ext4") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs, mount_flags=["noatime"]),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
    )


def block_cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
    )


def uniq(prefix: str) -> str:
    return f"lab-csi-{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Attached:
    volume_id: str
    nqn: str
    staging: str
    target: str
    cap: csi_pb2.VolumeCapability
    ctx: dict[str, str]


class Csi:
    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.ctl_channel = grpc.insecure_channel(lab.grpc_target("controller"))
        self.node_channel = grpc.insecure_channel(lab.grpc_target("node"))
        self.ctl = csi_pb2_grpc.ControllerStub(self.ctl_channel)
        self.node = csi_pb2_grpc.NodeStub(self.node_channel)
        self.node_id = self._wait(lambda: self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=T).node_id)
        self.created: list[str] = []
        self.snapshots: list[str] = []
        self.attached: list[Attached] = []

    @staticmethod
    def _wait(fn: Any, timeout: float = 300) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def create(
        self, name: str, size: int = 64 * MiB, source: csi_pb2.VolumeContentSource | None = None
    ) -> csi_pb2.Volume:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_cap(), block_cap()],
        )
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        vol: csi_pb2.Volume = self._wait(lambda: self.ctl.CreateVolume(req, timeout=T).volume)
        self.created.append(vol.volume_id)
        return vol

    def attach(self, vol: csi_pb2.Volume, cap: csi_pb2.VolumeCapability) -> Attached:
        pub = csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=self.node_id, volume_capability=cap
        )
        ctx = self.ctl.ControllerPublishVolume(pub, timeout=T).publish_context
        base = f"{WORK}/{vol.volume_id.replace('/', '_')}"
        att = Attached(vol.volume_id, ctx["nqn"], f"{base}/staging", f"{base}/pod/volume", cap, dict(ctx))
        self.attached.append(att)
        self.node_attach(att)
        return att

    def attach_with_node_secrets(self, vol: csi_pb2.Volume, secrets: dict[str, str]) -> Attached:
        """As kubelet does for a class that names a node-stage secret: ControllerPublish with the
        volume's context; NodeStage refused without the secret (FAILED_PRECONDITION), done with
        it; NodePublish."""
        cap = mount_cap()
        ctx = dict(self.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=self.node_id, volume_capability=cap,
            volume_context=vol.volume_context), timeout=T).publish_context)
        base = f"{WORK}/{vol.volume_id.replace('/', '_')}"
        att = Attached(vol.volume_id, ctx["nqn"], f"{base}/staging", f"{base}/pod/volume", cap, ctx)
        self.attached.append(att)
        stage = csi_pb2.NodeStageVolumeRequest(volume_id=vol.volume_id, publish_context=ctx,
                                               staging_target_path=att.staging, volume_capability=cap)
        with pytest.raises(grpc.RpcError) as err:
            self.node.NodeStageVolume(stage, timeout=T)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        stage.secrets.update(secrets)
        self.node.NodeStageVolume(stage, timeout=T)
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, publish_context=ctx, staging_target_path=att.staging, target_path=att.target,
            volume_capability=cap), timeout=T)
        return att

    def node_attach(self, att: Attached) -> None:
        vol_id, ctx, cap = att.volume_id, att.ctx, att.cap
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=vol_id, publish_context=ctx, staging_target_path=att.staging, volume_capability=cap
        )
        self.node.NodeStageVolume(stage, timeout=T)
        self.node.NodeStageVolume(stage, timeout=T)  # idempotent repeat on the real stack
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol_id, publish_context=ctx, staging_target_path=att.staging,
            target_path=att.target, volume_capability=cap,
        )  # fmt: skip
        self.node.NodePublishVolume(publish, timeout=T)
        self.node.NodePublishVolume(publish, timeout=T)

    def node_detach(self, att: Attached) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=att.volume_id, target_path=att.target), timeout=T
        )
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=att.volume_id, staging_target_path=att.staging), timeout=T
        )

    def detach(self, att: Attached) -> None:
        self.node_detach(att)
        self.ctl.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=att.volume_id, node_id=self.node_id), timeout=T
        )
        if att in self.attached:
            self.attached.remove(att)

    def cleanup(self) -> None:
        for att in list(self.attached):
            with contextlib.suppress(grpc.RpcError):
                self.detach(att)
        for snap in self.snapshots:
            self.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap), timeout=T)
        for vol in reversed(self.created):
            self.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol), timeout=T)
        self.lab.run(["rm", "-rf", "--one-file-system", WORK], check=False)
        self.ctl_channel.close()
        self.node_channel.close()

    # -- kernel state in the guest ------------------------------------------------------------

    def controllers_for(self, nqn: str) -> list[str]:
        code = f"""
import glob, os
for path in sorted(glob.glob("/sys/class/nvme/nvme*/subsysnqn")):
    if open(path).read().strip() == {nqn!r}:
        print(os.path.basename(os.path.dirname(path)))
"""
        return self.py(code).split()

    def mounted(self, path: str) -> bool:
        return bool(self.lab.run(["findmnt", "--mountpoint", path], check=False).returncode == 0)

    def exported(self, nqn: str) -> bool:
        return bool(self.lab.run(["test", "-d", f"{CONFIGFS}/{nqn}"], check=False).returncode == 0)

    def py(self, code: str) -> str:
        return str(self.lab.py(code, timeout=T).stdout.strip())

    def assert_clean(self, att: Attached) -> None:
        assert not self.mounted(att.target) and not self.mounted(att.staging)
        assert self.controllers_for(att.nqn) == []
        assert not self.exported(att.nqn)


@pytest.fixture(scope="module")
def services(lab: Any) -> Any:
    if not lab.service_running("agent"):
        lab.start_agent()
    # Controller and node plugin are this module's code: always (re)start them from /src.
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


WRITE = """
import hashlib, os
data = os.urandom(3 * 1024 * 1024 + 17)
with open({path!r}, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.sync()
print(hashlib.sha256(data).hexdigest())
"""
READ = """
import hashlib  # noqa
print(hashlib.sha256(open({path!r}, "rb").read()).hexdigest())
"""


# mkfs.xfs refuses devices under 300 MiB.
FS_SIZES = [("ext4", 64 * MiB), ("xfs", 320 * MiB)]


@pytest.mark.parametrize(("fs", "size"), FS_SIZES)
def test_filesystem_snapshot_clone_same_bytes(csi: Csi, fs: str, size: int) -> None:
    vol = csi.create(uniq("src"), size=size)
    att = csi.attach(vol, mount_cap(fs))
    assert csi.mounted(att.staging) and csi.mounted(att.target)
    [ctrl] = csi.controllers_for(att.nqn)
    hostnqn = csi.lab.run(["cat", f"/sys/class/nvme/{ctrl}/hostnqn"]).stdout.strip()
    assert hostnqn == csi.node_id  # connected with the node's own identity
    digest = csi.py(WRITE.format(path=f"{att.target}/data.bin"))
    snap = csi.ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=uniq("snap"), source_volume_id=vol.volume_id), timeout=T
    ).snapshot
    csi.snapshots.append(snap.snapshot_id)
    assert snap.ready_to_use and snap.size_bytes == vol.capacity_bytes
    clone = csi.create(
        uniq("clone"),
        size=size,
        source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    assert split_volume_id(clone.volume_id)[0] == split_volume_id(vol.volume_id)[0]
    # Same node, origin still mounted: XFS needs nouuid for the clone, which the plugin adds.
    catt = csi.attach(clone, mount_cap(fs))
    fstype = csi.lab.run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", catt.staging]).stdout.strip()
    assert fstype == fs
    assert csi.py(READ.format(path=f"{catt.target}/data.bin")) == digest
    stats = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=clone.volume_id, volume_path=catt.target), timeout=T
    )
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[csi_pb2.VolumeUsage.BYTES].used >= 3 * MiB
    assert by_unit[csi_pb2.VolumeUsage.INODES].total > 0
    assert not stats.volume_condition.abnormal
    for a in (catt, att):
        csi.detach(a)
        csi.assert_clean(a)


@pytest.mark.parametrize(("fs", "size"), FS_SIZES)
def test_multi_node_reader_only_stage_is_read_only_without_replay(csi: Csi, fs: str, size: int) -> None:
    """MULTI_NODE_READER_ONLY is staged on several nodes at once: the plugin mounts it read-only
    without a journal replay (ext4 noload, xfs norecovery); the pod reads, its writes are refused."""
    vol = csi.create(uniq("rox"), size=size)
    att = csi.attach(vol, mount_cap(fs))
    digest = csi.py(WRITE.format(path=f"{att.target}/data.bin"))
    csi.detach(att)
    snap = csi.ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=uniq("rox-snap"), source_volume_id=vol.volume_id), timeout=T
    ).snapshot
    csi.snapshots.append(snap.snapshot_id)
    cap = mount_cap(fs)
    cap.access_mode.mode = Mode.MULTI_NODE_READER_ONLY
    ratt = csi.attach(vol, cap)
    options = csi.lab.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", ratt.staging]).stdout.strip()
    assert "ro" in options.split(",") and {"norecovery", "noload"} & set(options.split(",")), options
    assert csi.py(READ.format(path=f"{ratt.target}/data.bin")) == digest
    refused = csi.py(f"""
import errno
try:
    open({ratt.target + "/new"!r}, "w").write("x")
    print("written")
except OSError as exc:
    print(errno.errorcode[exc.errno])
""")
    assert refused == "EROFS"
    csi.detach(ratt)
    csi.assert_clean(ratt)
    dataset = f"{csi.lab.pool}/zvolt/v/{split_volume_id(vol.volume_id)[1]}"
    written = csi.lab.run(["zfs", "get", "-Hp", "-o", "value", "written", dataset]).stdout.strip()
    # Measured, not asserted: 8 KiB changed on the zvol on the lab kernel with either filesystem
    # (not yet explained; the mount itself is read-only, as asserted above).
    print(f"\nROX {fs}: staging mounted {options}; zvol written since the snapshot: {written} B", flush=True)


def test_raw_block_volume(csi: Csi) -> None:
    vol = csi.create(uniq("blk"))
    att = csi.attach(vol, block_cap())
    assert not csi.mounted(att.staging)
    assert csi.lab.run(["test", "-b", att.target], check=False).returncode == 0
    code = f"""
import hashlib, os
data = os.urandom(1024 * 1024)
fd = os.open({att.target!r}, os.O_RDWR)
os.pwrite(fd, data, 4096)
os.fsync(fd)
back = os.pread(fd, len(data), 4096)
size = os.lseek(fd, 0, os.SEEK_END)
os.close(fd)
print(hashlib.sha256(data).hexdigest() == hashlib.sha256(back).hexdigest(), size)
"""
    same, size = csi.py(code).split()
    assert same == "True" and int(size) == vol.capacity_bytes
    blank = csi.lab.run(["blkid", "--probe", att.target], check=False)
    assert blank.returncode == 2  # raw block: the plugin never put a filesystem on it
    csi.detach(att)
    csi.assert_clean(att)


@pytest.mark.parametrize(("fs", "size"), FS_SIZES)
def test_online_expansion_grows_the_filesystem(csi: Csi, fs: str, size: int) -> None:
    vol = csi.create(uniq("grow"), size=size)
    att = csi.attach(vol, mount_cap(fs))
    new_size = size + 96 * MiB
    R = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=att.target)
    before = {u.unit: u.total for u in csi.node.NodeGetVolumeStats(R, timeout=T).usage}[csi_pb2.VolumeUsage.BYTES]
    grown = csi.ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=new_size),
            volume_capability=mount_cap(fs),
        ),
        timeout=T,
    )  # fmt: skip
    assert grown.capacity_bytes == new_size and grown.node_expansion_required
    resp = csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=att.target, staging_target_path=att.staging,
            capacity_range=csi_pb2.CapacityRange(required_bytes=new_size), volume_capability=mount_cap(fs),
        ),
        timeout=T,
    )  # fmt: skip
    assert resp.capacity_bytes == new_size
    after = {u.unit: u.total for u in csi.node.NodeGetVolumeStats(R, timeout=T).usage}[csi_pb2.VolumeUsage.BYTES]
    assert after > before + 64 * MiB, (before, after)  # the mounted filesystem grew online
    csi.detach(att)
    csi.assert_clean(att)


def test_volume_condition_follows_the_link(csi: Csi) -> None:
    # Short timeouts so a dead path gives up quickly; raw block so nothing waits on a filesystem flush.
    csi.lab.start_node("--ctrl-loss-tmo", "30", "--reconnect-delay", "2")
    try:
        assert csi._wait(lambda: csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=T).node_id) == csi.node_id
        vol = csi.create(uniq("cond"))
        att = csi.attach(vol, block_cap())
        R = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=att.target)

        def wait_for(abnormal: bool, timeout: float = 180) -> csi_pb2.VolumeCondition:
            deadline = time.monotonic() + timeout
            while True:
                cond: csi_pb2.VolumeCondition = csi.node.NodeGetVolumeStats(R, timeout=T).volume_condition
                if cond.abnormal == abnormal or time.monotonic() > deadline:
                    return cond
                time.sleep(2)

        healthy = wait_for(False)
        assert not healthy.abnormal and "live" in healthy.message
        try:
            csi.lab.link(False)
            cond = wait_for(True)
            assert cond.abnormal and ("connecting" in cond.message or "resetting" in cond.message), cond.message
        finally:
            csi.lab.link(True)
        # In the lab the plugin lives in the worker netns, but the kernel's reconnect worker opens
        # its TCP socket in the root netns, which cannot reach 10.42.0.0/24 (dmesg: "failed to
        # connect socket: -101"); on real nodes the plugin runs in the host netns. So recovery
        # here goes through the CSI calls: unstage drops the dead controller, stage connects anew.
        csi.node_detach(att)
        assert csi.controllers_for(att.nqn) == []
        csi.node_attach(att)
        assert not wait_for(False).abnormal
        csi.detach(att)
        csi.assert_clean(att)
    finally:
        csi.lab.start_node()


def test_stage_uses_the_published_subsystem_only(csi: Csi) -> None:
    vol = csi.create(uniq("nqn"))
    node, local = split_volume_id(vol.volume_id)
    pub = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=csi.node_id, volume_capability=mount_cap()
    )
    ctx = dict(csi.ctl.ControllerPublishVolume(pub, timeout=T).publish_context)
    assert ctx["nqn"] == subsystem_nqn(node, local) and ctx["address"] == csi.lab.storage_ip
    allowed = csi.lab.run(["ls", f"{CONFIGFS}/{ctx['nqn']}/allowed_hosts"]).stdout.split()
    assert allowed == [csi.node_id]
    csi.ctl.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=csi.node_id), timeout=T
    )
    assert not csi.exported(ctx["nqn"])


def test_modify_volume_changes_compression_of_a_mounted_volume(csi: Csi, capsys: pytest.CaptureFixture[str]) -> None:
    vol = csi.create(uniq("mod"))
    att = csi.attach(vol, mount_cap())
    dataset = f"tank/zvolt/v/{split_volume_id(vol.volume_id)[1]}"

    def compression() -> tuple[str, str]:
        out = csi.lab.run(["zfs", "get", "-H", "-o", "value,source", "compression", dataset]).stdout.split()
        return out[0], out[1]

    assert compression() == ("lz4", "local")
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters={"compression": "zstd"})
    start = time.monotonic()
    csi.ctl.ControllerModifyVolume(req, timeout=T)
    changed = time.monotonic() - start
    csi.ctl.ControllerModifyVolume(req, timeout=T)  # idempotent repeat: no `zfs set`
    repeat = time.monotonic() - start - changed
    assert compression() == ("zstd", "local")
    with capsys.disabled():
        print(f"\nControllerModifyVolume compression=zstd: {changed:.2f}s, repeat {repeat:.2f}s (TCG)")
    # The volume stayed mounted and takes writes under the new setting.
    assert csi.mounted(att.target)
    assert len(csi.py(WRITE.format(path=f"{att.target}/after-modify"))) == 64
    bad = csi_pb2.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters={"volblocksize": "8K"})
    with pytest.raises(grpc.RpcError) as err:
        csi.ctl.ControllerModifyVolume(bad, timeout=T)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert compression() == ("zstd", "local")
    csi.detach(att)
    csi.assert_clean(att)
