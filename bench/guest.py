"""Host side of the bench's guest access: runs `bench.inguest` commands through the lab API.

The bench needs only a few methods of `lab.guest.Lab`; `LabLike` names them so unit tests and
type checks do not depend on the lab package being importable.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any, Protocol


class LabLike(Protocol):
    pool: str
    storage_ip: str
    worker_ip: str
    python: str

    def run(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        timeout: float = 120,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]: ...

    def start_agent(self, *extra: str) -> None: ...
    def start_controller(self, *extra: str) -> None: ...
    def start_node(self, *extra: str) -> None: ...
    def stop_service(self, name: str, *, kill: bool = False) -> None: ...
    def service_running(self, name: str) -> bool: ...
    def service_log(self, name: str, lines: int = 200) -> str: ...
    def grpc_target(self, name: str) -> str: ...


class Guest:
    """Typed calls into `python -m bench.inguest` inside the guest."""

    def __init__(self, lab: LabLike) -> None:
        self.lab = lab

    def call(self, command: str, args: dict[str, Any], *, netns: str | None = None, timeout: float = 600,
             module: str = "bench.inguest") -> Any:
        """`python -m <module> <command> '<json>'` in the guest; its last JSON line is the result
        (bench.inguest, or another in-guest module of the same shape: inguest_restore, inguest_burst)."""
        proc = self.lab.run([self.lab.python, "-m", module, command, json.dumps(args)], netns=netns, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"{module} {command} printed no result: {proc.stderr.strip()[-1000:]}")
        return json.loads(lines[-1])
