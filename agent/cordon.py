"""A storage node's cordon: no new volume is placed on it until it is uncordoned.

Kept as one ZFS user property of the parent dataset (`zvolt:cordon` = the reason), like every
other truth of the node: it survives an agent restart and a rebuild of the index from ZFS, and
no controller has to remember it. Read once (one scoped `zfs get`), then served from memory:
GetCapacity, which every placement asks, must not cost a ZFS call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agent.zfs import Zfs, ZfsError
from zvolt.errors import internal, invalid

PROP = "zvolt:cordon"
_UNSET = ("", "-")
MAX_REASON = 256


@dataclass(frozen=True)
class State:
    cordoned: bool
    reason: str = ""


class Cordon:
    def __init__(self, zfs: Zfs, parent: str, node: str) -> None:
        self._zfs = zfs
        self._parent = parent
        self._node = node
        self._mu = threading.Lock()
        self._state: State | None = None

    def state(self) -> State:
        with self._mu:
            if self._state is None:
                value = (self._zfs.get_props(self._parent, (PROP,)) or {}).get(PROP, "")
                self._state = State(value not in _UNSET, "" if value in _UNSET else value)
            return self._state

    def set(self, cordoned: bool, reason: str = "") -> State:
        """Idempotent; the property is written before the answer, so a cordon that was answered holds."""
        if len(reason) > MAX_REASON or not reason.isprintable():
            raise invalid(f"cordon reason must be printable and at most {MAX_REASON} characters")
        want = State(cordoned, (reason or "cordoned") if cordoned else "")
        if self.state() == want:
            return want
        with self._mu:
            try:
                self._zfs.set_props(self._parent, {PROP: want.reason if cordoned else "-"})
            except ZfsError as exc:
                raise internal(f"recording the cordon of storage node {self._node}: {exc}") from exc
            self._state = want
        return want

    def refusal(self) -> str:
        """Why a new volume may not come here; "" when it may."""
        st = self.state()
        if not st.cordoned:
            return ""
        return (f"storage node {self._node} is cordoned ({st.reason}): it takes no new volumes until "
                f"`kubectl zvolt uncordon-storage {self._node}`")
