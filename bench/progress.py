"""Progress lines on stderr for long work, so a person (or CI log) sees the bench is alive."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

TICK_SECONDS = 25.0  # a long step says it is still running at least this often (issue: no 30 s of silence)


@dataclass
class Progress:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    start: float = field(default_factory=time.monotonic)
    enabled: bool = True

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[bench +{time.monotonic() - self.start:7.1f}s] {message}", file=self.stream, flush=True)

    @contextmanager
    def ticking(self, what: str, every: float = TICK_SECONDS) -> Iterator[None]:
        """Say `what` is still running every `every` seconds until the block ends."""
        done = threading.Event()
        t0 = time.monotonic()

        def tick() -> None:
            while not done.wait(every):
                self.say(f"{what}: still running ({time.monotonic() - t0:.0f} s)")

        ticker = threading.Thread(target=tick, name="bench-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
