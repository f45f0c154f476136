"""A published volume moves to another storage node while a writer keeps writing to it.

Two storage guests (lab/cluster.py) booted with native NVMe multipath; the NVMe host is guest 0
(its storage netns reaches both agents' NVMe/TCP ports on the storage network). The writer
(tests/lab/livewriter.py) writes through the volume's multipath head device the whole time and
checks every block it was told was written when the move is over. The orchestrator is the one
the controller runs (csi/moves.py) with the controller's PathSwitch (csi/pathrelay.py); its relay
here stands in for `kubectl zvolt move` and hands each host step to `zvolt-csi --mode live-path`
in guest 0, the command the plugin runs in a node plugin container.

Run: ZVOLT_LAB_NAME=live python -m pytest tests/lab/test_live_move_lab.py -s
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi import moves
from csi.agents import AgentClient, AgentEndpoint
from csi.pathrelay import RelayedPaths
from lab import cluster, control
from lab.guest import POOL, SOCKETS, STORAGE_NS, unit_name
from lab.guest import agent_argv as lab_agent_argv
from lab.paths import Cache
from tests.lab.test_multinode_lab import booted_cluster
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb

# slow: two guests at once; kept out of the default run like the other cluster tests.
pytestmark = [pytest.mark.lab, pytest.mark.slow]

T = 300.0  # per-RPC deadline under TCG
MiB = 1 << 20
SIZE = 256 * MiB
PREFILL_MIB = 48  # written before the move: the first stream carries it
WRITER_BLOCKS = 4096  # the writer's 16 MiB, round and round
NVME_PORT, MOVE_PORT = "4420", 7011
STOP, OUT = "/run/zvolt-livewriter.stop", "/run/zvolt-livewriter.json"
WRITER = "livewriter"
# ZVOLT_LIVE_WEAKEN=nofence: the source agent of a move (guest 0) with its fence patched out, so the
# hosts go on writing to the source through the cutover, to show the writer's checks catch it: the
# test must fail. (The start-up fence after a reset is shown by unit tests only: see the reset test.)
WEAKEN = os.environ.get("ZVOLT_LIVE_WEAKEN", "")
WEAKENED = {"nofence": (0, "from agent import exports\nexports.Exports.fence = lambda self, volume_id: None\n")}
AGENT_MAIN = "from agent.main import main\nsys.exit(main(sys.argv[1:]))"


def agent_args(members: list[cluster.Member], m: cluster.Member) -> list[str]:
    """Each agent's NVMe/TCP and move ports on its storage-network address (reachable from the
    other guest; the default NVMe address, 10.42.0.1, is the same in every guest)."""
    ip = cluster.storage_ips(members)[m.node]
    return ["--nvme-listen", f"{ip}:{NVME_PORT}", "--nvme-tls-port", "4421", "--move-listen", f"{ip}:{MOVE_PORT}"]


def start(members: list[cluster.Member], m: cluster.Member) -> None:
    m.lab.run(["systemctl", "stop", unit_name("agent")], timeout=T, check=False)
    if WEAKEN in WEAKENED and m is members[WEAKENED[WEAKEN][0]]:
        argv = lab_agent_argv(m.node)
        script = "import sys\n" + WEAKENED[WEAKEN][1] + AGENT_MAIN
        m.lab.start_service("agent", [argv[0], "-c", script, *argv[3:], *agent_args(members, m)],
                            netns=STORAGE_NS)
        m.lab.wait_socket("agent", SOCKETS["agent"])
    else:
        m.lab.start_agent(*agent_args(members, m))


@pytest.fixture(scope="module")
def members() -> Iterator[list[cluster.Member]]:
    with booted_cluster(multipath=True) as found:
        for m in found:
            if m.lab.run(["cat", "/sys/module/nvme_core/parameters/multipath"]).stdout.strip() != "Y":
                pytest.fail(f"guest {m.instance} runs without native NVMe multipath (a guest booted earlier "
                            f"without it was reused): `ZVOLT_LAB_NAME={m.instance} zvolt-lab down --cluster` first")
        for m in found:
            start(found, m)
        yield found
        for m in found:
            m.lab.run(["systemctl", "stop", unit_name("agent")], timeout=T, check=False)
            m.lab.start_agent()


class Killed(RuntimeError):
    pass


def client(m: cluster.Member) -> AgentClient:
    target = m.lab.grpc_target("agent")
    return AgentClient(AgentEndpoint(name=m.node, target=target), grpc.insecure_channel(target), T)


class Timed:
    """An agent client that records each call's method, whether it was the final stream, and time;
    with `kill_after` ("SendMove-final", "PrepareMove"), the agent gets SIGKILL once that call
    returned, and the orchestrator sees the call fail."""

    def __init__(self, agent: AgentClient, log: list[dict[str, Any]], member: cluster.Member,
                 kill_after: str = "", reboot: bool = False) -> None:
        self.agent, self.log, self.name, self.member, self.kill_after = agent, log, agent.name, member, kill_after
        self.reboot = reboot  # a hard reset of the whole guest (sysrq b) instead of a kill -9 of the agent

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        start = time.monotonic()
        got = self.agent.call(method, request, timeout=timeout)
        final = bool(getattr(request, "final", False))
        self.log.append({"node": self.name, "method": method, "seconds": time.monotonic() - start,
                         "final": final, "bytes": int(getattr(got, "bytes", 0))})
        if self.kill_after and self.kill_after == method + ("-final" if final else ""):
            self.kill_after = ""
            if self.reboot:
                t0 = time.monotonic()
                control.reboot(Cache.from_env(), self.member.instance, sys.stderr)
                print(f"{self.name} hard reset after {method}, back in {time.monotonic() - t0:.1f} s", flush=True)
            else:
                self.member.lab.stop_service("agent", kill=True)
            self.log.append({"node": self.name, "method": f"{'reset' if self.reboot else 'SIGKILL'} after {method}",
                             "seconds": 0.0, "final": False, "bytes": 0})
            raise Killed(f"agent {self.name} killed after {method}")
        return got


NODE_ID, NODE_STATE = "live-host", "/run/zvolt-live-node"  # the node plugin's --node-id and --state-dir


def node_step(lab: Any, request: dict[str, Any]) -> dict[str, Any]:
    """What `kubectl zvolt move` runs in the node plugin container for one host step, here in guest 0."""
    argv = [lab.python, "-m", "csi.main", "--mode=live-path", f"--node-id={NODE_ID}", f"--state-dir={NODE_STATE}",
            "--reconnect-delay=2", "--log-level=error"]
    proc = lab.run(argv, netns=STORAGE_NS, timeout=T, input=json.dumps(request), check=False)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"ok": False, "error": proc.stderr[-800:]}


class GuestRelay:
    """The relay `kubectl zvolt move` is (kubectl_zvolt/move.py), for the one host in guest 0: each
    request of the controller's PathSwitch (csi/pathrelay.py) goes to that node's live-path step."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.add_seconds = 0.0

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        failed: dict[str, str] = {}
        for node, ctx in request["nodes"].items():
            said = node_step(self.lab, {"op": request["op"], "volume_id": request["volume_id"],
                                        "publish_context": ctx})
            if not said.get("ok"):
                failed[node] = str(said.get("error"))
            elif request["op"] == "add":
                self.add_seconds = float(said["seconds"])
        return {"ok": not failed, "failed": failed}


def guest_json(lab: Any, code: str) -> Any:
    proc = lab.py(code, netns=STORAGE_NS, timeout=T)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_ready(agent: AgentClient) -> None:
    deadline = time.monotonic() + T
    while True:
        with contextlib.suppress(ZvoltError, grpc.RpcError):  # restarting: refused, then not ready
            if agent.call("GetInfo", pb.GetInfoRequest(), timeout=10).ready:
                return
        assert time.monotonic() < deadline, f"agent {agent.name} not ready again"
        time.sleep(1)


def test_a_written_volume_moves_live_without_an_io_error_or_a_lost_write(members: list[cluster.Member]) -> None:
    live_move(members)


@pytest.mark.parametrize("where", ["source", "target"])
def test_an_agent_killed_mid_cutover_and_a_retry_lose_no_write(members: list[cluster.Member], where: str) -> None:
    """kill -9 of the source right after it fenced (the hosts hold their I/O), or of the target right
    after it prepared the path: the move fails, the agent restarts, the same call again converges."""
    live_move(members, kill=where)


@pytest.mark.faults
def test_a_source_reset_after_its_fence_comes_back_fenced_and_a_retry_loses_no_write(
        members: list[cluster.Member]) -> None:
    """A hard reset of the source guest right after the fence (configfs and its ANA group gone, the
    zvol frozen): the host (guest 0; the volume moves from guest 1 to it) holds its I/O through the
    reset, and the same call again converges with no write lost. What this lab cannot show: the
    agent's start-up fence of that export (tests/unit/test_live_move.py). The host's reconnects
    dial from guest 0's initial network namespace, which has no route to the storage network, so
    no host reaches the rebooted source: a run with that fence patched out also passed (0 errors)."""
    live_move(members, kill="reboot")


def live_move(members: list[cluster.Member], kill: str = "") -> None:
    src, dst = (members[1], members[0]) if kill == "reboot" else (members[0], members[1])
    a, b = client(src), client(dst)
    host = members[0].lab
    ips = cluster.storage_ips(members)
    vol = a.call("CreateVolume", pb.CreateVolumeRequest(name=f"live-{int(time.time())}", size_bytes=SIZE)).volume
    vid = vol.id
    # The host's identity is the node plugin's own (its state dir), as NodeStageVolume would use it.
    host_nqn, host_id = guest_json(host, f"""
import json
from csi.host_identity import load_or_create
me = load_or_create({NODE_STATE!r}, {NODE_ID!r})
print(json.dumps([me.hostnqn, me.hostid]))
""")
    pub = a.call("PublishVolume", pb.PublishVolumeRequest(volume_id=vid, host_nqn=host_nqn))
    assert pub.address == ips[src.node]
    device = guest_json(host, f"""
import json, os, time
from csi.nvme_host import ConnectSpec, SysfsNvmeHost, wait_for_device
nvme = SysfsNvmeHost()
nvme.connect(ConnectSpec(nqn={pub.nqn!r}, transport="tcp", address={pub.address!r}, port={pub.port!r},
                         hostnqn={host_nqn!r}, hostid={host_id!r}, ctrl_loss_tmo=600, reconnect_delay=2))
dev = wait_for_device(nvme, {pub.nqn!r}, 120)
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
import mmap
buf = mmap.mmap(-1, 1 << 20)
for i in range({PREFILL_MIB}):
    buf.seek(0); buf.write(os.urandom(1 << 20))
    os.pwrite(fd, buf, (16 + i) << 20)  # beyond the writer's 16 MiB
os.fsync(fd); os.close(fd)
print(json.dumps(dev))
""")
    print(f"\nvolume {vid} on {src.node}, head device {device} in guest {members[0].instance}", flush=True)
    host.run(["rm", "-f", STOP, OUT])
    host.start_service(WRITER, [host.python, "/src/tests/lab/livewriter.py", device, str(WRITER_BLOCKS), STOP, OUT])
    time.sleep(10)  # the writer is well under way before the move starts

    log: list[dict[str, Any]] = []
    relay = GuestRelay(host)
    paths = RelayedPaths(f"{src.node}/{vid}", vol.name, [host_nqn], {}, None, relay)
    source = Timed(a, log, src, "SendMove-final" if kill in ("source", "reboot") else "", reboot=kill == "reboot")
    target = Timed(b, log, dst, "PrepareMove" if kill == "target" else "")
    try:
        try:
            result = moves.move(source, target, vid, stream_timeout=T, live=paths)
            assert not kill, "the agent was to be killed mid-move"
        except Killed:
            killed = dst if kill == "target" else src
            t0 = time.monotonic()
            start(members, killed)
            wait_ready(b if kill == "target" else a)
            print(f"{killed.node} killed and back in {time.monotonic() - t0:.1f} s; the same move again", flush=True)
            result = moves.move(source, target, vid, stream_timeout=T, live=paths)
        time.sleep(5)  # the writer keeps going on the new path
    finally:
        host.run(["touch", STOP])
        deadline = time.monotonic() + 180
        while host.run(["test", "-f", OUT], check=False).returncode != 0:
            assert time.monotonic() < deadline, "the writer did not finish its read-back"
            time.sleep(1)
    report = json.loads(host.run(["cat", OUT]).stdout)
    final_send = sum(e["seconds"] for e in log if e["method"] == "SendMove" and e["final"])
    final_recv = [e for e in log if e["method"] == "ReceiveMove"][-1]
    baseline = final_send + final_recv["seconds"] + relay.add_seconds
    for e in log:
        print(f"  {e['node']} {e['method']}{' (final)' if e['final'] else ''}: {e['seconds']:.2f} s"
              + (f", {e['bytes']} bytes" if e["bytes"] else ""), flush=True)
    print(f"live move: {result.bytes} bytes in {result.streams} streams, {result.seconds:.1f} s; orchestrator's "
          f"pause (fence -> target namespace) {result.pause_seconds:.2f} s", flush=True)
    print(f"writer: {report['writes']} writes, {report['error_count']} errors, longest pause "
          f"{report['longest_pause_s']:.2f} s at {report['longest_pause_at_s']:.1f} s, "
          f"{report['verified_blocks']} blocks read back, {report['bad_count']} wrong", flush=True)
    print(f"baseline: final SendMove {final_send:.2f} s + final stream {final_recv['seconds']:.2f} s "
          f"({final_recv['bytes']} bytes) + one path connect {relay.add_seconds:.2f} s = {baseline:.2f} s; "
          f"longest pause / baseline = {report['longest_pause_s'] / baseline:.2f}x (bar <= 1.5x)", flush=True)

    assert report["error_count"] == 0, report["errors"]
    assert report["bad_count"] == 0, report["bad_blocks"]
    assert report["verified_blocks"] == min(report["writes"], WRITER_BLOCKS) > 0
    assert (result.streams >= 2 or kill) and result.pause_seconds > 0
    # The same head device, now served by the target alone; the source keeps only a tombstone.
    assert host.run(["test", "-b", device], check=False).returncode == 0
    ctrls = guest_json(host, f"""
import json
from csi.nvme_host import SysfsNvmeHost
print(json.dumps([(c.address, c.state) for c in SysfsNvmeHost().controllers({pub.nqn!r})]))
""")
    assert [addr.split(",")[0] for addr, _ in ctrls] == [f"traddr={ips[dst.node]}"], ctrls
    held = b.call("GetVolume", pb.GetVolumeRequest(volume_id=vid))
    assert held.placement == pb.PLACEMENT_HELD and list(held.volume.published_hosts) == [host_nqn]
    assert src.lab.run(["ls", "/sys/kernel/config/nvmet/subsystems"]).stdout.split().count(pub.nqn) == 0
    assert src.lab.run(["zfs", "list", f"{POOL}/zvolt/v/{vid}"], check=False).returncode != 0

    # Let go: the host disconnects, the target unpublishes and deletes.
    guest_json(host, f"""
import json
from csi.nvme_host import SysfsNvmeHost
nvme = SysfsNvmeHost()
for c in nvme.controllers({pub.nqn!r}):
    nvme.disconnect(c.name)
print(json.dumps(True))
""")
    b.call("UnpublishVolume", pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=host_nqn))
    b.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))
