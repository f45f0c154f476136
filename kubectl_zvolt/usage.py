"""`kubectl zvolt usage`: space per PVC and per namespace, as the storage nodes count it.

Like `attachments`, only the controller reaches the agents, so this runs `zvolt-csi --mode usage`
in a running controller container with that container's own settings and reads its JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields

from kubectl_zvolt.attachments import CONTAINER, controller, one_shot
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import Exec, Kube


@dataclass(frozen=True)
class PvcUsage:
    namespace: str
    pvc: str
    pv: str
    volume_id: str
    node: str
    logical_bytes: int
    referenced_bytes: int
    unique_bytes: int
    written_bytes: int
    compress_ratio: float


@dataclass
class NamespaceUsage:
    namespace: str
    pvcs: int = 0
    logical_bytes: int = 0
    referenced_bytes: int = 0
    unique_bytes: int = 0


@dataclass(frozen=True)
class Usage:
    pvcs: list[PvcUsage]
    namespaces: list[NamespaceUsage]
    pools: list[dict[str, object]]
    unreachable: dict[str, str]

    def as_dict(self) -> dict[str, object]:
        return {"pvcs": [vars(p) for p in self.pvcs], "namespaces": [vars(n) for n in self.namespaces],
                "pools": self.pools, "unreachable": self.unreachable}


def argv(controller_args: Sequence[str]) -> list[str]:
    return one_shot(controller_args, "usage", "--output=json", "--log-level=error")


def parse(output: str) -> tuple[list[PvcUsage], list[dict[str, object]], dict[str, str]]:
    start = output.find('{\n  "usage"')
    if start < 0:
        raise PluginError(f"zvolt-csi --mode usage gave no result: {output.strip()[-500:]}")
    names = [f.name for f in fields(PvcUsage)]
    try:
        doc, _ = json.JSONDecoder().raw_decode(output[start:])
        rows = [PvcUsage(**{n: r[n] for n in names}) for r in doc["usage"]]
        return rows, list(doc.get("pools") or []), {str(k): str(v) for k, v in (doc.get("unreachable") or {}).items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise PluginError(f"cannot read the output of zvolt-csi --mode usage: {exc}") from exc


def totals(rows: Sequence[PvcUsage]) -> list[NamespaceUsage]:
    by_ns: dict[str, NamespaceUsage] = {}
    for r in rows:
        t = by_ns.setdefault(r.namespace, NamespaceUsage(r.namespace))
        t.pvcs += 1
        t.logical_bytes += r.logical_bytes
        t.referenced_bytes += r.referenced_bytes
        t.unique_bytes += r.unique_bytes
    return [by_ns[ns] for ns in sorted(by_ns)]


def usage(kube: Kube, execute: Exec, pvc_namespace: str | None = None) -> Usage:
    pod, args = controller(kube.list_pods())
    code, out = execute(kube.namespace, pod, CONTAINER, argv(args))
    rows, pools, unreachable = parse(out)
    if code not in (0, 1):  # 1: some storage node did not answer, which the result says
        raise PluginError(f"zvolt-csi --mode usage in pod {pod} exited {code}: {out.strip()[-500:]}")
    if pvc_namespace is not None:
        rows = [r for r in rows if r.namespace == pvc_namespace]
    return Usage(rows, totals(rows), pools, unreachable)


def size(n: int) -> str:
    """Binary units like kubectl quantities: 512Ki, 64Mi, 1.5Gi."""
    value, unit = float(n), ""
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or unit == "Ti":
            break
        value /= 1024
    return f"{value:.0f}{unit}" if not unit or value >= 100 or value.is_integer() else f"{value:.1f}{unit}"
