"""The chart carries NVMe/TCP TLS (a class's `tls: psk`): such a class names the volume's Secret as
its node-stage secret whether DH-HMAC-CHAP is on or not, since the PSK lives there; the controller
then keeps Secrets in the release namespace even with `dhchap: off`, while the agents' --dhchap
stays DH-HMAC-CHAP's alone. Every agent serves TLS volumes on a second port and every node's guard
covers both ports. Values that cannot work fail the render."""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from test_chart import (  # type: ignore[import-not-found]
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    STORAGE_NETWORK,
    by_kind,
    container,
    render,
    with_required,
)

from csi import params

Obj = dict[str, Any]
FULL = f"{RELEASE}-zvolt"
NODE_STAGE = "csi.storage.k8s.io/node-stage-secret-"
SECRET = "zvolt-dhchap-${pv.name}"
SC: Obj = {"name": "x", "volblocksize": "8K", "compression": "lz4", "thin": True, "fsType": "ext4",
           "reclaimPolicy": "Delete"}
TLS_SC: Obj = {**SC, "name": "sealed", "tls": "psk"}


def _pod(docs: list[Obj], kind: str, name: str) -> Obj:
    spec: Obj = by_kind(docs, kind)[f"{FULL}-{name}"]["spec"]["template"]["spec"]
    return spec


def _args(docs: list[Obj], kind: str, name: str, cname: str) -> list[str]:
    args: list[str] = container(_pod(docs, kind, name), cname)["args"]
    return args


def _agent_args(docs: list[Obj]) -> list[str]:
    return _args(docs, "DaemonSet", "agent", "zvolt-agent")


def _node_args(docs: list[Obj]) -> list[str]:
    return _args(docs, "DaemonSet", "node", "zvolt-node")


def _controller_args(docs: list[Obj]) -> list[str]:
    return _args(docs, "Deployment", "controller", "zvolt-controller")


def _secret_rbac(docs: list[Obj]) -> list[str]:
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs
                  if d["kind"] in {"Role", "RoleBinding"} and d["metadata"]["name"] == f"{FULL}-dhchap-secrets")


def _class_texts(values: Obj) -> dict[str, str]:
    """Each StorageClass as rendered text: a key written twice is lost once YAML has parsed it."""
    out: dict[str, str] = helm_python.Chart.load(CHART).render(with_required(values), name=RELEASE,
                                                              namespace=NAMESPACE, is_install=True)
    text = next(t for p, t in out.items() if p.endswith("/storageclasses.yaml"))
    docs = [d for d in text.split("\n---\n") if "kind: StorageClass" in d]
    return {yaml.safe_load(d)["metadata"]["name"]: d for d in docs}


def _chart_without_schema(tmp_path: Path) -> Path:
    """A copy of the chart without values.schema.json: `helm install --skip-schema-validation`."""
    copy_dir = tmp_path / "zvolt"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    return copy_dir


# --- ports ---------------------------------------------------------------------------------

def test_default_render_has_no_tls_class_and_both_ports_everywhere() -> None:
    from agent.main import parse_settings
    from csi.main import parser as csi_parser
    from zvolt.nftguard import guarded_ports

    docs = render()
    assert [n for n, sc in by_kind(docs, "StorageClass").items() if "tls" in sc["parameters"]] == []
    agent = _agent_args(docs)
    assert [a for a in agent if a.startswith("--nvme-")] == ["--nvme-port=4420", "--nvme-tls-port=4421"]
    ports = {p["name"]: p["containerPort"] for p in container(_pod(docs, "DaemonSet", "agent"), "zvolt-agent")["ports"]}
    assert (ports["nvme-tcp"], ports["nvme-tls"]) == (4420, 4421)
    node = _node_args(docs)
    assert [a for a in node if a.startswith("--nvme-")] == ["--nvme-port=4420,4421"]

    # The programs read them as meant: the agent serves TLS on 4421; the worker's guard holds both.
    env = {"NODE_NAME": "storage-0", "POD_IP": "10.1.2.3"}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in agent]
    settings = parse_settings(expanded, env={})
    assert (settings.nvme_port, settings.nvme_tls_port) == ("4420", "4421")
    nargs = csi_parser().parse_args([a.replace("$(NODE_NAME)", "w").replace("$(POD_IP)", "10.1.2.4") for a in node])
    assert guarded_ports(nargs.nvme_port, move_port=None) == (4420, 4421)
    assert ipaddress.ip_network(nargs.storage_network) == ipaddress.ip_network(STORAGE_NETWORK)


def test_the_tls_port_follows_its_value() -> None:
    docs = render({"agent": {"nvmePort": 5420, "nvmeTlsPort": 5999}})
    assert "--nvme-tls-port=5999" in _agent_args(docs) and "--nvme-port=5420" in _agent_args(docs)
    assert "--nvme-port=5420,5999" in _node_args(docs)


@pytest.mark.parametrize("values", [
    {"agent": {"nvmeTlsPort": 4420}},
    {"agent": {"nvmePort": 4421}},  # the default TLS port
    {"agent": {"nvmeTlsPort": 4420, "enabled": False}},  # the node plugin's guard still needs both
])
def test_equal_ports_fail_the_render(values: Obj) -> None:
    port = values["agent"].get("nvmeTlsPort", 4421)
    with pytest.raises(Exception, match=rf"agent\.nvmeTlsPort {port} is agent\.nvmePort too: volumes of a class "
                                        rf"with tls=psk need a port of their own.*--set agent\.nvmeTlsPort={port + 1}"):
        render(values)


@pytest.mark.parametrize(("port", "complaint"), [
    (0, "at '/agent/nvmeTlsPort'"),
    (65536, "at '/agent/nvmeTlsPort'"),
    ("4421", "at '/agent/nvmeTlsPort'"),
    (None, "at '/agent': missing property 'nvmeTlsPort'"),  # null removes Helm's default
])
def test_schema_refuses_a_tls_port_that_is_not_one(port: object, complaint: str) -> None:
    with pytest.raises(Exception, match=re.escape(complaint)):
        render({"agent": {"nvmeTlsPort": port}})


# --- classes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dhchap", ["bidirectional", "unidirectional", "off", False])
def test_a_tls_class_names_the_volume_secret_once(dhchap: str | bool) -> None:
    """With DH-HMAC-CHAP on or off, the node plugin must get the PSK from kubelet: one node-stage
    secret, the volume's own Secret."""
    values: Obj = {"dhchap": dhchap, "storageClasses": [TLS_SC, SC]}
    par = by_kind(render(values), "StorageClass")["sealed"]["parameters"]
    assert par["tls"] == "psk"
    assert {k: v for k, v in par.items() if k.startswith(NODE_STAGE)} == {
        f"{NODE_STAGE}name": SECRET, f"{NODE_STAGE}namespace": NAMESPACE}
    text = _class_texts(values)["sealed"]
    for key in ("tls", f"{NODE_STAGE}name", f"{NODE_STAGE}namespace"):
        assert len(re.findall(rf"^  {re.escape(key)}:", text, re.MULTILINE)) == 1, key
    # The driver accepts what the class hands it (less the sidecars' keys).
    parsed = params.parse({k: v for k, v in par.items() if not params.SIDECAR_KEY.fullmatch(k)})
    assert parsed.tls and parsed.dhchap == ("" if dhchap in ("off", False) else dhchap)
    # A class without tls is untouched by its neighbour.
    plain = by_kind(render(values), "StorageClass")["x"]["parameters"]
    assert "tls" not in plain and (f"{NODE_STAGE}name" in plain) == (dhchap not in ("off", False))


@pytest.mark.parametrize("off", ["off", False])
def test_tls_off_is_no_tls(off: str | bool) -> None:
    docs = render({"dhchap": "off", "storageClasses": [{**SC, "tls": off}]})
    assert by_kind(docs, "StorageClass")["x"]["parameters"] == {
        "volblocksize": "8K", "compression": "lz4", "thin": "true", "csi.storage.k8s.io/fstype": "ext4"}


def test_an_unquoted_off_in_a_values_file_is_off() -> None:
    values = yaml.safe_load("dhchap: off\nstorageClasses:\n  - {name: x, volblocksize: 8K, compression: lz4, "
                            "fsType: ext4, tls: off}\n")
    assert values["storageClasses"][0]["tls"] is False
    assert "tls" not in by_kind(render(values), "StorageClass")["x"]["parameters"]


# --- who keeps the Secrets -----------------------------------------------------------------

def test_dhchap_off_with_a_tls_class_keeps_the_secrets_but_not_dhchap() -> None:
    """The controller still makes the PSK's Secret (namespace and Role); the agents must not
    require DH-HMAC-CHAP keys, which these volumes do not have."""
    from csi.main import parser as csi_parser

    docs = render({"dhchap": "off", "storageClasses": [SC, TLS_SC]})
    ctrl = _controller_args(docs)
    assert [a for a in ctrl if "dhchap" in a] == [f"--dhchap-secret-namespace={NAMESPACE}"]
    assert csi_parser().parse_args(ctrl).dhchap_secret_namespace == NAMESPACE
    assert _secret_rbac(docs) == [f"Role/{FULL}-dhchap-secrets", f"RoleBinding/{FULL}-dhchap-secrets"]
    role = by_kind(docs, "Role")[f"{FULL}-dhchap-secrets"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "delete"]}]
    assert by_kind(docs, "RoleBinding")[f"{FULL}-dhchap-secrets"]["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULL}-controller", "namespace": NAMESPACE}]
    assert not [a for a in _agent_args(docs) if "dhchap" in a]


def test_dhchap_off_without_a_tls_class_keeps_no_secrets() -> None:
    docs = render({"dhchap": "off", "storageClasses": [SC, {**SC, "name": "y", "tls": "off"}]})
    assert not [a for a in _controller_args(docs) if "dhchap" in a]
    assert _secret_rbac(docs) == []
    assert not [a for a in _agent_args(docs) if "dhchap" in a]


def test_a_tls_class_changes_nothing_else_with_dhchap_on() -> None:
    def keys_of(docs: list[Obj]) -> Obj:
        return {"controller": [a for a in _controller_args(docs) if "dhchap" in a],
                "agent": [a for a in _agent_args(docs) if "dhchap" in a], "rbac": _secret_rbac(docs)}

    assert keys_of(render({"storageClasses": [TLS_SC]})) == keys_of(render()) == {
        "controller": [f"--dhchap-secret-namespace={NAMESPACE}"], "agent": ["--dhchap"],
        "rbac": [f"Role/{FULL}-dhchap-secrets", f"RoleBinding/{FULL}-dhchap-secrets"]}


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["on", True, "PSK", "tls1.3", ""])
def test_the_schema_refuses_a_class_tls_other_than_psk_or_off(bad: object) -> None:
    with pytest.raises(Exception, match=r"at '/storageClasses/0/tls': value must be one of 'psk', 'off', false"):
        render({"storageClasses": [{**SC, "tls": bad}]})


@pytest.mark.parametrize(("bad", "shown"), [("on", "on"), (True, "true"), ("PSK", "PSK"), ("tls1.3", "tls1.3")])
def test_without_the_schema_the_templates_refuse_it_too(bad: object, shown: str, tmp_path: Path) -> None:
    chart = helm_python.Chart.load(_chart_without_schema(tmp_path))
    with pytest.raises(Exception, match=rf"storageClasses x: tls={re.escape(shown)} is neither psk nor off; "
                                        r"psk \(NVMe/TCP TLS 1\.3 with a per-volume pre-shared key"):
        chart.render(with_required({"storageClasses": [{**SC, "tls": bad}]}), name=RELEASE, namespace=NAMESPACE,
                     is_install=True)


@pytest.mark.parametrize("key", ["name", "namespace"])
def test_a_tls_class_cannot_name_its_own_node_stage_secret(key: str) -> None:
    extra = {"extraParameters": {f"{NODE_STAGE}{key}": "mine"}}
    with pytest.raises(Exception, match=rf"storageClasses sealed: extraParameters {re.escape(NODE_STAGE)}{key}: "
                                        r"with tls=psk the node-stage secret is the volume's Secret holding its TLS "
                                        r"PSK \(zvolt-dhchap-\$\{pv\.name\}\); remove it from extraParameters"):
        render({"dhchap": "off", "storageClasses": [{**TLS_SC, **extra}]})
    # With DH-HMAC-CHAP on as well, its own refusal speaks first.
    with pytest.raises(Exception, match=r"storageClasses sealed: extraParameters .*with dhchap on"):
        render({"storageClasses": [{**TLS_SC, **extra}]})
    # A class without TLS (and DH-HMAC-CHAP off) may still name one.
    assert by_kind(render({"dhchap": "off", "storageClasses": [{**SC, **extra}]}), "StorageClass")["x"][
        "parameters"][f"{NODE_STAGE}{key}"] == "mine"


# --- what the operator reads ---------------------------------------------------------------

def test_the_commented_example_class_renders() -> None:
    """values.yaml's zvolt-tls, uncommented, is a valid TLS class."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    start = lines.index("  # - name: zvolt-tls")
    block: list[str] = []
    for line in lines[start:]:
        if not line.startswith("  #   ") and block:
            break
        block.append(line.replace("  # ", "  ", 1))
    example = yaml.safe_load("\n".join(block))[0]
    assert example["tls"] == "psk"
    values: Obj = {"dhchap": "off", "storageClasses": [example]}
    assert by_kind(render(values), "StorageClass")["zvolt-tls"]["parameters"]["tls"] == "psk"
    report = helm_python.lint(CHART, with_required(values), strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBE_VERSION}")
    assert [m for m in report["messages"] if m["severity"] >= 2] == [] and report["errors"] == []


def test_notes_name_the_tls_classes_and_tlshd() -> None:
    def notes(values: Obj) -> str:
        out: dict[str, str] = helm_python.Chart.load(CHART).render(with_required(values), name=RELEASE,
                                                                  namespace=NAMESPACE, is_install=True)
        return next(text for path, text in out.items() if path.endswith("NOTES.txt"))

    assert "drops pod traffic to ports 4420 and 4421" in notes({})
    assert "tlshd" not in notes({})
    text = notes({"storageClasses": [SC, TLS_SC, {**TLS_SC, "name": "sealed-2"}]})
    assert "NVMe/TCP TLS 1.3 (port 4421) in the classes sealed, sealed-2" in text
    assert "tlshd (ktls-utils) runs as a host service, on every storage node and every worker" in text
