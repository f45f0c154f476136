"""The chart carries encryption: a class's secret references (which the driver then parses, less
the sidecars' keys) and the agent's key wrapping Secret, mounted and named by its flag."""

from __future__ import annotations

import pytest
from test_chart import RELEASE, by_kind, container, render  # type: ignore[import-not-found]

from csi import params

SC = {"name": "tenant", "volblocksize": "8K", "compression": "lz4", "thin": True, "fsType": "ext4",
      "reclaimPolicy": "Delete", "encryptionSecret": {"name": "vol-key", "namespace": "${pvc.namespace}"}}


ALL = {"controller": {"keySecrets": {"allNamespaces": True}}}


def test_encrypted_class_names_its_secret_for_every_call_that_needs_the_key() -> None:
    docs = render({"storageClasses": [SC], **ALL})
    par = by_kind(docs, "StorageClass")["tenant"]["parameters"]
    for use in ("provisioner", "controller-publish", "controller-expand"):
        assert par[f"csi.storage.k8s.io/{use}-secret-name"] == "vol-key"
        assert par[f"csi.storage.k8s.io/{use}-secret-namespace"] == "${pvc.namespace}"
    driver_part = {k: v for k, v in par.items() if not params.SIDECAR_KEY.fullmatch(k)}
    assert params.parse(driver_part).encrypted
    plain = by_kind(render(), "StorageClass")["zvolt"]["parameters"]
    # No key Secret for a plain class (its node-stage secret is the DH-HMAC-CHAP one).
    assert "encryption" not in plain and not any("secret" in k for k in plain if "/node-stage-" not in k)


def _key_readers(docs: list[dict]) -> dict[str, list[str | None]]:  # type: ignore[type-arg]
    return {kind: sorted((d["metadata"].get("namespace") or "") for d in docs
                         if d["kind"] == kind and d["metadata"]["name"].endswith("-key-secrets"))
            for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")}


def test_sidecars_may_read_key_secrets_only_where_keys_are() -> None:
    """The provisioner, attacher and resizer fetch a class's key Secret with the controller's
    ServiceAccount (the real-cluster suite failed on exactly this: 'secrets is forbidden')."""
    assert _key_readers(render()) == {"Role": [], "RoleBinding": [], "ClusterRole": [], "ClusterRoleBinding": []}
    fixed = {**SC, "encryptionSecret": {"name": "vol-key", "namespace": "tenant-a"}}
    docs = render({"storageClasses": [fixed], "controller": {"keySecrets": {"namespaces": ["tenant-b", "tenant-a"]}}})
    assert _key_readers(docs) == {"Role": ["tenant-a", "tenant-b"], "RoleBinding": ["tenant-a", "tenant-b"],
                                  "ClusterRole": [], "ClusterRoleBinding": []}
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-key-secrets"))
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-key-secrets"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-zvolt-controller",
                                    "namespace": "storage"}]
    everywhere = render({"storageClasses": [SC], **ALL})
    assert _key_readers(everywhere) == {"Role": [], "RoleBinding": [], "ClusterRole": [""], "ClusterRoleBinding": [""]}
    with pytest.raises(Exception, match="allNamespaces"):
        render({"storageClasses": [SC]})  # a per-claim Secret namespace with no way to read it


def test_agent_mounts_the_key_wrapping_secret() -> None:
    docs = render({"agent": {"keyWrappingSecret": "zvolt-keywrap"}})
    spec = by_kind(docs, "DaemonSet")[f"{RELEASE}-zvolt-agent"]["spec"]["template"]["spec"]
    agent = container(spec, "zvolt-agent")
    assert "--key-wrapping-file=/etc/zvolt/keywrap/wrappingKey" in agent["args"]
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "keywrap")
    assert mount["mountPath"] == "/etc/zvolt/keywrap" and mount["readOnly"]
    vol = next(v for v in spec["volumes"] if v["name"] == "keywrap")
    assert vol["secret"] == {"secretName": "zvolt-keywrap", "defaultMode": 0o400}
    plain = by_kind(render(), "DaemonSet")[f"{RELEASE}-zvolt-agent"]["spec"]["template"]["spec"]
    assert not any(a.startswith("--key-wrapping-file") for a in container(plain, "zvolt-agent")["args"])


@pytest.mark.parametrize("values", [
    {"storageClasses": [{**SC, "encryptionSecret": {"name": "vol-key"}}]},
    {"storageClasses": [{**SC, "encryptionSecret": {"name": "k", "namespace": "n", "cipher": "x"}}]},
])
def test_schema_refuses_a_half_named_secret(values: dict[str, object]) -> None:
    with pytest.raises(Exception, match=r"encryptionSecret"):
        render(values)
