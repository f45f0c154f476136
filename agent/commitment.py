"""Admission of new commitment (creates, clones, expansions) against the pool's limit.

The index counts a volume only once its create is committed, after the slow ZFS step; the
charges of calls still in flight are held here so that two concurrent creates cannot both
fit under the limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Admissions:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._pending = 0

    def pending(self) -> int:
        with self._mu:
            return self._pending

    @contextmanager
    def admit(self, charge: int, committed: Callable[[], int], check: Callable[[int], None]) -> Iterator[None]:
        """Hold `charge` for the duration of the call; `check(committed now)` raises to refuse.

        Until the finally block, a committed charge is counted twice (index and pending): a
        moment of over-counting, never under-counting."""
        with self._mu:
            check(committed() + self._pending)
            self._pending += charge
        try:
            yield
        finally:
            with self._mu:
                self._pending -= charge
