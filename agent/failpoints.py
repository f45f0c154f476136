"""Deterministic faults for crash tests on the real stack (`--failpoint OP:WHEN`).

Wraps the ZFS adapter. When the named mutation is reached:
- `before` / `after`: the process SIGKILLs itself (before or after the ZFS call), so the lab
  can check that a restart + retry converges after a crash at exactly that point;
- `stall-before=S` / `stall-after=S`: the call waits S seconds before or after the ZFS call,
  so the lab can send SIGTERM while an operation is in flight.
Off unless the flag is given; never used in production.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from agent.zfs import Zfs

MUTATIONS = ("create_volume", "snapshot", "clone", "destroy", "destroy_snapshots", "rename", "set_props", "send",
             "receive")


class FailpointZfs:
    def __init__(self, inner: Zfs, point: str) -> None:
        op, _, when = point.partition(":")
        when, _, arg = when.partition("=")
        stall = when in ("stall-before", "stall-after") and arg.replace(".", "", 1).isdigit()
        if op not in MUTATIONS or not (stall or (when in ("before", "after") and not arg)):
            raise ValueError(f"failpoint {point!r}: expected <{'|'.join(MUTATIONS)}>:"
                             "<before|after|stall-before=SECONDS|stall-after=SECONDS>")
        self._inner = inner
        self._op = op
        self._when = when.removeprefix("stall-")
        self._stall = float(arg) if stall else 0.0

    def _hit(self) -> None:
        if self._stall:
            time.sleep(self._stall)
            return
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._op:
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._when == "before":
                self._hit()
            result = attr(*args, **kwargs)
            if self._when == "after":
                self._hit()
            return result

        return wrapped
