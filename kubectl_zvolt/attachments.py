"""`kubectl zvolt attachments [--clear]`: what storage nodes publish, and whether Kubernetes
still attaches it.

Only the controller can reach the agents (mTLS, agent discovery), so this runs
`zvolt-csi --mode attachments` in a running controller container with that container's own
settings, read from its pod spec, and shows the result. The decision of what is stale lives in
one place, csi/attachments.py, shared with the controller's periodic reconcile.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import Exec, Kube, Obj

CONTAINER = "zvolt-controller"
# Settings of the serving controller that mean nothing to a one-shot listing.
_SERVING_ONLY = ("--mode", "--endpoint", "--metrics-listen", "--reconcile-attachments", "--alpha-capabilities",
                 "--log-level")


@dataclass(frozen=True)
class Attachment:
    volume_id: str
    node: str
    state: str  # attached | stale | cleared
    host_nqn: str


# Where kubelet takes an env var's value from, for the fieldRefs the chart uses.
_FIELDS = {"spec.nodeName": ("spec", "nodeName"), "status.podIP": ("status", "podIP"),
           "metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace")}


def container_args(pod: Obj, container: Obj) -> list[str]:
    """A container's args as its process got them: kubelet expands $(VAR) from the container's
    env (`--node-id=$(NODE_NAME)`), and an exec'd command gets no such expansion."""
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[str(e["name"])] = str(e["value"])
            continue
        where = _FIELDS.get(((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", ""))
        value = (pod.get(where[0]) or {}).get(where[1]) if where else None
        if value is not None:
            env[str(e["name"])] = str(value)

    def expand(arg: str) -> str:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        return arg

    return [expand(str(a)) for a in container.get("args") or []]


def controller(pods: Sequence[Obj]) -> tuple[str, list[str]]:
    """(pod name, zvolt-controller args) of a running controller pod."""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Running":
            continue
        for c in (pod.get("spec") or {}).get("containers") or []:
            if c.get("name") == CONTAINER:
                return str(pod["metadata"]["name"]), container_args(pod, c)
    raise PluginError(f"no running pod with a {CONTAINER} container in this namespace "
                      "(give -n with the namespace zvolt is installed in)")


def one_shot(controller_args: Sequence[str], mode: str, *extra: str) -> list[str]:
    """`zvolt-csi` in a one-shot `mode`, with the serving controller's own settings (agents, TLS)."""
    kept = [a for a in controller_args if not a.startswith(_SERVING_ONLY)]
    return ["zvolt-csi", *kept, f"--mode={mode}", *extra]


def argv(controller_args: Sequence[str], clear: bool) -> list[str]:
    return one_shot(controller_args, "attachments", "--output=json", "--log-level=error",
                    *(["--clear"] if clear else []))


def parse(output: str) -> tuple[list[Attachment], dict[str, str]]:
    start = output.find('{\n  "attachments"')
    if start < 0:
        raise PluginError(f"zvolt-csi --mode attachments gave no result: {output.strip()[-500:]}")
    try:
        doc, _ = json.JSONDecoder().raw_decode(output[start:])
        rows = [Attachment(r["volume_id"], r["node"], r["state"], r["host_nqn"]) for r in doc["attachments"]]
        return rows, {str(k): str(v) for k, v in (doc.get("unreachable") or {}).items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise PluginError(f"cannot read the output of zvolt-csi --mode attachments: {exc}") from exc


def attachments(kube: Kube, execute: Exec, clear: bool) -> tuple[list[Attachment], dict[str, str]]:
    pod, args = controller(kube.list_pods())
    code, out = execute(kube.namespace, pod, CONTAINER, argv(args, clear))
    rows, unreachable = parse(out)
    if code not in (0, 1):  # 1: some storage node did not answer, which the result says
        raise PluginError(f"zvolt-csi --mode attachments in pod {pod} exited {code}: {out.strip()[-500:]}")
    return rows, unreachable
