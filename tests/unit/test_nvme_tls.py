"""NVMe/TCP TLS (not the gRPC mTLS of test_security_tls.py): the PSK format and derivation, the
volume's Secret -> target keyring and TLS port -> node plugin, and the host side's
/dev/nvme-fabrics write. On fakes; the kernel and tlshd doing the handshake (and refusing a
clear-text or wrong-key host) are in tests/lab/test_tls_lab.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_security_dhchap import CAP, HOST, GiB, Stack, _agent_parts, _Capture, _stage, running_stack  # type: ignore[import-not-found]

from agent import nvmet
from agent.exports import ExportConfig, Exports
from agent.fakes import FakeZfs, _Ds
from agent.recovery import Readiness, Recovery
from agent.volumes import AgentConfig, Volumes
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.nvme_host import ConnectSpec, SysfsNvmeHost, fabrics_options
from zvolt import tlspsk
from zvolt.errors import ZvoltError
from zvolt.keyring import MemoryKeyring
from zvolt.names import dhchap_secret_name, volume_host_nqn
from zvolt.pb import csi_pb2

SUB = "nqn.2026-11.io.zvolt:storage-0:vabc"


# -- format and derivation ----------------------------------------------------------------------


def test_psk_format_round_trips_and_refuses_damage() -> None:
    key = bytes(range(32))
    psk = tlspsk.encode(key)
    b64 = base64.b64encode(key + zlib.crc32(key).to_bytes(4, "little")).decode()
    assert psk == f"NVMeTLSkey-1:01:{b64}:"
    assert tlspsk.decode(psk) == (1, key)
    assert tlspsk.decode(tlspsk.generate(2))[0] == 2 and len(tlspsk.decode(tlspsk.generate(2))[1]) == 48
    flipped = base64.b64encode(bytes([key[0] ^ 1]) + key[1:] + zlib.crc32(key).to_bytes(4, "little")).decode()
    for bad in ("", "NVMeTLSkey-1:01:" + b64, f"NVMeTLSkey-1:03:{b64}:", f"NVMeTLSkey-1:02:{b64}:",
                f"NVMeTLSkey-1:01:{flipped}:", "DHHC-1:01:" + b64 + ":"):
        with pytest.raises(tlspsk.PskError) as err:
            tlspsk.decode(bad)
        assert b64 not in str(err.value)
    with pytest.raises(tlspsk.PskError):
        tlspsk.encode(bytes(31))


def test_retained_psk_is_hkdf_expand_label_over_the_host_nqn() -> None:
    psk = tlspsk.generate()
    key = tlspsk.decode(psk)[1]
    # RFC 5869 / RFC 8446 7.1 written out independently: Extract(zero salt), one Expand block.
    prk = hmac.new(bytes(32), key, hashlib.sha256).digest()
    label = b"tls13 HostNQN"
    info = (32).to_bytes(2, "big") + bytes([len(label)]) + label + bytes([len(HOST)]) + HOST.encode()
    want = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    assert tlspsk.retained(psk, HOST) == want
    other = "nqn.2026-11.io.zvolt:host:worker-1:22222222-2222-4222-8222-222222222222"
    assert tlspsk.retained(psk, other) != want  # a key given to one host NQN is worth nothing to another
    assert len(tlspsk.retained(tlspsk.generate(2), HOST)) == 48
    assert tlspsk.identity(psk, HOST, SUB) == f"NVMe0R01 {HOST} {SUB}"
    assert tlspsk.identities(HOST, SUB) == [f"NVMe0R01 {HOST} {SUB}", f"NVMe0R02 {HOST} {SUB}"]
    with pytest.raises(ZvoltError):
        tlspsk.identity(psk, "nqn.bad host", SUB)


# -- controller -> agent -> node, over real gRPC with emulated configfs -------------------------


@pytest.fixture
def tls_stack() -> Iterator[tuple[Stack, MemoryKeyring]]:
    keyring = MemoryKeyring()
    with running_stack("", require=False, keyring=keyring) as stack:
        yield stack, keyring


def _port_of(configfs: str, trsvcid: str) -> str:
    for pid in os.listdir(os.path.join(configfs, "ports")):
        with open(os.path.join(configfs, "ports", pid, "addr_trsvcid")) as f:
            if f.read().strip() == trsvcid:
                return os.path.join(configfs, "ports", pid)
    raise AssertionError(f"no port {trsvcid}")


def _create(stack: Stack, name: str, params: dict[str, str]) -> csi_pb2.Volume:
    vol: csi_pb2.Volume = stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[CAP],
        parameters=params), timeout=10).volume
    return vol


@pytest.mark.parametrize("dhchap_mode", ["", "bidirectional"])
def test_a_tls_volume_is_linked_only_to_the_tls_port_with_its_psk_in_the_keyring(
        tls_stack: tuple[Stack, MemoryKeyring], dhchap_mode: str) -> None:
    import logging

    stack, keyring = tls_stack
    cap = _Capture()
    logging.getLogger().addHandler(cap)
    try:
        params = {"tls": "psk", **({"dhchap": dhchap_mode} if dhchap_mode else {})}
        vol = _create(stack, "pvc-tls", params)
        assert vol.volume_context["tls"] == "psk"
        secret = stack.secrets.read(dhchap_secret_name("pvc-tls"))
        assert secret is not None and tlspsk.decode(secret["tlsPsk"])[0] == 1
        assert ("dhchapKey" in secret) == bool(dhchap_mode)
        ctx = dict(stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=HOST, volume_capability=CAP, volume_context=vol.volume_context),
            timeout=10).publish_context)
        assert ctx["tls"] == "psk" and ctx["port"] == "4421"
        assert not [k for k, v in ctx.items() if "NVMeTLSkey" in v or "DHHC" in v]
        nqn = ctx["nqn"]
        per_volume = volume_host_nqn(HOST, vol.volume_id.split("/")[1])
        tls_port = _port_of(stack.configfs, "4421")
        with open(os.path.join(tls_port, "addr_tsas")) as f:
            assert f.read().strip() == "tls1.3"
        assert os.listdir(os.path.join(tls_port, "subsystems")) == [nqn]
        # Never in the clear: not linked to the plain port (made by nothing else here, or empty).
        plain = [p for p in os.listdir(os.path.join(stack.configfs, "ports"))
                 if os.path.join(stack.configfs, "ports", p) != tls_port]
        for p in plain:
            assert nqn not in os.listdir(os.path.join(stack.configfs, "ports", p, "subsystems"))
        identity = tlspsk.identity(secret["tlsPsk"], per_volume, nqn)
        assert keyring.keys == {identity: tlspsk.retained(secret["tlsPsk"], per_volume)}

        # The node plugin connects with TLS under the per-volume NQN, the PSK from its node-stage secret.
        nvme = _stage(stack, vol, ctx, secret)
        assert nvme.connects[0].tls_psk == secret["tlsPsk"] and nvme.connects[0].hostnqn == per_volume
        assert nvme.connects[0].port == "4421"
        assert "NVMeTLSkey" not in repr(nvme.connects[0])
        with pytest.raises(grpc.RpcError) as err:
            _stage(stack, vol, ctx, {**{k: v for k, v in secret.items() if k != "tlsPsk"}, "other": "x"})
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "tlsPsk" in (err.value.details() or "")

        # A weakened TLS port (tsas none) or a missing keyring entry makes the volume unhealthy.
        got = stack.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id),
                                                   timeout=10)
        assert not got.status.volume_condition.abnormal, got.status.volume_condition.message
        keyring.keys.clear()
        got = stack.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id),
                                                   timeout=10)
        assert got.status.volume_condition.abnormal and "TLS PSK" in got.status.volume_condition.message
        # Publishing again repairs it (idempotent publish rewrites what condition() found missing).
        stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=HOST, volume_capability=CAP, volume_context=vol.volume_context),
            timeout=10)
        assert identity in keyring.keys

        stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=HOST), timeout=10)
        assert keyring.keys == {} and os.listdir(os.path.join(tls_port, "subsystems")) == []
        assert os.listdir(os.path.join(stack.tmp, "state", "dhchap")) == []
        stack.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=10)
        assert stack.secrets.secrets == {}
    finally:
        logging.getLogger().removeHandler(cap)
    for line in cap.lines:
        assert secret["tlsPsk"].split(":")[2][:16] not in line, f"a PSK leaked into a log line: {line[:200]}"


def test_a_tls_class_needs_a_controller_that_keeps_keys_and_a_valid_mode(tmp_path: Path) -> None:
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{tmp_path}/none.sock"), tls=None, timeout=1)
    ctl = ControllerService(pool, keys=None)
    with pytest.raises(ZvoltError) as err:
        ctl.CreateVolume(csi_pb2.CreateVolumeRequest(name="pvc-x", volume_capabilities=[CAP],
                                                     parameters={"tls": "psk"}), None)  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "tls=psk" in err.value.message
    with pytest.raises(ZvoltError) as err:
        ctl.CreateVolume(csi_pb2.CreateVolumeRequest(name="pvc-x", volume_capabilities=[CAP],
                                                     parameters={"tls": "x509"}), None)  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "psk, off" in err.value.message
    pool.close()


def test_restart_puts_the_psks_back_and_links_tls_volumes_to_the_tls_port(tmp_path: Path) -> None:
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    volumes, _, _, index = _agent_parts(str(tmp_path), zfs, False, require=False)
    volumes.exports.keyring = MemoryKeyring()
    from agent.dhchap import HostSecrets
    from agent.volumes import VolumeSpec

    rec = volumes.create_volume(VolumeSpec(name="pvc-r", size=GiB))
    psk = tlspsk.generate()
    per_volume = volume_host_nqn(HOST, rec.id)
    nqn = volumes.publish(rec.id, HOST, auth=HostSecrets(HOST, "", "", psk))
    index.close()
    # Reboot: configfs and the keyring are empty again.
    shutil.rmtree(tmp_path / "configfs")
    root = nvmet.Root(f"{tmp_path}/configfs", emulate=True)
    root.init_tree()
    from agent.dhchap import AuthConfig, HostKeys
    from agent.index import Index

    index2 = Index(f"{tmp_path}/state")
    keyring = MemoryKeyring()
    exports = Exports(zfs, root, ExportConfig("storage-0", "10.42.0.1", "4420", 1.0),
                      auth=HostKeys(f"{tmp_path}/state", AuthConfig()), keyring=keyring)
    cfg = AgentConfig(node="storage-0", pool="tank", parent="tank/zvolt", nvme_address="10.42.0.1", nvme_port="4420")
    again = Volumes(cfg, zfs, index2, exports)
    Recovery(zfs, index2, exports, again, Readiness()).run()
    assert keyring.has(tlspsk.identity(psk, per_volume, nqn))
    tls_port = root.find_port("10.42.0.1", "4421")
    assert tls_port is not None and tls_port.links(nqn) and tls_port.tsas == "tls1.3"
    plain = root.find_port("10.42.0.1", "4420")
    assert plain is None or not plain.links(nqn)
    assert exports.condition(rec.id, rec.dataset, [per_volume]) == (True, "")
    # Tampering the agent did not do is reported: the subsystem also in the clear, a TLS port
    # that no longer requires TLS.
    clear = root.find_or_create_port("10.42.0.1", "4420")
    clear.add_subsystem(root.subsystem(nqn))
    healthy, why = exports.condition(rec.id, rec.dataset, [per_volume])
    assert not healthy and "clear-text port 4420" in why
    clear.remove_subsystem(nqn)
    tls_port.set_tsas("none")
    healthy, why = exports.condition(rec.id, rec.dataset, [per_volume])
    assert not healthy and "does not require TLS 1.3" in why
    index2.close()


# -- the host side: /dev/nvme-fabrics and the keyring ---------------------------------------------


def _spec(**kw: str) -> ConnectSpec:
    base = dict(nqn=SUB, transport="tcp", address="10.42.0.1", port="4421", hostnqn=HOST,
                hostid="11111111-1111-4111-8111-111111111111", ctrl_loss_tmo=600, reconnect_delay=10)
    return ConnectSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_a_tls_connect_files_the_psk_and_writes_the_fabrics_options(tmp_path: Path) -> None:
    psk = tlspsk.generate()
    keyring = MemoryKeyring()
    fabrics = tmp_path / "nvme-fabrics"
    fabrics.write_text("")
    ran: list[list[str]] = []

    def runner(argv: list[str], timeout: float) -> object:
        ran.append(argv)
        from csi.runner import Result
        return Result(0, "", "")

    host = SysfsNvmeHost(str(tmp_path), runner=runner, keyring=keyring, fabrics=str(fabrics))  # type: ignore[arg-type]
    host.connect(_spec(tls_psk=psk))
    assert ran == []  # not nvme-cli: Debian's 2.3 has no --tls
    assert fabrics.read_text() == fabrics_options(_spec(tls_psk=psk))
    assert fabrics.read_text().endswith(",tls") and psk not in fabrics.read_text()
    identity = tlspsk.identity(psk, HOST, SUB)
    assert keyring.keys == {identity: tlspsk.retained(psk, HOST)}
    # NodeUnstageVolume's forget_psks takes it out again (whatever its hash); no keyring: a no-op.
    host.forget_psks(HOST, SUB)
    assert keyring.keys == {}
    SysfsNvmeHost(str(tmp_path), runner=runner).forget_psks(HOST, SUB)  # type: ignore[arg-type]
    # Without a keyring, or with a broken fabrics device, the error says what to check.
    with pytest.raises(ZvoltError) as err:
        SysfsNvmeHost(str(tmp_path), runner=runner).connect(_spec(tls_psk=psk))  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ZvoltError) as err:
        SysfsNvmeHost(str(tmp_path), runner=runner, keyring=keyring,  # type: ignore[arg-type]
                      fabrics=str(tmp_path / "missing" / "fabrics")).connect(_spec(tls_psk=psk))
    assert "tlshd" in err.value.message and psk not in err.value.message
    with pytest.raises(ZvoltError):
        _spec(tls_psk="NVMeTLSkey-1:01:AAAA:").validate()


def test_node_unstage_forgets_the_per_volume_psk_even_when_the_target_ended_the_controller() -> None:
    from csi.fakes import FakeMounter, FakeNvmeHost
    from csi.host_identity import HostIdentity
    from csi.node import NodeService

    nvme = FakeNvmeHost()
    node = NodeService(HostIdentity(HOST, "11111111-1111-4111-8111-111111111111"), nvme,
                       FakeMounter(nvme.device_size), zone="default", device_timeout=0.5)
    vid = "storage-0/vabc"
    node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path="/tmp/zv-none"),
                           None)  # type: ignore[arg-type]
    assert nvme.forgotten == [(volume_host_nqn(HOST, "vabc"), SUB)]
