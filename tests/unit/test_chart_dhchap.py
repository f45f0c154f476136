"""The chart turns DH-HMAC-CHAP on by default (issue 12; SECURITY.md, "NVMe in-band
authentication"): every class it renders names the volume's own Secret as its node-stage secret,
the agents refuse a publish without keys, the controller is told where the Secrets live and may
get, create and delete Secrets there (nothing else, nowhere else). `dhchap: off` takes all of it
away; anything between (a class off while the agents require keys) fails the render."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest
import yaml
from test_chart import (  # type: ignore[import-not-found]
    CHART,
    NAMESPACE,
    RELEASE,
    by_kind,
    container,
    render,
    with_required,
)

from zvolt import names

Obj = dict[str, Any]
FULL = f"{RELEASE}-zvolt"
NODE_STAGE = "csi.storage.k8s.io/node-stage-secret-"
SC = {"name": "x", "volblocksize": "8K", "compression": "lz4", "thin": True, "fsType": "ext4",
      "reclaimPolicy": "Delete"}


def _agent_args(docs: list[Obj]) -> list[str]:
    spec = by_kind(docs, "DaemonSet")[f"{FULL}-agent"]["spec"]["template"]["spec"]
    args: list[str] = container(spec, "zvolt-agent")["args"]
    return args


def _controller_args(docs: list[Obj]) -> list[str]:
    spec = by_kind(docs, "Deployment")[f"{FULL}-controller"]["spec"]["template"]["spec"]
    args: list[str] = container(spec, "zvolt-controller")["args"]
    return args


def _dhchap_of(docs: list[Obj]) -> Obj:
    """Everything DH-HMAC-CHAP puts into a render, per place."""
    return {
        "classes": {name: {k: v for k, v in sc["parameters"].items() if k == "dhchap" or k.startswith(NODE_STAGE)}
                    for name, sc in by_kind(docs, "StorageClass").items()},
        "agent": [a for a in _agent_args(docs) if "dhchap" in a],
        "controller": [a for a in _controller_args(docs) if "dhchap" in a],
        "rbac": sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs
                       if d["kind"] in {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
                       and "dhchap" in d["metadata"]["name"]),
    }


def _on(mode: str, classes: tuple[str, ...] = ("zvolt", "zvolt-postgres")) -> Obj:
    return {
        "classes": {name: {"dhchap": mode, f"{NODE_STAGE}name": "zvolt-dhchap-${pv.name}",
                           f"{NODE_STAGE}namespace": NAMESPACE} for name in classes},
        "agent": ["--dhchap"],
        "controller": [f"--dhchap-secret-namespace={NAMESPACE}"],
        "rbac": [f"Role/{FULL}-dhchap-secrets", f"RoleBinding/{FULL}-dhchap-secrets"],
    }


OFF: Obj = {"classes": {"zvolt": {}, "zvolt-postgres": {}}, "agent": [], "controller": [], "rbac": []}


def test_default_render_authenticates_every_volume() -> None:
    """Default: bidirectional on every class, --dhchap on the agents, the Secret namespace on
    the controller, and the Role that lets the controller keep the Secrets there."""
    docs = render()
    assert _dhchap_of(docs) == _on("bidirectional")
    # The keys reach the node as a node-stage secret only: no class gains a controller-publish
    # (or any other) secret for them.
    for sc in by_kind(docs, "StorageClass").values():
        assert [k for k in sc["parameters"] if k.startswith("csi.storage.k8s.io/") and "-secret-" in k] == [
            f"{NODE_STAGE}name", f"{NODE_STAGE}namespace"]
    role = by_kind(docs, "Role")[f"{FULL}-dhchap-secrets"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "delete"]}]
    binding = by_kind(docs, "RoleBinding")[f"{FULL}-dhchap-secrets"]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"kind": "Role", "name": f"{FULL}-dhchap-secrets",
                                  "apiGroup": "rbac.authorization.k8s.io"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULL}-controller", "namespace": NAMESPACE}]
    # The controller's pod runs with that ServiceAccount.
    dep = by_kind(docs, "Deployment")[f"{FULL}-controller"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == f"{FULL}-controller"


def test_the_chart_names_the_secret_the_controller_makes() -> None:
    """The class's node-stage secret name is a template the external-provisioner fills with the PV
    name; the controller makes the Secret under zvolt.names.dhchap_secret_name(PV name)."""
    sc = by_kind(render(), "StorageClass")["zvolt"]
    template = sc["parameters"][f"{NODE_STAGE}name"]
    assert template == names.dhchap_secret_name("${pv.name}")
    pv = "pvc-0b7e6c1a-2f4d-4c39-9a7e-3f1d2c5b8e90"
    assert template.replace("${pv.name}", pv) == names.dhchap_secret_name(pv)


@pytest.mark.parametrize("off", ["off", False])
def test_off_removes_all_of_it(off: str | bool) -> None:
    """`dhchap: off` (or false: what YAML 1.1 reads from an unquoted `off` in a values file)."""
    assert _dhchap_of(render({"dhchap": off})) == OFF


def test_an_unquoted_off_in_a_values_file_is_off() -> None:
    values = yaml.safe_load("dhchap: off\nstorageClasses:\n  - {name: x, volblocksize: 8K, compression: lz4, "
                            "fsType: ext4, dhchap: off}\n")
    assert values["dhchap"] is False
    assert _dhchap_of(render(values))["classes"] == {"x": {}}


def test_unidirectional_and_a_class_of_its_own_mode() -> None:
    assert _dhchap_of(render({"dhchap": "unidirectional"})) == _on("unidirectional")
    mixed = render({"storageClasses": [{**SC, "dhchap": "unidirectional"}, {**SC, "name": "y"}]})
    assert _dhchap_of(mixed)["classes"] == {**_on("unidirectional", ("x",))["classes"],
                                            **_on("bidirectional", ("y",))["classes"]}


def test_flags_stay_without_rbac() -> None:
    """rbac.create=false: the operator grants the Role; the chart still configures the programs."""
    got = _dhchap_of(render({"rbac": {"create": False}}))
    assert got == {**_on("bidirectional"), "rbac": []}


@pytest.mark.parametrize(("values", "where"), [
    ({"dhchap": "maybe"}, "/dhchap"),
    ({"dhchap": True}, "/dhchap"),
    ({"dhchap": "Bidirectional"}, "/dhchap"),
    ({"dhchap": ""}, "/dhchap"),
    ({"storageClasses": [{**SC, "dhchap": "on"}]}, "/storageClasses/0/dhchap"),
])
def test_schema_refuses_other_modes(values: Obj, where: str) -> None:
    report = helm_python.lint(CHART, with_required(values), strict=True)
    errors = " ".join(m["error"] for m in report["messages"] if m["severity"] >= 3)
    assert f"at '{where}': value must be one of 'bidirectional', 'unidirectional', 'off', false" in errors, report
    with pytest.raises(Exception, match=where):
        render(values)


@pytest.mark.parametrize(("values", "message"), [
    # The agents would refuse every publish of this class: say so at install, not at attach.
    ({"storageClasses": [{**SC, "dhchap": "off"}]},
     r"storageClasses x: dhchap is off for this class but the top-level value dhchap=bidirectional makes every "
     r"agent refuse a publish without DH-HMAC-CHAP keys"),
    ({"dhchap": "unidirectional", "storageClasses": [{**SC, "dhchap": False}]},
     r"storageClasses x: dhchap is off for this class but the top-level value dhchap=unidirectional"),
    # No Secret namespace, no Role, no --dhchap: the class's keys would have nowhere to live.
    ({"dhchap": "off", "storageClasses": [{**SC, "dhchap": "bidirectional"}]},
     r"storageClasses x: dhchap=bidirectional needs the top-level value dhchap on"),
    # One node-stage secret per class: with dhchap on it is the volume's DH-HMAC-CHAP Secret.
    ({"storageClasses": [{**SC, "extraParameters": {f"{NODE_STAGE}name": "mine"}}]},
     r"storageClasses x: extraParameters csi\.storage\.k8s\.io/node-stage-secret-name: with dhchap on the "
     r"node-stage secret is the volume's DH-HMAC-CHAP Secret \(zvolt-dhchap-\$\{pv\.name\}\)"),
])
def test_a_class_that_cannot_work_fails_the_render(values: Obj, message: str) -> None:
    with pytest.raises(Exception, match=message):
        render(values)


def test_a_class_may_repeat_off_when_the_release_is_off() -> None:
    docs = render({"dhchap": "off", "storageClasses": [{**SC, "dhchap": "off"},
                                                       {**SC, "name": "y", "extraParameters": {
                                                           f"{NODE_STAGE}name": "mine",
                                                           f"{NODE_STAGE}namespace": "ns"}}]})
    assert _dhchap_of(docs)["classes"] == {"x": {}, "y": {f"{NODE_STAGE}name": "mine", f"{NODE_STAGE}namespace": "ns"}}


def test_notes_say_whether_volumes_are_authenticated() -> None:
    def notes(values: Obj) -> str:
        out: dict[str, str] = helm_python.Chart.load(CHART).render(with_required(values), name=RELEASE,
                                                                  namespace=NAMESPACE, is_install=True)
        return next(text for path, text in out.items() if path.endswith("NOTES.txt"))

    assert f"authenticated (DH-HMAC-CHAP, bidirectional) with keys of its own:\nthe Secret zvolt-dhchap-<PV name> " \
           f"in {NAMESPACE}" in notes({})
    assert "WARNING: dhchap=off" in notes({"dhchap": "off"})
