"""The branch graph of a namespace: volumes, their snapshots and the branches made from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.format import age
from kubectl_zvolt.model import Snapshot, Volume


@dataclass
class Node:
    kind: str  # "pvc" | "snapshot"
    name: str
    size: str | None
    state: str
    created: datetime | None
    note: str = ""
    children: list[Node] = field(default_factory=list)

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "kind": "PersistentVolumeClaim" if self.kind == "pvc" else "VolumeSnapshot",
            "name": self.name,
            "size": self.size,
            "state": self.state,
            "age": age(self.created, now),
            **({"note": self.note} if self.note else {}),
            "children": [c.as_dict(now) for c in self.children],
        }


def build(volumes: list[Volume], snapshots: list[Snapshot], root: str | None = None) -> list[Node]:
    """Forest of branch trees; with `root`, only the tree under that PVC."""
    vnodes = {v.name: Node("pvc", v.name, v.size, v.phase, v.created) for v in volumes}
    snodes = {s.name: Node("snapshot", s.name, s.restore_size,
                           "ready" if s.ready else ("error" if s.error else "pending"), s.created)
              for s in snapshots}
    attached: set[tuple[str, str]] = set()
    for s in snapshots:
        if s.source_pvc in vnodes:
            vnodes[s.source_pvc].children.append(snodes[s.name])
            attached.add(("snapshot", s.name))
        elif s.source_pvc:
            snodes[s.name].note = f"of deleted PVC {s.source_pvc}"
    for v in volumes:
        src = v.source
        if src is None:
            continue
        parent = (vnodes.get(src.name) if src.kind == "PersistentVolumeClaim" else snodes.get(src.name))
        if parent is not None and parent is not vnodes[v.name]:
            parent.children.append(vnodes[v.name])
            attached.add(("pvc", v.name))
        else:
            what = "PVC" if src.kind == "PersistentVolumeClaim" else "snapshot"
            vnodes[v.name].note = f"branch of deleted {what} {src.name}"
    for n in [*vnodes.values(), *snodes.values()]:
        n.children.sort(key=lambda c: (c.created or datetime.min.replace(tzinfo=UTC), c.name))
    if root is not None:
        if root not in vnodes:
            raise PluginError(f"PersistentVolumeClaim {root!r} is not a zvolt volume in this namespace")
        return [vnodes[root]]
    roots = [n for n in vnodes.values() if ("pvc", n.name) not in attached]
    roots += [n for n in snodes.values() if ("snapshot", n.name) not in attached]
    return sorted(roots, key=lambda n: n.name)


def _label(n: Node, now: datetime | None) -> str:
    name = n.name if n.kind == "pvc" else f"@{n.name}"
    parts = [n.size or "?", n.state, age(n.created, now)]
    note = f"  [{n.note}]" if n.note else ""
    return f"{name}  ({', '.join(parts)}){note}"


def render(roots: list[Node], now: datetime | None = None) -> str:
    lines: list[str] = []

    def walk(n: Node, prefix: str, last: bool, top: bool) -> None:
        if top:
            lines.append(_label(n, now))
            child_prefix = ""
        else:
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_label(n, now)}")
            child_prefix = prefix + ("    " if last else "│   ")
        for i, c in enumerate(n.children):
            walk(c, child_prefix, i == len(n.children) - 1, False)

    for r in roots:
        walk(r, "", True, True)
    return "\n".join(lines)
