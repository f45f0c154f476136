"""DH-HMAC-CHAP: secret format, the volume's Secret, per-volume host entries, controller -> agent and node.

The kernel's acceptance of these secrets is checked on the real stack in
tests/lab/test_security_lab.py; here the format, storage and plumbing are checked on fakes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from agent import nvmet
from agent.dhchap import AuthConfig, HostKeys, HostSecrets, SecretError, decode_secret, encode_secret, generate_secret
from agent.exports import ExportConfig, Exports
from agent.fakes import FakeZfs, _Ds
from agent.index import Index
from agent.metrics import Metrics
from agent.recovery import Readiness, Recovery
from agent.server import AgentServicer, make_server
from agent.volumes import AgentConfig, Volumes, VolumeSpec
from csi import dhchap
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.fakes import FakeMounter, FakeNvmeHost
from csi.host_identity import HostIdentity
from csi.identity import IdentityService
from csi.node import NodeService
from csi.nvme_host import ConnectSpec, connect_argv
from csi.server import Services, build_server
from zvolt.errors import ZvoltError
from zvolt.keyring import Keyring
from zvolt.logs import JsonFormatter
from zvolt.names import dhchap_secret_name, volume_host_id, volume_host_nqn
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc
from zvolt.pb import csi_pb2, csi_pb2_grpc
from zvolt.rpc import parse_endpoint

GiB = 1 << 30
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
OTHER = "nqn.2026-11.io.zvolt:host:worker-1:22222222-2222-4222-8222-222222222222"
Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
)


# -- format -----------------------------------------------------------------------------------


def test_secret_format_matches_the_spec_representation() -> None:
    key = bytes(range(32))
    secret = encode_secret(key, 1)
    prefix, hh, _body, tail = secret.split(":")
    assert (prefix, hh, tail) == ("DHHC-1", "01", "")
    raw = base64.b64decode(secret.split(":")[2])
    assert raw[:32] == key
    # CRC-32 (the kernel's ~crc32(~0, key) == zlib's) over the key, little-endian, after it.
    assert raw[32:] == zlib.crc32(key).to_bytes(4, "little")
    assert decode_secret(secret) == (1, key)


@pytest.mark.parametrize("transform,length", [(1, 32), (2, 48), (3, 64)])
def test_generated_secrets_have_the_key_length_of_their_hash(transform: int, length: int) -> None:
    a, b = generate_secret(transform), generate_secret(transform)
    assert a != b
    assert a.startswith(f"DHHC-1:0{transform}:")
    assert len(decode_secret(a)[1]) == length


def test_damaged_secrets_are_refused() -> None:
    good = encode_secret(b"\x01" * 32, 1)
    raw = bytearray(base64.b64decode(good.split(":")[2]))
    raw[0] ^= 0xFF  # key changed, CRC not
    flipped = f"DHHC-1:01:{base64.b64encode(bytes(raw)).decode()}:"
    for bad in (flipped, good[:-1], "DHHC-1:01::", "DHHC-1:09:" + good.split(":")[2] + ":",
                encode_secret(b"\x01" * 48, 0).replace(":00:", ":01:"), "", "DHHC-1:01:!!!!:"):
        with pytest.raises(SecretError):
            decode_secret(bad)
    with pytest.raises(SecretError):
        encode_secret(b"short", 1)


def test_node_plugin_accepts_generated_secrets_and_passes_them_to_nvme_connect() -> None:
    secret, ctrl = generate_secret(), generate_secret()
    spec = ConnectSpec(nqn="nqn.2026-11.io.zvolt:storage-0:vabc", transport="tcp", address="10.42.0.1", port="4420",
                       hostnqn=HOST, hostid="11111111-1111-4111-8111-111111111111", ctrl_loss_tmo=60,
                       reconnect_delay=2, dhchap_secret=secret, dhchap_ctrl_secret=ctrl)
    argv = connect_argv(spec)
    assert argv[argv.index("--dhchap-secret") + 1] == secret
    assert argv[argv.index("--dhchap-ctrl-secret") + 1] == ctrl
    # A value that could smuggle another option into argv never reaches it.
    from dataclasses import replace

    for hostile in ("--hostnqn=evil", "DHHC-1:01:abc: --foo", "DHHC-1:01:a\nb:"):
        with pytest.raises(ZvoltError) as err:
            connect_argv(replace(spec, dhchap_secret=hostile))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- persistence ------------------------------------------------------------------------------


def test_host_keys_are_kept_private_and_come_back_after_a_restart(tmp_path: object) -> None:
    state = str(tmp_path)
    keys = HostKeys(state)
    found = HostSecrets(HOST, generate_secret(), generate_secret())
    assert keys.load(HOST) is None
    keys.put(found)
    folder = os.path.join(state, "dhchap")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert os.listdir(folder) == [HOST + ".json"]
    assert stat.S_IMODE(os.stat(os.path.join(folder, HOST + ".json")).st_mode) == 0o600
    assert HostKeys(state).load(HOST) == found  # what a restarted agent restores
    assert found.secret not in repr(found) and found.ctrl_secret not in repr(found)
    keys.forget(HOST)
    keys.forget(HOST)  # idempotent
    assert keys.load(HOST) is None and os.listdir(folder) == []


def test_damaged_files_or_hostile_names_never_touch_the_filesystem(tmp_path: object) -> None:
    keys = HostKeys(str(tmp_path))
    for hostile in ("../../etc/passwd", "nqn.2014-08.org.nvmexpress:uuid:../x", "nqn.2014-08.a:b/c", "x\x00y"):
        with pytest.raises(ZvoltError) as err:
            keys.put(HostSecrets(hostile, generate_secret()))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert os.listdir(os.path.join(str(tmp_path), "dhchap")) == []
    with open(os.path.join(str(tmp_path), "dhchap", HOST + ".json"), "w") as f:
        f.write('{"secret": "DHHC-1:01:AAAA:"}')
    with pytest.raises(ZvoltError) as err:
        keys.load(HOST)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "publish the volume again" in err.value.message


def test_apply_writes_the_nvmet_host_attributes(tmp_path: object) -> None:
    root = nvmet.Root(str(tmp_path) + "/cfg", emulate=True)
    root.init_tree()
    keys = HostKeys(str(tmp_path) + "/state", AuthConfig(dhgroup="ffdhe2048"))
    host = root.host(HOST)
    host.create()
    found = HostSecrets(HOST, generate_secret(2), generate_secret(2))
    keys.apply(host, found)
    assert host.attr("dhchap_key") == found.secret and host.attr("dhchap_ctrl_key") == found.ctrl_secret
    assert host.attr("dhchap_hash") == "hmac(sha384)" and host.attr("dhchap_dhgroup") == "ffdhe2048"
    with pytest.raises(nvmet.NvmetError):
        host.set_attr("../allow_any_host", "1")


def test_per_volume_host_nqns_are_distinct_stable_and_map_back_to_the_node() -> None:
    from zvolt import names

    a, b = volume_host_nqn(HOST, "vone"), volume_host_nqn(HOST, "vtwo")
    assert a != b and a.startswith(HOST + ":v:") and volume_host_nqn(HOST, "vone") == a
    assert names.node_host_nqn(a, "vone") == HOST and names.node_host_nqn(a, "vtwo") == a
    assert names.opened_by(a, HOST) and not names.opened_by(a, OTHER) and not names.opened_by(HOST + ":v:x", HOST)
    # The kernel refuses one host id under two NQNs: each per-volume NQN has its own.
    ids = {volume_host_id(HOST, "vone"), volume_host_id(HOST, "vtwo"), "11111111-1111-4111-8111-111111111111"}
    assert len(ids) == 3
    with pytest.raises(ZvoltError):
        volume_host_nqn("nqn.2014-08.org.nvmexpress:uuid:" + "a" * 190, "vone")


# -- the controller, the agent and the node plugin, over real gRPC ----------------------------


@dataclass
class Stack:
    tmp: str
    zfs: FakeZfs
    configfs: str
    agent: pb_grpc.AgentStub
    controller: csi_pb2_grpc.ControllerStub
    servers: list[grpc.Server]
    channels: list[grpc.Channel]
    pool: AgentPool
    index: Index
    secrets: dhchap.MemorySecrets
    mode: str


def _agent_parts(tmp: str, zfs: FakeZfs, bidirectional: bool,
                 require: bool = True) -> tuple[Volumes, Readiness, Recovery, Index]:
    root = nvmet.Root(f"{tmp}/configfs", emulate=True)
    root.init_tree()
    index = Index(f"{tmp}/state")
    auth = HostKeys(f"{tmp}/state", AuthConfig(bidirectional=bidirectional))
    exports = Exports(zfs, root, ExportConfig("storage-0", "10.42.0.1", "4420", 1.0), auth=auth, require_auth=require)
    cfg = AgentConfig(node="storage-0", pool="tank", parent="tank/zvolt", nvme_address="10.42.0.1", nvme_port="4420")
    volumes = Volumes(cfg, zfs, index, exports)
    readiness = Readiness()
    recovery = Recovery(zfs, index, exports, volumes, readiness)
    recovery.run()
    return volumes, readiness, recovery, index


@contextlib.contextmanager
def running_stack(mode: str, require: bool = True, keyring: Keyring | None = None) -> Iterator[Stack]:
    """Agent (emulated configfs, fake ZFS) and controller with a Secret store, over real gRPC on
    unix sockets. mode: the DH-HMAC-CHAP mode the tests create volumes with ("" for none)."""
    tmp = tempfile.mkdtemp(prefix="zvsec", dir="/tmp")
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    volumes, readiness, _, index = _agent_parts(tmp, zfs, mode == "bidirectional", require=require)
    volumes.exports.keyring = keyring
    metrics = Metrics()
    agent_server = make_server(AgentServicer(volumes, readiness, metrics), metrics, workers=4)
    agent_server.add_insecure_port(f"unix://{tmp}/agent.sock")
    agent_server.start()
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{tmp}/agent.sock"), tls=None, timeout=10)
    secrets = dhchap.MemorySecrets("zvolt-system")
    ctl_server, target = build_server(
        Services(identity=IdentityService(True, lambda: True),
                 controller=ControllerService(pool, keys=dhchap.VolumeKeys(secrets))),
        parse_endpoint(f"unix://{tmp}/controller.sock"),
    )
    ctl_server.start()
    agent_channel = grpc.insecure_channel(f"unix://{tmp}/agent.sock")
    ctl_channel = grpc.insecure_channel(target)
    try:
        yield Stack(tmp, zfs, f"{tmp}/configfs", pb_grpc.AgentStub(agent_channel),
                    csi_pb2_grpc.ControllerStub(ctl_channel), [agent_server, ctl_server],
                    [agent_channel, ctl_channel], pool, index, secrets, mode)
    finally:
        for ch in (agent_channel, ctl_channel):
            ch.close()
        for s in (ctl_server, agent_server):
            s.stop(None)
        pool.close()
        index.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["unidirectional", "bidirectional"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with running_stack(request.param) as s:
        yield s


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.fmt = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.fmt.format(record))


def _create(stack: Stack, name: str) -> csi_pb2.Volume:
    vol: csi_pb2.Volume = stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[CAP],
        parameters={"dhchap": stack.mode}), timeout=10).volume
    return vol


def _publish(stack: Stack, vol: csi_pb2.Volume, node: str = HOST) -> dict[str, str]:
    return dict(stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node, volume_capability=CAP, volume_context=vol.volume_context),
        timeout=10).publish_context)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _stage(stack: Stack, vol: csi_pb2.Volume, ctx: dict[str, str], secrets: dict[str, str]) -> FakeNvmeHost:
    nvme = FakeNvmeHost()
    nvme.add_subsystem(ctx["nqn"], GiB)
    node = NodeService(HostIdentity(HOST, "11111111-1111-4111-8111-111111111111"), nvme,
                       FakeMounter(nvme.device_size), zone="default", device_timeout=0.5)
    server, target = build_server(Services(identity=IdentityService(False, lambda: True), node=node),
                                  parse_endpoint(f"unix://{stack.tmp}/node.sock"))
    server.start()
    try:
        with grpc.insecure_channel(target) as ch:
            csi_pb2_grpc.NodeStub(ch).NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=f"{stack.tmp}/stage", volume_capability=CAP,
                publish_context=ctx, secrets=secrets), timeout=10)
    finally:
        server.stop(None)
    return nvme


def test_a_volumes_keys_go_from_its_secret_to_the_target_and_the_node_never_through_publish_context(
        stack: Stack) -> None:
    cap = _Capture()
    logging.getLogger().addHandler(cap)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        vol = _create(stack, "pvc-auth")
        assert vol.volume_context["dhchap"] == stack.mode
        secret = stack.secrets.read(dhchap_secret_name("pvc-auth"))
        assert secret is not None and decode_secret(secret["dhchapKey"])[0] == 1
        assert ("dhchapCtrlKey" in secret) == (stack.mode == "bidirectional")
        # A retried CreateVolume finds the volume and its keys; it makes neither again.
        again = _create(stack, "pvc-auth")
        assert again.volume_id == vol.volume_id and stack.secrets.read(dhchap_secret_name("pvc-auth")) == secret

        ctx = _publish(stack, vol)
        local = vol.volume_id.split("/")[1]
        per_volume = volume_host_nqn(HOST, local)
        assert ctx["dhchap"] == stack.mode
        assert not [k for k, v in ctx.items() if "DHHC-1" in v], f"a key in publish_context: {sorted(ctx)}"
        # The target takes this node under its NQN for this volume, with the volume's keys.
        nqn = ctx["nqn"]
        assert os.listdir(os.path.join(stack.configfs, "subsystems", nqn, "allowed_hosts")) == [per_volume]
        assert _read(os.path.join(stack.configfs, "subsystems", nqn, "attr_allow_any_host")) == "0"
        host_dir = os.path.join(stack.configfs, "hosts", per_volume)
        assert _read(os.path.join(host_dir, "dhchap_key")) == secret["dhchapKey"]
        assert _read(os.path.join(host_dir, "dhchap_hash")) == "hmac(sha256)"
        if stack.mode == "bidirectional":
            assert _read(os.path.join(host_dir, "dhchap_ctrl_key")) == secret["dhchapCtrlKey"]
        # The CO still sees the node's own id as the one the volume is published to.
        listed = stack.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id),
                                                      timeout=10)
        assert list(listed.status.published_node_ids) == [HOST]
        assert _publish(stack, vol) == ctx  # idempotent

        # The node plugin connects under the per-volume NQN and its own host id, with the keys
        # kubelet read from the Secret; without them it says what the StorageClass lacks.
        with pytest.raises(grpc.RpcError) as err:
            _stage(stack, vol, ctx, {})
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "node-stage-secret-name" in (err.value.details() or "")
        nvme = _stage(stack, vol, ctx, secret)
        spec = nvme.connects[0]
        assert (spec.hostnqn, spec.hostid) == (per_volume, volume_host_id(HOST, local))
        assert (spec.dhchap_secret, spec.dhchap_ctrl_secret) == (secret["dhchapKey"], secret.get("dhchapCtrlKey", ""))

        # Another volume of the same node: another NQN, another key. A key opens one volume.
        vol2 = _create(stack, "pvc-auth-2")
        ctx2 = _publish(stack, vol2)
        secret2 = stack.secrets.read(dhchap_secret_name("pvc-auth-2"))
        assert secret2 is not None and secret2["dhchapKey"] != secret["dhchapKey"]
        second = volume_host_nqn(HOST, vol2.volume_id.split("/")[1])
        assert os.listdir(os.path.join(stack.configfs, "subsystems", ctx2["nqn"], "allowed_hosts")) == [second]

        # Unpublish removes the per-volume host entry and the key the agent kept for it;
        # DeleteVolume removes the Secret.
        for v in (vol, vol2):
            stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=v.volume_id, node_id=HOST), timeout=10)
        assert not os.path.exists(host_dir) and not os.path.exists(os.path.join(stack.configfs, "hosts", second))
        assert os.listdir(os.path.join(stack.tmp, "state", "dhchap")) == []
        for v in (vol, vol2):
            stack.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id), timeout=10)
        assert stack.secrets.secrets == {}
    finally:
        logging.getLogger().removeHandler(cap)
        logging.getLogger().setLevel(old_level)
    rpc_lines = [line for line in cap.lines if '"rpc"' in line]
    assert any("PublishVolume" in line for line in rpc_lines), "the RPC log lines were captured"
    keys = [v for s in (secret, secret2) for v in s.values()]
    for line in cap.lines:
        for k in keys:
            assert k not in line and k.split(":")[2][:16] not in line, f"a key leaked into a log line: {line[:200]}"


def test_an_agent_that_requires_keys_refuses_a_publish_without_them(stack: Stack) -> None:
    vol = stack.agent.CreateVolume(pb.CreateVolumeRequest(name="pvc-plain", size_bytes=GiB), timeout=10).volume
    with pytest.raises(grpc.RpcError) as err:
        stack.agent.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--dhchap" in (err.value.details() or "")
    if stack.mode == "bidirectional":
        with pytest.raises(grpc.RpcError) as err:
            stack.agent.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST,
                                                              dhchap_key=generate_secret()), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "dhchapCtrlKey" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stack.agent.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST,
                                                          dhchap_key="DHHC-1:01:bm90IGEga2V5:"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bm90IGEga2V5" not in (err.value.details() or "")
    assert not os.listdir(os.path.join(stack.configfs, "hosts"))


def test_a_class_with_dhchap_needs_a_controller_that_keeps_keys(tmp_path: object) -> None:
    pool = AgentPool(lambda: parse_static("storage-0=unix:///nonexistent.sock"), tls=None, timeout=1)
    try:
        with pytest.raises(ZvoltError) as err:
            ControllerService(pool).CreateVolume(csi_pb2.CreateVolumeRequest(
                name="pvc-x", volume_capabilities=[CAP], parameters={"dhchap": "bidirectional"}), None)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--dhchap-secret-namespace" in err.value.message
        with pytest.raises(ZvoltError) as err:
            ControllerService(pool).CreateVolume(csi_pb2.CreateVolumeRequest(
                name="pvc-x", volume_capabilities=[CAP], parameters={"dhchap": "sometimes"}), None)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        pool.close()


def test_a_publish_whose_secret_is_gone_says_so(stack: Stack) -> None:
    vol = _create(stack, "pvc-lost")
    stack.secrets.delete(dhchap_secret_name("pvc-lost"))
    with pytest.raises(grpc.RpcError) as err:
        _publish(stack, vol)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "zvolt-system/zvolt-dhchap-pvc-lost" in (err.value.details() or "")


def test_reboot_restores_the_per_volume_host_keys_before_ready(stack: Stack) -> None:
    vol = _create(stack, "pvc-reboot")
    ctx = _publish(stack, vol)
    per_volume = volume_host_nqn(HOST, vol.volume_id.split("/")[1])
    key = _read(os.path.join(stack.configfs, "hosts", per_volume, "dhchap_key"))
    # A reboot: configfs is empty, ZFS and the state dir remain. A new agent over the same state.
    shutil.rmtree(stack.configfs)
    _, readiness, _, index = _agent_parts(stack.tmp, stack.zfs, stack.mode == "bidirectional")
    try:
        assert readiness.ready
        assert _read(os.path.join(stack.configfs, "hosts", per_volume, "dhchap_key")) == key
        assert os.listdir(os.path.join(stack.configfs, "subsystems", ctx["nqn"], "allowed_hosts")) == [per_volume]
    finally:
        index.close()


def test_a_plain_publish_after_an_authenticated_one_forgets_the_per_volume_key(tmp_path: object) -> None:
    # A class that turned DH-HMAC-CHAP off since: the node's per-volume NQN goes, and its key with it.
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    volumes, _, _, index = _agent_parts(str(tmp_path), zfs, bidirectional=False, require=False)
    try:
        vid = volumes.create_volume(VolumeSpec(name="pvc-switch", size=GiB)).id
        per_volume = volume_host_nqn(HOST, vid)
        volumes.publish(vid, HOST, auth=HostSecrets(HOST, generate_secret(1)))
        keys = HostKeys(f"{tmp_path}/state", AuthConfig())
        assert keys.load(per_volume) is not None
        volumes.publish(vid, HOST)
        assert volumes.index.volume(vid).hosts == [HOST]  # type: ignore[union-attr]
        assert keys.load(per_volume) is None
    finally:
        index.close()
