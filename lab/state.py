"""The per-instance state file (what runs where), written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"


@dataclass
class RunState:
    instance: str
    pid: int
    ssh_port: int
    forwards: dict[str, int]  # service name -> host port on 127.0.0.1
    image: str  # image dir
    run_dir: str
    pool_disk: str
    pool_disk_reused: bool
    memory_mb: int
    started: float
    guest_ready: bool = False
    peer_role: str = ""  # "storage"/"worker" when booted with a peer link to another guest
    peer_port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def console_log(self) -> Path:
        return Path(self.run_dir) / "console.log"

    @property
    def qmp_socket(self) -> Path:
        return Path(self.run_dir) / "qmp.sock"

    @property
    def overlay(self) -> Path:
        return Path(self.run_dir) / "overlay.qcow2"


def save(run_dir: Path, state: RunState) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state), indent=1, sort_keys=True) + "\n")
    tmp.replace(run_dir / STATE_FILE)


def load(run_dir: Path) -> RunState | None:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        return RunState(**data)
    except TypeError:
        return None


def clear(run_dir: Path) -> None:
    (run_dir / STATE_FILE).unlink(missing_ok=True)
