"""What the kubectl plugin's commands meet in unit tests: a cluster with one controller pod whose
`--agents` names in-process agents, and `kubectl exec` into it running `zvolt-csi` in this process."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import csi.main


class FakeKube:
    namespace = "zvolt"

    def __init__(self, agents: str, handles: dict[str, str] | None = None) -> None:
        self.agents = agents
        self.handles = handles or {}  # PVC name (namespace "team-a") -> volume handle

    def get_pvc(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        if namespace != "team-a" or name not in self.handles:
            return None
        return {"metadata": {"name": name}, "spec": {"volumeName": f"pv-{name}"}}

    def get_pv(self, name: str) -> dict[str, Any] | None:
        pvc = name.removeprefix("pv-")
        return {"spec": {"csi": {"driver": "csi.zvolt.io", "volumeHandle": self.handles[pvc]}}}

    def list_pods(self) -> list[dict[str, Any]]:
        args = ["--mode=controller", "--endpoint=unix:///csi/csi.sock", f"--agents={self.agents}", "--insecure"]
        return [{"metadata": {"name": "ctrl-1"}, "status": {"phase": "Running"},
                 "spec": {"containers": [{"name": "zvolt-controller", "args": args}]}}]


class InProcess:
    """`kubectl exec` into the controller pod: zvolt-csi's main in this process, its output captured."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str]) -> tuple[int, str]:
        assert (namespace, pod, container) == ("zvolt", "ctrl-1", "zvolt-controller")
        self.argvs.append(list(argv))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = csi.main.main(list(argv[1:]))
        return code, out.getvalue()
