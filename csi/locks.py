"""Per-key operation locks: a second concurrent call on the same volume gets ABORTED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from zvolt.errors import aborted


class KeyLocks:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        with self._mutex:
            busy = [k for k in keys if k in self._held]
            if busy:
                # The CSI spec's answer to a concurrent operation on one volume: the CO retries later.
                raise aborted(f"an operation on {busy[0]} is already in progress; retry later")
            self._held.update(keys)
        try:
            yield
        finally:
            with self._mutex:
                self._held.difference_update(keys)
