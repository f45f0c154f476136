"""The signer of agents' serving certificates (Kubernetes signerName zvolt.io/agent-serving).

Each agent asks for a certificate for its own storage node with a CertificateSigningRequest
(agent/certrequest.py). The controller, which alone holds the CA key, approves and signs a
request only when the API server says that it comes from this release's agent ServiceAccount,
through a token bound to a pod, and that this pod runs on the node the certificate would name
(`spec.extra["authentication.kubernetes.io/node-name"]`: the API server records the node of the
pod a bound token belongs to, Kubernetes >= 1.30). Root on one storage node holds only its
own node's tokens, so it can get a certificate for that node and no other. Everything else is
denied with the reason.

The certificate is built here from the request's public key and the node name alone: nothing
else the request asks for (extensions, other names) reaches it. Serving only (serverAuth).
"""

from __future__ import annotations

import base64
import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zvolt import kubeconfig
from zvolt.errors import ZvoltError
from zvolt.names import check_node

SIGNER_NAME = "zvolt.io/agent-serving"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
# What an agent may ask for; "server auth" is required. Never "client auth": an agent's
# certificate must not let it call another agent.
ALLOWED_USAGES = frozenset({"digital signature", "key encipherment", "server auth"})
MIN_SECONDS = 600  # the API server's own floor for spec.expirationSeconds
DEFAULT_HOURS = 168
_CURVES = (ec.SECP256R1, ec.SECP384R1)

_log = logging.getLogger("zvolt.csi.agentsigner")


@dataclass(frozen=True)
class Policy:
    namespace: str  # the release's namespace
    service_account: str  # the agent DaemonSet's ServiceAccount
    max_seconds: int = DEFAULT_HOURS * 3600

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@dataclass(frozen=True)
class Decision:
    approve: bool
    reason: str
    node: str = ""
    public_key: Any = None
    seconds: int = 0


def _deny(reason: str) -> Decision:
    return Decision(False, reason)


def _one(extra: Mapping[str, Any], key: str) -> str:
    values = extra.get(key) or []
    return str(values[0]) if len(values) == 1 else ""


def review(spec: Mapping[str, Any], policy: Policy) -> Decision:
    """Approve or deny one request (its `spec`, as the API returns it). Only facts the API server
    recorded about the requester (username, extra) are trusted; the request itself only says
    which node name and key it wants, and both are checked against those facts."""
    if spec.get("signerName") != SIGNER_NAME:
        return _deny(f"signer {spec.get('signerName')!r} is not {SIGNER_NAME}")
    username = str(spec.get("username") or "")
    if username != policy.username:
        return _deny(f"requested by {username!r}: only the agent ServiceAccount {policy.username} gets agent "
                     "certificates")
    extra = spec.get("extra") or {}
    node = _one(extra, NODE_NAME_EXTRA)
    if not node or not _one(extra, POD_NAME_EXTRA):
        return _deny("the requester's token names no pod and node: use the pod's own ServiceAccount token "
                     "(bound to the pod; Kubernetes >= 1.30)")
    usages = set(spec.get("usages") or [])
    if "server auth" not in usages or not usages <= ALLOWED_USAGES:
        return _deny(f"usages {sorted(usages)}: an agent certificate is for serving only "
                     f"(allowed: {sorted(ALLOWED_USAGES)}, server auth required)")
    try:
        csr = x509.load_pem_x509_csr(base64.b64decode(str(spec.get("request") or "")))
    except ValueError as exc:
        return _deny(f"the request is not a PEM certificate request: {exc}")
    if not csr.is_signature_valid:
        return _deny("the request's signature does not match its key")
    wanted = _requested_name(csr)
    if wanted is None:
        return _deny("the request must name exactly one node: subject CN=<node> and at most a DNS name equal to it")
    if wanted != node:
        return _deny(f"asks for node {wanted!r}, but the requesting pod runs on node {node!r}")
    try:
        check_node(node)
    except ZvoltError as exc:
        return _deny(exc.message)
    key = csr.public_key()
    if not _key_ok(key):
        return _deny("key must be ECDSA P-256/P-384 or RSA of at least 2048 bits")
    requested = spec.get("expirationSeconds")
    seconds = policy.max_seconds if requested is None else max(MIN_SECONDS, min(int(requested), policy.max_seconds))
    return Decision(True, f"pod on node {node} asked for its own serving certificate", node, key, seconds)


def _requested_name(csr: x509.CertificateSigningRequest) -> str | None:
    attrs = list(csr.subject)
    if len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME:
        return None
    cn = str(attrs[0].value)
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return cn
    names = list(sans)
    if any(not isinstance(n, x509.DNSName) for n in names) or {n.value for n in names} - {cn}:
        return None
    return cn


def _key_ok(key: Any) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, _CURVES)
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: Any

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CA:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("the CA key does not belong to the CA certificate")
        return cls(cert, key)


def sign(decision: Decision, ca: CA, now: datetime.datetime | None = None) -> bytes:
    """The serving certificate for an approved decision (PEM): CN and DNS name = the node."""
    assert decision.approve
    now = now or datetime.datetime.now(datetime.UTC)
    rsa_key = isinstance(decision.public_key, rsa.RSAPublicKey)
    not_after = min(now + datetime.timedelta(seconds=decision.seconds), ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, decision.node)]))
        .issuer_name(ca.cert.subject).public_key(decision.public_key).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=rsa_key, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(decision.node)]), critical=False)
        .add_extension(_authority_key_id(ca.cert), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:  # pragma: no cover - a broken CA pair
        raise ValueError(f"signed certificate does not verify against the CA: {exc}") from exc
    return cert.public_bytes(serialization.Encoding.PEM)


def _authority_key_id(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Copied from the CA's own subject key id when it has one: TLS stacks find the issuer by it,
    and how it is derived differs (Go >= 1.25, which Helm's genCA uses, hashes with SHA-256)."""
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


class CsrApi(Protocol):
    """The few CertificateSigningRequest calls the signer makes (objects as JSON dicts)."""

    def list(self, signer_name: str) -> list[dict[str, Any]]: ...
    def set_condition(self, csr: dict[str, Any], kind: str, reason: str, message: str) -> None: ...
    def set_certificate(self, csr: dict[str, Any], pem: bytes) -> None: ...


def _state(csr: Mapping[str, Any]) -> set[str]:
    status = csr.get("status") or {}
    kinds = {c.get("type") for c in status.get("conditions") or [] if c.get("status", "True") == "True"}
    if status.get("certificate"):
        kinds.add("Issued")
    return {str(k) for k in kinds}


class Signer:
    """Reviews every request of our signer that is neither denied, failed nor issued yet."""

    def __init__(self, api: CsrApi, ca_source: Callable[[], CA], policy: Policy) -> None:
        self.api, self.ca_source, self.policy = api, ca_source, policy

    def sweep(self) -> dict[str, str]:
        """One pass; returns {csr name: "issued" | "denied" | "skipped: why"}."""
        done: dict[str, str] = {}
        for csr in self.api.list(SIGNER_NAME):
            name = str(csr["metadata"]["name"])
            state = _state(csr)
            if state & {"Denied", "Failed", "Issued"}:
                continue
            try:
                done[name] = self._handle(csr, state)
            except ConflictError:
                done[name] = "skipped: changed meanwhile (another replica?)"
            fields = {"csr": name, "outcome": done[name], "requester": csr["spec"].get("username", "")}
            _log.info("agent certificate request", extra={"fields": fields})
        return done

    def _handle(self, csr: dict[str, Any], state: set[str]) -> str:
        decision = review(csr["spec"], self.policy)
        if not decision.approve:
            # A request someone else approved is still never signed when it fails the review.
            kind = "Failed" if "Approved" in state else "Denied"
            self.api.set_condition(csr, kind, "ZvoltAgentSignerPolicy", decision.reason)
            return f"{kind.lower()}: {decision.reason}"
        if "Approved" not in state:
            self.api.set_condition(csr, "Approved", "ZvoltAgentSignerPolicy", decision.reason)
        self.api.set_certificate(csr, sign(decision, self.ca_source()))
        return "issued"

    def run(self, stop: threading.Event, interval: float = 2.0) -> None:
        while not stop.is_set():
            try:
                self.sweep()
            except Exception:
                _log.exception("agent certificate signer: sweep failed; retrying")
            stop.wait(interval)


class ConflictError(Exception):
    """The object changed since it was read (HTTP 409)."""


class KubernetesCsrApi:  # pragma: no cover - exercised by tests/k8s against a real API server
    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        if api_client is None:
            kubeconfig.load()
            api_client = client.ApiClient()
        self._client = api_client
        self._certs = client.CertificatesV1Api(api_client)

    def list(self, signer_name: str) -> list[dict[str, Any]]:
        found = self._certs.list_certificate_signing_request(field_selector=f"spec.signerName={signer_name}")
        return [self._client.sanitize_for_serialization(item) for item in found.items]

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        from kubernetes.client.rest import ApiException

        try:
            fn(*args)
        except ApiException as exc:
            if exc.status == 409:
                raise ConflictError(str(exc.reason)) from None
            raise

    def set_condition(self, csr: dict[str, Any], kind: str, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = csr.setdefault("status", {})
        status.setdefault("conditions", []).append({
            "type": kind, "status": "True", "reason": reason, "message": message[:1000],
            "lastUpdateTime": now, "lastTransitionTime": now})
        # Approved/Denied go through the approval subresource, Failed (the signer's verdict) through status.
        write = self._certs.replace_certificate_signing_request_status if kind == "Failed" \
            else self._certs.replace_certificate_signing_request_approval
        self._call(write, csr["metadata"]["name"], csr)
        # The next write needs the new resourceVersion.
        fresh = self._certs.read_certificate_signing_request(csr["metadata"]["name"])
        csr.clear()
        csr.update(self._client.sanitize_for_serialization(fresh))

    def set_certificate(self, csr: dict[str, Any], pem: bytes) -> None:
        csr.setdefault("status", {})["certificate"] = base64.b64encode(pem).decode()
        self._call(self._certs.replace_certificate_signing_request_status, csr["metadata"]["name"], csr)
