"""Concurrent reads that share one call: group commit for `zfs get`.

A snapshot's commitment charge needs its `referenced`, and under emulation one `zfs get`
process costs more guest CPU than the snapshot itself. In a burst, every caller that arrives
while a read is running joins the next batch, and one of them reads the whole batch in one call
when the running read ends. A lone caller still reads at once: nothing waits for a timer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Read = Callable[[Sequence[str]], dict[str, dict[str, str]]]


@dataclass
class _Batch:
    names: list[str] = field(default_factory=list)
    done: bool = False
    result: dict[str, dict[str, str]] = field(default_factory=dict)
    error: BaseException | None = None

    def outcome(self, name: str) -> dict[str, str] | None:
        if self.error is not None:
            raise self.error
        return self.result.get(name)


class CoalescedReads:
    """`get(name)` returns what `read([..., name, ...])` said of `name` (None: not there)."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self._cv = threading.Condition()
        self._open: _Batch | None = None  # the batch new callers join
        self._running = False  # a read is in flight: the open batch waits for it

    def get(self, name: str) -> dict[str, str] | None:
        with self._cv:
            if self._open is None:
                self._open = _Batch()
            batch = self._open
            batch.names.append(name)
            while not batch.done:
                if not self._running:
                    self._running = True
                    self._open = None  # later callers start the next batch
                    break
                self._cv.wait()
            else:
                return batch.outcome(name)
        try:
            batch.result = self._read(list(dict.fromkeys(batch.names)))
        except Exception as exc:  # every caller of the batch sees the failure, not just the reader
            batch.error = exc
        with self._cv:
            batch.done = True
            self._running = False
            self._cv.notify_all()
        return batch.outcome(name)
