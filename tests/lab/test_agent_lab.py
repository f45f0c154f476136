"""The agent on the real stack: ZFS + nvmet configfs in the guest, NVMe/TCP from the worker netns."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from zvolt import names
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

pytestmark = pytest.mark.lab

MiB = 1 << 20
PARENT = "tank/zvolt"
CONFIGFS = "/sys/kernel/config/nvmet"
NODE = "storage-0"
T = 120  # generous per-RPC deadline: everything is 10-50x slower under TCG


def report(scenario: str, outcome: str) -> None:
    print(f"\nFAULT {scenario}: {outcome}", flush=True)


# A reboot as configfs sees it: every nvmet object gone (run by the guest's python).
WIPE = """
from agent import nvmet
root = nvmet.Root()
for sub in root.subsystems():
    sub.delete()
for port in root.ports():
    port.delete()
for host in root.hosts():
    host.delete()
print(len(list(root.subsystems())), len(list(root.ports())), len(list(root.hosts())))
"""

LINKED = """
from agent import nvmet
for port in nvmet.Root().ports():
    print(*port.subsystems())
"""


def uniq(prefix: str) -> str:
    return f"lab-{prefix}-{uuid.uuid4().hex[:8]}"


def host_nqn() -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"


def wait_ready(stub: pb_grpc.AgentStub, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            if info.ready:
                return info
            last = info.not_ready_reason
        except grpc.RpcError as err:
            last = str(err.details())
        time.sleep(0.5)
    raise AssertionError(f"agent not ready after {timeout}s: {last}")


class Env:
    def __init__(self, lab: object, initiator_netns: str | None = "worker") -> None:
        self.lab = lab
        # Where the initiator side runs: the worker netns, or (a second guest) its root netns.
        self.initiator_netns = initiator_netns
        self.channel = grpc.insecure_channel(lab.grpc_target("agent"))  # type: ignore[attr-defined]
        self.stub = pb_grpc.AgentStub(self.channel)

    def restart(self, *extra: str) -> None:
        self.lab.start_agent(*extra)  # type: ignore[attr-defined]

    def zfs_exists(self, ds: str) -> bool:
        return self.lab.run(["zfs", "list", "-H", "-o", "name", ds], check=False).returncode == 0  # type: ignore

    def zget(self, ds: str, prop: str) -> str:
        out = self.lab.run(["zfs", "get", "-H", "-p", "-o", "value", prop, ds])  # type: ignore[attr-defined]
        return str(out.stdout.strip())

    def names_under(self, ds: str, types: str = "volume,snapshot") -> list[str]:
        out = self.lab.run(["zfs", "list", "-H", "-o", "name", "-r", "-t", types, ds])  # type: ignore
        return [x for x in out.stdout.split() if x]

    def subsystems(self) -> list[str]:
        return str(self.lab.run(["ls", f"{CONFIGFS}/subsystems"]).stdout).split()  # type: ignore

    def hosts(self) -> list[str]:
        return str(self.lab.run(["ls", f"{CONFIGFS}/hosts"]).stdout).split()  # type: ignore

    def allowed(self, nqn: str) -> list[str]:
        return str(self.lab.run(["ls", f"{CONFIGFS}/subsystems/{nqn}/allowed_hosts"]).stdout).split()  # type: ignore

    # -- initiator side (worker netns) ----------------------------------------------------

    def connect(self, nqn: str, host: str, check: bool = True) -> str:
        proc = self.lab.run(  # type: ignore[attr-defined]
            ["nvme", "connect", "-t", "tcp", "-a", "10.42.0.1", "-s", "4420", "-n", nqn, "--hostnqn", host,
             "--reconnect-delay", "1", "--ctrl-loss-tmo", "120"],
            netns=self.initiator_netns, check=False, timeout=120)
        if proc.returncode != 0:
            if check:
                raise AssertionError(f"nvme connect failed: {proc.stderr}")
            return ""
        return self.device_for(nqn)

    def device_for(self, nqn: str, timeout: float = 60) -> str:
        code = f"""
import glob, os, re, time, json
deadline = time.monotonic() + {timeout}
while True:
    for d in sorted(glob.glob('/sys/block/nvme*')):
        name = os.path.basename(d)
        if not re.fullmatch(r'nvme[0-9]+n[0-9]+', name):
            continue
        try:
            nqn = open(d + '/device/subsysnqn').read().strip()
        except OSError:
            continue
        if nqn == {nqn!r}:
            print(json.dumps('/dev/' + name)); raise SystemExit(0)
    if time.monotonic() > deadline:
        raise SystemExit('no block device for the subsystem')
    time.sleep(0.1)
"""
        return str(json.loads(self.lab.py(code, netns=self.initiator_netns).stdout))  # type: ignore[attr-defined]

    def disconnect(self, nqn: str) -> None:
        self.lab.run(["nvme", "disconnect", "-n", nqn], netns=self.initiator_netns, check=False, timeout=60)  # type: ignore

    def write(self, dev: str, seed: int, mib: int = 4) -> str:
        return self._io(dev, seed, mib, write=True)

    def read_hash(self, dev: str, mib: int = 4) -> str:
        return self._io(dev, 0, mib, write=False)

    def _io(self, dev: str, seed: int, mib: int, write: bool) -> str:
        # O_DIRECT with page-aligned (mmap) buffers: no page cache can hide what the target holds.
        code = f"""
import hashlib, mmap, os, random
dev, mib, write = {dev!r}, {mib}, {write}
fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
h = hashlib.sha256()
rnd = random.Random({seed})
for i in range(mib):
    if write:
        buf.seek(0); buf.write(rnd.randbytes(1 << 20))
        assert os.pwritev(fd, [buf], i << 20) == 1 << 20
    else:
        assert os.preadv(fd, [buf], i << 20) == 1 << 20
    h.update(buf[:])
if write:
    os.fsync(fd)
os.close(fd)
print(h.hexdigest())
"""
        return str(self.lab.py(code, netns=self.initiator_netns, timeout=300).stdout.strip())  # type: ignore[attr-defined]

    def size_of(self, dev: str) -> int:
        out = self.lab.run(["blockdev", "--getsize64", dev], netns=self.initiator_netns)  # type: ignore[attr-defined]
        return int(out.stdout.strip())

    # -- agent calls ----------------------------------------------------------------------

    def create(self, name: str, size: int = 64 * MiB, **kw: Any) -> Any:
        return self.stub.CreateVolume(pb.CreateVolumeRequest(name=name, size_bytes=size, **kw), timeout=T).volume

    def snapshot(self, name: str, vid: str) -> Any:
        return self.stub.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid),
                                        timeout=T).snapshot

    def publish(self, vid: str, host: str, key: str = "", ctrl_key: str = "") -> Any:
        """As the controller does; with DH-HMAC-CHAP keys (from the volume's Secret) the host is
        allowed under its NQN for this volume (response host_nqn)."""
        return self.stub.PublishVolume(pb.PublishVolumeRequest(volume_id=vid, host_nqn=host, dhchap_key=key,
                                                               dhchap_ctrl_key=ctrl_key), timeout=T)

    def unpublish(self, vid: str, host: str) -> None:
        self.stub.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=host), timeout=T)

    def delete(self, vid: str) -> None:
        self.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=T)

    def delete_snap(self, sid: str) -> None:
        self.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid), timeout=T)

    def get(self, vid: str) -> Any:
        return self.stub.GetVolume(pb.GetVolumeRequest(volume_id=vid), timeout=T).volume


@contextmanager
def agent_session(lab: object, *, fresh: bool = True, restore: bool = False) -> Iterator[Env]:
    """The agent for one test module: restarted with the standard flags first (`fresh`) and,
    for modules that restart it with other flags, again at the end (`restore`) so the next
    module finds what it expects."""
    e = Env(lab)
    if fresh:
        e.restart()
        wait_ready(e.stub)
    try:
        yield e
    finally:
        if restore:
            e.restart()
            wait_ready(e.stub)
        e.channel.close()


@pytest.fixture(scope="module")
def env(lab: object) -> Iterator[Env]:
    with agent_session(lab) as e:
        yield e


def vds(vid: str) -> str:
    return f"{PARENT}/v/{vid}"


def test_operations_on_real_zfs(env: Env) -> None:
    name = uniq("ops")
    vol = env.create(name, 64 * MiB, labels={"pvc": "ops"})
    assert vol.id == names.id_for_name(name)
    ds = vds(vol.id)
    assert env.zget(ds, "volmode") == "none"
    assert env.zget(ds, "volsize") == str(64 * MiB)
    assert env.zget(ds, "refreservation") == "0"
    assert env.zget(ds, "volblocksize") == "16384"
    assert env.zget(ds, "compression") == "lz4"
    assert env.zget(ds, "zvolt:name") == name
    assert env.zget(ds, "zvolt:label:pvc") == "ops"
    assert env.lab.run(["test", "-e", f"/dev/zvol/{ds}"], check=False).returncode != 0  # type: ignore
    assert env.create(name, 64 * MiB) == vol  # idempotent
    with pytest.raises(grpc.RpcError) as err:
        env.create(name, 128 * MiB)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    thick = env.create(uniq("thick"), 32 * MiB, volblocksize=8192, compression="zstd", thick=True)
    tds = vds(thick.id)
    assert env.zget(tds, "volblocksize") == "8192" and env.zget(tds, "compression") == "zstd"
    assert int(env.zget(tds, "refreservation")) >= 32 * MiB

    snap = env.snapshot(uniq("snap"), vol.id)
    assert env.zfs_exists(f"{ds}@{snap.id.split('@')[1]}") and snap.size_bytes == 64 * MiB
    clone = env.create(uniq("clone"), 128 * MiB, source_snapshot_id=snap.id)
    cds = vds(clone.id)
    assert env.zget(cds, "origin") == f"{ds}@{snap.id.split('@')[1]}"
    assert env.zget(cds, "volsize") == str(128 * MiB) and env.zget(cds, "volmode") == "none"
    branch = env.create(uniq("branch"), 64 * MiB, source_volume_id=vol.id)
    assert env.zget(vds(branch.id), "origin").startswith(ds + "@h")

    grown = env.stub.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=96 * MiB), timeout=T).volume
    assert grown.size_bytes == 96 * MiB and env.zget(ds, "volsize") == str(96 * MiB)
    same = env.stub.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=32 * MiB), timeout=T).volume
    assert same.size_bytes == 96 * MiB and env.zget(ds, "volsize") == str(96 * MiB)

    cap = env.stub.GetCapacity(pb.GetCapacityRequest(), timeout=T)
    avail = int(env.zget(PARENT, "available"))
    assert 0 < cap.available_bytes <= avail and cap.total_bytes >= avail
    got = env.get(vol.id)
    assert got.condition == pb.VOLUME_CONDITION_HEALTHY and got.used_bytes > 0
    listed = {v.id for v in env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=T).volumes}
    assert {vol.id, thick.id, clone.id, branch.id} <= listed
    snaps = env.stub.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=vol.id), timeout=T).snapshots
    assert [s.id for s in snaps] == [snap.id]

    for vid in (branch.id, clone.id):
        env.delete(vid)
    env.delete_snap(snap.id)
    env.delete(vol.id)
    env.delete(thick.id)
    env.delete(vol.id)  # idempotent
    for vid in (vol.id, thick.id, clone.id, branch.id):
        assert not env.zfs_exists(vds(vid))
    assert not [n for n in env.names_under(f"{PARENT}/v") if n.startswith(ds + "@")]


def test_export_data_snapshot_clone_and_expand(env: Env) -> None:
    host = host_nqn()
    vol = env.create(uniq("data"), 64 * MiB)
    pub = env.publish(vol.id, host)
    assert pub.nqn == names.subsystem_nqn(NODE, vol.id) and (pub.address, pub.port) == ("10.42.0.1", "4420")
    assert env.zget(vds(vol.id), "volmode") == "dev"
    assert pub.nqn in env.subsystems() and env.allowed(pub.nqn) == [host]
    assert env.lab.run(["cat", f"{CONFIGFS}/subsystems/{pub.nqn}/attr_allow_any_host"]).stdout.strip() == "0"  # type: ignore
    clone_pub_nqn = ""
    try:
        dev = env.connect(pub.nqn, host)
        written = env.write(dev, seed=7)
        snap = env.snapshot(uniq("data-s"), vol.id)
        clone = env.create(uniq("data-c"), 64 * MiB, source_snapshot_id=snap.id)
        cpub = env.publish(clone.id, host)
        clone_pub_nqn = cpub.nqn
        cdev = env.connect(cpub.nqn, host)
        assert env.read_hash(cdev) == written, "the clone of the snapshot must hold the bytes written over NVMe/TCP"
        # Expansion of an exported volume reaches the initiator (revalidate_size on the target).
        env.stub.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=128 * MiB), timeout=T)
        deadline = time.monotonic() + 30
        while env.size_of(dev) != 128 * MiB and time.monotonic() < deadline:
            time.sleep(0.2)
        assert env.size_of(dev) == 128 * MiB
        assert env.read_hash(dev) == written
    finally:
        env.disconnect(pub.nqn)
        if clone_pub_nqn:
            env.disconnect(clone_pub_nqn)
    env.unpublish(vol.id, host)
    env.unpublish(clone.id, host)
    assert pub.nqn not in env.subsystems() and cpub.nqn not in env.subsystems()
    assert host not in env.hosts()
    assert env.zget(vds(vol.id), "volmode") == "none"
    env.delete(clone.id)
    env.delete_snap(snap.id)
    env.delete(vol.id)
    assert not env.zfs_exists(vds(vol.id)) and not env.zfs_exists(vds(clone.id))


def test_host_not_on_allow_list_cannot_connect(env: Env) -> None:
    allowed, stranger = host_nqn(), host_nqn()
    vol = env.create(uniq("acl"), 64 * MiB)
    pub = env.publish(vol.id, allowed)
    try:
        assert env.connect(pub.nqn, stranger, check=False) == ""
        dev = env.connect(pub.nqn, allowed)
        assert dev.startswith("/dev/nvme")
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, allowed)
    env.delete(vol.id)


def test_delete_in_any_order_over_a_chain(env: Env) -> None:
    base = env.create(uniq("chain-base"))
    s1 = env.snapshot(uniq("chain-s1"), base.id)
    b1 = env.create(uniq("chain-b1"), source_snapshot_id=s1.id)
    s2 = env.snapshot(uniq("chain-s2"), b1.id)
    b2 = env.create(uniq("chain-b2"), source_snapshot_id=s2.id)
    b3 = env.create(uniq("chain-b3"), source_volume_id=base.id)
    # Parents first: each delete succeeds at once, the blocks stay while a branch needs them.
    env.delete(base.id)
    assert not env.zfs_exists(vds(base.id))
    env.delete_snap(s1.id)
    env.delete(b1.id)
    assert env.get(b2.id).condition == pb.VOLUME_CONDITION_HEALTHY
    assert env.zfs_exists(env.zget(vds(b2.id), "origin"))  # its origin lives on in the trash
    again = env.create(uniq("chain-reuse"))  # new volumes are unaffected
    env.delete(b2.id)
    env.delete_snap(s2.id)
    env.delete(b3.id)
    env.delete(again.id)
    ids = {base.id, b1.id, b2.id, b3.id, again.id}
    left = [n for n in env.names_under(PARENT) if any(i in n for i in ids)]
    assert left == [], f"leaked: {left}"


def _no_leak(env: Env, vid: str) -> None:
    assert not [n for n in env.names_under(PARENT) if vid in n], "dataset leaked"
    assert names.subsystem_nqn(NODE, vid) not in env.subsystems(), "subsystem leaked"


@pytest.mark.parametrize("point", ["create_volume:before", "create_volume:after"])
def test_kill9_mid_create_then_retry_converges(env: Env, point: str) -> None:
    name = uniq("k9c")
    vid = names.id_for_name(name)
    env.restart("--failpoint", point)
    wait_ready(env.stub)
    with pytest.raises(grpc.RpcError):
        env.create(name)
    env.restart()
    wait_ready(env.stub)
    vol = env.create(name)
    assert vol.id == vid and env.zfs_exists(vds(vid)) and env.zget(vds(vid), "zvolt:name") == name
    assert [v for v in env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=T).volumes if v.id == vid]
    env.delete(vid)
    _no_leak(env, vid)


@pytest.mark.parametrize("point", ["set_props:before", "set_props:after"])
def test_kill9_mid_publish_then_retry_converges(env: Env, point: str) -> None:
    host = host_nqn()
    vol = env.create(uniq("k9p"))
    env.restart("--failpoint", point)
    wait_ready(env.stub)
    with pytest.raises(grpc.RpcError):
        env.publish(vol.id, host)
    env.restart()
    wait_ready(env.stub)
    pub = env.publish(vol.id, host)
    assert env.allowed(pub.nqn) == [host]
    assert env.get(vol.id).condition == pb.VOLUME_CONDITION_HEALTHY
    env.unpublish(vol.id, host)
    assert pub.nqn not in env.subsystems() and host not in env.hosts()
    env.delete(vol.id)
    _no_leak(env, vol.id)


@pytest.mark.parametrize("point", ["destroy:before", "destroy:after", "rename:after"])
def test_kill9_mid_delete_then_retry_converges(env: Env, point: str) -> None:
    vol = env.create(uniq("k9d"))
    snap = env.snapshot(uniq("k9d-s"), vol.id) if point.startswith("rename") else None
    branch = env.create(uniq("k9d-b"), source_snapshot_id=snap.id) if snap else None
    env.restart("--failpoint", point)
    wait_ready(env.stub)
    with pytest.raises(grpc.RpcError):
        env.delete(vol.id)
    env.restart()
    wait_ready(env.stub)
    env.delete(vol.id)
    assert not env.zfs_exists(vds(vol.id))
    if snap and branch:
        # Nothing lost: the branch still has its data lineage; then everything is collected.
        assert env.get(branch.id).condition == pb.VOLUME_CONDITION_HEALTHY
        env.delete_snap(snap.id)
        env.delete(branch.id)
        _no_leak(env, branch.id)
    _no_leak(env, vol.id)


def ctrl_state(env: Env, nqn: str) -> list[str]:
    code = f"""
import glob, os
for p in sorted(glob.glob('/sys/class/nvme/nvme*/subsysnqn')):
    if open(p).read().strip() == {nqn!r}:
        print(open(os.path.join(os.path.dirname(p), 'state')).read().strip())
"""
    return env.lab.py(code, netns=env.initiator_netns).stdout.split()  # type: ignore[attr-defined,no-any-return]


def test_agent_restart_keeps_connected_initiator_working(env: Env) -> None:
    host = host_nqn()
    vol = env.create(uniq("rk"))
    pub = env.publish(vol.id, host)
    try:
        dev = env.connect(pub.nqn, host)
        written = env.write(dev, seed=5)
        env.lab.stop_service("agent", kill=True)  # type: ignore[attr-defined]
        env.restart()
        wait_ready(env.stub)
        # The target was never disturbed: the same controller and device keep serving the data.
        assert env.read_hash(dev) == written
        assert ctrl_state(env, pub.nqn) == ["live"]
    finally:
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    env.delete(vol.id)
    _no_leak(env, vol.id)


def test_restart_restores_exports_before_ready(env: Env) -> None:
    host = host_nqn()
    vols = [env.create(uniq(f"rs{i}")) for i in range(2)]
    pubs = [env.publish(v.id, host) for v in vols]
    try:
        dev = env.connect(pubs[0].nqn, host)
        written = env.write(dev, seed=11)
        env.disconnect(pubs[0].nqn)
        before = env.lab.run([env.lab.python, "-c", DUMP]).stdout  # type: ignore[attr-defined]
        # What a storage-node reboot leaves: a dead agent and an empty nvmet configfs.
        env.lab.stop_service("agent", kill=True)  # type: ignore[attr-defined]
        for p in pubs:
            env.lab.py(TEARDOWN.format(nqn=p.nqn))  # type: ignore[attr-defined]
        assert not set(env.subsystems()) & {p.nqn for p in pubs}
        env.restart()
        info = wait_ready(env.stub)
        # Ready implies restored: checked right after the first ready answer.
        assert {p.nqn for p in pubs} <= set(env.subsystems())
        for p in pubs:
            assert env.allowed(p.nqn) == [host]
        after = env.lab.run([env.lab.python, "-c", DUMP]).stdout  # type: ignore[attr-defined]
        assert json.loads(after) == json.loads(before)
        assert info.exports >= 2 and info.startup_seconds > 0
        # Same namespace identity and the data is all there.
        dev = env.connect(pubs[0].nqn, host)
        assert env.read_hash(dev) == written
    finally:
        env.disconnect(pubs[0].nqn)
    for v in vols:
        env.unpublish(v.id, host)
        env.delete(v.id)
        _no_leak(env, v.id)


DUMP = """
import json
from agent import nvmet
d = nvmet.Root().dump()
d["subsystems"] = [s for s in d["subsystems"] if s["nqn"].startswith("nqn.2026-11.io.zvolt:storage-0:")]
print(json.dumps(d, sort_keys=True))
"""

TEARDOWN = """
from agent import nvmet
nvmet.Root().subsystem({nqn!r}).delete()
"""


def test_rebuild_index_from_zfs(env: Env) -> None:
    host = host_nqn()
    base = env.create(uniq("rb"))
    snap = env.snapshot(uniq("rb-s"), base.id)
    clone = env.create(uniq("rb-c"), source_snapshot_id=snap.id)
    env.publish(clone.id, host)
    env.delete(base.id)  # -> trash: its snapshot still serves the clone

    def state() -> tuple[object, ...]:
        vols = sorted((v.id, v.name, v.size_bytes, v.source_snapshot_id, tuple(v.published_hosts))
                      for v in env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=T).volumes)
        snaps = sorted((s.id, s.name, s.size_bytes)
                       for s in env.stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=T).snapshots)
        return vols, snaps

    want = state()
    env.lab.stop_service("agent")  # type: ignore[attr-defined]
    argv = [env.lab.python, "-m", "agent.main", "--node-name", NODE, "--pool", "tank",  # type: ignore[attr-defined]
            "--nvme-listen", "10.42.0.1:4420", "--state-dir", "/var/lib/zvolt", "--insecure", "--rebuild-index"]
    out = env.lab.run(argv, netns="storage", timeout=600).stdout  # type: ignore[attr-defined]
    assert "rebuilding index from ZFS" in out and "rebuild done" in out
    env.restart()
    wait_ready(env.stub)
    assert state() == want
    env.unpublish(clone.id, host)
    env.delete_snap(snap.id)
    env.delete(clone.id)
    _no_leak(env, clone.id)
    _no_leak(env, base.id)


def test_one_broken_published_volume_does_not_keep_the_node_offline(env: Env) -> None:
    """Simulated reboot (agent SIGKILLed, nvmet configfs wiped) with one published zvol renamed
    away behind the agent's back: the agent turns ready with the other exports restored and
    linked, reports the broken one as abnormal, and restores it once the zvol is back."""
    lab: Any = env.lab
    host = host_nqn()
    vols = [env.create(uniq(f"rs{i}"), 64 * 1024 * 1024) for i in range(3)]
    pubs = [env.publish(v.id, host) for v in vols]
    bad, aside = vols[1], f"{PARENT}/aside-{vols[1].id}"
    try:
        lab.stop_service("agent", kill=True)
        assert lab.py(WIPE).stdout.split() == ["0", "0", "0"]
        lab.run(["zfs", "rename", vds(bad.id), aside])
        start = time.monotonic()
        # A short device wait and retry tick, so the broken volume costs seconds here.
        env.restart("--device-timeout", "5", "--gc-interval", "3")
        wait_ready(env.stub)
        ready_s = time.monotonic() - start
        good = [p.nqn for v, p in zip(vols, pubs, strict=True) if v.id != bad.id]
        assert set(good) <= set(env.subsystems())
        for nqn in good:
            assert env.allowed(nqn) == [host]
        linked = lab.py(LINKED).stdout.split()
        assert set(good) <= set(linked), linked
        broken = env.get(bad.id)
        assert broken.condition == pb.VOLUME_CONDITION_ABNORMAL
        assert broken.condition_message == f"dataset {vds(bad.id)} is missing in ZFS", broken.condition_message
        lab.run(["zfs", "rename", aside, vds(bad.id)])
        deadline = time.monotonic() + 120
        while env.get(bad.id).condition != pb.VOLUME_CONDITION_HEALTHY and time.monotonic() < deadline:
            time.sleep(1)
        assert env.get(bad.id).condition == pb.VOLUME_CONDITION_HEALTHY
        healed_s = time.monotonic() - start
    finally:
        if lab.run(["zfs", "list", aside], check=False).returncode == 0:
            lab.run(["zfs", "rename", aside, vds(bad.id)])
        env.restart()  # the module's other tests expect the default flags
        wait_ready(env.stub)
    for v in vols:
        env.unpublish(v.id, host)
        env.delete(v.id)
    report("one broken published volume at start-up",
           f"ready after {ready_s:.1f}s with the 2 other exports restored and linked; the broken one abnormal, "
           f"restored {healed_s - ready_s:.1f}s after its zvol came back")


def _sigterm_mid_create(env: Env, name: str, *flags: str) -> tuple[Any, float]:
    """Start the agent with `flags`, start CreateVolume(name), SIGTERM the agent once ZFS made the
    volume (the stall failpoint holds the call there), and return (the call's outcome, seconds
    from SIGTERM until the agent's unit was gone)."""
    import threading

    from lab.guest import unit_name

    vid = names.id_for_name(name)
    env.restart(*flags)
    wait_ready(env.stub)
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(env.create(name))
        except grpc.RpcError as err:
            outcome.append(err.code())

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + T
    while not env.zfs_exists(vds(vid)):  # the stall window: ZFS has it, the index not yet
        assert time.monotonic() < deadline and thread.is_alive(), f"create never reached ZFS: {outcome}"
        time.sleep(0.5)
    env.lab.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGTERM", unit_name("agent")])  # type: ignore
    sent = time.monotonic()
    while env.lab.service_running("agent"):  # type: ignore[attr-defined]
        assert time.monotonic() - sent < 90, "agent did not exit after SIGTERM"
        time.sleep(0.5)
    gone = time.monotonic() - sent
    thread.join(T)
    return outcome[0], gone


def test_sigterm_mid_operation_finishes_it_within_the_grace(env: Env) -> None:
    name = uniq("term")
    vid = names.id_for_name(name)
    outcome, gone = _sigterm_mid_create(env, name, "--failpoint", "create_volume:stall-after=8")
    log = env.lab.service_log("agent", 80)  # type: ignore[attr-defined]
    report("sigterm mid-create, 20 s grace", f"call -> {getattr(outcome, 'id', outcome)}, agent gone {gone:.1f}s "
           "after SIGTERM")
    assert not isinstance(outcome, grpc.StatusCode), f"the running call was not allowed to finish: {outcome}"
    assert outcome.id == vid and "every running call finished" in log, log[-3000:]
    env.restart()
    wait_ready(env.stub)
    assert env.create(name).id == vid  # the retry finds the finished volume
    assert [v.id for v in env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=T).volumes].count(vid) == 1
    env.delete(vid)
    _no_leak(env, vid)


def test_sigterm_with_a_call_stuck_past_the_grace_then_retry_converges(env: Env) -> None:
    name = uniq("term-stuck")
    vid = names.id_for_name(name)
    outcome, gone = _sigterm_mid_create(env, name, "--shutdown-grace", "2",
                                        "--failpoint", "create_volume:stall-after=120")
    log = env.lab.service_log("agent", 80)  # type: ignore[attr-defined]
    report("sigterm mid-create, stuck past a 2 s grace", f"call -> {outcome}, agent gone {gone:.1f}s after SIGTERM")
    assert outcome == grpc.StatusCode.UNAVAILABLE  # retryable: the provisioner calls again
    assert gone < 30, "a stuck call held the agent past its grace"
    assert "calls still running" in log, log[-3000:]
    env.restart()
    wait_ready(env.stub)
    # Start-up settled the create's intent from ZFS: the retry returns the one volume made.
    vol = env.create(name)
    assert vol.id == vid and env.zget(vds(vid), "zvolt:name") == name
    assert [v.id for v in env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=T).volumes].count(vid) == 1
    env.delete(vid)
    _no_leak(env, vid)
