"""Encryption at rest on fakes: the key store, when a key is loaded, branches, expand, restart and
reboot, rotation, the CLI adapter's argv, and the StorageClass/secret parsing."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.fakes import FakeNode, make_node
from agent.keystore import KeyStore, KeyStoreError, read_wrapping_key
from agent.volumes import VolumeSpec
from agent.zfs import LibZfs, ZfsError
from csi import params
from zvolt.errors import ZvoltError

GiB = 1 << 30
KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
HOST2 = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-666666666666"


def code_of(fn: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    with pytest.raises(ZvoltError) as err:
        fn(*args, **kw)
    return err.value.code


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(str(tmp_path / "state"), os.urandom(32))


@pytest.fixture
def node(tmp_path: Path, store: KeyStore) -> FakeNode:
    return make_node(str(tmp_path / "state"), str(tmp_path / "cfs"), keystore=store)


def _create(node: FakeNode, name: str = "enc", key: bytes = KEY) -> str:
    return node.volumes.create_volume(VolumeSpec(name=name, size=GiB, encryption_key=key)).dataset


# -- the key store ----------------------------------------------------------------------------


def test_store_keeps_keys_only_wrapped_and_private(store: KeyStore) -> None:
    store.put("vabc", KEY)
    path = store.dir / "vabc.json"
    raw = path.read_bytes()
    assert KEY not in raw and KEY.hex().encode() not in raw
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.dir.stat().st_mode & 0o777 == 0o700
    assert store.get("vabc") == KEY
    assert store.ids() == ["vabc"]
    store.remove("vabc")
    assert store.get("vabc") is None and store.ids() == []


def test_store_refuses_another_wrapping_key_and_a_moved_entry(tmp_path: Path, store: KeyStore) -> None:
    store.put("vabc", KEY)
    other = KeyStore(str(tmp_path / "state"), os.urandom(32))
    with pytest.raises(KeyStoreError, match="not sealed by this node's wrapping key"):
        other.get("vabc")
    # An entry copied onto another volume's name does not open: the id is bound into the seal.
    (store.dir / "vdef.json").write_bytes((store.dir / "vabc.json").read_bytes())
    with pytest.raises(KeyStoreError):
        store.get("vdef")


def test_wrapping_key_file_must_be_64_hex(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text(KEY.hex() + "\n")
    assert read_wrapping_key(str(good)) == KEY
    bad = tmp_path / "bad"
    bad.write_text("secret-value-xyz")
    with pytest.raises(KeyStoreError) as err:
        read_wrapping_key(str(bad))
    assert "openssl rand -hex 32" in str(err.value) and "secret-value-xyz" not in str(err.value)


# -- when a key is loaded ---------------------------------------------------------------------


def test_key_loaded_only_while_published(node: FakeNode, store: KeyStore) -> None:
    ds = _create(node)
    vid = ds.rsplit("/", 1)[1]
    assert node.zfs.get_props(ds, ("encryptionroot",)) == {"encryptionroot": ds}
    assert ds not in node.zfs.loaded, "the key stays loaded after create"
    assert node.volumes.get_volume(vid).encrypted
    node.volumes.publish(vid, HOST, key=KEY)
    assert ds in node.zfs.loaded and store.get(vid) == KEY
    node.volumes.publish(vid, HOST2, key=KEY)
    node.volumes.unpublish(vid, HOST)
    assert ds in node.zfs.loaded, "another host still has it"
    node.volumes.unpublish(vid, HOST2)
    assert ds not in node.zfs.loaded and store.get(vid) is None


def test_publish_needs_the_right_key(node: FakeNode, store: KeyStore) -> None:
    ds = _create(node)
    vid = ds.rsplit("/", 1)[1]
    assert code_of(node.volumes.publish, vid, HOST) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ZvoltError, match="not the key of") as err:
        node.volumes.publish(vid, HOST, key=OTHER)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ds not in node.zfs.loaded and store.get(vid) is None
    assert node.volumes.index.volume(vid).hosts == []  # type: ignore[union-attr]


def test_unencrypted_volume_ignores_a_key(node: FakeNode, store: KeyStore) -> None:
    vid = node.volumes.create_volume(VolumeSpec(name="plain", size=GiB)).id
    assert not node.volumes.get_volume(vid).encrypted
    node.volumes.publish(vid, HOST, key=KEY)
    assert store.ids() == [] and not node.zfs.loaded


def test_branches_share_the_root_and_its_key(node: FakeNode) -> None:
    ds = _create(node)
    vid = ds.rsplit("/", 1)[1]
    snap = node.volumes.create_snapshot("snap-1", vid)
    # ZFS clones without the key (as measured in the lab); the branch is encrypted all the same,
    # and cannot be published without the key.
    b0 = node.volumes.create_volume(VolumeSpec(name="b0", size=GiB, source_snapshot=snap.id))
    assert node.zfs.get_props(b0.dataset, ("encryptionroot",)) == {"encryptionroot": ds}
    with pytest.raises(ZvoltError, match="needs its key") as err:
        node.volumes.publish(b0.id, HOST)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(node.volumes.create_volume,
                   VolumeSpec(name="b1", size=GiB, source_snapshot=snap.id, encryption_key=OTHER)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    clone = node.volumes.create_volume(VolumeSpec(name="b2", size=2 * GiB, source_snapshot=snap.id,
                                                  encryption_key=KEY))
    assert node.zfs.get_props(clone.dataset, ("encryptionroot",)) == {"encryptionroot": ds}
    assert ds not in node.zfs.loaded
    # Origin and branch published, then the origin unpublished: the branch keeps the key in use.
    node.volumes.publish(vid, HOST, key=KEY)
    node.volumes.publish(clone.id, HOST, key=KEY)
    node.volumes.unpublish(vid, HOST)
    assert ds in node.zfs.loaded
    node.volumes.unpublish(clone.id, HOST)
    assert ds not in node.zfs.loaded


def test_encrypted_class_cannot_branch_a_plain_volume(node: FakeNode) -> None:
    vid = node.volumes.create_volume(VolumeSpec(name="plain", size=GiB)).id
    with pytest.raises(ZvoltError, match="source is not encrypted"):
        node.volumes.create_volume(VolumeSpec(name="b", size=GiB, source_volume=vid, encryption_key=KEY))


def test_expand_loads_the_key_for_the_change(node: FakeNode) -> None:
    ds = _create(node)
    vid = ds.rsplit("/", 1)[1]
    assert code_of(node.volumes.expand_volume, vid, 2 * GiB) == grpc.StatusCode.FAILED_PRECONDITION
    assert node.volumes.expand_volume(vid, 2 * GiB, key=KEY).size == 2 * GiB
    assert ds not in node.zfs.loaded


# -- restart and reboot ---------------------------------------------------------------------


def test_reboot_loads_keys_of_published_volumes_only(tmp_path: Path, node: FakeNode, store: KeyStore) -> None:
    published = [_create(node, f"p{i}") for i in range(2)]
    idle = _create(node, "idle")
    for ds in published:
        node.volumes.publish(ds.rsplit("/", 1)[1], HOST, key=KEY)
    bad = published[1].rsplit("/", 1)[1]
    (store.dir / f"{bad}.json").write_text('{"format": 1, "nonce": "00", "sealed": "00"}')
    node.zfs.loaded.clear()  # a reboot: ZFS has no keys
    for d in node.zfs.ds.values():
        if d.kind == "volume":
            d.props["volmode"] = "none" if d.props.get("volmode") == "dev" else d.props["volmode"]
    after = node.restart(str(tmp_path / "state"))
    assert published[0] in after.zfs.loaded
    assert idle not in after.zfs.loaded
    assert published[1] not in after.zfs.loaded
    assert "unreadable" in after.volumes.unrestored[bad]
    state = after.volumes.get_volume(bad)
    assert not state.healthy and "unreadable" in state.message
    assert after.volumes.get_volume(published[0].rsplit("/", 1)[1]).healthy
    store.put(bad, KEY)  # the entry mended: the background retry loads the key, then exports
    assert after.recovery.retry_unrestored() == 0
    assert published[1] in after.zfs.loaded and after.volumes.get_volume(bad).healthy


def test_agent_restart_keeps_loaded_keys(tmp_path: Path, node: FakeNode) -> None:
    ds = _create(node)
    node.volumes.publish(ds.rsplit("/", 1)[1], HOST, key=KEY)
    node.zfs.calls.clear()
    after = node.restart(str(tmp_path / "state"))
    assert ds in after.zfs.loaded
    assert not [c for c in after.zfs.calls if "load-key" in c], "ZFS kept the key: nothing to load"


# -- rotation -------------------------------------------------------------------------------


def test_rotate_key_rewraps_without_copying(node: FakeNode, store: KeyStore) -> None:
    ds = _create(node)
    vid = ds.rsplit("/", 1)[1]
    snap = node.volumes.create_snapshot("s", vid)
    clone = node.volumes.create_volume(VolumeSpec(name="c", size=GiB, source_snapshot=snap.id, encryption_key=KEY))
    node.volumes.publish(clone.id, HOST, key=KEY)
    before = set(node.zfs.ds)
    assert code_of(node.volumes.rotate_key, vid, OTHER, OTHER) == grpc.StatusCode.INVALID_ARGUMENT
    assert node.volumes.rotate_key(vid, KEY, OTHER) == vid
    assert node.volumes.rotate_key(vid, KEY, OTHER) == vid  # a repeat
    assert node.zfs.keys[ds] == OTHER and set(node.zfs.ds) == before
    assert store.get(clone.id) == OTHER, "the published branch's kept key follows"
    assert code_of(node.volumes.publish, vid, HOST, key=KEY) == grpc.StatusCode.INVALID_ARGUMENT
    node.volumes.publish(vid, HOST, key=OTHER)


# -- never in the clear ---------------------------------------------------------------------


def test_key_never_in_index_calls_or_logs(tmp_path: Path, node: FakeNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ds = _create(node)
    vid = ds.rsplit("/", 1)[1]
    node.volumes.publish(vid, HOST, key=KEY)
    node.volumes.unpublish(vid, HOST)
    node.index.close()
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY not in data and KEY.hex().encode() not in data, path
    assert KEY.hex() not in caplog.text and KEY.hex() not in " ".join(node.zfs.calls)
    assert all(KEY.hex() not in v for d in node.zfs.ds.values() for v in d.props.values())


def test_cli_key_goes_to_stdin_not_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "libzfs_core", types.ModuleType("libzfs_core"))
    runs: list[tuple[list[str], str | None]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        runs.append((argv, kw.get("input")))
        bad = argv[1] == "load-key" and kw.get("input") != KEY.hex()
        return subprocess.CompletedProcess(argv, 255 if bad else 0, "",
                                           "Key load error: Incorrect key provided for 'tank/v'." if bad else "")

    monkeypatch.setattr(subprocess, "run", run)
    z = LibZfs()
    z.create_volume("tank/zvolt/v/va", GiB, {"volmode": "none", "zvolt:id": "va"}, key=KEY)
    z.load_key("tank/zvolt/v/va", KEY, noop=True)
    z.change_key("tank/zvolt/v/va", OTHER)
    with pytest.raises(ZfsError) as err:
        z.load_key("tank/zvolt/v/va", OTHER)
    assert err.value.errno == errno.EACCES
    argv, stdin = runs[0]
    assert argv[:4] == ["zfs", "create", "-s", "-V"] and stdin == KEY.hex()
    assert "encryption=aes-256-gcm" in argv and "keyformat=hex" in argv and "keylocation=prompt" in argv
    assert runs[1] == (["zfs", "load-key", "-n", "tank/zvolt/v/va"], KEY.hex())
    assert runs[2][1] == OTHER.hex()
    for argv, _ in runs:
        assert not any(KEY.hex() in a or OTHER.hex() in a for a in argv)
    with pytest.raises(ZfsError, match="32 bytes, not 3"):
        z.load_key("tank/zvolt/v/va", b"abc")


# -- StorageClass and secrets -----------------------------------------------------------------


def test_storageclass_encryption_parameter() -> None:
    assert params.parse({"encryption": "aes-256-gcm"}).encrypted
    assert not params.parse({"encryption": "off"}).encrypted
    assert not params.parse({}).encrypted
    with pytest.raises(ZvoltError, match="not supported"):
        params.parse({"encryption": "aes-128-ccm"})
    with pytest.raises(ZvoltError, match="cannot change after a volume is created"):
        params.parse_mutable({"encryption": "aes-256-gcm"})


@pytest.mark.parametrize(("value", "why"), [
    ("ab" * 31, "62 characters"), ("zz" * 32, "not all hex"), ("", "0 characters"),
])
def test_secret_key_refused_by_name_never_by_value(value: str, why: str) -> None:
    with pytest.raises(ZvoltError) as err:
        params.encryption_key({"encryptionKey": value}, "provisioner")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'encryptionKey'" in err.value.message and why in err.value.message
    assert not value or value not in err.value.message


def test_secret_key_missing_and_good() -> None:
    with pytest.raises(ZvoltError, match="provisioner-secret-name") as err:
        params.encryption_key({}, "provisioner")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert params.encryption_key({"encryptionKey": KEY.hex() + "\n"}, "provisioner") == KEY
    assert params.optional_encryption_key({}, "controller-publish") == b""


# -- CSI controller -> agent servicer (over gRPC, on fakes) -----------------------------------


def test_controller_hands_the_secret_key_to_create_publish_and_expand(tmp_path: Path) -> None:
    from agent.metrics import Metrics
    from agent.server import AgentServicer, make_server
    from csi.agents import AgentPool, parse_static
    from csi.controller import ControllerService
    from csi.identity import IdentityService
    from csi.server import Services, build_server
    from zvolt.pb import csi_pb2, csi_pb2_grpc
    from zvolt.rpc import parse_endpoint

    sock = f"/tmp/zvenc-{os.getpid()}"
    os.makedirs(sock, exist_ok=True)
    store = KeyStore(str(tmp_path / "state"), os.urandom(32))
    node = make_node(str(tmp_path / "state"), str(tmp_path / "cfs"), keystore=store)
    metrics = Metrics()
    agent_server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics)
    agent_server.add_insecure_port(f"unix://{sock}/agent.sock")
    agent_server.start()
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{sock}/agent.sock"), tls=None, timeout=10)
    server, target = build_server(
        Services(identity=IdentityService(True, lambda: True), controller=ControllerService(pool)),
        parse_endpoint(f"unix://{sock}/controller.sock"))
    server.start()
    channel = grpc.insecure_channel(target)
    try:
        stub = csi_pb2_grpc.ControllerStub(channel)
        mode = csi_pb2.VolumeCapability.AccessMode
        cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                                       access_mode=mode(mode=mode.SINGLE_NODE_WRITER))
        secrets = {"encryptionKey": KEY.hex()}
        req = csi_pb2.CreateVolumeRequest(name="pvc-enc", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
                                          volume_capabilities=[cap], parameters={"encryption": "aes-256-gcm"})
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateVolume(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "encryptionKey" in str(err.value.details())
        req.secrets.update(secrets)
        vol = stub.CreateVolume(req).volume
        ds = node.volumes.index.volume(vol.volume_id.split("/")[1]).dataset  # type: ignore[union-attr]
        assert node.zfs.keys[ds] == KEY
        pub = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=HOST, volume_capability=cap)
        with pytest.raises(grpc.RpcError) as err:
            stub.ControllerPublishVolume(pub)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "controller-publish-secret-name" in str(
            err.value.details())
        pub.secrets.update(secrets)
        assert stub.ControllerPublishVolume(pub).publish_context["nqn"]
        assert ds in node.zfs.loaded
        grow = csi_pb2.ControllerExpandVolumeRequest(volume_id=vol.volume_id,
                                                    capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB),
                                                    secrets=secrets)
        assert stub.ControllerExpandVolume(grow).capacity_bytes == 2 * GiB
    finally:
        channel.close()
        server.stop(None)
        pool.close()
        agent_server.stop(None)
        node.index.close()
        shutil.rmtree(sock, ignore_errors=True)
