"""The guest's QMP socket: the only reader of qemu's own view of the guest (running, paused on a disk error).

A guest that stops answering ssh is either still booting or stopped by qemu itself: with the
default drive error policy, a write the host cannot store (no space left) pauses the whole
machine, which looks from outside exactly like a slow boot. Asking qemu tells them apart.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TextIO

# sun_path holds 108 bytes; a longer path cannot be bound, so such a guest has no QMP socket.
MAX_SOCKET_PATH = 100


def socket_argv(path: Path) -> list[str]:
    if len(str(path)) > MAX_SOCKET_PATH:
        return []
    return ["-qmp", f"unix:{path},server=on,wait=off"]


def status(path: Path, timeout: float = 3.0) -> str | None:
    """qemu's run state ('running', 'paused', 'io-error', ...), or None when qemu cannot be asked."""
    if len(str(path)) > MAX_SOCKET_PATH or not path.exists():
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            stream = sock.makefile("rw", encoding="utf-8", newline="\n")
            _reply(stream)  # the greeting
            for command in ("qmp_capabilities", "query-status"):
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()
                answer = _reply(stream)
            ret = answer.get("return")
            return str(ret["status"]) if isinstance(ret, dict) and "status" in ret else None
    except (OSError, ValueError):
        return None


def _reply(stream: TextIO) -> dict[str, object]:
    """The next line that is not an asynchronous event."""
    while True:
        line = stream.readline()
        if not line:
            raise ValueError("QMP socket closed")
        msg = json.loads(line)
        if isinstance(msg, dict) and "event" not in msg:
            return msg
