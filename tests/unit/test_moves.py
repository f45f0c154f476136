"""Moving a volume between two agents on fakes: the protocol, its refusals and each crash point.

Two FakeNodes with their own FakeZfs (two machines); the stream crosses a real localhost TCP
socket through each source's move port (agent/moves.py SendServer), driven by csi/moves.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest

from agent.fakes import Crash, FakeNode, make_node
from agent.moves import SendServer, tls_contexts
from agent.records import MOVED_TO, MOVING_TO
from agent.volumes import VolumeSpec
from csi import moves as orchestrator
from tests.unit.directagent import Direct
from zvolt import names
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb

MiB = 1 << 20
HOST = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001"


@dataclass
class Side:
    node: FakeNode
    state: str
    server: SendServer

    @property
    def client(self) -> Direct:
        return Direct(self.node)

    def restart(self) -> None:
        """kill -9 and start again: same ZFS and configfs, a new process (index reopened, recovery run)."""
        self.server.close()
        self.node = self.node.restart(self.state)
        self.server = SendServer(self.node.moves, "127.0.0.1:0")
        self.server.start()


@pytest.fixture
def pair(tmp_path: Any) -> Iterator[tuple[Side, Side]]:
    sides = []
    for name, pool in (("storage-a", "tanka"), ("storage-b", "tankb")):
        state = str(tmp_path / name / "state")
        node = make_node(state, str(tmp_path / name / "configfs"), node=name, pool=pool)
        server = SendServer(node.moves, "127.0.0.1:0")
        server.start()
        sides.append(Side(node, state, server))
    yield sides[0], sides[1]
    for side in sides:
        side.server.close()


def volume_with_snapshots(a: Side) -> tuple[str, list[str]]:
    vol = a.node.volumes.create_volume(VolumeSpec(name="pvc-move", size=64 * MiB))
    snaps = [a.node.volumes.create_snapshot(f"snap-{i}", vol.id).id for i in range(2)]
    a.node.zfs.ds[vol.dataset].props["content"] = "written after the snapshots"
    return vol.id, snaps


def place(side: Side, vid: str) -> Any:
    return side.client.call("GetVolume", pb.GetVolumeRequest(volume_id=vid))


def assert_moved(a: Side, b: Side, vid: str, snaps: list[str]) -> None:
    got = place(b, vid)
    assert got.placement == pb.PLACEMENT_HELD and got.home_node == "storage-a"
    assert got.volume.nqn == names.subsystem_nqn("storage-a", vid)
    assert got.volume.size_bytes == 64 * MiB and got.volume.name == "pvc-move"
    listed = b.node.volumes.list_snapshots(0, "", source_volume=vid)[0]
    assert sorted(s.id for s in listed) == sorted(snaps)
    ds = b.node.volumes.layout.volume(vid)
    assert b.node.zfs.ds[ds].props["content"] == "written after the snapshots"
    assert b.node.zfs.ds[ds].props["readonly"] == "off"
    assert not [s for s in b.node.zfs.snapshots_of(ds) if "@zmv" in s]  # move snapshots cleaned up
    gone = place(a, vid)
    assert gone.placement == pb.PLACEMENT_MOVED and gone.moved_to == "storage-b"
    assert not [n for n in a.node.zfs.ds if vid in n]  # the source's copy is destroyed
    assert a.node.index.volume(vid) is None and not a.node.index.snapshots(volume_id=vid)


def test_move_carries_the_volume_its_snapshots_and_its_nqn(pair: tuple[Side, Side]) -> None:
    a, b = pair
    vid, snaps = volume_with_snapshots(a)
    ds = a.node.volumes.layout.volume(vid)
    result = orchestrator.move(a.client, b.client, vid)
    assert result.home == "storage-a" and result.streams == 1 and result.bytes > 0  # frozen at once: offline
    assert_moved(a, b, vid, snaps)
    # Offline, the start of the move and the freeze are one `zfs set` (one sync task, one process).
    assert [c for c in a.node.zfs.calls if c.startswith(f"set {ds} ")] == [
        f"set {ds} readonly,{MOVING_TO}", f"set {ds} {MOVED_TO}"]
    # Served by the target under the NQN the source gave it; the repeat of a finished move is a no-op.
    assert b.node.volumes.publish(vid, HOST) == names.subsystem_nqn("storage-a", vid)
    again = orchestrator.move(a.client, b.client, vid)
    assert again.bytes == 0 and again.streams == 0
    # The move survives a restart of both, and the target's index is rebuilt from ZFS with its home.
    a.restart()
    b.restart()
    assert place(b, vid).home_node == "storage-a" and place(a, vid).moved_to == "storage-b"
    assert b.node.volumes.exports.nqn(vid) == names.subsystem_nqn("storage-a", vid)


def test_commit_is_refused_until_the_final_stream_arrived(pair: tuple[Side, Side]) -> None:
    a, b = pair
    vid, _ = volume_with_snapshots(a)
    plan = a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b"))
    b.client.call("ReceiveMove", pb.ReceiveMoveRequest(
        volume_id=vid, home_node=plan.home_node, source_node="storage-a", address=plan.address, token=plan.token,
        snapshot=plan.snapshot))
    assert place(b, vid).placement == pb.PLACEMENT_INCOMING and not place(b, vid).move_final
    with pytest.raises(ZvoltError) as err:
        b.client.call("CommitMove", pb.CommitMoveRequest(volume_id=vid, source_node="storage-a"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "final stream" in err.value.message
    assert b.node.index.volume(vid) is None  # not servable: a publish finds nothing
    with pytest.raises(ZvoltError):
        b.node.volumes.publish(vid, HOST)
    assert place(a, vid).placement == pb.PLACEMENT_MOVING


def test_a_token_is_one_time_and_bound_to_its_stream(pair: tuple[Side, Side]) -> None:
    a, b = pair
    vid, _ = volume_with_snapshots(a)
    plan = a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b"))

    def receive(token: str) -> Any:
        return b.client.call("ReceiveMove", pb.ReceiveMoveRequest(
            volume_id=vid, home_node="storage-a", source_node="storage-a", address=plan.address, token=token,
            snapshot=plan.snapshot))

    with pytest.raises(ZvoltError) as err:
        receive("not-the-token")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "token" in err.value.message
    assert receive(plan.token).bytes > 0
    b.client.call("AbortMove", pb.AbortMoveRequest(volume_id=vid, role=pb.MOVE_ROLE_TARGET))
    with pytest.raises(ZvoltError) as err:
        receive(plan.token)  # used once already
    assert "token" in err.value.message


def test_published_volumes_and_branch_families_are_refused_naming_what_blocks(pair: tuple[Side, Side]) -> None:
    a, b = pair
    vid, snaps = volume_with_snapshots(a)
    a.node.volumes.publish(vid, HOST)
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and HOST in err.value.message
    a.node.volumes.unpublish(vid, HOST)
    clone = a.node.volumes.create_volume(VolumeSpec(name="pvc-branch", size=64 * MiB, source_snapshot=snaps[0]))
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and clone.id in err.value.message
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, clone.id)
    assert "is a clone of" in err.value.message
    assert a.node.index.move(vid) is None and a.node.index.move(clone.id) is None  # nothing started


def test_a_moving_volume_is_not_published_snapshotted_grown_or_deleted(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    vid, _ = volume_with_snapshots(a)
    a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b"))
    v = a.node.volumes
    for attempt in (lambda: v.publish(vid, HOST), lambda: v.create_snapshot("late", vid),
                    lambda: v.expand_volume(vid, 128 * MiB), lambda: v.delete_volume(vid)):
        with pytest.raises(ZvoltError) as err:
            attempt()
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "storage-b" in err.value.message


def test_abort_before_the_commit_leaves_one_writable_copy_and_after_it_is_refused(pair: tuple[Side, Side]) -> None:
    a, b = pair
    vid, snaps = volume_with_snapshots(a)
    for final in (False, True):
        base = place(b, vid).move_snapshot if final else ""
        plan = a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b",
                                                            base_snapshot=base, final=final))
        b.client.call("ReceiveMove", pb.ReceiveMoveRequest(
            volume_id=vid, home_node="storage-a", source_node="storage-a", address=plan.address, token=plan.token,
            snapshot=plan.snapshot, base_snapshot=plan.base_snapshot))
    ds = a.node.volumes.layout.volume(vid)
    assert a.node.zfs.ds[ds].props["readonly"] == "on"  # frozen for the final stream
    orchestrator.abort(a.client, b.client, vid)
    assert not [n for n in b.node.zfs.ds if vid in n]
    assert a.node.zfs.ds[ds].props["readonly"] == "off" and place(a, vid).placement == pb.PLACEMENT_HELD
    assert not [s for s in a.node.zfs.snapshots_of(ds) if "@zmv" in s]
    a.node.volumes.publish(vid, HOST)  # usable again
    a.node.volumes.unpublish(vid, HOST)
    orchestrator.move(a.client, b.client, vid)  # and movable again
    assert_moved(a, b, vid, snaps)
    with pytest.raises(ZvoltError) as err:
        orchestrator.abort(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "committed" in err.value.message


# Each point where an agent can die during a move, as FakeZfs operations on one side: the move
# is called, dies there, that agent restarts (recovery runs), and the retry must converge.
CRASHES = [
    ("source", "set_props", "before"),  # starting: MOVING_TO
    ("source", "set_props", "after"),
    ("source", "snapshot", "after"),  # the move snapshot, after the freeze
    ("source", "send", "before"),  # mid-stream: the target receives a cut stream
    ("target", "receive", "before"),
    ("target", "receive", "after"),  # received, the RPC never answered
    ("target", "set_props", "before"),  # the commit
    ("target", "set_props", "after"),  # committed, index not yet written
    ("source", "destroy", "before"),  # finish: tombstone written, data not yet gone
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the stream thread "dies"
@pytest.mark.parametrize("side,op,when", CRASHES, ids=[f"{s}-{o}-{w}" for s, o, w in CRASHES])
def test_a_crash_at_any_step_converges_on_retry(pair: tuple[Side, Side], side: str, op: str, when: str) -> None:
    a, b = pair
    vid, snaps = volume_with_snapshots(a)
    victim = a if side == "source" else b
    victim.node.zfs.crash_at = (op, when)
    with pytest.raises((Crash, ZvoltError)):
        orchestrator.move(a.client, b.client, vid)
    assert victim.node.zfs.crash_at is None, "the crash point was never reached"
    victim.restart()
    # Never two writable copies, whatever was reached: either the source holds it or the target does.
    ds_a, ds_b = a.node.volumes.layout.volume(vid), b.node.volumes.layout.volume(vid)
    writable = [n for n, z, ds in (("a", a.node.zfs, ds_a), ("b", b.node.zfs, ds_b))
                if ds in z.ds and z.ds[ds].props.get("readonly", "off") == "off"
                and z.ds[ds].props.get("zvolt:state", "held") != "incoming" and "zvolt:moved-to" not in z.ds[ds].props]
    assert len(writable) <= 1, writable
    orchestrator.move(a.client, b.client, vid)
    assert_moved(a, b, vid, snaps)


def test_nodes_sharing_a_configfs_never_prune_each_others_subsystems(tmp_path: Any) -> None:
    """As in the lab (two agents, one kernel): the moved volume's subsystem is the target's."""
    cfs = str(tmp_path / "configfs")
    sides = []
    for name, pool in (("storage-a", "tanka"), ("storage-b", "tankb")):
        state = str(tmp_path / name)
        node = make_node(state, cfs, node=name, pool=pool)
        server = SendServer(node.moves, "127.0.0.1:0")
        server.start()
        sides.append(Side(node, state, server))
    a, b = sides
    try:
        vid, _ = volume_with_snapshots(a)
        stay = a.node.volumes.create_volume(VolumeSpec(name="pvc-stays", size=64 * MiB))
        a.node.volumes.publish(stay.id, HOST)
        orchestrator.move(a.client, b.client, vid)
        b.node.volumes.publish(vid, HOST)
        nqn = names.subsystem_nqn("storage-a", vid)
        a.restart()
        assert os.path.isdir(os.path.join(cfs, "subsystems", nqn)), "the source pruned the target's export"
        b.restart()
        assert os.path.isdir(os.path.join(cfs, "subsystems", nqn))
        assert place(b, vid).volume.condition == pb.VOLUME_CONDITION_HEALTHY
        assert b.node.volumes.exports.exported_ids() == {vid}
        assert a.node.volumes.exports.exported_ids() == {stay.id}
        b.node.volumes.unpublish(vid, HOST)
        assert not os.path.isdir(os.path.join(cfs, "subsystems", nqn))
    finally:
        for side in sides:
            side.server.close()


def _pki(d: Any, name: str) -> tuple[str, str, str]:
    """A CA and a serving certificate it signed (openssl CLI): (cert, key, ca)."""
    os.makedirs(d, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", f"/CN={name}-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "agent.key", "-out", "agent.csr", "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", "agent.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "agent.pem", "-days", "1")
    return f"{d}/agent.pem", f"{d}/agent.key", f"{d}/ca.pem"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certs")
def test_the_stream_goes_over_tls_checked_against_the_ca_without_a_client_cert(pair: tuple[Side, Side],
                                                                                 tmp_path: Any) -> None:
    a, b = pair
    cert, key, ca = _pki(tmp_path / "pki", "storage-a")
    a.node.moves.tls_server, _ = tls_contexts(cert, key, ca)
    _, b.node.moves.tls_client = tls_contexts(cert, key, ca)  # the target has the CA, no client cert
    vid, snaps = volume_with_snapshots(a)
    other = _pki(tmp_path / "other", "elsewhere")
    _, stranger = tls_contexts(*other)
    b.node.moves.tls_client = stranger  # a CA that did not sign the source's certificate
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "TLS" in err.value.message
    _, b.node.moves.tls_client = tls_contexts(cert, key, ca)
    result = orchestrator.move(a.client, b.client, vid)
    assert result.bytes > 0
    assert_moved(a, b, vid, snaps)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_of_the_source_at_its_tombstone_converges(pair: tuple[Side, Side], when: str) -> None:
    """The finish's one `zfs set` (MOVED_TO): before it the source is frozen, after it a restart
    reads the tombstone back from ZFS alone, the snapshot rows included."""
    a, b = pair
    vid, snaps = volume_with_snapshots(a)
    b.node.zfs.crash_at = ("set_props", "after")  # stop the first move right after the target's commit
    with pytest.raises(Crash):
        orchestrator.move(a.client, b.client, vid)
    b.restart()
    a.node.zfs.crash_at = ("set_props", when)
    with pytest.raises(Crash):
        orchestrator.move(a.client, b.client, vid)
    a.restart()
    if when == "after":
        assert place(a, vid).placement == pb.PLACEMENT_MOVED and not a.node.index.snapshots(volume_id=vid)
    else:
        assert place(a, vid).placement == pb.PLACEMENT_MOVING
    orchestrator.move(a.client, b.client, vid)
    assert_moved(a, b, vid, snaps)


def test_a_full_stream_cut_after_its_first_snapshots_starts_again(pair: tuple[Side, Side]) -> None:
    """`zfs send -R` sends snapshot after snapshot: a cut can leave the CSI snapshots received and
    no move snapshot (seen in the lab). The retry replaces that partial incoming copy."""
    a, b = pair
    vid, snaps = volume_with_snapshots(a)
    b.node.zfs.crash_at = ("receive", "after")
    with pytest.raises(Crash):
        orchestrator.move(a.client, b.client, vid)
    ds = b.node.volumes.layout.volume(vid)
    for name in [n for n in b.node.zfs.ds if n.startswith(ds + "@zmv")]:
        del b.node.zfs.ds[name]  # as if the stream had ended before its last snapshot
    b.restart()
    assert place(b, vid).placement == pb.PLACEMENT_INCOMING and not place(b, vid).move_snapshot
    orchestrator.move(a.client, b.client, vid)
    assert_moved(a, b, vid, snaps)


def test_a_stream_the_network_cuts_is_unavailable_and_the_retry_converges(pair: tuple[Side, Side],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut link ends the target's read with a socket error (ETIMEDOUT once keepalive gives up),
    and `zfs receive` then fails on the incomplete stream. That is the network, not ZFS: the move
    answers UNAVAILABLE (retryable) and says the source still holds the volume. (Lab:
    tests/lab/test_move_lab.py cuts the real link.)"""
    from agent import moves as agent_moves

    a, b = pair
    vid, snaps = volume_with_snapshots(a)

    def cut_after_first_read(sock_fd: int, pipe_fd: int) -> Any:
        reads: list[int] = []

        def once(view: memoryview) -> int:
            if reads:
                raise TimeoutError(110, "Connection timed out")
            reads.append(1)
            return -os.splice(sock_fd, pipe_fd, 16)  # the first 16 bytes: an incomplete stream
        return once

    monkeypatch.setattr(agent_moves, "_spliced", cut_after_first_read)
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
    assert "Connection timed out" in err.value.message and "incomplete stream" in err.value.message
    assert "source still holds the volume" in err.value.message
    assert place(a, vid).placement == pb.PLACEMENT_MOVING
    monkeypatch.undo()
    orchestrator.move(a.client, b.client, vid)
    assert_moved(a, b, vid, snaps)


def _untouched(a: Side, b: Side, vid: str) -> None:
    here = place(a, vid)
    assert here.placement == pb.PLACEMENT_HELD and not here.moving_to
    assert not [s for s in a.node.zfs.snapshots_of(a.node.volumes.layout.volume(vid)) if "@zmv" in s]
    assert not [n for n in b.node.zfs.ds if vid in n]


def test_a_target_without_the_space_is_refused_before_anything_changes(tmp_path: Any) -> None:
    a_node = make_node(str(tmp_path / "a"), str(tmp_path / "a-cfs"), node="storage-a", pool="tanka")
    b_node = make_node(str(tmp_path / "b"), str(tmp_path / "b-cfs"), node="storage-b", pool="tankb",
                       pool_size=256 * MiB)
    a, b = (Side(n, str(tmp_path / n.volumes.cfg.node), SendServer(n.moves, "127.0.0.1:0")) for n in (a_node, b_node))
    for side in (a, b):
        side.server.start()
    try:
        vid, _ = volume_with_snapshots(a)
        a.node.zfs.ds[a.node.volumes.layout.volume(vid)].props["used"] = str(300 * MiB)  # written data
        with pytest.raises(ZvoltError) as err:
            orchestrator.move(a.client, b.client, vid)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"takes {300 * MiB} bytes" in err.value.message and "storage node storage-b has" in err.value.message
        assert "Nothing was changed" in err.value.message
        _untouched(a, b, vid)  # not even started: the volume may be published and written as before
        b.node.zfs.pool_size = 1 << 40  # space freed on the target: the same call goes through
        b.node.volumes.refresh_space()  # (the agent does so every 15 s)
        assert orchestrator.move(a.client, b.client, vid).streams == 1
        assert place(b, vid).placement == pb.PLACEMENT_HELD
    finally:
        for side in (a, b):
            side.server.close()


def test_a_cordoned_or_overcommitted_target_is_refused_before_anything_changes(pair: tuple[Side, Side]) -> None:
    a, b = pair
    vid, _ = volume_with_snapshots(a)
    b.client.call("SetCordon", pb.SetCordonRequest(cordoned=True, reason="kernel upgrade"))
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "cordoned (kernel upgrade)" in err.value.message
    _untouched(a, b, vid)
    b.client.call("SetCordon", pb.SetCordonRequest(cordoned=False))
    # Promises on the target up to its commitment limit: the volume's 64 MiB do not fit under it.
    cap = b.client.call("GetCapacity", pb.GetCapacityRequest())
    ratio = (cap.committed_bytes + 32 * MiB) / cap.total_bytes
    b.node.volumes.cfg = replace(b.node.volumes.cfg, commitment_ratio=ratio)
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "commitment limit" in err.value.message
    assert f"volume {vid} ({64 * MiB} bytes)" in err.value.message
    _untouched(a, b, vid)
