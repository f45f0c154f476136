"""Per-node agent certificates: the controller's signer (csi/agentsigner.py) issues a serving
certificate only for the node the requesting agent pod runs on; the agent (agent/certrequest.py)
asks for one, keeps it in its state dir and renews it while serving; the controller verifies
each agent against its own node name, so one node's certificate cannot answer for another.

The API server is a fake here (it records username and extra as a real one does for a pod-bound
ServiceAccount token); tests/k8s/test_agent_certificates_k8s.py runs the same against a real one.
gRPC runs for real on 127.0.0.1 with the real agent (`agent.main.build`, fake ZFS).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_security_tls import BASE, CA, free_port  # type: ignore[import-not-found]

from agent import certrequest, nvmet
from agent.fakes import FakeZfs, _Ds
from agent.index import Index
from agent.main import build, node_certificate, parse_settings
from csi import agentsigner
from csi import main as csi_main
from csi.agents import AgentEndpoint, AgentPool, TlsFiles
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb

NS, SA = "zvolt-system", "zvolt-agent"
AGENT_USER = f"system:serviceaccount:{NS}:{SA}"
POLICY = agentsigner.Policy(NS, SA, max_seconds=24 * 3600)


def requester(node: str = "storage-0", user: str = AGENT_USER, pod: str = "zvolt-agent-x") -> dict[str, Any]:
    """What the API server writes into a CSR's spec for a token bound to `pod` on `node`."""
    extra = {"authentication.kubernetes.io/node-name": [node]} if node else {}
    if pod:
        extra["authentication.kubernetes.io/pod-name"] = [pod]
    return {"username": user, "groups": ["system:serviceaccounts", "system:authenticated"], "extra": extra}


def csr_pem(cn: str, sans: list[x509.GeneralName] | None = None, key: Any = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def spec(pem: bytes | None = None, usages: list[str] | None = None, **who: Any) -> dict[str, Any]:
    return {"signerName": agentsigner.SIGNER_NAME, "request": base64.b64encode(
        pem or csr_pem("storage-0", [x509.DNSName("storage-0")])).decode(),
        "usages": usages or list(certrequest.USAGES), **requester(**who)}


def test_the_agents_own_node_is_approved() -> None:
    decision = agentsigner.review(spec(), POLICY)
    assert decision.approve and decision.node == "storage-0", decision.reason


@pytest.mark.parametrize(("change", "why"), [
    ({"who": {"node": "storage-1"}}, "asks for node 'storage-0', but the requesting pod runs on node 'storage-1'"),
    ({"who": {"user": f"system:serviceaccount:{NS}:zvolt-node"}}, "only the agent ServiceAccount"),
    ({"who": {"user": f"system:serviceaccount:other:{SA}"}}, "only the agent ServiceAccount"),
    ({"who": {"user": "kubernetes-admin"}}, "only the agent ServiceAccount"),
    ({"who": {"node": ""}}, "names no pod and node"),
    ({"who": {"pod": ""}}, "names no pod and node"),
    ({"usages": ["digital signature", "server auth", "client auth"]}, "serving only"),
    ({"usages": ["digital signature", "key encipherment"]}, "serving only"),
    ({"pem": csr_pem("storage-0", [x509.DNSName("storage-0"), x509.DNSName("storage-1")])}, "exactly one node"),
    ({"pem": csr_pem("storage-0", [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))])},
     "exactly one node"),
    ({"pem": csr_pem("storage-0", key=ec.generate_private_key(ec.SECP521R1()))}, "key must be"),
    ({"pem": csr_pem("Storage_0")}, "asks for node"),
])
def test_everything_else_is_denied_with_its_reason(change: dict[str, Any], why: str) -> None:
    decision = agentsigner.review(spec(pem=change.get("pem"), usages=change.get("usages"), **change.get("who", {})),
                                  POLICY)
    assert not decision.approve and why in decision.reason, decision.reason


def test_another_signer_and_garbage_are_denied() -> None:
    assert not agentsigner.review({**spec(), "signerName": "kubernetes.io/kubelet-serving"}, POLICY).approve
    assert "not a PEM" in agentsigner.review({**spec(), "request": base64.b64encode(b"junk").decode()},
                                             POLICY).reason
    bad_node = spec(pem=csr_pem("Bad_Node"), node="Bad_Node")
    assert "not a valid DNS-1123 name" in agentsigner.review(bad_node, POLICY).reason


def test_signed_certificate_is_serving_only_for_the_node_and_capped() -> None:
    ca = agentsigner.CA(_ca_cert(), _CA_KEY)
    asked = {**spec(), "expirationSeconds": 10 * 24 * 3600}
    pem = agentsigner.sign(agentsigner.review(asked, POLICY), ca)
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.rfc4514_string() == "CN=storage-0"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["storage-0"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life <= datetime.timedelta(hours=24, minutes=5)  # the policy's cap, not the 10 days asked


_CA_KEY = ec.generate_private_key(ec.SECP256R1())


def _ca_cert(key: Any = _CA_KEY, name: str = "zvolt-test-ca") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))


# --- a fake API server: CSRs in a dict, the requester recorded at create ----------------------


class FakeApiServer:
    def __init__(self) -> None:
        self.csrs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.signer_writes = 0

    def as_requester(self, **who: Any) -> FakeRequester:
        return FakeRequester(self, requester(**who))


class FakeRequester:
    """The agent's side: create and read, with the identity the API server attaches."""

    def __init__(self, server: FakeApiServer, who: dict[str, Any]) -> None:
        self.server, self.who = server, who

    def create(self, body: dict[str, Any]) -> bool:
        with self.server.lock:
            name = body["metadata"]["name"]
            if name in self.server.csrs:
                return False
            self.server.csrs[name] = {"metadata": dict(body["metadata"]), "spec": {**body["spec"], **self.who},
                                      "status": {}}
            return True

    def read(self, name: str) -> dict[str, Any]:
        with self.server.lock:
            return copy.deepcopy(self.server.csrs[name])


class FakeSignerApi:
    """The controller's side."""

    def __init__(self, server: FakeApiServer) -> None:
        self.server = server

    def list(self, signer_name: str) -> list[dict[str, Any]]:
        with self.server.lock:
            return [copy.deepcopy(c) for c in self.server.csrs.values() if c["spec"]["signerName"] == signer_name]

    def set_condition(self, csr: dict[str, Any], kind: str, reason: str, message: str) -> None:
        with self.server.lock:
            self.server.signer_writes += 1
            stored = self.server.csrs[csr["metadata"]["name"]]["status"]
            stored.setdefault("conditions", []).append({"type": kind, "status": "True", "reason": reason,
                                                        "message": message})
            csr["status"] = copy.deepcopy(stored)

    def set_certificate(self, csr: dict[str, Any], pem: bytes) -> None:
        with self.server.lock:
            self.server.signer_writes += 1
            self.server.csrs[csr["metadata"]["name"]]["status"]["certificate"] = base64.b64encode(pem).decode()


@pytest.fixture
def ca_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    cert.write_bytes(_ca_cert().public_bytes(serialization.Encoding.PEM))
    key.write_bytes(_CA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def make_signer(server: FakeApiServer, ca_files: tuple[Path, Path]) -> agentsigner.Signer:
    args = csi_main.parser().parse_args([
        "--mode", "controller", "--sign-agent-certificates", "--agent-namespace", NS, "--agent-service-account", SA,
        "--agent-signer-ca-cert", str(ca_files[0]), "--agent-signer-ca-key", str(ca_files[1]),
        "--agent-cert-hours", "24"])
    return csi_main.agent_signer(args, FakeSignerApi(server))


@contextlib.contextmanager
def signing_in_background(signer: agentsigner.Signer) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=signer.run, args=(stop, 0.05), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


def test_sweep_issues_denies_and_never_signs_what_an_admin_approved_wrongly(ca_files: tuple[Path, Path]) -> None:
    server = FakeApiServer()
    signer = make_signer(server, ca_files)
    key = ec.generate_private_key(ec.SECP256R1())
    server.as_requester(node="storage-0").create(certrequest.build_request("storage-0", key, 3600))
    server.as_requester(node="storage-0").create(certrequest.build_request("storage-1", key, 3600))
    other = certrequest.build_request("storage-2", ec.generate_private_key(ec.SECP256R1()), 3600)
    server.as_requester(node="storage-2").create(other)
    server.csrs[other["metadata"]["name"]]["spec"]["extra"]["authentication.kubernetes.io/node-name"] = ["storage-3"]
    server.csrs[other["metadata"]["name"]]["status"]["conditions"] = [{"type": "Approved", "status": "True"}]
    outcome = signer.sweep()
    assert sorted(outcome.values()) == ["denied: asks for node 'storage-1', but the requesting pod runs on node "
                                        "'storage-0'", "failed: asks for node 'storage-2', but the requesting pod "
                                        "runs on node 'storage-3'", "issued"]
    assert [n for n, c in server.csrs.items() if c["status"].get("certificate")] == [
        certrequest.build_request("storage-0", key, 3600)["metadata"]["name"]]
    writes = server.signer_writes
    assert signer.sweep() == {} and server.signer_writes == writes  # settled requests are left alone


def test_agent_gets_its_certificate_and_a_request_for_another_node_fails(
        ca_files: tuple[Path, Path], tmp_path: Path) -> None:
    server = FakeApiServer()
    signer = make_signer(server, ca_files)
    with signing_in_background(signer):
        keeper = certrequest.NodeCertificate(server.as_requester(node="storage-0"), "storage-0", str(tmp_path / "s"),
                                             str(ca_files[0]), 3600, timeout=10)
        cert = keeper.ensure()
        assert cert.subject.rfc4514_string() == "CN=storage-0"
        assert stat_mode(keeper.paths.key) == 0o600 and stat_mode(keeper.paths.root) == 0o700
        # Root on storage-0 asking for storage-1 with storage-0's pod token: denied, with the reason.
        liar = certrequest.NodeCertificate(server.as_requester(node="storage-0"), "storage-1", str(tmp_path / "l"),
                                           str(ca_files[0]), 3600, timeout=10)
        with pytest.raises(certrequest.CertRequestError, match="runs on node 'storage-0'"):
            liar.ensure()
        # A restart reuses the stored certificate: no new request.
        before = len(server.csrs)
        assert keeper.ensure().serial_number == cert.serial_number and len(server.csrs) == before


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_issued_certificate_is_checked_by_the_agent(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = agentsigner.CA(_ca_cert(), _CA_KEY)
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    good = agentsigner.review({**spec(pem=certrequest_pem("storage-0", key))}, POLICY)
    pem = agentsigner.sign(good, ca)
    assert certrequest.check_issued(pem, key, "storage-0", ca_pem)
    with pytest.raises(certrequest.CertRequestError, match="names"):
        certrequest.check_issued(pem, key, "storage-1", ca_pem)
    with pytest.raises(certrequest.CertRequestError, match="another key"):
        certrequest.check_issued(pem, ec.generate_private_key(ec.SECP256R1()), "storage-0", ca_pem)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _ca_cert(other_key, "other").public_bytes(serialization.Encoding.PEM)
    with pytest.raises(certrequest.CertRequestError, match="not signed by the CA"):
        certrequest.check_issued(pem, key, "storage-0", other)


def certrequest_pem(node: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    return base64.b64decode(certrequest.build_request(node, key, 3600)["spec"]["request"])


def test_agent_settings_for_requested_certificates(tmp_path: Path) -> None:
    s = parse_settings([*BASE, "--state-dir", str(tmp_path), "--tls-request", "--tls-ca", "/ca.crt"], env={})
    assert s.tls == (str(tmp_path / "tls/current/tls.crt"), str(tmp_path / "tls/current/tls.key"), "/ca.crt")
    assert s.tls_request_seconds == 168 * 3600
    for bad in (["--tls-request"], ["--tls-request", "--tls-ca", "/c", "--tls-cert", "/x"],
                ["--tls-request", "--tls-ca", "/c", "--tls-request-hours", "0"]):
        with pytest.raises(SystemExit):
            parse_settings([*BASE, *bad], env={})


def test_controller_signer_needs_its_ca_and_account(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="needs"):
        csi_main.agent_signer(csi_main.parser().parse_args(["--mode", "controller", "--sign-agent-certificates"]))
    with pytest.raises(SystemExit, match="not both"):
        csi_main._pool(csi_main.parser().parse_args([
            "--mode", "controller", "--agents", "a=127.0.0.1:1", "--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a",
            "--tls-server-name", "x", "--tls-per-node-names"]))


# --- gRPC on 127.0.0.1: the controller checks each agent against its own node name -------------


class Served:
    def __init__(self, target: str, ca: CA, client: Any, paths: certrequest.Paths, stop: threading.Event) -> None:
        self.target, self.ca, self.client, self.paths, self.stop = target, ca, client, paths, stop


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The real agent, serving with a certificate its own code asked for (--tls-request), signed
    by the real signer; the controller's client certificate from the same CA."""
    ca = CA(tmp_path, "zvolt")
    ca_key_file = tmp_path / "ca.key"
    ca_key_file.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    server = FakeApiServer()
    signer = make_signer(server, (ca.path, ca_key_file))
    port = free_port()
    settings = parse_settings([*BASE, "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
                               "--tls-request", "--tls-ca", str(ca.path), "--controller-cn", "controller",
                               "--tls-request-hours", "1"], env={})
    stop = threading.Event()
    with signing_in_background(signer):
        node_certificate(settings, server.as_requester(node="storage-0"), stop, retry=0.1)
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    root = nvmet.Root(str(tmp_path / "configfs"), emulate=True)
    root.init_tree()
    index = Index(settings.state_dir)
    agent = build(settings, zfs, root, index)
    agent.server.start()
    agent.recovery.run()
    yield Served(f"127.0.0.1:{port}", ca, ca.issue("controller", server=False), certrequest.paths(settings.state_dir),
                 stop)
    stop.set()
    agent.server.stop(None)
    index.close()


def pool_for(s: Served, node: str, per_node: bool = True) -> AgentPool:
    return AgentPool(lambda: [AgentEndpoint(node, s.target)],
                     TlsFiles(str(s.client.cert), str(s.client.key), str(s.ca.path)), timeout=5,
                     per_node_names=per_node)


def test_controller_accepts_the_agent_of_the_node_it_dials(served: Served) -> None:
    pool = pool_for(served, "storage-0")
    try:
        assert pool.get("storage-0").call("GetInfo", pb.GetInfoRequest()).node_name == "storage-0"
    finally:
        pool.close()


def test_controller_refuses_an_agent_whose_certificate_names_another_node(served: Served) -> None:
    """storage-0's agent (or root on storage-0 with its certificate) answering where the
    controller dials storage-1: the handshake fails, nothing is called."""
    pool = pool_for(served, "storage-1")
    try:
        with pytest.raises(ZvoltError) as err:
            pool.get("storage-1").call("GetInfo", pb.GetInfoRequest())
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "storage-1" in err.value.message
    finally:
        pool.close()


def served_serial(s: Served) -> int:
    """The serial of the certificate a new TLS connection to the agent gets."""
    ctx = ssl.create_default_context(cafile=str(s.ca.path))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(s.client.cert), str(s.client.key))
    ctx.set_alpn_protocols(["h2"])
    host, port = s.target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_renewal_is_served_to_new_connections_without_a_restart(served: Served) -> None:
    pool = pool_for(served, "storage-0")
    try:
        first = served_serial(served)
        assert pool.get("storage-0").call("GetInfo", pb.GetInfoRequest()).ready
        # What the keeper does at 2/3 of the lifetime: a new key and certificate, link swapped.
        new_key = ec.generate_private_key(ec.SECP256R1())
        decision = agentsigner.review(spec(pem=certrequest_pem("storage-0", new_key)), POLICY)
        ca = agentsigner.CA(served.ca.cert, served.ca.key)
        certrequest.store(served.paths, agentsigner.sign(decision, ca), new_key)
        second = served_serial(served)
        assert second != first
        assert second == x509.load_pem_x509_certificate(served.paths.cert.read_bytes()).serial_number
        # The controller's existing channel keeps working across the swap.
        assert pool.get("storage-0").call("GetInfo", pb.GetInfoRequest()).ready
    finally:
        pool.close()


def test_keeper_renews_at_two_thirds_of_the_lifetime(ca_files: tuple[Path, Path], tmp_path: Path) -> None:
    server = FakeApiServer()
    signer = make_signer(server, ca_files)
    keeper = certrequest.NodeCertificate(server.as_requester(), "storage-0", str(tmp_path), str(ca_files[0]), 3600,
                                         timeout=10)
    with signing_in_background(signer):
        cert = keeper.ensure()
        later = cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) * 0.7
        renewed = keeper.ensure(now=later)
    assert renewed.serial_number != cert.serial_number
    assert len(server.csrs) == 2 and len(list(keeper.paths.root.glob("g*"))) == 2  # new + the previous one


def test_rsa_requests_are_accepted_from_2048_bits() -> None:
    key = rsa.generate_private_key(65537, 2048)
    assert agentsigner.review(spec(pem=csr_pem("storage-0", key=key)), POLICY).approve
