"""Per-volume locks: a second mutating call on a busy volume gets ABORTED at once.

Exclusive holders mutate the volume (delete, expand, publish...); shared holders only use it
as a source (snapshot, clone), so many branches of one volume can be made in parallel.
Nothing blocks: CSI sidecars retry ABORTED with back-off, which is what the spec intends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from zvolt.errors import aborted


@dataclass
class _State:
    readers: int = 0
    writer: bool = False


class VolumeLocks:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._held: dict[str, _State] = {}

    def _acquire(self, key: str, exclusive: bool) -> None:
        with self._mu:
            st = self._held.setdefault(key, _State())
            if st.writer or (exclusive and st.readers):
                if not st.writer and not st.readers:
                    del self._held[key]
                raise aborted(f"another operation on {key} is in progress; retry later")
            if exclusive:
                st.writer = True
            else:
                st.readers += 1

    def _release(self, key: str, exclusive: bool) -> None:
        with self._mu:
            st = self._held[key]
            if exclusive:
                st.writer = False
            else:
                st.readers -= 1
            if not st.writer and not st.readers:
                del self._held[key]

    @contextmanager
    def hold(self, exclusive: list[str], shared: list[str] | None = None) -> Iterator[None]:
        """Take all the given locks or none (ABORTED if any is busy)."""
        taken: list[tuple[str, bool]] = []
        try:
            for key in sorted(set(exclusive)):
                self._acquire(key, True)
                taken.append((key, True))
            for key in sorted(set(shared or []) - set(exclusive)):
                self._acquire(key, False)
                taken.append((key, False))
            yield
        finally:
            for key, excl in reversed(taken):
                self._release(key, excl)

    def busy(self) -> int:
        with self._mu:
            return len(self._held)
