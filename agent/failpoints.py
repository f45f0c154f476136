"""Deterministic kill -9 for crash tests on the real stack (`--failpoint OP:before|after`).

Wraps the ZFS adapter: when the named mutation is reached, the process SIGKILLs itself, so
the lab can check that a restart + retry converges after a crash at exactly that point.
Off unless the flag is given; never used in production.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from agent.zfs import Zfs

MUTATIONS = ("create_volume", "snapshot", "clone", "destroy", "destroy_snapshots", "rename", "set_props")


class FailpointZfs:
    def __init__(self, inner: Zfs, point: str) -> None:
        op, _, when = point.partition(":")
        if op not in MUTATIONS or when not in ("before", "after"):
            raise ValueError(f"failpoint {point!r}: expected <{'|'.join(MUTATIONS)}>:<before|after>")
        self._inner = inner
        self._op = op
        self._when = when

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._op:
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._when == "before":
                self._die()
            result = attr(*args, **kwargs)
            self._die()
            return result

        return wrapped
