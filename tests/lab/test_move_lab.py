"""Moving a volume between two agents on real ZFS (one guest, two pools, two agents).

Until the multi-guest lab is used here, the two storage nodes are two agents in the one guest:
node move-a on pool tank, node move-b on a second pool on a sparse file, each with its own
NVMe/TCP port, move port, state dir and socket. They share the kernel's configfs, which a real
deployment never does: the test also shows neither prunes the other's subsystems. The
orchestrator (csi/moves.py) runs in the guest against the agents' sockets, as the controller would.

Run: ZVOLT_LAB_NAME=move pytest tests/lab/test_move_lab.py -m lab -s
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from zvolt import names
from zvolt.pb import agent_pb2 as pb

# slow: two or three guests at once (7-12 min with boots under TCG); kept out of the default run
# after its first CI run here, beside other guests, failed (closing note of 2026-12-06).
# Run: python -m pytest tests/lab/test_move_lab.py
pytestmark = [pytest.mark.lab, pytest.mark.slow]

A, B = "move-a", "move-b"
PARENT = {A: "tank/zvmove", B: "tankm/zvolt"}
# Not 7011: the lab's own agent holds its default move port there (zvolt/storagenet.py MOVE_PORT).
PORTS = {A: ("4421", "7013"), B: ("4422", "7012")}
POOL_B_FILE = "/var/tmp/tankm.img"
HOST = "nqn.2014-08.org.nvmexpress:uuid:6d6f7665-0000-4000-8000-000000000001"
MiB = 1 << 20
SIZE = 512 * MiB
DATA_MIB = 160  # written in three parts, a CSI snapshot after each of the first two
BENCH_MIB = 256

# Prepended to every in-guest script: clients of both agents, the orchestrator, one JSON line out.
PRELUDE = """
import hashlib, json, mmap, os, random, sys, time
import grpc
from csi import moves
from csi.agents import AgentClient, AgentEndpoint
from zvolt.pb import agent_pb2 as pb

def client(name):
    target = f"unix:///run/zvolt/{name}.sock"
    return AgentClient(AgentEndpoint(name=name, target=target), grpc.insecure_channel(target), 600.0)

a, b = client("move-a"), client("move-b")

def io(dev, seed, offset_mib, mib, write):
    fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    h = hashlib.sha256()
    rnd = random.Random(seed)
    for i in range(offset_mib, offset_mib + mib):
        if write:
            buf.seek(0); buf.write(rnd.randbytes(1 << 20))
            assert os.pwritev(fd, [buf], i << 20) == 1 << 20
        else:
            assert os.preadv(fd, [buf], i << 20) == 1 << 20
        h.update(buf[:])
    if write:
        os.fsync(fd)
    os.close(fd)
    return h.hexdigest()

def wait_dev(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline, path
        time.sleep(0.1)
    return path

def out(value):
    print(json.dumps(value))
"""


def guest(lab: Any, code: str, timeout: float = 900) -> Any:
    proc = lab.py(PRELUDE + code, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"guest script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agent_argv(lab: Any, node: str, *extra: str) -> list[str]:
    nvme, move = PORTS[node]
    return [lab.python, "-m", "agent.main", "--node-name", node, "--pool", PARENT[node].split("/")[0],
            "--parent", PARENT[node], "--listen", f"unix:///run/zvolt/{node}.sock",
            "--nvme-listen", f"{lab.storage_ip}:{nvme}", "--metrics-listen", "", "--state-dir",
            f"/var/lib/zvolt-{node}", "--insecure", "--move-listen", f"{lab.storage_ip}:{move}", *extra]


def start(lab: Any, node: str, *extra: str) -> None:
    lab.start_service(node, agent_argv(lab, node, *extra), netns="storage")
    lab.wait_socket(node, f"/run/zvolt/{node}.sock")
    guest(lab, f"""
deadline = time.monotonic() + 300
while not client({node!r}).call("GetInfo", pb.GetInfoRequest(), 10).ready:
    assert time.monotonic() < deadline, "agent {node} not ready"
    time.sleep(0.5)
out(True)
""")


def kill(lab: Any, node: str) -> None:
    lab.stop_service(node, kill=True)  # SIGKILL to every process of the unit (its `zfs send` too)


@pytest.fixture(scope="module")
def agents(lab: Any) -> Iterator[Any]:
    if lab.run(["zpool", "list", "tankm"], check=False).returncode != 0:
        lab.run(["truncate", "-s", "4G", POOL_B_FILE])
        lab.run(["zpool", "create", "-f", "tankm", POOL_B_FILE], timeout=120)
    for node in (A, B):
        start(lab, node)
    yield lab
    for node in (A, B):
        lab.stop_service(node)


def state_of(lab: Any, vid: str) -> dict[str, Any]:
    """What ZFS says on both pools: (readonly, zvolt:state, move props) of each copy, or None."""
    found = {}
    for node in (A, B):
        ds = f"{PARENT[node]}/v/{vid}"
        proc = lab.run(["zfs", "get", "-H", "-o", "property,value",
                        "readonly,zvolt:state,zvolt:moving-to,zvolt:moved-to", ds], check=False)
        found[node] = dict(line.split("\t") for line in proc.stdout.splitlines()) if proc.returncode == 0 else None
    return found


def writable_copies(lab: Any, vid: str) -> list[str]:
    return [n for n, p in state_of(lab, vid).items()
            if p is not None and p["readonly"] == "off" and p["zvolt:state"] != "incoming"
            and p["zvolt:moved-to"] == "-"]


def make_volume(lab: Any, name: str, with_snapshots: bool) -> dict[str, Any]:
    """A volume on move-a written with a pattern, two CSI snapshots between writes (or none)."""
    made: dict[str, Any] = guest(lab, f"""
vol = a.call("CreateVolume", pb.CreateVolumeRequest(name={name!r}, size_bytes={SIZE})).volume
a.call("PublishVolume", pb.PublishVolumeRequest(volume_id=vol.id, host_nqn={HOST!r}))
dev = wait_dev("/dev/zvol/{PARENT[A]}/v/" + vol.id)
hashes, snaps = [], []
plan = [(1, 0, 64), (2, 64, 48), (3, 112, 48)] if {with_snapshots} else [(1, 0, {BENCH_MIB})]
for i, (seed, off, mib) in enumerate(plan):
    io(dev, seed, off, mib, True)
    hashes.append(io(dev, 0, 0, {DATA_MIB} if {with_snapshots} else {BENCH_MIB}, False))
    if {with_snapshots} and i < 2:
        snaps.append(a.call("CreateSnapshot", pb.CreateSnapshotRequest(name={name!r} + f"-s{{i}}",
                                                                        source_volume_id=vol.id)).snapshot.id)
a.call("UnpublishVolume", pb.UnpublishVolumeRequest(volume_id=vol.id, host_nqn={HOST!r}))
out({{"id": vol.id, "hashes": hashes, "snaps": snaps}})
""")
    return made


def run_move(lab: Any, vid: str) -> dict[str, Any]:
    result: dict[str, Any] = guest(lab, f"""
try:
    r = moves.move(a, b, {vid!r})
    out({{"ok": True, "bytes": r.bytes, "streams": r.streams, "seconds": r.seconds}})
except Exception as exc:
    out({{"ok": False, "error": str(exc)}})
""")
    return result


def test_offline_move_with_snapshots_survives_kill9_of_both_agents(agents: Any) -> None:
    lab = agents
    vol = make_volume(lab, f"pvc-move-{int(time.time())}", with_snapshots=True)
    vid = vol["id"]

    # 1. kill -9 of the source mid-stream: the move fails, the source stays the one true copy.
    result: dict[str, Any] = {}
    mover = threading.Thread(target=lambda: result.update(run_move(lab, vid)))
    mover.start()
    deadline = time.monotonic() + 300
    # Killed once the target has logged progress (5 s into the data): the stream is under way.
    while not [line for line in lab.service_log(B, 30).splitlines() if "move stream progress" in line and vid in line]:
        assert time.monotonic() < deadline and mover.is_alive(), f"the stream never got going: {result}"
        time.sleep(0.2)
    kill(lab, A)
    mover.join(timeout=600)
    received = [line for line in lab.service_log(B, 100).splitlines() if "move stream received" in line
                and vid in line]
    print(f"\nMOVE kill -9 source mid-stream: move -> {result}; target log: {received[-1:]}", flush=True)
    assert not result["ok"]
    st = state_of(lab, vid)  # offline: frozen before its one stream, so no copy is writable until commit or abort
    # The target may hold the snapshots that arrived before the cut: never as a servable copy.
    partial = st[B] is None or (st[B]["zvolt:state"] == "incoming" and st[B]["readonly"] == "on")
    assert st[A] is not None and st[A]["zvolt:moving-to"] == B and partial, st
    assert writable_copies(lab, vid) == []
    start(lab, A)

    # 2. kill -9 of the target at its commit (its first `zfs set` of the move is the commit).
    start(lab, B, "--failpoint", "set_props:before")
    result = run_move(lab, vid)
    print(f"MOVE kill -9 target before commit: move -> {result}; zfs: {state_of(lab, vid)}", flush=True)
    assert not result["ok"]
    st = state_of(lab, vid)
    assert st[A] is not None and st[A]["readonly"] == "on" and st[A]["zvolt:moving-to"] == B  # frozen, not gone
    assert st[B] is not None and st[B]["zvolt:state"] == "incoming" and st[B]["readonly"] == "on"
    assert writable_copies(lab, vid) == []
    start(lab, B)

    # 3. The retry converges.
    result = run_move(lab, vid)
    print(f"MOVE retry: {result}", flush=True)
    assert result["ok"], result
    assert writable_copies(lab, vid) == [B] and state_of(lab, vid)[A] is None

    # On the target: data, both snapshots with their content, the original NQN; on the source a tombstone.
    nqn = names.subsystem_nqn(A, vid)
    seen = guest(lab, f"""
got = b.call("GetVolume", pb.GetVolumeRequest(volume_id={vid!r}))
gone = a.call("GetVolume", pb.GetVolumeRequest(volume_id={vid!r}))
pub = b.call("PublishVolume", pb.PublishVolumeRequest(volume_id={vid!r}, host_nqn={HOST!r}))
exported = os.path.isdir("/sys/kernel/config/nvmet/subsystems/" + pub.nqn)
data = io(wait_dev("/dev/zvol/{PARENT[B]}/v/{vid}"), 0, 0, {DATA_MIB}, False)
b.call("UnpublishVolume", pb.UnpublishVolumeRequest(volume_id={vid!r}, host_nqn={HOST!r}))
listed = sorted(s.id for s in b.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id={vid!r})).snapshots)
snap_data = []
for i, sid in enumerate({vol["snaps"]!r}):
    clone = b.call("CreateVolume", pb.CreateVolumeRequest(name=f"restore-{{i}}-{vid}", size_bytes={SIZE},
                                                           source_snapshot_id=sid)).volume
    b.call("PublishVolume", pb.PublishVolumeRequest(volume_id=clone.id, host_nqn={HOST!r}))
    snap_data.append(io(wait_dev("/dev/zvol/{PARENT[B]}/v/" + clone.id), 0, 0, {DATA_MIB}, False))
    b.call("UnpublishVolume", pb.UnpublishVolumeRequest(volume_id=clone.id, host_nqn={HOST!r}))
    b.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=clone.id))
out({{"placement": got.placement, "home": got.home_node, "nqn": pub.nqn, "exported": exported, "data": data,
      "snaps": listed, "snap_data": snap_data, "source": gone.placement, "moved_to": gone.moved_to}})
""")
    print(f"MOVE target: {seen}", flush=True)
    assert seen["home"] == A and seen["nqn"] == nqn and seen["exported"]
    assert seen["data"] == vol["hashes"][2]
    assert seen["snaps"] == sorted(vol["snaps"]) and seen["snap_data"] == vol["hashes"][:2]
    assert seen["source"] == pb.PLACEMENT_MOVED and seen["moved_to"] == B


def test_move_throughput_against_a_raw_send_receive(agents: Any) -> None:
    """The bar: a move of incompressible data >= 0.8x a raw `zfs send | zfs receive` of it."""
    lab = agents
    vol = make_volume(lab, f"pvc-bench-{int(time.time())}", with_snapshots=False)
    vid = vol["id"]
    src = f"{PARENT[A]}/v/{vid}"
    lab.run(["zfs", "snapshot", f"{src}@raw"])
    start_raw = time.monotonic()
    lab.run(["sh", "-c", f"zfs send -R {src}@raw | zfs receive tankm/rawcopy"], timeout=900)
    raw = time.monotonic() - start_raw
    used = int(lab.run(["zfs", "get", "-Hp", "-o", "value", "referenced", src]).stdout.strip())
    lab.run(["zfs", "destroy", "-r", "tankm/rawcopy"])
    lab.run(["zfs", "destroy", f"{src}@raw"])
    result = run_move(lab, vid)
    assert result["ok"], result
    ratio = raw / result["seconds"]
    # The stream alone (the target's log: first byte to end of stream), apart from the fixed
    # per-move steps (freeze, snapshot, commit, tombstone: a few `zfs` processes each).
    lines = [line for line in lab.service_log(B, 60).splitlines() if "move stream received" in line and vid in line]
    stream = max(json.loads(line)["seconds"] for line in lines)
    print(f"\nMOVE throughput: {used / MiB:.0f} MiB referenced; raw send|receive {raw:.2f} s "
          f"({used / MiB / raw:.1f} MiB/s); move {result['seconds']:.2f} s for {result['bytes'] / MiB:.0f} MiB "
          f"in {result['streams']} stream(s), of which streaming {stream:.2f} s; throughput vs raw: whole move "
          f"{ratio:.2f}, stream {raw / stream:.2f} (bar >= 0.8)", flush=True)
    guest(lab, f"""
b.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id={vid!r}))
out(True)
""")


# -- faults (issue 17, item 5): the controller killed at each step, the link cut mid-stream --

CTL_PID = "/run/zvolt-move-ctl.pid"
CUT_TABLE = "zvolt_test_cut"


def move_dying(lab: Any, vid: str, after: str) -> str:
    """The orchestrator in its own guest process, killed with SIGKILL right after the agent call
    `after` returned: a controller dying between two steps (it keeps no state of its own)."""
    proc = lab.py(PRELUDE + f"""
import signal

class Dying:
    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def call(self, method, request, timeout=None):
        resp = self.inner.call(method, request, timeout)
        if method == {after!r}:
            print("died after " + method, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return resp

from zvolt.errors import ZvoltError
# ABORTED: the target still runs the receive that an earlier, killed orchestrator started (it
# finishes it); a controller retries that, as the CO retries ABORTED.
for attempt in range(60):
    try:
        moves.move(Dying(a), Dying(b), {vid!r})
        break
    except ZvoltError as exc:
        if exc.code != grpc.StatusCode.ABORTED:
            raise
        time.sleep(5)
out("finished without dying")
""", timeout=900, check=False)
    assert proc.returncode != 0 and f"died after {after}" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
    return f"killed after {after}"


def move_killed_mid_stream(lab: Any, vid: str) -> str:
    """The orchestrator killed with SIGKILL while the target's ReceiveMove is streaming."""
    done: dict[str, Any] = {}

    def run() -> None:
        proc = lab.py(PRELUDE + f"""
open({CTL_PID!r}, "w").write(str(os.getpid()))
moves.move(a, b, {vid!r})
out("finished")
""", timeout=900, check=False)
        done.update(rc=proc.returncode, out=proc.stdout)

    mover = threading.Thread(target=run)
    mover.start()
    deadline = time.monotonic() + 300
    while not [line for line in lab.service_log(B, 30).splitlines() if "move stream progress" in line and vid in line]:
        assert time.monotonic() < deadline and mover.is_alive(), f"the stream never got going: {done}"
        time.sleep(0.2)
    lab.run(["sh", "-c", f"kill -9 $(cat {CTL_PID})"])
    mover.join(timeout=600)
    assert done.get("rc") not in (None, 0) and "finished" not in done.get("out", ""), done
    return "killed mid-stream"


def converge(lab: Any, vid: str, tries: int = 4) -> dict[str, Any]:
    """What a user (or drain) does after a failure: run the move again. A receive the killed
    orchestrator left running may still hold the volume for a moment; the retry waits it out."""
    result: dict[str, Any] = {}
    for attempt in range(1, tries + 1):
        result = run_move(lab, vid) | {"attempt": attempt}
        if result["ok"]:
            return result
        time.sleep(10)
    return result


def target_hash(lab: Any, vid: str, mib: int) -> str:
    digest: str = guest(lab, f"""
b.call("PublishVolume", pb.PublishVolumeRequest(volume_id={vid!r}, host_nqn={HOST!r}))
h = io(wait_dev("/dev/zvol/{PARENT[B]}/v/{vid}"), 0, 0, {mib}, False)
b.call("UnpublishVolume", pb.UnpublishVolumeRequest(volume_id={vid!r}, host_nqn={HOST!r}))
out(h)
""")
    return digest


def rerun_lands_intact(lab: Any, made: dict[str, Any], what: str) -> None:
    """The move run again converges: only the target's copy, the source's gone, the data the same."""
    vid = made["id"]
    t0 = time.monotonic()
    result = converge(lab, vid)
    print(f"MOVE {what} {vid}: {result} ({time.monotonic() - t0:.1f} s)", flush=True)
    assert result["ok"], result
    assert writable_copies(lab, vid) == [B] and state_of(lab, vid)[A] is None
    assert target_hash(lab, vid, DATA_MIB) == made["hashes"][2]


def test_controller_killed_at_every_step_never_leaves_two_writable_copies(agents: Any) -> None:
    """kill -9 of the orchestrating controller after SendMove, after ReceiveMove and after
    CommitMove, one after the other on one move; then on a second volume in the middle of the
    stream. After each kill at most one copy is writable (none before the commit: an offline move
    freezes the source first; only the target's after it), and a plain rerun finishes the move
    with the data intact."""
    lab = agents
    vol = make_volume(lab, f"pvc-ctl-{int(time.time())}", with_snapshots=True)
    other = make_volume(lab, f"pvc-ctl2-{int(time.time())}", with_snapshots=True)
    steps: list[tuple[str, Callable[[], str], list[str]]] = [
        (vol["id"], partial(move_dying, lab, vol["id"], "SendMove"), []),
        (vol["id"], partial(move_dying, lab, vol["id"], "ReceiveMove"), []),
        (vol["id"], partial(move_dying, lab, vol["id"], "CommitMove"), [B]),
        (other["id"], partial(move_killed_mid_stream, lab, other["id"]), []),
    ]
    for vid, kill_at, expect in steps:
        t0 = time.monotonic()
        what = kill_at()
        st = state_of(lab, vid)
        print(f"\nMOVE controller {what} ({time.monotonic() - t0:.1f} s): writable {writable_copies(lab, vid)}; "
              f"zfs {st}", flush=True)
        assert writable_copies(lab, vid) == expect, st
        assert st[A] is not None and st[A]["zvolt:moving-to"] == B, st  # the source keeps its copy until Finish
    for made in (vol, other):
        rerun_lands_intact(lab, made, "controller rerun")


def test_link_cut_mid_stream_fails_the_move_and_a_retry_converges(agents: Any) -> None:
    """The move port's traffic dropped both ways in the middle of the stream (a cut link, not a
    closed connection): the target gives up on the silent source (TCP keepalive), the move fails
    with the source the one true copy, and once the link is back a rerun finishes it."""
    lab = agents
    vol = make_volume(lab, f"pvc-cut-{int(time.time())}", with_snapshots=True)
    vid = vol["id"]
    move_port = PORTS[A][1]
    result: dict[str, Any] = {}
    mover = threading.Thread(target=lambda: result.update(run_move(lab, vid)))
    t0 = time.monotonic()
    mover.start()
    deadline = time.monotonic() + 300
    while not [line for line in lab.service_log(B, 30).splitlines() if "move stream progress" in line and vid in line]:
        assert time.monotonic() < deadline and mover.is_alive(), f"the stream never got going: {result}"
        time.sleep(0.2)
    # Both agents share the storage netns here, so the stream runs over its loopback: `output` sees both ways.
    cut = (f"table inet {CUT_TABLE} {{\n chain out {{\n  type filter hook output priority -20; policy accept;\n"
           f"  tcp dport {move_port} drop\n  tcp sport {move_port} drop\n }}\n}}\n")
    lab.run(["nft", "-f", "-"], netns="storage", input=cut)
    cut_at = time.monotonic()
    try:
        mover.join(timeout=900)
        failed_after = time.monotonic() - cut_at
        st = state_of(lab, vid)
        print(f"\nMOVE link cut {cut_at - t0:.1f} s into the move: move -> {result} after {failed_after:.1f} s; "
              f"zfs {st}", flush=True)
        assert not mover.is_alive() and result and not result["ok"], result
        assert "UNAVAILABLE" in result["error"] and "run the move again" in result["error"], result
        assert writable_copies(lab, vid) == [] and st[A] is not None and st[A]["zvolt:moving-to"] == B, st
        # The source's sender, holding unacknowledged data, gives up too (TCP_USER_TIMEOUT): no
        # `zfs send` is left hanging on a dead link.
        while not [ln for ln in lab.service_log(A, 200).splitlines() if "move stream failed" in ln and vid in ln]:
            assert time.monotonic() - cut_at < 300, "the source still sends into the cut link after 300 s"
            time.sleep(1)
        print(f"MOVE link cut: the source gave up its stream {time.monotonic() - cut_at:.1f} s after the cut",
              flush=True)
    finally:
        lab.run(["nft", "delete", "table", "inet", CUT_TABLE], netns="storage", check=False)
    rerun_lands_intact(lab, vol, "after the link came back")


def _wait_target_available(lab: Any, below: bool, mib: int) -> None:
    """Until move-b's GetCapacity shows the quota change (the agent refreshes its space every 15 s)."""
    guest(lab, f"""
deadline = time.monotonic() + 120
while (b.call("GetCapacity", pb.GetCapacityRequest()).available_bytes < {mib} << 20) == {not below}:
    assert time.monotonic() < deadline, "move-b's capacity did not follow the quota"
    time.sleep(1)
out(True)
""")


def test_a_target_without_room_refuses_the_move_before_anything_changes(agents: Any) -> None:
    """A target whose free space (here a quota on its parent) cannot take the volume refuses the
    move before the source is touched: no move started, no stream, the source still writable; once
    the target has room, the same command moves it intact. Without the check the stream would
    fail at the end with ZFS's quota error and leave the source frozen mid-move."""
    lab = agents
    vol = make_volume(lab, f"pvc-room-{int(time.time())}", with_snapshots=True)
    vid = vol["id"]
    used = int(lab.run(["zfs", "get", "-Hp", "-o", "value", "used", PARENT[B]]).stdout.strip())
    lab.run(["zfs", "set", f"quota={used + 96 * MiB}", PARENT[B]])
    try:
        _wait_target_available(lab, below=True, mib=DATA_MIB)
        t0 = time.monotonic()
        result = run_move(lab, vid)
        st = state_of(lab, vid)
        print(f"\nMOVE to a full target: {result} in {time.monotonic() - t0:.1f} s; zfs {st}", flush=True)
        assert not result["ok"] and "RESOURCE_EXHAUSTED" in result["error"], result
        assert "free above its growth reserve" in result["error"] and "Nothing was changed" in result["error"]
        assert writable_copies(lab, vid) == [A] and st[B] is None and st[A]["zvolt:moving-to"] == "-", st
    finally:
        lab.run(["zfs", "set", "quota=none", PARENT[B]])
    _wait_target_available(lab, below=False, mib=DATA_MIB * 4)
    rerun_lands_intact(lab, vol, "once the target had room")
