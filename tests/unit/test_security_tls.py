"""Control-plane access: mTLS between controller and agents, caller roles on the agent (only
the controller's certificate changes anything), certificate rotation without a restart,
root-only CSI sockets.

Certificates are made in the test (cryptography); the agent is the real `agent.main.build`
serving on 127.0.0.1 over fakes; the client is the controller's real AgentPool.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import nvmet
from agent.fakes import FakeZfs, _Ds
from agent.index import Index
from agent.main import build, parse_settings
from csi import main as csi_main
from csi.agents import AgentEndpoint, AgentPool, TlsFiles
from csi.identity import IdentityService
from csi.server import Services, build_server
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc
from zvolt.rpc import parse_endpoint

BASE = ["--node-name", "storage-0", "--pool", "tank", "--nvme-listen", "10.42.0.1:4420"]


@dataclass
class Issued:
    cert: Path
    key: Path


class CA:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, server: bool, client_too: bool = False) -> Issued:
        """A leaf certificate; `client_too`: also valid as a client, as Helm's genSignedCert makes them."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH,
                 *([ExtendedKeyUsageOID.CLIENT_AUTH] if client_too else [])]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        out = Issued(self.folder / f"{self.name}-{cn}.pem", self.folder / f"{self.name}-{cn}.key")
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(out.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    ca: CA
    rogue: CA
    server: Issued
    client: Issued
    rogue_client: Issued
    target: str


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca, rogue = CA(tmp_path, "zvolt"), CA(tmp_path, "rogue")
    server = ca.issue("agent", server=True)
    port = free_port()
    settings = parse_settings(
        [*BASE, "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
         "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(ca.path),
         "--controller-cn", "controller"], env={})
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    root = nvmet.Root(str(tmp_path / "configfs"), emulate=True)
    root.init_tree()
    index = Index(settings.state_dir)
    agent = build(settings, zfs, root, index)
    agent.server.start()
    agent.recovery.run()
    yield Pki(ca, rogue, server, ca.issue("controller", server=False), rogue.issue("controller", server=False),
              f"127.0.0.1:{port}")
    agent.server.stop(None)
    index.close()


def get_info(target: str, creds: grpc.ChannelCredentials | None) -> Any:
    channel = grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    with channel:
        return pb_grpc.AgentStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)


def test_controller_with_a_client_cert_from_the_ca_gets_in(pki: Pki) -> None:
    pool = AgentPool(lambda: [AgentEndpoint("storage-0", pki.target)],
                     TlsFiles(str(pki.client.cert), str(pki.client.key), str(pki.ca.path)), timeout=5)
    try:
        info = pool.get("storage-0").call("GetInfo", pb.GetInfoRequest())
        assert info.node_name == "storage-0" and info.ready
    finally:
        pool.close()


def _refused(target: str, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        get_info(target, creds)
    return err.value.code()  # type: ignore[no-any-return]


def test_plaintext_client_is_refused(pki: Pki) -> None:
    assert _refused(pki.target, None) == grpc.StatusCode.UNAVAILABLE


def test_client_without_a_certificate_is_refused(pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.path.read_bytes())
    assert _refused(pki.target, creds) == grpc.StatusCode.UNAVAILABLE


def test_client_cert_from_another_ca_is_refused(pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.path.read_bytes(),
                                         private_key=pki.rogue_client.key.read_bytes(),
                                         certificate_chain=pki.rogue_client.cert.read_bytes())
    assert _refused(pki.target, creds) == grpc.StatusCode.UNAVAILABLE
    # Through the controller's own client code too: the error names the node, code kept.
    pool = AgentPool(lambda: [AgentEndpoint("storage-0", pki.target)],
                     TlsFiles(str(pki.rogue_client.cert), str(pki.rogue_client.key), str(pki.ca.path)), timeout=5)
    try:
        with pytest.raises(ZvoltError) as err:
            pool.get("storage-0").call("GetInfo", pb.GetInfoRequest())
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "storage-0" in err.value.message
    finally:
        pool.close()


def test_controller_refuses_an_agent_whose_cert_it_cannot_verify(pki: Pki) -> None:
    # A right client cert, but the controller only trusts the rogue CA: an impostor agent check.
    creds = grpc.ssl_channel_credentials(root_certificates=pki.rogue.path.read_bytes(),
                                         private_key=pki.client.key.read_bytes(),
                                         certificate_chain=pki.client.cert.read_bytes())
    assert _refused(pki.target, creds) == grpc.StatusCode.UNAVAILABLE


def test_agent_refuses_to_start_without_tls_unless_insecure(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings([*BASE, "--state-dir", str(tmp_path)], env={})
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_settings([*BASE, "--tls-cert", "/x.pem"], env={})  # half a TLS config is not TLS
    assert parse_settings([*BASE, "--insecure"], env={}).tls is None
    assert parse_settings(BASE, env={"ZVOLT_INSECURE": "true"}).tls is None
    with pytest.raises(SystemExit):
        parse_settings(BASE, env={"ZVOLT_INSECURE": "no"})


def test_controller_refuses_to_start_without_tls_unless_insecure(tmp_path: Path) -> None:
    args = csi_main.parser().parse_args(["--mode", "controller", "--agents", "storage-0=127.0.0.1:7001"])
    with pytest.raises(SystemExit) as exc:
        csi_main._controller(args)
    assert "--insecure" in str(exc.value.code)


def test_csi_socket_is_root_only(sockdir: str) -> None:
    folder = sockdir
    sub = os.path.join(folder, "csi")
    endpoint = parse_endpoint(f"unix://{sub}/csi.sock")
    server, _ = build_server(Services(identity=IdentityService(False, lambda: True)), endpoint)
    server.start()
    try:
        st = os.stat(endpoint.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.geteuid()
        assert stat.S_IMODE(os.stat(sub).st_mode) & 0o007 == 0  # no access for others to the folder
    finally:
        server.stop(None)


# --- caller roles and rotation -------------------------------------------------------

HOST = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001"


def call(pki: Pki, who: Issued, method: str, request: Any) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.path.read_bytes(),
                                         private_key=who.key.read_bytes(), certificate_chain=who.cert.read_bytes())
    with grpc.secure_channel(pki.target, creds) as channel:
        try:
            getattr(pb_grpc.AgentStub(channel), method)(request, timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_only_the_controller_certificate_changes_anything(pki: Pki) -> None:
    node_plugin = pki.ca.issue("zvolt-node", server=False)
    other_agent = pki.ca.issue("storage-1", server=True, client_too=True)  # Helm makes them so
    create = pb.CreateVolumeRequest(name="pvc-roles", size_bytes=1 << 30)
    for who in (node_plugin, other_agent):
        assert call(pki, who, "GetInfo", pb.GetInfoRequest()) == grpc.StatusCode.OK
        assert call(pki, who, "CreateVolume", create) == grpc.StatusCode.PERMISSION_DENIED
        assert call(pki, who, "ListVolumes", pb.ListVolumesRequest()) == grpc.StatusCode.PERMISSION_DENIED
    assert call(pki, pki.client, "CreateVolume", create) == grpc.StatusCode.OK
    pool = AgentPool(lambda: [AgentEndpoint("storage-0", pki.target)],
                     TlsFiles(str(pki.client.cert), str(pki.client.key), str(pki.ca.path)), timeout=5)
    try:
        vol = pool.get("storage-0").call("ListVolumes", pb.ListVolumesRequest()).volumes[0]
    finally:
        pool.close()
    publish = pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST)
    # Root on another storage node, with its own certificate, cannot publish a volume to itself.
    assert call(pki, other_agent, "PublishVolume", publish) == grpc.StatusCode.PERMISSION_DENIED
    assert call(pki, node_plugin, "DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.id)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert call(pki, pki.client, "DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.id)) == grpc.StatusCode.OK


def test_certificates_rotate_without_a_restart(pki: Pki, tmp_path: Any) -> None:
    """A new CA: the CA files hold both during the change; the agent takes its new server
    certificate and the controller its new client certificate, neither restarted."""
    old_ca = pki.ca.path.read_bytes()
    new_ca = CA(tmp_path, "zvolt-next")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.path.read_bytes() + new_ca.path.read_bytes())
    ctrl_files = tmp_path / "ctrl.pem", tmp_path / "ctrl.key", tmp_path / "ctrl-ca.pem"
    shutil.copy(pki.client.cert, ctrl_files[0])
    shutil.copy(pki.client.key, ctrl_files[1])
    shutil.copy(pki.ca.path, ctrl_files[2])
    pool = AgentPool(lambda: [AgentEndpoint("storage-0", pki.target)],
                     TlsFiles(*(str(f) for f in ctrl_files)), timeout=5, ttl=0)
    try:
        assert pool.get("storage-0").call("GetInfo", pb.GetInfoRequest()).ready
        # Step 1: both sides trust both CAs (the agent's CA file is its --tls-ca).
        shutil.copy(bundle, pki.ca.path)
        shutil.copy(bundle, ctrl_files[2])
        # Step 2: the agent serves a certificate of the new CA.
        server = new_ca.issue("agent", server=True)
        time.sleep(0.01)  # a distinct mtime
        shutil.copy(server.cert, pki.server.cert)
        shutil.copy(server.key, pki.server.key)
        # Step 3: the controller gets a client certificate of the new CA.
        client = new_ca.issue("controller", server=False)
        shutil.copy(client.cert, ctrl_files[0])
        shutil.copy(client.key, ctrl_files[1])
        # Step 4: the old CA goes from both.
        shutil.copy(new_ca.path, pki.ca.path)
        shutil.copy(new_ca.path, ctrl_files[2])
        info = pool.get("storage-0").call("GetInfo", pb.GetInfoRequest())
        assert info.ready
        # The agent really serves the new certificate: a client that trusts only the old CA fails.
        old_only = grpc.ssl_channel_credentials(root_certificates=old_ca,
                                                private_key=pki.client.key.read_bytes(),
                                                certificate_chain=pki.client.cert.read_bytes())
        with grpc.secure_channel(pki.target, old_only) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.AgentStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
        # And the old client certificate is no longer accepted (its CA is gone from the agent).
        with pytest.raises(ZvoltError):
            AgentPool(lambda: [AgentEndpoint("storage-0", pki.target)],
                      TlsFiles(str(pki.client.cert), str(pki.client.key), str(new_ca.path)), timeout=5
                      ).get("storage-0").call("GetInfo", pb.GetInfoRequest())
    finally:
        pool.close()
