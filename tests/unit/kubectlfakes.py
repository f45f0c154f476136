"""What the kubectl plugin's commands meet in unit tests: a cluster with one controller pod whose
`--agents` names in-process agents, and `kubectl exec` into it running `zvolt-csi` in this process."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Callable, Sequence
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

    def list_csinodes(self) -> list[dict[str, Any]]:
        return []

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


class InProcessSession:
    """`kubectl exec -i` into the controller pod: zvolt-csi's main in a thread of this process, its
    stdin and stdout two pipes, each stdout line handed to the plugin as it comes."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []
        self.firsts: list[str] = []

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str], first: str,
                 on_line: Callable[[str], str | None]) -> tuple[int, str]:
        assert (namespace, pod, container) == ("zvolt", "ctrl-1", "zvolt-controller")
        self.argvs.append(list(argv))
        self.firsts.append(first)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        stdin, to_stdin = os.fdopen(in_r, "r"), os.fdopen(in_w, "w")
        stdout, from_stdout = os.fdopen(out_w, "w"), os.fdopen(out_r, "r")
        err = io.StringIO()
        result: dict[str, int] = {}

        def controller() -> None:
            saved = sys.stdin
            sys.stdin = stdin
            try:
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
                    result["code"] = csi.main.main(list(argv[1:]))
            finally:
                sys.stdin = saved
                stdout.close()

        to_stdin.write(first + "\n")
        to_stdin.flush()
        worker = threading.Thread(target=controller, daemon=True)
        worker.start()
        try:
            for line in from_stdout:
                answer = on_line(line.rstrip("\n"))
                if answer is not None:
                    to_stdin.write(answer + "\n")
                    to_stdin.flush()
        finally:
            to_stdin.close()  # a controller still waiting for an answer reads EOF and ends
            worker.join(60)
            from_stdout.close()
            stdin.close()
        assert not worker.is_alive(), "zvolt-csi did not end"
        return result.get("code", 1), err.getvalue()


class NoNodes:
    """An exec into node plugin pods that an offline move must never make."""

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str],
                 stdin: str | None = None) -> tuple[int, str]:
        raise AssertionError(f"exec into {pod}/{container} during an offline move: {list(argv)}")
