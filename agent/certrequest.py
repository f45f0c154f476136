"""This agent's own serving certificate, asked of the Kubernetes API (per-node certificates).

The agent makes a key (ECDSA P-256) and a CertificateSigningRequest for its node name with
signerName zvolt.io/agent-serving; the controller's signer (csi/agentsigner.py) issues it only
to a pod of the agent ServiceAccount running on that node. The key never leaves the node.

Files: `<state-dir>/tls/<generation>/{tls.crt,tls.key}` and a symlink `<state-dir>/tls/current`
to the newest. The agent serves from `current/` through zvolt/tlsfiles.py, which reloads
changed files for the next connection; a renewal writes a new generation and swaps the link
in one rename, so connections never see a half-written set (one handshake that straddles the
swap can pair the old key with the new certificate: it fails, and the next one reloads). A
restart reuses the stored certificate while it is good, so restarts make no new requests.
Renewal starts when a third of the lifetime is left, and retries until it succeeds.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zvolt import kubeconfig

SIGNER_NAME = "zvolt.io/agent-serving"
USAGES = ["digital signature", "key encipherment", "server auth"]
RENEW_AT = 2 / 3  # of the lifetime
RETRY_SECONDS = 30.0

_log = logging.getLogger("zvolt.agent.certrequest")


class CertRequestError(Exception):
    """The request was denied, failed, or the issued certificate is not what was asked for."""


class CsrApi(Protocol):
    """create: the CSR object (a JSON dict); True if made, False if it existed. read: the object."""

    def create(self, body: dict[str, Any]) -> bool: ...
    def read(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def cert(self) -> Path:
        return self.current / "tls.crt"

    @property
    def key(self) -> Path:
        return self.current / "tls.key"


def paths(state_dir: str) -> Paths:
    return Paths(Path(state_dir) / "tls")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build_request(node: str, key: ec.EllipticCurvePrivateKey, seconds: int) -> dict[str, Any]:
    """The CertificateSigningRequest object. Its name is derived from the key, so a retry after a
    lost answer finds the same request instead of making another."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    name = f"zvolt-agent-{node}-{hashlib.sha256(der).hexdigest()[:16]}"[-253:].lstrip(".-")
    return {
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/component": "agent"}},
        "spec": {"request": base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode(),
                 "signerName": SIGNER_NAME, "usages": USAGES, "expirationSeconds": int(seconds)},
    }


def check_issued(cert_pem: bytes, key: ec.EllipticCurvePrivateKey, node: str, ca_pem: bytes,
                 now: datetime.datetime | None = None) -> x509.Certificate:
    """The certificate must be for our key and our node, serving, current, and from our CA."""
    now = now or datetime.datetime.now(datetime.UTC)
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertRequestError("issued certificate is for another key")
    try:
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertRequestError(f"issued certificate lacks {exc.oid}") from None
    if node not in dns:
        raise CertRequestError(f"issued certificate names {dns}, not {node}")
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise CertRequestError("issued certificate is not for serving")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CertRequestError("issued certificate is not valid now")
    for ca in x509.load_pem_x509_certificates(ca_pem):
        try:
            cert.verify_directly_issued_by(ca)
            return cert
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise CertRequestError("issued certificate is not signed by the CA in --tls-ca")


def request(api: CsrApi, node: str, key: ec.EllipticCurvePrivateKey, ca_pem: bytes, seconds: int,
            timeout: float = 300.0, poll: float = 1.0, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> bytes:
    """Create the request (or find it) and wait for the signer's answer; the checked PEM."""
    body = build_request(node, key, seconds)
    name = body["metadata"]["name"]
    api.create(body)
    deadline = clock() + timeout
    while True:
        status = api.read(name).get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") in ("Denied", "Failed") and cond.get("status", "True") == "True":
                raise CertRequestError(f"certificate request {name} {cond['type'].lower()}: "
                                       f"{cond.get('message') or cond.get('reason')}")
        if status.get("certificate"):
            pem = base64.b64decode(status["certificate"])
            check_issued(pem, key, node, ca_pem)
            return pem
        if clock() >= deadline:
            raise CertRequestError(f"certificate request {name}: no answer from the signer in {timeout:.0f} s "
                                   f"(is the zvolt controller running?)")
        sleep(poll)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def store(where: Paths, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> None:
    """A new generation, then the `current` link moved to it in one rename; older ones removed."""
    where.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(where.root, 0o700)
    gen = where.root / f"g{time.time_ns()}"
    gen.mkdir(mode=0o700)
    _write(gen / "tls.key", _pem_key(key), 0o600)
    _write(gen / "tls.crt", cert_pem, 0o644)
    previous = os.readlink(where.current) if where.current.is_symlink() else ""
    link = where.root / f".current-{gen.name}"
    os.symlink(gen.name, link)
    os.replace(link, where.current)
    # The previous generation stays: a reload that resolved the old link may still be reading it.
    for old in where.root.iterdir():
        if old.is_dir() and not old.is_symlink() and old.name not in (gen.name, previous):
            shutil.rmtree(old, ignore_errors=True)


def load(where: Paths, node: str, ca_pem: bytes) -> x509.Certificate | None:
    """The stored certificate if it is still good for this node and CA, else None."""
    try:
        key = serialization.load_pem_private_key(where.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return None
        return check_issued(where.cert.read_bytes(), key, node, ca_pem)
    except (OSError, ValueError, CertRequestError):
        return None


def renew_after(cert: x509.Certificate) -> datetime.datetime:
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + life * RENEW_AT


@dataclass
class NodeCertificate:
    """Keeps `<state-dir>/tls/current` holding a good certificate for this node."""

    api: CsrApi
    node: str
    state_dir: str
    ca_file: str
    seconds: int
    timeout: float = 300.0

    @property
    def paths(self) -> Paths:
        return paths(self.state_dir)

    def _ca(self) -> bytes:
        return Path(self.ca_file).read_bytes()

    def renew(self) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = request(self.api, self.node, key, self._ca(), self.seconds, timeout=self.timeout)
        store(self.paths, pem, key)
        cert = x509.load_pem_x509_certificate(pem)
        _log.info("serving certificate issued", extra={"fields": {
            "node": self.node, "serial": f"{cert.serial_number:x}", "not_after": cert.not_valid_after_utc.isoformat()}})
        return cert

    def ensure(self, now: datetime.datetime | None = None) -> x509.Certificate:
        """At start: the stored certificate if it need not be renewed yet, else a new one."""
        now = now or datetime.datetime.now(datetime.UTC)
        cert = load(self.paths, self.node, self._ca())
        if cert is not None and now < renew_after(cert):
            return cert
        return self.renew()

    def keep(self, cert: x509.Certificate, stop: threading.Event) -> None:
        """Renew at 2/3 of each lifetime; failures retry every RETRY_SECONDS (the old certificate
        serves meanwhile)."""
        while True:
            wait = (renew_after(cert) - datetime.datetime.now(datetime.UTC)).total_seconds()
            if stop.wait(max(0.0, wait)):
                return
            try:
                cert = self.renew()
            except Exception as exc:
                _log.error("serving certificate renewal failed; retrying", extra={"fields": {
                    "node": self.node, "error": str(exc), "retry_s": RETRY_SECONDS}})
                if stop.wait(RETRY_SECONDS):
                    return


class KubernetesCsrApi:  # pragma: no cover - exercised by tests/k8s against a real API server
    """In a pod: the pod's own ServiceAccount token (refreshed by the client as kubelet rotates
    it); elsewhere $KUBECONFIG."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        if api_client is None:
            kubeconfig.load()
            api_client = client.ApiClient()
        self._client = api_client
        self._certs = client.CertificatesV1Api(api_client)

    def create(self, body: dict[str, Any]) -> bool:
        from kubernetes.client.rest import ApiException

        try:
            self._certs.create_certificate_signing_request(body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def read(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._client.sanitize_for_serialization(
            self._certs.read_certificate_signing_request(name))
        return result
