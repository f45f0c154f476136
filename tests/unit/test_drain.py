"""Drain, rebalance and the cordon against real agent servicers on their fakes (each its own
FakeZfs: three machines), moving over real localhost streams (csi/drain.py, agent/cordon.py);
and `kubectl zvolt drain-storage|uncordon-storage|rebalance` through the real zvolt-csi entry
point against agents served over gRPC."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.fakes import FakeNode, make_node
from agent.keystore import KeyStore
from agent.metrics import Metrics
from agent.moves import SendServer, _Pump
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from csi import drain
from kubectl_zvolt import cli
from tests.unit.directagent import Direct
from tests.unit.kubectlfakes import FakeKube, InProcess
from zvolt.errors import ZvoltError, unavailable
from zvolt.pb import agent_pb2 as pb

MiB = 1 << 20
KEY = bytes(range(32))
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
NAMES = ("storage-a", "storage-b", "storage-c")


class Agent(Direct):
    """An in-process agent client with a zone, whose calls a test may watch or break."""

    def __init__(self, node: FakeNode, hook: Callable[[str, str, Any], None] | None = None) -> None:
        super().__init__(node)
        self.zone = "default"
        self.hook = hook
        self.calls: list[tuple[str, str]] = []  # (method, volume id)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        vid = getattr(request, "volume_id", "")
        self.calls.append((method, vid))
        if self.hook is not None:
            self.hook(self.name, method, request)
        got = super().call(method, request, timeout)
        if self.hook is not None:
            self.hook(self.name, method + ":done", request)
        return got


@dataclass
class Pool:
    agents: dict[str, Agent] = field(default_factory=dict)

    def find(self, name: str) -> Agent | None:
        return self.agents.get(name)

    def all(self) -> list[Agent]:
        return list(self.agents.values())


@dataclass
class Cluster:
    nodes: dict[str, FakeNode]
    pool: Pool
    lines: list[str]

    def agents(self, hook: Callable[[str, str, Any], None] | None = None) -> Pool:
        """Fresh clients (a new controller process), all calling `hook`."""
        self.pool = Pool({n: Agent(node, hook) for n, node in self.nodes.items()})
        return self.pool

    def say(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes: dict[str, FakeNode] = {}
    servers = []
    for name in NAMES:
        store = KeyStore(str(tmp_path / name / "keys"), os.urandom(32))
        node = make_node(str(tmp_path / name / "state"), str(tmp_path / name / "configfs"), node=name,
                         pool=name.replace("storage-", "tank"), pool_size=100 << 30, keystore=store)
        server = SendServer(node.moves, "127.0.0.1:0")
        server.start()
        servers.append(server)
        nodes[name] = node
    c = Cluster(nodes, Pool(), [])
    c.agents()
    yield c
    for s in servers:
        s.close()


@dataclass
class Setup:
    idle: list[str]  # local ids, smallest first
    published: str
    clone_source: str
    clone: str
    encrypted: str


def populate(a: FakeNode) -> Setup:
    v = a.volumes
    idle = [v.create_volume(VolumeSpec(name=f"pvc-idle-{s}", size=s * MiB)).id for s in (32, 64, 128)]
    v.create_snapshot("snap-idle", idle[1])  # snapshots go with their volume
    pub = v.create_volume(VolumeSpec(name="pvc-pub", size=16 * MiB)).id
    v.publish(pub, HOST)
    src = v.create_volume(VolumeSpec(name="pvc-src", size=16 * MiB)).id
    snap = v.create_snapshot("snap-src", src)
    clone = v.create_volume(VolumeSpec(name="pvc-branch", size=16 * MiB, source_snapshot=snap.id)).id
    enc = v.create_volume(VolumeSpec(name="pvc-enc", size=16 * MiB, encryption_key=KEY)).id
    return Setup(idle, pub, src, clone, enc)


def holder(c: Cluster, vid: str) -> list[str]:
    return [n for n, node in c.nodes.items() if node.index.volume(vid) is not None]


# -- drain ------------------------------------------------------------------------------------


def test_drain_cordons_plans_first_moves_the_idle_ones_and_names_what_blocks_the_rest(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["storage-a"]
    s = populate(a)
    code = drain.drain(c.pool, "storage-a", parallel=2, say=c.say)
    text = "\n".join(c.lines)
    assert code == 1, text  # blocked volumes are left on the node
    assert c.lines[0].startswith("storage node storage-a is cordoned (drain)")
    assert c.lines[1] == "plan: 3 to move, 4 blocked"
    assert [ln.split()[1] for ln in c.lines[2:5]] == [f"storage-a/{vid}" for vid in s.idle], "smallest first"
    first_move = next(i for i, ln in enumerate(c.lines) if ": moving (" in ln)
    assert first_move > 8, "the whole plan prints before anything moves"
    blocked = {ln.split()[1].rstrip(":"): ln for ln in c.lines[5:9]}
    assert drain.ATTACHED in blocked[f"storage-a/{s.published}"]
    assert f"published to {HOST}" in blocked[f"storage-a/{s.published}"]
    assert f"clones of its snapshots exist: {s.clone}" in blocked[f"storage-a/{s.clone_source}"]
    assert f"it is a clone of {s.clone_source}@" in blocked[f"storage-a/{s.clone}"]
    assert "it is encrypted" in blocked[f"storage-a/{s.encrypted}"]
    for vid in s.idle:
        assert len(holder(c, vid)) == 1 and holder(c, vid)[0] != "storage-a", vid
        assert a.index.move(vid) is not None and a.index.move(vid).state == "moved"  # type: ignore[union-attr]
        assert sum(": moved to storage-" in ln and vid in ln for ln in c.lines) == 1
    moved_with = c.nodes[holder(c, s.idle[1])[0]]
    assert [x.name for x in moved_with.index.snapshots(volume_id=s.idle[1])] == ["snap-idle"]
    for vid in (s.published, s.clone_source, s.clone, s.encrypted):
        assert holder(c, vid) == ["storage-a"] and a.index.move(vid) is None, "blocked ones are untouched"
    assert a.index.volume(s.published).hosts == [HOST]  # type: ignore[union-attr]
    summary = next(ln for ln in c.lines if ln.startswith("drain of storage-a: "))
    assert summary.startswith("drain of storage-a: 3 moved, ") and summary.endswith("; 4 blocked; 0 failed")
    assert c.lines[-1].startswith("storage node storage-a still holds volumes; it stays cordoned")
    # No new volume lands on it: the agent refuses, and placement's view says cordoned.
    with pytest.raises(ZvoltError) as err:
        a.volumes.create_volume(VolumeSpec(name="pvc-new", size=16 * MiB))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "uncordon-storage storage-a" in err.value.message
    assert drain.capacities(c.pool)["storage-a"].cordoned


def test_an_empty_node_drains_to_exit_0_and_a_dry_run_changes_nothing(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["storage-a"]
    vids = [a.volumes.create_volume(VolumeSpec(name=f"pvc-{i}", size=16 * MiB)).id for i in range(2)]
    assert drain.drain(c.pool, "storage-a", dry_run=True, say=c.say) == 0
    assert c.lines[0].startswith("dry run") and c.lines[1] == "plan: 2 to move, 0 blocked"
    assert not drain.capacities(c.pool)["storage-a"].cordoned
    assert all(holder(c, v) == ["storage-a"] for v in vids)
    assert not [m for agent in c.pool.all() for m, _ in agent.calls if m == "SetCordon"], "dry run: no cordon"
    asked = _requests(c)
    assert [m for m, _ in asked] == ["CheckMoves"], "dry run: one check of the page, no SendMove"
    assert sorted(asked[0][1].volume_ids) == sorted(vids)
    c.lines.clear()
    assert drain.drain(c.pool, "storage-a", say=c.say) == 0
    assert c.lines[-1] == "storage node storage-a holds no volumes; it stays cordoned"


def _requests(c: Cluster) -> list[tuple[str, Any]]:
    """What a dry run asks of the agents besides reading listings and capacity."""
    seen: list[tuple[str, Any]] = []

    def hook(node: str, method: str, request: Any) -> None:
        if not method.endswith(":done") and method not in ("ListVolumes", "GetCapacity"):
            seen.append((method, request))

    c.agents(hook)
    drain.drain(c.pool, "storage-a", dry_run=True, say=lambda _: None)
    return seen


class Killed(BaseException):
    """The controller process dying (not an error a move would catch)."""


def test_a_rerun_after_a_failed_move_carries_on_and_moves_nothing_twice(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["storage-a"]
    vids = [a.volumes.create_volume(VolumeSpec(name=f"pvc-{i}", size=(i + 1) * 16 * MiB)).id for i in range(3)]
    broken = {vids[0]}

    def failing_commit(node: str, method: str, request: Any) -> None:
        if method == "CommitMove" and request.volume_id in broken:
            broken.clear()
            raise unavailable("injected: target down at the commit")

    c.agents(failing_commit)
    assert drain.drain(c.pool, "storage-a", parallel=1, say=c.say) == 1
    assert f"  failed storage-a/{vids[0]}: injected: target down at the commit (rerun to carry on)" in c.lines
    assert a.index.move(vids[0]).state == "moving"  # type: ignore[union-attr]
    c.agents()
    c.lines.clear()
    # The others moved in the first run and are not listed again; vids[0] goes on from where it
    # stopped: the target holds its final stream, so no stream is sent again, only the commit.
    assert drain.drain(c.pool, "storage-a", say=c.say) == 0, c.lines
    assert c.lines[1] == "plan: 1 to move, 0 blocked" and "(a move under way goes on)" in c.lines[2]
    calls = [(m, v) for agent in c.pool.all() for m, v in agent.calls if m != "GetCapacity"]
    assert ("ReceiveMove", vids[0]) not in calls and ("CommitMove", vids[0]) in calls
    assert not [v for _, v in calls if v in vids[1:]], "what moved is a tombstone: not listed, not asked about"
    for vid in vids:
        assert len(holder(c, vid)) == 1 and holder(c, vid) != ["storage-a"]


def test_a_controller_killed_mid_drain_is_carried_on_by_a_rerun(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["storage-a"]
    vids = [a.volumes.create_volume(VolumeSpec(name=f"pvc-{i}", size=(i + 1) * 16 * MiB)).id for i in range(3)]
    dead = threading.Event()

    def kill_after_stream(node: str, method: str, request: Any) -> None:
        # Dead after the second volume's stream arrived: no call of this controller goes out any more.
        if dead.is_set() or (method == "ReceiveMove:done" and request.volume_id == vids[1]):
            dead.set()
            raise Killed()

    c.agents(kill_after_stream)
    with pytest.raises(Killed):
        drain.drain(c.pool, "storage-a", parallel=1, say=c.say)
    assert holder(c, vids[0]) != ["storage-a"], "the first had moved"
    assert a.index.move(vids[1]).state == "moving" and holder(c, vids[2]) == ["storage-a"]  # type: ignore[union-attr]
    c.agents()
    c.lines.clear()
    assert drain.drain(c.pool, "storage-a", parallel=1, say=c.say) == 0, c.lines
    assert c.lines[1] == "plan: 2 to move, 0 blocked"
    moved_again = [v for agent in c.pool.all() for m, v in agent.calls if m == "ReceiveMove"]
    assert vids[0] not in moved_again, "what moved is a tombstone: not listed, not moved again"
    assert vids[1] not in moved_again, "the stream that arrived is not sent again"
    assert all(len(holder(c, v)) == 1 and holder(c, v) != ["storage-a"] for v in vids)


def test_at_most_parallel_moves_at_once_and_a_line_while_a_stream_runs(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["storage-a"]
    for i in range(5):
        a.volumes.create_volume(VolumeSpec(name=f"pvc-{i}", size=16 * MiB))
    mu = threading.Lock()
    running = [0]
    most = [0]
    rates: list[int] = []

    def slow_stream(node: str, method: str, request: Any) -> None:
        if method == "ReceiveMove":
            rates.append(request.max_bytes_per_second)
            with mu:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.3)
        elif method == "ReceiveMove:done":
            with mu:
                running[0] -= 1

    c.agents(slow_stream)
    assert drain.drain(c.pool, "storage-a", parallel=2, say=c.say, rate=3 * MiB, heartbeat=0.1) == 0
    assert most[0] == 2
    assert rates == [3 * MiB] * 5, "the rate limit reaches each target's receive"
    assert any(": still streaming to storage-" in ln and "s so far)" in ln for ln in c.lines), c.lines


# -- the cordon on the agent ------------------------------------------------------------------


def test_the_cordon_is_kept_in_zfs_through_a_restart_and_an_index_rebuild(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.nodes["storage-a"]
    agent = Agent(a)
    kept = a.volumes.create_volume(VolumeSpec(name="pvc-kept", size=16 * MiB))
    snap = a.volumes.create_snapshot("snap-kept", kept.id)
    got = agent.call("SetCordon", pb.SetCordonRequest(cordoned=True, reason="kernel upgrade"))
    assert (got.cordoned, got.reason) == (True, "kernel upgrade")
    assert agent.call("SetCordon", pb.SetCordonRequest(cordoned=True, reason="kernel upgrade")).cordoned  # a repeat
    # A new agent over the same ZFS with an empty state dir: the index is rebuilt from ZFS.
    again = Agent(a.restart(str(tmp_path / "fresh-state")))
    cap = again.call("GetCapacity", pb.GetCapacityRequest())
    assert (cap.cordoned, cap.cordon_reason) == (True, "kernel upgrade")
    v = again.servicer.v
    with pytest.raises(ZvoltError, match="is cordoned \\(kernel upgrade\\)"):
        v.create_volume(VolumeSpec(name="pvc-new", size=16 * MiB))
    assert v.create_volume(VolumeSpec(name="pvc-kept", size=16 * MiB)).id == kept.id, "a retry still finds it"
    assert v.create_volume(VolumeSpec(name="pvc-branch", size=16 * MiB, source_snapshot=snap.id)), \
        "a clone must live by its source: allowed"
    with pytest.raises(ZvoltError, match="is cordoned") as err:  # a move in places a volume too
        again.call("ReceiveMove", pb.ReceiveMoveRequest(
            volume_id="vincoming", home_node="storage-b", source_node="storage-b", address="127.0.0.1:1",
            token="t", snapshot="zmv000001"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not again.call("SetCordon", pb.SetCordonRequest(cordoned=False)).cordoned
    assert not again.call("GetCapacity", pb.GetCapacityRequest()).cordoned
    assert v.create_volume(VolumeSpec(name="pvc-new", size=16 * MiB))


def test_check_moves_reads_a_page_in_one_get_changes_nothing_and_says_what_blocks_each(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    a = cluster.nodes["storage-a"]
    agent = Agent(a)
    s = populate(a)
    gets: list[int] = []

    def get_props_many(names: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]:
        gets.append(len(names))  # batched as LibZfs does: one `zfs get` per call
        found = {n: a.zfs.get_props(n, props) for n in names}
        return {n: got for n, got in found.items() if got is not None}

    monkeypatch.setattr(a.zfs, "get_props_many", get_props_many, raising=False)
    agent.call("SendMove", pb.SendMoveRequest(volume_id=s.idle[0], target_node="storage-b"))
    before = dict(a.zfs.ds)
    asked = [*s.idle, s.published, s.clone_source, s.clone, s.encrypted, "pvc-gone"]
    got = agent.call("CheckMoves", pb.CheckMovesRequest(volume_ids=asked)).checks
    assert [c.volume_id for c in got] == asked, "one answer per volume, in the order asked"
    by = {c.volume_id: c for c in got}
    assert by[s.idle[0]].moving_to == "storage-b" and not by[s.idle[0]].blocked, "a move under way carries on"
    assert all(not by[v].blocked and not by[v].moving_to and not by[v].missing for v in s.idle[1:])
    assert f"published to {HOST}" in by[s.published].blocked
    assert f"clones of its snapshots exist: {s.clone}" in by[s.clone_source].blocked
    assert f"it is a clone of {s.clone_source}@" in by[s.clone].blocked
    assert "it is encrypted" in by[s.encrypted].blocked
    assert by["pvc-gone"].missing
    assert gets == [5], "the unpublished volumes not moving: one read of them all"
    assert dict(a.zfs.ds).keys() == before.keys() and a.index.move(s.idle[1]) is None, "nothing changes"
    with pytest.raises(ZvoltError) as err:
        agent.call("CheckMoves", pb.CheckMovesRequest(volume_ids=["v"] * 1001))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000" in err.value.message


def test_the_receive_pump_keeps_to_its_rate() -> None:
    chunks = [64 * 1024] * 8  # 512 KiB

    def timed(rate: int) -> float:
        left = list(chunks)

        def recv(buf: memoryview) -> int:
            return -left.pop() if left else 0  # spliced: "already in the pipe"

        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        pump = _Pump(recv, write_fd, "test", rate)
        pump.run()
        os.close(read_fd)
        assert pump.total == sum(chunks)
        return time.monotonic() - start

    assert timed(0) < 0.2
    assert 0.45 <= timed(1 * MiB) < 1.5  # 512 KiB at 1 MiB/s


# -- rebalance --------------------------------------------------------------------------------


def test_rebalance_moves_from_the_most_to_the_least_committed(cluster: Cluster) -> None:
    c = cluster
    a = c.nodes["storage-a"]
    for i in range(6):
        a.volumes.create_volume(VolumeSpec(name=f"pvc-{i}", size=1024 * MiB))
    assert drain.rebalance_run(c.pool, dry_run=True, say=c.say) == 0
    assert c.lines[0] == "rebalance plan: 4 move(s)" and "storage-a: committed 6.0% -> 2.0%" in c.lines[1], c.lines
    assert len(a.index.volumes()) == 6, "dry run: nothing moved"
    c.lines.clear()
    assert drain.rebalance_run(c.pool, say=c.say) == 0, c.lines
    counts = {n: len(node.index.volumes()) for n, node in c.nodes.items()}
    assert counts == {"storage-a": 2, "storage-b": 2, "storage-c": 2}
    assert c.lines[-1].startswith("rebalance: 4 moved, ")


# -- kubectl ----------------------------------------------------------------------------------


@pytest.fixture
def served(cluster: Cluster) -> Iterator[str]:
    """The cluster's agents over gRPC: the controller's --agents."""
    servers, agents = [], []
    for name, node in cluster.nodes.items():
        metrics = Metrics()
        server = make_server(AgentServicer(node.volumes, node.readiness, metrics, moves=node.moves), metrics,
                             workers=4)
        agents.append(f"{name}=127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
    yield ",".join(agents)
    for s in servers:
        s.stop(None)


def kubectl(agents: str, *argv: str) -> tuple[int, str, list[list[str]]]:
    out, execute = io.StringIO(), InProcess()
    code = cli.run([*argv, "-n", "zvolt"], connect=lambda t: FakeKube(agents),  # type: ignore[arg-type,return-value]
                   execute=execute, out=out)
    return code, out.getvalue(), execute.argvs


def test_kubectl_drain_storage_uncordon_and_rebalance(cluster: Cluster, served: str) -> None:
    a = cluster.nodes["storage-a"]
    vid = a.volumes.create_volume(VolumeSpec(name="pvc-db", size=64 * MiB)).id
    pub = a.volumes.create_volume(VolumeSpec(name="pvc-pub", size=16 * MiB)).id
    a.volumes.publish(pub, HOST)
    code, text, argvs = kubectl(served, "drain-storage", "storage-a", "--parallel", "3", "--rate-limit", "50")
    assert argvs[0][0] == "zvolt-csi" and "--mode=drain" in argvs[0] and "--from=storage-a" in argvs[0]
    assert "--parallel=3" in argvs[0] and "--rate-limit=50" in argvs[0] and "--mode=controller" not in argvs[0]
    assert code == 1, text
    assert "plan: 1 to move, 1 blocked" in text and drain.ATTACHED in text
    assert "drain of storage-a: 1 moved" in text and "the same command carries on" in text
    assert a.index.volume(vid) is None and a.index.volume(pub) is not None
    code, text, argvs = kubectl(served, "uncordon-storage", "storage-a")
    assert (code, text) == (0, "storage node storage-a takes new volumes again\n")
    assert "--storage-node=storage-a" in argvs[0]
    assert a.volumes.create_volume(VolumeSpec(name="pvc-new", size=16 * MiB))
    code, text, argvs = kubectl(served, "rebalance", "--dry-run")
    assert code == 0 and text.startswith("rebalance plan: ") and "--dry-run" in argvs[0]
    code, text, _ = kubectl(served, "drain-storage", "storage-z", "--dry-run")
    assert code == 1 and "storage node storage-z has no known agent" in text
