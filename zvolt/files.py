"""Small durable-file helpers shared by the agent and the node plugin."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_private_json(path: str | Path, data: Any) -> None:
    """Write JSON readable by root only, atomically and durably: a crash leaves the old file or
    the new one, never a torn one (identities and secrets live in such files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename lives in the directory: without this fsync a power cut can bring back the old
    # file (or none) although the new one was reported written.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
