"""Strict JSON schemas for the custom resources the chart renders, and their own tests.

kubernetes-validate carries schemas for built-in kinds only. VolumeSnapshotClass,
ServiceMonitor and cert-manager's Issuer/Certificate come from CRDs, so they are written
here from those CRDs' documented v1 fields (external-snapshotter v8, prometheus-operator
monitoring.coreos.com/v1, cert-manager.io/v1), strict like the built-in ones: an unknown or
misspelled field fails. Only the parts of each API the chart may use are spelled out in
depth; a field outside that set is an error until someone adds it here on purpose.
"""

from __future__ import annotations

from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

Schema = dict[str, Any]

STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
DNS_NAME = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DURATION = "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"


def _obj(props: Schema, required: list[str] | None = None) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def _metadata(namespaced: bool) -> Schema:
    props: Schema = {"name": {"type": "string", "pattern": DNS_NAME, "maxLength": 253},
                     "labels": STR_MAP, "annotations": STR_MAP}
    if namespaced:
        props["namespace"] = {"type": "string", "pattern": DNS_NAME}
    return _obj(props, ["name", "namespace"] if namespaced else ["name"])


def _resource(api_version: str, kind: str, namespaced: bool, body: Schema, required: list[str]) -> Schema:
    return _obj({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                 "metadata": _metadata(namespaced), **body}, ["apiVersion", "kind", "metadata", *required])


LABEL_SELECTOR = _obj({
    "matchLabels": STR_MAP,
    "matchExpressions": {"type": "array", "items": _obj({
        "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}, ["key", "operator"])},
})

RELABEL = _obj({
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
    "modulus": {"type": "integer"}, "replacement": {"type": "string"},
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                        "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                        "dropequal", "DropEqual"]},
})

ISSUER_REF = _obj({"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                   "group": {"type": "string"}}, ["name"])

KEY_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
              "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
              "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
              "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]

CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): _resource(
        "snapshot.storage.k8s.io/v1", "VolumeSnapshotClass", False,
        {"driver": {"type": "string", "minLength": 1}, "deletionPolicy": {"enum": ["Delete", "Retain"]},
         "parameters": STR_MAP},
        ["driver", "deletionPolicy"]),
    **{(f"groupsnapshot.storage.k8s.io/{v}", "VolumeGroupSnapshotClass"): _resource(
        f"groupsnapshot.storage.k8s.io/{v}", "VolumeGroupSnapshotClass", False,
        {"driver": {"type": "string", "minLength": 1}, "deletionPolicy": {"enum": ["Delete", "Retain"]},
         "parameters": STR_MAP},
        ["driver", "deletionPolicy"]) for v in ("v1", "v1beta2", "v1beta1")},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        "monitoring.coreos.com/v1", "ServiceMonitor", True,
        {"spec": _obj({
            "selector": LABEL_SELECTOR,
            "namespaceSelector": _obj({"any": {"type": "boolean"},
                                       "matchNames": {"type": "array", "items": {"type": "string"}}}),
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer", "minimum": 0},
            "endpoints": {"type": "array", "items": _obj({
                "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": {"type": "string", "pattern": DURATION},
                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                "relabelings": {"type": "array", "items": RELABEL},
                "metricRelabelings": {"type": "array", "items": RELABEL},
                "params": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
            })},
        }, ["selector"])},
        ["spec"]),
    ("cert-manager.io/v1", "Issuer"): _resource(
        "cert-manager.io/v1", "Issuer", True,
        {"spec": {**_obj({
            "selfSigned": _obj({"crlDistributionPoints": {"type": "array", "items": {"type": "string"}}}),
            "ca": _obj({"secretName": {"type": "string", "minLength": 1},
                        "crlDistributionPoints": {"type": "array", "items": {"type": "string"}},
                        "ocspServers": {"type": "array", "items": {"type": "string"}},
                        "issuingCertificateURLs": {"type": "array", "items": {"type": "string"}}},
                       ["secretName"]),
        }), "minProperties": 1, "maxProperties": 1}},
        ["spec"]),
    ("cert-manager.io/v1", "Certificate"): _resource(
        "cert-manager.io/v1", "Certificate", True,
        {"spec": _obj({
            "secretName": {"type": "string", "pattern": DNS_NAME},
            "issuerRef": ISSUER_REF,
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": {"type": "array", "items": {"type": "string"}},
            "ipAddresses": {"type": "array", "items": {"type": "string"}},
            "uris": {"type": "array", "items": {"type": "string"}},
            "emailAddresses": {"type": "array", "items": {"type": "string"}},
            "duration": {"type": "string", "pattern": DURATION},
            "renewBefore": {"type": "string", "pattern": DURATION},
            "renewBeforePercentage": {"type": "integer"},
            "isCA": {"type": "boolean"},
            "usages": {"type": "array", "items": {"enum": KEY_USAGES}},
            "privateKey": _obj({"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                                "size": {"type": "integer"}, "encoding": {"enum": ["PKCS1", "PKCS8"]},
                                "rotationPolicy": {"enum": ["Never", "Always"]}}),
            "secretTemplate": _obj({"labels": STR_MAP, "annotations": STR_MAP}),
            "revisionHistoryLimit": {"type": "integer", "minimum": 1},
        }, ["secretName", "issuerRef"])},
        ["spec"]),
}


def validate_crd(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError (or KeyError for a kind with no schema)."""
    schema = CRD_SCHEMAS[(obj.get("apiVersion", ""), obj.get("kind", ""))]
    jsonschema.Draft202012Validator(schema).validate(obj)


# --- the schemas are not vacuous ------------------------------------------------------

GOOD: dict[str, dict[str, Any]] = {
    "VolumeSnapshotClass": {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
                            "metadata": {"name": "zvolt"}, "driver": "csi.zvolt.io", "deletionPolicy": "Delete"},
    "VolumeGroupSnapshotClass": {"apiVersion": "groupsnapshot.storage.k8s.io/v1beta1",
                                 "kind": "VolumeGroupSnapshotClass", "metadata": {"name": "zvolt"},
                                 "driver": "csi.zvolt.io", "deletionPolicy": "Delete"},
    "ServiceMonitor": {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                       "metadata": {"name": "zv", "namespace": "storage"},
                       "spec": {"selector": {"matchLabels": {"a": "b"}},
                                "endpoints": [{"port": "metrics", "interval": "30s"}]}},
    "Issuer": {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "ca", "namespace": "s"},
               "spec": {"ca": {"secretName": "zv-ca"}}},
    "Certificate": {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                    "metadata": {"name": "c", "namespace": "s"},
                    "spec": {"secretName": "c-tls", "issuerRef": {"name": "ca"}, "usages": ["server auth"]}},
}

BAD: list[tuple[str, str, Any]] = [
    ("VolumeSnapshotClass", "spec", {"driver": "x"}),  # v1 has no spec: driver is top level
    ("VolumeSnapshotClass", "deletionPolicy", "Remove"),
    ("VolumeGroupSnapshotClass", "deletionPolicy", "delete"),
    ("VolumeGroupSnapshotClass", "volumeGroupSnapshotClassName", "x"),
    ("ServiceMonitor", "spec", {"endpoints": [{"port": "metrics"}]}),  # selector is required
    ("ServiceMonitor", "spec", {"selector": {}, "endpoints": [{"port": "m", "intervall": "30s"}]}),
    ("Issuer", "spec", {"ca": {"secretName": "x"}, "selfSigned": {}}),  # exactly one issuer type
    ("Certificate", "spec", {"secretName": "c", "issuerRef": {"name": "ca"}, "usages": ["server-auth"]}),
    ("Certificate", "spec", {"secretName": "c", "issuerRef": {"name": "ca"}, "duration": "1y"}),
    ("Certificate", "spec", {"secretName": "c"}),
]


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_minimal_objects_pass(kind: str) -> None:
    validate_crd(GOOD[kind])


@pytest.mark.parametrize(("kind", "key", "value"), BAD)
def test_wrong_objects_fail(kind: str, key: str, value: Any) -> None:
    obj = {**GOOD[kind], key: value}
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(obj)


def test_unknown_kind_has_no_schema() -> None:
    with pytest.raises(KeyError):
        validate_crd({"apiVersion": "example.com/v1", "kind": "Thing"})
