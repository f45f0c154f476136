"""DH-HMAC-CHAP: secret format, per-host persistence, configfs host entries, agent -> controller -> node.

The kernel's acceptance of these secrets is checked on the real stack in
tests/lab/test_security_lab.py; here the format, storage and plumbing are checked on fakes.
"""

from __future__ import annotations

import base64
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
from agent.dhchap import AuthConfig, HostKeys, SecretError, decode_secret, encode_secret, generate_secret
from agent.exports import ExportConfig, Exports
from agent.fakes import FakeZfs, _Ds
from agent.index import Index
from agent.metrics import Metrics
from agent.recovery import Readiness, Recovery
from agent.server import AgentServicer, make_server
from agent.volumes import AgentConfig, Volumes
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.fakes import FakeMounter, FakeNvmeHost
from csi.host_identity import HostIdentity
from csi.identity import IdentityService
from csi.node import NodeService
from csi.nvme_host import ConnectSpec, connect_argv
from csi.server import Services, build_server
from zvolt.errors import ZvoltError
from zvolt.logs import JsonFormatter
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


def test_host_keys_are_persisted_private_and_stable(tmp_path: object) -> None:
    state = str(tmp_path)
    keys = HostKeys(state)
    first = keys.secrets_for(HOST)
    assert first.ctrl_secret == "" and decode_secret(first.secret)[0] == 1
    folder = os.path.join(state, "dhchap")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    files = os.listdir(folder)
    assert files == [HOST + ".json"]
    assert stat.S_IMODE(os.stat(os.path.join(folder, files[0])).st_mode) == 0o600
    assert HostKeys(state).secrets_for(HOST) == first  # a restarted agent hands out the same key
    other = keys.secrets_for(OTHER)
    assert other.secret != first.secret
    assert first.secret not in repr(first)


def test_bidirectional_adds_a_controller_secret_and_rotation_replaces_both(tmp_path: object) -> None:
    state = str(tmp_path)
    plain = HostKeys(state).secrets_for(HOST)
    bidi = HostKeys(state, AuthConfig(bidirectional=True))
    both = bidi.secrets_for(HOST)
    assert both.secret == plain.secret and both.ctrl_secret and both.ctrl_secret != both.secret
    assert bidi.secrets_for(HOST) == both
    rotated = bidi.rotate(HOST)
    assert rotated.secret != both.secret and rotated.ctrl_secret != both.ctrl_secret
    assert HostKeys(state, AuthConfig(bidirectional=True)).secrets_for(HOST) == rotated


def test_damaged_or_hostile_names_never_touch_the_filesystem(tmp_path: object) -> None:
    keys = HostKeys(str(tmp_path))
    for hostile in ("../../etc/passwd", "nqn.2014-08.org.nvmexpress:uuid:../x", "nqn.2014-08.a:b/c", "x\x00y"):
        with pytest.raises(ZvoltError) as err:
            keys.secrets_for(hostile)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert os.listdir(os.path.join(str(tmp_path), "dhchap")) == []
    with open(os.path.join(str(tmp_path), "dhchap", HOST + ".json"), "w") as f:
        f.write('{"secret": "DHHC-1:01:AAAA:"}')
    with pytest.raises(ZvoltError) as err:
        keys.secrets_for(HOST)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "remove it to rotate" in err.value.message


def test_apply_writes_the_nvmet_host_attributes(tmp_path: object) -> None:
    root = nvmet.Root(str(tmp_path) + "/cfg", emulate=True)
    root.init_tree()
    keys = HostKeys(str(tmp_path) + "/state", AuthConfig(bidirectional=True, transform=2, dhgroup="ffdhe2048"))
    host = root.host(HOST)
    host.create()
    keys.apply(host)
    found = keys.secrets_for(HOST)
    assert host.attr("dhchap_key") == found.secret and host.attr("dhchap_ctrl_key") == found.ctrl_secret
    assert host.attr("dhchap_hash") == "hmac(sha384)" and host.attr("dhchap_dhgroup") == "ffdhe2048"
    with pytest.raises(nvmet.NvmetError):
        host.set_attr("../allow_any_host", "1")


# -- the agent, the controller and the node plugin, over real gRPC -----------------------------


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


def _agent_parts(tmp: str, zfs: FakeZfs, bidirectional: bool) -> tuple[Volumes, Readiness, Recovery, Index]:
    root = nvmet.Root(f"{tmp}/configfs", emulate=True)
    root.init_tree()
    index = Index(f"{tmp}/state")
    auth = HostKeys(f"{tmp}/state", AuthConfig(bidirectional=bidirectional))
    exports = Exports(zfs, root, ExportConfig("storage-0", "10.42.0.1", "4420", 1.0), auth=auth)
    cfg = AgentConfig(node="storage-0", pool="tank", parent="tank/zvolt", nvme_address="10.42.0.1", nvme_port="4420")
    volumes = Volumes(cfg, zfs, index, exports)
    readiness = Readiness()
    recovery = Recovery(zfs, index, exports, volumes, readiness)
    recovery.run()
    return volumes, readiness, recovery, index


@pytest.fixture(params=[False, True], ids=["one-way", "bidirectional"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    tmp = tempfile.mkdtemp(prefix="zvsec", dir="/tmp")
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    volumes, readiness, _, index = _agent_parts(tmp, zfs, request.param)
    metrics = Metrics()
    agent_server = make_server(AgentServicer(volumes, readiness, metrics), metrics, workers=4)
    agent_server.add_insecure_port(f"unix://{tmp}/agent.sock")
    agent_server.start()
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{tmp}/agent.sock"), tls=None, timeout=10)
    ctl_server, target = build_server(
        Services(identity=IdentityService(True, lambda: True), controller=ControllerService(pool)),
        parse_endpoint(f"unix://{tmp}/controller.sock"),
    )
    ctl_server.start()
    agent_channel = grpc.insecure_channel(f"unix://{tmp}/agent.sock")
    ctl_channel = grpc.insecure_channel(target)
    yield Stack(tmp, zfs, f"{tmp}/configfs", pb_grpc.AgentStub(agent_channel), csi_pb2_grpc.ControllerStub(ctl_channel),
                [agent_server, ctl_server], [agent_channel, ctl_channel], pool, index)
    for ch in (agent_channel, ctl_channel):
        ch.close()
    for s in (ctl_server, agent_server):
        s.stop(None)
    pool.close()
    index.close()
    shutil.rmtree(tmp, ignore_errors=True)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.fmt = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.fmt.format(record))


def test_publish_hands_the_host_its_secret_end_to_end(stack: Stack) -> None:
    cap = _Capture()
    logging.getLogger().addHandler(cap)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        vol = stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-auth", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[CAP]),
            timeout=10).volume
        ctx = dict(stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=HOST, volume_capability=CAP), timeout=10).publish_context)
        local = vol.volume_id.split("/")[1]
        nqn = ctx["nqn"]
        host_dir = os.path.join(stack.configfs, "hosts", HOST)
        with open(os.path.join(host_dir, "dhchap_key")) as f:
            key_in_configfs = f.read()
        # What the target checks is exactly what the node is told to present.
        assert ctx["dhchap_secret"] == key_in_configfs and decode_secret(key_in_configfs)[0] == 1
        bidi = os.path.exists(os.path.join(host_dir, "dhchap_ctrl_key"))
        if bidi:
            with open(os.path.join(host_dir, "dhchap_ctrl_key")) as f:
                assert ctx["dhchap_ctrl_secret"] == f.read() != ctx["dhchap_secret"]
        else:
            assert "dhchap_ctrl_secret" not in ctx
        with open(os.path.join(host_dir, "dhchap_hash")) as f:
            assert f.read() == "hmac(sha256)"
        with open(os.path.join(stack.configfs, "subsystems", nqn, "attr_allow_any_host")) as f:
            assert f.read() == "0"
        assert os.listdir(os.path.join(stack.configfs, "subsystems", nqn, "allowed_hosts")) == [HOST]

        # The node plugin hands those secrets to nvme connect.
        nvme = FakeNvmeHost()
        nvme.add_subsystem(nqn, GiB)
        node = NodeService(HostIdentity(HOST, "11111111-1111-4111-8111-111111111111"), nvme,
                           FakeMounter(nvme.device_size), zone="default", device_timeout=0.5)
        node_server, node_target = build_server(Services(identity=IdentityService(False, lambda: True), node=node),
                                                parse_endpoint(f"unix://{stack.tmp}/node.sock"))
        node_server.start()
        with grpc.insecure_channel(node_target) as ch:
            csi_pb2_grpc.NodeStub(ch).NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=f"{stack.tmp}/stage", volume_capability=CAP,
                publish_context=ctx), timeout=10)
        node_server.stop(None)
        assert nvme.connects[0].dhchap_secret == ctx["dhchap_secret"]
        assert nvme.connects[0].dhchap_ctrl_secret == ctx.get("dhchap_ctrl_secret", "")

        # Same host, second volume: the same per-host secret. Another host: its own.
        vol2 = stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-auth-2", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[CAP]),
            timeout=10).volume
        ctx2 = dict(stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol2.volume_id, node_id=HOST, volume_capability=CAP), timeout=10).publish_context)
        assert ctx2["dhchap_secret"] == ctx["dhchap_secret"]
        other = stack.agent.PublishVolume(pb.PublishVolumeRequest(volume_id=vol2.volume_id.split("/")[1],
                                                                  host_nqn=OTHER), timeout=10)
        assert other.dhchap_secret and other.dhchap_secret != ctx["dhchap_secret"]

        # Unpublish removes the host entry (and its key) from configfs once no subsystem allows it.
        stack.agent.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=vol2.volume_id.split("/")[1],
                                                              host_nqn=OTHER), timeout=10)
        assert not os.path.exists(os.path.join(stack.configfs, "hosts", OTHER))
        for v in (vol, vol2):
            stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=v.volume_id, node_id=HOST), timeout=10)
        assert not os.path.exists(host_dir)
        # Republish later: the persisted key comes back unchanged.
        again = stack.agent.PublishVolume(pb.PublishVolumeRequest(volume_id=local, host_nqn=HOST), timeout=10)
        assert again.dhchap_secret == ctx["dhchap_secret"]
        stack.agent.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=local, host_nqn=HOST), timeout=10)
    finally:
        logging.getLogger().removeHandler(cap)
        logging.getLogger().setLevel(old_level)
    rpc_lines = [line for line in cap.lines if '"rpc"' in line]
    assert any("PublishVolume" in line for line in rpc_lines), "the RPC log lines were captured"
    secrets = {ctx["dhchap_secret"], ctx.get("dhchap_ctrl_secret", "") or ctx["dhchap_secret"], other.dhchap_secret}
    for line in cap.lines:
        for s in secrets:
            assert s not in line and s.split(":")[2][:16] not in line, f"secret leaked into a log line: {line[:200]}"


def test_reboot_restores_host_keys_before_ready(stack: Stack) -> None:
    vol = stack.agent.CreateVolume(pb.CreateVolumeRequest(name="pvc-reboot", size_bytes=GiB), timeout=10).volume
    pub = stack.agent.PublishVolume(pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST), timeout=10)
    # A reboot: configfs is empty, ZFS and the state dir remain. A new agent over the same state.
    shutil.rmtree(stack.configfs)
    _, readiness, _, index = _agent_parts(stack.tmp, stack.zfs, bool(pub.dhchap_ctrl_secret))
    try:
        assert readiness.ready
        with open(os.path.join(stack.configfs, "hosts", HOST, "dhchap_key")) as f:
            assert f.read() == pub.dhchap_secret
        assert os.listdir(os.path.join(stack.configfs, "subsystems", pub.nqn, "allowed_hosts")) == [HOST]
    finally:
        index.close()
