"""PVC placement records in a dict, with the group lookup (csi/placements.py GroupRecords): what
the PVC annotations and group labels hold, for tests that run without an API server."""

from __future__ import annotations

import threading

from csi.params import group_of


class MemoryGroupRecords:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.saved: dict[tuple[str, str], tuple[str, str]] = {}
        self.group_reads: list[tuple[str, str]] = []

    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        with self._lock:
            return self.saved.get((namespace, pvc))

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None:
        with self._lock:
            self.saved[(namespace, pvc)] = (name, node)

    def members(self, namespace: str, group: str) -> dict[str, str]:
        with self._lock:
            self.group_reads.append((namespace, group))
            return {pvc: node for (ns, pvc), (_, node) in self.saved.items()
                    if ns == namespace and group_of(pvc) == group}
