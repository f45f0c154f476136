"""Volume properties that change after creation: the parameter rules, the agent's ModifyVolume
(idempotent, under an intent, settled after a crash) and who may call it."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.authz import Authorizer
from agent.fakes import Crash, FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from csi import params
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

GiB = 1 << 30


def refusal(fn: object, *args: object, **kwargs: object) -> ZvoltError:
    with pytest.raises(ZvoltError) as err:
        fn(*args, **kwargs)  # type: ignore[operator]
    return err.value


# ---------------------------------------------------------------- parameters


def test_mutable_compression_is_parsed() -> None:
    assert params.parse_mutable({"compression": "zstd"}) == params.VolumeChanges(compression="zstd")
    assert params.parse_mutable({}) == params.VolumeChanges()


@pytest.mark.parametrize("value", ["brotli", "ZSTD", "gzip-9", ""])
def test_a_mutable_value_gets_exactly_the_create_time_refusal(value: str) -> None:
    at_create = refusal(params.parse, {"compression": value})
    at_modify = refusal(params.parse_mutable, {"compression": value})
    assert at_modify.code == grpc.StatusCode.INVALID_ARGUMENT
    assert at_modify.message == at_create.message


@pytest.mark.parametrize("key", sorted(set(params.DRIVER_KEYS) - set(params.MUTABLE_KEYS)))
def test_immutable_keys_are_refused_by_name_with_the_reason(key: str) -> None:
    err = refusal(params.parse_mutable, {key: "8K"})
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(key) in err.message and "cannot change after a volume is created: " in err.message
    assert "(mutable: compression)" in err.message


def test_unknown_mutable_keys_are_refused_by_name() -> None:
    err = refusal(params.parse_mutable, {"XXX_FakeKey": "XXX_FakeValue"})
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'XXX_FakeKey'" in err.message and "mutable: compression" in err.message


def test_create_takes_the_class_parameters_over_the_storage_class() -> None:
    par = params.parse_create({"compression": "lz4", "volblocksize": "8K"}, {"compression": "zstd"})
    assert (par.compression, par.volblocksize) == ("zstd", 8192)
    assert params.parse_create({"compression": "gzip"}, {}).compression == "gzip"
    # The create path refuses in a VolumeAttributesClass what ModifyVolume could never change.
    assert "cannot change" in refusal(params.parse_create, {}, {"volblocksize": "8K"}).message
    assert refusal(params.parse_create, {}, {"compression": "brotli"}).code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- agent


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return make_node(str(tmp_path / "state"), str(tmp_path / "configfs"))


def test_modify_sets_compression_in_zfs_and_the_index(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="m", size=GiB))
    assert vol.compression == "lz4"
    out = node.volumes.modify_volume(vol.id, compression="zstd")
    assert out.compression == "zstd"
    assert node.zfs.ds[vol.dataset].props["compression"] == "zstd"
    indexed = node.index.volume(vol.id)
    assert indexed is not None and indexed.compression == "zstd"
    assert node.index.intents() == []


def test_modify_sets_only_what_differs(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="m", size=GiB, compression="zstd"))
    before = list(node.zfs.calls)
    assert node.volumes.modify_volume(vol.id, compression="zstd").compression == "zstd"
    assert node.volumes.modify_volume(vol.id).compression == "zstd"  # nothing asked
    assert node.zfs.calls == before  # no `zfs set`, no intent
    assert node.index.intents() == []


def test_modify_refusals(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="m", size=GiB))
    calls = list(node.zfs.calls)
    assert refusal(node.volumes.modify_volume, vol.id, compression="brotli").code == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal(node.volumes.modify_volume, "v" + "0" * 31, compression="zstd").code == grpc.StatusCode.NOT_FOUND
    assert refusal(node.volumes.modify_volume, "../x", compression="zstd").code == grpc.StatusCode.INVALID_ARGUMENT
    assert node.zfs.calls == calls
    assert node.zfs.ds[vol.dataset].props["compression"] == "lz4"


def test_a_failed_zfs_set_leaves_index_and_zfs_agreeing(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="m", size=GiB))
    node.zfs.fail_set[vol.dataset] = errno.EIO
    assert refusal(node.volumes.modify_volume, vol.id, compression="zstd").code == grpc.StatusCode.INTERNAL
    indexed = node.index.volume(vol.id)
    assert indexed is not None and indexed.compression == "lz4" == node.zfs.ds[vol.dataset].props["compression"]
    assert node.index.intents() == []


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_around_the_zfs_set_is_settled_at_restart(tmp_path: Path, when: str) -> None:
    state = str(tmp_path / "state")
    node = make_node(state, str(tmp_path / "configfs"))
    vol = node.volumes.create_volume(VolumeSpec(name="m", size=GiB))
    node.zfs.crash_at = ("set_props", when)
    with pytest.raises(Crash):
        node.volumes.modify_volume(vol.id, compression="zstd")
    assert [i.op for i in node.index.intents()] == ["modify"]
    node = node.restart(state)
    # Whatever ZFS holds is what the index says after start-up: the new value if the set ran.
    want = "zstd" if when == "after" else "lz4"
    indexed = node.index.volume(vol.id)
    assert indexed is not None and indexed.compression == want == node.zfs.ds[vol.dataset].props["compression"]
    assert node.index.intents() == []
    assert node.volumes.modify_volume(vol.id, compression="zstd").compression == "zstd"


# ---------------------------------------------------------------- gRPC and roles


@pytest.fixture
def stub(node: FakeNode, tmp_path: Path) -> Iterator[pb_grpc.AgentStub]:
    metrics = Metrics()
    server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics, workers=2)
    sock = tmp_path / "agent.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield pb_grpc.AgentStub(channel)
    finally:
        channel.close()
        server.stop(None)


def test_modify_over_grpc(node: FakeNode, stub: pb_grpc.AgentStub) -> None:
    vol = stub.CreateVolume(pb.CreateVolumeRequest(name="g", size_bytes=GiB), timeout=10).volume
    out = stub.ModifyVolume(pb.ModifyVolumeRequest(volume_id=vol.id, compression="zle"), timeout=10).volume
    assert (out.id, out.compression) == (vol.id, "zle")
    assert stub.GetVolume(pb.GetVolumeRequest(volume_id=vol.id), timeout=10).volume.compression == "zle"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModifyVolume(pb.ModifyVolumeRequest(volume_id="v" + "1" * 31, compression="zle"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_only_the_controller_may_modify() -> None:
    authz = Authorizer(["zvolt-controller"])
    assert authz.allowed("ModifyVolume", "zvolt-controller")
    assert not authz.allowed("ModifyVolume", "zvolt-node")
    assert not authz.allowed("ModifyVolume", "storage-1")
