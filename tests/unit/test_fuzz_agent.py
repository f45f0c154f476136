"""Fuzz the agent's gRPC surface: the real servicer + interceptor on fake ZFS / emulated configfs.

Random and hostile values go into every request field; a call may succeed or fail with a
code the contract names, never INTERNAL/UNKNOWN, never a traceback in the details. At the
end nothing may exist outside the agent's own dataset and configfs groups (no traversal).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_support import HOSTILE, Tally, hostile_text, sizes  # type: ignore[import-not-found]

from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from zvolt.names import id_for_name
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

EXAMPLES = 500
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
GOOD_NAMES = ["fuzz-a", "fuzz-b", "fuzz-c"]
GOOD_IDS = [id_for_name(n) for n in GOOD_NAMES]
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001"


@dataclass
class Served:
    node: FakeNode
    stub: pb_grpc.AgentStub
    tally: Tally
    configfs: str


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    tmp = tempfile.mkdtemp(prefix="zvfuzz", dir="/tmp")
    node = make_node(f"{tmp}/state", f"{tmp}/configfs", pool_size=1 << 44)
    metrics = Metrics()
    server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics, workers=4)
    server.add_insecure_port(f"unix://{tmp}/agent.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix://{tmp}/agent.sock")
    stub = pb_grpc.AgentStub(channel)
    for name in GOOD_NAMES:  # real objects for fuzzed ids to hit
        vol = stub.CreateVolume(pb.CreateVolumeRequest(name=name, size_bytes=1 << 30), timeout=10).volume
        stub.CreateSnapshot(pb.CreateSnapshotRequest(name=name + "-snap", source_volume_id=vol.id), timeout=10)
    tally = Tally()
    yield Served(node, stub, tally, f"{tmp}/configfs")
    print(f"\nagent fuzz: {tally.cases} gRPC calls, codes {dict(sorted(tally.codes.items()))}")
    channel.close()
    server.stop(None)
    node.index.close()
    shutil.rmtree(tmp, ignore_errors=True)


ids = st.one_of(hostile_text, st.sampled_from(GOOD_IDS))
snap_ids = st.one_of(hostile_text, st.builds(lambda v, s: f"{v}@{s}", st.sampled_from(GOOD_IDS), hostile_text))
nqns = st.one_of(hostile_text, st.just(HOST), st.builds(lambda s: f"nqn.2014-08.org.nvmexpress:{s}", hostile_text))
labels = st.dictionaries(hostile_text, hostile_text, max_size=3)


@FUZZ
@given(name=hostile_text, size=sizes, vbs=sizes, compression=hostile_text, thick=st.booleans(),
       src_snap=st.one_of(st.just(""), snap_ids), src_vol=st.one_of(st.just(""), ids),
       key=st.one_of(st.just(b""), st.binary(max_size=64)), labels=labels)
def test_fuzz_create_volume(served: Served, name: str, size: int, vbs: int, compression: str, thick: bool,
                            src_snap: str, src_vol: str, key: bytes, labels: dict[str, str]) -> None:
    req = pb.CreateVolumeRequest(name=name, size_bytes=size, volblocksize=vbs & 0x7FFFFFFFFFFFFFFF,
                                 compression=compression, thick=thick, source_snapshot_id=src_snap,
                                 source_volume_id=src_vol, encryption_key=key, labels=labels)
    served.tally.call(served.stub.CreateVolume, req)


@FUZZ
@given(vid=ids, size=sizes, host=nqns, op=st.sampled_from(["delete", "expand", "get", "publish", "unpublish"]))
def test_fuzz_volume_calls(served: Served, vid: str, size: int, host: str, op: str) -> None:
    s, t = served.stub, served.tally
    if op == "delete":
        # Only hostile ids: deleting the seeded volumes would only make the other cases shallower.
        if vid not in GOOD_IDS:
            t.call(s.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
    elif op == "expand":
        t.call(s.ExpandVolume, pb.ExpandVolumeRequest(volume_id=vid, size_bytes=size))
    elif op == "get":
        t.call(s.GetVolume, pb.GetVolumeRequest(volume_id=vid))
    elif op == "publish":
        if t.call(s.PublishVolume, pb.PublishVolumeRequest(volume_id=vid, host_nqn=host)) is not None:
            t.call(s.UnpublishVolume, pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=host))
    else:
        t.call(s.UnpublishVolume, pb.UnpublishVolumeRequest(volume_id=vid, host_nqn=host))


@FUZZ
@given(name=hostile_text, vid=ids, sid=snap_ids, max_entries=st.integers(-(1 << 31), (1 << 31) - 1),
       token=st.one_of(hostile_text, st.binary(max_size=40).map(lambda b: b.hex())),
       op=st.sampled_from(["snap", "delsnap", "list", "listsnap"]))
def test_fuzz_snapshot_and_list_calls(served: Served, name: str, vid: str, sid: str, max_entries: int,
                                      token: str, op: str) -> None:
    s, t = served.stub, served.tally
    if op == "snap":
        t.call(s.CreateSnapshot, pb.CreateSnapshotRequest(name=name, source_volume_id=vid))
    elif op == "delsnap":
        t.call(s.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=sid))
    elif op == "list":
        t.call(s.ListVolumes, pb.ListVolumesRequest(max_entries=max_entries, starting_token=token))
    else:
        t.call(s.ListSnapshots, pb.ListSnapshotsRequest(max_entries=max_entries, starting_token=token,
                                                        source_volume_id=vid, snapshot_id=sid))


@pytest.mark.parametrize("value", HOSTILE)
def test_every_hostile_value_in_every_id_field(served: Served, value: str) -> None:
    s, t = served.stub, served.tally
    for method, req in (
        (s.CreateVolume, pb.CreateVolumeRequest(name=value, size_bytes=1 << 20)),
        (s.CreateVolume, pb.CreateVolumeRequest(name="x-" + value[:50], size_bytes=1 << 20, source_volume_id=value)),
        (s.CreateVolume, pb.CreateVolumeRequest(name="y-" + value[:50], size_bytes=1 << 20, source_snapshot_id=value)),
        (s.DeleteVolume, pb.DeleteVolumeRequest(volume_id=value)),
        (s.ExpandVolume, pb.ExpandVolumeRequest(volume_id=value, size_bytes=1 << 31)),
        (s.GetVolume, pb.GetVolumeRequest(volume_id=value)),
        (s.ModifyVolume, pb.ModifyVolumeRequest(volume_id=value, compression="zstd")),
        (s.ModifyVolume, pb.ModifyVolumeRequest(volume_id=GOOD_IDS[0], compression=value)),
        (s.CreateSnapshot, pb.CreateSnapshotRequest(name=value, source_volume_id=GOOD_IDS[0])),
        (s.CreateSnapshot, pb.CreateSnapshotRequest(name="z-" + value[:50], source_volume_id=value)),
        (s.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=value)),
        (s.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=f"{GOOD_IDS[0]}@{value}")),
        (s.PublishVolume, pb.PublishVolumeRequest(volume_id=GOOD_IDS[0], host_nqn=value)),
        (s.PublishVolume, pb.PublishVolumeRequest(volume_id=value, host_nqn=HOST)),
        (s.UnpublishVolume, pb.UnpublishVolumeRequest(volume_id=GOOD_IDS[0], host_nqn=value)),
        (s.ListVolumes, pb.ListVolumesRequest(starting_token=value)),
        (s.ListSnapshots, pb.ListSnapshotsRequest(starting_token=value, snapshot_id=value, source_volume_id=value)),
    ):
        res = t.call(method, req)
        if method is s.PublishVolume and res is not None:
            t.call(s.UnpublishVolume, pb.UnpublishVolumeRequest(volume_id=req.volume_id, host_nqn=req.host_nqn))
    for hostile_host in ("../../x", "nqn.2014-08.a:b/../../c", "a\x00b"):
        assert not os.path.lexists(os.path.join(served.configfs, "hosts", hostile_host))


def test_zz_nothing_escaped_the_agents_namespaces(served: Served) -> None:
    """After all the above: every dataset is under tank/zvolt, configfs holds only its groups."""
    outside = [n for n in served.node.zfs.ds if n != "tank" and not n.startswith("tank/zvolt")]
    assert outside == []
    for dirpath, dirnames, filenames in os.walk(served.configfs):
        for entry in dirnames + filenames:
            assert "\x00" not in entry and ".." not in entry.split("/")
            assert os.path.realpath(os.path.join(dirpath, entry)).startswith(os.path.realpath(served.configfs))
    assert sorted(os.listdir(served.configfs)) == ["hosts", "ports", "subsystems"]
    # The seeded volumes are intact and healthy: no hostile call corrupted them.
    for vid in GOOD_IDS:
        vol = served.stub.GetVolume(pb.GetVolumeRequest(volume_id=vid), timeout=10).volume
        assert vol.condition == pb.VOLUME_CONDITION_HEALTHY, vol.condition_message
    assert served.tally.cases > 3 * EXAMPLES
