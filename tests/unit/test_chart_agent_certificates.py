"""The chart's tls.agentCertificates: perNode (default) and shared. The rest of the chart's TLS
(shared mode, cert-manager) is in test_chart.py."""

from __future__ import annotations

import base64
import datetime
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_chart import RELEASE, by_kind, container, render  # type: ignore[import-not-found]

from agent import certrequest
from csi import agentsigner
from csi.main import agent_signer, parser

Obj = dict[str, Any]
FULL = f"{RELEASE}-zvolt"


def pod_spec(docs: list[Obj], kind: str, name: str) -> Obj:
    spec: Obj = by_kind(docs, kind)[name]["spec"]["template"]["spec"]
    return spec


def secrets_mounted(docs: list[Obj]) -> dict[str, set[str]]:
    """Secret name -> the pod templates that mount it."""
    out: dict[str, set[str]] = {}
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            for v in d["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in v:
                    out.setdefault(v["secret"]["secretName"], set()).add(d["metadata"]["name"])
    return out


@pytest.fixture(scope="module")
def per_node() -> list[Obj]:
    docs: list[Obj] = render()
    return docs


def test_per_node_is_the_default_and_the_ca_key_is_mounted_only_into_the_controller(per_node: list[Obj]) -> None:
    secrets = by_kind(per_node, "Secret")
    assert f"{FULL}-agent-tls" not in secrets  # no shared agent key anywhere
    assert set(secrets[f"{FULL}-agent-ca"]["data"]) == {"ca.crt"}
    assert secrets[f"{FULL}-agent-ca"]["data"]["ca.crt"] == secrets[f"{FULL}-ca"]["data"]["tls.crt"]
    mounted = secrets_mounted(per_node)
    assert mounted[f"{FULL}-ca"] == {f"{FULL}-controller"}
    assert mounted[f"{FULL}-agent-ca"] == {f"{FULL}-agent"}
    agent = pod_spec(per_node, "DaemonSet", f"{FULL}-agent")
    assert agent["automountServiceAccountToken"] is True
    args = container(agent, "zvolt-agent")["args"]
    assert "--tls-request" in args and not any(a.startswith(("--tls-cert", "--tls-key")) for a in args)
    ctrl = container(pod_spec(per_node, "Deployment", f"{FULL}-controller"), "zvolt-controller")
    assert {"--tls-per-node-names", "--sign-agent-certificates", f"--agent-service-account={FULL}-agent",
            "--agent-signer-ca-cert=/etc/zvolt/ca/tls.crt", "--agent-signer-ca-key=/etc/zvolt/ca/tls.key",
            "--agent-cert-hours=168"} <= set(ctrl["args"])
    assert not any(a.startswith("--tls-server-name") for a in ctrl["args"])
    assert {m["mountPath"]: m["name"] for m in ctrl["volumeMounts"]}["/etc/zvolt/ca"] == "ca"


def test_signer_rbac_is_for_its_own_signer_name_only(per_node: list[Obj]) -> None:
    role = by_kind(per_node, "ClusterRole")[f"{FULL}-agent-signer"]
    signers = [r for r in role["rules"] if "signers" in r["resources"]]
    assert signers == [{"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
                        "resourceNames": [agentsigner.SIGNER_NAME], "verbs": ["approve", "sign"]}]
    binding = by_kind(per_node, "ClusterRoleBinding")[f"{FULL}-agent-signer"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULL}-controller",
                                    "namespace": binding["subjects"][0]["namespace"]}]


def test_rendered_controller_signs_with_the_rendered_ca(per_node: list[Obj], tmp_path: Path) -> None:
    """The controller's command line from the chart, its CA files from the chart's Secret: the
    signer starts and issues a certificate that verifies against the agent's ca.crt."""
    ca = by_kind(per_node, "Secret")[f"{FULL}-ca"]["data"]
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_bytes(base64.b64decode(ca[name]))
    ctrl = container(pod_spec(per_node, "Deployment", f"{FULL}-controller"), "zvolt-controller")
    args = parser().parse_args([a.replace("/etc/zvolt/ca", str(tmp_path)) for a in ctrl["args"]])
    signer = agent_signer(args, api=_NoApi())
    key = ec.generate_private_key(ec.SECP256R1())
    body = certrequest.build_request("storage-0", key, 3600)
    spec = {**body["spec"], "username": f"system:serviceaccount:{args.agent_namespace}:{FULL}-agent",
            "extra": {agentsigner.NODE_NAME_EXTRA: ["storage-0"], agentsigner.POD_NAME_EXTRA: ["p"]}}
    decision = agentsigner.review(spec, signer.policy)
    assert decision.approve, decision.reason
    pem = agentsigner.sign(decision, signer.ca_source())
    agent_ca = base64.b64decode(by_kind(per_node, "Secret")[f"{FULL}-agent-ca"]["data"]["ca.crt"])
    cert = certrequest.check_issued(pem, key, "storage-0", agent_ca)
    # As a TLS peer checks it: the chain found by issuer name and key id, purpose serving.
    (tmp_path / "agent.crt").write_bytes(pem)
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "tls.crt"), "-purpose", "sslserver",
                          str(tmp_path / "agent.crt")], capture_output=True, text=True, check=False)
    assert out.stdout.strip().endswith(": OK"), out.stdout + out.stderr
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(hours=1, minutes=5)
    assert x509.load_pem_x509_certificate(agent_ca).public_bytes(serialization.Encoding.PEM) == agent_ca


class _NoApi:
    def list(self, signer_name: str) -> list[Obj]:
        return []

    def set_condition(self, csr: Obj, kind: str, reason: str, message: str) -> None:
        raise AssertionError("not called")

    def set_certificate(self, csr: Obj, pem: bytes) -> None:
        raise AssertionError("not called")


def test_shared_is_todays_single_agent_certificate() -> None:
    docs = render({"tls": {"agentCertificates": "shared"}})
    assert f"{FULL}-agent-ca" not in by_kind(docs, "Secret") and f"{FULL}-agent-tls" in by_kind(docs, "Secret")
    assert not {f"{FULL}-agent-csr", f"{FULL}-agent-signer"} & set(by_kind(docs, "ClusterRole"))
    agent = pod_spec(docs, "DaemonSet", f"{FULL}-agent")
    assert agent["automountServiceAccountToken"] is False
    assert "--tls-cert=/etc/zvolt/tls/tls.crt" in container(agent, "zvolt-agent")["args"]
    ctrl = container(pod_spec(docs, "Deployment", f"{FULL}-controller"), "zvolt-controller")["args"]
    namespace = by_kind(docs, "DaemonSet")[f"{FULL}-agent"]["metadata"]["namespace"]
    assert f"--tls-server-name={FULL}-agent.{namespace}.svc" in ctrl and "--sign-agent-certificates" not in ctrl
    assert f"{FULL}-ca" not in secrets_mounted(docs)


def test_per_node_with_cert_manager_says_what_to_set() -> None:
    with pytest.raises(Exception, match=r"with tls\.certManager\.enabled set tls\.agentCertificates=shared"):
        render({"tls": {"certManager": {"enabled": True}}})


def test_without_tls_there_is_no_signer() -> None:
    docs = render({"tls": {"enabled": False}})
    ctrl = container(pod_spec(docs, "Deployment", f"{FULL}-controller"), "zvolt-controller")["args"]
    assert "--insecure" in ctrl and not any("sign" in a or "per-node" in a for a in ctrl)
    assert not {f"{FULL}-agent-csr", f"{FULL}-agent-signer"} & set(by_kind(docs, "ClusterRole"))
    assert pod_spec(docs, "DaemonSet", f"{FULL}-agent")["automountServiceAccountToken"] is False
