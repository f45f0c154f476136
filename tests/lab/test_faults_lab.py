"""Fault scenarios on the real stack (long; run with: pytest tests/lab -m faults).

kill -9 of the agent inside snapshot/clone/expand/snapshot-delete (create/publish/delete are in
test_agent_lab.py, reused here through its Env), a storage-node reboot (simulated in one guest,
and a real hard reset of a storage guest under an initiator in a second guest), link cuts shorter and
longer than ctrl_loss_tmo, a nearly full pool, and concurrent calls on one volume. Each test
prints one "FAULT <scenario>: <outcome>" line (run with -s to collect them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from test_agent_lab import (  # type: ignore[import-not-found]
    CONFIGFS,
    NODE,
    PARENT,
    WIPE,
    Env,
    MiB,
    agent_session,
    ctrl_state,
    host_nqn,
    report,
    uniq,
    vds,
    wait_ready,
)
from test_csi_lab import Csi, mount_cap  # type: ignore[import-not-found]

from zvolt import names
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import csi_pb2

pytestmark = [pytest.mark.lab, pytest.mark.faults]
T = 180


@pytest.fixture(scope="module")
def env(lab: Any) -> Iterator[Env]:
    with agent_session(lab, restore=True) as e:
        yield e


def leaked(env: Env, *ids: str) -> list[str]:
    """Datasets, subsystems or hosts left behind for these volume ids."""
    out = [n for n in env.names_under(PARENT) if any(i in n for i in ids)]
    out += [s for s in env.subsystems() if any(s == names.subsystem_nqn(NODE, i) for i in ids)]
    return out


def connect(env: Env, nqn: str, host: str, loss_tmo: int = 60, netns: str | None = "worker") -> str:
    proc = env.lab.run(["nvme", "connect", "-t", "tcp", "-a", env.lab.storage_ip, "-s", "4420", "-n", nqn,
                        "--hostnqn", host, "--reconnect-delay", "1", "--ctrl-loss-tmo", str(loss_tmo)],
                       netns=netns, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(env.device_for(nqn))


# -- kill -9 at the remaining mutation points -------------------------------------------------

CRASH_POINTS = [
    ("snapshot", "snapshot:before"), ("snapshot", "snapshot:after"),
    ("clone-from-snapshot", "clone:before"), ("clone-from-snapshot", "clone:after"),
    ("clone-from-volume", "snapshot:after"), ("clone-from-volume", "clone:after"),
    ("expand", "set_props:before"), ("expand", "set_props:after"),
    ("delete-snapshot", "destroy_snapshots:before"), ("delete-snapshot", "destroy_snapshots:after"),
]


@pytest.mark.parametrize("op,point", CRASH_POINTS, ids=[f"{o}@{p}" for o, p in CRASH_POINTS])
def test_kill9_then_restart_and_retry_converges(env: Env, op: str, point: str) -> None:
    host = host_nqn()
    base = env.create(uniq("k9base"), 64 * MiB)
    nqn = env.publish(base.id, host).nqn
    try:
        written = env.write(connect(env, nqn, host), seed=21, mib=2)
    finally:
        env.disconnect(nqn)
    snap = env.snapshot(uniq("k9s"), base.id) if op in ("clone-from-snapshot", "delete-snapshot") else None
    snap_name, clone_name = uniq("k9snap"), uniq("k9clone")

    def attempt() -> Any:
        if op == "snapshot":
            return env.snapshot(snap_name, base.id)
        if op == "clone-from-snapshot":
            assert snap is not None
            return env.create(clone_name, 64 * MiB, source_snapshot_id=snap.id)
        if op == "clone-from-volume":
            return env.create(clone_name, 64 * MiB, source_volume_id=base.id)
        if op == "expand":
            return env.stub.ExpandVolume(pb.ExpandVolumeRequest(volume_id=base.id, size_bytes=128 * MiB),
                                         timeout=T).volume
        assert snap is not None
        return env.delete_snap(snap.id)

    env.restart("--failpoint", point)
    wait_ready(env.stub)
    with pytest.raises(grpc.RpcError):
        attempt()  # the agent SIGKILLs itself at the failpoint
    env.restart()
    wait_ready(env.stub)
    result = attempt()  # the retry a CSI sidecar would make
    again = attempt()  # and it stays idempotent
    if op in ("snapshot", "clone-from-snapshot", "clone-from-volume", "expand"):
        assert result == again
    # Nothing lost: the source still holds its bytes; a clone holds the same bytes.
    check = [base.id] + ([result.id] if op.startswith("clone") else [])
    for vid in check:
        pub = env.publish(vid, host)
        try:
            assert env.read_hash(connect(env, pub.nqn, host), mib=2) == written
        finally:
            env.disconnect(pub.nqn)
        env.unpublish(vid, host)
        assert env.get(vid).condition == pb.VOLUME_CONDITION_HEALTHY
    if op == "expand":
        assert env.get(base.id).size_bytes == 128 * MiB and env.zget(vds(base.id), "volsize") == str(128 * MiB)
    if op == "snapshot":
        listed = env.stub.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=base.id), timeout=T).snapshots
        assert [s.id for s in listed] == [result.id]
    if op == "delete-snapshot":
        assert snap is not None and not env.zfs_exists(f"{vds(base.id)}@{snap.id.split('@')[1]}")
    # Nothing leaked: tear everything down and look for leftovers in ZFS, configfs and hosts.
    if op.startswith("clone"):
        env.delete(result.id)
    if snap is not None and op != "delete-snapshot":
        env.delete_snap(snap.id)
    if op == "snapshot":
        env.delete_snap(result.id)
    env.delete(base.id)
    ids = [base.id] + ([result.id] if op.startswith("clone") else [])
    env.stub.GetInfo(pb.GetInfoRequest(), timeout=T)
    assert leaked(env, *ids) == []
    assert host not in env.hosts()
    report(f"kill -9 {op} at {point}", "restart+retry converged, data intact, nothing leaked")


# -- a data path the kernel can reconnect over ------------------------------------------------
#
# nvme-tcp opens its *reconnect* sockets from a kernel worker, i.e. in the guest's initial
# network namespace (measured: "failed to connect socket: -101" = ENETUNREACH on every attempt
# from an initiator in the worker netns, until ctrl_loss_tmo removes the controller). So the
# lab's worker netns can connect but never reconnect. Scenarios that need a reconnect use an
# initiator in the root netns with its own veth pair into the storage netns, and cut *that*.

RPATH = ("zv-r", "zv-rs", "10.43.0.2", "10.43.0.1")


@pytest.fixture
def root_path(env: Env) -> Iterator[None]:
    dev, peer, mine, theirs = RPATH
    run = env.lab.run
    run(["ip", "link", "del", dev], check=False)
    run(["ip", "link", "add", dev, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", peer, "netns", "storage"])
    run(["ip", "addr", "add", f"{mine}/24", "dev", dev])
    run(["ip", "link", "set", dev, "up"])
    run(["ip", "-n", "storage", "addr", "add", f"{theirs}/24", "dev", peer])
    run(["ip", "-n", "storage", "link", "set", peer, "up"])
    run(["ip", "route", "add", f"{env.lab.storage_ip}/32", "via", theirs])
    try:
        yield
    finally:
        run(["ip", "link", "del", dev], check=False)


def root_link(env: Env, up: bool) -> None:
    dev, peer, _, _ = RPATH
    state = "up" if up else "down"
    env.lab.run(["ip", "link", "set", dev, state])
    env.lab.run(["ip", "-n", "storage", "link", "set", peer, state])
    if up:
        env.lab.run(["ip", "route", "replace", f"{env.lab.storage_ip}/32", "via", RPATH[3]])


# -- storage node reboot ----------------------------------------------------------------------




def restart_until_restored(env: Env, pubs: list[Any], host: str) -> float:
    """Start the agent and poll until ready: every call before that must be UNAVAILABLE, and at
    the first ready answer every export and its allow-list must already be back. Seconds taken."""
    start = time.monotonic()
    env.restart()
    while True:
        try:
            info = env.stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        except grpc.RpcError:
            time.sleep(0.3)  # the socket forwarder of a freshly booted guest may not answer yet
            continue
        if info.ready:
            assert {p.nqn for p in pubs} <= set(env.subsystems())
            for p in pubs:
                assert env.allowed(p.nqn) == [host]
            return time.monotonic() - start
        try:
            env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=30)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, f"before ready: {err.code()} {err.details()}"
        else:
            # Served: legal only if the agent turned ready between the two calls (ready never reverts).
            assert env.stub.GetInfo(pb.GetInfoRequest(), timeout=30).ready, "a call before ready must be UNAVAILABLE"
        time.sleep(0.3)


def healthy_then_released(env: Env, vols: list[Any], host: str) -> None:
    """After a reboot: every volume reports healthy, then unpublish + delete leave nothing behind."""
    for v in vols:
        assert env.get(v.id).condition == pb.VOLUME_CONDITION_HEALTHY
    for v in vols:
        env.unpublish(v.id, host)
        env.delete(v.id)
    assert leaked(env, *(v.id for v in vols)) == []


def wait_live(env: Env, nqn: str, timeout: float) -> None:
    """The initiator retries every reconnect_delay: poll until its controller for `nqn` is live again."""
    deadline = time.monotonic() + timeout
    while ctrl_state(env, nqn) != ["live"] and time.monotonic() < deadline:
        time.sleep(1)
    assert ctrl_state(env, nqn) == ["live"], "the initiator reconnects within ctrl_loss_tmo"


def test_storage_node_reboot_with_a_connected_initiator(env: Env, root_path: None) -> None:
    """Simulated reboot: SIGKILL the agent and wipe ALL nvmet configfs state (subsystems, namespaces,
    allowed hosts, host entries and the TCP port), as a reboot leaves it; ZFS and the agent's
    state dir stay, as they do on disk. (The lab guest itself is not rebooted: its netns, 9p
    share and services would need the whole lab set-up again.)"""
    host = host_nqn()
    vols = [env.create(uniq(f"rb{i}"), 64 * MiB) for i in range(3)]
    pubs = [env.publish(v.id, host) for v in vols]
    try:
        dev = connect(env, pubs[0].nqn, host, loss_tmo=120, netns=None)
        written = env.write(dev, seed=31, mib=2)
        env.lab.stop_service("agent", kill=True)
        assert env.lab.py(WIPE).stdout.split() == ["0", "0", "0"]
        time.sleep(2)
        lost = ctrl_state(env, pubs[0].nqn)  # what the initiator sees with the target gone
        start = time.monotonic()
        ready_s = restart_until_restored(env, pubs, host)
        wait_live(env, pubs[0].nqn, 120)
        reconnect_s = time.monotonic() - start
        assert env.read_hash(dev, mib=2) == written
    finally:
        env.disconnect(pubs[0].nqn)
    healthy_then_released(env, vols, host)
    report("storage node reboot (agent SIGKILL + all nvmet configfs wiped; initiator in the root netns)",
           f"initiator {lost} while down; ready after {ready_s:.1f}s with all 3 exports restored; live again after "
           f"{reconnect_s:.1f}s; data intact")


# -- a real storage-node reboot, the initiator in another guest ---------------------------------

REBOOT_LOSS_TMO = 600  # the node plugin's default ctrl_loss_tmo: the outage must fit inside it


@dataclass
class Pair:
    storage: Any  # lab.guest.Lab: agent, ZFS, nvmet
    worker: Any   # lab.guest.Lab: the initiator, in its root netns
    storage_instance: str


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """Two guests joined by a peer link (qemu socket NIC on 127.0.0.1): rebooting the storage
    guest leaves the initiator's kernel running, as with two machines."""
    from lab import control, qemu
    from lab.paths import Cache, instance_from_env

    cache, base = Cache.from_env(), instance_from_env()[:24]
    names_ = (f"{base}-rs", f"{base}-rw")
    link = qemu.free_port()
    booted: list[str] = []
    try:
        s = control.up_result(cache, names_[0], control.UpOptions(
            services=False, peer=qemu.PeerLink("storage", link)), sys.stderr)
        if s.booted:
            booted.append(names_[0])
        w = control.up_result(cache, names_[1], control.UpOptions(
            services=False, memory_mb=2048, peer=qemu.PeerLink("worker", link)), sys.stderr)
        if w.booted:
            booted.append(names_[1])
        yield Pair(storage=s.lab, worker=w.lab, storage_instance=names_[0])
    finally:
        if os.environ.get("ZVOLT_LAB_KEEP") != "1":
            for name in reversed(booted):
                control.down(cache, name, sys.stderr)


def test_storage_guest_hard_reboot_under_an_initiator_in_another_guest(pair: Pair) -> None:
    """sysrq 'b' on the storage guest (no sync, no clean shutdown): configfs, the agent and every
    kernel object are gone; ZFS and the agent's state dir come back from disk. The agent must
    rebuild every export before it says ready, and the initiator in the other guest, retrying all
    along, must reconnect within ctrl_loss_tmo and read what it wrote before the crash."""
    from lab import control
    from lab.paths import Cache

    senv = Env(pair.storage)
    wenv = Env(pair.worker, initiator_netns=None)
    senv.restart()
    wait_ready(senv.stub)
    host = host_nqn()
    vols = [senv.create(uniq(f"hr{i}"), 64 * MiB) for i in range(3)]
    pubs = [senv.publish(v.id, host) for v in vols]
    dev = connect(wenv, pubs[0].nqn, host, loss_tmo=REBOOT_LOSS_TMO, netns=None)
    try:
        written = wenv.write(dev, seed=47, mib=4)
        rb = control.reboot(Cache.from_env(), pair.storage_instance, sys.stderr)
        lost = ctrl_state(wenv, pubs[0].nqn)
        assert lost != ["live"], "the initiator did not notice the storage node going away"
        assert senv.subsystems() == [], "configfs survived a reboot?"
        start = time.monotonic()
        ready_s = restart_until_restored(senv, pubs, host)
        wait_live(wenv, pubs[0].nqn, REBOOT_LOSS_TMO)
        outage_s = rb.down_seconds + rb.setup_seconds + time.monotonic() - start
        assert wenv.read_hash(dev, mib=4) == written, "data written before the crash is gone"
        again = wenv.write(dev, seed=48, mib=2)  # and the volume takes new writes
        assert wenv.read_hash(dev, mib=2) == again
    finally:
        wenv.disconnect(pubs[0].nqn)
    healthy_then_released(senv, vols, host)
    senv.channel.close()
    report("storage guest hard reboot (sysrq b; initiator in a second guest over a peer link)",
           f"initiator {lost} while down; guest back on ssh after {rb.down_seconds:.0f}s, set up in "
           f"{rb.setup_seconds:.0f}s; agent ready {ready_s:.1f}s after start with all 3 exports restored; "
           f"controller live again {outage_s:.0f}s after the crash (ctrl_loss_tmo {REBOOT_LOSS_TMO}s); data intact")


# -- link cuts --------------------------------------------------------------------------------


def test_link_cut_shorter_than_ctrl_loss_tmo_resumes_io(env: Env, root_path: None) -> None:
    host = host_nqn()
    vol = env.create(uniq("cut"), 64 * MiB)
    pub = env.publish(vol.id, host)
    try:
        dev = connect(env, pub.nqn, host, loss_tmo=60, netns=None)
        first = env.write(dev, seed=41, mib=2)
        root_link(env, False)
        result: dict[str, Any] = {}

        def write_during_cut() -> None:
            try:
                result["hash"] = env.write(dev, seed=42, mib=2)
            except Exception as exc:  # reported below
                result["error"] = exc

        writer = threading.Thread(target=write_during_cut)
        writer.start()
        time.sleep(8)
        assert writer.is_alive(), "I/O issued during the cut waits for the path (not failed)"
        states = ctrl_state(env, pub.nqn)
        root_link(env, True)
        writer.join(240)
        assert not writer.is_alive() and "error" not in result, result
        assert env.read_hash(dev, mib=2) == result["hash"] != first
        assert ctrl_state(env, pub.nqn) == ["live"]
    finally:
        root_link(env, True)
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    env.delete(vol.id)
    report("link cut 8s < ctrl_loss_tmo 60s (initiator in the root netns, see root_path)",
           f"controller {states} during the cut; the write queued during "
           "the cut completed after the link came back; data read back intact")


def test_link_cut_longer_than_ctrl_loss_tmo_then_unstage_cleans_up(env: Env) -> None:
    lab = env.lab
    loss = 10
    lab.start_controller()
    lab.start_node("--ctrl-loss-tmo", str(loss), "--reconnect-delay", "2")
    csi = Csi(lab)
    try:
        vol = csi.create(uniq("longcut"))
        att = csi.attach(vol, mount_cap())
        stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=att.target)
        assert not csi.node.NodeGetVolumeStats(stats, timeout=T).volume_condition.abnormal
        lab.link(False)
        try:
            time.sleep(loss + 15)  # well past ctrl_loss_tmo: the kernel gives the controller up
            deadline = time.monotonic() + 120
            cond = csi.node.NodeGetVolumeStats(stats, timeout=T).volume_condition
            while not cond.abnormal and time.monotonic() < deadline:
                time.sleep(2)
                cond = csi.node.NodeGetVolumeStats(stats, timeout=T).volume_condition
            assert cond.abnormal, cond.message
            message = cond.message
            # Kubelet tears the pod down: unpublish + unstage must still succeed and leave nothing.
            csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=att.volume_id, target_path=att.target), timeout=T)
            csi.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=att.volume_id, staging_target_path=att.staging), timeout=T)
            assert not csi.mounted(att.target) and not csi.mounted(att.staging)
            assert csi.controllers_for(att.nqn) == []
        finally:
            lab.link(True)
        csi.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=att.volume_id, node_id=csi.node_id), timeout=T)
        csi.attached.remove(att)
        csi.assert_clean(att)
    finally:
        lab.link(True)
        with contextlib.suppress(grpc.RpcError):
            csi.cleanup()
        lab.start_node()  # standard flags again
    report(f"link cut {loss + 15}s > ctrl_loss_tmo {loss}s",
           f"condition abnormal ({message!r}); NodeUnpublish+NodeUnstage succeeded, no mount/controller left")


# -- pool nearly full -------------------------------------------------------------------------


def test_nearly_full_pool_refuses_creates_and_keeps_existing_volumes_working(env: Env) -> None:
    host = host_nqn()
    vol = env.create(uniq("full"), 64 * MiB)
    pub = env.publish(vol.id, host)
    filler = "tank/sec-filler"
    try:
        dev = connect(env, pub.nqn, host)
        avail = int(env.zget(PARENT, "available"))
        reserve = avail - 48 * MiB
        env.lab.run(["zfs", "create", "-s", "-V", str(avail * 2 // MiB * MiB), "-o", f"refreservation={reserve}",
                     filler])
        # The agent caches pool space (refreshed in the background, and after each create):
        # a create may still pass on a stale value; the next ones must be refused.
        refused: grpc.RpcError | None = None
        deadline = time.monotonic() + 120
        while refused is None and time.monotonic() < deadline:
            try:
                env.delete(env.create(uniq("full-new"), 64 * MiB).id)
            except grpc.RpcError as exc:
                refused = exc
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        with pytest.raises(grpc.RpcError) as err2:
            env.create(uniq("full-thick"), 32 * MiB, thick=True)
        assert err2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        cap = env.stub.GetCapacity(pb.GetCapacityRequest(), timeout=T)
        # The existing, connected volume still reads and writes.
        written = env.write(dev, seed=51, mib=4)
        assert env.read_hash(dev, mib=4) == written
        assert env.get(vol.id).condition == pb.VOLUME_CONDITION_HEALTHY
        env.lab.run(["zfs", "destroy", filler])
        back = None
        deadline = time.monotonic() + 120
        while back is None and time.monotonic() < deadline:
            try:
                back = env.create(uniq("full-after"), 64 * MiB)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(5)
        assert back is not None, "creates work again once space is back"
        env.delete(back.id)
    finally:
        env.lab.run(["zfs", "destroy", filler], check=False)
        env.disconnect(pub.nqn)
    env.unpublish(vol.id, host)
    env.delete(vol.id)
    report("pool nearly full (48 MiB left)", f"CreateVolume thin+thick -> RESOURCE_EXHAUSTED (GetCapacity "
           f"available={cap.available_bytes}); connected volume kept reading/writing; creates work again after")


# -- concurrency ------------------------------------------------------------------------------


def test_concurrent_calls_on_one_volume_are_aborted_or_serialized(env: Env) -> None:
    hosts = [host_nqn() for _ in range(3)]
    vol = env.create(uniq("conc"), 64 * MiB)
    calls: list[tuple[str, Any]] = []
    for i, h in enumerate(hosts):
        calls.append(("publish", pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=h)))
        calls.append(("expand", pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=(64 + 16 * (i + 1)) * MiB)))
        calls.append(("snapshot", pb.CreateSnapshotRequest(name=uniq(f"conc-s{i}"), source_volume_id=vol.id)))
    calls.append(("delete", pb.DeleteVolumeRequest(volume_id=vol.id)))
    method = {"publish": env.stub.PublishVolume, "expand": env.stub.ExpandVolume,
              "snapshot": env.stub.CreateSnapshot, "delete": env.stub.DeleteVolume}
    outcomes: dict[str, list[str]] = {}
    barrier = threading.Barrier(len(calls))

    def run(kind: str, req: Any) -> tuple[str, str]:
        barrier.wait(30)
        try:
            method[kind](req, timeout=T)
            return kind, "OK"
        except grpc.RpcError as err:
            return kind, err.code().name

    with futures.ThreadPoolExecutor(len(calls)) as pool:
        for kind, code in pool.map(lambda c: run(*c), calls):
            outcomes.setdefault(kind, []).append(code)
    allowed = {"OK", "ABORTED", "FAILED_PRECONDITION", "NOT_FOUND"}
    assert all(c in allowed for codes in outcomes.values() for c in codes), outcomes
    # Whatever won, the state is one consistent state: index, ZFS and configfs agree.
    listed = {v.id for v in env.stub.ListVolumes(pb.ListVolumesRequest(), timeout=T).volumes}
    if vol.id in listed:
        got = env.get(vol.id)
        assert got.condition == pb.VOLUME_CONDITION_HEALTHY, got.condition_message
        assert env.zget(vds(vol.id), "volsize") == str(got.size_bytes)
        nqn = names.subsystem_nqn(NODE, vol.id)
        if got.published_hosts:
            assert sorted(env.allowed(nqn)) == sorted(got.published_hosts)
            assert env.lab.run(["cat", f"{CONFIGFS}/subsystems/{nqn}/attr_allow_any_host"]).stdout.strip() == "0"
        for h in got.published_hosts:
            env.unpublish(vol.id, h)
    else:
        assert not env.zfs_exists(vds(vol.id))
    # Snapshots taken before a winning delete outlive it (moved aside); the user deletes them.
    for snap in env.stub.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=vol.id), timeout=T).snapshots:
        env.delete_snap(snap.id)
    if vol.id in listed:
        env.delete(vol.id)
    assert leaked(env, vol.id) == []
    assert not set(hosts) & set(env.hosts())
    report("10 concurrent calls on one volume (3 publish, 3 expand, 3 snapshot, 1 delete)",
           f"outcomes {dict(sorted(outcomes.items()))}; index/ZFS/configfs consistent afterwards")
